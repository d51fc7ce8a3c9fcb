"""An append-only journal of enforcement writes, so a crash of the memory store loses no
ban, limit, allow-list entry or admin act.

Why: the embedded memory store is snapshotted at a graceful stop only. Between two stops
every ban, unban, limit and allow-list change lived in memory alone, so `kill -9` (an OOM
kill, a power cut) rolled back an operator's acts and freed banned keys. Each store call
that changes enforcement state appends one JSON line here, flushed and fsync'd before the
call returns: an act that was answered is on disk.

What is journaled: the write operations (SET, DEL, PERSIST, ZSET, ZREM) that touch
enforcement fields (`ban:*`, `lim:*`) or global entities (ban and limit indexes,
allow-list, audit trail). They set absolute values or remove members, so replaying the
journal over a snapshot taken earlier (or later) gives the same state: replay is
idempotent. A limit's meter (`lim:tat*`, moved on every call) is not journaled: after a
crash a limit holds, its meter starts afresh.

Compaction: a snapshot of the store holds everything the journal says, so when one is
written the journal is rotated to `<name>.old` under the store's lock, and deleted once
the snapshot is durable; at start `<name>.old` (if a crash came in between) and then the
journal are replayed. A torn last line (a crash mid-write) is skipped and counted.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from features.durable import fsync_dir
from features.stores.base import (
    DEL,
    GLOBAL_KIND,
    PERSIST,
    SET,
    ZREM,
    ZSET,
    EntityOps,
    is_enforcement_field,
)

log = logging.getLogger("keywatch.journal")

_GLOBAL_WRITES = frozenset((SET, DEL, PERSIST, ZSET, ZREM))
_FIELD_WRITES = frozenset((SET, DEL))


def enforcement_writes(requests: Sequence[EntityOps]) -> list[list[Any]]:
    """The journaled part of a call: per entity, its enforcement write ops, in order."""
    out: list[list[Any]] = []
    for req in requests:
        if req.kind == GLOBAL_KIND:
            ops = [list(op) for op in req.ops if op and op[0] in _GLOBAL_WRITES]
        else:
            ops = [list(op) for op in req.ops if op and (
                (op[0] in _FIELD_WRITES and is_enforcement_field(op[1]))
                or op[0] == PERSIST)]
        if ops:
            out.append([req.kind, req.entity_id, ops])
    return out


class EnforcementJournal:
    """Append-only, fsync'd per call; `records()` reads back what a restart replays."""

    def __init__(self, path: Path, *, fsync: bool = True) -> None:
        self.path = Path(path)
        self.old_path = self.path.with_name(self.path.name + ".old")
        self.fsync = fsync
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh: IO[str] | None = None
        self.appended = 0
        self.torn_lines = 0

    def _handle(self) -> IO[str]:
        if self._fh is None:
            self._fh = self.path.open("a", encoding="utf-8")
            fsync_dir(self.path.parent)
        return self._fh

    def append(self, writes: list[list[Any]], wall_time: float) -> None:
        """One line per store call; on disk (fsync) before returning."""
        fh = self._handle()
        fh.write(json.dumps({"t": wall_time, "w": writes}, separators=(",", ":"),
                            allow_nan=False) + "\n")
        fh.flush()
        if self.fsync:
            os.fsync(fh.fileno())
        self.appended += 1

    def records(self) -> Iterator[list[EntityOps]]:
        """Every journaled call, oldest first: the rotated file, then the live one."""
        for path in (self.old_path, self.path):
            if not path.exists():
                continue
            with path.open(encoding="utf-8") as fh:
                for line in fh:
                    try:
                        record = json.loads(line)
                        yield [EntityOps(str(kind), str(eid), [tuple(op) for op in ops])
                               for kind, eid, ops in record["w"]]
                    except (ValueError, KeyError, TypeError):
                        self.torn_lines += 1
                        log.warning("skipping an unreadable journal line in %s", path)

    def rotate(self) -> None:
        """Start a new journal; the current one waits as `.old` until `drop_old`."""
        self.close()
        if self.path.exists():
            if self.old_path.exists():  # an earlier compaction did not finish: keep both
                with self.old_path.open("a", encoding="utf-8") as dst, \
                        self.path.open(encoding="utf-8") as src:
                    dst.write(src.read())
                    dst.flush()
                    os.fsync(dst.fileno())
                self.path.unlink()
            else:
                os.replace(self.path, self.old_path)
            fsync_dir(self.path.parent)

    def drop_old(self) -> None:
        """The snapshot holding the rotated journal's state is durable: forget it."""
        self.old_path.unlink(missing_ok=True)
        fsync_dir(self.path.parent)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
