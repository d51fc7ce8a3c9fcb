"""Enforcement state that holds: throttles as limits, bans that floods, crashes, backlogs
and Redis outages do not lift, and one alert per address incident.

Everything goes through the real HTTP API (or a real `keywatch serve` process), with a
real Redis server process where Redis is involved.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from features.keys import KeyHasher
from features.stores.base import GET, INCR, LIMIT, SET, ZITEMS, EntityOps, StateStore
from features.stores.local_server import LocalRedisServer, free_port
from features.stores.memory import MemoryStore
from features.stores.redis_store import RedisStore
from serving.api.app import create_app
from serving.policy.responses import (
    BAN_UNTIL,
    allow_add_ops,
    ban_writes,
    limit_writes,
)
from tests.conftest import ADMIN_TOKEN, TEST_SECRET, make_settings

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
HASHER = KeyHasher(TEST_SECRET)

POLICY = """
rules:
  - {id: banned_key, type: banned, scope: key, severity: critical}
  - {id: banned_ip, type: banned, scope: ip, severity: critical}
  - {id: rate_soft, type: rate_limit, group: volume, severity: high,
     params: {window: 1m, limit: 10}}
  # declared attack evidence so that it bans: volume alone only throttles (issue 17)
  - {id: rate_hard, type: rate_limit, group: volume, severity: critical, evidence: attack,
     params: {window: 1m, limit: 40}}
responses:
  tiers:
    high: {action: throttle, limit_per_min: 6, burst: 1, duration: 10m}
    critical: {action: ban}
  bans: {ladder: [30m, 2h, 24h, permanent], decay_after: 2d}
