"""Labelled API-key traffic for evaluating keywatch: `simulate(out_dir)`.

A detector can only be judged on traffic that looks like the real thing, with the
truth written down beside it. This module draws a population of keys (backends,
nightly batch jobs, mobile apps, developers; see `training.tenants`) and the legitimate
archetypes that break naive detectors (weekly and month-end jobs, a new key's heavy first
day, CI runners on rotating datacenter addresses, a region migration, an app launch in a
new country, travelling developers; see `training.archetypes`), lets them work for `days`
days in their own time zones, lays a population-wide flash sale and an upstream outage
over that, injects labelled incidents of every kind (`training.incidents`), and writes:

- `events.jsonl`: the public event contract only (what a gateway would POST), sorted
  by timestamp. No labels, no geolocation: keywatch looks addresses up itself.
- `labels.jsonl`: one line per event line, same order: `line` (0-based index of the
  event line), `incident_id`, `scenario`, `key`, `tenant_kind`, `benign_tag`.
- `incidents.json`: every incident with its victim key(s), span and description.
- `meta.json`: seed, span, `test_start` (the last two days are the test period),
  counts, the flash-sale window, the traveller, and a per-key summary.

Everything follows from the seed (numpy Generators, a fixed default start, no wall
clock), so the same arguments give byte-identical files. `perturb=True` also redraws
the generator's parameters from the seed (`training.perturb`), for evaluations that
must not be tunable to one set of constants. Each tenant and incident has
its own random stream, so adding a scenario does not reshuffle the others.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from training import incidents as incident_mod
from training.archetypes import shape, specialise
from training.incidents import SCENARIOS, Incident, IncidentContext
from training.networks import ip_strings
from training.perturb import Perturbation
from training.tenants import (
    ARCHETYPES,
    CHAT_MODEL_WEIGHTS,
    TENANT_KINDS,
    Draw,
    Tenant,
    build_population,
    describe,
    schedule,
)
from training.tenants import generate_baseline as tenant_events
from training.traffic import (
    BENIGN_TAGS,
    ENDPOINTS,
    METHODS,
    MODELS,
    TAG_INDEX,
    Clock,
    Columns,
    Vocab,
)

DEFAULT_START = datetime(2026, 11, 2, tzinfo=UTC)
"""A Monday. Fixed so that output depends on the seed alone. Its span has no month end,
so month-end jobs stay idle; a perturbed simulation (`perturb=True`) always puts a month
end in the judged days."""

TEST_DAYS = 2
"""The last two days are the test period: evaluate there, train before it."""

FORMAT_VERSION = 1

_STREAM_POPULATION = 1
_STREAM_SCHEDULE = 1_000
_STREAM_BASELINE = 2_000
_STREAM_INCIDENT = 3_000
_STREAM_EVENTS = 4
_STREAM_PERTURB = 5


@dataclass(frozen=True)
class SimulationSummary:
    """What `simulate` wrote."""

    out_dir: Path
    events_path: Path
    labels_path: Path
    incidents_path: Path
    meta_path: Path
    events: int
    incident_events: int
    incidents: int
    test_incidents: int
    keys: int
    days: int
    seed: int
    start: str
    test_start: str
    by_scenario: dict[str, int] = field(default_factory=dict)


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream])


def iso(ms: int) -> str:
    """Epoch milliseconds as RFC 3339 UTC with a `Z`."""
    text = datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


def _flash_sale(
    rng: np.random.Generator, tenants: list[Tenant], clock: Clock, test_start_minute: int
) -> dict[str, object]:
    """A population-wide, legitimate surge: most apps and backends several times busier
    for two hours in the test period (where it is daytime or evening), with the platform
    pushing back (more 429s and 5xx)."""
    test_days = max(1, (clock.minutes - test_start_minute) // 1440)
    day = int(rng.integers(test_days))
    hour = float(rng.uniform(13.0, 19.0))
    start = min(test_start_minute + day * 1440 + int(hour * 60), clock.minutes - 120)
    start = max(start, 0)
    end = min(start + 120, clock.minutes)
    minute = np.arange(start, end)
    ramp = 1.0 / (1.0 + np.exp(-(minute - start - 8) / 3.0))
    ramp *= 1.0 / (1.0 + np.exp((minute - end + 10) / 4.0))
    affected = []
    for tenant in tenants:
        if tenant.kind not in ("mobile_app", "backend_service", "batch_job"):
            continue
        local_hour = clock.local(tenant.tz)[0][start]
        if rng.random() > 0.9 or not 7.0 <= local_hour < 23.5:
            continue  # the shoppers of this key's market are asleep
        factor = float(rng.lognormal(np.log(4.0), 0.3))
        tenant.lam[start:end] *= 1.0 + (factor - 1.0) * ramp
        tenant.tag[start:end] = TAG_INDEX["flash_sale"]
        tenant.stress[start:end] = np.maximum(tenant.stress[start:end], 1.0 + 3.0 * ramp)
        tenant.details["flash_sale_factor"] = round(factor, 2)
        affected.append(tenant.key)
    return {
        "start": iso(int(clock.ms_at_minute(start))),
        "end": iso(int(clock.ms_at_minute(end))),
        "start_minute": start,
        "keys_affected": len(affected),
        "keys": affected,
    }


def _upstream_outage(
    rng: np.random.Generator,
    tenants: list[Tenant],
    clock: Clock,
    test_start_minute: int,
    avoid_minute: int,
) -> dict[str, object]:
    """An upstream provider fails for a quarter of an hour: every key sees 502/503/504
    and clients retry. Legitimate, platform-wide, and it looks like a failure-rate spike."""
    minutes = int(rng.uniform(12, 25))
    candidates = np.arange(test_start_minute, max(test_start_minute + 1, clock.minutes - minutes))
    far = candidates[np.abs(candidates - avoid_minute) > 240]
    start = int(rng.choice(far if len(far) else candidates))
    end = min(start + minutes, clock.minutes)
    minute = np.arange(start, end)
    severity = float(rng.uniform(0.3, 0.6))
    shape = np.sin(np.pi * (minute - start + 0.5) / max(end - start, 1)) ** 0.5
    for tenant in tenants:
        tenant.outage[start:end] = severity * shape
        tenant.lam[start:end] *= 1.0 + 0.3 * shape  # clients retry
        free = tenant.tag[start:end] == -1
        tenant.tag[start:end][free] = TAG_INDEX["upstream_outage"]
    return {
        "start": iso(int(clock.ms_at_minute(start))),
        "end": iso(int(clock.ms_at_minute(end))),
        "peak_failure_rate": round(severity, 3),
    }


def draw_perturbation(seed: int, days: int) -> Perturbation:
    """The perturbation `simulate(..., perturb=True)` uses for this seed."""
    return Perturbation.draw(
        _rng(seed, _STREAM_PERTURB),
        archetypes=ARCHETYPES,
        scenarios=SCENARIOS,
        models=tuple(CHAT_MODEL_WEIGHTS),
        days=days,
    )


def simulate(
    out_dir: Path,
    *,
    keys: int = 60,
    days: int = 7,
    seed: int = 0,
    start: datetime | None = None,
    progress: bool = False,
    perturb: bool | Perturbation = False,
) -> SimulationSummary:
    """Write a labelled traffic simulation to `out_dir` and summarise it.

    `keys` >= 8 and `days` >= 1. The test period is the last two days (all of it when
    `days` <= 2); every scenario has at least one incident there. `perturb=True` redraws
    rates, sizes, schedules, the model mix and the calendar from the seed
    (`draw_perturbation`); a `Perturbation` is used as given.
    """
    perturbation = _perturbation(keys, days, seed, perturb)
    start = _utc_minute(start or perturbation.start or DEFAULT_START)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    clock = Clock(start, days)
    test_start_minute = max(0, days - TEST_DAYS) * 1440
    key_vocab, ua_vocab = Vocab(), Vocab()
    bar = tqdm(total=keys + 10 + 3, desc="simulate", unit="step", disable=not progress)
    world = _World(clock, test_start_minute, key_vocab, ua_vocab, perturbation, seed)
    tenants, parts, calendar = _tenant_traffic(world, keys, bar)

    planned = incident_mod.plan(
        _rng(seed, _STREAM_POPULATION + 2),
        tenants,
        clock,
        test_start_minute,
        extra_test=max(0, round(keys / 30)),
        train=max(1, round(keys / 25)),
    )
    planned.sort(key=lambda p: (p.period != "train", p.window[0]))
    ctx = IncidentContext(clock, ua_vocab, key_vocab, perturbation)
    bar.total = keys + len(planned) + 3
    records = _run_incidents(ctx, planned, seed, parts, bar)
    events = _number_incidents(records, parts)
    bar.update(1)
    paths = _write_outputs(out_dir, world, keys, events, records, tenants, calendar, bar)
    bar.close()

    by_scenario = {s: sum(r.scenario == s for r in records) for s in SCENARIOS}
    return SimulationSummary(
        out_dir=out_dir,
        events_path=paths["events"],
        labels_path=paths["labels"],
        incidents_path=paths["incidents"],
        meta_path=paths["meta"],
        events=len(events),
        incident_events=int((events.incident >= 0).sum()),
        incidents=len(records),
        test_incidents=sum(r.period == "test" for r in records),
        keys=keys,
        days=days,
        seed=seed,
        start=iso(clock.start_ms),
        test_start=iso(int(clock.ms_at_minute(test_start_minute))),
        by_scenario=by_scenario,
    )


def _perturbation(keys: int, days: int, seed: int, perturb: bool | Perturbation
                  ) -> Perturbation:
    """The simulation's perturbation, once its size is known to be valid."""
    if keys < 8:
        raise ValueError(f"keys must be at least 8 (one victim per scenario), got {keys}")
    if days < 1:
        raise ValueError(f"days must be at least 1, got {days}")
    if perturb is True:
        return draw_perturbation(seed, days)
    return perturb if isinstance(perturb, Perturbation) else Perturbation()


