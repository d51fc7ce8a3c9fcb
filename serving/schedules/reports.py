"""The scheduled security report: daily and/or weekly, in a background thread.

`KEYWATCH_REPORT_DAILY_AT=07:00` writes a report of the last 24 hours every day at
07:00 UTC; `KEYWATCH_REPORT_WEEKLY_ON="mon 07:00"` one of the last 7 days every Monday.
A report reads files and draws a few plots (matplotlib's object API, safe off the main
thread): a thread is enough, unlike the retrain job's child process. A failing run is
logged and the schedule goes on.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from serving.schedules.retrain import parse_daily_time

log = logging.getLogger("keywatch.report")

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
PERIOD_S = {"daily": 86400.0, "weekly": 7 * 86400.0}

RunFn = Callable[[str, float, float], Any]
"""run(kind, since, until): generate and deliver one report."""


def parse_weekly(spec: str) -> tuple[int, int, int]:
    """'mon', 'monday 07:30' (UTC) → (weekday 0=Monday, hour, minute)."""
    parts = spec.strip().lower().split()
    if not parts or parts[0][:3] not in WEEKDAYS or len(parts) > 2:
        raise ValueError(f"weekly report schedule {spec!r} is not 'DAY [HH:MM]' "
                         "(e.g. 'mon 07:00', UTC)")
    hour, minute = parse_daily_time(parts[1]) if len(parts) == 2 else (7, 0)
    return WEEKDAYS.index(parts[0][:3]), hour, minute


def next_daily(now: datetime, hour: int, minute: int) -> datetime:
    candidate = now.replace(hour=hour, minute=minute, second=0, microsecond=0)
    return candidate if candidate > now else candidate + timedelta(days=1)


def next_weekly(now: datetime, weekday: int, hour: int, minute: int) -> datetime:
    candidate = now.replace(hour=hour, minute=minute, second=0, microsecond=0)
    candidate += timedelta(days=(weekday - now.weekday()) % 7)
    return candidate if candidate > now else candidate + timedelta(days=7)


class ReportScheduler:
    """Runs `run(kind, since, until)` at the daily and weekly times (UTC)."""

    def __init__(self, *, run: RunFn, daily_at: str | None = None,
                 weekly_on: str | None = None) -> None:
        if not daily_at and not weekly_on:
            raise ValueError("give daily_at and/or weekly_on")
        self.run = run
        self.daily = parse_daily_time(daily_at) if daily_at else None
        self.weekly = parse_weekly(weekly_on) if weekly_on else None
        self.last_result: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def next_due(self, now: datetime) -> tuple[datetime, str]:
        due: list[tuple[datetime, str]] = []
        if self.daily is not None:
            due.append((next_daily(now, *self.daily), "daily"))
        if self.weekly is not None:
            due.append((next_weekly(now, *self.weekly), "weekly"))
        return min(due)

    def run_once(self, kind: str, at: datetime) -> dict[str, Any]:
        until = at.timestamp()
        try:
            result = {"kind": kind, "at": at.isoformat(), "ok": True,
                      "result": self.run(kind, until - PERIOD_S[kind], until)}
        except Exception as exc:  # the schedule must survive a bad run
            log.exception("scheduled %s report failed", kind)
            result = {"kind": kind, "at": at.isoformat(), "ok": False,
                      "error": f"{type(exc).__name__}: {exc}"}
        self.last_result = result
        return result

    def _loop(self) -> None:
        while not self._stop.is_set():
            now = datetime.now(UTC)
            at, kind = self.next_due(now)
            if self._stop.wait((at - now).total_seconds()):
                return
            self.run_once(kind, at)
            if self.daily is not None and self.weekly is not None and kind == "weekly" \
                    and next_daily(at - timedelta(seconds=1), *self.daily) == at:
                self.run_once("daily", at)  # both due at the same minute: run both

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="keywatch-report",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
