"""The model registry: versioned, checksummed detector artifacts with atomic promotion.

Layout under ``root``::

    versions/<version>/model.joblib     the detector (joblib)
    versions/<version>/manifest.json    what it is, what it was trained on, checksums
    current                             the promoted version + the rollback stack (JSON)
    history.jsonl                       audit log of promotions and rollbacks
    .lock                               serialises writers (promote, rollback, prune)

Why it is built this way
------------------------
* A version directory is written under a hidden temporary name and renamed into place in one
  ``os.rename``: a crashed or failed save leaves no version behind, only a hidden directory
  that the next prune removes.
* The ``current`` file is replaced atomically (temp file + ``os.replace``), so a server polling
  :meth:`ModelRegistry.current_version` sees the old pointer or the new one. It carries the
  stack of earlier promotions, so a rollback is one atomic write too.
* Every file's SHA-256 is in the manifest and the manifest carries a checksum of itself. Bytes
  are verified *before* unpickling (unpickling runs code), and the feature schema is checked
  against what the caller computes: a model fitted on other columns must not score quietly
  wrong. Any mismatch raises :class:`ModelIntegrityError` naming the file.
* With a ``signing_key``, every manifest written is signed (HMAC-SHA256) and every manifest
  read must carry a valid signature: a swapped pickle *and* checksum are refused, since whoever
  swapped them does not hold the key. Without a key, checksums catch corruption only.
* :meth:`ModelRegistry.load_fallback` finds the newest earlier-promoted version that still
  verifies, for a server whose promoted version fails to load.

Hot reload, for a running server::

    version = registry.current_version()          # cheap: reads one small file
    if version != loaded_version:
        detector = registry.load(version, expected_features=FEATURES)  # keep the old one
        loaded_version = version                                        # if this raises
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from features.contract import JsonRefused, load_json
from features.durable import fsync_dir, fsync_file
from models.integrity import (
    ModelIntegrityError,
    atomic_write_bytes,
    dump_bytes,
    load_verified,
    sha256_bytes,
    sha256_file,
    sign,
    signature_matches,
)
from models.offline import OfflineDetector

__all__ = ["ManifestInfo", "ModelIntegrityError", "ModelRegistry", "RegistryError"]

MODEL_FILE = "model.joblib"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
_RESERVED = frozenset({"format", "version", "files", "created_at", "libraries", "integrity",
                       "signature"})
MAX_MANIFEST_BYTES = 1024 * 1024
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_KIND_PREFIX = {"offline-iforest": "iforest"}


class RegistryError(RuntimeError):
    """A registry operation that cannot be done (unknown version, nothing to roll back to)."""


@dataclass(frozen=True)
class ManifestInfo:
    """One version as listed by :meth:`ModelRegistry.list`.

    ``error`` is set (and the other fields may be empty) when the manifest cannot be read or
    fails its own checksum; such a version will not load.
    """

    version: str
    kind: str | None
    created_at: str | None
    feature_names: list[str] = field(default_factory=list)
    training_window: dict[str, Any] = field(default_factory=dict)
    row_count: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    gates: dict[str, Any] = field(default_factory=dict)
    is_current: bool = False
    path: Path | None = None
    error: str | None = None


class ModelRegistry:
    """Save, list, promote, roll back and load detector versions under one directory.

    Parameters
    ----------
    root
        The registry directory (created if absent).
    keep
        How many of the newest versions to keep; older ones are pruned after each save and
        promotion, except the current and the previous (rollback target) versions.
    """

    def __init__(self, root: str | os.PathLike[str], *, keep: int = 5,
                 signing_key: str | bytes | None = None) -> None:
        if keep < 2:
            raise ValueError("keep must be at least 2 (the current and the previous version)")
        self.root = Path(root)
        self.keep = keep
        self.signing_key = signing_key or None
        self.versions_dir = self.root / "versions"
        self.current_file = self.root / "current"
        self.history_file = self.root / "history.jsonl"

    # ------------------------------------------------------------------ saving

    def save(
        self,
        detector: Any,
        *,
        manifest_extra: Mapping[str, Any] | None = None,
        version: str | None = None,
    ) -> str:
        """Write a new version; returns its name. It is not promoted.

        Parameters
        ----------
        detector
            A fitted detector. If it has ``manifest_fields()`` (``OfflineDetector`` does), those
            fields (kind, feature names, training window, row count, params) go in the manifest.
        manifest_extra
            More manifest fields, e.g. ``{"metrics": {...}, "gates": {...}}``, or overrides of
            the detector's fields (``training_window``...). ``format``, ``version``, ``files``,
            ``created_at``, ``libraries`` and ``integrity`` are reserved.
        version
            Explicit version name; default ``<kind>-<UTC time>`` (e.g.
            ``iforest-2026-11-26T030000Z``), suffixed ``-2``, ``-3``... if taken.
        """
        fields = _manifest_fields(detector, manifest_extra)
        created = datetime.now(UTC)
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        with self._lock():
            name = self._new_version_name(version, fields["kind"], created)
            tmp_dir = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=self.versions_dir))
            try:
                data = dump_bytes(detector)
                (tmp_dir / MODEL_FILE).write_bytes(data)
                manifest = self._manifest(name, fields, created, data)
                (tmp_dir / MANIFEST_FILE).write_text(
                    json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False) + "\n"
                )
                for path in tmp_dir.iterdir():
                    fsync_file(path)
                os.rename(tmp_dir, self.versions_dir / name)
            except BaseException:
                shutil.rmtree(tmp_dir, ignore_errors=True)
                raise
            fsync_dir(self.versions_dir)
            self._prune_locked()
        return name

    def _manifest(self, name: str, fields: dict[str, Any], created: datetime, data: bytes
                  ) -> dict[str, Any]:
        """The version's manifest: its fields, the libraries, the model file's digest, the
        signature (with a signing key) and the digest of it all."""
        manifest = {
            "format": MANIFEST_FORMAT,
            "version": name,
            "kind": fields["kind"],
            "created_at": created.isoformat().replace("+00:00", "Z"),
            **{k: v for k, v in fields.items() if k != "kind"},
            "libraries": _library_versions(),
            "files": {MODEL_FILE: {"sha256": sha256_bytes(data), "bytes": len(data)}},
        }
        manifest.setdefault("metrics", {})
        manifest.setdefault("gates", {})
        if self.signing_key is not None:
            manifest["signature"] = sign(_canonical(manifest), self.signing_key)
        manifest["integrity"] = _manifest_digest(manifest)
        return manifest

    def _new_version_name(self, version: str | None, kind: str, created: datetime) -> str:
        if version is not None:
            if not _VERSION_RE.match(version):
                raise ValueError(f"invalid version name {version!r}: use letters, digits, . _ -")
            if (self.versions_dir / version).exists():
                raise RegistryError(f"version {version!r} already exists")
            return version
        prefix = _KIND_PREFIX.get(kind, re.sub(r"[^A-Za-z0-9._-]", "-", kind))
        base = f"{prefix}-{created:%Y-%m-%dT%H%M%S}Z"
        # Suffix past the highest one taken in this second: the newest version is never
        # pruned, so a name is never handed out twice.
        taken = 0
        pattern = re.compile(re.escape(base) + r"(?:-(\d+))?$")
        for path in self.versions_dir.iterdir():
            match = pattern.match(path.name)
            if match:
                taken = max(taken, int(match.group(1) or 1))
        return base if taken == 0 else f"{base}-{taken + 1}"

    # ------------------------------------------------------------------ listing

    def list(self) -> list[ManifestInfo]:
        """Every stored version, oldest first (by creation time)."""
        if not self.versions_dir.is_dir():
            return []
        try:
            current = self.current_version()
        except ModelIntegrityError:
            current = None  # listed all the same: the versions are what an operator needs
        infos = []
        for path in self.versions_dir.iterdir():
            if path.name.startswith(".") or not path.is_dir():
                continue
            try:
                manifest = self._read_manifest(path.name)
            except ModelIntegrityError as exc:
                infos.append(
                    ManifestInfo(
                        path.name,
                        None,
                        None,
                        is_current=path.name == current,
                        path=path,
                        error=str(exc),
                    )
                )
                continue
            infos.append(
                ManifestInfo(
                    version=path.name,
                    kind=manifest.get("kind"),
                    created_at=manifest.get("created_at"),
                    feature_names=list(manifest.get("feature_names", [])),
                    training_window=dict(manifest.get("training_window") or {}),
                    row_count=manifest.get("row_count"),
                    metrics=dict(manifest.get("metrics") or {}),
                    gates=dict(manifest.get("gates") or {}),
                    is_current=path.name == current,
                    path=path,
                )
            )
        infos.sort(key=lambda i: (i.created_at or "", i.version))
        return infos

    def manifest(self, version: str) -> dict[str, Any]:
        """The verified manifest of a version."""
        return self._read_manifest(version)

    # ------------------------------------------------------------------ promotion

    def current_version(self) -> str | None:
        """The promoted version, or None. Cheap (one small file read): fine to poll."""
        state = self._read_pointer()
        return state["version"] if state else None

    def previous_version(self) -> str | None:
        """The version :meth:`rollback` would return to, or None."""
        state = self._read_pointer()
        return state["previous"][-1] if state and state["previous"] else None

    def promote(self, version: str) -> None:
        """Make ``version`` current (atomically), after verifying its files and manifest.

        The version being replaced goes on the rollback stack.
        """
        self.verify(version)
        with self._lock():
            state = self._read_pointer() or {"version": None, "previous": []}
            if state["version"] == version:
                return
            previous = [v for v in state["previous"] if v != version]
            if state["version"] is not None:
                previous.append(state["version"])
            self._write_pointer(version, previous[-50:])
            self._log("promote", version, state["version"])
            self._prune_locked()

    def rollback(self) -> str:
        """Return to the previously promoted version; returns it.

        Versions on the rollback stack that were pruned or no longer verify are skipped.

        Raises
        ------
        RegistryError
            When there is nothing to roll back to.
        """
        with self._lock():
            state = self._read_pointer()
            if not state:
                raise RegistryError("no version is promoted; nothing to roll back")
            previous = list(state["previous"])
            while previous:
                candidate = previous.pop()
                try:
                    self.verify(candidate)
                except (ModelIntegrityError, RegistryError):  # pruned or damaged since
                    continue
                self._write_pointer(candidate, previous)
                self._log("rollback", candidate, state["version"])
                return candidate
            raise RegistryError(
                f"no earlier promoted version to roll back to from {state['version']!r}"
            )

    def _read_pointer(self) -> dict[str, Any] | None:
        try:
            text = self.current_file.read_bytes()[:65536].decode("utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError):
            raise ModelIntegrityError(f"pointer file {self.current_file} is unreadable") from None
        try:
            state = json.loads(text)
            version, previous = state["version"], state.get("previous", [])
            if not isinstance(version, str) or not isinstance(previous, list):
                raise TypeError
        except (ValueError, KeyError, TypeError, RecursionError):
            raise ModelIntegrityError(f"pointer file {self.current_file} is unreadable") from None
        return {"version": version, "previous": [str(v) for v in previous]}

    def _write_pointer(self, version: str, previous: Sequence[str]) -> None:
        state = {
            "version": version,
            "previous": list(previous),
            "promoted_at": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        }
        atomic_write_bytes(self.current_file, (json.dumps(state, indent=2) + "\n").encode())

    def _log(self, action: str, version: str, replaced: str | None) -> None:
        entry = {
            "at": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
            "action": action,
            "version": version,
            "replaced": replaced,
        }
        with open(self.history_file, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry) + "\n")

    def history(self) -> list[dict[str, Any]]:
        """The promotion/rollback audit log, oldest first."""
        try:
            lines = self.history_file.read_bytes().splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:  # a damaged line is skipped, not a reason to lose the log
            try:
                entry = load_json(line) if line.strip() else None
            except JsonRefused:
                continue
            if isinstance(entry, dict):
                out.append(entry)
        return out

    # ------------------------------------------------------------------ loading

    def verify(self, version: str) -> dict[str, Any]:
        """Check a version's manifest and every file's SHA-256 without unpickling anything."""
        manifest = self._read_manifest(version)
        directory = self.versions_dir / version
        for name, info in manifest["files"].items():
            path = directory / name
            if not path.is_file():
                raise ModelIntegrityError(f"model file {path} is missing")
            if sha256_file(path) != info["sha256"]:
                raise ModelIntegrityError(
                    f"model file {path} fails its SHA-256 check against {MANIFEST_FILE}; "
                    "refusing to load it"
                )
        return manifest

    def load(self, version: str, *, expected_features: Sequence[str] | None = None) -> Any:
        """Load a version: verify manifest, checksums and feature schema, then unpickle.

        Parameters
        ----------
        version
            The version to load.
        expected_features
            The feature names, in order, that the caller will supply. A model recorded with a
            different list (names or order) is refused.

        Raises
        ------
        ModelIntegrityError
            Naming the file (or the schema) that does not match.
        """
        manifest = self._read_manifest(version)
        directory = self.versions_dir / version
        recorded = list(manifest.get("feature_names", []))
        if expected_features is not None and list(expected_features) != recorded:
            raise ModelIntegrityError(
                f"model {version} ({directory / MANIFEST_FILE}) was trained on other features: "
                f"{_schema_difference(recorded, list(expected_features))}"
            )
        info = manifest["files"].get(MODEL_FILE)
        if info is None:
            raise ModelIntegrityError(f"{directory / MANIFEST_FILE} lists no {MODEL_FILE}")
        detector = load_verified(directory / MODEL_FILE, info["sha256"])
        kind = getattr(detector, "kind", None)
        if kind != manifest["kind"]:
            raise ModelIntegrityError(
                f"model file {directory / MODEL_FILE} holds a {kind!r} detector, "
                f"the manifest says {manifest['kind']!r}"
            )
        own = getattr(detector, "feature_names_", None)
        if own is not None and list(own) != recorded:
            raise ModelIntegrityError(
                f"model file {directory / MODEL_FILE} disagrees with its manifest on features: "
                f"{_schema_difference(recorded, list(own))}"
            )
        return detector

    def load_current(
        self, expected_features: Sequence[str] | None = None
    ) -> OfflineDetector | None:
        """Load the promoted offline detector, or None when nothing is promoted."""
        version = self.current_version()
        if version is None:
            return None
        detector = self.load(version, expected_features=expected_features)
        if not isinstance(detector, OfflineDetector):
            raise ModelIntegrityError(
                f"current version {version} is a {type(detector).__name__}, not an OfflineDetector"
            )
        return detector

    def load_fallback(
        self, expected_features: Sequence[str] | None = None, *, skip: str | None = None
    ) -> tuple[str, OfflineDetector] | None:
        """The newest earlier-promoted version that verifies and loads, or None.

        Candidates: the rollback stack (newest first), then every version the history says
        was ever promoted (newest first), never ``skip`` (the version that just failed).
        """
        candidates: list[str] = []
        try:
            state = self._read_pointer()
        except ModelIntegrityError:
            state = None
        if state:
            candidates.extend(reversed(state["previous"]))
        try:
            promoted = [h.get("version") for h in self.history()
                        if h.get("action") in ("promote", "rollback")]
        except (OSError, ValueError):
            promoted = []
        candidates.extend(v for v in reversed(promoted) if isinstance(v, str))
        seen: set[str] = set()
        for version in candidates:
            if version in seen or version == skip:
                continue
            seen.add(version)
            try:
                detector = self.load(version, expected_features=expected_features)
            except Exception:  # pruned, damaged, unsigned: try the next one
                continue
            if isinstance(detector, OfflineDetector):
                return version, detector
        return None

    def _read_manifest(self, version: str) -> dict[str, Any]:
        if not _VERSION_RE.match(version):
            raise RegistryError(f"invalid version name {version!r}")
        path = self.versions_dir / version / MANIFEST_FILE
        if not path.parent.is_dir():
            raise RegistryError(f"unknown version {version!r} in {self.versions_dir}")
        try:
            with path.open("rb") as handle:
                raw = handle.read(MAX_MANIFEST_BYTES + 1)
            if len(raw) > MAX_MANIFEST_BYTES:
                raise ModelIntegrityError(f"manifest {path} is over {MAX_MANIFEST_BYTES} bytes")
            manifest = json.loads(raw.decode("utf-8"))
        except FileNotFoundError:
            raise ModelIntegrityError(f"manifest {path} is missing") from None
        except (ValueError, RecursionError) as exc:  # bad JSON, bad UTF-8, absurd nesting
            raise ModelIntegrityError(f"manifest {path} is not valid JSON: "
                                      f"{type(exc).__name__}") from None
        if not isinstance(manifest, dict) or manifest.get("integrity") != _manifest_digest(
            manifest
        ):
            raise ModelIntegrityError(
                f"manifest {path} fails its integrity check (edited or corrupted); "
                "refusing to load this version"
            )
        if self.signing_key is not None:
            body = {k: v for k, v in manifest.items() if k not in ("integrity", "signature")}
            if not signature_matches(_canonical(body), self.signing_key,
                                     manifest.get("signature")):
                state = "unsigned" if "signature" not in manifest else "signed with another key"
                raise ModelIntegrityError(
                    f"manifest {path} is {state}: with a model signing key configured, only "
                    "manifests signed with it are loaded (was the model or its checksum "
                    "swapped?)")
        if manifest.get("version") != version or not isinstance(manifest.get("files"), dict):
            raise ModelIntegrityError(f"manifest {path} does not describe version {version!r}")
        files = manifest["files"]
        if not all(isinstance(i, dict) and isinstance(i.get("sha256"), str)
                   for i in files.values()):
            raise ModelIntegrityError(f"manifest {path} lists a file without a SHA-256")
        return manifest

    # ------------------------------------------------------------------ pruning

    def prune(self) -> list[str]:
        """Delete old versions; returns the names removed.

        Kept: the newest ``keep`` versions, plus the current and the previous (rollback
        target) versions wherever they are. Also removes temp directories of crashed saves.
        """
        with self._lock():
            return self._prune_locked()

    def _prune_locked(self) -> list[str]:
        if not self.versions_dir.is_dir():
            return []
        for leftover in self.versions_dir.glob(".tmp-*"):  # from a crashed save
            shutil.rmtree(leftover, ignore_errors=True)
        try:
            state = self._read_pointer()
        except ModelIntegrityError:
            return []  # never delete anything while the pointer is unreadable
        ordered = [info.version for info in self.list()]
        retained = set(ordered[-self.keep :])
        if state:
            retained.add(state["version"])
            if state["previous"]:
                retained.add(state["previous"][-1])
        removed = [v for v in ordered if v not in retained]
        for version in removed:
            shutil.rmtree(self.versions_dir / version, ignore_errors=True)
        return removed

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _canonical(body: Mapping[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _manifest_digest(manifest: Mapping[str, Any]) -> str:
    return sha256_bytes(_canonical({k: v for k, v in manifest.items() if k != "integrity"}))


def _schema_difference(recorded: list[str], other: list[str]) -> str:
    missing = [n for n in recorded if n not in other]
    extra = [n for n in other if n not in recorded]
    if missing or extra:
        return f"missing {missing}, unexpected {extra}"
    for i, (a, b) in enumerate(zip(recorded, other, strict=True)):
        if a != b:
            return f"same names in another order (position {i}: model has {a!r}, got {b!r})"
    return "identical"  # pragma: no cover


def _library_versions() -> dict[str, str]:
    import joblib
    import numpy
    import pandas
    import river
    import sklearn

    return {
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "pandas": pandas.__version__,
        "scikit-learn": sklearn.__version__,
        "river": river.__version__,
        "joblib": joblib.__version__,
    }


def _manifest_fields(detector: Any, manifest_extra: Mapping[str, Any] | None
                     ) -> dict[str, Any]:
    """The detector's own manifest fields with the caller's extra ones over them; refuses
    reserved fields and a manifest without a kind or feature names."""
    extra = dict(manifest_extra or {})
    reserved = sorted(_RESERVED & extra.keys())
    if reserved:
        raise ValueError(f"manifest_extra may not set reserved fields: {reserved}")
    fields: dict[str, Any] = {}
    if hasattr(detector, "manifest_fields"):
        fields.update(detector.manifest_fields())
    fields.update(extra)
    fields["kind"] = fields.get("kind") or getattr(detector, "kind", None)
    if not fields["kind"] or "feature_names" not in fields:
        raise ValueError("the manifest needs a kind and feature_names (detector or extra)")
    return fields
