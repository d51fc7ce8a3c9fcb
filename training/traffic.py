"""The shape of one request: endpoint, model, tokens, latency, status, address, client.

Every simulated event, legitimate or malicious, is drawn by `render()` from a
`RequestProfile`: who is calling (addresses, user agents), what they call (endpoint
and model mix) and how big their calls are (per-key log-normal token sizes). Tenants
own profiles; incidents copy a victim's profile and change only what the attacker
would change, so an attacker using the owner's user agent and models is one
`dataclasses.replace` away. Events live in columns (`Columns`, numpy arrays) so a
week of traffic for a hundred keys is generated in seconds.

Latency follows how LLM APIs behave: time to first token per model, plus prompt
prefill, plus generation time per completion token, plus the caller's network round
trip; errors carry no tokens and fail fast (401, 429) or slow (502, 504).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import numpy as np

ENDPOINTS = ("/v1/chat/completions", "/v1/embeddings", "/v1/completions", "/v1/models")
CHAT, EMBED, COMPLETE, LIST_MODELS = range(4)
METHODS = ("POST", "POST", "POST", "GET")


@dataclass(frozen=True)
class ModelSpec:
    """Serving characteristics of a model, for latency and token limits."""

    name: str
    ttft_ms: float
    ms_per_token: float
    context: int
    max_output: int


MODEL_SPECS = (
    ModelSpec("gpt-4o-mini", 300, 9, 128_000, 16_384),
    ModelSpec("gpt-4o", 450, 16, 128_000, 16_384),
    ModelSpec("claude-3-5-sonnet", 650, 17, 200_000, 8_192),
    ModelSpec("claude-3-5-haiku", 400, 10, 200_000, 8_192),
    ModelSpec("llama-3.1-70b", 350, 14, 128_000, 4_096),
    ModelSpec("llama-3.1-8b", 180, 5, 128_000, 4_096),
    ModelSpec("gpt-4-turbo", 600, 25, 128_000, 4_096),
    ModelSpec("o1-preview", 6_000, 30, 128_000, 32_768),
    ModelSpec("claude-3-opus", 1_100, 28, 200_000, 4_096),
    ModelSpec("gpt-3.5-turbo-instruct", 250, 7, 4_096, 4_096),
    ModelSpec("text-embedding-3-small", 60, 0, 8_191, 0),
    ModelSpec("text-embedding-3-large", 90, 0, 8_191, 0),
)
MODELS = tuple(m.name for m in MODEL_SPECS)
MODEL_INDEX = {name: i for i, name in enumerate(MODELS)}
_TTFT = np.array([m.ttft_ms for m in MODEL_SPECS])
_PER_TOKEN = np.array([m.ms_per_token for m in MODEL_SPECS])
_CONTEXT = np.array([m.context for m in MODEL_SPECS])
_MAX_OUT = np.array([max(m.max_output, 1) for m in MODEL_SPECS])

BENIGN_TAGS = (
    "flash_sale",
    "nightly_batch",
    "travel",
    "upstream_outage",
    "weekly_batch",
    "month_end_batch",
    "first_day",
    "ci_run",
    "migration",
    "launch",
)
"""Legitimate surprises, marked on the events they make (labels.jsonl `benign_tag`)."""
TAG_INDEX = {name: i for i, name in enumerate(BENIGN_TAGS)}

MS_PER_MINUTE = 60_000


class Vocab:
    """Interns strings (user agents, keys) as small integers for columnar storage."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self._index: dict[str, int] = {}

    def add(self, item: str) -> int:
        index = self._index.get(item)
        if index is None:
            index = len(self.items)
            self.items.append(item)
            self._index[item] = index
        return index

    def __len__(self) -> int:
        return len(self.items)


COLUMN_DTYPES: dict[str, type] = {
    "ts_ms": np.int64,
    "key": np.int32,
    "endpoint": np.int8,
    "model": np.int16,
    "status": np.int16,
    "prompt_tokens": np.int32,
    "completion_tokens": np.int32,
    "latency_ms": np.float64,
    "ip": np.uint32,
    "ua": np.int32,
    "incident": np.int16,
    "tag": np.int8,
}


