"""Writes the golden cases that run the SHIPPED default policy (no policy.yaml).

    python -m tests.golden.make_default_policy_cases

Deterministic (fixed seeds), so the files only change when this script does.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
DAY = 86400.0
T0 = 1_794_960_000.0  # a midnight UTC (2026-11-18)
HOME = {"source_ip": "81.2.69.160", "country": "DE", "asn": "Deutsche Telekom AG",
        "user_agent": "OpenAI/Python 1.30.1"}
OFFICE_CLOUD = {"source_ip": "18.194.12.7", "country": "DE", "asn": "Amazon.com, Inc.",
                "user_agent": "python-httpx/0.27"}


def ev(key: str, ts: float, where: dict[str, Any], **kw: Any) -> dict[str, Any]:
    return {"api_key": key, "timestamp": round(ts, 3), "endpoint": "/v1/chat/completions",
            "model": kw.pop("model", "gpt-4o-mini"), **where, **kw}


def daytime(rng: random.Random, key: str, day: int, where: dict[str, Any],
            start_h: float = 8, end_h: float = 20, every_s: float = 120) -> list[dict]:
    out, ts = [], T0 + day * DAY + start_h * 3600
    while ts < T0 + day * DAY + end_h * 3600:
        prompt = int(rng.uniform(300, 1500))
        out.append(ev(key, ts, where, prompt_tokens=prompt,
                      completion_tokens=int(rng.uniform(100, 500)),
                      tokens=0, latency_ms=int(rng.uniform(400, 1500))))
        ts += rng.expovariate(1 / every_s)
    for e in out:
        e["tokens"] = e["prompt_tokens"] + e["completion_tokens"]
    return out


def write(case: str, description: str, events: list[dict], expected: dict) -> None:
    folder = HERE / case
    folder.mkdir(exist_ok=True)
    events.sort(key=lambda e: e["timestamp"])
    (folder / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    (folder / "expected.json").write_text(json.dumps(
        {"description": description, "policy": "default", **expected}, indent=2) + "\n")


def nightly_job() -> None:
    """Daytime chat traffic from the key's own cloud machine for two days, then every
    night at 02:00 a 30-minute batch from the same machine: 40 calls a minute of
    6-12k-token prompts to an expensive model (hundreds of times the key's usual hourly
    spend). The first nights may be throttled and alerted; no night is ever banned, and
    once it came on the two previous nights the job is the key's recurring pattern."""
    rng = random.Random(1)
    events: list[dict] = []
    for day in range(7):
        events += daytime(rng, "sk-nightly", day, OFFICE_CLOUD, every_s=90)
        if day < 2:
            continue
        ts = T0 + day * DAY + 2 * 3600
        while ts < T0 + day * DAY + 2.5 * 3600:
            p = int(rng.uniform(6000, 12000))
            events.append(ev("sk-nightly", ts, OFFICE_CLOUD, model="gpt-4o", prompt_tokens=p,
                             completion_tokens=800, tokens=p + 800, latency_ms=9000,
                             tag="batch", night=day))
            ts += rng.expovariate(40 / 60)
    write("nightly_job_never_banned", nightly_job.__doc__ or "", events, {
        "some": [{"filter": {"tag": "batch", "night": 2}, "decision": "throttle",
                  "at_least": 0.5}],
        "all": [
        {"filter": {"tag": "batch"}, "not_decision": "block"},
        {"filter": {"tag": "batch", "night": 5}, "decision": "allow"},
        {"filter": {"tag": "batch", "night": 6}, "decision": "allow"},
    ]})


