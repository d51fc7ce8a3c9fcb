"""Rule types: the few kinds of detection that live in code; their instances are data.

As in CrowdSec scenarios, a policy file lists rule *instances* (`id`, `type`, `params`,
`scope`, `severity`, `mode`, `message`); each *type* here validates its own params
strictly and knows how to evaluate itself against one feature vector. Nothing in a policy
file is ever `eval`-ed: a message is a `str.format` template whose fields are checked
against what the rule type can fill in.

A rule whose feature is missing from the vector stays silent. Features arrive in stages
(geo, inter-arrival, population context), and a policy written for the full set must
not crash, nor fire on a default 0.0, on a build that lacks some of them.
"""

from __future__ import annotations

import math
import string
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from features.catalogue import CATALOGUE, FEATURE_NAMES
from features.extractor import FeatureVector
from features.keys import looks_like_key_id
from models.signals import ModelSignals
from serving.engine.decision import Reason

Scope = Literal["key", "ip"]
Evidence = Literal["identity", "attack", "volume", "budget"]
"""What a finding is evidence of. Corroboration needs two different kinds.

- identity: someone other than the owner is using the key (a network, country, client
  library or hour its normal traffic never used; impossible travel; key sharing);
- attack: an attack pattern (credential stuffing, probing, a banned address);
- volume: how much (rate, spend, size, bursts, and the models, which see the same
  volume). Volume alone throttles and alerts; it never bans.
- budget: an operator's spending limit (`type: budget`); at a hard `block` limit the
  call is refused until the period resets (the budget's own response, never a ban).
"""
EVIDENCE_KINDS: tuple[str, ...] = ("identity", "attack", "volume", "budget")
Mode = Literal["active", "monitor", "off"]
RuleSeverity = Literal["low", "medium", "high", "critical"]
Code = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{1,63}$")]

# ---- the feature names rules may refer to: the catalogue's -----------------------------------
_AGG = {"requests": "requests_count", "tokens": "tokens_sum", "errors": "errors_count",
        "auth_fails": "auth_fail_count"}


def _windowed(entity: str) -> dict[str, tuple[str, ...]]:
    """The windows of each counter a rate rule may name, for one entity, as declared."""
    table: dict[str, tuple[str, ...]] = {}
    for f in CATALOGUE:
        if f.windowed and f.entity == entity and f.field in _AGG and f.window is not None:
            table[f.field] = (*table.get(f.field, ()), f.window.label)
    return table


WINDOWED = {"key": _windowed("key"), "ip": _windowed("ip")}


def windowed_feature(metric: str, scope: str, window: str) -> str:
    return f"{_AGG[metric]}_by_{scope}_{window}"


KNOWN_FEATURES: frozenset[str] = frozenset(FEATURE_NAMES)
"""Every feature a policy may name: the catalogue's (`features.catalogue`). A typo in a
policy file is caught by `policy check` instead of silently never firing."""

CONTEXT_FIELDS = ("key_id", "source_ip", "country", "country_name", "prev_country",
                  "prev_country_name", "trusted_country", "trusted_country_name", "asn")
"""Event context any message template may use (empty when unknown)."""

WINDOW_TEXT = {"1m": "minute", "5m": "5 minutes", "1h": "hour", "24h": "24 hours"}


# ---- what a rule sees -----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class BanView:
    """An entity's ban as rules see it."""

    active: bool
    until: str | None = None
    permanent: bool = False
    by: str | None = None
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class BudgetView:
    """A budget's counter after this event's check-and-increment (see serving.engine.budgets)."""

    status: int
    """1: the event fitted and was counted; 0: it would exceed the budget (refused);
    -1: it belongs to a period already closed (late event, not counted)."""
    spent_usd: float
    over_usd: float
    limit_usd: float
    cost_usd: float
    period: str
    resets_at: str
    resets_in_s: float


@dataclass(slots=True)
class RuleInput:
    fv: FeatureVector
    signals: ModelSignals = field(default_factory=ModelSignals)
    bans: dict[str, BanView] = field(default_factory=dict)
    budgets: dict[str, BudgetView] = field(default_factory=dict)
    """By budget rule id: only the budgets that apply to this event's key."""


