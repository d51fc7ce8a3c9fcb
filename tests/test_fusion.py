"""Fusion: rules set the floor, models raise it, only corroboration or a critical rule bans."""

from __future__ import annotations

import pytest

from features.extractor import FeatureVector
from models.signals import ModelSignals
from serving.engine.decision import Reason
from serving.policy.fusion import fuse, model_strength
from serving.policy.rules import Finding


def finding(code: str, severity: str, group: str | None = None, kind: str = "rule",
            features: tuple[str, ...] = (), evidence: str = "volume") -> Finding:
    return Finding(reason=Reason(code=code, severity=severity, message=code),  # type: ignore[arg-type]
                   rule_id=code, group=group or code, scope="key", kind=kind,  # type: ignore[arg-type]
                   features=features, evidence=evidence)


FV = FeatureVector(values={})
SURGE = FeatureVector(values={"population_rate_vs_hour_of_week_1h": 4.0,
                              "key_rate_vs_population_1h": 1.1})
TOP = [("tokens_zscore_by_key", 7.5), ("latency_zscore_by_key", 4.2)]


def test_nothing_in_nothing_out() -> None:
    f = fuse([], ModelSignals(), FV)
    assert (f.severity, f.score, f.can_block, f.model_reason) == ("none", 0.0, False, None)


@pytest.mark.parametrize(("signals", "tier"), [
    (ModelSignals(offline=0.95), "none"),
    (ModelSignals(offline=0.995), "low"),
    (ModelSignals(offline=0.9995), "medium"),
    # two models agreeing would be high, but models alone stop at medium by default
    (ModelSignals(population=0.995, offline=0.995), "medium"),
    (ModelSignals(population=1.0, offline=1.0, key_baseline=1.0, key_drift=True), "medium"),
])
def test_models_alone_raise_the_tier_but_never_ban(signals: ModelSignals, tier: str) -> None:
    signals.top_features = TOP
    f = fuse([], signals, FV)
    assert f.severity == tier and not f.can_block
    if tier != "none":
        assert f.model_reason is not None
        assert "tokens_zscore_by_key (+7.5)" in f.model_reason.message
        assert f.model_reason.evidence["top_features"][0] == ["tokens_zscore_by_key", 7.5]


def test_a_critical_identity_or_attack_rule_bans_on_its_own() -> None:
    f = fuse([finding("credential_stuffing", "critical", evidence="attack")], ModelSignals(),
             FV)
    assert f.severity == "critical" and f.can_block and f.drivers == ["credential_stuffing"]
    assert f.evidence == ["attack"]


def test_volume_alone_never_bans_even_at_critical() -> None:
    # deliberate change (issue 17): a hard rate limit is volume; it throttles, never bans
    f = fuse([finding("rate_limit_1m_hard", "critical", "volume")], ModelSignals(), FV)
    assert f.severity == "high" and not f.can_block


def test_volume_rules_are_one_kind_of_evidence() -> None:
    f = fuse([finding("rate_limit_1m", "high", "volume"),
              finding("token_limit_1m", "high", "volume")], ModelSignals(), FV)
    assert f.severity == "high" and not f.can_block
    # different groups, one kind: spend and burst and size do not corroborate each other
    f = fuse([finding("spend_surge", "high", "spend"), finding("burst", "high", "volume"),
              finding("request_size", "high")],
             ModelSignals(offline=0.9999, top_features=TOP), FV)
    assert f.severity == "high" and not f.can_block


def test_two_kinds_of_evidence_corroborate() -> None:
    f = fuse([finding("impossible_travel", "high", "location", evidence="identity"),
              finding("failure_rate", "high")], ModelSignals(), FV)
    assert f.severity == "critical" and f.can_block
    assert set(f.drivers) == {"impossible_travel", "failure_rate"}
    assert f.evidence == ["identity", "volume"]
    f = fuse([finding("new_network", "medium", evidence="identity"),
              finding("failure_rate", "medium")], ModelSignals(), FV)
    assert f.severity == "high" and not f.can_block


def test_a_rule_plus_an_independent_model_corroborate() -> None:
    travel = finding("impossible_travel", "high", "location",
                     features=("geo_speed_kmh_by_key",), evidence="identity")
    f = fuse([travel], ModelSignals(offline=0.995, top_features=TOP), FV)
    assert f.severity == "critical" and f.can_block
    assert "model_anomaly" in f.drivers
    # a model that only sees what the rule already saw is not independent evidence
    same = fuse([finding("rate_limit_1m", "high", "volume",
                         features=("requests_count_by_key_1m",))],
                ModelSignals(offline=0.995, top_features=[("requests_count_by_key_1m", 9.0)]),
                FV)
    assert same.severity == "high" and not same.can_block


def test_a_surge_the_population_shares_is_not_escalated_by_models() -> None:
    signals = ModelSignals(population=0.9999, offline=0.9999, top_features=TOP)
    assert fuse([], signals, FV).severity == "medium"
    f = fuse([], signals, SURGE)
    assert f.severity == "low" and f.shared_surge
    assert f.model_reason is not None and "population is surging" in f.model_reason.message
    # nor do models corroborate a rule during it
    g = fuse([finding("request_size", "high")], signals, SURGE)
    assert g.severity == "high" and not g.can_block


def test_models_alone_max_is_configurable() -> None:
    from serving.policy.schema import FusionConfig

    signals = ModelSignals(population=0.995, offline=0.995, top_features=TOP)
    assert fuse([], signals, FV, FusionConfig(models_alone_max="high")).severity == "high"
    assert fuse([], signals, FV, FusionConfig(models_alone_max="low")).severity == "low"


def test_model_score_rules_count_as_the_models() -> None:
    f = fuse([finding("offline_extreme", "high", kind="model")],
             ModelSignals(offline=0.9999, population=0.9999), FV)
    assert f.severity == "high" and not f.can_block


def test_score_is_in_range_and_grows_with_evidence() -> None:
    scores = [
        fuse([], ModelSignals(), FV).score,
        fuse([], ModelSignals(offline=0.99), FV).score,
        fuse([finding("x_rule", "medium")], ModelSignals(offline=0.99), FV).score,
        fuse([finding("x_rule", "high")], ModelSignals(offline=0.999), FV).score,
        fuse([finding("x_rule", "critical", evidence="identity")],
             ModelSignals(offline=0.99999), FV).score,
    ]
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert scores == sorted(scores) and scores[-1] > 0.95
    assert model_strength(None) == 0.0 and model_strength(0.9) == 0.0
    assert model_strength(1.0) == 1.0


def test_score_moves_with_the_models_when_no_rule_fires() -> None:
    quiet = [fuse([], ModelSignals(key_baseline=p), FV) for p in (0.1, 0.5, 0.9, 0.98)]
    assert all(f.severity == "none" for f in quiet)
    scores = [f.score for f in quiet]
    assert scores == sorted(scores) and len(set(scores)) == 4
    assert all(0.0 < s < 0.3 for s in scores)  # below the low tier's band
