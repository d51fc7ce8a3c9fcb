"""An evaluation that cannot be tuned to: many perturbed simulations, worst case first.

One simulation is one set of constants; a detector chosen on it learns them. Here
`evaluate_seeds` draws a simulation per generator seed with perturbed parameters
(`training.perturb`: rates and sizes 0.3-3x, schedules and calendar shifted, another
model mix), evaluates the shipped default policy on each (`training.evaluate.evaluate`:
retrain on the training days, replay, judge the last two days), and reports the
**worst case** of every metric next to its median, per incident type and per legitimate
archetype, with the legitimate keys that were blocked and why.

Nothing of the shipped policy is tuned here. The one thing this evaluation chooses is
an alert threshold on the decision `score` (the score at which at most 2% of legitimate
key-days would be alerted): it is chosen on the *choose* seeds only and reported on the
*report* seeds, which tells whether the score means the same thing on traffic it has
not seen. The report says which seeds are which.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from training.evaluate import (
    TARGETS,
    VARIANT_DESCRIPTIONS,
    DecisionArrays,
    Target,
    Truth,
    VariantResult,
    _fmt,
    _jsonable,
    _pct,
    since_compromise_mask,
    stopped_keys_lines,
)

DEFAULT_SEEDS: tuple[int, ...] = (0, 1, 2, 3, 4)
DEFAULT_CHOOSE: tuple[int, ...] = (0, 1)
DEFAULT_KEYS = 16
DEFAULT_DAYS = 3
KEYDAY_ALERT_SHARE = 0.02
"""The score threshold is chosen so that this share of legitimate key-days reach it."""


@dataclass(slots=True)
class SeedResult:
    """One seed's evaluation, reduced to what the multi-seed report needs."""

    seed: int
    perturbation: dict[str, Any]
    events: int
    variants: dict[str, VariantResult]
    keyday_max_score: dict[str, list[float]]
    """Per variant: the highest decision score of each legitimate key-day (test period)."""
    incident_max_score: dict[str, list[tuple[str, float]]]
    """Per variant: (scenario, highest score) of each test incident."""
    seconds: float


@dataclass(slots=True)
class SeedsReport:
    """What `evaluate_seeds` measured and where it wrote it."""

    out_dir: Path
    report_md: Path
    report_json: Path
    plot: Path
    seeds: list[int]
    choose_seeds: list[int]
    report_seeds: list[int]
    results: list[SeedResult]
    aggregate: dict[str, dict[str, Any]]
    """Per variant: measure -> {values, median, worst, met}."""
    by_scenario: dict[str, dict[str, Any]]
    by_archetype: dict[str, dict[str, Any]]
    threshold: dict[str, dict[str, Any]]
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def worst(self, measure: str, variant: str = "keywatch") -> float | None:
        return self.aggregate[variant][measure]["worst"]

    def passed(self, variant: str = "keywatch") -> dict[str, bool]:
        return {m: a["met"] for m, a in self.aggregate[variant].items()}


# ---- one seed -------------------------------------------------------------------------------
def run_seed(seed: int, *, out_dir: Path, keys: int, days: int,
             variants: Sequence[str]) -> SeedResult:
    """Simulate with the seed's perturbation, evaluate, reduce (in a worker, too)."""
    from training.evaluate import evaluate
    from training.simulator import simulate

    started = time.perf_counter()
    sim_dir = out_dir / f"seed-{seed}" / "sim"
    summary = simulate(sim_dir, keys=keys, days=days, seed=seed, perturb=True)
    report = evaluate(sim_dir, out_dir=out_dir / f"seed-{seed}" / "evaluation",
                      progress=False, variants=variants, workers=1, plots=False)
    truth, replayed = report.truth, report.replayed
    assert truth is not None and replayed is not None
    meta = json.loads(summary.meta_path.read_text())
    return SeedResult(
        seed=seed, perturbation=meta.get("perturbation") or {}, events=report.events,
        variants=report.variants,
        keyday_max_score={v: keyday_max_scores(truth, replayed.ts, replayed.decisions[v])
                          for v in variants},
        incident_max_score={v: incident_max_scores(truth, replayed.ts, replayed.decisions[v])
                            for v in variants},
        seconds=time.perf_counter() - started)


def _legit_test(truth: Truth, ts: np.ndarray) -> np.ndarray:
    no_incident = truth.labels["incident_id"].isna().to_numpy()
    return (no_incident & ~since_compromise_mask(truth, ts) & ~np.isnan(ts)
            & (ts >= truth.test_start))


