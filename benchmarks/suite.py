"""`keywatch bench`: the speed of every path, each as a ratio against a baseline run
alongside it in the same process (these machines are noisy; absolute numbers are not
comparable between runs, ratios are). In-process rates are the median over five
consecutive chunks of the run, so that a burst of other work on the machine moves one chunk
rather than the figure.

Figures:
- full pipeline in process on the memory store (baseline: event validation alone);
- the same on a Redis store, with round trips per event (baseline: the naive approach of
  ~27 sequential Redis calls per event);
- single-event Isolation Forest scoring (baseline: scikit-learn's `score_samples` on one
  row), once a model is trained;
- HTTP `POST /v1/events` p50/p99 at concurrency 1, 16 and 64 on one worker, and the batch
  endpoint's events/s (baseline: a FastAPI endpoint that only parses the event);
- resident memory after many events over many keys and addresses (baseline: before);
- the state store (`benchmarks.state_bench`): Redis server CPU per event, events one Redis
  core serves per CPU second from several clients, bytes per warm key and per address in
  Redis and in the memory store (baseline: the previous layout, `benchmarks/old_layout`).
- retrain feature building with the vectorised twin on simulated traffic (baseline: the
  event-by-event replay through the streaming extractor), see `benchmarks.twin_bench`.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from features.contract import Event
from features.extractor import FEATURE_NAMES
from features.keys import KeyHasher
from features.stores.base import StateStore
from features.stores.local_server import redis_url_or_local
from features.stores.memory import MemoryStore
from models.detectors import build_detectors
from models.feature_space import model_features
from models.offline import OfflineDetector
from serving.engine.scorer import Scorer

REPO_ROOT = Path(__file__).resolve().parents[1]
"""Where the benchmarked servers import keywatch and the parse-only baseline from (the
checkout, or the installed packages' directory)."""

BENCH_SECRET = "keywatch-benchmark-secret-0123456789"
T0 = 1_794_999_960.0

SIZES: dict[str, dict[str, int]] = {
    "tiny": {"pipeline": 600, "stages": 600, "redis": 200, "naive": 50, "iforest": 200,
             "http": 60, "batch": 500, "rss_events": 2_000, "rss_keys": 200,
             "state_keys": 1, "state_days": 0.5, "capacity": 200},
    "smoke": {"pipeline": 2_000, "stages": 2_000, "redis": 500, "naive": 100, "iforest": 500,
              "http": 200, "batch": 2_000, "rss_events": 20_000, "rss_keys": 2_000,
              "state_keys": 2, "state_days": 8, "capacity": 1_000},
    "full": {"pipeline": 50_000, "stages": 20_000, "redis": 10_000, "naive": 1_000,
             "iforest": 50_000, "http": 3_000, "batch": 50_000, "rss_events": 1_000_000,
             "rss_keys": 100_000, "state_keys": 6, "state_days": 8, "capacity": 3_000},
}


@dataclass(slots=True)
class Figure:
    name: str
    value: float
    unit: str
    baseline_name: str
    baseline_value: float
    target: str = ""
    higher_is_better: bool = True

    @property
    def ratio(self) -> float:
        if not self.baseline_value:
            return float("nan")
        return self.value / self.baseline_value

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "value": round(self.value, 3), "unit": self.unit,
                "baseline": self.baseline_name, "baseline_value": round(self.baseline_value, 3),
                "ratio": round(self.ratio, 3), "target": self.target}


