"""The legitimate population: who owns the keys and how they use them.

Four kinds of tenant, because they stress a detector in different ways:

- `backend_service`: a server-side integration behind 2-6 NAT addresses in one cloud
  region, one SDK user agent, a business-hours curve in the company's time zone.
- `batch_job`: a backend that also runs a nightly job at the same local time every
  night, hammering the API for ~30 minutes at a rate-limited, metronomic pace many
  times its daytime rate. Legitimate, and it looks like a runaway loop or a burst.
- `mobile_app`: a key shipped in an app, used from hundreds of residential and
  mobile-carrier addresses in one country, one user agent per device, evening peaks
  and busier weekends; who is active changes from day to day.
- `developer`: a person in office hours, in sessions, from an office address (or home,
  evenings, with a DHCP change of address mid-week), with curl/Postman/SDK/browser
  clients and several models. One developer flies to another continent mid-week: a
  gap of several hours, then traffic from the destination (tagged `travel`).

Each key also has an `archetype` (`ARCHETYPES`), finer than its kind: `batch_job` keys
run nightly, weekly or month-end jobs (`BATCH_RANGES`), developers may travel, and the
surprising archetypes of `training.archetypes` (new keys, CI runners of their own kind
`ci_runner`, region migrations, app launches) are backends and apps with a twist. Every
archetype draws its parameters from ranges, and a seed's `Perturbation` scales them.

Rates are inhomogeneous Poisson processes on a one-minute grid: a diurnal and weekly
curve in each key's own time zone, times a slowly wandering AR(1) log-normal factor
and a per-day factor, so no two days look alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from training.networks import (
    CLOUD_HOME,
    COUNTRIES,
    IpBlock,
    blocks_for,
    distance_km,
    sample_ips,
)
from training.perturb import Perturbation
from training.traffic import (
    CHAT,
    COMPLETE,
    EMBED,
    ENDPOINTS,
    LIST_MODELS,
    MODEL_INDEX,
    MS_PER_MINUTE,
    TAG_INDEX,
    Clock,
    Columns,
    RequestProfile,
    Vocab,
    metronome_times,
    poisson_times,
    render,
)

TENANT_KINDS = ("backend_service", "batch_job", "mobile_app", "developer", "ci_runner")

COUNTRY_WEIGHTS = {
    "US": 28,
    "GB": 8,
    "DE": 9,
    "FR": 5,
    "NL": 3,
    "ES": 3,
    "IT": 3,
    "SE": 2,
    "PL": 2,
    "CA": 4,
    "BR": 5,
    "MX": 3,
    "IN": 8,
    "JP": 5,
    "KR": 3,
    "SG": 3,
    "ID": 2,
    "AU": 4,
    "ZA": 2,
}

CHAT_MODEL_WEIGHTS = {
    "gpt-4o-mini": 0.34,
    "gpt-4o": 0.2,
    "claude-3-5-sonnet": 0.15,
    "claude-3-5-haiku": 0.1,
    "llama-3.1-70b": 0.1,
    "llama-3.1-8b": 0.06,
    "gpt-4-turbo": 0.03,
    "o1-preview": 0.02,
}
"""Legitimate chat-model popularity. claude-3-opus is deliberately absent: it is the
expensive model LLM-jacking crews go for, and no tenant here has a use for it."""

SDK_UAS = (
    "openai-python/1.54.3",
    "openai-python/1.52.2",
    "OpenAI/Python 1.54.4",
    "OpenAI/JS 4.71.1",
    "langchain-openai/0.2.9 openai-python/1.54.3",
    "python-httpx/0.27.2",
    "Go-http-client/2.0",
    "okhttp/4.12.0",
    "Apache-HttpClient/5.3.1 (Java/21.0.5)",
    "axios/1.7.7",
    "ruby-openai/7.3.1",
    "litellm/1.52.6",
)
BATCH_UAS = (
    "python-requests/2.32.3",
    "openai-python/1.54.3",
    "aiohttp/3.10.10",
    "Go-http-client/1.1",
    "Apache-Airflow/2.10.3 python-requests/2.32.3",
)
DEV_UAS = (
    "curl/8.5.0",
    "curl/8.7.1",
    "PostmanRuntime/7.42.0",
    "python-requests/2.32.3",
    "openai-python/1.54.3",
    "OpenAI/JS 4.71.1",
    "insomnia/10.1.1",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/130.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:132.0) Gecko/20100101 Firefox/132.0",
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/130.0.0.0 Safari/537.36",
)
APP_NAMES = (
    "ShopMate",
    "LingoLeap",
    "RecipeBox",
    "FitCoach",
    "TripPal",
    "NoteGenie",
    "StudyBuddy",
    "PetPal",
    "BudgetBee",
    "StoryTime",
    "MediMinder",
    "HomeFix",
    "GardenGuru",
    "QuizWhiz",
)
ANDROID_SHARE = {"US": 0.45, "JP": 0.35, "GB": 0.5, "AU": 0.45, "CA": 0.45, "SE": 0.5}
"""Android share of an app's installs by country (default 0.75: Android dominates
elsewhere, notably India, Indonesia and Brazil)."""

RTT_BY_NETWORK = {"cloud": 12.0, "hosting": 25.0, "residential": 45.0, "mobile": 85.0}
RTT_BY_CONTINENT = {"NA": 1.0, "EU": 2.5, "SA": 3.0, "AS": 4.0, "OC": 4.5, "AF": 4.0}


def network_rtt(network: str, country: str) -> float:
    """Round trip from a caller to the API (hosted in North America)."""
    return RTT_BY_NETWORK[network] + 18.0 * RTT_BY_CONTINENT[COUNTRIES[country].continent]


@dataclass
class BatchJob:
    """A scheduled job: local start time, request interval and size, and when it runs:
    `nightly` every night, `weekly` on `weekday` (Mon=0), `month_end` on the month's
    last day."""

    local_hour: float
    interval_s: float
    minutes: float
    workers: int
    profile: int  # index into Tenant.profiles
    period: str = "nightly"
    weekday: int = -1

    def runs_on(self, weekday: int, local_day: int) -> bool:
        """Whether the job runs on this local day (days since the epoch)."""
        if self.period == "weekly":
            return weekday == self.weekday
        if self.period == "month_end":
            tomorrow = np.datetime64(int(local_day) + 1, "D").astype(object)
            return tomorrow.day == 1
        return True


@dataclass
class Stream:
    """Extra legitimate traffic of a key: events at `times_ms` drawn from `profile`,
    tagged `tag` (a BENIGN_TAGS index or -1)."""

    profile: RequestProfile
    times_ms: np.ndarray
    tag: int = -1


@dataclass
class Travel:
    """A developer's trip: no traffic during the flight, then from the destination."""

    destination: str
    destination_tz: str
    depart_minute: int
    arrive_minute: int


