"""The `worker` and `ingest` verbs: Redis Streams in and out."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from serving.cli.common import settings_from_args
from serving.runtime import tune_gc


def cmd_worker(args: argparse.Namespace) -> int:
    import logging

    from serving.cli.worker import WorkerConfig, print_dead_letters, run_worker

    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = settings_from_args(args)
    config = WorkerConfig.from_settings(
        settings, stream=args.stream, decisions_stream=args.decisions_stream,
        group=args.group, consumer=args.consumer, block_ms=args.block_ms, count=args.count,
        claim_idle_ms=args.claim_idle_ms, max_deliveries=args.max_deliveries)
    if args.dead_letters is not None:
        return print_dead_letters(settings, config, count=args.dead_letters)
    tune_gc()
    try:
        stats = run_worker(settings, config, idle_exit_s=args.exit_when_idle,
                           metrics_port=args.metrics_port)
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


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
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
    work.add_argument("--max-deliveries", type=int,
                      help="deliveries before an entry goes to the dead letters (default: 5)")
    work.add_argument("--dead-letters", type=int, nargs="?", const=100, metavar="N",
                      help="list the newest N dead letters (JSON lines) and exit")
    work.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
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