@dataclass(slots=True)
class Finding:
    """A rule that fired: the reason, plus what fusion needs to judge corroboration."""

    reason: Reason
    rule_id: str
    group: str
    scope: str
    kind: Literal["rule", "model", "ban"]
    features: tuple[str, ...] = ()
    evidence: str = "volume"
    """The evidence kind (`Evidence`): what corroboration and the ban scope look at."""

    @property
    def mode(self) -> str:
        return self.reason.mode


def _num(fv: FeatureVector, name: str) -> float | None:
    """The feature's value, or None when the vector lacks it (or it is not a number)."""
    value = fv.values.get(name)
    if value is None:
        return None
    if type(value) is float:  # the usual case, without the conversions below
        return value if value == value else None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if not math.isnan(value) else None


class _SafeFormat(dict):  # type: ignore[type-arg]
    def __missing__(self, key: str) -> str:
        return ""


# ---- the rule types ----------------------------------------------------------------------
class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RuleBase(BaseModel):
    """Fields every rule instance has, whatever its type."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: Code
    """Stable code; appears in decisions, alerts and the impact report."""
    type: str
    scope: Scope = "key"
    """The entity the rule judges and a ban lands on (a stuffing address is banned as IP)."""
    severity: RuleSeverity
    mode: Mode = "active"
    group: Code | None = None
    """Rules in one group share their evidence (e.g. every volume rule) and count as one
    signal when fusion looks for corroboration; defaults to the id."""
    message: str | None = None
    description: str | None = None
    evidence: Evidence | None = None
    """The kind of evidence a finding of this rule is (identity, attack or volume);
    defaults to the rule type's (`default_evidence`). Declared once per rule, here, so
    fusion and responses never guess it from a rule's name."""

    kind: ClassVar[Literal["rule", "model", "ban"]] = "rule"
    default_evidence: ClassVar[str] = "volume"
    default_message: ClassVar[str] = "{value}"

    @field_validator("mode", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare `off` / `on` as a boolean; say what the writer meant
        if value is False:
            return "off"
        if value is True:
            return "active"
        return value

    # -- subclasses implement ---------------------------------------------------------------
    def check(self, inp: RuleInput) -> dict[str, Any] | None:
        """Evidence (at least `value`) when the rule fires, else None."""
        raise NotImplementedError

    def template_fields(self) -> dict[str, Any]:
        """Names a message may use, with a sample value of the right type."""
        return {"value": 1.5}

    def features(self) -> tuple[str, ...]:
        return ()

    def problems(self) -> list[tuple[tuple[str | int, ...], str]]:
        """Checks that need more than one field: (path inside the rule, message)."""
        out: list[tuple[tuple[str | int, ...], str]] = []
        for name in self.features():
            if name not in KNOWN_FEATURES:
                out.append((("params",), f"unknown feature {name!r}"))
        out.extend(self._template_problems())
        return out

    # -- shared -------------------------------------------------------------------------------
    @property
    def group_name(self) -> str:
        return self.group or self.id

    @property
    def evidence_kind(self) -> str:
        """The declared kind, else the rule type's default."""
        return self.evidence or self.default_evidence

    @property
    def template(self) -> str:
        return self.message or self.default_message

    def _template_problems(self) -> list[tuple[tuple[str | int, ...], str]]:
        allowed = {**{f: "XX" for f in CONTEXT_FIELDS}, **self.template_fields()}
        try:
            names = [f for _, f, _, _ in string.Formatter().parse(self.template) if f]
        except ValueError as exc:
            return [(("message",), f"bad message template: {exc}")]
        for name in names:
            base = name.split(".", 1)[0].split("[", 1)[0]
            if base not in allowed or base != name:
                return [(("message",), f"message field {{{name}}} is not one of: "
                                       f"{', '.join(sorted(allowed))}")]
        try:
            self.template.format_map(allowed)
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            return [(("message",), f"message template does not format: {exc}")]
        return []

    def evaluate(self, inp: RuleInput) -> Finding | None:
        if self.mode == "off":
            return None
        evidence = self.check(inp)
        if evidence is None:
            return None
        ctx = inp.fv.context
        fields = _SafeFormat({f: ctx.get(f) or "" for f in CONTEXT_FIELDS})
        fields.update(evidence)
        try:
            message = self.template.format_map(fields)
        except (ValueError, TypeError, KeyError, IndexError):
            message = f"{self.id}: {evidence.get('value')}"
        return Finding(
            reason=Reason(
                code=self.id,
                severity=self.severity,
                message=message,
                evidence={k: _round(v) for k, v in evidence.items()},
                mode="monitor" if self.mode == "monitor" else "active",
                scope=self.scope,
                evidence_kind=self.evidence_kind,  # type: ignore[arg-type]
            ),
            rule_id=self.id,
            group=self.group_name,
            scope=self.scope,
            kind=self.kind,
            features=self.features(),
            evidence=self.evidence_kind,
        )


def _round(value: Any) -> Any:
    return round(value, 4) if isinstance(value, float) else value


def _conditions(fv: FeatureVector, lo: dict[str, float], hi: dict[str, float],
                key_warm: bool | None) -> dict[str, float] | None:
    """Values of the condition features when all conditions hold, else None."""
    if key_warm is not None and bool(fv.context.get("key_warm")) != key_warm:
        return None
    seen: dict[str, float] = {}
    for table, ok in ((lo, lambda v, t: v >= t), (hi, lambda v, t: v <= t)):
        for name, bound in table.items():
            value = _num(fv, name)
            if value is None or not ok(value, bound):
                return None
            seen[name] = value
    return seen


class RateLimitParams(Params):
    metric: Literal["requests", "tokens", "errors", "auth_fails"] = "requests"
    window: Literal["1m", "5m", "1h", "24h"]
    limit: float = Field(gt=0)


class RateLimitRule(RuleBase):
    """`metric` over a sliding `window` for the rule's scope above `limit`."""

    type: Literal["rate_limit"]
    params: RateLimitParams
    default_message: ClassVar[str] = (
        "{value:,.0f} {metric} in the last {window_text} (limit {limit:,.0f})")

    @property
    def feature(self) -> str:
        return windowed_feature(self.params.metric, self.scope, self.params.window)

    def features(self) -> tuple[str, ...]:
        return (self.feature,)

    def problems(self) -> list[tuple[tuple[str | int, ...], str]]:
        windows = WINDOWED[self.scope][self.params.metric]
        if self.params.window not in windows:
            return [(("params", "window"), f"{self.params.metric} by {self.scope} is kept for "
                                           f"windows {', '.join(windows)} only")]
        return self._template_problems()

    def template_fields(self) -> dict[str, Any]:
        return {"value": 1.0, "limit": 1.0, "metric": "x", "window": "1m",
                "window_text": "minute", "feature": "x"}

    def check(self, inp: RuleInput) -> dict[str, Any] | None:
        value = _num(inp.fv, self.feature)
        if value is None or value <= self.params.limit:
            return None
        metric = self.params.metric.replace("_", " ")
        return {"value": value, "limit": self.params.limit, "metric": metric,
                "window": self.params.window, "window_text": WINDOW_TEXT[self.params.window],
                "feature": self.feature}


class ThresholdParams(Params):
    feature: str
    above: float | None = None
    below: float | None = None
    min: dict[str, float] = Field(default_factory=dict)
    """Other features that must be at least these values (e.g. a minimum volume)."""
    max: dict[str, float] = Field(default_factory=dict)
    """Other features that must be at most these values."""
    key_warm: bool | None = None
    """True: only for keys with a learned baseline; False: only for cold keys."""


class ThresholdRule(RuleBase):
    """A feature above (or below) a threshold, when the side conditions hold."""

    type: Literal["threshold"]
    params: ThresholdParams
    default_message: ClassVar[str] = "{feature} = {value:.4g} (threshold {threshold:.4g})"

    def features(self) -> tuple[str, ...]:
        p = self.params
        return (p.feature, *p.min, *p.max)

    def problems(self) -> list[tuple[tuple[str | int, ...], str]]:
        out = super().problems()
        if (self.params.above is None) == (self.params.below is None):
            out.append((("params",), "give exactly one of 'above' or 'below'"))
        return out

    def template_fields(self) -> dict[str, Any]:
        return {"value": 1.5, "threshold": 1.5, "feature": "x",
                **{f: 1.5 for f in self.features()}}

    def check(self, inp: RuleInput) -> dict[str, Any] | None:
        p = self.params
        value = _num(inp.fv, p.feature)
        if value is None:
            return None
        if p.above is not None and not value > p.above:
            return None
        if p.below is not None and not value < p.below:
            return None
        cond = _conditions(inp.fv, p.min, p.max, p.key_warm)
        if cond is None:
            return None
        threshold = p.above if p.above is not None else p.below
        return {"value": value, "threshold": threshold, "feature": p.feature,
                p.feature: value, **cond}


class DistinctCountParams(Params):
    feature: str = Field(pattern=r"^distinct_")
    limit: int = Field(ge=1)
    min: dict[str, float] = Field(default_factory=dict)
    max: dict[str, float] = Field(default_factory=dict)
    key_warm: bool | None = None


class DistinctCountRule(RuleBase):
    """More distinct things (IPs, keys, countries, ASNs, models) than `limit` in a window."""

    type: Literal["distinct_count"]
    params: DistinctCountParams
    default_evidence: ClassVar[str] = "identity"
    default_message: ClassVar[str] = "{value:.0f} distinct values of {feature} (limit {limit})"

    def features(self) -> tuple[str, ...]:
        p = self.params
        return (p.feature, *p.min, *p.max)

    def template_fields(self) -> dict[str, Any]:
        return {"value": 1.0, "limit": 1, "feature": "x", **{f: 1.5 for f in self.features()}}

    def check(self, inp: RuleInput) -> dict[str, Any] | None:
        p = self.params
        value = _num(inp.fv, p.feature)
        if value is None or value <= p.limit:
            return None
        cond = _conditions(inp.fv, p.min, p.max, p.key_warm)
        if cond is None:
            return None
        return {"value": value, "limit": p.limit, "feature": p.feature, p.feature: value,
                **cond}


class TravelSpeedParams(Params):
    max_speed_kmh: float = Field(default=1000.0, ge=300.0)
    """Above an airliner's ~900 km/h with slack; below 300 every train trip would fire."""
    min_distance_km: float = Field(default=500.0, ge=0.0)
    """Geolocation of nearby cities is noisy: short hops are never impossible travel."""
    require_new_country: bool = True
    """Fire only when the destination is new for the key, so a multi-region deployment
    alternating between known places is not flagged on every event."""
    key_warm: bool | None = None
    """True: only keys with a learned pattern (a leaked key is one somebody used)."""
    min: dict[str, float] = Field(default_factory=dict)
    """Other features that must be at least these values."""
    max: dict[str, float] = Field(default_factory=dict)
    """Other features that must be at most these values (e.g. no known identity: a
    service moving region keeps its network and client library)."""


class TravelSpeedRule(RuleBase):
    """Impossible travel: from the key's previous location faster than anything flies."""

    type: Literal["travel_speed"]
    params: TravelSpeedParams
    default_evidence: ClassVar[str] = "identity"
    default_message: ClassVar[str] = (
        "{origin} → {destination} ({km:,.0f} km) in {minutes:.0f} min "
        "({speed_kmh:,.0f} km/h)")
    FEATURES: ClassVar[tuple[str, ...]] = (
        "geo_speed_kmh_by_key", "geo_distance_km_by_key", "geo_elapsed_s_by_key")

    def features(self) -> tuple[str, ...]:
        p = self.params
        own = (*self.FEATURES, "new_country_by_key") if p.require_new_country \
            else self.FEATURES
        return (*own, *p.min, *p.max)

    def template_fields(self) -> dict[str, Any]:
        return {"value": 1.0, "km": 1.0, "minutes": 1.0, "speed_kmh": 1.0, "origin": "x",
                "destination": "x", "max_speed_kmh": 1.0, "min_distance_km": 1.0,
                **{f: 1.5 for f in (*self.params.min, *self.params.max)}}

    def check(self, inp: RuleInput) -> dict[str, Any] | None:
        fv, p = inp.fv, self.params
        km = _num(fv, "geo_distance_km_by_key")
        elapsed = _num(fv, "geo_elapsed_s_by_key")
        speed = _num(fv, "geo_speed_kmh_by_key")
        if km is None or elapsed is None or km <= p.min_distance_km:
            return None
        if speed is None or math.isinf(speed):
            speed = km / max(elapsed, 1.0) * 3600.0
        if speed <= p.max_speed_kmh:
            return None
        cond = _conditions(fv, p.min, p.max, p.key_warm)
        if cond is None:
            return None
        if p.require_new_country:
            new = _num(fv, "new_country_by_key")
            if new is None or new < 1:
                return None
        ctx = fv.context
        origin = ctx.get("prev_country_name") or ctx.get("prev_country") or "unknown"
        destination = ctx.get("country_name") or ctx.get("country") or "unknown"
        return {"value": speed, "km": km, "minutes": elapsed / 60.0, "speed_kmh": speed,
                "origin": origin, "destination": destination,
                "max_speed_kmh": p.max_speed_kmh, "min_distance_km": p.min_distance_km,
                **cond}


class ModelScoreParams(Params):
    signal: Literal["population", "offline", "key_baseline"]
    above: float = Field(gt=0.0, lt=1.0)


class ModelScoreRule(RuleBase):
    """A calibrated model score above a threshold. Never bans alone: severity ≤ high."""

    type: Literal["model_score"]
    params: ModelScoreParams
    severity: Literal["low", "medium", "high"]  # type: ignore[assignment]
    kind: ClassVar[Literal["rule", "model", "ban"]] = "model"
    default_message: ClassVar[str] = (
        "{signal} model score {value:.4f} (above {threshold}); top features: {top_features}")

    def template_fields(self) -> dict[str, Any]:
        return {"value": 0.5, "threshold": 0.5, "signal": "x", "top_features": "x"}

    def check(self, inp: RuleInput) -> dict[str, Any] | None:
        value = getattr(inp.signals, self.params.signal)
        if value is None or value <= self.params.above:
            return None
        return {"value": float(value), "threshold": self.params.above,
                "signal": self.params.signal,
                "top_features": describe_top_features(inp.signals.top())}


class BannedParams(Params):
    pass


class BannedRule(RuleBase):
    """The key (scope key) or source address (scope ip) is under a ban."""

    type: Literal["banned"]
    params: BannedParams = Field(default_factory=BannedParams)
    kind: ClassVar[Literal["rule", "model", "ban"]] = "ban"
    default_evidence: ClassVar[str] = "attack"
    default_message: ClassVar[str] = "{subject} is banned until {until}{why}"

    def template_fields(self) -> dict[str, Any]:
        return {"value": 1, "subject": "key", "until": "x", "why": "", "by": "x",
                "reason": "x"}

    def check(self, inp: RuleInput) -> dict[str, Any] | None:
        ban = inp.bans.get(self.scope)
        if ban is None or not ban.active:
            return None
        until = "further notice (permanent)" if ban.permanent else ban.until
        return {"value": 1, "subject": "key" if self.scope == "key" else "address",
                "until": until, "by": ban.by or "keywatch", "reason": ban.reason or "",
                "why": f" ({ban.reason})" if ban.reason else ""}


class BudgetParams(Params):
    amount_usd: float = Field(gt=0.0, le=1e9)
    """The budget in US dollars per period."""
    period: Literal["day", "week", "month"] = "month"
    """Resets at the period boundary in UTC (weeks start on Monday)."""
    keys: tuple[str, ...] = ()
    """Key ids (k_...) the budget applies to; empty: every key, each with its own budget."""
    shared: bool = False
    """True: the listed keys share one budget (a team, a project)."""
    soft_share: float | None = Field(default=0.8, gt=0.0, lt=1.0)
    """Alert once this share of the budget is spent (None: no soft alert)."""
    soft_severity: Literal["low", "medium", "high"] = "medium"
    hard: Literal["throttle", "block", "alert"] = "throttle"
    """At the budget: throttle the key, block it until the period resets, or only alert."""


HARD_SEVERITY = {"throttle": "high", "block": "critical", "alert": "medium"}


class BudgetRule(RuleBase):
    """A spend budget per key or group of keys, checked exactly in the shared store.

    The store adds the event's cost to the period's counter only if the total stays
    within the budget (one atomic op, so replicas sharing a Redis agree to the cent);
    an event that would take the total over is the hard finding, and is not counted.
    Once `soft_share` of the budget is spent, events raise the soft finding.
    """

    type: Literal["budget"]
    params: BudgetParams
    default_evidence: ClassVar[str] = "budget"
    severity: RuleSeverity = "high"
    """Severity at the hard limit; by default from `hard` (throttle → high, block →
    critical, alert → medium), so the tiers do what `hard` says."""
    group: str | None = "spend"
    default_message: ClassVar[str] = (
        "{share:.0%} of the ${amount_usd:,.2f} {period} budget spent (${value:,.2f}); "
        "resets {resets_at}")
    hard_message: ClassVar[str] = (
        "{period} budget of ${amount_usd:,.2f} reached: ${value:,.2f} spent, this call "
        "(${cost_usd:,.4f}) would exceed it; {hard} until {resets_at}")

    @model_validator(mode="before")
    @classmethod
    def _severity_from_hard(cls, data: Any) -> Any:
        if isinstance(data, dict) and "severity" not in data:
            params = data.get("params")
            hard = params.get("hard", "throttle") if isinstance(params, dict) else "throttle"
            data = {**data, "severity": HARD_SEVERITY.get(hard, "high")}
        return data

    def applies_to(self, key_id: str) -> bool:
        return not self.params.keys or key_id in self.params.keys

    def problems(self) -> list[tuple[tuple[str | int, ...], str]]:
        out: list[tuple[tuple[str | int, ...], str]] = []
        p = self.params
        for i, key in enumerate(p.keys):
            if not looks_like_key_id(key):
                out.append((("params", "keys", i), "budgets name keys by key id (k_ and 32 "
                                                   "hex characters), never by raw key"))
        if p.shared and not p.keys:
            out.append((("params", "shared"), "a shared budget needs the list of its keys"))
        if self.scope != "key":
            out.append((("scope",), "budgets are per key (or a shared group of keys)"))
        out.extend(self._template_problems())
        return out

    def template_fields(self) -> dict[str, Any]:
        return {"value": 1.0, "amount_usd": 1.0, "share": 0.5, "period": "month",
                "resets_at": "x", "cost_usd": 0.1, "over_usd": 1.0, "hard": "throttled",
                "remaining_usd": 1.0}

    def check(self, inp: RuleInput) -> dict[str, Any] | None:
        view = inp.budgets.get(self.id)
        if view is None or view.status < 0:
            return None
        p = self.params
        share = view.spent_usd / view.limit_usd if view.limit_usd > 0 else 0.0
        hard = view.status == 0
        if not hard and (p.soft_share is None or share < p.soft_share):
            return None
        return {"value": view.spent_usd, "amount_usd": p.amount_usd, "share": share,
                "period": p.period, "resets_at": view.resets_at, "cost_usd": view.cost_usd,
                "over_usd": view.over_usd, "remaining_usd": max(view.limit_usd
                                                                - view.spent_usd, 0.0),
                "hard": {"throttle": "throttled", "block": "blocked",
                         "alert": "alerting"}[p.hard],
                "limit": "hard" if hard else "soft", "resets_in_s": view.resets_in_s}

    def evaluate(self, inp: RuleInput) -> Finding | None:
        finding = super().evaluate(inp)
        if finding is None:
            return None
        if finding.reason.evidence.get("limit") == "soft":
            finding.reason = finding.reason.model_copy(
                update={"severity": self.params.soft_severity})
        elif self.message is None:  # the hard finding's own sentence
            ev = finding.reason.evidence
            finding.reason = finding.reason.model_copy(
                update={"message": self.hard_message.format_map(_SafeFormat(ev))})
        return finding


AnyRule = Annotated[
    RateLimitRule | ThresholdRule | DistinctCountRule | TravelSpeedRule | ModelScoreRule
    | BannedRule | BudgetRule,
    Field(discriminator="type"),
]
RULE_TYPES = ("rate_limit", "threshold", "distinct_count", "travel_speed", "model_score",
              "banned", "budget")


def describe_top_features(top: list[tuple[str, float]], n: int = 3) -> str:
    if not top:
        return "(none reported)"
    return ", ".join(f"{name} ({dev:+.1f})" for name, dev in top[:n])


def evaluate_rules(rules: tuple[RuleBase, ...] | list[RuleBase], inp: RuleInput) -> list[Finding]:
    """Every finding, strongest first (policy order within a severity)."""
    from serving.engine.decision import severity_rank

    found = [f for f in (rule.evaluate(inp) for rule in rules) if f is not None]
    found.sort(key=lambda f: -severity_rank(f.reason.severity))
    return found
