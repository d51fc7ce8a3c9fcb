"""The streaming feature extractor: one event in, one named feature vector out.

This module holds the one definition of every feature; the batch twin
(`features.batch`) and the benchmark run exactly this code. It works in two phases so
that a whole event costs one store round trip:

1. `plan` turns the event into generic store operations for three entities — the key,
   the source IP and the population (`("g", "all")`): record the observation (counters,
   distinct sets, the key's last location, inter-arrival statistics) and read back what
   the features need.
2. `build` turns the results into a `FeatureVector` (values in `FEATURE_NAMES` order,
   plus the human-readable context rules quote: countries, previous location, times).

Two kinds of state, on purpose:

* Observations describe what is happening now, the attack included: windowed counts,
  distinct IPs/countries/ASNs/models, last location, inter-arrival gaps, repeated sizes,
  novelty sets. They are updated by every event inside `plan`.
* Learned baselines describe what is normal for the key: token size, latency, request
  rate and its hour-of-week profile. `learn_ops` returns their updates and the scorer
  applies them only for events that were not flagged (sent ahead of the next event's
  operations, so they too ride on an existing round trip), so that an attacker cannot
  teach the baselines that the attack is normal.

Spend is a feature too: each event's cost in US dollars (`features.pricing`, prompt and
completion tokens at the model's price; an unknown model at the default price, flagged)
is added to per-key spend counters over 5 min, 1 h, 24 h and 30 days (a minute, an hour
and a day ring, in the same atomic op as the other counters).
`spend_rate_vs_baseline_by_key_1h` sets the last hour's spend against the key's busiest
hour of the last day, counting only spend judged normal (a second hour ring that only
learning adds to) and only hours that ended at least an hour ago: a key burning money at
20x its own peak stands out even when every single request looks normal. The baseline is
made of past hours, not learned per event, so an attack cannot teach it within the hour
it is judged, however many requests it makes; what it spent before it was flagged waits an
hour before it counts, so a drain that builds up slowly is still judged against the
key's peak before it; and a nightly batch's peak hour is its own bar, not 24x a daily
mean.

Request size is judged the same way: `tokens_vs_peak_by_key_24h` is the event's tokens
against the largest request (`tokens_peak_by_key_24h`) the key sent in normal traffic over
the last day, from an hour ring that keeps each hour's largest learned request, again
counting only hours that ended at least an hour ago. A z-score against a running mean
says little on a key whose sizes vary by orders of magnitude, and it learns a stream of
stuffed prompts within a few dozen of them; "several times anything this key sent all day"
means the same on every key, and no request can raise the bar within the hour it is judged.

Time is event time. Counters live in a minute ring (8 min) and an hour ring (26 h), so a
late event is still counted in its own bucket: up to 8 minutes late it counts in every
window, up to 26 hours late only in the 1 h/24 h windows, older than that in no window
(its other effects — novelty sets, learned baselines — still apply). Distinct sets keep
each member's newest time; the key's previous location and inter-arrival clock keep the
newest event (a late event is measured against it but does not move it back, except the
location, which follows the last *arrived* located event).

The population entity is one hash: in Redis Cluster it is one hot key on one node
(every event touches it). That is fine up to the tens of thousands of events per second
a single Redis node absorbs; beyond that shard it (`all:0..N-1` by key id) and sum the
shards on read.

Feature names say what, how, by whom and over what window
(`requests_count_by_key_5m`). Every feature is declared in `features.catalogue`, whose
`FEATURE_NAMES` is the schema the models are trained on; the windowed counters' rings
and reads come from those declarations. Reads come back by name (`Reads`), never by
position, so adding an operation cannot shift what another feature reads.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from features.catalogue import (
    FEATURE_NAMES,
    RING_SIZES,
    RingRead,
    ring_name,
    ring_reads,
    windowed,
)
from features.contract import Event
from features.geo import GeoInfo, GeoLocator, country_name, default_locator, haversine_km
from features.pricing import Cost, PriceTable
from features.stores.base import (
    EWM,
    EWM_GAP,
    EWM_SAME,
    GET,
    GETS,
    INCR,
    RECENT_ADD,
    RECENT_COUNT,
    RING_ADD,
    RING_MAX,
    RING_VALUES,
    RING_WINDOWS,
    SEEN_ADD,
    SET,
    EntityOps,
    StateStore,
)
from features.windows import HOUR_RING_SIZE, MINUTE_RING_SIZE

KEY = "k"
IP = "ip"
POPULATION = "g"
POPULATION_ID = "all"

EWM_ALPHA = 0.02
"""Weight of one event in the adaptive means: about the last 50 learned events."""
HOW_ALPHA = 0.1
"""Weight of one event in its hour-of-week slot: a slot follows the last few weeks."""
GAP_ALPHA = 0.1
"""Weight of one gap in the inter-arrival statistics: about the last 10 gaps (now)."""
GAP_CAP_S = 3600.0
"""Gaps are capped at an hour, so a night's pause does not mask a loop for long."""
MIN_GAPS = 5
"""Gaps needed before the inter-arrival variation is trusted (1.0 until then)."""
LOOP_BUCKETS = 16
"""Prompt-size buckets of the key's sub-streams: a client stuck in a loop resends one
prompt, so its requests form a sub-stream of one bucket that the owner's other traffic
(spread over every bucket) hardly interleaves."""
LOOP_ALPHA = 0.2
"""Weight of one event in a sub-stream's regularity: about the last five gaps."""
LOOP_GAP_CAP_S = 60.0
"""Sub-stream gaps are capped at a minute, so a loop starting after a quiet spell shows
its timer within a few dozen requests."""
SAME_ALPHA = 0.1
"""Weight of one event in the same-size ratio: about the last 10 events."""
WARM_EVENTS = 30
"""Events a key needs before its own baselines are trusted over the population's."""
DISTINCT_CAP = 512
"""Distinct members tracked per set: counts saturate here, memory stays bounded."""
ENDPOINT_CAP = 256
USER_AGENT_CAP = 64
MODEL_CAP = 64
COUNTRY_CAP = 64
ASN_CAP = 128
"""Caps of the per-key novelty sets: beyond them the oldest members are forgotten (and
would be "new" again), so memory per key is bounded whatever a client sends."""
USER_AGENT_MAX_CHARS = 64
"""Longer user agents are kept as a short digest in the novelty set."""
MIN_TRAVEL_ELAPSED_S = 60.0
"""Speed is distance / max(elapsed, 60 s): two events a second apart are not infinite
speed, and geolocation is not precise enough for shorter hops to mean anything."""
ALL_TIME_S = 1e12
"""A window wider than any history: RECENT_COUNT over it is the size of a set."""
POP_RING = "req:h"
POP_RING_SIZE = 24 * 7 * 4 + 2
"""Hourly population counts for four weeks (+ the current and the edge hour)."""
POP_WEEK_LAGS = (168, 336, 504, 672)
POP_DAY_LAGS = (24, 48, 72, 96, 120, 144)
EPS = 1e-9
TRUSTED_GEO = "geo:ok"
"""The key's last located event that was judged normal (lat|lon|ts|country)."""
TRUSTED_COUNTRY = "cco:"
"""Prefix of the per-key fields marking a country as seen in traffic judged normal (one
field per country, so the set is bounded by the number of countries)."""
TRUSTED_HOSTING_ASN = "asno:"
"""Prefix of the per-key fields marking a hosting network (datacenter, VPS, cloud) as
used by traffic judged normal. Only hosting networks are recorded, so the fields stay
few even for a consumer app seen from thousands of residential networks."""
HOSTING_ALPHA = 0.02
"""Weight of one event in the key's share of traffic from hosting networks."""
SPEND_BASELINE_FLOOR_USD = 0.10
"""The usual hourly spend is taken as at least this, so a key that usually spends a
fraction of a cent is not "100x its rate" for a few cents."""
SIZE_PEAK_RING = "tokok:h"
"""Each hour's largest request (tokens) among the key's events judged normal."""
SIZE_PEAK_FLOOR_TOKENS = 256.0
"""A key whose largest request of the day was tiny is judged against this many tokens."""
NETWORK_OK = "netok:"
"""Prefix of the per-key fields marking a network (ASN) as used by traffic judged normal;
`IDENTITY_COUNTS` counts them, and no more than `NETWORK_CAP` are recorded."""
PREFIX_OK = "pfxok:"
"""The same for address prefixes (/24 for IPv4, /48 for IPv6), up to `PREFIX_CAP`."""
UA_FAMILY_OK = "uafok:"
"""The same for client libraries (user agent family: the product token before the
version, e.g. `openai-python`), up to `UA_FAMILY_CAP`."""
COUNTRY_IPS_CAP = 64
"""Distinct addresses per country per key that are counted (beyond: a crowd anyway)."""
NETWORK_CAP = 64
PREFIX_CAP = 256
UA_FAMILY_CAP = 32
"""Beyond its cap a set is saturated: the key is used from so many places (a consumer
app) that a new one is no evidence, and the novelty features read 0."""
HOUR_COUNT = "hodc"
"""Per-key counts of events judged normal by hour of day, one packed vector: slots 0..23
the hours, slot 24 the total (`hodc#h`): the hours the key's normal traffic uses. Then
the counts of known networks, prefixes and client libraries (`IDENTITY_COUNTS`)."""
HOUR_TOTAL = 24
LAST_NORMAL = "ok:last"
"""Time of the key's last event judged normal: are the owner's identities in use?"""
NEVER_S = 1e9
"""`last_normal_age_s_by_key` of a key with no normal event yet."""
RECUR_RING_SIZE = 24 * 8 + 2
"""Hourly rings of the key's known-identity traffic over eight days (+ edge hours)."""
RECUR_REQ, RECUR_SPEND, RECUR_SIZE = "reqid:h", "spendid:h", "tokid:h"
"""Requests, spend and largest request per hour of the key's traffic from its known
identities, judged normal or contained for volume only: what recurs at this hour."""
RECUR_LAGS = ((24, 48), 168)
"""A spike recurs when it came at this time (±1 h) on each of the two previous days, or
at this time a week ago."""
FIRST_SEEN = "first"
"""Time of the key's first event judged normal: its age, for cold start."""
POP_SIZE = "psz:"
"""Population prior of request size per priced model (EWM of log tokens) on the
population entity, learned from events judged normal."""
POP_SIZE_MIN_N = 100.0
SPEND_NORMAL_RING = "spendok:h"
"""Hourly spend of the key's events judged normal: added by learning only, it is the
spend baseline's history (see the module docstring)."""

