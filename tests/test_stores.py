"""The memory store and the Redis store apply the generic ops identically.

The Redis side runs against a real redis-server process.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest

from features.stores.base import (
    BUDGET_ADD,
    CLAIM,
    DECAY_ADD,
    DEL,
    EWM,
    EWM_GAP,
    EWM_SAME,
    GET,
    GETS,
    INCR,
    LOG_APPEND,
    LOG_READ,
    PERSIST,
    RECENT_ADD,
    RECENT_COUNT,
    REMEMBER,
    RING_ADD,
    RING_GET,
    RING_MAX,
    RING_SUM,
    RING_VALUES,
    RING_WINDOWS,
    SEEN_ADD,
    SET,
    ZITEMS,
    ZREM,
    ZSET,
    EntityOps,
    StateStore,
    StoreError,
)
from features.stores.memory import MemoryStore
from features.stores.packed import decayed_sums, ring_add, ring_read
from features.stores.redis_store import RedisStore


def random_ops(rng: random.Random, ts: float) -> list[tuple[object, ...]]:
    ops: list[tuple[object, ...]] = []
    for _ in range(rng.randint(1, 12)):
        kind = rng.choice(["get", "set", "del", "incr", "ring", "ring_get", "ring_sum", "ewm",
                           "recent", "recent_count", "seen", "zset", "zrem", "zitems",
                           "persist", "gap", "same", "gets", "windows", "values",
                           "budget", "ring_max"])
        stamp = int(ts // 60) - rng.randint(-1, 3)
        if kind == "get":
            ops.append((GET, rng.choice(["a", "b", "c"])))
        elif kind == "set":
            ops.append((SET, rng.choice(["a", "b"]), str(rng.randint(0, 9))))
        elif kind == "del":
            ops.append((DEL, rng.choice(["a", "b", "c"])))
        elif kind == "incr":  # a plain field, or a slot of a packed vector
            fld = rng.choice(["c", "cv#0", "cv#3"])
            ops.append((INCR, fld, rng.choice([1, 2.5, -1])))
            ops.append((GETS, 3, fld, "cv#1", "cv#9"))
        elif kind == "ring":
            ops.append((RING_ADD, "r", stamp % 8, stamp, rng.choice([1, 3, 0.5])))
        elif kind == "ring_get":
            ops.append((RING_GET, "r", stamp % 8, stamp))
        elif kind == "ring_max":
            ops.append((RING_MAX, "mx", stamp % 8, stamp, rng.choice([1, 3, 0.5, 7, 2.25])))
            ops.append((RING_VALUES, "mx", 8, 3, stamp, stamp - 1, stamp - 8))
        elif kind == "ring_sum":
            ops.append((RING_SUM, "r", 8, stamp - rng.randint(0, 9), stamp))
        elif kind == "ewm":
            ops.append((EWM, "e", rng.uniform(0, 10), 0.1))
            ops.append((GET, "e:m"))
            ops.append((GET, "e:v"))
        elif kind == "recent":
            ops.append((RECENT_ADD, "z", f"m{rng.randint(0, 12)}", ts, 300, 6))
        elif kind == "recent_count":
            ops.append((RECENT_COUNT, "z", ts, 120))
        elif kind == "zset":
            ops.append((ZSET, "ix", f"m{rng.randint(0, 9)}", rng.choice([ts, 1e18, ts + 0.5]), 6))
        elif kind == "zrem":
            ops.append((ZREM, "ix", f"m{rng.randint(0, 9)}"))
        elif kind == "zitems":
            ops.append((ZITEMS, "ix", ts - rng.randint(0, 60), rng.randint(1, 8)))
        elif kind == "persist":
            ops.append((PERSIST, rng.randint(0, 1)))
        elif kind == "gets":
            ops.append((GETS, 4, "a", "b", "zz", "e:m"))
        elif kind == "windows":
            ns = rng.sample([1, 3, 5, 8, 9, 12], k=rng.randint(1, 3))
            ops.append((RING_WINDOWS, "r", 8, stamp + rng.randint(-2, 2), len(ns), *ns))
        elif kind == "values":
            stamps = [stamp - rng.randint(-3, 12) for _ in range(rng.randint(1, 4))]
            ops.append((RING_VALUES, "r", 8, len(stamps), *stamps))
        elif kind == "gap":
            # late (negative gap), simultaneous, capped and ordinary gaps
            at = ts + rng.choice([0.0, -30.0, 0.01, 2.5, 500.0])
            ops.append((EWM_GAP, "g", "g:last", at, 0.1, 100.0))
            ops.extend([(GET, "g:m"), (GET, "g:v"), (GET, "g:n"), (GET, "g:last")])
            # the same, kept in slots of a packed profile and a packed vector
            slot = rng.choice([0, 2])
            ops.append((EWM_GAP, f"pe#{slot}", f"lv#{slot}", at, 0.1, 100.0))
            ops.extend([(GETS, 3, f"pe#{slot}:m", f"pe#{slot}:n", f"lv#{slot}"),
                        (GET, "lv#1")])
        elif kind == "same":
            x = rng.choice([0, 7, 7, 12.5])
            ops.append((EWM_SAME, "q", "q:last", x, 0.2))
            ops.extend([(GET, "q:m"), (GET, "q:v"), (GET, "q:last")])
            ops.append((EWM_SAME, "pe#1", "lv#3", x, 0.2))
            ops.extend([(GET, "pe#1:m"), (GET, "pe#1:v"), (GET, "lv#3")])
        elif kind == "budget":
            # periods that move on, stay, and come late; amounts that fit and that do not
            period = int(ts // 600) - rng.choice([0, 0, 0, 1])
            ops.append((BUDGET_ADD, "bud", period, rng.choice([1, 250, 999, 2500]), 5000))
            ops.extend([(GET, "bud"), (GET, "bud:p"), (GET, "bud:over")])
        else:
            ops.append((SEEN_ADD, "s", f"m{rng.randint(0, 8)}", ts, 5))
    return ops


def _norm(v: object) -> object:
    if isinstance(v, list):
        return [_norm(x) for x in v]
    if isinstance(v, (int, float)) or (isinstance(v, str) and v.replace(".", "", 1).replace(
            "-", "", 1).replace("e", "", 1).isdigit()):
        return round(float(v), 9)
    return v


def normalise(results: list[list[object]]) -> list[list[object]]:
    return [[_norm(v) for v in res] for res in results]


@pytest.mark.parametrize("seed", range(5))
def test_memory_and_redis_give_the_same_results(redis_url: str, seed: int) -> None:
    rng = random.Random(seed)
    mem, red = MemoryStore(), RedisStore(redis_url, namespace=f"eq{seed}")
    ts = 1_700_000_000.0
    for _ in range(300):
        ts += rng.uniform(0, 40)
        reqs = []
        for ent in rng.sample(["x", "y", "z"], k=rng.randint(1, 2)):
            reqs.append(EntityOps("k", ent, random_ops(rng, ts)))
        assert normalise(mem.execute(reqs)) == normalise(red.execute(reqs))
    for ent in ("x", "y", "z"):
        assert_same_packed_fields(mem, redis_url, f"eq{seed}", "k", ent)
    red.close()


def assert_same_packed_fields(mem: MemoryStore, redis_url: str, namespace: str, kind: str,
                              entity_id: str) -> None:
    """The memory store holds an entity's rings, profiles, vectors and capped sets as the
    very bytes of the Redis hash's fields."""
    import redis

    state = mem._entities.get((kind, entity_id))
    if state is None:
        return
    held = redis.Redis.from_url(redis_url).hgetall(f"{namespace}:{{{kind}:{entity_id}}}:h")
    packed = {**state.rings, **state.profiles,
              **{f"z|{name}": blob for name, blob in state.sets.items()}}
    assert packed  # the random ops write some
    assert packed == {f.decode(): v for f, v in held.items() if f.decode() in packed}


