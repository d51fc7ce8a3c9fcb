"""The `serve` verb: the HTTP service."""

from __future__ import annotations

import argparse
from pathlib import Path

from serving.cli.common import policy_or_exit, settings_from_args


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from serving.api.app import create_app
    from serving.observability.logging_setup import configure_logging

    configure_logging(args.log_format, args.log_level)
    settings = settings_from_args(args)
    policy_or_exit(settings)
    app = create_app(settings)
    # Behind a load balancer, the admin audit trail names the client the balancer forwards
    # for, but only when the peer is one of the configured proxies: anyone else's
    # X-Forwarded-For is ignored (uvicorn's default trusts 127.0.0.1 only).
    trusted = ",".join(args.trusted_proxy) if args.trusted_proxy else None
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, log_config=None,
                proxy_headers=True, forwarded_allow_ips=trusted)
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]

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
    serve.add_argument("--trusted-proxy", action="append", metavar="ADDRESS",
                       help="a load balancer whose X-Forwarded-For is believed (repeatable; "
                            "default 127.0.0.1, or FORWARDED_ALLOW_IPS)")
    serve.add_argument("--log-format", choices=["json", "text"], default="json",
                       help="json lines (default) or text; raw keys are redacted in both")
    serve.set_defaults(func=cmd_serve)
