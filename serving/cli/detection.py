"""The `simulate` and `evaluate` verbs: labelled traffic and how well keywatch does on it."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass


def cmd_simulate(args: argparse.Namespace) -> int:
    from training.simulator import simulate

    summary = simulate(args.out, keys=args.keys, days=args.days, seed=args.seed,
                       progress=not args.quiet)
    print(json.dumps({"events": summary.events, "incidents": summary.incidents,
                      "test_incidents": summary.test_incidents,
                      "test_start": summary.test_start, "out": str(summary.out_dir),
                      "by_scenario": summary.by_scenario}, indent=2))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from training.evaluate import VARIANTS, evaluate

    data: Path = args.data
    missing = [n for n in ("events.jsonl", "labels.jsonl", "incidents.json", "meta.json")
               if not (data / n).exists()]
    if missing:
        print(f"keywatch: {data} is not a simulation directory (missing "
              f"{', '.join(missing)}); make one with `keywatch simulate --out {data}`",
              file=sys.stderr)
        return 2
    variants = tuple(v.strip() for v in args.variants.split(",")) if args.variants else VARIANTS
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        print(f"keywatch: unknown variant(s) {', '.join(unknown)}; choose from "
              f"{', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    out: Path = args.out or data / "evaluation"
    report = evaluate(data, model_dir=args.model_dir, out_dir=out, progress=not args.quiet,
                      variants=variants, workers=args.workers)
    rows = {name: {t["measure"]: {"value": t["value"], "met": t["met"]} for t in r.targets}
            for name, r in report.variants.items()}
    print(json.dumps({"report": str(report.report_md), "json": str(report.report_json),
                      "seconds": round(report.seconds, 1), "targets": rows}, indent=2))
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    sim = sub.add_parser("simulate", help="labelled multi-tenant traffic with incidents")
    sim.add_argument("--out", type=Path, required=True)
    sim.add_argument("--keys", type=int, default=60)
    sim.add_argument("--days", type=int, default=7)
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--quiet", action="store_true")
    sim.set_defaults(func=cmd_simulate)

    ev = sub.add_parser("evaluate", help="retrain on the training days of a simulation, "
                                         "replay it per variant, report detection quality")
    ev.add_argument("--data", type=Path, required=True,
                    help="a directory written by `keywatch simulate`")
    ev.add_argument("--model-dir", type=Path,
                    help="model registry to retrain into and score with (default: OUT/models)")
    ev.add_argument("--out", type=Path, help="report directory (default: DATA/evaluation)")
    ev.add_argument("--variants", help="comma-separated subset of keywatch, rules_only, "
                                       "models_only, naive (default: all)")
    ev.add_argument("--workers", type=int,
                    help="processes to replay the variants in (default: one per variant, at "
                         "most one per CPU)")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")
    ev.set_defaults(func=cmd_evaluate)
