"""One retry policy for every outbound POST: the client's event batches and the alert sinks.

Built on tenacity rather than hand-written loops: capped exponential backoff with
jitter (so many gateways that lost keywatch at once do not come back in step), a
`Retry-After` from the other side respected up to the cap, and a stop event that cuts a
backoff short at shutdown instead of sleeping through it.

What is worth another attempt: a network error or timeout, 408, 425, 429 and any 5xx.
Any other answer is final: a 4xx means the request itself is wrong and sending it again
cannot succeed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import tenacity

RETRYABLE_STATUS = frozenset({408, 425, 429})


def retryable(status: int) -> bool:
    """Could the same request succeed later? (Overload, timeouts, server errors.)"""
    return status in RETRYABLE_STATUS or status >= 500


@dataclass(frozen=True)
class Backoff:
    """How many attempts, and how long to wait between them (seconds)."""

    attempts: int = 3
    initial_s: float = 0.2
    max_s: float = 5.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("attempts must be >= 1")

    def wait(self) -> tenacity.wait.wait_base:
        """Equal jitter: uniform in [d/2, d] for d = min(max_s, initial_s * 2**(n-1)),
        and at least the other side's `Retry-After` (still capped at max_s)."""
        half, half_max = self.initial_s / 2, self.max_s / 2
        jittered = (tenacity.wait_exponential(multiplier=half, max=half_max)
                    + tenacity.wait_random_exponential(multiplier=half, max=half_max))
        return _WaitWithRetryAfter(jittered, self.max_s)


class _WaitWithRetryAfter(tenacity.wait.wait_base):
    def __init__(self, base: tenacity.wait.wait_base, max_s: float) -> None:
        self.base, self.max_s = base, max_s

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        delay = self.base(retry_state)
        outcome = retry_state.outcome
        if outcome is not None and not outcome.failed:
            asked = retry_after_s(outcome.result())
            if asked is not None:
                delay = min(self.max_s, max(delay, asked))
        return delay


class _Interrupted(Exception):
    """The stop event was set while waiting between attempts."""


def send_with_retries(
    send: Callable[[], httpx.Response],
    backoff: Backoff,
    *,
    stop: threading.Event | None = None,
    on_error: Callable[[str], None] | None = None,
) -> httpx.Response | None:
    """Call `send` until it gets a final answer or the attempts run out.

    Returns the last response (a success, a final refusal, or the last retryable one), or
    None when the last attempt failed on the network. `on_error` hears about each failed
    attempt ("ConnectError", "HTTP 503"), for counters. Setting `stop` ends the wait
    between attempts at once and makes no further attempt.
    """
    last: list[httpx.Response | None] = [None]

    def attempt() -> httpx.Response:
        last[0] = None
        try:
            response = send()
        except httpx.HTTPError as exc:
            if on_error is not None:
                on_error(type(exc).__name__)
            raise
        last[0] = response
        if not response.is_success and on_error is not None:
            on_error(f"HTTP {response.status_code}")
        return response

    def sleep(seconds: float) -> None:
        if stop is None:
            time.sleep(seconds)
        elif stop.wait(seconds):
            raise _Interrupted

    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(backoff.attempts),
        wait=backoff.wait(),
        retry=(tenacity.retry_if_exception_type(httpx.HTTPError)
               | tenacity.retry_if_result(lambda r: retryable(r.status_code))),
        sleep=sleep,
        retry_error_callback=lambda state: last[0],
    )
    try:
        return retrying(attempt)
    except _Interrupted:
        return last[0]


def retry_after_s(response: httpx.Response) -> float | None:
    """The `Retry-After` header in seconds, if it is a number."""
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None
