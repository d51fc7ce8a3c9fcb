"""The public event contract: what a gateway reports for every call made with a key.

Validation lives here, at the edge, so that everything behind it (features, models,
rules) can trust its input. A bad event is refused whole with a message that names
the field; unknown fields are ignored so that gateways can send more than we read.
"""

from __future__ import annotations

import ipaddress
import math
import time
from datetime import UTC, datetime
from typing import Annotated, Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_FUTURE_SKEW_S = 24 * 3600
"""Events stamped more than a day in the future are refused: clocks are never that wrong."""

MIN_EVENT_TIME = datetime(2000, 1, 1, tzinfo=UTC).timestamp()
MAX_EVENT_TIME = datetime(2100, 1, 1, tzinfo=UTC).timestamp()
"""The documented range of event times, whatever the clock: 2000-01-01 to 2100-01-01 UTC.
A time outside it is a unit mistake (milliseconds sent as seconds) or a zeroed field, never
a call made with a key; accepting it would move a key's windows to 1970 or past 2100."""

MAX_JSON_DEPTH = 32
"""Deepest nesting of arrays and objects accepted in any JSON we read from outside (an event
is two levels deep; a batch three). A parser that recurses must never meet 10,000 `[`."""

MAX_BATCH_EVENTS = 1000
"""Largest batch accepted by `POST /v1/events:batch`."""

ShortStr = Annotated[str, Field(max_length=256)]
UserAgentStr = Annotated[str, Field(max_length=2048)]


def parse_timestamp(value: Any, *, now: float | None = None) -> float:
    """Turn an RFC 3339 string or epoch seconds into epoch seconds (UTC).

    Naive RFC 3339 strings are read as UTC. Raises ValueError with a readable reason.
    """
    if value is None:
        return time.time() if now is None else now
    if isinstance(value, bool):
        raise ValueError("timestamp must be an RFC 3339 string or epoch seconds, not a boolean")
    if isinstance(value, int | float):
        ts = float(value)
    elif isinstance(value, datetime):
        ts = (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()
    elif isinstance(value, str):
        text = value.strip()
        try:
            ts = float(text)
        except ValueError:
            try:
                parsed = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
            except ValueError:
                raise ValueError(
                    f"timestamp {value!r} is neither RFC 3339 nor epoch seconds"
                ) from None
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=UTC)
            ts = parsed.timestamp()
    else:
        raise ValueError("timestamp must be an RFC 3339 string or epoch seconds")
    if not math.isfinite(ts) or ts < 0:
        raise ValueError("timestamp must be a finite, non-negative time")
    if ts > MAX_EVENT_TIME * 10:
        raise ValueError("timestamp is past the year 5000: milliseconds? send epoch seconds")
    reference = time.time() if now is None else now
    if ts > reference + MAX_FUTURE_SKEW_S:
        raise ValueError("timestamp is more than a day in the future")
    return ts


def check_event_time(ts: float) -> float:
    """`ts` if it lies in the documented range of event times, else ValueError saying so."""
    if ts < MIN_EVENT_TIME:
        raise ValueError("timestamp is before 2000-01-01: event times are accepted from "
                         "2000-01-01 to 2100-01-01 UTC")
    if ts >= MAX_EVENT_TIME:
        hint = " (milliseconds? send seconds)" if ts > MAX_EVENT_TIME * 100 else ""
        raise ValueError("timestamp is after 2100-01-01: event times are accepted from "
                         f"2000-01-01 to 2100-01-01 UTC{hint}")
    return ts


