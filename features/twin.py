"""The vectorised twin: a DataFrame of events in, every event's features out, fast.

The streaming path computes one event at a time against the store
(`features.extractor`). Training needs the same numbers for millions of events, and one
Python pass through the store runs at a few thousand events a second. The twin computes
them column-wise instead, from the same declarations (`features.catalogue`):

* windowed counters (requests, tokens, errors, refused credentials, spend, by key and
  by address, over 1 min to 30 days) are tiled windows: each event's bucket, a
  group-by on the entity, running sums, and for each window the bounds of its whole
  buckets and its edge bucket (weighted as the stream weighs it), walked by two
  pointers in compiled code;
* per-event values (sizes, cost, time of day) are column arithmetic;
* what is a recurrence rather than a sum (EWM baselines, gaps, capped sets, the last
  location, learned rings) runs in one compiled pass (`features.twin_kernels`).

Strings (keys, addresses, models, networks) are coded once per distinct value, and the
location of each distinct (address, gateway fields) and the price of each model are
looked up once, so the Python work grows with what is distinct, not with the events.

Semantics, held to the stream within 1e-9 by `tests/test_features_equivalence.py`:

* the twin starts from empty state (a fresh store) and keeps every entity: no idle
  expiry and no eviction (the memory store expires entities idle for 8 days of event
  time and evicts beyond its bound; over a training window that matters only for a key
  or address silent for more than 8 days);
* events must be in time order (as `training.events_io.load_events` returns them): the
  windows are exact bucket sums then; a frame out of order is refused;
* learning: `learned` says which events were judged normal and so teach the learned
  baselines (the stream does not learn from events it flags). Retraining passes True
  for all: its data is the service's accepted traffic, taken as normal, as
  `features.batch` always did; a replay that has the decisions passes them as a column.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from features import twin_kernels as tk
from features.catalogue import CATALOGUE, FEATURE_NAMES, RingRead, ring_reads
from features.extractor import (
    ASN_CAP,
    COUNTRY_CAP,
    COUNTRY_IPS_CAP,
    DISTINCT_CAP,
    ENDPOINT_CAP,
    MODEL_CAP,
    POP_RING_SIZE,
    RECUR_RING_SIZE,
    USER_AGENT_CAP,
    FeatureExtractor,
    _ua_member,
    network_prefix,
    ua_family,
)
from features.keys import KeyHasher
from features.pricing import PER_MILLION, PriceTable
from features.twin_prep import Coded, EventColumns, event_columns
from features.windows import HOUR_RING_SIZE

CHUNK = 4096
"""Events per compiled call: the progress bar moves once per chunk."""
_COL = {name: i for i, name in enumerate(FEATURE_NAMES)}
_NUMPY_COLUMNS = np.zeros(len(FEATURE_NAMES), dtype=bool)
"""Columns computed column-wise (windowed counters, their ratios, the event's own
values); the compiled pass computes the others."""
_RATIOS = (
    ("failure_ratio_by_key_5m", "errors_count_by_key_5m", "requests_count_by_key_5m"),
    ("auth_fail_ratio_by_key_5m", "auth_fail_count_by_key_5m", "requests_count_by_key_5m"),
    ("auth_fail_ratio_by_ip_5m", "auth_fail_count_by_ip_5m", "requests_count_by_ip_5m"),
)
"""Ratios of two windowed counters (0 when the denominator is)."""
for _f in CATALOGUE:
    _NUMPY_COLUMNS[_COL[_f.name]] = (_f.windowed or _f.entity == "event"
                                     or _f.name in {r[0] for r in _RATIOS})


def twin_features(
    df: pd.DataFrame,
    *,
    hasher: KeyHasher | None = None,
    key_id_column: str | None = None,
    extractor: FeatureExtractor | None = None,
    learned: bool | Sequence[bool] | np.ndarray = True,
    progress: bool = False,
) -> pd.DataFrame:
    """Feature vectors for a DataFrame of events in time order, as the stream computes
    them from empty state.

    `hasher` or `key_id_column` say how to get key ids (as in `features.batch`);
    `extractor` gives the geolocator, price table and EWM weights; `learned` is True
    (every event judged normal), False, or one flag per row. Returns a frame indexed
    like `df` with the columns `FEATURE_NAMES`.
    """
    from tqdm.auto import tqdm

    ex = extractor or FeatureExtractor()
    cols = event_columns(df, hasher=hasher, key_id_column=key_id_column)
    n = len(cols)
    if n and np.any(np.diff(cols.ts) < 0):
        raise ValueError("events must be in time order (sort by timestamp first)")
    mask = np.broadcast_to(np.asarray(learned, dtype=bool), (n,)).copy()
    out = np.zeros((n, len(FEATURE_NAMES)), order="F")  # column-wise: one feature a column
    with tqdm(total=n, disable=not progress, desc="features", unit="ev",
              unit_scale=True) as bar:
        bar.set_postfix_str("locating and pricing")
        ev = _derived(cols, ex)
        _event_values(out, cols, ev)
        bar.set_postfix_str("windows")
        _windowed_values(out, cols, ev)
        bar.set_postfix_str("baselines, sets, places")
        inputs = _kernel_inputs(cols, ev, out)
        state = _State.empty(inputs)
        kernel_cols = np.flatnonzero(~_NUMPY_COLUMNS)
        rows = np.zeros((min(CHUNK, n), len(FEATURE_NAMES)))  # one event a row
        for start in range(0, n, CHUNK):
            stop = min(start + CHUNK, n)
            rows[:] = 0.0
            tk.run(inputs.ei, inputs.ef, mask, start, stop, *state.arrays(),
                   (ex.ewm_alpha, ex.how_alpha), rows)
            tk.scatter_rows(rows, out, start, stop, kernel_cols)
            bar.update(stop - start)
    return pd.DataFrame(out, columns=list(FEATURE_NAMES), index=df.index, copy=False)


@dataclass(slots=True)
class Derived:
    """What each event's fields mean to the features: its place, price and entities."""

    country: Coded
    asn: Coded
    hosting: np.ndarray
    lat: np.ndarray
    lon: np.ndarray
    usd: np.ndarray
    unknown: np.ndarray
    priced: np.ndarray
    key: np.ndarray
    ip: np.ndarray


