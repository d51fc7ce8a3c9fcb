"""What the detectors say about one event, handed from the models to fusion.

Scores follow one convention: higher is more anomalous, in [0, 1]. A missing detector
(not trained yet, still warming up) is `None`, never a made-up number.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class ModelSignals:
    """Calibrated model outputs for one event."""

    population: float | None = None
    """Online River population model score, [0, 1]."""
    offline: float | None = None
    """Offline Isolation Forest score as a percentile of normal traffic, [0, 1]."""
    key_baseline: float | None = None
    """How far the key is from its own adaptive baseline, squashed to [0, 1]."""
    key_drift: bool = False
    """The key's drift detector marks a change of regime."""
    top_features: list[tuple[str, float]] = field(default_factory=list)
    """The features that drove the model scores, with their deviation."""
    versions: dict[str, str | None] = field(default_factory=dict)