def test_one_round_trip_per_event_and_hash_tagged_keys(redis_url: str) -> None:
    import redis

    store = RedisStore(redis_url, namespace="rt")
    store.execute([EntityOps("k", "warm", [(INCR, "n", 1)])])  # loads the script
    before = store.round_trips
    for i in range(10):
        store.execute([EntityOps("k", "abc", [(INCR, "n", 1), (RECENT_ADD, "ips", f"1.1.1.{i}",
                                                            1e9 + i, 60, 10)]),
                       EntityOps("ip", "1.2.3.4", [(INCR, "n", 1)])])
    assert store.round_trips - before == 10
    keys = sorted(redis.Redis.from_url(redis_url, decode_responses=True).keys("rt:*"))
    # an entity is one hash: its capped sets are packed fields of it, not keys of their own
    assert keys == ["rt:{ip:1.2.3.4}:h", "rt:{k:abc}:h", "rt:{k:warm}:h"]
    fields = redis.Redis.from_url(redis_url).hkeys("rt:{k:abc}:h")
    assert sorted(fields) == [b"_v", b"n", b"z|ips"]  # `_v`: the version token
    assert store.cache.hits >= 18  # after its first call, each entity was computed here
    assert redis.Redis.from_url(redis_url).hget("rt:{k:abc}:h", "n") == b"10"
    ttl = redis.Redis.from_url(redis_url).ttl("rt:{k:abc}:h")
    assert 0 < ttl <= store.idle_ttl_s


