"""`keywatch replay` goes through the same pipeline as the API and keeps line order."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from serving.api.app import create_app
from tests.conftest import TEST_SECRET, make_settings

T0 = 1_794_999_960


def traffic() -> list[dict[str, object]]:
    events: list[dict[str, object]] = []
    for i in range(900):  # one busy key crossing its rate limit, two quiet ones
        events.append({"api_key": "sk-busy", "timestamp": T0 + i * 0.05, "tokens": 300,
                       "source_ip": "81.2.69.160", "status": 200})
        if i % 60 == 0:
            events.append({"api_key": "sk-quiet", "timestamp": T0 + i * 0.05, "tokens": 900,
                           "source_ip": "8.8.8.8", "status": 401 if i % 120 else 200})
    for i in range(30):  # an address trying many keys
        events.append({"api_key": f"sk-guess-{i}", "timestamp": T0 + 50 + i, "status": 401,
                       "source_ip": "203.0.113.7"})
    return events


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KEYWATCH_SECRET": TEST_SECRET}
    return subprocess.run([sys.executable, "-m", "serving.cli.main", *args], capture_output=True,
                          text=True, env=env, timeout=300, check=False)


def strip(decision: dict[str, object]) -> dict[str, object]:
    return {k: decision[k] for k in ("key_id", "decision", "severity", "score", "reasons",
                                     "action")}


def test_api_and_replay_give_the_same_decisions(tmp_path: Path) -> None:
    events = traffic()
    # the service on event time too: the same decisions; live it judges bans and limits
    # on its own clock (tests/test_enforcement_state.py)
    with TestClient(create_app(make_settings(enforcement_clock="event"))) as client:
        via_api = [client.post("/v1/events", json=e).json() for e in events]
    src = tmp_path / "events.jsonl"
    src.write_text("".join(json.dumps(e) + "\n" for e in events))
    out = tmp_path / "decisions.jsonl"
    proc = run_cli("replay", str(src), "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    via_replay = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(via_replay) == len(events)
    assert [strip(d) for d in via_api] == [strip(d) for d in via_replay]
    verdicts = {d["decision"] for d in via_replay}
    assert verdicts >= {"allow", "throttle", "block"}, "the traffic must exercise every verdict"
    assert any(r["code"] == "credential_stuffing" for d in via_replay for r in d["reasons"])


def test_bad_lines_are_reported_in_place_and_the_run_goes_on(tmp_path: Path) -> None:
    good = {"api_key": "sk-a", "timestamp": T0, "source_ip": "8.8.8.8"}
    lines = [json.dumps(good), "{broken", json.dumps({**good, "tokens": -1}), "",
             json.dumps([1, 2]), json.dumps(good)]
    src = tmp_path / "events.jsonl"
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "decisions.jsonl"
    proc = run_cli("replay", str(src), "--out", str(out), "--quiet")
    assert proc.returncode == 1
    summary = json.loads(proc.stderr.strip().splitlines()[-1])["replay"]
    assert summary == {"lines": 6, "scored": 2, "failed": 4, "decisions": {"allow": 2}}
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 6
    assert rows[1]["line"] == 2 and "JSON" in rows[1]["error"]
    assert rows[2]["line"] == 3 and "tokens" in rows[2]["error"]
    assert rows[3]["line"] == 4 and rows[4]["line"] == 5
    assert rows[0]["decision"] == rows[5]["decision"] == "allow"


def test_replay_reads_parquet(tmp_path: Path) -> None:
    events = traffic()[:50]
    src = tmp_path / "events.parquet"
    pq.write_table(pa.Table.from_pylist(events), src)
    out = tmp_path / "decisions.jsonl"
    proc = run_cli("replay", str(src), "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert len(out.read_text().splitlines()) == 50


def test_replay_through_redis_matches_memory(tmp_path: Path, redis_url: str) -> None:
    events = traffic()
    src = tmp_path / "events.jsonl"
    src.write_text("".join(json.dumps(e) + "\n" for e in events))
    outs = []
    for name, store in (("mem", "memory"), ("red", redis_url)):
        out = tmp_path / f"{name}.jsonl"
        proc = run_cli("replay", str(src), "--out", str(out), "--quiet", "--store", store)
        assert proc.returncode == 0, proc.stderr
        outs.append([strip(json.loads(x)) for x in out.read_text().splitlines()])
    assert outs[0] == outs[1]


@pytest.mark.parametrize("env", [{}, {"KEYWATCH_SECRET": ""}])
def test_service_refuses_to_start_without_a_secret(env: dict[str, str]) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("KEYWATCH_")}
    proc = subprocess.run([sys.executable, "-m", "serving.cli.main", "serve", "--port", "0"],
                          capture_output=True, text=True, env={**clean, **env}, timeout=60,
                          check=False)
    assert proc.returncode == 2
    assert "KEYWATCH_SECRET is not set" in proc.stderr
    assert "development" in proc.stderr
