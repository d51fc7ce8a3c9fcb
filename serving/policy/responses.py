"""Responses: turn a fused severity into an action, and keep ban state in the store.

What happens at each tier is policy data (`responses.tiers`): log, alert, throttle (a
reduced limit with retry_after_s), a ban on the escalation ladder, or a permanent ban.
Ban state lives on the entity (key or source address) in the shared store, so a ban set
by one replica is enforced by every replica on the entity's next event; a small index
of active bans on a global entity lets the admin API list them without a scan.

Throttles are state too: a throttle decision sets a limit on the key (or the address)
for a while — `limit_per_min` calls a minute with a small burst, metered by GCRA in the
store (`LIMIT` in `features.stores.base`) in the same round trip as the event's features
and the gateway's pre-flight — so a throttle means fewer calls served, not a word in a
decision. Limits end on their own (`duration` of the throttle tier, 15 min by default)
and are indexed like bans, so the admin API can list them.

Bans and limits are stored in wall time (the server's clock) when live, so a backlog of
old events still writes a ban that holds now; a replay keeps event time throughout (the
scorer's `enforcement_clock`).

Durations grow with the offender's history (30 min → 2 h → 24 h → permanent by
default) and decay: each clean period of `decay_after` since the last ban forgives one
step, so an old incident does not make a key's next mistake a permanent ban.

Allow-lists (keys and CIDR ranges) come from the policy file and from the store (managed
through the admin API, so every replica sees them); the store part is cached for a few
seconds and refreshed on the back of an event's own round trip. An allow-listed key or
address is scored and explained but never throttled or banned automatically; a ban an
operator sets explicitly is still enforced.
"""

from __future__ import annotations

import ipaddress
import json
import math
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

from features.contract import event_time_iso
from features.extractor import PREFIX_OK, network_prefix
from features.keys import KeyHasher, looks_like_key_id
from features.stores.base import GET, GETS, LIMIT, PERSIST, SET, ZITEMS, ZREM, ZSET, EntityOps
from serving.engine.decision import Action
from serving.policy.fusion import BLOCKING_EVIDENCE, Fusion
from serving.policy.rules import BanView, Finding
from serving.policy.schema import (
    PERMANENT_S,
    AllowList,
    BanSettings,
    ResponsesConfig,
    TierResponse,
)

BAN_UNTIL = "ban:until"
BAN_LEVEL = "ban:level"
BAN_LAST = "ban:last"
BAN_BY = "ban:by"
BAN_REASON = "ban:reason"
BAN_KIND = "ban:kind"
"""The incident kind of the offences counted in `ban:level` (the evidence kinds behind
the last automatic ban, e.g. `identity` or `attack`): a ban for another kind of incident
starts the ladder afresh, so a key's credential-stuffing history never lengthens a ban
for a leak, nor the other way round."""
BAN_SINCE = "ban:since"
"""When the current run of the ladder began (its first offence): what the owner's
established networks are learned before (`spare_established`)."""
PERMANENT = 1e18
"""`until` of a permanent ban (a finite number every backend stores exactly)."""

LIM_RATE = "lim:rate"
LIM_BURST = "lim:burst"
LIM_UNTIL = "lim:until"
LIM_BY = "lim:by"
LIM_REASON = "lim:reason"
DEFAULT_LIMIT_S = 900.0
"""How long a throttle's limit lasts when the tier does not say."""

GLOBAL = "g"
BANS_ENTITY = "bans"
LIMITS_ENTITY = "limits"
ALLOW_ENTITY = "allow"
AUDIT_ENTITY = "audit"
INDEX = "index"
MAX_INDEXED = 100_000
MAX_AUDIT = 10_000
SCOPE_KIND = {"key": "k", "ip": "ip"}


