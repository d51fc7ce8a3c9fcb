"""Hostile input and faults: every route and every file reader, probed as an attacker and a
careless operator would.

Each refusal must be a clear 4xx (never a 5xx), leak no raw secret (in the response, the
logs or the store) and change nothing: the state is compared before and after.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import socket
import threading
import time
from collections.abc import Callable, Iterator
from io import StringIO
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import uvicorn
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from features.contract import MAX_JSON_DEPTH, JsonRefused, load_json
from features.extractor import FEATURE_NAMES
from features.stores.memory import MemoryStore
from models.feature_space import model_features
from models.offline import OfflineDetector
from models.registry import ModelIntegrityError, ModelRegistry
from serving.api.app import create_app
from serving.observability.logging_setup import make_handler
from serving.observability.redaction import redact_free_text, redact_path, redact_text
from serving.policy.schema import PolicyError, PolicySource, load_policy
from serving.settings import Settings
from tests.conftest import ADMIN_TOKEN, TEST_SECRET, make_settings

T0 = 1_794_999_960
RAW = "sk-live-HOSTILE0a1b2c3d4e5f6a7b8c9d"
BARE = "Zq8Xw2Lp0Vn4Rt6Yb1Mc3Kd5"  # a raw key with no telltale prefix
SECRETS = (RAW, BARE, "hunter2-redis-password", "HOSTILE0a1b2c3d4e5f6a7b8c9d")
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
INGEST_TOKEN = "ingest-token-7c1e9a3b5d2f"
INGEST = {"Authorization": f"Bearer {INGEST_TOKEN}"}
POLICY = (Path(__file__).resolve().parents[1] / "serving" / "policy" / "default_policy.yaml")


def ev(i: int = 0, key: str = RAW, **extra: Any) -> dict[str, Any]:
    return {"api_key": key, "timestamp": T0 + i, "source_ip": f"203.0.113.{i % 200}",
            "endpoint": "/v1/chat/completions", "tokens": 200, "latency_ms": 80.0,
            "status": 200, "event_id": f"h-{i}", **extra}


def _leaks(text: str | bytes) -> list[str]:
    blob = text.decode(errors="replace") if isinstance(text, bytes) else text
    return [s for s in SECRETS if s in blob]


def _memory_store(app: Any) -> MemoryStore:
    store = app.state.scorer.store
    while not isinstance(store, MemoryStore):
        store = getattr(store, "primary", None) or store.inner  # pragma: no cover
    return store


def state_of(c: TestClient) -> tuple[str, bytes]:
    """A digest of everything a request could change, and the raw bytes to scan for leaks:
    the store's entities, bans, audit trail, allow-list, alerts and the scoring counters."""
    store = _memory_store(c.app)
    with store._lock:
        entities = pickle.dumps(sorted((k, pickle.dumps((v.hash, v.zsets, v.rings)))
                                       for k, v in store._entities.items()
                                       if v.hash or v.zsets or v.rings))  # reads add empties
    views = [c.get(p, headers=AUTH).content for p in
             ("/admin/bans", "/admin/audit", "/admin/allow-list", "/v1/alerts")]
    scored = [line for line in c.get("/metrics").text.splitlines()
              if line.startswith("keywatch_events_scored_total")]
    blob = entities + b"\0".join(views) + "\n".join(scored).encode()
    return hashlib.sha256(blob).hexdigest(), blob


