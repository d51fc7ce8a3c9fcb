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

    The explanation is only needed when a model score is high enough to matter, so a
    detector may hand over `explain` instead of `top_features`; `top()` computes it on
    first use. Most events are never explained, and they should not pay for it.
    """

    population: float | None = None
    """Online River population model score, [0, 1]."""
    offline: float | None = None
    """Offline Isolation Forest score as a percentile of normal traffic, [0, 1]."""
    key_baseline: float | None = None
    """How far the key is from its own adaptive baseline, squashed to [0, 1]."""
    key_drift: bool = False
    """The key's drift detector marks a change of regime."""
    top_features: TopFeatures | None = None
    """The features that drove the model scores, with their deviation (None: not yet
    computed; read it through `top()`)."""
    versions: dict[str, str | None] = field(default_factory=dict)
    explain: Callable[[], TopFeatures] | None = None
    """Computes `top_features` when it was not given."""

    def top(self) -> TopFeatures:
        """The features that drove the model scores, computed once on first use."""
        if self.top_features is None:
            self.top_features = self.explain() if self.explain is not None else []
        return self.top_features