def test_a_script_flush_is_recovered_without_double_applying(redis_url: str) -> None:
    import redis

    store = RedisStore(redis_url, namespace="fl")
    store.execute([EntityOps("k", "a", [(INCR, "n", 1)])])
    redis.Redis.from_url(redis_url).script_flush()
    res = store.execute([EntityOps("k", "a", [(INCR, "n", 1)])])
    assert res == [[2.0]]


def test_unreachable_redis_is_a_clear_store_error() -> None:
    store = RedisStore("redis://127.0.0.1:1/0", timeout_s=0.2)
    assert store.ping() is False
    with pytest.raises(StoreError, match="redis store failed"):
        store.execute([EntityOps("k", "a", [(INCR, "n", 1)])])


def test_bad_op_is_refused_before_anything_is_applied() -> None:
    store = MemoryStore()
    with pytest.raises(StoreError, match="unknown store operation"):
        store.execute([EntityOps("k", "a", [(INCR, "n", 1), ("explode",)])])
    assert store.execute([EntityOps("k", "a", [(GET, "n")])]) == [[None]]


def test_memory_store_is_bounded() -> None:
    store = MemoryStore(max_entities=1000)
    for i in range(5000):
        store.execute([EntityOps("ip", f"10.0.{i // 256}.{i % 256}", [(INCR, "n", 1)])])
    assert len(store) == 1000
    assert store.evictions == 4000


def test_persisted_entities_do_not_idle_out(redis_url: str) -> None:
    """A permanent ban must outlive the idle TTL that clears ordinary entity state."""
    import redis

    store = RedisStore(redis_url, namespace="ps", idle_ttl_s=100)
    store.execute([EntityOps("k", "perm", [(SET, "ban:until", "1e18"), (PERSIST, 1),
                                          (ZSET, "ix", "a", 5, 10)])])
    client = redis.Redis.from_url(redis_url)
    assert client.ttl("ps:{k:perm}:h") == -1 and client.ttl("ps:{k:perm}:z:ix") == -1
    store.execute([EntityOps("k", "perm", [(PERSIST, 0), (SET, "ban:until", "0")])])
    assert 0 < client.ttl("ps:{k:perm}:h") <= 100
    # a ban (or a limit) ending past the idle TTL keeps the entity until it ends (wall time)
    import time
    store.execute([EntityOps("k", "perm", [(SET, "lim:until", repr(time.time() + 5000))])])
    assert 4900 < client.ttl("ps:{k:perm}:h") <= 5001

    mem = MemoryStore(idle_ttl_s=100)
    mem.execute([EntityOps("k", "perm", [(SET, "ban:until", "1e18"), (PERSIST, 1),
                                        (SEEN_ADD, "s", "x", 1000.0, 5)])])
    mem.execute([EntityOps("k", "other", [(SEEN_ADD, "s", "x", 5000.0, 5)])])
    assert mem.execute([EntityOps("k", "perm", [(GET, "ban:until")])]) == [["1e18"]]


