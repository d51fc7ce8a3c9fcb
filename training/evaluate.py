"""Detection evaluation: how well keywatch does on labelled traffic, honestly measured.

`evaluate(data_dir, out_dir=...)` takes a simulation written by `training.simulator`
(events.jsonl, labels.jsonl, incidents.json, meta.json) and:

1. retrains the offline model on the days *before* the test period only
   (`training.retrain.retrain(..., until=test_start)`), so the model never sees the
   traffic it is judged on;
2. replays *every* event, training days included so that per-key baselines and the
   online models warm up as they would in production, through the one `Scorer`
   pipeline, in file order, once per variant, each on a fresh memory store:

   - `keywatch`: the default policy and the models (what ships);
   - `rules_only`: the default policy with no model signals;
   - `models_only`: only model-score rules and bans (`training/models_only_policy.yaml`),
     so the models decide;
   - `naive`: the naive rule set of the design discussion
     (`training/naive_policy.yaml`), the baseline everything else has to beat;

3. judges the test period only, against the labels: per incident whether it was
   detected (any of its events at severity high or above, or not allowed), how long
   that took from the incident's first event, and what share of its events was stopped;
   for legitimate traffic, what share was blocked or throttled, what share of key-days
   raised a high or critical alert, and whether the flash-sale surge was cut off;
4. writes `report.md` (a table per variant with the targets of the issue next to each
   figure, met or not), `report.json` and PNG plots.

What counts as legitimate. An event is legitimate when the labels give it no incident.
The owner's own traffic on a key while that key is being abused is kept apart
("collateral"): banning a leaked key does cut its owner off, which is the intended
response (the key must be rotated), and counting it as a false positive would punish
the detector for catching the leak. It is reported on its own line, never hidden. Once
the incident is over, the owner's traffic is legitimate again: a ban that outlasts the
abuse counts against the detector.

The judging functions take plain arrays, so notebooks reuse them on their own replays.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from features.contract import parse_timestamp
from features.keys import KeyHasher
from models.signals import ModelSignals
from serving.engine.decision import SEVERITIES, Decision
from serving.engine.replay import count_lines, iter_records, parse_record
from serving.engine.scorer import Scorer

log = logging.getLogger("keywatch.evaluate")

EVALUATION_SECRET = "keywatch-evaluation-secret-not-for-production"
"""Key ids in an evaluation only need to be consistent between retrain and replay."""

TRAINING_DIR = Path(__file__).resolve().parent
NAIVE_POLICY = TRAINING_DIR / "naive_policy.yaml"
MODELS_ONLY_POLICY = TRAINING_DIR / "models_only_policy.yaml"

VARIANTS: tuple[str, ...] = ("keywatch", "rules_only", "models_only", "naive")
VARIANT_DESCRIPTIONS = {
    "keywatch": "default policy + models (what ships)",
    "rules_only": "default policy, no model signals",
    "models_only": "model-score rules and bans only: the models decide",
    "naive": "the naive rule set (training/naive_policy.yaml): fixed limits, IP change = "
             "travel, burst, size, failure rate; every rule blocks",
}

VERDICTS: tuple[str, ...] = ("allow", "throttle", "block")
VERDICT_CODE = {v: i for i, v in enumerate(VERDICTS)}
SEVERITY_CODE = {s: i for i, s in enumerate(SEVERITIES)}
HIGH = SEVERITY_CODE["high"]
SIGNAL_NAMES: tuple[str, ...] = ("offline", "population", "key_baseline")
RECORDED_SIGNALS: tuple[str, ...] = (*SIGNAL_NAMES, "key_drift")
"""Model outputs kept per event: the three scores and the key's drift flag (1.0/0.0)."""


# ---- targets ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Target:
    """One goal of the issue: a measure, a direction and a bound."""

    measure: str
    label: str
    op: str  # ">=" or "<="
    bound: float
    unit: str  # "share", "minutes" or "count"

    def met(self, value: float | None) -> bool:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return False
        return value >= self.bound if self.op == ">=" else value <= self.bound


TARGETS: tuple[Target, ...] = (
    Target("incidents_detected", "incidents detected", ">=", 0.95, "share"),
    Target("median_ttd_min", "median time to detect", "<=", 2.0, "minutes"),
    Target("attack_events_stopped", "attack events stopped", ">=", 0.90, "share"),
    Target("benign_blocked", "legitimate events blocked", "<=", 0.0002, "share"),
    Target("benign_throttled", "legitimate events throttled", "<=", 0.002, "share"),
    Target("benign_keydays_alerted", "legitimate key-days alerted high+", "<=", 0.02, "share"),
    Target("benign_keys_perm_banned", "legitimate keys ever permanently banned", "<=", 0,
           "count"),
    Target("surge_blocked", "flash-sale surge events blocked", "<=", 0, "count"),
    Target("owner_blocked_after_compromise", "owner traffic blocked after a compromise", "<=",
           0.05, "share"),
)
"""The targets of issue 17, judged on the test period (worst case over seeds in
`training.evaluate_seeds`)."""

ACTION_TYPES: tuple[str, ...] = ("none", "log", "alert", "throttle", "temp_ban", "perm_ban",
                                 "refuse")
ACTION_CODE = {a: i for i, a in enumerate(ACTION_TYPES)}
PERM_BAN = ACTION_CODE["perm_ban"]


# ---- the truth -------------------------------------------------------------------------------
@dataclass(slots=True)
class Truth:
    """What the simulator wrote down: per-event labels, incidents and the test period."""

    labels: pd.DataFrame
    """One row per event line: incident_id, scenario, key, tenant_kind, benign_tag."""
    incidents: list[dict[str, Any]]
    """incidents.json, with `start_ts` / `end_ts` added (epoch seconds)."""
    meta: dict[str, Any]
    test_start: float
    """Epoch seconds; events at or after it are the test period."""

    @property
    def test_incidents(self) -> list[dict[str, Any]]:
        return [i for i in self.incidents if i["period"] == "test"]


