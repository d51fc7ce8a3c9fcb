"""Labelled abuse: the incidents keywatch exists to catch, injected into real-looking traffic.

Each scenario is written the way it happens, not the way a detector would like it:
attackers borrow what they can from the victim (user agent, models, token sizes),
act alongside the owner's ongoing traffic, and are only as loud as their goal needs.

- leaked_key_abroad: a leaked key used from another continent while the owner works.
- leaked_key_domestic_vps: a leaked key used from a VPS (a hosting ASN) in the owner's own
  country, with the owner's own client library (user agent), at night local time.
- runaway_loop: the owner's own client is stuck: the same request on a timer, from the
  owner's address, for tens of minutes.
- token_drain: huge prompts (tens of thousands of tokens) burning the key's quota.
- credential_stuffing: a few addresses sweep random keys (401s) until one works, then
  abuse it from the same addresses.
- key_resale: the key is resold: dozens of buyers in many countries, each at their own
  local hours.
- llm_jacking: one probe with a model the key never used, then long completions with it.
- slow_and_low: a modest extra rate from a foreign VPS for many hours, each request
  ordinary.

Every incident event carries its incident id in labels.jsonl; the owner's own traffic
during an incident stays unlabelled (incident_id null), because it is not abuse.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from training.networks import COUNTRIES, blocks_for, countries_with, sample_ips
from training.perturb import Perturbation
from training.tenants import (
    COUNTRY_WEIGHTS,
    PLAIN_ARCHETYPES,
    Tenant,
    consumer_curve,
    network_rtt,
)
from training.traffic import (
    CHAT,
    LIST_MODELS,
    MODEL_INDEX,
    MODELS,
    MS_PER_MINUTE,
    Clock,
    Columns,
    RequestProfile,
    Vocab,
    metronome_times,
    poisson_times,
    render,
)

SCENARIOS = (
    "leaked_key_abroad",
    "leaked_key_domestic_vps",
    "runaway_loop",
    "token_drain",
    "credential_stuffing",
    "key_resale",
    "llm_jacking",
    "slow_and_low",
)

ELIGIBLE_KINDS: dict[str, tuple[str, ...]] = {
    # The owner must be working at the time: developers work in short sessions.
    "leaked_key_abroad": ("backend_service", "mobile_app", "batch_job"),
    "leaked_key_domestic_vps": ("developer", "mobile_app", "backend_service"),
    "runaway_loop": ("backend_service", "developer", "batch_job"),
    "token_drain": ("backend_service", "mobile_app", "developer"),
    "credential_stuffing": ("backend_service", "mobile_app", "developer", "batch_job"),
    "key_resale": ("developer", "backend_service"),
    "llm_jacking": ("backend_service", "mobile_app", "developer", "batch_job"),
    "slow_and_low": ("backend_service", "mobile_app", "batch_job", "developer"),
}

ATTACKER_UAS = (
    "python-requests/2.31.0",
    "python-httpx/0.25.1",
    "Go-http-client/1.1",
    "curl/7.81.0",
    "axios/1.6.2",
    "node-fetch/1.0 (+https://github.com/bitinn/node-fetch)",
    "openai-python/1.35.10",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/120.0.0.0 Safari/537.36",
)
RESALE_UAS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/130.0.0.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/18.1 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Linux; Android 14; SM-S918B) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/130.0.0.0 Mobile Safari/537.36",
    "NextChat/2.15.6",
    "LobeChat/1.31.4",
    "Chatbox/1.6.1",
    "python-requests/2.31.0",
    "node-fetch/1.0 (+https://github.com/bitinn/node-fetch)",
    "axios/1.7.7",
)
STUFFER_UAS = ("python-requests/2.28.1", "Go-http-client/1.1", "python-httpx/0.24.1")
JACKING_TARGETS = ("claude-3-opus", "o1-preview", "gpt-4-turbo")
_BASE62 = np.array(list("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"))


@dataclass
class Incident:
    """Ground truth for one incident, written to incidents.json."""

    id: str
    scenario: str
    victim_keys: list[str]
    start_ms: int
    end_ms: int
    period: str
    description: str
    source_ips: list[str] = field(default_factory=list)
    source_countries: list[str] = field(default_factory=list)
    events: int = 0
    details: dict[str, object] = field(default_factory=dict)


@dataclass
class IncidentContext:
    """What a scenario may look at and add to, and how much to scale its rate and sizes
    (the seed's perturbation; see `scaled_for`)."""

    clock: Clock
    ua_vocab: Vocab
    key_vocab: Vocab
    perturb: Perturbation = field(default_factory=Perturbation)
    rate: float = 1.0
    size: float = 1.0

    def scaled_for(self, scenario: str) -> IncidentContext:
        return replace(self, rate=self.perturb.attack_rate_of(scenario),
                       size=self.perturb.attack_size_of(scenario))


@dataclass
class Outcome:
    """What a scenario produced: its events and the facts for its description."""

    columns: Columns
    description: str
    countries: list[str]
    details: dict[str, object] = field(default_factory=dict)


def _one_of(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


def _pick_start(
    rng: np.random.Generator,
    victim: Tenant,
    clock: Clock,
    window: tuple[int, int],
    duration: int,
    mode: str,
) -> int:
    """A start minute in `window` (minutes) so the incident fits where possible.

    active: weighted by the owner's own rate (the owner is working at the time);
    night: 00:30-03:00 in the owner's time zone; any: uniform.
    """
    lo, hi = window
    last = max(lo, hi - duration)
    span = np.arange(lo, last + 1)
    if mode == "active":
        w = victim.lam[lo : last + 1].astype(np.float64) ** 1.5
        if w.sum() > 0:
            return int(rng.choice(span, p=w / w.sum()))
    if mode == "night":
        hour, _, _ = clock.local(victim.tz)
        ok = span[(hour[lo : last + 1] >= 0.5) & (hour[lo : last + 1] < 3.0)]
        if len(ok):
            return int(_one_of(rng, ok))
    return int(rng.integers(lo, last + 1))


def _current_place(victim: Tenant, minute: int) -> int:
    """The profile (place) the owner last worked from at `minute`."""
    before = np.flatnonzero(victim.lam[: minute + 1] > 0)
    if len(before):
        return int(victim.loc[before[-1]])
    after = np.flatnonzero(victim.lam > 0)
    return int(victim.loc[after[0]]) if len(after) else 0


def _foreign_country(
    rng: np.random.Generator, home: str, network: str, *, other_continent: bool
) -> str:
    options = [
        c
        for c in countries_with(network)
        if c != home
        and (not other_continent or COUNTRIES[c].continent != COUNTRIES[home].continent)
    ]
    return _one_of(rng, options)


def _dominant_ua(profile: RequestProfile) -> int:
    if profile.ip_ua is not None:
        weights = np.bincount(profile.ip_ua, weights=profile.ip_weights)
        return int(np.argmax(weights))
    return int(profile.uas[int(np.argmax(profile.ua_p))])


def _attacker(
    ctx: IncidentContext,
    ips: np.ndarray,
    ua: str,
    *,
    models: dict[str, float],
    prompt: float,
    completion: float,
    rtt_ms: float,
    prompt_sigma: float = 0.6,
    completion_sigma: float = 0.6,
) -> RequestProfile:
    return RequestProfile(
        ips=np.asarray(ips, dtype=np.uint32),
        ip_weights=np.ones(len(ips)),
        uas=np.array([ctx.ua_vocab.add(ua)], dtype=np.int32),
        ua_p=np.ones(1),
        endpoint_p=np.array([1.0, 0.0, 0.0, 0.0]),
        chat_models=np.array([MODEL_INDEX[m] for m in models]),
        chat_model_p=np.array(list(models.values())),
        embedding_model=MODEL_INDEX["text-embedding-3-small"],
        prompt_median=np.array([prompt, 300.0, 200.0, 0.0]),
        prompt_sigma=np.array([prompt_sigma, 0.4, 0.5, 0.0]),
        completion_median=np.array([completion, 0.0, 100.0, 0.0]),
        completion_sigma=np.array([completion_sigma, 0.0, 0.5, 0.0]),
        rtt_ms=rtt_ms,
        p_5xx=0.004,
        p_429=0.004,
        p_400=0.003,
        p_401=0.0,
    )


def _owner_models(victim: Tenant) -> dict[str, float]:
    p = victim.main
    share = p.chat_model_p / p.chat_model_p.sum()
    return {MODELS[int(m)]: float(s) for m, s in zip(p.chat_models, share, strict=True)}


def _bursty_rate(rng: np.random.Generator, rate: float, minutes: int) -> np.ndarray:
    """A per-minute rate around `rate` that comes in bursts (gamma-distributed)."""
    return rate * rng.gamma(1.5, 1 / 1.5, minutes)


def _minutes_left(clock: Clock, start: int, minutes: int) -> int:
    return max(1, min(minutes, clock.minutes - start))


# ------------------------------------------------------------------------- scenarios


def leaked_key_abroad(ctx, victim, rng, window, incident) -> Outcome:
    clock = ctx.clock
    duration = int(rng.uniform(60, 240))
    start = _pick_start(rng, victim, clock, window, duration, "active")
    duration = _minutes_left(clock, start, duration)
    network = "hosting" if rng.random() < 0.6 else "residential"
    country = _foreign_country(rng, victim.country, network, other_continent=True)
    ips = sample_ips(rng, blocks_for(country, network), int(rng.integers(1, 4)))
    models = (
        _owner_models(victim) if rng.random() < 0.5 else {"gpt-4o": 0.6, "claude-3-5-sonnet": 0.4}
    )
    profile = _attacker(
        ctx,
        ips,
        _one_of(rng, ATTACKER_UAS),
        models=models,
        prompt=float(rng.uniform(600, 2500)) * ctx.size,
        completion=float(rng.uniform(250, 900)) * ctx.size,
        rtt_ms=network_rtt(network, country),
    )
    rate = float(rng.uniform(0.5, 4.0)) * ctx.rate
    ts = poisson_times(rng, clock.ms_at_minute(start), _bursty_rate(rng, rate, duration))
    cols = render(profile, ts, rng, key=victim.index, incident=incident)
    return Outcome(
        cols,
        f"Leaked key of a {victim.kind} in {victim.country} used from {len(ips)} "
        f"{network} address(es) in {COUNTRIES[country].name} (another continent) for "
        f"~{duration} min at ~{rate:.1f} req/min while the owner's traffic continues.",
        [country],
    )


def leaked_key_domestic_vps(ctx, victim, rng, window, incident) -> Outcome:
    clock = ctx.clock
    duration = int(rng.uniform(90, 240))
    start = _pick_start(rng, victim, clock, window, duration, "night")
    duration = _minutes_left(clock, start, duration)
    blocks = blocks_for(victim.country, "hosting")
    block = _one_of(rng, blocks)
    ips = sample_ips(rng, [block], 1)
    ua = _dominant_ua(victim.main)
    profile = replace(
        victim.main,
        ips=ips,
        ip_weights=np.ones(1),
        uas=np.array([ua], dtype=np.int32),
        ua_p=np.ones(1),
        ip_ua=None,
        ip_daily_churn=False,
        rtt_ms=network_rtt("hosting", victim.country),
        prompt_median=victim.main.prompt_median * 1.5 * ctx.size,
    )
    rate = max(0.3, victim.peak_rate * float(rng.uniform(0.4, 1.0))) * ctx.rate
    ts = poisson_times(rng, clock.ms_at_minute(start), _bursty_rate(rng, rate, duration))
    cols = render(profile, ts, rng, key=victim.index, incident=incident)
    return Outcome(
        cols,
        f"Leaked key of a {victim.kind} in {victim.country} used from a {block.provider} VPS "
        f"in the same country with the owner's user agent "
        f"({ctx.ua_vocab.items[ua]!r}), at night local time, ~{duration} min at "
        f"~{rate:.1f} req/min.",
        [victim.country],
        {"provider": block.provider},
    )


def runaway_loop(ctx, victim, rng, window, incident) -> Outcome:
    clock = ctx.clock
    duration = int(rng.uniform(15, 60))
    start = _pick_start(rng, victim, clock, window, duration, "active")
    duration = _minutes_left(clock, start, duration)
    source = victim.profiles[_current_place(victim, start)]
    if victim.kind == "batch_job":
        source = victim.main
    pick = int(rng.choice(len(source.ips), p=source.ip_weights / source.ip_weights.sum()))
    ua = int(source.ip_ua[pick]) if source.ip_ua is not None else _dominant_ua(source)
    fast = [int(m) for m in source.chat_models if MODELS[int(m)] != "o1-preview"]
    model = fast[0] if fast else MODEL_INDEX["gpt-4o-mini"]
    prompt = int(np.clip(source.prompt_median[CHAT] * rng.lognormal(0, 0.4), 20, 60_000))
    completion = int(np.clip(source.completion_median[CHAT] * rng.lognormal(0, 0.4), 5, 2000))
    profile = replace(
        source,
        ips=source.ips[pick : pick + 1],
        ip_weights=np.ones(1),
        uas=np.array([ua], dtype=np.int32),
        ua_p=np.ones(1),
        ip_ua=None,
        ip_daily_churn=False,
        fixed_prompt=prompt,
        fixed_completion=completion,
    )
    interval = float(rng.uniform(0.4, 2.5)) / ctx.rate
    count = int(duration * 60 / interval)
    start_ms = int(clock.ms_at_minute(start)) + int(rng.integers(0, MS_PER_MINUTE))
    ts = metronome_times(rng, start_ms, interval, count, 0.01)
    ts = ts[ts < clock.end_ms]
    elapsed_min = (ts - start_ms) / MS_PER_MINUTE
    stress = np.where(elapsed_min > 5, 25.0, 1.0)  # the upstream starts rate-limiting it
    cols = render(
        profile,
        ts,
        rng,
        key=victim.index,
        incident=incident,
        endpoint=CHAT,
        model=model,
        stress=stress,
    )
    return Outcome(
        cols,
        f"The owner's own client ({ctx.ua_vocab.items[ua]!r}) stuck in a loop: the same "
        f"{MODELS[model]} request ({prompt} prompt tokens) every {interval:.2f} s from its "
        f"usual address for ~{duration} min.",
        [],
        {"interval_s": round(interval, 3), "prompt_tokens": prompt},
    )


def token_drain(ctx, victim, rng, window, incident) -> Outcome:
    clock = ctx.clock
    duration = int(rng.uniform(30, 180))
    start = _pick_start(rng, victim, clock, window, duration, "active")
    duration = _minutes_left(clock, start, duration)
    models = _owner_models(victim)
    prompt = float(np.clip(rng.uniform(30_000, 70_000) * ctx.size, 12_000, 120_000))
    via_owner = victim.kind in ("backend_service", "mobile_app") and rng.random() < 0.5
    if via_owner:
        # Abuse through the owner's own app: a user pasting whole books into it.
        source = victim.main
        k = 1 if victim.kind == "mobile_app" else len(source.ips)
        pick = rng.choice(len(source.ips), size=k, replace=False)
        uas = source.ip_ua[pick] if source.ip_ua is not None else source.uas[:1]
        profile = replace(
            source,
            ips=source.ips[pick],
            ip_weights=np.ones(k),
            ip_ua=uas if source.ip_ua is not None else None,
            ip_daily_churn=False,
            prompt_median=np.array([prompt, 300.0, 200.0, 0.0]),
            prompt_sigma=np.array([0.35, 0.4, 0.5, 0.0]),
            endpoint_p=np.array([1.0, 0.0, 0.0, 0.0]),
        )
        where, countries = "through the owner's own application addresses", []
    else:
        country = _foreign_country(rng, victim.country, "hosting", other_continent=False)
        ips = sample_ips(rng, blocks_for(country, "hosting"), 1)
        profile = _attacker(
            ctx,
            ips,
            _one_of(rng, ATTACKER_UAS),
            models=models,
            prompt=prompt,
            completion=float(rng.uniform(200, 900)),
            rtt_ms=network_rtt("hosting", country),
            prompt_sigma=0.35,
        )
        where, countries = f"from a hosting address in {COUNTRIES[country].name}", [country]
    rate = float(rng.uniform(0.5, 3.0)) * ctx.rate
    ts = poisson_times(rng, clock.ms_at_minute(start), _bursty_rate(rng, rate, duration))
    cols = render(profile, ts, rng, key=victim.index, incident=incident, endpoint=CHAT)
    return Outcome(
        cols,
        f"Token drain {where}: ~{rate:.1f} req/min of ~{prompt / 1000:.0f}k-token prompts "
        f"for ~{duration} min.",
        countries,
        {"via_owner": via_owner, "prompt_median": round(prompt)},
    )


def _invalid_keys(rng: np.random.Generator, count: int) -> list[str]:
    """Keys from a stuffing list: guessed `sk-live-` keys, other providers' formats,
    truncated pastes."""
    body = _BASE62[rng.integers(0, 62, size=(count, 48))]
    kind = rng.choice(3, size=count, p=[0.7, 0.2, 0.1])
    lengths = np.where(kind == 0, 32, np.where(kind == 1, 48, rng.integers(20, 40, count)))
    prefixes = np.where(kind == 1, "sk-", "sk-live-")
    return [p + "".join(row[:n]) for p, row, n in zip(prefixes, body, lengths, strict=True)]


def credential_stuffing(ctx, victim, rng, window, incident) -> Outcome:
    clock = ctx.clock
    sweep_min = int(rng.uniform(15, 40))
    abuse_min = int(rng.uniform(30, 120))
    start = _pick_start(rng, victim, clock, window, sweep_min + abuse_min, "any")
    countries = sorted(
        {_one_of(rng, countries_with("hosting")) for _ in range(int(rng.integers(1, 3)))}
    )
    n_addr = int(rng.integers(2, 5))
    blocks = [b for c in countries for b in blocks_for(c, "hosting")]
    ips = sample_ips(rng, blocks, n_addr)
    ua = _one_of(rng, STUFFER_UAS)
    rate_s = float(rng.uniform(1.0, 3.0)) * ctx.rate
    sweep_ms = min(sweep_min * MS_PER_MINUTE, clock.end_ms - int(clock.ms_at_minute(start)))
    count = max(int(sweep_ms / 1000 * rate_s), 20)
    start_ms = int(clock.ms_at_minute(start))
    ts = np.sort(start_ms + rng.integers(0, max(sweep_ms, 1), size=count))
    keys = _invalid_keys(rng, count)
    retry = rng.random(count) < 0.05  # a flaky proxy: some keys are tried twice
    for i in np.flatnonzero(retry)[:-1]:
        keys[i + 1] = keys[i]
    hit = int(count * rng.uniform(0.4, 0.9))
    probe = _attacker(
        ctx,
        ips,
        ua,
        models={"gpt-4o-mini": 1.0},
        prompt=12.0,
        completion=5.0,
        rtt_ms=network_rtt("hosting", countries[0]),
    )
    probe.endpoint_p = np.array([0.2, 0.0, 0.0, 0.8])
    sweep = render(replace(probe, p_401=1.0), ts, rng, key=victim.index, incident=incident)
    key_ids = np.array([ctx.key_vocab.add(k) for k in keys], dtype=np.int32)
    sweep.key = key_ids
    found = render(
        replace(probe, p_5xx=0, p_429=0, p_400=0),
        ts[hit : hit + 1] + 1,
        rng,
        key=victim.index,
        incident=incident,
        endpoint=LIST_MODELS,
    )
    abuse_start = int(ts[hit]) + int(rng.uniform(2, 15) * MS_PER_MINUTE)
    abuse_minutes = max(1, min(abuse_min, (clock.end_ms - abuse_start) // MS_PER_MINUTE))
    models = _owner_models(victim) if rng.random() < 0.5 else {"gpt-4o": 1.0}
    abuser = replace(
        _attacker(
            ctx,
            ips,
            ua,
            models=models,
            prompt=float(rng.uniform(800, 2000)),
            completion=float(rng.uniform(400, 1200)),
            rtt_ms=probe.rtt_ms,
        ),
    )
    rate = float(rng.uniform(3, 12)) * ctx.rate
    abuse_ts = poisson_times(rng, abuse_start, _bursty_rate(rng, rate, int(abuse_minutes)))
    abuse = render(abuser, abuse_ts, rng, key=victim.index, incident=incident)
    return Outcome(
        Columns.concat([sweep, found, abuse]),
        f"Credential stuffing from {n_addr} hosting addresses in "
        f"{', '.join(COUNTRIES[c].name for c in countries)}: {count} attempts with "
        f"{len(set(keys))} invalid keys (401) over ~{sweep_ms // MS_PER_MINUTE} min at "
        f"~{rate_s:.1f}/s; the sweep hits a valid key, which is then abused from the same "
        f"addresses at ~{rate:.0f} req/min for ~{abuse_minutes} min.",
        countries,
        {"invalid_key_attempts": count, "invalid_keys": len(set(keys))},
    )


def key_resale(ctx, victim, rng, window, incident) -> Outcome:
    clock = ctx.clock
    duration = int(rng.uniform(12, 36) * 60)
    start = _pick_start(rng, victim, clock, window, duration, "any")
    end = min(start + duration, clock.minutes)
    n_buyers = int(rng.integers(20, 61))
    pool = [c for c in COUNTRY_WEIGHTS if c != victim.country]
    n_countries = int(rng.integers(8, min(20, len(pool)) + 1))
    chosen = list(rng.choice(pool, size=n_countries, replace=False))
    buyer_countries = chosen + [_one_of(rng, chosen) for _ in range(n_buyers - n_countries)]
    parts = []
    for country in buyer_countries:
        network = str(rng.choice(["residential", "mobile", "hosting"], p=[0.55, 0.2, 0.25]))
        blocks = blocks_for(country, network) or blocks_for(country, "residential")
        ip = sample_ips(rng, blocks, 1)
        profile = _attacker(
            ctx,
            ip,
            _one_of(rng, RESALE_UAS),
            models={"gpt-4o": 0.4, "claude-3-5-sonnet": 0.35, "gpt-4o-mini": 0.25},
            prompt=float(rng.uniform(400, 1800)),
            completion=float(rng.uniform(200, 700)),
            rtt_ms=network_rtt(blocks[0].network, country),
        )
        join = start + int(rng.uniform(0, 0.3) * (end - start))
        hour, weekday, _ = clock.local(COUNTRIES[country].timezones[0])
        span = slice(join, end)
        rate = float(rng.lognormal(np.log(0.12), 0.8)) * ctx.rate
        lam = rate * consumer_curve(hour[span], weekday[span], 1.2) * 2.0
        ts = poisson_times(rng, clock.ms_at_minute(join), lam)
        parts.append(render(profile, ts, rng, key=victim.index, incident=incident))
    cols = Columns.concat(parts)
    return Outcome(
        cols,
        f"Key of a {victim.kind} in {victim.country} resold: {n_buyers} buyers in "
        f"{n_countries} countries use it at their own local hours for "
        f"~{(end - start) / 60:.0f} h, alongside the owner.",
        sorted(set(chosen)),
        {"buyers": n_buyers, "countries": n_countries},
    )


def llm_jacking(ctx, victim, rng, window, incident) -> Outcome:
    clock = ctx.clock
    targets = [m for m in JACKING_TARGETS if m not in victim.model_names]
    target = targets[0]
    gap = int(rng.uniform(10, 120))
    burst = int(rng.uniform(30, 150))
    start = _pick_start(rng, victim, clock, window, gap + burst, "any")
    network = "hosting" if rng.random() < 0.7 else "residential"
    country = _foreign_country(rng, victim.country, network, other_continent=False)
    ips = sample_ips(rng, blocks_for(country, network), 1)
    ua = _one_of(rng, ATTACKER_UAS)
    t0 = int(clock.ms_at_minute(start)) + int(rng.integers(0, MS_PER_MINUTE))
    rtt = network_rtt(network, country)
    base = _attacker(ctx, ips, ua, models={target: 1.0}, prompt=1.0, completion=1.0, rtt_ms=rtt)
    quiet = replace(base, p_5xx=0.0, p_429=0.0, p_400=0.0)
    parts = []
    if rng.random() < 0.6:  # list the models the key can reach first
        parts.append(
            render(
                quiet,
                np.array([t0 - int(rng.uniform(3, 60) * 1000)]),
                rng,
                key=victim.index,
                incident=incident,
                endpoint=LIST_MODELS,
            )
        )
    probe_prompt = int(rng.integers(8, 30))
    parts.append(
        render(
            replace(quiet, fixed_prompt=probe_prompt, fixed_completion=1),
            np.array([t0]),
            rng,
            key=victim.index,
            incident=incident,
            endpoint=CHAT,
            model=MODEL_INDEX[target],
        )
    )
    burst_start = start + gap
    burst = _minutes_left(clock, burst_start, burst)
    rate = float(rng.uniform(2, 8)) * ctx.rate
    jack = _attacker(
        ctx,
        ips,
        ua,
        models={target: 1.0},
        prompt=float(rng.uniform(800, 2500)),
        completion=float(rng.uniform(2000, 3500)),
        rtt_ms=rtt,
        completion_sigma=0.3,
    )
    if burst_start < clock.minutes:
        ts = poisson_times(rng, clock.ms_at_minute(burst_start), _bursty_rate(rng, rate, burst))
        parts.append(render(jack, ts, rng, key=victim.index, incident=incident, endpoint=CHAT))
    return Outcome(
        Columns.concat(parts),
        f"LLM-jacking from a {network} address in {COUNTRIES[country].name}: one probe with "
        f"{target} (never used by this key), then after {gap} min a burst of long "
        f"{target} completions at ~{rate:.0f} req/min for ~{burst} min.",
        [country],
        {"model": target},
    )


def slow_and_low(ctx, victim, rng, window, incident) -> Outcome:
    clock = ctx.clock
    duration = int(rng.uniform(8, 30) * 60)
    start = _pick_start(rng, victim, clock, window, duration, "any")
    duration = _minutes_left(clock, start, duration)
    country = _foreign_country(rng, victim.country, "hosting", other_continent=False)
    block = _one_of(rng, blocks_for(country, "hosting"))
    ips = sample_ips(rng, [block], 1)
    ua = _dominant_ua(victim.main)
    profile = replace(
        victim.main,
        ips=ips,
        ip_weights=np.ones(1),
        uas=np.array([ua], dtype=np.int32),
        ua_p=np.ones(1),
        ip_ua=None,
        ip_daily_churn=False,
        rtt_ms=network_rtt("hosting", country),
    )
    rate = float(np.clip(victim.mean_rate * rng.uniform(0.1, 0.25), 0.03, 1.0)) * ctx.rate
    lam = np.full(duration, rate) * rng.lognormal(0, 0.15, duration)
    ts = poisson_times(rng, clock.ms_at_minute(start), lam)
    cols = render(profile, ts, rng, key=victim.index, incident=incident)
    return Outcome(
        cols,
        f"Slow-and-low misuse from a {block.provider} address in {COUNTRIES[country].name}: "
        f"~{rate * 60:.0f} ordinary-looking requests per hour (owner's user agent, models "
        f"and sizes) for ~{duration / 60:.0f} h, around the clock.",
        [country],
    )


SCENARIO_FUNCTIONS: dict[str, Callable[..., Outcome]] = {
    "leaked_key_abroad": leaked_key_abroad,
    "leaked_key_domestic_vps": leaked_key_domestic_vps,
    "runaway_loop": runaway_loop,
    "token_drain": token_drain,
    "credential_stuffing": credential_stuffing,
    "key_resale": key_resale,
    "llm_jacking": llm_jacking,
    "slow_and_low": slow_and_low,
}


def eligible(scenario: str, tenant: Tenant, *, strict: bool = True) -> bool:
    """Whether a tenant can plausibly be the victim of a scenario (`strict=False`
    keeps only what the scenario cannot do without)."""
    if strict and (tenant.kind not in ELIGIBLE_KINDS[scenario]
                   or tenant.archetype not in PLAIN_ARCHETYPES):
        return False
    if scenario == "leaked_key_domestic_vps":
        return bool(blocks_for(tenant.country, "hosting"))
    if scenario == "llm_jacking":
        return any(m not in tenant.model_names for m in JACKING_TARGETS)
    return True


@dataclass
class PlannedIncident:
    scenario: str
    victim: Tenant
    window: tuple[int, int]  # minutes
    period: str


def plan(
    rng: np.random.Generator,
    tenants: list[Tenant],
    clock: Clock,
    test_start_minute: int,
    *,
    extra_test: int,
    train: int,
) -> list[PlannedIncident]:
    """Every scenario once in the test period, plus extras there and a few in training.

    Victims are distinct while keys last. Training-period incidents start after the
    first day, so a detector's warm-up is clean even if its training data is not.
    """
    used: set[int] = set()

    def victim_for(scenario: str) -> Tenant:
        pool = [t for t in tenants if eligible(scenario, t)]
        if not pool:  # tiny populations: any key that meets the hard requirement
            pool = [t for t in tenants if eligible(scenario, t, strict=False)]
        fresh = [t for t in pool if t.index not in used] or pool
        victim = fresh[int(rng.integers(len(fresh)))]
        used.add(victim.index)
        return victim

    test_window = (test_start_minute, clock.minutes)
    planned = [
        PlannedIncident(s, victim_for(s), test_window, "test")
        for s in rng.permutation(list(SCENARIOS)).tolist()
    ]
    extras = (
        "leaked_key_abroad",
        "runaway_loop",
        "token_drain",
        "slow_and_low",
        "llm_jacking",
        "leaked_key_domestic_vps",
    )
    for _ in range(extra_test):
        s = _one_of(rng, extras)
        planned.append(PlannedIncident(s, victim_for(s), test_window, "test"))
    train_lo = min(1440, test_start_minute // 2)
    if test_start_minute - train_lo >= 720:
        train_kinds = ("leaked_key_abroad", "runaway_loop", "token_drain", "credential_stuffing")
        for _ in range(train):
            s = _one_of(rng, train_kinds)
            planned.append(
                PlannedIncident(s, victim_for(s), (train_lo, test_start_minute), "train")
            )
    return planned
