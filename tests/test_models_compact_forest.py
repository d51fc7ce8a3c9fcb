"""CompactForest must give exactly what sklearn's IsolationForest.score_samples gives."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from sklearn.ensemble import IsolationForest

from models.compact_forest import CompactForest, average_path_length

TOLERANCE = 1e-9


def _data(seed: int, n: int = 600, d: int = 6) -> np.ndarray:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    if d > 1:
        X[:, 1] = rng.lognormal(size=n)  # heavy tail
    return X


def _probe(seed: int, d: int) -> np.ndarray:
    """Points inside, around and far outside the training range."""
    rng = np.random.default_rng(seed + 1000)
    return np.vstack([rng.normal(size=(150, d)), rng.normal(scale=8.0, size=(50, d))])


def _assert_same(forest: IsolationForest, X: np.ndarray) -> CompactForest:
    compact = CompactForest.from_sklearn(forest)
    expected = forest.score_samples(X)
    one_by_one = np.array([compact.score_samples_one(row.tolist()) for row in X])
    np.testing.assert_allclose(one_by_one, expected, rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(compact.score_samples(X), expected, rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(compact._depth_sum_loop(X[0].tolist()), compact._depth_sum(X[0]))
    return compact


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_equals_sklearn_for_several_seeds(seed: int) -> None:
    X = _data(seed)
    forest = IsolationForest(n_estimators=60, random_state=seed).fit(X)
    _assert_same(forest, _probe(seed, X.shape[1]))


@pytest.mark.parametrize("max_features", [0.5, 0.34, 3])
def test_equals_sklearn_with_feature_subsampling(max_features: float) -> None:
    X = _data(7, d=6)
    forest = IsolationForest(n_estimators=40, max_features=max_features, random_state=7).fit(X)
    assert forest._max_features < X.shape[1]
    _assert_same(forest, _probe(7, 6))


@pytest.mark.parametrize("max_samples", [16, 100, 0.5, 1.0, "auto"])
def test_equals_sklearn_for_max_samples_variants(max_samples: float | str) -> None:
    X = _data(11, n=400)
    forest = IsolationForest(n_estimators=30, max_samples=max_samples, random_state=11).fit(X)
    _assert_same(forest, _probe(11, X.shape[1]))


def test_equals_sklearn_with_bootstrap() -> None:
    X = _data(5)
    forest = IsolationForest(n_estimators=30, bootstrap=True, random_state=5).fit(X)
    _assert_same(forest, _probe(5, X.shape[1]))


def test_ties_constant_columns_and_float32_boundaries() -> None:
    rng = np.random.default_rng(3)
    n = 500
    X = np.column_stack(
        [
            rng.integers(0, 4, size=n).astype(float),  # many ties
            np.full(n, 2.5),  # constant column
            rng.choice([0.0, 1.0], size=n, p=[0.95, 0.05]),  # rare binary flag
            rng.normal(size=n) * 1e-3 + 1.0 / 3.0,  # values that float32 rounds
        ]
    )
    forest = IsolationForest(n_estimators=50, random_state=3).fit(X)
    compact = _assert_same(forest, np.vstack([X, X + 0.5, X * 1e7]))
    # Exactly on the thresholds (and one float64 ulp either side): float32 rounding decides.
    internal = compact.feature >= 0
    probes = []
    for f, t in zip(compact.feature[internal][:60], compact.threshold[internal][:60], strict=True):
        for value in (t, np.nextafter(t, -np.inf), np.nextafter(t, np.inf)):
            row = X[0].copy()
            row[f] = value
            probes.append(row)
    _assert_same(forest, np.array(probes))


def test_missing_values_follow_sklearn() -> None:
    X = _data(9, d=4)
    forest = IsolationForest(n_estimators=40, random_state=9).fit(X)
    probe = _probe(9, 4)
    probe[::3, 0] = np.nan
    probe[::5, 2] = np.nan
    probe[7, :] = np.nan
    _assert_same(forest, probe)


def test_infinities_and_float32_overflow() -> None:
    X = _data(4, d=3)
    forest = IsolationForest(n_estimators=20, random_state=4).fit(X)
    probe = np.array([[np.inf, 0, 0], [-np.inf, 1, 1], [1e39, -1e39, 0.0], [3.4e38, 0, 0]])
    with np.errstate(over="ignore"):
        _assert_same(forest, probe)


def test_single_feature_forest() -> None:
    X = _data(8, d=1)
    forest = IsolationForest(n_estimators=25, random_state=8).fit(X)
    _assert_same(forest, _probe(8, 1))


def test_anomaly_score_is_the_opposite_and_higher_for_outliers() -> None:
    X = _data(2)
    forest = IsolationForest(n_estimators=50, random_state=2).fit(X)
    compact = CompactForest.from_sklearn(forest)
    inlier, outlier = [0.0] * 6, [9.0] * 6
    assert compact.anomaly_score_one(outlier) > compact.anomaly_score_one(inlier)
    assert compact.anomaly_score_one(inlier) == -compact.score_samples_one(inlier)
    assert 0.0 < compact.anomaly_score_one(outlier) <= 1.0


def test_pickle_round_trip_rebuilds_the_compiled_scorer() -> None:
    X = _data(6)
    forest = IsolationForest(n_estimators=20, random_state=6).fit(X)
    compact = CompactForest.from_sklearn(forest)
    restored = pickle.loads(pickle.dumps(compact))
    probe = _probe(6, 6)
    np.testing.assert_array_equal(restored.score_samples(probe), compact.score_samples(probe))
    assert restored.score_samples_one(probe[0].tolist()) == compact.score_samples_one(probe[0])
    assert "_depth_sum" not in compact.__getstate__()


def test_wrong_row_length_is_refused() -> None:
    forest = IsolationForest(n_estimators=5, random_state=0).fit(_data(0))
    compact = CompactForest.from_sklearn(forest)
    with pytest.raises(ValueError, match="expected 6 features"):
        compact.score_samples_one([0.0] * 5)
    with pytest.raises(ValueError, match="shape"):
        compact.score_samples(np.zeros((2, 5)))


def test_unfitted_forest_is_refused() -> None:
    with pytest.raises(ValueError, match="not fitted"):
        CompactForest.from_sklearn(IsolationForest())


def test_average_path_length_matches_known_values() -> None:
    np.testing.assert_allclose(average_path_length([0, 1, 2]), [0.0, 0.0, 1.0])
    n = 256.0
    expected = 2.0 * (np.log(n - 1.0) + np.euler_gamma) - 2.0 * (n - 1.0) / n
    assert average_path_length([n])[0] == expected