def synthetic_payloads(n: int, *, keys: int = 2_000, ips: int = 5_000, seed: int = 0,
                       unique_ips: bool = False) -> list[dict[str, Any]]:
    """Plausible gateway traffic: many keys, each from a few addresses, varied sizes."""
    rng = np.random.default_rng(seed)
    key_of = rng.integers(0, keys, n)
    ip_of = np.arange(n) if unique_ips else (key_of * 7 + rng.integers(0, 3, n)) % ips
    tokens = rng.lognormal(6.0, 1.0, n).astype(int)
    latency = rng.lognormal(6.5, 0.5, n)
    status = rng.choice([200, 200, 200, 200, 200, 200, 200, 200, 429, 401], n)
    ts = T0 + np.cumsum(rng.exponential(0.01, n))
    models = ["gpt-4o-mini", "gpt-4o", "claude-3-5-sonnet"]
    out = []
    for i in range(n):
        ip_n = int(ip_of[i])
        out.append({
            "api_key": f"sk-bench-{int(key_of[i]):06d}", "timestamp": float(ts[i]),
            "endpoint": "/v1/chat/completions", "status": int(status[i]),
            "tokens": int(tokens[i]), "latency_ms": float(latency[i]),
            "source_ip": f"{11 + ip_n // 65536 % 200}.{ip_n // 256 % 256}.{ip_n % 256}.9",
            "user_agent": "openai-python/1.54.3", "model": models[int(key_of[i]) % 3],
        })
    return out


def _rate(fn: Callable[[], int]) -> float:
    t0 = time.perf_counter()
    count = fn()
    return count / (time.perf_counter() - t0)


CHUNKS = 5


def _median_rate(items: list[Any], step: Callable[[Any], object]) -> float:
    """events/s of `step` over `items`, as the median over consecutive chunks: a burst of
    work elsewhere on a shared machine slows one chunk, not the figure."""
    size = max(1, len(items) // CHUNKS)
    rates = []
    for start in range(0, len(items) - size + 1, size):
        chunk = items[start:start + size]
        t0 = time.perf_counter()
        for item in chunk:
            step(item)
        rates.append(len(chunk) / (time.perf_counter() - t0))
    return float(np.median(rates))


def make_scorer(store: StateStore, *, models: bool = True) -> Scorer:
    """The full pipeline: features, the online population model and per-key baselines,
    an offline forest when one is given, rules and fusion."""
    detectors = None
    if models:
        detectors = build_detectors(model_dir=None, checkpoint=None,
                                    feature_names=model_features(FEATURE_NAMES))
    return Scorer(store=store, hasher=KeyHasher(BENCH_SECRET), detectors=detectors)


def bench_pipeline(events: list[Event], store: StateStore, *,
                   offline: OfflineDetector | None = None) -> float:
    scorer = make_scorer(store)
    if offline is not None and scorer.detectors is not None:
        scorer.detectors.offline, scorer.detectors.offline_version = offline, "bench"
    return bench_scorer(events, scorer)


STAGES = (
    ("features", "features alone (plan, store, build, learn)"),
    ("rules", "+ key id, ban reads, rules, fusion, response, decision"),
    ("online", "+ online models (population, per-key baselines)"),
    ("offline", "+ offline Isolation Forest (the full pipeline)"),
)
STORE_STAGE = ("store", "of the full pipeline: the memory store's operations")


class TimedMemoryStore(MemoryStore):
    """A memory store that counts the thread CPU time spent in its operations: how much of
    an event's cost is the state store's (every stage's operations together) and how much
    the Python around it."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.cpu_s = 0.0

    def execute(self, requests: Any) -> list[list[Any]]:
        t0 = time.thread_time()
        try:
            return super().execute(requests)
        finally:
            self.cpu_s += time.thread_time() - t0


def bench_stages(events: list[Event], offline: OfflineDetector) -> list[dict[str, Any]]:
    """Where an event's time goes: the pipeline built up one stage at a time on the memory
    store, each stage's marginal cost in microseconds of CPU.

    The four builds run side by side, each on a store of its own: every chunk of events is
    timed on all four in turn (the order rotating), so a slow spell on a shared machine
    lands on every stage rather than on whichever was measured then. Costs are medians
    over the chunks of the thread's CPU time, which a descheduled process does not
    accrue; the differences of medians can still read slightly off, never below zero.
    A last row, `store`, is the part of the full pipeline's cost spent inside the memory
    store's operations (its `cumulative_us` is the full pipeline's, for comparison)."""
    from features.extractor import FeatureExtractor, FeatureStream

    hasher = KeyHasher(BENCH_SECRET)
    stream = FeatureStream(MemoryStore(), FeatureExtractor())

    def features_step(e: Event) -> None:
        stream.learn(stream.process(e, hasher.key_id(e.api_key)))

    store = TimedMemoryStore()
    full = make_scorer(store)
    if full.detectors is not None:
        full.detectors.offline, full.detectors.offline_version = offline, "bench"
    steps: dict[str, Callable[[Event], object]] = {
        "features": features_step,
        "rules": Scorer(store=MemoryStore(), hasher=hasher, detectors=None).score,
        "online": make_scorer(MemoryStore()).score,
        "offline": full.score,
    }
    warm, timed = events[:200], events[200:]
    for step in steps.values():
        for e in warm:
            step(e)
    size = max(1, len(timed) // (2 * CHUNKS))
    costs: dict[str, list[float]] = {name: [] for name in (*steps, STORE_STAGE[0])}
    names = list(steps)
    for n, start in enumerate(range(0, len(timed) - size + 1, size)):
        chunk = timed[start:start + size]
        for name in names[n % len(names):] + names[:n % len(names)]:
            step = steps[name]
            in_store = store.cpu_s
            t0 = time.thread_time()
            for e in chunk:
                step(e)
            costs[name].append((time.thread_time() - t0) / len(chunk) * 1e6)
            if name == "offline":
                costs[STORE_STAGE[0]].append((store.cpu_s - in_store) / len(chunk) * 1e6)
    rows, before = [], 0.0
    for name, what in STAGES:
        total = float(np.median(costs[name]))
        rows.append({"stage": name, "what": what,
                     "us_per_event": round(max(0.0, total - before), 1),
                     "cumulative_us": round(total, 1)})
        before = total
    in_store = float(np.median(costs[STORE_STAGE[0]]))
    rows.append({"stage": STORE_STAGE[0], "what": STORE_STAGE[1],
                 "us_per_event": round(in_store, 1), "cumulative_us": round(before, 1)})
    return rows


def bench_scorer(events: list[Event], scorer: Scorer) -> float:
    for e in events[:200]:  # warm-up
        scorer.score(e)
    return _median_rate(events, scorer.score)


def bench_validation(payloads: list[dict[str, Any]]) -> float:
    return _median_rate(payloads, Event.model_validate)


def fit_bench_forest(events: list[Event]) -> OfflineDetector:
    """An offline model fitted on the benchmark traffic's own features."""
    from features.batch import batch_features
    from models.feature_space import frame_to_model_space

    names = model_features(FEATURE_NAMES)
    import pandas as pd

    frame = pd.DataFrame([{**e.model_dump(), "api_key": e.api_key} for e in events])
    feats = frame_to_model_space(batch_features(frame, hasher=KeyHasher(BENCH_SECRET)), names)
    return OfflineDetector().fit(feats, names, random_state=0)


