"""What the features say about the situations keywatch exists for.

Each test feeds a small, readable history through the streaming extractor on the memory
store and checks the features a rule or a model will rely on.
"""

from __future__ import annotations

import math
import random
import time

import pandas as pd

from features.batch import batch_features
from features.contract import Event
from features.extractor import FEATURE_NAMES, FeatureStream, FeatureVector
from features.keys import KeyHasher
from features.stores.base import RECENT_ADD, EntityOps
from features.stores.memory import MemoryStore

T0 = 1_767_571_200.0  # Monday 2026-01-05 00:00:00Z


def run(events: list[dict], stream: FeatureStream | None = None) -> list[FeatureVector]:
    stream = stream or FeatureStream(MemoryStore())
    out = []
    for e in events:
        e = {"api_key": "sk-a", **e}
        fv = stream.process(Event(**e), "k_" + e["api_key"])
        stream.learn(fv)
        out.append(fv)
    return out


def test_vector_has_every_feature_in_schema_order_and_is_finite() -> None:
    fv = run([{"timestamp": T0, "source_ip": "81.2.69.160", "tokens": 12}])[0]
    assert tuple(fv.values) == FEATURE_NAMES
    assert len(set(FEATURE_NAMES)) == len(FEATURE_NAMES)
    assert all(math.isfinite(x) for x in fv.values.values())
    assert fv.as_list() == [fv.values[n] for n in FEATURE_NAMES]


def test_impossible_travel_singapore_to_germany() -> None:
    fvs = run([
        {"timestamp": T0, "source_ip": "10.0.0.1", "country": "SG", "asn": "AS7473"},
        {"timestamp": T0 + 360, "source_ip": "5.9.0.1"},  # Hetzner, Germany, 6 min later
    ])
    first, second = fvs
    assert first.values["geo_speed_kmh_by_key"] == 0.0  # no previous location
    assert first.values["new_country_by_key"] == 0.0  # the key's first located event
    v, c = second.values, second.context
    assert 10_000 < v["geo_distance_km_by_key"] < 10_400
    assert v["geo_elapsed_s_by_key"] == 360.0
    assert v["geo_speed_kmh_by_key"] > 90_000  # far beyond an airliner
    assert v["new_country_by_key"] == 1.0 and v["new_asn_by_key"] == 1.0
    assert v["hosting_asn_by_event"] == 1.0
    assert v["distinct_countries_by_key_1h"] == 2.0
    assert (c["prev_country"], c["prev_country_name"]) == ("SG", "Singapore")
    assert (c["country"], c["country_name"]) == ("DE", "Germany")
    assert c["prev_seen_ts"] == T0 and c["lat"] is not None and c["lon"] is not None


def test_a_leak_used_alongside_its_owner_stays_far_from_the_trusted_location() -> None:
    """The owner (GB) carries on while a leaked copy is used from Germany. Only the
    owner's events are judged normal (learned): every German event, not just the first,
    is measured against the owner's fresh location, in a country never trusted."""
    stream = FeatureStream(MemoryStore())
    out = []
    for i in range(12):
        attacker = i % 3 == 2
        ip = "5.9.0.1" if attacker else "81.2.69.160"
        fv = stream.process(Event(api_key="sk-a", timestamp=T0 + 60 * i, source_ip=ip),
                            "k_a")
        if not attacker:
            stream.learn(fv)
        out.append((attacker, fv))
    for attacker, fv in out[3:]:
        v = fv.values
        if attacker:
            assert v["trusted_geo_distance_km_by_key"] > 500
            assert v["trusted_geo_elapsed_s_by_key"] == 60.0
            assert v["trusted_geo_speed_kmh_by_key"] > 1000
            assert v["untrusted_country_by_key"] == 1.0
            assert fv.context["trusted_country"] == "GB"
        else:
            assert v["trusted_geo_distance_km_by_key"] == 0.0
            assert v["untrusted_country_by_key"] == 0.0
    assert out[-1][1].values["countries_seen_by_key"] == 2.0


def test_a_traveller_becomes_trusted_at_the_destination() -> None:
    """GB, then Singapore 14 hours later (a flight): possible, learned, and from then on
    Singapore is the reference and a trusted country."""
    fvs = run([
        {"timestamp": T0, "source_ip": "81.2.69.160"},
        {"timestamp": T0 + 14 * 3600, "source_ip": "10.0.0.1", "country": "SG",
         "asn": "AS7473"},
        {"timestamp": T0 + 14 * 3600 + 60, "source_ip": "10.0.0.1", "country": "SG",
         "asn": "AS7473"},
    ])
    arrival, after = fvs[1].values, fvs[2].values
    assert arrival["trusted_geo_speed_kmh_by_key"] < 1000
    assert arrival["untrusted_country_by_key"] == 1.0
    assert after["trusted_geo_distance_km_by_key"] == 0.0
    assert after["untrusted_country_by_key"] == 0.0


