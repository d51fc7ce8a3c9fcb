"""Retrain feature building: the vectorised twin against the event-by-event replay.

Both compute the same features (held equal by `tests/test_features_equivalence.py`) on
the same simulated traffic (`training.simulator`: tenants, incidents, travel) in the
same process, so their ratio is comparable from one noisy machine to another:

* the twin (`features.twin.twin_features`) over the whole slice, after a small warm-up
  call that loads the compiled kernels (they compile once per install and are cached);
* the baseline, `features.batch.batch_features`, which replays the events one by one
  through the streaming extractor on a memory store (what retraining used before),
  over a shorter prefix of the same events.

Rates are events per second of the process's CPU time: both engines run on one core, and
on a shared machine wall time mostly measures the neighbours. The two alternate in three
rounds and each rate is the median of its rounds.
`python -m benchmarks.twin_bench --size full --merge benchmarks/results.json` measures
this figure alone and puts it into a results file written by `keywatch bench`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd

from benchmarks.suite import Figure

SIZES = {  # (simulated keys, days, twin events, baseline events)
    "tiny": (8, 1, 5_000, 1_000),
    "smoke": (20, 2, 50_000, 3_000),
    "full": (200, 7, 1_000_000, 20_000),
}
SECRET = "keywatch-benchmark-secret-0123456789"
TARGET = ">= 100,000 and >= 50x"


def simulated_events(keys: int, days: int, n: int, seed: int = 0) -> pd.DataFrame:
    """The first `n` events of a simulation, as retraining loads them."""
    from features.keys import KeyHasher
    from training.events_io import load_events
    from training.simulator import simulate

    with tempfile.TemporaryDirectory() as tmp:
        summary = simulate(Path(tmp), keys=keys, days=days, seed=seed)
        df = load_events(summary.events_path, hasher=KeyHasher(SECRET))
    return df.iloc[:n].reset_index(drop=True)


def _timed(run: Any) -> float:
    """CPU seconds of this process for `run` (both engines run on one core)."""
    t0 = time.process_time()
    run()
    return time.process_time() - t0


def bench_retrain_features(size: str = "smoke") -> tuple[float, float, int, int]:
    """(twin events/s, event-by-event events/s, twin events, replayed events) on
    simulated traffic. The two alternate in three rounds (the twin over all the events,
    the replay over the next third of its prefix, continuing its state), so a burst of
    other work on a shared machine slows both; each rate is the median of its rounds."""
    from features.batch import batch_features
    from features.stores.memory import MemoryStore
    from features.twin import twin_features

    keys, days, n_twin, n_base = SIZES[size]
    df = simulated_events(keys, days, n_twin)
    twin_features(df.iloc[:1000], key_id_column="key_id")  # load the compiled kernels
    store = MemoryStore(max_entities=2_000_000)
    thirds = [df.iloc[j * n_base // 3:(j + 1) * n_base // 3] for j in range(3)]
    twin_rates, replay_rates = [], []
    for part in thirds:
        twin_rates.append(len(df) / _timed(lambda: twin_features(df, key_id_column="key_id")))
        replay_rates.append(len(part) / _timed(
            lambda part=part: batch_features(part, key_id_column="key_id", store=store)))
    return (statistics.median(twin_rates), statistics.median(replay_rates), len(df),
            sum(len(p) for p in thirds))


def figure(size: str = "smoke") -> Figure:
    """The figure as `keywatch bench` reports it."""
    twin, replay, n, n_replay = bench_retrain_features(size)
    return Figure("retrain_features_events_per_s", twin, "events/s",
                  f"event-by-event replay (features.batch), the first {n_replay:,} of the "
                  f"same {n:,} simulated events", replay, TARGET)


def merge(results: Path, fig: dict[str, Any]) -> None:
    """Replace (or add) the figure in a results file written by `keywatch bench`."""
    report = json.loads(results.read_text())
    figures = [f for f in report["figures"] if f["name"] != fig["name"]]
    report["figures"] = [*figures, fig]
    results.write_text(json.dumps(report, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="smoke")
    parser.add_argument("--merge", type=Path, help="results.json to put the figure into")
    args = parser.parse_args(argv)
    fig = figure(args.size).as_dict()
    print(json.dumps(fig, indent=2))
    if args.merge is not None:
        merge(args.merge, fig)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
