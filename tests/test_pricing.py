"""Spend arithmetic against hand-computed cases, and spend as a feature."""

from __future__ import annotations

import math

import pytest

from features.contract import Event
from features.extractor import FeatureExtractor, FeatureStream
from features.pricing import PriceTable, PricingConfig, load_price_file
from features.stores.memory import MemoryStore
from serving.policy.schema import parse_policy
from serving.reports.impact import impact_of

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z


@pytest.mark.parametrize(("model", "prompt", "completion", "usd"), [
    # gpt-4o $2.50 / $10 per million: 1,000 * 2.5e-6 + 500 * 1e-5 = 0.0025 + 0.005
    ("gpt-4o", 1000, 500, 0.0075),
    ("gpt-4o-2024-08-06", 1000, 500, 0.0075),  # versioned names price as their base
    ("openai/gpt-4o", 1000, 500, 0.0075),
    # gpt-4o-mini $0.15 / $0.60: 1M prompt + 1M completion = 0.75
    ("gpt-4o-mini-2024-07-18", 1_000_000, 1_000_000, 0.75),
    # claude-3-5-sonnet $3 / $15: 2,000 * 3e-6 + 100 * 1.5e-5 = 0.006 + 0.0015
    ("claude-3-5-sonnet-20241022", 2000, 100, 0.0075),
    ("anthropic.claude-3-5-sonnet-20241022-v2:0", 2000, 100, 0.0075),
    # embeddings have no completion price: 10,000 * 2e-8
    ("text-embedding-3-small", 10_000, 0, 0.0002),
])
def test_prompt_and_completion_prices(model: str, prompt: int, completion: int,
                                      usd: float) -> None:
    cost = PriceTable().cost(model, tokens=prompt + completion, prompt_tokens=prompt,
                             completion_tokens=completion)
    assert cost.usd == pytest.approx(usd, rel=1e-12)
    assert cost.unknown is False


def test_unknown_models_are_priced_at_the_default_and_flagged_never_zero() -> None:
    table = PriceTable()
    cost = table.cost("acme-llm-9000", tokens=1500, prompt_tokens=1000, completion_tokens=500)
    # default $10 / $30: 1,000 * 1e-5 + 500 * 3e-5 = 0.01 + 0.015
    assert cost.unknown and cost.model is None and cost.usd == pytest.approx(0.025)
    no_model = table.cost(None, tokens=1000)
    assert no_model.unknown and no_model.usd > 0
    # a configurable default, and a call that used no tokens costs nothing and is not unknown
    cheap = PriceTable.from_configs(PricingConfig.model_validate(
        {"default": {"prompt": 1.0, "completion": 2.0}}))
    assert cheap.cost("acme-llm-9000", tokens=1_000_000).usd == pytest.approx(1.25)
    assert table.cost("acme", tokens=0) == table.cost("acme", tokens=0, prompt_tokens=0)
    assert table.cost("acme", tokens=0).usd == 0.0 and not table.cost("acme", tokens=0).unknown


def test_total_only_and_one_sided_counts() -> None:
    table = PriceTable()
    # only the total: 3:1 blend, 1M * (0.75 * 2.5 + 0.25 * 10) / 1M = 4.375
    assert table.cost("gpt-4o", tokens=1_000_000).usd == pytest.approx(4.375)
    # only the prompt count: the rest of the total is completion
    assert table.cost("gpt-4o", tokens=1500, prompt_tokens=1000).usd == pytest.approx(0.0075)
    assert table.cost("gpt-4o", tokens=1500, completion_tokens=500).usd == pytest.approx(
        0.0075)


def test_policy_and_price_file_override_the_defaults(tmp_path) -> None:  # type: ignore[no-untyped-def]
    policy = parse_policy("""
rules: []
pricing:
  models: {my-finetune: {prompt: 4, completion: 8}, gpt-4o: {prompt: 5, completion: 20}}
  blend_prompt_share: 0.5
""")
    table = PriceTable.from_configs(None, policy.pricing)
    assert table.cost("my-finetune", tokens=2, prompt_tokens=1, completion_tokens=1).usd == (
        pytest.approx(12e-6))
    assert table.cost("gpt-4o", tokens=1_000_000).usd == pytest.approx(12.5)
    path = tmp_path / "prices.yaml"
    path.write_text("pricing:\n  default: {prompt: 0.5, completion: 0.5}\n")
    assert PriceTable.from_configs(load_price_file(path)).cost("x", tokens=2_000_000).usd == (
        pytest.approx(1.0))
    path.write_text("models: {a: {prompt: -1, completion: 1}}\n")
    with pytest.raises(ValueError, match="price file"):
        load_price_file(path)


def test_spend_features_over_windows_and_the_spend_rate_baseline() -> None:
    stream = FeatureStream(MemoryStore(), FeatureExtractor())

    def event(ts: float, prompt: int = 1000, completion: int = 500, model: str = "gpt-4o"
              ) -> Event:
        return Event(api_key="sk-spend", timestamp=ts, model=model, prompt_tokens=prompt,
                     completion_tokens=completion, source_ip="198.51.100.7")

    # a quiet key: one $0.0075 call every 10 minutes for two days, all learned as normal
    ts = T0
    for _ in range(288):
        fv = stream.process(event(ts), "k_spend")
        stream.learn(fv)
        ts += 600.0
    stream.flush()
    assert fv["cost_usd_by_event"] == pytest.approx(0.0075)
    assert fv["unknown_price_by_event"] == 0.0
    assert fv["spend_usd_by_key_24h"] == pytest.approx(144 * 0.0075, rel=0.02)
    assert fv["spend_usd_by_key_30d"] == pytest.approx(288 * 0.0075, rel=0.02)
    assert fv["spend_rate_vs_baseline_by_key_1h"] < 2.0
    # now it burns money with requests that each look like the owner's: same size, same
    # model, but 200 of them in ten minutes
    for i in range(200):
        fv = stream.process(event(ts + i * 3.0), "k_spend")
    assert fv["spend_usd_by_key_5m"] == pytest.approx(100 * 0.0075, rel=0.02)
    # about $1.5 in the last hour against a baseline of ~$0.045/h floored at $0.10/h
    assert fv["spend_usd_by_key_1h"] == pytest.approx(1.5 + 0.0075 * 5, rel=0.05)
    assert fv["spend_rate_vs_baseline_by_key_1h"] > 10
    unknown = stream.process(event(ts + 700, model="mystery-model"), "k_spend")
    assert unknown["unknown_price_by_event"] == 1.0 and unknown["cost_usd_by_event"] > 0


