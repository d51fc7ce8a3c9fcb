"""The operator-facing side of a running service, built from `Settings` in one place.

`Operations` bundles metrics, the alert pipeline (with its sinks, alert log and SIEM
export), the per-key activity index and the feedback store, and exposes the one hook the
API calls after scoring: `observe(events, decisions, elapsed_s)`. The hook is cheap for
the common case (an allowed, severity-none event costs two counter increments, one
histogram observation, one LRU touch and one time-bucket count) and never raises: an
operations failure is counted in `keywatch_ops_hook_errors` and logged, and the decision
is still returned.

Optional readers that belong to other parts of the system are plain attributes the app
can set when wiring: `ban_lookup(key_id) -> dict | None` (ban state for the key page),
`limit_lookup(key_id) -> dict | None` (its limit), `baseline_lookup(key_id) -> dict | None`
(model baselines), `bans_active() -> int`
(the `keywatch_bans_active` gauge).

The security report (`generate_report`, `GET /v1/report`) and its daily/weekly schedule
live here too: they read what these components write.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from features.contract import Event
from serving.alerts.feedback import FEEDBACK_FILE, FeedbackIn, FeedbackStore
from serving.alerts.key_activity import KeyActivityIndex
from serving.alerts.pipeline import AlertPipeline
from serving.alerts.shared import SharedOps, SharedStats
from serving.alerts.siem import SiemExporter
from serving.alerts.sinks import WebhookSink
from serving.alerts.stats import DecisionStats
from serving.engine.decision import Decision
from serving.engine.jsonl_writer import PeriodicFlusher, RotatingJsonlWriter
from serving.observability.metrics import KeywatchMetrics
from serving.observability.redaction import redact_free_text, redact_known_keys

if TYPE_CHECKING:
    from serving.engine.event_log import EventLog
    from serving.engine.scorer import Scorer
    from serving.settings import Settings

log = logging.getLogger("keywatch.ops")

ALERT_LOG_PATH = ("alerts", "alerts.jsonl")
SIEM_LOG_PATH = ("siem", "findings.jsonl")


class Operations:
    """Metrics, alerts, key activity and feedback for one app."""

    def __init__(
        self,
        *,
        metrics: KeywatchMetrics,
        alerts: AlertPipeline,
        activity: KeyActivityIndex,
        feedback: FeedbackStore,
        writers: dict[str, RotatingJsonlWriter] | None = None,
        event_log: EventLog | None = None,
        model_versions: Callable[[], dict[str, str | None]] | None = None,
        decision_stats: DecisionStats | None = None,
    ) -> None:
        self.metrics = metrics
        self.alerts = alerts
        self.activity = activity
        self.feedback = feedback
        self.writers = dict(writers or {})
        self.event_log = event_log
        self.decision_stats = decision_stats if decision_stats is not None else DecisionStats()
        """Decisions per time bucket, for the dashboard chart (`GET /v1/stats/decisions`)."""
        self.ban_lookup: Callable[[str], dict[str, Any] | None] | None = None
        self.limit_lookup: Callable[[str], dict[str, Any] | None] | None = None
        self.baseline_lookup: Callable[[str], dict[str, Any] | None] | None = None
        self.settings: Settings | None = None
        self.report_scheduler: Any = None
        # the event log is flushed here too, so an idle service loses nothing it scored
        # to a crash beyond the flush interval
        flushed: list[Any] = [*self.writers.values(),
                              *([event_log] if event_log is not None else [])]
        if self.decision_stats.shared is not None:  # other replicas read the counts
            flushed.append(self.decision_stats.shared)
        self._flusher = PeriodicFlusher(flushed)
        self._flusher_started = False
        self._flusher_lock = threading.Lock()
        metrics.alert_stats = alerts.stats
        metrics.file_stats = self._file_stats
        metrics.model_versions = model_versions
        if alerts.is_suppressed is None:
            alerts.is_suppressed = feedback.is_suppressed

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        scorer: Scorer | None = None,
        event_log: EventLog | None = None,
        sinks: Sequence[WebhookSink] | None = None,
    ) -> Operations:
        """Everything from `Settings`; files go under `settings.data_dir`."""
        data_dir = settings.data_dir
        writers, alert_log, siem = _alert_files(settings)
        if sinks is None:
            sinks = sinks_from_settings(settings)
        activity = KeyActivityIndex(per_key=settings.key_activity_per_key,
                                    max_keys=settings.key_activity_max_keys)
        redact: Callable[[str], str] = redact_free_text
        if scorer is not None:
            key_id_of = scorer.hasher.key_id

            def redact(text: str) -> str:  # patterns, then any key this replica has seen
                return redact_known_keys(redact_free_text(text), key_id_of,
                                         activity.__contains__)

        feedback = FeedbackStore(data_dir / FEEDBACK_FILE, redact=redact)
        # a shared store (Redis): alerts, their status, feedback and stats live there, so
        # every replica answers the same and each alert is sent once (alerts/shared.py)
        shared = stats = None
        if scorer is not None and scorer.store.name != "memory":
            shared = SharedOps(scorer.store)
            stats = DecisionStats(shared=SharedStats(scorer.store, max_buckets=1440))
        alerts = AlertPipeline(
            min_severity=settings.alert_min_severity,
            dedup_window_s=settings.alert_dedup_window_s,
            ring_size=settings.alert_ring_size,
            alert_log=alert_log, siem=siem, sinks=sinks,
            is_suppressed=feedback.is_suppressed, shared=shared)
        if shared is not None:
            feedback.publish = alerts.publish_now
            alerts.on_record.update(feedback=feedback.apply_shared,
                                    unsuppress=feedback.apply_shared)
        ops = cls(
            metrics=KeywatchMetrics(), alerts=alerts, feedback=feedback, activity=activity,
            writers=writers, event_log=event_log,
            model_versions=scorer.model_versions if scorer is not None else None,
            decision_stats=stats)
        ops.settings = settings
        if settings.report_daily_at or settings.report_weekly_on:
            from serving.schedules.reports import ReportScheduler

            ops.report_scheduler = ReportScheduler(
                run=ops.scheduled_report, daily_at=settings.report_daily_at,
                weekly_on=settings.report_weekly_on)
        return ops

    # ---- the hook after scoring -------------------------------------------------------
    def observe(self, events: Sequence[Event], decisions: Sequence[Decision],
                elapsed_s: float) -> None:
        """Account for scored events: metrics, key activity, alerts. Never raises."""
        try:
            self.metrics.observe_latency(elapsed_s, len(decisions))
            self.decision_stats.observe(events, decisions)
            raised = qualified = False
            for event, decision in zip(events, decisions, strict=True):
                self.metrics.observe_decision(decision.decision, decision.severity)
                self.activity.observe(event, decision)
                if self.alerts.qualifies(decision):
                    qualified = True
                    alert = self.alerts.observe(event.timestamp, decision.key_id,
                                                event.source_ip, decision)
                    raised = raised or alert is not None
            if qualified and self.alerts.shared is not None:
                self.alerts.publish()  # this request's counts, in one call
                self.alerts.sync()
            if raised:
                self._start_flusher()
        except Exception:
            self.metrics.hook_errors.inc()
            log.exception("operations hook failed after scoring")

    def store_error(self) -> None:
        self.metrics.store_errors.inc()

    @property
    def bans_active(self) -> Callable[[], int | None] | None:
        return self.metrics.bans_active

    @bans_active.setter
    def bans_active(self, reader: Callable[[], int | None] | None) -> None:
        self.metrics.bans_active = reader

    # ---- operator views and actions ---------------------------------------------------
    def key_report(self, key_id: str) -> dict[str, Any]:
        """What `GET /v1/keys/{key_id}` returns."""
        summary = self.activity.summary(key_id)
        report: dict[str, Any] = {
            "key_id": key_id,
            "seen": summary is not None,
            "recent_decisions": summary["recent_decisions"] if summary else [],
            "baseline": summary["baseline"] if summary else None,
            "active_alerts": self.alerts.active_for_key(key_id),
            "alerts_recorded": self.alerts.count_for_key(key_id),
            "suppressed_rules": sorted(s["code"] for s in self.feedback.suppressions(key_id)),
            "ban": None,
            "limit": None,
            "model_baseline": None,
        }
        for field, reader in (("ban", self.ban_lookup), ("limit", self.limit_lookup),
                              ("model_baseline", self.baseline_lookup)):
            if reader is None:
                continue
            try:
                report[field] = reader(key_id)
            except Exception as exc:  # a degraded store must not hide the rest of the page
                log.warning("key report: %s lookup failed: %s", field, exc)
                report[field] = {"error": f"{type(exc).__name__}"}
        return report

    def give_feedback(self, alert_id: str, body: FeedbackIn) -> dict[str, Any] | None:
        """Record feedback (disk first) and apply it; None if the alert is unknown."""
        alert = self.alerts.get(alert_id)
        if alert is None:
            return None
        record = self.feedback.record(alert.to_dict(), body)
        updated = self.alerts.set_status(alert_id, body.verdict)
        self._start_flusher()
        return {"feedback": record, "alert": updated,
                "suppressed": self.feedback.is_suppressed(alert.key_id, alert.code)}

    def is_suppressed(self, key_id: str, code: str) -> bool:
        """For fusion: has an operator suppressed `code` for `key_id`?"""
        return self.feedback.is_suppressed(key_id, code)

    # ---- lifecycle --------------------------------------------------------------------
    def _start_flusher(self) -> None:
        if self._flusher_started:
            return
        with self._flusher_lock:
            if not self._flusher_started:
                self._flusher.start()
                self._flusher_started = True

    def start(self) -> None:
        self._start_flusher()
        if self.report_scheduler is not None:
            self.report_scheduler.start()

    # ---- the security report ----------------------------------------------------------
    def generate_report(self, since: float, until: float, *, out_dir: Path | None = None,
                        plots: bool = True) -> tuple[Any, dict[str, str]]:
        """Write the security report for [since, until) from this service's files (flushed
        first) and its live metrics; returns the report and the written paths."""
        from serving.reports.render import write_report
        from serving.reports.report import build_report
        from serving.reports.sources import metrics_snapshot

        if self.settings is None:
            raise RuntimeError("reports need the service settings (Operations.from_settings)")
        if self.event_log is not None:
            self.event_log.flush()
        self.alerts.snapshot_counts()
        self.flush()
        settings = self.settings
        report = build_report(data_dir=settings.data_dir, since=since, until=until,
                              model_dir=settings.model_dir,
                              metrics=metrics_snapshot(self.metrics))
        if out_dir is None:
            stamp = datetime.fromtimestamp(until, tz=UTC).strftime("%Y%m%dT%H%M%SZ")
            out_dir = self.report_root / f"report-{stamp}-{int(time.time() * 1000) % 1000:03d}"
        return report, write_report(report, out_dir, plots=plots)

    @property
    def report_root(self) -> Path:
        settings = self.settings
        if settings is None:
            return Path("reports")
        return settings.report_dir or settings.data_dir / "reports"

    def scheduled_report(self, kind: str, since: float, until: float) -> dict[str, Any]:
        """One scheduled run: write the report into a dated folder, deliver to the webhook."""
        from serving.reports.render import deliver

        day = datetime.fromtimestamp(until, tz=UTC).strftime("%Y-%m-%d")
        report, paths = self.generate_report(since, until,
                                             out_dir=self.report_root / f"{kind}-{day}")
        result: dict[str, Any] = {"paths": paths, "summary": report.summary()}
        url = self.settings.report_webhook_url if self.settings is not None else None
        if url:
            result["delivery"] = deliver(url, report, paths)
        log.info("%s security report written to %s", kind, paths.get("html"))
        return result

    def flush(self) -> None:
        """Write the alert log and SIEM file now (tests, shutdown)."""
        self._flusher.flush()

    def close(self, timeout: float = 5.0) -> None:
        if self.report_scheduler is not None:
            self.report_scheduler.stop()
        self.alerts.close(timeout)
        self._flusher.close(timeout)

    def _file_stats(self) -> dict[str, dict[str, Any]]:
        stats = {name: w.status() for name, w in self.writers.items()}
        if self.event_log is not None:
            stats["events"] = self.event_log.status()
        return stats


def sinks_from_settings(settings: Settings) -> list[WebhookSink]:
    sinks = []
    common: dict[str, Any] = {"timeout_s": settings.alert_webhook_timeout_s,
                              "max_attempts": settings.alert_webhook_max_attempts,
                              "queue_size": settings.alert_queue_size}
    if settings.alert_webhook_url:
        sinks.append(WebhookSink(settings.alert_webhook_url, name="webhook",
                                 body_format="json", **common))
    if settings.alert_slack_webhook_url:
        sinks.append(WebhookSink(settings.alert_slack_webhook_url, name="slack",
                                 body_format="slack", **common))
    return sinks


def _alert_files(settings: Settings) -> tuple[dict[str, RotatingJsonlWriter],
                                               RotatingJsonlWriter | None, SiemExporter | None]:
    """The alert log and the SIEM findings file, where the settings ask for them."""
    writers: dict[str, RotatingJsonlWriter] = {}
    alert_log = siem = None
    if settings.alert_log:
        alert_log = writers["alerts"] = RotatingJsonlWriter(
            settings.data_dir.joinpath(*ALERT_LOG_PATH), max_bytes=settings.siem_max_bytes,
            keep_files=settings.siem_keep_files)
    if settings.siem_log:
        siem_writer = writers["siem"] = RotatingJsonlWriter(
            settings.data_dir.joinpath(*SIEM_LOG_PATH), max_bytes=settings.siem_max_bytes,
            keep_files=settings.siem_keep_files)
        siem = SiemExporter(siem_writer)
    return writers, alert_log, siem