"""


def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    return path


def ev(key: str, ts: float, ip: str = "81.2.69.160", **kw: object) -> dict[str, object]:
    return {"api_key": key, "timestamp": ts, "source_ip": ip, "tokens": 300,
            "endpoint": "/v1/chat/completions", "latency_ms": 50.0, **kw}


def check(c: TestClient | httpx.Client, key: str, ip: str | None = None) -> dict:
    body = {"api_key": key, **({"source_ip": ip} if ip else {})}
    r = c.post("/v1/check", json=body)
    assert r.status_code == 200, r.text
    return r.json()


# ---- the limit meter --------------------------------------------------------------------
def limit_script(store: StateStore, now: float) -> list[object]:
    """The same sequence of limit operations, for comparing the two backends."""
    out: list[object] = []
    ops = EntityOps("k", "metered", [(LIMIT, "take", now)])
    out += store.execute([ops])[0]  # no limit yet
    store.execute([EntityOps("k", "metered", [
        (SET, "lim:rate", "30.0"), (SET, "lim:burst", "3"),
        (SET, "lim:until", repr(now + 600))])])
    for i, mode in enumerate(["take"] * 5 + ["count"] * 3 + ["peek", "take"]):
        out += store.execute([EntityOps("k", "metered", [(LIMIT, mode, now + i * 0.5)])])[0]
    out += store.execute([EntityOps("k", "metered", [(LIMIT, "take", now + 30)])])[0]
    out += store.execute([EntityOps("k", "metered", [(LIMIT, "take", now + 700)])])[0]
    return out


def test_the_limit_meter_is_the_same_on_memory_and_redis(redis_url: str) -> None:
    now = time.time()
    mem = limit_script(MemoryStore(), now)
    red = limit_script(RedisStore(redis_url, namespace="lim"), now)
    assert mem == red
    statuses = [r[0] for r in mem]  # type: ignore[index]
    # none; then 30/min (one per 2 s) with a burst of 3, asked every 0.5 s: three admitted,
    # one refused, the next fits at 2 s; admissions again once time has passed; nothing
    # after the limit ended
    assert statuses[:6] == [-1.0, 1.0, 1.0, 1.0, 0.0, 1.0]
    assert statuses[-1] == -1.0 and statuses[-2] == 1.0
    refused = mem[4]
    assert 0 < refused[1] <= 2.0 and refused[2:] == [30.0, now + 600, 3.0]  # type: ignore[index]


# ---- limits through the API -------------------------------------------------------------
def test_a_manual_throttle_refuses_calls_over_the_limit_and_ends_on_its_own(
        client: TestClient) -> None:
    key, key_id = "sk-metered", HASHER.key_id("sk-metered")
    r = client.post("/admin/throttle", json={"key": key, "limit_per_min": 6, "burst": 2,
                                             "duration": "1m", "reason": "runaway"},
                    headers=AUTH)
    assert r.status_code == 200, r.text
    answers = [check(client, key) for _ in range(6)]
    allowed = [a for a in answers if a["allowed"]]
    refused = [a for a in answers if not a["allowed"]]
    assert len(allowed) == 2 and len(refused) == 4
    assert all(a["limit"]["limit_per_min"] == 6 for a in answers)  # metered: re-ask each time
    no = refused[0]
    assert no["refused"] == "throttle" and no["scope"] == "key" and no["until"]
    assert 1 <= no["retry_after_s"] <= 10 and "key throttled to 6 calls/min" in no["reason"]

    listed = client.get("/admin/limits", headers=AUTH).json()["limits"]
    assert [(x["scope"], x["target"], x["limit_per_min"], x["by"]) for x in listed] == [
        ("key", key_id, 6, "admin")]
    page = client.get(f"/v1/keys/{key_id}", headers=AUTH).json()
    assert page["limit"]["limit_per_min"] == 6 and page["limit"]["reason"] == "runaway"

    # the calls reported as events are metered too: those over the limit say so
    now = time.time()
    decisions = [client.post("/v1/events", json=ev(key, now + i * 0.01)).json()
                 for i in range(5)]
    over = [d for d in decisions if d["decision"] == "throttle"]
    assert over and all(d["action"]["limit_per_min"] == 6 and d["action"]["retry_after_s"] >= 1
                        for d in over)

    assert client.post("/admin/unthrottle", json={"key": key}, headers=AUTH).status_code == 200
    assert check(client, key)["allowed"] and check(client, key)["limit"] is None

    client.post("/admin/throttle", json={"key": key, "limit_per_min": 1, "burst": 1,
                                         "duration": 2}, headers=AUTH)
    assert check(client, key)["allowed"] and not check(client, key)["allowed"]
    time.sleep(2.1)  # the limit ends on its own
    assert check(client, key) == {**check(client, key), "allowed": True, "limit": None}
    assert client.get("/admin/limits", headers=AUTH).json()["limits"] == []
    actions = [a["action"] for a in client.get("/admin/audit", headers=AUTH).json()["entries"]]
    assert actions == ["throttle", "unthrottle", "throttle"]
    bad = client.post("/admin/throttle", json={"key": key, "limit_per_min": 0}, headers=AUTH)
    assert bad.status_code == 422 and "limit_per_min" in bad.text


def test_a_throttle_decision_sets_a_limit_the_pre_flight_enforces(tmp_path: Path) -> None:
    """A throttle means fewer calls served: the loop gets a limit, and the gateway's
    pre-flight refuses what is over it."""
    settings = make_settings(policy=policy_file(tmp_path), models=False)
    key, key_id = "sk-loop", HASHER.key_id("sk-loop")
    with TestClient(create_app(settings)) as c:
        now = time.time()
        decisions = [c.post("/v1/events", json=ev(key, now + i * 0.05)).json()
                     for i in range(14)]
        assert decisions[12]["decision"] == "throttle"
        action = decisions[12]["action"]
        assert action["type"] == "throttle" and action["limit_per_min"] == 6
        limits = c.get("/admin/limits", headers=AUTH).json()["limits"]
        assert [(x["target"], x["by"], x["limit_per_min"]) for x in limits] == [
            (key_id, "keywatch", 6)]
        served = sum(check(c, key, "81.2.69.160")["allowed"] for _ in range(40))
        assert served <= 2, served  # 40 tries at 6/min: at most the burst gets through
        other = check(c, "sk-someone-else", "81.2.69.160")
        assert other["allowed"] and other["limit"] is None  # the key's limit, not the address's


def test_the_key_page_shows_the_ban_that_admin_bans_lists(client: TestClient) -> None:
    key_id = HASHER.key_id("sk-page")
    assert client.get(f"/v1/keys/{key_id}", headers=AUTH).json()["ban"] is None
    client.post("/admin/bans", json={"key": "sk-page", "duration": "2h", "reason": "leaked"},
                headers=AUTH)
    listed = client.get("/admin/bans", headers=AUTH).json()["bans"]
    page = client.get(f"/v1/keys/{key_id}", headers=AUTH).json()
    assert page["ban"] is not None
    assert (page["ban"]["until"], page["ban"]["by"], page["ban"]["reason"]) == (
        listed[0]["until"], "admin", "leaked")
    client.post("/admin/unban", json={"key": key_id}, headers=AUTH)
    assert client.get(f"/v1/keys/{key_id}", headers=AUTH).json()["ban"] is None


# ---- floods -------------------------------------------------------------------------------
def test_a_flood_of_new_keys_and_addresses_evicts_no_enforcement_state() -> None:
    store = MemoryStore(max_entities=1000)
    now = time.time()
    store.execute([*ban_writes("key", "k_banned", until=now + 86400, level=1, ts=now),
                   *ban_writes("ip", "203.0.113.9", until=now + 86400, level=1, ts=now),
                   *limit_writes("key", "k_limited", rate_per_min=5, burst=1,
                                 until=now + 3600),
                   allow_add_ops("cidr", "10.0.0.0/8", now)])
    rng = random.Random(5)
    for i in range(120_000):  # feature state of random keys and addresses, LRU-bounded
        kind = "k" if i % 2 else "ip"
        entity = f"k_{rng.getrandbits(64):016x}" if kind == "k" else \
            f"{rng.randint(1, 223)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{i % 256}"
        store.execute([EntityOps(kind, entity, [(INCR, "n", 1)])])
    assert len(store) == 1000 and store.evictions >= 118_000  # feature state was evicted
    reads = store.execute([
        EntityOps("k", "k_banned", [(GET, BAN_UNTIL)]),
        EntityOps("ip", "203.0.113.9", [(GET, BAN_UNTIL)]),
        EntityOps("k", "k_limited", [(LIMIT, "peek", now)]),
        EntityOps("g", "bans", [(ZITEMS, "index", now, 10)]),
        EntityOps("g", "allow", [(ZITEMS, "index", "-inf", 10)])])
    assert float(reads[0][0]) == float(reads[1][0]) == now + 86400
    assert reads[2][0][0] == 1.0 and reads[2][0][2] == 5.0
    assert len(reads[3][0]) == 2 and reads[4][0][0][0] == "cidr:10.0.0.0/8"
    assert store.stats()["enforcement_entities"] >= 6


def test_a_flood_through_the_api_does_not_unban(tmp_path: Path) -> None:
    settings = make_settings(memory_max_mb=0.25, models=False, event_log=False)
    with TestClient(create_app(settings)) as c:
        c.post("/admin/bans", json={"key": "sk-banned", "duration": "24h"}, headers=AUTH)
        c.post("/admin/bans", json={"ip": "203.0.113.9", "duration": "24h"}, headers=AUTH)
        now = time.time()
        rng = random.Random(9)
        for start in range(0, 3000, 1000):
            batch = [ev(f"sk-random-{rng.getrandbits(48)}", now + (start + i) * 0.001,
                        ip=f"198.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{i % 250 + 1}")
                     for i in range(1000)]
            assert c.post("/v1/events:batch", json=batch).status_code == 200
        assert not check(c, "sk-banned")["allowed"]
        assert check(c, "sk-anyone", "203.0.113.9")["refused"] == "address"
        assert len(c.get("/admin/bans", headers=AUTH).json()["bans"]) == 2
        metrics = c.get("/metrics").text
        evicted = [line for line in metrics.splitlines()
                   if line.startswith("keywatch_store_feature_evictions_total")]
        assert evicted and float(evicted[0].split()[-1]) > 2000
        by_name = {line.split()[0]: float(line.split()[-1]) for line in metrics.splitlines()
                   if line.startswith("keywatch_store_feature_")}
        # within its budget, addresses go first
        assert by_name["keywatch_store_feature_address_evictions_total"] > 0
        assert by_name["keywatch_store_feature_bytes"] <= 0.25 * 2**20


# ---- crashes ------------------------------------------------------------------------------
def _serve(data_dir: Path, port: int, *extra: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "KEYWATCH_SECRET": TEST_SECRET, "KEYWATCH_ADMIN_TOKEN": ADMIN_TOKEN,
           "KEYWATCH_DATA_DIR": str(data_dir), "KEYWATCH_MODELS": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "serving.cli.main", "serve", "--port",
                             str(port), "--log-level", "warning", *extra], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("keywatch serve did not start")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    yield tmp_path / "data", free_port()


def test_kill_9_loses_no_ban_and_no_admin_act(served: tuple[Path, int]) -> None:
    data_dir, port = served
    proc = _serve(data_dir, port)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=AUTH) as c:
            acts = [("/admin/bans", {"key": "sk-a", "duration": "2h"}),
                    ("/admin/bans", {"ip": "203.0.113.9", "permanent": True}),
                    ("/admin/bans", {"key": "sk-b", "permanent": True}),
                    ("/admin/unban", {"key": "sk-b"}),
                    ("/admin/allow-list", {"key": "sk-c"}),
                    ("/admin/allow-list", {"cidr": "10.1.0.0/16"}),
                    ("/admin/allow-list/remove", {"cidr": "10.1.0.0/16"}),
                    ("/admin/throttle", {"key": "sk-d", "limit_per_min": 5})]
            for path, body in acts:
                assert c.post(path, json=body).status_code == 200, (path, c.post)
    finally:
        proc.send_signal(signal.SIGKILL)  # no graceful stop, no snapshot
        proc.wait(timeout=10)
    assert not (data_dir / "state.snapshot").exists()

    proc = _serve(data_dir, port)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=AUTH) as c:
            bans = {(b["scope"], b["permanent"]) for b in c.get("/admin/bans").json()["bans"]}
            assert bans == {("key", False), ("ip", True)}
            allowed = c.get("/admin/allow-list").json()
            assert allowed["keys"] == [HASHER.key_id("sk-c")] and allowed["cidrs"] == []
            limits = c.get("/admin/limits").json()["limits"]
            assert [x["target"] for x in limits] == [HASHER.key_id("sk-d")]
            assert len(c.get("/admin/audit").json()["entries"]) == len(acts)
            assert not check(c, "sk-a")["allowed"] and check(c, "sk-b")["allowed"]
            assert check(c, "sk-x", "203.0.113.9")["refused"] == "address"
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_the_journal_is_compacted_into_a_snapshot(tmp_path: Path) -> None:
    journal, snap = tmp_path / "enforcement.journal", tmp_path / "state.snapshot"
    store = MemoryStore(journal_path=journal)
    now = time.time()
    store.execute(ban_writes("key", "k_x", until=now + 60, level=None, ts=now, by="admin"))
    assert journal.stat().st_size > 0
    store.snapshot(snap)
    store.close()
    assert not journal.with_name("enforcement.journal.old").exists()
    again = MemoryStore(journal_path=journal)
    again.restore(snap)
    assert float(again.execute([EntityOps("k", "k_x", [(GET, BAN_UNTIL)])])[0][0]) == now + 60


# ---- one clock ----------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_a_backlog_older_than_a_ban_still_bans_now(tmp_path: Path, backend: str,
                                                    redis_url: str) -> None:
    """Live, bans are stored in wall time: 45 events from 50 minutes ago trip a 30-minute
    ban that holds now. On event time (replay) the same ban has already ended."""
    then = time.time() - 50 * 60
    backlog = [ev("sk-backlog", then + i * 0.5) for i in range(45)]
    outcomes = {}
    for clock in ("wall", "event"):
        store = {"store": redis_url, "redis_namespace": f"backlog-{clock}"} \
            if backend == "redis" else {}
        settings = make_settings(policy=policy_file(tmp_path), models=False,
                                 enforcement_clock=clock, **store)
        with TestClient(create_app(settings)) as c:
            out = c.post("/v1/events:batch", json=backlog).json()
            assert out[-1]["decision"] == "block", out[-1]
            outcomes[clock] = (check(c, "sk-backlog"), out[-1]["action"])
    live, action = outcomes["wall"]
    assert not live["allowed"] and 1700 <= live["retry_after_s"] <= 1800
    assert 1700 <= action["retry_after_s"] <= 1800
    assert outcomes["event"][0]["allowed"]  # replay semantics: that ban ended 20 min ago


# ---- one alert per incident ----------------------------------------------------------------
def test_a_banned_address_trying_many_keys_is_one_alert(client: TestClient) -> None:
    client.post("/admin/bans", json={"ip": "203.0.113.66", "duration": "1h"}, headers=AUTH)
    now = time.time()
    batch = [ev(f"sk-tried-{i}", now + i, ip="203.0.113.66", status=401) for i in range(30)]
    out = client.post("/v1/events:batch", json=batch).json()
    assert {d["decision"] for d in out} == {"block"}
    alerts = client.get("/v1/alerts", params={"code": "banned_ip"}, headers=AUTH).json()
    assert alerts["count"] == 1
    alert = alerts["alerts"][0]
    assert alert["subject"] == "address" and alert["source_ip"] == "203.0.113.66"
    assert alert["keys_tried"] == 30 and alert["count"] == 30 and len(alert["key_ids"]) == 10
    by_key = client.get("/v1/alerts", params={"key_id": HASHER.key_id("sk-tried-20")},
                        headers=AUTH).json()["alerts"]
    assert [a["alert_id"] for a in by_key] == [alert["alert_id"]]  # found from any key tried


# ---- Redis outage --------------------------------------------------------------------------
@pytest.fixture
def own_redis() -> Iterator[LocalRedisServer]:
    server = LocalRedisServer(persist=True).start()
    try:
        yield server
    finally:
        server.close()


def _wait(predicate, timeout_s: float = 15.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_fail_open_keeps_enforcing_bans_and_limits_through_a_redis_outage(
        own_redis: LocalRedisServer) -> None:
    settings = make_settings(store=own_redis.url, redis_outage_policy="fail_open",
                             redis_retry_interval_s=0.2, enforcement_cache_refresh_s=0.2,
                             models=False, event_log=False)
    with TestClient(create_app(settings)) as c:
        store = c.app.state.scorer.store  # type: ignore[attr-defined]
        c.post("/admin/bans", json={"key": "sk-perm", "permanent": True}, headers=AUTH)
        c.post("/admin/bans", json={"ip": "203.0.113.7", "duration": "1h"}, headers=AUTH)
        c.post("/admin/throttle", json={"key": "sk-slow", "limit_per_min": 2, "burst": 1},
               headers=AUTH)
        c.post("/admin/allow-list", json={"key": "sk-trusted"}, headers=AUTH)
        assert _wait(lambda: store.cache.describe()["entities"] == 3)

        own_redis.kill()
        now = time.time()
        assert c.post("/v1/events", json=ev("sk-perm", now)).json()["decision"] == "block"
        assert store.status()["state"] == "degraded"
        assert check(c, "sk-perm")["refused"] == "key"
        assert check(c, "sk-other", "203.0.113.7")["refused"] == "address"
        slow = [check(c, "sk-slow")["allowed"] for _ in range(5)]
        assert slow == [True, False, False, False, False]
        assert check(c, "sk-fine")["allowed"]
        r = c.get("/admin/bans", headers=AUTH)
        assert r.status_code == 503 and "cache" in r.json()["error"]
        assert c.get("/admin/limits", headers=AUTH).status_code == 503
        # a ban set during the outage is enforced here and kept for the others
        c.post("/admin/bans", json={"key": "sk-new", "duration": "1h"}, headers=AUTH)
        assert check(c, "sk-new")["refused"] == "key"

        own_redis.start()
        assert _wait(lambda: store.status()["state"] == "ok")
        bans = c.get("/admin/bans", headers=AUTH).json()["bans"]
        assert {b["target"] for b in bans} == {HASHER.key_id("sk-perm"), "203.0.113.7",
                                               HASHER.key_id("sk-new")}


@pytest.mark.parametrize(("trusted", "recorded"), [("127.0.0.1", "198.51.100.77"),
                                                   ("192.0.2.1", "127.0.0.1")])
def test_the_audit_trail_names_the_forwarded_admin_only_behind_a_trusted_proxy(
        tmp_path: Path, trusted: str, recorded: str) -> None:
    """`keywatch serve --trusted-proxy` believes X-Forwarded-For from that proxy only: the
    audit trail names the admin's own address behind it, and the direct peer otherwise."""
    port = free_port()
    proc = _serve(tmp_path / "data", port, "--trusted-proxy", trusted)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=AUTH) as c:
            r = c.post("/admin/bans", json={"ip": "203.0.113.50", "duration": "5m"},
                       headers={"x-forwarded-for": "198.51.100.77"})
            assert r.status_code == 200, r.text
            audit = c.get("/admin/audit").json()
    finally:
        proc.terminate()
        proc.wait(30)
    entries = audit["entries"] if isinstance(audit, dict) else audit
    assert [e["client"] for e in entries if e["action"] == "ban"] == [recorded]