def load_truth(data_dir: Path) -> Truth:
    """Labels, incidents and meta of a simulation directory."""
    data_dir = Path(data_dir)
    labels = pd.read_json(data_dir / "labels.jsonl", lines=True, dtype=False)
    for column in ("incident_id", "scenario", "benign_tag"):
        labels[column] = labels[column].astype(object).where(labels[column].notna(), None)
    if "archetype" not in labels:  # simulations from before archetypes
        labels["archetype"] = labels["tenant_kind"]
    incidents = json.loads((data_dir / "incidents.json").read_text())
    for inc in incidents:
        inc["start_ts"] = parse_timestamp(inc["start"], now=math.inf)
        inc["end_ts"] = parse_timestamp(inc["end"], now=math.inf)
    meta = json.loads((data_dir / "meta.json").read_text())
    return Truth(labels=labels, incidents=incidents, meta=meta,
                 test_start=parse_timestamp(meta["test_start"], now=math.inf))


# ---- replay: the one pipeline, several variants ----------------------------------------------
@dataclass(slots=True)
class DecisionArrays:
    """The decisions of one variant over a replay, one slot per event line."""

    verdict: np.ndarray
    """int8 index into VERDICTS; -1 for a line that did not parse."""
    severity: np.ndarray
    """int8 index into SEVERITIES."""
    score: np.ndarray
    """float32 fused score in [0, 1]."""
    action: np.ndarray
    """int8 index into ACTION_TYPES (-1: a type this evaluation does not know)."""
    action_key_scope: np.ndarray
    """bool: the action applies to the whole key (not an address or a network)."""
    signals: dict[str, np.ndarray]
    """float32 per event for each of RECORDED_SIGNALS (NaN when the model had no score)."""
    drivers: dict[int, list[str]] = field(default_factory=dict)
    """Codes behind the severity, for events at medium or above or not allowed."""

    @classmethod
    def empty(cls, n: int) -> DecisionArrays:
        return cls(verdict=np.full(n, -1, np.int8), severity=np.zeros(n, np.int8),
                   score=np.zeros(n, np.float32), action=np.zeros(n, np.int8),
                   action_key_scope=np.zeros(n, bool),
                   signals={s: np.full(n, np.nan, np.float32) for s in RECORDED_SIGNALS})

    def record(self, i: int, decision: Decision) -> None:
        v = VERDICT_CODE[decision.decision]
        s = SEVERITY_CODE[decision.severity]
        self.verdict[i] = v
        self.severity[i] = s
        self.score[i] = decision.score
        action = decision.action
        self.action[i] = ACTION_CODE.get(action.type, -1)
        self.action_key_scope[i] = action.scope in (None, "key")
        if v or s >= SEVERITY_CODE["medium"]:
            self.drivers[i] = list(decision.drivers)


@dataclass(slots=True)
class Replayed:
    """Every variant's decisions over one events file, and each event's time."""

    ts: np.ndarray
    decisions: dict[str, DecisionArrays]
    seconds: float
    failed_lines: int


def _record_signals(scorer: Scorer, arrays: DecisionArrays, cursor: list[int]) -> None:
    """Keep each event's model scores as the pipeline computed them (for the plots).

    The scorer's detectors (or its `model_signals`) are wrapped on this instance only:
    the decision is unchanged, the scores are read on their way from the models to
    fusion."""

    def keep(signals: ModelSignals) -> None:
        i = cursor[0]
        for name in SIGNAL_NAMES:
            value = getattr(signals, name, None)
            if value is not None:
                arrays.signals[name][i] = value
        arrays.signals["key_drift"][i] = float(bool(signals.key_drift))

    detectors = getattr(scorer, "detectors", None)
    if detectors is not None:
        inner_detectors = detectors.signals

        def detector_signals(fv: Any, *args: Any, **kwargs: Any) -> Any:
            out = inner_detectors(fv, *args, **kwargs)
            keep(out[0])
            return out

        detectors.signals = detector_signals
        return
    inner: Callable[[Any], ModelSignals] = scorer.model_signals

    def model_signals(fv: Any) -> ModelSignals:
        signals = inner(fv)
        keep(signals)
        return signals

    scorer.model_signals = model_signals  # type: ignore[method-assign]


@contextmanager
def _quiet_bans() -> Iterator[None]:
    """A replay bans hundreds of entities; each ban is a warning in the service log."""
    logger = logging.getLogger("keywatch.scorer")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def replay_variants(events_path: Path, scorers: dict[str, Scorer], *,
                    progress: bool = True,
                    on_progress: Callable[[int], None] | None = None) -> Replayed:
    """Score every event of `events_path`, in file order, through each scorer.

    Each event is parsed once and handed to every variant's `Scorer.score`, the same
    call the HTTP endpoint and `keywatch replay` make; each scorer has its own store.
    `on_progress(n)` is called every few thousand events with the events done since.
    """
    total = count_lines(events_path) or 0
    ts = np.full(total, np.nan)
    arrays = {name: DecisionArrays.empty(total) for name in scorers}
    cursor = [0]
    for name, scorer in scorers.items():
        _record_signals(scorer, arrays[name], cursor)
    failed = 0
    started = time.perf_counter()
    bar = tqdm(iter_records(events_path), total=total, unit="ev", disable=not progress,
               desc=f"replay × {len(scorers)}", mininterval=0.5)
    with _quiet_bans():
        for n, record in bar:
            i = n - 1
            cursor[0] = i
            if on_progress is not None and n % _PROGRESS_EVERY == 0:
                on_progress(_PROGRESS_EVERY)
            try:
                event = parse_record(record)
            except ValueError:
                failed += 1
                continue
            ts[i] = event.timestamp
            for name, scorer in scorers.items():
                arrays[name].record(i, scorer.score(event))
        for scorer in scorers.values():
            scorer.flush()
    bar.close()
    if on_progress is not None:
        on_progress(total % _PROGRESS_EVERY)
    return Replayed(ts=ts, decisions=arrays, seconds=time.perf_counter() - started,
                    failed_lines=failed)


_PROGRESS_EVERY = 2000
_VARIANT_COST = {"keywatch": 2.0, "models_only": 2.0, "rules_only": 1.0, "naive": 1.0}
_worker_counter: Any = None


def _init_worker(counter: Any) -> None:
    global _worker_counter
    _worker_counter = counter


def _count(n: int) -> None:
    with _worker_counter.get_lock():
        _worker_counter.value += n


