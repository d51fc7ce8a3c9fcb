"""The `keywatch` command line: one verb per job."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from pydantic import ValidationError


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
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except (SettingsError, ValidationError) as exc:
        msg = str(exc)
        if isinstance(exc, ValidationError):
            msg = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
        print(f"keywatch: {msg}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from serving.app import create_app

    settings = _settings(args)
    app = create_app(settings)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from serving.app import build_scorer
    from serving.replay import replay

    settings = _settings(args)
    if not args.events.exists():
        print(f"keywatch: no such events file: {args.events}", file=sys.stderr)
        return 2
    scorer = build_scorer(settings)
    out_path: Path = args.out
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as out:
        summary = replay(scorer, args.events, out, progress=not args.quiet)
    os.replace(tmp, out_path)
    scorer.store.close()
    print(json.dumps({"replay": summary.as_dict(), "out": str(out_path)}), file=sys.stderr)
    return 1 if summary.failed else 0


def cmd_bench(args: argparse.Namespace) -> int:
    from serving.bench import format_report, run_bench

    report = run_bench(size=args.size, out=args.out, redis_url=args.redis,
                       http=not args.no_http, rss=not args.no_rss)
    print(format_report(report))
    print(f"\nwritten to {args.out}" if args.out else "")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    import logging

    from serving.worker import WorkerConfig, run_worker

    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = _settings(args)
    config = WorkerConfig.from_settings(
        settings, stream=args.stream, decisions_stream=args.decisions_stream,
        group=args.group, consumer=args.consumer, block_ms=args.block_ms, count=args.count,
        claim_idle_ms=args.claim_idle_ms)
    try:
        stats = run_worker(settings, config, idle_exit_s=args.exit_when_idle)
    except ValueError as exc:
        print(f"keywatch: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"worker": config.consumer, **stats.as_dict()}), file=sys.stderr)
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    import redis

    from serving.worker import ingest_file

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
    serve.add_argument("--log-level", default="info")
    serve.set_defaults(func=cmd_serve)

    rep = sub.add_parser("replay", help="score an events file through the pipeline")
    rep.add_argument("events", type=Path, help="JSONL or Parquet events")
    rep.add_argument("--out", type=Path, required=True, help="decisions, one JSON line each")
    rep.add_argument("--store", help="'memory' (default) or a redis:// URL")
    rep.add_argument("--model-dir", type=Path)
    rep.add_argument("--dev", action="store_true")
    rep.add_argument("--dry-run", action="store_true")
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
    bench.add_argument("--size", choices=["smoke", "full"], default="full")
    bench.add_argument("--out", type=Path, default=Path("benchmarks/results.json"))
    bench.add_argument("--redis", help="use this Redis instead of starting a local one")
    bench.add_argument("--no-http", action="store_true")
    bench.add_argument("--no-rss", action="store_true")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
