"""Dry-run replay and the impact report: what a policy would have done, by rule."""

from __future__ import annotations

import json
from pathlib import Path

from tests.test_replay import run_cli, traffic


def test_dry_run_replay_then_impact_report(tmp_path: Path) -> None:
    src = tmp_path / "events.jsonl"
    src.write_text("".join(json.dumps(e) + "\n" for e in traffic()))
    out = tmp_path / "decisions.jsonl"
    proc = run_cli("replay", str(src), "--out", str(out), "--quiet", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    decisions = [json.loads(x) for x in out.read_text().splitlines()]
    assert {d["decision"] for d in decisions} == {"allow"}
    assert all(d["dry_run"] for d in decisions)

    proc = run_cli("policy", "impact", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["events"] == len(decisions)
    assert report["affected"]["throttled_keys"] == 1  # the busy key
    rules = report["by_rule"]
    assert rules["rate_limit_1m"]["throttled"] > 200 and rules["rate_limit_1m"]["keys"] == 1
    # dry-run writes no ban, so every guess after the 20th would have been blocked
    assert rules["credential_stuffing"]["blocked"] == 10
    assert rules["credential_stuffing"]["keys"] == 10
    assert report["not_enforced"] == report["affected"]["events"]

    text = run_cli("policy", "impact", str(out)).stdout
    assert "would be throttled" in text and "credential_stuffing" in text
