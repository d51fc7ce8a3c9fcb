"""Money at stake: every flagged decision says what the key has spent and is burning.

The security team's first question about an alert is "how much?". A decision at medium
or above therefore carries the key's spend (last hour, 24 hours) and its burn rate per
hour in the evidence of its alerting reasons, and says it in their messages, so that the
alert, the webhook and the SIEM record all state the money at stake without a lookup.
"""

from __future__ import annotations

from features.extractor import FeatureVector
from serving.engine.decision import Money, Reason, severity_rank

STATED_FROM = severity_rank("medium")


def money_of(fv: FeatureVector) -> Money:
    v = fv.values
    spend_5m = v.get("spend_usd_by_key_5m", 0.0)
    spend_1h = v.get("spend_usd_by_key_1h", 0.0)
    return Money(
        cost_usd=round(v.get("cost_usd_by_event", 0.0), 8),
        spend_usd_1h=round(spend_1h, 6),
        spend_usd_24h=round(v.get("spend_usd_by_key_24h", 0.0), 6),
        spend_usd_30d=round(v.get("spend_usd_by_key_30d", 0.0), 6),
        burn_usd_per_h=round(max(spend_5m * 12.0, spend_1h), 6),
        unknown_price=bool(v.get("unknown_price_by_event", 0.0)),
        model=fv.context.get("priced_model"),
    )


def usd(x: float) -> str:
    """Dollars as people read them: cents above a dollar, more digits below."""
    if abs(x) >= 1:
        return f"${x:,.2f}"
    if x == 0:
        return "$0"
    return f"${x:.4f}"


def money_sentence(m: Money) -> str:
    text = (f"at stake: {usd(m.spend_usd_24h)} spent by this key in 24 h "
            f"({usd(m.spend_usd_1h)} in the last hour), burning {usd(m.burn_usd_per_h)}/h")
    if m.unknown_price:
        text += " (unknown model, priced at the default price)"
    return text


def state_money(reasons: list[Reason], m: Money) -> list[Reason]:
    """The alerting reasons with the money at stake in their evidence and message."""
    sentence = money_sentence(m)
    out = []
    for r in reasons:
        if severity_rank(r.severity) >= STATED_FROM and "burn_usd_per_h" not in r.evidence:
            r = r.model_copy(update={
                "message": f"{r.message} — {sentence}",
                "evidence": {**r.evidence, "spend_usd_1h": m.spend_usd_1h,
                             "spend_usd_24h": m.spend_usd_24h,
                             "burn_usd_per_h": m.burn_usd_per_h}})
        out.append(r)
    return out