def vps_leak() -> None:
    """A developer's key used from home (Deutsche Telekom) in the daytime for three
    days. On the fourth night the developer works late (02:40-03:30, from home) while a
    leaked copy is used from a Hetzner VPS in Germany, with the owner's client library,
    from 03:00: the leak is banned on its address, the owner's own calls go on."""
    rng = random.Random(2)
    events: list[dict] = []
    for day in range(3):
        events += daytime(rng, "sk-dev", day, HOME, every_s=100)
    night = T0 + 3 * DAY
    for e in daytime(rng, "sk-dev", 3, HOME, start_h=2 + 40 / 60, end_h=3.5):
        e["who"] = "owner"
        events.append(e)
    vps = {"source_ip": "88.198.50.12", "country": "DE", "asn": "Hetzner Online GmbH",
           "user_agent": "OpenAI/Python 1.30.1"}
    ts = night + 3 * 3600
    while ts < night + 3 * 3600 + 1200:
        events.append(ev("sk-dev", ts, vps, prompt_tokens=1500, completion_tokens=400,
                         tokens=1900, latency_ms=900, who="intruder"))
        ts += rng.expovariate(1 / 8)
    write("vps_leak_same_country", vps_leak.__doc__ or "", events, {
        "expect_first": [
            {"filter": {"who": "intruder"}, "decision": "block",
             "codes": ["new_network_odd_hour"],
             "action": {"type": "temp_ban", "scope": "ip"}}],
        "all": [
            {"filter": {"who": "intruder"}, "decision": "block"},
            {"filter": {"who": "owner"}, "decision": "allow"},
        ]})


def runaway_loop() -> None:
    """A warm key's own client stuck in a loop: the same 2,000-token prompt every 0.3 s
    for 10 minutes, from the key's usual address and library. Throttled back towards
    the key's normal rate, alerted, never banned."""
    rng = random.Random(3)
    events: list[dict] = []
    for day in range(2):
        events += daytime(rng, "sk-loop", day, HOME, every_s=60)
    ts = T0 + 2 * DAY + 10 * 3600
    for i in range(2000):
        events.append(ev("sk-loop", ts + i * 0.3, HOME, prompt_tokens=2000,
                         completion_tokens=int(rng.uniform(50, 400)), tokens=0,
                         latency_ms=300, tag="loop", n=i))
        events[-1]["tokens"] = 2000 + events[-1]["completion_tokens"]
    write("runaway_loop_throttled", runaway_loop.__doc__ or "", events, {
        "expect_first": [{"filter": {"tag": "loop", "n": 600}, "decision": "throttle",
                          "action": {"type": "throttle", "scope": "key"}}],
        "all": [{"filter": {"tag": "loop"}, "not_decision": "block"}],
        "some": [{"filter": {"tag": "loop"}, "decision": "throttle", "at_least": 0.8}]})


def new_key_heavy_day() -> None:
    """A brand-new key whose first day is its heaviest: a backfill of 60 calls a minute
    for three hours, 4-8k tokens each, from the customer's cloud. Never banned; after
    the first hour it is not even throttled... its first day is judged by the
    population's priors and absolute budgets, not by a baseline it does not have."""
    rng = random.Random(4)
    events: list[dict] = []
    ts = T0 + 9 * 3600
    while ts < T0 + 12 * 3600:
        p = int(rng.uniform(4000, 8000))
        events.append(ev("sk-new", ts, OFFICE_CLOUD, prompt_tokens=p, completion_tokens=500,
                         tokens=p + 500, latency_ms=4000, tag="first_day"))
        ts += rng.expovariate(1.0)
    events += [dict(e, tag="day_two") for e in daytime(rng, "sk-new", 1, OFFICE_CLOUD)]
    write("new_key_heavy_first_day", new_key_heavy_day.__doc__ or "", events, {"all": [
        {"filter": {"tag": "first_day"}, "not_decision": "block"},
        {"filter": {"tag": "day_two"}, "decision": "allow"},
    ], "some": [{"filter": {"tag": "first_day"}, "decision": "allow", "at_least": 0.99}]})


if __name__ == "__main__":
    nightly_job()
    vps_leak()
    runaway_loop()
    new_key_heavy_day()