def bench_iforest(n_features: int, n: int) -> tuple[float, float]:
    """Single-event scoring: the compact evaluator against scikit-learn's score_samples,
    on the same fitted forest (100 trees of 256 samples, as the retrain job fits)."""
    from sklearn.ensemble import IsolationForest

    from models.compact_forest import CompactForest

    rng = np.random.default_rng(1)
    sklearn_forest = IsolationForest(n_estimators=100, max_samples=256, random_state=0)
    sklearn_forest.fit(rng.normal(size=(5000, n_features)))
    compact = CompactForest.from_sklearn(sklearn_forest)
    X = rng.normal(size=(n, n_features))
    rows = [list(map(float, r)) for r in X]

    def run_compact() -> int:
        for r in rows:
            compact.score_samples_one(r)
        return len(rows)

    def run_sklearn() -> int:
        for r in X[: max(20, n // 200)]:
            sklearn_forest.score_samples(r.reshape(1, -1))
        return max(20, n // 200)

    return _rate(run_compact), _rate(run_sklearn)


HTTP_ROUNDS = 5


def bench_http(sizes: dict[str, int], payloads: list[dict[str, Any]]) -> list[Figure]:
    """Both servers run side by side and each concurrency level alternates between them in
    `HTTP_ROUNDS` rounds, so a slow spell on the machine lands on both, not on one figure.
    Each server is sent every body at most once, in order, so keywatch never sees an event
    twice or a timestamp go backwards."""
    from benchmarks.http_load import LoadResult, json_bodies, run_load
    from features.stores.local_server import free_port

    figures: list[Figure] = []
    # A data directory of its own: the service starts fresh (no checkpoint or snapshot of
    # an earlier run is restored) and leaves nothing behind in the caller's.
    data_dir = tempfile.TemporaryDirectory(prefix="keywatch-bench-")
    env = {**os.environ, "KEYWATCH_SECRET": BENCH_SECRET, "KEYWATCH_EVENT_LOG": "false",
           "KEYWATCH_DATA_DIR": data_dir.name}
    targets = {
        "baseline": "benchmarks.parse_only_app:app",
        "keywatch": "serving.api.app:app_from_env",
    }
    ports: dict[str, int] = {}
    procs: list[subprocess.Popen[bytes]] = []
    results: dict[str, dict[int, LoadResult]] = {name: {} for name in targets}
    bodies = json_bodies(payloads)
    sent = dict.fromkeys(targets, 0)
    try:
        for name, target in targets.items():
            ports[name] = port = free_port()
            cmd = [sys.executable, "-m", "uvicorn", target, "--app-dir", str(REPO_ROOT),
                   "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
                   "--no-access-log"]
            if name == "keywatch":
                cmd.append("--factory")
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))
        for name in targets:
            _wait_port(ports[name])
            run_load("127.0.0.1", ports[name], "/v1/events", bodies, total=200, concurrency=4)
            sent[name] = 200
        per_round = max(1, sizes["http"] // HTTP_ROUNDS)
        for conc in (1, 16, 64):
            parts: dict[str, list[LoadResult]] = {name: [] for name in targets}
            for r in range(HTTP_ROUNDS):
                for name in (targets if r % 2 == 0 else reversed(list(targets))):
                    parts[name].append(run_load(
                        "127.0.0.1", ports[name], "/v1/events", bodies, total=per_round,
                        concurrency=conc, start=sent[name]))
                    sent[name] += per_round
            for name in targets:
                results[name][conc] = LoadResult.merge(parts[name])
        fresh = payloads[sent["keywatch"]:sent["keywatch"] + sizes["batch"]]
        batch = [fresh[i:i + 500] for i in range(0, len(fresh), 500)]
        body = json_bodies([{"events": b} for b in batch])
        res = run_load("127.0.0.1", ports["keywatch"], "/v1/events:batch", body,
                       total=len(batch), concurrency=2)
        batch_rate = len(fresh) / res.seconds
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=10)
        data_dir.cleanup()
    base, kw = results["baseline"], results["keywatch"]
    figures.append(Figure("http_p99_ms_c1", kw[1].pct(99), "ms", "parse-only p99 c1",
                          base[1].pct(99), "<= 5 ms", higher_is_better=False))
    figures.append(Figure("http_p50_ms_c1", kw[1].pct(50), "ms", "parse-only p50 c1",
                          base[1].pct(50), "", higher_is_better=False))
    for conc in (16, 64):
        figures.append(Figure(f"http_rps_c{conc}", kw[conc].rps, "req/s",
                              f"parse-only c{conc}", base[conc].rps,
                              ">= 0.6 x baseline" if conc == 16 else ""))
        figures.append(Figure(f"http_p99_ms_c{conc}", kw[conc].pct(99), "ms",
                              f"parse-only p99 c{conc}", base[conc].pct(99), "",
                              higher_is_better=False))
    errors = sum(r.errors for r in kw.values())
    figures.append(Figure("http_batch_events_per_s", batch_rate, "events/s",
                          "single-event req/s c16", kw[16].rps, ">= 10,000"))
    if errors:
        figures.append(Figure("http_errors", errors, "count", "requests", sizes["http"] * 3))
    return figures


def _wait_port(port: int, timeout_s: float = 30.0) -> None:
    import socket

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"server on port {port} did not start")


def rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def bench_rss(n_events: int, n_keys: int) -> Figure:
    """Resident memory after n_events over n_keys keys, every event from a new address."""
    gc.collect()
    before = rss_mib()
    scorer = make_scorer(MemoryStore())
    chunk = 20_000
    for start in tqdm(range(0, n_events, chunk), desc="rss", unit="chunk", leave=False):
        payloads = synthetic_payloads(min(chunk, n_events - start), keys=n_keys,
                                      seed=start, unique_ips=True)
        for j, p in enumerate(payloads):
            n = start + j
            p["source_ip"] = f"{11 + n // 65536 % 200}.{n // 256 % 256}.{n % 256}.{n % 7}"
            p["timestamp"] = T0 + n * 0.01
            scorer.score(Event.model_validate(p))
    gc.collect()
    return Figure("rss_mib_after_events", rss_mib(), "MiB", "rss before", before,
                  f"{n_events:,} events, {n_keys:,} keys, {n_events:,} addresses",
                  higher_is_better=False)


def state_figures(sizes: dict[str, int], redis_url: str) -> list[Figure]:
    """The state store's figures, each against the previous layout in the same run."""
    from benchmarks.state_bench import run_state_bench

    res = run_state_bench(redis_url, n_keys=sizes["state_keys"], days=sizes["state_days"],
                          capacity_events=sizes["capacity"], echo=lambda _line: None)
    new, old = res["new"], res["old"]
    base = "previous layout, same run"
    figures = [Figure("redis_server_cpu_us_per_event", new["server_cpu_us_per_event"], "µs",
                      base, old["server_cpu_us_per_event"], "<= 100", higher_is_better=False),
               Figure("redis_server_cpu_us_per_event_vs_ops_in_script",
                      new["server_cpu_us_per_event"], "µs",
                      "entity copies off: every call's ops applied in the script, same run",
                      res["ops_in_lua"]["server_cpu_us_per_event"], "<= 100",
                      higher_is_better=False),
               Figure("redis_server_cpu_us_per_event_scorer",
                      res["scorer_cpu_us_per_event"]["new"], "µs",
                      "full scorer, event ids claimed in the script, same run",
                      res["scorer_cpu_us_per_event"]["claims_in_script"], "<= 100",
                      higher_is_better=False),
               Figure("redis_server_cpu_us_per_event_worker",
                      res["worker_cpu_us_per_event"]["new"], "µs",
                      "stream worker, every call of a once scope in the script, same run",
                      res["worker_cpu_us_per_event"]["once_in_script"], "<= 100",
                      higher_is_better=False),
               Figure("redis_round_trip_floor_us", res["round_trip_floor_us"], "µs",
                      "server CPU per event, same run", new["server_cpu_us_per_event"],
                      "the transport's share of the figure above", higher_is_better=False),
               Figure("redis_events_per_core_second", new["events_per_redis_core_s"],
                      "events/s", base, old["events_per_redis_core_s"], ">= 10,000")]
    for name, target in (("redis_bytes_per_warm_key", "<= 16,384"),
                         ("redis_bytes_per_address", "<= 1,024"),
                         ("memory_bytes_per_warm_key", "<= 16,384"),
                         ("memory_bytes_per_address", "<= 1,024")):
        figures.append(Figure(name, new[name], "bytes", base, old[name], target,
                              higher_is_better=False))
    return figures