# ---- ban state --------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class BanState:
    until: float = 0.0
    level: int = 0
    last: float = 0.0
    by: str | None = None
    reason: str | None = None
    kind: str | None = None
    since: float = 0.0

    def active(self, ts: float) -> bool:
        return self.until > ts

    @property
    def permanent(self) -> bool:
        return self.until >= PERMANENT

    def view(self, ts: float) -> BanView:
        return BanView(active=self.active(ts), until=event_time_iso(self.until)
                       if self.until and not self.permanent else None,
                       permanent=self.permanent, by=self.by, reason=self.reason)


BanIdx = int


_BAN_FIELDS = (BAN_UNTIL, BAN_LEVEL, BAN_LAST, BAN_BY, BAN_REASON, BAN_KIND, BAN_SINCE)


def add_ban_reads(ops: EntityOps) -> BanIdx:
    """Read the entity's ban, in one op (every event reads two bans)."""
    return ops.add(GETS, len(_BAN_FIELDS), *_BAN_FIELDS)


def read_ban(results: list[Any], idx: BanIdx) -> BanState:
    until, level, last, by, reason, kind, since = results[idx]
    return BanState(
        until=float(until) if until else 0.0,
        level=int(float(level)) if level else 0,
        last=float(last) if last else 0.0,
        by=by or None,
        reason=reason or None,
        kind=kind or None,
        since=float(since) if since else 0.0,
    )


def prefix_since_read(ops: EntityOps, source_ip: str | None) -> int | None:
    """Read (on the key's entity) when the address's prefix was learned from the key's
    normal traffic, for `spare_established` in the pre-flight check."""
    prefix = network_prefix(source_ip)
    return ops.add(GET, PREFIX_OK + prefix) if prefix else None


def learned_at(results: list[Any], idx: int | None) -> float | None:
    """The time `prefix_since_read` read (older stores kept `1`: learned long ago)."""
    value = results[idx] if idx is not None else None
    return float(value) if value else None


def spare_established(ban: BanState, known_since: float | None,
                      settings: BanSettings) -> BanState:
    """The key's ban as it applies to a call from a prefix learned `known_since`: lifted
    for the owner's established networks (learned `spare_established_after` before the
    ban's incident began), never for an operator's ban."""
    after = settings.spare_established_after
    if (after is None or known_since is None or ban.by == "admin" or not ban.since
            or known_since > ban.since - after):
        return ban
    return replace(ban, until=0.0)


