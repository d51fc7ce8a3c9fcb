"""Do replicas decide as one process would? Feed the same events to one scorer and to N
scorers sharing one Redis (round robin), and count the decisions that differ.

    python -m benchmarks.replicas EVENTS.jsonl --redis redis://127.0.0.1:6379/0 \
        [--replicas 2] [--limit 6000] [--immediate-learning] [--cost]

Each side runs in a namespace of its own on the same Redis, with fresh models, as a new
deployment would. Printed: events, differing decisions (count and share), and the
decisions of each side.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from features.contract import Event
from features.extractor import FEATURE_NAMES, POPULATION, POPULATION_ID
from features.keys import KeyHasher
from features.stores.base import EntityOps
from features.stores.redis_store import RedisStore
from models.detectors import build_detectors
from models.feature_space import model_features
from serving.engine.scorer import Scorer

SECRET = "replicas-benchmark-secret-0123"


def make_scorer(url: str, namespace: str, *, immediate_learning: bool = False) -> Scorer:
    """A scorer as `keywatch serve` builds one: default policy, fresh online models."""
    detectors = build_detectors(model_dir=None, checkpoint=None,
                                feature_names=model_features(FEATURE_NAMES))
    return Scorer(store=RedisStore(url, namespace=namespace), hasher=KeyHasher(SECRET),
                  detectors=detectors, immediate_learning=immediate_learning)


def decide(scorers: Sequence[Scorer], events: Sequence[Event]) -> list[str]:
    """Each event to the next scorer in turn; the decisions in event order."""
    out = []
    for n, event in enumerate(events):
        out.append(scorers[n % len(scorers)].score(event).decision)
    for scorer in scorers:
        scorer.flush()
    for scorer in scorers:
        settle(scorer)
    return out


def settle(scorer: Scorer) -> None:
    """Learn the population log to its end (what the next event would do first)."""
    detectors = scorer.detectors
    if detectors is None or detectors.population_log is None:
        return
    for _ in range(1000):
        ops = EntityOps(POPULATION, POPULATION_ID)
        idx = detectors.population_log.plan(ops)
        detectors.catch_up(scorer.store.execute([ops])[0][idx])
        if detectors.population_log.behind <= 0:
            return


def compare(url: str, events: Sequence[Event], *, replicas: int = 2, tag: str = "cmp",
            immediate_learning: bool = False) -> dict[str, Any]:
    """Decisions of one scorer against `replicas` scorers fed alternately."""
    one = decide([make_scorer(url, f"{tag}-one", immediate_learning=immediate_learning)],
                 events)
    many = decide([make_scorer(url, f"{tag}-many", immediate_learning=immediate_learning)
                   for _ in range(replicas)], events)
    differ = sum(a != b for a, b in zip(one, many, strict=True))
    return {"events": len(events), "replicas": replicas, "differ": differ,
            "differ_share": differ / max(1, len(events)),
            "one": dict(Counter(one)), "many": dict(Counter(many))}


def learning_cost(url: str, events: Sequence[Event], *, batch: int = 100,
                  rounds: int = 2) -> dict[str, Any]:
    """What sending learning at once costs one scorer: events scored in batches (as the
    API receives them) with deferred and with immediate learning, alternated `rounds`
    times in this run (the best of each kept, so warm-up and noise favour neither)."""
    best = {False: float("inf"), True: float("inf")}
    for r in range(rounds):
        for immediate in (False, True):
            scorer = make_scorer(url, f"cost-{r}-{immediate}", immediate_learning=immediate)
            start = time.perf_counter()
            for at in range(0, len(events), batch):
                scorer.score_many(events[at:at + batch])
            scorer.flush()
            best[immediate] = min(best[immediate], time.perf_counter() - start)
    return {"events": len(events), "batch": batch, "deferred_s": round(best[False], 2),
            "immediate_s": round(best[True], 2),
            "immediate_vs_deferred": round(best[True] / best[False], 2)}


def load_events(path: Path, limit: int | None = None) -> list[Event]:
    events = []
    with path.open() as fh:
        for line in fh:
            events.append(Event.model_validate_json(line))
            if limit is not None and len(events) >= limit:
                break
    return events


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("events", type=Path)
    parser.add_argument("--redis", required=True)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--limit", type=int, default=6000)
    parser.add_argument("--immediate-learning", action="store_true")
    parser.add_argument("--cost", action="store_true",
                        help="time one scorer's batches with deferred vs immediate learning")
    args = parser.parse_args(argv)
    if args.cost:
        print(json.dumps(learning_cost(args.redis, load_events(args.events, args.limit)),
                         indent=2))
        return
    result = compare(args.redis, load_events(args.events, args.limit), replicas=args.replicas,
                     immediate_learning=args.immediate_learning)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