def run_bench(*, size: str = "smoke", out: Path | None = None,
              redis_url: str | None = None, http: bool = True,
              rss: bool = True) -> dict[str, Any]:
    sizes = SIZES[size]
    figures: list[Figure] = []
    payloads = synthetic_payloads(sizes["pipeline"])
    events = [Event.model_validate(p) for p in payloads]

    from benchmarks.features_bench import run_all

    validation = bench_validation(payloads)
    forest = fit_bench_forest(events[: min(len(events), 20_000)])
    memory = bench_pipeline(events, MemoryStore(), offline=forest)
    figures.append(Figure("pipeline_memory_events_per_s", memory, "events/s",
                          "event validation alone", validation, ">= 10,000"))
    stages = bench_stages(events[: sizes["stages"]], forest)
    compact, sklearn_rate = bench_iforest(len(forest.feature_names_), sizes["iforest"])
    figures.append(Figure("iforest_single_event_per_s", compact, "events/s",
                          "scikit-learn score_samples, one row", sklearn_rate, ">= 20,000"))
    from benchmarks.twin_bench import figure as retrain_features_figure

    figures.append(retrain_features_figure(size))

    with redis_url_or_local(redis_url) as redis_url:
        from features.stores.redis_store import RedisStore

        feats = run_all(sizes["pipeline"], redis_url, n_redis_events=sizes["redis"],
                        echo=lambda _line: None)
        figures.append(Figure("features_memory_events_per_s",
                              feats["memory"]["events_per_s"], "events/s",
                              "features on Redis", feats["redis"]["events_per_s"], ">= 20,000"))
        figures.append(Figure("features_redis_events_per_s", feats["redis"]["events_per_s"],
                              "events/s", "naive sequential calls",
                              feats["naive"]["events_per_s"], ">= 2,000"))
        store = RedisStore(redis_url, namespace="bench")
        redis_events = events[: sizes["redis"]]
        before = store.round_trips
        redis_rate = bench_pipeline(redis_events, store, offline=forest)
        trips = (store.round_trips - before) / (len(redis_events) + 200)
        figures.append(Figure("pipeline_redis_events_per_s", redis_rate, "events/s",
                              "naive sequential calls (features only)",
                              feats["naive"]["events_per_s"], ">= 2,000"))
        figures.append(Figure("redis_round_trips_per_event", trips, "round trips",
                              "naive calls per event",
                              feats["naive"]["round_trips_per_event"], "1",
                              higher_is_better=False))
        store.close()
        figures.extend(state_figures(sizes, redis_url))

    if http:
        # every HTTP request carries a new event: warm-up, three concurrency levels, batches
        figures.extend(bench_http(sizes, synthetic_payloads(
            200 + 3 * sizes["http"] + sizes["batch"], seed=1)))
    if rss:
        figures.append(bench_rss(sizes["rss_events"], sizes["rss_keys"]))

    report = {
        "size": size,
        "machine": _machine(),
        "figures": [f.as_dict() for f in figures],
        "stages": stages,
    }
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def run_state_only(*, size: str = "full", out: Path | None = None,
                   redis_url: str | None = None) -> dict[str, Any]:
    """Only the state store's figures; merged into `out` (figures of the same name are
    replaced, the others kept as they were measured)."""
    with redis_url_or_local(redis_url) as redis_url:
        figures = [f.as_dict() for f in state_figures(SIZES[size], redis_url)]
    report: dict[str, Any] = {"size": size, "figures": []}
    if out is not None and out.exists():
        report = json.loads(out.read_text())
    names = {f["name"] for f in figures}
    report["figures"] = [f for f in report["figures"] if f["name"] not in names] + figures
    report["machine"] = _machine()
    report["state_size"] = size
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def _machine() -> dict[str, Any]:
    return {"python": platform.python_version(), "cpus": os.cpu_count(),
            "platform": platform.platform(), "processor": platform.machine()}


def format_report(report: dict[str, Any]) -> str:
    lines = ["| figure | value | baseline | baseline value | ratio | target |",
             "|---|---|---|---|---|---|"]
    for f in report["figures"]:
        lines.append(f"| {f['name']} | {f['value']:,} {f['unit']} | {f['baseline']} | "
                     f"{f['baseline_value']:,} | {f['ratio']}x | {f['target']} |")
    if report.get("stages"):
        lines += ["", "| stage | adds | µs/event | cumulative µs/event |", "|---|---|---|---|"]
        lines += [f"| {r['stage']} | {r['what']} | {r['us_per_event']} | "
                  f"{r['cumulative_us']} |" for r in report["stages"]]
    return "\n".join(lines)