_METRICS = ("requests", "tokens", "errors", "auth_fails")
"""The windowed fields every event adds to the minute and hour rings of its key and its
address (spend is added by the key alone, and has a day ring too)."""


KEY_EWMS = ("tok", "lat", "rate", "host", "gap", "same", "psame")
"""The key's EWMs by name. Each is a slot of the key's packed profile `ewm`
(`features.stores.packed`): one field for all, not three per EWM; after them, two slots
per loop bucket (its gaps, then its repeats)."""
EWM_SLOT = {name: f"ewm#{slot}" for slot, name in enumerate(KEY_EWMS)}
LAST_SLOT = {name: f"last#{slot}" for slot, name in enumerate(("gap", "same", "psame"))}
"""What EWM_GAP and EWM_SAME remember (the last time, size, prompt): slots of the packed
vector `last`; after them, two slots per loop bucket."""
_LOOP_SLOTS = tuple(
    (f"ewm#{len(KEY_EWMS) + 2 * b}", f"ewm#{len(KEY_EWMS) + 2 * b + 1}",
     f"last#{len(LAST_SLOT) + 2 * b}", f"last#{len(LAST_SLOT) + 2 * b + 1}")
    for b in range(LOOP_BUCKETS))
"""Per loop bucket: (gap EWM, repeat EWM, last time, last prompt)."""


def _store_field(name: str) -> str:
    """The store's field of an EWM part named by the key's EWM (`tok:m` -> `ewm#0:m`)."""
    ewm, _, part = name.partition(":")
    return f"{EWM_SLOT[ewm]}:{part}" if ewm in EWM_SLOT else name