def keyday_max_scores(truth: Truth, ts: np.ndarray, arrays: DecisionArrays) -> list[float]:
    """The highest score of each legitimate key-day in the test period."""
    import pandas as pd

    legit = _legit_test(truth, ts)
    frame = pd.DataFrame({"key": truth.labels["key"].to_numpy()[legit],
                          "day": np.floor(ts[legit] / 86400).astype(np.int64),
                          "score": arrays.score[legit]})
    return frame.groupby(["key", "day"])["score"].max().astype(float).tolist()


def incident_max_scores(truth: Truth, ts: np.ndarray, arrays: DecisionArrays
                        ) -> list[tuple[str, float]]:
    """(scenario, highest score of its events) of each test incident."""
    ids = truth.labels["incident_id"].to_numpy()
    out = []
    for inc in truth.test_incidents:
        mask = (ids == inc["id"]) & (ts >= truth.test_start)
        out.append((inc["scenario"], float(arrays.score[mask].max()) if mask.any() else 0.0))
    return out


# ---- many seeds -----------------------------------------------------------------------------
def evaluate_seeds(out_dir: Path, *, seeds: Sequence[int] = DEFAULT_SEEDS,
                   choose: Sequence[int] = DEFAULT_CHOOSE, keys: int = DEFAULT_KEYS,
                   days: int = DEFAULT_DAYS, variants: Sequence[str] = ("keywatch",),
                   workers: int = 1, progress: bool = True) -> SeedsReport:
    """Evaluate `variants` on one perturbed simulation per seed; write report.md,
    report.json and seeds.png to `out_dir`. `choose` seeds pick the score threshold, the
    other seeds report it; every seed counts for the shipped policy's worst case."""
    seeds = list(dict.fromkeys(seeds))
    choose_seeds = [s for s in seeds if s in set(choose)]
    report_seeds = [s for s in seeds if s not in set(choose)]
    if len(seeds) < 2 or not choose_seeds or not report_seeds:
        raise ValueError("need at least two seeds, some to choose on and some to report on")
    unknown = [v for v in variants if v not in VARIANT_DESCRIPTIONS]
    if unknown:
        raise ValueError(f"unknown variant(s): {', '.join(unknown)}")
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = _run_all(seeds, out_dir=out_dir, keys=keys, days=days, variants=variants,
                       workers=workers, progress=progress)
    report = SeedsReport(
        out_dir=out_dir, report_md=out_dir / "report.md", report_json=out_dir / "report.json",
        plot=out_dir / "seeds.png", seeds=seeds, choose_seeds=choose_seeds,
        report_seeds=report_seeds, results=results,
        aggregate={v: aggregate_targets([r.variants[v] for r in results]) for v in variants},
        by_scenario={v: by_scenario([r.variants[v] for r in results]) for v in variants},
        by_archetype={v: by_archetype([r.variants[v] for r in results]) for v in variants},
        threshold={v: choose_and_report(results, v, choose_seeds, report_seeds)
                   for v in variants},
        extra={"keys": keys, "days": days, "variants": list(variants)})
    report.seconds = time.perf_counter() - started
    write_seed_plot(report)
    report.report_md.write_text(render_seeds_markdown(report))
    report.report_json.write_text(json.dumps(_jsonable(seeds_dict(report)), indent=2) + "\n")
    return report


def _run_all(seeds: list[int], *, out_dir: Path, keys: int, days: int,
             variants: Sequence[str], workers: int, progress: bool) -> list[SeedResult]:
    kwargs = {"out_dir": out_dir, "keys": keys, "days": days, "variants": tuple(variants)}
    bar = tqdm(total=len(seeds), unit="seed", desc=f"evaluate {len(seeds)} seeds",
               disable=not progress)
    results: dict[int, SeedResult] = {}
    if workers <= 1:
        for seed in seeds:
            results[seed] = run_seed(seed, **kwargs)
            bar.update(1)
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        with ProcessPoolExecutor(min(workers, len(seeds)), mp_context=ctx) as pool:
            futures = {pool.submit(run_seed, seed, **kwargs): seed for seed in seeds}
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                bar.update(1)
    bar.close()
    return [results[s] for s in seeds]


# ---- aggregation ----------------------------------------------------------------------------
def worst_of(values: Sequence[float | None], target: Target) -> float | None:
    """The worst value for this target (a missing time to detect is the worst)."""
    if target.unit == "minutes":
        clean = [math.inf if v is None else v for v in values]
        worst = max(clean, default=None)
        return None if worst is None or math.isinf(worst) else worst
    clean = [v for v in values if v is not None]
    if not clean:
        return None
    return min(clean) if target.op == ">=" else max(clean)