@dataclass
class Columns:
    """A batch of events as parallel numpy arrays (model/incident/tag -1 = none)."""

    ts_ms: np.ndarray
    key: np.ndarray
    endpoint: np.ndarray
    model: np.ndarray
    status: np.ndarray
    prompt_tokens: np.ndarray
    completion_tokens: np.ndarray
    latency_ms: np.ndarray
    ip: np.ndarray
    ua: np.ndarray
    incident: np.ndarray
    tag: np.ndarray

    def __len__(self) -> int:
        return len(self.ts_ms)

    @classmethod
    def empty(cls) -> Columns:
        return cls(**{name: np.empty(0, dtype) for name, dtype in COLUMN_DTYPES.items()})

    @classmethod
    def concat(cls, parts: list[Columns]) -> Columns:
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls.empty()
        return cls(
            **{
                name: np.concatenate([getattr(p, name) for p in parts]).astype(dtype)
                for name, dtype in COLUMN_DTYPES.items()
            }
        )

    def take(self, order: np.ndarray) -> Columns:
        return Columns(**{name: getattr(self, name)[order] for name in COLUMN_DTYPES})


@dataclass
class RequestProfile:
    """How one caller's requests look. Probabilities need not be normalised."""

    ips: np.ndarray  # uint32 addresses
    ip_weights: np.ndarray
    uas: np.ndarray  # ua vocab indices
    ua_p: np.ndarray  # drawn per request, unless bound to the address by ip_ua
    endpoint_p: np.ndarray  # over ENDPOINTS
    chat_models: np.ndarray  # MODEL indices used for chat and completions
    chat_model_p: np.ndarray
    embedding_model: int
    prompt_median: np.ndarray  # per endpoint
    prompt_sigma: np.ndarray
    completion_median: np.ndarray  # per endpoint (0 for embeddings/list)
    completion_sigma: np.ndarray
    rtt_ms: float
    p_5xx: float = 0.005
    p_429: float = 0.004
    p_400: float = 0.002
    p_401: float = 0.0002
    ip_ua: np.ndarray | None = None  # ua index per address: one client per device/server
    ip_daily_churn: bool = False  # residential user bases: who is active changes daily
    fixed_prompt: int | None = None  # a stuck client sends the same request every time
    fixed_completion: int | None = None
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def model_names(self) -> set[str]:
        used = {
            MODELS[int(m)]
            for m, p in zip(self.chat_models, self.chat_model_p, strict=True)
            if p > 0
        }
        if self.endpoint_p[EMBED] > 0:
            used.add(MODELS[self.embedding_model])
        return used


def _norm(p: np.ndarray) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    return p / p.sum()


def render(
    profile: RequestProfile,
    ts_ms: np.ndarray,
    rng: np.random.Generator,
    *,
    key: int,
    incident: int = -1,
    tag: np.ndarray | int = -1,
    stress: np.ndarray | float = 1.0,
    outage: np.ndarray | float = 0.0,
    endpoint: int | None = None,
    model: int | None = None,
) -> Columns:
    """Draw one event per timestamp from `profile`.

    `stress` (per event or scalar) multiplies the 429/5xx rates: upstreams push back
    when a key, or the whole platform, is busy. `outage` (per event or scalar) is an
    extra probability of a 502/503/504 while an upstream provider is failing.
    `endpoint`/`model` pin the request type for every event (probes, loops, LLM-jacking).
    The draws happen in a fixed order (endpoint, who, model, size, status, latency), so a
    seed gives the same traffic.
    """
    n = len(ts_ms)
    ts_ms = np.asarray(ts_ms, dtype=np.int64)
    if endpoint is None:
        ep = rng.choice(len(ENDPOINTS), size=n, p=_norm(profile.endpoint_p)).astype(np.int8)
    else:
        ep = np.full(n, endpoint, dtype=np.int8)
    ips, uas = _who(profile, ts_ms, rng)
    models = _models(profile, ep, rng, model)
    m = np.where(models >= 0, models, 0)
    prompt, completion = _sizes(profile, ep, m, rng)
    status = _statuses(profile, ep, rng, stress, outage)
    latency = _latencies(profile, status, ep, m, prompt, completion, rng)
    failed = status != 200
    prompt[failed] = 0
    completion[failed] = 0
    return Columns(
        ts_ms=ts_ms,
        key=np.full(n, key, dtype=np.int32),
        endpoint=ep,
        model=models,
        status=status,
        prompt_tokens=prompt.astype(np.int32),
        completion_tokens=completion.astype(np.int32),
        latency_ms=np.round(latency, 1),
        ip=ips.astype(np.uint32),
        ua=uas.astype(np.int32),
        incident=np.full(n, incident, dtype=np.int16),
        tag=np.broadcast_to(np.asarray(tag, dtype=np.int8), (n,)).copy(),
    )


