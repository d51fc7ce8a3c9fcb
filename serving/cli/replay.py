"""The `replay` verb: score an events file through the one pipeline."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from serving.cli.common import policy_or_exit, settings_from_args
from serving.runtime import tune_gc

if TYPE_CHECKING:
    pass


def cmd_replay(args: argparse.Namespace) -> int:
    from features.durable import atomic_open
    from serving.engine.factory import build_scorer
    from serving.engine.replay import replay

    settings = settings_from_args(args)
    if not args.events.exists():
        print(f"keywatch: no such events file: {args.events}", file=sys.stderr)
        return 2
    policy_or_exit(settings)
    scorer = build_scorer(settings)
    tune_gc()
    out_path: Path = args.out
    out_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_open(out_path, "w", encoding="utf-8") as out:
            summary = replay(scorer, args.events, out, progress=not args.quiet)
    except ValueError as exc:  # an input file that cannot be read at all
        print(f"keywatch: {exc}", file=sys.stderr)
        return 2
    finally:
        scorer.store.close()
    print(json.dumps({"replay": summary.as_dict(), "out": str(out_path)}), file=sys.stderr)
    return 1 if summary.failed else 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
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
