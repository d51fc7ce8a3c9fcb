"""The daily and weekly security reports, run beside the service on their schedules."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any

from serving.schedules.cron import CronLoop, daily_cron, weekly_cron

log = logging.getLogger("keywatch.report")

PERIOD_S = {"daily": 86400.0, "weekly": 7 * 86400.0}

RunFn = Callable[[str, float, float], Any]
"""run(kind, since, until): generate and deliver one report."""


class ReportScheduler:
    """Runs `run(kind, since, until)` at the daily and weekly times (UTC); when both are
    due at the same minute, both run (weekly first)."""

    def __init__(self, *, run: RunFn, daily_at: str | None = None,
                 weekly_on: str | None = None) -> None:
        if not daily_at and not weekly_on:
            raise ValueError("give daily_at and/or weekly_on")
        self.run = run
        jobs = []
        if weekly_on:
            jobs.append(("weekly", weekly_cron(weekly_on)))
        if daily_at:
            jobs.append(("daily", daily_cron(daily_at)))
        self.loop = CronLoop(jobs, self.run_once, thread_name="keywatch-report")
        self.last_result: dict[str, Any] | None = None

    def next_due(self, now: datetime) -> tuple[datetime, list[str]]:
        return self.loop.next_due(now)

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

    def start(self) -> None:
        self.loop.start()

    def stop(self) -> None:
        self.loop.stop()
