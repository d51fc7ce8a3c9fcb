"""The benchmark runs end to end at a tiny size; its numbers are reported, never asserted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.suite import format_report, run_bench


def test_bench_smoke_writes_every_figure_with_its_baseline(
        tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "results.json"
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # the benchmarked service must not use or leave a var/ here
    report = run_bench(size="tiny", out=out, redis_url=redis_url, http=True, rss=True)
    names = {f["name"] for f in report["figures"]}
    assert names >= {"pipeline_memory_events_per_s", "iforest_single_event_per_s",
                     "features_memory_events_per_s", "features_redis_events_per_s",
                     "pipeline_redis_events_per_s", "redis_round_trips_per_event",
                     "http_p99_ms_c1", "http_rps_c16", "http_batch_events_per_s",
                     "rss_mib_after_events", "redis_server_cpu_us_per_event",
                     "redis_server_cpu_us_per_event_scorer",
                     "redis_server_cpu_us_per_event_worker",
                     "redis_events_per_core_second", "redis_bytes_per_warm_key",
                     "redis_bytes_per_address", "memory_bytes_per_warm_key",
                     "memory_bytes_per_address"}
    assert all(f["baseline_value"] > 0 and f["value"] > 0 for f in report["figures"])
    trips = next(f for f in report["figures"] if f["name"] == "redis_round_trips_per_event")
    assert trips["value"] < 1.1  # one round trip per event (the design, not a timing)
    assert json.loads(out.read_text())["figures"] == report["figures"]
    assert "| pipeline_memory_events_per_s |" in format_report(report)
    stages = report["stages"]
    assert [r["stage"] for r in stages] == ["features", "rules", "online", "offline", "store"]
    assert all(r["us_per_event"] >= 0 and r["cumulative_us"] > 0 for r in stages)
    assert "| offline |" in format_report(report)
    assert list(work.iterdir()) == []


def test_redis_unit_costs_measure_every_case(redis_url: str) -> None:
    """The unit-cost benchmark runs each case on a real server and derives every price
    (the numbers are reported, never asserted)."""
    from benchmarks.redis_costs import measure, unit_costs

    rt = measure(redis_url, n=50)
    assert set(rt) == {"get_1", "get_4", "script_4", "fast_1x8", "fast_30x8",
                       "fast_30x270", "hset_1x8", "hset_30x8"}
    assert all(us > 0 for us in rt.values())
    assert set(unit_costs(rt)) == {"round_trip", "command", "script_call", "fast_path_call",
                                   "field_in_script", "kb_in_script", "field_by_hset"}


def test_bench_writes_into_a_checkout_only_when_run_from_one(tmp_path: Path) -> None:
    """Run elsewhere (an installed keywatch), the figures go to a file of their own in the
    current directory, and no `benchmarks/` folder is created there."""
    from serving.cli.bench import CHECKOUT_RESULTS, INSTALLED_RESULTS, default_out

    assert default_out(tmp_path) == INSTALLED_RESULTS
    (tmp_path / "benchmarks").mkdir()
    assert default_out(tmp_path) == CHECKOUT_RESULTS
