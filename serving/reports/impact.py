"""Impact report: what a policy would have done to real traffic, before it is enforced.

Run a policy in dry-run (or with new rules in `monitor` mode) through `keywatch replay`,
then `keywatch policy impact DECISIONS.jsonl` counts the events and the distinct keys
that would have been throttled or blocked, in total and by rule. The "would" outcome of
a decision is used when present (shadow mode changed it), else the decision itself, so
the report reads the same for a dry-run and for an enforcing run.

Money: each decision carries the event's estimated cost (`money.cost_usd`); the spend of
the events that would have been throttled or blocked is the money that would have been
saved (an upper bound for throttles, which slow a key rather than stop it). Decision
lines written before costs existed count as $0 and are reported as unpriced.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serving.engine.decision import severity_rank


@dataclass(slots=True)
class RuleImpact:
    events: int = 0
    throttled: int = 0
    blocked: int = 0
    keys: set[str] = field(default_factory=set)
    throttled_keys: set[str] = field(default_factory=set)
    blocked_keys: set[str] = field(default_factory=set)
    saved_usd: float = 0.0

    def add(self, verdict: str, key_id: str, cost_usd: float = 0.0) -> None:
        self.events += 1
        self.saved_usd += cost_usd
        self.keys.add(key_id)
        if verdict == "throttle":
            self.throttled += 1
            self.throttled_keys.add(key_id)
        else:
            self.blocked += 1
            self.blocked_keys.add(key_id)

    def as_dict(self) -> dict[str, int]:
        return {"events": self.events, "keys": len(self.keys), "throttled": self.throttled,
                "blocked": self.blocked, "throttled_keys": len(self.throttled_keys),
                "blocked_keys": len(self.blocked_keys),
                "saved_usd": round(self.saved_usd, 6)}


@dataclass(slots=True)
class ImpactReport:
    events: int = 0
    errors: int = 0
    keys: set[str] = field(default_factory=set)
    total: RuleImpact = field(default_factory=RuleImpact)
    by_rule: dict[str, RuleImpact] = field(default_factory=dict)
    shadow_only: int = 0
    """Events whose throttle/block was not enforced (dry-run, monitor, allow-list)."""
    spent_usd: float = 0.0
    """Estimated cost of every event in the file."""
    unpriced: int = 0
    """Decision lines without a cost (written before keywatch priced events)."""

    def as_dict(self) -> dict[str, Any]:
        return {"events": self.events, "unreadable_lines": self.errors,
                "keys": len(self.keys), "affected": self.total.as_dict(),
                "not_enforced": self.shadow_only,
                "spent_usd": round(self.spent_usd, 6),
                "saved_usd": round(self.total.saved_usd, 6), "unpriced": self.unpriced,
                "by_rule": {code: r.as_dict() for code, r in sorted(
                    self.by_rule.items(), key=lambda kv: -kv[1].events)}}

    def text(self) -> str:
        t = self.total
        lines = [
            f"{self.events} events from {len(self.keys)} keys: "
            f"{t.throttled} events / {len(t.throttled_keys)} keys would be throttled, "
            f"{t.blocked} events / {len(t.blocked_keys)} keys would be blocked "
            f"({self.shadow_only} of these not enforced: dry-run, monitor or allow-list)",
            f"money: ${self.spent_usd:,.2f} spent in all; ${t.saved_usd:,.2f} of it by the "
            f"events that would have been throttled or blocked (would have been saved)"
            + (f"; {self.unpriced} decision lines carry no cost" if self.unpriced else ""),
        ]
        if self.by_rule:
            lines.append(f"{'rule':32} {'events':>8} {'keys':>6} {'throttle':>9} "
                         f"{'block':>7} {'blocked keys':>13} {'saved $':>12}")
            for code, r in sorted(self.by_rule.items(), key=lambda kv: -kv[1].events):
                lines.append(f"{code:32} {r.events:8d} {len(r.keys):6d} {r.throttled:9d} "
                             f"{r.blocked:7d} {len(r.blocked_keys):13d} "
                             f"{r.saved_usd:12,.2f}")
        return "\n".join(lines)


def _drivers(outcome: dict[str, Any], reasons: list[dict[str, Any]]) -> list[str]:
    drivers = outcome.get("drivers") or []
    if drivers:
        return list(drivers)
    # older decision lines: the strongest reasons
    ranked = [r for r in reasons if r.get("severity") in ("high", "critical")]
    if not ranked:
        return ["(unattributed)"]
    top = max(severity_rank(r["severity"]) for r in ranked)
    return [r["code"] for r in ranked if severity_rank(r["severity"]) == top]


def impact_of(decisions: Iterable[dict[str, Any]]) -> ImpactReport:
    report = ImpactReport()
    for d in decisions:
        if "error" in d or "key_id" not in d:
            report.errors += 1
            continue
        report.events += 1
        key_id = d["key_id"]
        report.keys.add(key_id)
        money = d.get("money")
        cost = float(money.get("cost_usd") or 0.0) if isinstance(money, dict) else 0.0
        if not isinstance(money, dict):
            report.unpriced += 1
        report.spent_usd += cost
        would = d.get("would")
        outcome = would if would else d
        verdict = outcome.get("decision")
        if verdict not in ("throttle", "block"):
            continue
        if would is not None:
            report.shadow_only += 1
        report.total.add(verdict, key_id, cost)
        for code in _drivers(outcome, d.get("reasons", [])):
            report.by_rule.setdefault(code, RuleImpact()).add(verdict, key_id, cost)
    return report


def read_decisions(path: Path) -> Iterable[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                yield {"error": "not JSON"}
                continue
            yield obj if isinstance(obj, dict) else {"error": "not an object"}


def impact_report(path: Path) -> ImpactReport:
    return impact_of(read_decisions(path))