def _median(values: Sequence[float | None]) -> float | None:
    clean = [v for v in values if v is not None and not math.isinf(v)]
    return float(np.median(clean)) if clean else None


def aggregate_targets(results: Sequence[VariantResult]) -> dict[str, Any]:
    """Per target measure: each seed's value, the median and the worst, and whether the
    worst meets the target."""
    out: dict[str, Any] = {}
    for t in TARGETS:
        values = [r.summary.get(t.measure) for r in results]
        worst = worst_of(values, t)
        nothing_detected = t.unit == "minutes" and any(v is None for v in values)
        applicable = [v for v in values if v is not None]
        met = t.met(worst) if not nothing_detected else False
        if t.measure == "owner_blocked_after_compromise" and not applicable:
            met = True  # no compromise at all: nothing to hold against
        out[t.measure] = {"label": t.label, "target": f"{t.op} {_fmt(t.bound, t)}",
                          "values": values, "median": _median(values), "worst": worst,
                          "met": bool(met)}
    return out


def by_scenario(results: Sequence[VariantResult]) -> dict[str, Any]:
    """Per incident type: detected share, median time to detect and stopped share per
    seed, with the worst and the median over the seeds."""
    scenarios = sorted({i.scenario for r in results for i in r.incidents})
    out: dict[str, Any] = {}
    for s in scenarios:
        detected, ttd, stopped, count = [], [], [], 0
        for r in results:
            incs = [i for i in r.incidents if i.scenario == s]
            if not incs:
                continue
            count += len(incs)
            detected.append(sum(i.detected for i in incs) / len(incs))
            times = [i.ttd_min if i.detected else math.inf for i in incs]
            ttd.append(float(np.median(times)))
            events = sum(i.events for i in incs)
            stopped.append(sum(i.stopped * i.events for i in incs) / events if events else 0.0)
        out[s] = {"incidents": count,
                  "detected": {"median": _median(detected), "worst": min(detected)},
                  "ttd_min": {"median": float(np.median(ttd)), "worst": max(ttd)},
                  "stopped": {"median": _median(stopped), "worst": min(stopped)}}
    return out


def by_archetype(results: Sequence[VariantResult]) -> dict[str, Any]:
    """Per legitimate archetype: blocked, throttled, key-days alerted and keys banned for
    good, worst and median over the seeds where the archetype had traffic."""
    archetypes = sorted({a for r in results for a in r.benign.by_archetype})
    out: dict[str, Any] = {}
    for a in archetypes:
        rows = [r.benign.by_archetype[a] for r in results if a in r.benign.by_archetype]
        entry: dict[str, Any] = {"events": int(sum(x["events"] for x in rows)),
                                 "keys": int(sum(x["keys"] for x in rows))}
        for m in ("blocked", "throttled", "key_days_alerted", "perm_banned"):
            values = [float(x[m]) for x in rows]
            entry[m] = {"median": float(np.median(values)), "worst": max(values)}
        out[a] = entry
    return out


def choose_and_report(results: Sequence[SeedResult], variant: str, choose: Sequence[int],
                      report: Sequence[int]) -> dict[str, Any]:
    """Choose a score threshold on the choose seeds (at most 2% of legitimate key-days
    reach it) and measure it on the report seeds: key-days reaching it, incidents whose
    highest score reaches it."""
    chosen = sorted((x for r in results if r.seed in choose
                     for x in r.keyday_max_score[variant]), reverse=True)
    allowed = int(KEYDAY_ALERT_SHARE * len(chosen))
    # just above the highest key-day not allowed to alert (ties stay below)
    threshold = float(np.nextafter(chosen[allowed], 2.0)) if chosen else 1.0
    threshold = max(threshold, 1e-6)  # a score of 0 alerts on nothing

    def measured(seeds: Sequence[int]) -> dict[str, Any]:
        days = [x for r in results if r.seed in seeds for x in r.keyday_max_score[variant]]
        incs = [x for r in results if r.seed in seeds for x in r.incident_max_score[variant]]
        per_seed = {r.seed: sum(s >= threshold for _, s in r.incident_max_score[variant])
                    / max(len(r.incident_max_score[variant]), 1)
                    for r in results if r.seed in seeds}
        return {"keydays": len(days),
                "keydays_alerted": float(np.mean([d >= threshold for d in days])) if days
                else None,
                "incidents": len(incs),
                "incidents_detected": float(np.mean([s >= threshold for _, s in incs]))
                if incs else None,
                "incidents_detected_worst_seed": min(per_seed.values()) if per_seed else None}

    return {"threshold": threshold, "choose": measured(choose), "report": measured(report)}


