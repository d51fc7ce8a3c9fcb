"""The `retrain` and `models` verbs: fit, gate, promote and list offline models."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from serving.cli.common import settings_from_args

if TYPE_CHECKING:
    from models.registry import ManifestInfo


def cmd_retrain(args: argparse.Namespace) -> int:
    from features.keys import KeyHasher
    from training.retrain import retrain

    settings = settings_from_args(args)
    events = args.events or settings.data_dir / "events"
    model_dir = args.model_dir or settings.model_dir
    if model_dir is None:
        print("keywatch: no model directory: pass --model-dir or set KEYWATCH_MODEL_DIR",
              file=sys.stderr)
        return 2
    try:
        result = retrain(events=events, model_dir=model_dir,
                         hasher=KeyHasher(settings.secret or ""),
                         promote=not args.no_promote, progress=not args.quiet,
                         signing_key=settings.model_signing_key)
    except (ValueError, FileNotFoundError) as exc:
        print(f"keywatch: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result.as_dict(), indent=2))
    return 0 if result.promoted or (args.no_promote and not result.reasons) else 1


def cmd_models(args: argparse.Namespace) -> int:
    from models.registry import ModelRegistry

    settings = settings_from_args(args)
    model_dir = args.model_dir or settings.model_dir
    if model_dir is None:
        print("keywatch: no model directory: pass --model-dir or set KEYWATCH_MODEL_DIR",
              file=sys.stderr)
        return 2
    registry = ModelRegistry(model_dir, signing_key=settings.model_signing_key)
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


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
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
