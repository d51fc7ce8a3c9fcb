"""The decision keywatch returns for an event: what to do, how sure, and why."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

Severity = Literal["none", "low", "medium", "high", "critical"]
SEVERITIES: tuple[str, ...] = ("none", "low", "medium", "high", "critical")
Verdict = Literal["allow", "throttle", "block"]
ActionType = Literal["none", "log", "alert", "throttle", "temp_ban", "perm_ban", "refuse"]


def severity_rank(severity: str) -> int:
    return SEVERITIES.index(severity)


def max_severity(*severities: str) -> str:
    return max(severities, key=severity_rank, default="none")


class Reason(BaseModel):
    """One reason behind a decision: a stable code, how bad, a sentence, the numbers."""

    code: str
    severity: Severity
    message: str
    evidence: dict[str, Any] = Field(default_factory=dict)
    mode: Literal["active", "monitor"] = "active"
    """`monitor`: the rule is in shadow mode; it explains and alerts, never enforces."""
    scope: Literal["key", "ip"] | None = None


class Action(BaseModel):
    """What the gateway should do with this key (or address) now."""

    type: ActionType = "none"
    scope: Literal["key", "ip"] | None = None
    until: str | None = None
    retry_after_s: int | None = None
    """Seconds until the refused call may be tried again (a ban's end, or for a throttle
    when the next call fits under the limit; None while the calls are within it)."""
    limit_per_min: int | None = None
    """For throttle: the calls a minute the key (or address) is limited to, until `until`."""
    burst: int | None = None
    """For throttle: calls allowed back to back within the limit (GCRA burst)."""
    duration_s: int | None = None
    """For throttle: how long the limit lasts once set (renewed while the throttle goes on)."""


class Outcome(BaseModel):
    """What keywatch would have done had nothing been in shadow mode (dry-run, monitor
    rules, allow-list): the same shape as the decision's own verdict and action."""

    decision: Verdict
    severity: Severity
    action: Action = Field(default_factory=Action)
    drivers: list[str] = Field(default_factory=list)
    """Codes of the reasons that produced this outcome."""


class Money(BaseModel):
    """What this key's calls are costing, at list prices (see `features.pricing`)."""

    cost_usd: float = 0.0
    """This event's estimated cost."""
    spend_usd_1h: float = 0.0
    spend_usd_24h: float = 0.0
    spend_usd_30d: float = 0.0
    burn_usd_per_h: float = 0.0
    """The rate the key is spending at now: the larger of the last 5 minutes' spend
    times 12 and the last hour's (a burst minutes old shows its real rate)."""
    unknown_price: bool = False
    """The model is not in the price table: priced at the default price."""
    model: str | None = None
    """The price-table entry used."""


class Decision(BaseModel):
    """The answer to one event; contains the key id, never the raw key."""

    key_id: str
    decision: Verdict
    severity: Severity
    score: float = Field(ge=0.0, le=1.0)
    reasons: list[Reason] = Field(default_factory=list)
    action: Action = Field(default_factory=Action)
    model_versions: dict[str, str | None] = Field(default_factory=dict)
    event_time: str | None = None
    dry_run: bool = False
    drivers: list[str] = Field(default_factory=list)
    """Codes of the reasons behind the severity."""
    would: Outcome | None = None
    """Present when shadow mode changed the outcome: what would have happened."""
    enforced: bool = True
    """False when this decision was not enforced (dry-run, allow-list)."""
    money: Money | None = None
    """The money at stake: this event's cost and the key's spend and burn rate."""