def test_window_edges_are_exact_on_both_stores(redis_url: str) -> None:
    """An epoch time with a fraction, exactly one window later: the old member is out.
    (Lua's tostring keeps 14 digits; the script must format times with %.17g.)"""
    t = 1_767_225_601.40625
    for store in (MemoryStore(), RedisStore(redis_url, namespace="edge")):
        store.execute([EntityOps("k", "a", [(SEEN_ADD, "cc", "US", t, 8)])])
        res = store.execute([EntityOps("k", "a", [(SEEN_ADD, "cc", "DE", t + 3600, 8),
                                                  (RECENT_COUNT, "cc", t + 3600, 3600),
                                                  (RECENT_ADD, "ips", "x", t, 3600, 8),
                                                  (RECENT_ADD, "ips", "y", t + 3600, 3600, 8)])])
        assert res == [[1, 1, 1, 1]], store.name


def test_a_non_finite_number_is_refused_not_sent_as_nil(redis_url: str) -> None:
    store = RedisStore(redis_url, namespace="t-nan")
    ok = EntityOps("k", "a", [(SET, "f", 1.5)])
    assert store.execute([ok]) == [[None]]
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="JSON compliant"):
            store.execute([EntityOps("k", "a", [(INCR, "n", bad)])])
    assert store.execute([EntityOps("k", "a", [(GET, "f"), (GET, "n")])]) == [["1.5", None]]
    store.close()


def test_ring_max_keeps_the_largest_value_of_its_stamp(redis_url: str) -> None:
    """A bucket keeps its stamp's largest value; a newer stamp starts it afresh; a value for
    a stamp older than the bucket's is refused (None), on both stores alike."""
    for store in (MemoryStore(), RedisStore(redis_url, namespace="ringmax")):
        res = store.execute([EntityOps("k", "a", [
            (RING_MAX, "m", 3, 11, 5.0), (RING_MAX, "m", 3, 11, 2.0),
            (RING_MAX, "m", 3, 11, 9.5), (RING_VALUES, "m", 8, 1, 11),
            (RING_MAX, "m", 3, 19, 1.0), (RING_MAX, "m", 3, 11, 50.0),
            (RING_VALUES, "m", 8, 2, 19, 11)])])
        assert res == [[5.0, 5.0, 9.5, [9.5], 1.0, None, [1.0, 0.0]]], store.name
        if isinstance(store, RedisStore):
            store.close()


def test_memory_store_keeps_to_its_budget_evicting_addresses_before_keys() -> None:
    store = MemoryStore(max_mb=0.5)
    budget = 0.5 * 2**20
    t = 1_700_000_000
    for k in range(20):  # keys with a day of hourly counters: a few KiB each
        store.execute([EntityOps("k", f"key{k}", [(RING_ADD, "req:h", h % 26, t // 3600 + h, 1.0)
                                                 for h in range(26)] + [(INCR, "n", 1)])])
    for i in range(20_000):  # then a flood of addresses seen once
        store.execute([EntityOps("ip", f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}",
                                 [(INCR, "n", 1)])])
        assert store.feature_bytes <= budget
    assert store.address_evictions > 15_000 and store.evictions == store.address_evictions
    kept = store.execute([EntityOps("k", f"key{k}", [(GET, "n")]) for k in range(20)])
    assert all(res == ["1"] for res in kept)  # no key was evicted while addresses remained
    for k in range(20, 2_000):  # a flood of keys: addresses go first, then the oldest keys
        store.execute([EntityOps("k", f"key{k}", [(INCR, "n", 1)])])
    assert store.feature_bytes <= budget and len(store._addresses) == 0
    assert store.evictions > store.address_evictions
    assert store.stats()["feature_bytes"] == store.feature_bytes


