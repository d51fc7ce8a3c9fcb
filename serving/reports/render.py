"""A report on paper: Markdown, HTML (inline CSS, no scripts), JSON and PNG plots
(matplotlib's Agg backend through its object API, so a report can be drawn from a
background thread), written to a folder; optionally POSTed to a webhook as a JSON summary
with the paths."""

from __future__ import annotations

import html
import json
import logging
import re
from pathlib import Path
from typing import Any

from features.contract import event_time_iso
from features.durable import atomic_write_text
from serving.engine.decision import SEVERITIES
from serving.engine.money import usd
from serving.reports.content import SecurityReport

log = logging.getLogger("keywatch.report")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "not contained"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _figure(height: float) -> tuple[Any, Any]:
    """A figure through matplotlib's object API (no pyplot: safe off the main thread)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _save(fig: Any, ax: Any, out_dir: Path, name: str, *, title: str, xlabel: str,
          ylabel: str | None = None, legend: str = "upper left") -> str:
    ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(loc=legend, fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / f"{name}.png")
    return f"{name}.png"


def _spend_plot(report: SecurityReport, out_dir: Path) -> str:
    fig, ax = _figure(3.2)
    hours = list(range(len(report.hourly["spent_usd"])))
    ax.bar(hours, report.hourly["spent_usd"], color="#4c78a8", label="spent (served)")
    ax.bar(hours, report.hourly["saved_usd"], bottom=report.hourly["spent_usd"],
           color="#e45756", label="saved (blocked / throttled)")
    for inc in report.incidents:
        ax.axvline((inc.first_seen_ts - report.since) / 3600, color="#333", lw=0.8, ls=":")
    return _save(fig, ax, out_dir, "spend_per_hour",
                 title="Spend per hour (dotted: first alert of an incident)",
                 xlabel=f"hours since {event_time_iso(report.since)}", ylabel="USD per hour")


def _alerts_plot(report: SecurityReport, out_dir: Path) -> str:
    fig, ax = _figure(3.0)
    hours = list(range(len(report.hourly["spent_usd"])))
    bottom = [0.0] * len(hours)
    colors = {"low": "#9ecae9", "medium": "#f58518", "high": "#e45756", "critical": "#7b0000"}
    for sev, color in colors.items():
        values = report.hourly[f"alerts_{sev}"]
        ax.bar(hours, values, bottom=bottom, color=color, label=sev)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    return _save(fig, ax, out_dir, "alerts_per_hour", title="Alerts per hour by severity",
                 xlabel=f"hours since {event_time_iso(report.since)}", ylabel="alerts raised")


def _keys_plot(report: SecurityReport, out_dir: Path) -> str:
    fig, ax = _figure(0.4 * len(report.keys) + 1.2)
    names = [k["key_id"][:14] + "…" for k in report.keys][::-1]
    spent = [k["spent_usd"] for k in report.keys][::-1]
    ax.barh(names, spent, color="#4c78a8", label="spent")
    ax.barh(names, [k["saved_usd"] for k in report.keys][::-1], left=spent, color="#e45756",
            label="saved")
    return _save(fig, ax, out_dir, "riskiest_keys", legend="lower right",
                 title="Riskiest keys: money spent and saved", xlabel="USD in the period")


def _plots(report: SecurityReport, out_dir: Path) -> dict[str, str]:
    """The report's PNG plots: spend and alerts per hour, and the riskiest keys."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"spend_per_hour": _spend_plot(report, out_dir),
             "alerts_per_hour": _alerts_plot(report, out_dir)}
    if report.keys:
        paths["riskiest_keys"] = _keys_plot(report, out_dir)
    return paths


Section = tuple[str, list[str], list[list[str]], str]
"""(title, table header, rows, note), rendered as Markdown and as HTML."""


def _incident_rows(report: SecurityReport) -> list[list[str]]:
    return [[i.incident_id,
             f"`{i.key_id}`" + (f" ({i.keys} keys)" if i.keys > 1 else ""),
             i.severity, ", ".join(i.codes[:4]),
             event_time_iso(i.first_seen_ts), event_time_iso(i.last_seen_ts),
             _duration(i.time_to_detect_s) + ("" if i.start_source == "label" else "*"),
             _duration(i.time_to_contain_s), usd(i.spent_usd), usd(i.saved_usd),
             f"{usd(i.burn_usd_per_h)}/h", i.label or "", i.feedback or ""]
            for i in report.incidents]


