"""The `report` verb: the security report."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from serving.cli.common import settings_from_args

if TYPE_CHECKING:
    pass


def cmd_report(args: argparse.Namespace) -> int:
    import time

    from features.keys import KeyHasher
    from features.pricing import PriceTable, load_price_file
    from serving.policy.schema import PolicyError, load_policy
    from serving.reports.content import parse_when
    from serving.reports.render import deliver, write_report
    from serving.reports.report import build_report

    settings = settings_from_args(args)
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


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
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