def test_remembered_decisions_count_in_the_budget(tmp_path: Path) -> None:
    """An event id's remembered decision is hundreds of characters: the byte estimate
    follows them as they are remembered and forgotten, and a snapshot restores it."""
    import pickle
    import tracemalloc

    store = MemoryStore(max_mb=None)
    t = 1_700_000_000.0
    base = None
    for i in range(300):
        decision = f'{{"key_id":"k_0","decision":"allow","score":0.{i},' + '"x":1,' * 50 + "}"
        store.execute([EntityOps("k", "hot", [(CLAIM, "_claims", f"ev{i}", t + 900, t),
                                              (INCR, "n", 1)])])
        store.execute([EntityOps("k", "hot", [(REMEMBER, "_claims", f"ev{i}", decision)])])
        if base is None:
            base = store.feature_bytes
    state = store._entities[("k", "hot")]
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    clone = pickle.loads(pickle.dumps(state))
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    del clone
    assert 0.8 < store.feature_bytes / held < 1.25, (store.feature_bytes, held)
    store.snapshot(tmp_path / "state.snapshot")
    restored = MemoryStore(max_mb=None)
    restored.restore(tmp_path / "state.snapshot")
    assert restored.feature_bytes == store.feature_bytes
    for _ in range(6):  # all expire: 64 are forgotten a call
        store.execute([EntityOps("k", "hot", [(CLAIM, "_claims", "late", t + 5000, t + 1000)])])
    assert state.remembered == 0 and store.feature_bytes < base + 2_000


def test_rings_read_alike_while_sparse_and_once_dense(redis_url: str) -> None:
    # a ring starts as a few (slot, stamp, value) cells and turns dense past eight of them
    rng = random.Random(11)
    mem, red = MemoryStore(), RedisStore(redis_url, namespace="sparse")
    stamp = 500_000
    for _ in range(120):
        stamp += rng.choice([0, 1, 1, 3, 40])
        late = stamp - rng.randint(0, 45)
        ops = [(RING_ADD, "w", late % 40, late, rng.choice([1, 2.5])),
               (RING_MAX, "p", stamp % 40, stamp, float(rng.randint(1, 9))),
               (RING_VALUES, "w", 40, 8, *range(stamp, stamp - 8, -1)),
               (RING_WINDOWS, "w", 40, stamp, 2, 5, 39), (RING_GET, "p", stamp % 40, stamp)]
        req = [EntityOps("ip", "198.51.100.7", ops)]
        assert mem.execute(req) == red.execute(req)
    import redis

    held = redis.Redis.from_url(redis_url).hget("sparse:{ip:198.51.100.7}:h", "w") or b""
    assert held[:1] == b"c" and len(held) >= 5 + 9 * 6  # it turned dense on the way
    assert held == mem._addresses[("ip", "198.51.100.7")].rings["w"]  # the same bytes
    red.close()


def test_rings_change_format_alike_in_both_stores(redis_url: str) -> None:
    """A ring's cells keep 32-bit values while each is exact as one, then doubles; its
    stamps one-byte offsets while they span less than 255 buckets, then two bytes, then
    int32 past 65535; sparse, then dense. Both stores hold the same bytes and read the
    same buckets throughout, whatever the order of the writes (late ones, far older
    ones, newer ones)."""
    import redis

    raw = redis.Redis.from_url(redis_url)
    rng = random.Random(5)
    mem, red = MemoryStore(), RedisStore(redis_url, namespace="fmt")
    seen: set[bytes] = set()
    regimes = {"near": ([1, 1, 2, 3], [0, 0, 2, 5]), "mid": ([1, 30, 300], [0, 2, 50, 400]),
               "far": ([1, 3, 70_000], [0, 2, 80_000])}
    for round_ in range(6):
        name, stamp = f"r{round_}", 1_000_000
        steps, lates = regimes[("near", "mid", "far")[round_ % 3]]
        for _ in range(150):
            stamp += rng.choice(steps)
            at = stamp - rng.choice(lates)
            amount = rng.choice([1.0, 2.5, 0.1, 3e9]) if round_ >= 3 else 1.0
            op = RING_ADD if rng.random() < 0.7 else RING_MAX
            ops = [(op, name, at % 64, at, amount),
                   (RING_VALUES, name, 64, 4, stamp, at, at - 1, at - 64),
                   (RING_WINDOWS, name, 64, stamp, 2, 3, 70), (RING_SUM, name, 64, at - 9, at)]
            req = [EntityOps("k", "f", ops)]
            assert mem.execute(req) == red.execute(req)
            held = raw.hget("fmt:{k:f}:h", name)
            assert held == mem._entities[("k", "f")].rings[name]
            seen.add(held[:1] if len(held) % 2 else b"wide")
    assert {bytes([c]) for c in b"abcdefghS"} | {b"wide"} <= seen, seen
    red.close()


