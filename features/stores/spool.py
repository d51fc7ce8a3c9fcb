"""A durable, append-only spool of state writes, kept while the shared store is down.

Why: when Redis is unreachable, keywatch keeps answering (or refuses cleanly) but must not
lose the state changes of the events it sees — a key's counters, distinct sets and
baselines would otherwise silently forget the outage window, which is exactly when an
attacker would like to be forgotten. Each event's write operations are appended as one
JSON line to a segment file and fsync'd before the call returns, so a crash of the
process during the outage loses nothing either.

Layout: `<spool_dir>/<writer_id>/` is one writer's slot, held with an exclusive `flock`
by one process at a time (several processes on one host each take their own slot, and a
new process adopts a slot that a dead one left behind, with whatever it still holds).
The slot holds numbered segments `seg-00000001.jsonl`, ... and two small files:
`writer.id` (a random id, stable for the slot, used to mark replayed writes in Redis)
and `seq.hwm` (the highest sequence number ever handed out, so sequence numbers keep
growing across restarts even if the clock steps back).

A record is `{"seq": n, "t": unix_time, "ops": [[kind, entity_id, [[code, *args], ...]],
...]}` (plus `"amb": 1` when the writes were in flight when the store failed). Reading
skips a line that does not parse — the torn last line of a crash — and counts it.
Segments are deleted only after all their records were applied to the store.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from features.durable import atomic_write_text, fsync_dir
from features.stores.base import EntityOps

log = logging.getLogger("keywatch.spool")

SEGMENT_PREFIX = "seg-"
SEGMENT_SUFFIX = ".jsonl"


@dataclass(slots=True)
class SpoolRecord:
    """One event's (or one store call's) write operations, in call order."""

    seq: int
    wall_time: float
    requests: list[EntityOps]
    ambiguous: bool = False


def encode_requests(requests: Sequence[EntityOps]) -> list[list[Any]]:
    return [[r.kind, r.entity_id, [list(op) for op in r.ops]] for r in requests]


def decode_requests(raw: list[list[Any]]) -> list[EntityOps]:
    return [EntityOps(kind, entity_id, [tuple(op) for op in ops]) for kind, entity_id, ops in raw]


class WriteSpool:
    """One process's slot in the spool directory: append, read back, and drop segments.

    Thread-safe. `append` returns only after the record is on disk (fsync).
    """

    def __init__(self, spool_dir: Path, *, segment_max_records: int = 5000) -> None:
        self.root = Path(spool_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        self.segment_max_records = segment_max_records
        self._lock = threading.Lock()
        self._lock_fh: IO[str] | None = None
        self.dir = self._claim_slot()
        self.writer_id = self._read_or_create_writer_id()
        self._fh: IO[bytes] | None = None
        self._fh_records = 0
        self._next_segment = self._highest_segment() + 1
        self._seq = self._initial_seq()
        self.pending = sum(1 for _ in self._iter_lines_all())
        self.corrupt_lines = 0

    # ---- slot ---------------------------------------------------------------------------
    def _claim_slot(self) -> Path:
        """Lock a free slot, preferring one that still holds segments (adopt leftovers)."""
        slots = sorted((p for p in self.root.iterdir() if p.is_dir()),
                       key=lambda p: (not any(p.glob(f"{SEGMENT_PREFIX}*")), p.name))
        for slot in slots:
            fh = (slot / "lock").open("a")
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                fh.close()
                continue
            self._lock_fh = fh
            return slot
        slot = self.root / secrets.token_hex(4)
        slot.mkdir()
        fh = (slot / "lock").open("a")
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._lock_fh = fh
        return slot

    def _read_or_create_writer_id(self) -> str:
        path = self.dir / "writer.id"
        if path.exists():
            text = path.read_text().strip()
            if text:
                return text
        writer_id = secrets.token_hex(6)
        self._atomic_write(path, writer_id)
        return writer_id

    def _atomic_write(self, path: Path, text: str) -> None:
        atomic_write_text(path, text)

    def _initial_seq(self) -> int:
        hwm = 0
        with contextlib.suppress(OSError, ValueError):
            hwm = int((self.dir / "seq.hwm").read_text().strip() or 0)
        for line in self._iter_lines_all():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                hwm = max(hwm, int(json.loads(line)["seq"]))
        return hwm

    def next_seq(self) -> int:
        """A sequence number larger than any this slot handed out before."""
        self._seq = max(self._seq + 1, time.time_ns() // 1000)
        return self._seq

    def save_high_water_mark(self) -> None:
        with self._lock:
            self._atomic_write(self.dir / "seq.hwm", str(self._seq))

    # ---- segments -----------------------------------------------------------------------
    def segments(self) -> list[Path]:
        return sorted(self.dir.glob(f"{SEGMENT_PREFIX}*{SEGMENT_SUFFIX}"))

    def _highest_segment(self) -> int:
        numbers = [int(p.name[len(SEGMENT_PREFIX):-len(SEGMENT_SUFFIX)])
                   for p in self.segments()
                   if p.name[len(SEGMENT_PREFIX):-len(SEGMENT_SUFFIX)].isdigit()]
        return max(numbers, default=0)

    def _open_segment(self) -> IO[bytes]:
        path = self.dir / f"{SEGMENT_PREFIX}{self._next_segment:08d}{SEGMENT_SUFFIX}"
        self._next_segment += 1
        fh = path.open("ab")
        fsync_dir(self.dir)
        self._fh_records = 0
        return fh

    def append(self, requests: Sequence[EntityOps], *, ambiguous: bool = False) -> int:
        """Durably append one record; returns its sequence number. Raises OSError."""
        with self._lock:
            seq = self.next_seq()
            record: dict[str, Any] = {"seq": seq, "t": round(time.time(), 6),
                                      "ops": encode_requests(requests)}
            if ambiguous:
                record["amb"] = 1
            line = json.dumps(record, separators=(",", ":")).encode() + b"\n"
            if self._fh is None or self._fh_records >= self.segment_max_records:
                self._close_current()
                self._fh = self._open_segment()
            self._fh.write(line)
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh_records += 1
            self.pending += 1
            return seq

    def rotate(self) -> None:
        """Close the segment being written, so the next append starts a new one."""
        with self._lock:
            self._close_current()

    def _close_current(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def closed_segments(self) -> list[Path]:
        """Segments no longer being appended to (all of them after `rotate`)."""
        with self._lock:
            current = Path(self._fh.name) if self._fh is not None else None
            return [p for p in self.segments() if p != current]

    def read_segment(self, path: Path) -> Iterator[SpoolRecord]:
        """Records of a segment in order; a line that does not parse is skipped."""
        with path.open("rb") as fh:
            for n, raw in enumerate(fh, start=1):
                if not raw.strip():
                    continue
                try:
                    obj = json.loads(raw)
                    record = SpoolRecord(seq=int(obj["seq"]), wall_time=float(obj["t"]),
                                         requests=decode_requests(obj["ops"]),
                                         ambiguous=bool(obj.get("amb")))
                except (ValueError, KeyError, TypeError, RecursionError) as exc:
                    self.corrupt_lines += 1
                    log.warning("spool %s line %d is unreadable, skipped (%s)", path.name, n,
                                type(exc).__name__)
                    continue
                yield record

    def drop_segment(self, path: Path, records: int) -> None:
        """Delete a segment whose records were all applied."""
        with self._lock:
            path.unlink(missing_ok=True)
            self.pending = max(0, self.pending - records)
        fsync_dir(self.dir)

    def _iter_lines_all(self) -> Iterator[bytes]:
        for path in self.segments():
            with path.open("rb") as fh:
                for raw in fh:
                    if raw.strip():
                        yield raw

    def count_segment_lines(self, path: Path) -> int:
        with path.open("rb") as fh:
            return sum(1 for raw in fh if raw.strip())

    def close(self) -> None:
        with self._lock:
            self._close_current()
        if self._lock_fh is not None:
            fcntl.flock(self._lock_fh, fcntl.LOCK_UN)
            self._lock_fh.close()
            self._lock_fh = None
