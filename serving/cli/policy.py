"""The `policy check` and `policy impact` verbs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass


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


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
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

