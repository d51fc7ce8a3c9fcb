"""`keywatch simulate` and `keywatch evaluate`: labelled traffic, and how well keywatch
does on it.

`evaluate` without `--data` is the evaluation that cannot be tuned to: one perturbed
simulation per seed (`training.evaluate_seeds`), the worst case of each metric next to
its median. With `--data DIR` it evaluates one existing simulation, every variant.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None


def cmd_simulate(args: argparse.Namespace) -> int:
    from training.simulator import simulate

    summary = simulate(args.out, keys=args.keys, days=args.days, seed=args.seed,
                       progress=not args.quiet, perturb=args.perturb)
    print(json.dumps({"events": summary.events, "incidents": summary.incidents,
                      "test_incidents": summary.test_incidents, "start": summary.start,
                      "test_start": summary.test_start, "out": str(summary.out_dir),
                      "by_scenario": summary.by_scenario}, indent=2))
    return 0


def _variants(text: str | None, default: tuple[str, ...]) -> tuple[str, ...] | None:
    from training.evaluate import VARIANTS

    variants = tuple(v.strip() for v in text.split(",")) if text else default
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        print(f"keywatch: unknown variant(s) {', '.join(unknown)}; choose from "
              f"{', '.join(VARIANTS)}", file=sys.stderr)
        return None
    return variants


def cmd_evaluate(args: argparse.Namespace) -> int:
    if args.data is not None:
        return _evaluate_one(args)
    from training.evaluate_seeds import evaluate_seeds

    variants = _variants(args.variants, ("keywatch",))
    if variants is None:
        return 2
    choose = args.choose if args.choose is not None else args.seeds[:2]
    if len(set(args.seeds)) < 2 or not set(choose) & set(args.seeds) \
            or not set(args.seeds) - set(choose):
        print("keywatch: --seeds needs at least two seeds, and --choose some of them but "
              "not all (thresholds are chosen on some seeds and reported on the others)",
              file=sys.stderr)
        return 2
    out: Path = args.out or Path("evaluation")
    report = evaluate_seeds(out, seeds=args.seeds, choose=choose, keys=args.keys,
                            days=args.days, variants=variants, workers=args.workers or 1,
                            progress=not args.quiet)
    print(json.dumps({"report": str(report.report_md), "json": str(report.report_json),
                      "plot": str(report.plot), "seconds": round(report.seconds, 1),
                      "choose_seeds": report.choose_seeds, "report_seeds": report.report_seeds,
                      "worst_case": {v: {m: {"median": a["median"], "worst": a["worst"],
                                             "pass": a["met"]} for m, a in agg.items()}
                                     for v, agg in report.aggregate.items()}},
                     indent=2, default=str))
    return 0


def _evaluate_one(args: argparse.Namespace) -> int:
    from training.evaluate import VARIANTS, evaluate

    data: Path = args.data
    missing = [n for n in ("events.jsonl", "labels.jsonl", "incidents.json", "meta.json")
               if not (data / n).exists()]
    if missing:
        print(f"keywatch: {data} is not a simulation directory (missing "
              f"{', '.join(missing)}); make one with `keywatch simulate --out {data}`",
              file=sys.stderr)
        return 2
    variants = _variants(args.variants, VARIANTS)
    if variants is None:
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
    """Add the `simulate` and `evaluate` verbs to the `keywatch` parser."""
    from training.evaluate_seeds import DEFAULT_DAYS, DEFAULT_KEYS, DEFAULT_SEEDS

    sim = sub.add_parser("simulate", help="labelled multi-tenant traffic with incidents")
    sim.add_argument("--out", type=Path, required=True)
    sim.add_argument("--keys", type=int, default=60)
    sim.add_argument("--days", type=int, default=7)
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--perturb", action="store_true",
                     help="redraw rates, sizes, schedules, calendar and model mix from the seed")
    sim.add_argument("--quiet", action="store_true")
    sim.set_defaults(func=cmd_simulate)

    ev = sub.add_parser("evaluate", help="detection quality: worst case over perturbed "
                                         "simulations (or one simulation with --data)")
    ev.add_argument("--seeds", type=_ints, default=list(DEFAULT_SEEDS),
                    help="generator seeds, comma-separated (default: 0,1,2,3,4)")
    ev.add_argument("--choose", type=_ints,
                    help="seeds the score threshold is chosen on (default: the first two "
                         "seeds); it is reported on the others")
    ev.add_argument("--keys", type=int, default=DEFAULT_KEYS, help="keys per simulation")
    ev.add_argument("--days", type=int, default=DEFAULT_DAYS,
                    help="days per simulation (the last two are judged)")
    ev.add_argument("--data", type=Path,
                    help="evaluate this `keywatch simulate` directory instead (every variant)")
    ev.add_argument("--model-dir", type=Path,
                    help="with --data: model registry to retrain into (default: OUT/models)")
    ev.add_argument("--out", type=Path,
                    help="report directory (default: ./evaluation, or DATA/evaluation)")
    ev.add_argument("--variants", help="comma-separated subset of keywatch, rules_only, "
                                       "models_only, naive (default: keywatch over seeds, "
                                       "all with --data)")
    ev.add_argument("--workers", type=int,
                    help="processes: seeds in parallel (default 1), or with --data the "
                         "variants (default: one per variant, at most one per CPU)")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")
    ev.set_defaults(func=cmd_evaluate)
