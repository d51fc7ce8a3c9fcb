"""The admin API: manual bans, allow-lists, the audit trail and the policy in force.

Everything here is behind `Authorization: Bearer <KEYWATCH_ADMIN_TOKEN>`, compared in
constant time. Without a configured token the admin API answers 503 saying so, rather
than being open or silently absent. State lives in the shared store, so a ban or an
allow-list entry made through one replica is enforced by all of them. Every action is
recorded in an audit list in the store and in a log line; a raw API key given to an
admin call is hashed on input and never stored, logged or echoed.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import time
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from features.contract import event_time_iso
from features.stores.base import ZITEMS, EntityOps
from serving.engine.reliability import store_status
from serving.engine.scorer import Scorer
from serving.observability.redaction import FreeText
from serving.policy.responses import (
    AUDIT_ENTITY,
    BANS_ENTITY,
    GLOBAL,
    INDEX,
    SCOPE_KIND,
    AllowListCache,
    add_ban_reads,
    allow_add_ops,
    allow_remove_ops,
    audit_ops,
    audit_read_ops,
    ban_index_ops,
    ban_writes,
    normalise_cidr,
    normalise_key,
    parse_allow_items,
    read_ban,
    unban_ops,
    until_for,
)
from serving.policy.schema import PERMANENT_S, parse_duration

log = logging.getLogger("keywatch.admin")


class AdminError(Exception):
    """An admin request refused; rendered as {"error": message} with `status`."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def require_admin(request: Request,
                  authorization: Annotated[str | None, Header()] = None) -> str:
    token = request.app.state.settings.admin_token
    if not token:
        raise AdminError(503, "the admin API is disabled: KEYWATCH_ADMIN_TOKEN is not set")
    scheme, _, given = (authorization or "").partition(" ")
    ok = scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(),
                                                            token.encode())
    if not ok:
        raise AdminError(401, "missing or wrong admin token",
                         {"WWW-Authenticate": 'Bearer realm="keywatch-admin"'})
    return request.client.host if request.client else "unknown"


def get_scorer(request: Request) -> Scorer:
    return request.app.state.scorer


AdminDep = Annotated[str, Depends(require_admin)]
ScorerDep = Annotated[Scorer, Depends(get_scorer)]


