"""Budgets: exact at the limit across replicas sharing one Redis, periods, groups."""

from __future__ import annotations

import uuid

import pytest

from features.contract import Event
from features.keys import KeyHasher
from features.stores.memory import MemoryStore
from features.stores.redis_store import RedisStore
from serving.engine.budgets import period_bounds
from serving.engine.scorer import Scorer
from serving.policy.schema import PolicyError, parse_policy

SECRET = "budget-secret-0123456789abcdef"
T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z, a Thursday
HASHER = KeyHasher(SECRET)


def policy(budget: str):  # type: ignore[no-untyped-def]
    return parse_policy(f"""
rules:
  - id: banned_key
    type: banned
    severity: critical
{budget}
""")


def call(key: str, ts: float, *, prompt: int = 1000, completion: int = 500,
         model: str = "gpt-4o") -> Event:
    # gpt-4o: $2.50 / $10 per million -> 1000 prompt + 500 completion = $0.0075 exactly
    return Event(api_key=key, timestamp=ts, model=model, prompt_tokens=prompt,
                 completion_tokens=completion, source_ip="198.51.100.7",
                 endpoint="/v1/chat/completions")


def budget_reason(decision):  # type: ignore[no-untyped-def]
    return next((r for r in decision.reasons if r.code.endswith("budget")), None)


def test_hard_budget_throttles_exactly_at_the_limit_across_two_replicas(redis_url: str) -> None:
    pol = policy("""
  - id: key_budget
    type: budget
    params: {amount_usd: 0.075, period: day, soft_share: 0.8, hard: throttle}
""")
    ns = f"budget-{uuid.uuid4().hex[:8]}"
    replicas = [Scorer(store=RedisStore(redis_url, namespace=ns), hasher=HASHER, policy=pol)
                for _ in range(2)]
    try:
        decisions = [replicas[i % 2].score(call("sk-budget-1", T0 + 3600 + i))
                     for i in range(14)]
    finally:
        for r in replicas:
            r.store.close()
    # ten calls of $0.0075 are exactly $0.075: all fit; the eleventh would exceed it
    assert [d.decision for d in decisions[:10]] == ["allow"] * 10
    assert all(d.decision == "throttle" for d in decisions[10:])
    hard = budget_reason(decisions[10])
    assert hard is not None and hard.severity == "high"
    assert hard.evidence["limit"] == "hard" and hard.evidence["value"] == pytest.approx(0.075)
    assert "budget of $0.08" in hard.message or "budget of $0.07" in hard.message
    assert decisions[10].action.type == "throttle"
    assert decisions[10].action.until == "2026-01-02T00:00:00Z"
    # the soft alert starts at 80 %: the 8th call brings the total to $0.06
    assert budget_reason(decisions[6]) is None
    soft = budget_reason(decisions[7])
    assert soft is not None and soft.severity == "medium" and soft.evidence["limit"] == "soft"
    assert decisions[7].decision == "allow" and decisions[7].severity == "medium"
    # every flagged decision states the money at stake
    assert "burning $" in soft.message and soft.evidence["spend_usd_24h"] == pytest.approx(
        0.06)
    assert decisions[7].money is not None and decisions[7].money.cost_usd == 0.0075


def test_a_new_period_resets_the_budget_and_a_smaller_call_may_still_fit() -> None:
    pol = policy("""
  - id: key_budget
    type: budget
    params: {amount_usd: 0.02, period: day, soft_share: null}
""")
    scorer = Scorer(store=MemoryStore(), hasher=HASHER, policy=pol)
    d = [scorer.score(call("sk-budget-2", T0 + 10 + i)) for i in range(3)]
    assert [x.decision for x in d] == ["allow", "allow", "throttle"]  # 0.015 then 0.0225
    small = scorer.score(call("sk-budget-2", T0 + 20, prompt=1000, completion=0))  # $0.0025
    assert small.decision == "allow"
    next_day = scorer.score(call("sk-budget-2", T0 + 86400 + 5))
    assert next_day.decision == "allow" and budget_reason(next_day) is None
    # a late event of the closed day is not counted against the new one
    late = scorer.score(call("sk-budget-2", T0 + 100))
    assert budget_reason(late) is None


def test_shared_group_budget_and_block_refuses_without_a_ban(redis_url: str) -> None:
    a, b, other = "sk-team-a", "sk-team-b", "sk-elsewhere"
    pol = policy(f"""
  - id: team_budget
    type: budget
    params:
      amount_usd: 0.03
      period: month
      keys: [{HASHER.key_id(a)}, {HASHER.key_id(b)}]
      shared: true
      hard: block
""")
    scorer = Scorer(store=RedisStore(redis_url, namespace="grp"), hasher=HASHER, policy=pol)
    try:
        d = [scorer.score(call(k, T0 + i)) for i, k in enumerate([a, b, a, b, a])]
        assert [x.decision for x in d] == ["allow"] * 4 + ["block"]
        assert d[4].severity == "critical"
        assert d[4].action.type == "refuse" and d[4].action.until == "2026-02-01T00:00:00Z"
        # no ban was written: the pre-flight check still lets the key through, and the
        # next month starts afresh
        assert scorer.check(a, now=T0 + 10).allowed
        assert scorer.score(call(other, T0 + 6)).decision == "allow"  # not in the group
        assert scorer.score(call(b, T0 + 31 * 86400 + 1)).decision == "allow"
    finally:
        scorer.store.close()


def test_dry_run_counts_the_budget_and_says_what_would_happen() -> None:
    pol = policy("""
  - id: key_budget
    type: budget
    params: {amount_usd: 0.0075, period: week, soft_share: null}
""")
    scorer = Scorer(store=MemoryStore(), hasher=HASHER, policy=pol, dry_run=True)
    first, second = (scorer.score(call("sk-dry", T0 + i)) for i in range(2))
    assert first.decision == "allow" and first.would is None
    assert second.decision == "allow" and second.would is not None
    assert second.would.decision == "throttle"


def test_periods_are_utc_calendar_periods() -> None:
    assert period_bounds("day", T0 + 5)[1:] == (T0, T0 + 86400)
    # 2026-01-01 is a Thursday: its week began on Monday 2025-12-29
    n, start, end = period_bounds("week", T0 + 5)
    assert (start, end) == (T0 - 3 * 86400, T0 + 4 * 86400)
    assert period_bounds("week", start)[0] == n and period_bounds("week", end)[0] == n + 1
    assert period_bounds("month", T0 + 40 * 86400)[1] == 1_769_904_000.0  # 2026-02-01


def test_budget_rules_are_validated_with_line_numbers() -> None:
    with pytest.raises(PolicyError) as err:
        parse_policy("""
rules:
  - id: bad_budget
    type: budget
    params:
      amount_usd: 10
      keys: [sk-live-raw-key-in-a-policy]
      shared: true
  - id: no_keys
    type: budget
    params: {amount_usd: 10, shared: true, period: fortnight}
""")
    text = str(err.value)
    assert "line 7" in text and "never by raw key" in text
    assert "period" in text
