"""Snapshots of the memory store, so a restart does not forget bans and baselines.

Why: the embedded memory store is the default for a single `keywatch serve`. Without a
snapshot, every deploy or restart would unban banned keys and reset every counter and
baseline — an attacker would only have to wait for the next deploy.

Format (one file, written atomically: temp file, fsync, `os.replace`, fsync of the
directory): a magic line `KWSNAP1`, a JSON header line with the SHA-256 of the payload,
then the payload, a pickle of plain built-in values only (dicts, lists, strings,
numbers). The hash is checked *before* anything is unpickled, and unpickling refuses any
class or function reference, so a tampered or truncated file is refused with a clear
`SnapshotError` and never executes code. Entities are stored as plain field dicts in LRU
order, so the snapshot survives new fields on the per-entity state (they get defaults).
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import time
from pathlib import Path
from typing import Any

from features.durable import atomic_open

MAGIC = b"KWSNAP1\n"
FORMAT_VERSION = 1


class SnapshotError(ValueError):
    """The snapshot file is missing pieces, corrupt, or not a keywatch snapshot."""


class _BuiltinsOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise SnapshotError(f"snapshot refers to {module}.{name}; only plain values allowed")


def write_snapshot(payload: dict[str, Any], path: Path) -> int:
    """Write a store's exported state (plain values, with an `entities` list) to `path`
    atomically; returns the number of entities."""
    path = Path(path)
    body = pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
    header = json.dumps({"format": FORMAT_VERSION, "sha256": hashlib.sha256(body).hexdigest(),
                         "bytes": len(body), "entities": len(payload["entities"]),
                         "created": time.time()}).encode()
    with atomic_open(path, "wb") as fh:
        fh.write(MAGIC + header + b"\n" + body)
    return len(payload["entities"])


def read_snapshot(path: Path) -> dict[str, Any]:
    """The exported state held in the snapshot at `path`, as plain values.

    Raises SnapshotError if the file is not a valid, intact keywatch snapshot; nothing
    is unpickled before its hash is checked, and only built-in values are accepted.
    """
    raw = Path(path).read_bytes()
    if not raw.startswith(MAGIC):
        raise SnapshotError(f"{path} is not a keywatch snapshot (bad magic)")
    header_end = raw.find(b"\n", len(MAGIC))
    if header_end < 0:
        raise SnapshotError(f"{path} is truncated: no header")
    try:
        header = json.loads(raw[len(MAGIC):header_end])
        expected = str(header["sha256"])
        version = int(header["format"])
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise SnapshotError(f"{path} has an unreadable header: {type(exc).__name__}") from None
    if version != FORMAT_VERSION:
        raise SnapshotError(f"{path} has format {version}, this keywatch reads {FORMAT_VERSION}")
    body = raw[header_end + 1:]
    actual = hashlib.sha256(body).hexdigest()
    if actual != expected:
        raise SnapshotError(f"{path} is corrupt: SHA-256 {actual[:12]}… does not match the "
                            f"header's {expected[:12]}… ({len(body)} bytes)")
    try:
        payload = _BuiltinsOnly(io.BytesIO(body)).load()
    except SnapshotError:
        raise
    except Exception as exc:
        raise SnapshotError(f"{path} does not unpickle: {exc}") from None
    if not isinstance(payload, dict):
        raise SnapshotError(f"{path} does not hold store state")
    return payload
