"""Fusion: rules set a floor on severity, calibrated model scores raise it.

Principles, in the order they are applied:

1. The floor is the strongest rule finding.
2. Models raise it: one calibrated model at or above `model_corroborate` (0.99) → low;
   the offline percentile at or above `model_alert` (0.999) → medium; two models (e.g.
   population and offline) both high → high. A model alone never reaches critical, so a
   model alone never bans — an Isolation Forest does not know about flash sales.
3. Corroboration escalates, between different KINDS of evidence (each rule declares
   one: identity, attack or volume; the models see volume): a burst that crosses three
   rate limits, overspends and trips the models is one piece of evidence. Two kinds at
   high or above → critical; two at medium or above → at least high.
4. A surge the whole population shares (the population's rate against its hour-of-week
   norm is high and this key is within a few times of it) is not escalated by models,
   and models do not corroborate: everybody is busy, not this key.

A block needs critical, which only a critical identity or attack finding, or two kinds
of evidence at high (one of which is then not volume), can produce (`can_block`):
volume alone throttles, never bans. The score is calibrated: each tier owns a band of
[0, 1] and the event sits in it at the strongest model's percentile among normal
traffic (see `_score`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from features.extractor import FeatureVector
from models.signals import ModelSignals
from serving.engine.decision import Reason, max_severity, severity_rank
from serving.policy.rules import Finding, describe_top_features
from serving.policy.schema import FusionConfig

SEVERITY_SCORE = {"none": 0.0, "low": 0.3, "medium": 0.55, "high": 0.8, "critical": 0.95}
BAND_TOP = {"none": 0.3, "low": 0.55, "medium": 0.8, "high": 0.95, "critical": 1.0}
BLOCKING_EVIDENCE = frozenset({"identity", "attack", "budget"})
"""Evidence kinds that may block on their own (at critical) or corroborate volume; a
budget's block is its own refusal until the period resets, never a ban."""
MODEL_NAMES = ("population", "offline", "key_baseline")


@dataclass(slots=True)
class Fusion:
    severity: str
    score: float
    can_block: bool
    drivers: list[str] = field(default_factory=list)
    """Codes of the findings behind the severity (what the impact report attributes to)."""
    model_reason: Reason | None = None
    shared_surge: bool = False
    evidence: list[str] = field(default_factory=list)
    """The kinds of evidence behind the severity (identity, attack, volume)."""


def model_strength(p: float | None) -> float:
    """A calibrated percentile as strength in [0, 1]: 0.9 → 0, 0.99 → 1/3, 0.999 → 2/3."""
    if p is None:
        return 0.0
    tail = max(1.0 - float(p), 1e-6)
    return min(max((-math.log10(tail) - 1.0) / 3.0, 0.0), 1.0)


def shared_surge(fv: FeatureVector, cfg: FusionConfig) -> bool:
    """True when the whole population is surging and this key is riding the same wave."""
    pop = fv.values.get("population_rate_vs_hour_of_week_1h")
    key_vs_pop = fv.values.get("key_rate_vs_population_1h")
    if pop is None or key_vs_pop is None:
        return False
    return pop >= cfg.population_surge and key_vs_pop < cfg.key_vs_population


