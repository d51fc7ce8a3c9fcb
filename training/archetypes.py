"""Legitimate workloads that break naive detectors, each with parameter ranges.

The plain tenants of `training.tenants` (backends, apps, developers, nightly jobs) are
joined by the surprises a real population is full of. Each is legitimate, and each looks
like something a detector is built to catch:

- `new_key`: a key created in the judged days whose first day is its heaviest (an
  onboarding backfill of hours at many times its later rate): volume with no baseline;
- `ci_runner`: CI pipelines calling the API from a fresh cloud or VPS (hosting-ASN)
  address on every run: a new datacenter network many times a day;
- `region_migration`: a backend moving to another cloud region (another country, maybe
  another provider) over a cutover of hours: the key's whole identity changes;
- `app_launch`: a mobile app launched in a new country: thousands of new addresses in a
  country the key never saw, at that country's hours;
- weekly and month-end batch jobs (`training.tenants.BatchJob`) and the travelling
  developer (`training.tenants._plan_travel`) live beside the plain kinds.

`specialise` draws an archetype's parameters (ranges in `RANGES`, then the seed's
perturbation) when the population is built; `shape` lays them over the key's schedule.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from training.networks import CLOUD_HOME, COUNTRIES, blocks_for, sample_ips
from training.tenants import (
    COUNTRY_WEIGHTS,
    Stream,
    Tenant,
    _mobile_profile,
    _one_of,
    consumer_curve,
    network_rtt,
)
from training.traffic import MODEL_INDEX, MS_PER_MINUTE, TAG_INDEX, Clock, poisson_times

if TYPE_CHECKING:
    from training.tenants import Draw

RANGES: dict[str, dict[str, tuple[float, float]]] = {
    "new_key": {"backfill_hours": (2.0, 8.0), "backfill_factor": (3.0, 15.0)},
    "ci_runner": {"runs_per_workday": (2.0, 20.0), "requests_per_run": (5.0, 80.0),
                  "run_minutes": (2.0, 12.0)},
    "region_migration": {"ramp_hours": (0.5, 12.0)},
    "app_launch": {"market_factor": (0.3, 1.5), "ramp_hours": (6.0, 24.0)},
}
"""Parameter ranges per archetype (uniform; rates are further scaled by the
perturbation of the seed)."""

CI_UAS = ("python-requests/2.32.3", "openai-python/1.54.3", "python-httpx/0.27.2",
          "OpenAI/JS 4.71.1", "Go-http-client/2.0")


def _uniform(rng: np.random.Generator, archetype: str, name: str) -> float:
    return float(rng.uniform(*RANGES[archetype][name]))


def _judged_minute(rng: np.random.Generator, clock: Clock, tz: str, test_start: int,
                   hours: tuple[float, float]) -> int:
    """A minute on the first judged day between local `hours`."""
    hour, _, _ = clock.local(tz)
    lo, hi = test_start, min(clock.minutes, test_start + 1440)
    ok = np.flatnonzero((hour[lo:hi] >= hours[0]) & (hour[lo:hi] < hours[1])) + lo
    return int(_one_of(rng, ok)) if len(ok) else lo


def specialise(tenant: Tenant, rng: np.random.Generator, draw: Draw) -> None:
    """Draw the archetype's own parameters (nothing for the plain archetypes)."""
    maker = _SPECIALISE.get(tenant.archetype)
    if maker is not None:
        maker(tenant, rng, draw)


def _new_key(tenant: Tenant, rng: np.random.Generator, draw: Draw) -> None:
    birth = _judged_minute(rng, draw.clock, tenant.tz, draw.test_start_minute, (8.0, 12.0))
    tenant.details["new_key"] = {
        "birth_minute": birth,
        "backfill_hours": round(_uniform(rng, "new_key", "backfill_hours"), 2),
        "backfill_factor": round(_uniform(rng, "new_key", "backfill_factor"), 2),
    }


def _ci_runner(tenant: Tenant, rng: np.random.Generator, draw: Draw) -> None:
    home = CLOUD_HOME.get(tenant.country, tenant.country)
    pool = ["US", home] if blocks_for("US", "cloud") else [home]
    blocks = [b for c in pool for b in blocks_for(c, "cloud")]
    if rng.random() < 0.5 and blocks_for(tenant.country, "hosting"):
        blocks += blocks_for(tenant.country, "hosting")  # self-hosted runners on VPSs
    ua = draw.ua_vocab.add(_one_of(rng, CI_UAS))
    tenant.profiles[0] = replace(
        tenant.main, uas=np.array([ua], dtype=np.int32), ua_p=np.ones(1), ip_ua=None,
        chat_models=np.array([MODEL_INDEX["gpt-4o-mini"]]), chat_model_p=np.ones(1),
        prompt_median=tenant.main.prompt_median * 0.4,
        completion_median=tenant.main.completion_median * 0.4)
    tenant.details["ci"] = {
        "blocks": [b.cidr for b in blocks],
        "runs_per_workday": round(_uniform(rng, "ci_runner", "runs_per_workday")
                                  * draw.perturb.rate_of("ci_runner"), 2),
        "requests_per_run": round(_uniform(rng, "ci_runner", "requests_per_run"), 1),
        "run_minutes": round(_uniform(rng, "ci_runner", "run_minutes"), 1),
    }


