"""Retrain → gates → promote → a running service hot-reloads it; tampering is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from features.keys import KeyHasher
from models.registry import ModelRegistry
from serving.api.app import create_app
from serving.schedules.cron import daily_cron, next_fire, parse_daily_time
from tests.conftest import TEST_SECRET, make_settings
from training.retrain import Gates, retrain
from training.simulator import simulate


@pytest.fixture(scope="module")
def sim_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sim")
    simulate(out, keys=10, days=2, seed=3)
    # the first 6,000 events are plenty to fit on and keep the suite quick
    lines = (out / "events.jsonl").read_text().splitlines(keepends=True)[:6000]
    (out / "events.jsonl").write_text("".join(lines))
    return out


def test_retrain_fits_gates_promotes_and_reports(sim_dir: Path, tmp_path: Path) -> None:
    result = retrain(events=sim_dir / "events.jsonl", model_dir=tmp_path,
                     hasher=KeyHasher(TEST_SECRET), progress=False)
    assert result.promoted, result.reasons
    registry = ModelRegistry(tmp_path)
    assert registry.current_version() == result.version
    report = json.loads(Path(result.report_path or "").read_text())
    assert report["passed"] and report["metrics"]["rows"] > 1000
    assert (Path(result.report_path or "").parent / "scores.png").stat().st_size > 1000
    manifest = registry.manifest(result.version or "")
    assert manifest["gates"]["passed"] is True
    assert "requests_count_by_key_1m" in manifest["feature_names"]


def test_a_failing_gate_refuses_promotion_and_says_why(sim_dir: Path, tmp_path: Path) -> None:
    result = retrain(events=sim_dir / "events.jsonl", model_dir=tmp_path,
                     hasher=KeyHasher(TEST_SECRET), progress=False,
                     gates=Gates(max_holdout_high_share=-1.0))
    assert not result.promoted and result.version is not None
    assert "would score high or above" in result.reasons[0]
    assert ModelRegistry(tmp_path).current_version() is None
    too_few = retrain(events=sim_dir / "events.jsonl", model_dir=tmp_path,
                      hasher=KeyHasher(TEST_SECRET), progress=False,
                      gates=Gates(min_rows=10**9))
    assert not too_few.promoted and "at least" in too_few.reasons[0]


def test_running_service_hot_reloads_and_refuses_a_tampered_model(
        sim_dir: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "models"
    settings = make_settings(model_dir=model_dir, model_reload_interval_s=0.01,
                             data_dir=tmp_path / "data")
    event = {"api_key": "sk-live-reload", "timestamp": 1_794_999_960, "tokens": 50,
             "source_ip": "81.2.69.160"}
    with TestClient(create_app(settings)) as client:
        first = client.post("/v1/events", json=event).json()
        assert first["model_versions"]["offline"] is None
        good = retrain(events=sim_dir / "events.jsonl", model_dir=model_dir,
                       hasher=KeyHasher(TEST_SECRET), progress=False)
        assert good.promoted
        second = client.post("/v1/events", json={**event, "timestamp": 1_794_999_961}).json()
        assert second["model_versions"]["offline"] == good.version

        # a second version whose artifact is tampered with after promotion is refused,
        # and the service keeps scoring with the verified one
        bad = retrain(events=sim_dir / "events.jsonl", model_dir=model_dir,
                      hasher=KeyHasher(TEST_SECRET), progress=False, random_state=1)
        registry = ModelRegistry(model_dir)
        artifact = next(p for p in (model_dir / "versions" / (bad.version or "")).iterdir()
                        if p.suffix == ".joblib")
        data = bytearray(artifact.read_bytes())
        data[len(data) // 2] ^= 0xFF
        artifact.write_bytes(bytes(data))
        assert registry.current_version() == bad.version
        third = client.post("/v1/events", json={**event, "timestamp": 1_794_999_962}).json()
        assert third["model_versions"]["offline"] == good.version
        ready = client.get("/readyz").json()
        assert "refused" in ready["model_error"] and bad.version in ready["model_error"]


def test_retrain_cli_and_models_cli(sim_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, "KEYWATCH_SECRET": TEST_SECRET}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "serving.cli.main", *args],
                              capture_output=True, text=True, env=env, timeout=600,
                              check=False)

    assert retrain(events=sim_dir / "events.jsonl", model_dir=tmp_path,
                   hasher=KeyHasher(TEST_SECRET), progress=False).promoted
    proc = cli("retrain", "--events", str(sim_dir / "events.jsonl"), "--model-dir",
               str(tmp_path), "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["promoted"] is True
    listing = cli("models", "list", "--model-dir", str(tmp_path))
    lines = listing.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[-1].startswith("*")
    back = cli("models", "rollback", "--model-dir", str(tmp_path))
    assert back.returncode == 0 and "rolled back" in back.stdout
    assert ModelRegistry(tmp_path).current_version() == lines[0].split()[0]
    missing = cli("retrain", "--events", str(tmp_path / "nope.jsonl"), "--model-dir",
                  str(tmp_path))
    assert missing.returncode == 2 and "nope.jsonl" in missing.stderr


def test_schedule_parsing() -> None:
    from datetime import UTC, datetime

    assert parse_daily_time("03:00") == (3, 0)
    with pytest.raises(ValueError, match="HH:MM"):
        parse_daily_time("3am")
    now = datetime(2026, 11, 27, 4, 0, tzinfo=UTC)
    assert next_fire(daily_cron("03:00"), now) == datetime(2026, 11, 28, 3, 0, tzinfo=UTC)
    assert next_fire(daily_cron("05:30"), now) == datetime(2026, 11, 27, 5, 30, tzinfo=UTC)
    assert next_fire(daily_cron("*/15 * * * *"), now) == datetime(2026, 11, 27, 4, 15,
                                                                   tzinfo=UTC)