def _replay_worker(events_path: Path, names: list[str], model_dir: Path | None) -> Replayed:
    """One worker process: its own scorers for its share of the variants."""
    scorers = {n: build_variant(n, model_dir=model_dir) for n in names}
    try:
        return replay_variants(events_path, scorers, progress=False, on_progress=_count)
    finally:
        for scorer in scorers.values():
            scorer.store.close()


def replay_in_workers(events_path: Path, names: Sequence[str], *, model_dir: Path | None,
                      workers: int, progress: bool = True) -> Replayed:
    """`replay_variants` with the variants spread over worker processes.

    Variants are independent (each has its own store and models), so they parallelise
    perfectly; every worker reads the events file itself, in file order."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    shares: list[list[str]] = [[] for _ in range(max(1, min(workers, len(names))))]
    load = [0.0] * len(shares)
    for name in sorted(names, key=lambda n: -_VARIANT_COST.get(n, 1.0)):
        k = load.index(min(load))
        shares[k].append(name)
        load[k] += _VARIANT_COST.get(name, 1.0)
    total = count_lines(events_path) or 0
    # fork: workers need nothing re-imported, and a caller's script or notebook without
    # a `__main__` guard still works (spawn would re-run it); elsewhere, spawn
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    counter = ctx.Value("q", 0)
    started = time.perf_counter()
    with ProcessPoolExecutor(len(shares), mp_context=ctx, initializer=_init_worker,
                             initargs=(counter,)) as pool:
        futures = [pool.submit(_replay_worker, events_path, share, model_dir)
                   for share in shares]
        bar = tqdm(total=total, unit="ev", disable=not progress,
                   desc=f"replay ({len(names)} variants in {len(shares)} processes)")
        while not all(f.done() for f in futures):
            time.sleep(0.5)
            bar.n = counter.value // len(shares)  # events, averaged over the workers
            bar.refresh()
        parts = [f.result() for f in futures]
    bar.n = total
    bar.close()
    decisions: dict[str, DecisionArrays] = {}
    for part in parts:
        decisions.update(part.decisions)
    return Replayed(ts=parts[0].ts, decisions={n: decisions[n] for n in names},
                    seconds=time.perf_counter() - started, failed_lines=parts[0].failed_lines)


def build_variant(name: str, *, model_dir: Path | None,
                  secret: str = EVALUATION_SECRET) -> Scorer:
    """A fresh scorer for one evaluation variant, built the way the service builds its
    own (`serving.engine.factory.build_scorer`): a fresh memory store, a fresh population model,
    the registry's promoted offline model."""
    from serving.engine.factory import build_scorer
    from serving.settings import Settings

    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; one of {', '.join(VARIANTS)}")
    policy = {"naive": NAIVE_POLICY, "models_only": MODELS_ONLY_POLICY}.get(name)
    # every field that matters is explicit, so KEYWATCH_* variables of the calling shell
    # (a Redis store, dry-run) cannot leak into the evaluation
    settings = Settings(secret=secret, env="production", store="memory", model_dir=model_dir,
                        models=name in ("keywatch", "models_only"), policy=policy,
                        dry_run=False, event_log=False)
    return build_scorer(settings)


# ---- judging ---------------------------------------------------------------------------------
@dataclass(slots=True)
class IncidentResult:
    id: str
    scenario: str
    victim: str
    events: int
    detected: bool
    ttd_min: float | None
    """Minutes from the incident's first event to its first detected event."""
    stopped: float
    """Share of the incident's events not allowed (throttled or blocked)."""
    blocked: float
    first_drivers: list[str]
    """What raised the first detection (rule codes, `model_anomaly`)."""


