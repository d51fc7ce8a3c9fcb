"""Prometheus metrics, one `CollectorRegistry` per app.

A registry per app (instead of the process-global default) lets several apps live in
one process — tests, a worker next to a server — without "duplicated timeseries" errors.
Hot-path metrics (decisions, scoring latency, store errors) are prometheus-client
counters and histograms with their label children resolved once. Everything owned by
other components (alert pipeline and sinks, event log, SIEM and alert files, model
versions, active bans) is read at scrape time by a custom collector from counters those
components already keep, so they need no dependency on Prometheus and cost nothing
between scrapes.

No label ever carries a key id or an address: per-key cardinality would be unbounded,
and an operator drills down with `GET /v1/keys/{key_id}` instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from serving.engine.decision import SEVERITIES

log = logging.getLogger("keywatch.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
VERDICTS = ("allow", "throttle", "block")


class _ComponentCollector(Collector):
    """Reads component counters at scrape time; a failing reader never breaks a scrape."""

    def __init__(self, metrics: KeywatchMetrics) -> None:
        self.m = metrics

    def collect(self) -> Iterator[Metric]:
        try:
            yield from self._alerts()
            yield from self._files()
            yield from self._models()
            yield from self._bans()
            yield from self._store()
            yield from self._outage()
        except Exception:  # a scrape must answer even if a component misbehaves
            log.exception("metrics collection failed")

    def _alerts(self) -> Iterator[Metric]:
        stats = self.m.alert_stats() if self.m.alert_stats is not None else None
        if stats is None:
            return
        simple = (("raised", "Alerts raised (new alert for a key and rule code)"),
                  ("deduplicated", "Alert-worthy decisions counted on an open alert"),
                  ("escalated", "Open alerts re-sent because the severity rose"),
                  ("suppressed", "Alerts not raised because an operator suppressed the rule"))
        for name, doc in simple:
            c = CounterMetricFamily(f"keywatch_alerts_{name}", doc)
            c.add_metric([], stats.get(name, 0))
            yield c
        sent = CounterMetricFamily("keywatch_alerts_sent", "Alerts delivered to a sink",
                                   labels=["sink"])
        dropped = CounterMetricFamily(
            "keywatch_alerts_dropped",
            "Alerts a sink never delivered: queue full, retries exhausted or shutdown",
            labels=["sink", "reason"])
        failures = CounterMetricFamily("keywatch_webhook_failures",
                                       "Failed webhook delivery attempts (before retries)",
                                       labels=["sink"])
        queued = GaugeMetricFamily("keywatch_alert_queue_depth",
                                   "Alerts waiting in a sink's queue", labels=["sink"])
        for s in stats.get("sinks", []):
            sent.add_metric([s["name"]], s["sent"])
            dropped.add_metric([s["name"], "queue_full"], s["dropped"])
            dropped.add_metric([s["name"], "gave_up"], s["gave_up"])
            failures.add_metric([s["name"]], s["failed_attempts"])
            queued.add_metric([s["name"]], s["queued"])
        yield from (sent, dropped, failures, queued)

    def _files(self) -> Iterator[Metric]:
        statuses = self.m.file_stats() if self.m.file_stats is not None else {}
        if not statuses:
            return
        written = CounterMetricFamily("keywatch_log_lines_written",
                                      "Lines written to a durable log", labels=["log"])
        dropped = CounterMetricFamily("keywatch_log_lines_dropped",
                                      "Lines lost because a log's buffer overflowed",
                                      labels=["log"])
        errors = CounterMetricFamily("keywatch_log_write_errors",
                                     "Failed writes to a durable log (disk full, read-only)",
                                     labels=["log"])
        for name, st in statuses.items():
            written.add_metric([name], st.get("written", 0))
            dropped.add_metric([name], st.get("dropped", 0))
            errors.add_metric([name], st.get("write_errors", 0))
        yield from (written, dropped, errors)

    def _models(self) -> Iterator[Metric]:
        if self.m.model_versions is None:
            return
        info = GaugeMetricFamily("keywatch_model_info",
                                 "Loaded model version per slot (value 1; version in a label)",
                                 labels=["slot", "version"])
        for slot, version in sorted(self.m.model_versions().items()):
            info.add_metric([slot, version or "none"], 1.0)
        yield info

    def _bans(self) -> Iterator[Metric]:
        if self.m.bans_active is None:
            return
        value = self.m.bans_active()
        if value is None:
            return
        g = GaugeMetricFamily("keywatch_bans_active", "Keys and addresses currently banned")
        g.add_metric([], float(value))
        yield g

    def _store(self) -> Iterator[Metric]:
        """The memory store says when it drops feature state (enforcement is never)."""
        stats = self.m.store_stats() if self.m.store_stats is not None else None
        if not stats:
            return
        for name, help_text in (
                ("feature_evictions", "Entities whose feature state the memory store "
                                      "evicted (LRU within its MiB budget); bans and "
                                      "limits are never evicted"),
                ("feature_address_evictions", "Of those, addresses (evicted before "
                                              "keys)"),
                ("feature_expirations", "Entities whose feature state idled out"),
                ("feature_bytes", "Estimated bytes of the memory store's feature "
                                  "state (bounded by KEYWATCH_MEMORY_MAX_MB)"),
                ("feature_entities", "Entities holding feature state"),
                ("enforcement_entities", "Entities holding enforcement state (never "
                                         "evicted)")):
            if name in stats:
                kind = GaugeMetricFamily if name in _STORE_GAUGES else CounterMetricFamily
                g = kind(f"keywatch_store_{name}", help_text)
                g.add_metric([], float(stats[name]))
                yield g

    def _outage(self) -> Iterator[Metric]:
        """A Redis store's outage state: whether it is degraded now, what waits in the
        spool, and the writes that did not make it back (refused, or lost to the disk)."""
        status = self.m.store_outage() if self.m.store_outage is not None else None
        if not status:
            return
        degraded = GaugeMetricFamily("keywatch_store_degraded",
                                     "1 while the state store is unreachable and this "
                                     "replica decides from local state (or refuses)")
        degraded.add_metric([], float(status["state"] == "degraded"))
        yield degraded
        pending = GaugeMetricFamily("keywatch_store_spool_pending",
                                    "State writes in the spool, waiting for Redis")
        pending.add_metric([], float(status["spooled"]))
        yield pending
        for name, key, help_text in _OUTAGE_COUNTERS:
            c = CounterMetricFamily(name, help_text)
            c.add_metric([], float(status[key]))
            yield c


_STORE_GAUGES = frozenset(("enforcement_entities", "feature_bytes", "feature_entities"))
_OUTAGE_COUNTERS = (
    ("keywatch_store_outages", "outages", "Times the state store became unreachable"),
    ("keywatch_store_spooled", "spooled_total", "Records of state writes spooled"),
    ("keywatch_store_replayed", "replayed_total", "Spooled records replayed into Redis"),
    ("keywatch_store_spool_rejected", "rejected",
     "Spooled records Redis refused, set aside in the spool's rejected.jsonl (not applied)"),
    ("keywatch_store_spool_errors", "spool_errors",
     "State writes lost because the spool could not be written (disk full or failing)"),
    ("keywatch_store_ambiguous", "ambiguous",
     "Calls in flight when Redis failed, replayed (applied at least once)"),
)


class KeywatchMetrics:
    """The service's metrics; `observe_decision`/`observe_latency` are the hot-path calls."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.events_scored = Counter(
            "keywatch_events_scored", "Events scored, by verdict and severity",
            ["decision", "severity"], registry=self.registry)
        self.scoring_latency = Histogram(
            "keywatch_scoring_latency_seconds",
            "Time to score one event (for a batch: the batch time divided by its size)",
            buckets=LATENCY_BUCKETS_S, registry=self.registry)
        self.store_errors = Counter(
            "keywatch_store_errors", "Requests that failed because the state store did",
            registry=self.registry)
        self.hook_errors = Counter(
            "keywatch_ops_hook_errors",
            "Failures in alerting/metrics after scoring (the decision was still returned)",
            registry=self.registry)
        self._scored = {(d, s): self.events_scored.labels(d, s)
                        for d in VERDICTS for s in SEVERITIES}
        # Readers wired by `Operations`; each is optional.
        self.alert_stats: Callable[[], dict[str, Any]] | None = None
        self.file_stats: Callable[[], dict[str, dict[str, Any]]] | None = None
        self.model_versions: Callable[[], dict[str, str | None]] | None = None
        self.bans_active: Callable[[], int | None] | None = None
        self.store_stats: Callable[[], dict[str, float]] | None = None
        self.store_outage: Callable[[], dict[str, Any] | None] | None = None
        self.registry.register(_ComponentCollector(self))

    def observe_decision(self, decision: str, severity: str) -> None:
        child = self._scored.get((decision, severity))
        if child is None:  # a verdict added later: still counted, resolved once
            child = self._scored[(decision, severity)] = self.events_scored.labels(
                decision, severity)
        child.inc()

    def observe_latency(self, seconds: float, n: int = 1) -> None:
        per_event = seconds / max(n, 1)
        for _ in range(n):
            self.scoring_latency.observe(per_event)

    def render(self) -> bytes:
        return generate_latest(self.registry)
