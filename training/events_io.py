"""Load events for training: JSONL or Parquet files, or the service's own event log.

Training files may carry the raw `api_key` (simulated traffic, a gateway export) or the
`key_id` already (the service's event log never holds raw keys). Either way the loaded
frame has a `key_id` column and no raw key, sorted by event time.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from features.contract import parse_timestamp
from features.keys import KeyHasher


def load_events(path: Path, *, hasher: KeyHasher | None = None,
                since: float | None = None, until: float | None = None) -> pd.DataFrame:
    """Events from a file or an event-log directory, as a DataFrame in time order.

    Raises ValueError naming the file and line when a record cannot be read, and when a
    file holds raw keys but no hasher was given.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("date=*/*.jsonl")) or sorted(path.glob("*.jsonl")) or sorted(
            path.glob("*.parquet"))
    else:
        files = [path]
    if not files:
        raise ValueError(f"no events found under {path}")
    frames = [pd.read_parquet(f) if f.suffix in (".parquet", ".pq") else _read_jsonl(f)
              for f in files]
    df = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    if df.empty:
        raise ValueError(f"no events found under {path}")
    if "key_id" not in df.columns:
        if "api_key" not in df.columns:
            raise ValueError(f"{path}: events carry neither api_key nor key_id")
        if hasher is None:
            raise ValueError(f"{path}: events carry raw api keys; a key hasher is needed")
        codes, keys = pd.factorize(df["api_key"].astype(str))
        df["key_id"] = np.array([hasher.key_id(k) for k in keys], dtype=object)[codes]
    if "api_key" in df.columns:
        df = df.drop(columns=["api_key"])
    df["timestamp"] = epoch_seconds(df["timestamp"])
    if since is not None:
        df = df[df["timestamp"] >= since]
    if until is not None:
        df = df[df["timestamp"] < until]
    return df.sort_values("timestamp", kind="stable").reset_index(drop=True)


def _read_jsonl(f: Path) -> pd.DataFrame:
    """A JSONL file: Arrow's reader (columnar, fast) when the file is clean, else line by
    line, naming the line that cannot be read (a torn last line after a crash is
    skipped)."""
    import pyarrow as pa
    import pyarrow.json as paj

    try:
        table = paj.read_json(f, parse_options=paj.ParseOptions(
            explicit_schema=pa.schema([("timestamp", pa.string())]),
            unexpected_field_behavior="infer"))
        return table.to_pandas()
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        return _read_jsonl_lines(f)


def _read_jsonl_lines(f: Path) -> pd.DataFrame:
    rows = []
    with f.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, start=1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except (json.JSONDecodeError, RecursionError):
                if fh.read(1) == "":
                    break  # a torn last line after a crash
                raise ValueError(f"{f}:{n}: not valid JSON") from None
    return pd.DataFrame(rows)


def epoch_seconds(column: pd.Series) -> np.ndarray:
    """Event times as epoch seconds, exactly as `parse_timestamp` reads each one: RFC 3339
    strings are parsed column-wise (to the microsecond, then divided, as Python's
    datetime does) when a sample agrees with `parse_timestamp`, else one by one."""
    if pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column):
        return column.to_numpy(dtype=np.float64)
    out = None
    try:
        if not pd.api.types.is_string_dtype(column):
            raise TypeError("not all text")
        parsed = pd.to_datetime(column, utc=True, format="ISO8601")
        out = parsed.dt.as_unit("us").astype("int64").to_numpy() / 1e6
    except (ValueError, TypeError, OverflowError):
        pass
    if out is not None:
        sample = np.random.default_rng(0).choice(len(column), min(len(column), 2000),
                                                 replace=False)
        if all(parse_timestamp(column.iloc[i], now=float("inf")) == out[i] for i in sample):
            return out
    one_by_one = [parse_timestamp(t, now=float("inf")) if not isinstance(t, float) else t
                  for t in column]
    return np.array(one_by_one, dtype=np.float64)
