"""How fast features are, and what one round trip per event buys over a naive design.

Timing belongs here, never in pass/fail tests. Three measurements on the same synthetic
traffic, in the same process, so they are comparable as ratios:

* `bench_features(n, MemoryStore())` — plan + apply + build + learn on the embedded
  store: the cost of the feature definitions themselves (target ≥ 20,000 events/s).
* `bench_features(n, RedisStore(url))` — the same on Redis, one pipelined round trip per
  event (one EVALSHA per entity; target ≥ 2,000 events/s on a local server).
* `bench_naive_redis(n, url)` — what a straightforward implementation does: one INCR,
  one EXPIRE and one GET per counter, each its own request (27 round trips per event
  for 9 counters), and none of the distinct sets, baselines or geo. It computes less
  and is still several times slower: round trips, not arithmetic, are the cost.

Run `python -m benchmarks.features_bench [--events N] [--redis URL]`; without `--redis` a throwaway
local redis-server is started. `keywatch bench` reports the same numbers.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable
from typing import Any

from features.contract import Event
from features.extractor import FeatureExtractor, FeatureStream
from features.stores.base import StateStore
from features.stores.local_server import redis_url_or_local

NAIVE_COUNTERS = 9
"""Counters the naive design keeps per event (requests and tokens per key and window,
requests per IP): 3 calls each = 27 round trips."""

_PUBLIC_IPS = (
    "8.8.8.8", "81.2.69.160", "1.2.3.4", "52.94.76.1", "5.9.0.1", "103.6.84.1",
    "142.250.0.1", "159.89.0.1", "2001:4860:4860::8888", "31.13.64.1", "151.101.1.1",
    "200.160.2.3", "41.63.64.1", "202.12.27.33", "185.60.216.35", "77.88.8.8",
)


def synthetic_events(
    n_events: int, *, n_keys: int = 500, seed: int = 7, start: float = 1_750_000_000.0
) -> list[tuple[Event, str]]:
    """Plausible mixed traffic: (event, key_id) pairs in time order."""
    rng = random.Random(seed)
    ts = start
    out: list[tuple[Event, str]] = []
    ips = [*_PUBLIC_IPS, *(f"10.{i // 250}.{i % 250}.7" for i in range(500)),
           *(f"{rng.randint(11, 220)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{i % 250 + 1}"
             for i in range(2000))]
    models = ("gpt-4o", "gpt-4o-mini", "claude", None)
    endpoints = ("/v1/chat/completions", "/v1/embeddings", "/v1/models")
    agents = ("openai-python/1.54.3", "curl/8.5", "node-fetch", "")
    for i in range(n_events):
        ts += rng.expovariate(200.0)
        k = int(rng.paretovariate(1.2)) % n_keys
        tokens = rng.choice((0, 120, 850, rng.randint(1, 4000)))
        out.append((Event(
            api_key=f"key-{k}",
            timestamp=ts,
            endpoint=rng.choice(endpoints),
            status=rng.choice((200,) * 20 + (401, 429, 500)),
            tokens=tokens,
            prompt_tokens=tokens // 2 if i % 3 else None,
            completion_tokens=tokens - tokens // 2 if i % 3 else None,
            latency_ms=rng.uniform(50, 2000),
            source_ip=ips[(k * 7 + (i % 3 == 0) * rng.randint(0, 40)) % len(ips)],
            user_agent=rng.choice(agents),
            model=rng.choice(models),
        ), f"k_{k:032x}"))
    return out


def bench_features(
    n_events: int,
    store: StateStore,
    *,
    extractor: FeatureExtractor | None = None,
    events: list[tuple[Event, str]] | None = None,
) -> dict[str, Any]:
    """Events per second through plan → store → build → learn (every event learned)."""
    events = events if events is not None else synthetic_events(n_events)
    stream = FeatureStream(store, extractor or FeatureExtractor())
    # warm up: geo database, Lua script, caches
    for event, key_id in events[: min(200, len(events))]:
        stream.learn(stream.process(event, key_id))
    trips_before = getattr(store, "round_trips", None)
    client = getattr(store, "client", None)
    server_cpu = _server_cpu(client)
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    for event, key_id in events:
        stream.learn(stream.process(event, key_id))
    stream.flush()
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    server = _server_cpu(client) - server_cpu
    trips = getattr(store, "round_trips", None)
    return _result(store.name, len(events), elapsed, cpu, server,
                   (trips - trips_before) / len(events) if trips is not None
                   and trips_before is not None else None)


def _server_cpu(client: Any) -> float:
    """CPU seconds the Redis server has used (user + sys), 0 without a server."""
    if client is None:
        return 0.0
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _result(name: str, n: int, elapsed: float, cpu: float, server_cpu: float,
            trips: float | None) -> dict[str, Any]:
    """Wall-clock speed, and CPU per event (client + server): the CPU figure does not
    depend on what else the machine is running, the wall-clock one does."""
    return {
        "store": name,
        "events": n,
        "seconds": elapsed,
        "events_per_s": n / elapsed,
        "us_per_event": elapsed / n * 1e6,
        "client_cpu_us_per_event": cpu / n * 1e6,
        "server_cpu_us_per_event": server_cpu / n * 1e6,
        "cpu_events_per_s": n / (cpu + server_cpu) if cpu + server_cpu > 0 else None,
        "round_trips_per_event": trips,
    }


def bench_naive_redis(n_events: int, url: str, *, events: list[tuple[Event, str]] | None = None,
                      ttl_s: int = 8 * 86400) -> dict[str, Any]:
    """The naive design: one INCR/INCRBY, one EXPIRE and one GET per counter, each a
    separate request, for 9 counters (27 round trips per event). It computes only these
    counts — no distinct sets, baselines, geo or sliding windows (fixed buckets)."""
    import redis

    client = redis.Redis.from_url(url, decode_responses=True)
    events = events if events is not None else synthetic_events(n_events)
    calls = 0
    server_cpu = _server_cpu(client)
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    for event, key_id in events:
        ts = event.timestamp
        counters = []
        for label, bucket in (("1m", 60), ("5m", 300), ("1h", 3600), ("24h", 86400)):
            b = int(ts // bucket)
            counters.append((f"naive:{key_id}:req:{label}:{b}", 1))
            counters.append((f"naive:{key_id}:tok:{label}:{b}", event.tokens))
        counters.append((f"naive:{event.source_ip}:req:5m:{int(ts // 300)}", 1))
        assert len(counters) == NAIVE_COUNTERS
        values = {}
        for name, amount in counters:
            client.incrby(name, amount)
            client.expire(name, ttl_s)
            values[name] = int(client.get(name) or 0)
            calls += 3
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    server = _server_cpu(client) - server_cpu
    client.close()
    return _result("redis-naive", len(events), elapsed, cpu, server, calls / len(events))


def run_all(n_events: int = 20_000, redis_url: str | None = None, *,
            n_redis_events: int | None = None,
            echo: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
    """Memory, Redis and naive Redis on the same traffic; prints and returns the numbers."""
    from features.stores.memory import MemoryStore
    from features.stores.redis_store import RedisStore

    with redis_url_or_local(redis_url) as redis_url:
        events = synthetic_events(n_events)
        redis_events = events[: n_redis_events or min(n_events, 5_000)]
        out = {"memory": bench_features(len(events), MemoryStore(), events=events)}
        store = RedisStore(redis_url, namespace=f"bench{time.time_ns()}")
        out["redis"] = bench_features(len(redis_events), store, events=redis_events)
        store.close()
        out["naive"] = bench_naive_redis(len(redis_events), redis_url, events=redis_events)
    for name, r in out.items():
        trips = r["round_trips_per_event"]
        echo(f"{name:>7}: {r['events_per_s']:>9,.0f} events/s wall "
             f"({r['us_per_event']:.0f} µs/event); CPU per event: client "
             f"{r['client_cpu_us_per_event']:.0f} µs + server {r['server_cpu_us_per_event']:.0f} µs"
             + (f"; {trips:.2f} round trips/event" if trips is not None else ""))
    ratio = out["redis"]["events_per_s"] / out["naive"]["events_per_s"]
    cpu_ratio = out["redis"]["cpu_events_per_s"] / out["naive"]["cpu_events_per_s"]
    echo(f"one round trip vs naive ({NAIVE_COUNTERS * 3} calls): {ratio:.1f}x by wall clock, "
         f"{cpu_ratio:.1f}x by CPU; memory vs redis: "
         f"{out['memory']['events_per_s'] / out['redis']['events_per_s']:.1f}x")
    out["ratios"] = {"redis_vs_naive": ratio, "redis_vs_naive_cpu": cpu_ratio,
                     "memory_vs_redis": out["memory"]["events_per_s"]
                     / out["redis"]["events_per_s"]}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--redis-events", type=int, default=5_000)
    parser.add_argument("--redis", default=None, help="redis:// URL (default: start one)")
    args = parser.parse_args(argv)
    run_all(args.events, args.redis, n_redis_events=args.redis_events)


if __name__ == "__main__":
    main()
