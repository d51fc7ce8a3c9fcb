"""Gateway integration over real HTTP: the client, the middleware, and keywatch being down.

keywatch runs under uvicorn on 127.0.0.1; events are read back from its event log.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, HTTPException, Request
from fastapi.testclient import TestClient
from pydantic import BaseModel

from features.keys import KeyHasher
from features.stores.base import EntityOps
from keywatch_gateway.client import KeywatchClient
from keywatch_gateway.middleware import KeywatchMiddleware
from serving.api.app import create_app
from serving.engine.event_log import read_event_log
from serving.policy.responses import add_ban_reads, ban_ops, read_ban
from tests.conftest import ADMIN_TOKEN, TEST_SECRET, make_settings
from tests.ops_servers import RecordingWebhook, closed_port_url, serve_in_thread

HASH = KeyHasher(TEST_SECRET)
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


class CheckIn(BaseModel):
    api_key: str
    source_ip: str | None = None


def add_check_stand_in(app: FastAPI) -> None:
    """`POST /v1/check` in the agreed shape, until the real one lands on this branch."""
    if any(getattr(r, "path", None) == "/v1/check" for r in app.routes):
        return

    @app.post("/v1/check")
    def check(body: CheckIn) -> dict[str, Any]:
        scorer = app.state.scorer
        key_id = scorer.hasher.key_id(body.api_key)
        ops = EntityOps("k", key_id)
        idx = add_ban_reads(ops)
        (results,) = scorer.store.execute([ops])
        ban, now = read_ban(results, idx), time.time()
        if ban.active(now):
            return {"key_id": key_id, "allowed": False, "reason": "banned_key",
                    "retry_after_s": max(1, round(ban.until - now))}
        return {"key_id": key_id, "allowed": True, "reason": None, "retry_after_s": None}


class Keywatch:
    def __init__(self, app: FastAPI, url: str) -> None:
        self.app, self.url = app, url

    def events(self, api_key: str) -> list[dict[str, Any]]:
        self.app.state.event_log.flush()
        key_id = HASH.key_id(api_key)
        return [r for r in read_event_log(self.app.state.settings.data_dir / "events")
                if r["key_id"] == key_id]

    def ban(self, api_key: str, seconds: float = 600) -> None:
        now = time.time()
        self.app.state.scorer.store.execute(
            [ban_ops("k", HASH.key_id(api_key), until=now + seconds, level=1, ts=now)])


@pytest.fixture(scope="module")
def keywatch() -> Iterator[Keywatch]:
    app = create_app(make_settings())
    add_check_stand_in(app)
    with serve_in_thread(app) as url:
        yield Keywatch(app, url)


def gateway(client: KeywatchClient, **options: Any) -> FastAPI:
    gw = FastAPI()

    @gw.post("/v1/chat/completions")
    async def chat(request: Request) -> dict[str, Any]:
        request.state.keywatch_usage = {"prompt_tokens": 12, "completion_tokens": 30,
                                        "model": "gpt-4o-mini"}
        return {"choices": []}

    @gw.get("/v1/models")
    async def models() -> dict[str, Any]:
        raise HTTPException(404, "no such thing")

    @gw.get("/public")
    async def public() -> dict[str, str]:
        return {"status": "ok"}

    gw.add_middleware(KeywatchMiddleware, client=client, **options)
    return gw


def test_client_batches_reach_the_event_log(keywatch: Keywatch) -> None:
    decisions: list[dict[str, Any]] = []
    client = KeywatchClient(keywatch.url, batch_size=10, flush_interval_s=0.05,
                            on_decisions=decisions.extend)
    for i in range(25):
        assert client.report({"api_key": "sk-live-client-batch", "tokens": i,
                              "source_ip": "81.2.69.160", "endpoint": "/v1/embeddings"})
    assert client.flush(10)
    client.close()
    events = keywatch.events("sk-live-client-batch")
    assert sorted(e["tokens"] for e in events) == list(range(25))
    assert all(e["endpoint"] == "/v1/embeddings" for e in events)
    assert len(decisions) == 25 and decisions[0]["key_id"] == HASH.key_id("sk-live-client-batch")
    assert client.stats()["sent"] == 25 and client.stats()["dropped_rejected"] == 0


def test_a_retried_batch_carries_the_same_event_ids() -> None:
    with RecordingWebhook(fail_first=2) as keywatch:
        client = KeywatchClient(keywatch.url.rsplit("/", 1)[0], backoff_s=0.01,
                                max_attempts=3)
        client.report({"api_key": "sk-live-retry", "event_id": "gateway-chosen-id"})
        client.report({"api_key": "sk-live-retry"})
        client.report({"api_key": "sk-live-retry"})
        assert client.flush(10)
        client.close()
    assert keywatch.attempts == 3 and len(keywatch.received) == 3
    ids = [[e["event_id"] for e in body] for body in keywatch.received]
    assert ids[0] == ids[1] == ids[2]  # the same events, recognisable as such
    assert ids[0][0] == "gateway-chosen-id" and len(set(ids[0])) == 3
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids[0][1:])  # uuid4 hex
    assert client.stats()["failed_posts"] == 2 and client.stats()["sent"] == 3


def test_middleware_reports_each_keyed_request(keywatch: Keywatch) -> None:
    client = KeywatchClient(keywatch.url, flush_interval_s=0.05)
    app = gateway(client, key_header="x-api-key", trusted_proxies=["10.0.0.0/8"])
    headers = {"Authorization": "Bearer sk-live-mw-bearer", "user-agent": "gw-test/1.0",
               "x-forwarded-for": "81.2.69.160, 10.0.0.1"}
    with TestClient(app, client=("10.0.0.2", 50000)) as c:  # a trusted balancer's address
        for _ in range(3):
            assert c.post("/v1/chat/completions", headers=headers).status_code == 200
        assert c.get("/v1/models", headers={"x-api-key": "sk-live-mw-header"}
                     ).status_code == 404
        assert c.get("/public").status_code == 200  # no key: nothing to report
    client.close()
    bearer = keywatch.events("sk-live-mw-bearer")
    assert len(bearer) == 3
    e = bearer[0]
    assert (e["endpoint"], e["method"], e["status"]) == ("/v1/chat/completions", "POST", 200)
    assert (e["tokens"], e["prompt_tokens"], e["completion_tokens"]) == (42, 12, 30)
    assert e["model"] == "gpt-4o-mini" and e["user_agent"] == "gw-test/1.0"
    assert e["source_ip"] == "81.2.69.160" and e["latency_ms"] > 0
    (other,) = keywatch.events("sk-live-mw-header")
    assert (other["endpoint"], other["status"]) == ("/v1/models", 404)
    assert other["source_ip"] == "10.0.0.2"  # no X-Forwarded-For: the peer itself
    assert client.stats()["reported"] == 4


def test_middleware_refuses_a_banned_key_and_caches_the_verdict(keywatch: Keywatch) -> None:
    keywatch.ban("sk-live-mw-banned")
    client = KeywatchClient(keywatch.url, flush_interval_s=0.05)
    app = gateway(client, enforce=True)
    with TestClient(app) as c:
        for _ in range(3):
            r = c.post("/v1/chat/completions",
                       headers={"Authorization": "Bearer sk-live-mw-banned"})
            assert r.status_code == 403  # a banned key: permission denied, not a rate limit
            assert 0 < int(r.headers["retry-after"]) <= 600
            assert r.headers["x-should-retry"] == "false"
            error = r.json()["error"]
            assert error["code"] == "api_key_blocked" and error["type"] == "permission_denied"
            assert error["message"].startswith("This API key is blocked until 20")
            assert "sk-live" not in r.text
        for _ in range(3):
            ok = c.post("/v1/chat/completions",
                        headers={"Authorization": "Bearer sk-live-mw-allowed"})
            assert ok.status_code == 200
    client.close()
    assert client.checks == 2  # one per key; the rest came from the cache
    refused = keywatch.events("sk-live-mw-banned")
    assert [e["status"] for e in refused] == [403, 403, 403]  # keywatch still sees them


def test_middleware_and_client_enforce_a_throttle_with_429_and_retry_after(
        keywatch: Keywatch) -> None:
    key = "sk-live-mw-throttled"
    r = httpx.post(f"{keywatch.url}/admin/throttle", headers=ADMIN,
                   json={"key": key, "limit_per_min": 6, "burst": 2, "duration": "10m"})
    assert r.status_code == 200, r.text
    client = KeywatchClient(keywatch.url, flush_interval_s=0.05)
    app = gateway(client, enforce=True, cache_ttl_s=60.0)
    with TestClient(app) as c:
        statuses, refusals = [], []
        for _ in range(6):
            r = c.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"})
            statuses.append(r.status_code)
            if r.status_code == 429:
                refusals.append(r)
    assert statuses[:2] == [200, 200] and statuses[2] == 429  # the burst, then the limit
    assert client.checks >= 3  # an allowance under a limit is not reused, whatever the TTL
    error = refusals[0].json()["error"]
    assert error["code"] == "rate_limit_exceeded"
    assert error["message"].startswith("Rate limit exceeded: this API key is throttled until")
    assert 1 <= int(refusals[0].headers["retry-after"]) <= 10
    refusal = client.enforce(key)
    assert refusal is not None and refusal.status == 429 and refusal.what == "throttle"
    assert refusal.headers["retry-after"] == str(refusal.retry_after_s)
    assert client.enforce("sk-live-mw-unthrottled") is None
    client.close()


def test_nothing_waits_when_keywatch_is_down() -> None:
    client = KeywatchClient(closed_port_url(), flush_interval_s=0.05, max_buffer=10,
                            backoff_s=0.01)
    app = gateway(client, enforce=True)
    with TestClient(app) as c:
        for _ in range(20):
            r = c.post("/v1/chat/completions", headers={"Authorization": "Bearer sk-live-x"})
            assert r.status_code == 200  # fail-open
    client.close(timeout=0.5)
    stats = client.stats()
    assert stats["reported"] == 20 and stats["sent"] == 0 and stats["buffered"] == 0
    assert stats["dropped_overflow"] + stats["dropped_at_close"] == 20
    assert stats["dropped_overflow"] >= 10
    assert stats["failed_posts"] >= 1
    assert stats["checks"] == 1 and stats["check_errors"] == 1  # the fail-open was cached
    assert client.report({"api_key": "sk-live-x"}) is False  # closed


def test_a_keywatch_that_never_answers_costs_one_check_timeout() -> None:
    with RecordingWebhook(hold=True) as blackhole:
        client = KeywatchClient(blackhole.url.rsplit("/", 1)[0], check_timeout_s=0.2,
                                timeout_s=0.2, flush_interval_s=0.05)
        app = gateway(client, enforce=True)
        with TestClient(app) as c:
            for _ in range(10):
                r = c.post("/v1/chat/completions",
                           headers={"Authorization": "Bearer sk-live-y"})
                assert r.status_code == 200
        assert client.check_errors == 1 and client.last_error is not None
        client.close(timeout=0.5)


def test_fail_closed_refuses_when_keywatch_cannot_answer() -> None:
    client = KeywatchClient(closed_port_url(), fail_open=False)
    verdict = client.check("sk-live-z", "81.2.69.160")
    assert verdict["allowed"] is False and verdict["reason"] == "keywatch_unavailable"
    app = gateway(client, enforce=True)
    with TestClient(app) as c:
        r = c.post("/v1/chat/completions", headers={"Authorization": "Bearer sk-live-z"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "keywatch_unavailable"
    client.close(timeout=0.2)
