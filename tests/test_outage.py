"""Redis outages: the service keeps answering (or refuses cleanly) and loses no state.

The outages are real: the redis-server process is killed (or frozen with SIGSTOP) and
started again on the same port, with an append-only file like a production Redis.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from features.stores.base import GET, INCR, LIMIT, RECENT_ADD, RECENT_COUNT, RING_SUM, EntityOps
from features.stores.local_server import LocalRedisServer
from features.stores.memory import MemoryStore
from features.stores.redis_store import RedisStore
from features.stores.resilient import ResilientStore, StoreError, write_requests
from features.stores.spool import WriteSpool
from serving.api.app import create_app
from tests.conftest import make_settings
from tests.state_probe import redis_request_total
from tests.test_metrics import value
from tests.test_stores import normalise, random_ops

T0 = 1_794_999_960


@pytest.fixture
def own_redis() -> Iterator[LocalRedisServer]:
    """A persistent Redis of this test's own, free to be killed and restarted."""
    server = LocalRedisServer(persist=True).start()
    try:
        yield server
    finally:
        server.close()


def incr(entity: str, amount: float = 1) -> list[EntityOps]:
    ops = EntityOps("k", entity)
    ops.add(INCR, "n", amount)
    ops.add(GET, "n")
    return [ops]


def wait_until(predicate, timeout_s: float = 15.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def event(i: int, key: str) -> dict[str, object]:
    return {"api_key": key, "timestamp": T0 + i * 0.5, "source_ip": f"198.51.100.{i % 7}",
            "endpoint": "/v1/chat/completions", "tokens": 100 + i % 50, "latency_ms": 40.0,
            "event_id": f"{key}-{i}"}


# ---- what is spooled ----------------------------------------------------------------------
def test_only_pure_reads_are_left_out_of_the_spool() -> None:
    mixed = EntityOps("k", "a")
    mixed.add(GET, "x")
    mixed.add(RECENT_ADD, "ips", "1.2.3.4", 1.0, 3600, 8)  # read *and* write: spooled
    mixed.add(RING_SUM, "r", 8, 0, 1)
    reads = EntityOps("ip", "1.2.3.4")
    reads.add(RECENT_COUNT, "keys", 1.0, 60)
    unknown = EntityOps("k", "b")
    unknown.add("some_future_op", 1)  # unknown codes count as writes
    out = write_requests([mixed, reads, unknown])
    assert [(r.kind, r.entity_id, [op[0] for op in r.ops]) for r in out] == [
        ("k", "a", [RECENT_ADD]), ("k", "b", ["some_future_op"])]


def test_spool_is_durable_ordered_and_skips_a_torn_last_line(tmp_path: Path) -> None:
    spool = WriteSpool(tmp_path, segment_max_records=3)
    seqs = [spool.append(incr(f"e{i}")) for i in range(7)]
    assert seqs == sorted(seqs) and len(set(seqs)) == 7
    spool.close()
    segments = sorted(tmp_path.glob("*/seg-*.jsonl"))
    assert len(segments) == 3  # 3 + 3 + 1 records
    with segments[-1].open("ab") as fh:
        fh.write(b'{"seq": 99999999999999999, "t": 1, "ops": [["k", "tor')  # crash mid-write
    again = WriteSpool(tmp_path)  # a restarted process adopts the slot and its records
    assert again.dir == segments[0].parent and again.pending == 8
    records = [r for seg in again.segments() for r in again.read_segment(seg)]
    assert [r.seq for r in records] == seqs
    assert [r.requests[0].entity_id for r in records] == [f"e{i}" for i in range(7)]
    assert again.corrupt_lines == 1
    assert again.next_seq() > seqs[-1]
    other = WriteSpool(tmp_path)  # a second live process gets a slot of its own
    assert other.dir != again.dir and other.writer_id != again.writer_id
    other.close()
    again.close()


def test_a_refused_command_is_not_an_outage(own_redis: LocalRedisServer,
                                            tmp_path: Path) -> None:
    store = ResilientStore(RedisStore(own_redis.url), policy="fail_open", spool_dir=tmp_path)
    bad = EntityOps("k", "a")
    bad.add("no_such_op", 1)
    with pytest.raises(StoreError, match="unknown store operation"):
        store.execute([bad])
    assert store.status()["state"] == "ok" and store.spool.pending == 0
    store.close()


# ---- replay -------------------------------------------------------------------------------
def test_an_interrupted_replay_is_resumed_without_applying_anything_twice(
        own_redis: LocalRedisServer, tmp_path: Path) -> None:
    store = ResilientStore(RedisStore(own_redis.url), policy="fail_open", spool_dir=tmp_path,
                           retry_interval_s=60, replay_batch=50)
    assert store.execute(incr("a", 10))[0][0] == 10.0
    own_redis.kill()
    for _ in range(300):
        store.execute(incr("a"))
        store.execute(incr("b"))
    status = store.status()
    assert status["state"] == "degraded" and status["spooled"] == 600
    assert status["ambiguous"] == 1  # the call that met the dead server
    own_redis.start()
    # A first replay applied 120 records, then died before its segment was deleted.
    store.spool.rotate()
    records = [r for seg in store.spool.closed_segments() for r in store.spool.read_segment(seg)]
    store._replay_records(records[:120])
    assert store.recover()
    client = redis.Redis.from_url(own_redis.url, decode_responses=True)
    assert float(client.hget("kw:{k:a}:h", "n")) == 10 + 300
    assert float(client.hget("kw:{k:b}:h", "n")) == 300
    assert store.skipped_on_replay == 120
    assert store.status()["state"] == "ok" and store.status()["spooled"] == 0
    assert not list(store.spool.dir.glob("seg-*"))
    store.close()


def test_replay_follows_writes_that_change_no_field_of_the_entity(
        own_redis: LocalRedisServer, tmp_path: Path) -> None:
    """A spooled write that changes no field (metering a key that has no limit) still
    moves the entity's replay mark: the next record's mark read must see it, not the
    replica's held copy of the entity from before (which once refused every later write
    of the entity as "an earlier spooled write is missing")."""
    store = ResilientStore(RedisStore(own_redis.url), policy="fail_open", spool_dir=tmp_path,
                           retry_interval_s=60, replay_batch=1)
    store.execute(incr("a"))
    own_redis.kill()
    for _ in range(5):
        meter = EntityOps("k", "a")
        meter.add(LIMIT, "count", float(T0))  # no active limit: nothing changes
        store.execute([meter])
        store.execute(incr("a"))
    own_redis.start()
    assert store.recover()
    status = store.status()
    assert status["rejected"] == 0 and status["replayed_total"] == status["spooled_total"] == 10
    client = redis.Redis.from_url(own_redis.url, decode_responses=True)
    assert float(client.hget("kw:{k:a}:h", "n")) == 1 + 5
    store.close()


@pytest.mark.parametrize("seed", range(3))
def test_after_a_replayed_outage_redis_answers_as_one_store_would(
        own_redis: LocalRedisServer, tmp_path: Path, seed: int) -> None:
    """Random calls of every op before, during and after a real outage: once the spool is
    replayed (in small batches, so marks are read back between them), Redis answers every
    call as one memory store that saw them all does, and no record was refused."""
    rng = random.Random(seed)
    store = ResilientStore(RedisStore(own_redis.url, namespace=f"rnd{seed}"),
                           policy="fail_open", spool_dir=tmp_path, retry_interval_s=60,
                           replay_batch=rng.randint(2, 9))
    mem = MemoryStore()
    ts = 1_700_000_000.0

    def call(compare: bool) -> None:
        nonlocal ts
        ts += rng.uniform(0, 40)
        reqs = [EntityOps("k", ent, random_ops(rng, ts))
                for ent in rng.sample(["x", "y", "z"], k=rng.randint(1, 2))]
        expected, got = normalise(mem.execute(reqs)), normalise(store.execute(reqs))
        if compare:
            assert got == expected

    for _ in range(80):
        call(compare=True)
    own_redis.kill()
    for _ in range(150):  # answered from this process' local state meanwhile
        call(compare=False)
    own_redis.start()
    assert store.recover()
    status = store.status()
    assert status["rejected"] == 0 and status["replayed_total"] == status["spooled_total"]
    for _ in range(80):
        call(compare=True)
    store.close()


def test_a_spool_left_by_a_dead_process_is_replayed_by_the_next(
        own_redis: LocalRedisServer, tmp_path: Path) -> None:
    first = ResilientStore(RedisStore(own_redis.url), policy="fail_open",
                           spool_dir=tmp_path, retry_interval_s=60)
    own_redis.kill()
    for _ in range(50):
        first.execute(incr("c"))
    first.close()  # the process ends during the outage; its spool stays on disk
    own_redis.start()
    second = ResilientStore(RedisStore(own_redis.url), policy="fail_open",
                            spool_dir=tmp_path, retry_interval_s=0.05)
    assert wait_until(lambda: second.status()["state"] == "ok")
    client = redis.Redis.from_url(own_redis.url, decode_responses=True)
    assert float(client.hget("kw:{k:c}:h", "n")) == 50
    second.close()


# ---- the service through a real outage ----------------------------------------------------
def _post_all(c: TestClient, n: int, keys: list[str], batch: int,
              on_step) -> dict[str, object]:  # type: ignore[no-untyped-def]
    """POST n events (singly or in batches), calling on_step(request number) before each.
    Requests refused with 503 are sent again at the end, as the client's retry would."""
    codes: dict[int, int] = {}
    latencies: list[float] = []
    sent = {k: 0 for k in keys}
    refused: list[list[dict[str, object]]] = []
    for step, first in enumerate(range(0, n, batch)):
        on_step(step)
        events = [event(i, keys[i % len(keys)]) for i in range(first, min(n, first + batch))]
        t0 = time.perf_counter()
        if batch == 1:
            r = c.post("/v1/events", json=events[0])
        else:
            r = c.post("/v1/events:batch", json=events)
        latencies.append(time.perf_counter() - t0)
        codes[r.status_code] = codes.get(r.status_code, 0) + 1
        if r.status_code == 503:
            assert int(r.headers["retry-after"]) >= 1
            assert r.json()["state"] == "degraded"
            refused.append(events)
        else:
            assert r.status_code == 200, r.text
        for e in events:
            sent[str(e["api_key"])] += 1
    for events in refused:  # the retries: each refused event is applied once, by its retry
        assert wait_until(lambda events=events: c.post(  # type: ignore[misc]
            "/v1/events:batch", json=events).status_code == 200)
    latencies.sort()
    return {"requests": codes, "sent": sent, "max_ms": round(latencies[-1] * 1000, 1),
            "p50_ms": round(latencies[len(latencies) // 2] * 1000, 2)}


@pytest.mark.parametrize(("policy", "n", "batch"), [("fail_open", 3000, 10),
                                                    ("fail_closed", 1200, 1)])
def test_service_survives_redis_being_killed_and_restarted(
        own_redis: LocalRedisServer, policy: str, n: int, batch: int) -> None:
    steps = n // batch
    kill_at, restart_at = steps // 3, 2 * steps // 3
    keys = [f"sk-outage-{policy}-{i}" for i in range(20)]
    settings = make_settings(store=own_redis.url, redis_outage_policy=policy,
                             redis_retry_interval_s=0.2, event_log=False)
    readiness: list[tuple[int, int, str]] = []
    with TestClient(create_app(settings)) as c:
        store = c.app.state.scorer.store  # type: ignore[attr-defined]

        def on_step(step: int) -> None:
            if step == kill_at:
                own_redis.kill()
            if step == restart_at:
                own_redis.start()
            if step % 25 == 0 or step in (kill_at + 1, restart_at - 1):
                r = c.get("/readyz")
                readiness.append((step, r.status_code, r.json()["status"]))
            if step == restart_at - 1:
                scrapes.append(c.get("/metrics").text)

        scrapes: list[str] = []
        result = _post_all(c, n, keys, batch, on_step)
        assert wait_until(lambda: store.status()["state"] == "ok")
        final = c.get("/readyz")
        assert final.status_code == 200 and final.json()["store"]["outage"]["state"] == "ok"
        status = store.status()
        scrapes.append(c.get("/metrics").text)

    # readiness followed the outage
    during = [code for i, code, _ in readiness if kill_at < i < restart_at]
    outside = [code for i, code, _ in readiness if i < kill_at]
    assert during and set(during) == {503}
    assert set(outside) == {200}
    assert all(s == "degraded" for i, code, s in readiness if code == 503)
    codes = result["requests"]
    if policy == "fail_open":
        assert codes == {200: steps}  # decisions kept coming
    else:
        # refused cleanly during the outage (and until the probe has replayed the spool)
        assert codes.get(503, 0) >= restart_at - kill_at and set(codes) <= {200, 503}
    assert status["outages"] == 1 and status["spooled"] == 0
    assert status["replayed_total"] == status["spooled_total"]
    # and so did /metrics, where an operator alerts on it
    during_outage, after = scrapes
    assert value(during_outage, "keywatch_store_degraded") == 1
    assert value(after, "keywatch_store_degraded") == 0
    assert value(during_outage, "keywatch_store_spool_pending") == (
        value(during_outage, "keywatch_store_spooled_total"))
    assert value(after, "keywatch_store_spool_pending") == 0
    assert value(after, "keywatch_store_outages_total") == 1
    assert value(after, "keywatch_store_replayed_total") == status["spooled_total"]
    assert value(after, "keywatch_store_spool_rejected_total") == 0
    assert value(after, "keywatch_store_spool_errors_total") == 0
    if policy == "fail_open":
        assert status["spooled_total"] >= (restart_at - kill_at - 1) * batch
    else:  # a 503 applies nothing: no spool, the retry is the one application
        assert status["spooled_total"] == 0
    # after recovery Redis holds the counts of ALL events, before, during and after, once
    client = redis.Redis.from_url(own_redis.url)
    for key, sent in result["sent"].items():  # type: ignore[union-attr]
        assert redis_request_total(client, key) == sent, key
    print(json.dumps({"policy": policy, "events": n, "batch": batch,
                      **{k: v for k, v in result.items() if k != "sent"},
                      "recovery_s": status["last_recovery_s"],
                      "spooled_total": status["spooled_total"],
                      "ambiguous": status["ambiguous"]}))


def test_a_frozen_redis_costs_one_bounded_wait_then_local_answers(
        own_redis: LocalRedisServer) -> None:
    settings = make_settings(store=own_redis.url, redis_retry_interval_s=0.2,
                             redis_timeout_s=0.3, event_log=False)
    assert own_redis.process is not None
    pid = own_redis.process.pid
    with TestClient(create_app(settings)) as c:
        assert c.post("/v1/events", json=event(0, "sk-frozen")).status_code == 200
        os.kill(pid, signal.SIGSTOP)  # accepts connections, never answers
        try:
            took = []
            for i in range(1, 40):
                t0 = time.monotonic()
                assert c.post("/v1/events", json=event(i, "sk-frozen")).status_code == 200
                took.append(time.monotonic() - t0)
            assert max(took) < 3.0  # bounded by the socket timeout, not hung
            print(json.dumps({"frozen_max_ms": round(max(took) * 1000, 1),
                              "frozen_p50_ms": round(sorted(took)[len(took) // 2] * 1000, 2)}))
            assert sorted(took)[len(took) // 2] < 0.1  # and the rest never touch Redis
            assert c.get("/readyz").status_code == 503
        finally:
            os.kill(pid, signal.SIGCONT)
        store = c.app.state.scorer.store  # type: ignore[attr-defined]
        assert wait_until(lambda: store.status()["state"] == "ok")
    client = redis.Redis.from_url(own_redis.url)
    # the call in flight when Redis froze may have been applied as well (at least once)
    assert 40 <= redis_request_total(client, "sk-frozen") <= 41


def test_calls_from_many_threads_during_an_outage_are_all_kept(
        own_redis: LocalRedisServer, tmp_path: Path) -> None:
    store = ResilientStore(RedisStore(own_redis.url), policy="fail_open", spool_dir=tmp_path,
                           retry_interval_s=0.05)
    errors: list[BaseException] = []

    def hammer(name: str) -> None:
        try:
            for _ in range(600):
                store.execute(incr(name))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(f"t{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    time.sleep(0.05)
    own_redis.kill()
    time.sleep(0.3)
    own_redis.start()
    for t in threads:
        t.join()
    assert not errors
    assert wait_until(lambda: store.status()["state"] == "ok")
    client = redis.Redis.from_url(own_redis.url, decode_responses=True)
    totals = [float(client.hget(f"kw:{{k:t{i}}}:h", "n") or 0) for i in range(8)]
    ambiguous = store.status()["ambiguous"]
    # every call counted; calls in flight at the kill at most once more
    assert all(t >= 600 for t in totals) and sum(totals) <= 8 * 600 + ambiguous
    assert store.status()["outages"] == 1 and store.status()["spooled_total"] > 0
    store.close()


def test_a_spooled_write_redis_refuses_is_set_aside_not_blocking_recovery(
        own_redis: LocalRedisServer, tmp_path: Path) -> None:
    store = ResilientStore(RedisStore(own_redis.url), policy="fail_open", spool_dir=tmp_path,
                           retry_interval_s=60, replay_batch=10)
    own_redis.kill()
    store.execute(incr("d"))
    bad = EntityOps("k", "d")
    bad.add("op_from_a_newer_version", 1)
    with pytest.raises(StoreError):  # spooled, but the local store refuses it too
        store.execute([bad])
    for _ in range(20):
        store.execute(incr("d"))
    own_redis.start()
    assert store.recover()
    client = redis.Redis.from_url(own_redis.url, decode_responses=True)
    assert float(client.hget("kw:{k:d}:h", "n")) == 21
    assert store.status()["rejected"] == 1
    rejected = (store.spool.dir / "rejected.jsonl").read_text().splitlines()
    assert len(rejected) == 1 and "op_from_a_newer_version" in rejected[0]
    store.close()
