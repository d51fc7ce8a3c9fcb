"""Replicas that compute calls on their own copy of an entity agree with one store.

A Redis store keeps a copy of the entities it wrote last and, while the entity is still at
the version token of that copy, computes a call itself and has Redis only check the token
and store the new fields. These tests run real Redis: several stores (replicas) share it,
one of them without copies, and every result must equal one memory store's.
"""

from __future__ import annotations

import random

import pytest
import redis

from features.stores.base import CLAIM, GET, INCR, REMEMBER, SET, EntityOps
from features.stores.memory import MemoryStore
from features.stores.redis_store import RedisStore
from tests.test_stores import normalise, random_ops


@pytest.mark.parametrize("seed", range(4))
def test_replicas_with_copies_agree_with_one_store(redis_url: str, seed: int) -> None:
    rng = random.Random(seed)
    mem = MemoryStore()
    replicas = [RedisStore(redis_url, namespace=f"cache{seed}"),
                RedisStore(redis_url, namespace=f"cache{seed}"),
                RedisStore(redis_url, namespace=f"cache{seed}", cache_mb=0)]
    ts = 1_700_000_000.0
    for _ in range(400):
        ts += rng.uniform(0, 40)
        reqs = [EntityOps("k", ent, random_ops(rng, ts))
                for ent in rng.sample(["x", "y", "z"], k=rng.randint(1, 2))]
        # mostly one replica per run of calls, as a load balancer with affinity would
        replica = replicas[0] if rng.random() < 0.7 else rng.choice(replicas)
        assert normalise(mem.execute(reqs)) == normalise(replica.execute(reqs))
    assert replicas[0].cache.hits > 50  # computed on its copy
    assert replicas[0].cache.misses > 20  # the others wrote in between: applied in Redis
    assert replicas[2].cache.hits == 0
    for store in replicas:
        store.close()


def test_a_change_by_another_replica_is_never_hidden_by_a_copy(redis_url: str) -> None:
    a, b = (RedisStore(redis_url, namespace="cache-ban") for _ in range(2))
    read = [EntityOps("k", "abc", [(GET, "ban:until"), (INCR, "n", 1)])]
    b.execute(read)
    b.execute(read)
    assert b.cache.hits == 1
    a.execute([EntityOps("k", "abc", [(SET, "ban:until", "1900000000")])])
    assert b.execute(read)[0] == ["1900000000", 3.0]
    assert b.cache.hits == 1  # the copy was out of date: the script applied the call


def test_an_expired_entity_is_not_brought_back_by_a_copy(redis_url: str) -> None:
    store = RedisStore(redis_url, namespace="cache-exp")
    incr = [EntityOps("k", "abc", [(INCR, "n", 1)])]
    for _ in range(3):
        store.execute(incr)
    redis.Redis.from_url(redis_url).delete("cache-exp:{k:abc}:h")  # as an idle expiry does
    assert store.execute(incr)[0] == [1.0]
    assert store.execute(incr)[0] == [2.0]


def test_copies_keep_to_their_budget(redis_url: str) -> None:
    store = RedisStore(redis_url, namespace="cache-budget", cache_mb=0.01)
    for i in range(300):
        store.execute([EntityOps("ip", f"10.0.{i // 250}.{i % 250}",
                                 [(SET, "note", "x" * 40), (INCR, "n", 1)])])
    assert 0 < store.cache.bytes <= store.cache.max_bytes
    assert 0 < len(store.cache) < 300


def test_a_call_computed_here_still_refreshes_a_ban_s_ttl(redis_url: str) -> None:
    store = RedisStore(redis_url, namespace="cache-ttl", idle_ttl_s=600)
    client = redis.Redis.from_url(redis_url)
    store.execute([EntityOps("k", "abc", [(INCR, "n", 1)])])
    store.execute([EntityOps("k", "abc", [(SET, "ban:until", "9999999999")])])
    assert store.cache.hits == 1
    assert client.ttl("cache-ttl:{k:abc}:h") > 600  # kept until the ban ends, not idle TTL


@pytest.mark.parametrize("seed", range(3))
def test_claims_are_computed_on_the_copy_and_a_repeat_applies_nothing(
        redis_url: str, seed: int) -> None:
    """An event's claim rides the fast path: its round trip holds the key's learning
    first and the claim as a call of its own, computed on the copy as the learning leaves
    it. A repeated token answers what was remembered and applies nothing, on both paths;
    claims expire. One memory store sees the same calls and gives the same results."""
    rng = random.Random(seed)
    mem = MemoryStore()
    store = RedisStore(redis_url, namespace=f"claims{seed}")
    other = RedisStore(redis_url, namespace=f"claims{seed}", cache_mb=0)
    now = 1_700_000_000.0
    for i in range(300):
        now += rng.uniform(0, 30)
        token = f"ev{i - rng.randint(1, 60) if rng.random() < 0.1 else i}"  # a retry
        learning = EntityOps("k", "x", [(INCR, "learned", 1), (SET, "last", str(now))])
        claim = EntityOps("k", "x", [(CLAIM, "cl", token, now + 600, now), (INCR, "n", 1),
                                     (GET, "n"), (GET, "learned")])
        reqs = [learning, claim]
        if rng.random() < 0.5:
            reqs.append(EntityOps("k", "x", [(REMEMBER, "cl", token, f"decided {token}")]))
        replica = other if rng.random() < 0.1 else store
        assert normalise(mem.execute(reqs)) == normalise(replica.execute(reqs))
    # the claims computed on the copy too: the calls applied in the script are those
    # after another replica wrote, and after a repeat
    calls = store.cache.hits + store.cache.misses
    assert store.cache.misses < calls / 4, (store.cache.misses, calls)
    repeats = normalise(mem.execute([EntityOps("k", "x", [
        (CLAIM, "cl", "ev0", now + 600, now)])]))
    assert repeats == normalise(store.execute([EntityOps("k", "x", [
        (CLAIM, "cl", "ev0", now + 600, now)])]))