@pytest.fixture
def app_client(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> Iterator[TestClient]:
    settings = make_settings(data_dir=tmp_path, event_log=False, max_body_bytes=64 * 1024)
    with caplog.at_level(logging.DEBUG), TestClient(create_app(settings)) as c:
        assert c.post("/v1/events", json=ev(0)).status_code == 200  # some state to keep
        yield c
    assert not _leaks(caplog.text), "a raw secret reached a log line"


# ---- every route: hostile bodies -------------------------------------------------------------
JSON_ROUTES = [
    ("POST", "/v1/events"), ("POST", "/v1/events:batch"), ("POST", "/v1/check"),
    ("POST", "/admin/bans"), ("POST", "/admin/unban"), ("POST", "/admin/allow-list"),
    ("POST", "/admin/allow-list/remove"), ("POST", "/v1/alerts/al_0123456789abcdef0123/feedback"),
    ("DELETE", f"/v1/suppressions/k_{'0' * 32}/rate_limit"),
]
DEEP = b"[" * 20_000 + b"]" * 20_000  # 40 KB: under the body limit, far over the depth one
HOSTILE_BODIES: dict[str, bytes] = {
    "deep nesting": DEEP,
    "deep nesting, unclosed (the worker's poison)": b"[" * 1161,
    "deep nesting inside an event": json.dumps(ev(1)).encode()[:-1] + b', "x": ' + DEEP + b"}",
    "not UTF-8": b'{"api_key": "\xff\xfe\xfd", "timestamp": 1794999960}',
    "not JSON": b"{api_key: yes",
    "NaN": b'{"api_key": "sk-x-12345678", "latency_ms": NaN}',
    "a bare string": b'"sk-live-HOSTILE0a1b2c3d4e5f6a7b8c9d"',
    "status as a string": json.dumps(ev(2, status="404")).encode(),
    "tokens as a boolean": json.dumps(ev(3, tokens=True)).encode(),
    "a 1970 timestamp": json.dumps(ev(4, timestamp=5)).encode(),
    "milliseconds for seconds": json.dumps(ev(5, timestamp=T0 * 1000)).encode(),
    "year 9999": json.dumps(ev(6, timestamp="9999-01-01T00:00:00Z")).encode(),
    "over-long strings": json.dumps(ev(7, endpoint="/" + "a" * 5000)).encode(),
    "a huge number": json.dumps(ev(8)).encode()[:-1] + b', "tokens": ' + b"9" * 5000 + b"}",
    "null everywhere": json.dumps({k: None for k in ev(9)}).encode(),
    "a list of junk": json.dumps([1, "a", None, [], {}]).encode(),
    "an empty body": b"",
}
CHECK_IGNORES = {"NaN", "status as a string", "tokens as a boolean", "a 1970 timestamp",
                 "milliseconds for seconds", "year 9999", "over-long strings"}
"""Event-shaped bodies whose bad field `/v1/check` does not read (it reads api_key and
source_ip): a valid pre-flight, answered 200."""


@pytest.mark.parametrize(("method", "path"), JSON_ROUTES)
def test_hostile_bodies_get_a_4xx_and_change_nothing(app_client: TestClient, method: str,
                                                     path: str) -> None:
    before, _ = state_of(app_client)
    for name, body in HOSTILE_BODIES.items():
        r = app_client.request(method, path, content=body, headers={
            **AUTH, "content-type": "application/json"})
        if method == "DELETE" and r.status_code < 300:
            continue  # a DELETE takes no body: it is ignored, the route answers as usual
        if path == "/v1/check" and name in CHECK_IGNORES:
            assert r.status_code == 200, (name, r.text[:300])
            before, _ = state_of(app_client)  # a pre-flight that ran (and sent queued writes)
            continue  # the bad field is one the pre-flight does not read: ignored with it
        assert 400 <= r.status_code < 500, (name, path, r.status_code, r.text[:300])
        assert not _leaks(r.content), (name, path, r.text[:300])
        after, blob = state_of(app_client)
        assert after == before, f"{path} changed state after refusing {name!r}"
        assert not _leaks(blob)


def test_refusals_name_the_problem(app_client: TestClient) -> None:
    cases = {
        ("/v1/events:batch", "deep nesting"): "nested deeper than",
        ("/v1/events", "status as a string"): "status",
        ("/v1/events", "tokens as a boolean"): "tokens",
        ("/v1/events", "a 1970 timestamp"): "2000-01-01",
        ("/v1/events", "milliseconds for seconds"): "milliseconds",
        ("/v1/events:batch", "not UTF-8"): "UTF-8",
    }
    for (path, name), words in cases.items():
        body = HOSTILE_BODIES[name]
        if path.endswith(":batch") and body.startswith(b"{"):
            body = b"[" + body + b"]"
        r = app_client.post(path, content=body, headers={"content-type": "application/json"})
        assert 400 <= r.status_code < 500 and words in r.text, (path, name, r.text[:300])


def test_a_batch_over_the_depth_limit_is_a_400_not_a_500(app_client: TestClient) -> None:
    inner = b"[" * (MAX_JSON_DEPTH + 5) + b"]" * (MAX_JSON_DEPTH + 5)
    body = b"[" + json.dumps(ev(11)).encode()[:-1] + b', "x": ' + inner + b"}]"
    r = app_client.post("/v1/events:batch", content=body)
    assert r.status_code == 400 and "nested deeper" in r.json()["error"]
    assert app_client.post("/v1/events:batch", json=[ev(12)]).status_code == 200


def test_wrong_admin_inputs_are_4xx(app_client: TestClient) -> None:
    for body in ({"key": RAW, "duration": 10**30}, {"key": RAW, "duration": "1e999"},
                 {"key": RAW, "duration": -5}, {"ip": "999.1.1.1", "duration": "1h"},
                 {"key": RAW, "duration": "1h", "reason": "x" * 10_000},
                 {"key": True, "duration": "1h"}):
        before, _ = state_of(app_client)
        r = app_client.post("/admin/bans", json=body, headers=AUTH)
        assert r.status_code == 422, (body, r.text)
        assert state_of(app_client)[0] == before
    for q in ("limit=0", "limit=-1", "limit=99999999999999999999", "limit=abc"):
        assert app_client.get(f"/admin/audit?{q}", headers=AUTH).status_code == 422


# ---- body size before the body is read, on every route -------------------------------------
@pytest.fixture
def live_server(tmp_path: Path) -> Iterator[tuple[str, int]]:
    """The app on a real uvicorn server, to send raw bytes (and no body) over a socket."""
    settings = make_settings(data_dir=tmp_path, event_log=False, ingest_token=INGEST_TOKEN)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port,
                                           log_level="warning", access_log=True))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield "127.0.0.1", port
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _headers_only(addr: tuple[str, int], method: str, path: str,
                  extra: str = "") -> tuple[int, float]:
    """Send the headers of a 200 MB request and no body; the status and how long it took."""
    t = time.perf_counter()
    with socket.create_connection(addr, timeout=10) as s:
        s.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {200 * 1024 * 1024}\r\n{extra}\r\n".encode())
        reply = s.recv(4096).decode(errors="replace")
    return int(reply.split(" ", 2)[1]), time.perf_counter() - t


