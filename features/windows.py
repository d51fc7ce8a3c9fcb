"""Sliding windows over time-bucketed counters, in event time.

Counts are kept in two rings of buckets: per minute (for the 1 min and 5 min windows)
and per hour (for 1 h and 24 h). A window's value at time t is the sum of the whole
buckets inside it plus the oldest bucket weighted by the share of it still inside the
window — the usual sliding-window estimate, exact for evenly spread traffic and never off
by more than one bucket's count. Because buckets are addressed by event time, a replay of
history gives the same numbers as live traffic, and events that arrive a little late are
counted in the bucket they belong to. An event older than the minute ring (8 min) still
counts in the hour ring; one older than the hour ring (26 h) counts in no window.
"""

from __future__ import annotations

from dataclasses import dataclass

from features.stores.base import RING_ADD, RING_GET, RING_SUM, EntityOps

MINUTE_RING_SIZE = 8
HOUR_RING_SIZE = 26


@dataclass(frozen=True, slots=True)
class Window:
    """A sliding window read from one of the two bucket rings."""

    label: str
    seconds: int
    bucket_s: int
    ring_size: int

    @property
    def buckets(self) -> int:
        return self.seconds // self.bucket_s


W1M = Window("1m", 60, 60, MINUTE_RING_SIZE)
W5M = Window("5m", 300, 60, MINUTE_RING_SIZE)
W1H = Window("1h", 3600, 3600, HOUR_RING_SIZE)
W24H = Window("24h", 86400, 3600, HOUR_RING_SIZE)
WINDOWS: tuple[Window, ...] = (W1M, W5M, W1H, W24H)


def ring_name(metric: str, bucket_s: int) -> str:
    return f"{metric}:{'m' if bucket_s == 60 else 'h'}"


def add_counter_ops(ops: EntityOps, metric: str, ts: float, amount: float) -> None:
    """Add `amount` to the minute and hour buckets of `metric` at event time `ts`."""
    for bucket_s, size in ((60, MINUTE_RING_SIZE), (3600, HOUR_RING_SIZE)):
        stamp = int(ts // bucket_s)
        ops.add(RING_ADD, ring_name(metric, bucket_s), stamp % size, stamp, amount)


def read_window_ops(ops: EntityOps, metric: str, ts: float, window: Window) -> tuple[int, int]:
    """Queue the reads for one window; returns the result indexes (whole, edge)."""
    name = ring_name(metric, window.bucket_s)
    stamp = int(ts // window.bucket_s)
    whole = ops.add(RING_SUM, name, window.ring_size, stamp - window.buckets + 1, stamp)
    edge_stamp = stamp - window.buckets
    edge = ops.add(RING_GET, name, edge_stamp % window.ring_size, edge_stamp)
    return whole, edge


def window_value(ts: float, window: Window, whole: float, edge: float) -> float:
    """Combine the whole buckets and the weighted edge bucket into the window's value."""
    frac = (ts % window.bucket_s) / window.bucket_s
    return whole + edge * (1.0 - frac)
