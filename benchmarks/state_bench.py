"""The state store's figures, each against the previous layout measured in the same run.

* Redis server CPU per event (`INFO cpu`, user + sys, over a replay of warm traffic) and
  round trips per event, beside the CPU one bare GET round trip costs the server in the
  same run (the floor of any design with one round trip per event), and the same store
  with its entity copies turned off (every call's ops applied in the script);
* the same through the full scorer with event ids (claims, ban reads, the population's
  learning log), against claims applied in the script (the previous design), and through
  the stream worker's once scopes, against every call of a scope applied in the script;
* events per second one Redis core serves, with several client processes replaying at
  once: the events replayed divided by the server CPU seconds they cost (the clients share
  this machine's cores, so wall-clock rate measures them, not Redis);
* bytes per warm key and per address in Redis (`MEMORY USAGE` of the entity's keys) and
  in the memory store (`tracemalloc` over a copy of the entity's state), with the memory
  store's own estimate beside it (`features.stores.budget`).

The baseline is `benchmarks/old_layout/` (a field and a stamp per ring bucket, 504 fields
of hour-of-week profile, a sorted set key per capped set, reads computed in Lua, one
script call per request). Warm traffic: keys seen every ~15 minutes for eight days from
a handful of addresses, clients and models, so rings, profile and sets are full.

Run `python -m benchmarks.state_bench`; `keywatch bench` reports the same figures.
"""

from __future__ import annotations

import multiprocessing
import pickle
import random
import statistics
import time
import tracemalloc
from collections.abc import Callable
from functools import partial
from typing import Any

from benchmarks.old_layout.memory_v1 import OldLayoutMemoryStore
from benchmarks.old_layout.redis_v1 import OldLayoutRedisStore
from features.contract import Event
from features.extractor import FeatureExtractor, FeatureStream
from features.stores.base import CLAIM, REMEMBER, EntityOps, StateStore
from features.stores.budget import entity_bytes
from features.stores.local_server import redis_url_or_local
from features.stores.memory import MemoryStore
from features.stores.once import OnceRedisStore
from features.stores.redis_store import RedisStore

T0 = 1_794_999_960.0
MODELS = ("gpt-4o", "gpt-4o-mini", "claude-3-5-sonnet", None)
AGENTS = ("openai-python/1.54.3", "node-fetch/3.3", "curl/8.5")


def warm_traffic(n_keys: int, *, days: float = 8.0, every_s: float = 900.0,
                 seed: int = 3) -> list[tuple[Event, str]]:
    """(event, key id) pairs in time order: each key every ~`every_s` for `days`."""
    rng = random.Random(seed)
    out: list[tuple[float, int]] = []
    for k in range(n_keys):
        ts = T0 + rng.uniform(0, every_s)
        while ts < T0 + days * 86400:
            out.append((ts, k))
            ts += rng.expovariate(1.0 / every_s)
    out.sort()
    events = []
    for i, (ts, k) in enumerate(out):
        tokens = rng.choice((120, 850, rng.randint(1, 4000)))
        events.append((Event(
            api_key=f"sk-bench-{k}", timestamp=ts, endpoint="/v1/chat/completions",
            status=rng.choice((200,) * 30 + (401, 429)), tokens=tokens,
            prompt_tokens=tokens // 2, completion_tokens=tokens - tokens // 2,
            latency_ms=rng.uniform(80, 1500), model=MODELS[(k + i % 7) % len(MODELS)],
            source_ip=f"81.2.{k % 250}.{rng.randint(1, 6) if i % 50 else rng.randint(7, 250)}",
            user_agent=AGENTS[(k + (i % 13 == 0)) % len(AGENTS)]), f"k_{k:032x}"))
    return events


def replay(store: StateStore, events: list[tuple[Event, str]]) -> None:
    """plan -> one round trip -> build, every event learned (as `features_bench`)."""
    stream = FeatureStream(store, FeatureExtractor())
    for event, key_id in events:
        stream.learn(stream.process(event, key_id))
    stream.flush()


def server_cpu_s(store: RedisStore) -> float:
    info = store.client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def round_trip_floor_us(store: RedisStore, n: int = 3_000) -> float:
    """Server CPU µs of one GET round trip: what the transport alone costs per event."""
    store.client.set("floor", "1")
    cpu = server_cpu_s(store)
    for _ in range(n):
        store.client.get("floor")
    return (server_cpu_s(store) - cpu) / n * 1e6


def redis_cpu_per_event(store: RedisStore, events: list[tuple[Event, str]],
                        warm: int) -> tuple[float, float]:
    """(server CPU µs per event, round trips per event) over `events[warm:]`."""
    replay(store, events[:warm])
    cpu, trips = server_cpu_s(store), store.round_trips
    replay(store, events[warm:])
    n = len(events) - warm
    return (server_cpu_s(store) - cpu) / n * 1e6, (store.round_trips - trips) / n