def _timeline_rows(report: SecurityReport) -> list[list[str]]:
    rows = []
    for i in report.incidents:
        began = "labelled" if i.start_source == "label" else "burst began"
        first_title = i.titles[0] if i.titles else ""
        steps = [f"{event_time_iso(i.start_ts)} start ({began})",
                 f"{event_time_iso(i.first_seen_ts)} first alert: {first_title}"]
        if i.contained_ts is not None:
            steps.append(f"{event_time_iso(i.contained_ts)} contained ({i.contained_by}), "
                         f"burning {usd(i.burn_usd_per_h)}/h")
        steps.append(f"{event_time_iso(i.last_seen_ts)} last alert "
                     f"({i.alerts} alerts, {i.decisions} flagged decisions, "
                     f"{i.blocked_events} of {i.events} events blocked or throttled)")
        rows.append([i.incident_id, "<br>".join(steps)])
    return rows


def _health_rows(report: SecurityReport) -> list[list[str]]:
    h = report.health
    rows = [["events in the period", str(h.get("events", 0))],
            ["keys active", str(h.get("keys", 0))],
            ["verdicts", ", ".join(f"{k} {v}" for k, v in sorted(
                h.get("by_verdict", {}).items()))],
            ["alerts", str(h.get("alerts", 0))]]
    if "events_scored" not in h:
        return [*rows, ["latency, store errors", "n/a (generated offline: no metrics)"]]
    lat = [h.get("latency_p50_s"), h.get("latency_p99_s")]
    return [*rows, ["events scored since start (metrics)", str(h["events_scored"])],
            ["scoring latency p50 / p99",
             " / ".join(f"≤ {x * 1000:.2g} ms" if x else "n/a" for x in lat)],
            ["store errors", str(h.get("store_errors", 0))]]


def _models_section(report: SecurityReport) -> Section:
    models = report.models
    rows = [[("**" if v["current"] else "") + v["version"] + ("**" if v["current"] else ""),
             str(v.get("created_at") or ""), str(v.get("rows") or ""),
             {True: "passed", False: "failed", None: "?"}[v.get("passed")],
             "; ".join(v.get("reasons") or []) or (v.get("error") or "")]
            for v in models.get("versions", [])]
    history = ", ".join(f"{e.get('at')} {e.get('action')} {e.get('version')}"
                        for e in models.get("history", [])) or "none in the period"
    note = (f"Current: {models.get('current') or 'none'}. Promotions and rollbacks in the "
            f"period: {history}.") if models.get("available") else "No model directory given."
    return ("Models and retraining", ["version", "created", "rows", "gates", "notes"], rows,
            note)


def _money_section(report: SecurityReport) -> Section:
    m = report.money
    return ("Money", ["", "USD"], [
        ["spent (served calls, all keys)", usd(m["spent_usd"])],
        ["saved (calls blocked or throttled)", usd(m["saved_usd"])],
        ["spent during incidents", usd(m["incident_spent_usd"])],
        ["saved during incidents", usd(m["incident_saved_usd"])],
        ["events priced at the default (unknown model)", str(m["unknown_price_events"])]],
        "Estimated at list prices; saved is an upper bound where calls were throttled.")


def _feedback_section(report: SecurityReport) -> Section:
    fb = report.feedback
    rows = [[str(r["alert_id"]), f"`{r['key_id']}`", str(r["code"]), str(r.get("note") or ""),
             "yes" if r.get("allowlist_rule") else "no"] for r in fb["false_positives"]]
    note = (f"{fb['received']} feedback records: {fb['false_positive']} false positives "
            f"({', '.join(f'{k} {v}' for k, v in fb['by_code'].items()) or 'none'}), "
            f"{fb['confirmed']} confirmed.")
    return ("False-positive feedback", ["alert", "key", "rule", "note", "rule silenced"],
            rows, note)


def _sections(report: SecurityReport) -> list[Section]:
    """Every section of the report, in reading order."""
    keys = [[f"`{k['key_id']}`", k["max_severity"], str(k["incidents"]), str(k["alerts"]),
             str(k["events"]), usd(k["spent_usd"]), usd(k["saved_usd"])] for k in report.keys]
    return [
        _money_section(report),
        ("Incidents", ["id", "key", "severity", "reasons", "first alert", "last alert",
                       "detect", "contain", "spent", "saved", "burn rate",
                       "label", "feedback"], _incident_rows(report),
         "Time to detect: from the labelled first anomalous event, or (*) from the start of "
         "the key's burst of activity. Time to contain: first alert to first block. Burn rate: "
         "the key's calls in the hour before containment (or before the last alert)."),
        ("Timelines", ["id", "timeline"], _timeline_rows(report), ""),
        ("Riskiest keys", ["key", "max severity", "incidents", "alerts", "events", "spent",
                           "saved"], keys, ""),
        _feedback_section(report),
        _models_section(report),
        ("Health", ["", ""], _health_rows(report), ""),
    ]


