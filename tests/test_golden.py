"""Golden cases, CrowdSec-style: `tests/golden/<case>/{policy.yaml,events.jsonl,expected.json}`.

Each case's events go through the real `Scorer` (memory store, the case's policy) and the
decisions must match `expected.json`:

- `expect`: checks on single events by index — `decision`, `codes` (all present, in this
  order among the reasons), `first_code`, `absent_codes`, `no_codes`, `mode`, `action`
  (a subset of the action), `would` (a subset of the would-outcome).
- `all`: checks on every event (optionally only those matching `filter` on input fields).
- `expect_first`: checks on the first event matching `filter`.
- `some`: at least `at_least` of the events matching `filter` have `decision`.
- `not_decision` (in any check): the decision must not be this one.
- `requires_features`: features the case depends on; where the extractor does not build
  them yet the case is skipped, naming them, rather than passing vacuously.

A case without a `policy.yaml` runs the SHIPPED default policy (written by
`tests/golden/make_default_policy_cases.py`): what users get is what is tested.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from features.contract import Event
from features.keys import KeyHasher
from features.stores.memory import MemoryStore
from serving.engine.decision import Decision
from serving.engine.scorer import Scorer
from serving.policy.schema import load_policy
from tests.conftest import TEST_SECRET

GOLDEN = Path(__file__).parent / "golden"
CASES = sorted(p.name for p in GOLDEN.iterdir() if (p / "expected.json").exists())


def check(decision: Decision, spec: dict[str, Any], where: str) -> None:
    codes = [r.code for r in decision.reasons]
    if "decision" in spec:
        assert decision.decision == spec["decision"], f"{where}: {decision.model_dump()}"
    if "not_decision" in spec:
        assert decision.decision != spec["not_decision"], f"{where}: {decision.model_dump()}"
    if "codes" in spec:
        present = [c for c in codes if c in spec["codes"]]
        assert present == spec["codes"], f"{where}: reasons {codes}"
    if "first_code" in spec:
        assert codes and codes[0] == spec["first_code"], f"{where}: reasons {codes}"
    for code in spec.get("absent_codes", []):
        assert code not in codes, f"{where}: {code} must not fire ({codes})"
    if spec.get("no_codes"):
        assert codes == [], f"{where}: reasons {codes}"
    if "mode" in spec:
        assert {r.mode for r in decision.reasons if r.code in spec.get("codes", codes)} == {
            spec["mode"]}, where
    if "action" in spec:
        action = decision.action.model_dump()
        for k, v in spec["action"].items():
            assert action[k] == v, f"{where}: action {action}"
    if "would" in spec:
        assert decision.would is not None, f"{where}: no would-outcome"
        would = decision.would.model_dump()
        for k, v in spec["would"].items():
            assert would[k] == v, f"{where}: would {would}"


@pytest.mark.parametrize("case", CASES)
def test_golden_case(case: str) -> None:
    folder = GOLDEN / case
    expected = json.loads((folder / "expected.json").read_text())
    events = [json.loads(line) for line in (folder / "events.jsonl").read_text().splitlines()
              if line.strip()]
    policy_file = folder / "policy.yaml"
    scorer = Scorer(store=MemoryStore(), hasher=KeyHasher(TEST_SECRET),
                    policy=load_policy(policy_file if policy_file.exists() else None))
    decisions = []
    for i, raw in enumerate(events):
        decision, fv = scorer.score_with_features(Event.model_validate(raw))
        if i == 0:
            missing = [f for f in expected.get("requires_features", []) if f not in fv.values]
            if missing:
                pytest.skip(f"the extractor does not build {', '.join(missing)} yet")
        decisions.append(decision)
    for spec in expected.get("expect", []):
        check(decisions[spec["event"]], spec, f"{case} event {spec['event']}")
    def matching(wanted: dict[str, Any]) -> list[int]:
        found = [i for i, raw in enumerate(events)
                 if all(raw.get(k) == v for k, v in wanted.items())]
        assert found, f"{case}: the filter {wanted} matched no event"
        return found

    for spec in expected.get("expect_first", []):
        i = matching(spec["filter"])[0]
        check(decisions[i], spec, f"{case} event {i} (first of {spec['filter']})")
    for spec in expected.get("some", []):
        idx = matching(spec["filter"])
        share = sum(decisions[i].decision == spec["decision"] for i in idx) / len(idx)
        assert share >= spec["at_least"], (
            f"{case}: {share:.1%} of {spec['filter']} are {spec['decision']}")
    for spec in expected.get("all", []):
        wanted = spec.get("filter", {})
        matched = 0
        for i, (raw, decision) in enumerate(zip(events, decisions, strict=True)):
            if all(raw.get(k) == v for k, v in wanted.items()):
                matched += 1
                check(decision, spec, f"{case} event {i}")
        assert matched, f"{case}: the filter {wanted} matched no event"