@dataclass(slots=True)
class BenignResult:
    events: int
    blocked: float
    throttled: float
    key_days: int
    key_days_alerted: float
    surge_events: int
    surge_blocked: int
    surge_throttled: int
    by_tag: dict[str, dict[str, float]]
    by_tenant_kind: dict[str, dict[str, float]]
    top_drivers: list[tuple[str, int]]
    """Rules behind the legitimate events stopped, most frequent first."""
    alert_drivers: list[tuple[str, int]]
    """Rules behind the legitimate key-days alerted at high or above: key-days per code."""
    collateral_events: int
    collateral_stopped: float
    """The owners' own traffic on compromised keys while the incident lasts, stopped."""
    week_blocked: float
    """Legitimate events blocked over the whole replay, training days included."""
    owner_after_events: int = 0
    owner_after_blocked: float = 0.0
    """The owners' own traffic on a key from its first incident's start on (the test
    period): blocked share. Reported apart from legitimate traffic (issue 17)."""
    perm_banned_keys: list[dict[str, str]] = field(default_factory=list)
    """Never-compromised keys that got a permanent key ban at any time in the replay."""
    by_archetype: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per legitimate archetype: events, blocked, throttled, key_days, key_days_alerted,
    keys, perm_banned."""
    stopped_keys: list[dict[str, Any]] = field(default_factory=list)
    """Legitimate keys with events blocked (or permanently banned): how many and why."""


@dataclass(slots=True)
class VariantResult:
    name: str
    description: str
    incidents: list[IncidentResult]
    benign: BenignResult
    summary: dict[str, float | None]
    targets: list[dict[str, Any]]


def _shares(verdict: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    n = int(mask.sum())
    v = verdict[mask]
    return {"events": n,
            "blocked": float((v == 2).mean()) if n else 0.0,
            "throttled": float((v == 1).mean()) if n else 0.0}


def compromised_mask(truth: Truth, ts: np.ndarray) -> np.ndarray:
    """Events of a victim key while its incident lasts (the owner's and the attacker's)."""
    keys = truth.labels["key"].to_numpy()
    out = np.zeros(len(ts), bool)
    for inc in truth.incidents:
        during = (ts >= inc["start_ts"]) & (ts <= inc["end_ts"])
        for victim in inc["victim_keys"]:
            out |= during & (keys == victim)
    return out


def after_incident_mask(truth: Truth, ts: np.ndarray) -> np.ndarray:
    """Events of a victim key after its incident ended."""
    keys = truth.labels["key"].to_numpy()
    out = np.zeros(len(ts), bool)
    for inc in truth.incidents:
        for victim in inc["victim_keys"]:
            out |= (keys == victim) & (ts > inc["end_ts"])
    return out


def since_compromise_mask(truth: Truth, ts: np.ndarray) -> np.ndarray:
    """Events of a victim key from the start of an incident on it (during and after)."""
    keys = truth.labels["key"].to_numpy()
    out = np.zeros(len(ts), bool)
    for inc in truth.incidents:
        for victim in inc["victim_keys"]:
            out |= (keys == victim) & (ts >= inc["start_ts"])
    return out


def _judge_incidents(truth: Truth, ts: np.ndarray, arrays: DecisionArrays,
                     in_test: np.ndarray) -> list[IncidentResult]:
    incident_ids = truth.labels["incident_id"].to_numpy()
    verdict = arrays.verdict
    detected_event = (arrays.severity >= HIGH) | (verdict > 0)
    out: list[IncidentResult] = []
    for inc in truth.test_incidents:
        idx = np.flatnonzero((incident_ids == inc["id"]) & in_test)
        hits = idx[detected_event[idx]]
        first = int(hits[np.argmin(ts[hits])]) if len(hits) else None
        out.append(IncidentResult(
            id=inc["id"], scenario=inc["scenario"], victim=inc["victim_keys"][0],
            events=len(idx), detected=first is not None,
            ttd_min=None if first is None else max(0.0, (ts[first] - inc["start_ts"]) / 60),
            stopped=float((verdict[idx] > 0).mean()) if len(idx) else 0.0,
            blocked=float((verdict[idx] == 2).mean()) if len(idx) else 0.0,
            first_drivers=[] if first is None else arrays.drivers.get(first, []),
        ))
    return out


def _key_day_alerts(keys: np.ndarray, days: np.ndarray, alert: np.ndarray) -> pd.Series:
    """Per (key, day): whether any event was at high or above."""
    return pd.DataFrame({"key": keys, "day": days, "alert": alert}).groupby(
        ["key", "day"])["alert"].any()


def _driver_counts(arrays: DecisionArrays, idx: np.ndarray) -> list[tuple[str, int]]:
    counts: dict[str, int] = {}
    for i in idx:
        for code in arrays.drivers.get(int(i), []):
            counts[code] = counts.get(code, 0) + 1
    return sorted(counts.items(), key=lambda kv: -kv[1])


def _perm_banned(truth: Truth, arrays: DecisionArrays, legit_keys_mask: np.ndarray
                 ) -> list[dict[str, str]]:
    """Never-compromised keys that ever received a permanent key ban."""
    labels = truth.labels
    hit = legit_keys_mask & (arrays.action == PERM_BAN) & arrays.action_key_scope
    keys = labels["key"].to_numpy()[hit]
    archetypes = archetype_column(labels)[hit]
    seen = dict(zip(keys.tolist(), archetypes.tolist(), strict=True))
    return [{"key": short_key(k), "archetype": a} for k, a in sorted(seen.items())]


def archetype_column(labels: pd.DataFrame) -> np.ndarray:
    """Each event's legitimate archetype (the tenant kind for older simulations)."""
    column = "archetype" if "archetype" in labels else "tenant_kind"
    return labels[column].to_numpy()


def short_key(key: str) -> str:
    """What the report shows of a key: enough to find it, not the key."""
    return f"{key[:12]}…"


def _stopped_keys(truth: Truth, ts: np.ndarray, arrays: DecisionArrays, legit: np.ndarray,
                  banned: list[dict[str, str]]) -> list[dict[str, Any]]:
    """Legitimate keys with blocked events in the judged days, or banned for good: how
    many events, what stopped them, when first."""
    labels = truth.labels
    keys = labels["key"].to_numpy()
    verdict = arrays.verdict
    banned_keys = {b["key"] for b in banned}
    out = []
    stopped = legit & (verdict == 2)
    candidates = set(keys[stopped].tolist()) | {k for k in set(keys[legit].tolist())
                                                if short_key(k) in banned_keys}
    for key in candidates:
        mine = legit & (keys == key)
        idx = np.flatnonzero(mine & (verdict == 2))
        first = float(ts[idx].min()) if len(idx) else None
        out.append({
            "key": short_key(key), "archetype": archetype_column(labels)[mine][0],
            "events": int(mine.sum()), "blocked": len(idx),
            "throttled": int((verdict[mine] == 1).sum()),
            "perm_banned": short_key(key) in banned_keys,
            "first_blocked": None if first is None else _iso(first),
            "why": _driver_counts(arrays, idx)[:4],
        })
    return sorted(out, key=lambda d: -d["blocked"])


def _iso(ts: float) -> str:
    return pd.Timestamp(ts, unit="s", tz="UTC").strftime("%Y-%m-%d %H:%M")


def _by_archetype(truth: Truth, arrays: DecisionArrays, legit: np.ndarray,
                  days: np.ndarray, banned: list[dict[str, str]]) -> dict[str, dict[str, float]]:
    labels = truth.labels
    archetypes = archetype_column(labels)
    keys = labels["key"].to_numpy()
    out: dict[str, dict[str, float]] = {}
    for a in sorted(set(archetypes[legit].tolist())):
        mask = legit & (archetypes == a)
        per_day = _key_day_alerts(keys[mask], days[mask], arrays.severity[mask] >= HIGH)
        out[a] = {**_shares(arrays.verdict, mask), "keys": len(set(keys[mask].tolist())),
                  "key_days": len(per_day),
                  "key_days_alerted": float(per_day.mean()) if len(per_day) else 0.0,
                  "perm_banned": sum(b["archetype"] == a for b in banned)}
    return out