def _who(profile: RequestProfile, ts_ms: np.ndarray, rng: np.random.Generator
         ) -> tuple[np.ndarray, np.ndarray]:
    """Address by weight (optionally re-drawn per day), client bound to the address."""
    n = len(ts_ms)
    if profile.ip_daily_churn and n:
        ip_pick = np.empty(n, dtype=np.int64)
        day = ts_ms // (1440 * MS_PER_MINUTE)
        for d in np.unique(day):
            sel = day == d
            w = profile.ip_weights * rng.gamma(0.6, 1.0, size=len(profile.ips))
            ip_pick[sel] = rng.choice(len(profile.ips), size=int(sel.sum()), p=_norm(w))
    else:
        ip_pick = rng.choice(len(profile.ips), size=n, p=_norm(profile.ip_weights))
    if profile.ip_ua is not None:
        return profile.ips[ip_pick], profile.ip_ua[ip_pick]
    return profile.ips[ip_pick], rng.choice(profile.uas, size=n, p=_norm(profile.ua_p))


def _models(profile: RequestProfile, ep: np.ndarray, rng: np.random.Generator,
            model: int | None) -> np.ndarray:
    """The model per event, by endpoint (-1 for listing models)."""
    models = np.full(len(ep), -1, dtype=np.int16)
    if model is not None:
        models[:] = model
        models[ep == LIST_MODELS] = -1
        return models
    text = (ep == CHAT) | (ep == COMPLETE)
    models[text] = rng.choice(
        profile.chat_models, size=int(text.sum()), p=_norm(profile.chat_model_p)
    )
    models[ep == COMPLETE] = MODEL_INDEX["gpt-3.5-turbo-instruct"]
    models[ep == EMBED] = profile.embedding_model
    return models


def _sizes(profile: RequestProfile, ep: np.ndarray, m: np.ndarray, rng: np.random.Generator
           ) -> tuple[np.ndarray, np.ndarray]:
    """Per-endpoint log-normal prompt and completion tokens, clipped to the model's limits."""
    n = len(ep)
    mu_p = np.log(np.maximum(profile.prompt_median[ep], 1.0))
    prompt = np.exp(mu_p + profile.prompt_sigma[ep] * rng.standard_normal(n))
    mu_c = np.log(np.maximum(profile.completion_median[ep], 1.0))
    completion = np.exp(mu_c + profile.completion_sigma[ep] * rng.standard_normal(n))
    if profile.fixed_prompt is not None:
        prompt = np.full(n, float(profile.fixed_prompt))
    if profile.fixed_completion is not None:
        completion = profile.fixed_completion + rng.integers(0, 2, size=n).astype(float)
    completion = np.clip(np.rint(completion), 1, _MAX_OUT[m])
    prompt = np.clip(np.rint(prompt), 3, _CONTEXT[m] - completion)
    completion[(ep == EMBED) | (ep == LIST_MODELS)] = 0
    prompt[ep == LIST_MODELS] = 0
    return prompt, completion


def _statuses(profile: RequestProfile, ep: np.ndarray, rng: np.random.Generator,
              stress: np.ndarray | float, outage: np.ndarray | float) -> np.ndarray:
    """Ordinary failure rates, pushed up under stress, and an upstream's outage."""
    n = len(ep)
    stress = np.broadcast_to(np.asarray(stress, dtype=np.float64), (n,))
    u = rng.random(n)
    p429 = np.minimum(profile.p_429 * stress, 0.5)
    p5xx = np.minimum(profile.p_5xx * np.sqrt(stress), 0.2)
    status = np.full(n, 200, dtype=np.int16)
    cut1 = profile.p_401
    cut2 = cut1 + profile.p_400
    cut3 = cut2 + p429
    cut4 = cut3 + p5xx
    status[u < cut1] = 401
    status[(u >= cut1) & (u < cut2) & (ep != LIST_MODELS)] = 400
    status[(u >= cut2) & (u < cut3)] = 429
    five = (u >= cut3) & (u < cut4)
    status[five] = rng.choice(
        np.array([500, 502, 503, 504], dtype=np.int16),
        size=int(five.sum()),
        p=[0.3, 0.25, 0.3, 0.15],
    )
    down = rng.random(n) < np.broadcast_to(np.asarray(outage, dtype=np.float64), (n,))
    status[down] = rng.choice(
        np.array([502, 503, 504], dtype=np.int16), size=int(down.sum()), p=[0.3, 0.5, 0.2]
    )
    return status


