"""`KeywatchMiddleware`: watch (and optionally enforce on) every keyed request of an ASGI app.

Pure ASGI (no `BaseHTTPMiddleware`), so it does not buffer streaming responses and works
with FastAPI, Starlette or any ASGI framework:

    app.add_middleware(KeywatchMiddleware, client=KeywatchClient("http://keywatch:8000"))

For each HTTP request that carries an API key (`Authorization: Bearer …` or a configured
header such as `x-api-key`) it reports, after the response has been sent, one event with
the status, latency, client address, user agent and path. Reporting is a non-blocking
append (see `KeywatchClient.report`), so the request never waits for keywatch.

Usage the app learns while serving (tokens, model) is picked up from
`request.state.keywatch_usage = {"tokens": …, "prompt_tokens": …, "model": …}`.

With `enforce=True` the key is checked first (`KeywatchClient.acheck`) and a refused call
gets the answer of `keywatch_gateway.refusal`: 429 with `Retry-After` for a throttle or
a temporary address ban, 403 for a banned key, in OpenAI's error shape. Verdicts are
cached (keyed by a salted digest, never the raw key): a refusal until its
`retry_after_s`, an allowance for `cache_ttl_s` — except while the key is under a limit,
when every call is asked about, since a cached "yes" would let a loop through unmetered.
If keywatch is down the fail-open answer is cached too, so no request waits on it twice.

The client address is the peer's, or the one in `X-Forwarded-For` when the peer is one
of `trusted_proxies` (see `keywatch_gateway.addresses`).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from keywatch_gateway.addresses import ClientAddress
from keywatch_gateway.client import KeywatchClient
from keywatch_gateway.refusal import UNAVAILABLE, refusal_for

USAGE_STATE_KEY = "keywatch_usage"
USAGE_FIELDS = ("tokens", "prompt_tokens", "completion_tokens", "model", "country", "asn")
LIMIT_FIELDS = ("limit", "limited", "throttle")
"""Fields of a `/v1/check` answer that say the key is under a limit right now."""


def under_limit(verdict: dict[str, Any]) -> bool:
    """True when the answer says a limit applies, so an allowance must not be reused."""
    return any(verdict.get(name) for name in LIMIT_FIELDS)


class VerdictCache:
    """A small TTL + LRU cache of check answers, keyed by a salted digest of key and IP."""

    def __init__(self, *, max_entries: int = 10_000) -> None:
        self.max_entries = max_entries
        self._salt = os.urandom(16)
        self._items: OrderedDict[bytes, tuple[float, dict[str, Any]]] = OrderedDict()

    def _digest(self, api_key: str, ip: str | None) -> bytes:
        return hashlib.blake2b(f"{api_key}\x00{ip or ''}".encode(), key=self._salt,
                               digest_size=16).digest()

    def get(self, api_key: str, ip: str | None, now: float) -> dict[str, Any] | None:
        d = self._digest(api_key, ip)
        item = self._items.get(d)
        if item is None:
            return None
        if item[0] <= now:
            del self._items[d]
            return None
        self._items.move_to_end(d)
        return item[1]

    def put(self, api_key: str, ip: str | None, verdict: dict[str, Any], ttl_s: float,
            now: float) -> None:
        d = self._digest(api_key, ip)
        self._items[d] = (now + ttl_s, verdict)
        self._items.move_to_end(d)
        while len(self._items) > self.max_entries:
            self._items.popitem(last=False)


class KeywatchMiddleware:
    """Reports keyed requests to keywatch and, if asked, refuses banned or throttled calls."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        client: KeywatchClient,
        key_header: str | None = None,
        enforce: bool = False,
        cache_ttl_s: float = 1.0,
        max_refusal_cache_s: float = 60.0,
        cache_max_keys: int = 10_000,
        exclude_paths: Iterable[str] = (),
        trusted_proxies: Iterable[str] = (),
    ) -> None:
        self.app = app
        self.client = client
        self.key_header = key_header.lower() if key_header else None
        self.enforce = enforce
        self.cache_ttl_s = cache_ttl_s
        self.max_refusal_cache_s = max_refusal_cache_s
        self.cache = VerdictCache(max_entries=cache_max_keys)
        self.exclude_paths = frozenset(exclude_paths)
        self.addresses = ClientAddress(trusted_proxies)
        self.refused = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in self.exclude_paths:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        api_key = self._api_key(headers)
        if not api_key:
            await self.app(scope, receive, send)
            return
        started_wall, started = time.time(), time.perf_counter()
        client_ip = self._client_ip(scope, headers)

        if self.enforce:
            verdict = await self._verdict(api_key, client_ip)
            if not verdict.get("allowed", True):
                status = await self._refuse(send, verdict, client_ip)
                self.refused += 1
                self._report(scope, headers, api_key, client_ip, status, started_wall, started)
                return

        status_holder = [500]  # if the app raises before starting a response

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder[0] = message["status"]
            await send(message)

        scope.setdefault("state", {})
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self._report(scope, headers, api_key, client_ip, status_holder[0], started_wall,
                         started)

    # ---- pieces -----------------------------------------------------------------------
    def _api_key(self, headers: Headers) -> str | None:
        if self.key_header:
            value = headers.get(self.key_header)
            if value:
                return value.strip()
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        return None

    def _client_ip(self, scope: Scope, headers: Headers) -> str | None:
        peer = scope["client"][0] if scope.get("client") else None
        return self.addresses.resolve(peer, headers.get("x-forwarded-for"))

    async def _verdict(self, api_key: str, client_ip: str | None) -> dict[str, Any]:
        now = time.monotonic()
        cached = self.cache.get(api_key, client_ip, now)
        if cached is not None:
            return cached
        verdict = await self.client.acheck(api_key, client_ip)
        ttl = self._ttl(verdict)
        if ttl > 0:
            self.cache.put(api_key, client_ip, verdict, ttl, now)
        return verdict

    def _ttl(self, verdict: dict[str, Any]) -> float:
        """How long an answer may be reused: a refusal until it ends, an allowance for
        `cache_ttl_s`, not at all while a limit meters the key."""
        if verdict.get("allowed", True) or verdict.get("reason") == UNAVAILABLE:
            return 0.0 if under_limit(verdict) else self.cache_ttl_s
        retry = verdict.get("retry_after_s")
        return min(self.max_refusal_cache_s, float(retry)) if retry else \
            self.max_refusal_cache_s

    async def _refuse(self, send: Send, verdict: dict[str, Any],
                      client_ip: str | None) -> int:
        refusal = refusal_for(verdict, client_ip)
        assert refusal is not None  # only called for refused verdicts
        body = refusal.body_bytes()
        await send({"type": "http.response.start", "status": refusal.status,
                    "headers": refusal.asgi_headers(body)})
        await send({"type": "http.response.body", "body": body})
        return refusal.status

    def _report(self, scope: Scope, headers: Headers, api_key: str, client_ip: str | None,
                status: int, started_wall: float, started: float) -> None:
        event: dict[str, Any] = {
            "api_key": api_key,
            "timestamp": started_wall,
            "endpoint": scope.get("path", "/")[:256],
            "method": scope.get("method", "GET"),
            "status": status,
            "latency_ms": round((time.perf_counter() - started) * 1000.0, 3),
            "user_agent": headers.get("user-agent", "")[:2048],
        }
        if client_ip:
            event["source_ip"] = client_ip
        usage = (scope.get("state") or {}).get(USAGE_STATE_KEY)
        if isinstance(usage, dict):
            event.update({k: usage[k] for k in USAGE_FIELDS if usage.get(k) is not None})
        self.client.report(event)