def judge(truth: Truth, ts: np.ndarray, arrays: DecisionArrays, *, name: str = "",
          description: str = "") -> VariantResult:
    """Score one variant's decisions against the labels, on the test period."""
    in_test = ts >= truth.test_start
    incidents = _judge_incidents(truth, ts, arrays, in_test)
    benign = judge_benign(truth, ts, arrays, in_test)
    incident_ids = truth.labels["incident_id"].to_numpy()
    attack = np.isin(incident_ids, [i.id for i in incidents]) & in_test
    verdict = arrays.verdict
    ttd = [i.ttd_min if i.detected else math.inf for i in incidents]
    median_ttd = float(np.median(ttd)) if ttd else None
    summary: dict[str, float | None] = {
        "incidents": len(incidents),
        "incidents_detected": (sum(i.detected for i in incidents) / len(incidents)
                               if incidents else None),
        "median_ttd_min": None if median_ttd is None or math.isinf(median_ttd) else median_ttd,
        "attack_events_stopped": float((verdict[attack] > 0).mean()) if attack.any() else None,
        "attack_events_stopped_mean_per_incident": (
            float(np.mean([i.stopped for i in incidents])) if incidents else None),
        "benign_blocked": benign.blocked,
        "benign_throttled": benign.throttled,
        "benign_keydays_alerted": benign.key_days_alerted,
        "benign_keys_perm_banned": float(len(benign.perm_banned_keys)),
        "surge_blocked": float(benign.surge_blocked),
        "owner_blocked_after_compromise": (benign.owner_after_blocked
                                           if benign.owner_after_events else None),
    }
    targets = [{"measure": t.measure, "label": t.label, "target": f"{t.op} {_fmt(t.bound, t)}",
                "value": summary.get(t.measure),
                "met": t.met(summary.get(t.measure))
                or (t.measure == "owner_blocked_after_compromise"
                    and summary.get(t.measure) is None)}
               for t in TARGETS]
    return VariantResult(name=name, description=description, incidents=incidents,
                         benign=benign, summary=summary, targets=targets)


def judge_benign(truth: Truth, ts: np.ndarray, arrays: DecisionArrays,
                 in_test: np.ndarray) -> BenignResult:
    """Legitimate traffic in the test period: events with no incident, apart from the
    owners' own traffic on a key since its compromise (reported on its own)."""
    labels = truth.labels
    verdict, severity = arrays.verdict, arrays.severity
    no_incident = labels["incident_id"].isna().to_numpy()
    since = since_compromise_mask(truth, ts)
    legit_all = no_incident & ~since & ~np.isnan(ts)
    legit = legit_all & in_test
    owner_after = no_incident & since & in_test
    collateral = no_incident & compromised_mask(truth, ts) & in_test
    tags, keys = labels["benign_tag"].to_numpy(), labels["key"].to_numpy()
    kinds = labels["tenant_kind"].to_numpy()
    days = np.floor(np.nan_to_num(ts) / 86400).astype(np.int64)
    per_day = _key_day_alerts(keys[legit], days[legit], severity[legit] >= HIGH)
    surge = legit & (tags == "flash_sale")
    alerts: dict[str, set[tuple[str, int]]] = {}
    for i in np.flatnonzero(legit & (severity >= HIGH)):
        for code in arrays.drivers.get(int(i), []) or ["(none)"]:
            alerts.setdefault(code, set()).add((keys[i], int(days[i])))
    victims = {v for inc in truth.incidents for v in inc["victim_keys"]}
    never_victim = no_incident & ~np.isin(keys, list(victims)) & ~np.isnan(ts)
    banned = _perm_banned(truth, arrays, never_victim)
    n_legit = int(legit.sum())
    return BenignResult(
        events=n_legit,
        blocked=float((verdict[legit] == 2).mean()) if n_legit else 0.0,
        throttled=float((verdict[legit] == 1).mean()) if n_legit else 0.0,
        key_days=len(per_day),
        key_days_alerted=float(per_day.mean()) if len(per_day) else 0.0,
        surge_events=int(surge.sum()),
        surge_blocked=int((verdict[surge] == 2).sum()),
        surge_throttled=int((verdict[surge] == 1).sum()),
        by_tag={t: _shares(verdict, legit & (tags == t))
                for t in sorted({t for t in tags[legit] if isinstance(t, str)})},
        by_tenant_kind={k: _shares(verdict, legit & (kinds == k))
                        for k in sorted(set(kinds[legit]))},
        top_drivers=_driver_counts(arrays, np.flatnonzero(legit & (verdict > 0)))[:8],
        alert_drivers=sorted(((c, len(kd)) for c, kd in alerts.items()),
                             key=lambda kv: -kv[1])[:8],
        collateral_events=int(collateral.sum()),
        collateral_stopped=float((verdict[collateral] > 0).mean()) if collateral.any() else 0.0,
        week_blocked=float((verdict[legit_all] == 2).mean()) if legit_all.any() else 0.0,
        owner_after_events=int(owner_after.sum()),
        owner_after_blocked=float((verdict[owner_after] == 2).mean())
        if owner_after.any() else 0.0,
        perm_banned_keys=banned,
        by_archetype=_by_archetype(truth, arrays, legit, days, banned),
        stopped_keys=_stopped_keys(truth, ts, arrays, legit, banned),
    )


def _fmt(value: float | None, target: Target) -> str:
    if value is None:
        return "n/a (none detected)" if target.unit == "minutes" else "n/a"
    if target.unit == "share":
        return f"{value:.2%}" if value < 0.01 and value > 0 else f"{value:.1%}"
    if target.unit == "minutes":
        return f"{value:.1f} min"
    return f"{value:.0f}"


# ---- the evaluation --------------------------------------------------------------------------
@dataclass(slots=True)
class EvaluationReport:
    """What `evaluate` measured and where it wrote it."""

    data_dir: Path
    out_dir: Path
    report_md: Path
    report_json: Path
    plots: dict[str, Path]
    variants: dict[str, VariantResult]
    retrain: dict[str, Any]
    test_start: str
    events: int
    replay_seconds: float
    seconds: float
    truth: Truth | None = None
    """The labels judged against (kept for callers that judge further)."""
    replayed: Replayed | None = None
    """Every variant's per-event decisions."""

    def met(self, variant: str = "keywatch") -> dict[str, bool]:
        return {t["measure"]: t["met"] for t in self.variants[variant].targets}


