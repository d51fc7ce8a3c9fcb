"""The durable event log the retrain job learns from.

Every accepted event is appended as one JSON line to a partition per UTC day
(`<dir>/date=YYYY-MM-DD/events-<writer>.jsonl`), with the raw API key replaced by its
`key_id`, and (when the caller passes the decision) the verdict keywatch gave it
(`verdict`, the would-be one in shadow mode), its `severity`, and its estimated
`cost_usd`, which the security report uses for money spent and saved. Partitions
older than the retention are deleted. Writes are buffered and flushed at least every
`flush_interval_s`; a failing disk (full, read-only) never stops scoring: the error is
counted, reported, and the lines stay buffered (up to a bound) to be written when the
disk recovers.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from features.contract import Event
from serving.engine.jsonl_writer import BufferedWriter, append_lines, iter_json_lines

if TYPE_CHECKING:
    from serving.engine.decision import Decision

log = logging.getLogger("keywatch.event_log")

PARTITION_PREFIX = "date="


def event_record(event: Event, key_id: str, decision: Decision | None = None
                 ) -> dict[str, Any]:
    """The logged form of an event: the contract's fields, `key_id` instead of the key,
    and what keywatch decided (when given)."""
    record = event.model_dump(exclude_none=True)
    record.pop("api_key", None)
    record["key_id"] = key_id
    if decision is not None:
        outcome = decision.would if decision.would is not None else decision
        record["verdict"] = outcome.decision
        record["severity"] = outcome.severity
        record["enforced"] = decision.enforced
        if decision.money is not None:
            record["cost_usd"] = decision.money.cost_usd
    return record


def partition_name(ts: float) -> str:
    return PARTITION_PREFIX + datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%d")


class EventLog(BufferedWriter[tuple[str, str]]):
    """Append-only, day-partitioned JSONL log with bounded retention and buffering.

    A `PeriodicFlusher` (the app and the worker start one) writes the buffer out while the
    service is idle; `append` also flushes once `flush_interval_s` has passed."""

    def __init__(
        self,
        directory: Path,
        *,
        retention_days: int = 30,
        flush_interval_s: float = 1.0,
        max_buffered: int = 200_000,
        writer_id: str | None = None,
    ) -> None:
        super().__init__(max_buffered=max_buffered)
        self.directory = Path(directory)
        self.retention_days = retention_days
        self.flush_interval_s = flush_interval_s
        self.writer_id = writer_id or f"{os.getpid()}"
        self._last_flush = time.monotonic()

    @property
    def healthy(self) -> bool:
        return self.last_error is None

    def append(self, event: Event, key_id: str, decision: Decision | None = None) -> None:
        line = json.dumps(event_record(event, key_id, decision), separators=(",", ":"))
        self._queue((partition_name(event.timestamp), line))
        if time.monotonic() - self._last_flush >= self.flush_interval_s:
            self.flush()

    def flush(self) -> bool:
        self._last_flush = time.monotonic()
        return super().flush()

    def _write(self, items: list[tuple[str, str]], done: list[int]) -> None:
        """One append per day partition, partitions in the order they were first seen;
        `items` is reordered in place to match, so a failure keeps exactly the rest."""
        by_partition: dict[str, list[str]] = {}
        for part, line in items:
            by_partition.setdefault(part, []).append(line)
        items[:] = [(part, line) for part, lines in by_partition.items() for line in lines]
        for part, lines in by_partition.items():
            path = self.directory / part / f"events-{self.writer_id}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            append_lines(path, lines)
            done[0] += len(lines)

    def prune(self, *, now: float | None = None) -> list[str]:
        """Delete day partitions older than the retention; returns what was removed."""
        if not self.directory.exists():
            return []
        cutoff = datetime.fromtimestamp(now or time.time(), tz=UTC) - timedelta(
            days=self.retention_days)
        removed = []
        for child in sorted(self.directory.iterdir()):
            if not child.name.startswith(PARTITION_PREFIX):
                continue
            try:
                day = datetime.strptime(child.name[len(PARTITION_PREFIX):], "%Y-%m-%d")
            except ValueError:
                continue
            if day.replace(tzinfo=UTC) + timedelta(days=1) <= cutoff:
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child.name)
        return removed

    def status(self) -> dict[str, Any]:
        return {"written": self.written, "buffered": self.buffered,
                "dropped": self.dropped, "write_errors": self.write_errors,
                "last_error": self.last_error}


def read_event_log(directory: Path, *, since: float | None = None,
                   until: float | None = None) -> list[dict[str, Any]]:
    """All logged records (optionally in a time range), sorted by event time."""
    records: list[dict[str, Any]] = []
    for path in sorted(Path(directory).glob(f"{PARTITION_PREFIX}*/*.jsonl")):
        for rec in iter_json_lines(path):  # torn or damaged lines are skipped
            ts = rec.get("timestamp", 0.0)
            if not isinstance(ts, int | float):
                continue
            if (since is None or ts >= since) and (until is None or ts < until):
                records.append(rec)
    records.sort(key=lambda r: r.get("timestamp", 0.0))
    return records
