"""Limits in the admin API: list them, set one by hand (a manual throttle), lift one; and
what the key page shows of a key's enforcement (its ban and its limit).

A limit is "at most N calls a minute (burst B) until T" on a key or an address, metered
by GCRA in the store (see `serving.policy.responses`). keywatch sets them when it
throttles; an operator sets them here, beside the manual ban, and an operator's limit is
never loosened or shortened by an automatic one. Like every admin act, each is audited.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import Field, model_validator

from features.contract import event_time_iso
from features.stores.base import ZITEMS, EntityOps
from serving.api.admin import AdminDep, ScorerDep, Target, _audit, refuse_while_degraded
from serving.engine.scorer import Scorer
from serving.policy.responses import (
    BANS_ENTITY,
    GLOBAL,
    INDEX,
    LIMITS_ENTITY,
    SCOPE_KIND,
    add_ban_reads,
    add_limit_detail_reads,
    default_burst,
    limit_writes,
    read_ban,
    read_limit_detail,
    unlimit_writes,
)
from serving.policy.schema import PERMANENT_S, parse_duration

router = APIRouter(prefix="/admin", tags=["admin"])


class ThrottleRequest(Target):
    """A manual limit: `limit_per_min` calls a minute for `duration` (seconds or '15m')."""

    limit_per_min: int = Field(ge=1, le=1_000_000)
    duration: str | int = "15m"
    burst: int | None = Field(default=None, ge=1, le=1_000_000)

    @model_validator(mode="after")
    def _finite(self) -> ThrottleRequest:
        if parse_duration(self.duration) == PERMANENT_S:
            raise ValueError("a limit's duration must be finite (ban permanently instead)")
        return self


@router.post("/throttle")
def throttle(body: ThrottleRequest, actor: AdminDep, scorer: ScorerDep) -> dict[str, Any]:
    """Limit a key or an address to `limit_per_min` calls a minute for a while."""
    scope, target = body.resolve(scorer)
    now = time.time()
    until = now + parse_duration(body.duration)
    burst = body.burst or default_burst(body.limit_per_min)
    scorer.store.execute(limit_writes(scope, target, rate_per_min=body.limit_per_min,
                                      burst=burst, until=until, by="admin",
                                      reason=body.reason))
    _audit(scorer, actor, "throttle", scope=scope, target=target, reason=body.reason,
           limit_per_min=body.limit_per_min, burst=burst, until=event_time_iso(until))
    return {"scope": scope, "target": target, "limit_per_min": body.limit_per_min,
            "burst": burst, "until": event_time_iso(until)}


@router.post("/unthrottle")
def unthrottle(body: Target, actor: AdminDep, scorer: ScorerDep) -> dict[str, Any]:
    """Lift a limit on a key or an address."""
    scope, target = body.resolve(scorer)
    scorer.store.execute(unlimit_writes(scope, target))
    _audit(scorer, actor, "unthrottle", scope=scope, target=target, reason=body.reason)
    return {"scope": scope, "target": target, "limited": False}


@router.get("/limits")
def list_limits(_: AdminDep, scorer: ScorerDep,
                limit: Annotated[int, Query(ge=1, le=10_000)] = 1000) -> dict[str, Any]:
    """Active limits, longest first, with who set them and why."""
    refuse_while_degraded(scorer)
    now = time.time()
    index = EntityOps(GLOBAL, LIMITS_ENTITY)
    index.add(ZITEMS, INDEX, now, limit)
    entries = [str(m).partition(":") for m, _ in scorer.store.execute([index])[0][0]]
    reads, idx = [], []
    for scope, _, target in entries:
        ops = EntityOps(SCOPE_KIND.get(scope, scope), target)
        idx.append(add_limit_detail_reads(ops))
        reads.append(ops)
    results = scorer.store.execute(reads) if reads else []
    limits = []
    for (scope, _, target), res, i in zip(entries, results, idx, strict=True):
        detail = read_limit_detail(res, i)
        if detail is None or detail["until_ts"] <= now:
            continue
        limits.append(_limit_view(scope, target, detail))
    return {"limits": limits, "count": len(limits)}


def _limit_view(scope: str, target: str, detail: dict[str, Any]) -> dict[str, Any]:
    until = detail.pop("until_ts")
    return {"scope": scope, "target": target, **detail, "until": event_time_iso(until)}


def key_enforcement(scorer: Scorer, key_id: str) -> dict[str, Any]:
    """The key's ban and limit as the store holds them now (None when there is none):
    what `GET /v1/keys/{key_id}` shows, from the same state `/admin/bans` lists."""
    ops = EntityOps(SCOPE_KIND["key"], key_id)
    ban_idx = add_ban_reads(ops)
    lim_idx = add_limit_detail_reads(ops)
    res = scorer.store.execute([ops])[0]
    now = time.time()
    state = read_ban(res, ban_idx)
    ban = None
    if state.active(now):
        ban = {"permanent": state.permanent, "by": state.by, "reason": state.reason,
               "until": None if state.permanent else event_time_iso(state.until),
               "offences": state.level}
    detail = read_limit_detail(res, lim_idx)
    limit = _limit_view("key", key_id, detail) if detail and detail["until_ts"] > now \
        else None
    return {"ban": ban, "limit": limit, "offences": state.level}


def active_bans(scorer: Scorer) -> int | None:
    """Entries of the ban index that have not ended (the `keywatch_bans_active` gauge);
    None when the store cannot say."""
    index = EntityOps(GLOBAL, BANS_ENTITY)
    index.add(ZITEMS, INDEX, time.time(), 100_000)
    try:
        return len(scorer.store.execute([index])[0][0])
    except Exception:  # a scrape must not fail on the store
        return None
