"""The scheduled retrain: a daily run of `keywatch retrain` beside the service.

The job runs in a child process, not a thread, so fitting a forest never competes with
scoring for the interpreter lock; a slow or failed run cannot stall or crash the service.
The running service picks the new model up through the registry (hot reload). Where an
external scheduler is preferred (cron, a Kubernetes CronJob), leave the schedule unset and
run `keywatch retrain` from there: see the README.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

log = logging.getLogger("keywatch.schedule")


def parse_daily_time(spec: str) -> tuple[int, int]:
    """'HH:MM' (UTC) → (hour, minute); a clear error otherwise."""
    try:
        hh, mm = spec.strip().split(":")
        hour, minute = int(hh), int(mm)
    except ValueError:
        raise ValueError(f"retrain schedule {spec!r} is not HH:MM (UTC)") from None
    if not (0 <= hour < 24 and 0 <= minute < 60):
        raise ValueError(f"retrain schedule {spec!r} is not a time of day")
    return hour, minute


def next_run(now: datetime, hour: int, minute: int) -> datetime:
    candidate = now.replace(hour=hour, minute=minute, second=0, microsecond=0)
    return candidate if candidate > now else candidate + timedelta(days=1)


class RetrainScheduler:
    """Runs `keywatch retrain` daily at a UTC time, in a child process."""

    def __init__(self, *, daily_at: str, events: Path, model_dir: Path,
                 timeout_s: float = 3 * 3600, env: dict[str, str] | None = None) -> None:
        self.hour, self.minute = parse_daily_time(daily_at)
        self.events = events
        self.model_dir = model_dir
        self.timeout_s = timeout_s
        self.env = env
        self.last_result: dict[str, object] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def command(self) -> list[str]:
        return [sys.executable, "-m", "serving.cli.main", "retrain", "--events", str(self.events),
                "--model-dir", str(self.model_dir), "--quiet"]

    def run_once(self) -> dict[str, object]:
        started = datetime.now(UTC)
        try:
            proc = subprocess.run(self.command(), capture_output=True, text=True,
                                  timeout=self.timeout_s, env=self.env or dict(os.environ),
                                  check=False)
            result: dict[str, object] = {"started": started.isoformat(),
                                         "exit_code": proc.returncode,
                                         "output": proc.stdout[-4000:],
                                         "error": proc.stderr[-2000:]}
        except subprocess.TimeoutExpired:
            result = {"started": started.isoformat(), "exit_code": None,
                      "error": f"retrain timed out after {self.timeout_s:.0f} s"}
        log.info("scheduled retrain finished with %s", result.get("exit_code"))
        self.last_result = result
        return result

    def _loop(self) -> None:
        while not self._stop.is_set():
            now = datetime.now(UTC)
            wait = (next_run(now, self.hour, self.minute) - now).total_seconds()
            if self._stop.wait(wait):
                return
            self.run_once()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="keywatch-retrain",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