def test_a_claimed_token_applies_nothing_until_it_expires(redis_url: str) -> None:
    """CLAIM first: a live claim skips the request's other ops and hands back what was
    remembered; an expired claim is forgotten and the token applies again; both stores."""
    def req(token: str, now: float) -> EntityOps:
        return EntityOps("k", "a", [(CLAIM, "_claims", token, now + 10, now), (INCR, "n", 1)])

    for store in (MemoryStore(), RedisStore(redis_url, namespace="claims")):
        assert store.execute([req("e1", 100)]) == [[None, 1.0]], store.name
        assert store.execute([req("e1", 101)]) == [["", None]]  # applied, not remembered
        store.execute([EntityOps("k", "a", [(REMEMBER, "_claims", "e1", "first"),
                                            (REMEMBER, "_claims", "never", "x")])])
        assert store.execute([req("e1", 105)]) == [["first", None]]
        assert store.execute([req("never", 105)]) == [[None, 2.0]]
        assert store.execute([req("e1", 111)]) == [[None, 3.0]]  # the window has passed
        assert store.execute([EntityOps("k", "a", [(GET, "_c:e1")])]) == [[None]]
        if isinstance(store, RedisStore):
            store.close()


def test_a_log_hands_entries_back_in_order_after_a_position(redis_url: str) -> None:
    """LOG_APPEND numbers entries 1, 2, ...; LOG_READ returns those after a position, oldest
    first, with the log's id (set by its first append) and head; both stores alike."""
    for store in (MemoryStore(), RedisStore(redis_url, namespace="log")):
        def run(*ops: tuple, store: StateStore = store) -> list:
            return store.execute([EntityOps("g", "all", list(ops))])[0]

        assert run((LOG_READ, "l", 0, 10)) == [[None, 0, []]], store.name
        assert run(*[(LOG_APPEND, "l", f"e{i}|x", 100, "id-a") for i in range(1, 6)]) == \
            [1, 2, 3, 4, 5]
        assert run((LOG_READ, "l", 2, 2), (LOG_READ, "l", 5, 9)) == [
            ["id-a", 5, [[3, "e3|x"], [4, "e4|x"]]], ["id-a", 5, []]]
        assert run((LOG_APPEND, "l", "e6", 100, "id-b"), (LOG_READ, "l", 4, 9)) == [
            6, ["id-a", 6, [[5, "e5|x"], [6, "e6"]]]]
        if isinstance(store, RedisStore):
            store.close()


def test_a_claim_in_a_round_trip_skips_only_its_own_ops(redis_url: str) -> None:
    """The entity's requests around a claimed one are applied, in order, even though the
    Redis store merges an entity's requests into one script call; decayed sums alike."""
    def batch(now: float) -> list[EntityOps]:
        return [EntityOps("k", "m", [(INCR, "n", 1), (DECAY_ADD, "b|ks", now, [60, 0, -1],
                                                       [1.0, 2.0, now])]),
                EntityOps("k", "m", [(CLAIM, "_claims", "ev", now + 300, now), (INCR, "n", 10)]),
                EntityOps("ip", "x", [(INCR, "n", 1)]),
                EntityOps("k", "m", [(INCR, "n", 100), (GET, "n"), (GET, "b|ks")])]

    for store in (MemoryStore(), RedisStore(redis_url, namespace="merged")):
        first, again = store.execute(batch(1000.0)), store.execute(batch(1090.0))
        assert [r[:2] for r in first] == [[1.0, None], [None, 11.0], [1.0], [111.0, "111"]]
        assert [r[:2] for r in again] == [[112.0, None], ["", None], [2.0], [212.0, "212"]]
        assert decayed_sums(again[3][2], 3) == (1090.0, [0.5 ** 1.5 + 1, 4.0, 1090.0]), \
            store.name
        if isinstance(store, RedisStore):
            store.close()