class ClaimsInScriptRedisStore(RedisStore):
    """The previous design, as a baseline: a call holding an event id's claim (or the
    decision remembered for it) is applied in the script, never computed on the copy."""

    def _compute_all(self, merged: list[EntityOps], plans: list[Any],
                     tokens: list[bytes]) -> list[Any]:
        out = super()._compute_all(merged, plans, tokens)
        return [None if any(op[0] in (CLAIM, REMEMBER) for op in req.ops) else local
                for req, local in zip(merged, out, strict=True)]


class OnceInScriptRedisStore(OnceRedisStore):
    """The previous design of the stream worker's store, as a baseline: every call inside
    a once scope applied in the script (its reply cached), never computed on the copy."""

    def _compute_all(self, merged: list[EntityOps], plans: list[Any],
                     tokens: list[bytes]) -> list[Any]:
        if self._token is not None:
            return [None] * len(merged)
        return super()._compute_all(merged, plans, tokens)


def _with_ids(events: list[tuple[Event, str]]) -> list[Event]:
    return [e.model_copy(update={"event_id": f"ev-{i}"}) for i, (e, _) in enumerate(events)]


def _scorer_cpu(redis_url: str, events: list[Event], variants: dict[str, type[RedisStore]],
                score: Callable[[Any, Any, Event], None], rounds: int) -> dict[str, float]:
    """Server CPU µs per event through the full scorer (features, ban reads, models, the
    population's learning log), each variant's store in turn, `rounds` times in fresh
    namespaces: the mean. The first half of the events warms the state."""
    from benchmarks.suite import make_scorer

    warm = len(events) // 2
    spent: dict[str, list[float]] = {label: [] for label in variants}
    for _ in range(rounds):
        for label, cls in variants.items():
            store = cls(redis_url, namespace=f"scorer{label}{time.time_ns()}", timeout_s=5.0)
            scorer = make_scorer(store)
            for event in events[:warm]:
                score(store, scorer, event)
            cpu = server_cpu_s(store)
            for event in events[warm:]:
                score(store, scorer, event)
            spent[label].append((server_cpu_s(store) - cpu) / (len(events) - warm) * 1e6)
            store.close()
    return {label: statistics.mean(values) for label, values in spent.items()}


def scorer_cpu_per_event(redis_url: str, events: list[tuple[Event, str]], *,
                         rounds: int = 2) -> dict[str, float]:
    """A live service's events (event ids claimed), against claims applied in the script."""
    from serving.engine.ingest import Dedupe

    def score(_store: Any, scorer: Any, event: Event) -> None:
        if scorer.dedupe is None:
            scorer.dedupe = Dedupe(window_s=3600)
        scorer.score(event)

    return _scorer_cpu(redis_url, _with_ids(events),
                       {"new": RedisStore, "claims_in_script": ClaimsInScriptRedisStore},
                       score, rounds)


def worker_cpu_per_event(redis_url: str, events: list[tuple[Event, str]], *,
                         rounds: int = 2) -> dict[str, float]:
    """The stream worker's events (each in its once scope, its once keys deleted after, as
    `keywatch worker` does), against every call of a scope applied in the script."""

    def score(store: Any, scorer: Any, event: Event) -> None:
        with store.once(f"ev:{event.event_id}") as keys, scorer.pinned_clock(event.timestamp):
            scorer.score(event)
            scorer.flush()
        if keys:
            store.client.delete(*keys)

    return _scorer_cpu(redis_url, _with_ids(events),
                       {"new": OnceRedisStore, "once_in_script": OnceInScriptRedisStore},
                       score, rounds)


def redis_entity_bytes(store: RedisStore, kind: str) -> list[int]:
    """MEMORY USAGE of each entity of `kind`, all its keys (hash and sorted sets)."""
    sizes: dict[str, int] = {}
    for key in store.client.scan_iter(f"{store.namespace}:{{{kind}:*", count=1000):
        entity = key.split("}", 1)[0]
        sizes[entity] = sizes.get(entity, 0) + int(store.client.memory_usage(key, samples=0)
                                                   or 0)
    return sorted(sizes.values())


def memory_entity_bytes(store: Any, kind: str) -> tuple[list[int], list[int]]:
    """(measured, estimated) bytes of each entity of `kind` in a memory store: what a
    copy of its state allocates (`tracemalloc`; a pickle round trip, so that every object
    is its own, names and numbers included), and `features.stores.budget`'s figure."""
    lrus = [store._entities, getattr(store, "_addresses", {})]
    states = [s for lru in lrus for (k, _), s in lru.items() if k == kind]
    measured, estimated = [], []
    for state in states:
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        clone = pickle.loads(pickle.dumps(state))
        measured.append(tracemalloc.get_traced_memory()[0] - before)
        tracemalloc.stop()
        del clone
        if hasattr(state, "profiles"):
            estimated.append(entity_bytes(state))
    return sorted(measured), sorted(estimated)


