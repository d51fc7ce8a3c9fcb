"""OfflineDetector: quality floor, calibration, reasons, and input handling."""

from __future__ import annotations

import io
import itertools
import math

import joblib
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from models.offline import NotFittedError, OfflineDetector
from tests.support.synthetic import FEATURE_NAMES, anomalies, normal_traffic, traffic


@pytest.fixture(scope="module")
def detector() -> OfflineDetector:
    train = normal_traffic(6000, np.random.default_rng(100))
    return OfflineDetector().fit(
        train,
        FEATURE_NAMES,
        n_estimators=150,
        training_window=("2026-11-01T00:00:00Z", "2026-11-25T00:00:00Z"),
    )


def test_quality_floor_on_injected_anomalies(detector: OfflineDetector) -> None:
    df, y = traffic(4000, anomaly_fraction=0.05, seed=7)
    auc = roc_auc_score(y, detector.percentiles(df))
    assert auc >= 0.9, auc


def test_one_event_path_equals_the_batch_path(detector: OfflineDetector) -> None:
    df, _ = traffic(300, anomaly_fraction=0.1, seed=8)
    batch = detector.percentiles(df)
    one = np.array([detector.percentile_one(row) for row in df.to_dict("records")])
    np.testing.assert_allclose(one, batch, rtol=0, atol=1e-12)
    raw = np.array([detector.raw_score_one(row) for row in df.to_dict("records")])
    np.testing.assert_allclose(raw, detector.raw_scores(df), rtol=0, atol=1e-12)


def test_percentiles_are_calibrated_on_fresh_normal_traffic(detector: OfflineDetector) -> None:
    fresh = detector.percentiles(normal_traffic(10000, np.random.default_rng(5)))
    assert fresh.min() >= 0.0 and fresh.max() <= 1.0
    assert abs(np.median(fresh) - 0.5) < 0.05
    for fpr in (0.01, 0.05, 0.2):
        flagged = np.mean(fresh >= detector.threshold_for_fpr(fpr))
        assert fpr * 0.6 <= flagged <= fpr * 1.5, (fpr, flagged)


def test_percentile_is_monotone_in_the_raw_score(detector: OfflineDetector) -> None:
    q = detector.calibration_quantiles_
    grid = np.linspace(q[0] - 0.05, q[-1] + 0.05, 500)
    mapped = [detector.percentile_of_raw(float(r)) for r in grid]
    assert mapped[0] == 0.0 and mapped[-1] == 1.0
    assert all(b >= a for a, b in itertools.pairwise(mapped))
    assert detector.percentile_of_raw(q[500]) == pytest.approx(0.5, abs=1e-3)


def test_raw_threshold_matches_the_percentile_threshold(detector: OfflineDetector) -> None:
    raw = detector.raw_threshold_for_fpr(0.05)
    assert detector.percentile_of_raw(raw) == pytest.approx(0.95, abs=1e-6)
    with pytest.raises(ValueError, match="fpr"):
        detector.threshold_for_fpr(0.0)


def test_missing_and_nan_features_default_to_the_training_median(
    detector: OfflineDetector,
) -> None:
    medians = dict(zip(detector.feature_names_, detector.medians_, strict=True))
    assert detector.vector({}) == detector.medians_
    assert detector.percentile_one({}) == detector.percentile_one(medians)
    with_nan = {**medians, "tokens_log1p": math.nan, "unknown_feature": 123.0}
    assert detector.percentile_one(with_nan) == detector.percentile_one(medians)
    assert detector.top_deviations({}) == []


def test_top_deviations_name_the_driving_features(detector: OfflineDetector) -> None:
    event = anomalies("stuffing", 1, np.random.default_rng(3)).iloc[0].to_dict()
    names = [d.feature for d in detector.top_deviations(event, k=3)]
    assert "auth_fail_ratio_by_key_5m" in names
    assert detector.percentile_one(event) > 0.99
    drain = {"tokens_log1p": 11.0}
    top = detector.top_deviations(drain, k=1)[0]
    assert top.feature == "tokens_log1p" and top.z > 5 and top.value == 11.0


def test_constant_and_rare_columns_get_a_usable_scale() -> None:
    rng = np.random.default_rng(0)
    df = pd.DataFrame(
        {
            "constant": np.full(500, 3.0),
            "rare_flag": (rng.random(500) < 0.04).astype(float),
            "normal": rng.normal(size=500),
        }
    )
    detector = OfflineDetector().fit(df, ["constant", "rare_flag", "normal"], n_estimators=20)
    assert all(s > 0 for s in detector.scales_)
    top = detector.top_deviations({"constant": 3.5, "rare_flag": 1.0, "normal": 0.5}, k=3)
    assert [d.feature for d in top][:2] == ["constant", "rare_flag"]


def test_holdout_calibration_and_recalibration() -> None:
    train = normal_traffic(3000, np.random.default_rng(1))
    detector = OfflineDetector(n_quantiles=501).fit(
        train, FEATURE_NAMES, n_estimators=50, calibration_fraction=0.25
    )
    assert detector.n_training_rows_ == 2250 and detector.n_calibration_rows_ == 750
    assert len(detector.calibration_quantiles_) == 501
    before = detector.calibration_quantiles_
    detector.calibrate(normal_traffic(1000, np.random.default_rng(2)))
    assert detector.n_calibration_rows_ == 1000 and detector.calibration_quantiles_ != before


def test_training_rows_with_nan_are_filled_with_medians() -> None:
    train = normal_traffic(1000, np.random.default_rng(4))
    train.loc[::10, "tokens_log1p"] = np.nan
    detector = OfflineDetector().fit(train, FEATURE_NAMES, n_estimators=20)
    assert detector.medians_[FEATURE_NAMES.index("tokens_log1p")] == pytest.approx(6.0, abs=0.1)


def test_bad_training_input_is_refused_with_the_column_named() -> None:
    train = normal_traffic(100, np.random.default_rng(0))
    with pytest.raises(ValueError, match="no_such_feature"):
        OfflineDetector().fit(train, [*FEATURE_NAMES, "no_such_feature"])
    with pytest.raises(ValueError, match="duplicates"):
        OfflineDetector().fit(train, ["hour_sin", "hour_sin"])
    broken = train.copy()
    broken.loc[3, "hour_cos"] = np.inf
    with pytest.raises(ValueError, match="hour_cos"):
        OfflineDetector().fit(broken, FEATURE_NAMES)
    with pytest.raises(TypeError):
        OfflineDetector().fit(train, FEATURE_NAMES, 10)  # hyperparameters are keyword-only


def test_unfitted_detector_says_so() -> None:
    with pytest.raises(NotFittedError, match="not fitted"):
        OfflineDetector().percentile_one({"x": 1.0})


def test_fitted_state_ends_with_underscore_and_pickles(detector: OfflineDetector) -> None:
    public = {k for k in vars(detector) if not k.startswith("_")}
    assert public - {"n_quantiles"} == {k for k in public if k.endswith("_")}
    buffer = io.BytesIO()
    joblib.dump(detector, buffer)
    buffer.seek(0)
    restored = joblib.load(buffer)
    event = {"requests_count_by_key_1m": 80.0, "interarrival_cv_by_key_5m": 0.02}
    assert restored.percentile_one(event) == detector.percentile_one(event)
    fields = restored.manifest_fields()
    assert fields["feature_names"] == FEATURE_NAMES and fields["row_count"] == 6000
    assert fields["training_window"]["start"] == "2026-11-01T00:00:00Z"
