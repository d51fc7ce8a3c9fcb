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
from datetime import UTC, datetime
from pathlib import Path

from serving.schedules.cron import CronLoop, daily_cron

log = logging.getLogger("keywatch.schedule")


class RetrainScheduler:
    """Runs `keywatch retrain` at `daily_at` ('HH:MM' UTC or a cron expression), in a
    child process."""

    def __init__(self, *, daily_at: str, events: Path, model_dir: Path,
                 timeout_s: float = 3 * 3600, env: dict[str, str] | None = None) -> None:
        self.cron = daily_cron(daily_at)
        self.events = events
        self.model_dir = model_dir
        self.timeout_s = timeout_s
        self.env = env
        self.last_result: dict[str, object] | None = None
        self._loop = CronLoop([("retrain", self.cron)], lambda _name, _at: self.run_once(),
                              thread_name="keywatch-retrain")

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

    def start(self) -> None:
        self._loop.start()

    def stop(self) -> None:
        self._loop.stop()
