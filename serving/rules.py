"""Rules: thresholds on features that produce explained reasons.

A rule looks at one feature vector and either stays silent or returns a `Reason` with a
stable code, a severity, a sentence and the evidence numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from features.extractor import FeatureVector
from serving.decision import Reason


@dataclass(frozen=True, slots=True)
class ThresholdRule:
    """Fires when a feature exceeds a threshold (optionally only above a minimum volume)."""

    code: str
    feature: str
    threshold: float
    severity: str
    message: str
    min_feature: str | None = None
    min_value: float = 0.0

    def evaluate(self, fv: FeatureVector) -> Reason | None:
        value = fv.get(self.feature)
        if value <= self.threshold:
            return None
        if self.min_feature is not None and fv.get(self.min_feature) < self.min_value:
            return None
        return Reason(
            code=self.code,
            severity=self.severity,  # type: ignore[arg-type]
            message=self.message.format(value=value, threshold=self.threshold),
            evidence={self.feature: round(value, 4), "threshold": self.threshold},
        )


RuleFn = Callable[[FeatureVector], Reason | None]

FOUNDATION_RULES: tuple[ThresholdRule, ...] = (
    ThresholdRule("rate_limit_1m", "requests_count_by_key_1m", 600, "high",
                  "{value:.0f} requests in the last minute (limit {threshold:.0f})"),
    ThresholdRule("rate_limit_1m_hard", "requests_count_by_key_1m", 3000, "critical",
                  "{value:.0f} requests in the last minute (hard limit {threshold:.0f})"),
    ThresholdRule("token_limit_1h", "tokens_sum_by_key_1h", 5_000_000, "high",
                  "{value:.0f} tokens in the last hour (limit {threshold:.0f})"),
    ThresholdRule("failure_rate", "failure_ratio_by_key_5m", 0.5, "medium",
                  "{value:.0%} of the last 5 minutes' requests failed",
                  min_feature="requests_count_by_key_5m", min_value=20),
    ThresholdRule("credential_stuffing", "distinct_keys_by_ip_1h", 20, "critical",
                  "{value:.0f} different keys tried from one address in the last hour",
                  min_feature="auth_fail_count_by_ip_5m", min_value=10),
)


def evaluate_rules(rules: tuple[ThresholdRule, ...], fv: FeatureVector) -> list[Reason]:
    reasons = [r for r in (rule.evaluate(fv) for rule in rules) if r is not None]
    # keep only the strongest reason per code family (the hard limit shadows the soft one)
    return reasons