@dataclass(frozen=True, slots=True)
class EscalationLadder:
    """Ban durations by repeat offence, with one step forgiven per clean period."""

    durations_s: tuple[float, ...] = (1800, 7200, 86400)
    decay_after_s: float = 7 * 86400

    @classmethod
    def from_settings(cls, bans: BanSettings) -> EscalationLadder:
        """The policy's ladder; without `allow_permanent` a permanent step is replaced by
        the longest finite one (a permanent ban is an operator's act)."""
        ladder = tuple(bans.ladder)
        if not bans.allow_permanent:
            finite = [d for d in ladder if not math.isinf(d)] or [86400.0]
            ladder = tuple(max(finite) if math.isinf(d) else d for d in ladder)
        return cls(durations_s=ladder, decay_after_s=bans.decay_after)

    def effective_level(self, state: BanState, ts: float) -> int:
        """Offences that still count: each clean `decay_after` since the last ban ended
        (or was imposed, whichever is later) forgives one."""
        if state.level <= 0:
            return 0
        ended = state.last if state.permanent else max(state.last, state.until)
        clean = max(0.0, ts - ended)
        return max(0, state.level - int(clean // self.decay_after_s))

    def next_duration(self, state: BanState, ts: float,
                      kind: str | None = None) -> tuple[float, int]:
        """The next ban's length and offence level; offences of another incident kind
        (`state.kind` differs from `kind`) do not count."""
        level = self.effective_level(state, ts)
        if kind is not None and state.kind is not None and state.kind != kind:
            level = 0
        duration = self.durations_s[min(level, len(self.durations_s) - 1)]
        return duration, level + 1


def until_for(ts: float, duration_s: float) -> float:
    return PERMANENT if math.isinf(duration_s) or ts + duration_s >= PERMANENT \
        else ts + duration_s


def ban_ops(kind: str, entity_id: str, *, until: float, level: int | None, ts: float,
            by: str = "keywatch", reason: str = "", incident: str | None = None) -> EntityOps:
    """Write a ban on the entity. `level=None` (an operator's ban) leaves the offence
    history alone; `incident` is the incident kind the level counts offences of."""
    ops = EntityOps(kind, entity_id)
    ops.add(SET, BAN_UNTIL, repr(float(until)))
    if level is not None:
        ops.add(SET, BAN_LEVEL, str(level))
        ops.add(SET, BAN_LAST, repr(float(ts)))
        if level == 1:  # a new run of the ladder: its incident begins
            ops.add(SET, BAN_SINCE, repr(float(ts)))
        if incident:
            ops.add(SET, BAN_KIND, incident)
    ops.add(SET, BAN_BY, by)
    ops.add(SET, BAN_REASON, reason[:500])
    ops.add(PERSIST, 1 if until >= PERMANENT else 0)
    return ops


def unban_ops(kind: str, entity_id: str) -> EntityOps:
    ops = EntityOps(kind, entity_id)
    ops.add(SET, BAN_UNTIL, "0")
    ops.add(PERSIST, 0)
    return ops


def index_member(scope: str, entity_id: str) -> str:
    return f"{scope}:{entity_id}"


def ban_index_ops(scope: str, entity_id: str, until: float | None) -> EntityOps:
    """Add (until given) or remove an entry of the active-ban index."""
    ops = EntityOps(GLOBAL, BANS_ENTITY)
    if until is None:
        ops.add(ZREM, INDEX, index_member(scope, entity_id))
    else:
        ops.add(ZSET, INDEX, index_member(scope, entity_id), float(until), MAX_INDEXED)
        ops.add(PERSIST, 1)
    return ops


def ban_writes(scope: str, entity_id: str, *, until: float, level: int | None, ts: float,
               by: str = "keywatch", reason: str = "",
               incident: str | None = None) -> list[EntityOps]:
    return [ban_ops(SCOPE_KIND[scope], entity_id, until=until, level=level, ts=ts, by=by,
                    reason=reason, incident=incident),
            ban_index_ops(scope, entity_id, until)]


def ban_action(scope: str, until: float, ts: float, network: str | None = None) -> Action:
    if until >= PERMANENT:
        return Action(type="perm_ban", scope=scope, network=network)  # type: ignore[arg-type]
    left = max(1, math.ceil(until - ts))
    return Action(
        type="temp_ban",
        scope=scope,  # type: ignore[arg-type]
        until=event_time_iso(until),
        retry_after_s=left,
        duration_s=left,
        network=network,
    )


# ---- limits (throttles as state) ----------------------------------------------------------
@dataclass(frozen=True, slots=True)
class LimitState:
    """An entity's limit as the meter answered it (status -1: no active limit)."""

    status: int = -1
    retry_after_s: float = 0.0
    rate_per_min: float = 0.0
    until: float = 0.0
    burst: float = 0.0
    by: str | None = None

    @property
    def active(self) -> bool:
        return self.status >= 0

    @property
    def over(self) -> bool:
        return self.status == 0


LimitIdx = tuple[int, int]


def add_limit_reads(ops: EntityOps, mode: str, now: float) -> LimitIdx:
    """Meter the entity's limit in its own call: `take` (pre-flight), `count` (a served
    call reported), `peek`. See LIMIT in `features.stores.base`."""
    return ops.add(LIMIT, mode, float(now)), ops.add(GET, LIM_BY)


def read_limit(results: list[Any], idx: LimitIdx) -> LimitState:
    raw, by = results[idx[0]], results[idx[1]]
    if not raw or raw[0] < 0:
        return LimitState()
    return LimitState(status=int(raw[0]), retry_after_s=float(raw[1]),
                      rate_per_min=float(raw[2]), until=float(raw[3]), burst=float(raw[4]),
                      by=by or None)


def default_burst(rate_per_min: float) -> int:
    """Ten seconds' worth of calls, at least one: a limit meters a rate, not each gap."""
    return max(1, round(rate_per_min / 6))


def limit_writes(scope: str, entity_id: str, *, rate_per_min: float, burst: int,
                 until: float, by: str = "keywatch", reason: str = "",
                 fresh: bool = True) -> list[EntityOps]:
    """Set a limit on the entity and index it until it ends. `fresh`: the meter starts
    anew (a new limit); otherwise it is kept (a limit renewed while it holds, so renewing
    grants no new burst)."""
    ops = EntityOps(SCOPE_KIND[scope], entity_id)
    if fresh:
        ops.add(SET, "lim:tat", "0")
        ops.add(SET, "lim:tat_e", "0")
    ops.add(SET, LIM_RATE, repr(float(rate_per_min)))
    ops.add(SET, LIM_BURST, str(int(burst)))
    ops.add(SET, LIM_UNTIL, repr(float(until)))
    ops.add(SET, LIM_BY, by)
    ops.add(SET, LIM_REASON, reason[:500])
    index = EntityOps(GLOBAL, LIMITS_ENTITY)
    index.add(ZSET, INDEX, index_member(scope, entity_id), float(until), MAX_INDEXED)
    index.add(PERSIST, 1)
    return [ops, index]


def unlimit_writes(scope: str, entity_id: str) -> list[EntityOps]:
    ops = EntityOps(SCOPE_KIND[scope], entity_id)
    ops.add(SET, LIM_UNTIL, "0")
    index = EntityOps(GLOBAL, LIMITS_ENTITY)
    index.add(ZREM, INDEX, index_member(scope, entity_id))
    return [ops, index]


def add_limit_detail_reads(ops: EntityOps) -> tuple[int, ...]:
    return tuple(ops.add(GET, f) for f in (LIM_RATE, LIM_BURST, LIM_UNTIL, LIM_BY, LIM_REASON))


def read_limit_detail(results: list[Any], idx: tuple[int, ...]) -> dict[str, Any] | None:
    """A limit's settings as stored, for listings (None when never set)."""
    rate, burst, until, by, reason = (results[i] for i in idx)
    if not rate or not until:
        return None
    per_min = float(rate)
    return {"limit_per_min": int(per_min) if per_min.is_integer() else per_min,
            "burst": int(float(burst or 1)),
            "until_ts": float(until), "by": by or None, "reason": reason or None}


def limited_action(scope: str, limit: LimitState, now: float) -> Action:
    """The decision's action while a limit meters the key or address: the limit, when it
    ends, and when the next call fits if this one was over."""
    return Action(type="throttle", scope=scope,  # type: ignore[arg-type]
                  until=event_time_iso(limit.until),
                  retry_after_s=max(1, math.ceil(limit.retry_after_s)) if limit.over
                  else None,
                  limit_per_min=max(1, round(limit.rate_per_min)),
                  burst=max(1, round(limit.burst)))


# ---- graduated response ----------------------------------------------------------------
@dataclass(slots=True)
class BanWrite:
    scope: str
    entity_id: str
    until: float
    level: int
    reason: str
    incident: str | None = None


@dataclass(slots=True)
class KeyContext:
    """What the response needs to know about the key beyond the findings."""

    normal_per_min: float | None = None
    """The key's normal request rate for this hour (learned), None for a cold key."""
    owner_active: bool = False
    """The key's own known identities were in use recently (its last event judged normal
    is recent): a ban then lands on the intruder's address, not the key."""
    network: str | None = None
    """The event's network prefix (/24 or /48), reported with an address ban."""
    network_new: bool = False
    """The event comes from a network (ASN, prefix, or hosting ASN) the key's normal
    traffic never used, and the key is not in use from a crowd of countries: a lone
    intruder's own address, which a ban can stop without banning the key."""


NEW_NETWORK_FEATURES = ("untrusted_prefix_by_event", "untrusted_network_by_event",
                        "untrusted_hosting_asn_by_event")
LONE_INTRUDER_COUNTRIES = 2
"""The owner's place and the intruder's: more countries within the hour is a crowd
(a resold key), which one address's ban does not stop."""


def network_is_new(values: dict[str, float]) -> bool:
    """Whether the event is a lone intruder's, on a network new to the key (`network_new`)."""
    crowd = values.get("distinct_countries_by_key_1h", 0.0) > LONE_INTRUDER_COUNTRIES
    return not crowd and any(values.get(name) for name in NEW_NETWORK_FEATURES)


def _about_one_address(f: Finding) -> bool:
    """A finding about this event's own identity (a network, place or client), not a
    count over the key's recent traffic (`distinct_*`: a crowd of addresses, which one
    address's ban does not stop)."""
    return not (f.features and f.features[0].startswith("distinct_"))


@dataclass(slots=True)
class LimitWrite:
    scope: str
    entity_id: str
    rate_per_min: float
    burst: int
    until: float
    reason: str


@dataclass(slots=True)
class ResponsePlan:
    verdict: str
    action: Action
    writes: list[BanWrite] = field(default_factory=list)
    limits: list[LimitWrite] = field(default_factory=list)


def plan_response(
    fusion: Fusion,
    findings: list[Finding],
    cfg: ResponsesConfig,
    *,
    bans: dict[str, BanState],
    entities: dict[str, str],
    ladder: EscalationLadder,
    ts: float,
    key: KeyContext | None = None,
) -> ResponsePlan:
    """What to do for this severity. Pure: the caller decides whether to enforce it.

    Proportional to the evidence: volume alone throttles (back to about twice the key's
    normal rate, for a while) and alerts; a ban needs identity or attack evidence
    (`fusion.can_block`) and lands on the narrowest scope that stops the intruder."""
    key = key or KeyContext()
    ban_finding = next((f for f in findings if f.kind == "ban"
                        and f.reason.code in fusion.drivers), None)
    if ban_finding is not None:  # already banned: enforce the ban as it is, no escalation
        state = bans[ban_finding.scope]
        return ResponsePlan("block", ban_action(ban_finding.scope, state.until, ts))

    if fusion.severity == "none":
        return ResponsePlan("allow", Action(type="log" if findings else "none"))
    tier = cfg.tiers.get(fusion.severity)  # type: ignore[call-overload]
    kind = tier.action if tier is not None else "log"
    drivers = [f for f in findings if f.reason.code in fusion.drivers and f.kind != "model"]
    scopes = [s for s in ("key", "ip") if any(f.scope == s for f in drivers)
              and s in entities] or ["key"]
    if kind in ("ban", "perm_ban") and not fusion.can_block:
        kind = "throttle"  # volume alone, or a model alone, never bans
    if kind == "perm_ban" and not cfg.bans.allow_permanent:
        kind = "ban"
    if kind in ("none", "log", "alert"):
        return ResponsePlan("allow", Action(type=kind, scope=scopes[0]))  # type: ignore[arg-type]
    if kind == "throttle":
        return ResponsePlan("throttle", throttle_action(cfg, tier, key, ts, scopes[0]))
    return _ban_plan(fusion, drivers, scopes, kind, bans=bans, entities=entities,
                     ladder=ladder, ts=ts, key=key)


def throttle_action(cfg: ResponsesConfig, tier: TierResponse | None, key: KeyContext,
                    ts: float, scope: str = "key") -> Action:
    """A limit back to `rate_factor` times the key's normal rate (the tier's
    `limit_per_min` for a key with no learned rate), never below `min_per_min`, for
    `duration`."""
    t = tier if tier is not None and tier.action == "throttle" else cfg.tiers.get("high")
    t = t or TierResponse(action="throttle", limit_per_min=60)
    if key.normal_per_min is not None and key.normal_per_min > 0:
        limit = key.normal_per_min * t.rate_factor
    else:
        limit = float(t.limit_per_min or 60)
    limit_i = max(math.ceil(limit), t.min_per_min)
    duration = int(t.duration)
    return Action(type="throttle", scope=scope,  # type: ignore[arg-type]
                  retry_after_s=t.retry_after_s,
                  limit_per_min=limit_i, duration_s=duration, burst=t.burst,
                  until=event_time_iso(ts + duration))


def _ban_plan(fusion: Fusion, drivers: list[Finding], scopes: list[str], kind: str, *,
              bans: dict[str, BanState], entities: dict[str, str],
              ladder: EscalationLadder, ts: float, key: KeyContext) -> ResponsePlan:
    """Bans on the scopes the blocking drivers name. Identity evidence on the key lands on
    the intruder's address while the owner's identities are still in use."""
    blocking = [f for f in drivers if f.evidence in BLOCKING_EVIDENCE]
    critical = [f for f in blocking if f.reason.severity == "critical"] or blocking
    ban_scopes = [s for s in ("key", "ip") if any(f.scope == s for f in critical)
                  and s in entities] or scopes
    on_key = [f for f in critical if f.scope == "key"]
    identity_only = all(f.evidence == "identity" for f in on_key)
    # the owner carries on, or the intruder is one address on a network the key never
    # used: the intruder's address is banned, and the owner's own traffic goes on
    one_intruder = key.network_new and all(_about_one_address(f) for f in on_key)
    if "key" in ban_scopes and identity_only and (key.owner_active or one_intruder) \
            and "ip" in entities:
        ban_scopes = ["ip"]
    incident = "+".join(sorted({f.evidence for f in blocking})) or "volume"
    writes = []
    reason = ", ".join(fusion.drivers)
    for scope in ban_scopes:
        state = bans.get(scope, BanState())
        duration, level = ladder.next_duration(state, ts, incident)
        if kind == "perm_ban":
            duration = PERMANENT_S
        writes.append(BanWrite(scope, entities[scope], until_for(ts, duration), level, reason,
                               incident))
    main = writes[0]
    network = key.network if main.scope == "ip" else None
    return ResponsePlan("block", ban_action(main.scope, main.until, ts, network), writes)


def limit_write_for(plan: ResponsePlan, entities: dict[str, str], now: float,
                    reason: str) -> LimitWrite | None:
    """The limit a throttle decision sets: the action's `limit_per_min` on its scope for
    its `duration_s` (15 min if unsaid), with its `burst` (ten seconds' worth if unsaid)."""
    action = plan.action
    if plan.verdict != "throttle" or action.type != "throttle" or action.scope not in entities:
        return None
    rate = float(action.limit_per_min or 60)
    duration = float(action.duration_s or DEFAULT_LIMIT_S)
    burst = int(action.burst or default_burst(rate))
    return LimitWrite(str(action.scope), entities[str(action.scope)], rate, burst,
                      now + duration, reason)


def needs_limit_write(held: LimitState, write: LimitWrite, now: float) -> bool:
    """Write a throttle's limit unless one as strict holds for at least half as long (an
    operator's limit is never loosened or shortened by the automatic one)."""
    if not held.active:
        return True
    if held.by == "admin":
        return False
    half = (write.until - now) / 2
    return write.rate_per_min < held.rate_per_min or held.until - now < half


# ---- allow-lists ----------------------------------------------------------------------
def allow_member(kind: str, value: str) -> str:
    return f"{kind}:{value}"


def normalise_key(value: str, hasher: KeyHasher) -> str:
    """A key id as given, or the key id of a raw key: raw keys are never stored."""
    value = value.strip()
    return value if looks_like_key_id(value) else hasher.key_id(value)


def normalise_cidr(value: str) -> str:
    return str(ipaddress.ip_network(value.strip(), strict=False))


@dataclass(slots=True)
class AllowEntries:
    keys: frozenset[str] = frozenset()
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @classmethod
    def build(cls, keys: list[str], cidrs: list[str]) -> AllowEntries:
        nets = []
        for c in cidrs:
            try:
                nets.append(ipaddress.ip_network(c, strict=False))
            except ValueError:
                continue
        return cls(frozenset(keys), tuple(nets))

    def key_allowed(self, key_id: str) -> bool:
        return key_id in self.keys

    def ip_allowed(self, ip: str | None) -> bool:
        if not ip or not self.networks:
            return False
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr.version == n.version and addr in n for n in self.networks)


def parse_allow_items(items: list[list[Any]]) -> tuple[list[str], list[str]]:
    keys, cidrs = [], []
    for member, _ in items:
        kind, _, value = str(member).partition(":")
        if kind == "key":
            keys.append(value)
        elif kind == "cidr":
            cidrs.append(value)
    return keys, cidrs


class AllowListCache:
    """The store's allow-list, refreshed at most every `ttl_s` seconds, merged with the
    policy file's. The refresh read rides on an event's own store round trip."""

    def __init__(self, *, ttl_s: float = 5.0) -> None:
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._stored: tuple[list[str], list[str]] = ([], [])
        self._fetched = -math.inf
        self._merged: AllowEntries | None = None
        self._merged_for: tuple[int, AllowList] | None = None

    def stale(self) -> bool:
        return time.monotonic() - self._fetched >= self.ttl_s

    def invalidate(self) -> None:
        with self._lock:
            self._fetched = -math.inf

    @staticmethod
    def read_ops() -> EntityOps:
        ops = EntityOps(GLOBAL, ALLOW_ENTITY)
        ops.add(ZITEMS, INDEX, "-inf", MAX_INDEXED)
        return ops

    def update(self, items: list[list[Any]]) -> None:
        with self._lock:
            self._stored = parse_allow_items(items)
            self._fetched = time.monotonic()
            self._merged = None

    def entries(self, policy_list: AllowList, hasher: KeyHasher) -> AllowEntries:
        with self._lock:
            stamp = (id(policy_list), policy_list)
            if self._merged is None or self._merged_for != stamp:
                keys = [normalise_key(k, hasher) for k in policy_list.keys] + self._stored[0]
                cidrs = list(policy_list.cidrs) + self._stored[1]
                self._merged = AllowEntries.build(keys, cidrs)
                self._merged_for = stamp
            return self._merged


def allow_add_ops(kind: str, value: str, ts: float) -> EntityOps:
    ops = EntityOps(GLOBAL, ALLOW_ENTITY)
    ops.add(ZSET, INDEX, allow_member(kind, value), ts, MAX_INDEXED)
    ops.add(PERSIST, 1)
    return ops


def allow_remove_ops(kind: str, value: str) -> EntityOps:
    ops = EntityOps(GLOBAL, ALLOW_ENTITY)
    ops.add(ZREM, INDEX, allow_member(kind, value))
    return ops


# ---- audit trail ------------------------------------------------------------------------
def audit_ops(record: dict[str, Any]) -> EntityOps:
    """Append one admin action to the audit list (newest kept, bounded)."""
    ops = EntityOps(GLOBAL, AUDIT_ENTITY)
    member = json.dumps(record, sort_keys=True, separators=(",", ":"))
    ops.add(ZSET, INDEX, member, float(record["ts"]), MAX_AUDIT)
    ops.add(PERSIST, 1)
    return ops


def audit_read_ops(limit: int) -> EntityOps:
    ops = EntityOps(GLOBAL, AUDIT_ENTITY)
    ops.add(ZITEMS, INDEX, "-inf", limit)
    return ops
