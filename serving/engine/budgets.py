"""Spend budgets: periods, the exact check-and-increment, and the response at the limit.

A budget rule (`type: budget` in the policy, see `serving.policy.rules.BudgetRule`) gives a key,
or a named group of keys, an amount of US dollars per day, week or month (UTC; weeks
start on Monday). The hard limit must hold across replicas to the cent, so it is never
computed from a read followed by a write: every event sends one `BUDGET_ADD` op that
adds the event's cost to the period's counter only if the total stays within the
budget, and says whether it fitted. A per-key budget rides on the key's own atomic
store call; a shared (group) budget is one more entity in the same pipeline (`("bg",
rule id)`), so an event still costs one round trip.

Amounts are counted in integer micro-dollars (the event's cost rounded to the nearest
micro-dollar), so the comparison is exact in both stores (doubles are exact integers
below 2**53, i.e. budgets up to $9 billion).

Semantics: spend never exceeds the budget. The call that would take the total over is
the hard finding and is not counted (its cost goes to the period's `over` total); a
later, smaller call that still fits is admitted. When a hard budget finding is what
drives the decision, the response is the budget's own, not the escalation ladder: a
throttle or a refusal that lasts until the period resets, never a ban that grows with
repeat offences (running out of budget every month is not an attack).

Budget counters live on the key's state, so they share its idle TTL (8 days by default):
a key silent for longer than that starts its period afresh.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from features.contract import event_time_iso
from features.extractor import Plan
from features.stores.base import BUDGET_ADD, EntityOps
from serving.engine.decision import Action
from serving.policy.fusion import Fusion
from serving.policy.rules import BudgetRule, BudgetView, Finding
from serving.policy.schema import Policy, ResponsesConfig

MICRO = 1_000_000
GROUP_KIND = "bg"
"""Entity kind of a shared budget's counter."""
FIELD_PREFIX = "budget:"


def period_bounds(period: str, ts: float) -> tuple[int, float, float]:
    """(period number, start, end) in epoch seconds for the UTC period holding `ts`."""
    if period == "day":
        n = int(ts // 86400)
        return n, n * 86400.0, (n + 1) * 86400.0
    if period == "week":
        # the epoch was a Thursday: shift by 3 days so that weeks start on Monday
        n = int((ts // 86400 + 3) // 7)
        start = (n * 7 - 3) * 86400.0
        return n, start, start + 7 * 86400.0
    if period == "month":
        d = datetime.fromtimestamp(ts, tz=UTC)
        n = d.year * 12 + d.month - 1
        start = datetime(d.year, d.month, 1, tzinfo=UTC).timestamp()
        ny, nm = divmod(n + 1, 12)
        end = datetime(ny, nm + 1, 1, tzinfo=UTC).timestamp()
        return n, start, end
    raise ValueError(f"unknown budget period {period!r}")


def to_micro(usd: float) -> int:
    return round(usd * MICRO)


@dataclass(slots=True)
class _Slot:
    rule: BudgetRule
    entity: int
    """-1: on the key's own ops; otherwise the index into `BudgetPlan.entities`."""
    index: int
    cost_usd: float
    end_ts: float


@dataclass(slots=True)
class BudgetPlan:
    """The budget ops of one event and where their results will come back."""

    slots: list[_Slot] = field(default_factory=list)
    entities: list[EntityOps] = field(default_factory=list)

    def read(self, key_results: list[Any], extra_results: list[list[Any]],
             ts: float) -> dict[str, BudgetView]:
        views: dict[str, BudgetView] = {}
        for slot in self.slots:
            res = (key_results if slot.entity < 0 else extra_results[slot.entity])[slot.index]
            status, total, over = (float(x) for x in res)
            p = slot.rule.params
            views[slot.rule.id] = BudgetView(
                status=int(status), spent_usd=total / MICRO, over_usd=over / MICRO,
                limit_usd=p.amount_usd, cost_usd=slot.cost_usd, period=p.period,
                resets_at=event_time_iso(slot.end_ts), resets_in_s=slot.end_ts - ts)
        return views


def plan_budgets(policy: Policy, plan: Plan) -> BudgetPlan:
    """Queue one `BUDGET_ADD` per budget that applies to the event's key."""
    out = BudgetPlan()
    rules = policy.budget_rules()
    if not rules:
        return out
    ts = plan.event.timestamp
    cost = plan.cost.usd if plan.cost is not None else 0.0
    amount = to_micro(cost)
    groups: dict[str, int] = {}
    for rule in rules:
        if not rule.applies_to(plan.key_id):
            continue
        p = rule.params
        n, _, end = period_bounds(p.period, ts)
        op = (BUDGET_ADD, FIELD_PREFIX + rule.id, n, amount, to_micro(p.amount_usd))
        if p.shared:
            entity = groups.get(rule.id)
            if entity is None:
                entity = groups[rule.id] = len(out.entities)
                out.entities.append(EntityOps(GROUP_KIND, rule.id))
            index = out.entities[entity].add(*op)
        else:
            entity, index = -1, plan.key_ops.add(*op)
        out.slots.append(_Slot(rule, entity, index, cost, end))
    return out


def budget_response(fused: Fusion, findings: list[Finding], policy: Policy,
                    ts: float) -> tuple[str, Action, list[Any]] | None:
    """The budget's own response when hard budget findings are all that drive `fused`
    (None otherwise: the graduated response stands)."""
    budget_codes = {r.id: r for r in policy.budget_rules()}
    hard = [f for f in findings if f.reason.code in budget_codes
            and f.reason.evidence.get("limit") == "hard"]
    if not hard or not fused.drivers:
        return None
    if not set(fused.drivers) <= {f.reason.code for f in hard}:
        return None  # something else drives the decision: its response stands
    rule = max((budget_codes[f.reason.code] for f in hard),
               key=lambda r: ("alert", "throttle", "block").index(r.params.hard))
    resets_in = max((float(f.reason.evidence.get("resets_in_s") or 0.0) for f in hard),
                    default=0.0)
    retry = max(1, math.ceil(resets_in))
    until = event_time_iso(ts + resets_in)
    if rule.params.hard == "block":
        return "block", Action(type="refuse", scope="key", until=until,
                               retry_after_s=retry), []
    if rule.params.hard == "throttle":
        tier = _throttle_tier(policy.responses)
        return "throttle", Action(type="throttle", scope="key", until=until,
                                  retry_after_s=min(retry, tier[0]),
                                  limit_per_min=tier[1]), []
    return "allow", Action(type="alert", scope="key"), []


def _throttle_tier(responses: ResponsesConfig) -> tuple[int, int | None]:
    t = responses.tiers.get("high")
    if t is not None and t.action == "throttle":
        return t.retry_after_s, t.limit_per_min
    return 60, None
