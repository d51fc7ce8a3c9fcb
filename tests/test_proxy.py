"""The OpenAI-compatible proxy, end to end, with the official `openai` client.

Real servers on 127.0.0.1: keywatch (its HTTP API, `/v1/check` and the admin API), a
fake OpenAI upstream (tests/support/fake_openai.py) and the proxy under uvicorn. The
client is the real SDK, so what is asserted is what an application would see: its
exceptions, their messages, the chunks of a stream and when they arrive.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from fastapi import FastAPI

from features.contract import Event
from features.keys import KeyHasher
from keywatch_gateway.client import KeywatchClient
from keywatch_gateway.proxy import create_proxy_app
from serving.api.app import create_app
from serving.engine.event_log import read_event_log
from tests.conftest import ADMIN_TOKEN, TEST_SECRET, make_settings
from tests.ops_servers import closed_port_url, serve_in_thread
from tests.support.fake_openai import MODEL, PROMPT_TOKENS, WORDS, FakeOpenAI

HASH = KeyHasher(TEST_SECRET)
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
MESSAGES = [{"role": "user", "content": "Say hello"}]
DEFAULT_POLICY = Path(__file__).resolve().parents[1] / "serving" / "policy" / \
    "default_policy.yaml"
RUNAWAY_PER_MIN = 200


@dataclass
class Edge:
    keywatch: FastAPI
    keywatch_url: str
    upstream: FakeOpenAI
    upstream_url: str
    proxy_url: str
    gateway: KeywatchClient

    def sdk(self, api_key: str, *, direct: bool = False, **options: Any) -> openai.OpenAI:
        base = self.upstream_url if direct else self.proxy_url
        return openai.OpenAI(api_key=api_key, base_url=f"{base}/v1", max_retries=0,
                             **options)

    def events(self, api_key: str, expect: int) -> list[dict[str, Any]]:
        """The key's events in keywatch's log, once `expect` of them are there (a call is
        reported when its response has ended, which may be just after the client read
        its last byte), or what there is after a few seconds."""
        return logged_events(self.keywatch, self.gateway, api_key, expect)

    def admin(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        r = httpx.post(f"{self.keywatch_url}{path}", json=body, headers=ADMIN)
        assert r.status_code == 200, r.text
        return r.json()


def logged_events(keywatch: FastAPI, gateway: KeywatchClient, api_key: str, expect: int
                  ) -> list[dict[str, Any]]:
    key_id = HASH.key_id(api_key)
    deadline = time.monotonic() + 5
    while True:
        assert gateway.flush(10)
        keywatch.state.event_log.flush()
        events = [e for e in read_event_log(keywatch.state.settings.data_dir / "events")
                  if e["key_id"] == key_id]
        if len(events) >= expect or time.monotonic() > deadline:
            return events
        time.sleep(0.02)


@pytest.fixture(scope="module")
def edge() -> Iterator[Edge]:
    keywatch = create_app(make_settings())
    upstream = FakeOpenAI()
    with serve_in_thread(keywatch) as kw_url, serve_in_thread(upstream.app()) as up_url:
        gateway = KeywatchClient(kw_url, flush_interval_s=0.05)
        proxy = create_proxy_app(f"{up_url}/v1", gateway, trusted_proxies=["127.0.0.1"])
        with serve_in_thread(proxy, proxy_headers=False) as proxy_url:
            yield Edge(keywatch, kw_url, upstream, up_url, proxy_url, gateway)


def first_chunk_and_total(client: openai.OpenAI, **extra: Any
                          ) -> tuple[float, list[Any]]:
    """Seconds to the first chunk of a streamed completion, and all the chunks."""
    t0 = time.perf_counter()
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True,
                                            **extra)
    chunks, first = [], None
    for chunk in stream:
        if first is None:
            first = time.perf_counter() - t0
        chunks.append(chunk)
    assert first is not None
    return first, chunks


def test_normal_traffic_is_served_and_reported(edge: Edge) -> None:
    key = "sk-proxy-normal-0001"
    client = edge.sdk(key)
    for _ in range(3):
        answer = client.chat.completions.create(model=MODEL, messages=MESSAGES)
        assert answer.choices[0].message.content == "".join(WORDS)
        assert answer.usage is not None and answer.usage.total_tokens == PROMPT_TOKENS + 6
    assert [m.id for m in client.models.list()] == [MODEL]
    assert edge.upstream.seen[-1]["headers"]["authorization"] == f"Bearer {key}"
    events = edge.events(key, 4)
    chats = [e for e in events if e["endpoint"] == "/v1/chat/completions"]
    assert len(chats) == 3 and len(events) == 4
    assert {(e["status"], e["tokens"], e["prompt_tokens"], e["completion_tokens"], e["model"])
            for e in chats} == {(200, PROMPT_TOKENS + 6, PROMPT_TOKENS, 6, MODEL)}
    assert {e["source_ip"] for e in events} == {"127.0.0.1"}


def test_a_banned_key_gets_permission_denied_with_a_readable_message(edge: Edge) -> None:
    banned, other = "sk-proxy-banned-0002", "sk-proxy-other-0002"
    edge.admin("/admin/bans", {"key": banned, "duration": "30m", "reason": "leaked"})
    with pytest.raises(openai.PermissionDeniedError) as caught:
        edge.sdk(banned).chat.completions.create(model=MODEL, messages=MESSAGES)
    error = caught.value
    assert error.status_code == 403 and error.code == "api_key_blocked"
    assert "This API key is blocked until 20" in error.message
    assert "retry after" in error.message and banned not in error.message
    assert error.response.headers["x-should-retry"] == "false"
    assert 1700 < int(error.response.headers["retry-after"]) <= 1800
    ok = edge.sdk(other).chat.completions.create(model=MODEL, messages=MESSAGES)
    assert ok.choices[0].message.content == "".join(WORDS)
    assert [e["status"] for e in edge.events(banned, 1)] == [403]  # keywatch sees the try
    assert not any(s.get("body", {}).get("messages") and
                   s["headers"]["authorization"] == f"Bearer {banned}"
                   for s in edge.upstream.seen)  # never reached the upstream


def test_a_banned_address_is_refused_as_an_address_not_as_a_key(edge: Edge) -> None:
    key = "sk-proxy-address-0003"
    edge.admin("/admin/bans", {"ip": "203.0.113.7", "duration": "10m"})
    banned_address = edge.sdk(key, default_headers={"x-forwarded-for": "203.0.113.7"})
    with pytest.raises(openai.RateLimitError) as caught:
        banned_address.chat.completions.create(model=MODEL, messages=MESSAGES)
    error = caught.value
    assert error.code == "rate_limit_exceeded" and error.type == "requests"
    assert "Calls from address 203.0.113.7 are blocked until 20" in error.message
    assert 500 < int(error.response.headers["retry-after"]) <= 600
    elsewhere = edge.sdk(key, default_headers={"x-forwarded-for": "198.51.100.20"})
    assert elsewhere.chat.completions.create(model=MODEL, messages=MESSAGES).choices
    assert sorted((e["source_ip"], e["status"]) for e in edge.events(key, 2)) == [
        ("198.51.100.20", 200), ("203.0.113.7", 429)]


def test_streaming_passes_through_as_it_arrives_and_reports_usage(edge: Edge) -> None:
    key = "sk-proxy-stream-0004"
    direct_first, direct = first_chunk_and_total(edge.sdk(key, direct=True))
    proxied_first, proxied = first_chunk_and_total(edge.sdk(key))
    stream_time = edge.upstream.first_chunk_delay_s + len(WORDS) * \
        edge.upstream.chunk_interval_s
    assert direct_first < stream_time / 2  # the upstream really streams
    assert proxied_first - direct_first < 0.1, (proxied_first, direct_first)
    text = "".join(c.choices[0].delta.content or "" for c in proxied if c.choices)
    assert text == "".join(WORDS)
    # the proxy asked for usage, and kept the usage chunk from a caller who did not
    assert edge.upstream.seen[-1]["body"]["stream_options"] == {"include_usage": True}
    assert len(proxied) == len(direct) and all(c.choices for c in proxied)
    (event,) = edge.events(key, 1)  # the direct call is not reported, the proxied one is
    assert (event["tokens"], event["prompt_tokens"], event["completion_tokens"],
            event["model"]) == (PROMPT_TOKENS + 6, PROMPT_TOKENS, 6, MODEL)


def test_a_caller_that_asks_for_usage_gets_the_usage_chunk(edge: Edge) -> None:
    key = "sk-proxy-stream-usage-0005"
    _, chunks = first_chunk_and_total(edge.sdk(key),
                                      stream_options={"include_usage": True})
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == PROMPT_TOKENS + 6
    (event,) = edge.events(key, 1)
    assert event["tokens"] == PROMPT_TOKENS + 6


def test_upstream_errors_pass_through_in_their_own_shape(edge: Edge) -> None:
    r = httpx.post(f"{edge.proxy_url}/v1/chat/completions", json={"model": MODEL},
                   headers={"x-api-key": "not-a-bearer"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.get(f"{edge.proxy_url}/elsewhere")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_x_forwarded_for_is_ignored_from_an_untrusted_peer(edge: Edge) -> None:
    key = "sk-proxy-xff-0006"
    edge.admin("/admin/bans", {"ip": "203.0.113.66", "duration": "10m"})
    gateway = KeywatchClient(edge.keywatch_url, flush_interval_s=0.05)
    proxy = create_proxy_app(f"{edge.upstream_url}/v1", gateway)  # trusts no one
    with serve_in_thread(proxy, proxy_headers=False) as url:  # as `keywatch proxy` runs
        spoofing = openai.OpenAI(api_key=key, base_url=f"{url}/v1", max_retries=0,
                                 default_headers={"x-forwarded-for": "203.0.113.66"})
        assert spoofing.chat.completions.create(model=MODEL, messages=MESSAGES).choices
        events = logged_events(edge.keywatch, gateway, key, 1)
    assert [e["source_ip"] for e in events] == ["127.0.0.1"]


def test_calls_go_on_when_keywatch_is_down(edge: Edge) -> None:
    gateway = KeywatchClient(closed_port_url(), flush_interval_s=0.05, backoff_s=0.01)
    with serve_in_thread(create_proxy_app(f"{edge.upstream_url}/v1", gateway)) as url:
        client = openai.OpenAI(api_key="sk-proxy-down-0007", base_url=f"{url}/v1",
                               max_retries=0)
        for _ in range(3):
            assert client.chat.completions.create(model=MODEL, messages=MESSAGES).choices
    assert gateway.stats()["check_errors"] >= 1


def test_a_caller_that_hangs_up_mid_stream_is_still_reported(edge: Edge) -> None:
    key = "sk-proxy-hangup-0008"
    body = {"model": MODEL, "messages": MESSAGES, "stream": True}
    with httpx.stream("POST", f"{edge.proxy_url}/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {key}"}, timeout=10) as r:
        first = next(r.iter_raw())
        assert first.startswith(b"data: ")
    (event,) = edge.events(key, 1)
    assert (event["status"], event["model"]) == (200, MODEL)
    assert not event.get("tokens")  # the stream never ended: no usage to report
    assert edge.sdk(key).chat.completions.create(model=MODEL, messages=MESSAGES).choices


def test_the_cli_verb_refuses_a_bad_trusted_proxy_by_name(capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    from serving.cli.main import main

    assert main(["proxy", "--upstream", "http://127.0.0.1:9/v1",
                 "--trusted-proxy", "lb.internal"]) == 2
    assert "'lb.internal' is not an IP address or network" in capsys.readouterr().err


def runaway_policy(tmp_path: Path) -> Path:
    """The shipped policy, with the minute's request limit at 200 (so a short loop is a
    runaway) and the throttle holding 3 s once the loop stops (so the test sees it end)."""
    policy = yaml.safe_load(DEFAULT_POLICY.read_text(encoding="utf-8"))
    (rule,) = [r for r in policy["rules"] if r["id"] == "rate_limit_1m"]
    rule["params"]["limit"] = RUNAWAY_PER_MIN
    policy["responses"]["tiers"]["high"].update(duration="3s", limit_per_min=60)
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(policy), encoding="utf-8")
    return path


def test_a_runaway_loop_is_throttled_at_the_edge_and_served_again_after(
        tmp_path: Path) -> None:
    """keywatch throttles the loop (a limit as state, metered in /v1/check), the proxy
    refuses the calls over the limit with RateLimitError, and once the limit has ended,
    a call is served again."""
    key = "sk-proxy-runaway-0009"
    keywatch = create_app(make_settings(policy=runaway_policy(tmp_path)))
    upstream = FakeOpenAI(first_chunk_delay_s=0, chunk_interval_s=0)
    decisions: list[str] = []
    with serve_in_thread(keywatch) as kw_url, serve_in_thread(upstream.app()) as up_url:
        gateway = KeywatchClient(kw_url, flush_interval_s=0.05,
                                 on_decisions=lambda ds: decisions.extend(
                                     d["decision"] for d in ds))
        with serve_in_thread(create_proxy_app(f"{up_url}/v1", gateway),
                             proxy_headers=False) as url:
            client = openai.OpenAI(api_key=key, base_url=f"{url}/v1", max_retries=0)
            served: list[bool] = []
            refusals: list[openai.RateLimitError] = []
            for _ in range(3 * RUNAWAY_PER_MIN):
                try:
                    client.chat.completions.create(model=MODEL, messages=MESSAGES)
                    served.append(True)
                except openai.RateLimitError as exc:
                    served.append(False)
                    refusals.append(exc)
            assert gateway.flush(10)
            # the first call keywatch throttled: by the minute's limit, or earlier by
            # `runaway_loop` (one prompt on a timer), never before the loop can show
            throttled_from = decisions.index("throttle")
            assert throttled_from >= 30
            over = served[throttled_from:]
            assert over.count(False) >= 0.8 * len(over), (over.count(False), len(over))
            first = refusals[0]
            assert first.code == "rate_limit_exceeded"
            assert "this API key is throttled until 20" in first.message
            assert 1 <= int(first.response.headers["retry-after"]) <= 60
            # the limit ends and the edge serves the key again. Its calls of the last
            # minute, refused ones included, stay over the minute's limit until they age
            # out, so a call may draw a new, escalated limit (`rate_limit_1m`) first
            deadline = time.monotonic() + 90
            while True:
                wait_until_no_limit(kw_url, timeout_s=90)
                try:
                    assert client.chat.completions.create(model=MODEL,
                                                          messages=MESSAGES).choices
                    break
                except openai.RateLimitError:
                    served.append(False)
                    assert time.monotonic() < deadline, "never served again"
    assert len(upstream.seen) == served.count(True) + 1  # refused calls never went upstream


def wait_until_no_limit(keywatch_url: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        r = httpx.get(f"{keywatch_url}/admin/limits", headers=ADMIN)
        assert r.status_code == 200, r.text
        if r.json()["count"] == 0:
            return
        time.sleep(0.2)
    pytest.fail("the limit did not end")


def test_the_upstream_can_get_the_proxys_own_key(edge: Edge) -> None:
    caller = "sk-proxy-caller-0010"
    gateway = KeywatchClient(edge.keywatch_url, flush_interval_s=0.05)
    proxy = create_proxy_app(f"{edge.upstream_url}/v1", gateway, key_header="x-api-key",
                             upstream_api_key="sk-upstream-own-key")
    with serve_in_thread(proxy, proxy_headers=False) as url:
        r = httpx.post(f"{url}/v1/chat/completions", headers={"x-api-key": caller},
                       json={"model": MODEL, "messages": MESSAGES})
        assert r.status_code == 200
        events = logged_events(edge.keywatch, gateway, caller, 1)
    seen = edge.upstream.seen[-1]["headers"]
    assert seen["authorization"] == "Bearer sk-upstream-own-key" and "x-api-key" not in seen
    assert [e["status"] for e in events] == [200]  # keywatch knows the caller's key


def test_paths_and_queries_reach_the_upstream_as_sent(edge: Edge) -> None:
    r = httpx.get(f"{edge.proxy_url}/v1/models?limit=5&after=a%2Fb",
                  headers={"Authorization": "Bearer sk-proxy-paths-0011"})
    assert r.status_code == 200 and r.json()["data"][0]["id"] == MODEL
    assert edge.upstream.seen[-1]["query"] == "limit=5&after=a%2Fb"


def owner_history(keywatch: FastAPI, api_key: str, where: dict[str, str], days: float = 3
                  ) -> None:
    """Three days of the owner's calls, every two minutes around the clock, scored by the
    running service's own scorer with their own timestamps (history, as a replay would
    give it), so that the key is warm and its networks and client library are known."""
    rng = random.Random(7)
    now = time.time()
    ts = now - days * 86400
    while ts < now - 120:
        keywatch.state.scorer.score(Event.model_validate({
            "api_key": api_key, "timestamp": ts, "endpoint": "/v1/chat/completions",
            "model": MODEL, "prompt_tokens": PROMPT_TOKENS, "completion_tokens": 20,
            "tokens": PROMPT_TOKENS + 20, "status": 200, "latency_ms": 300, **where}))
        ts += rng.expovariate(1 / 120)


def test_a_resold_key_is_banned_on_the_buyers_address_while_the_owner_goes_on(
        edge: Edge) -> None:
    """The owner calls from home in Germany with the official client; a buyer of the key
    calls from a rented server in Singapore at the same time. The buyer's address is
    banned once its first call is scored, and refused from then on; every one of the owner's calls
    is served, and the key itself is never banned."""
    key = "sk-proxy-resold-0012"
    owner_ip, buyer_ip = "80.128.10.20", "128.199.64.10"  # Deutsche Telekom; a Singapore VPS
    agent = f"OpenAI/Python {openai.__version__}"
    owner_history(edge.keywatch, key, {"source_ip": owner_ip, "user_agent": agent})
    owner = edge.sdk(key, default_headers={"x-forwarded-for": owner_ip})
    buyer = edge.sdk(key, default_headers={"x-forwarded-for": buyer_ip})
    owner_served, buyer_refused = 0, []
    for _ in range(20):
        owner_served += bool(owner.chat.completions.create(model=MODEL, messages=MESSAGES))
        try:
            buyer.chat.completions.create(model=MODEL, messages=MESSAGES)
            buyer_refused.append(False)
        except openai.RateLimitError as exc:
            buyer_refused.append(True)
            assert f"Calls from address {buyer_ip} are blocked until 20" in exc.message
        assert edge.gateway.flush(10)  # the call is scored before the next one, and
        time.sleep(0.3)  # the proxy's allowance for this key and address (0.25 s) has ended
    assert owner_served == 20
    assert buyer_refused[0] is False and all(buyer_refused[1:]), buyer_refused
    bans = httpx.get(f"{edge.keywatch_url}/admin/bans", headers=ADMIN).json()["bans"]
    assert [(b["scope"], b["target"]) for b in bans if b["target"] == buyer_ip] == [
        ("ip", buyer_ip)]
    key_view = httpx.get(f"{edge.keywatch_url}/v1/keys/{HASH.key_id(key)}",
                         headers=ADMIN).json()
    assert key_view["ban"] is None