def hour_of_week(ts: float) -> int:
    """0..167, Monday 00:00 UTC = 0 (the epoch fell on a Thursday)."""
    return int((ts // 3600 + 72) % 168)


_KEY_RINGS = ring_reads("key")
_IP_RINGS = ring_reads("ip")
_IP_WINDOW_NAMES = tuple(f.name for f in windowed("ip"))
# ring names per metric, precomputed: (minute ring, hour ring)
_RINGS = tuple((ring_name(m, 60), ring_name(m, 3600)) for m in _METRICS)
HOW_PART = 42
"""Hours of the week per part of the hour-of-week profile."""
_HOW_NAMES = tuple(f"how{h // HOW_PART}#{h % HOW_PART}" for h in range(168))
"""The hour-of-week profile, in four packed profiles `how0`..`how3` of 42 hours each
(`features.stores.packed`): one profile of 168 slots is 4 KiB that every learned event
rewrites; a part is 1 KiB, and each part costs the stores a field's overhead."""
BASELINE_FIELDS = ("tok:m", "tok:v", "tok:n", "lat:m", "lat:v", "lat:n", "rate:m", "rate:v",
                   "rate:n", "how:m", "how:v", "how:n", "host:m", "host:n")
"""The learned baselines read for every event (`how:*` stands for the event's own
hour-of-week slot, `how<part>#<hour>:*` in the store)."""
_BASELINE_GETS = tuple(
    (GETS, 14, *(_store_field(f.replace("how:", f"{_HOW_NAMES[h]}:")) for f in BASELINE_FIELDS))
    for h in range(168))
REGULARITY_FIELDS = ("gap:m", "gap:v", "gap:n", "same:m", "same:n", "psame:m", "psame:n")
_REGULARITY_GETS = (GETS, 7, *map(_store_field, REGULARITY_FIELDS))
IDENTITY_FIELDS = ("net_ok", "pfx_ok", "ua_ok", "net_n", "pfx_n", "ua_n", "hour_before",
                   "hour", "hour_after", "hours_n")
"""Names of the identity read's results: is the event's network, prefix and client
library known, how many of each are, and the key's normal events by hour of day."""
_HOUR_SLOTS = tuple(f"{HOUR_COUNT}#{h}" for h in range(HOUR_TOTAL + 1))
IDENTITY_COUNTS = {prefix: f"{HOUR_COUNT}#{HOUR_TOTAL + 1 + j}"
                   for j, prefix in enumerate((NETWORK_OK, PREFIX_OK, UA_FAMILY_OK))}
"""How many networks, prefixes and client libraries the key's normal traffic used."""
_POP_LAGS = (*POP_WEEK_LAGS, *POP_DAY_LAGS)


@dataclass(slots=True)
class FeatureVector:
    """A named numeric vector plus the context rules need to explain themselves."""

    values: dict[str, float]
    context: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> float:
        return self.values[name]

    def get(self, name: str, default: float = 0.0) -> float:
        return self.values.get(name, default)

    def as_list(self) -> list[float]:
        """Values in `FEATURE_NAMES` order."""
        return [self.values[n] for n in FEATURE_NAMES]


class Reads:
    """One entity's store operations, with the reads `build` needs registered by name.

    Results are addressed as `results[name]`, never by position: adding an operation
    cannot shift what another read returns."""

    __slots__ = ("at", "ops")

    def __init__(self, ops: list[tuple[Any, ...]] | None = None) -> None:
        self.ops: list[tuple[Any, ...]] = ops if ops is not None else []
        self.at: dict[str, int] = {}

    def read(self, name: str, *op: Any) -> None:
        self.at[name] = len(self.ops)
        self.ops.append(op)

    def write(self, *op: Any) -> None:
        self.ops.append(op)

    def results(self, res: Sequence[Any]) -> dict[str, Any]:
        """The named results of `res` (the store's answer to these ops)."""
        return {name: res[i] for name, i in self.at.items()}


@dataclass(slots=True)
class Plan:
    """Store operations for one event, and the names under which its reads come back."""

    event: Event
    key_id: str
    key_ops: EntityOps
    ip_ops: EntityOps | None
    population_ops: EntityOps | None = None
    geo: GeoInfo | None = None
    key_reads: dict[str, int] = field(default_factory=dict)
    ip_reads: dict[str, int] = field(default_factory=dict)
    population_reads: dict[str, int] = field(default_factory=dict)
    cost: Cost | None = None
    """The event's estimated price (budgets reuse it, so it is computed once)."""
    identity: dict[str, Any] = field(default_factory=dict)
    """The event's identity (network, prefix, client library) and which parts are new,
    for learning."""

    def requests(self) -> list[EntityOps]:
        """The entities of this event, in the order `build` expects their results:
        key, then IP (when the event has one), then the population."""
        out = [self.key_ops]
        if self.ip_ops is not None:
            out.append(self.ip_ops)
        if self.population_ops is not None:
            out.append(self.population_ops)
        return out


def ua_family(user_agent: str) -> str:
    """The client library of a user agent: its first product token without the version
    (`OpenAI/Python 1.30.1` -> `openai`, `python-requests/2.31` -> `python-requests`)."""
    token = user_agent.strip().split(" ", 1)[0].split("/", 1)[0].lower()
    return token[:USER_AGENT_MAX_CHARS] or "-"


def network_prefix(ip: str | None) -> str | None:
    """The address's /24 (IPv4) or /48 (IPv6) network, or None."""
    if not ip:
        return None
    return _prefix_of(ip)


@lru_cache(maxsize=8192)
def _prefix_of(ip: str) -> str | None:
    """`network_prefix` of a non-empty address (cached: every event asks for its
    address's prefix twice, and traffic repeats addresses)."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if addr.version == 4:  # the same text as ip_network(f"{addr}/24"), a tenth of the cost
        a, b, c, _ = addr.packed
        return f"{a}.{b}.{c}.0/24"
    return str(ipaddress.ip_network(f"{addr}/48", strict=False))


def _ua_member(user_agent: str) -> str:
    if len(user_agent) <= USER_AGENT_MAX_CHARS:
        return user_agent
    return "#" + hashlib.blake2b(user_agent.encode(), digest_size=8).hexdigest()


class FeatureExtractor:
    """Builds per-key, per-IP and population feature vectors from a `StateStore`.

    Parameters
    ----------
    geo:
        The IP locator; by default the process-wide `features.geo.default_locator()`
        (geoip2fast + countryinfo, loaded on first use).
    pricing:
        The price table (default: the packaged list prices). The scorer replaces it when
        the policy's `pricing:` changes; training must use the same table as serving.
    """

    def __init__(
        self,
        *,
        ewm_alpha: float = EWM_ALPHA,
        how_alpha: float = HOW_ALPHA,
        geo: GeoLocator | None = None,
        pricing: PriceTable | None = None,
    ) -> None:
        self.ewm_alpha = ewm_alpha
        self.how_alpha = how_alpha
        self._geo = geo
        self.pricing = pricing or PriceTable()

    @property
    def geo(self) -> GeoLocator:
        if self._geo is None:
            self._geo = default_locator()
        return self._geo

    def locate(self, event: Event) -> GeoInfo:
        """The event's geolocation: its own fields first, then the address lookup."""
        return self.locate_fields(event.source_ip, event.country, event.asn, event.lat,
                                  event.lon)

    def locate_fields(self, source_ip: str | None, country: str | None, asn: str | None,
                      lat: float | None, lon: float | None) -> GeoInfo:
        """`locate` from the event's fields (the batch twin locates each distinct
        combination once)."""
        if country is None and asn is None and lat is None:
            return self.geo.lookup(source_ip)
        return self.geo.locate(source_ip, country=country, asn=asn, lat=lat, lon=lon)

    # ---- phase 1 ----------------------------------------------------------------------
    def plan(self, event: Event, key_id: str) -> Plan:
        ts = event.timestamp
        source_ip = event.source_ip
        geo = self.locate(event)
        stamp_m = int(ts // 60)
        stamp_h = int(ts // 3600)
        amounts = (
            1.0,
            float(event.tokens),
            1.0 if event.is_client_failure else 0.0,  # the "errors" metric: 4xx only
            1.0 if event.status in (401, 403) else 0.0,
        )
        adds = []
        slot_m, slot_h = stamp_m % MINUTE_RING_SIZE, stamp_h % HOUR_RING_SIZE
        for i, amount in enumerate(amounts):
            if amount:
                rm, rh = _RINGS[i]
                adds.append((RING_ADD, rm, slot_m, stamp_m, amount))
                adds.append((RING_ADD, rh, slot_h, stamp_h, amount))
        cost = self.pricing.cost_of(event)
        key = self._plan_key(event, key_id, geo, cost, list(adds))
        ip_ops = None
        ip = Reads(list(adds))
        if source_ip:
            _window_reads(ip, _IP_RINGS, ts)
            ip.read("distinct_keys", RECENT_ADD, "keys", key_id, ts, 3600, DISTINCT_CAP)
            if amounts[3]:
                ip.read("failed_keys", RECENT_ADD, "fkeys", key_id, ts, 3600, DISTINCT_CAP)
            else:
                ip.read("failed_keys", RECENT_COUNT, "fkeys", ts, 3600)
            ip_ops = EntityOps(IP, source_ip, ip.ops)

        # population: this hour and the previous, then the same hour in earlier weeks
        # and days; the size prior of the event's priced model
        pop = Reads([(RING_ADD, POP_RING, stamp_h % POP_RING_SIZE, stamp_h, 1.0)])
        pop.read("hours", RING_VALUES, POP_RING, POP_RING_SIZE, 2 + len(_POP_LAGS), stamp_h,
                 stamp_h - 1, *(stamp_h - lag for lag in _POP_LAGS))
        size_name = POP_SIZE + (cost.model or "other")
        pop.read("size", GETS, 3, f"{size_name}:m", f"{size_name}:v", f"{size_name}:n")
        return Plan(
            event=event, key_id=key_id, key_ops=EntityOps(KEY, key_id, key.ops),
            ip_ops=ip_ops, population_ops=EntityOps(POPULATION, POPULATION_ID, pop.ops),
            geo=geo, key_reads=key.at, ip_reads=ip.at, population_reads=pop.at, cost=cost)

    def _plan_key(self, event: Event, key_id: str, geo: GeoInfo, cost: Cost,
                  adds: list[tuple[Any, ...]]) -> Reads:
        """The key's operations: observations, then the reads of its state."""
        ts = event.timestamp
        stamp_h = int(ts // 3600)
        k = Reads(adds)
        if cost.usd:
            for bucket_s in (60, 3600, 86400):
                stamp = int(ts // bucket_s)
                k.write(RING_ADD, ring_name("spend", bucket_s),
                        stamp % RING_SIZES[bucket_s], stamp, cost.usd)
        _window_reads(k, _KEY_RINGS, ts)
        # the normal-value rings are read over the hours that ended at least an hour ago
        past_hours = range(stamp_h - 2, stamp_h - 25, -1)
        k.read("spend_normal", RING_VALUES, SPEND_NORMAL_RING, HOUR_RING_SIZE, 23,
               *past_hours)
        k.read("size_peak", RING_VALUES, SIZE_PEAK_RING, HOUR_RING_SIZE, 23, *past_hours)
        if event.source_ip:
            k.read("distinct_ips", RECENT_ADD, "ips", event.source_ip, ts, 3600, DISTINCT_CAP)
            # addresses in this event's country within the hour: a leak abroad is one
            # or a few machines, an app launching in a new country is a crowd
            k.read("country_ips", RECENT_ADD, "ips:" + (geo.country or "-"), event.source_ip,
                   ts, 3600, COUNTRY_IPS_CAP)
        k.read("baselines", *_BASELINE_GETS[hour_of_week(ts)])
        _regularity_ops(k, event)
        # novelty for this key
        k.read("new_endpoint", SEEN_ADD, "ep", event.endpoint, ts, ENDPOINT_CAP)
        k.read("new_user_agent", SEEN_ADD, "ua", _ua_member(event.user_agent), ts,
               USER_AGENT_CAP)
        if event.model is not None:
            k.read("new_model", SEEN_ADD, "mdl", event.model, ts, MODEL_CAP)
        k.read("models_24h", RECENT_COUNT, "mdl", ts, 86400)
        # countries and networks: "new" only for a key that had some before
        _novelty(k, "cc", geo.country, ts, COUNTRY_CAP, 3600)
        _novelty(k, "asn", geo.asn, ts, ASN_CAP, 3600)
        if geo.hosting and geo.asn:
            k.read("hosting_asn_ok", GET, TRUSTED_HOSTING_ASN + geo.asn)
        _identity_ops(k, event, geo.asn)
        k.read("last_normal", GET, LAST_NORMAL)
        lag_stamps = [stamp_h - lag + d for lag in (*RECUR_LAGS[0], RECUR_LAGS[1])
                      for d in (-1, 0, 1)]
        for name, ring in (("recur_req", RECUR_REQ), ("recur_spend", RECUR_SPEND),
                           ("recur_size", RECUR_SIZE)):
            k.read(name, RING_VALUES, ring, RECUR_RING_SIZE, len(lag_stamps), *lag_stamps)
        k.read("first_seen", GET, FIRST_SEEN)
        # the previous located event (read, then replace with this one)
        if geo.lat is not None:
            k.read("geo", GET, "geo")
            k.write(SET, "geo", f"{geo.lat!r}|{geo.lon!r}|{ts!r}|{geo.country or ''}")
            # where the key was last used in traffic judged normal, and whether this
            # country is one of those places (written by `learn_ops`)
            k.read("trusted", GETS, 2, TRUSTED_GEO, TRUSTED_COUNTRY + (geo.country or ""))
        return k

    # ---- phase 2 ----------------------------------------------------------------------
    def build(self, plan: Plan, results: Sequence[list[Any]]) -> FeatureVector:
        event = plan.event
        ts = event.timestamp
        key = _named(results[0], plan.key_reads)
        ip = _named(results[1], plan.ip_reads) if plan.ip_ops is not None else None
        pop = _named(results[-1], plan.population_reads) if plan.population_ops else None
        v: dict[str, float] = {}

        _counter_values(v, key, ip, ts)

        base = dict(zip(BASELINE_FIELDS, key["baselines"], strict=True))
        tok, lat = _ewm(base, "tok"), _ewm(base, "lat")
        rate, how = _ewm(base, "rate"), _ewm(base, "how")
        tokens_log = math.log1p(event.tokens)
        latency_log = math.log1p(event.latency_ms)
        v["tokens_log_by_event"] = tokens_log
        v["latency_log_ms_by_event"] = latency_log
        v["tokens_zscore_by_key"] = _z(tokens_log, tok)
        # the largest normal request of the last day, among the hours that ended at least
        # an hour ago
        size_peak = max(max(key["size_peak"], default=0.0), _recurring(key["recur_size"]))
        v["tokens_peak_by_key_24h"] = size_peak
        v["tokens_vs_peak_by_key_24h"] = (
            event.tokens / max(size_peak, SIZE_PEAK_FLOOR_TOKENS) if size_peak > 0 else 1.0)
        v["latency_zscore_by_key"] = _z(latency_log, lat)
        v["history_events_by_key"] = tok[2]
        expected = how[0] if how[2] >= 3 else rate[0]
        # a spike that recurs at this hour from the key's known identities is normal
        expected = max(expected, _recurring(key["recur_req"]))
        key_rate_ratio = (
            v["requests_count_by_key_1h"] / max(expected, 1.0) if rate[2] > 0 else 1.0)
        v["rate_vs_hour_of_week_by_key_1h"] = key_rate_ratio
        # the last 5 minutes against a twelfth of the usual hour (at least one request)
        v["rate_vs_baseline_by_key_5m"] = (
            v["requests_count_by_key_5m"] / max(expected / 12.0, 1.0) if rate[2] > 0 else 1.0)
        pop_1h, pop_expected, pop_ratio = _population_rate(pop, ts)
        v["population_rate_vs_hour_of_week_1h"] = pop_ratio
        v["key_rate_vs_population_1h"] = key_rate_ratio / max(pop_ratio, 1.0)
        geo = plan.geo or GeoInfo()
        prev = self._geo_values(v, key, geo, base, ts)
        v["distinct_ips_in_country_by_key_1h"] = float(key.get("country_ips") or 0)
        self._identity_values(v, plan, key["identity"], key["last_normal"])
        recur_spend = _recurring(key["recur_spend"])
        v["recurring_requests_1h_by_key"] = _recurring(key["recur_req"])
        v["recurring_spend_usd_1h_by_key"] = recur_spend
        v["recurring_tokens_peak_by_key"] = _recurring(key["recur_size"])
        first = key["first_seen"]
        v["key_age_h_by_key"] = max(0.0, ts - float(first)) / 3600.0 if first else 0.0
        v["tokens_vs_population_z_by_event"] = _population_z(tokens_log,
                                                             pop["size"] if pop else None)
        first_event = key["gap_last"] is None
        _regularity_values(v, key["regularity"])
        _loop_values(v, key["loop"])
        _novelty_flags(v, key, first_event)
        if event.prompt_tokens is not None and event.completion_tokens is not None:
            v["prompt_completion_ratio_by_event"] = (
                math.log1p(event.prompt_tokens) - math.log1p(event.completion_tokens))
        else:
            v["prompt_completion_ratio_by_event"] = 0.0
        cost = plan.cost or self.pricing.cost_of(event)
        # the busiest hour of the last day of spend judged normal, among the hours that
        # ended at least an hour ago
        peak = max(max(key["spend_normal"], default=0.0), recur_spend)
        v["cost_usd_by_event"] = cost.usd
        v["unknown_price_by_event"] = 1.0 if cost.unknown else 0.0
        v["spend_rate_vs_baseline_by_key_1h"] = (
            v["spend_usd_by_key_1h"] / max(peak, SPEND_BASELINE_FLOOR_USD) if peak > 0
            else 1.0)
        _time_values(v, ts)
        context = {
            "key_id": plan.key_id,
            "source_ip": event.source_ip,
            "timestamp": ts,
            "key_warm": tok[2] >= WARM_EVENTS,
            "tokens": event.tokens,
            "baseline_tokens_mean": math.expm1(tok[0]) if tok[2] else None,
            "baseline_requests_1h": expected if rate[2] else None,
            "country": geo.country,
            "country_name": geo.country_name,
            "asn": geo.asn,
            "asn_name": geo.asn_name,
            "hosting": geo.hosting,
            "lat": geo.lat,
            "lon": geo.lon,
            "geo_source": geo.source,
            **prev,
            "population_requests_1h": pop_1h,
            "population_expected_1h": pop_expected,
            "baseline_spend_usd_1h": peak or None,
            "priced_model": cost.model,
            "identity": plan.identity,
            "network": plan.identity.get("prefix"),
        }
        return FeatureVector(values=_ordered(v), context=context)

    def _geo_values(self, v: dict[str, float], key: dict[str, Any], geo: GeoInfo,
                    base: dict[str, Any], ts: float) -> dict[str, Any]:
        """Travel since the previous located event and since the last one judged normal,
        novelty of the country and network; returns their context."""
        distance = elapsed = speed = 0.0
        prev_country = prev_ts = None
        if key.get("geo"):
            lat_s, lon_s, ts_s, prev_country = key["geo"].split("|", 3)
            prev_ts = float(ts_s)
            prev_country = prev_country or None
            elapsed = abs(ts - prev_ts)
            distance = haversine_km(float(lat_s), float(lon_s), geo.lat, geo.lon)  # type: ignore[arg-type]
            speed = distance / max(elapsed, MIN_TRAVEL_ELAPSED_S) * 3600.0
        v["geo_distance_km_by_key"] = distance
        v["geo_elapsed_s_by_key"] = elapsed
        v["geo_speed_kmh_by_key"] = speed
        v["new_country_by_key"] = _new_member(key, "cc")
        v["new_asn_by_key"] = _new_member(key, "asn")
        v["hosting_asn_by_event"] = 1.0 if geo.hosting else 0.0
        # A key whose normal traffic comes from homes and phones, suddenly used from a
        # datacenter network its normal traffic never used: a leaked key run from a VPS
        # looks like this even in the owner's country, with the owner's user agent.
        host_n = base["host:n"]
        v["hosting_share_by_key"] = float(base["host:m"]) if host_n is not None else 0.0
        v["untrusted_hosting_asn_by_event"] = (
            1.0 if "hosting_asn_ok" in key and host_n is not None and not key["hosting_asn_ok"]
            else 0.0)
        v["distinct_countries_by_key_1h"] = float(key.get("cc_1h") or 0)
        v["distinct_asns_by_key_1h"] = float(key.get("asn_1h") or 0)
        v["countries_seen_by_key"] = float(key.get("cc_before") or 0)
        # Against the last location judged normal rather than the last event: a leaked
        # key used from afar while its owner carries on keeps looking impossible on every
        # attacker event (the attacker's own events never become the reference), whereas
        # a traveller's first normal event at the destination becomes the new reference.
        t_distance = t_elapsed = t_speed = untrusted = 0.0
        trusted_country = trusted_ts = None
        trusted = key.get("trusted")
        if trusted is not None and trusted[0]:
            t_lat, t_lon, t_ts, trusted_country = trusted[0].split("|", 3)
            trusted_ts = float(t_ts)
            trusted_country = trusted_country or None
            t_elapsed = abs(ts - trusted_ts)
            t_distance = haversine_km(float(t_lat), float(t_lon), geo.lat,  # type: ignore[arg-type]
                                      geo.lon)  # type: ignore[arg-type]
            t_speed = t_distance / max(t_elapsed, MIN_TRAVEL_ELAPSED_S) * 3600.0
            untrusted = 1.0 if geo.country and not trusted[1] else 0.0
        v["trusted_geo_distance_km_by_key"] = t_distance
        v["trusted_geo_elapsed_s_by_key"] = t_elapsed
        v["trusted_geo_speed_kmh_by_key"] = t_speed
        v["untrusted_country_by_key"] = untrusted
        return {"prev_country": prev_country, "prev_country_name": _country_name(prev_country),
                "prev_seen_ts": prev_ts, "trusted_country": trusted_country,
                "trusted_country_name": _country_name(trusted_country),
                "trusted_seen_ts": trusted_ts}

    def _identity_values(self, v: dict[str, float], plan: Plan, res: list[Any],
                         last_normal: Any) -> None:
        """Novelty of the event's network, prefix and client library against the key's
        normal traffic, and the share of that traffic in this hour of day."""
        geo = plan.geo or GeoInfo()
        net_ok, pfx_ok, ua_ok, net_n, pfx_n, ua_n, h0, h1, h2, h_n = res
        net_n_f, pfx_n_f, ua_n_f = (float(x) if x else 0.0 for x in (net_n, pfx_n, ua_n))

        def untrusted(ok: Any, n: float, cap: int, known: bool) -> float:
            # new only for a key whose normal traffic is known and not saturated
            return 1.0 if known and not ok and 0 < n < cap else 0.0

        prefix = network_prefix(plan.event.source_ip)
        v["untrusted_network_by_event"] = untrusted(net_ok, net_n_f, NETWORK_CAP,
                                                    geo.asn is not None)
        v["untrusted_prefix_by_event"] = untrusted(pfx_ok, pfx_n_f, PREFIX_CAP,
                                                   prefix is not None)
        v["untrusted_ua_family_by_event"] = untrusted(ua_ok, ua_n_f, UA_FAMILY_CAP, True)
        v["trusted_networks_by_key"] = net_n_f
        v["trusted_prefixes_by_key"] = pfx_n_f
        total = float(h_n) if h_n else 0.0
        near = sum(float(x) for x in (h0, h1, h2) if x)
        v["hour_share_by_key"] = near / total if total > 0 else 1.0
        v["last_normal_age_s_by_key"] = (
            max(0.0, plan.event.timestamp - float(last_normal)) if last_normal else NEVER_S)
        v["known_identity_by_event"] = (
            1.0 if (net_ok or pfx_ok or geo.asn is None) and (ua_ok or ua_n_f == 0) else 0.0)
        plan.identity = {"asn": geo.asn, "prefix": prefix,
                         "ua_family": ua_family(plan.event.user_agent),
                         "net_new": not net_ok and net_n_f < NETWORK_CAP,
                         "pfx_new": not pfx_ok and pfx_n_f < PREFIX_CAP,
                         "prefix_since": float(pfx_ok) if pfx_ok else None,
                         "ua_new": not ua_ok and ua_n_f < UA_FAMILY_CAP}

    # ---- learning -----------------------------------------------------------------------
    def identity_learn_ops(self, fv: FeatureVector) -> list[tuple[Any, ...]]:
        """Record the event's identity (network, prefix, client library, hour of day) as
        the key's normal: only for events judged normal."""
        ctx = fv.context
        ident = ctx.get("identity") or {}
        ops: list[tuple[Any, ...]] = [(SET, LAST_NORMAL, repr(float(ctx["timestamp"])))]
        for new, prefix, member in ((ident.get("net_new"), NETWORK_OK, ident.get("asn")),
                                    (ident.get("pfx_new"), PREFIX_OK, ident.get("prefix")),
                                    (ident.get("ua_new"), UA_FAMILY_OK,
                                     ident.get("ua_family"))):
            if new and member:  # when it was learned: the owner's networks predate a leak
                ops.append((SET, prefix + member, repr(float(ctx["timestamp"]))))
                ops.append((INCR, IDENTITY_COUNTS[prefix], 1.0))
        hod = int(ctx["timestamp"] // 3600) % 24
        ops.append((INCR, _HOUR_SLOTS[hod], 1.0))
        ops.append((INCR, _HOUR_SLOTS[HOUR_TOTAL], 1.0))
        return ops

    def learn_ops(self, fv: FeatureVector) -> list[EntityOps]:
        """Baseline updates for an event that was judged normal.

        Its location becomes the key's trusted location (unless a newer one is already
        there: a late event does not move it back) and its country a trusted country.
        """
        ctx = fv.context
        ts = ctx["timestamp"]
        values = fv.values
        rate = values["requests_count_by_key_1h"]
        ops: list[tuple[Any, ...]] = [*self.recurrence_ops(fv), *self.identity_learn_ops(fv),
            (EWM, EWM_SLOT["tok"], values["tokens_log_by_event"], self.ewm_alpha),
            (EWM, EWM_SLOT["lat"], values["latency_log_ms_by_event"], self.ewm_alpha),
            (EWM, EWM_SLOT["rate"], rate, self.ewm_alpha),
            (EWM, _HOW_NAMES[hour_of_week(ts)], rate, self.how_alpha),
        ]
        stamp_h = int(ts // 3600)
        cost = values["cost_usd_by_event"]
        if cost:
            ops.append((RING_ADD, SPEND_NORMAL_RING, stamp_h % HOUR_RING_SIZE, stamp_h, cost))
        if ctx["tokens"]:
            ops.append((RING_MAX, SIZE_PEAK_RING, stamp_h % HOUR_RING_SIZE, stamp_h,
                        float(ctx["tokens"])))
        lat, lon, country = ctx.get("lat"), ctx.get("lon"), ctx.get("country")
        trusted_ts = ctx.get("trusted_seen_ts")
        if lat is not None and lon is not None and (trusted_ts is None or ts >= trusted_ts):
            ops.append((SET, TRUSTED_GEO, f"{lat!r}|{lon!r}|{ts!r}|{country or ''}"))
        if country and (trusted_ts is None or values.get("untrusted_country_by_key")):
            ops.append((SET, TRUSTED_COUNTRY + country, "1"))
        hosting = values.get("hosting_asn_by_event", 0.0)
        ops.append((EWM, EWM_SLOT["host"], hosting, self.ewm_alpha))
        if hosting and ctx.get("asn"):
            ops.append((SET, TRUSTED_HOSTING_ASN + ctx["asn"], "1"))
        out = [EntityOps(KEY, ctx["key_id"], ops)]
        model = ctx.get("priced_model") or "other"
        if ctx["tokens"]:
            out.append(EntityOps(POPULATION, POPULATION_ID, [
                (EWM, POP_SIZE + model, values["tokens_log_by_event"], self.ewm_alpha / 4)]))
        return out

    def recurrence_ops(self, fv: FeatureVector) -> list[tuple[Any, ...]]:
        """What recurs: the event counted in the key's known-identity hourly rings. Also
        for events contained for volume only from the key's known identities, so a
        nightly job keeps teaching its own pattern while it is throttled."""
        ctx = fv.context
        ts = ctx["timestamp"]
        stamp_h = int(ts // 3600)
        slot = stamp_h % RECUR_RING_SIZE
        ops: list[tuple[Any, ...]] = [(RING_ADD, RECUR_REQ, slot, stamp_h, 1.0)]
        cost = fv.values.get("cost_usd_by_event", 0.0)
        if cost:
            ops.append((RING_ADD, RECUR_SPEND, slot, stamp_h, cost))
        if ctx["tokens"]:
            ops.append((RING_MAX, RECUR_SIZE, slot, stamp_h, float(ctx["tokens"])))
        if not fv.values.get("key_age_h_by_key"):
            ops.append((SET, FIRST_SEEN, repr(float(ts))))
        return ops

    def contained_learn_ops(self, fv: FeatureVector) -> list[EntityOps]:
        """Learning for an event contained for volume only, from the key's known
        identities: its recurrence and that the owner is active, nothing else."""
        ctx = fv.context
        ops = [*self.recurrence_ops(fv), (SET, LAST_NORMAL, repr(float(ctx["timestamp"])))]
        return [EntityOps(KEY, ctx["key_id"], ops)]


class FeatureStream:
    """plan → one round trip → build, with learning piggybacked as the Scorer does it.

    Used by the batch twin, the benchmark and tests; the Scorer runs the same steps
    with its decision logic in between.
    """

    def __init__(self, store: StateStore, extractor: FeatureExtractor | None = None) -> None:
        self.store = store
        self.extractor = extractor or FeatureExtractor()
        self._pending: list[EntityOps] = []

    def process(self, event: Event, key_id: str) -> FeatureVector:
        plan = self.extractor.plan(event, key_id)
        requests = plan.requests()
        pending = self._pending
        if pending:
            self._pending = []
            results = self.store.execute([*pending, *requests])[len(pending):]
        else:
            results = self.store.execute(requests)
        return self.extractor.build(plan, results)

    def learn(self, fv: FeatureVector) -> None:
        """Queue the baseline updates of `fv` for the next round trip."""
        self._pending.extend(self.extractor.learn_ops(fv))

    def flush(self) -> None:
        if self._pending:
            pending, self._pending = self._pending, []
            self.store.execute(pending)


# ---- helpers ---------------------------------------------------------------------------
def _named(res: Sequence[Any], at: dict[str, int]) -> dict[str, Any]:
    """An entity's results by the names its reads were registered under."""
    return {name: res[i] for name, i in at.items()}


def _ordered(v: dict[str, float]) -> dict[str, float]:
    """The values in `FEATURE_NAMES` order (the models' vectors and tests rely on it)."""
    return {name: v[name] for name in FEATURE_NAMES}


_READ_TAILS = {
    rings: tuple((r, (RING_WINDOWS, ring_name(r.field, r.bucket_s), r.ring_size),
                  (len(r.windows), *(n for _, n in r.windows))) for r in rings)
    for rings in (_KEY_RINGS, _IP_RINGS)
}


def _window_reads(reads: Reads, rings: tuple[RingRead, ...], ts: float) -> None:
    """Queue one RING_WINDOWS read per ring, named after the ring."""
    for r, head, tail in _READ_TAILS[rings]:
        reads.read(head[1], *head, int(ts // r.bucket_s), *tail)


def _window_values(v: dict[str, float], rings: tuple[RingRead, ...], res: dict[str, Any],
                   ts: float) -> None:
    """Each window: its whole buckets plus the edge bucket weighted by the share of it
    still inside the window (see `features.windows`)."""
    for r in rings:
        frac = 1.0 - (ts % r.bucket_s) / r.bucket_s
        vals = res[ring_name(r.field, r.bucket_s)]
        for j, (name, _) in enumerate(r.windows):
            v[name] = vals[2 * j] + vals[2 * j + 1] * frac


def _novelty(reads: Reads, zname: str, member: str | None, ts: float, cap: int,
             window_s: float) -> None:
    """Queue: the set's size before, the add (when there is a member: `<zname>_new`),
    distinct members in the window (`<zname>_1h`)."""
    if member is not None:
        reads.read(f"{zname}_before", RECENT_COUNT, zname, ts, ALL_TIME_S)
        reads.read(f"{zname}_new", SEEN_ADD, zname, member, ts, cap)
    reads.read(f"{zname}_1h", RECENT_COUNT, zname, ts, window_s)


def _new_member(res: dict[str, Any], zname: str) -> float:
    """1.0 if the member is new to a key that had members before."""
    before = res.get(f"{zname}_before")
    return 1.0 if before and res[f"{zname}_new"] == 1 else 0.0


def _novelty_flags(v: dict[str, float], key: dict[str, Any], first_event: bool) -> None:
    """New endpoint, user agent and model (never on the key's first event: a new key is
    not novel everywhere), and the models used over the day."""
    v["new_endpoint_by_key"] = 0.0 if first_event else float(key["new_endpoint"])
    v["new_user_agent_by_key"] = 0.0 if first_event else float(key["new_user_agent"])
    new_model = key.get("new_model")
    v["new_model_by_key"] = 0.0 if first_event or new_model is None else float(new_model)
    v["distinct_models_by_key_24h"] = float(key["models_24h"])


def _regularity_values(v: dict[str, float], stats: Sequence[Any]) -> None:
    """Inter-arrival mean and variation, and how often sizes and prompts repeat."""
    r = dict(zip(REGULARITY_FIELDS, stats, strict=True))
    gap_n = r["gap:n"]
    gap_mean = float(r["gap:m"]) if gap_n is not None else 0.0
    if gap_n is not None and float(gap_n) >= MIN_GAPS:
        gap_sd = math.sqrt(max(float(r["gap:v"]), 0.0))
        cv = gap_sd / gap_mean if gap_mean > 0 else 0.0
    else:
        cv = 1.0
    v["interarrival_cv_by_key"] = cv
    v["interarrival_mean_s_by_key"] = gap_mean
    v["same_size_ratio_by_key"] = float(r["same:m"]) if r["same:n"] is not None else 0.0
    v["same_prompt_ratio_by_key"] = float(r["psame:m"]) if r["psame:n"] is not None else 0.0


def _population_rate(pop: dict[str, Any] | None, ts: float) -> tuple[
        float | None, float | None, float]:
    """The population's last hour against the same hour in earlier weeks (or days):
    (requests in the last hour, expected, ratio)."""
    if pop is None:
        return None, None, 1.0
    buckets = pop["hours"]
    pop_1h = buckets[0] + buckets[1] * (1.0 - (ts % 3600) / 3600)
    expected = _lag_mean(buckets, 2, len(POP_WEEK_LAGS))
    if expected is None:
        expected = _lag_mean(buckets, 2 + len(POP_WEEK_LAGS), len(POP_DAY_LAGS))
    ratio = pop_1h / max(expected, 1.0) if expected is not None else 1.0
    return pop_1h, expected, ratio


def _time_values(v: dict[str, float], ts: float) -> None:
    """Hour of day and day of week on the circle."""
    hour = (ts % 86400) / 3600
    day = (ts // 86400 + 3) % 7
    v["hour_of_day_sin"] = math.sin(2 * math.pi * hour / 24)
    v["hour_of_day_cos"] = math.cos(2 * math.pi * hour / 24)
    v["day_of_week_sin"] = math.sin(2 * math.pi * day / 7)
    v["day_of_week_cos"] = math.cos(2 * math.pi * day / 7)


def _counter_values(v: dict[str, float], key: dict[str, Any], ip: dict[str, Any] | None,
                    ts: float) -> None:
    """The windowed counters of the key and the address, their ratios, and the distinct
    addresses and keys each saw within the hour."""
    _window_values(v, _KEY_RINGS, key, ts)
    if ip is not None:
        _window_values(v, _IP_RINGS, ip, ts)
    else:
        for name in _IP_WINDOW_NAMES:
            v[name] = 0.0
    v["failure_ratio_by_key_5m"] = _ratio(v["errors_count_by_key_5m"],
                                          v["requests_count_by_key_5m"])
    v["auth_fail_ratio_by_key_5m"] = _ratio(v["auth_fail_count_by_key_5m"],
                                            v["requests_count_by_key_5m"])
    v["auth_fail_ratio_by_ip_5m"] = _ratio(v["auth_fail_count_by_ip_5m"],
                                           v["requests_count_by_ip_5m"])
    v["distinct_ips_by_key_1h"] = float(key.get("distinct_ips") or 0)
    v["distinct_keys_by_ip_1h"] = float(ip["distinct_keys"]) if ip else 0.0
    v["distinct_failed_keys_by_ip_1h"] = float(ip["failed_keys"]) if ip else 0.0


def _regularity_ops(k: Reads, event: Event) -> None:
    """Regularity: observations, updated by every event; the gap clock also tells whether
    this is the key's first event. A client stuck in a loop resends the same prompt (the
    completion, and so the total, varies from one answer to the next)."""
    ts = event.timestamp
    k.read("gap_last", EWM_GAP, EWM_SLOT["gap"], LAST_SLOT["gap"], ts, GAP_ALPHA, GAP_CAP_S)
    k.write(EWM_SAME, EWM_SLOT["same"], LAST_SLOT["same"], event.tokens, SAME_ALPHA)
    prompt = event.prompt_tokens if event.prompt_tokens is not None else event.tokens
    k.write(EWM_SAME, EWM_SLOT["psame"], LAST_SLOT["psame"], prompt, SAME_ALPHA)
    k.read("regularity", *_REGULARITY_GETS)
    _loop_ops(k, ts, prompt)


def _identity_ops(k: Reads, event: Event, asn: str | None) -> None:
    """Identity: is this network, prefix, client library known from normal traffic; how
    much of the key's normal traffic falls in this hour of day (±1 h)."""
    hod = int(event.timestamp // 3600) % 24
    k.read("identity", GETS, 10, NETWORK_OK + (asn or "-"),
           PREFIX_OK + (network_prefix(event.source_ip) or "-"),
           UA_FAMILY_OK + ua_family(event.user_agent), *IDENTITY_COUNTS.values(),
           _HOUR_SLOTS[(hod - 1) % 24],
           _HOUR_SLOTS[hod], _HOUR_SLOTS[(hod + 1) % 24], _HOUR_SLOTS[HOUR_TOTAL])


def _loop_ops(k: Reads, ts: float, prompt: float) -> None:
    """Regularity of the event's prompt-size sub-stream (one of `LOOP_BUCKETS`): gaps and
    whether the prompt repeats the sub-stream's previous one, read back as `loop`."""
    gaps, repeats, last_ts, last_prompt = _LOOP_SLOTS[int(prompt) % LOOP_BUCKETS]
    k.write(EWM_GAP, gaps, last_ts, ts, LOOP_ALPHA, LOOP_GAP_CAP_S)
    k.write(EWM_SAME, repeats, last_prompt, prompt, LOOP_ALPHA)
    k.read("loop", GETS, 5, f"{gaps}:m", f"{gaps}:v", f"{gaps}:n", f"{repeats}:m",
           f"{repeats}:n")


def _loop_values(v: dict[str, float], res: Sequence[Any]) -> None:
    """A runaway loop inside a busy key: the sub-stream's inter-arrival variation (1.0
    until it has `MIN_GAPS` gaps) and how often its prompt repeats."""
    gap_m, gap_v, gap_n, same_m, same_n = res
    cv = 1.0
    if gap_n is not None and float(gap_n) >= MIN_GAPS and float(gap_m) > 0:
        cv = math.sqrt(max(float(gap_v), 0.0)) / float(gap_m)
    v["loop_interarrival_cv_by_key"] = cv
    v["loop_same_prompt_ratio_by_key"] = float(same_m) if same_n is not None else 0.0


def _lag_mean(res: list[Any], start: int, count: int) -> float | None:
    """Mean of the hourly counts that have data (a zero bucket means no data yet)."""
    total, n = 0.0, 0
    for i in range(start, start + count):
        if res[i] > 0:
            total += res[i]
            n += 1
    return total / n if n else None


def _recurring(values: Sequence[float]) -> float:
    """What recurred at this hour: the smaller of the two previous days' (each the
    largest of the hour and its neighbours), or a week ago's."""
    day = [max(values[i:i + 3]) for i in range(0, 6, 3)]
    week = max(values[6:9])
    return max(min(day), week)


def _population_z(tokens_log: float, stats: Sequence[Any] | None) -> float:
    """The request's size against the population's for its model, in standard
    deviations (0.0 until the population has enough normal requests of the model)."""
    if not stats or stats[2] is None or float(stats[2]) < POP_SIZE_MIN_N:
        return 0.0
    mean, var = float(stats[0]), float(stats[1])
    return (tokens_log - mean) / max(math.sqrt(max(var, 0.0)), 0.25)


def _country_name(code: str | None) -> str | None:
    return country_name(code) if code else None


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else 0.0


def _ewm(stats: dict[str, Any], name: str) -> tuple[float, float, float]:
    """(mean, variance, count) of the EWM `name` (zeros before its first update)."""
    n = stats[f"{name}:n"]
    if n is None:
        return 0.0, 0.0, 0.0
    return float(stats[f"{name}:m"]), float(stats[f"{name}:v"]), float(n)


def _z(x: float, stats: tuple[float, float, float]) -> float:
    mean, var, n = stats
    if n < 2:
        return 0.0
    # a floor on the spread so that a key that always sends the same size is not
    # flagged for a one-token difference
    return (x - mean) / max(math.sqrt(var), 0.25)