def evaluate(data_dir: Path, *, model_dir: Path | None = None, out_dir: Path,
             progress: bool = True, variants: Sequence[str] = VARIANTS,
             workers: int | None = None, plots: bool = True) -> EvaluationReport:
    """Retrain on the training days, replay everything per variant, judge the test days.

    `model_dir` is the model registry to retrain into and score with (default:
    `out_dir/models`). Writes `report.md`, `report.json` and PNG plots to `out_dir`.
    `workers`: processes to spread the variants over (default: one per variant, at most
    one per CPU); 1 replays them all in this process. `plots=False` skips the figures.
    """
    started = time.perf_counter()
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_dir = Path(model_dir) if model_dir is not None else out_dir / "models"
    events_path = data_dir / "events.jsonl"
    truth = load_truth(data_dir)
    hasher = KeyHasher(EVALUATION_SECRET)

    needs_models = any(v in ("keywatch", "models_only") for v in variants)
    retrain_info: dict[str, Any] = {"skipped": True}
    if needs_models:
        from training.retrain import retrain

        if progress:
            print(f"retraining the offline model on events before {truth.meta['test_start']}",
                  file=sys.stderr)
        result = retrain(events=events_path, model_dir=model_dir, hasher=hasher,
                         until=truth.test_start, progress=progress)
        retrain_info = {"promoted": bool(result.promoted), "version": result.version,
                        "reasons": list(result.reasons), "metrics": _jsonable(result.metrics),
                        "report_path": str(result.report_path) if result.report_path else None,
                        "model_dir": str(model_dir)}
        if not result.promoted:
            log.warning("the retrained model %s was not promoted (%s): the model variants "
                        "score with whatever the registry already holds", result.version,
                        "; ".join(result.reasons))

    workers = workers if workers is not None else min(len(variants), os.cpu_count() or 1)
    if workers > 1:
        replayed = replay_in_workers(events_path, variants, model_dir=model_dir,
                                     workers=workers, progress=progress)
    else:
        scorers = {v: build_variant(v, model_dir=model_dir) for v in variants}
        replayed = replay_variants(events_path, scorers, progress=progress)
        for scorer in scorers.values():
            scorer.store.close()
    if len(truth.labels) != len(replayed.ts):
        raise ValueError(f"{data_dir}: {len(truth.labels)} labels for {len(replayed.ts)} events")

    results = {v: judge(truth, replayed.ts, replayed.decisions[v], name=v,
                        description=VARIANT_DESCRIPTIONS[v]) for v in variants}
    figures = write_plots(out_dir, truth, replayed, results) if plots else {}
    save_decisions(out_dir / "decisions.npz", replayed)
    report = EvaluationReport(
        data_dir=data_dir, out_dir=out_dir, report_md=out_dir / "report.md",
        report_json=out_dir / "report.json", plots=figures, variants=results,
        retrain=retrain_info, test_start=truth.meta["test_start"], events=len(replayed.ts),
        replay_seconds=replayed.seconds, seconds=time.perf_counter() - started,
        truth=truth, replayed=replayed)
    report.report_md.write_text(render_markdown(report, truth))
    report.report_json.write_text(json.dumps(_jsonable(report_dict(report, truth)), indent=2)
                                  + "\n")
    return report


def save_decisions(path: Path, replayed: Replayed) -> None:
    """Every variant's per-event verdict, severity, score and model scores, one row per
    event line (`numpy.load`), for analyses the report does not make."""
    arrays: dict[str, np.ndarray] = {"ts": replayed.ts}
    for name, d in replayed.decisions.items():
        arrays[f"{name}.verdict"] = d.verdict
        arrays[f"{name}.severity"] = d.severity
        arrays[f"{name}.score"] = d.score
        for signal, values in d.signals.items():
            if not np.isnan(values).all():
                arrays[f"{name}.{signal}"] = values
    np.savez_compressed(path, **arrays)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "__dataclass_fields__"):
        return _jsonable(asdict(value))
    return value


def report_dict(report: EvaluationReport, truth: Truth) -> dict[str, Any]:
    return {
        "data_dir": report.data_dir, "test_start": report.test_start,
        "events": report.events, "seconds": round(report.seconds, 1),
        "replay_seconds": round(report.replay_seconds, 1),
        "simulation": {k: truth.meta.get(k) for k in ("seed", "keys", "days", "start", "end")},
        "targets": [asdict(t) for t in TARGETS],
        "retrain": report.retrain,
        "variants": {name: asdict(r) for name, r in report.variants.items()},
        "plots": {k: p.name for k, p in report.plots.items()},
    }


# ---- the written report ----------------------------------------------------------------------
def _pct(x: float | None, digits: int = 1) -> str:
    if x is None:
        return "n/a"
    if 0 < x < 0.001:
        return f"{x:.3%}"
    return f"{x:.{digits}%}"


def render_markdown(report: EvaluationReport, truth: Truth) -> str:
    meta = truth.meta
    lines = [
        "# keywatch detection evaluation",
        "",
        f"Simulation `{report.data_dir}`: seed {meta.get('seed')}, {meta.get('keys')} keys, "
        f"{meta.get('days')} days, {report.events:,} events; test period from "
        f"{report.test_start} ({len(truth.test_incidents)} incidents; "
        f"{len(truth.incidents) - len(truth.test_incidents)} more in the training days, not "
        "judged). Every event was replayed through the one `Scorer` pipeline in file order, "
        "training days included (baselines warm up), once per variant on a fresh store; "
        f"replay took {report.replay_seconds:.0f} s for {len(report.variants)} variants.",
        "",
    ]
    r = report.retrain
    if r.get("skipped"):
        lines.append("Offline model: not retrained (no model variant evaluated).")
    else:
        state = "promoted" if r["promoted"] else "**not promoted** (" + "; ".join(
            r["reasons"]) + ") — the model variants scored with the registry's current model"
        lines.append(f"Offline model: retrained on the days before the test period only, "
                     f"version `{r['version']}`, {state}.")
    lines += [
        "",
        "Detected: any incident event at severity high or above, or not allowed. Time to "
        "detect: from the incident's first event to the first detected one (undetected "
        "incidents count as never, so the median is over all incidents). Stopped: "
        "throttled or blocked. Legitimate: events with no incident, excluding the owner's own "
        "traffic on a key while an incident abuses it (reported as collateral). "
        "Key-days: a legitimate key's events on one UTC day.",
        "",
        "## Targets",
        "",
        "| measure | target | " + " | ".join(report.variants) + " |",
        "|---|---|" + "---|" * len(report.variants),
    ]
    for t in TARGETS:
        cells = []
        for res in report.variants.values():
            row = next(x for x in res.targets if x["measure"] == t.measure)
            cells.append(f"{_fmt(row['value'], t)} {'✅ met' if row['met'] else '❌ not met'}")
        lines.append(f"| {t.label} | {t.op} {_fmt(t.bound, t)} | " + " | ".join(cells) + " |")
    lines.append("")
    for res in report.variants.values():
        lines += _variant_section(res)
    lines += ["## Plots", ""]
    for name, path in report.plots.items():
        lines += [f"![{name}]({path.name})", ""]
    return "\n".join(lines)