def test_a_datacenter_network_is_untrusted_for_a_key_that_never_used_one() -> None:
    """A key used only from a residential network; then from a hosting network (Hetzner)
    twice, the first time judged normal. The hosting network is untrusted until then, and
    the key's hosting share says its normal traffic never came from a datacenter."""
    home = {"source_ip": "81.2.69.160", "country": "GB", "asn": "AS5089"}
    vps = {"source_ip": "5.9.0.1"}
    fvs = run([{"timestamp": T0 + 60 * i, **home} for i in range(40)]
              + [{"timestamp": T0 + 3000, **vps}, {"timestamp": T0 + 3060, **vps}])
    assert fvs[39].values["hosting_share_by_key"] == 0.0
    assert fvs[39].values["untrusted_hosting_asn_by_event"] == 0.0
    first, second = fvs[40].values, fvs[41].values
    assert first["hosting_asn_by_event"] == 1.0
    assert first["untrusted_hosting_asn_by_event"] == 1.0
    assert second["untrusted_hosting_asn_by_event"] == 0.0  # learned from the first
    assert 0.0 < second["hosting_share_by_key"] < 0.05


def test_many_server_addresses_in_one_country_are_not_travel() -> None:
    ips = ["81.2.69.160", "81.2.69.161", "81.2.69.190", "81.2.70.1"]
    fvs = run([{"timestamp": T0 + i, "source_ip": ips[i % 4]} for i in range(12)])
    assert all(f.values["geo_distance_km_by_key"] == 0.0 for f in fvs)
    assert all(f.values["geo_speed_kmh_by_key"] == 0.0 for f in fvs)
    assert fvs[-1].values["distinct_ips_by_key_1h"] == 4.0
    assert fvs[-1].values["distinct_countries_by_key_1h"] == 1.0


def test_speed_uses_at_least_a_minute_and_private_addresses_never_travel() -> None:
    fvs = run([
        {"timestamp": T0, "source_ip": "81.2.69.160"},  # GB
        {"timestamp": T0 + 1, "source_ip": "192.168.1.4"},  # internal proxy: no location
        {"timestamp": T0 + 2, "source_ip": "5.9.0.1"},  # DE, 2 s after GB
    ])
    assert fvs[1].values["geo_distance_km_by_key"] == 0.0
    d = fvs[2].values["geo_distance_km_by_key"]
    assert d > 500
    assert fvs[2].values["geo_speed_kmh_by_key"] == d / 60 * 3600  # not d / 2 s


def test_a_runaway_loop_is_metronomic_and_human_traffic_is_not() -> None:
    loop = run([{"timestamp": T0 + 2.0 * i, "tokens": 500} for i in range(60)])[-1]
    rng = random.Random(3)
    ts, human_events = T0, []
    for _ in range(60):
        ts += rng.expovariate(1 / 30)
        human_events.append({"api_key": "sk-h", "timestamp": ts, "tokens": rng.randint(1, 900)})
    human = run(human_events)[-1]
    assert loop.values["interarrival_cv_by_key"] < 0.05
    assert abs(loop.values["interarrival_mean_s_by_key"] - 2.0) < 1e-6
    assert loop.values["same_size_ratio_by_key"] > 0.95
    assert human.values["interarrival_cv_by_key"] > 0.4
    assert human.values["same_size_ratio_by_key"] < 0.2
    fresh = run([{"timestamp": T0}, {"timestamp": T0 + 5}])[-1]
    assert fresh.values["interarrival_cv_by_key"] == 1.0  # unknown until enough gaps


def test_a_retry_loop_repeats_its_prompt_while_answers_vary() -> None:
    """The same 800-token prompt every 2 s with answers of any length: the total sizes
    differ, the prompt sizes do not. After two ordinary hours (30 requests each) the last
    5 minutes run far above the key's usual rate."""
    rng = random.Random(5)
    events = [{"timestamp": T0 + 120.0 * i, "prompt_tokens": rng.randint(100, 3000),
               "completion_tokens": 50, "tokens": 0} for i in range(60)]
    start = T0 + 2 * 3600
    for i in range(150):
        c = rng.randint(20, 700)
        events.append({"timestamp": start + 2.0 * i, "prompt_tokens": 800,
                       "completion_tokens": c, "tokens": 800 + c})
    fvs = run(events)
    assert fvs[59].values["same_prompt_ratio_by_key"] < 0.2
    assert fvs[59].values["rate_vs_baseline_by_key_5m"] < 2
    last = fvs[-1].values
    assert last["same_prompt_ratio_by_key"] > 0.95
    assert last["same_size_ratio_by_key"] < 0.2
    assert last["rate_vs_baseline_by_key_5m"] > 5  # the loop still far above its usual rate


