"""The `keywatch` command line: one verb per job, each verb in a module of its own."""

from __future__ import annotations

import argparse

from serving.cli import bench, detection, models, policy, proxy, replay, report, serve, stream

VERBS = (serve, replay, stream, proxy, bench, models, detection, report, policy)
"""Modules with a `register(subparsers)` function, in the order `--help` lists them."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keywatch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for verb in VERBS:
        verb.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