@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/v1/events"), ("POST", "/v1/events:batch"), ("POST", "/v1/check"),
    ("POST", "/admin/bans"), ("POST", "/admin/allow-list"), ("GET", "/admin/bans"),
    ("POST", "/v1/alerts/al_0123456789abcdef0123/feedback"), ("PUT", "/healthz"),
])
def test_a_200mb_body_is_refused_before_it_is_read(live_server: tuple[str, int], method: str,
                                                   path: str) -> None:
    token = f"Authorization: Bearer {INGEST_TOKEN}\r\n" if path.startswith("/v1/") else ""
    status, seconds = _headers_only(live_server, method, path, token)
    assert status == 413, (path, status)  # answered without a byte of the body sent
    assert seconds < 5
    if path in ("/v1/events", "/v1/events:batch", "/v1/check"):  # without the token: 401
        assert _headers_only(live_server, method, path)[0] == 401


def test_a_chunked_body_is_cut_off_at_the_limit(app_client: TestClient) -> None:
    body = json.dumps({"key": RAW, "duration": "1h", "reason": "x" * 100_000}).encode()
    chunks = iter([body[i:i + 4096] for i in range(0, len(body), 4096)])
    r = app_client.post("/admin/bans", content=chunks, headers=AUTH)
    assert r.status_code == 413
    assert not app_client.get("/admin/bans", headers=AUTH).json()["bans"]


# ---- secrets ---------------------------------------------------------------------------------
def test_check_needs_the_ingestion_token_when_one_is_set(tmp_path: Path) -> None:
    settings = make_settings(data_dir=tmp_path, event_log=False, ingest_token=INGEST_TOKEN)
    with TestClient(create_app(settings)) as c:
        assert c.post("/v1/check", json={"api_key": RAW}).status_code == 401
        r = c.post("/v1/check", json={"api_key": RAW}, headers=INGEST)
        assert r.status_code == 200 and r.json()["allowed"] is True


@pytest.mark.parametrize("name", ["admin_token", "ingest_token", "model_signing_key"])
@pytest.mark.parametrize("value", ["x", "short-token", "aaaaaaaaaaaaaaaaaaaaaaaa", ""])
def test_weak_tokens_are_refused_at_start(name: str, value: str) -> None:
    with pytest.raises(ValueError, match="too weak"):  # SettingsError, in pydantic's wrapper
        Settings(secret=TEST_SECRET, **{name: value})


