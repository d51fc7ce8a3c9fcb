"""The batch twin of the streaming extractor: a DataFrame of events in, feature rows out.

Training data must be computed exactly as serving computes it, or the models learn a
world they never see. So this module defines no feature: it replays the events, in
order, through the one definition in `features.extractor` (`plan` → store → `build` →
`learn_ops`) over a fresh in-process `MemoryStore`, the same code path and the same
store semantics as the Redis-backed service (`tests/test_features_equivalence.py` holds
the two to 1e-9 on random histories).

Learning rule: by default every event teaches the baselines (training data is assumed
normal, or at least representative); pass `learn=False` to learn nothing, or a callable
`learn(i, fv) -> bool` (row position, feature vector) to decide per event — for example
to skip labelled attacks, or to mirror what a running scorer decided.

Cost: the memory-store speed of `benchmarks.features_bench` (a few thousand events a
second), one Python pass; memory grows with the distinct keys and addresses (bounded by
`max_entities`). For training on large logs use the vectorised twin
(`features.twin.twin_features`), which computes the same values column-wise, tens of times
faster; this replay stays as the reference it is tested against, and for callers that
need a custom store, a per-event learning rule or the rules' context.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import datetime
from typing import Any

import pandas as pd

from features.contract import Event
from features.extractor import FEATURE_NAMES, FeatureExtractor, FeatureStream, FeatureVector
from features.keys import KeyHasher
from features.stores.base import StateStore
from features.stores.memory import MemoryStore

LearnRule = Callable[[int, FeatureVector], bool]

_EVENT_FIELDS = tuple(Event.model_fields)
_INT_FIELDS = frozenset(name for name, f in Event.model_fields.items()
                        if f.annotation in (int, int | None))
"""Integer fields: a frame column of them with a gap holds floats (pandas has no int NaN)."""


def _clean(value: Any) -> Any:
    """pandas/numpy cells → plain Python values; missing cells → None."""
    if value is None:
        return None
    if isinstance(value, pd.Timestamp):
        return None if pd.isna(value) else value.to_pydatetime()
    if isinstance(value, datetime):
        return value
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if hasattr(value, "item") and not isinstance(value, str):  # numpy scalar
        value = value.item()
        if isinstance(value, float) and math.isnan(value):
            return None
        return value
    try:
        if pd.isna(value):
            return None
    except (TypeError, ValueError):
        pass
    return value


def events_from_frame(
    df: pd.DataFrame,
    *,
    hasher: KeyHasher | None = None,
    key_id_column: str | None = None,
) -> list[tuple[Event, str]]:
    """Validated `(event, key_id)` pairs from rows, in row order.

    Either `key_id_column` names a column of ready key ids (raw keys are then not
    needed), or `hasher` turns the `api_key` column into key ids as the service does.
    A bad row raises `ValueError` naming its position and the field.
    """
    if key_id_column is None and hasher is None:
        raise ValueError("give hasher= (to hash the api_key column) or key_id_column=")
    if key_id_column is not None and key_id_column not in df.columns:
        raise ValueError(f"key_id_column {key_id_column!r} is not a column of the frame")
    if key_id_column is None and "api_key" not in df.columns:
        raise ValueError("the frame has no api_key column (or pass key_id_column=)")
    columns = [c for c in df.columns if c in _EVENT_FIELDS]
    if key_id_column is not None and key_id_column not in columns:
        columns.append(key_id_column)
    out: list[tuple[Event, str]] = []
    records = df[columns].to_dict("records")
    for pos, record in enumerate(records):
        data = {k: v for k, v in ((k, _clean(v)) for k, v in record.items()) if v is not None}
        for name in _INT_FIELDS & data.keys():  # the contract is strict: 0.0 is not a count
            value = data[name]
            if isinstance(value, float) and value.is_integer():
                data[name] = int(value)
        if key_id_column is not None:
            key_id = str(data.pop(key_id_column, "") if key_id_column not in _EVENT_FIELDS
                         else data.get(key_id_column, ""))
            data.setdefault("api_key", key_id or "-")
        try:
            event = Event(**data)
        except Exception as exc:  # pydantic.ValidationError: name the row
            raise ValueError(f"row {pos}: {exc}") from exc
        if key_id_column is None:
            key_id = hasher.key_id(event.api_key)  # type: ignore[union-attr]
        out.append((event, key_id))
    return out


def batch_features(
    df: pd.DataFrame,
    *,
    hasher: KeyHasher | None = None,
    key_id_column: str | None = None,
    extractor: FeatureExtractor | None = None,
    store: StateStore | None = None,
    learn: LearnRule | bool = True,
    progress: bool = False,
    max_entities: int = 2_000_000,
    context_columns: tuple[str, ...] = (),
) -> pd.DataFrame:
    """Feature vectors for a DataFrame of events in time order, as the service computes them.

    Parameters
    ----------
    df:
        One row per event, columns named as in the event contract (`api_key`,
        `timestamp`, `source_ip`, `tokens`, ...); missing optional cells are fine.
    hasher, key_id_column:
        How to get each row's key id: hash the `api_key` column with the service's
        `KeyHasher`, or read ready key ids from a column.
    extractor:
        The feature extractor (default: a new `FeatureExtractor` with the default geo).
    store:
        State to start from (default: a fresh `MemoryStore(max_entities=...)`).
    learn:
        True (every event teaches the baselines), False, or `learn(i, fv) -> bool`.
    progress:
        Show a tqdm progress bar.
    context_columns:
        Context fields to add after the features (e.g. `("key_id", "country")`).

    Returns
    -------
    A DataFrame indexed like `df` with the columns `FEATURE_NAMES` (in that order),
    followed by any `context_columns`.
    """
    from tqdm.auto import tqdm

    events = events_from_frame(df, hasher=hasher, key_id_column=key_id_column)
    if store is None:  # bounded by entities only, as before: retrain is not serving
        store = MemoryStore(max_entities=max_entities, max_mb=None)
    stream = FeatureStream(store, extractor or FeatureExtractor())
    rows: list[list[float]] = []
    context: list[list[Any]] = []
    for i, (event, key_id) in enumerate(tqdm(events, total=len(events), disable=not progress,
                                             desc="features", unit="ev")):
        fv = stream.process(event, key_id)
        if learn is True or (learn is not False and learn(i, fv)):  # type: ignore[operator]
            stream.learn(fv)
        values = fv.values
        rows.append([values[name] for name in FEATURE_NAMES])
        if context_columns:
            context.append([fv.context.get(c) for c in context_columns])
    stream.flush()
    out = pd.DataFrame(rows, columns=list(FEATURE_NAMES), index=df.index, dtype=float)
    for j, name in enumerate(context_columns):
        out[name] = [row[j] for row in context]
    return out
