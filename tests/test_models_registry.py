"""ModelRegistry: manifests, integrity checks, atomic save, promotion, rollback, pruning."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from models.offline import OfflineDetector
from models.registry import ModelIntegrityError, ModelRegistry, RegistryError
from tests.support.synthetic import FEATURE_NAMES, normal_traffic

EVENT = {"requests_count_by_key_1m": 90.0, "interarrival_cv_by_key_5m": 0.01}


@pytest.fixture(scope="module")
def detector() -> OfflineDetector:
    train = normal_traffic(1500, np.random.default_rng(0))
    return OfflineDetector(n_quantiles=201).fit(
        train,
        FEATURE_NAMES,
        n_estimators=30,
        training_window=("2026-11-20T00:00:00Z", "2026-11-26T00:00:00Z"),
    )


@pytest.fixture
def registry(tmp_path) -> ModelRegistry:
    return ModelRegistry(tmp_path / "models", keep=3)


def _save(registry: ModelRegistry, detector: OfflineDetector, tag: str = "") -> str:
    return registry.save(
        detector,
        manifest_extra={"metrics": {"auc": 0.97, "tag": tag}, "gates": {"auc_min": 0.9}},
    )


def test_save_writes_a_complete_manifest(registry, detector) -> None:
    version = _save(registry, detector)
    assert version.startswith("iforest-")
    manifest = registry.manifest(version)
    assert manifest["version"] == version and manifest["kind"] == "offline-iforest"
    assert manifest["feature_names"] == FEATURE_NAMES
    assert manifest["training_window"] == {
        "start": "2026-11-20T00:00:00Z",
        "end": "2026-11-26T00:00:00Z",
    }
    assert manifest["row_count"] == 1500
    assert set(manifest["libraries"]) >= {"python", "numpy", "scikit-learn", "river"}
    assert manifest["metrics"]["auc"] == 0.97 and manifest["gates"] == {"auc_min": 0.9}
    assert len(manifest["files"]["model.joblib"]["sha256"]) == 64
    assert manifest["created_at"].endswith("Z")
    assert registry.current_version() is None  # saving does not promote
    [info] = registry.list()
    assert info.version == version and info.row_count == 1500 and not info.is_current


def test_load_round_trip_and_hot_reload_pattern(registry, detector) -> None:
    assert registry.load_current() is None
    version = _save(registry, detector)
    registry.promote(version)
    assert registry.current_version() == version
    loaded = registry.load_current(expected_features=FEATURE_NAMES)
    assert loaded is not None and loaded.percentile_one(EVENT) == detector.percentile_one(EVENT)


def test_flipped_byte_in_the_model_is_refused_before_unpickling(registry, detector) -> None:
    version = _save(registry, detector)
    model = registry.root / "versions" / version / "model.joblib"
    data = bytearray(model.read_bytes())
    data[len(data) // 3] ^= 0x01
    model.write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError, match=r"model\.joblib.*SHA-256"):
        registry.load(version)
    with pytest.raises(ModelIntegrityError, match=r"model\.joblib"):
        registry.promote(version)
    assert registry.current_version() is None


def test_edited_manifest_is_refused(registry, detector) -> None:
    version = _save(registry, detector)
    path = registry.root / "versions" / version / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["gates"]["auc_min"] = 0.0  # someone loosens a gate by hand
    path.write_text(json.dumps(manifest))
    with pytest.raises(ModelIntegrityError, match=r"manifest\.json.*integrity"):
        registry.load(version)
    [info] = registry.list()
    assert info.error is not None and "integrity" in info.error


def test_manifest_pointing_at_another_file_is_refused(registry, detector) -> None:
    first = _save(registry, detector)
    other = OfflineDetector().fit(
        normal_traffic(300, np.random.default_rng(1)), FEATURE_NAMES, n_estimators=5
    )
    second = _save(registry, other)
    # Swap the model files: each manifest now describes the other one's bytes.
    a = registry.root / "versions" / first / "model.joblib"
    b = registry.root / "versions" / second / "model.joblib"
    a_bytes, b_bytes = a.read_bytes(), b.read_bytes()
    a.write_bytes(b_bytes)
    b.write_bytes(a_bytes)
    for version in (first, second):
        with pytest.raises(ModelIntegrityError, match="SHA-256"):
            registry.load(version)


def test_feature_schema_mismatch_is_refused(registry, detector) -> None:
    version = _save(registry, detector)
    registry.promote(version)
    with pytest.raises(ModelIntegrityError, match=r"missing.*tokens_log1p"):
        registry.load_current(expected_features=[f for f in FEATURE_NAMES if f != "tokens_log1p"])
    swapped = [FEATURE_NAMES[1], FEATURE_NAMES[0], *FEATURE_NAMES[2:]]
    with pytest.raises(ModelIntegrityError, match="another order"):
        registry.load_current(expected_features=swapped)


def test_failed_save_leaves_nothing(registry, detector) -> None:
    with pytest.raises(ValueError):
        registry.save(detector, manifest_extra={"metrics": {"auc": float("nan")}})
    with pytest.raises(TypeError):
        registry.save(detector, manifest_extra={"gates": {"check": threading.Lock()}})
    with pytest.raises(ValueError, match="reserved"):
        registry.save(detector, manifest_extra={"files": {}})
    versions = registry.root / "versions"
    assert not versions.exists() or list(versions.iterdir()) == []
    assert registry.list() == []


def test_unpicklable_detector_leaves_nothing(registry, detector) -> None:
    import copy

    broken = copy.copy(detector)
    broken.callback = threading.Lock()  # cannot be pickled
    with pytest.raises(TypeError):
        registry.save(broken)
    assert list((registry.root / "versions").iterdir()) == []


def test_leftover_temp_directory_from_a_crash_is_ignored_and_pruned(registry, detector) -> None:
    crashed = registry.root / "versions" / ".tmp-iforest-crashed-abc"
    crashed.mkdir(parents=True)
    (crashed / "model.joblib").write_bytes(b"half")
    assert registry.list() == []
    _save(registry, detector)
    assert not crashed.exists()


def test_promote_and_rollback_walk_the_history(registry, detector) -> None:
    v1, v2, v3 = (_save(registry, detector, tag) for tag in ("a", "b", "c"))
    assert len({v1, v2, v3}) == 3
    registry.promote(v1)
    registry.promote(v2)
    registry.promote(v3)
    assert registry.current_version() == v3 and registry.previous_version() == v2
    assert registry.rollback() == v2
    assert registry.current_version() == v2
    assert registry.rollback() == v1
    with pytest.raises(RegistryError, match="no earlier"):
        registry.rollback()
    assert registry.current_version() == v1
    actions = [(h["action"], h["version"]) for h in registry.history()]
    assert actions == [
        ("promote", v1),
        ("promote", v2),
        ("promote", v3),
        ("rollback", v2),
        ("rollback", v1),
    ]
    [current] = [i for i in registry.list() if i.is_current]
    assert current.version == v1


def test_rollback_skips_versions_that_were_pruned(registry, detector) -> None:
    v0, v1, v2 = (_save(registry, detector, tag) for tag in ("a", "b", "c"))
    for version in (v0, v1, v2):
        registry.promote(version)  # rollback stack: [v0, v1]
    for i in range(3):
        _save(registry, detector, f"later{i}")  # v0 is neither current nor previous: pruned
    assert v0 not in [i.version for i in registry.list()]
    assert registry.rollback() == v1
    with pytest.raises(RegistryError, match="no earlier"):
        registry.rollback()
    assert registry.current_version() == v1


def test_promote_unknown_version_is_refused(registry) -> None:
    with pytest.raises(RegistryError, match="unknown version"):
        registry.promote("iforest-nope")
    with pytest.raises(RegistryError, match="invalid version"):
        registry.promote("../escape")


def test_pointer_file_is_replaced_atomically(registry, detector) -> None:
    v1 = _save(registry, detector)
    registry.promote(v1)
    leftovers = [p.name for p in registry.root.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []
    pointer = json.loads((registry.root / "current").read_text())
    assert pointer["version"] == v1 and pointer["previous"] == []


def test_prune_keeps_the_newest_and_never_current_or_previous(registry, detector) -> None:
    versions = [_save(registry, detector, str(i)) for i in range(2)]
    registry.promote(versions[0])
    registry.promote(versions[1])  # current = v1, previous = v0 (the two oldest)
    versions += [_save(registry, detector, str(i)) for i in range(2, 7)]
    assert len(set(versions)) == 7  # a pruned name is never handed out again
    kept = [i.version for i in registry.list()]
    assert kept == [versions[0], versions[1], *versions[-3:]]  # keep=3, + current + previous
    assert registry.rollback() == versions[0]
    registry.promote(versions[-1])  # current = v6, previous = v0: v1 goes
    assert [i.version for i in registry.list()] == [versions[0], *versions[-3:]]
    assert registry.prune() == []


def test_explicit_version_names_are_validated(registry, detector) -> None:
    assert registry.save(detector, version="iforest-manual.1") == "iforest-manual.1"
    with pytest.raises(RegistryError, match="exists"):
        registry.save(detector, version="iforest-manual.1")
    with pytest.raises(ValueError, match="invalid version"):
        registry.save(detector, version="../../etc")