def test_a_raw_key_in_a_ban_reason_is_never_stored_nor_returned(
        app_client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    reason = f"leaked in a ticket: {BARE} (also {RAW}); see k_{'ab' * 16}"
    r = app_client.post("/admin/bans", json={"ip": "198.51.100.7", "duration": "1h",
                                             "reason": reason}, headers=AUTH)
    assert r.status_code == 200
    for path in ("/admin/bans", "/admin/audit"):
        text = app_client.get(path, headers=AUTH).text
        assert not _leaks(text) and f"k_{'ab' * 16}" in text, text  # key ids stay readable
    assert not _leaks(state_of(app_client)[1])
    assert not _leaks(caplog.text)


def test_feedback_notes_lose_raw_keys(app_client: TestClient) -> None:
    for i in range(40):  # a key in a loop raises an alert to give feedback on
        app_client.post("/v1/events:batch", json=[ev(1000 + i * 50 + j, status=401)
                                                  for j in range(50)])
    alerts = app_client.get("/v1/alerts", headers=AUTH).json()["alerts"]
    assert alerts
    r = app_client.post(f"/v1/alerts/{alerts[0]['alert_id']}/feedback", headers=AUTH,
                        json={"verdict": "confirmed", "note": f"key {BARE} was leaked"})
    assert r.status_code in (200, 201) and not _leaks(r.text)
    assert not _leaks(state_of(app_client)[1])


def test_readyz_never_shows_a_redis_password(tmp_path: Path, redis_url: str) -> None:
    for url in (f"{redis_url}?password=hunter2-redis-password",
                redis_url.replace("redis://", "redis://:hunter2-redis-password@")):
        settings = make_settings(data_dir=tmp_path, event_log=False, store=url,
                                 redis_retry_interval_s=0.1)
        with TestClient(create_app(settings)) as c:
            r = c.get("/readyz")
            assert r.status_code in (200, 503) and "redis" in r.text
            assert not _leaks(r.text), r.text


def test_redaction_covers_urls_free_text_and_paths() -> None:
    assert "hunter2" not in redact_text("redis://h:6379/0?password=hunter2x&db=1")
    assert "hunter2" not in redact_text("rediss://user:hunter2x@h:6380")
    assert "hunter2" not in redact_text("https://h/x?token=hunter2x")
    assert BARE not in redact_free_text(f"the key {BARE} leaked")
    kid = f"k_{'0f' * 16}"
    assert redact_free_text(f"ban {kid}") == f"ban {kid}"
    assert BARE not in redact_path(f"/v1/keys/{BARE}?api_key={RAW}")
    assert redact_path(f"/v1/keys/{kid}") == f"/v1/keys/{kid}"


def test_the_access_log_masks_raw_keys_in_paths(live_server: tuple[str, int]) -> None:
    stream = StringIO()
    handler = make_handler("text", stream)
    access = logging.getLogger("uvicorn.access")
    access.addHandler(handler)
    old_level = access.level
    access.setLevel(logging.INFO)
    try:
        with socket.create_connection(live_server, timeout=10) as s:
            for path in (f"/v1/keys/{BARE}", f"/v1/keys/{RAW}", f"/healthz?api_key={BARE}"):
                s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                s.recv(65536)
        deadline = time.monotonic() + 5
        while stream.getvalue().count("\n") < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        access.removeHandler(handler)
        access.setLevel(old_level)
    text = stream.getvalue()
    assert text.count("/v1/keys/") == 2 and not _leaks(text), text


# ---- policy reload ---------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "content"), [
    ("invalid UTF-8", POLICY.read_bytes() + b"\n# caf\xe9 \xff\n"),
    ("a NUL byte", POLICY.read_bytes() + b"\n\x00\n"),
    ("NaN ban length", POLICY.read_bytes().replace(b"ladder:", b"ladder: [.nan]\n  _old:", 1)),
    ("infinite threshold", b"rules:\n- id: r\n  type: threshold\n  feature: x\n"
                           b"  above: .inf\n  severity: high\n"),
    ("alias bomb", b"a: &a [x,x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a]\n"
                   b"c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c]\n"
                   b"e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]\nrules: []\n"),
    ("deep nesting", b"rules: " + b"[" * 20_000 + b"]" * 20_000 + b"\n"),
    ("over a megabyte", b"rules: []\n# " + b"x" * (2 * 1024 * 1024) + b"\n"),
    ("not a mapping", b"- just\n- a list\n"),
    ("a directory", None),
])
def test_a_broken_policy_is_refused_and_reported(tmp_path: Path, name: str,
                                                 content: bytes | None,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "policy.yaml"
    path.write_bytes(POLICY.read_bytes())
    with pytest.raises(PolicyError):
        target = tmp_path / "broken.yaml"
        if content is None:
            target.mkdir()
        else:
            target.write_bytes(content)
        load_policy(target)
    settings = make_settings(data_dir=tmp_path / "d", event_log=False, policy=path)
    with caplog.at_level(logging.ERROR), TestClient(create_app(settings)) as c:
        source = c.app.state.scorer.policy_source  # type: ignore[attr-defined]
        source.check_interval_s = 0.0
        assert c.post("/v1/events", json=ev(20)).status_code == 200
        before = c.get("/admin/policy", headers=AUTH).json()
        path.unlink()
        if content is None:
            path.mkdir()
        else:
            path.write_bytes(content)
        os.utime(path, (time.time() + 5, time.time() + 5))
        r = c.post("/v1/events:batch", json=[ev(21 + i) for i in range(20)])
        assert r.status_code == 200 and len(r.json()) == 20  # scored under the old policy
        after = c.get("/admin/policy", headers=AUTH).json()
        assert after["version"] == before["version"] and after["last_error"], after
        assert c.get("/readyz").json()["policy"]["last_error"] == after["last_error"]
    assert "policy reload refused" in caplog.text


def test_a_batch_is_scored_under_one_policy_version(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_bytes(POLICY.read_bytes())
    source = PolicySource(path, check_interval_s=0.0)
    with source.pinned() as held:
        path.write_text(POLICY.read_text() + "\ndescription: edited\n")
        os.utime(path, (time.time() + 5, time.time() + 5))
        assert source.current() is held and source.version == 1
    assert source.current() is not held and source.version == 2


# ---- models ----------------------------------------------------------------------------------
NAMES = model_features(FEATURE_NAMES)


def _fit(seed: int) -> OfflineDetector:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(rng.normal(size=(400, len(NAMES))), columns=NAMES)
    return OfflineDetector(n_quantiles=51).fit(frame, NAMES, n_estimators=10,
                                               training_window=("2026-11-01T00:00:00Z",
                                                                "2026-11-02T00:00:00Z"))


SIGNING_KEY = "model-signing-key-4f9c2e7a1b"


@pytest.fixture(scope="module")
def two_models() -> tuple[OfflineDetector, OfflineDetector]:
    return _fit(0), _fit(1)


def test_a_corrupt_promoted_model_falls_back_and_readyz_says_degraded(
        tmp_path: Path, two_models: tuple[OfflineDetector, OfflineDetector]) -> None:
    registry = ModelRegistry(tmp_path / "models", signing_key=SIGNING_KEY)
    old = registry.save(two_models[0], version="iforest-old")
    registry.promote(old)
    new = registry.save(two_models[1], version="iforest-new")
    registry.promote(new)
    model_file = tmp_path / "models" / "versions" / new / "model.joblib"
    model_file.write_bytes(model_file.read_bytes()[:-100] + b"\0" * 100)  # corrupted on disk

    settings = make_settings(data_dir=tmp_path / "d", event_log=False,
                             model_dir=tmp_path / "models", model_signing_key=SIGNING_KEY)
    with TestClient(create_app(settings)) as c:
        r = c.get("/readyz")
        body = r.json()
        assert r.status_code == 503 and body["status"] == "degraded", body
        assert body["models"]["offline"] == old and new in body["model_error"]
        assert c.post("/v1/events", json=ev(30)).json()["model_versions"]["offline"] == old


def test_a_swapped_model_and_checksum_are_refused_with_a_signing_key(
        tmp_path: Path, two_models: tuple[OfflineDetector, OfflineDetector]) -> None:
    root = tmp_path / "models"
    registry = ModelRegistry(root, signing_key=SIGNING_KEY)
    good = registry.save(two_models[0], version="iforest-good")
    registry.promote(good)
    # an attacker without the key writes their own model with a matching checksum
    attacker = ModelRegistry(root)  # no key: computes checksums and integrity like we do
    forged = attacker.save(two_models[1], version="iforest-forged")
    attacker.promote(forged)
    with pytest.raises(ModelIntegrityError, match="unsigned"):
        registry.load(forged)
    # ... or swaps the pickle of the good version and rewrites its manifest's checksum
    manifest_path = root / "versions" / good / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    swapped = (root / "versions" / forged / "model.joblib").read_bytes()
    (root / "versions" / good / "model.joblib").write_bytes(swapped)
    manifest["files"]["model.joblib"]["sha256"] = hashlib.sha256(swapped).hexdigest()
    manifest.pop("integrity")
    from models.registry import _manifest_digest
    manifest["integrity"] = _manifest_digest(manifest)
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ModelIntegrityError, match="another key"):
        registry.load(good)
    assert registry.load_fallback(NAMES) is None  # nothing trustworthy is left


# ---- every file reader -----------------------------------------------------------------------
def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


GARBAGE: dict[str, bytes] = {
    "invalid UTF-8": b"\xff\xfe\xfa garbage \x80\n",
    "deep nesting": b"[" * 200_000 + b"\n",
    "truncated JSON": b'{"api_key": "sk-live-HOSTILE0a1b2c3d4e5f6a7b8c9d", "timest\n',
    "wrong types": json.dumps(ev(40, status="404", tokens=True)).encode() + b"\n",
    "NUL bytes": b"\x00" * 1000 + b"\n",
}


def _replay_reader(tmp: Path, data: bytes) -> Callable[[], Any]:
    from serving.engine.replay import iter_records, parse_record

    path = _write(tmp / "events.jsonl", data + json.dumps(ev(41)).encode() + b"\n")

    def run() -> Any:
        out = []
        for _, rec in iter_records(path):
            try:
                out.append(parse_record(rec))
            except ValueError as exc:
                out.append(str(exc))
        assert isinstance(out[0], str), out  # the bad line is that line's error
        assert not isinstance(out[-1], str), out  # and the good line after it is read
        return out

    return run


def _jsonl_reader(tmp: Path, data: bytes) -> Callable[[], Any]:
    from serving.engine.jsonl_writer import read_jsonl

    path = _write(tmp / "alerts.jsonl", data + b'{"ok": 1}\n')
    return lambda: {"ok": 1} in read_jsonl([path]) or pytest.fail("good line lost")


def _event_log_reader(tmp: Path, data: bytes) -> Callable[[], Any]:
    from serving.engine.event_log import read_event_log

    _write(tmp / "events" / "date=2026-11-20" / "a.jsonl", data + b'{"timestamp": 5}\n')
    return lambda: (any(r.get("timestamp") == 5 for r in read_event_log(tmp / "events"))
                    or pytest.fail("good line lost"))


def _policy_reader(tmp: Path, data: bytes) -> Callable[[], Any]:
    path = _write(tmp / "policy.yaml", data)

    def run() -> None:
        with pytest.raises(PolicyError):
            load_policy(path)

    return run


def _price_reader(tmp: Path, data: bytes) -> Callable[[], Any]:
    from features.pricing import load_price_file

    path = _write(tmp / "prices.yaml", data)

    def run() -> None:
        with pytest.raises(ValueError, match="price file"):
            load_price_file(path)

    return run


def _ingest_reader(tmp: Path, data: bytes) -> Callable[[], Any]:
    from serving.cli.worker import ingest_file

    path = _write(tmp / "events.jsonl", data + json.dumps(ev(42)).encode() + b"\n")

    class Pipe:  # the Redis pipeline interface ingest_file uses, recording what it sends
        def __init__(self) -> None:
            self.sent: list[dict[str, str]] = []

        def pipeline(self, transaction: bool = False) -> Pipe:
            return self

        def xadd(self, stream: str, fields: dict[str, str], **_: Any) -> None:
            self.sent.append(fields)

        def execute(self) -> None:
            return None

    def run() -> None:
        counts = ingest_file(Pipe(), path)  # type: ignore[arg-type]
        assert counts["ingested"] >= 1

    return run


def _manifest_reader(tmp: Path, data: bytes) -> Callable[[], Any]:
    registry = ModelRegistry(tmp / "models")
    _write(tmp / "models" / "versions" / "iforest-x" / "manifest.json", data)
    _write(tmp / "models" / "current", data)

    def run() -> None:
        with pytest.raises(ModelIntegrityError):
            registry.manifest("iforest-x")
        with pytest.raises(ModelIntegrityError):
            registry.current_version()
        assert registry.list()[0].error

    return run


def _snapshot_reader(tmp: Path, data: bytes) -> Callable[[], Any]:
    from features.stores.snapshot import MAGIC, SnapshotError, read_snapshot

    path = _write(tmp / "state.snapshot", MAGIC + data)

    def run() -> None:
        with pytest.raises(SnapshotError):
            read_snapshot(path)

    return run


def _checkpoint_reader(tmp: Path, data: bytes) -> Callable[[], Any]:
    from models.detectors import load_population

    path = _write(tmp / "population.ckpt", data)
    _write(Path(str(path) + ".sha256"), hashlib.sha256(data).hexdigest().encode())
    return lambda: load_population(path, NAMES)  # refused (logged): a fresh model starts


def _parquet_reader(tmp: Path, data: bytes) -> Callable[[], Any]:
    from serving.engine.replay import count_lines, iter_records, parse_record

    broken = _write(tmp / "broken.parquet", b"PAR1" + data)
    frame = pd.DataFrame([ev(43, status="404"), ev(44)])  # a string status column
    good = tmp / "events.parquet"
    frame.astype({"status": str}).to_parquet(good)

    def run() -> None:
        with pytest.raises(ValueError, match="not a readable Parquet file"):
            count_lines(broken)
        with pytest.raises(ValueError, match="not a readable Parquet file"):
            list(iter_records(broken))
        rows = [rec for _, rec in iter_records(good)]
        with pytest.raises(ValueError, match="status"):
            parse_record(rows[0])

    return run


READERS = {"replay": _replay_reader, "parquet": _parquet_reader, "jsonl": _jsonl_reader,
           "event log": _event_log_reader,
           "policy": _policy_reader, "prices": _price_reader, "ingest": _ingest_reader,
           "model manifest": _manifest_reader, "snapshot": _snapshot_reader,
           "population checkpoint": _checkpoint_reader}


@pytest.mark.parametrize("reader", list(READERS))
@pytest.mark.parametrize("garbage", list(GARBAGE))
def test_every_file_reader_refuses_garbage_with_its_own_error(
        tmp_path: Path, reader: str, garbage: str) -> None:
    run = READERS[reader](tmp_path, GARBAGE[garbage])
    if reader in ("policy", "prices") and garbage == "wrong types":
        return  # valid YAML of a mapping: covered by their own schema tests
    run()


def test_load_json_limits() -> None:
    assert load_json(b'{"a": [1, {"b": 2}]}') == {"a": [1, {"b": 2}]}
    for bad in (DEEP, b"[" * 1161, b"\xff", b'{"a": NaN}', b'{"a": Infinity}'):
        with pytest.raises(JsonRefused):
            load_json(bad)
    with pytest.raises(JsonRefused, match="over the limit"):
        load_json(b"[1]" * 100, max_bytes=10)


# ---- the dead-letter worker ------------------------------------------------------------------
def _scan_redis(client: Any) -> str:
    parts = []
    for key in client.scan_iter(count=1000):
        parts.append(str(key))
        parts.append(repr(client.dump(key)))
        if client.type(key) in ("stream", b"stream"):
            parts.extend(repr(f) for _, f in client.xrange(key))
    return "\n".join(parts)


def test_a_poison_entry_goes_to_the_dead_letters_and_the_rest_is_scored(
        redis_url: str, tmp_path: Path) -> None:
    import redis as redis_lib

    from serving.cli.worker import WorkerConfig, build_worker

    client = redis_lib.Redis.from_url(redis_url, decode_responses=True)
    for i in range(30):
        client.xadd("kw:events", {"event": json.dumps(ev(100 + i, key=f"{RAW}-{i % 3}"))})
        if i == 10:
            client.xadd("kw:events", {"event": "[" * 1161})  # the poison entry
        if i == 20:  # an entry whose workers keep dying while they hold it
            crasher = client.xadd("kw:events", {"event": json.dumps(ev(999, key=BARE))})
    settings = make_settings(store=redis_url, data_dir=tmp_path, event_log=False)
    config = WorkerConfig(consumer="survivor", block_ms=50, claim_idle_ms=100,
                          max_deliveries=3)
    worker = build_worker(settings, config)
    worker.ensure_group()
    # one consumer took everything and died; two more took the crasher in turn and died
    client.xreadgroup("keywatch", "dead-0", {"kw:events": ">"}, count=100)
    for n in (1, 2):
        client.xclaim("kw:events", "keywatch", f"dead-{n}", 0, [crasher])
    time.sleep(0.15)
    stats = worker.run(idle_exit_s=0.5)
    worker.store.close()

    assert stats.scored == 30 and stats.dead_letters == 2, stats
    assert client.xpending("kw:events", "keywatch")["pending"] == 0
    letters = {f["reason"]: f for _, f in client.xrange("kw:events:dead")}
    assert set(letters) == {"refused", "gave_up"}
    assert "nested deeper" in letters["refused"]["error"]
    assert int(letters["gave_up"]["deliveries"]) >= 3
    assert "crashed" in letters["gave_up"]["error"]
    assert json.loads(letters["gave_up"]["event"])["key_id"].startswith("k_")
    metric = worker.metrics.registry.get_sample_value
    assert metric("keywatch_worker_dead_letters_total", {"reason": "refused"}) == 1
    assert metric("keywatch_worker_dead_letters_total", {"reason": "gave_up"}) == 1
    assert not _leaks(_scan_redis(client)), "a raw key stayed in Redis"

    import subprocess
    import sys
    env = {**os.environ, "KEYWATCH_SECRET": TEST_SECRET, "KEYWATCH_DATA_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "serving.cli.main", "worker", "--store",
                          redis_url, "--dead-letters"], env=env, capture_output=True,
                         text=True, timeout=60, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    listed = [json.loads(line) for line in out.stdout.splitlines()]
    assert {d["reason"] for d in listed} == {"refused", "gave_up"}
    assert json.loads(out.stderr.strip().splitlines()[-1])["dead_letters"] == 2
    assert not _leaks(out.stdout + out.stderr)


# ---- property-based fuzz of the JSON bodies --------------------------------------------------
_scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
            | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=30)
            | st.sampled_from([RAW, BARE, "", " ", "404", "1970-01-01T00:00:00Z", "1e999",
                               "::1", "203.0.113.9", "10.0.0.0/8", "permanent", "30m"]))