def _utc_minute(start: datetime) -> datetime:
    if start.tzinfo is None:
        start = start.replace(tzinfo=UTC)
    return start.astimezone(UTC).replace(second=0, microsecond=0)


@dataclass(frozen=True)
class _World:
    """What every part of one simulation shares: its calendar, vocabularies and seed."""

    clock: Clock
    test_start_minute: int
    key_vocab: Vocab
    ua_vocab: Vocab
    perturbation: Perturbation
    seed: int


def _tenant_traffic(world: _World, keys: int, bar: Any
                    ) -> tuple[list[Tenant], list[Columns], dict[str, Any]]:
    """The tenants, their legitimate traffic (one part each) and the platform's calendar
    (the flash sale, the upstream outage)."""
    seed, clock = world.seed, world.clock
    tenants = build_population(_rng(seed, _STREAM_POPULATION), keys, clock, world.key_vocab,
                               world.ua_vocab, perturb=world.perturbation,
                               test_start_minute=world.test_start_minute)
    draw = Draw(clock, world.key_vocab, world.ua_vocab, world.perturbation,
                world.test_start_minute)
    special = _rng(seed, _STREAM_POPULATION + 4)
    for i, tenant in enumerate(tenants):
        specialise(tenant, special, draw)
        rng = _rng(seed, _STREAM_SCHEDULE + i)
        schedule(tenant, clock, rng)
        shape(tenant, clock, rng)
    flash = _flash_sale(_rng(seed, _STREAM_POPULATION + 1), tenants, clock,
                        world.test_start_minute)
    outage = _upstream_outage(_rng(seed, _STREAM_POPULATION + 3), tenants, clock,
                              world.test_start_minute, int(flash.pop("start_minute")))
    parts: list[Columns] = []
    for i, tenant in enumerate(tenants):
        parts.append(tenant_events(tenant, clock, _rng(seed, _STREAM_BASELINE + i)))
        bar.update(1)
    return tenants, parts, {"flash_sale": flash, "upstream_outage": outage}


