"""Turn a refused `/v1/check` answer into the HTTP answer a caller can act on.

The body is OpenAI's error shape, `{"error": {"message", "type", "param", "code"}}`, so
the official SDKs (and most tools built on them) raise the matching error with a message
a person can read, instead of a bare "Error code: 429". The message says what is refused
(the key, the address, or a throttle on the key) and until when; it never repeats the
key, and it does not say which detection rule fired.

| refused             | status | code                    | Retry-After | x-should-retry |
|---------------------|--------|-------------------------|-------------|----------------|
| throttle (a limit)  | 429    | `rate_limit_exceeded`   | yes         | only if <= 60 s |
| address, temporary  | 429    | `rate_limit_exceeded`   | yes         | false          |
| address, permanent  | 403    | `address_blocked`       | no          | false          |
| key, temporary      | 403    | `api_key_blocked`       | yes         | false          |
| key, permanent      | 403    | `api_key_blocked`       | no          | false          |
| keywatch down, fail-closed | 503 | `keywatch_unavailable` | 1       | (SDK default)  |

`x-should-retry: false` tells the OpenAI SDKs not to retry on their own: retrying a
ban within seconds only adds refused calls. A short throttle is left to the SDK, which
waits for `Retry-After` (up to 60 s) and tries again.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

UNAVAILABLE = "keywatch_unavailable"
SDK_MAX_RETRY_AFTER_S = 60


@dataclass(frozen=True)
class Refusal:
    """Status, headers and OpenAI-shaped body of one refusal."""

    status: int
    what: str  # "key", "address", "throttle" or "unavailable"
    message: str
    code: str
    type: str
    retry_after_s: int | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": None,
                          "code": self.code}}

    def body_bytes(self) -> bytes:
        return json.dumps(self.body()).encode()

    def asgi_headers(self, body: bytes) -> list[tuple[bytes, bytes]]:
        pairs = {"content-type": "application/json", "content-length": str(len(body)),
                 **self.headers}
        return [(k.encode(), v.encode()) for k, v in pairs.items()]


def refused_what(verdict: dict[str, Any]) -> str:
    """What a refused verdict refuses: "key", "address", "throttle" or "unavailable".

    Uses keywatch's structured fields when the answer has them (`refused`, or `scope` and
    `kind`), else reads the reason, which starts with the subject ("key banned until …",
    "address banned …", "key throttled …").
    """
    reason = str(verdict.get("reason") or "").lower()
    if reason == UNAVAILABLE:
        return "unavailable"
    refused = verdict.get("refused")
    if refused in ("key", "address", "throttle"):
        return str(refused)
    kind = str(verdict.get("kind") or "").lower()
    if kind in ("throttle", "limit") or any(w in reason for w in ("throttl", "limit", "rate")):
        return "throttle"
    scope = str(verdict.get("scope") or "").lower()
    if scope in ("ip", "address", "network") or reason.startswith(("address", "ip ",
                                                                    "network")):
        return "address"
    return "key"


def _until(verdict: dict[str, Any], retry: int | None, now: float) -> str | None:
    until = verdict.get("until")
    if isinstance(until, int | float):
        return _iso(float(until))
    if isinstance(until, str) and until:
        return until
    return _iso(now + retry) if retry else None


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def refusal_for(verdict: dict[str, Any], source_ip: str | None = None,
                now: float | None = None) -> Refusal | None:
    """The refusal for a `/v1/check` answer, or None when the call may go ahead."""
    if verdict.get("allowed", True):
        return None
    now = time.time() if now is None else now
    raw_retry = verdict.get("retry_after_s")
    retry = max(1, math.ceil(float(raw_retry))) if raw_retry else None
    what = refused_what(verdict)
    until = _until(verdict, retry, now)
    when = f"until {until}" if until else "permanently"
    wait = f"; retry after {retry} s" if retry else ""
    headers = {"retry-after": str(retry)} if retry else {}
    if what == "unavailable":
        return Refusal(503, what, "The API key could not be checked and this gateway does "
                       "not serve unchecked calls; try again shortly.", UNAVAILABLE,
                       "server_error", 1, {"retry-after": "1"})
    if what == "throttle":
        if retry is None or retry > SDK_MAX_RETRY_AFTER_S:
            headers["x-should-retry"] = "false"
        return Refusal(429, what, f"Rate limit exceeded: this API key is throttled {when} "
                       f"and is over its limit now{wait}.", "rate_limit_exceeded",
                       "requests", retry, headers)
    headers["x-should-retry"] = "false"
    if what == "address":
        address = f"address {source_ip}" if source_ip else "your address"
        message = f"Calls from {address} are blocked {when}{wait}."
        if retry:
            return Refusal(429, what, message, "rate_limit_exceeded", "requests", retry,
                           headers)
        return Refusal(403, what, message, "address_blocked", "permission_denied", None,
                       headers)
    return Refusal(403, what, f"This API key is blocked {when}{wait}.", "api_key_blocked",
                   "permission_denied", retry, headers)
