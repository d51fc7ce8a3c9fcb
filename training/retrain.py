"""The retrain job: batch features → Isolation Forest → calibration → gates → promotion.

The offline model is refit on the event log (by default, the service's own) so that it
follows the population as it drifts. Its features come from the vectorised twin
(`features.twin`): the stream's values, computed column-wise at hundreds of thousands of
events a second, with every event of the log taken as judged normal (it is the traffic
the service accepted; the stream learns only from those).

A new model is promoted only when it passes gates that catch a bad fit before it reaches
traffic:

- enough rows to learn from;
- on the most recent slice of the data (held out from fitting), the share of events the
  new model would put at high or above stays near what its calibration promises;
- the new model's view of that slice has not moved wildly from the current model's.

Each run writes a JSON report and plots beside the model version, and says why a model
was refused.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from features.extractor import FEATURE_NAMES
from features.keys import KeyHasher
from features.twin import twin_features
from models.feature_space import frame_to_model_space, model_features
from models.offline import OfflineDetector
from models.registry import ModelRegistry
from training.events_io import load_events

log = logging.getLogger("keywatch.retrain")

HIGH_PERCENTILE = 0.999
"""The offline percentile fusion treats as a strong model signal."""


@dataclass(frozen=True, slots=True)
class Gates:
    min_rows: int = 500
    holdout_fraction: float = 0.2
    max_holdout_high_share: float = 0.01
    """At most this share of the recent held-out traffic may score at or above the
    high percentile (calibration promises 0.1%; traffic drifts, so allow 10x)."""
    max_share_shift: float = 0.05
    """Largest allowed change, against the current model, of the share of held-out traffic
    above the 99th percentile."""


@dataclass(slots=True)
class RetrainResult:
    promoted: bool
    version: str | None
    reasons: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    report_path: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).isoformat().replace("+00:00", "Z")


def offline_feature_names() -> list[str]:
    """The model features (see `models.feature_space`) the extractor builds."""
    return model_features(FEATURE_NAMES)


def retrain(
    *,
    events: Path,
    model_dir: Path,
    hasher: KeyHasher | None = None,
    since: float | None = None,
    until: float | None = None,
    gates: Gates | None = None,
    promote: bool = True,
    progress: bool = True,
    random_state: int = 0,
    signing_key: str | None = None,
) -> RetrainResult:
    """Fit, gate and (if it passes) promote a new offline model; never raises on a gate."""
    gates = gates or Gates()
    started = time.time()
    df = load_events(events, hasher=hasher, since=since, until=until)
    if len(df) < gates.min_rows:
        return RetrainResult(False, None, [f"only {len(df)} events; at least "
                                           f"{gates.min_rows} are needed"])
    names = offline_feature_names()
    # the vectorised twin: the stream's features, every event taken as judged normal
    feats = frame_to_model_space(twin_features(df, key_id_column="key_id",
                                               progress=progress), names)
    n_hold = int(len(feats) * gates.holdout_fraction)
    train, holdout = feats.iloc[: len(feats) - n_hold], feats.iloc[len(feats) - n_hold:]
    window = (_iso(float(df["timestamp"].iloc[0])), _iso(float(df["timestamp"].iloc[-1])))
    detector = OfflineDetector().fit(train, names, random_state=random_state,
                                     calibration_fraction=0.25, training_window=window)

    reasons: list[str] = []
    metrics: dict[str, Any] = {"rows": len(df), "train_rows": len(train),
                               "holdout_rows": len(holdout)}
    hold_pct = detector.percentiles(holdout) if len(holdout) else np.array([])
    high_share = float(np.mean(hold_pct >= HIGH_PERCENTILE)) if len(hold_pct) else 0.0
    metrics["holdout_high_share"] = high_share
    if high_share > gates.max_holdout_high_share:
        reasons.append(f"{high_share:.2%} of recent traffic would score high or above "
                       f"(gate: {gates.max_holdout_high_share:.2%})")

    registry = ModelRegistry(model_dir, signing_key=signing_key)
    current = _load_current(registry, names)
    if current is not None and len(holdout):
        cur_pct = current.percentiles(holdout)
        new_share, cur_share = float(np.mean(hold_pct >= 0.99)), float(np.mean(cur_pct >= 0.99))
        metrics.update(current_version=registry.current_version(),
                       holdout_p99_share_new=new_share, holdout_p99_share_current=cur_share)
        if abs(new_share - cur_share) > gates.max_share_shift:
            reasons.append(f"score distribution moved: {new_share:.2%} of recent traffic "
                           f"above p99 against {cur_share:.2%} with the current model "
                           f"(gate: {gates.max_share_shift:.0%} shift)")
    metrics["fit_seconds"] = round(time.time() - started, 2)

    passed = not reasons
    version = registry.save(detector, manifest_extra={
        "metrics": metrics,
        "gates": {**asdict(gates), "passed": passed, "reasons": reasons},
    })
    report_dir = Path(model_dir) / "reports" / version
    report_path = write_report(report_dir, version=version, metrics=metrics,
                               reasons=reasons, holdout_percentiles=hold_pct,
                               current_percentiles=(current.percentiles(holdout)
                                                    if current is not None and len(holdout)
                                                    else None),
                               detector=detector, holdout=holdout)
    promoted = False
    if passed and promote:
        registry.promote(version)
        promoted = True
        log.info("promoted offline model %s", version)
    else:
        log.warning("offline model %s not promoted: %s", version, "; ".join(reasons) or
                    "promotion not requested")
    return RetrainResult(promoted, version, reasons, metrics, str(report_path))


def _load_current(registry: ModelRegistry, names: list[str]) -> OfflineDetector | None:
    try:
        return registry.load_current(expected_features=names)
    except Exception as exc:  # a broken current model must not block a fix
        log.warning("current model not usable for comparison: %s", exc)
        return None


def write_report(report_dir: Path, *, version: str, metrics: dict[str, Any],
                 reasons: list[str], holdout_percentiles: np.ndarray,
                 current_percentiles: np.ndarray | None, detector: OfflineDetector,
                 holdout: pd.DataFrame) -> Path:
    """JSON report plus PNG plots of the held-out score distribution."""
    # the Figure API draws without pyplot, so a notebook's own plotting backend is untouched
    from matplotlib.figure import Figure

    report_dir.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2)
    if len(holdout_percentiles):
        axes[0].hist(holdout_percentiles, bins=50, alpha=0.7, label=f"new ({version})")
        if current_percentiles is not None:
            axes[0].hist(current_percentiles, bins=50, alpha=0.5, label="current")
        axes[0].set_yscale("log")
        axes[0].set_xlabel("offline percentile on recent held-out traffic")
        axes[0].legend()
        raw = detector.raw_scores(holdout)
        axes[1].hist(raw, bins=60, color="tab:purple")
        axes[1].set_xlabel("raw isolation score (higher = more anomalous)")
    fig.suptitle(f"retrain {version}: {'refused' if reasons else 'passed'}")
    fig.tight_layout()
    fig.savefig(report_dir / "scores.png", dpi=90)
    path = report_dir / "report.json"
    path.write_text(json.dumps({"version": version, "passed": not reasons,
                                "reasons": reasons, "metrics": metrics,
                                "plots": ["scores.png"]}, indent=2) + "\n")
    return path
