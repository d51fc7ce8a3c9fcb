"""The files a report is read from: alert log, labels, model registry, feedback, metrics.

Everything a running service already writes under its data directory, so a report can be
generated offline from a copy of the files."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from features.contract import parse_timestamp
from features.keys import KeyHasher
from serving.engine.jsonl_writer import read_jsonl
from serving.reports.content import count_by

log = logging.getLogger("keywatch.report")


# ---- reading -------------------------------------------------------------------------------
def read_alerts(data_dir: Path) -> list[dict[str, Any]]:
    """The latest record of every alert in the alert log (rotated files included)."""
    directory = Path(data_dir) / "alerts"
    files = sorted(directory.glob("alerts.jsonl.*"), key=lambda p: -_suffix_number(p))
    latest: dict[str, dict[str, Any]] = {}
    for rec in read_jsonl([*files, directory / "alerts.jsonl"]):
        if "alert_id" in rec and "first_seen_ts" in rec:
            latest[rec["alert_id"]] = rec
    return list(latest.values())


def _suffix_number(path: Path) -> int:
    try:
        return int(path.suffix.lstrip("."))
    except ValueError:
        return 0


def read_labels(directory: Path, hasher: KeyHasher) -> list[dict[str, Any]]:
    """Labelled incidents of a `keywatch simulate` directory, victims as key ids."""
    path = Path(directory) / "incidents.json"
    out = []
    for rec in json.loads(path.read_text(encoding="utf-8")):
        start, end = parse_timestamp(rec["start"], now=math.inf), parse_timestamp(
            rec["end"], now=math.inf)
        for key in rec.get("victim_keys", []):
            out.append({"id": rec["id"], "scenario": rec.get("scenario"),
                        "key_id": hasher.key_id(key), "start": start, "end": end,
                        "source_ips": set(rec.get("source_ips") or [])})
    return out


def read_models(model_dir: Path | None, since: float, until: float) -> dict[str, Any]:
    if model_dir is None or not Path(model_dir).exists():
        return {"available": False}
    from models.registry import ModelRegistry

    registry = ModelRegistry(model_dir)
    versions = []
    for info in registry.list():
        gates = info.gates or {}
        versions.append({"version": info.version, "kind": info.kind,
                         "created_at": info.created_at, "rows": info.row_count,
                         "passed": gates.get("passed"),
                         "reasons": gates.get("reasons") or [], "current": info.is_current,
                         "error": info.error})
    history = []
    for entry in registry.history():
        try:
            at = parse_timestamp(entry.get("at"), now=math.inf)
        except (ValueError, TypeError):
            continue
        if since <= at < until:
            history.append(entry)
    return {"available": True, "current": registry.current_version(), "versions": versions,
            "history": history}


def read_feedback(data_dir: Path, since: float, until: float) -> dict[str, Any]:
    records = [r for r in read_jsonl([Path(data_dir) / "feedback.jsonl"])
               if r.get("type") == "feedback"
               and since <= float(r.get("created_ts") or 0.0) < until]
    fps = [r for r in records if r.get("verdict") == "false_positive"]
    return {"received": len(records), "false_positive": len(fps),
            "confirmed": sum(1 for r in records if r.get("verdict") == "confirmed"),
            "by_code": count_by(r.get("code", "?") for r in fps),
            "false_positives": [{k: r.get(k) for k in ("alert_id", "key_id", "code",
                                                        "severity", "note", "allowlist_rule")}
                                for r in fps[:50]]}


def metrics_snapshot(metrics: Any) -> dict[str, Any]:
    """Events scored, latency p50/p99 (from the histogram buckets) and store errors of a
    running service's `KeywatchMetrics`."""
    reg = metrics.registry
    scored = 0.0
    buckets: list[tuple[float, float]] = []
    errors = 0.0
    for family in reg.collect():
        for s in family.samples:
            if s.name == "keywatch_events_scored_total":
                scored += s.value
            elif s.name == "keywatch_scoring_latency_seconds_bucket":
                buckets.append((float(s.labels["le"]), s.value))
            elif s.name == "keywatch_store_errors_total":
                errors += s.value
    buckets.sort()

    def quantile(q: float) -> float | None:
        if not buckets or buckets[-1][1] <= 0:
            return None
        target = q * buckets[-1][1]
        for le, count in buckets:
            if count >= target:
                return le if math.isfinite(le) else None
        return None

    return {"events_scored": int(scored), "latency_p50_s": quantile(0.5),
            "latency_p99_s": quantile(0.99), "store_errors": int(errors)}


# ---- building ------------------------------------------------------------------------------
