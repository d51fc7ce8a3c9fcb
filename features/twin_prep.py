"""Event columns for the vectorised twin: the event contract applied to whole columns.

`features.contract.Event` validates and normalises one event; building a pydantic
model per row would cost more than computing the features. This module applies the
same rules column-wise (defaults, stripped strings, normalised addresses, upper-case
countries, tokens filled from the prompt/completion split, the documented ranges) and
refuses a bad frame with a `ValueError` naming the first bad row and field.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from features.contract import (
    MAX_EVENT_TIME,
    MAX_FUTURE_SKEW_S,
    MIN_EVENT_TIME,
    parse_timestamp,
)
from features.keys import KeyHasher


@dataclass(slots=True)
class Coded:
    """A text column as integer codes into its sorted distinct values (-1: none).

    Codes follow the values' order, the order the stores break ties by, and every
    per-value computation (normalising, hashing, geolocating) runs once per value."""

    codes: np.ndarray
    values: list[str]

    @classmethod
    def of(cls, codes: np.ndarray, raw: Sequence[Any], fn: Callable[[Any], Any] | None = None
           ) -> Coded:
        """From codes into `raw` values, each mapped by `fn` (which may merge values or
        return None)."""
        mapped = [fn(v) for v in raw] if fn is not None else list(raw)
        values = sorted({v for v in mapped if v is not None})
        index = {v: j for j, v in enumerate(values)}
        remap = np.array([-1 if v is None else index[v] for v in mapped] + [-1], np.int64)
        return cls(remap[codes], values)

    def map(self, fn: Callable[[str], Any]) -> Coded:
        """`fn` of each value (None stays None)."""
        return Coded.of(self.codes, self.values, fn)

    def text(self) -> np.ndarray:
        """The values as an object array (None where there is none)."""
        return np.array([*self.values, None], dtype=object)[self.codes]


@dataclass(slots=True)
class EventColumns:
    """One array per event field, in row order (NaN or code -1 where it has none)."""

    key_id: Coded
    ts: np.ndarray
    status: np.ndarray
    tokens: np.ndarray
    prompt: np.ndarray
    completion: np.ndarray
    latency: np.ndarray
    source_ip: Coded
    user_agent: Coded
    endpoint: Coded
    model: Coded
    country: Coded
    asn: Coded
    lat: np.ndarray
    lon: np.ndarray

    def __len__(self) -> int:
        return len(self.ts)


def event_columns(df: pd.DataFrame, *, hasher: KeyHasher | None = None,
                  key_id_column: str | None = None) -> EventColumns:
    """The frame's events as validated columns; ValueError names the first bad row."""
    key_id = _key_ids(df, hasher, key_id_column)
    ts = _timestamps(df)
    status = _ints(df, "status", 200, 100, 599)
    tokens = _ints(df, "tokens", 0, 0, 100_000_000)
    prompt = _ints(df, "prompt_tokens", None, 0, 100_000_000)
    completion = _ints(df, "completion_tokens", None, 0, 100_000_000)
    split = (np.nan_to_num(prompt) > 0) | (np.nan_to_num(completion) > 0)
    fill = (tokens == 0) & split  # the contract fills tokens from the split
    tokens = np.where(fill, np.nan_to_num(prompt) + np.nan_to_num(completion), tokens)
    latency = _floats(df, "latency_ms", 0.0, 0.0, 86_400_000.0)
    lat = _floats(df, "lat", None, -90.0, 90.0)
    lon = _floats(df, "lon", None, -180.0, 180.0)
    bad = np.isnan(lat) != np.isnan(lon)
    if bad.any():
        raise ValueError(f"row {int(np.argmax(bad))}: lat and lon must be given together")
    country = _strings(df, "country", None, 2)
    short = np.isin(country.codes, [j for j, c in enumerate(country.values) if len(c) != 2])
    if short.any():
        raise ValueError(f"row {int(np.argmax(short))}: country must be two letters")
    return EventColumns(
        key_id=key_id, ts=ts, status=status.astype(np.int64), tokens=tokens, prompt=prompt,
        completion=completion, latency=latency, source_ip=_addresses(df),
        user_agent=_strings(df, "user_agent", "", 2048),
        endpoint=_strings(df, "endpoint", "/", 256), model=_strings(df, "model", None, 256),
        country=country.map(str.upper), asn=_strings(df, "asn", None, 256, ints_as_text=True),
        lat=lat, lon=lon)


def _key_ids(df: pd.DataFrame, hasher: KeyHasher | None, column: str | None) -> Coded:
    if column is not None:
        if column not in df.columns:
            raise ValueError(f"key_id_column {column!r} is not a column of the frame")
        codes, raw = pd.factorize(df[column], use_na_sentinel=True)
        if (codes < 0).any():
            raise ValueError(f"row {int(np.argmax(codes < 0))}: {column} is missing")
        return Coded.of(codes, raw, str)
    if hasher is None:
        raise ValueError("give hasher= (to hash the api_key column) or key_id_column=")
    if "api_key" not in df.columns:
        raise ValueError("the frame has no api_key column (or pass key_id_column=)")
    keys = _strings(df, "api_key", None, 512)
    if (keys.codes < 0).any():
        raise ValueError(f"row {int(np.argmax(keys.codes < 0))}: api_key is missing")
    return keys.map(hasher.key_id)


