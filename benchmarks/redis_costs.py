"""What Redis server CPU an event's round trip is made of: the unit costs of the store's
fast path, each against a bare GET round trip measured in the same run.

Why: the state store's figure (server CPU per event, `benchmarks.state_bench`) mixes the
transport, the script calls, the fields written and the bytes moved. Knowing each unit's
price says which design change can move the figure: fewer round trips, fewer script
calls, fewer fields or fewer bytes. Each case sends `calls` commands per round trip,
pipelined, as the store does, and reads `INFO cpu` (user + sys) around `n` round trips:

* `get_1`, `get_4`: one and four GETs a round trip (the transport, and a command);
* `script_4`: four calls of a script that returns at once (a script call);
* `fast_1x8`, `fast_30x8`, `fast_30x270`: four calls of the store's own script on its
  fast path (the token matches), each writing 1 field of 8 bytes, 30 of 8 bytes, or 30 of
  270 bytes (8 KB a call): the call's fixed work, a field, a KB;
* `hset_1x8`, `hset_30x8`: the same small fields written by four plain HSETs (the
  script's share of a field).

The hash holds a 1 KB field throughout, as a key's does (its decayed sums), so its
encoding is Redis' hashtable in every case, as a key's is; a small hash would change
encoding between the cases and the prices would mix the two.

Run `python -m benchmarks.redis_costs [--redis URL] [--n 3000]`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import redis

from features.stores.local_server import redis_url_or_local
from features.stores.redis_store import APPLY_OPS

HASH = "costs:h"
TOKEN = "t0"


def _server_cpu_s(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _fields(n: int, size: int) -> list[Any]:
    out: list[Any] = []
    for i in range(n):
        out += [f"f{i}", os.urandom(size)]
    return out


def _fast_path_args(pairs: list[Any]) -> list[Any]:
    """apply_ops' ARGV for a call whose copy is current: no TTL, the held token written
    again (so every call takes the fast path), the pairs, no deletions, no sorted-set ops,
    and an empty spec (never read on the fast path)."""
    return ["0", TOKEN, TOKEN, str(len(pairs) // 2), "0", "0", *pairs, "", "[]"]


def _per_round_trip_us(client: redis.Redis, send: Callable[[Any], object], calls: int,
                       n: int) -> float:
    pipe = client.pipeline(transaction=False)
    before = _server_cpu_s(client)
    for _ in range(n):
        for _ in range(calls):
            send(pipe)
        pipe.execute()
    return (_server_cpu_s(client) - before) / n * 1e6


def measure(url: str, *, n: int = 3_000) -> dict[str, float]:
    """Server CPU µs per round trip of each case (see the module docstring)."""
    client = redis.Redis.from_url(url)
    sha, noop = client.script_load(APPLY_OPS.text), client.script_load("return 1")
    client.hset(HASH, mapping={"_v": TOKEN, "b|ks": os.urandom(1032)})
    one, small, large = _fields(1, 8), _fields(30, 8), _fields(30, 270)
    if client.evalsha(sha, 1, HASH, *_fast_path_args(small)) != b"=":
        raise RuntimeError("the store's script did not take its fast path")
    if client.object("encoding", HASH) != b"hashtable":
        raise RuntimeError("the hash is not in the encoding a key's hash has")

    def fast(pairs: list[Any]) -> Callable[[Any], object]:
        return lambda p: p.evalsha(sha, 1, HASH, *_fast_path_args(pairs))

    def hset(pairs: list[Any]) -> Callable[[Any], object]:
        mapping = dict(zip(pairs[::2], pairs[1::2], strict=True))
        return lambda p: p.hset(HASH, mapping=mapping)

    cases: dict[str, tuple[Callable[[Any], object], int]] = {
        "get_1": (lambda p: p.get("costs:x"), 1),
        "get_4": (lambda p: p.get("costs:x"), 4),
        "script_4": (lambda p: p.evalsha(noop, 0), 4),
        "fast_1x8": (fast(one), 4),
        "fast_30x8": (fast(small), 4),
        "fast_30x270": (fast(large), 4),
        "hset_1x8": (hset(one), 4),
        "hset_30x8": (hset(small), 4),
    }
    try:
        return {name: _per_round_trip_us(client, send, calls, n)
                for name, (send, calls) in cases.items()}
    finally:
        client.delete(HASH)
        client.close()


def unit_costs(rt: dict[str, float]) -> dict[str, float]:
    """Derived prices in µs: the round trip; one more command in it; one command running a
    script that returns at once; one fast-path call of the store's script writing one
    small field (the token check and the call's fixed work); each further field it
    writes; each KB of field values it moves; each further field of a plain HSET."""
    return {
        "round_trip": rt["get_1"],
        "command": (rt["get_4"] - rt["get_1"]) / 3,
        "script_call": (rt["script_4"] - rt["get_1"]) / 4,
        "fast_path_call": (rt["fast_1x8"] - rt["get_1"]) / 4,
        "field_in_script": (rt["fast_30x8"] - rt["fast_1x8"]) / 4 / 29,
        "kb_in_script": (rt["fast_30x270"] - rt["fast_30x8"]) / 4 / (30 * 262 / 1024),
        "field_by_hset": (rt["hset_30x8"] - rt["hset_1x8"]) / 4 / 29,
    }


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis", default=None, help="redis:// URL (default: a local one)")
    parser.add_argument("--n", type=int, default=3_000, help="round trips per case")
    args = parser.parse_args()
    with redis_url_or_local(args.redis) as url:
        t0 = time.perf_counter()
        rt = measure(url, n=args.n)
        floor = rt["get_1"]
        print("| case | server CPU µs per round trip | x one GET round trip |")
        print("|---|---|---|")
        for name, us in rt.items():
            print(f"| {name} | {us:.1f} | {us / floor:.2f}x |")
        print("\n| unit | µs | x one GET round trip |\n|---|---|---|")
        for name, us in unit_costs(rt).items():
            print(f"| {name} | {us:.2f} | {us / floor:.3f}x |")
        print(f"\n({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