_json = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)
_event_fields = {"api_key": st.sampled_from([RAW, BARE]) | _json,
                 "timestamp": st.floats(9e8, 5e9) | st.integers(0, 2**40) | _json,
                 "status": st.integers(0, 1000) | _json, "tokens": st.integers(-5, 10**9) | _json,
                 "latency_ms": st.floats(allow_nan=False) | _json,
                 "source_ip": st.sampled_from(["203.0.113.9", "::1", "not-an-ip"]) | _json,
                 "endpoint": st.text(max_size=300) | _json, "event_id": _json,
                 "lat": st.floats(-100, 100) | _json, "lon": st.floats(-200, 200) | _json,
                 "country": st.text(max_size=3) | _json, "asn": _json}
_event = st.fixed_dictionaries({}, optional=_event_fields)
_admin = st.fixed_dictionaries({}, optional={
    "key": st.sampled_from([RAW, BARE]) | _json, "ip": _json, "cidr": _json,
    "duration": st.integers(-10, 10**12) | _json, "permanent": _json,
    "reason": st.sampled_from([f"leaked {BARE}", f"see {RAW}"]) | _json,
    "verdict": st.sampled_from(["confirmed", "false_positive"]) | _json, "note": _json})
_bodies = (_json | _event | st.lists(_event, max_size=4)
           | st.fixed_dictionaries({"events": st.lists(_event, max_size=3)}) | _admin)