def _timestamps(df: pd.DataFrame) -> np.ndarray:
    if "timestamp" not in df.columns:
        raise ValueError("the frame has no timestamp column")
    ts = epoch_seconds(df["timestamp"])
    bad = ~((ts >= MIN_EVENT_TIME) & (ts < MAX_EVENT_TIME))
    if bad.any():
        raise ValueError(f"row {int(np.argmax(bad))}: timestamp {ts[np.argmax(bad)]!r} is "
                         "outside 2000-01-01 to 2100-01-01 UTC")
    future = ts > time.time() + MAX_FUTURE_SKEW_S
    if future.any():
        raise ValueError(f"row {int(np.argmax(future))}: timestamp is more than a day in "
                         "the future")
    return ts


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
        if all(_one_timestamp(int(i), column.iloc[i]) == out[i] for i in sample):
            return out
    one_by_one = [_one_timestamp(pos, t) if not isinstance(t, float) else t
                  for pos, t in enumerate(column)]
    return np.array(one_by_one, dtype=np.float64)


def _one_timestamp(pos: int, value: Any) -> float:
    try:
        return parse_timestamp(value, now=float("inf"))
    except ValueError as exc:
        raise ValueError(f"row {pos}: {exc}") from None


def _numbers(df: pd.DataFrame, name: str) -> np.ndarray | None:
    if name not in df.columns:
        return None
    col = df[name]
    if pd.api.types.is_bool_dtype(col) or not (pd.api.types.is_numeric_dtype(col)
                                               or col.isna().all()):
        raise ValueError(f"column {name} must hold numbers")
    return col.to_numpy(dtype=np.float64, na_value=np.nan)


def _ints(df: pd.DataFrame, name: str, default: int | None, lo: int, hi: int) -> np.ndarray:
    """Integers as floats (NaN: missing, where there is no default)."""
    values = _numbers(df, name)
    if values is None:
        return np.full(len(df), np.nan if default is None else float(default))
    if default is not None:
        values = np.where(np.isnan(values), float(default), values)
    given = ~np.isnan(values)
    bad = given & ((values != np.floor(values)) | (values < lo) | (values > hi))
    if bad.any():
        raise ValueError(f"row {int(np.argmax(bad))}: {name} must be an integer from {lo} "
                         f"to {hi}")
    return values


def _floats(df: pd.DataFrame, name: str, default: float | None, lo: float,
            hi: float) -> np.ndarray:
    values = _numbers(df, name)
    if values is None:
        return np.full(len(df), np.nan if default is None else default)
    if default is not None:
        values = np.where(np.isnan(values), default, values)
    bad = ~np.isnan(values) & ~((values >= lo) & (values <= hi))
    if bad.any():
        raise ValueError(f"row {int(np.argmax(bad))}: {name} must be from {lo} to {hi}")
    return values


def _strings(df: pd.DataFrame, name: str, default: str | None, max_len: int, *,
             ints_as_text: bool = False) -> Coded:
    """Stripped text (the default where missing); anything else in the column is
    refused, naming the row."""
    if name not in df.columns:
        return Coded.of(np.zeros(len(df), np.int64), [default])
    codes, raw = pd.factorize(df[name], use_na_sentinel=True)
    mapped = [_one_string(u, ints_as_text) for u in raw]
    bad = [m is _BAD or len(m) > max_len for m in mapped]
    if any(bad):
        pos = int(np.argmax(np.isin(codes, np.flatnonzero(bad))))
        raise ValueError(f"row {pos}: {name} must be text of at most {max_len} characters")
    if default is not None:
        codes = np.where(codes < 0, len(mapped), codes)
        mapped.append(default)
    return Coded.of(codes, mapped)


_BAD = object()


def _one_string(value: Any, ints_as_text: bool) -> Any:
    if ints_as_text and isinstance(value, int | np.integer) and not isinstance(value, bool):
        return str(value)
    if ints_as_text and isinstance(value, float) and value.is_integer():
        return str(int(value))  # a number column with gaps: pandas holds it as floats
    return value.strip() if isinstance(value, str) else _BAD


def _addresses(df: pd.DataFrame) -> Coded:
    """Normalised addresses (none where empty); a bad one is refused, naming the row."""
    raw = _strings(df, "source_ip", None, 64)

    def normal(value: str) -> str | None:
        try:
            return str(ipaddress.ip_address(value)) if value else None
        except ValueError:
            pos = int(np.argmax(raw.codes == raw.values.index(value)))
            raise ValueError(f"row {pos}: source_ip is not an IPv4 or IPv6 address"
                             ) from None

    return raw.map(normal)
