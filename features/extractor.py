"""The streaming feature extractor: one event in, one named feature vector out.

This module holds the one definition of every feature. It works in two phases so that
a whole event costs one store round trip:

1. `plan` turns the event into generic store operations for the key and the source IP:
   record the observation (counters, distinct sets) and read back what the features need.
2. `build` turns the results into a `FeatureVector`.

Learning is separate: `learn_ops` returns the baseline updates for an event, and the
scorer applies them only when the event was not flagged, so that an attacker cannot
teach the baselines that the attack is normal. The scorer sends those updates ahead of
the next event's operations, so they too ride on an existing round trip.

Feature names say what, how, by whom and over what window
(`requests_count_by_key_5m`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from features.contract import Event
from features.stores.base import EWM, GET, RECENT_ADD, EntityOps
from features.windows import WINDOWS, Window, counter_ops, ring_window

KEY = "k"
IP = "ip"

EWM_ALPHA = 0.02
"""Weight of one event in the adaptive means: about the last 50 learned events."""
HOW_ALPHA = 0.1
"""Weight of one event in its hour-of-week slot: a slot follows the last few weeks."""
WARM_EVENTS = 30
"""Events a key needs before its own baselines are trusted over the population's."""
DISTINCT_CAP = 512
"""Distinct members tracked per set: counts saturate here, memory stays bounded."""
EPS = 1e-9

COUNTER_METRICS = ("requests", "tokens", "errors", "auth_fails")
_KEY_WINDOWS = {
    "requests": ("count", WINDOWS),
    "tokens": ("sum", WINDOWS),
    "errors": ("count", WINDOWS),
    "auth_fails": ("count", (WINDOWS[1],)),
}
_IP_WINDOWS = {
    "requests": ("count", WINDOWS[:3]),
    "tokens": ("sum", WINDOWS[:3]),
    "errors": ("count", WINDOWS[1:2]),
    "auth_fails": ("count", WINDOWS[1:3]),
}