def _variant_section(res: VariantResult) -> list[str]:
    b, s = res.benign, res.summary
    lines = [f"## {res.name}", "", res.description, "", "| measure | measured | target | |",
             "|---|---|---|---|"]
    for t in res.targets:
        target = next(x for x in TARGETS if x.measure == t["measure"])
        lines.append(f"| {t['label']} | {_fmt(t['value'], target)} | {t['target']} | "
                     f"{'✅ met' if t['met'] else '❌ not met'} |")
    lines += [
        f"| attack events stopped, mean per incident | "
        f"{_pct(s['attack_events_stopped_mean_per_incident'])} | | |",
        f"| legitimate events throttled | {_pct(b.throttled, 2)} | | |",
        f"| flash-sale surge events throttled | {b.surge_throttled:,} of {b.surge_events:,} "
        f"| | |",
        f"| collateral: owners' own traffic during an incident on their key stopped | "
        f"{_pct(b.collateral_stopped)} of {b.collateral_events:,} | | |",
        f"| legitimate events blocked over the whole week (training days too) | "
        f"{_pct(b.week_blocked, 2)} | | |",
        "",
        f"Legitimate test events: {b.events:,}; key-days: {b.key_days:,}. "
        + (f"Owners' own traffic on a key since its compromise: {b.owner_after_events:,} "
           f"events, {_pct(b.owner_after_blocked, 2)} blocked (reported apart). "
           if b.owner_after_events else "")
        + ("Rules behind legitimate events stopped (events, share of all legitimate "
           "events): " + ", ".join(f"`{c}` {n:,} ({_pct(n / max(b.events, 1))})"
                                   for c, n in b.top_drivers) + "." if b.top_drivers
           else "No legitimate event was stopped.")
        + (" Behind the legitimate key-days alerted high or above (key-days per code): "
           + ", ".join(f"`{c}` {n:,}" for c, n in b.alert_drivers) + "." if b.alert_drivers
           else ""),
        "",
        "| incident | scenario | events | detected | time to detect | stopped | first caught by |",
        "|---|---|---|---|---|---|---|",
    ]
    for i in res.incidents:
        ttd = f"{i.ttd_min:.1f} min" if i.ttd_min is not None else "—"
        lines.append(f"| {i.id} | {i.scenario} | {i.events:,} | {'yes' if i.detected else 'no'}"
                     f" | {ttd} | {_pct(i.stopped)} | {', '.join(i.first_drivers) or '—'} |")
    lines += ["", "| legitimate traffic | events | blocked | throttled | key-days alerted high+ "
              "| keys banned for good |", "|---|---|---|---|---|---|"]
    for k, v in b.by_archetype.items():
        lines.append(f"| archetype: {k} | {v['events']:,} | {_pct(v['blocked'], 2)} | "
                     f"{_pct(v['throttled'], 2)} | {_pct(v['key_days_alerted'])} of "
                     f"{v['key_days']} | {v['perm_banned']} of {v['keys']} |")
    for k, v in b.by_tag.items():
        lines.append(f"| tag: {k} | {v['events']:,} | {_pct(v['blocked'], 2)} | "
                     f"{_pct(v['throttled'], 2)} | | |")
    lines += ["", *stopped_keys_lines(b.stopped_keys), ""]
    return lines


def stopped_keys_lines(stopped: list[dict[str, Any]], seed: int | None = None) -> list[str]:
    """The legitimate keys blocked (or banned for good), and why, as a Markdown table."""
    if not stopped:
        return ["No legitimate key had an event blocked."]
    head = "| seed " if seed is not None else ""
    lines = [f"{head}| legitimate key | archetype | events | blocked | throttled | banned for "
             "good | first blocked | why (rule: events) |",
             "|---" * (8 + (seed is not None)) + "|"]
    for k in stopped:
        why = ", ".join(f"`{c}` {n:,}" for c, n in k["why"]) or "—"
        lines.append(f"{f'| {seed} ' if seed is not None else ''}| `{k['key']}` | "
                     f"{k['archetype']} | {k['events']:,} | {k['blocked']:,} | "
                     f"{k['throttled']:,} | {'yes' if k['perm_banned'] else 'no'} | "
                     f"{k['first_blocked'] or '—'} | {why} |")
    return lines


# ---- plots -----------------------------------------------------------------------------------
_VERDICT_COLOURS = {0: "#4c9a2a", 1: "#e69f00", 2: "#d62728"}


