"""The one path from an event to a decision, shared by the API, `replay` and notebooks.

event → key id → features (one store round trip, which also reads the ban state of the
key and the address, and refreshes the allow-list cache when it is stale) → detectors →
rules (the policy in force, hot-reloaded) → fusion → response → decision.

Shadow mode is computed, not skipped: rules in `monitor` mode, a global dry-run and the
allow-list all go through the same fusion and response planning, and the decision
carries what *would* have happened (`would`) while nothing is enforced.

Money: the event's cost is priced in the feature extractor (the policy's `pricing:` over
the packaged list prices), budgets are checked and counted exactly in the same round trip
(`serving.engine.budgets`), and every decision carries the money at stake (`serving.engine.money`).

Enforcement runs on its own clock (`enforcement_clock`): the live service (`build_scorer`
with `live=True`) stores and judges bans and limits in wall time, so a backlog of old
events still bans now, while windows keep running on event time; a replay or an
evaluation keeps event time throughout. A key or address under a limit is metered in the
event's own round trip, and its decision says so (`throttle`, with the limit).

Baseline learning happens only for events that were not flagged,
and is sent to the store ahead of the next event's operations, so it costs no extra
round trip and an attacker cannot teach the baselines that the attack is normal.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from features.contract import Event, event_time_iso
from features.extractor import IP, KEY, FeatureExtractor, FeatureVector
from features.keys import KeyHasher
from features.pricing import PriceTable, PricingConfig
from features.stores.base import EntityOps, StateStore
from models.detectors import Detectors
from models.signals import ModelSignals
from serving.engine.budgets import plan_budgets
from serving.engine.decision import Decision, severity_rank
from serving.engine.ingest import ClockBound, Dedupe, EventInFlight
from serving.engine.judgement import (
    Judgement,
    Observed,
    decide,
    judge,
    metering_limit,
    ranked_reasons,
    settle_limits,
)
from serving.engine.money import money_of, state_money
from serving.policy.fusion import SEVERITY_SCORE
from serving.policy.responses import (
    AllowListCache,
    BanState,
    EscalationLadder,
    KeyContext,
    LimitState,
    add_ban_reads,
    add_limit_reads,
    ban_writes,
    learned_at,
    limit_writes,
    needs_limit_write,
    network_is_new,
    prefix_since_read,
    read_ban,
    read_limit,
    spare_established,
)
from serving.policy.schema import Policy, PolicySource, load_policy

__all__ = ["SEVERITY_SCORE", "CheckResult", "Scorer", "decision_line"]

log = logging.getLogger("keywatch.scorer")

SignalsFn = Callable[[FeatureVector], ModelSignals]


@dataclass(slots=True)
class CheckResult:
    """The gateway pre-flight answer: may this key (from this address) call now?

    `refused` says what refuses the call: `key` (a key ban), `address` (an address ban)
    or `throttle` (a limit, on the key or the address: `scope`); `until` is when that
    ends (None: permanent). `limit` describes a limit metering the caller even when the
    call is allowed, so a gateway knows not to reuse an allowance."""

    key_id: str
    allowed: bool
    reason: str | None = None
    retry_after_s: int | None = None
    dry_run: bool = False
    refused: str | None = None
    scope: str | None = None
    until: str | None = None
    limit: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"key_id": self.key_id, "allowed": self.allowed, "reason": self.reason,
                "retry_after_s": self.retry_after_s, "dry_run": self.dry_run,
                "refused": self.refused, "scope": self.scope, "until": self.until,
                "limit": self.limit}


class Scorer:
    """Scores events against shared state; safe to call from several threads.

    Parameters
    ----------
    policy:
        A `Policy`, a `PolicySource` (hot-reloaded file) or None for the packaged policy.
    signals_fn:
        Turns a feature vector into `ModelSignals`; None means no models yet (every score
        None), so fusion runs on rules alone.
    dry_run:
        Score, explain and alert, never enforce (also settable in the policy file).
    prices:
        Model prices from the settings (`KEYWATCH_PRICES`); the policy's `pricing:` is
        applied over them. None with an empty policy section: the extractor's own table.
    """

    def __init__(
        self,
        *,
        store: StateStore,
        hasher: KeyHasher,
        extractor: FeatureExtractor | None = None,
        policy: Policy | PolicySource | None = None,
        dry_run: bool = False,
        signals_fn: SignalsFn | None = None,
        detectors: Detectors | None = None,
        allow_list_ttl_s: float = 5.0,
        prices: PricingConfig | None = None,
        enforcement_clock: str = "event",
        clock_bound: ClockBound | None = None,
        dedupe: Dedupe | None = None,
        immediate_learning: bool = False,
    ) -> None:
        if enforcement_clock not in ("event", "wall"):
            raise ValueError("enforcement_clock is 'event' (replay) or 'wall' (live)")
        self.enforcement_clock = enforcement_clock
        self._pinned = threading.local()
        """`wall`: bans and limits are set and judged on the server clock (live);
        `event`: on event time (replay, evaluation, notebooks)."""
        self.store = store
        self.hasher = hasher
        self.extractor = extractor or FeatureExtractor()
        if isinstance(policy, PolicySource):
            self.policy_source = policy
        else:
            self.policy_source = PolicySource.fixed(policy if policy is not None
                                                    else load_policy())
        self.dry_run = dry_run
        self.signals_fn = signals_fn
        self.detectors = detectors
        self.allow_list = AllowListCache(ttl_s=allow_list_ttl_s)
        self._pending: list[EntityOps] = []
        self._lock = threading.Lock()
        self.prices = prices
        self._pricing_for: object = None
        self._policy_derived: tuple[Policy, tuple[Any, ...], EscalationLadder] | None = None
        self.clock_bound = clock_bound
        """Live scoring only: the event time accepted around the server clock."""
        self.dedupe = dedupe
        """Live scoring only: event ids claimed in the store, repeats answered once."""
        self.immediate_learning = immediate_learning
        """Send a request's learning in a round trip of its own before it is answered
        (within a batch, each event's learning still goes ahead of the next event's),
        rather than ahead of the next request's: what other replicas read is then never
        behind what this one answered (two or four replicas fed in turn decided exactly
        as one process; deferred, 0.9% differed), for one more round trip per request."""

    # ---- public -----------------------------------------------------------------------
    @property
    def policy(self) -> Policy:
        return self.policy_source.current()

    def score(self, event: Event) -> Decision:
        return self.score_many([event])[0]

    def score_many(self, events: Iterable[Event]) -> list[Decision]:
        """Decisions in order. Under a clock bound every event is checked before any is
        applied; a repeated `event_id` gets the first decision back (see `ingest`)."""
        events = list(events)
        if self.clock_bound is not None:
            events = self.clock_bound.admit(events)
        out = []
        for event in events:
            repeat = self._repeat(event.event_id) if event.event_id else None
            out.append(repeat if repeat is not None else self.score_with_features(event)[0])
        if self.immediate_learning:
            self._send_learning()
        return out

    def _repeat(self, event_id: str) -> Decision | None:
        """The decision already answered for `event_id` in this process, if any."""
        if self.dedupe is None:
            return None
        held = self.dedupe.local(event_id)
        if held is None:
            return None
        self.dedupe.repeats += 1
        return Decision.model_validate_json(held)

    def flush(self) -> None:
        """Send queued baseline updates now (end of a replay, shutdown, idle timer)."""
        pending = self._take_pending()
        if pending:
            try:
                self.store.execute(pending)
            except Exception as exc:
                if _retry_later(exc):
                    self._requeue(pending)
                raise

    def enforcement_now(self, ts: float) -> float:
        """'Now' for bans and limits: the server clock when live (or the time pinned for
        this thread, see `pinned_clock`), else the event's time."""
        if self.enforcement_clock != "wall":
            return ts
        pinned = getattr(self._pinned, "now", None)
        return time.time() if pinned is None else pinned

    @contextmanager
    def pinned_clock(self, now: float) -> Iterator[None]:
        """Score on this thread as if the wall clock read `now`: a stream worker pins the
        entry's arrival time, so an event delivered again is decided from the same numbers
        (and its writes are recognised as the same writes)."""
        self._pinned.now = now
        try:
            yield
        finally:
            self._pinned.now = None

    def model_versions(self) -> dict[str, str | None]:
        if self.detectors is not None:
            return self.detectors.versions()
        return {"online": None, "offline": None}

    def model_signals(self, fv: FeatureVector) -> ModelSignals:
        return self.signals_fn(fv) if self.signals_fn is not None else ModelSignals()

    # ---- pipeline ---------------------------------------------------------------------
    def _execute(self, requests: list[EntityOps]) -> list[list[Any]]:
        """One round trip: queued learning, then `requests`, then an allow-list refresh
        when the cache is stale. Returns the results of `requests` only."""
        refresh = [AllowListCache.read_ops()] if self.allow_list.stale() else []
        pending = self._take_pending()
        try:
            results = self.store.execute([*pending, *requests, *refresh])
        except Exception as exc:
            if _retry_later(exc):
                self._requeue(pending)
            raise
        if refresh:
            self.allow_list.update(results[-1][0])
        return results[len(pending):len(pending) + len(requests)]

    def _round_trip(self, sent: list[EntityOps], event_id: str | None, *,
                    shared: EntityOps | None) -> tuple[list[list[Any]], Decision | None]:
        """The event's round trip, its id claimed on each entity but the population's;
        with the first decision when the id was seen before (then nothing was applied).

        The population entity is left out: every event touches it, so its claims would be
        one hot set of every id in the window; a re-sent event's one extra count in the
        population's hourly total is the price."""
        if not event_id or self.dedupe is None:
            return self._execute(sent), None
        claimed = [n for n, req in enumerate(sent) if req is not shared]
        self.dedupe.claim([sent[n] for n in claimed], event_id)
        all_results = self._execute(sent)
        held = self.dedupe.held([all_results[n] for n in claimed])
        if held is None:
            return all_results, None
        self.dedupe.repeats += 1
        if not held:
            raise EventInFlight(event_id)
        return all_results, Decision.model_validate_json(held)

    def _use_prices(self, policy: Policy) -> None:
        """Price with the settings' and the policy's tables (rebuilt when they change)."""
        if policy.pricing is self._pricing_for:
            return
        if self.prices is not None or not policy.pricing.is_empty:
            self.extractor.pricing = PriceTable.from_configs(self.prices, policy.pricing)
        self._pricing_for = policy.pricing

    def _for_policy(self, policy: Policy) -> tuple[tuple[Any, ...], EscalationLadder]:
        """The policy's active rules and ban ladder, derived once per policy version."""
        cached = self._policy_derived
        if cached is None or cached[0] is not policy:
            ladder = EscalationLadder.from_settings(policy.responses.bans)
            cached = self._policy_derived = (policy, policy.active_rules(), ladder)
        return cached[1], cached[2]

    def score_with_features(self, event: Event) -> tuple[Decision, FeatureVector]:
        """The one path from an event to a decision: observe (one round trip), judge,
        decide, enforce, and queue what the event teaches."""
        policy = self.policy
        self._use_prices(policy)
        obs = self._observe(event, policy)
        if isinstance(obs, tuple):
            return obs  # a repeated event id: its first decision, nothing applied
        rules, ladder = self._for_policy(policy)
        j = judge(policy, obs, rules, ladder, key_context(obs.fv))
        settle_limits(j, obs, policy)
        allow = self.allow_list.entries(policy.allow_list, self.hasher)
        exempt = allow.key_allowed(obs.key_id) or allow.ip_allowed(event.source_ip)
        money = money_of(obs.fv)
        v = decide(j, obs, exempt=exempt, dry_run=self.dry_run or policy.dry_run,
                   reasons=state_money(ranked_reasons(j), money))
        if v.enforce and (j.plan_active.writes or j.plan_active.limits):
            self._write_enforcement(j.plan_active, obs.limits, obs.now)
        decision = Decision(
            key_id=obs.key_id,
            decision=v.verdict,  # type: ignore[arg-type]
            severity=j.fused.severity,  # type: ignore[arg-type]
            score=j.fused.score,
            reasons=v.reasons,
            action=v.action,
            model_versions=self.model_versions(),
            event_time=event_time_iso(obs.ts),
            dry_run=v.dry_run,
            drivers=j.fused.drivers,
            would=v.would,
            enforced=v.enforce,
            money=money,
        )
        self._queue_learning(event, obs, j, decision)
        return decision, obs.fv

    def _observe(self, event: Event, policy: Policy
                 ) -> Observed | tuple[Decision, FeatureVector]:
        """Plan the event's reads and writes, send them in one round trip, and read back
        its features, bans, limits, budgets and the models' signals. A repeated event id
        answers with its first decision instead."""
        key_id = self.hasher.key_id(event.api_key)
        now = self.enforcement_now(event.timestamp)
        plan = self.extractor.plan(event, key_id)
        key_ban_idx = add_ban_reads(plan.key_ops)
        ip_ban_idx = add_ban_reads(plan.ip_ops) if plan.ip_ops is not None else None
        meter = "peek" if event.status == 429 else "count"  # a refused call was not served
        key_lim_idx = add_limit_reads(plan.key_ops, meter, now)
        ip_lim_idx = add_limit_reads(plan.ip_ops, meter, now) if plan.ip_ops is not None \
            else None
        kb_idx = self.detectors.plan(plan) if self.detectors is not None else None
        pop_idx = self.detectors.plan_population(plan) if self.detectors is not None else None
        budget_plan = plan_budgets(policy, plan)
        requests = plan.requests()
        event_id = event.event_id if self.dedupe is not None else None
        all_results, repeat = self._round_trip([*requests, *budget_plan.entities], event_id,
                                               shared=plan.population_ops)
        if repeat is not None:
            return repeat, FeatureVector({}, {"key_id": key_id, "repeat_of": event_id})
        results = all_results[:len(requests)]
        fv = self.extractor.build(plan, results)
        obs = Observed(
            key_id=key_id, ts=event.timestamp, now=now, fv=fv,
            # the owner's established networks pass an automatic key ban
            bans={"key": spare_established(read_ban(results[0], key_ban_idx),
                                           plan.identity.get("prefix_since"),
                                           policy.responses.bans),
                  "ip": read_ban(results[1], ip_ban_idx) if ip_ban_idx is not None
                  else BanState()},
            limits={"key": read_limit(results[0], key_lim_idx),
                    "ip": read_limit(results[1], ip_lim_idx) if ip_lim_idx is not None
                    else LimitState()},
            budgets=budget_plan.read(results[0], all_results[len(requests):], event.timestamp)
            if budget_plan.slots else {},
            entities={"key": key_id, **({"ip": event.source_ip} if event.source_ip else {})},
            signals=ModelSignals())
        self._model_view(obs, results, kb_idx, pop_idx)
        return obs

    def _model_view(self, obs: Observed, results: list[list[Any]], kb_idx: int | None,
                    pop_idx: int | None) -> None:
        """The models' signals for the event, after catching up on what every replica
        taught the population model."""
        if self.detectors is not None and pop_idx is not None:
            self.detectors.catch_up(results[-1][pop_idx])
        if self.detectors is not None and kb_idx is not None:
            obs.signals, obs.detector_state = self.detectors.signals(obs.fv, results[0][kb_idx])
        else:
            obs.signals = self.model_signals(obs.fv)

    def _queue_learning(self, event: Event, obs: Observed, j: Judgement,
                        decision: Decision) -> None:
        """What the event teaches (nothing of what was flagged), and its id's first
        decision, sent ahead of the next round trip (or before the request is answered,
        see `immediate_learning`)."""
        # a call refused by a limit was not served: it teaches no baseline either
        flagged = (severity_rank(j.shadow.severity) >= severity_rank("medium")
                   or decision.decision != "allow")
        learn: list[EntityOps] = self._learning(obs.fv, j.shadow, flagged)
        if obs.detector_state is not None and self.detectors is not None:
            learn.extend(self.detectors.after(obs.detector_state, flagged=flagged))
        event_id = event.event_id if self.dedupe is not None else None
        if event_id:  # remembered with the key's claim, in the next round trip; a key
            # holds one for each id of the dedupe window, so without its default values
            learn.append(self.dedupe.remember(  # type: ignore[union-attr]
                KEY, obs.key_id, event_id, decision.model_dump_json(exclude_defaults=True)))
        if not learn:
            return
        with self._lock:
            self._pending.extend(_one_per_entity(learn))

    def _send_learning(self) -> None:
        """`immediate_learning`: the request's learning, sent before it is answered."""
        try:
            self.flush()
        except Exception as exc:  # the decisions stand; learning goes with the next call
            log.warning("learning not sent yet, kept for the next round trip: %s", exc)

    def _learning(self, fv: FeatureVector, fused: Any, flagged: bool) -> list[EntityOps]:
        """What this event teaches. Normal: everything. Contained for volume only, from
        the key's known identities (network and client library its normal traffic uses):
        only what recurs and that the owner is active, so a nightly job being throttled
        still teaches its own pattern while a runaway loop teaches no baseline. Anything
        else flagged: nothing (an attacker cannot teach the baselines)."""
        if not flagged:
            return self.extractor.learn_ops(fv)
        volume_only = set(fused.evidence) <= {"volume"}
        if volume_only and fv.values.get("known_identity_by_event"):
            return self.extractor.contained_learn_ops(fv)
        return []

    def _write_enforcement(self, plan: Any, limits: dict[str, LimitState],
                           now: float) -> None:
        """The plan's bans and limits, in one store call, stamped on the enforcement clock."""
        ops: list[EntityOps] = []
        for w in plan.writes:
            ops.extend(ban_writes(w.scope, w.entity_id, until=w.until, level=w.level,
                                  ts=now, reason=w.reason, incident=w.incident))
            log.warning("ban %s %s until %s (offence %d): %s", w.scope,
                        w.entity_id, event_time_iso(min(w.until, 4e9)), w.level, w.reason)
        for lw in plan.limits:
            held = limits.get(lw.scope, LimitState())
            if not needs_limit_write(held, lw, now):
                continue
            ops.extend(limit_writes(lw.scope, lw.entity_id, rate_per_min=lw.rate_per_min,
                                    burst=lw.burst, until=lw.until, reason=lw.reason,
                                    fresh=not held.active))
            log.warning("limit %s %s to %g/min until %s: %s", lw.scope, lw.entity_id,
                        lw.rate_per_min, event_time_iso(lw.until), lw.reason)
        if ops:
            self.store.execute(ops)

    # ---- pre-flight -------------------------------------------------------------------
    def check(self, api_key: str, source_ip: str | None = None,
              now: float | None = None) -> CheckResult:
        """May the key (from this address) call now? Bans first, then limits: an allowed
        call takes its place under a limit (GCRA), in the same single round trip."""
        ts = time.time() if now is None else now
        key_id = self.hasher.key_id(api_key)
        policy = self.policy
        requests = [EntityOps(KEY, key_id)]
        scopes = {"key": requests[0]}
        if source_ip:
            requests.append(EntityOps(IP, source_ip))
            scopes["ip"] = requests[1]
        idx = {s: (add_ban_reads(ops), add_limit_reads(ops, "take", ts))
               for s, ops in scopes.items()}
        since_idx = prefix_since_read(requests[0], source_ip)
        results = self._execute(requests)
        allow = self.allow_list.entries(policy.allow_list, self.hasher)
        exempt = allow.key_allowed(key_id) or allow.ip_allowed(source_ip)
        dry_run = self.dry_run or policy.dry_run
        enforced_scopes = {r.scope for r in policy.rules
                           if r.type == "banned" and r.mode == "active"}
        limits: dict[str, LimitState] = {}
        for n, scope in enumerate(idx):
            ban = read_ban(results[n], idx[scope][0])
            if scope == "key":  # the owner's established networks pass an automatic ban
                ban = spare_established(ban, learned_at(results[0], since_idx),
                                        policy.responses.bans)
            limits[scope] = read_limit(results[n], idx[scope][1])
            if scope not in enforced_scopes or not ban.active(ts):
                continue
            if exempt and ban.by != "admin":
                continue
            refusal = _ban_refusal(key_id, scope, ban, ts)
            return _dry(refusal) if dry_run else refusal
        limited = metering_limit(limits, exempt=exempt)
        if limited is None:
            return CheckResult(key_id, True, None, None, dry_run)
        scope, limit = limited
        answer = _limit_answer(key_id, scope, limit)
        return _dry(answer) if dry_run and not answer.allowed else answer

    def _take_pending(self) -> list[EntityOps]:
        with self._lock:
            pending, self._pending = self._pending, []
        return pending

    def _requeue(self, pending: list[EntityOps]) -> None:
        with self._lock:
            self._pending[:0] = pending