def _region_migration(tenant: Tenant, rng: np.random.Generator, draw: Draw) -> None:
    old = tenant.main
    home = CLOUD_HOME.get(tenant.country, tenant.country)
    others = sorted({b.country for b in blocks_for(network="cloud")} - {home})
    target = _one_of(rng, others)
    ips = sample_ips(rng, [_one_of(rng, blocks_for(target, "cloud"))], len(old.ips))
    tenant.profiles.append(replace(old, ips=ips, rtt_ms=network_rtt("cloud", target)))
    start = _judged_minute(rng, draw.clock, tenant.tz, draw.test_start_minute, (9.0, 17.0))
    tenant.details["migration"] = {
        "to_country": target, "start_minute": start,
        "ramp_hours": round(_uniform(rng, "region_migration", "ramp_hours"), 2),
    }


def _app_launch(tenant: Tenant, rng: np.random.Generator, draw: Draw) -> None:
    options = [c for c in COUNTRY_WEIGHTS if c != tenant.country
               and blocks_for(c, ("residential", "mobile"))]
    market = _one_of(rng, options)
    profile = _mobile_profile(rng, market, draw.ua_vocab, str(tenant.details["app"]),
                              draw.perturb.model_mix)
    # the same app: its builds' user agents, its models and sizes
    home = tenant.main
    ip_ua = home.ip_ua[rng.integers(0, len(home.ip_ua), len(profile.ips))] \
        if home.ip_ua is not None else None
    profile = replace(profile, uas=home.uas, ua_p=home.ua_p, ip_ua=ip_ua,
                      chat_models=home.chat_models, chat_model_p=home.chat_model_p,
                      prompt_median=home.prompt_median, completion_median=home.completion_median)
    tenant.profiles.append(profile)
    tz = COUNTRIES[market].timezones[0]
    start = _judged_minute(rng, draw.clock, tz, draw.test_start_minute, (6.0, 10.0))
    tenant.details["launch"] = {
        "country": market, "timezone": tz, "start_minute": start,
        "market_factor": round(_uniform(rng, "app_launch", "market_factor"), 2),
        "ramp_hours": round(_uniform(rng, "app_launch", "ramp_hours"), 2),
    }


_SPECIALISE = {"new_key": _new_key, "ci_runner": _ci_runner,
               "region_migration": _region_migration, "app_launch": _app_launch}


# ---- shapes over the schedule -----------------------------------------------------------
def shape(tenant: Tenant, clock: Clock, rng: np.random.Generator) -> None:
    """Lay the archetype over the key's filled schedule (`lam`, `loc`, `tag`, streams)."""
    shaper = _SHAPE.get(tenant.archetype)
    if shaper is not None:
        shaper(tenant, clock, rng)


def _shape_new_key(tenant: Tenant, clock: Clock, rng: np.random.Generator) -> None:
    info = tenant.details["new_key"]
    birth = int(info["birth_minute"])
    backfill = int(info["backfill_hours"] * 60)
    tenant.lam[:birth] = 0.0
    ramp = rng.gamma(4.0, 1 / 4.0, backfill)
    tenant.lam[birth:birth + backfill] += tenant.peak_rate * info["backfill_factor"] * ramp[
        : max(0, min(backfill, clock.minutes - birth))]
    tenant.tag[birth:birth + 1440] = TAG_INDEX["first_day"]


def _shape_migration(tenant: Tenant, clock: Clock, rng: np.random.Generator) -> None:
    info = tenant.details["migration"]
    start = int(info["start_minute"])
    minute = np.arange(clock.minutes)
    share = np.clip((minute - start) / max(info["ramp_hours"] * 60, 1.0), 0.0, 1.0)
    tenant.loc[:] = (rng.random(clock.minutes) < share).astype(np.int8)
    moving = (minute >= start) & (tenant.tag == -1)
    tenant.tag[moving] = TAG_INDEX["migration"]


def _shape_launch(tenant: Tenant, clock: Clock, rng: np.random.Generator) -> None:
    info = tenant.details["launch"]
    start = int(info["start_minute"])
    hour, weekday, _ = clock.local(str(info["timezone"]))
    minute = np.arange(clock.minutes)
    ramp = np.clip((minute - start) / max(info["ramp_hours"] * 60, 1.0), 0.0, 1.0)
    lam = tenant.peak_rate * info["market_factor"] * consumer_curve(hour, weekday, 1.2) * ramp
    times = poisson_times(rng, clock.start_ms, lam)
    tenant.streams.append(Stream(tenant.profiles[1], times, TAG_INDEX["launch"]))


def _shape_ci(tenant: Tenant, clock: Clock, rng: np.random.Generator) -> None:
    """Runs on working days between 08:00 and 20:00 local, each from a fresh address."""
    info = tenant.details["ci"]
    blocks = [b for b in blocks_for(network=("cloud", "hosting")) if b.cidr in info["blocks"]]
    hour, weekday, local_day = clock.local(tenant.tz)
    for day in np.unique(local_day):
        minutes = np.flatnonzero((local_day == day) & (hour >= 8) & (hour < 20))
        if not len(minutes) or weekday[minutes[0]] >= 5:
            continue
        for _ in range(int(rng.poisson(info["runs_per_workday"]))):
            start_ms = int(clock.ms_at_minute(int(_one_of(rng, minutes))))
            count = max(1, int(rng.poisson(info["requests_per_run"])))
            span_ms = info["run_minutes"] * MS_PER_MINUTE * rng.uniform(0.5, 1.5)
            times = np.sort(start_ms + (rng.random(count) * span_ms).astype(np.int64))
            ip = sample_ips(rng, blocks, 1)
            profile = replace(tenant.main, ips=ip, ip_weights=np.ones(1))
            tenant.streams.append(Stream(profile, times, TAG_INDEX["ci_run"]))


_SHAPE = {"new_key": _shape_new_key, "region_migration": _shape_migration,
          "app_launch": _shape_launch, "ci_runner": _shape_ci}
