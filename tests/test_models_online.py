"""Online detectors: quality, protected learning, warm-up, checkpoints, per-key baselines."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from models.integrity import ModelIntegrityError
from models.online import PopulationDetector
from tests.support.synthetic import anomalies, normal_traffic, traffic

# ---------------------------------------------------------------- population detector


@pytest.fixture(scope="module")
def stream() -> tuple[list[dict[str, float]], np.ndarray]:
    df, y = traffic(9000, anomaly_fraction=0.02, seed=3)
    return df.to_dict("records"), y


@pytest.fixture(scope="module")
def trained(stream: tuple[list[dict[str, float]], np.ndarray]) -> PopulationDetector:
    rows, _ = stream
    detector = PopulationDetector(seed=1)
    for x in rows[:4000]:
        detector.score_and_maybe_learn(x, allow_learn=True)
    return detector


def test_quality_floor_prequential(stream: tuple[list[dict[str, float]], np.ndarray]) -> None:
    rows, y = stream
    detector = PopulationDetector(seed=1)
    scores = [detector.score_and_maybe_learn(x, allow_learn=True) for x in rows]
    warm_from = detector.warmup_events
    auc = roc_auc_score(y[warm_from:], scores[warm_from:])
    assert auc >= 0.9, auc
    assert all(0.0 <= s <= 1.0 for s in scores)


def test_warm_up_returns_a_neutral_score_until_enough_events() -> None:
    rows = normal_traffic(700, np.random.default_rng(0)).to_dict("records")
    detector = PopulationDetector(window_size=200, seed=0)
    assert detector.warmup_events == 400
    assert not detector.warm and detector.score_one(rows[0]) == 0.0
    for i, x in enumerate(rows[:400]):
        assert detector.score_and_maybe_learn(x, allow_learn=True) == 0.0, i
    assert detector.warm and detector.threshold is not None
    outlier = {**rows[0], "requests_count_by_key_1m": 500.0, "geo_velocity_kmh": 9000.0}
    assert detector.score_one(outlier) > 0.95


def test_score_one_is_pure_and_does_not_mutate_input(trained: PopulationDetector) -> None:
    x = normal_traffic(1, np.random.default_rng(9)).iloc[0].to_dict()
    original = dict(x)
    before = copy.deepcopy(trained)
    first = trained.score_one(x)
    assert trained.score_one(x) == first
    assert x == original
    assert trained.n_offered == before.n_offered and trained._sorted == before._sorted


def test_pipeline_flag_prevents_learning(trained: PopulationDetector) -> None:
    detector = copy.deepcopy(trained)
    learned, offered = detector.n_learned, detector.n_offered
    x = normal_traffic(1, np.random.default_rng(2)).iloc[0].to_dict()
    detector.score_and_maybe_learn(x, allow_learn=False)
    assert (detector.n_learned, detector.n_offered) == (learned, offered)
    assert detector.learn_one(x) is True
    assert detector.n_learned == learned + 1


def test_pending_path_equals_the_one_call_path(trained: PopulationDetector) -> None:
    one_call, two_phase = copy.deepcopy(trained), copy.deepcopy(trained)
    rows = traffic(300, anomaly_fraction=0.05, seed=11)[0].to_dict("records")
    for i, x in enumerate(rows):
        allow = i % 7 != 0  # the pipeline flags some events
        expected = one_call.score_and_maybe_learn(x, allow_learn=allow)
        pending = two_phase.score_pending(x)
        assert pending.score == expected == two_phase.score_one(x)
        if allow:
            two_phase.learn_pending(pending)
    assert (one_call.n_learned, one_call.n_refused) == (two_phase.n_learned, two_phase.n_refused)
    assert one_call._sorted == two_phase._sorted


def test_self_protection_refuses_what_it_flags(trained: PopulationDetector) -> None:
    detector = copy.deepcopy(trained)
    outlier = anomalies("leaked_key", 1, np.random.default_rng(4)).iloc[0].to_dict()
    assert detector.raw_score_one(outlier) > detector.threshold
    learned = detector.n_learned
    assert detector.learn_one(outlier) is False
    assert detector.n_learned == learned and detector.n_refused >= 1


def _burst_run(protect: bool) -> tuple[PopulationDetector, float, float, float]:
    """5,000 normal events, then 4,000 events of one runaway-loop pattern, all offered."""
    rng = np.random.default_rng(5)
    normal = normal_traffic(5000, rng).to_dict("records")
    burst = anomalies("runaway_loop", 4000, rng).to_dict("records")
    detector = PopulationDetector(protect=protect, seed=1)
    scores = [detector.score_and_maybe_learn(x, allow_learn=True) for x in normal + burst]
    return (
        detector,
        float(np.mean(scores[4000:5000])),  # normal traffic
        float(np.mean(scores[5000:5100])),  # start of the burst
        float(np.mean(scores[-200:])),  # end of the burst
    )


def test_protected_learning_holds_against_a_sustained_burst() -> None:
    detector, normal, start, end = _burst_run(protect=True)
    assert start > 0.95 and end > 0.95, (normal, start, end)
    assert normal < 0.6
    assert detector.frozen  # the burst did not move the threshold
    # When the burst is over the freeze lifts, and the burst is still not normal.
    rng = np.random.default_rng(6)
    for x in normal_traffic(3000, rng).to_dict("records"):
        detector.score_and_maybe_learn(x, allow_learn=True)
    assert not detector.frozen
    later = anomalies("runaway_loop", 50, rng).to_dict("records")
    assert np.mean([detector.score_one(x) for x in later]) > 0.95


def test_unprotected_detector_learns_the_burst() -> None:
    _, normal, start, end = _burst_run(protect=False)
    assert start > 0.9, (normal, start, end)
    assert end < 0.7, "without protection the burst should have become normal"


def test_missing_unknown_and_non_finite_features(trained: PopulationDetector) -> None:
    x = normal_traffic(1, np.random.default_rng(6)).iloc[0].to_dict()
    partial = {k: v for k, v in list(x.items())[:5]}
    noisy = {**x, "brand_new_feature": 1e9, "tokens_log1p": math.nan, "hour_sin": math.inf}
    for event in (partial, noisy, {}):
        assert 0.0 <= trained.score_one(event) <= 1.0
    assert trained.feature_names is not None and "brand_new_feature" not in trained.feature_names


def test_checkpoint_round_trip(tmp_path, trained: PopulationDetector) -> None:
    path = tmp_path / "population.joblib"
    digest = trained.save(path)
    assert (tmp_path / "population.joblib.sha256").read_text().startswith(digest)
    restored = PopulationDetector.load(path)
    assert restored.version == trained.version
    for x in normal_traffic(50, np.random.default_rng(7)).to_dict("records"):
        assert restored.score_one(x) == trained.score_one(x)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_tampered_checkpoint_is_refused(tmp_path, trained: PopulationDetector) -> None:
    path = tmp_path / "population.joblib"
    trained.save(path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError, match="SHA-256"):
        PopulationDetector.load(path)
    (tmp_path / "population.joblib.sha256").unlink()
    with pytest.raises(ModelIntegrityError, match="sidecar"):
        PopulationDetector.load(path)


def test_with_a_signing_key_only_a_checkpoint_signed_with_it_loads(
        tmp_path, trained: PopulationDetector) -> None:
    """Whoever can write the data directory can write a pickle and its digest; only the
    signing key's holder can sign it. A forged, unsigned or foreign-signed checkpoint is
    refused before it is unpickled."""
    from models.integrity import atomic_write_bytes, dump_bytes, sha256_bytes

    key = "k" * 32
    path = tmp_path / "population.joblib"
    trained.save(path, signing_key=key)
    assert PopulationDetector.load(path, signing_key=key).version == trained.version
    with pytest.raises(ModelIntegrityError, match="not signed with the configured"):
        PopulationDetector.load(path, signing_key="another key of 32 characters...")
    forged = dump_bytes(PopulationDetector(seed=1))  # a consistent pair, no valid signature
    atomic_write_bytes(path, forged)
    (tmp_path / "population.joblib.sha256").write_text(
        f"{sha256_bytes(forged)}  population.joblib\n")
    with pytest.raises(ModelIntegrityError, match="not signed with the configured"):
        PopulationDetector.load(path, signing_key=key)
    assert PopulationDetector.load(path).n_learned == 0  # without a key: the digest only


def test_checkpoint_of_another_type_is_refused(tmp_path) -> None:
    from models.integrity import atomic_write_bytes, dump_bytes, sha256_bytes

    path = tmp_path / "other.joblib"
    data = dump_bytes({"not": "a detector"})
    atomic_write_bytes(path, data)
    (tmp_path / "other.joblib.sha256").write_text(sha256_bytes(data) + "\n")
    with pytest.raises(ModelIntegrityError, match="not a PopulationDetector"):
        PopulationDetector.load(path)


def test_invalid_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="protect_quantile"):
        PopulationDetector(protect_quantile=1.0)
    with pytest.raises(ValueError, match="warmup_events"):
        PopulationDetector(window_size=1000, warmup_events=10)


def _lasting_change(max_frozen_events: int | None) -> tuple[PopulationDetector, np.ndarray]:
    rng = np.random.default_rng(8)
    detector = PopulationDetector(calibration_window=2000, seed=1,
                                  max_frozen_events=max_frozen_events)
    for x in normal_traffic(3000, rng).to_dict("records"):
        detector.score_and_maybe_learn(x, allow_learn=True)
    busier = normal_traffic(12000, rng)  # every key, from now on, six times as busy
    for name in ("requests_count_by_key_1m", "requests_count_by_key_1h",
                 "requests_count_by_ip_5m"):
        busier[name] *= 6
    scores = [detector.score_and_maybe_learn(x, allow_learn=True)
              for x in busier.to_dict("records")]
    return detector, np.array(scores)


def test_a_lasting_population_change_becomes_the_new_normal() -> None:
    """A freeze is bounded: after a lasting population-wide change the calibration follows,
    instead of staying frozen on the old traffic and flagging ever more of the new."""
    detector, scores = _lasting_change(None)
    stuck, stuck_scores = _lasting_change(10**9)
    assert np.mean(scores[:300] >= 0.99) > 0.2  # the change is seen at first
    assert detector.n_thaws >= 1 and not detector.frozen
    assert stuck.frozen and stuck.n_thaws == 0
    late, late_stuck = np.mean(scores[-2000:] >= 0.99), np.mean(stuck_scores[-2000:] >= 0.99)
    assert late < 0.02 < late_stuck, (late, late_stuck)
