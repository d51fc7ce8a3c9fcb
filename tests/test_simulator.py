"""The traffic simulator writes real-looking, correctly labelled, reproducible traffic.

Runs the real `simulate()` into temporary folders (a 1-day 20-key run and a 7-day
30-key run, about a second each) and reads the files back the way the evaluation
and the replay command will.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pytest
from geoip2fast import GeoIP2Fast

from features.contract import Event
from training.incidents import SCENARIOS
from training.networks import COUNTRIES, load_ip_blocks, sample_ips
from training.simulator import SimulationSummary, draw_perturbation, simulate
from training.tenants import ARCHETYPES

CONTRACT_FIELDS = {
    "api_key",
    "timestamp",
    "endpoint",
    "method",
    "status",
    "tokens",
    "prompt_tokens",
    "completion_tokens",
    "latency_ms",
    "source_ip",
    "user_agent",
    "model",
}
LABEL_FIELDS = {"line", "incident_id", "scenario", "key", "tenant_kind", "archetype", "benign_tag"}


@pytest.fixture(scope="module")
def geoip() -> GeoIP2Fast:
    return GeoIP2Fast(geoip2fast_data_file="geoip2fast-asn-ipv6.dat.gz")


def _read(summary: SimulationSummary) -> dict:
    events = [json.loads(line) for line in summary.events_path.read_text().splitlines()]
    labels = [json.loads(line) for line in summary.labels_path.read_text().splitlines()]
    return {
        "events": events,
        "labels": labels,
        "incidents": json.loads(summary.incidents_path.read_text()),
        "meta": json.loads(summary.meta_path.read_text()),
    }


def _ts(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@pytest.fixture(scope="module")
def day_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[SimulationSummary, dict]:
    summary = simulate(tmp_path_factory.mktemp("day"), keys=20, days=1, seed=3)
    return summary, _read(summary)


@pytest.fixture(scope="module")
def week_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[SimulationSummary, dict]:
    summary = simulate(tmp_path_factory.mktemp("week"), keys=30, days=7, seed=11)
    return summary, _read(summary)


# ----------------------------------------------------------------------------- files


def test_same_seed_gives_identical_bytes(tmp_path: Path) -> None:
    first = simulate(tmp_path / "a", keys=20, days=1, seed=5)
    second = simulate(tmp_path / "b", keys=20, days=1, seed=5)
    other = simulate(tmp_path / "c", keys=20, days=1, seed=6)
    for name in ("events.jsonl", "labels.jsonl", "incidents.json", "meta.json"):
        assert (first.out_dir / name).read_bytes() == (second.out_dir / name).read_bytes(), name
    assert first.events_path.read_bytes() != other.events_path.read_bytes()


def test_summary_matches_files(day_run) -> None:
    summary, data = day_run
    assert summary.events == len(data["events"]) == data["meta"]["counts"]["events"]
    assert summary.incidents == len(data["incidents"])
    assert summary.incident_events == sum(1 for lab in data["labels"] if lab["incident_id"])
    assert summary.keys == 20 and summary.days == 1 and summary.seed == 3
    assert summary.start == "2026-11-02T00:00:00.000Z"


def test_every_event_validates_against_the_contract(day_run) -> None:
    _, data = day_run
    for raw in data["events"]:
        assert set(raw) == CONTRACT_FIELDS  # no labels, no geolocation
        event = Event.model_validate(raw)
        assert event.tokens == (raw["prompt_tokens"] or 0) + (raw["completion_tokens"] or 0)
        assert raw["timestamp"].endswith("Z")


def test_events_are_sorted_and_inside_the_span(day_run) -> None:
    _, data = day_run
    times = [_ts(e["timestamp"]) for e in data["events"]]
    assert times == sorted(times)
    start, end = _ts(data["meta"]["start"]), _ts(data["meta"]["end"])
    assert start <= times[0] and times[-1] < end


def test_labels_align_line_for_line(day_run) -> None:
    _, data = day_run
    assert len(data["labels"]) == len(data["events"])
    incident_ids = {i["id"]: i["scenario"] for i in data["incidents"]}
    for n, (event, label) in enumerate(zip(data["events"], data["labels"], strict=True)):
        assert set(label) == LABEL_FIELDS
        assert label["line"] == n
        assert label["key"] == event["api_key"]
        if label["incident_id"] is None:
            assert label["scenario"] is None
        else:
            assert incident_ids[label["incident_id"]] == label["scenario"]


def test_keys_look_like_provider_keys(day_run) -> None:
    _, data = day_run
    tenant_keys = [t["key"] for t in data["meta"]["tenants"]]
    assert len(set(tenant_keys)) == 20
    for key in tenant_keys:
        assert re.fullmatch(r"sk-live-[0-9A-Za-z]{32}", key)


# ------------------------------------------------------------------------- incidents


@pytest.mark.parametrize("run", ["day_run", "week_run"])
def test_every_scenario_is_in_the_test_period(run: str, request) -> None:
    _, data = request.getfixturevalue(run)
    test_start = _ts(data["meta"]["test_start"])
    by_id = {i["id"]: i for i in data["incidents"]}
    in_test = {i["scenario"] for i in data["incidents"] if i["period"] == "test"}
    assert in_test == set(SCENARIOS)
    labelled = Counter()
    for event, label in zip(data["events"], data["labels"], strict=True):
        if label["incident_id"] and _ts(event["timestamp"]) >= test_start:
            labelled[label["scenario"]] += 1
    assert set(labelled) == set(SCENARIOS)
    for incident in data["incidents"]:
        assert incident["victim_keys"] and incident["description"]
        assert _ts(incident["start"]) <= _ts(incident["end"])
        if incident["period"] == "test":
            assert _ts(incident["start"]) >= test_start
    assert set(by_id) == {lab["incident_id"] for lab in data["labels"] if lab["incident_id"]}


def test_training_contamination_is_declared(week_run) -> None:
    _, data = week_run
    meta = data["meta"]
    train = [i for i in data["incidents"] if i["period"] == "train"]
    assert train, "a week-long run has a few incidents in the training days"
    assert meta["incidents"]["train_ids"] == [i["id"] for i in train]
    assert "not perfectly clean" in meta["incidents"]["training_contamination"]
    assert _ts(meta["test_start"]) == _ts(meta["start"]) + timedelta(days=5)
    for incident in train:
        assert _ts(incident["start"]) < _ts(meta["test_start"])


def _by_incident(data: dict, scenario: str) -> list[tuple[dict, list[tuple[dict, dict]]]]:
    """Each incident of a scenario with its labelled (event, label) pairs."""
    events: dict[str, list[tuple[dict, dict]]] = {}
    for event, label in zip(data["events"], data["labels"], strict=True):
        if label["scenario"] == scenario:
            events.setdefault(label["incident_id"], []).append((event, label))
    incidents = [i for i in data["incidents"] if i["scenario"] == scenario]
    assert incidents
    return [(i, events[i["id"]]) for i in incidents]


def test_runaway_loop_repeats_one_request_on_a_timer(week_run) -> None:
    _, data = week_run
    tenants = {t["key"]: t for t in data["meta"]["tenants"]}
    for incident, pairs in _by_incident(data, "runaway_loop"):
        served = [e for e, _ in pairs if e["status"] == 200]
        assert len({(e["endpoint"], e["model"], e["prompt_tokens"]) for e in served}) == 1
        assert len({(e["source_ip"], e["user_agent"]) for e, _ in pairs}) == 1
        gaps = np.diff([_ts(e["timestamp"]).timestamp() for e, _ in pairs])
        assert np.std(gaps) / np.mean(gaps) < 0.1  # metronomic
        assert len(pairs) / (gaps.sum() / 60) > 20  # requests per minute
        victim = incident["victim_keys"][0]
        owner_ips = {
            e["source_ip"]
            for e, lab in zip(data["events"], data["labels"], strict=True)
            if e["api_key"] == victim and not lab["incident_id"]
        }
        assert pairs[0][0]["source_ip"] in owner_ips, tenants[victim]["kind"]


def test_token_drain_sends_huge_prompts(week_run) -> None:
    _, data = week_run
    for _, pairs in _by_incident(data, "token_drain"):
        assert np.median([e["prompt_tokens"] for e, _ in pairs if e["status"] == 200]) > 15_000


def test_credential_stuffing_sweeps_then_abuses(week_run) -> None:
    _, data = week_run
    tenants = {t["key"] for t in data["meta"]["tenants"]}
    for incident, pairs in _by_incident(data, "credential_stuffing"):
        invalid = [e for e, lab in pairs if lab["tenant_kind"] == "invalid_key"]
        valid = [e for e, lab in pairs if lab["tenant_kind"] != "invalid_key"]
        assert len({e["api_key"] for e in invalid}) > 500
        assert all(e["status"] == 401 and e["tokens"] == 0 for e in invalid)
        assert {e["api_key"] for e in valid} == set(incident["victim_keys"]) <= tenants
        stuffers = {e["source_ip"] for e in invalid}
        assert 2 <= len(stuffers) <= 4
        assert {e["source_ip"] for e in valid} <= stuffers
        assert min(_ts(e["timestamp"]) for e in valid) > min(_ts(e["timestamp"]) for e in invalid)


def test_key_resale_spreads_over_many_countries(week_run, geoip: GeoIP2Fast) -> None:
    _, data = week_run
    for _, pairs in _by_incident(data, "key_resale"):
        countries = {geoip.lookup(e["source_ip"]).country_code for e, _ in pairs}
        assert len({e["source_ip"] for e, _ in pairs}) >= 20 and len(countries) >= 8


def test_llm_jacking_probes_then_bursts_with_a_new_model(week_run) -> None:
    _, data = week_run
    tenants = {t["key"]: t for t in data["meta"]["tenants"]}
    for incident, pairs in _by_incident(data, "llm_jacking"):
        victim = tenants[incident["victim_keys"][0]]
        events = [e for e, _ in pairs if e["model"]]
        model = incident["details"]["model"]
        assert model not in victim["models"]
        assert events[0]["model"] == model and events[0]["completion_tokens"] <= 2
        assert np.median([e["completion_tokens"] for e in events[1:]]) > 1000


def test_leaks_come_from_where_the_story_says(week_run, geoip: GeoIP2Fast) -> None:
    _, data = week_run
    tenants = {t["key"]: t for t in data["meta"]["tenants"]}
    for incident, pairs in _by_incident(data, "leaked_key_abroad"):
        home = COUNTRIES[tenants[incident["victim_keys"][0]]["country"]].continent
        for ip in {e["source_ip"] for e, _ in pairs}:
            assert COUNTRIES[geoip.lookup(ip).country_code].continent != home
    for incident, pairs in _by_incident(data, "leaked_key_domestic_vps"):
        victim = tenants[incident["victim_keys"][0]]
        found = [geoip.lookup(e["source_ip"]) for e, _ in pairs]
        assert {f.country_code for f in found} == {victim["country"]}
        zone = ZoneInfo(victim["timezone"])
        hours = [_ts(e["timestamp"]).astimezone(zone).hour for e, _ in pairs]
        assert np.mean([h < 7 for h in hours]) > 0.8  # at night, owner's local time
    for incident, pairs in _by_incident(data, "slow_and_low"):
        victim = tenants[incident["victim_keys"][0]]
        assert len({e["source_ip"] for e, _ in pairs}) == 1
        assert geoip.lookup(pairs[0][0]["source_ip"]).country_code != victim["country"]
        hours = (_ts(incident["end"]) - _ts(incident["start"])).total_seconds() / 3600
        assert hours >= 4 and len(pairs) / hours < 90


# ------------------------------------------------------------------ benign surprises


def test_flash_sale_is_a_real_surge_in_the_test_period(week_run) -> None:
    _, data = week_run
    flash = data["meta"]["flash_sale"]
    start, end = _ts(flash["start"]), _ts(flash["end"])
    assert end - start == timedelta(hours=2)
    assert start >= _ts(data["meta"]["test_start"])
    assert flash["keys_affected"] >= 0.5 * sum(
        t["kind"] in ("mobile_app", "backend_service", "batch_job") for t in data["meta"]["tenants"]
    )
    affected = set(flash["keys"])
    during = before = 0
    day = timedelta(days=1)
    for event, label in zip(data["events"], data["labels"], strict=True):
        if event["api_key"] not in affected or label["incident_id"]:
            continue
        if label["benign_tag"] in ("launch", "ci_run"):
            continue  # traffic of its own beside the key's schedule (a new market, CI)
        ts = _ts(event["timestamp"])
        if start + timedelta(minutes=20) <= ts < end - timedelta(minutes=20):
            during += 1
            assert label["benign_tag"] == "flash_sale"
        elif start - day + timedelta(minutes=20) <= ts < end - day - timedelta(minutes=20):
            before += 1
    assert during > 2.0 * before


def test_nightly_batch_runs_at_the_same_local_time_every_night(week_run) -> None:
    _, data = week_run
    batch = [t for t in data["meta"]["tenants"] if t["archetype"] == "nightly_batch"]
    assert batch
    for tenant in batch:
        zone = ZoneInfo(tenant["timezone"])
        starts: dict = {}
        for event, label in zip(data["events"], data["labels"], strict=True):
            if event["api_key"] == tenant["key"] and label["benign_tag"] == "nightly_batch":
                local = _ts(event["timestamp"]).astimezone(zone)
                starts.setdefault(local.date(), local)
        assert len(starts) >= 6
        minutes = [t.hour * 60 + t.minute for t in starts.values()]
        assert max(minutes) - min(minutes) <= 2
        assert (
            f"{minutes[0] // 60:02d}:{minutes[0] % 60 // 30 * 30:02d}"
            == (tenant["nightly_batch_local_time"])
        )


def test_traveller_goes_quiet_then_appears_abroad(week_run, geoip: GeoIP2Fast) -> None:
    _, data = week_run
    travel = data["meta"]["travel"]
    departure, arrival = _ts(travel["departure"]), _ts(travel["arrival"])
    assert arrival - departure >= timedelta(hours=4)
    events = [
        (e, lab)
        for e, lab in zip(data["events"], data["labels"], strict=True)
        if e["api_key"] == travel["key"] and not lab["incident_id"]
    ]
    times = [_ts(e["timestamp"]) for e, _ in events]
    assert not [t for t in times if departure <= t < arrival]
    before = {geoip.lookup(e["source_ip"]).country_code for e, _ in events
              if _ts(e["timestamp"]) < departure}  # fmt: skip
    after = {geoip.lookup(e["source_ip"]).country_code for e, lab in events
             if _ts(e["timestamp"]) >= arrival}  # fmt: skip
    assert before == {travel["from"]} and after == {travel["to"]}
    assert all(lab["benign_tag"] == "travel" for e, lab in events if _ts(e["timestamp"]) >= arrival)


# --------------------------------------------------------------------------- rhythm


def _local_hours(data: dict, kind: str) -> list[tuple[int, int]]:
    zones = {
        t["key"]: ZoneInfo(t["timezone"]) for t in data["meta"]["tenants"] if t["kind"] == kind
    }
    out = []
    for event, label in zip(data["events"], data["labels"], strict=True):
        zone = zones.get(event["api_key"])
        if zone and not label["incident_id"] and not label["benign_tag"]:
            local = _ts(event["timestamp"]).astimezone(zone)
            out.append((local.weekday(), local.hour))
    return out


def test_rhythms_follow_each_keys_own_time_zone(week_run) -> None:
    _, data = week_run
    dev = _local_hours(data, "developer")
    office = sum(1 for wd, h in dev if wd < 5 and 9 <= h < 18)
    night = sum(1 for _, h in dev if 0 <= h < 6)
    weekend = sum(1 for wd, _ in dev if wd >= 5)
    assert office > 20 * max(night, 1)
    assert office > 4 * weekend

    mobile = _local_hours(data, "mobile_app")
    evening = sum(1 for _, h in mobile if 19 <= h < 23)
    small_hours = sum(1 for _, h in mobile if 2 <= h < 6)
    assert evening > 4 * small_hours

    backend = _local_hours(data, "backend_service")
    workday = sum(1 for wd, h in backend if wd < 5 and 10 <= h < 16)
    weeknight = sum(1 for wd, h in backend if wd < 5 and 1 <= h < 7)
    assert workday > 2 * weeknight


def test_sources_fit_the_tenant(day_run, geoip: GeoIP2Fast) -> None:
    _, data = day_run
    tenants = {t["key"]: t for t in data["meta"]["tenants"]}
    ips: dict[str, set[str]] = {}
    for event, label in zip(data["events"], data["labels"], strict=True):
        if label["incident_id"] is None and label["benign_tag"] != "travel":
            ips.setdefault(event["api_key"], set()).add(event["source_ip"])
    for key, addresses in ips.items():
        tenant = tenants[key]
        if tenant["archetype"] == "mobile_app":
            assert len(addresses) >= 50
            assert {geoip.lookup(ip).country_code for ip in addresses} == {tenant["country"]}
        if tenant["archetype"] == "backend_service":
            assert 1 <= len(addresses) <= 6
            assert all(
                any(name in geoip.lookup(ip).asn_name for name in ("AMAZON", "GOOGLE", "MICRO"))
                for ip in addresses
            )


def test_ordinary_error_rates(week_run) -> None:
    _, data = week_run
    legit = [e for e, lab in zip(data["events"], data["labels"], strict=True)
             if not lab["incident_id"]]  # fmt: skip
    status = Counter(e["status"] for e in legit)
    total = len(legit)
    assert 0.002 < sum(n for s, n in status.items() if s >= 500) / total < 0.03
    assert 0.001 < status[429] / total < 0.03
    assert status[401] / total < 0.002
    failed = [e for e in legit if e["status"] != 200]
    assert all(e["tokens"] == 0 for e in failed)


# ------------------------------------------------------------------------ IP table


def test_every_ip_block_geolocates_where_it_claims(geoip: GeoIP2Fast) -> None:
    rng = np.random.default_rng(0)
    blocks = load_ip_blocks()
    assert len({b.country for b in blocks}) >= 15
    assert len({COUNTRIES[b.country].continent for b in blocks}) >= 5
    wrong = []
    for block in blocks:
        network = ipaddress.ip_network(block.cidr)
        edges = [int(network.network_address) + 1, int(network.broadcast_address) - 1]
        sample = [*edges, *sample_ips(rng, [block], 30).tolist()]
        for address in sample:
            ip = str(ipaddress.IPv4Address(address))
            found = geoip.lookup(ip)
            if found.country_code != block.country or (
                block.asn_token.lower() not in (found.asn_name or "").lower()
            ):
                wrong.append((block.cidr, ip, found.country_code, found.asn_name))
                break
    assert not wrong, wrong


def test_arguments_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="keys"):
        simulate(tmp_path, keys=3, days=1)
    with pytest.raises(ValueError, match="days"):
        simulate(tmp_path, keys=20, days=0)


def test_start_is_honoured(tmp_path: Path) -> None:
    start = datetime(2027, 3, 1, 12, 0, tzinfo=UTC)
    summary = simulate(tmp_path, keys=10, days=2, seed=1, start=start)
    meta = json.loads(summary.meta_path.read_text())
    assert _ts(meta["start"]) == start and _ts(meta["test_start"]) == start
    first = json.loads(summary.events_path.read_text().split("\n", 1)[0])
    assert _ts(first["timestamp"]) >= start


def test_upstream_outage_fails_everyone_briefly(week_run) -> None:
    _, data = week_run
    outage = data["meta"]["upstream_outage"]
    start, end = _ts(outage["start"]), _ts(outage["end"])
    assert timedelta(minutes=10) <= end - start <= timedelta(minutes=30)
    assert start >= _ts(data["meta"]["test_start"])
    inside = [
        (e, lab)
        for e, lab in zip(data["events"], data["labels"], strict=True)
        if start <= _ts(e["timestamp"]) < end and not lab["incident_id"]
    ]
    failed = sum(e["status"] >= 500 for e, _ in inside)
    assert failed > 0.15 * len(inside)
    assert len({e["api_key"] for e, _ in inside if e["status"] >= 500}) >= 5
    # every legitimate event in the outage is tagged: the outage, or a surprise of its own
    assert all(lab["benign_tag"] is not None for _, lab in inside)
    assert sum(lab["benign_tag"] == "upstream_outage" for _, lab in inside) > 0.5 * len(inside)


# ------------------------------------------------------------ legitimate archetypes


def _key_events(data: dict, archetype: str) -> dict[str, list[tuple[dict, dict]]]:
    """Each key of an archetype with its own (event, label) pairs, incidents excluded."""
    keys = {t["key"] for t in data["meta"]["tenants"] if t["archetype"] == archetype}
    assert keys, archetype
    out: dict[str, list[tuple[dict, dict]]] = {k: [] for k in keys}
    for event, label in zip(data["events"], data["labels"], strict=True):
        if event["api_key"] in keys and not label["incident_id"]:
            out[event["api_key"]].append((event, label))
    return out


def test_every_archetype_is_in_the_population_and_the_labels(week_run) -> None:
    _, data = week_run
    in_meta = {t["archetype"] for t in data["meta"]["tenants"]}
    assert in_meta == set(ARCHETYPES)
    assert {lab["archetype"] for lab in data["labels"]} == set(ARCHETYPES) | {"invalid_key"}


@pytest.fixture(scope="module")
def perturbed_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[SimulationSummary, dict]:
    summary = simulate(tmp_path_factory.mktemp("perturbed"), keys=20, days=4, seed=2,
                       perturb=True)
    return summary, _read(summary)


def test_weekly_and_month_end_jobs_run_once_in_the_judged_days(perturbed_run) -> None:
    _, data = perturbed_run
    test_start = _ts(data["meta"]["test_start"])
    for archetype in ("weekly_batch", "month_end_batch"):
        for key, pairs in _key_events(data, archetype).items():
            tenant = next(t for t in data["meta"]["tenants"] if t["key"] == key)
            zone = ZoneInfo(tenant["timezone"])
            runs = [_ts(e["timestamp"]) for e, lab in pairs if lab["benign_tag"] == archetype]
            days = {t.astimezone(zone).date() for t in runs}
            assert len(days) == 1 and min(runs) >= test_start - timedelta(hours=14), archetype
            if archetype == "month_end_batch":
                assert (next(iter(days)) + timedelta(days=1)).day == 1
            minutes = (max(runs) - min(runs)).total_seconds() / 60
            assert minutes >= 15 and len(runs) / minutes > 5  # a burst many times its day rate


def test_new_key_starts_in_the_judged_days_with_its_heaviest_day(week_run) -> None:
    _, data = week_run
    test_start = _ts(data["meta"]["test_start"])
    for _, pairs in _key_events(data, "new_key").items():
        times = sorted(_ts(e["timestamp"]) for e, _ in pairs)
        assert test_start <= times[0] < test_start + timedelta(days=1)
        first_day = sum(t < times[0] + timedelta(days=1) for t in times)
        assert first_day > 0.6 * len(times)
        assert all(lab["benign_tag"] in ("first_day", "flash_sale") for e, lab in pairs
                   if _ts(e["timestamp"]) < times[0] + timedelta(hours=20))  # fmt: skip


def test_ci_runs_come_from_rotating_datacenter_addresses(week_run, geoip: GeoIP2Fast) -> None:
    _, data = week_run
    datacenter = {b.asn_token.lower() for b in load_ip_blocks() if b.network in
                  ("cloud", "hosting")}  # fmt: skip
    for _, pairs in _key_events(data, "ci_runner").items():
        ips = [e["source_ip"] for e, _ in pairs]
        assert len(set(ips)) >= 5 and len(set(ips)) > len(ips) / 100
        for ip in set(ips):
            assert any(token in (geoip.lookup(ip).asn_name or "").lower() for token in datacenter)


def test_region_migration_and_app_launch_add_a_country(week_run, geoip: GeoIP2Fast) -> None:
    _, data = week_run
    tenants = {t["key"]: t for t in data["meta"]["tenants"]}
    for archetype, tag, info in (("region_migration", "migration", "migration"),
                                 ("app_launch", "launch", "launch")):
        for key, pairs in _key_events(data, archetype).items():
            new = tenants[key][info]["to_country" if info == "migration" else "country"]
            before = {geoip.lookup(e["source_ip"]).country_code for e, lab in pairs
                      if lab["benign_tag"] != tag}  # fmt: skip
            after = Counter(geoip.lookup(e["source_ip"]).country_code for e, lab in pairs
                            if lab["benign_tag"] == tag)  # fmt: skip
            assert new in after and new not in before - {tenants[key]["country"]} - {new}
            assert after[new] > 20


def test_domestic_vps_leak_uses_the_owners_client_from_a_hosting_network(
    week_run, geoip: GeoIP2Fast
) -> None:
    _, data = week_run
    hosting = {b.asn_token.lower() for b in load_ip_blocks() if b.network == "hosting"}
    for incident, pairs in _by_incident(data, "leaked_key_domestic_vps"):
        victim = incident["victim_keys"][0]
        owner = Counter(e["user_agent"] for e, lab in zip(data["events"], data["labels"],
                        strict=True) if e["api_key"] == victim and not lab["incident_id"])
        assert {e["user_agent"] for e, _ in pairs} == {owner.most_common(1)[0][0]}
        for ip in {e["source_ip"] for e, _ in pairs}:
            assert any(t in (geoip.lookup(ip).asn_name or "").lower() for t in hosting)


# ---------------------------------------------------------------------- perturbation


def test_perturbation_draws_within_ranges_and_puts_a_month_end_in_the_judged_days() -> None:
    for seed in range(20):
        p = draw_perturbation(seed, days=4)
        for table in (p.rate, p.size, p.attack_rate, p.attack_size):
            assert set(table) and all(0.3 <= v <= 3.0 for v in table.values())
        assert set(p.rate) == set(ARCHETYPES) and set(p.attack_rate) == set(SCENARIOS)
        assert abs(p.shift_h) <= 3.0
        judged = [p.start + timedelta(days=2 + d) for d in range(2)]
        assert any((d + timedelta(days=1)).day == 1 for d in judged)
    assert draw_perturbation(1, 4) == draw_perturbation(1, 4) != draw_perturbation(2, 4)


def test_perturbed_simulation_changes_the_numbers_not_the_story(tmp_path: Path) -> None:
    plain = simulate(tmp_path / "plain", keys=16, days=3, seed=4)
    shaken = simulate(tmp_path / "shaken", keys=16, days=3, seed=4, perturb=True)
    again = simulate(tmp_path / "again", keys=16, days=3, seed=4, perturb=True)
    assert shaken.events_path.read_bytes() == again.events_path.read_bytes()
    meta = json.loads(shaken.meta_path.read_text())
    assert meta["perturbation"]["start"] and json.loads(plain.meta_path.read_text())[
        "perturbation"] is None
    assert shaken.start != plain.start and shaken.events != plain.events
    assert shaken.by_scenario.keys() == plain.by_scenario.keys()
    assert all(n >= 1 for n in shaken.by_scenario.values())