def fuse(findings: list[Finding], signals: ModelSignals, fv: FeatureVector,
         cfg: FusionConfig | None = None) -> Fusion:
    """Fuse rule findings (already filtered to the ones that count) with model signals."""
    cfg = cfg or FusionConfig()
    scores = {n: getattr(signals, n) for n in MODEL_NAMES if getattr(signals, n) is not None}
    high = [n for n, v in scores.items() if v >= cfg.model_corroborate]
    surge = shared_surge(fv, cfg)

    # 2. the tier models alone reach (never critical)
    model_tier = "none"
    if high:
        model_tier = "low"
    if (scores.get("offline") or 0.0) >= cfg.model_alert:
        model_tier = "medium"
    if len(high) >= 2 and ("population" in high or "offline" in high):
        model_tier = "high"
    if severity_rank(model_tier) > severity_rank(cfg.models_alone_max):
        model_tier = cfg.models_alone_max
    if surge and model_tier != "none":
        model_tier = "low"

    if not findings and model_tier == "none":  # most events: nothing to corroborate
        return Fusion(severity="none", score=_score("none", "none", scores, surge),
                      can_block=False, shared_surge=surge)

    # 3. corroboration between independent KINDS of evidence (identity, attack, volume):
    # a burst that crosses three rate limits, overspends and trips the models is one
    # piece of evidence, volume, however many rules see it
    rule_findings = [f for f in findings if f.kind != "model"]
    floor = max_severity(*(f.reason.severity for f in findings))
    kinds: dict[str, str] = {}
    for f in rule_findings:
        kinds[f.evidence] = max_severity(kinds.get(f.evidence, "none"), f.reason.severity)
    # model_score rules and the fused models are one signal: "the models", which see volume
    model_level = max_severity(model_tier,
                               *(f.reason.severity for f in findings if f.kind == "model"))
    rule_features = {name for f in rule_findings for name in f.features}
    # the explanation is computed on demand: only when a model score is high
    top = [name for name, _ in signals.top()[:3]] if high else []
    independent_model = bool(high) and not surge and not (
        top and rule_features and set(top) <= rule_features)
    if independent_model and rule_findings:
        kinds["volume"] = max_severity(kinds.get("volume", "none"),
                                       max_severity(model_level, "high"))
    levels = list(kinds.values())
    n_high = sum(1 for lv in levels if severity_rank(lv) >= severity_rank("high"))
    n_medium = sum(1 for lv in levels if severity_rank(lv) >= severity_rank("medium"))

    severity = max_severity(floor, model_tier)
    escalated = False
    if n_high >= 2:
        escalated = severity != "critical"
        severity = "critical"
    elif n_medium >= 2 and severity_rank(severity) < severity_rank("high"):
        severity, escalated = "high", True

    # a block needs evidence that someone else is using the key, or an attack: a critical
    # identity or attack finding, or two kinds at high (one of which is then not volume)
    can_block = severity == "critical" and (
        any(f.reason.severity == "critical" and f.kind != "model"
            and f.evidence in BLOCKING_EVIDENCE for f in findings)
        or n_high >= 2)
    if severity == "critical" and not can_block:  # volume alone throttles, never bans
        severity = "high"

    # drivers and the explanation of the model part
    if escalated:
        drivers = [f.reason.code for f in rule_findings
                   if severity_rank(f.reason.severity) >= severity_rank("medium")]
    else:
        drivers = [f.reason.code for f in findings if f.reason.severity == severity]
    model_reason = None
    if model_tier != "none":
        model_reason = _model_reason(scores, high, model_tier, signals, surge)
        if model_tier == severity or (escalated and independent_model):
            drivers.append(model_reason.code)

    by_code = {f.reason.code: f.evidence for f in findings}
    evidence = sorted({by_code.get(code, "volume") for code in drivers})
    return Fusion(severity=severity, score=_score(floor, severity, scores, surge),
                  can_block=can_block,
                  drivers=list(dict.fromkeys(drivers)), model_reason=model_reason,
                  shared_surge=surge, evidence=evidence)


def _score(floor: str, severity: str, scores: dict[str, float], surge: bool) -> float:
    """A calibrated anomaly score in [0, 1], with the same meaning on every key.

    Each tier owns a band ([0, 0.3) none, [0.3, 0.55) low, [0.55, 0.8) medium,
    [0.8, 0.95) high, [0.95, 1] critical); within its band the event sits at the
    strongest model's percentile among normal traffic (the per-key detector's
    percentile among the key's own normal points, the population and offline models'
    among everybody's). So the score moves with the models' view even when no rule
    fires, ranks events across keys, and never contradicts the tier. Models count half
    in a shared surge (everybody is busy, not this key)."""
    p = max(scores.values(), default=0.0)
    if surge:
        p *= 0.5
    p = min(max(float(p), 0.0), 1.0)
    tier = severity if severity_rank(severity) >= severity_rank(floor) else floor
    lo, hi = SEVERITY_SCORE[tier], BAND_TOP[tier]
    return round(min(1.0, lo + (hi - lo) * p * 0.999), 4)


def _model_reason(scores: dict[str, float], high: list[str], tier: str,
                  signals: ModelSignals, surge: bool) -> Reason:
    parts = ", ".join(f"{name} {value:.4f}" for name, value in scores.items())
    top = describe_top_features(signals.top())
    message = f"models flag this event ({parts}); top features: {top}"
    if surge:
        message += "; the whole population is surging, so the models do not escalate"
    if signals.key_drift:
        message += "; the key's behaviour has changed regime"
    return Reason(
        code="model_anomaly",
        severity=tier if tier != "none" else "low",  # type: ignore[arg-type]
        message=message,
        evidence={"scores": {k: round(v, 6) for k, v in scores.items()},
                  "high": high, "shared_surge": surge, "key_drift": signals.key_drift,
                  "top_features": [[n, round(d, 3)] for n, d in signals.top()[:5]]},
    )