@dataclass
class Tenant:
    """One API key and its owner's behaviour."""

    index: int  # index into the key vocabulary
    key: str
    kind: str
    country: str
    tz: str
    profiles: list[RequestProfile]
    peak_rate: float  # requests per minute at the daily peak
    shift_h: float = 0.0
    weekend_factor: float = 1.0
    consumer_share: float = 0.0  # backends: share of traffic that follows consumers' hours
    batch: BatchJob | None = None
    travel: Travel | None = None
    remote: bool = False
    archetype: str = ""
    details: dict[str, object] = field(default_factory=dict)
    streams: list[Stream] = field(default_factory=list)
    """Extra traffic beside the main schedule (a launch market, CI runs)."""
    # Per-minute schedule, filled by `schedule()` and adjusted by population events.
    lam: np.ndarray | None = None
    loc: np.ndarray | None = None
    tag: np.ndarray | None = None
    stress: np.ndarray | None = None
    outage: np.ndarray | None = None

    @property
    def main(self) -> RequestProfile:
        return self.profiles[0]

    @property
    def model_names(self) -> set[str]:
        names: set[str] = set()
        for p in self.profiles:
            names |= p.model_names
        return names

    @property
    def mean_rate(self) -> float:
        return float(self.lam.mean()) if self.lam is not None else self.peak_rate / 3


def make_key(rng: np.random.Generator) -> str:
    """A raw key as a provider would issue it: `sk-live-` + 32 base62 characters."""
    alphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
    return "sk-live-" + "".join(alphabet[i] for i in rng.integers(0, 62, size=32))


# --------------------------------------------------------------------------- profiles