OWNER_ACTIVE_S = 3600.0
"""The owner's identities count as in use when the key had an event judged normal this
recently: a ban for identity evidence then lands on the intruder's address."""


def key_context(fv: FeatureVector) -> KeyContext:
    """The key's normal rate and whether its owner is active, for the response."""
    expected_1h = fv.context.get("baseline_requests_1h")
    warm = bool(fv.context.get("key_warm"))
    age = fv.values.get("last_normal_age_s_by_key")
    return KeyContext(
        normal_per_min=expected_1h / 60.0 if expected_1h and warm else None,
        owner_active=age is not None and age < OWNER_ACTIVE_S,
        network=fv.context.get("network"), network_new=network_is_new(fv.values))


def _ban_refusal(key_id: str, scope: str, ban: BanState, now: float) -> CheckResult:
    subject = "key" if scope == "key" else "address"
    until = "permanently" if ban.permanent else f"until {event_time_iso(ban.until)}"
    why = f" ({ban.reason})" if ban.reason else ""
    retry = None if ban.permanent else max(1, math.ceil(ban.until - now))
    return CheckResult(key_id, False, f"{subject} banned {until}{why}", retry,
                       refused=subject, scope=scope,
                       until=None if ban.permanent else event_time_iso(ban.until))


def _limit_answer(key_id: str, scope: str, limit: LimitState) -> CheckResult:
    """A call under a limit: allowed within it, refused over it until the next fits."""
    subject = "key" if scope == "key" else "address"
    until = event_time_iso(limit.until)
    rate = max(1, round(limit.rate_per_min))
    detail = {"scope": scope, "limit_per_min": rate, "burst": max(1, round(limit.burst)),
              "until": until, "by": limit.by}
    if not limit.over:
        return CheckResult(key_id, True, None, None, limit=detail)
    retry = max(1, math.ceil(limit.retry_after_s))
    return CheckResult(key_id, False, f"{subject} throttled to {rate} calls/min until "
                                      f"{until}: over the limit, next call in {retry} s",
                       retry, refused="throttle", scope=scope, until=until, limit=detail)


