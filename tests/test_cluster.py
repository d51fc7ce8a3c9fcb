"""The scoring, alert and ban paths on a real three-master Redis Cluster.

Every key of an entity carries the entity's hash tag, so each atomic call touches one
slot; an event's calls are grouped by the node that owns them. Alerts and stats on a
cluster are in tests/test_shared_ops.py (parametrised over Redis and the cluster)."""

from __future__ import annotations

import time

import redis
from fastapi.testclient import TestClient

from features.stores.base import CLAIM, INCR, LOG_APPEND, LOG_READ, REMEMBER, EntityOps
from features.stores.local_server import LocalRedisCluster
from features.stores.memory import MemoryStore
from features.stores.redis_cluster import RedisClusterStore
from serving.api.app import create_app
from tests.conftest import ADMIN_TOKEN, make_settings

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def test_entities_spread_over_the_masters_and_each_call_stays_in_one_slot(
        cluster_url: str, redis_cluster: LocalRedisCluster) -> None:
    store = RedisClusterStore(cluster_url)
    memory = MemoryStore()
    reqs = [EntityOps("k", f"key-{i}", [(CLAIM, "_claims", "e1", 100.0, 1.0), (INCR, "n", 1),
                                       (REMEMBER, "_claims", "e1", "seen"),
                                       (LOG_APPEND, "l", f"x{i}", 10, "id")])
            for i in range(30)]
    assert store.execute(reqs) == memory.execute(reqs)
    again = [EntityOps(r.kind, r.entity_id, list(r.ops)) for r in reqs]
    assert store.execute(again) == memory.execute(again)  # repeats: "seen", nothing applied
    reads = [EntityOps("k", f"key-{i}", [(LOG_READ, "l", 0, 5)]) for i in range(30)]
    assert store.execute(reads) == memory.execute(reads)
    held = [redis.Redis(port=p).dbsize() for p in redis_cluster.ports]
    assert all(n > 0 for n in held), held  # every master holds some of the entities
    store.close()


def test_scoring_bans_and_idempotency_on_a_cluster(cluster_url: str) -> None:
    settings = make_settings(store=cluster_url, event_log=False, models=True)
    t0 = time.time() - 40
    events = [{"api_key": "sk-cluster-loop", "timestamp": t0 + i * 0.01,
               "source_ip": f"203.0.113.{i % 3}", "tokens": 300, "event_id": f"c-{i}"}
              for i in range(3300)]
    with TestClient(create_app(settings)) as c:
        assert "cluster" in c.get("/readyz").json()["store"]["backend"]
        first = []
        for start in range(0, 3300, 500):
            r = c.post("/v1/events:batch", json=events[start:start + 500])
            assert r.status_code == 200, r.text
            first.extend(r.json())
        assert sum(d["decision"] != "allow" for d in first) > 100  # over the hard limit
        c.app.state.scorer.flush()  # type: ignore[attr-defined]
        retried = c.post("/v1/events:batch", json=events[:500])
        assert retried.json() == first[:500]  # the first decisions, nothing applied again
        # operator bans and the gateway's pre-flight, across slots
        r = c.post("/admin/bans", headers=AUTH, json={"key": "sk-cluster-b", "duration": "1h",
                                                      "reason": "cluster test"})
        assert r.status_code == 200, r.text
        assert c.post("/v1/check", json={"api_key": "sk-cluster-b"}).json()["allowed"] is False
        bans = c.get("/admin/bans", headers=AUTH).json()["bans"]
        assert any(b["reason"] == "cluster test" for b in bans)
        assert c.post("/admin/unban", headers=AUTH,
                      json={"key": "sk-cluster-b"}).status_code == 200
        assert c.post("/v1/check", json={"api_key": "sk-cluster-b"}).json()["allowed"] is True
