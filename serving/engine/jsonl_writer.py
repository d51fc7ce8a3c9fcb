"""Buffered append-only JSON-lines files: the shared buffer, and the rotating writer for
alerts and SIEM export (the event log, `serving.engine.event_log`, is the other user).

Writers are fed from the scoring path, so `write` only appends to an in-memory buffer;
a `PeriodicFlusher` thread (or `close`) writes the buffer out. As with the event log, a
failing disk never stops scoring: the error is counted and reported and the lines stay
buffered (up to a bound, beyond which the oldest are dropped and counted) until the disk
recovers. Rotation follows the `logging.RotatingFileHandler` convention that log shippers
(Filebeat, Fluent Bit, the Splunk forwarder) already understand: the live file is `path`,
older ones are `path.1` (newest) … `path.N`, and the oldest beyond N is deleted.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Generic, TypeVar

from features.contract import JsonRefused, load_json

log = logging.getLogger("keywatch.jsonl")

T = TypeVar("T")


class BufferedWriter(Generic[T]):
    """A bounded in-memory buffer written out by `flush`, shared by every JSONL writer.

    `flush` takes everything buffered and hands it to the subclass's `_write`, which
    reports progress through `done`; if the disk fails, what was not written goes back to
    the front of the buffer (the oldest beyond `max_buffered` are dropped and counted),
    the error is counted and kept in `last_error`, and scoring never sees an exception.
    """

    def __init__(self, *, max_buffered: int) -> None:
        self.max_buffered = max_buffered
        self._buffer: deque[T] = deque()
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self.written = 0
        self.dropped = 0
        self.write_errors = 0
        self.last_error: str | None = None

    def _queue(self, item: T) -> None:
        with self._lock:
            if len(self._buffer) >= self.max_buffered:
                self._buffer.popleft()
                self.dropped += 1
            self._buffer.append(item)

    def _write(self, items: list[T], done: list[int]) -> None:
        """Write `items` in order, adding to `done[0]` as they reach the disk."""
        raise NotImplementedError

    def flush(self) -> bool:
        """Write buffered items. False (unwritten items kept) if the disk failed."""
        with self._write_lock:
            with self._lock:
                items = list(self._buffer)
                self._buffer.clear()
            if not items:
                return True
            done = [0]
            try:
                self._write(items, done)
            except OSError as exc:
                self._keep(items[done[0]:], exc)
                return False
            finally:
                self.written += done[0]
            self.last_error = None
            return True

    def _keep(self, items: list[T], exc: OSError) -> None:
        self.write_errors += 1
        self.last_error = f"{type(exc).__name__}: {exc}"
        log.error("%s write failed, keeping %d lines buffered: %s",
                  type(self).__name__, len(items), exc)
        with self._lock:
            self._buffer.extendleft(reversed(items))
            while len(self._buffer) > self.max_buffered:
                self._buffer.popleft()
                self.dropped += 1

    @property
    def buffered(self) -> int:
        return len(self._buffer)


def append_lines(path: Path, lines: list[str], *, fsync: bool = True) -> None:
    """Append `lines` to `path` in one write, then flush (and fsync) it."""
    if not lines:
        return
    with path.open("a", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
        fh.flush()
        if fsync:
            os.fsync(fh.fileno())


class RotatingJsonlWriter(BufferedWriter[str]):
    """Buffered JSONL appender that rotates at `max_bytes` and keeps `keep_files` old files."""

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int = 50 * 1024 * 1024,
        keep_files: int = 5,
        max_buffered: int = 100_000,
        fsync: bool = True,
    ) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        if keep_files < 0:
            raise ValueError("keep_files must be >= 0")
        super().__init__(max_buffered=max_buffered)
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.keep_files = keep_files
        self.fsync = fsync
        self.rotations = 0

    def write(self, record: dict[str, Any]) -> None:
        """Queue one record; never touches the disk, so it is safe on the scoring path."""
        self._queue(json.dumps(record, separators=(",", ":"), default=str))

    def _write(self, lines: list[str], done: list[int]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        size = self.path.stat().st_size if self.path.exists() else 0
        chunk: list[str] = []
        chunk_bytes = 0
        for line in lines:
            n = len(line.encode("utf-8")) + 1
            if size + chunk_bytes + n > self.max_bytes and size + chunk_bytes > 0:
                self._append(chunk)
                done[0] += len(chunk)
                chunk, chunk_bytes = [], 0
                self._rotate()
                size = 0
            chunk.append(line)
            chunk_bytes += n
        self._append(chunk)
        done[0] += len(chunk)

    def _append(self, lines: list[str]) -> None:
        append_lines(self.path, lines, fsync=self.fsync)

    def _rotate(self) -> None:
        """path → path.1 → path.2 …; the file past `keep_files` is deleted."""
        self.rotations += 1
        if self.keep_files == 0:
            self.path.unlink(missing_ok=True)
            return
        oldest = self._numbered(self.keep_files)
        oldest.unlink(missing_ok=True)
        for i in range(self.keep_files - 1, 0, -1):
            src = self._numbered(i)
            if src.exists():
                os.replace(src, self._numbered(i + 1))
        if self.path.exists():
            os.replace(self.path, self._numbered(1))

    def _numbered(self, i: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{i}")

    def files(self) -> list[Path]:
        """Existing files, oldest first (the order to read them in)."""
        rotated = [self._numbered(i) for i in range(self.keep_files, 0, -1)]
        return [p for p in [*rotated, self.path] if p.exists()]

    def status(self) -> dict[str, Any]:
        return {"path": str(self.path), "written": self.written, "buffered": len(self._buffer),
                "dropped": self.dropped, "write_errors": self.write_errors,
                "rotations": self.rotations, "last_error": self.last_error}


MAX_RECORD_BYTES = 1024 * 1024
"""Longest JSONL line read back; a longer one is skipped like a torn line."""


def iter_json_lines(path: Path) -> Iterator[dict[str, Any]]:
    """The JSON objects of one JSONL file. A line that is torn (a crash mid-write), not
    UTF-8, too long, nested too deep or not an object is skipped: these files are read at
    start, and one damaged line must neither stop the service nor hide the others."""
    with Path(path).open("rb") as fh:
        for raw in fh:
            if not raw.strip():
                continue
            try:
                rec = load_json(raw, max_bytes=MAX_RECORD_BYTES)
            except JsonRefused:
                continue
            if isinstance(rec, dict):
                yield rec


def read_jsonl(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """Records from JSONL files in the order given; unreadable or blank lines are skipped."""
    records: list[dict[str, Any]] = []
    for path in paths:
        if Path(path).is_file():
            records.extend(iter_json_lines(Path(path)))
    return records


class PeriodicFlusher:
    """A daemon thread that flushes writers every `interval_s`, and once more on `close`.

    Started lazily on the first `start()` so that apps built but never served (tests,
    scripts) do not leave threads behind.
    """

    def __init__(self, writers: Iterable[BufferedWriter[Any]], *, interval_s: float = 0.5):
        self.writers = list(writers)
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            if self._thread is not None or not self.writers:
                return
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="keywatch-jsonl-flusher",
                                            daemon=True)
            self._thread.start()

    def flush(self) -> None:
        for writer in self.writers:
            writer.flush()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.flush()

    def close(self, timeout: float = 5.0) -> None:
        with self._lock:
            thread, self._thread = self._thread, None
        self._stop.set()
        if thread is not None:
            thread.join(timeout)
        self.flush()