class Event(BaseModel):
    """One call made with an API key, as reported by the gateway.

    `timestamp` is normalised to epoch seconds (float, UTC). The raw `api_key` is only
    ever used to derive the HMAC `key_id`; it is excluded from every dump of the model.

    Types are strict: `"status": "404"` or `"tokens": true` is refused, not coerced, since a
    gateway that sends strings for numbers is misconfigured and its numbers cannot be
    trusted (an int is accepted where a float is expected). Every string has a length limit.
    """

    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True, frozen=True,
                              strict=True)

    api_key: str = Field(min_length=1, max_length=512, exclude=True, repr=False)
    timestamp: float = Field(default_factory=time.time)
    endpoint: ShortStr = "/"
    method: Annotated[str, Field(max_length=16)] = "POST"
    status: int = Field(default=200, ge=100, le=599)
    tokens: int = Field(default=0, ge=0, le=100_000_000)
    prompt_tokens: int | None = Field(default=None, ge=0, le=100_000_000)
    completion_tokens: int | None = Field(default=None, ge=0, le=100_000_000)
    latency_ms: float = Field(default=0.0, ge=0.0, le=86_400_000.0, allow_inf_nan=False)
    source_ip: str | None = Field(default=None, max_length=64)
    user_agent: UserAgentStr = ""
    model: ShortStr | None = None
    country: Annotated[str, Field(min_length=2, max_length=2)] | None = None
    asn: ShortStr | None = None
    lat: float | None = Field(default=None, ge=-90.0, le=90.0, allow_inf_nan=False)
    lon: float | None = Field(default=None, ge=-180.0, le=180.0, allow_inf_nan=False)
    event_id: ShortStr | None = None

    @field_validator("timestamp", mode="before")
    @classmethod
    def _parse_timestamp(cls, value: Any) -> float:
        return check_event_time(parse_timestamp(value))

    @field_validator("source_ip")
    @classmethod
    def _check_ip(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            # the value is not repeated back: a misplaced credential must not be echoed
            raise ValueError("source_ip is not an IPv4 or IPv6 address") from None

    @field_validator("country")
    @classmethod
    def _upper_country(cls, value: str | None) -> str | None:
        return value.upper() if value else value

    @field_validator("method")
    @classmethod
    def _upper_method(cls, value: str) -> str:
        return value.upper()

    @field_validator("asn", mode="before")
    @classmethod
    def _asn_to_str(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @model_validator(mode="after")
    def _fill_tokens(self) -> Event:
        if self.tokens == 0 and (self.prompt_tokens or self.completion_tokens):
            object.__setattr__(
                self, "tokens", (self.prompt_tokens or 0) + (self.completion_tokens or 0)
            )
        if (self.lat is None) != (self.lon is None):
            raise ValueError("lat and lon must be given together")
        return self

    @property
    def is_auth_failure(self) -> bool:
        return self.status in (401, 403)

    @property
    def is_failure(self) -> bool:
        return self.status >= 400

    @property
    def is_client_failure(self) -> bool:
        """A failure the caller caused (4xx: a bad request, refused credentials, a rate
        limit). Server errors (5xx) are the provider's: an upstream outage fails every key
        at once and says nothing about any one of them, so they never count against a key."""
        return 400 <= self.status < 500


class EventBatch(BaseModel):
    """A list of events scored in input order; refused whole if any event is bad."""

    model_config = ConfigDict(extra="ignore")

    events: list[Event] = Field(min_length=1, max_length=MAX_BATCH_EVENTS)


class JsonRefused(ValueError):
    """Untrusted JSON refused before anything was done with it; the message says why."""


def load_json(raw: bytes | str, *, max_bytes: int | None = None,
              max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse untrusted JSON with size and depth limits; raise `JsonRefused` naming the problem.

    orjson never recurses past 1,024 levels (so a stream entry of nested `[` cannot crash a
    worker with RecursionError, as `json.loads` did), and the parsed value is then walked
    without recursion to hold it to `max_depth`. NaN and Infinity are not JSON and are
    refused; so is text that is not UTF-8.
    """
    if max_bytes is not None and len(raw) > max_bytes:
        raise JsonRefused(f"JSON of {len(raw)} bytes is over the limit of {max_bytes}")
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if "depth" in str(exc) or "allocate" in str(exc):  # orjson's stack is full
            raise JsonRefused(f"JSON nested deeper than {max_depth} levels") from None
        raise JsonRefused(f"not valid JSON: {exc}") from None
    check_depth(value, max_depth)
    return value


def check_depth(value: Any, max_depth: int = MAX_JSON_DEPTH) -> None:
    """Raise `JsonRefused` if lists and dicts in `value` nest deeper than `max_depth`."""
    if type(value) is not dict and type(value) is not list:
        return
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > max_depth:
            raise JsonRefused(f"JSON nested deeper than {max_depth} levels")
        children = node.values() if type(node) is dict else node
        for child in children:
            if type(child) is dict or type(child) is list:
                stack.append((child, depth + 1))


def event_time_iso(ts: float) -> str:
    """Epoch seconds as an RFC 3339 UTC string with a `Z` suffix."""
    return datetime.fromtimestamp(ts, tz=UTC).isoformat().replace("+00:00", "Z")