_routes = st.sampled_from([p for m, p in JSON_ROUTES if m == "POST"])


@given(route=_routes, body=_bodies)
@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
def test_fuzzed_json_bodies_never_5xx_leak_or_half_apply(app_client: TestClient, route: str,
                                                         body: Any) -> None:
    before, _ = state_of(app_client)
    r = app_client.post(route, content=json.dumps(body).encode(),
                        headers={**AUTH, "content-type": "application/json"})
    assert r.status_code < 500, (route, body, r.text[:300])
    assert not _leaks(r.content), (route, r.text[:300])
    after, blob = state_of(app_client)
    if r.status_code >= 400:
        assert after == before, (route, body, r.status_code)
    assert not _leaks(blob)


# ---- a poisoned key in Redis -----------------------------------------------------------------
def _poison_key_hash(client: Any, key_id: str) -> None:
    """Replace the key's state hash by a string: every script touching it gets WRONGTYPE."""
    [name] = [k for k in client.scan_iter(f"*{{k:{key_id}}}:h")]
    client.delete(name)
    client.set(name, "not a hash")


def test_one_corrupted_key_in_redis_does_not_take_the_others_down(
        redis_url: str, tmp_path: Path) -> None:
    import redis as redis_lib

    client = redis_lib.Redis.from_url(redis_url, decode_responses=True)
    settings = make_settings(store=redis_url, data_dir=tmp_path, event_log=False)
    with TestClient(create_app(settings)) as c:
        victim = c.post("/v1/events", json=ev(50, key=BARE)).json()["key_id"]
        c.post("/v1/events", json=ev(51, key=BARE))  # its learning is queued for later
        _poison_key_hash(client, victim)
        assert c.post("/v1/events", json=ev(52, key=BARE)).status_code == 503
        others = [c.post("/v1/events", json=ev(60 + i, key=f"{RAW}-{i}")).status_code
                  for i in range(5)]
        assert others == [200] * 5  # the poisoned update was dropped, not requeued for ever
        assert c.get("/readyz").status_code == 200