def hour_of_week(ts: float) -> int:
    """0..167, Monday 00:00 UTC = 0 (the epoch fell on a Thursday)."""
    return int((ts // 3600 + 72) % 168)


def windowed_name(metric: str, agg: str, entity: str, window: Window) -> str:
    singular = {"requests": "requests", "tokens": "tokens", "errors": "errors",
                "auth_fails": "auth_fail"}[metric]
    return f"{singular}_{agg}_by_{entity}_{window.label}"


def _windowed(spec: dict[str, tuple[str, tuple[Window, ...]]],
              entity: str) -> dict[tuple[str, Window], str]:
    return {(metric, w): windowed_name(metric, agg, entity, w)
            for metric, (agg, windows) in spec.items() for w in windows}


KEY_WINDOWED = _windowed(_KEY_WINDOWS, "key")
IP_WINDOWED = _windowed(_IP_WINDOWS, "ip")


FEATURE_NAMES: tuple[str, ...] = (
    *KEY_WINDOWED.values(), *IP_WINDOWED.values(),
    "failure_ratio_by_key_5m", "auth_fail_ratio_by_key_5m", "auth_fail_ratio_by_ip_5m",
    "distinct_ips_by_key_1h", "distinct_keys_by_ip_1h", "tokens_log_by_event",
    "latency_log_ms_by_event", "tokens_zscore_by_key", "latency_zscore_by_key",
    "history_events_by_key", "rate_vs_hour_of_week_by_key_1h", "hour_of_day_sin",
    "hour_of_day_cos", "day_of_week_sin", "day_of_week_cos",
)
"""Every feature the extractor builds, in a stable order (the models' schema)."""


@dataclass(slots=True)
class FeatureVector:
    """A named numeric vector plus the context rules need to explain themselves."""

    values: dict[str, float]
    context: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> float:
        return self.values[name]

    def get(self, name: str, default: float = 0.0) -> float:
        return self.values.get(name, default)


@dataclass(slots=True)
class Plan:
    """Store operations for one event, and where each feature's inputs will come back."""

    event: Event
    key_id: str
    key_ops: EntityOps
    ip_ops: EntityOps | None
    key_idx: dict[str, Any] = field(default_factory=dict)
    ip_idx: dict[str, Any] = field(default_factory=dict)

    def requests(self) -> list[EntityOps]:
        return [self.key_ops] if self.ip_ops is None else [self.key_ops, self.ip_ops]


class FeatureExtractor:
    """Builds per-key and per-IP feature vectors from the state in a `StateStore`."""

    def __init__(self, *, ewm_alpha: float = EWM_ALPHA, how_alpha: float = HOW_ALPHA) -> None:
        self.ewm_alpha = ewm_alpha
        self.how_alpha = how_alpha

    # ---- phase 1 ----------------------------------------------------------------------
    def plan(self, event: Event, key_id: str) -> Plan:
        ts = event.timestamp
        key_ops = EntityOps(KEY, key_id)
        ip_ops = EntityOps(IP, event.source_ip) if event.source_ip else None
        plan = Plan(event=event, key_id=key_id, key_ops=key_ops, ip_ops=ip_ops)
        amounts = (
            1.0,
            float(event.tokens),
            1.0 if event.is_failure else 0.0,
            1.0 if event.is_auth_failure else 0.0,
        )
        plan.key_idx["counters"] = counter_ops(key_ops, ts, amounts)
        if ip_ops is not None:
            plan.ip_idx["counters"] = counter_ops(ip_ops, ts, amounts)
        if event.source_ip:
            plan.key_idx["distinct_ips"] = key_ops.add(
                RECENT_ADD, "ips", event.source_ip, ts, 3600, DISTINCT_CAP
            )
        if ip_ops is not None:
            plan.ip_idx["distinct_keys"] = ip_ops.add(
                RECENT_ADD, "keys", key_id, ts, 3600, DISTINCT_CAP
            )
        for name in ("tok", "lat", "rate", f"how:{hour_of_week(ts)}"):
            plan.key_idx[f"ewm:{name}"] = tuple(
                key_ops.add(GET, f"{name}:{part}") for part in ("m", "v", "n")
            )
        return plan

    # ---- phase 2 ----------------------------------------------------------------------
    def build(self, plan: Plan, results: list[list[Any]]) -> FeatureVector:
        event = plan.event
        ts = event.timestamp
        key_res = results[0]
        ip_res = results[1] if plan.ip_ops is not None else None
        v: dict[str, float] = {}

        width = len(COUNTER_METRICS)
        for windowed, idx, res in (
            (KEY_WINDOWED, plan.key_idx, key_res),
            (IP_WINDOWED, plan.ip_idx, ip_res),
        ):
            rings = (res[idx["counters"][0]], res[idx["counters"][1]]) if res else None
            for (metric, window), name in windowed.items():
                if rings is None:
                    v[name] = 0.0
                    continue
                ring = rings[0] if window.bucket_s == 60 else rings[1]
                v[name] = ring_window(ts, window, ring, width, COUNTER_METRICS.index(metric))

        v["failure_ratio_by_key_5m"] = _ratio(v["errors_count_by_key_5m"],
                                              v["requests_count_by_key_5m"])
        v["auth_fail_ratio_by_key_5m"] = _ratio(v["auth_fail_count_by_key_5m"],
                                                v["requests_count_by_key_5m"])
        v["auth_fail_ratio_by_ip_5m"] = _ratio(v["auth_fail_count_by_ip_5m"],
                                               v["requests_count_by_ip_5m"])
        v["distinct_ips_by_key_1h"] = float(key_res[plan.key_idx["distinct_ips"]]) if (
            "distinct_ips" in plan.key_idx) else 0.0
        v["distinct_keys_by_ip_1h"] = float(ip_res[plan.ip_idx["distinct_keys"]]) if (
            ip_res is not None) else 0.0

        tok = _ewm(key_res, plan.key_idx["ewm:tok"])
        lat = _ewm(key_res, plan.key_idx["ewm:lat"])
        rate = _ewm(key_res, plan.key_idx["ewm:rate"])
        how = _ewm(key_res, plan.key_idx[f"ewm:how:{hour_of_week(ts)}"])
        tokens_log = math.log1p(event.tokens)
        latency_log = math.log1p(event.latency_ms)
        v["tokens_log_by_event"] = tokens_log
        v["latency_log_ms_by_event"] = latency_log
        v["tokens_zscore_by_key"] = _z(tokens_log, tok)
        v["latency_zscore_by_key"] = _z(latency_log, lat)
        v["history_events_by_key"] = tok[2]
        expected = how[0] if how[2] >= 3 else rate[0]
        v["rate_vs_hour_of_week_by_key_1h"] = (
            v["requests_count_by_key_1h"] / max(expected, 1.0) if rate[2] > 0 else 1.0
        )
        hour = (ts % 86400) / 3600
        day = (ts // 86400 + 3) % 7
        v["hour_of_day_sin"] = math.sin(2 * math.pi * hour / 24)
        v["hour_of_day_cos"] = math.cos(2 * math.pi * hour / 24)
        v["day_of_week_sin"] = math.sin(2 * math.pi * day / 7)
        v["day_of_week_cos"] = math.cos(2 * math.pi * day / 7)

        context = {
            "key_id": plan.key_id,
            "source_ip": event.source_ip,
            "timestamp": ts,
            "key_warm": tok[2] >= WARM_EVENTS,
            "baseline_tokens_mean": math.expm1(tok[0]) if tok[2] else None,
            "baseline_requests_1h": expected if rate[2] else None,
        }
        return FeatureVector(values=v, context=context)

    # ---- learning -----------------------------------------------------------------------
    def learn_ops(self, fv: FeatureVector) -> list[EntityOps]:
        """Baseline updates for an event that was judged normal."""
        ops = EntityOps(KEY, fv.context["key_id"])
        ts = fv.context["timestamp"]
        ops.add(EWM, "tok", fv.values["tokens_log_by_event"], self.ewm_alpha)
        ops.add(EWM, "lat", fv.values["latency_log_ms_by_event"], self.ewm_alpha)
        ops.add(EWM, "rate", fv.values["requests_count_by_key_1h"], self.ewm_alpha)
        ops.add(EWM, f"how:{hour_of_week(ts)}", fv.values["requests_count_by_key_1h"],
                self.how_alpha)
        return [ops]


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else 0.0


def _ewm(res: list[Any], idx: tuple[int, int, int]) -> tuple[float, float, float]:
    m, var, n = (res[i] for i in idx)
    if n is None:
        return 0.0, 0.0, 0.0
    return float(m), float(var), float(n)


def _z(x: float, stats: tuple[float, float, float]) -> float:
    mean, var, n = stats
    if n < 2:
        return 0.0
    # a floor on the spread so that a key that always sends the same size is not
    # flagged for a one-token difference
    return (x - mean) / max(math.sqrt(var), 0.25)
