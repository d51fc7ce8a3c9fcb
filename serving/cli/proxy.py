"""`keywatch proxy`: the OpenAI-compatible edge, from the full install.

The proxy itself lives in `keywatch_gateway.proxy`, so a gateway can run it without the
ML stack (`python -m keywatch_gateway.proxy`); this verb only makes it one of
keywatch's commands.
"""

from __future__ import annotations

import argparse

from keywatch_gateway.proxy import add_arguments, run


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the `proxy` verb to the CLI's subparsers."""
    proxy = sub.add_parser("proxy", help="OpenAI-compatible proxy that enforces keywatch "
                                         "and reports every call")
    add_arguments(proxy)
    proxy.set_defaults(func=run)
