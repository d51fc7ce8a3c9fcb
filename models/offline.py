"""The offline detector: an IsolationForest fitted on normal traffic, calibrated to percentiles.

Why a percentile
----------------
A raw isolation score (``2 ** (-E[h(x)] / c(n))``) means little on its own: whether 0.62 is
unusual depends on the data the forest was fitted on. After fitting, the detector scores a
sample of normal traffic and keeps ~1000 quantiles of those scores. ``percentile_one`` then
answers "what fraction of normal traffic is *less* anomalous than this event?", a number in
[0, 1] that reads the same for every model version, so fusion thresholds survive a retrain and
a target false-positive rate translates directly into a threshold (``threshold_for_fpr``).

Why robust z-scores for the reasons
-----------------------------------
An isolation forest does not say *why* a point is isolated. The reasons shown to an analyst are
the features furthest from their training medians, in units of the training IQR (robust to the
very outliers we are explaining), computed in microseconds from numbers stored at fit time.

Serving cost
------------
Scoring goes through :class:`models.compact_forest.CompactForest` (exactly sklearn's score,
~25,000-35,000 single events/s on one core; ``percentile_one`` on a feature dict ~22,000/s),
never through sklearn's per-call machinery
(~70 single events/s).
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from sklearn.ensemble import IsolationForest

from models.compact_forest import CompactForest

__all__ = ["Deviation", "NotFittedError", "OfflineDetector"]

KIND = "offline-iforest"
"""The ``kind`` recorded in a registry manifest for this detector."""

_MAX_ABS_Z = 1000.0
"""Robust z-scores are clipped here: beyond it the number is noise, the ranking is what counts."""


class NotFittedError(RuntimeError):
    """Raised when scoring with a detector that has not been fitted."""


@dataclass(frozen=True)
class Deviation:
    """How far one feature of an event lies from normal traffic.

    Attributes
    ----------
    feature
        Feature name.
    value
        The event's value (the training median when the event did not carry it).
    median
        Median of the feature in the training data.
    z
        Robust z-score: ``(value - median) / scale``, with ``scale`` the training IQR / 1.349
        (the standard deviation for normal data), falling back to the mean absolute deviation
        around the median when the IQR is zero (rare flags), clipped to +-1000.
    """

    feature: str
    value: float
    median: float
    z: float


class OfflineDetector:
    """IsolationForest + feature order + percentile calibration + robust reasons.

    Parameters
    ----------
    n_quantiles
        Size of the calibration sketch (quantiles of normal anomaly scores kept after fit).
        1001 gives percentiles to 0.1 %.

    Attributes
    ----------
    feature_names_ : list[str]
        Column order the forest was fitted on; input dicts are read in this order.
    forest_ : CompactForest
        The fitted forest, flattened for single-event scoring.
    medians_, scales_ : list[float]
        Per-feature training median and robust scale (see :class:`Deviation`).
    calibration_quantiles_ : list[float]
        Sorted quantiles of the anomaly scores of normal traffic, at probabilities
        ``i / (n_quantiles - 1)``.
    n_training_rows_, n_calibration_rows_ : int
        Rows used to fit the forest and to calibrate it.
    training_window_ : tuple[str | None, str | None]
        Start and end of the training data (as given to ``fit``), for the manifest.
    params_ : dict
        The hyperparameters used by ``fit``.

    Examples
    --------
    >>> import numpy as np, pandas as pd
    >>> rng = np.random.default_rng(0)
    >>> df = pd.DataFrame({"rate": rng.normal(10, 2, 2000), "tokens": rng.normal(6, 1, 2000)})
    >>> detector = OfflineDetector().fit(df, ["rate", "tokens"], n_estimators=50)
    >>> detector.percentile_one({"rate": 10.0, "tokens": 6.0}) < 0.5
    True
    >>> detector.percentile_one({"rate": 40.0, "tokens": 6.0}) > 0.98
    True
    >>> detector.top_deviations({"rate": 40.0}, k=1)[0].feature
    'rate'
    """

    kind = KIND

    def __init__(self, *, n_quantiles: int = 1001) -> None:
        self.n_quantiles = n_quantiles

    # ------------------------------------------------------------------ fitting

    def fit(
        self,
        df: pd.DataFrame,
        feature_names: Sequence[str],
        *,
        n_estimators: int = 100,
        max_samples: int | float | str = 256,
        max_features: float = 1.0,
        random_state: int | None = 0,
        calibration_fraction: float = 0.0,
        training_window: tuple[Any, Any] | None = None,
    ) -> OfflineDetector:
        """Fit the forest on normal traffic and calibrate its scores.

        Parameters
        ----------
        df
            Normal traffic, one row per event, with at least the ``feature_names`` columns.
            Missing values (NaN) are filled with the column median, as at scoring time.
        feature_names
            The features to use, in the order the model will read them.
        n_estimators, max_samples, max_features, random_state
            Passed to ``sklearn.ensemble.IsolationForest`` (``max_samples`` is capped at the
            number of fitting rows).
        calibration_fraction
            Fraction of rows held out from the forest and used only for calibration. 0 (the
            default) calibrates on the fitting rows, which is unbiased enough when the data is
            much larger than ``max_samples`` (each tree sees only ``max_samples`` rows); use
            e.g. 0.2 on small training sets so thresholds are not optimistic.
        training_window
            ``(start, end)`` of the data, recorded for the manifest (ISO strings or epoch).

        Returns
        -------
        OfflineDetector
            ``self``, fitted.
        """
        names = list(feature_names)
        if not 0.0 <= calibration_fraction < 1.0:
            raise ValueError("calibration_fraction must be in [0, 1)")
        if self.n_quantiles < 2:
            raise ValueError("n_quantiles must be at least 2")
        X = _training_matrix(df, names)
        medians = np.nanmedian(X, axis=0)
        medians = np.where(np.isnan(medians), 0.0, medians)  # an all-NaN column
        X = np.where(np.isnan(X), medians, X)
        scales = _robust_scales(X, medians)

        rng = np.random.default_rng(random_state)
        if calibration_fraction > 0.0:
            order = rng.permutation(len(X))
            n_cal = max(1, round(len(X) * calibration_fraction))
            X_cal, X_fit = X[order[:n_cal]], X[order[n_cal:]]
        else:
            X_cal = X_fit = X
        if isinstance(max_samples, int) and not isinstance(max_samples, bool):
            max_samples = min(max_samples, len(X_fit))
        forest = IsolationForest(
            n_estimators=n_estimators,
            max_samples=max_samples,
            max_features=max_features,
            random_state=random_state,
        ).fit(X_fit)

        self.feature_names_ = names
        self.forest_ = CompactForest.from_sklearn(forest)
        self.medians_ = medians.tolist()
        self.scales_ = scales.tolist()
        self.n_training_rows_ = len(X_fit)
        self.training_window_ = (
            (None, None) if training_window is None else tuple(training_window)  # type: ignore[assignment]
        )
        self.params_ = {
            "n_estimators": n_estimators,
            "max_samples": max_samples,
            "max_samples_effective": int(forest.max_samples_),
            "max_features": max_features,
            "random_state": random_state,
            "calibration_fraction": calibration_fraction,
            "n_quantiles": self.n_quantiles,
        }
        self._calibrate_matrix(X_cal)
        return self

    def calibrate(self, df: pd.DataFrame) -> OfflineDetector:
        """Recalibrate percentiles on another sample of normal traffic (e.g. a held-out day).

        The forest is unchanged; only ``calibration_quantiles_`` is replaced.
        """
        self._check_fitted()
        self._calibrate_matrix(self._matrix(df))
        return self

    def _calibrate_matrix(self, X: np.ndarray) -> None:
        raw = -self.forest_.score_samples(X)
        probabilities = np.linspace(0.0, 1.0, self.n_quantiles)
        self.calibration_quantiles_ = np.quantile(raw, probabilities).tolist()
        self.n_calibration_rows_ = len(X)

    # ------------------------------------------------------------------ scoring one event

    @property
    def is_fitted(self) -> bool:
        """Whether ``fit`` has run."""
        return hasattr(self, "forest_")

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise NotFittedError("OfflineDetector is not fitted; call fit() or load a model")

    def vector(self, features: Mapping[str, float]) -> list[float]:
        """The event as a row in ``feature_names_`` order; absent or NaN values -> median."""
        self._check_fitted()
        row = []
        for name, median in zip(self.feature_names_, self.medians_, strict=True):
            value = features.get(name)
            if value is None or value != value:
                row.append(median)
            else:
                row.append(float(value))
        return row

    def raw_score_one(self, features: Mapping[str, float]) -> float:
        """Isolation anomaly score in ``(0, 1]``; higher = more anomalous, but uncalibrated."""
        row = self.vector(features)  # checks that the detector is fitted
        return self.forest_.anomaly_score_one(row)

    def percentile_one(self, features: Mapping[str, float]) -> float:
        """Fraction of normal (calibration) traffic less anomalous than this event, in [0, 1].

        0.5 is a typical event, 0.99 is more anomalous than 99 % of normal traffic, 1.0 is
        beyond anything seen in calibration. Compare with :meth:`threshold_for_fpr`.
        """
        return self.percentile_of_raw(self.raw_score_one(features))

    def percentile_of_row(self, row: Sequence[float]) -> float:
        """`percentile_one` for a row already made by :meth:`vector` (made once, used twice
        when the event is also explained)."""
        return self.percentile_of_raw(self.forest_.anomaly_score_one(row))

    def percentile_of_raw(self, raw: float) -> float:
        """Map a raw anomaly score to its calibrated percentile.

        Linear interpolation between the stored quantiles; where several quantiles are equal
        (ties in the calibration scores) the lowest probability is used, i.e. the fraction of
        traffic *strictly* less anomalous.
        """
        self._check_fitted()
        q = self.calibration_quantiles_
        last = len(q) - 1
        if raw > q[last]:
            return 1.0
        if raw <= q[0]:
            return 0.0
        i = bisect_left(q, raw)
        if q[i] == raw:
            return i / last
        lo, hi = q[i - 1], q[i]
        return (i - 1 + (raw - lo) / (hi - lo)) / last

    def threshold_for_fpr(self, fpr: float) -> float:
        """Percentile threshold that flags a fraction ``fpr`` of normal traffic.

        An event is flagged when ``percentile_one(x) >= threshold_for_fpr(fpr)``. Because
        scores are calibrated, this is ``1 - fpr`` up to the sketch's resolution
        (1 / (n_quantiles - 1)); it is the calibration data that makes it hold, so
        recalibrate on held-out normal traffic when in doubt (:meth:`calibrate`).
        """
        if not 0.0 < fpr < 1.0:
            raise ValueError("fpr must be in (0, 1)")
        return 1.0 - fpr

    def raw_threshold_for_fpr(self, fpr: float) -> float:
        """The raw anomaly score above which a fraction ``fpr`` of normal traffic lies."""
        self._check_fitted()
        if not 0.0 < fpr < 1.0:
            raise ValueError("fpr must be in (0, 1)")
        q = np.asarray(self.calibration_quantiles_)
        return float(np.interp(1.0 - fpr, np.linspace(0.0, 1.0, len(q)), q))

    def top_deviations(self, features: Mapping[str, float], k: int = 3) -> list[Deviation]:
        """The ``k`` features furthest from their training medians (by ``|robust z|``).

        Features at their median (z = 0) are never listed, so fewer than ``k`` may return.
        """
        return self.deviations_of_row(self.vector(features), k)

    def deviations_of_row(self, row: Sequence[float], k: int = 3) -> list[Deviation]:
        """`top_deviations` for a row already made by :meth:`vector`."""
        deviations = []
        for name, value, median, scale in zip(
            self.feature_names_, row, self.medians_, self.scales_, strict=True
        ):
            z = (value - median) / scale
            if z != 0.0:
                z = max(-_MAX_ABS_Z, min(_MAX_ABS_Z, z))
                deviations.append(Deviation(name, value, median, z))
        deviations.sort(key=lambda d: (-abs(d.z), d.feature))
        return deviations[:k]

    # ------------------------------------------------------------------ batches

    def _matrix(self, df: pd.DataFrame) -> np.ndarray:
        self._check_fitted()
        X = df.reindex(columns=self.feature_names_).to_numpy(dtype=np.float64, copy=True)
        return np.where(np.isnan(X), np.asarray(self.medians_), X)

    def raw_scores(self, df: pd.DataFrame) -> np.ndarray:
        """Raw anomaly scores for a frame (absent columns / NaN -> training medians)."""
        return -self.forest_.score_samples(self._matrix(df))

    def percentiles(self, df: pd.DataFrame) -> np.ndarray:
        """Vectorised :meth:`percentile_one` for a frame; same values as the one-event path."""
        raw = self.raw_scores(df)
        q = np.asarray(self.calibration_quantiles_)
        last = len(q) - 1
        i = np.clip(np.searchsorted(q, raw, side="left"), 1, last)
        lo, hi = q[i - 1], q[i]
        with np.errstate(divide="ignore", invalid="ignore"):
            inner = (i - 1 + (raw - lo) / (hi - lo)) / last
        out = np.where(q[i] == raw, i / last, inner)
        out = np.where(raw <= q[0], 0.0, out)
        return np.where(raw > q[last], 1.0, out)

    # ------------------------------------------------------------------ metadata

    def manifest_fields(self) -> dict[str, Any]:
        """What the model registry records about this detector in ``manifest.json``."""
        self._check_fitted()
        start, end = self.training_window_
        return {
            "kind": self.kind,
            "feature_names": list(self.feature_names_),
            "training_window": {"start": _jsonable(start), "end": _jsonable(end)},
            "row_count": int(self.n_training_rows_),
            "calibration_rows": int(self.n_calibration_rows_),
            "params": dict(self.params_),
        }

    def __repr__(self) -> str:
        if not self.is_fitted:
            return "OfflineDetector(unfitted)"
        return (
            f"OfflineDetector(n_features={len(self.feature_names_)}, "
            f"rows={self.n_training_rows_}, forest={self.forest_!r})"
        )


def _robust_scales(X: np.ndarray, medians: np.ndarray) -> np.ndarray:
    """IQR / 1.349, else 1.2533 * mean |x - median|, else a tiny scale for constant columns."""
    q75, q25 = np.percentile(X, [75, 25], axis=0)
    scales = (q75 - q25) / 1.349
    mean_abs = 1.2533 * np.mean(np.abs(X - medians), axis=0)
    scales = np.where(scales > 0, scales, mean_abs)
    tiny = 1e-3 * np.maximum(1.0, np.abs(medians))
    return np.where(scales > 0, scales, tiny)


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, str | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


def _training_matrix(df: pd.DataFrame, names: list[str]) -> np.ndarray:
    """The training rows as a float matrix in `names` order; refuses what would make a
    silently wrong model (no, duplicate or missing features, infinities, under 10 rows)."""
    if not names:
        raise ValueError("feature_names is empty")
    if len(set(names)) != len(names):
        duplicates = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"feature_names has duplicates: {duplicates}")
    missing = [n for n in names if n not in df.columns]
    if missing:
        raise ValueError(f"training data lacks feature columns: {missing}")
    X = df[names].to_numpy(dtype=np.float64, copy=True)
    infinite = [n for n, bad in zip(names, np.isinf(X).any(axis=0), strict=True) if bad]
    if infinite:
        raise ValueError(f"training data has infinite values in: {infinite}")
    if len(X) < 10:
        raise ValueError(f"need at least 10 training rows, got {len(X)}")
    return X
