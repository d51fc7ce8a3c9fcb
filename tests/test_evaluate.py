"""The detection evaluation end to end on a small simulation: retrain, replay, report.

The quality floor asserted here is deliberately modest and relative (keywatch must find
more incidents than it bothers legitimate key-days, and must block far less legitimate
traffic than the naive rule set): it is what the full pipeline must never fall below
on any honest traffic, not the targets of the issue, which the report itself judges.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from training.evaluate import (
    TARGETS,
    VARIANTS,
    DecisionArrays,
    EvaluationReport,
    Truth,
    evaluate,
    judge,
    load_truth,
)
from training.simulator import simulate

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, EvaluationReport]:
    base = tmp_path_factory.mktemp("evaluate")
    data = base / "sim"
    simulate(data, keys=8, days=3, seed=0)
    return data, evaluate(data, out_dir=base / "report", progress=False)


def test_report_files_are_written(evaluation: tuple[Path, EvaluationReport]) -> None:
    _, report = evaluation
    assert report.report_md.is_file() and report.report_json.is_file()
    for name in ("scores", "time_to_detect", "timeline"):
        png = report.plots[name]
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = report.report_md.read_text()
    for variant in VARIANTS:
        assert f"## {variant}" in text
    for target in TARGETS:
        assert target.label in text
    doc = json.loads(report.report_json.read_text())
    assert set(doc["variants"]) == set(VARIANTS)
    assert doc["events"] == report.events > 0


def test_every_scenario_is_judged(evaluation: tuple[Path, EvaluationReport]) -> None:
    data, report = evaluation
    truth = load_truth(data)
    scenarios = {i["scenario"] for i in truth.test_incidents}
    assert len(scenarios) >= 8  # the simulator puts every scenario in the test period
    text = report.report_md.read_text()
    for variant in report.variants.values():
        assert {i.scenario for i in variant.incidents} == scenarios
        assert len(variant.incidents) == len(truth.test_incidents)
    for scenario in scenarios:
        assert scenario in text


def test_the_offline_model_never_saw_the_test_period(
        evaluation: tuple[Path, EvaluationReport]) -> None:
    data, report = evaluation
    assert not report.retrain.get("skipped")
    manifests = list(Path(report.retrain["model_dir"]).glob("versions/*/manifest.json"))
    assert manifests
    truth = load_truth(data)
    for path in manifests:
        window = json.loads(path.read_text())["training_window"]
        end = window["end"]
        end_ts = float(end) if isinstance(end, int | float) else np.datetime64(
            end.replace("Z", "").split("+")[0]).astype("datetime64[ms]").astype(float) / 1000
        assert end_ts <= truth.test_start


def test_quality_floor(evaluation: tuple[Path, EvaluationReport]) -> None:
    _, report = evaluation
    kw, rules, naive = (report.variants[v] for v in ("keywatch", "rules_only", "naive"))
    detected = sum(i.detected for i in kw.incidents)
    assert detected >= len(kw.incidents) // 2
    # the models add to the rules, never take away
    assert detected >= sum(i.detected for i in rules.incidents)
    # more incidents found than legitimate key-days bothered, with and without the models
    for variant in (kw, rules):
        alerted_days = round(variant.benign.key_days_alerted * variant.benign.key_days)
        assert sum(i.detected for i in variant.incidents) > alerted_days, variant.name
    # the naive rules cut legitimate traffic off wholesale; keywatch does not
    assert naive.benign.blocked > 0.5
    assert kw.benign.blocked < naive.benign.blocked / 20
    assert kw.benign.key_days_alerted < naive.benign.key_days_alerted
    assert kw.benign.surge_blocked == 0 < naive.benign.surge_blocked
    # credential stuffing is the one scenario every variant with the default rules stops
    stuffing = [i for i in kw.incidents if i.scenario == "credential_stuffing"]
    assert stuffing and all(i.detected and i.stopped > 0.8 for i in stuffing)


def test_judging_counts_what_it_says(tmp_path: Path) -> None:
    """Detection, time to detect, stopped share and benign shares on a hand-made case."""
    import pandas as pd

    labels = pd.DataFrame({
        "incident_id": ["inc-1", None, "inc-1", None, None, "inc-1"],
        "scenario": ["leak", None, "leak", None, None, "leak"],
        "key": ["k1", "k2", "k1", "k2", "k1", "k1"],
        "tenant_kind": ["x", "mobile_app", "x", "mobile_app", "backend", "x"],
        "benign_tag": [None, "flash_sale", None, None, None, None],
    })
    labels["incident_id"] = labels["incident_id"].astype(object)
    ts = np.array([1000.0, 1010, 1060, 1100, 5000, 1200])
    truth = Truth(labels=labels, incidents=[{
        "id": "inc-1", "scenario": "leak", "period": "test", "victim_keys": ["k1"],
        "start_ts": 1000.0, "end_ts": 1200.0}], meta={}, test_start=0.0)
    arrays = DecisionArrays.empty(len(ts))
    arrays.verdict[:] = [0, 2, 1, 0, 2, 2]
    arrays.severity[:] = [2, 4, 3, 0, 4, 4]
    arrays.drivers = {1: ["naive_burst"], 2: ["impossible_travel"], 4: ["banned_key"],
                      5: ["banned_key"]}
    res = judge(truth, ts, arrays)
    (inc,) = res.incidents
    assert inc.detected and inc.ttd_min == pytest.approx(1.0)
    assert inc.first_drivers == ["impossible_travel"]
    assert inc.stopped == pytest.approx(2 / 3)
    # legitimate: lines 1, 3 (k2) and 4 (k1 after its incident ended)
    assert res.benign.events == 3
    assert res.benign.blocked == pytest.approx(2 / 3)
    assert res.benign.blocked_after_incident == 1  # k1's ban outlasting its incident
    assert res.benign.surge_blocked == 1
    assert res.benign.key_days == 2  # k2 and k1, both on day 0
    assert res.benign.key_days_alerted == pytest.approx(1.0)
    assert dict(res.benign.alert_drivers) == {"naive_burst": 1, "banned_key": 1}
    assert res.summary["incidents_detected"] == 1.0


def test_cli_refuses_a_directory_that_is_not_a_simulation(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "serving.cli.main", "evaluate", "--data",
                           str(tmp_path)], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=60, check=False)
    assert proc.returncode == 2
    assert "not a simulation directory" in proc.stderr and "keywatch simulate" in proc.stderr