def _dry(result: CheckResult) -> CheckResult:
    """Dry-run: say what would be refused, refuse nothing."""
    return CheckResult(result.key_id, True, f"dry-run: would be refused, {result.reason}",
                       None, True, limit=result.limit)


def _one_per_entity(requests: list[EntityOps]) -> list[EntityOps]:
    """Join the requests that touch the same entity, in order: each request is one script
    call on Redis (and one lookup in memory), and an event's learning usually writes the
    key twice (feature baselines, then the detectors' baseline)."""
    if len(requests) < 2:
        return requests
    joined: dict[tuple[str, str], EntityOps] = {}
    for req in requests:
        held = joined.get((req.kind, req.entity_id))
        if held is None:
            joined[(req.kind, req.entity_id)] = EntityOps(req.kind, req.entity_id,
                                                          list(req.ops))
        else:
            held.ops.extend(req.ops)
    return list(joined.values())


def decision_line(decision: Decision) -> dict[str, Any]:
    """The JSON form written by `replay`, one line per event."""
    return decision.model_dump(mode="json")


def _retry_later(exc: BaseException) -> bool:
    """Whether queued learning that failed with `exc` goes back in the queue: not when the
    store spooled it (`writes_kept`), nor when the store refused it as bad data (a key of the
    wrong type): requeued, one poisoned key's baseline update would fail every later request
    of every key, as it rides along with them."""
    if getattr(exc, "writes_kept", False):
        return False
    if getattr(exc, "data_error", False):
        log.error("queued baseline updates dropped, the store refused them: %s", exc)
        return False
    return True
