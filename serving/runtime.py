"""Process-wide runtime settings for the long-running entry points (serve, replay, worker,
bench, evaluate); library code never calls this.

The garbage collector is tuned for a scorer: each event allocates hundreds of short-lived
objects (operations, feature dicts, reasons) and almost no reference cycles, while the
process holds a large, long-lived heap (the memory store, the model trees, the compiled
forest). CPython's default (a young collection every 700 net allocations, and full
collections that walk the whole heap) then spends about a tenth of the scoring time
collecting nothing. Freezing what exists after start-up takes it out of every collection,
and a larger young generation makes collections rarer; reference counting still frees
everything that is not in a cycle at once, so memory stays flat.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 50_000
"""Net allocations between young-generation collections (CPython's default: 700)."""


def tune_gc(*, freeze: bool = True) -> None:
    """Collect once, optionally freeze the start-up heap, and raise the thresholds."""
    gc.collect()
    if freeze:
        gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, 20, 100)