def _write_outputs(out_dir: Path, world: _World, keys: int, events: Columns,
                   records: list[Incident], tenants: list[Tenant], calendar: dict[str, Any],
                   bar: Any) -> dict[str, Path]:
    """events.jsonl, labels.jsonl, incidents.json and meta.json."""
    paths = {
        "events": out_dir / "events.jsonl",
        "labels": out_dir / "labels.jsonl",
        "incidents": out_dir / "incidents.json",
        "meta": out_dir / "meta.json",
    }
    _write_events(paths["events"], events, world.key_vocab, world.ua_vocab)
    bar.update(1)
    _write_labels(paths["labels"], events, world.key_vocab, tenants, records)
    _write_incidents(paths["incidents"], records)
    clock = world.clock
    test_start_ms = int(clock.ms_at_minute(world.test_start_minute))
    kind_of_key = {t.index: t.kind for t in tenants}
    meta = _meta(world.seed, keys, clock, test_start_ms, events, records, tenants, kind_of_key)
    meta.update(calendar)
    travels = _travels(tenants, clock)
    meta["travel"] = travels[0] if travels else None
    meta["travels"] = travels
    perturbation = world.perturbation
    meta["perturbation"] = None if perturbation.is_identity else perturbation.describe()
    meta["tenants"] = [describe(t) for t in tenants]
    paths["meta"].write_text(json.dumps(meta, indent=2) + "\n")
    bar.update(1)
    return paths