def test_the_worker_retries_an_entry_the_store_refuses_then_dead_letters_it(
        redis_url: str, tmp_path: Path) -> None:
    import redis as redis_lib

    from serving.cli.worker import WorkerConfig, build_worker

    client = redis_lib.Redis.from_url(redis_url, decode_responses=True)
    settings = make_settings(store=redis_url, data_dir=tmp_path, event_log=False)
    config = WorkerConfig(consumer="w", block_ms=50, claim_idle_ms=100, max_deliveries=3)
    client.xadd("kw:events", {"event": json.dumps(ev(70, key=BARE))})
    worker = build_worker(settings, config)
    assert worker.run(idle_exit_s=0.3).scored == 1
    victim = json.loads(client.xrange("kw:decisions")[0][1]["decision"])["key_id"]
    _poison_key_hash(client, victim)
    client.xadd("kw:events", {"event": json.dumps(ev(71, key=BARE))})
    for i in range(10):
        client.xadd("kw:events", {"event": json.dumps(ev(80 + i, key=f"{RAW}-{i}"))})
    stats = worker.run(idle_exit_s=1.5)
    worker.store.close()
    assert stats.scored == 1 + 10 and stats.retries == 2 and stats.dead_letters == 1, stats
    [(_, letter)] = client.xrange("kw:events:dead")
    assert letter["reason"] == "gave_up" and "WRONGTYPE" in letter["error"]
    assert letter["deliveries"] == "3" and json.loads(letter["event"])["key_id"] == victim
    assert client.xpending("kw:events", "keywatch")["pending"] == 0
    assert not _leaks(_scan_redis(client))


