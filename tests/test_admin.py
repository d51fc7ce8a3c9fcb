"""The admin API through the real app: token required, bans, allow-list, audit, pre-flight."""

from __future__ import annotations

import json
import time

import pytest
from fastapi.testclient import TestClient

from features.keys import KeyHasher
from serving.api.app import create_app
from tests.conftest import ADMIN_TOKEN, TEST_SECRET, make_settings

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
RAW = "sk-live-admin-test-RAW"
KEY_ID = KeyHasher(TEST_SECRET).key_id(RAW)


def ev(key: str = RAW, ip: str = "81.2.69.160", **kw: object) -> dict[str, object]:
    return {"api_key": key, "timestamp": time.time(), "source_ip": ip, "tokens": 100, **kw}


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"},
                                     {"Authorization": ADMIN_TOKEN},
                                     {"Authorization": f"Basic {ADMIN_TOKEN}"}])
def test_admin_refuses_without_the_token(client: TestClient, headers: dict[str, str]) -> None:
    for method, path, body in [("GET", "/admin/bans", None),
                               ("POST", "/admin/bans", {"key": RAW, "duration": "1h"}),
                               ("POST", "/admin/allow-list", {"cidr": "10.0.0.0/8"}),
                               ("GET", "/admin/audit", None)]:
        r = client.request(method, path, json=body, headers=headers)
        assert r.status_code == 401, (path, r.text)
        assert r.headers["www-authenticate"].startswith("Bearer")
    assert client.get("/admin/bans", headers=AUTH).json()["bans"] == []


def test_admin_without_a_configured_token_says_so() -> None:
    with TestClient(create_app(make_settings(admin_token=None))) as c:
        r = c.get("/admin/bans", headers=AUTH)
    assert r.status_code == 503 and "KEYWATCH_ADMIN_TOKEN" in r.json()["error"]


def test_ban_list_unban_and_audit_never_show_the_raw_key(client: TestClient) -> None:
    assert client.post("/v1/events", json=ev()).json()["decision"] == "allow"
    r = client.post("/admin/bans", json={"key": RAW, "duration": "2h", "reason": "leaked"},
                    headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["target"] == KEY_ID and RAW not in r.text
    d = client.post("/v1/events", json=ev()).json()
    assert d["decision"] == "block" and d["reasons"][0]["code"] == "banned_key"
    assert "(leaked)" in d["reasons"][0]["message"]
    assert 7000 < d["action"]["retry_after_s"] <= 7200

    client.post("/admin/bans", json={"ip": "203.0.113.9", "permanent": True}, headers=AUTH)
    bans = client.get("/admin/bans", headers=AUTH).json()["bans"]
    assert {(b["scope"], b["target"], b["permanent"], b["by"]) for b in bans} == {
        ("key", KEY_ID, False, "admin"), ("ip", "203.0.113.9", True, "admin")}

    check = client.post("/v1/check", json={"api_key": "sk-other", "source_ip": "203.0.113.9"})
    assert check.json()["allowed"] is False and "address banned permanently" in check.json()[
        "reason"]

    r = client.post("/admin/unban", json={"key": KEY_ID, "reason": "rotated"}, headers=AUTH)
    assert r.status_code == 200
    assert client.post("/v1/events", json=ev()).json()["decision"] == "allow"
    assert [b["scope"] for b in client.get("/admin/bans", headers=AUTH).json()["bans"]] == ["ip"]

    audit = client.get("/admin/audit", headers=AUTH).json()["entries"]
    assert [a["action"] for a in audit] == ["unban", "ban", "ban"]
    assert audit[-1]["target"] == KEY_ID and audit[-1]["reason"] == "leaked"
    assert RAW not in json.dumps(audit)


def test_bad_admin_requests_name_the_problem(client: TestClient) -> None:
    r = client.post("/admin/bans", json={"key": RAW}, headers=AUTH)
    assert r.status_code == 422 and "duration" in r.text
    r = client.post("/admin/bans", json={"key": RAW, "ip": "1.2.3.4", "duration": 60},
                    headers=AUTH)
    assert r.status_code == 422 and "exactly one" in r.text
    r = client.post("/admin/allow-list", json={"cidr": "10.0.0.0/33"}, headers=AUTH)
    assert r.status_code == 422 and "CIDR" in r.text
    assert RAW not in r.text


def test_pre_flight_check(client: TestClient) -> None:
    ok = client.post("/v1/check", json={"api_key": RAW, "source_ip": "81.2.69.160"}).json()
    assert ok == {"key_id": KEY_ID, "allowed": True, "reason": None, "retry_after_s": None,
                  "dry_run": False, "refused": None, "scope": None, "until": None,
                  "limit": None}
    client.post("/admin/bans", json={"key": RAW, "duration": 600}, headers=AUTH)
    no = client.post("/v1/check", json={"api_key": RAW}).json()
    assert no["allowed"] is False and 590 < no["retry_after_s"] <= 600
    assert client.post("/v1/check", json={"api_key": RAW, "source_ip": "x"}).status_code == 422


def test_allow_list_managed_through_the_api(client: TestClient) -> None:
    r = client.post("/admin/allow-list", json={"key": RAW, "reason": "load test"},
                    headers=AUTH)
    assert r.status_code == 200 and r.json()["value"] == KEY_ID
    listed = client.get("/admin/allow-list", headers=AUTH).json()
    assert listed["keys"] == [KEY_ID]
    now = time.time()
    burst = [{**ev(), "timestamp": now + i * 0.001} for i in range(3100)]
    out = []
    for i in range(0, 3100, 1000):
        out += client.post("/v1/events:batch", json=burst[i:i + 1000]).json()
    assert {d["decision"] for d in out} == {"allow"}
    assert out[-1]["would"]["decision"] == "block"
    client.post("/admin/allow-list/remove", json={"key": RAW}, headers=AUTH)
    assert client.get("/admin/allow-list", headers=AUTH).json()["keys"] == []


def test_a_ban_set_through_one_replica_is_enforced_by_another(redis_url: str) -> None:
    settings = make_settings(store=redis_url)
    with TestClient(create_app(settings)) as a, TestClient(create_app(settings)) as b:
        assert b.post("/v1/events", json=ev()).json()["decision"] == "allow"
        a.post("/admin/bans", json={"key": RAW, "duration": "30m"}, headers=AUTH)
        d = b.post("/v1/events", json=ev()).json()
        assert d["decision"] == "block" and d["reasons"][0]["code"] == "banned_key"
        assert b.post("/v1/check", json={"api_key": RAW}).json()["allowed"] is False
        # an automatic ban by replica b (credential stuffing) is listed by replica a
        now = time.time()
        for i in range(30):
            b.post("/v1/events", json={"api_key": f"sk-g{i}", "timestamp": now + i,
                                       "status": 401, "source_ip": "203.0.113.50"})
        listed = a.get("/admin/bans", headers=AUTH).json()["bans"]
        assert {(x["scope"], x["target"], x["by"]) for x in listed} == {
            ("key", KEY_ID, "admin"), ("ip", "203.0.113.50", "keywatch")}
        assert a.post("/v1/events", json={"api_key": "sk-new", "timestamp": now + 40,
                                          "source_ip": "203.0.113.50"}).json()[
            "reasons"][0]["code"] == "banned_ip"