def test_a_snapshot_keeps_the_logs(tmp_path: Path) -> None:
    store = MemoryStore()
    store.execute([EntityOps("g", "pop", [(LOG_APPEND, "l", f"e{i}", 100, "id")
                                          for i in range(3)])])
    store.snapshot(tmp_path / "s.snap")
    back = MemoryStore()
    back.restore(tmp_path / "s.snap")
    assert back.execute([EntityOps("g", "pop", [(LOG_READ, "l", 1, 9)])]) == [
        [["id", 3, [[2, "e1"], [3, "e2"]]]]]


def test_window_sums_of_a_sparse_ring_are_its_buckets_sums() -> None:
    """A sparse ring's windows are summed from its few cells: the very floats of summing
    every bucket newest first (empty ones adding 0.0), and the same edge bucket, on
    random rings of the sizes the catalogue uses (late, early and negative-zero adds, and
    a cell from long ago in some: the wide form)."""
    rng = random.Random(5)
    sparse = wide = 0
    for _ in range(3000):
        size = rng.choice((8, 26, 32, 194))
        start, blob = rng.randint(1000, 30_000_000), None
        if rng.random() < 0.3:  # a cell from long ago: the wide sparse form (tag S)
            old = start - rng.randint(70_000, 200_000)
            blob, _ = ring_add(blob, old % size, old, 1.0)
        for _ in range(rng.randint(1, 12)):
            stamp = start + rng.randint(-40, 40)
            blob, _ = ring_add(blob, stamp % size, stamp,
                               rng.choice((1.0, 0.1, rng.random() * 1e3, -0.0)))
        assert blob is not None
        stamp = start + rng.randint(-5, 45)
        ns = tuple(sorted(rng.sample(range(1, size + 3), rng.randint(1, 3))))
        values = [ring_read((RING_GET, "r", st % size, st), blob)
                  for st in range(stamp, stamp - max(ns) - 1, -1)]
        expected = [x for n in ns for x in (sum(values[:min(n, size)], 0.0), values[n])]
        got = ring_read((RING_WINDOWS, "r", size, stamp, len(ns), *ns), blob)
        assert [repr(x) for x in got] == [repr(x) for x in expected]
        sparse += len(blob) % 2 == 1 and blob[:1] in (b"a", b"b", b"e", b"f", b"S")
        wide += blob[:1] == b"S" and len(blob) % 2 == 1
    assert sparse > 1000 and wide > 100  # most of them sparse, some of the wide form


@pytest.mark.parametrize("make", [
    lambda url: MemoryStore(),
    lambda url: RedisStore(url, namespace="blob-off", cache_mb=0),
    lambda url: RedisStore(url, namespace="blob-copies")], ids=["memory", "redis", "copies"])
def test_packed_fields_are_deleted_and_never_written_as_text(
        make: Callable[[str], StateStore], redis_url: str) -> None:
    """A `b|` field (packed sums) is removed by DEL on every path, the copies' fast path
    included; a SET of text into one, or DECAY_ADD into a text field, is refused before
    any op of the request is applied."""
    store = make(redis_url)
    sums = (DECAY_ADD, "b|s", 1000.0, [60.0], [2.0])
    store.execute([EntityOps("k", "e", [sums, (INCR, "n", 1)])])
    store.execute([EntityOps("k", "e", [(INCR, "n", 1)])])  # the copy is now current
    assert store.execute([EntityOps("k", "e", [(DEL, "b|s"), (GET, "b|s")])])[0] == [
        None, None]
    for bad in ((SET, "b|s", "1|2"), (DECAY_ADD, "plain", 1000.0, [60.0], [2.0])):
        with pytest.raises(StoreError) as refused:
            store.execute([EntityOps("k", "e", [(INCR, "n", 5), bad])])
        assert getattr(refused.value, "data_error", False)
    assert store.execute([EntityOps("k", "e", [(GET, "n"), (GET, "b|s"),
                                               (GET, "plain")])])[0] == ["2", None, None]