# ---- the written report ---------------------------------------------------------------------
def _verdict(met: bool) -> str:
    return "PASS" if met else "FAIL"


def _target_of(measure: str) -> Target:
    return next(t for t in TARGETS if t.measure == measure)


def render_seeds_markdown(report: SeedsReport) -> str:
    variants = list(report.aggregate)
    lines = [
        "# keywatch detection evaluation over perturbed seeds",
        "",
        f"{len(report.seeds)} generator seeds ({', '.join(map(str, report.seeds))}), each a "
        f"simulation of {report.extra['keys']} keys over {report.extra['days']} days with "
        "perturbed parameters (rates and sizes 0.3-3x per archetype and per incident type, "
        "schedules shifted up to ±3 h, another calendar with a month end in the judged days, "
        "another model mix); the last two days of each are judged. The policy is the shipped "
        "default; nothing of it was chosen on these seeds. "
        f"Choose seeds (the score threshold below is picked on them): "
        f"{', '.join(map(str, report.choose_seeds))}. Report seeds (it is measured on them): "
        f"{', '.join(map(str, report.report_seeds))}. Total time {report.seconds:.0f} s.",
        "",
        "## Targets: worst case over all seeds",
        "",
        "| measure | target | " + " | ".join(f"{v} median | {v} worst | {v} worst vs target"
                                            for v in variants) + " |",
        "|---|---|" + "---|---|---|" * len(variants),
    ]
    for t in TARGETS:
        cells = []
        for v in variants:
            a = report.aggregate[v][t.measure]
            cells.append(f"{_fmt(a['median'], t)} | {_fmt(a['worst'], t)} | "
                         f"**{_verdict(a['met'])}**")
        lines.append(f"| {t.label} | {t.op} {_fmt(t.bound, t)} | " + " | ".join(cells) + " |")
    lines += ["", "The report is informational: PASS/FAIL judges the worst seed against the "
              "targets of issue 17.", ""]
    for v in variants:
        lines += _per_seed_lines(report, v)
        lines += _scenario_lines(report, v)
        lines += _archetype_lines(report, v)
        lines += _stopped_lines(report, v)
        lines += _threshold_lines(report, v)
    lines += ["## Plot", "", f"![every seed against every target]({report.plot.name})", ""]
    return "\n".join(lines)


def _per_seed_lines(report: SeedsReport, variant: str) -> list[str]:
    names = [f"seed {s}{' (choose)' if s in report.choose_seeds else ''}" for s in report.seeds]
    lines = [f"## {variant}: every seed", "", "| measure | " + " | ".join(names) + " |",
             "|---|" + "---|" * len(report.seeds)]
    for t in TARGETS:
        values = report.aggregate[variant][t.measure]["values"]
        lines.append(f"| {t.label} | " + " | ".join(_fmt(x, t) for x in values) + " |")
    lines.append("| events | " + " | ".join(f"{r.events:,}" for r in report.results) + " |")
    lines.append("| start | " + " | ".join(str(r.perturbation.get("start", "—"))[:10]
                                           for r in report.results) + " |")
    return [*lines, ""]


def _scenario_lines(report: SeedsReport, variant: str) -> list[str]:
    lines = [f"### {variant}: per incident type (worst / median over seeds)", "",
             "| incident type | incidents | detected | time to detect | attack events stopped |",
             "|---|---|---|---|---|"]
    for s, e in report.by_scenario[variant].items():
        ttd = e["ttd_min"]
        fmt_t = _fmt_minutes
        lines.append(f"| {s} | {e['incidents']} | {_pct(e['detected']['worst'], 0)} / "
                     f"{_pct(e['detected']['median'], 0)} | {fmt_t(ttd['worst'])} / "
                     f"{fmt_t(ttd['median'])} | {_pct(e['stopped']['worst'])} / "
                     f"{_pct(e['stopped']['median'])} |")
    return [*lines, ""]


def _fmt_minutes(x: float | None) -> str:
    if x is None or math.isinf(x):
        return "never"
    return f"{x:.1f} min"


def _archetype_lines(report: SeedsReport, variant: str) -> list[str]:
    lines = [f"### {variant}: per legitimate archetype (worst / median over seeds)", "",
             "| archetype | keys | events | blocked | throttled | key-days alerted high+ "
             "| keys banned for good (worst seed) |", "|---|---|---|---|---|---|---|"]
    for a, e in report.by_archetype[variant].items():
        lines.append(
            f"| {a} | {e['keys']} | {e['events']:,} | {_pct(e['blocked']['worst'], 2)} / "
            f"{_pct(e['blocked']['median'], 2)} | {_pct(e['throttled']['worst'], 2)} / "
            f"{_pct(e['throttled']['median'], 2)} | {_pct(e['key_days_alerted']['worst'])} / "
            f"{_pct(e['key_days_alerted']['median'])} | {e['perm_banned']['worst']:.0f} |")
    return [*lines, ""]