def write_plots(out_dir: Path, truth: Truth, replayed: Replayed,
                results: dict[str, VariantResult]) -> dict[str, Path]:
    """Score distributions, time to detect by scenario, one incident's timeline.

    Figures are made without pyplot (`matplotlib.figure.Figure`), so writing them never
    switches the caller's backend: a notebook that runs an evaluation keeps its inline
    plots."""
    from matplotlib.figure import Figure

    ts = replayed.ts
    in_test = ts >= truth.test_start
    no_incident = truth.labels["incident_id"].isna().to_numpy()
    attack = ~no_incident & in_test
    legit = no_incident & in_test & ~compromised_mask(truth, ts)
    paths: dict[str, Path] = {}

    # 1. fused score, legitimate vs attack, per variant (+ the raw model scores)
    names = list(results)
    signal_panels = [s for s in SIGNAL_NAMES if "keywatch" in replayed.decisions
                     and not np.isnan(replayed.decisions["keywatch"].signals[s][in_test]).all()]
    panels = len(names) + len(signal_panels)
    cols = min(3, panels)
    rows = math.ceil(panels / cols)
    fig = Figure(figsize=(5 * cols, 3.4 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    bins = np.linspace(0, 1, 41)
    panel_data = [(f"{n}: fused score", replayed.decisions[n].score) for n in names]
    panel_data += [(f"keywatch: {s} model score", replayed.decisions["keywatch"].signals[s])
                   for s in signal_panels]
    for ax, (title, values) in zip(axes.flat, panel_data, strict=False):
        for mask, label, colour in ((legit, "legitimate", "#1f77b4"),
                                    (attack, "attack", "#d62728")):
            v = values[mask]
            v = v[~np.isnan(v)]
            if len(v):
                ax.hist(v, bins=bins, weights=np.full(len(v), 1 / len(v)), alpha=0.6,
                        label=f"{label} ({len(v):,})", color=colour)
        ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("score")
        ax.set_ylabel("share of events")
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panel_data):]:
        ax.axis("off")
    fig.suptitle("Score distributions in the test period: legitimate vs attack")
    fig.tight_layout()
    paths["scores"] = out_dir / "scores.png"
    fig.savefig(paths["scores"], dpi=110)

    # 2. time to detect by scenario and variant
    scenarios = sorted({i["scenario"] for i in truth.test_incidents})
    fig = Figure(figsize=(9, 0.55 * len(scenarios) + 1.8))
    ax = fig.subplots()
    never = 3 * 24 * 60
    markers = {"keywatch": "o", "rules_only": "s", "models_only": "^", "naive": "D"}
    for k, (name, res) in enumerate(results.items()):
        offset = (k - (len(results) - 1) / 2) * 0.16
        for inc in res.incidents:
            y = scenarios.index(inc.scenario) + offset
            x = max(inc.ttd_min, 0.05) if inc.ttd_min is not None else never
            ax.scatter(x, y, marker=markers.get(name, "o") if inc.detected else "x",
                       color=f"C{k}", s=36, label=name if inc is res.incidents[0] else None)
    ax.axvline(2, color="grey", ls="--", lw=1)
    ax.text(2.1, -0.6, "target 2 min", fontsize=8, color="grey")
    ax.axvline(never, color="black", lw=0.8)
    ax.text(never * 0.5, -0.6, "never", fontsize=8)
    ax.set_xscale("log")
    ax.set_yticks(range(len(scenarios)), scenarios)
    ax.set_xlabel("minutes from the incident's first event to its first detection")
    ax.set_title("Time to detect by scenario (× = not detected)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    paths["time_to_detect"] = out_dir / "time_to_detect.png"
    fig.savefig(paths["time_to_detect"], dpi=110)

    # 3. one incident's key over time
    if "keywatch" in replayed.decisions and truth.test_incidents:
        inc = pick_showcase_incident(truth)
        paths["timeline"] = out_dir / "timeline.png"
        plot_incident_timeline(truth, ts, replayed.decisions["keywatch"], inc,
                               paths["timeline"], title_prefix="keywatch")
    return paths


def pick_showcase_incident(truth: Truth) -> dict[str, Any]:
    """A leaked key abroad when there is one (the case the service is named for)."""
    for scenario in ("leaked_key_abroad", "token_drain", "runaway_loop"):
        for inc in truth.test_incidents:
            if inc["scenario"] == scenario:
                return inc
    return truth.test_incidents[0]


def plot_incident_timeline(truth: Truth, ts: np.ndarray, arrays: DecisionArrays,
                           inc: dict[str, Any], path: Path | None = None, *,
                           title_prefix: str = "", margin_s: float = 3 * 3600) -> Any:
    """The victim key's events around one incident: score and verdict over time, the
    owner's own events (dots) apart from the attacker's (triangles).

    Returns the figure (a notebook shows it as a cell's value); writes it to `path` too
    when one is given."""
    import matplotlib.dates as mdates
    from matplotlib.figure import Figure

    keys = truth.labels["key"].to_numpy()
    incident_ids = truth.labels["incident_id"].to_numpy()
    victim = inc["victim_keys"][0]
    lo, hi = inc["start_ts"] - margin_s, inc["end_ts"] + margin_s
    on_key = (keys == victim) & (ts >= lo) & (ts <= hi)
    ours = on_key | ((incident_ids == inc["id"]) & (ts >= lo) & (ts <= hi))
    idx = np.flatnonzero(ours)
    when = pd.to_datetime(ts[idx], unit="s")
    is_attack = incident_ids[idx] == inc["id"]
    fig = Figure(figsize=(11, 5.5))
    ax, ax2 = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for v, label in enumerate(VERDICTS):
        for attack, marker, who in ((False, ".", "owner"), (True, "^", "attacker")):
            m = (arrays.verdict[idx] == v) & (is_attack == attack)
            if m.any():
                ax.scatter(when[m], arrays.score[idx][m], s=14 if attack else 8,
                           marker=marker, color=_VERDICT_COLOURS[v], alpha=0.75,
                           label=f"{who}: {label} ({int(m.sum()):,})")
    for a in (ax, ax2):
        a.axvspan(pd.to_datetime(inc["start_ts"], unit="s"),
                  pd.to_datetime(inc["end_ts"], unit="s"), color="#d62728", alpha=0.07)
    ax.set_ylabel("fused score")
    ax.set_ylim(-0.03, 1.03)
    ax.legend(fontsize=7, ncol=2, loc="upper left")
    title = f"{inc['id']} {inc['scenario']}: key {victim[:12]}…"
    ax.set_title(f"{title_prefix + ': ' if title_prefix else ''}{title} (shaded: the incident)")
    per_min = pd.Series(1, index=when).groupby(
        [pd.Series(is_attack, index=when), pd.Grouper(freq="5min")]).sum()
    for attack, colour, label in ((False, "#1f77b4", "owner"), (True, "#d62728", "attacker")):
        if attack in per_min.index.get_level_values(0):
            series = per_min.xs(attack, level=0)
            ax2.step(series.index, series.values, where="post", color=colour, label=label)
    ax2.set_ylabel("events / 5 min")
    ax2.legend(fontsize=7)
    ax2.xaxis.set_major_formatter(mdates.DateFormatter("%d %H:%M"))
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig
