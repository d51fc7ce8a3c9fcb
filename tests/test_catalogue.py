"""The feature catalogue: one declaration per feature, from which both engines derive."""

from __future__ import annotations

from features.catalogue import (
    CATALOGUE,
    FEATURE_NAMES,
    RING_SIZES,
    Feature,
    ring_reads,
    windowed,
)
from features.contract import Event
from features.extractor import FeatureStream
from features.stores.memory import MemoryStore
from features.windows import W5M


def test_names_are_unique_and_windowed_ones_say_by_whom_over_what() -> None:
    assert len(set(FEATURE_NAMES)) == len(FEATURE_NAMES) == len(CATALOGUE)
    for f in CATALOGUE:
        if f.windowed:
            assert f.window is not None
            assert f.name.endswith(f"by_{f.entity}_{f.window.label}"), f.name


def test_every_window_fits_its_ring_with_its_edge_bucket() -> None:
    for f in CATALOGUE:
        if f.window is not None and f.windowed:
            assert f.window.buckets + 1 <= RING_SIZES[f.window.bucket_s], f.name


def test_ring_reads_cover_exactly_the_windowed_counters() -> None:
    for entity in ("key", "ip"):
        names = [n for r in ring_reads(entity) for n, _ in r.windows]
        assert sorted(names) == sorted(f.name for f in windowed(entity))


def test_a_declared_counter_is_windowed_and_derived() -> None:
    f = Feature("requests_count_by_key_5m", "key", "count", "requests", W5M)
    assert f.windowed
    learned = Feature("tokens_zscore_by_key", "key", "ewm", "tokens", fed_by="normal")
    assert not learned.windowed


def test_the_extractor_builds_exactly_the_catalogue() -> None:
    stream = FeatureStream(MemoryStore())
    for i in range(3):
        fv = stream.process(Event(api_key="sk-cat", timestamp=1.767e9 + i, tokens=10 * i,
                                  source_ip="8.8.8.8", model="gpt-4o"), "k1")
        stream.learn(fv)
        assert list(fv.values) == list(FEATURE_NAMES)
    assert fv.values["requests_count_by_key_5m"] == 3
    assert fv.values["distinct_keys_by_ip_1h"] == 1