def _derived(cols: EventColumns, ex: FeatureExtractor) -> Derived:
    country, asn, hosting, lat, lon = _locate(cols, ex)
    usd, unknown, priced = _prices(cols, ex.pricing)
    return Derived(country=country, asn=asn, hosting=hosting, lat=lat, lon=lon, usd=usd,
                   unknown=unknown, priced=priced, key=cols.key_id.codes,
                   ip=cols.source_ip.codes)


def _locate(cols: EventColumns, ex: FeatureExtractor) -> tuple[Any, ...]:
    """The stream's `locate` once per distinct (address, gateway fields)."""
    frame = pd.DataFrame({"ip": cols.source_ip.codes, "cc": cols.country.codes,
                          "asn": cols.asn.codes, "lat": cols.lat, "lon": cols.lon})
    groups = frame.groupby(list(frame.columns), dropna=False, sort=False).ngroup().to_numpy()
    firsts = np.unique(groups, return_index=True)[1]
    ips, ccs, asns = (np.array([*c.values, None], dtype=object)
                      for c in (cols.source_ip, cols.country, cols.asn))
    found = []
    for ip, cc, asn, lat, lon in frame.iloc[firsts].itertuples(index=False):
        geo = ex.locate_fields(ips[ip], ccs[cc], asns[asn], None if np.isnan(lat) else lat,
                               None if np.isnan(lon) else lon)
        found.append((geo.country, geo.asn, geo.hosting,
                      np.nan if geo.lat is None else geo.lat,
                      np.nan if geo.lon is None else geo.lon))
    parts = list(zip(*found, strict=True)) if found else [(), (), (), (), ()]
    country, asn = (Coded.of(groups, p) for p in parts[:2])
    hosting = np.array(parts[2], dtype=bool)[groups]
    lat, lon = (np.array(p, dtype=np.float64)[groups] for p in parts[3:])
    return country, asn, hosting, lat, lon


