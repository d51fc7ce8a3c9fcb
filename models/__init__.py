"""keywatch detectors. Convention everywhere: higher score = more anomalous, scores in [0, 1].

- ``models.compact_forest``: a fitted IsolationForest flattened and compiled for one-event
  scoring, exactly equal to sklearn's ``score_samples``.
- ``models.offline``: ``OfflineDetector``, the IsolationForest calibrated to percentiles of
  normal traffic, with robust-z reasons.
- ``models.online``: ``PopulationDetector`` (River HalfSpaceTrees with protected learning).
- ``models.streaming``: each key's own seasonal streams, kept as mergeable decayed sums.
- ``models.registry``: ``ModelRegistry``, versioned artifacts with SHA-256 manifests, atomic
  save/promote/rollback.
- ``models.integrity``: checksums, atomic writes, ``ModelIntegrityError``.

Submodules are not imported here, so ``import models`` stays cheap.
"""