def test_a_token_drain_cannot_teach_the_spend_baseline() -> None:
    """Huge prompts through the owner's own client at a few requests a minute. The
    baseline is the key's busiest past hour of normal spend, so however many requests the
    drain makes it cannot lower its own ratio within the hour; what it spent unflagged
    counts only once its hour ended an hour ago; and while it is flagged (not learned) it
    never raises the bar."""

    def event(ts: float, prompt: int) -> Event:
        return Event(api_key="sk-drain", timestamp=ts, model="gpt-4o", prompt_tokens=prompt,
                     completion_tokens=200, source_ip="198.51.100.7")

    ratios: dict[str, list[float]] = {}
    for learned in ("flagged", "learned"):
        stream = FeatureStream(MemoryStore(), FeatureExtractor())
        ts = T0
        for i in range(288):  # two quiet days: a ~2,000-token call every 10 minutes
            stream.learn(stream.process(event(ts, 1_500 + (i % 7) * 150), "k_drain"))
            ts += 600.0
        quiet = stream.process(event(ts, 2_000), "k_drain")["spend_rate_vs_baseline_by_key_1h"]
        assert quiet < 2.0
        ratios[learned] = []
        for i in range(450):  # then 40,000-token prompts every 24 s for three hours
            fv = stream.process(event(ts + 30 + i * 24.0, 40_000), "k_drain")
            if learned == "learned":
                stream.learn(fv)  # the worst case: nothing flagged it, all of it learned
            ratios[learned].append(fv["spend_rate_vs_baseline_by_key_1h"])
    first_two_hours = slice(0, 298)  # 30 s + 298 x 24 s < 2 h
    # learning changes nothing for two hours: the bar is hours that ended an hour ago
    assert ratios["learned"][first_two_hours] == ratios["flagged"][first_two_hours]
    assert max(ratios["flagged"][:150]) > 20  # far beyond the rule's 20x in its first hour
    # the third hour: flagged spend never became the baseline, learned spend did
    assert ratios["flagged"][-1] > 20
    assert ratios["learned"][-1] < ratios["flagged"][-1] / 5


def test_impact_report_states_the_money_that_would_have_been_saved() -> None:
    decisions = [
        {"key_id": "k_a", "decision": "allow", "severity": "none", "money": {"cost_usd": 1.0}},
        {"key_id": "k_b", "decision": "allow", "severity": "high", "money": {"cost_usd": 2.5},
         "would": {"decision": "throttle", "drivers": ["x"]}},
        {"key_id": "k_b", "decision": "block", "severity": "critical",
         "money": {"cost_usd": 4.0}, "drivers": ["y"]},
        {"key_id": "k_c", "decision": "block", "severity": "critical", "drivers": ["y"]},
    ]
    report = impact_of(decisions)
    d = report.as_dict()
    assert d["spent_usd"] == 7.5 and d["saved_usd"] == 6.5 and d["unpriced"] == 1
    assert d["by_rule"]["x"]["saved_usd"] == 2.5 and d["by_rule"]["y"]["saved_usd"] == 4.0
    assert "$6.50 of it by the events that would have been throttled or blocked" in (
        report.text())
    assert math.isfinite(d["saved_usd"])


def test_default_policy_alerts_on_a_key_burning_20x_its_usual_spend() -> None:
    from features.extractor import FeatureVector
    from serving.policy.rules import RuleInput, evaluate_rules
    from serving.policy.schema import load_policy

    rules = load_policy().active_rules()

    def codes(rate: float, spend_1h: float, warm: bool = True, age_h: float = 48.0
              ) -> list[str]:
        fv = FeatureVector(values={"spend_rate_vs_baseline_by_key_1h": rate,
                                   "spend_usd_by_key_1h": spend_1h,
                                   "key_age_h_by_key": age_h},
                           context={"key_warm": warm})
        return [f.rule_id for f in evaluate_rules(rules, RuleInput(fv=fv))]

    assert "spend_rate_vs_baseline" in codes(25.0, 60.0)
    assert "spend_rate_vs_baseline" not in codes(15.0, 60.0)  # under 20x
    assert "spend_rate_vs_baseline" not in codes(25.0, 2.0)  # cheap keys are left alone
    assert "spend_rate_vs_baseline" not in codes(25.0, 60.0, warm=False)
    # a key's first day is judged by population priors, not its own baseline (issue 17)
    assert "spend_rate_vs_baseline" not in codes(25.0, 60.0, age_h=6.0)
    # far beyond: throttled, as one signal (the same group) with the alert
    assert codes(60.0, 12.0) == ["spend_surge", "spend_rate_vs_baseline"]
    assert "spend_surge" not in codes(40.0, 60.0)  # under 50x: an alert only
    assert "spend_surge" not in codes(60.0, 8.0)  # under $10 in the hour
    surge = next(r for r in rules if r.id == "spend_surge")
    assert (surge.severity, surge.group_name) == ("high", "spend")
