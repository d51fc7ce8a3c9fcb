"""Loading training events: the columnar reader gives what line-by-line parsing gives."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from features.contract import parse_timestamp
from features.keys import KeyHasher
from training.events_io import epoch_seconds, load_events

SECRET = "events-io-secret-0123456789abcdef"


def _write(path: Path, rows: list[dict], tail: str = "") -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return path


ROWS = [{"api_key": f"sk-{i % 3}", "timestamp": f"2026-11-02T00:00:{i:02d}.{i * 37:03d}Z",
         "status": 200, "tokens": i} for i in range(20)]


def test_times_are_exactly_what_the_contract_reads(tmp_path: Path) -> None:
    df = load_events(_write(tmp_path / "e.jsonl", ROWS[::-1]), hasher=KeyHasher(SECRET))
    assert list(df["timestamp"]) == sorted(parse_timestamp(r["timestamp"]) for r in ROWS)
    assert "api_key" not in df.columns
    assert df["key_id"].nunique() == 3
    assert set(df["key_id"]) == {KeyHasher(SECRET).key_id(f"sk-{i}") for i in range(3)}


def test_mixed_and_odd_times_fall_back_to_one_by_one() -> None:
    col = pd.Series(["2026-11-02T00:00:01Z", "2026-11-02 01:00:00", "1794000000.5"])
    assert list(epoch_seconds(col)) == [parse_timestamp(t) for t in col]
    assert list(epoch_seconds(pd.Series([1.5, 2.0]))) == [1.5, 2.0]


def test_a_torn_last_line_is_skipped_and_a_bad_line_is_named(tmp_path: Path) -> None:
    torn = _write(tmp_path / "torn.jsonl", ROWS, tail='{"api_key": "sk-0", "timest')
    assert len(load_events(torn, hasher=KeyHasher(SECRET))) == len(ROWS)
    bad = _write(tmp_path / "bad.jsonl", ROWS[:2], tail="not json\n" + json.dumps(ROWS[2]))
    with pytest.raises(ValueError, match=r"bad\.jsonl:3"):
        load_events(bad, hasher=KeyHasher(SECRET))
