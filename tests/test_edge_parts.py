"""The gateway's pieces on their own: refusals, client addresses, stream usage, retries."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from keywatch_gateway.addresses import ClientAddress
from keywatch_gateway.proxy import StreamUsage, ask_for_usage, usage_of
from keywatch_gateway.refusal import refusal_for
from keywatch_gateway.retry import Backoff, send_with_retries

NOW = 1_800_000_000.0  # 2027-01-15T08:00:00Z


@pytest.mark.parametrize("verdict, status, code, retry, should_retry, message", [
    ({"allowed": False, "reason": "key throttled until 2027-01-15T08:15:00Z",
      "retry_after_s": 2}, 429, "rate_limit_exceeded", "2", None,
     "Rate limit exceeded: this API key is throttled until 2027-01-15T08:00:02Z"),
    ({"allowed": False, "reason": "x", "refused": "throttle", "retry_after_s": 600},
     429, "rate_limit_exceeded", "600", "false", "throttled until 2027-01-15T08:10:00Z"),
    ({"allowed": False, "reason": "address banned until 2027-01-15T08:10:00Z (stuffing)",
      "retry_after_s": 600}, 429, "rate_limit_exceeded", "600", "false",
     "Calls from address 203.0.113.7 are blocked until 2027-01-15T08:10:00Z"),
    ({"allowed": False, "reason": "address banned permanently", "retry_after_s": None},
     403, "address_blocked", None, "false", "are blocked permanently."),
    ({"allowed": False, "reason": "key banned until 2027-01-15T09:00:00Z (leaked)",
      "retry_after_s": 3600}, 403, "api_key_blocked", "3600", "false",
     "This API key is blocked until 2027-01-15T09:00:00Z; retry after 3600 s."),
    ({"allowed": False, "reason": "key banned permanently", "retry_after_s": None},
     403, "api_key_blocked", None, "false", "This API key is blocked permanently."),
    ({"allowed": False, "reason": "keywatch_unavailable", "retry_after_s": None},
     503, "keywatch_unavailable", "1", None, "could not be checked"),
])
def test_refusals_say_what_is_refused_and_until_when(
        verdict: dict[str, object], status: int, code: str, retry: str | None,
        should_retry: str | None, message: str) -> None:
    refusal = refusal_for(verdict, "203.0.113.7", now=NOW)
    assert refusal is not None
    assert (refusal.status, refusal.code) == (status, code)
    assert refusal.headers.get("retry-after") == retry
    assert refusal.headers.get("x-should-retry") == should_retry
    assert message in refusal.message
    body = json.loads(refusal.body_bytes())
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert "stuffing" not in refusal.message and "leaked" not in refusal.message


def test_an_allowed_call_is_not_refused() -> None:
    assert refusal_for({"allowed": True, "reason": "dry-run: key would be blocked"}) is None


@pytest.mark.parametrize("trusted, peer, forwarded, expected", [
    ((), "198.51.100.1", "203.0.113.7", "198.51.100.1"),  # no trust: the peer
    (("10.0.0.0/8",), "198.51.100.1", "203.0.113.7", "198.51.100.1"),  # untrusted peer
    (("10.0.0.0/8",), "10.1.2.3", "203.0.113.7", "203.0.113.7"),
    (("10.0.0.0/8",), "10.1.2.3", "6.6.6.6, 203.0.113.7, 10.9.9.9", "203.0.113.7"),
    (("10.0.0.0/8",), "10.1.2.3", "10.0.0.5, 10.0.0.6", "10.0.0.5"),  # all trusted
    (("10.0.0.0/8",), "10.1.2.3", "not-an-ip", "10.1.2.3"),
    (("10.0.0.0/8",), "10.1.2.3", "6.6.6.6, bogus, 203.0.113.7", "203.0.113.7"),
    (("10.0.0.0/8",), "10.1.2.3", None, "10.1.2.3"),
    (("::1",), "::1", "2001:db8::7", "2001:db8::7"),
    ((), "testclient", None, None),
])
def test_x_forwarded_for_is_read_from_the_right_through_trusted_proxies(
        trusted: tuple[str, ...], peer: str, forwarded: str | None, expected: str | None
) -> None:
    assert ClientAddress(trusted).resolve(peer, forwarded) == expected


def test_a_misconfigured_trusted_proxy_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"'lb\.internal' is not an IP address"):
        ClientAddress(["lb.internal"])


def sse(payload: object) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()


def test_stream_usage_survives_any_split_and_drops_only_our_usage_chunk() -> None:
    chunks = [sse({"model": "m-1", "choices": [{"delta": {"content": "hi"}}], "usage": None}),
              sse({"model": "m-1", "choices": [{"delta": {}}], "usage": None}),
              sse({"model": "m-1", "choices": [],
                   "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}),
              b"data: [DONE]\n\n"]
    stream = b"".join(chunks)
    for strip in (True, False):
        for size in (1, 7, 64, len(stream)):
            reader = StreamUsage(strip)
            out = b"".join(reader.feed(stream[i:i + size])
                           for i in range(0, len(stream), size)) + reader.close()
            assert reader.usage == {"model": "m-1", "prompt_tokens": 3,
                                    "completion_tokens": 4, "tokens": 7}
            expected = chunks[:2] + chunks[3:] if strip else chunks
            assert out == b"".join(expected)


def test_stream_events_are_released_as_soon_as_they_are_complete() -> None:
    reader = StreamUsage(True)
    assert reader.feed(b'data: {"model": "m", "choices": [{}]}\r\n') == b""
    assert reader.feed(b"\r\ndata: {") == b'data: {"model": "m", "choices": [{}]}\r\n\r\n'


def test_usage_is_asked_for_only_when_the_caller_did_not() -> None:
    body = json.dumps({"model": "m", "stream": True, "stream_options": {"x": 1}}).encode()
    sent, ours = ask_for_usage("chat/completions", body)
    assert ours and json.loads(sent)["stream_options"] == {"x": 1, "include_usage": True}
    asked = json.dumps({"stream": True, "stream_options": {"include_usage": True}}).encode()
    assert ask_for_usage("chat/completions", asked) == (asked, False)
    plain = json.dumps({"model": "m"}).encode()
    assert ask_for_usage("chat/completions", plain) == (plain, False)
    assert ask_for_usage("embeddings", body) == (body, False)
    assert ask_for_usage("chat/completions", b'{"stream": tru') == (b'{"stream": tru', False)


def test_usage_of_reads_chat_and_responses_shapes() -> None:
    assert usage_of({"model": "m", "usage": {"input_tokens": 2, "output_tokens": 5}}) == {
        "model": "m", "prompt_tokens": 2, "completion_tokens": 5, "tokens": 7}
    assert usage_of({"type": "response.completed", "response": {
        "model": "r", "usage": {"input_tokens": 1, "output_tokens": 1, "total_tokens": 2}}}
    ) == {"model": "r", "prompt_tokens": 1, "completion_tokens": 1, "tokens": 2}
    assert usage_of({"usage": {"total_tokens": -1, "prompt_tokens": True}}) == {}


def _responses(*statuses: int, retry_after: str | None = None) -> list[httpx.Response]:
    headers = {"retry-after": retry_after} if retry_after else {}
    return [httpx.Response(s, headers=headers) for s in statuses]


def test_retries_stop_at_a_final_answer_and_respect_retry_after() -> None:
    answers = _responses(503, 429, 200, retry_after="0.05")
    errors: list[str] = []
    t0 = time.monotonic()
    last = send_with_retries(lambda: answers.pop(0), Backoff(5, 0.001, 1.0),
                             on_error=errors.append)
    assert last is not None and last.status_code == 200 and answers == []
    assert errors == ["HTTP 503", "HTTP 429"] and time.monotonic() - t0 >= 0.1
    refused = _responses(400, 200)
    last = send_with_retries(lambda: refused.pop(0), Backoff(5, 0.001, 1.0))
    assert last is not None and last.status_code == 400 and len(refused) == 1


def test_retries_give_up_after_the_attempts_and_stop_at_once_on_shutdown() -> None:
    calls = []

    def down() -> httpx.Response:
        calls.append(1)
        raise httpx.ConnectError("refused")

    assert send_with_retries(down, Backoff(3, 0.001, 0.002)) is None and len(calls) == 3
    stop = threading.Event()
    threading.Timer(0.05, stop.set).start()
    calls.clear()
    t0 = time.monotonic()
    assert send_with_retries(down, Backoff(10, 5.0, 5.0), stop=stop) is None
    assert time.monotonic() - t0 < 1.0 and len(calls) == 1
