"""The catalogue: every feature declared once, in the order the models' vectors use.

A declaration says what a feature is, not how an engine computes it: the entity whose
state it reads (the key, the source address, the population, or the event alone), the
aggregation, the event field it aggregates, the window, and which events feed it (every
event, or only events judged normal: the learned baselines an attacker must not be
able to teach). From the catalogue come

* `FEATURE_NAMES`, the schema that rules, policies and models validate against;
* the windowed counters' store operations and reads by name in the streaming extractor
  (`features.extractor`), one ring per (field, bucket size) and entity;
* the vectorised twin's windowed counters (`features.twin`), computed with group-bys and
  cumulative sums over the same buckets.

Windowed `count`/`sum` features need nothing else: declaring one adds it to both
engines. Other aggregations (EWMs, profiles, capped distinct sets, novelty, last
location) name the state they read here and are computed by each engine's code for
that aggregation; a new one of those is a declaration plus its code in both engines,
which `tests/test_features_equivalence.py` holds equal.

Compare Chronon's GroupBy or Feast's feature views: one definition, two engines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from features.windows import HOUR_RING_SIZE, MINUTE_RING_SIZE, WINDOWS, Window

Entity = Literal["key", "ip", "population", "event"]
Aggregation = Literal["count", "sum", "max", "distinct", "ewm", "profile", "novelty",
                      "last", "ratio", "value"]
FedBy = Literal["all", "normal"]

DAY_RING_SIZE = 32
"""Daily buckets: the 30-day window, its edge day and slack for late events."""
W1M, W5M, W1H, W24H = WINDOWS
W30D = Window("30d", 30 * 86400, 86400, DAY_RING_SIZE)
RING_SIZES = {60: MINUTE_RING_SIZE, 3600: HOUR_RING_SIZE, 86400: DAY_RING_SIZE}

WINDOWED_FIELDS = ("requests", "tokens", "errors", "auth_fails", "spend")
"""Fields the windowed counters add up: 1 per event, its tokens, 1 per client failure
(4xx), 1 per refused credential (401/403), its cost in US dollars."""


@dataclass(frozen=True, slots=True)
class Feature:
    """One declared feature."""

    name: str
    entity: Entity
    agg: Aggregation
    field: str
    window: Window | None = None
    fed_by: FedBy = "all"

    @property
    def windowed(self) -> bool:
        """A sum or count over a tiled window: fully derived from the declaration."""
        return self.agg in ("count", "sum") and self.window is not None


def _counters(entity: Entity, field: str, windows: tuple[Window, ...]) -> list[Feature]:
    agg: Aggregation = "sum" if field in ("tokens", "spend") else "count"
    label = {"requests": "requests_count", "tokens": "tokens_sum", "errors": "errors_count",
             "auth_fails": "auth_fail_count", "spend": "spend_usd"}[field]
    by = {"key": "by_key", "ip": "by_ip"}[entity]
    return [Feature(f"{label}_{by}_{w.label}", entity, agg, field, w) for w in windows]


def _f(name: str, entity: Entity, agg: Aggregation, field: str, window: Window | None = None,
       fed_by: FedBy = "all") -> Feature:
    return Feature(name, entity, agg, field, window, fed_by)


CATALOGUE: tuple[Feature, ...] = (
    *_counters("key", "requests", WINDOWS),
    *_counters("key", "tokens", WINDOWS),
    *_counters("key", "errors", WINDOWS),
    *_counters("key", "auth_fails", (W5M,)),
    *_counters("ip", "requests", (W1M, W5M, W1H)),
    *_counters("ip", "tokens", (W1M, W5M, W1H)),
    *_counters("ip", "errors", (W5M,)),
    *_counters("ip", "auth_fails", (W5M, W1H)),
    _f("failure_ratio_by_key_5m", "key", "ratio", "errors", W5M),
    _f("auth_fail_ratio_by_key_5m", "key", "ratio", "auth_fails", W5M),
    _f("auth_fail_ratio_by_ip_5m", "ip", "ratio", "auth_fails", W5M),
    _f("distinct_ips_by_key_1h", "key", "distinct", "source_ip", W1H),
    _f("distinct_keys_by_ip_1h", "ip", "distinct", "key_id", W1H),
    _f("distinct_failed_keys_by_ip_1h", "ip", "distinct", "key_id:auth_failed", W1H),
    _f("tokens_log_by_event", "event", "value", "tokens"),
    _f("latency_log_ms_by_event", "event", "value", "latency_ms"),
    _f("tokens_zscore_by_key", "key", "ewm", "tokens", fed_by="normal"),
    _f("tokens_peak_by_key_24h", "key", "max", "tokens", W24H, fed_by="normal"),
    _f("tokens_vs_peak_by_key_24h", "key", "ratio", "tokens", W24H, fed_by="normal"),
    _f("latency_zscore_by_key", "key", "ewm", "latency_ms", fed_by="normal"),
    _f("history_events_by_key", "key", "count", "tokens", fed_by="normal"),
    _f("rate_vs_hour_of_week_by_key_1h", "key", "profile", "requests", W1H, "normal"),
    _f("rate_vs_baseline_by_key_5m", "key", "profile", "requests", W5M, "normal"),
    _f("population_rate_vs_hour_of_week_1h", "population", "profile", "requests", W1H),
    _f("key_rate_vs_population_1h", "key", "ratio", "requests", W1H, "normal"),
    # geo
    _f("geo_distance_km_by_key", "key", "last", "location"),
    _f("geo_elapsed_s_by_key", "key", "last", "location"),
    _f("geo_speed_kmh_by_key", "key", "last", "location"),
    _f("new_country_by_key", "key", "novelty", "country"),
    _f("new_asn_by_key", "key", "novelty", "asn"),
    _f("hosting_asn_by_event", "event", "value", "hosting"),
    _f("hosting_share_by_key", "key", "ewm", "hosting", fed_by="normal"),
    _f("untrusted_hosting_asn_by_event", "key", "novelty", "hosting_asn", fed_by="normal"),
    _f("distinct_countries_by_key_1h", "key", "distinct", "country", W1H),
    _f("distinct_asns_by_key_1h", "key", "distinct", "asn", W1H),
    _f("countries_seen_by_key", "key", "distinct", "country"),
    _f("trusted_geo_distance_km_by_key", "key", "last", "location", fed_by="normal"),
    _f("trusted_geo_elapsed_s_by_key", "key", "last", "location", fed_by="normal"),
    _f("trusted_geo_speed_kmh_by_key", "key", "last", "location", fed_by="normal"),
    _f("untrusted_country_by_key", "key", "novelty", "country", fed_by="normal"),
    # identity
    _f("distinct_ips_in_country_by_key_1h", "key", "distinct", "source_ip:country", W1H),
    _f("untrusted_network_by_event", "key", "novelty", "asn", fed_by="normal"),
    _f("untrusted_prefix_by_event", "key", "novelty", "prefix", fed_by="normal"),
    _f("untrusted_ua_family_by_event", "key", "novelty", "ua_family", fed_by="normal"),
    _f("trusted_networks_by_key", "key", "distinct", "asn", fed_by="normal"),
    _f("hour_share_by_key", "key", "profile", "hour_of_day", fed_by="normal"),
    _f("last_normal_age_s_by_key", "key", "last", "timestamp", fed_by="normal"),
    _f("known_identity_by_event", "key", "novelty", "identity", fed_by="normal"),
    # recurrence and cold start
    _f("recurring_requests_1h_by_key", "key", "profile", "requests", W1H, "normal"),
    _f("recurring_spend_usd_1h_by_key", "key", "profile", "spend", W1H, "normal"),
    _f("recurring_tokens_peak_by_key", "key", "profile", "tokens", W1H, "normal"),
    _f("key_age_h_by_key", "key", "last", "first_seen", fed_by="normal"),
    _f("tokens_vs_population_z_by_event", "population", "ewm", "tokens:model",
       fed_by="normal"),
    # regularity
    _f("interarrival_cv_by_key", "key", "ewm", "gap"),
    _f("interarrival_mean_s_by_key", "key", "ewm", "gap"),
    _f("same_size_ratio_by_key", "key", "ewm", "tokens:same"),
    _f("same_prompt_ratio_by_key", "key", "ewm", "prompt_tokens:same"),
    # novelty
    _f("new_endpoint_by_key", "key", "novelty", "endpoint"),
    _f("new_user_agent_by_key", "key", "novelty", "user_agent"),
    _f("new_model_by_key", "key", "novelty", "model"),
    _f("distinct_models_by_key_24h", "key", "distinct", "model", W24H),
    _f("prompt_completion_ratio_by_event", "event", "value", "prompt_tokens:completion"),
    # spend
    _f("cost_usd_by_event", "event", "value", "spend"),
    _f("unknown_price_by_event", "event", "value", "model"),
    *_counters("key", "spend", (W5M, W1H, W24H, W30D)),
    _f("spend_rate_vs_baseline_by_key_1h", "key", "ratio", "spend", W1H, "normal"),
    # time of event
    _f("hour_of_day_sin", "event", "value", "timestamp"),
    _f("hour_of_day_cos", "event", "value", "timestamp"),
    _f("day_of_week_sin", "event", "value", "timestamp"),
    _f("day_of_week_cos", "event", "value", "timestamp"),
)

FEATURE_NAMES: tuple[str, ...] = tuple(f.name for f in CATALOGUE)
"""Every feature, in the stable order the models' vectors use."""
BY_NAME: dict[str, Feature] = {f.name: f for f in CATALOGUE}


@dataclass(frozen=True, slots=True)
class RingRead:
    """One ring of one entity read for its windows: the (name, buckets) of each feature."""

    field: str
    bucket_s: int
    ring_size: int
    windows: tuple[tuple[str, int], ...]


def windowed(entity: Entity) -> tuple[Feature, ...]:
    """The entity's windowed counters, in catalogue order."""
    return tuple(f for f in CATALOGUE if f.entity == entity and f.windowed)


def ring_reads(entity: Entity) -> tuple[RingRead, ...]:
    """The entity's windowed counters grouped by ring (field and bucket size)."""
    groups: dict[tuple[str, int], list[tuple[str, int]]] = {}
    for f in windowed(entity):
        w = f.window
        assert w is not None
        groups.setdefault((f.field, w.bucket_s), []).append((f.name, w.buckets))
    return tuple(RingRead(fld, b, RING_SIZES[b], tuple(ws)) for (fld, b), ws in groups.items())


def ring_name(field: str, bucket_s: int) -> str:
    """The store's name of a field's ring of `bucket_s` buckets."""
    return f"{field}:{ {60: 'm', 3600: 'h', 86400: 'd'}[bucket_s]}"
