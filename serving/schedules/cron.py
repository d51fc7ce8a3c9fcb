"""One schedule for every recurring job: operator specs become cron expressions, and one
loop waits for the next due time.

Why: the retrain and the report schedules each computed "the next run" by hand and each
ran its own waiting loop. `croniter` (a well-kept, dependency-light cron evaluator) owns
the calendar arithmetic; the operator keeps the simple specs (`"03:00"`, `"mon 07:00"`,
UTC) or gives any five-field cron expression.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from croniter import croniter

log = logging.getLogger("keywatch.schedule")

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def parse_daily_time(spec: str) -> tuple[int, int]:
    """'HH:MM' (UTC) -> (hour, minute); a clear error otherwise."""
    try:
        hh, mm = spec.strip().split(":")
        hour, minute = int(hh), int(mm)
    except ValueError:
        raise ValueError(f"schedule {spec!r} is not HH:MM (UTC)") from None
    if not (0 <= hour < 24 and 0 <= minute < 60):
        raise ValueError(f"schedule {spec!r} is not a time of day")
    return hour, minute


def daily_cron(spec: str) -> str:
    """'HH:MM' (UTC), or a five-field cron expression, as a cron expression."""
    if croniter.is_valid(spec) and len(spec.split()) == 5:
        return spec
    hour, minute = parse_daily_time(spec)
    return f"{minute} {hour} * * *"


def weekly_cron(spec: str) -> str:
    """'mon', 'monday 07:30' (UTC, default 07:00), or a cron expression."""
    if croniter.is_valid(spec) and len(spec.split()) == 5:
        return spec
    parts = spec.strip().lower().split()
    if not parts or parts[0][:3] not in WEEKDAYS or len(parts) > 2:
        raise ValueError(f"weekly schedule {spec!r} is not 'DAY [HH:MM]' (e.g. 'mon 07:00', "
                         "UTC) or a cron expression")
    hour, minute = parse_daily_time(parts[1]) if len(parts) == 2 else (7, 0)
    return f"{minute} {hour} * * {(WEEKDAYS.index(parts[0][:3]) + 1) % 7}"


def next_fire(expr: str, now: datetime) -> datetime:
    """The first time strictly after `now` (UTC) that `expr` fires."""
    return croniter(expr, now.astimezone(UTC)).get_next(datetime)


class CronLoop:
    """A daemon thread running `job(name, at)` whenever one of the named cron expressions
    is due; jobs due at the same minute all run, in the order given. A failing job is
    logged and the loop goes on."""

    def __init__(self, jobs: Sequence[tuple[str, str]], job: Callable[[str, datetime], object],
                 *, thread_name: str = "keywatch-schedule") -> None:
        if not jobs:
            raise ValueError("a schedule needs at least one job")
        self.jobs = list(jobs)
        self.job = job
        self.thread_name = thread_name
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def next_due(self, now: datetime) -> tuple[datetime, list[str]]:
        times = [(next_fire(expr, now), name) for name, expr in self.jobs]
        at = min(t for t, _ in times)
        return at, [name for t, name in times if t == at]

    def _loop(self) -> None:
        while not self._stop.is_set():
            now = datetime.now(UTC)
            at, names = self.next_due(now)
            if self._stop.wait(max(0.0, (at - now).total_seconds())):
                return
            for name in names:
                try:
                    self.job(name, at)
                except Exception:  # the schedule must survive a bad run
                    log.exception("scheduled job %s failed", name)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=self.thread_name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