def _latencies(profile: RequestProfile, status: np.ndarray, ep: np.ndarray, m: np.ndarray,
               prompt: np.ndarray, completion: np.ndarray, rng: np.random.Generator
               ) -> np.ndarray:
    """First token + prefill + generation + network, log-normal noise; failures answer
    fast, except timeouts."""
    n = len(ep)
    latency = (
        _TTFT[m] * rng.lognormal(0.0, 0.35, n)
        + prompt * 0.03
        + completion * _PER_TOKEN[m] * rng.lognormal(0.0, 0.15, n)
        + profile.rtt_ms * rng.lognormal(0.0, 0.25, n)
    )
    listing = ep == LIST_MODELS
    latency[listing] = profile.rtt_ms + rng.lognormal(np.log(35.0), 0.3, int(listing.sum()))
    fast = (status == 401) | (status == 429) | (status == 400)
    latency[fast] = profile.rtt_ms + rng.lognormal(np.log(25.0), 0.4, int(fast.sum()))
    for code, median, sigma in ((500, 400.0, 0.8), (502, 3_000.0, 0.9), (503, 120.0, 0.6)):
        sel = status == code
        latency[sel] = profile.rtt_ms + rng.lognormal(np.log(median), sigma, int(sel.sum()))
    timeout = status == 504
    latency[timeout] = rng.choice([60_000.0, 120_000.0], size=int(timeout.sum())) + rng.uniform(
        0, 400, int(timeout.sum())
    )
    return latency


def poisson_times(
    rng: np.random.Generator, start_ms: int, lam_per_minute: np.ndarray
) -> np.ndarray:
    """Event times (ms) of a Poisson process with piecewise-constant per-minute rate."""
    counts = rng.poisson(np.maximum(lam_per_minute, 0.0))
    minutes = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    offsets = rng.integers(0, MS_PER_MINUTE, size=len(minutes))
    return np.sort(start_ms + minutes * MS_PER_MINUTE + offsets)


def metronome_times(
    rng: np.random.Generator, start_ms: int, interval_s: float, count: int, jitter: float
) -> np.ndarray:
    """`count` requests sent every `interval_s` seconds with relative jitter: clients
    on a timer or a rate limiter, such as batch workers and stuck retry loops."""
    steps = interval_s * 1000.0 * (1.0 + jitter * rng.standard_normal(count))
    return start_ms + np.cumsum(np.maximum(steps, 1.0)).astype(np.int64)


@dataclass(frozen=True)
class Clock:
    """The simulated span on a one-minute grid, and local time for any time zone."""

    start: datetime
    days: int

    @property
    def start_ms(self) -> int:
        return int(self.start.timestamp() * 1000)

    @property
    def minutes(self) -> int:
        return self.days * 1440

    @property
    def end_ms(self) -> int:
        return self.start_ms + self.minutes * MS_PER_MINUTE

    def ms_at_minute(self, minute: int | np.ndarray) -> int | np.ndarray:
        return self.start_ms + np.asarray(minute, dtype=np.int64) * MS_PER_MINUTE

    def local(self, tz: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per grid minute: local hour (float), local weekday (Mon=0), local day number
        (days since the Unix epoch in local time). DST changes are honoured per hour."""
        return _local_grid(self.start, self.days, tz)


_LOCAL_CACHE: dict[tuple[datetime, int, str], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}


def _local_grid(start: datetime, days: int, tz: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    cache_key = (start, days, tz)
    if cache_key in _LOCAL_CACHE:
        return _LOCAL_CACHE[cache_key]
    zone = ZoneInfo(tz)
    hours = days * 24
    offsets_min = np.array(
        [
            (start + timedelta(hours=h)).astimezone(zone).utcoffset().total_seconds() // 60
            for h in range(hours)
        ],
        dtype=np.int64,
    )
    minute = np.arange(days * 1440, dtype=np.int64)
    epoch_minutes = int(start.astimezone(UTC).timestamp() // 60)
    local_abs = epoch_minutes + minute + np.repeat(offsets_min, 60)
    local_day = local_abs // 1440
    hour = (local_abs % 1440) / 60.0
    weekday = (local_day + 3) % 7  # 1970-01-01 was a Thursday
    result = (hour, weekday, local_day)
    if len(_LOCAL_CACHE) > 256:
        _LOCAL_CACHE.clear()
    _LOCAL_CACHE[cache_key] = result
    return result