def render_markdown(report: SecurityReport, plots: dict[str, str]) -> str:
    s = report.summary()
    lines = [f"# keywatch security report: {s['since']} → {s['until']}", "",
             f"{s['incidents']} incidents "
             f"({', '.join(f'{v} {k}' for k, v in s['incidents_by_severity'].items()) or 'none'})"
             f", {usd(report.money['spent_usd'])} spent, {usd(report.money['saved_usd'])} "
             f"saved by blocking and throttling, {s['false_positives']} false positives "
             f"reported, {s['events']} events.", ""]
    for name in plots.values():
        lines += [f"![{name}](plots/{name})", ""]
    for title, header, rows, note in _sections(report):
        lines += [f"## {title}", ""]
        if rows:
            lines.append("| " + " | ".join(header) + " |")
            lines.append("|" + "---|" * len(header))
            for r in rows:
                lines.append("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |")
            lines.append("")
        elif title != "Models and retraining":
            lines += ["(none)", ""]
        if note:
            lines += [note, ""]
    lines.append(f"_Generated {s['generated_at']} by keywatch._")
    return "\n".join(lines) + "\n"


_CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:4px 8px;
text-align:left;vertical-align:top}th{background:#f4f4f4}code{font-size:12px}
.critical{color:#7b0000;font-weight:bold}.high{color:#c0392b}.medium{color:#d35400}
img{max-width:100%;display:block;margin:.5em 0}.note{color:#555}"""


def render_html(report: SecurityReport, plots: dict[str, str]) -> str:
    s = report.summary()

    def cell(text: str) -> str:
        esc = html.escape(text).replace("&lt;br&gt;", "<br>")
        esc = re.sub(r"`([^`]+)`", r"<code>\1</code>", esc)
        esc = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", esc)
        cls = f' class="{text}"' if text in SEVERITIES else ""
        return f"<td{cls}>{esc}</td>"

    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>keywatch security "
             f"report</title><style>{_CSS}</style></head><body>",
             f"<h1>keywatch security report: {html.escape(s['since'])} → "
             f"{html.escape(s['until'])}</h1>",
             f"<p>{s['incidents']} incidents, <b>{usd(report.money['spent_usd'])}</b> spent, "
             f"<b>{usd(report.money['saved_usd'])}</b> saved by blocking and throttling, "
             f"{s['false_positives']} false positives reported, {s['events']} events.</p>"]
    for name in plots.values():
        parts.append(f"<img src='plots/{html.escape(name)}' alt='{html.escape(name)}'>")
    for title, header, rows, note in _sections(report):
        parts.append(f"<h2>{html.escape(title)}</h2>")
        if rows:
            parts.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header)
                         + "</tr>")
            parts += ["<tr>" + "".join(cell(c) for c in r) + "</tr>" for r in rows]
            parts.append("</table>")
        if note:
            parts.append(f"<p class='note'>{html.escape(note)}</p>")
    parts.append(f"<p class='note'>Generated {html.escape(s['generated_at'])} by keywatch."
                 "</p></body></html>")
    return "\n".join(parts) + "\n"


def write_report(report: SecurityReport, out_dir: Path, *, plots: bool = True
                 ) -> dict[str, str]:
    """Write report.md, report.html, report.json and plots/ into `out_dir` (each file
    written to a temporary name first, so a reader never sees half a report)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_files = _plots(report, out_dir / "plots") if plots else {}
    files = {"markdown": ("report.md", render_markdown(report, plot_files)),
             "html": ("report.html", render_html(report, plot_files)),
             "json": ("report.json", json.dumps(report.as_dict(), indent=2, default=str))}
    paths: dict[str, str] = {}
    for kind, (name, text) in files.items():
        atomic_write_text(out_dir / name, text)
        paths[kind] = str(out_dir / name)
    paths.update({f"plot_{k}": str(out_dir / "plots" / v) for k, v in plot_files.items()})
    return paths


def deliver(url: str, report: SecurityReport, paths: dict[str, str], *,
            timeout_s: float = 5.0, max_attempts: int = 3) -> dict[str, Any]:
    """POST the summary and the file paths to a webhook (with the alert sinks' retries);
    returns the sink's delivery stats."""
    from serving.alerts.sinks import WebhookSink

    sink = WebhookSink(url, name="report", body_format="json", timeout_s=timeout_s,
                       max_attempts=max_attempts, headers={"user-agent": "keywatch-report/0.1"})
    sink.submit({**report.summary(), "paths": paths})
    sink.wait_idle(timeout_s * max_attempts + 5)
    sink.close(1.0)
    return sink.stats()