def _stopped_lines(report: SeedsReport, variant: str) -> list[str]:
    lines = [f"### {variant}: legitimate keys blocked, and why", ""]
    rows = [(r.seed, k) for r in report.results for k in r.variants[variant].benign.stopped_keys]
    if not rows:
        return [*lines, "No legitimate key had an event blocked on any seed.", ""]
    table = stopped_keys_lines([k for _, k in rows[:1]], seed=rows[0][0])[:2]
    for seed, k in rows[:40]:
        table.append(stopped_keys_lines([k], seed=seed)[2])
    if len(rows) > 40:
        table.append(f"\n… and {len(rows) - 40} more keys (report.json).")
    return [*lines, *table, ""]


def _threshold_lines(report: SeedsReport, variant: str) -> list[str]:
    th = report.threshold[variant]
    c, r = th["choose"], th["report"]
    return [
        f"### {variant}: a score threshold chosen on some seeds, reported on the others", "",
        f"Threshold {th['threshold']:.4f}: the decision score reached by at most "
        f"{KEYDAY_ALERT_SHARE:.0%} of legitimate key-days on the choose seeds "
        f"({', '.join(map(str, report.choose_seeds))}).", "",
        "| seeds | legitimate key-days | at or above the threshold | test incidents | "
        "reaching it | worst seed |", "|---|---|---|---|---|---|",
        f"| choose | {c['keydays']} | {_pct(c['keydays_alerted'])} | {c['incidents']} | "
        f"{_pct(c['incidents_detected'])} | {_pct(c['incidents_detected_worst_seed'])} |",
        f"| report | {r['keydays']} | {_pct(r['keydays_alerted'])} | {r['incidents']} | "
        f"{_pct(r['incidents_detected'])} | {_pct(r['incidents_detected_worst_seed'])} |", ""]


def seeds_dict(report: SeedsReport) -> dict[str, Any]:
    return {
        "seeds": report.seeds, "choose_seeds": report.choose_seeds,
        "report_seeds": report.report_seeds, "seconds": round(report.seconds, 1),
        **report.extra,
        "targets": [asdict(t) for t in TARGETS],
        "aggregate": report.aggregate, "by_scenario": report.by_scenario,
        "by_archetype": report.by_archetype, "threshold": report.threshold,
        "per_seed": [{"seed": r.seed, "events": r.events, "perturbation": r.perturbation,
                      "seconds": round(r.seconds, 1),
                      "variants": {v: {"summary": res.summary,
                                       "stopped_keys": res.benign.stopped_keys,
                                       "perm_banned_keys": res.benign.perm_banned_keys,
                                       "incidents": [asdict(i) for i in res.incidents]}
                                   for v, res in r.variants.items()}}
                     for r in report.results],
        "plot": report.plot.name,
    }


# ---- the plot -------------------------------------------------------------------------------
def write_seed_plot(report: SeedsReport) -> Path:
    """One panel per target: every seed's value per variant, the target as a line."""
    from matplotlib.figure import Figure

    cols = 3
    rows = math.ceil(len(TARGETS) / cols)
    fig = Figure(figsize=(5 * cols, 3.1 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    x = np.arange(len(report.seeds))
    for ax, t in zip(axes.flat, TARGETS, strict=False):
        for k, (variant, agg) in enumerate(report.aggregate.items()):
            values = agg[t.measure]["values"]
            y = [np.nan if v is None else v for v in values]
            scale = 100.0 if t.unit == "share" else 1.0
            ax.plot(x + 0.08 * k, np.array(y, dtype=float) * scale, "o", color=f"C{k}",
                    label=variant)
        ax.axhline(t.bound * (100.0 if t.unit == "share" else 1.0), color="grey", ls="--",
                   lw=1, label=f"target {t.op} {_fmt(t.bound, t)}")
        ax.set_xticks(x, [f"{s}{'*' if s in report.choose_seeds else ''}"
                          for s in report.seeds])
        ax.set_title(t.label, fontsize=9)
        ax.set_ylabel("%" if t.unit == "share" else t.unit, fontsize=8)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(TARGETS):]:
        ax.axis("off")
    fig.suptitle("Every seed against every target (* = choose seed)")
    fig.tight_layout()
    fig.savefig(report.plot, dpi=100)
    return report.plot