def _prices(cols: EventColumns, pricing: PriceTable) -> tuple[np.ndarray, ...]:
    """`PriceTable.cost` as column arithmetic: one table lookup per distinct model;
    returns the cost, whether the price is unknown, and the code of the priced model
    (its table entry, or "other") that the population's size prior is kept under."""
    codes = cols.model.codes
    looked = [pricing.lookup(m) for m in cols.model.values] + [pricing.lookup(None)]
    pp = np.array([p.prompt for p, _ in looked])[codes]
    pc = np.array([p.completion for p, _ in looked])[codes]
    tokens, prompt, completion = cols.tokens, cols.prompt, cols.completion
    has_p, has_c = ~np.isnan(prompt), ~np.isnan(completion)
    free = (tokens == 0) & ~(np.nan_to_num(prompt) > 0) & ~(np.nan_to_num(completion) > 0)
    p = np.where(has_p, prompt, np.maximum(tokens - np.nan_to_num(completion), 0))
    c = np.where(has_c, completion, np.maximum(tokens - p, 0))
    share = pricing.blend_prompt_share
    usd = np.where(has_p | has_c, p * pp + c * pc,
                   tokens * (share * pp + (1.0 - share) * pc)) / PER_MILLION
    usd[free] = 0.0
    entries = [e or "other" for _, e in looked]
    names = sorted(set(entries) | {"other"})
    entry_code = np.array([names.index(e) for e in entries], dtype=np.int64)[codes]
    unknown = np.array([e is None for _, e in looked], dtype=bool)[codes] & ~free
    priced = np.where(free | unknown, names.index("other"), entry_code)
    return usd, unknown, priced


