"""Stream ingestion: at-least-once delivery, exactly one decision and one count per event."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis

from serving.cli.worker import WorkerConfig, _parse, build_worker
from tests.conftest import TEST_SECRET, make_settings
from tests.state_probe import redis_request_total

T0 = 1_794_999_960
ROOT = Path(__file__).resolve().parents[1]


def ev(i: int, key: str, **extra: object) -> dict[str, object]:
    return {"api_key": key, "event_id": f"ev-{i}", "timestamp": T0 + i * 0.4,
            "source_ip": f"192.0.2.{i % 9}", "tokens": 60 + i % 13, "latency_ms": 30.0,
            **extra}


def decisions_by_event(client: redis.Redis, stream: str = "kw:decisions") -> dict[str, list]:
    out: dict[str, list] = {}
    for _, fields in client.xrange(stream):
        out.setdefault(fields["event_id"], []).append(fields)
    return out


def test_a_redelivered_event_is_neither_counted_twice_nor_decided_differently(
        redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    keys = ["sk-redeliver-a", "sk-redeliver-b"]
    events = [ev(i, keys[i % 2]) for i in range(20)]
    events.append(ev(3, keys[1]))  # the gateway sent event 3 twice
    for e in events:
        client.xadd("kw:events", {"event": json.dumps(e)})
    client.xadd("kw:events", {"event": "{not json"})
    client.xadd("kw:events", {"event": json.dumps({"event_id": "no-key", "tokens": 1})})

    settings = make_settings(store=redis_url, event_log=False)
    crashed = build_worker(settings, WorkerConfig(consumer="crashed", claim_idle_ms=100))
    crashed.ensure_group()
    entries = client.xreadgroup("keywatch", "crashed", {"kw:events": ">"}, count=100)[0][1]
    assert len(entries) == 23
    # It scored the first five (state written), then died before publishing anything.
    first_decisions = {}
    for entry_id, fields in entries[:5]:
        item = _parse(entry_id, fields)
        crashed._score(item)
        first_decisions[item.event_id] = item.record["decision"]  # type: ignore[index]
    assert redis_request_total(client, keys[0]) == 3

    time.sleep(0.15)  # the entries are now idle longer than claim_idle_ms
    survivor = build_worker(settings, WorkerConfig(consumer="survivor", claim_idle_ms=100,
                                                   block_ms=50))
    stats = survivor.run(idle_exit_s=0.3)
    assert stats.claimed == 23
    assert (stats.scored, stats.errors) == (20, 2)
    assert stats.duplicates == 1

    decisions = decisions_by_event(client)
    assert all(len(v) == 1 for v in decisions.values())  # exactly one decision each
    assert {f"ev-{i}" for i in range(20)} <= set(decisions)
    for event_id, first in first_decisions.items():  # re-scored from the same numbers
        again = json.loads(decisions[event_id][0]["decision"])
        # each worker process runs its own population model, hence its own version name
        again.pop("model_versions"), first.pop("model_versions")  # type: ignore[union-attr]
        assert again == first
    errors = [v[0]["error"] for v in decisions.values() if "error" in v[0]]
    assert any("not valid JSON" in e for e in errors)
    assert any("api_key" in e for e in errors)
    # each distinct event counted once, although five of them were scored twice
    assert redis_request_total(client, keys[0]) == 10
    assert redis_request_total(client, keys[1]) == 10
    assert client.xpending("kw:events", "keywatch")["pending"] == 0
    assert client.xlen("kw:events") == 0  # acked entries (raw keys) deleted
    assert not list(client.scan_iter("kw:*:once:*"))
    survivor.store.close()
    crashed.store.close()


def _worker(url: str, name: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """A worker process; its log goes to a file in its data directory (a pipe nobody reads
    fills up, and a worker whose log writes block stops consuming)."""
    with (Path(env["KEYWATCH_DATA_DIR"]) / f"{name}.log").open("wb") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "serving.cli.main", "worker", "--store", url, "--consumer",
             name, "--claim-idle-ms", "1000", "--block-ms", "200", "--count", "32",
             "--exit-when-idle", "2.5", "--log-level", "warning"],
            env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log_file)


def test_two_worker_processes_one_killed_mid_stream(redis_url: str, tmp_path: Path) -> None:
    n = 3000
    keys = [f"sk-stream-{i}" for i in range(25)]
    lines = [json.dumps(ev(i, keys[i % len(keys)])) for i in range(n)]
    lines += [json.dumps(ev(i, keys[i % len(keys)])) for i in range(0, n, 100)]  # resent
    events_file = tmp_path / "events.jsonl"
    events_file.write_text("\n".join(lines) + "\n")
    env = {**os.environ, "KEYWATCH_SECRET": TEST_SECRET, "KEYWATCH_DATA_DIR": str(tmp_path),
           "PYTHONPATH": str(ROOT)}
    client = redis.Redis.from_url(redis_url, decode_responses=True)

    workers = [_worker(redis_url, "w1", env)]
    try:
        ingest = subprocess.run(
            [sys.executable, "-m", "serving.cli.main", "ingest", str(events_file),
             "--store", redis_url], env=env, cwd=ROOT, capture_output=True, text=True,
            timeout=60)
        assert ingest.returncode == 0, ingest.stderr
        assert json.loads(ingest.stderr.strip().splitlines()[-1])["ingested"] == len(lines)
        deadline = time.monotonic() + 120  # generous: a loaded machine starts slowly
        # the second worker joins once the first is consuming, so that on a loaded machine
        # the first is not still starting when the other has drained the stream
        while client.xlen("kw:decisions") < 50 and time.monotonic() < deadline:
            time.sleep(0.01)
        workers.append(_worker(redis_url, "w2", env))

        def w1_holds_a_batch() -> bool:
            return bool(client.xpending_range("kw:events", "keywatch", min="-", max="+",
                                              count=1, consumername="w1"))

        def w2_consumes() -> bool:
            return any(c["name"] == "w2" for c in client.xinfo_consumers("kw:events",
                                                                        "keywatch"))

        held = False
        while time.monotonic() < deadline:
            if client.xlen("kw:decisions") >= n // 3 and w2_consumes():
                # freeze it, then look: it cannot ack its batch between the look and the kill
                workers[0].send_signal(signal.SIGSTOP)
                held = w1_holds_a_batch()
                if held:
                    break
                workers[0].send_signal(signal.SIGCONT)
            time.sleep(0.002)
        assert held, "the first worker was never seen holding a batch"
        workers[0].send_signal(signal.SIGKILL)  # mid-stream, batch in hand
        workers[1].wait(timeout=90)
        err = (tmp_path / "w2.log").read_text()
        assert workers[1].returncode == 0, err
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
            w.wait(timeout=10)

    stats = json.loads(err.strip().splitlines()[-1])
    assert stats["claimed"] > 0  # the survivor took over what the dead one held
    decisions = decisions_by_event(client)
    assert len(decisions) == n and all(len(v) == 1 for v in decisions.values())
    assert sum(redis_request_total(client, k) for k in keys) == n  # no double counting
    for k in keys:
        assert redis_request_total(client, k) == n / len(keys)
    assert client.xpending("kw:events", "keywatch")["pending"] == 0
    print(json.dumps({"events": n, "resent": len(lines) - n, "survivor": stats}))