def _check_ip(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return str(ipaddress.ip_address(value.strip()))
    except ValueError:
        raise ValueError("not an IPv4 or IPv6 address") from None  # never echoed back


class Target(BaseModel):
    """Exactly one of `key` (a key id `k_…` or a raw key, hashed on input) or `ip`."""

    model_config = ConfigDict(extra="forbid")

    key: str | None = Field(default=None, min_length=1, max_length=512, repr=False)
    ip: str | None = None
    reason: FreeText = Field(default="", max_length=500)

    @field_validator("ip")
    @classmethod
    def _ip(cls, value: str | None) -> str | None:
        return _check_ip(value)

    @model_validator(mode="after")
    def _one(self) -> Target:
        if (self.key is None) == (self.ip is None):
            raise ValueError("give exactly one of 'key' or 'ip'")
        return self

    def resolve(self, scorer: Scorer) -> tuple[str, str]:
        if self.key is not None:
            return "key", normalise_key(self.key, scorer.hasher)
        assert self.ip is not None
        return "ip", self.ip


class BanRequest(Target):
    duration: str | int | None = None
    """Seconds or text like '30m', '2h', '7d'; omit with permanent=true."""
    permanent: bool = False

    @model_validator(mode="after")
    def _duration(self) -> BanRequest:
        if self.permanent == (self.duration is not None):
            raise ValueError("give either a 'duration' or 'permanent': true")
        if self.duration is not None:
            parse_duration(self.duration)
        return self


class AllowRequest(BaseModel):
    """Exactly one of `key` (key id or raw key) or `cidr` (an address or a range)."""

    model_config = ConfigDict(extra="forbid")

    key: str | None = Field(default=None, min_length=1, max_length=512, repr=False)
    cidr: str | None = None
    reason: FreeText = Field(default="", max_length=500)

    @field_validator("cidr")
    @classmethod
    def _cidr(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return normalise_cidr(value)
        except ValueError:
            raise ValueError(f"{value!r} is not an IP address or CIDR range") from None

    @model_validator(mode="after")
    def _one(self) -> AllowRequest:
        if (self.key is None) == (self.cidr is None):
            raise ValueError("give exactly one of 'key' or 'cidr'")
        return self


def _audit(scorer: Scorer, actor: str, action: str, **fields: Any) -> dict[str, Any]:
    record = {"id": uuid.uuid4().hex[:12], "ts": time.time(), "action": action,
              "client": actor, **fields}
    scorer.store.execute([audit_ops(record)])
    log.warning("admin %s %s", action, " ".join(f"{k}={v}" for k, v in fields.items() if v))
    return record


def refuse_while_degraded(scorer: Scorer) -> None:
    """During a shared-store outage a listing would show only this replica's local view
    (empty, or the cache it enforces): say so with a 503 rather than answer wrongly."""
    status = store_status(scorer.store)
    if status is not None and status.get("state") == "degraded":
        raise AdminError(503, "the state store is unavailable: bans and limits are still "
                              "enforced from this replica's cache, but cannot be listed "
                              "until it is back", {"Retry-After": "5"})


router = APIRouter(prefix="/admin", tags=["admin"])


@router.post("/bans")
def ban(body: BanRequest, actor: AdminDep, scorer: ScorerDep) -> dict[str, Any]:
    """Ban a key or an address, for a duration or permanently."""
    scope, target = body.resolve(scorer)
    now = time.time()
    seconds = PERMANENT_S if body.permanent else parse_duration(body.duration)
    until = until_for(now, seconds)
    scorer.store.execute(ban_writes(scope, target, until=until, level=None, ts=now,
                                    by="admin", reason=body.reason))
    permanent = seconds == PERMANENT_S
    _audit(scorer, actor, "ban", scope=scope, target=target, reason=body.reason,
           until=None if permanent else event_time_iso(until), permanent=permanent)
    return {"scope": scope, "target": target, "permanent": permanent,
            "until": None if permanent else event_time_iso(until)}


@router.post("/unban")
def unban(body: Target, actor: AdminDep, scorer: ScorerDep) -> dict[str, Any]:
    """Lift a ban on a key or an address (its offence history is kept for escalation)."""
    scope, target = body.resolve(scorer)
    scorer.store.execute([unban_ops(SCOPE_KIND[scope], target),
                          ban_index_ops(scope, target, None)])
    _audit(scorer, actor, "unban", scope=scope, target=target, reason=body.reason)
    return {"scope": scope, "target": target, "banned": False}


@router.get("/bans")
def list_bans(_: AdminDep, scorer: ScorerDep,
              limit: Annotated[int, Query(ge=1, le=10_000)] = 1000) -> dict[str, Any]:
    """Active bans, longest first, with who set them and why (503 during an outage of the
    shared store, when only this replica's cache is known)."""
    refuse_while_degraded(scorer)
    now = time.time()
    index = scorer.store.execute([_index_read(BANS_ENTITY, now, limit)])[0][0]
    entries = [(str(m).partition(":")[0], str(m).partition(":")[2]) for m, _ in index]
    if not entries:
        return {"bans": [], "count": 0}
    reads, idx = [], []
    for scope, target in entries:
        ops = EntityOps(SCOPE_KIND.get(scope, scope), target)
        idx.append(add_ban_reads(ops))
        reads.append(ops)
    results = scorer.store.execute(reads)
    bans = []
    for (scope, target), res, i in zip(entries, results, idx, strict=True):
        state = read_ban(res, i)
        if not state.active(now):
            continue
        bans.append({"scope": scope, "target": target, "permanent": state.permanent,
                     "until": None if state.permanent else event_time_iso(state.until),
                     "by": state.by, "reason": state.reason, "offences": state.level})
    return {"bans": bans, "count": len(bans)}


def _index_read(entity: str, min_score: float | str, limit: int) -> EntityOps:
    ops = EntityOps(GLOBAL, entity)
    ops.add(ZITEMS, INDEX, min_score, limit)
    return ops


@router.get("/allow-list")
def list_allowed(_: AdminDep, scorer: ScorerDep) -> dict[str, Any]:
    """The allow-list: entries managed here, and those from the policy file."""
    items = scorer.store.execute([AllowListCache.read_ops()])[0][0]
    keys, cidrs = parse_allow_items(items)
    policy = scorer.policy.allow_list
    return {"keys": sorted(keys), "cidrs": sorted(cidrs),
            "policy": {"keys": sorted(normalise_key(k, scorer.hasher) for k in policy.keys),
                       "cidrs": list(policy.cidrs)}}


@router.post("/allow-list")
def allow_add(body: AllowRequest, actor: AdminDep, scorer: ScorerDep) -> dict[str, Any]:
    """Add a key or a CIDR range; every replica sees it within the cache TTL."""
    kind, value = _allow_target(body, scorer)
    scorer.store.execute([allow_add_ops(kind, value, time.time())])
    scorer.allow_list.invalidate()
    _audit(scorer, actor, "allow_add", scope=kind, target=value, reason=body.reason)
    return {"kind": kind, "value": value, "allowed": True}


@router.post("/allow-list/remove")
def allow_remove(body: AllowRequest, actor: AdminDep, scorer: ScorerDep) -> dict[str, Any]:
    kind, value = _allow_target(body, scorer)
    removed = scorer.store.execute([allow_remove_ops(kind, value)])[0][0]
    scorer.allow_list.invalidate()
    _audit(scorer, actor, "allow_remove", scope=kind, target=value, reason=body.reason)
    return {"kind": kind, "value": value, "allowed": False, "removed": bool(removed)}


def _allow_target(body: AllowRequest, scorer: Scorer) -> tuple[str, str]:
    if body.key is not None:
        return "key", normalise_key(body.key, scorer.hasher)
    assert body.cidr is not None
    return "cidr", body.cidr


@router.get("/audit")
def audit(_: AdminDep, scorer: ScorerDep,
          limit: Annotated[int, Query(ge=1, le=10_000)] = 100) -> dict[str, Any]:
    """Admin actions, newest first."""
    items = scorer.store.execute([audit_read_ops(limit)])[0][0]
    return {"entries": [json.loads(m) for m, _ in items]}


@router.get("/policy")
def policy(_: AdminDep, scorer: ScorerDep) -> dict[str, Any]:
    """The policy in force, and the last reload error if a new file was refused."""
    src = scorer.policy_source
    current = src.current()
    return {"path": str(src.path) if src.path else "(packaged default)",
            "version": src.version, "summary": current.summary(),
            "last_error": src.last_error,
            "rules": [{"id": r.id, "type": r.type, "scope": r.scope, "severity": r.severity,
                       "mode": r.mode} for r in current.rules]}


__all__ = ["AUDIT_ENTITY", "AdminError", "router"]