def _event_values(out: np.ndarray, cols: EventColumns, ev: Derived) -> None:
    """Features of the event alone."""
    ts = cols.ts
    out[:, _COL["tokens_log_by_event"]] = np.log1p(cols.tokens)
    out[:, _COL["latency_log_ms_by_event"]] = np.log1p(cols.latency)
    split = ~np.isnan(cols.prompt) & ~np.isnan(cols.completion)
    out[:, _COL["prompt_completion_ratio_by_event"]] = np.where(
        split, np.log1p(np.nan_to_num(cols.prompt)) - np.log1p(np.nan_to_num(cols.completion)),
        0.0)
    out[:, _COL["hosting_asn_by_event"]] = ev.hosting
    out[:, _COL["cost_usd_by_event"]] = ev.usd
    out[:, _COL["unknown_price_by_event"]] = ev.unknown
    hour = (ts % 86400) / 3600
    day = (ts // 86400 + 3) % 7
    out[:, _COL["hour_of_day_sin"]] = np.sin(2 * np.pi * hour / 24)
    out[:, _COL["hour_of_day_cos"]] = np.cos(2 * np.pi * hour / 24)
    out[:, _COL["day_of_week_sin"]] = np.sin(2 * np.pi * day / 7)
    out[:, _COL["day_of_week_cos"]] = np.cos(2 * np.pi * day / 7)


def _windowed_values(out: np.ndarray, cols: EventColumns, ev: Derived) -> None:
    """Every declared windowed counter, by tiled windows over the entity's buckets."""
    amounts = {
        "requests": np.ones(len(cols)),
        "tokens": cols.tokens,
        "errors": ((cols.status >= 400) & (cols.status < 500)).astype(np.float64),
        "auth_fails": np.isin(cols.status, (401, 403)).astype(np.float64),
        "spend": ev.usd,
    }
    for entity, codes in (("key", ev.key), ("ip", ev.ip)):
        rows = np.flatnonzero(codes >= 0)
        rows = rows[np.argsort(codes[rows], kind="stable")]  # by entity, then in time order
        if len(rows):
            _entity_windows(out, ring_reads(entity), codes[rows], cols.ts[rows],
                            {f: a[rows] for f, a in amounts.items()}, rows)
    for name, num, den in _RATIOS:
        d = out[:, _COL[den]]
        out[:, _COL[name]] = np.where(d > 0, out[:, _COL[num]] / np.where(d > 0, d, 1.0), 0.0)


def _entity_windows(out: np.ndarray, rings: tuple[RingRead, ...], group: np.ndarray,
                    ts: np.ndarray, amounts: dict[str, np.ndarray], rows: np.ndarray) -> None:
    """One entity kind's windows, for events sorted by entity and time: running sums
    per entity and field, then each window's whole and edge buckets
    (`twin_kernels.tiled_window`)."""
    sums: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for ring in rings:
        if ring.field not in sums:  # running sums restart with each entity
            amount = amounts[ring.field]
            cum = pd.Series(amount).groupby(group).cumsum().to_numpy()
            sums[ring.field] = cum, cum - amount
        cum, before = sums[ring.field]
        b = ring.bucket_s
        stamp = (ts // b).astype(np.int64)
        frac = 1.0 - (ts % b) / b
        for name, n in ring.windows:
            tk.tiled_window(group, stamp, cum, before, frac, n, rows, out, _COL[name])


@dataclass(slots=True)
class KernelInputs:
    """The events as the compiled pass reads them, and the sizes of its state."""

    ei: np.ndarray
    ef: np.ndarray
    keys: int
    set_capacity: np.ndarray
    flags: int
    priced_models: int


def _kernel_inputs(cols: EventColumns, ev: Derived, out: np.ndarray) -> KernelInputs:
    n = len(cols)
    ei = np.full((n, tk.N_INT), -1, dtype=np.int64)
    ef = np.zeros((n, tk.N_FLOAT))
    k, ip = ev.key, ev.ip
    keys = int(k.max()) + 1 if n else 0
    ips = int(ip.max()) + 1 if n else 0
    ei[:, tk.I_KEY], ei[:, tk.I_IP] = k, ip
    ei[:, tk.I_EP] = cols.endpoint.codes
    ei[:, tk.I_UA] = cols.user_agent.map(_ua_member).codes
    ei[:, tk.I_MODEL] = cols.model.codes
    ei[:, tk.I_COUNTRY] = ev.country.codes
    ei[:, tk.I_ASN] = ev.asn.codes
    ei[:, tk.I_PSZ] = ev.priced
    prefix = cols.source_ip.map(network_prefix).codes
    has_prefix = prefix >= 0
    ei[:, tk.I_HAS_PREFIX] = has_prefix
    ei[:, tk.I_AUTH_FAIL] = np.isin(cols.status, (401, 403))
    ei[:, tk.I_HOSTING] = ev.hosting
    ei[:, tk.I_LOCATED] = ~np.isnan(ev.lat)
    capacity = _set_layout(ei, cols, ev, keys, ips)
    flags = _flag_layout(ei, cols, ev, prefix, has_prefix)
    ef[:, tk.F_TS] = cols.ts
    ef[:, tk.F_TOKENS] = cols.tokens
    ef[:, tk.F_PROMPT] = np.where(np.isnan(cols.prompt), cols.tokens, cols.prompt)
    ef[:, tk.F_TOKENS_LOG] = out[:, _COL["tokens_log_by_event"]]
    ef[:, tk.F_LATENCY_LOG] = out[:, _COL["latency_log_ms_by_event"]]
    ef[:, tk.F_COST] = ev.usd
    ef[:, tk.F_LAT], ef[:, tk.F_LON] = ev.lat, ev.lon
    ef[:, tk.F_R1H] = out[:, _COL["requests_count_by_key_1h"]]
    ef[:, tk.F_R5M] = out[:, _COL["requests_count_by_key_5m"]]
    ef[:, tk.F_SPEND1H] = out[:, _COL["spend_usd_by_key_1h"]]
    return KernelInputs(ei, ef, keys, capacity, flags, int(ei[:, tk.I_PSZ].max()) + 1
                        if n else 0)


def _pairs(a: np.ndarray, b: np.ndarray, where: np.ndarray) -> np.ndarray:
    """Codes of the (a, b) pairs (b may be -1), -1 where `where` is False."""
    combined = a * (int(b.max(initial=0)) + 2) + (b + 1)
    out = np.full(len(a), -1, dtype=np.int64)
    out[where] = pd.factorize(combined[where])[0]
    return out


def _set_layout(ei: np.ndarray, cols: EventColumns, ev: Derived, keys: int,
                ips: int) -> np.ndarray:
    """Number the capped sets (each family's sets one after the other), write each
    event's set of each family, and return each set's capacity: the events that add to
    it (a bound on its distinct members), at most its cap plus the one that a new member
    pushes out."""
    k, ip = ev.key, ev.ip
    has_ip = ip >= 0
    country_ips = _pairs(k, ev.country.codes, has_ip)  # no country: a set of its own
    auth_fail = ei[:, tk.I_AUTH_FAIL] > 0
    every = np.ones(len(k), bool)
    families = (  # (column, set of each event, sets, events that add a member, cap)
        (tk.I_S_IPS, k, keys, has_ip, DISTINCT_CAP),
        (tk.I_S_CIPS, country_ips, int(country_ips.max(initial=-1)) + 1, has_ip,
         COUNTRY_IPS_CAP),
        (tk.I_S_EP, k, keys, every, ENDPOINT_CAP),
        (tk.I_S_UA, k, keys, every, USER_AGENT_CAP),
        (tk.I_S_MDL, k, keys, ei[:, tk.I_MODEL] >= 0, MODEL_CAP),
        (tk.I_S_CC, k, keys, ei[:, tk.I_COUNTRY] >= 0, COUNTRY_CAP),
        (tk.I_S_ASN, k, keys, ei[:, tk.I_ASN] >= 0, ASN_CAP),
        (tk.I_S_IPKEYS, ip, ips, has_ip, DISTINCT_CAP),
        (tk.I_S_IPFKEYS, ip, ips, has_ip & auth_fail, DISTINCT_CAP),
    )
    capacities = []
    base = 0
    for col, sets, count, adds, cap in families:
        ei[:, col] = np.where(sets >= 0, sets + base, -1)
        adding = np.bincount(sets[adds], minlength=count)[:count]  # >= distinct members
        capacities.append(np.minimum(adding, cap + 1))
        base += count
    return np.concatenate(capacities) if capacities else np.zeros(0, np.int64)


def _flag_layout(ei: np.ndarray, cols: EventColumns, ev: Derived, prefix: np.ndarray,
                 has_prefix: np.ndarray) -> int:
    """Number the key's yes/no fields learned from normal traffic (known networks,
    prefixes, client libraries, hosting networks, countries); returns how many."""
    k = ev.key
    everyone = np.ones(len(k), dtype=bool)
    asn, country = ei[:, tk.I_ASN], ei[:, tk.I_COUNTRY]
    families = (
        (tk.I_F_NET, _pairs(k, asn, everyone)),
        (tk.I_F_PFX, _pairs(k, prefix, has_prefix)),
        (tk.I_F_UAF, _pairs(k, cols.user_agent.map(ua_family).codes, everyone)),
        (tk.I_F_ASNO, _pairs(k, asn, ev.hosting & (asn >= 0))),
        (tk.I_F_TCC, _pairs(k, country, country >= 0)),
    )
    base = 0
    for col, codes in families:
        ei[:, col] = np.where(codes >= 0, codes + base, -1)
        base += int(codes.max(initial=-1)) + 1
    return base


@dataclass(slots=True)
class _State:
    """The compiled pass's state, empty: a fresh store."""

    kew: np.ndarray
    how: np.ndarray
    kc: np.ndarray
    ks: np.ndarray
    rr_s: np.ndarray
    rr_v: np.ndarray
    nr_s: np.ndarray
    nr_v: np.ndarray
    flags: np.ndarray
    off: np.ndarray
    size: np.ndarray
    mem: np.ndarray
    tim: np.ndarray
    oldest: np.ndarray
    pop_s: np.ndarray
    pop_v: np.ndarray
    psz: np.ndarray

    @classmethod
    def empty(cls, inputs: KernelInputs) -> _State:
        keys = inputs.keys
        cap = inputs.set_capacity
        total = int(cap.sum())
        return cls(
            kew=np.zeros((keys, 7, 3)), how=np.zeros((keys, 168, 3)),
            kc=np.zeros((keys, tk.C_HOUR0 + 24)), ks=np.full((keys, 11), np.nan),
            rr_s=np.full((keys, 3, RECUR_RING_SIZE), -1, np.int64),
            rr_v=np.zeros((keys, 3, RECUR_RING_SIZE)),
            nr_s=np.full((keys, 2, HOUR_RING_SIZE), -1, np.int64),
            nr_v=np.zeros((keys, 2, HOUR_RING_SIZE)),
            flags=np.zeros(inputs.flags, dtype=np.bool_),
            off=np.concatenate(([0], np.cumsum(cap)[:-1])).astype(np.int64)
            if len(cap) else np.zeros(0, np.int64),
            size=np.zeros(len(cap), np.int64), mem=np.zeros(total, np.int64),
            tim=np.zeros(total), oldest=np.full(len(cap), np.inf),
            pop_s=np.full(POP_RING_SIZE, -1, np.int64),
            pop_v=np.zeros(POP_RING_SIZE), psz=np.zeros((max(inputs.priced_models, 1), 3)))

    def arrays(self) -> tuple[np.ndarray, ...]:
        return tuple(getattr(self, f) for f in self.__dataclass_fields__)  # type: ignore[attr-defined]
