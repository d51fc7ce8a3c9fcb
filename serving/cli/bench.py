"""The `bench` verb: every path's speed as ratios against baselines run alongside."""

from __future__ import annotations

import argparse
from pathlib import Path

from serving.runtime import tune_gc

CHECKOUT_RESULTS = Path("benchmarks/results.json")
"""Where a checkout keeps its recorded figures (the README's tables come from it)."""
INSTALLED_RESULTS = Path("keywatch-bench.json")


def default_out(cwd: Path) -> Path:
    """The checkout's results file when run from a checkout, else a file of its own in
    the current directory: a run elsewhere never creates a `benchmarks/` folder there."""
    if (cwd / CHECKOUT_RESULTS).parent.is_dir():
        return CHECKOUT_RESULTS
    return INSTALLED_RESULTS


def cmd_bench(args: argparse.Namespace) -> int:
    from benchmarks.suite import format_report, run_bench, run_state_only

    tune_gc()  # as the service runs (see serving.runtime)
    if args.out is None:
        args.out = default_out(Path.cwd())
    if args.only == "state":
        report = run_state_only(size=args.size, out=args.out, redis_url=args.redis)
    else:
        report = run_bench(size=args.size, out=args.out, redis_url=args.redis,
                           http=not args.no_http, rss=not args.no_rss)
    print(format_report(report))
    print(f"\nwritten to {args.out}" if args.out else "")
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    bench = sub.add_parser("bench", help="speed of every path, as ratios against baselines")
    bench.add_argument("--size", choices=["tiny", "smoke", "full"], default="full")
    bench.add_argument("--out", type=Path, default=None,
                       help="results file (default: benchmarks/results.json in a checkout, "
                            "else keywatch-bench.json)")
    bench.add_argument("--redis", help="use this Redis instead of starting a local one")
    bench.add_argument("--no-http", action="store_true")
    bench.add_argument("--no-rss", action="store_true")
    bench.add_argument("--only", choices=["state"],
                       help="only the state store's figures, merged into --out")
    bench.set_defaults(func=cmd_bench)
