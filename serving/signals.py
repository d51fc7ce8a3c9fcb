"""What the detectors say about one event, handed from the models to fusion.

Scores follow one convention: higher is more anomalous, in [0, 1]. A missing detector
(not trained yet, still warming up) is `None`, never a made-up number.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

TopFeatures = list[tuple[str, float]]


@dataclass(slots=True)
class ModelSignals:
    """Calibrated model outputs for one event.

    The explanation (`top_features`) is only read when a model score is high enough to
    matter, so a detector may hand over `explain`, a function that computes it on first
    use: most events are never explained, and they should not pay for it.
    """

    population: float | None = None
    """Online River population model score, [0, 1]."""
    offline: float | None = None
    """Offline Isolation Forest score as a percentile of normal traffic, [0, 1]."""
    key_baseline: float | None = None
    """How far the key is from its own adaptive baseline, squashed to [0, 1]."""
    key_drift: bool = False
    """The key's drift detector marks a change of regime."""
    top: TopFeatures | None = None
    """The features that drove the model scores, with their deviation (see `top_features`)."""
    versions: dict[str, str | None] = field(default_factory=dict)
    explain: Callable[[], TopFeatures] | None = None
    """Computes `top` on first use, when it was not given."""

    def __init__(self, population: float | None = None, offline: float | None = None,
                 key_baseline: float | None = None, key_drift: bool = False,
                 top_features: TopFeatures | None = None,
                 versions: dict[str, str | None] | None = None,
                 explain: Callable[[], TopFeatures] | None = None) -> None:
        self.population = population
        self.offline = offline
        self.key_baseline = key_baseline
        self.key_drift = key_drift
        self.top = top_features
        self.versions = versions if versions is not None else {}
        self.explain = explain

    @property
    def top_features(self) -> TopFeatures:
        """The features that drove the model scores, with their deviation."""
        if self.top is None:
            self.top = self.explain() if self.explain is not None else []
        return self.top

    @top_features.setter
    def top_features(self, value: TopFeatures) -> None:
        self.top = value
