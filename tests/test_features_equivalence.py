"""One definition of every feature: streaming on Redis, batch on memory and the
vectorised twin agree.

Random event histories (keys, public/private/IPv6/unknown addresses, gaps from 10 ms to
days, statuses, sizes, models, user agents, gateway-supplied geo) go through
(a) the streaming `Scorer` on a real Redis server and (b) `features.batch` on a memory
store, and must give the same vectors to 1e-9. The batch side learns exactly where the
scorer learned (the scorer does not learn from events it flags).
"""

from __future__ import annotations

import math
import uuid

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from features.batch import batch_features
from features.contract import Event
from features.extractor import FEATURE_NAMES, FeatureExtractor, FeatureStream, FeatureVector
from features.keys import KeyHasher
from features.stores.base import EntityOps
from features.stores.memory import MemoryStore
from features.stores.redis_store import RedisStore
from features.twin import twin_features
from serving.engine.scorer import Scorer

SECRET = "equivalence-secret-0123456789"
T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z

IPS = ["8.8.8.8", "81.2.69.160", "1.2.3.4", "5.9.0.1", "103.6.84.1", "52.94.76.1",
       "10.0.0.7", "192.168.1.20", "127.0.0.1", "100.64.3.3", "2001:4860:4860::8888", "::1",
       "fe80::1", "2a01:4f8::1", "240.0.0.1", "198.51.100.7", None]

gaps = st.one_of(st.floats(0.01, 5.0), st.floats(5.0, 3600.0), st.floats(3600.0, 3 * 86400.0))
gateway_geo = st.one_of(
    st.none(),
    st.fixed_dictionaries({"country": st.sampled_from(["DE", "SG", "US", "BR"])}),
    st.fixed_dictionaries({"lat": st.floats(-60, 60), "lon": st.floats(-170, 170),
                           "asn": st.sampled_from(["AS16509", "3320", "Example ISP"])}),
)
event_spec = st.fixed_dictionaries({
    "key": st.integers(0, 3),
    "gap": gaps,
    "ip": st.sampled_from(IPS),
    "status": st.sampled_from([200, 200, 201, 401, 403, 429, 500]),
    "tokens": st.one_of(st.sampled_from([0, 10, 10, 250]), st.integers(0, 100_000)),
    "split": st.one_of(st.none(), st.floats(0.0, 1.0)),
    "model": st.sampled_from([None, "gpt-4o", "gpt-4o-mini", "claude"]),
    "ua": st.sampled_from(["", "openai-python/1.54.3", "curl/8.5", "Mozilla/5.0 " + "x" * 300]),
    "endpoint": st.sampled_from(["/v1/chat/completions", "/v1/embeddings", "/"]),
    "latency": st.floats(0.0, 30_000.0),
    "geo": gateway_geo,
})


def to_rows(specs: list[dict]) -> list[dict]:
    rows, ts = [], T0
    for s in specs:
        ts += s["gap"]
        row = {"api_key": f"sk-eq-{s['key']}", "timestamp": ts, "endpoint": s["endpoint"],
               "status": s["status"], "tokens": s["tokens"], "latency_ms": s["latency"],
               "source_ip": s["ip"], "user_agent": s["ua"], "model": s["model"]}
        if s["split"] is not None:
            row["prompt_tokens"] = int(s["tokens"] * s["split"])
            row["completion_tokens"] = s["tokens"] - row["prompt_tokens"]
            row["tokens"] = 0  # filled from the split by the contract
        row.update(s["geo"] or {})
        rows.append({k: v for k, v in row.items() if v is not None})
    return rows


class RecordingExtractor(FeatureExtractor):
    """Counts the events the scorer learned from."""

    def __init__(self) -> None:
        super().__init__()
        self.learned = 0

    def learn_ops(self, fv: FeatureVector) -> list[EntityOps]:
        self.learned += 1
        return super().learn_ops(fv)


def assert_same(a: dict[str, float], b: dict[str, float], where: str) -> None:
    for name in FEATURE_NAMES:
        x, y = a[name], b[name]
        assert math.isfinite(x) and math.isfinite(y), (where, name, x, y)
        assert math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-9), (where, name, x, y)


@settings(max_examples=60, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.lists(event_spec, min_size=1, max_size=30))
def test_streaming_on_redis_equals_batch_on_memory(redis_url: str, specs: list[dict]) -> None:
    rows = to_rows(specs)
    hasher = KeyHasher(SECRET)
    extractor = RecordingExtractor()
    store = RedisStore(redis_url, namespace=f"eq-{uuid.uuid4().hex[:12]}")
    scorer = Scorer(store=store, hasher=hasher, extractor=extractor)
    streamed: list[FeatureVector] = []
    learned: list[bool] = []
    try:
        for row in rows:
            before = extractor.learned
            _, fv = scorer.score_with_features(Event(**row))
            streamed.append(fv)
            learned.append(extractor.learned > before)
    finally:
        store.close()

    frame = pd.DataFrame(rows)
    batch = batch_features(
        frame, hasher=hasher, learn=lambda i, fv: learned[i],
        # event time spans weeks here; Redis TTLs run on wall-clock time and never fire
        store=MemoryStore(idle_ttl_s=math.inf),
    )
    assert list(batch.columns) == list(FEATURE_NAMES)
    for i, fv in enumerate(streamed):
        assert list(fv.values) == list(FEATURE_NAMES)
        assert_same(fv.values, batch.iloc[i].to_dict(), f"event {i}")


