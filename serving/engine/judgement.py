"""From what the store and the models say about one event to what to do about it.

Pure functions over what the scorer observed: the rules' findings, fusion into a
severity, the response the policy plans for it (active rules only, and with shadow rules
too), budgets' own answers, and the verdict once the allow-list, dry-run and limits in
force are applied. The scorer does the I/O around them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from features.extractor import FeatureVector
from models.signals import ModelSignals
from serving.engine.budgets import budget_response
from serving.engine.decision import Action, Outcome, Reason, severity_rank
from serving.policy.fusion import Fusion, fuse
from serving.policy.responses import (
    BanState,
    EscalationLadder,
    KeyContext,
    LimitState,
    LimitWrite,
    ResponsePlan,
    limit_write_for,
    limited_action,
    plan_response,
)
from serving.policy.rules import Finding, RuleInput, evaluate_rules
from serving.policy.schema import Policy


@dataclass(slots=True)
class Observed:
    """What one round trip told about an event: its features, the enforcement state of its
    key and address, its budgets and the models' view."""

    key_id: str
    ts: float
    now: float
    """The enforcement clock: wall time live, event time in a replay."""
    fv: FeatureVector
    bans: dict[str, BanState]
    limits: dict[str, LimitState]
    budgets: dict[str, Any]
    entities: dict[str, str]
    signals: ModelSignals
    detector_state: Any = None


@dataclass(slots=True)
class Judgement:
    """The findings, their fusion and the planned response, for the active rules and with
    the shadow rules too (what the policy would do if they were active)."""

    findings: list[Finding]
    active: list[Finding]
    fused: Fusion
    shadow: Fusion
    plan_active: ResponsePlan
    plan_shadow: ResponsePlan


@dataclass(slots=True)
class Verdict:
    """What the decision says and whether it is enforced."""

    verdict: str
    action: Action
    reasons: list[Reason]
    would: Outcome | None
    enforce: bool
    dry_run: bool


def judge(policy: Policy, obs: Observed, rules: tuple[Any, ...], ladder: EscalationLadder,
          key: KeyContext) -> Judgement:
    """Rules, fusion and the planned responses, active and shadow."""
    findings = evaluate_rules(rules, RuleInput(
        fv=obs.fv, signals=obs.signals,
        bans={s: b.view(obs.now) for s, b in obs.bans.items()}, budgets=obs.budgets))
    active = [f for f in findings if f.mode == "active"]
    fused = fuse(active, obs.signals, obs.fv, policy.fusion)
    plan_active = plan_response(fused, active, policy.responses, bans=obs.bans,
                                entities=obs.entities, ladder=ladder, ts=obs.now, key=key)
    if len(active) == len(findings):
        return Judgement(findings, active, fused, fused, plan_active, plan_active)
    shadow = fuse(findings, obs.signals, obs.fv, policy.fusion)
    plan_shadow = plan_response(shadow, findings, policy.responses, bans=obs.bans,
                                entities=obs.entities, ladder=ladder, ts=obs.now, key=key)
    return Judgement(findings, active, fused, shadow, plan_active, plan_shadow)


def settle_limits(j: Judgement, obs: Observed, policy: Policy) -> None:
    """A throttle is a limit on its scope, for a while; at a hard budget the budget's own
    response stands instead of the ban ladder, and sets no limit."""
    limit_write: LimitWrite | None = limit_write_for(j.plan_active, obs.entities, obs.now,
                                                     ", ".join(j.fused.drivers))
    if obs.budgets:
        for p, f, used in ((j.plan_active, j.fused, j.active),
                           (j.plan_shadow, j.shadow, j.findings)):
            own = budget_response(f, used, policy, obs.ts)
            if own is not None:
                p.verdict, p.action, p.writes = own
                if p is j.plan_active:
                    limit_write = None
    if limit_write is not None:
        j.plan_active.limits.append(limit_write)


def decide(j: Judgement, obs: Observed, *, exempt: bool, dry_run: bool,
           reasons: list[Reason]) -> Verdict:
    """The verdict once dry-run, the allow-list and the limits metering the call apply.

    An operator's ban holds on an allow-listed key; an operator's limit too. A call over
    a limit in force is throttled unless it is blocked anyway."""
    operator_ban = any(f.kind == "ban" and obs.bans[f.scope].by == "admin" for f in j.active)
    enforce = not dry_run and (not exempt or operator_ban)
    limited = metering_limit(obs.limits, exempt=exempt) if not dry_run else None
    if enforce or limited is not None:
        verdict, action = j.plan_active.verdict, j.plan_active.action
        if not enforce:  # an operator's limit on an allow-listed key still holds
            verdict, action = "allow", Action(type="log" if j.findings else "none")
        if limited is not None and limited[1].over and verdict != "block":
            verdict, action = "throttle", limited_action(limited[0], limited[1], obs.now)
    else:
        verdict = "allow"
        action = Action(type="alert" if j.plan_shadow.verdict != "allow"
                        else ("log" if j.findings else "none"))
        if exempt and j.findings:
            reasons.append(Reason(code="allow_listed", severity="none",
                                  message="key or address is on the allow-list: "
                                          "scored and explained, not enforced"))
    would = None
    if (j.plan_shadow.verdict, j.plan_shadow.action) != (verdict, action):
        would = Outcome(decision=j.plan_shadow.verdict,  # type: ignore[arg-type]
                        severity=j.shadow.severity,  # type: ignore[arg-type]
                        action=j.plan_shadow.action, drivers=j.shadow.drivers)
    return Verdict(verdict, action, reasons, would, enforce, dry_run)


def metering_limit(limits: dict[str, LimitState], *,
                   exempt: bool) -> tuple[str, LimitState] | None:
    """The limit that meters this call, one it is over first (the key's, then the
    address's); on an allow-listed key or address only an operator's limit counts. A call
    within its limits keeps its decision: only one over a limit is throttled."""
    held = [(scope, limit) for scope, limit in limits.items()
            if limit.active and (not exempt or limit.by == "admin")]
    return min(held, key=lambda sl: not sl[1].over, default=None)


def ranked_reasons(j: Judgement) -> list[Reason]:
    """Every finding's reason, with the models' reason in severity order."""
    reasons: list[Reason] = [f.reason for f in j.findings]
    if j.fused.model_reason is not None:
        reasons.append(j.fused.model_reason)
        reasons.sort(key=lambda r: -severity_rank(r.severity))
    return reasons
