"""The `keywatch` command line: one verb per job."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from serving.cli import proxy
from serving.runtime import tune_gc

if TYPE_CHECKING:
    from models.registry import ManifestInfo


def _settings(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from serving.settings import Settings, SettingsError

    overrides: dict[str, object] = {}
    if getattr(args, "dev", False):
        overrides["env"] = "development"
    if getattr(args, "store", None):
        overrides["store"] = args.store
    if getattr(args, "model_dir", None):
        overrides["model_dir"] = args.model_dir
    if getattr(args, "dry_run", False):
        overrides["dry_run"] = True
    if getattr(args, "policy", None):
        overrides["policy"] = args.policy
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except (SettingsError, ValidationError) as exc:
        msg = str(exc)
        if isinstance(exc, ValidationError):
            msg = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
        print(f"keywatch: {msg}", file=sys.stderr)
        raise SystemExit(2) from None


def _load_or_exit(settings):  # type: ignore[no-untyped-def]
    """Refuse to start on a broken policy file, saying what and where."""
    from serving.policy.schema import PolicyError, load_policy

    try:
        load_policy(settings.policy)
    except PolicyError as exc:
        print(f"keywatch: the policy file is invalid:\n{exc.report()}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from serving.api.app import create_app
    from serving.observability.logging_setup import configure_logging

    configure_logging(args.log_format, args.log_level)
    settings = _settings(args)
    _load_or_exit(settings)
    app = create_app(settings)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, log_config=None)
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from features.durable import atomic_open
    from serving.engine.factory import build_scorer
    from serving.engine.replay import replay

    settings = _settings(args)
    if not args.events.exists():
        print(f"keywatch: no such events file: {args.events}", file=sys.stderr)
        return 2
    _load_or_exit(settings)
    scorer = build_scorer(settings)
    tune_gc()
    out_path: Path = args.out
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(out_path, "w", encoding="utf-8") as out:
        summary = replay(scorer, args.events, out, progress=not args.quiet)
    scorer.store.close()
    print(json.dumps({"replay": summary.as_dict(), "out": str(out_path)}), file=sys.stderr)
    return 1 if summary.failed else 0


def cmd_bench(args: argparse.Namespace) -> int:
    from benchmarks.suite import format_report, run_bench

    tune_gc()  # as the service runs (see serving.runtime)
    report = run_bench(size=args.size, out=args.out, redis_url=args.redis,
                       http=not args.no_http, rss=not args.no_rss)
    print(format_report(report))
    print(f"\nwritten to {args.out}" if args.out else "")
    return 0


def cmd_retrain(args: argparse.Namespace) -> int:
    from features.keys import KeyHasher
    from training.retrain import retrain

    settings = _settings(args)
    events = args.events or settings.data_dir / "events"
    model_dir = args.model_dir or settings.model_dir
    if model_dir is None:
        print("keywatch: no model directory: pass --model-dir or set KEYWATCH_MODEL_DIR",
              file=sys.stderr)
        return 2
    try:
        result = retrain(events=events, model_dir=model_dir,
                         hasher=KeyHasher(settings.secret or ""),
                         promote=not args.no_promote, progress=not args.quiet)
    except (ValueError, FileNotFoundError) as exc:
        print(f"keywatch: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result.as_dict(), indent=2))
    return 0 if result.promoted or (args.no_promote and not result.reasons) else 1


def cmd_models(args: argparse.Namespace) -> int:
    from models.registry import ModelRegistry

    settings = _settings(args)
    model_dir = args.model_dir or settings.model_dir
    if model_dir is None:
        print("keywatch: no model directory: pass --model-dir or set KEYWATCH_MODEL_DIR",
              file=sys.stderr)
        return 2
    registry = ModelRegistry(model_dir)
    try:
        if args.models_command == "list":
            current = registry.current_version()
            for info in registry.list():
                mark = "*" if info.version == current else " "
                print(f"{mark} {info.version}  {json.dumps(_manifest_brief(info))}")
            return 0
        if args.models_command == "promote":
            registry.verify(args.version)
            registry.promote(args.version)
            print(f"promoted {args.version}")
            return 0
        version = registry.rollback()
        print(f"rolled back to {version}")
        return 0
    except Exception as exc:
        print(f"keywatch: {exc}", file=sys.stderr)
        return 1


def _manifest_brief(info: ManifestInfo) -> dict[str, object]:
    return {"created_at": info.created_at, "rows": info.row_count,
            "window": info.training_window, "passed": info.gates.get("passed"),
            "error": getattr(info, "error", None)}


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


def cmd_policy_check(args: argparse.Namespace) -> int:
    from serving.policy.schema import PolicyError, load_policy

    try:
        policy = load_policy(args.file)
    except PolicyError as exc:
        print(exc.report(), file=sys.stderr)
        print(f"keywatch: {args.file}: {len(exc.problems)} problem(s), policy refused",
              file=sys.stderr)
        return 1
    print(f"{args.file}: ok: {policy.summary()}")
    return 0


def cmd_policy_impact(args: argparse.Namespace) -> int:
    from serving.reports.impact import impact_report

    if not args.decisions.exists():
        print(f"keywatch: no such decisions file: {args.decisions}", file=sys.stderr)
        return 2
    report = impact_report(args.decisions)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(report.text())
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    import logging

    from serving.cli.worker import WorkerConfig, run_worker

    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = _settings(args)
    config = WorkerConfig.from_settings(
        settings, stream=args.stream, decisions_stream=args.decisions_stream,
        group=args.group, consumer=args.consumer, block_ms=args.block_ms, count=args.count,
        claim_idle_ms=args.claim_idle_ms)
    tune_gc()
    try:
        stats = run_worker(settings, config, idle_exit_s=args.exit_when_idle)
    except ValueError as exc:
        print(f"keywatch: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"worker": config.consumer, **stats.as_dict()}), file=sys.stderr)
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    import redis

    from serving.cli.worker import ingest_file

    # no secret needed: the raw events go to the stream, the worker derives key ids
    store = args.store or os.environ.get("KEYWATCH_STORE", "")
    stream = args.stream or os.environ.get("KEYWATCH_STREAM_EVENTS", "kw:events")
    if not store.startswith(("redis://", "rediss://", "unix://")):
        print("keywatch: ingest needs --store redis://...", file=sys.stderr)
        return 2
    if not args.events.exists():
        print(f"keywatch: no such events file: {args.events}", file=sys.stderr)
        return 2
    client = redis.Redis.from_url(store, socket_timeout=10, decode_responses=True)
    try:
        counts = ingest_file(client, args.events, stream=stream, maxlen=args.maxlen)
    finally:
        client.close()
    print(json.dumps({**counts, "stream": stream}), file=sys.stderr)
    return 1 if counts["skipped"] else 0


def cmd_report(args: argparse.Namespace) -> int:
    import time

    from features.keys import KeyHasher
    from features.pricing import PriceTable, load_price_file
    from serving.policy.schema import PolicyError, load_policy
    from serving.reports.report import build_report, deliver, parse_when, write_report

    settings = _settings(args)
    data_dir = args.data_dir or settings.data_dir
    model_dir = args.model_dir or settings.model_dir
    now = time.time()
    try:
        until = parse_when(args.until, now=now) or now
        since = parse_when(args.since, now=until)
        configs = [load_price_file(settings.prices) if settings.prices else None]
        configs.append(load_policy(settings.policy).pricing)
    except (ValueError, PolicyError) as exc:
        print(f"keywatch: {exc}", file=sys.stderr)
        return 2
    if since is None or since >= until:
        print("keywatch: --since must be before --until", file=sys.stderr)
        return 2
    if not Path(data_dir).exists():
        print(f"keywatch: no such data directory: {data_dir}", file=sys.stderr)
        return 2
    report = build_report(data_dir=data_dir, since=since, until=until, model_dir=model_dir,
                          labels=args.labels, hasher=KeyHasher(settings.secret or ""),
                          prices=PriceTable.from_configs(*configs))
    paths = write_report(report, args.out, plots=not args.no_plots)
    out: dict[str, object] = {"summary": report.summary(), "paths": paths}
    url = args.webhook or settings.report_webhook_url
    if url:
        out["delivery"] = deliver(url, report, paths)
    print(json.dumps(out, indent=2, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keywatch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the HTTP service")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--store", help="'memory' (default) or a redis:// URL")
    serve.add_argument("--model-dir", type=Path)
    serve.add_argument("--dev", action="store_true",
                       help="development mode: allow running without KEYWATCH_SECRET")
    serve.add_argument("--dry-run", action="store_true", help="score and alert, never enforce")
    serve.add_argument("--policy", type=Path, help="policy file (default: the packaged one)")
    serve.add_argument("--log-level", default="info")
    serve.add_argument("--log-format", choices=["json", "text"], default="json",
                       help="json lines (default) or text; raw keys are redacted in both")
    serve.set_defaults(func=cmd_serve)

    rep = sub.add_parser("replay", help="score an events file through the pipeline")
    rep.add_argument("events", type=Path, help="JSONL or Parquet events")
    rep.add_argument("--out", type=Path, required=True, help="decisions, one JSON line each")
    rep.add_argument("--store", help="'memory' (default) or a redis:// URL")
    rep.add_argument("--model-dir", type=Path)
    rep.add_argument("--dev", action="store_true")
    rep.add_argument("--dry-run", action="store_true")
    rep.add_argument("--policy", type=Path, help="policy file (default: the packaged one)")
    rep.add_argument("--quiet", action="store_true", help="no progress bar")
    rep.set_defaults(func=cmd_replay)

    work = sub.add_parser("worker", help="score events from a Redis Stream consumer group")
    work.add_argument("--store", required=True, help="redis:// URL (state and streams)")
    work.add_argument("--stream", help="events stream (default: kw:events)")
    work.add_argument("--decisions-stream", help="decisions stream (default: kw:decisions)")
    work.add_argument("--group", help="consumer group (default: keywatch)")
    work.add_argument("--consumer", help="consumer name (default: <host>-<pid>)")
    work.add_argument("--block-ms", type=int, default=1000, help="XREADGROUP block timeout")
    work.add_argument("--count", type=int, default=64, help="entries read per call")
    work.add_argument("--claim-idle-ms", type=int,
                      help="take over entries pending this long (default: 30000)")
    work.add_argument("--exit-when-idle", type=float, metavar="SECONDS",
                      help="stop after this long without work (batch jobs, tests)")
    work.add_argument("--model-dir", type=Path)
    work.add_argument("--dev", action="store_true")
    work.add_argument("--dry-run", action="store_true")
    work.add_argument("--log-level", default="info")
    work.set_defaults(func=cmd_worker)

    ing = sub.add_parser("ingest", help="XADD a JSONL file of events to the events stream")
    ing.add_argument("events", type=Path, help="JSONL events, one object per line")
    ing.add_argument("--store", help="redis:// URL (default: $KEYWATCH_STORE)")
    ing.add_argument("--stream", help="events stream (default: kw:events)")
    ing.add_argument("--maxlen", type=int, help="trim the stream to about this length")
    ing.set_defaults(func=cmd_ingest)

    bench = sub.add_parser("bench", help="speed of every path, as ratios against baselines")
    bench.add_argument("--size", choices=["tiny", "smoke", "full"], default="full")
    bench.add_argument("--out", type=Path, default=Path("benchmarks/results.json"))
    bench.add_argument("--redis", help="use this Redis instead of starting a local one")
    bench.add_argument("--no-http", action="store_true")
    bench.add_argument("--no-rss", action="store_true")
    bench.set_defaults(func=cmd_bench)

    ret = sub.add_parser("retrain", help="fit, calibrate, gate and promote the offline model")
    ret.add_argument("--events", type=Path,
                     help="JSONL/Parquet file or event-log directory (default: the service's)")
    ret.add_argument("--model-dir", type=Path)
    ret.add_argument("--no-promote", action="store_true", help="fit and gate only")
    ret.add_argument("--dev", action="store_true")
    ret.add_argument("--quiet", action="store_true")
    ret.set_defaults(func=cmd_retrain)

    mod = sub.add_parser("models", help="the model registry")
    mod_sub = mod.add_subparsers(dest="models_command", required=True)
    for name, text in (("list", "versions, the current one marked *"),
                       ("promote", "make a version current"),
                       ("rollback", "back to the previously promoted version")):
        p = mod_sub.add_parser(name, help=text)
        p.add_argument("--model-dir", type=Path)
        p.add_argument("--dev", action="store_true")
        if name == "promote":
            p.add_argument("version")
        p.set_defaults(func=cmd_models)

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

    rpt = sub.add_parser("report", help="the security report: incidents, money, keys, "
                                        "feedback, models, health (Markdown, HTML, plots)")
    rpt.add_argument("--since", required=True,
                     help="RFC 3339, epoch seconds, or a span back from --until (24h, 7d)")
    rpt.add_argument("--until", help="RFC 3339 or epoch seconds (default: now)")
    rpt.add_argument("--out", type=Path, required=True, help="folder to write the report to")
    rpt.add_argument("--data-dir", type=Path, help="the service's data directory "
                                                   "(default: KEYWATCH_DATA_DIR)")
    rpt.add_argument("--model-dir", type=Path)
    rpt.add_argument("--labels", type=Path,
                     help="a `keywatch simulate` directory: time to detect from its labels")
    rpt.add_argument("--webhook", help="POST the summary and paths here")
    rpt.add_argument("--no-plots", action="store_true")
    rpt.add_argument("--policy", type=Path, help="policy file (for its prices)")
    rpt.add_argument("--dev", action="store_true")
    rpt.set_defaults(func=cmd_report)

    pol = sub.add_parser("policy", help="validate a policy file, or report its impact")
    pol_sub = pol.add_subparsers(dest="policy_command", required=True)
    chk = pol_sub.add_parser("check", help="validate a policy file, naming what is wrong "
                                          "and on which line")
    chk.add_argument("file", type=Path)
    chk.set_defaults(func=cmd_policy_check)
    imp = pol_sub.add_parser("impact", help="events and keys a policy would throttle or "
                                           "block, by rule, from `replay` decisions")
    imp.add_argument("decisions", type=Path, help="decisions JSONL written by `replay`")
    imp.add_argument("--json", action="store_true", help="machine-readable output")
    imp.set_defaults(func=cmd_policy_impact)
    proxy.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
