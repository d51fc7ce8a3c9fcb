"""Policy files: strict validation with line numbers, the default rules, hot reload."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from features.extractor import FeatureVector
from models.signals import ModelSignals
from serving.policy.rules import BanView, RuleInput, evaluate_rules
from serving.policy.schema import PolicyError, PolicySource, load_policy, parse_policy

DEFAULT = load_policy()

BAD = """\
version: 1
rules:
  - id: rate_limit_1m
    type: rate_limit
    severity: high
    params: {metric: requests, window: 1m, limit: -5}
  - id: too_many
    type: threshold
    severity: high
    params:
      feature: requests_count_by_key_1mm
      above: 4
  - id: too_many
    type: banned
    severity: critical
    colour: red
"""


def fired(fv: FeatureVector, signals: ModelSignals | None = None,
          bans: dict[str, BanView] | None = None) -> set[str]:
    inp = RuleInput(fv=fv, signals=signals or ModelSignals(), bans=bans or {})
    return {f.reason.code for f in evaluate_rules(DEFAULT.active_rules(), inp)}


def fv(context: dict[str, object] | None = None, **values: float) -> FeatureVector:
    """A warm key with two days of history unless told otherwise."""
    return FeatureVector(values={"key_age_h_by_key": 48.0, **values},
                         context={"key_warm": True, **(context or {})})


def test_a_new_key_is_judged_by_the_population_not_its_own_baseline() -> None:
    big = {"tokens_vs_peak_by_key_24h": 16.0, "tokens_peak_by_key_24h": 2500.0,
           "tokens_log_by_event": math.log1p(50_000), "tokens_vs_population_z_by_event": 6.0}
    assert "request_size" in fired(fv(**big))
    young = fired(fv(**{**big, "key_age_h_by_key": 2.0}))
    assert "request_size" not in young and "request_size_new_key" in young
    assert "spend_new_key" in fired(fv(spend_usd_by_key_1h=80.0, key_age_h_by_key=3.0))
    assert "spend_new_key" not in fired(fv(spend_usd_by_key_1h=80.0))


def test_the_packaged_policy_is_valid_and_covers_the_threats() -> None:
    codes = {r.id for r in DEFAULT.rules}
    assert codes >= {"banned_key", "banned_ip", "rate_limit_1m", "rate_limit_1m_hard",
                     "token_limit_1h", "impossible_travel", "burst_vs_baseline",
                     "request_size", "failure_rate", "credential_stuffing",
                     "concurrent_locations", "unseen_model", "runaway_loop"}
    assert {r.scope for r in DEFAULT.rules if r.id.startswith("credential")} == {"ip"}


def test_errors_name_the_line_and_the_rule() -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(BAD, "bad.yaml")
    by_line = {p.line: p for p in info.value.problems}
    assert "greater than 0" in by_line[6].message and "rate_limit_1m" in by_line[6].path
    assert "unknown feature 'requests_count_by_key_1mm'" in by_line[10].message
    assert "duplicate rule id 'too_many'" in by_line[13].message
    assert by_line[16].message == "unknown key 'colour'"


def test_yaml_syntax_errors_name_the_line() -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy("rules:\n  - id: x\n    type: [unclosed\n", "x.yaml")
    assert info.value.problems[0].line in (3, 4)
    assert "not valid YAML" in info.value.problems[0].message


@pytest.mark.parametrize(("snippet", "fragment"), [
    ("type: travel_speed\n    severity: high\n    params: {max_speed_kmh: 100}",
     "greater than or equal to 300"),
    ("type: model_score\n    severity: critical\n    params: {signal: offline, above: 0.9}",
     "'low', 'medium' or 'high'"),
    ("type: threshold\n    severity: low\n    params: {feature: tokens_log_by_event}",
     "exactly one of 'above' or 'below'"),
    ("type: rate_limit\n    scope: ip\n    severity: low\n"
     "    params: {metric: requests, window: 24h, limit: 5}", "windows 1m, 5m, 1h only"),
    ("type: rate_limit\n    severity: low\n    message: '{value:.0f} {secret}'\n"
     "    params: {metric: requests, window: 1m, limit: 5}", "{secret} is not one of"),
])
def test_each_rule_type_validates_its_own_params(snippet: str, fragment: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(f"rules:\n  - id: rr\n    {snippet}\n")
    assert fragment in str(info.value)
    assert all(p.line and p.line >= 2 for p in info.value.problems)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "serving.cli.main", *args], capture_output=True,
                          text=True, timeout=60, check=False,
                          env={**os.environ, "KEYWATCH_SECRET": "x" * 20})


def test_policy_check_cli(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD)
    proc = run_cli("policy", "check", str(bad))
    assert proc.returncode == 1
    assert f"{bad}:6: rules[0] (rate_limit_1m).params.limit" in proc.stderr
    good = tmp_path / "good.yaml"
    good.write_text((Path(__file__).parents[1] / "serving/policy/default_policy.yaml").read_text())
    proc = run_cli("policy", "check", str(good))
    assert proc.returncode == 0, proc.stderr
    assert f"ok: {len(load_policy().rules)} rules" in proc.stdout


# ---- the default rules on hand-made vectors ----------------------------------------------
def test_a_rule_whose_feature_is_missing_stays_silent() -> None:
    assert fired(fv()) == set()
    # a "below" rule must not fire on an absent feature read as 0
    assert "runaway_loop" not in fired(fv(requests_count_by_key_5m=5000,
                                          same_size_ratio_by_key=1.0))


def test_impossible_travel_needs_speed_distance_and_a_new_country() -> None:
    ctx = {"prev_country_name": "Singapore", "country_name": "Germany"}
    trip = {"geo_distance_km_by_key": 10_200.0, "geo_elapsed_s_by_key": 360.0,
            "geo_speed_kmh_by_key": 102_000.0, "new_country_by_key": 1.0,
            "known_identity_by_event": 0.0, "trusted_prefixes_by_key": 3.0}
    f = evaluate_rules(DEFAULT.active_rules(), RuleInput(fv=fv(ctx, **trip)))
    travel = next(x for x in f if x.reason.code == "impossible_travel")
    assert travel.reason.message == "Singapore → Germany (10,200 km) in 6 min (102,000 km/h)"
    assert "impossible_travel" not in fired(fv(ctx, **{**trip, "new_country_by_key": 0.0}))
    # a short hop, however fast geolocation noise makes it look, is not travel
    assert "impossible_travel" not in fired(fv(ctx, **{**trip, "geo_distance_km_by_key": 300.0,
                                                       "geo_speed_kmh_by_key": 3000.0}))
    # an overnight flight is possible
    assert "impossible_travel" not in fired(fv(ctx, **{**trip, "geo_elapsed_s_by_key": 13 * 3600,
                                                       "geo_speed_kmh_by_key": 785.0}))
    # a zero-second hop reports an infinite speed: still a finding, not a crash
    assert "impossible_travel" in fired(fv(ctx, **{**trip, "geo_elapsed_s_by_key": 0.0,
                                                   "geo_speed_kmh_by_key": math.inf}))


def test_impossible_travel_is_weak_from_a_known_identity_or_within_a_crowd() -> None:
    """A service moving region keeps its network and client library; on a consumer
    app's key two far-apart events are two users: only a client library the key never
    used makes the trip evidence there."""
    ctx = {"prev_country_name": "Singapore", "country_name": "Germany"}
    trip = {"geo_distance_km_by_key": 10_200.0, "geo_elapsed_s_by_key": 360.0,
            "geo_speed_kmh_by_key": 102_000.0, "new_country_by_key": 1.0,
            "known_identity_by_event": 0.0, "trusted_prefixes_by_key": 3.0,
            "untrusted_ua_family_by_event": 0.0}
    travel = {"impossible_travel", "impossible_travel_new_client"}
    assert fired(fv(ctx, **trip)) & travel == {"impossible_travel"}
    assert not fired(fv(ctx, **{**trip, "known_identity_by_event": 1.0})) & travel
    crowd = {**trip, "trusted_prefixes_by_key": 256.0}
    assert not fired(fv(ctx, **crowd)) & travel
    assert fired(fv(ctx, **{**crowd, "untrusted_ua_family_by_event": 1.0})) & travel == {
        "impossible_travel_new_client"}


def test_ordinary_server_fleets_and_proxies_are_not_flagged() -> None:
    # many server addresses in one region
    assert fired(fv(distinct_ips_by_key_1h=40, distinct_countries_by_key_1h=1,
                    distinct_asns_by_key_1h=2, requests_count_by_key_1m=300)) == set()
    # a proxy carrying many customers' keys, almost all succeeding
    assert fired(fv(distinct_keys_by_ip_1h=400, auth_fail_count_by_ip_5m=12,
                    auth_fail_ratio_by_ip_5m=0.01, requests_count_by_ip_5m=1200)) == set()
    # a busy but steady key
    assert fired(fv(requests_count_by_key_1m=550, tokens_sum_by_key_1h=4e6,
                    rate_vs_hour_of_week_by_key_1h=1.3, key_rate_vs_population_1h=1.1)) == set()


def test_credential_stuffing_and_key_sharing_fire() -> None:
    assert "credential_stuffing" in fired(fv(distinct_keys_by_ip_1h=30,
                                             auth_fail_count_by_ip_5m=30,
                                             auth_fail_ratio_by_ip_5m=0.97))
    crowd = {"distinct_countries_by_key_1h": 20, "distinct_ips_by_key_1h": 60,
             "distinct_asns_by_key_1h": 30, "known_identity_by_event": 0.0}
    assert {"concurrent_locations", "key_sharing"} <= fired(fv(**crowd))
    # the owner's own call (its network and client library) is not the crowd's
    assert "key_sharing" not in fired(fv(**{**crowd, "known_identity_by_event": 1.0}))


def test_burst_against_baseline_spares_a_shared_surge() -> None:
    burst = {"rate_vs_hour_of_week_by_key_1h": 25.0, "requests_count_by_key_1h": 3000.0}
    assert "burst_vs_baseline" in fired(fv(**burst, key_rate_vs_population_1h=20.0))
    assert "burst_vs_baseline" not in fired(fv(**burst, key_rate_vs_population_1h=1.2))
    assert "burst_vs_baseline" not in fired(fv({"key_warm": False}, **burst,
                                               key_rate_vs_population_1h=20.0))


def test_request_size_fires_far_beyond_the_days_largest_request() -> None:
    big = {"tokens_vs_peak_by_key_24h": 16.0, "tokens_peak_by_key_24h": 2_500.0,
           "tokens_log_by_event": math.log1p(40_000)}
    assert "request_size" in fired(fv(**big))
    finding = next(f for f in evaluate_rules(DEFAULT.active_rules(), RuleInput(
        fv=fv(**big), signals=ModelSignals(), bans={})) if f.reason.code == "request_size")
    assert finding.reason.message == ("request 16x the largest this key sent in normal "
                                      "traffic over the last day (2,500 tokens)")
    assert finding.reason.severity == "medium"
    assert "request_size" not in fired(fv(**{**big, "tokens_vs_peak_by_key_24h": 3.5}))
    # a tiny key's 10x is still a small request; no history is no bar; nor a new key
    small = {**big, "tokens_peak_by_key_24h": 1_000.0, "tokens_log_by_event": math.log1p(12_000)}
    assert "request_size" not in fired(fv(**small))
    assert "request_size" not in fired(fv(**{**big, "tokens_peak_by_key_24h": 0.0}))
    assert "request_size" not in fired(fv({"key_warm": False}, **big))


def test_runaway_loop_and_unseen_model() -> None:
    # a synchronous loop: the same prompt on a timer, far above the key's own rate; judged
    # on the prompt's sub-stream, so the owner's other traffic (the key's overall gaps
    # irregular, its consecutive prompts mixed) does not hide it
    loop = {"loop_interarrival_cv_by_key": 0.02, "requests_count_by_key_5m": 270.0,
            "interarrival_cv_by_key": 0.8, "same_prompt_ratio_by_key": 0.4,
            "loop_same_prompt_ratio_by_key": 0.98, "rate_vs_baseline_by_key_5m": 40.0}
    assert "runaway_loop" in fired(fv(**loop))
    assert "runaway_loop" not in fired(fv(**{**loop, "loop_interarrival_cv_by_key": 0.8}))
    assert "runaway_loop" not in fired(fv(**{**loop, "loop_same_prompt_ratio_by_key": 0.5}))
    # a busy client that always runs at this pace (a health check) is its own normal
    assert "runaway_loop" not in fired(fv(**{**loop, "rate_vs_baseline_by_key_5m": 1.5}))
    # slower than one request every 10 seconds is not a runaway
    assert "runaway_loop" not in fired(fv(**{**loop, "requests_count_by_key_5m": 25.0}))
    assert "unseen_model" in fired(fv(new_model_by_key=1.0, history_events_by_key=5000))
    assert "unseen_model" not in fired(fv({"key_warm": False}, new_model_by_key=1.0,
                                          history_events_by_key=5))


def test_banned_rules_read_the_ban_state() -> None:
    bans = {"ip": BanView(active=True, until="2026-11-18T08:00:00Z", reason="stuffing")}
    f = evaluate_rules(DEFAULT.active_rules(), RuleInput(fv=fv(), bans=bans))
    assert [x.reason.code for x in f] == ["banned_ip"]
    assert f[0].reason.message == "address is banned until 2026-11-18T08:00:00Z (stuffing)"


# ---- hot reload ----------------------------------------------------------------------
POLICY_A = "rules:\n  - {id: rule_a, type: rate_limit, severity: high, " \
           "params: {window: 1m, limit: 10}}\n"
POLICY_B = POLICY_A.replace("limit: 10", "limit: 20").replace("id: rule_a", "id: rule_b")


def _touch_later(path: Path, text: str) -> None:
    before = path.stat().st_mtime_ns
    path.write_text(text)
    os.utime(path, ns=(before + 2_000_000_000, before + 2_000_000_000))


def test_policy_reloads_on_change_and_keeps_the_old_one_when_broken(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY_A)
    src = PolicySource(path, check_interval_s=0.05)
    assert [r.id for r in src.current().rules] == ["rule_a"]
    _touch_later(path, POLICY_B)
    time.sleep(0.06)
    assert [r.id for r in src.current().rules] == ["rule_b"] and src.version == 2
    _touch_later(path, POLICY_B.replace("limit: 20", "limit: -1"))
    time.sleep(0.06)
    with caplog.at_level("ERROR", logger="keywatch.policy"):
        assert [r.id for r in src.current().rules] == ["rule_b"]
    assert "previous policy stays in force" in caplog.text and "line 2" in caplog.text
    assert src.last_error is not None


def test_reload_is_checked_at_most_once_per_interval(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY_A)
    src = PolicySource(path, check_interval_s=3600)
    _touch_later(path, POLICY_B)
    assert [r.id for r in src.current().rules] == ["rule_a"]


def test_a_running_scorer_picks_up_a_policy_change(tmp_path: Path) -> None:
    from features.contract import Event
    from features.keys import KeyHasher
    from features.stores.memory import MemoryStore
    from serving.engine.scorer import Scorer

    path = tmp_path / "policy.yaml"
    path.write_text(POLICY_A.replace("limit: 10", "limit: 1000"))
    s = Scorer(store=MemoryStore(), hasher=KeyHasher("x" * 20),
               policy=PolicySource(path, check_interval_s=0.0))
    t0 = 1_794_999_960
    out = [s.score(Event(api_key="sk-a", timestamp=t0 + i)) for i in range(15)]
    assert {d.decision for d in out} == {"allow"}
    _touch_later(path, POLICY_A)  # the limit drops to 10 per minute
    assert s.score(Event(api_key="sk-a", timestamp=t0 + 16)).decision == "throttle"


def test_new_hosting_network_only_on_keys_that_never_used_one() -> None:
    vps = {"untrusted_hosting_asn_by_event": 1.0, "hosting_share_by_key": 0.0,
           "history_events_by_key": 5000.0, "hour_share_by_key": 0.2}
    f = evaluate_rules(DEFAULT.active_rules(), RuleInput(fv=fv(**vps)))
    hits = [x for x in f if x.rule_id == "new_hosting_network"]
    # the address is throttled (a ban needs more), the owner's other traffic untouched
    assert hits and hits[0].reason.severity == "high" and hits[0].scope == "ip"
    assert "new_network_odd_hour" not in fired(fv(**vps))
    # a key that runs from clouds anyway, or one too new to know
    assert "new_hosting_network" not in fired(fv(**{**vps, "hosting_share_by_key": 0.4}))
    assert "new_hosting_network" not in fired(fv(**{**vps, "history_events_by_key": 20.0}))


def test_a_drain_of_huge_requests_is_throttled_a_long_document_only_alerted() -> None:
    size = {"tokens_log_by_event": 10.4, "tokens_peak_by_key_24h": 4000.0,
            "key_age_h_by_key": 48.0}
    document = fired(fv(**size, tokens_vs_peak_by_key_24h=5.0))
    assert "request_size" in document and "request_size_surge" not in document
    assert "request_size_surge" in fired(fv(**size, tokens_vs_peak_by_key_24h=9.0))
    # a key less than a day old is judged by the population's sizes instead
    assert "request_size_surge" not in fired(fv(**{**size, "key_age_h_by_key": 5.0},
                                                tokens_vs_peak_by_key_24h=9.0))