def _run_incidents(
    ctx: IncidentContext, planned: list, seed: int, parts: list[Columns], bar: tqdm
) -> list[Incident]:
    """Inject every planned incident: its events go to `parts`, its truth is returned."""
    clock = ctx.clock
    records: list[Incident] = []
    for j, item in enumerate(planned):
        rng = _rng(seed, _STREAM_INCIDENT + j)
        outcome = incident_mod.SCENARIO_FUNCTIONS[item.scenario](
            ctx.scaled_for(item.scenario), item.victim, rng, item.window, j
        )
        cols = outcome.columns
        keep = (cols.ts_ms >= clock.start_ms) & (cols.ts_ms < clock.end_ms)
        cols = cols.take(np.flatnonzero(keep))
        parts.append(cols)
        sources = np.unique(cols.ip[cols.key == item.victim.index])
        records.append(
            Incident(
                id="",
                scenario=item.scenario,
                victim_keys=[item.victim.key],
                start_ms=int(cols.ts_ms.min()) if len(cols) else 0,
                end_ms=int(cols.ts_ms.max()) if len(cols) else 0,
                period=item.period,
                description=outcome.description,
                source_ips=ip_strings(sources[:60]),
                source_countries=outcome.countries,
                events=len(cols),
                details=outcome.details,
            )
        )
        bar.update(1)
    return records


def _number_incidents(records: list[Incident], parts: list[Columns]) -> Columns:
    """Number incidents by start time (inc-001 is the earliest, `records` is reordered in
    place) and return every event, sorted by time, with the new numbers."""
    order = sorted(range(len(records)), key=lambda j: (records[j].start_ms, j))
    renumber = np.full(len(records) + 1, -1, dtype=np.int16)
    for new, old in enumerate(order):
        records[old].id = f"inc-{new + 1:03d}"
        renumber[old] = new
    records[:] = [records[j] for j in order]
    events = Columns.concat(parts)
    events.incident = renumber[events.incident]  # -1 stays -1 (last slot)
    return events.take(np.argsort(events.ts_ms, kind="stable"))


def _timestamps(ts_ms: np.ndarray) -> list[str]:
    text = np.datetime_as_string(ts_ms.astype("datetime64[ms]"), unit="ms")
    return [t + "Z" for t in text.tolist()]


def _write_events(path: Path, ev: Columns, keys: Vocab, uas: Vocab) -> None:
    key_json = [json.dumps(k) for k in keys.items]
    ua_json = [json.dumps(u) for u in uas.items]
    endpoint_json = [json.dumps(e) for e in ENDPOINTS]
    method_json = [json.dumps(m) for m in METHODS]
    model_json = [json.dumps(m) for m in MODELS] + ["null"]  # index -1 -> null
    unique_ips, ip_inverse = np.unique(ev.ip, return_inverse=True)
    ip_json = [f'"{s}"' for s in ip_strings(unique_ips)]
    prompt = ev.prompt_tokens.tolist()
    completion = ev.completion_tokens.tolist()
    latency = [f"{x:.1f}" for x in ev.latency_ms.tolist()]
    with path.open("w", encoding="utf-8", newline="\n") as out:
        lines = (
            f'{{"api_key":{key_json[k]},"timestamp":"{t}","endpoint":{endpoint_json[e]},'
            f'"method":{method_json[e]},"status":{s},"tokens":{p + c},'
            f'"prompt_tokens":{p},"completion_tokens":{c},"latency_ms":{lat},'
            f'"source_ip":{ip_json[i]},"user_agent":{ua_json[u]},"model":{model_json[m]}}}\n'
            for k, t, e, s, p, c, lat, i, u, m in zip(
                ev.key.tolist(),
                _timestamps(ev.ts_ms),
                ev.endpoint.tolist(),
                ev.status.tolist(),
                prompt,
                completion,
                latency,
                ip_inverse.tolist(),
                ev.ua.tolist(),
                ev.model.tolist(),
                strict=True,
            )
        )
        out.writelines(lines)