def test_the_population_checkpoint_is_signed_and_a_forged_one_is_refused(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """With a model signing key the service signs the population model it checkpoints at
    shutdown and loads it back on restart; a checkpoint written without the key (a
    consistent pickle and digest, planted in the data directory) is refused before it is
    unpickled, and the service starts a fresh population model."""
    from models.integrity import atomic_write_bytes, dump_bytes, sha256_bytes
    from models.online import PopulationDetector

    settings = make_settings(data_dir=tmp_path / "d", event_log=False,
                             model_signing_key=SIGNING_KEY)
    with TestClient(create_app(settings)) as c:
        for i in range(40):
            assert c.post("/v1/events", json=ev(i)).status_code == 200
        learned = c.app.state.scorer.detectors.population.n_learned  # type: ignore[attr-defined]
    assert learned > 0
    with TestClient(create_app(settings)) as c:
        restored = c.app.state.scorer.detectors.population  # type: ignore[attr-defined]
        assert restored.n_learned == learned
    forged = dump_bytes(PopulationDetector(seed=9))
    atomic_write_bytes(settings.population_checkpoint, forged)
    settings.population_checkpoint.with_name("population.ckpt.sha256").write_text(
        f"{sha256_bytes(forged)}  population.ckpt\n")
    with caplog.at_level(logging.ERROR), TestClient(create_app(settings)) as c:
        fresh = c.app.state.scorer.detectors.population  # type: ignore[attr-defined]
        assert fresh.n_learned == 0 and fresh.seed != 9
    assert "not signed with the configured model signing key" in caplog.text


@pytest.mark.parametrize("route", ["/admin/bans", "/v1/events"])
@pytest.mark.parametrize("secret", [RAW, BARE])
def test_a_key_in_the_address_field_is_refused_without_being_echoed(
        app_client: TestClient, route: str, secret: str) -> None:
    """A raw key pasted into the address field is a 422 naming the field, and the answer
    never repeats the value (found by the fuzz test above)."""
    body = {"ip": secret, "duration": "5m"} if route.startswith("/admin") else \
        {"api_key": "sk-live-another-key-0000000000", "timestamp": time.time(),
         "source_ip": secret}
    r = app_client.post(route, json=body, headers=AUTH)
    assert r.status_code == 422, r.text
    assert "not an IPv4 or IPv6 address" in r.text
    assert not _leaks(r.content), r.text
