"""The one Scorer, built from settings.

Why here and not in the API: the HTTP service, the CLI verbs (replay, worker) and the
evaluation all need the same scorer wiring (store, outage policy, detectors, policy,
prices), and the evaluation must not depend on the HTTP layer to get it.
"""

from __future__ import annotations

from features.extractor import FEATURE_NAMES
from features.keys import KeyHasher
from features.pricing import load_price_file
from features.stores.base import StateStore
from models.detectors import build_detectors
from models.feature_space import model_features
from serving.engine import reliability as resilience
from serving.engine.ingest import ClockBound, Dedupe
from serving.engine.open_store import open_store
from serving.engine.scorer import Scorer
from serving.policy.schema import PolicySource
from serving.settings import Settings


def build_scorer(settings: Settings, *, restore_population: bool = False,
                 store: StateStore | None = None, live: bool = False) -> Scorer:
    """The one Scorer, from settings. `restore_population` resumes the service's
    checkpointed population model (replays start fresh, like a new deployment).
    `live` (the service, the worker): bans and limits on the settings' clock (the
    server's by default), and the memory store journals its enforcement state; otherwise
    event time throughout."""
    if store is None:
        store = open_store(
            settings.store,
            namespace=settings.redis_namespace,
            timeout_s=settings.redis_timeout_s,
            memory_max_mb=settings.memory_max_mb,
            journal_path=resilience.journal_path(settings) if live else None,
        )
        store = resilience.protect_store(store, settings)
    detectors = None
    if settings.models:
        detectors = build_detectors(
            model_dir=settings.model_dir,
            checkpoint=settings.population_checkpoint if restore_population else None,
            feature_names=model_features(FEATURE_NAMES),
            reload_interval_s=settings.model_reload_interval_s,
            signing_key=settings.model_signing_key)
    prices = load_price_file(settings.prices) if settings.prices is not None else None
    return Scorer(store=store, hasher=KeyHasher(settings.secret or ""), dry_run=settings.dry_run,
                  policy=PolicySource(settings.policy), detectors=detectors, prices=prices,
                  enforcement_clock=settings.enforcement_clock if live else "event",
                  immediate_learning=immediate_learning(settings.learn_writes, store,
                                                         live=live))


def immediate_learning(learn_writes: str, store: StateStore, *, live: bool) -> bool:
    """`auto`: at once for a live service on a shared store, where another replica may
    score the key's next event (two replicas reading one event behind each other
    differed from one process on 0.9% of 6,000 decisions: a model score one event apart
    set a limit in one and not the other); with the next round trip on the memory store
    or in a replay (one process: no one else reads)."""
    if learn_writes == "auto":
        return live and store.name != "memory"
    return learn_writes == "immediate"


def live_guards(scorer: Scorer, settings: Settings) -> Scorer:
    """Give a live service's scorer its clock bound and event-id dedupe (a replay or a
    stream worker has neither: replays keep event time, the worker dedupes itself)."""
    if scorer.clock_bound is None:
        scorer.clock_bound = ClockBound(max_ahead_s=settings.event_max_ahead_s,
                                        max_behind_s=settings.event_max_behind_s,
                                        action=settings.event_skew_action)
    if scorer.dedupe is None:
        scorer.dedupe = Dedupe(window_s=settings.dedupe_window_s)
    return scorer