def test_two_extractors_sharing_one_redis_see_the_same_state(redis_url: str) -> None:
    specs = [{"key": i % 3, "gap": 0.5 + (i % 7) * 3.0, "ip": IPS[(i * 5) % 6],
              "status": 401 if i % 9 == 0 else 200, "tokens": 100 * (i % 4), "split": None,
              "model": ["gpt-4o", None, "claude"][i % 3], "ua": "ua", "endpoint": "/v1/chat",
              "latency": 100.0 + i, "geo": None} for i in range(120)]
    rows = to_rows(specs)
    hasher = KeyHasher(SECRET)
    ns = f"shared-{uuid.uuid4().hex[:8]}"
    replicas = [FeatureStream(RedisStore(redis_url, namespace=ns), FeatureExtractor())
                for _ in range(2)]
    single = FeatureStream(MemoryStore(), FeatureExtractor())
    try:
        for i, row in enumerate(rows):
            event = Event(**row)
            key_id = hasher.key_id(event.api_key)
            replica = replicas[i % 2]  # interleave: every other event on the other replica
            fv = replica.process(event, key_id)
            replica.learn(fv)
            replica.flush()  # learned baselines are shared at once (counts never wait)
            ref = single.process(event, key_id)
            single.learn(ref)
            single.flush()
            assert_same(fv.values, ref.values, f"event {i}")
        assert fv.values["requests_count_by_key_24h"] == 40
        assert fv.values["distinct_models_by_key_24h"] == 1
    finally:
        for r in replicas:
            r.store.close()


# ---- the vectorised twin: whole batches against the stream, event by event -----------
@settings(max_examples=60, deadline=None, database=None)
@given(st.lists(event_spec, min_size=1, max_size=40), st.lists(st.booleans(), min_size=40,
                                                               max_size=40))
def test_vectorised_twin_equals_the_stream(specs: list[dict], judged: list[bool]) -> None:
    """Random histories (several events of one key or address inside the batch), with a
    random set of events judged normal: the twin's columns equal the stream's vectors."""
    frame = pd.DataFrame(to_rows(specs))
    learned = judged[: len(frame)]
    hasher = KeyHasher(SECRET)
    streamed = batch_features(frame, hasher=hasher, learn=lambda i, fv: learned[i],
                              store=MemoryStore(idle_ttl_s=math.inf))
    twin = twin_features(frame, hasher=hasher, learned=learned)
    assert list(twin.columns) == list(FEATURE_NAMES)
    for i in range(len(frame)):
        assert_same(streamed.iloc[i].to_dict(), twin.iloc[i].to_dict(), f"event {i}")


def test_twin_over_a_simulated_day_equals_the_stream(tmp_path) -> None:
    """Realistic traffic (tenants, incidents, travel, stuffing): every feature, every event."""
    from training.events_io import load_events
    from training.simulator import simulate

    summary = simulate(tmp_path, keys=8, days=1, seed=3)
    df = load_events(summary.events_path, hasher=KeyHasher(SECRET)).iloc[:6000]
    streamed = batch_features(df, key_id_column="key_id",
                              store=MemoryStore(idle_ttl_s=math.inf))
    twin = twin_features(df, key_id_column="key_id")
    diff = (twin - streamed).abs().to_numpy()
    scale = pd.concat([twin.abs(), streamed.abs()]).groupby(level=0).max().to_numpy()
    worst = (diff / pd.DataFrame(scale).clip(lower=1.0).to_numpy()).max(axis=0)
    bad = {name: w for name, w in zip(FEATURE_NAMES, worst, strict=True) if w > 1e-9}
    assert not bad


def test_twin_refuses_events_out_of_order_and_names_a_bad_row() -> None:
    rows = to_rows([{"key": 0, "gap": 1.0, "ip": "8.8.8.8", "status": 200, "tokens": 5,
                     "split": None, "model": None, "ua": "", "endpoint": "/",
                     "latency": 1.0, "geo": None}] * 3)
    frame = pd.DataFrame(rows)
    hasher = KeyHasher(SECRET)
    with pytest.raises(ValueError, match="time order"):
        twin_features(frame.iloc[::-1], hasher=hasher)
    bad = frame.copy()
    bad.loc[1, "status"] = 700
    with pytest.raises(ValueError, match="row 1: status"):
        twin_features(bad, hasher=hasher)
    bad = frame.copy()
    bad.loc[2, "source_ip"] = "not-an-address"
    with pytest.raises(ValueError, match="row 2: source_ip"):
        twin_features(bad, hasher=hasher)