def test_novelty_of_endpoint_user_agent_and_model() -> None:
    base = {"endpoint": "/v1/chat", "user_agent": "sdk/1", "model": "gpt-4o"}
    fvs = run([
        {"timestamp": T0, **base},
        {"timestamp": T0 + 10, **base},
        {"timestamp": T0 + 20, **base, "endpoint": "/v1/admin", "user_agent": "curl/8",
         "model": "o1"},
        {"timestamp": T0 + 30, **base, "endpoint": "/v1/admin"},
    ])
    novelty = ["new_endpoint_by_key", "new_user_agent_by_key", "new_model_by_key"]
    assert [fvs[0].values[n] for n in novelty] == [0.0, 0.0, 0.0]  # a new key is not novel
    assert [fvs[1].values[n] for n in novelty] == [0.0, 0.0, 0.0]
    assert [fvs[2].values[n] for n in novelty] == [1.0, 1.0, 1.0]
    assert [fvs[3].values[n] for n in novelty] == [0.0, 0.0, 0.0]
    assert fvs[3].values["distinct_models_by_key_24h"] == 2.0


def test_prompt_completion_ratio() -> None:
    fv = run([{"timestamp": T0, "prompt_tokens": 20_000, "completion_tokens": 5}])[0]
    assert fv.values["prompt_completion_ratio_by_event"] == math.log1p(20_000) - math.log1p(5)
    assert run([{"timestamp": T0, "tokens": 9}])[0].values[
        "prompt_completion_ratio_by_event"] == 0.0


def test_credential_stuffing_counts_failed_keys_per_address() -> None:
    events = [{"api_key": f"sk-guess-{i}", "timestamp": T0 + i, "source_ip": "203.0.113.50",
               "status": 401} for i in range(25)]
    events.append({"api_key": "sk-real", "timestamp": T0 + 30, "source_ip": "203.0.113.50"})
    last = run(events)[-1]
    assert last.values["distinct_failed_keys_by_ip_1h"] == 25.0
    assert last.values["distinct_keys_by_ip_1h"] == 26.0
    assert last.values["auth_fail_count_by_ip_5m"] == 25.0


def test_an_upstream_outage_is_not_the_keys_failure() -> None:
    """5xx are the provider's failures: a key caught in an outage shows no failure ratio,
    while the same key sending bad requests (4xx) does."""
    outage = run([{"timestamp": T0 + i, "status": 503} for i in range(30)])[-1]
    assert outage.values["errors_count_by_key_5m"] == 0.0
    assert outage.values["failure_ratio_by_key_5m"] == 0.0
    bad = run([{"timestamp": T0 + i, "status": [400, 404, 429, 401][i % 4]}
               for i in range(30)])[-1]
    assert bad.values["errors_count_by_key_5m"] == 30.0
    assert bad.values["failure_ratio_by_key_5m"] == 1.0
    assert bad.values["auth_fail_count_by_key_5m"] == 7.0  # 401 only