def _write_labels(
    path: Path,
    ev: Columns,
    keys: Vocab,
    tenants: list[Tenant],
    records: list[Incident],
) -> None:
    key_json = [json.dumps(k) for k in keys.items]
    kind_of_key = {t.index: t.kind for t in tenants}
    archetype_of_key = {t.index: t.archetype for t in tenants}
    kind_json = [json.dumps(kind_of_key.get(i, "invalid_key")) for i in range(len(keys))]
    arch_json = [json.dumps(archetype_of_key.get(i, "invalid_key")) for i in range(len(keys))]
    incident_json = [(json.dumps(r.id), json.dumps(r.scenario)) for r in records]
    incident_json.append(("null", "null"))  # index -1
    tag_json = [json.dumps(t) for t in BENIGN_TAGS] + ["null"]
    with path.open("w", encoding="utf-8", newline="\n") as out:
        out.writelines(
            f'{{"line":{n},"incident_id":{incident_json[inc][0]},'
            f'"scenario":{incident_json[inc][1]},"key":{key_json[k]},'
            f'"tenant_kind":{kind_json[k]},"archetype":{arch_json[k]},'
            f'"benign_tag":{tag_json[tag]}}}\n'
            for n, (inc, k, tag) in enumerate(
                zip(ev.incident.tolist(), ev.key.tolist(), ev.tag.tolist(), strict=True)
            )
        )


def _write_incidents(path: Path, records: list[Incident]) -> None:
    payload = [
        {
            "id": r.id,
            "scenario": r.scenario,
            "period": r.period,
            "victim_keys": r.victim_keys,
            "start": iso(r.start_ms),
            "end": iso(r.end_ms),
            "events": r.events,
            "description": r.description,
            "source_ips": r.source_ips,
            "source_countries": r.source_countries,
            **({"details": r.details} if r.details else {}),
        }
        for r in records
    ]
    path.write_text(json.dumps(payload, indent=2) + "\n")


_PERIODS_DOC = (
    "events with timestamp >= test_start are the test period (the last "
    f"{TEST_DAYS} days); earlier events are the training period"
)
_LABELS_DOC = (
    "labels.jsonl has one line per events.jsonl line in the same order; 'line' is "
    "the 0-based event line. incident_id/scenario are set only on events made by "
    "an incident (the owner's own traffic during an incident stays null); "
    "benign_tag marks legitimate surprises (" + ", ".join(BENIGN_TAGS) + "); "
    "archetype is the key's legitimate archetype (training.tenants.ARCHETYPES); "
    "tenant_kind is 'invalid_key' for keys that do not exist (credential stuffing)."
)
"""What meta.json says about the periods and the labels."""


def _meta(
    seed: int,
    keys: int,
    clock: Clock,
    test_start_ms: int,
    ev: Columns,
    records: list[Incident],
    tenants: list[Tenant],
    kind_of_key: dict[int, str],
) -> dict[str, object]:
    in_test = ev.ts_ms >= test_start_ms
    train_incidents = [r for r in records if r.period == "train"]
    kinds = np.array([kind_of_key.get(int(k), "invalid_key") for k in range(ev.key.max() + 1)])
    event_kinds = kinds[ev.key] if len(ev) else np.array([])
    tag_counts = {t: int((ev.tag == i).sum()) for i, t in enumerate(BENIGN_TAGS)}
    contamination = (
        f"{len(train_incidents)} incident(s) fall in the training period "
        f"({', '.join(r.id for r in train_incidents)}): training data is not perfectly clean."
        if train_incidents
        else "no incidents fall in the training period."
    )
    return {
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "keys": keys,
        "days": clock.days,
        "start": iso(clock.start_ms),
        "end": iso(clock.end_ms),
        "test_start": iso(test_start_ms),
        "test_end": iso(clock.end_ms),
        "periods": _PERIODS_DOC,
        "labels": _LABELS_DOC,
        "counts": {
            "events": len(ev),
            "train_events": int((~in_test).sum()),
            "test_events": int(in_test.sum()),
            "incident_events": int((ev.incident >= 0).sum()),
            "incident_events_test": int(((ev.incident >= 0) & in_test).sum()),
            "benign_tagged": tag_counts,
            "events_by_tenant_kind": {
                k: int((event_kinds == k).sum()) for k in (*TENANT_KINDS, "invalid_key")
            },
            "distinct_source_ips": len(np.unique(ev.ip)),
            "invalid_keys": len(kinds) - len(tenants),
        },
        "incidents": {
            "total": len(records),
            "test": sum(r.period == "test" for r in records),
            "train": len(train_incidents),
            "by_scenario": {s: sum(r.scenario == s for r in records) for s in SCENARIOS},
            "train_ids": [r.id for r in train_incidents],
            "training_contamination": contamination,
        },
    }


def _travels(tenants: list[Tenant], clock: Clock) -> list[dict[str, object]]:
    return [
        {
            "key": t.key,
            "from": t.country,
            "to": t.travel.destination,
            "departure": iso(int(clock.ms_at_minute(t.travel.depart_minute))),
            "arrival": iso(int(clock.ms_at_minute(t.travel.arrive_minute))),
        }
        for t in tenants
        if t.travel is not None
    ]