def _client(url: str, namespace: str, old: bool, events: list[tuple[Event, str]]) -> None:
    # a generous timeout: on a loaded machine the previous layout's calls can take long
    store = (OldLayoutRedisStore(url, namespace=namespace, timeout_s=5.0) if old
             else RedisStore(url, namespace=namespace, timeout_s=5.0))
    replay(store, events)
    store.close()


def one_core_capacity(url: str, events: list[tuple[Event, str]], *, old: bool,
                      clients: int = 3) -> tuple[float, float]:
    """(events per server CPU second, events/s achieved) with `clients` processes each
    replaying its own keys' events at once against one Redis."""
    slices: list[list[tuple[Event, str]]] = [[] for _ in range(clients)]
    for event, key_id in events:
        slices[hash(key_id) % clients].append((event, key_id))
    probe = RedisStore(url, namespace="probe")
    ctx = multiprocessing.get_context("fork")
    tag = f"cap{'old' if old else 'new'}{time.time_ns()}"
    procs = [ctx.Process(target=_client, args=(url, f"{tag}{i}", old, part))
             for i, part in enumerate(slices)]
    cpu, t0 = server_cpu_s(probe), time.perf_counter()
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    wall, spent = time.perf_counter() - t0, server_cpu_s(probe) - cpu
    probe.close()
    return len(events) / spent, len(events) / wall


def _median(values: list[int]) -> float:
    return float(statistics.median(values)) if values else 0.0


def run_state_bench(redis_url: str, *, n_keys: int = 6, days: float = 8.0,
                    capacity_events: int = 3_000,
                    echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Every store figure, new layout and old, in this run."""
    events = warm_traffic(n_keys, days=days)
    warm = len(events) // 2
    out: dict[str, Any] = {"events": len(events), "keys": n_keys}
    stores: tuple[tuple[str, Callable[..., Any]], ...] = (
        ("new", RedisStore), ("ops_in_lua", partial(RedisStore, cache_mb=0)),
        ("old", OldLayoutRedisStore))
    for label, cls in stores:
        store = cls(redis_url, namespace=f"state{label}{time.time_ns()}", timeout_s=5.0)
        cpu, trips = redis_cpu_per_event(store, events, warm)
        keys, ips = redis_entity_bytes(store, "k"), redis_entity_bytes(store, "ip")
        out[label] = {"server_cpu_us_per_event": cpu, "round_trips_per_event": trips,
                      "redis_bytes_per_warm_key": _median(keys),
                      "redis_bytes_per_address": _median(ips)}
        if label == "new":
            out["round_trip_floor_us"] = round_trip_floor_us(store)
            echo(f"one GET round trip: {out['round_trip_floor_us']:.0f} µs server CPU")
        store.close()
        echo(f"redis {label}: {cpu:.0f} µs server CPU/event, {trips:.2f} round trips/event, "
             f"key {_median(keys):.0f} B, address {_median(ips):.0f} B")
    out["scorer_cpu_us_per_event"] = scorer_cpu_per_event(redis_url, events)
    echo("full scorer with event ids: {new:.0f} µs server CPU/event, claims in the "
         "script {claims_in_script:.0f}".format(**out["scorer_cpu_us_per_event"]))
    out["worker_cpu_us_per_event"] = worker_cpu_per_event(redis_url, events)
    echo("stream worker: {new:.0f} µs server CPU/event, every call of a once scope in "
         "the script {once_in_script:.0f}".format(**out["worker_cpu_us_per_event"]))
    for label, mem in (("new", MemoryStore(max_mb=None)), ("old", OldLayoutMemoryStore())):
        replay(mem, events)
        keys, key_est = memory_entity_bytes(mem, "k")
        ips, ip_est = memory_entity_bytes(mem, "ip")
        out[label].update({"memory_bytes_per_warm_key": _median(keys),
                           "memory_bytes_per_address": _median(ips),
                           "memory_estimate_per_warm_key": _median(key_est),
                           "memory_estimate_per_address": _median(ip_est)})
        echo(f"memory {label}: key {_median(keys):.0f} B (estimate {_median(key_est):.0f}), "
             f"address {_median(ips):.0f} B (estimate {_median(ip_est):.0f})")
    burst = warm_traffic(40, days=capacity_events * 900 / 40 / 86400, seed=11)
    for label, old in (("new", False), ("old", True)):
        capacity, achieved = one_core_capacity(redis_url, burst, old=old)
        out[label].update({"events_per_redis_core_s": capacity, "clients_events_per_s": achieved})
        echo(f"capacity {label}: {capacity:,.0f} events per Redis CPU second "
             f"({achieved:,.0f} events/s achieved by 3 clients on this machine)")
    return out


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis", default=None, help="redis:// URL (default: a local one)")
    parser.add_argument("--keys", type=int, default=6)
    args = parser.parse_args()
    with redis_url_or_local(args.redis) as url:
        run_state_bench(url, n_keys=args.keys)


if __name__ == "__main__":
    main()
