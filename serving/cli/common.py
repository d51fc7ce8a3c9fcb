"""What every verb shares: settings from the command line, and a policy check at start."""

from __future__ import annotations

import argparse
import sys

from pydantic import ValidationError

from features.validation import describe


def settings_from_args(args: argparse.Namespace):  # type: ignore[no-untyped-def]
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
            msg = describe(exc, empty="settings")
        print(f"keywatch: {msg}", file=sys.stderr)
        raise SystemExit(2) from None


def policy_or_exit(settings):  # type: ignore[no-untyped-def]
    """Refuse to start on a broken policy file, saying what and where."""
    from serving.policy.schema import PolicyError, load_policy

    try:
        load_policy(settings.policy)
    except PolicyError as exc:
        print(f"keywatch: the policy file is invalid:\n{exc.report()}", file=sys.stderr)
        raise SystemExit(2) from None