def _chat_models(
    rng: np.random.Generator, count: int, mix: dict[str, float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    names = list(CHAT_MODEL_WEIGHTS)
    weights = np.array([w * (mix or {}).get(n, 1.0) for n, w in CHAT_MODEL_WEIGHTS.items()])
    chosen = rng.choice(len(names), size=count, replace=False, p=weights / weights.sum())
    share = np.sort(rng.dirichlet(np.full(count, 1.2)))[::-1] if count > 1 else np.ones(1)
    return np.array([MODEL_INDEX[names[i]] for i in chosen]), share


def _token_params(
    rng: np.random.Generator, prompt: float, completion: float, spread: float
) -> dict[str, np.ndarray]:
    """Per-endpoint log-normal token medians/sigmas around a tenant's typical sizes."""
    p_chat = prompt * rng.lognormal(0, 0.4)
    c_chat = completion * rng.lognormal(0, 0.35)
    return {
        "prompt_median": np.array([p_chat, 350 * rng.lognormal(0, 0.4), 180.0, 0.0]),
        "prompt_sigma": np.array([spread, 0.45, 0.6, 0.0]),
        "completion_median": np.array([c_chat, 0.0, 120.0, 0.0]),
        "completion_sigma": np.array([0.7, 0.0, 0.6, 0.0]),
    }


def _error_rates(rng: np.random.Generator, flaky: float = 1.0) -> dict[str, float]:
    return {
        "p_5xx": float(0.005 * flaky * rng.lognormal(0, 0.4)),
        "p_429": float(0.004 * rng.lognormal(0, 0.5)),
        "p_400": float(0.002 * rng.lognormal(0, 0.5)),
        "p_401": float(0.0002 * rng.lognormal(0, 0.5)),
    }


def _profile(
    rng: np.random.Generator,
    *,
    ips: np.ndarray,
    ip_weights: np.ndarray | None = None,
    uas: list[int],
    ua_p: np.ndarray | None = None,
    ip_ua: np.ndarray | None = None,
    endpoint_p: list[float],
    models: tuple[np.ndarray, np.ndarray],
    embedding_model: str = "text-embedding-3-small",
    tokens: dict[str, np.ndarray],
    rtt_ms: float,
    errors: dict[str, float],
    ip_daily_churn: bool = False,
) -> RequestProfile:
    return RequestProfile(
        ips=np.asarray(ips, dtype=np.uint32),
        ip_weights=np.ones(len(ips)) if ip_weights is None else np.asarray(ip_weights),
        uas=np.asarray(uas, dtype=np.int32),
        ua_p=np.ones(len(uas)) if ua_p is None else np.asarray(ua_p),
        ip_ua=ip_ua,
        endpoint_p=np.asarray(endpoint_p, dtype=np.float64),
        chat_models=models[0],
        chat_model_p=models[1],
        embedding_model=MODEL_INDEX[embedding_model],
        rtt_ms=rtt_ms,
        ip_daily_churn=ip_daily_churn,
        **tokens,
        **errors,
    )


def _one_of(rng: np.random.Generator, items: list | tuple):
    return items[int(rng.integers(len(items)))]


def _cloud_blocks(rng: np.random.Generator, country: str) -> list[IpBlock]:
    """One cloud provider/region near the country: the blocks its servers live in."""
    home = CLOUD_HOME.get(country, country)
    blocks = blocks_for(home, "cloud")
    provider = _one_of(rng, sorted({b.provider for b in blocks}))
    return [b for b in blocks if b.provider == provider]


def _backend_profile(
    rng: np.random.Generator, tenant_country: str, ua_vocab: Vocab, mix: dict | None = None
) -> RequestProfile:
    blocks = _cloud_blocks(rng, tenant_country)
    n_ips = int(rng.integers(2, 7))
    ips = sample_ips(rng, [_one_of(rng, blocks)], n_ips)
    main_ua = ua_vocab.add(_one_of(rng, SDK_UAS))
    ip_ua = np.full(n_ips, main_ua, dtype=np.int32)
    if rng.random() < 0.3:  # a second service on its own host with another client
        ip_ua[-1] = ua_vocab.add(_one_of(rng, SDK_UAS))
    embed_share = float(rng.choice([0.0, 0.0, 0.1, 0.25]))
    legacy = 0.03 if rng.random() < 0.15 else 0.0
    return _profile(
        rng,
        ips=ips,
        ip_weights=rng.uniform(0.7, 1.3, n_ips),
        uas=[main_ua],
        ip_ua=ip_ua,
        endpoint_p=[1.0 - embed_share - legacy, embed_share, legacy, 0.0],
        models=_chat_models(rng, int(rng.choice([1, 1, 2, 2, 3])), mix),
        embedding_model=_one_of(rng, ("text-embedding-3-small", "text-embedding-3-large")),
        tokens=_token_params(rng, 1200.0, 250.0, 0.6),
        rtt_ms=network_rtt("cloud", CLOUD_HOME.get(tenant_country, tenant_country)),
        errors=_error_rates(rng),
    )


def _mobile_profile(
    rng: np.random.Generator, country: str, ua_vocab: Vocab, app: str, mix: dict | None = None
) -> RequestProfile:
    blocks = blocks_for(country, ("residential", "mobile"))
    n_ips = int(np.clip(rng.lognormal(np.log(400), 0.35), 150, 900))
    ips = np.unique(sample_ips(rng, blocks, n_ips))
    n_ips = len(ips)
    ranks = rng.permutation(n_ips)
    weights = (ranks + 5.0) ** -0.9  # a few heavy users, a long tail of occasional ones
    major = int(rng.integers(2, 6))
    minor = int(rng.integers(0, 9))
    versions = [f"{major}.{minor}.{p}" for p in (int(rng.integers(1, 5)), 0)] + [
        f"{major}.{max(minor - 1, 0)}.{int(rng.integers(2, 8))}"
    ]
    android_share = ANDROID_SHARE.get(country, 0.75)
    ua_ids = []
    for version in versions:
        ua_ids.append(ua_vocab.add(f"okhttp/4.12.0 {app}-Android/{version}"))
        ua_ids.append(ua_vocab.add(f"{app}/{version} CFNetwork/1568.200.51 Darwin/24.1.0"))
    version_pick = rng.choice(3, size=n_ips, p=[0.72, 0.2, 0.08])
    ios = rng.random(n_ips) >= android_share
    ip_ua = np.array(ua_ids, dtype=np.int32)[version_pick * 2 + ios]
    # A mobile address is residential or mobile; latency follows the network type.
    return _profile(
        rng,
        ips=ips,
        ip_weights=weights,
        uas=ua_ids,
        ip_ua=ip_ua,
        endpoint_p=[1.0, 0.0, 0.0, 0.0],
        models=_chat_models(rng, int(rng.choice([1, 1, 2])), mix),
        tokens=_token_params(rng, 380.0, 160.0, 0.55),
        rtt_ms=network_rtt("mobile", country),
        errors=_error_rates(rng, flaky=1.4),
        ip_daily_churn=True,
    )


def _developer_profiles(
    rng: np.random.Generator, country: str, ua_vocab: Vocab, mix: dict | None = None
) -> list[RequestProfile]:
    """Profiles by place: 0 office, 1 home, 2 home after the ISP reassigned the address."""
    residential = blocks_for(country, "residential")
    office_block = _one_of(rng, residential)
    home_block = _one_of(rng, residential)
    office = sample_ips(rng, [office_block], 1)
    home = sample_ips(rng, [home_block], 2)
    n_uas = int(rng.integers(2, 5))
    uas = [ua_vocab.add(DEV_UAS[i]) for i in rng.choice(len(DEV_UAS), n_uas, replace=False)]
    ua_p = rng.dirichlet(np.full(n_uas, 1.0))
    models = _chat_models(rng, int(rng.integers(2, 5)), mix)
    tokens = _token_params(rng, 700.0, 300.0, 1.1)
    errors = _error_rates(rng)
    errors["p_400"] *= 4  # developers send malformed requests while they experiment
    common = {
        "uas": uas,
        "ua_p": ua_p,
        "endpoint_p": [0.82, 0.08, 0.04, 0.06],
        "models": models,
        "tokens": tokens,
        "errors": errors,
    }
    rtt = network_rtt("residential", country)
    return [
        _profile(rng, ips=office, rtt_ms=rtt, **common),
        _profile(rng, ips=home[:1], rtt_ms=rtt + 8, **common),
        _profile(rng, ips=home[1:], rtt_ms=rtt + 8, **common),
    ]


# ----------------------------------------------------------------------- population

ARCHETYPE_KIND: dict[str, str] = {
    "backend_service": "backend_service",
    "new_key": "backend_service",
    "region_migration": "backend_service",
    "nightly_batch": "batch_job",
    "weekly_batch": "batch_job",
    "month_end_batch": "batch_job",
    "mobile_app": "mobile_app",
    "app_launch": "mobile_app",
    "developer": "developer",
    "travelling_developer": "developer",
    "ci_runner": "ci_runner",
}
"""Each legitimate archetype and the broad kind of tenant it is."""
ARCHETYPES = tuple(ARCHETYPE_KIND)
PLAIN_ARCHETYPES = ("backend_service", "nightly_batch", "mobile_app", "developer")
"""Archetypes that may be an incident's victim: the others are judged as they are, so
that what happens to them measures the legitimate surprise alone."""

_SPECIAL_SHARES = {
    "new_key": 0.04,
    "ci_runner": 0.04,
    "month_end_batch": 0.03,
    "weekly_batch": 0.03,
    "region_migration": 0.03,
    "app_launch": 0.03,
}
"""Shares of the surprising archetypes, most telling first (a small population gets the
first ones that fit)."""


def archetype_counts(n_keys: int) -> dict[str, int]:
    """How many keys of each archetype. Below 12 keys only the plain kinds and one
    traveller; from 12 on, the surprises in `_SPECIAL_SHARES` order while at least one
    plain backend remains (all of them from 16 keys)."""
    counts = {
        "nightly_batch": max(1, round(0.07 * n_keys)),
        "travelling_developer": max(1, round(0.03 * n_keys)),
        "mobile_app": max(1, round(0.2 * n_keys)),
        "developer": max(1, round(0.25 * n_keys)),
    }
    for archetype, share in _SPECIAL_SHARES.items():
        room = n_keys - sum(counts.values()) - 1
        counts[archetype] = min(max(1, round(share * n_keys)), room) if n_keys >= 12 else 0
    backend = n_keys - sum(counts.values())
    if backend < 1:
        raise ValueError(f"need at least 5 keys for a mixed population, got {n_keys}")
    return {"backend_service": backend, **counts}


def kind_counts(n_keys: int) -> dict[str, int]:
    """How many keys of each broad kind."""
    out = dict.fromkeys(TENANT_KINDS, 0)
    for archetype, n in archetype_counts(n_keys).items():
        out[ARCHETYPE_KIND[archetype]] += n
    return out


@dataclass(frozen=True)
class Draw:
    """What every tenant draw needs: the clock, vocabularies and the perturbation."""

    clock: Clock
    key_vocab: Vocab
    ua_vocab: Vocab
    perturb: Perturbation
    test_start_minute: int


def build_population(
    rng: np.random.Generator,
    n_keys: int,
    clock: Clock,
    key_vocab: Vocab,
    ua_vocab: Vocab,
    *,
    perturb: Perturbation | None = None,
    test_start_minute: int | None = None,
) -> list[Tenant]:
    """Draw `n_keys` tenants (archetypes shuffled, so a key's position tells nothing).

    The surprising archetypes get their own parameters from `training.archetypes.specialise`
    afterwards (the simulator calls it), and their shape from `archetypes.shape` after
    `schedule`."""
    draw = Draw(
        clock,
        key_vocab,
        ua_vocab,
        perturb or Perturbation(),
        max(0, clock.minutes - 2 * 1440) if test_start_minute is None else test_start_minute,
    )
    counts = archetype_counts(n_keys)
    archetypes = [a for a, n in counts.items() for _ in range(n)]
    archetypes = [archetypes[i] for i in rng.permutation(len(archetypes))]
    apps = list(APP_NAMES)
    rng.shuffle(apps)
    tenants = [_tenant(rng, draw, archetype, apps) for archetype in archetypes]
    _ensure_hosting_country(rng, tenants, ua_vocab, draw.perturb.model_mix)
    for tenant in tenants:
        if tenant.archetype == "travelling_developer":
            _plan_travel(rng, tenant, clock)
    for tenant in tenants:
        _apply_perturbation(tenant, draw.perturb)
    return tenants


def _country(rng: np.random.Generator) -> tuple[str, str]:
    codes = list(COUNTRY_WEIGHTS)
    weights = np.array(list(COUNTRY_WEIGHTS.values()), dtype=np.float64)
    country = codes[rng.choice(len(codes), p=weights / weights.sum())]
    return country, _one_of(rng, COUNTRIES[country].timezones)


def _tenant(rng: np.random.Generator, draw: Draw, archetype: str, apps: list[str]) -> Tenant:
    kind = ARCHETYPE_KIND[archetype]
    key = make_key(rng)
    country, tz = _country(rng)
    index = draw.key_vocab.add(key)
    mix, uas = draw.perturb.model_mix, draw.ua_vocab
    common = {"index": index, "key": key, "kind": kind, "country": country, "tz": tz,
              "archetype": archetype}
    if kind in ("backend_service", "ci_runner"):
        return Tenant(
            profiles=[_backend_profile(rng, country, uas, mix)],
            peak_rate=float(np.clip(rng.lognormal(np.log(1.3), 0.7), 0.15, 12)),
            shift_h=float(rng.normal(0, 0.6)),
            weekend_factor=float(rng.uniform(0.3, 0.7)),
            consumer_share=float(rng.choice([0.0, 0.0, 0.3, 0.6])),
            **common,
        )
    if kind == "batch_job":
        return _batch_tenant(rng, draw, common)
    if kind == "mobile_app":
        app = apps.pop() if apps else f"App{index}"
        tenant = Tenant(
            profiles=[_mobile_profile(rng, country, uas, app, mix)],
            peak_rate=float(np.clip(rng.lognormal(np.log(1.8), 0.5), 0.4, 12)),
            shift_h=float(rng.normal(0, 0.5)),
            weekend_factor=float(rng.uniform(1.05, 1.35)),
            **common,
        )
        tenant.details["app"] = app
        tenant.details["distinct_ips"] = len(tenant.main.ips)
        return tenant
    return Tenant(
        profiles=_developer_profiles(rng, country, uas, mix),
        peak_rate=float(np.clip(rng.lognormal(np.log(1.0), 0.5), 0.2, 5)),
        shift_h=float(rng.normal(0, 0.8)),
        remote=bool(rng.random() < 0.35),
        **common,
    )


BATCH_RANGES: dict[str, dict[str, tuple[float, float]]] = {
    # minutes the job runs, seconds between requests per worker, prompt-size factor
    "nightly_batch": {"minutes": (20, 40), "interval_s": (1.0, 4.0), "size": (0.5, 2.0)},
    "weekly_batch": {"minutes": (30, 90), "interval_s": (1.5, 5.0), "size": (0.5, 3.0)},
    "month_end_batch": {"minutes": (40, 120), "interval_s": (1.5, 5.0), "size": (0.7, 4.0)},
}
"""Parameter ranges of the batch archetypes (drawn per key, then perturbed)."""


def _batch_tenant(rng: np.random.Generator, draw: Draw, common: dict) -> Tenant:
    """A backend that also runs a job: nightly, weekly (on a day of the judged period:
    its earlier runs predate the span), or on the last day of the month."""
    archetype = common["archetype"]
    ranges = BATCH_RANGES[archetype]
    day = _backend_profile(rng, common["country"], draw.ua_vocab, draw.perturb.model_mix)
    night = _batch_profile(rng, day, draw.ua_vocab, float(rng.uniform(*ranges["size"])))
    weekday = -1
    if archetype == "weekly_batch":
        _, weekdays, _ = draw.clock.local(common["tz"])
        judged = weekdays[draw.test_start_minute:] if draw.test_start_minute < len(weekdays) \
            else weekdays
        weekday = int(_one_of(rng, sorted(set(judged.tolist()))))
    job = BatchJob(
        local_hour=float(rng.choice([1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 22.0, 23.0])),
        interval_s=float(rng.uniform(*ranges["interval_s"])),
        minutes=float(rng.uniform(*ranges["minutes"])),
        workers=int(rng.choice([1, 2, 4])),
        profile=1,
        period=archetype.removesuffix("_batch"),
        weekday=weekday,
    )
    tenant = Tenant(
        profiles=[day, night],
        peak_rate=float(np.clip(rng.lognormal(np.log(0.35), 0.5), 0.05, 2)),
        shift_h=float(rng.normal(0, 0.6)),
        weekend_factor=float(rng.uniform(0.3, 0.7)),
        batch=job,
        **common,
    )
    tenant.details["nightly_batch_local_time"] = (
        f"{int(job.local_hour):02d}:{int(job.local_hour % 1 * 60):02d}"
    )
    tenant.details["batch"] = {"period": job.period, "minutes": round(job.minutes),
                               "requests_per_min": round(60 / job.interval_s, 1)}
    return tenant


def _apply_perturbation(tenant: Tenant, perturb: Perturbation) -> None:
    """Scale rates and sizes and shift the rhythm by the seed's perturbation."""
    rate, size = perturb.rate_of(tenant.archetype), perturb.size_of(tenant.archetype)
    tenant.peak_rate *= rate
    tenant.shift_h += perturb.shift_h
    if tenant.batch is not None:
        tenant.batch.interval_s /= rate
        tenant.batch.local_hour = (tenant.batch.local_hour + perturb.shift_h) % 24
        tenant.details["nightly_batch_local_time"] = (
            f"{int(tenant.batch.local_hour):02d}:{int(tenant.batch.local_hour % 1 * 60):02d}"
        )
    if size != 1.0:
        tenant.profiles = [
            replace(p, prompt_median=p.prompt_median * size,
                    completion_median=p.completion_median * size)
            for p in tenant.profiles
        ]


def _ensure_hosting_country(
    rng: np.random.Generator, tenants: list[Tenant], ua_vocab: Vocab, mix: dict | None = None
) -> None:
    """A domestic-VPS leak needs a victim in a country with VPS providers: in a small
    population where no app or backend is in one, move one mobile app to the US."""
    hosting = {b.country for b in blocks_for(network="hosting")}
    plain = [t for t in tenants if t.archetype in ("mobile_app", "backend_service")]
    if any(t.country in hosting for t in plain):
        return
    tenant = next(t for t in tenants if t.archetype == "mobile_app")
    tenant.country, tenant.tz = "US", COUNTRIES["US"].timezones[0]
    tenant.profiles = [_mobile_profile(rng, "US", ua_vocab, str(tenant.details["app"]), mix)]
    tenant.details["distinct_ips"] = len(tenant.main.ips)


def _batch_profile(
    rng: np.random.Generator, day: RequestProfile, ua_vocab: Vocab, size: float = 1.0
) -> RequestProfile:
    """The job: one cron host, one client, embeddings or summaries."""
    embeddings = rng.random() < 0.6
    tokens = {
        "prompt_median": np.array([2600.0, 480.0, 180.0, 0.0]) * rng.lognormal(0, 0.2) * size,
        "prompt_sigma": np.array([0.3, 0.12, 0.5, 0.0]),
        "completion_median": np.array([300.0, 0.0, 100.0, 0.0]),
        "completion_sigma": np.array([0.35, 0.0, 0.5, 0.0]),
    }
    return RequestProfile(
        ips=day.ips[:1].copy(),
        ip_weights=np.ones(1),
        uas=np.array([ua_vocab.add(_one_of(rng, BATCH_UAS))], dtype=np.int32),
        ua_p=np.ones(1),
        endpoint_p=np.array([0.0, 1.0, 0.0, 0.0] if embeddings else [1.0, 0.0, 0.0, 0.0]),
        chat_models=np.array([MODEL_INDEX["gpt-4o-mini"]]),
        chat_model_p=np.ones(1),
        embedding_model=day.embedding_model,
        rtt_ms=day.rtt_ms,
        p_5xx=day.p_5xx,
        p_429=day.p_429,
        p_400=0.0005,
        p_401=0.0,
        **tokens,
    )


def _plan_travel(rng: np.random.Generator, traveler: Tenant, clock: Clock) -> None:
    """Send a developer to another continent: departure on a day after the first and
    before the last, between 07:00 and 21:00 local; a hotel and a venue address there."""
    home = COUNTRIES[traveler.country]
    options = [
        c
        for c in COUNTRY_WEIGHTS
        if COUNTRIES[c].continent != home.continent and blocks_for(c, "residential")
    ]
    destination = _one_of(rng, options)
    dest = COUNTRIES[destination]
    dest_tz = dest.timezones[0]
    hour, _, local_day = clock.local(traveler.tz)
    first_day = int(local_day[0])
    depart_day = first_day + (int(rng.integers(1, clock.days - 1)) if clock.days >= 3 else 0)
    depart_hour = float(rng.uniform(7.0, 21.0)) if clock.days >= 2 else 7.0
    candidates = np.flatnonzero((local_day == depart_day) & (hour >= depart_hour))
    if not len(candidates):
        candidates = np.flatnonzero(hour >= depart_hour)
    depart = int(candidates[0]) if len(candidates) else clock.minutes // 4
    flight_h = distance_km(home, dest) / 820.0 + 0.75
    arrive = min(depart + int(flight_h * 60), clock.minutes - 1)
    residential = blocks_for(destination, "residential")
    hotel_ip = sample_ips(rng, [_one_of(rng, residential)], 1)
    venue_ip = sample_ips(rng, [_one_of(rng, residential)], 1)
    base = traveler.profiles[0]
    rtt = network_rtt("residential", destination)
    for ips in (hotel_ip, venue_ip):
        traveler.profiles.append(replace(base, ips=ips, ip_weights=np.ones(1), rtt_ms=rtt))
    traveler.travel = Travel(destination, dest_tz, depart, arrive)
    traveler.details["travel"] = {
        "from": traveler.country,
        "to": destination,
        "km": round(distance_km(home, dest)),
    }


# ------------------------------------------------------------------------- schedules


def _logistic(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def business_curve(hour: np.ndarray, weekday: np.ndarray, weekend_factor: float) -> np.ndarray:
    """Working-day traffic: ramps up at 8, lunch dip, tails off after 19, quiet nights."""
    day = _logistic((hour - 8.0) / 0.7) * _logistic((19.0 - hour) / 1.2)
    lunch = 1.0 - 0.15 * np.exp(-0.5 * ((hour - 12.75) / 0.6) ** 2)
    curve = 0.1 + 0.9 * day * lunch
    return np.where(weekday >= 5, 0.1 + (weekend_factor - 0.1) * day, curve)


def consumer_curve(hour: np.ndarray, weekday: np.ndarray, weekend_factor: float) -> np.ndarray:
    """People on phones: asleep 1-6, lunch bump, evening peak around 21."""
    weekend = weekday >= 5
    wake = np.where(weekend, 8.5, 7.0)
    awake = _logistic((hour - wake) / 0.8) * _logistic((23.9 - hour) / 0.6)
    late = np.exp(-0.5 * (hour / 1.2) ** 2)  # just past midnight, still a few users
    evening = np.exp(-0.5 * ((hour - 20.8) / 1.9) ** 2)
    lunch = np.exp(-0.5 * ((hour - 12.6) / 1.3) ** 2)
    curve = 0.03 + 0.42 * awake + 0.45 * evening + 0.12 * lunch + 0.1 * late
    return np.where(weekend, curve * weekend_factor, curve)


def _wander(rng: np.random.Generator, minutes: int, step: int = 10) -> np.ndarray:
    """Slow multiplicative noise: AR(1) in log space on a 10-minute grid."""
    steps = minutes // step + 1
    phi, sigma = 0.93, 0.1
    eps = rng.normal(0, sigma, steps)
    x = np.empty(steps)
    x[0] = rng.normal(0, sigma / np.sqrt(1 - phi**2))
    for i in range(1, steps):
        x[i] = phi * x[i - 1] + eps[i]
    return np.exp(np.repeat(x, step)[:minutes] - 0.5 * sigma**2 / (1 - phi**2))


def _daily(rng: np.random.Generator, local_day: np.ndarray, sigma: float) -> np.ndarray:
    days, inverse = np.unique(local_day, return_inverse=True)
    return rng.lognormal(0, sigma, len(days))[inverse]


def schedule(tenant: Tenant, clock: Clock, rng: np.random.Generator) -> None:
    """Fill the tenant's per-minute rate, place (profile) and tag arrays."""
    n = clock.minutes
    hour, weekday, local_day = clock.local(tenant.tz)
    shifted = (hour - tenant.shift_h) % 24
    tenant.loc = np.zeros(n, dtype=np.int8)
    tenant.tag = np.full(n, -1, dtype=np.int8)
    tenant.stress = np.ones(n)
    tenant.outage = np.zeros(n)
    if tenant.kind in ("backend_service", "batch_job"):
        curve = business_curve(shifted, weekday, tenant.weekend_factor)
        if tenant.consumer_share > 0:  # a consumer-facing backend: evenings count too
            consumer = consumer_curve(shifted, weekday, 1.1)
            curve = (1 - tenant.consumer_share) * curve + tenant.consumer_share * consumer
        tenant.lam = tenant.peak_rate * curve * _wander(rng, n) * _daily(rng, local_day, 0.12)
    elif tenant.kind == "mobile_app":
        curve = consumer_curve(shifted, weekday, tenant.weekend_factor)
        tenant.lam = tenant.peak_rate * curve * _wander(rng, n) * _daily(rng, local_day, 0.1)
    elif tenant.kind == "ci_runner":
        tenant.lam = np.zeros(n)  # all of its traffic is CI runs (`training.archetypes`)
    else:
        _developer_schedule(tenant, clock, rng)


def _sessions(
    rng: np.random.Generator,
    hour: np.ndarray,
    weekday: np.ndarray,
    local_day: np.ndarray,
    tenant: Tenant,
    *,
    weekend_p: float,
    evening_p: float,
    office_loc: int,
    home_loc: np.ndarray,
    mask: np.ndarray,
) -> None:
    """Add working sessions (bursts of requests) to the tenant's schedule where mask."""
    local_abs = local_day * 1440 + np.floor(hour * 60).astype(np.int64)
    for day in np.unique(local_day[mask]):
        dow = int(weekday[mask][local_day[mask] == day][0])
        plans: list[tuple[float, float, bool]] = []  # (start hour, minutes, at office)
        if dow < 5:
            for _ in range(1 + int(rng.poisson(3.0))):
                start = rng.uniform(9.0, 12.0) if rng.random() < 0.5 else rng.uniform(13.5, 17.5)
                plans.append((start, float(np.clip(rng.lognormal(np.log(25), 0.6), 4, 150)), True))
            if rng.random() < evening_p:
                plans.append((rng.uniform(20.0, 22.5), float(rng.uniform(15, 70)), False))
        elif rng.random() < weekend_p:
            plans.append((rng.uniform(10.0, 21.0), float(rng.uniform(20, 120)), False))
        for start_h, minutes, at_office in plans:
            lo = day * 1440 + int((start_h + tenant.shift_h) * 60)
            sel = mask & (local_abs >= lo) & (local_abs < lo + int(minutes))
            if not sel.any():
                continue
            rate = tenant.peak_rate * rng.lognormal(0, 0.5)
            tenant.lam[sel] += rate * rng.gamma(1.2, 1 / 1.2, int(sel.sum()))
            if at_office and not tenant.remote:
                tenant.loc[sel] = office_loc
            else:
                tenant.loc[sel] = home_loc[sel]


def _developer_schedule(tenant: Tenant, clock: Clock, rng: np.random.Generator) -> None:
    n = clock.minutes
    tenant.lam = np.zeros(n)
    hour, weekday, local_day = clock.local(tenant.tz)
    switch = int(rng.integers(n // 3, max(n // 3 + 1, 2 * n // 3)))
    home_loc = np.where(np.arange(n) < switch, 1, 2).astype(np.int8)
    everywhere = np.ones(n, dtype=bool)
    travel = tenant.travel
    if travel is None:
        _sessions(
            rng,
            hour,
            weekday,
            local_day,
            tenant,
            weekend_p=0.15,
            evening_p=0.25,
            office_loc=0,
            home_loc=home_loc,
            mask=everywhere,
        )
        return
    minute = np.arange(n)
    before = minute < travel.depart_minute - 90
    after = minute >= travel.arrive_minute + 45
    _sessions(
        rng,
        hour,
        weekday,
        local_day,
        tenant,
        weekend_p=0.15,
        evening_p=0.25,
        office_loc=0,
        home_loc=home_loc,
        mask=before,
    )
    d_hour, d_weekday, d_day = clock.local(travel.destination_tz)
    hotel = np.full(n, 3, dtype=np.int8)
    saved = tenant.shift_h
    tenant.shift_h = 0.0
    _sessions(
        rng,
        d_hour,
        d_weekday,
        d_day,
        tenant,
        weekend_p=0.6,
        evening_p=0.6,
        office_loc=4,
        home_loc=hotel,
        mask=after,
    )
    tenant.shift_h = saved
    tenant.lam[~(before | after)] = 0.0
    tenant.tag[minute >= travel.arrive_minute] = TAG_INDEX["travel"]


# ------------------------------------------------------------------------ generation


def generate_baseline(tenant: Tenant, clock: Clock, rng: np.random.Generator) -> Columns:
    """All of a tenant's legitimate events over the span."""
    times = poisson_times(rng, clock.start_ms, tenant.lam)
    minute = ((times - clock.start_ms) // MS_PER_MINUTE).astype(np.int64)
    parts = []
    loc = tenant.loc[minute]
    for p in np.unique(loc):
        sel = loc == p
        parts.append(
            render(
                tenant.profiles[int(p)],
                times[sel],
                rng,
                key=tenant.index,
                tag=tenant.tag[minute[sel]],
                stress=tenant.stress[minute[sel]],
                outage=tenant.outage[minute[sel]],
            )
        )
    if tenant.batch is not None:
        parts.append(_batch_runs(tenant, clock, rng))
    for stream in tenant.streams:
        ts = stream.times_ms[(stream.times_ms >= clock.start_ms) & (stream.times_ms < clock.end_ms)]
        minute = ((ts - clock.start_ms) // MS_PER_MINUTE).astype(np.int64)
        parts.append(
            render(stream.profile, ts, rng, key=tenant.index, tag=stream.tag,
                   stress=tenant.stress[minute], outage=tenant.outage[minute])
        )
    return Columns.concat(parts)


def _batch_runs(tenant: Tenant, clock: Clock, rng: np.random.Generator) -> Columns:
    """The job's requests on every day it runs, metronomic, `workers` interleaved."""
    job = tenant.batch
    assert job is not None
    hour, weekday, local_day = clock.local(tenant.tz)
    times = []
    for day in np.unique(local_day):
        first = np.flatnonzero(local_day == day)[0]
        if not job.runs_on(int(weekday[first]), int(day)):
            continue
        at = np.flatnonzero((local_day == day) & (hour >= job.local_hour))
        if not len(at) or hour[at[0]] - job.local_hour > 0.05:
            continue  # the job's start time is not inside the span that day
        start_ms = clock.start_ms + int(at[0]) * MS_PER_MINUTE + int(rng.integers(200, 20_000))
        count = int(job.minutes * 60 / job.interval_s * rng.lognormal(0, 0.08))
        per_worker = count // job.workers
        for w in range(job.workers):
            offset = int(w * job.interval_s * 1000 / job.workers)
            times.append(
                metronome_times(
                    rng, start_ms + offset, job.interval_s * job.workers, per_worker, 0.02
                )
            )
    if not times:
        return Columns.empty()
    ts = np.sort(np.concatenate(times))
    ts = ts[ts < clock.end_ms]
    return render(
        tenant.profiles[job.profile],
        ts,
        rng,
        key=tenant.index,
        tag=TAG_INDEX[f"{job.period}_batch"],
        stress=3.0,
        outage=tenant.outage[((ts - clock.start_ms) // MS_PER_MINUTE).astype(np.int64)],
    )


def describe(tenant: Tenant) -> dict[str, object]:
    """A JSON-able summary of a tenant for meta.json (ground truth for evaluation)."""
    return {
        "key": tenant.key,
        "kind": tenant.kind,
        "archetype": tenant.archetype,
        "country": tenant.country,
        "timezone": tenant.tz,
        "models": sorted(tenant.model_names),
        "endpoints": sorted(
            {
                ENDPOINTS[i]
                for p in tenant.profiles
                for i in (CHAT, EMBED, COMPLETE, LIST_MODELS)
                if p.endpoint_p[i] > 0
            }
        ),
        "peak_rate_per_min": round(tenant.peak_rate, 3),
        **tenant.details,
    }
