"""The gateway side: report every call to keywatch without ever slowing the call down.

`KeywatchClient.report(event)` appends to a bounded in-memory buffer and returns; a
daemon thread posts batches to `POST /v1/events:batch` every `flush_interval_s` (or as
soon as `batch_size` events are waiting). If keywatch is unreachable the batch is put
back and retried with capped exponential backoff, so a short outage loses nothing; in a
long one the buffer fills and the *oldest* events are dropped and counted (recent
traffic matters most to detection). A batch keywatch refuses as invalid (4xx) is dropped
and counted, since sending it again cannot succeed.

Every event gets an `event_id` (a uuid4) when it is queued, so a batch sent again after
a lost answer is recognised by keywatch and not counted twice. Retries go through
`keywatch_gateway.retry` (tenacity), the policy the alert sinks use too.

`check(api_key, source_ip)` is the pre-flight question "may this key call now?"
(`POST /v1/check` → `{key_id, allowed, reason, retry_after_s}`), with a short timeout
and, by default, fail-open: when keywatch cannot answer, the call is allowed and the
answer says why (`reason: "keywatch_unavailable"`). `enforce(api_key, source_ip)` asks
the same and returns the `Refusal` to send (429 + `Retry-After` for a throttle or a
temporary address ban, 403 for a banned key), or None when the call may go ahead.

The raw key goes to keywatch (over TLS in production), which hashes it on arrival; the
client never logs it and keeps no copy beyond the unsent buffer.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

import httpx

from keywatch_gateway.refusal import Refusal, refusal_for
from keywatch_gateway.retry import Backoff, retryable, send_with_retries

log = logging.getLogger("keywatch.client")

BATCH_PATH = "/v1/events:batch"
CHECK_PATH = "/v1/check"


class KeywatchClient:
    """Non-blocking event reporter and pre-flight checker for one keywatch service."""

    def __init__(
        self,
        base_url: str,
        *,
        ingest_token: str | None = None,
        batch_size: int = 100,
        flush_interval_s: float = 0.5,
        max_buffer: int = 10_000,
        timeout_s: float = 2.0,
        max_attempts: int = 3,
        backoff_s: float = 0.2,
        max_backoff_s: float = 5.0,
        check_timeout_s: float = 0.3,
        fail_open: bool = True,
        on_decisions: Callable[[list[dict[str, Any]]], None] | None = None,
    ) -> None:
        if batch_size < 1 or max_buffer < 1:
            raise ValueError("batch_size and max_buffer must be >= 1")
        self.base_url = base_url.rstrip("/")
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.max_buffer = max_buffer
        self.timeout_s = timeout_s
        self.max_attempts = max(1, max_attempts)
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.check_timeout_s = check_timeout_s
        self.fail_open = fail_open
        self.on_decisions = on_decisions
        self._headers = {"user-agent": "keywatch-client/0.1"}
        if ingest_token:
            self._headers["authorization"] = f"Bearer {ingest_token}"
        self._buffer: deque[dict[str, Any]] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        self._inflight = 0
        self._check_http: httpx.Client | None = None
        self._async_http: dict[int, httpx.AsyncClient] = {}
        # counters (read them through `stats()`)
        self.reported = 0
        self.sent = 0
        self.dropped_overflow = 0
        self.dropped_rejected = 0
        self.dropped_at_close = 0
        self.failed_posts = 0
        self.checks = 0
        self.check_errors = 0
        self.last_error: str | None = None

    def __repr__(self) -> str:  # the ingest token stays out of reprs and logs
        return f"KeywatchClient({self.base_url!r})"

    # ---- reporting --------------------------------------------------------------------
    def report(self, event: dict[str, Any]) -> bool:
        """Queue one event (the `POST /v1/events` shape); never blocks, never raises.

        Stamps `timestamp` with the current time if missing, so the event keeps the time
        of the call rather than the time the batch happens to be sent. Returns False if
        the client is closed; an overflow drops the oldest buffered event instead.
        """
        if self._closing.is_set():
            with self._lock:
                self.dropped_at_close += 1
            return False
        if "timestamp" not in event:
            event = {**event, "timestamp": time.time()}
        if not event.get("event_id"):  # so a retried batch is applied once
            event = {**event, "event_id": uuid.uuid4().hex}
        with self._lock:
            if len(self._buffer) >= self.max_buffer:
                self._buffer.popleft()
                self.dropped_overflow += 1
            self._buffer.append(event)
            self.reported += 1
            full = len(self._buffer) >= self.batch_size
        self._ensure_started()
        if full:
            self._wake.set()
        return True

    def _ensure_started(self) -> None:
        if self._thread is not None:
            return
        with self._lock:
            if self._thread is None and not self._closing.is_set():
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name="keywatch-client")
                self._thread.start()

    def _take(self) -> list[dict[str, Any]]:
        with self._lock:
            n = min(self.batch_size, len(self._buffer))
            batch = [self._buffer.popleft() for _ in range(n)]
            self._inflight = n
            return batch

    def _requeue(self, batch: list[dict[str, Any]]) -> None:
        with self._lock:
            self._inflight = 0
            room = self.max_buffer - len(self._buffer)
            if room < len(batch):  # keep the newest: drop from the front of the old batch
                self.dropped_overflow += len(batch) - max(room, 0)
                batch = batch[len(batch) - max(room, 0):]
            self._buffer.extendleft(reversed(batch))

    def _run(self) -> None:
        down_backoff = self.backoff_s
        with httpx.Client(base_url=self.base_url, timeout=self.timeout_s,
                          headers=self._headers) as http:
            while True:
                self._wake.wait(self.flush_interval_s)
                self._wake.clear()
                closing = self._closing.is_set()
                while True:
                    batch = self._take()
                    if not batch:
                        break
                    if self._post(http, batch, closing=closing):
                        down_backoff = self.backoff_s
                        with self._lock:
                            self._inflight = 0
                        continue
                    self._requeue(batch)
                    if closing:
                        return  # keywatch is down at shutdown: close() counts the rest
                    # keywatch is down: wait (interruptibly) before trying again
                    if self._closing.wait(down_backoff * (0.5 + random.random() / 2)):
                        closing = True
                    down_backoff = min(self.max_backoff_s, down_backoff * 2)
                    break
                if closing and not self._buffer:
                    return

    def _post(self, http: httpx.Client, batch: list[dict[str, Any]], *, closing: bool) -> bool:
        """True when the batch is settled (accepted, or refused for good)."""
        backoff = Backoff(1 if closing else self.max_attempts, self.backoff_s,
                          self.max_backoff_s)
        response = send_with_retries(lambda: http.post(BATCH_PATH, json=batch), backoff,
                                     stop=self._closing, on_error=self._failed)
        if response is None or retryable(response.status_code):
            return False
        if response.is_success:
            with self._lock:
                self.sent += len(batch)
            self._deliver_decisions(response)
            return True
        with self._lock:  # refused as invalid: sending it again cannot succeed
            self.dropped_rejected += len(batch)
        log.warning("keywatch refused a batch of %d events (HTTP %d): %s",
                    len(batch), response.status_code, _error_text(response))
        return True

    def _failed(self, error: str) -> None:
        with self._lock:
            self.failed_posts += 1
            self.last_error = error

    def _deliver_decisions(self, response: httpx.Response) -> None:
        if self.on_decisions is None:
            return
        try:
            self.on_decisions(response.json())
        except Exception:  # the callback is the caller's code; keep the reporter alive
            log.exception("on_decisions callback failed")

    def flush(self, timeout: float = 5.0) -> bool:
        """Send everything buffered now; True if the buffer drained within `timeout`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                idle = not self._buffer and not self._inflight
            if idle:
                return True
            self._ensure_started()
            self._wake.set()
            time.sleep(0.005)
        return False

    def close(self, timeout: float = 5.0) -> None:
        """Send what is buffered (one attempt per batch, no backoff) for up to `timeout`
        seconds, then stop; whatever is left is counted in `dropped_at_close`."""
        self._closing.set()
        self._wake.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        with self._lock:
            left = len(self._buffer)
            self._buffer.clear()
            self.dropped_at_close += left
        if left:
            log.warning("keywatch client closed with %d unsent events", left)
        if self._check_http is not None:
            self._check_http.close()
            self._check_http = None

    # ---- pre-flight check -------------------------------------------------------------
    def check(self, api_key: str, source_ip: str | None = None) -> dict[str, Any]:
        """`{key_id, allowed, reason, retry_after_s}` from keywatch, or the fail-open
        (or fail-closed) answer if it does not reply within `check_timeout_s`."""
        if self._check_http is None:
            self._check_http = httpx.Client(base_url=self.base_url,
                                            timeout=self.check_timeout_s,
                                            headers=self._headers)
        self.checks += 1
        try:
            response = self._check_http.post(CHECK_PATH, json=_check_body(api_key, source_ip))
        except httpx.HTTPError as exc:
            return self._unavailable(type(exc).__name__)
        return self._check_result(response)

    async def acheck(self, api_key: str, source_ip: str | None = None) -> dict[str, Any]:
        """`check` for async code (one `httpx.AsyncClient` per event loop)."""
        loop_id = id(asyncio.get_running_loop())
        http = self._async_http.get(loop_id)
        if http is None:
            http = self._async_http[loop_id] = httpx.AsyncClient(
                base_url=self.base_url, timeout=self.check_timeout_s, headers=self._headers)
        self.checks += 1
        try:
            response = await http.post(CHECK_PATH, json=_check_body(api_key, source_ip))
        except httpx.HTTPError as exc:
            return self._unavailable(type(exc).__name__)
        return self._check_result(response)

    async def aclose(self) -> None:
        """Close the async check client of the running loop, then `close()`."""
        http = self._async_http.pop(id(asyncio.get_running_loop()), None)
        if http is not None:
            await http.aclose()
        await asyncio.to_thread(self.close)

    def enforce(self, api_key: str, source_ip: str | None = None) -> Refusal | None:
        """`check`, as the answer to send: a `Refusal` (429 + `Retry-After` for a throttle
        or a temporary address ban, 403 for a banned key), or None to go ahead."""
        return refusal_for(self.check(api_key, source_ip), source_ip)

    async def aenforce(self, api_key: str, source_ip: str | None = None) -> Refusal | None:
        """`enforce` for async code."""
        return refusal_for(await self.acheck(api_key, source_ip), source_ip)

    def _check_result(self, response: httpx.Response) -> dict[str, Any]:
        if response.status_code != 200:
            return self._unavailable(f"HTTP {response.status_code}")
        try:
            body = response.json()
        except ValueError:
            return self._unavailable("invalid JSON")
        body.setdefault("allowed", True)
        return body

    def _unavailable(self, error: str) -> dict[str, Any]:
        with self._lock:
            self.check_errors += 1
            self.last_error = error
        return {"key_id": None, "allowed": self.fail_open, "reason": "keywatch_unavailable",
                "retry_after_s": None, "error": error}

    # ---- introspection ----------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"reported": self.reported, "sent": self.sent,
                    "buffered": len(self._buffer) + self._inflight,
                    "dropped_overflow": self.dropped_overflow,
                    "dropped_rejected": self.dropped_rejected,
                    "dropped_at_close": self.dropped_at_close,
                    "failed_posts": self.failed_posts, "checks": self.checks,
                    "check_errors": self.check_errors,
                    "last_error": self.last_error}


def _check_body(api_key: str, source_ip: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"api_key": api_key}
    if source_ip:
        body["source_ip"] = source_ip
    return body


def _error_text(response: httpx.Response) -> str:
    try:
        body = response.json()
        return str(body.get("error", ""))[:300] if isinstance(body, dict) else ""
    except ValueError:
        return response.text[:300]
