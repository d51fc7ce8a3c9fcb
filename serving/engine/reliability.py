"""Wiring of the reliability pieces into the app: outage policy, readiness, snapshots.

Why a module of its own: the app, the CLI and the worker all build stores from settings,
and the reliability behaviour (wrap Redis in the outage policy, answer 503 with
Retry-After when it fails closed, report degraded state, snapshot the memory store across
restarts) should be decided in one place and cost `app.py` only a few lines.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import JSONResponse

from features.stores.base import StateStore
from features.stores.enforcement_cache import EnforcementCache
from features.stores.memory import MemoryStore
from features.stores.redis_store import RedisStore
from features.stores.resilient import ResilientStore, StoreUnavailable
from features.stores.snapshot import SnapshotError
from serving.policy import responses as r

if TYPE_CHECKING:
    from serving.engine.scorer import Scorer
    from serving.settings import Settings

log = logging.getLogger("keywatch")


def protect_store(store: StateStore, settings: Settings) -> StateStore:
    """Wrap a Redis store in the configured outage policy (memory stores need none)."""
    policy = settings.redis_outage_policy
    if not isinstance(store, RedisStore) or policy == "error":
        return store
    return ResilientStore(
        store,
        policy=policy,
        spool_dir=settings.spool_dir or settings.data_dir / "spool",
        retry_interval_s=settings.redis_retry_interval_s,
        local=MemoryStore(max_mb=settings.memory_max_mb),
        cache=enforcement_cache(store, settings.enforcement_cache_refresh_s)
        if policy == "fail_open" else None,
    )


def enforcement_cache(store: StateStore, refresh_s: float) -> EnforcementCache:
    """What a replica keeps of the shared enforcement state to enforce it in an outage."""
    return EnforcementCache(
        store, indexes=(r.BANS_ENTITY, r.LIMITS_ENTITY), plain_indexes=(r.ALLOW_ENTITY,),
        scope_kinds=r.SCOPE_KIND, refresh_s=refresh_s,
        fields=(r.BAN_UNTIL, r.BAN_LEVEL, r.BAN_LAST, r.BAN_BY, r.BAN_REASON, r.LIM_RATE,
                r.LIM_BURST, r.LIM_UNTIL, r.LIM_BY, r.LIM_REASON))


def store_status(store: StateStore) -> dict[str, Any] | None:
    """The store's outage status when it has one (`{"state": "ok" | "degraded", ...}`)."""
    status = getattr(store, "status", None)
    return status() if callable(status) else None


_refusals = {"count": 0, "logged_at": 0.0}


async def store_unavailable_handler(_: Request, exc: Exception) -> JSONResponse:
    """fail_closed: refuse with 503 and tell the gateway when to try again."""
    retry_after = getattr(exc, "retry_after_s", 1)
    _refusals["count"] += 1
    now = time.monotonic()
    if now - _refusals["logged_at"] >= 10:  # one line per 10 s, not one per request
        log.warning("refusing events, state store unavailable (%d refused so far): %s",
                    _refusals["count"], exc)
        _refusals["logged_at"] = now
    return JSONResponse(
        status_code=503,
        headers={"Retry-After": str(retry_after)},
        content={"error": "state store unavailable (fail_closed); nothing of the request "
                          "was applied: send it again after Retry-After",
                 "state": "degraded", "retry_after_s": retry_after},
    )


# ---- snapshots of the memory store ------------------------------------------------------
def snapshot_path(settings: Settings, store: StateStore) -> Path | None:
    """Where the memory store is snapshotted, or None (not a memory store, or disabled)."""
    if not settings.snapshot_enabled or not isinstance(store, MemoryStore):
        return None
    return settings.snapshot_path or settings.data_dir / "state.snapshot"


def journal_path(settings: Settings) -> Path | None:
    """Where the memory store journals bans, limits and admin acts (None: disabled)."""
    if not settings.journal_enabled:
        return None
    return settings.journal_path or settings.data_dir / "enforcement.journal"


def restore_state(scorer: Scorer, settings: Settings) -> int:
    """At start: load the snapshot if there is one; a corrupt one is set aside, not used."""
    path = snapshot_path(settings, scorer.store)
    if path is None or not path.exists():
        return 0
    store = scorer.store
    assert isinstance(store, MemoryStore)
    try:
        n = store.restore(path)
    except SnapshotError as exc:
        aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
        path.replace(aside)
        log.warning("refusing the state snapshot %s (%s); moved to %s, starting empty",
                    path, exc, aside.name)
        return 0
    log.info("restored %d entities from %s", n, path)
    return n


def save_state(scorer: Scorer, settings: Settings) -> int:
    """At shutdown: snapshot the memory store (atomically); never raises."""
    path = snapshot_path(settings, scorer.store)
    if path is None:
        return 0
    store = scorer.store
    assert isinstance(store, MemoryStore)
    try:
        n = store.snapshot(path)
    except OSError as exc:
        log.error("could not write the state snapshot %s: %s", path, exc)
        return 0
    log.info("saved %d entities to %s", n, path)
    return n


__all__ = ["StoreUnavailable", "journal_path", "protect_store", "restore_state", "save_state",
           "snapshot_path", "store_status", "store_unavailable_handler"]
