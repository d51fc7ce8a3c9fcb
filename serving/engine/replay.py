"""Score a file of events through the same `Scorer` as the API, in file order.

One output line per input line, in the same order: a decision, or `{"line": N, "error":
...}` for a line that fails validation; the run goes on past bad lines.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from pydantic import ValidationError
from tqdm import tqdm

from features.contract import Event, JsonRefused, check_depth, load_json
from features.validation import describe
from serving.engine.scorer import Scorer, decision_line

MAX_LINE_BYTES = 64 * 1024
"""Longest event line read (an event is well under 4 KB; its strings are bounded)."""


@dataclass(slots=True)
class ReplaySummary:
    lines: int = 0
    scored: int = 0
    failed: int = 0
    decisions: dict[str, int] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"lines": self.lines, "scored": self.scored, "failed": self.failed,
                "decisions": self.decisions or {}}


def iter_records(path: Path) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """Yield (line number, record) pairs; a record that is not a JSON object is a str."""
    if path.suffix in (".parquet", ".pq"):
        table = _read_parquet(path)
        for n, row in enumerate(table.to_pylist(), start=1):
            yield n, {k: v for k, v in row.items() if v is not None}
        return
    with path.open("rb") as fh:  # bytes: one line that is not UTF-8 is that line's error
        for n, line in enumerate(fh, start=1):
            try:
                yield n, line.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield n, _Unreadable(f"not UTF-8 text (byte {exc.start}: {exc.reason})")


def _read_parquet(path: Path) -> Any:
    """The Parquet file as a table; ValueError (naming the file) if it is not one."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"{path}: not a readable Parquet file ({type(exc).__name__})") from None


class _Unreadable(str):
    """A line that could not be decoded; its text is the reason."""


def parse_record(record: dict[str, Any] | str) -> Event:
    """One input record as an Event; ValueError naming the problem (size, depth, types)."""
    if isinstance(record, _Unreadable):
        raise ValueError(str(record))
    if isinstance(record, str):
        try:
            obj = load_json(record, max_bytes=MAX_LINE_BYTES)
        except JsonRefused as exc:
            raise ValueError(str(exc)) from None
        if not isinstance(obj, dict):
            raise ValueError("a line must be a JSON object")
        record = obj
    try:
        check_depth(record)
        return Event.model_validate(record)
    except JsonRefused as exc:
        raise ValueError(str(exc)) from None
    except ValidationError as exc:
        raise ValueError(describe(exc)) from None


def count_lines(path: Path) -> int | None:
    if path.suffix in (".parquet", ".pq"):
        return _read_parquet(path).num_rows
    with path.open("rb") as fh:
        return sum(1 for _ in fh)


def replay(
    scorer: Scorer, events_path: Path, out: IO[str], *, progress: bool = True
) -> ReplaySummary:
    summary = ReplaySummary(decisions={})
    total = count_lines(events_path) if progress else None
    records = iter_records(events_path)
    bar = tqdm(records, total=total, unit="ev", disable=not progress, desc="replay")
    for n, record in bar:
        summary.lines += 1
        if isinstance(record, str) and not record.strip():
            out.write(json.dumps({"line": n, "error": "empty line"}) + "\n")
            summary.failed += 1
            continue
        try:
            event = parse_record(record)
        except ValueError as exc:
            out.write(json.dumps({"line": n, "error": str(exc)}) + "\n")
            summary.failed += 1
            continue
        decision = scorer.score(event)
        assert summary.decisions is not None
        summary.decisions[decision.decision] = summary.decisions.get(decision.decision, 0) + 1
        out.write(json.dumps(decision_line(decision), separators=(",", ":")) + "\n")
        summary.scored += 1
    scorer.flush()
    return summary