def test_request_size_is_judged_against_the_keys_largest_normal_request_of_the_day() -> None:
    """The bar is the largest request of the key's normal traffic in hours that ended at
    least an hour ago: a stream of stuffed prompts, even if every one of them were learned,
    cannot raise it for two hours; flagged (unlearned) ones never do; no history is
    neutral."""
    def sizes(i: int) -> int:
        return 400 + (i * 37) % 2_600  # 400..2,999 tokens

    fresh = run([{"timestamp": T0, "tokens": 50_000}])[-1]
    assert fresh.values["tokens_vs_peak_by_key_24h"] == 1.0
    assert fresh.values["tokens_peak_by_key_24h"] == 0.0
    ratios: dict[str, list[float]] = {}
    for learned in ("flagged", "learned"):
        stream = FeatureStream(MemoryStore())
        history = [{"timestamp": T0 + i * 600.0, "tokens": sizes(i)} for i in range(288)]
        run(history, stream)
        ts = T0 + 288 * 600.0
        usual = run([{"timestamp": ts, "tokens": 2_500}], stream)[-1]
        assert usual.values["tokens_peak_by_key_24h"] == max(
            sizes(i) for i in range(288) if T0 + i * 600.0 >= (ts // 3600 - 24) * 3600)
        assert usual.values["tokens_vs_peak_by_key_24h"] < 1.0
        ratios[learned] = []
        for i in range(450):  # 40,000-token prompts every 24 s for three hours
            fv = stream.process(Event(api_key="sk-a", timestamp=ts + 30 + i * 24.0,
                                      tokens=40_000), "k_sk-a")
            if learned == "learned":
                stream.learn(fv)
            ratios[learned].append(fv.values["tokens_vs_peak_by_key_24h"])
    assert min(ratios["flagged"]) > 13  # 40,000 / 2,999
    first_two_hours = slice(0, 298)
    assert ratios["learned"][first_two_hours] == ratios["flagged"][first_two_hours]
    assert ratios["learned"][-1] == 1.0  # learned for two hours: the new size is the bar


def test_a_flash_sale_lifts_everyone_so_no_key_stands_out() -> None:
    """Yesterday at this hour 10 keys made 10 calls each; today each makes 50 (a sale).
    The population is 5x its usual hour, so a key's own 5x is explained."""
    stream = FeatureStream(MemoryStore())
    keys = [f"sk-shop-{k}" for k in range(10)]
    yesterday = [{"api_key": k, "timestamp": T0 + 3600 * 10 + i * 300 + j}
                 for i in range(10) for j, k in enumerate(keys)]
    run(yesterday, stream)
    day2 = T0 + 86400 + 3600 * 10
    sale = [{"api_key": k, "timestamp": day2 + i * 60 + j * 0.1}
            for i in range(50) for j, k in enumerate(keys)]
    fv = run(sale, stream)[-1]
    assert fv.values["population_rate_vs_hour_of_week_1h"] > 3.0
    assert fv.values["key_rate_vs_population_1h"] < fv.values["rate_vs_hour_of_week_by_key_1h"]
    assert fv.context["population_expected_1h"] == 100.0
    # one key alone doing the same, the next day at the same hour: the population is calm
    day3 = T0 + 2 * 86400 + 3600 * 10
    alone = run([{"api_key": "sk-shop-0", "timestamp": day3 + i * 60} for i in range(50)]
                + [{"api_key": k, "timestamp": day3 + 3000 + j} for j, k in enumerate(keys)],
                stream)
    lone = alone[49]
    assert lone.values["population_rate_vs_hour_of_week_1h"] <= 1.0
    assert lone.values["key_rate_vs_population_1h"] == lone.values[
        "rate_vs_hour_of_week_by_key_1h"]


def test_bad_input_gives_a_vector_not_an_exception() -> None:
    fvs = run([
        {"timestamp": T0},  # no address, no sizes, nothing optional
        {"timestamp": T0 + 1, "source_ip": "240.0.0.1"},  # reserved, unknown to the db
        {"timestamp": T0 + 2, "source_ip": "2001:db8::1"},  # documentation prefix
        {"timestamp": 946_771_200.0, "source_ip": "81.2.69.160"},  # 2000: far in the past
        {"timestamp": T0 + 3, "country": "XK"},  # a code some databases lack
        {"timestamp": T0 + 4, "country": "ZZ", "asn": "AS0"},  # not a country at all
    ])
    for fv in fvs:
        assert tuple(fv.values) == FEATURE_NAMES
        assert all(math.isfinite(x) for x in fv.values.values())
    # the 1970 event is in none of the key's current windows
    assert fvs[4].values["requests_count_by_key_24h"] == 4.0


def test_late_events_count_in_their_own_buckets() -> None:
    fvs = run([{"timestamp": T0 + 600}, {"timestamp": T0 + 590}, {"timestamp": T0 + 300},
               {"timestamp": T0 + 601}])
    # a late event's own windows end at its own time (the newer event is not in them)
    assert fvs[1].values["requests_count_by_key_5m"] == 1.0
    assert fvs[2].values["requests_count_by_key_1h"] == 3.0
    # the next on-time event sees the late ones in their buckets
    assert fvs[3].values["requests_count_by_key_1h"] == 4.0
    assert fvs[3].values["requests_count_by_key_5m"] > 3.0
    assert fvs[3].values["interarrival_mean_s_by_key"] == 1.0  # late gaps are ignored


def test_batch_twin_matches_streaming_and_follows_the_learning_rule() -> None:
    rng = random.Random(11)
    rows, ts = [], T0
    for _ in range(300):
        ts += rng.expovariate(1 / 20)
        rows.append({"api_key": f"sk-{rng.randint(0, 4)}", "timestamp": ts,
                     "source_ip": rng.choice(["81.2.69.160", "5.9.0.1", "10.0.0.2", None]),
                     "tokens": rng.randint(0, 2000), "status": rng.choice([200, 200, 401]),
                     "model": rng.choice(["a", "b", None]), "latency_ms": rng.uniform(10, 900)})
    hasher = KeyHasher("batch-test-secret")
    frame = pd.DataFrame(rows)
    learn_all = batch_features(frame, hasher=hasher)
    stream = FeatureStream(MemoryStore())
    for i, row in enumerate(rows):
        event = Event(**{k: v for k, v in row.items() if v is not None})
        fv = stream.process(event, hasher.key_id(event.api_key))
        stream.learn(fv)
        assert learn_all.iloc[i].tolist() == fv.as_list()
    learn_none = batch_features(frame, hasher=hasher, learn=False, progress=False)
    assert (learn_none["history_events_by_key"] == 0).all()
    seen: list[int] = []
    batch_features(frame, hasher=hasher, learn=lambda i, fv: seen.append(i) or i % 2 == 0)
    assert seen == list(range(len(rows)))
    by_id = frame.assign(kid=[hasher.key_id(k) for k in frame.api_key]).drop(columns="api_key")
    by_column = batch_features(by_id, key_id_column="kid", context_columns=("key_id",))
    assert by_column[list(FEATURE_NAMES)].equals(learn_all)
    assert by_column["key_id"].tolist() == by_id["kid"].tolist()


def test_a_million_distinct_addresses_keep_the_memory_store_bounded() -> None:
    store = MemoryStore(max_entities=20_000)
    started = time.perf_counter()
    for i in range(1_000_000):
        ip = f"{11 + (i >> 24)}.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"
        store.execute([EntityOps("ip", ip, [(RECENT_ADD, "keys", "k_x", T0 + i * 0.001,
                                             3600, 512)])])
        assert len(store) <= 20_000
    assert store.evictions == 1_000_000 - 20_000
    assert time.perf_counter() - started < 60  # generous: this is a bound, not a benchmark


def test_idle_entities_expire_from_the_memory_store() -> None:
    store = MemoryStore(max_entities=1_000_000, idle_ttl_s=3600)
    stream = FeatureStream(store)
    for i in range(2000):  # a new address every 10 s; each goes idle after an hour
        event = Event(api_key="sk-i", timestamp=T0 + 10 * i,
                      source_ip=f"81.2.{i // 250}.{i % 250}")
        stream.process(event, "k_i")
    assert len(store) < 400 + 10  # about an hour of addresses, plus the key and population
    assert store.expirations > 1500


def test_a_loop_shows_in_its_prompts_sub_stream_while_the_owner_keeps_working() -> None:
    """The owner's own calls (varied prompts, irregular) interleave a loop resending one
    prompt every 3 s: the key's overall gaps and consecutive prompts look ordinary, the
    loop's prompt-size sub-stream is a timer repeating itself."""
    rng = random.Random(7)
    events, ts = [], T0
    for i in range(400):
        ts += 3.0 + rng.uniform(-0.02, 0.02)
        events.append({"timestamp": ts, "source_ip": "81.2.69.160", "tokens": 2300,
                       "prompt_tokens": 2000, "completion_tokens": 300, "loop": True})
        if i % 3 == 0:  # the owner, from the same address
            events.append({"timestamp": ts + rng.uniform(0.1, 2.8), "source_ip": "81.2.69.160",
                           "tokens": (p := rng.randint(100, 4000)) + 200,
                           "prompt_tokens": p, "completion_tokens": 200, "loop": False})
    events.sort(key=lambda e: e["timestamp"])
    fvs = run([{k: v for k, v in e.items() if k != "loop"} for e in events])
    late = [fv.values for fv, e in zip(fvs, events, strict=True) if e["loop"]][-100:]
    assert sum(v["loop_interarrival_cv_by_key"] < 0.3 for v in late) >= 80
    assert sum(v["loop_same_prompt_ratio_by_key"] >= 0.9 for v in late) >= 85
    assert all(v["interarrival_cv_by_key"] > 0.3 for v in late)  # the key's whole stream
    owner = [fv.values for fv, e in zip(fvs, events, strict=True) if not e["loop"]][-50:]
    assert sum(v["loop_same_prompt_ratio_by_key"] >= 0.9 for v in owner) <= 5
