"""Compiled kernels of the vectorised twin: the state that is a recurrence, not a sum.

Windowed counters are group-bys and cumulative sums (`features.twin`). What is left
depends on the order of events in a way no cumulative sum expresses: exponentially
weighted means (the learned baselines, inter-arrival gaps, repeated sizes), capped sets
that forget their oldest member, the last location, rings of learned hours. These
kernels walk the events once, in order, over state held in flat arrays indexed by
integer codes (entities and members coded in the string order the stores sort by), and
apply exactly the store operations of `features.stores.memory` that `features.extractor`
plans, so the features agree to 1e-9. numba compiles them to machine code (and caches
the result), which is what makes one pass over millions of events take seconds.

Conventions: a missing value is NaN (a field never written), an EWM is (mean, variance,
count) with count 0 for "never updated", a ring is (stamps, values) with stamp -1 for an
empty slot, a set is a slice of the shared member/time arrays (`SetStore`).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from features.catalogue import FEATURE_NAMES

EARTH_RADIUS_KM = 6371.0088


@njit(cache=True)
def ewm_update(e: np.ndarray, x: float, alpha: float) -> None:
    """EWM of mean and variance, as the stores do (first value: mean x, variance 0)."""
    if e[2] == 0.0:
        e[0] = x
        e[1] = 0.0
        e[2] = 1.0
        return
    m = e[0]
    diff = x - m
    incr = alpha * diff
    e[0] = m + incr
    e[1] = (1 - alpha) * (e[1] + diff * incr)
    e[2] = e[2] + 1.0


@njit(cache=True)
def ring_add(stamps: np.ndarray, values: np.ndarray, stamp: int, amount: float) -> None:
    """RING_ADD on one ring (a late stamp whose slot moved on is dropped)."""
    slot = stamp % stamps.shape[0]
    held = stamps[slot]
    if held == -1:
        stamps[slot] = stamp
        values[slot] = amount
    elif held <= stamp:
        if held != stamp:
            stamps[slot] = stamp
            values[slot] = 0.0
        values[slot] += amount


@njit(cache=True)
def ring_max(stamps: np.ndarray, values: np.ndarray, stamp: int, value: float) -> None:
    """RING_MAX: the bucket keeps the largest value of its stamp."""
    slot = stamp % stamps.shape[0]
    held = stamps[slot]
    if held == -1 or (held <= stamp and (held != stamp or value > values[slot])):
        stamps[slot] = stamp
        values[slot] = value


@njit(cache=True)
def ring_get(stamps: np.ndarray, values: np.ndarray, stamp: int) -> float:
    slot = stamp % stamps.shape[0]
    return values[slot] if stamps[slot] == stamp else 0.0


@njit(cache=True)
def set_add(off: np.ndarray, size: np.ndarray, mem: np.ndarray, tim: np.ndarray,
            oldest: np.ndarray, s: int, member: int, ts: float, window: float,
            cap: int) -> tuple[bool, int]:
    """SEEN_ADD (window 0) or RECENT_ADD on set `s`: (member was new, size after).
    `oldest[s]` is at most the set's oldest time, so the stale sweep runs only when
    some member may have left the window."""
    lo = off[s]
    n = size[s]
    j = -1
    for q in range(lo, lo + n):
        if mem[q] == member:
            j = q
            break
    new = j < 0
    if new:
        mem[lo + n] = member
        tim[lo + n] = ts
        n += 1
        oldest[s] = min(oldest[s], ts)
    elif tim[j] < ts:
        tim[j] = ts
    if window > 0.0 and oldest[s] <= ts - window:
        cutoff = ts - window
        w = lo
        low = np.inf
        for q in range(lo, lo + n):
            if tim[q] > cutoff:
                mem[w] = mem[q]
                tim[w] = tim[q]
                low = min(low, tim[q])
                w += 1
        n = w - lo
        oldest[s] = low
    if n > cap:  # one over: forget the oldest (ties: the smallest member, as Redis)
        o = lo
        for q in range(lo + 1, lo + n):
            if tim[q] < tim[o] or (tim[q] == tim[o] and mem[q] < mem[o]):
                o = q
        mem[o] = mem[lo + n - 1]
        tim[o] = tim[lo + n - 1]
        n -= 1
    size[s] = n
    return new, n


@njit(cache=True)
def set_count(off: np.ndarray, size: np.ndarray, tim: np.ndarray, s: int, ts: float,
              window: float) -> int:
    """RECENT_COUNT: members seen after ts - window."""
    cutoff = ts - window
    c = 0
    for q in range(off[s], off[s] + size[s]):
        if tim[q] > cutoff:
            c += 1
    return c


@njit(cache=True)
def haversine_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(a)))


@njit(cache=True)
def recurring(stamps: np.ndarray, values: np.ndarray, stamp_h: int) -> float:
    """What recurred at this hour: the smaller of the two previous days' (each the
    largest of the hour and its neighbours), or a week ago's."""
    return max(min(_hour_max(stamps, values, stamp_h - 24),
                   _hour_max(stamps, values, stamp_h - 48)),
               _hour_max(stamps, values, stamp_h - 168))


@njit(cache=True)
def _hour_max(stamps: np.ndarray, values: np.ndarray, stamp: int) -> float:
    """The largest of the hour and its neighbours (buckets are never negative)."""
    return max(ring_get(stamps, values, stamp - 1), ring_get(stamps, values, stamp),
               ring_get(stamps, values, stamp + 1))


@njit(cache=True)
def past_day_max(stamps: np.ndarray, values: np.ndarray, stamp_h: int) -> float:
    """Largest bucket of the 23 hours that ended at least an hour ago (0 if none)."""
    m = 0.0
    for h in range(stamp_h - 2, stamp_h - 25, -1):
        m = max(m, ring_get(stamps, values, h))
    return m


@njit(cache=True)
def zscore(x: float, e: np.ndarray) -> float:
    if e[2] < 2:
        return 0.0
    return (x - e[0]) / max(math.sqrt(e[1]), 0.25)


# ---- event columns ---------------------------------------------------------------------
# integer columns of `ei` (codes; -1 = none)
(I_KEY, I_IP, I_S_IPS, I_S_CIPS, I_S_EP, I_S_UA, I_S_MDL, I_S_CC, I_S_ASN, I_S_IPKEYS,
 I_S_IPFKEYS, I_EP, I_UA, I_MODEL, I_COUNTRY, I_ASN, I_F_ASNO, I_F_NET, I_F_PFX, I_F_UAF,
 I_F_TCC, I_PSZ, I_HAS_PREFIX, I_AUTH_FAIL, I_HOSTING, I_LOCATED) = range(26)
N_INT = 26
# float columns of `ef`
(F_TS, F_TOKENS, F_PROMPT, F_TOKENS_LOG, F_LATENCY_LOG, F_COST, F_LAT, F_LON, F_R1H, F_R5M,
 F_SPEND1H) = range(11)
N_FLOAT = 11
# the key's EWMs (kew) and scalars (ks, NaN = never written) and counts (kc)
E_TOK, E_LAT, E_RATE, E_HOST, E_GAP, E_SAME, E_PSAME = range(7)
(S_GAP_LAST, S_SAME_LAST, S_PSAME_LAST, S_LAST_NORMAL, S_FIRST, S_GEO_LAT, S_GEO_LON,
 S_GEO_TS, S_TGEO_LAT, S_TGEO_LON, S_TGEO_TS) = range(11)
C_NET_N, C_PFX_N, C_UA_N, C_HOURS_N = range(4)
C_HOUR0 = 4
# the key's learned hour rings: recurrence (RECUR_RING_SIZE) and normal peaks (26)
R_REQ, R_SPEND, R_SIZE = range(3)
N_SPEND_OK, N_SIZE_OK = range(2)

_COL = {name: i for i, name in enumerate(FEATURE_NAMES)}
O_DIST_IPS = _COL["distinct_ips_by_key_1h"]
O_DIST_KEYS = _COL["distinct_keys_by_ip_1h"]
O_DIST_FKEYS = _COL["distinct_failed_keys_by_ip_1h"]
O_TOKZ = _COL["tokens_zscore_by_key"]
O_TOK_PEAK = _COL["tokens_peak_by_key_24h"]
O_TOK_VS_PEAK = _COL["tokens_vs_peak_by_key_24h"]
O_LATZ = _COL["latency_zscore_by_key"]
O_HISTORY = _COL["history_events_by_key"]
O_RATE_HOW = _COL["rate_vs_hour_of_week_by_key_1h"]
O_RATE_5M = _COL["rate_vs_baseline_by_key_5m"]
O_POP_RATE = _COL["population_rate_vs_hour_of_week_1h"]
O_KEY_VS_POP = _COL["key_rate_vs_population_1h"]
O_GEO_DIST = _COL["geo_distance_km_by_key"]
O_GEO_ELAPSED = _COL["geo_elapsed_s_by_key"]
O_GEO_SPEED = _COL["geo_speed_kmh_by_key"]
O_NEW_CC = _COL["new_country_by_key"]
O_NEW_ASN = _COL["new_asn_by_key"]
O_HOST_SHARE = _COL["hosting_share_by_key"]
O_UNTRUSTED_HOST = _COL["untrusted_hosting_asn_by_event"]
O_CC_1H = _COL["distinct_countries_by_key_1h"]
O_ASN_1H = _COL["distinct_asns_by_key_1h"]
O_CC_SEEN = _COL["countries_seen_by_key"]
O_T_DIST = _COL["trusted_geo_distance_km_by_key"]
O_T_ELAPSED = _COL["trusted_geo_elapsed_s_by_key"]
O_T_SPEED = _COL["trusted_geo_speed_kmh_by_key"]
O_UNTRUSTED_CC = _COL["untrusted_country_by_key"]
O_COUNTRY_IPS = _COL["distinct_ips_in_country_by_key_1h"]
O_UNTRUSTED_NET = _COL["untrusted_network_by_event"]
O_UNTRUSTED_PFX = _COL["untrusted_prefix_by_event"]
O_UNTRUSTED_UA = _COL["untrusted_ua_family_by_event"]
O_TRUSTED_NETS = _COL["trusted_networks_by_key"]
O_HOUR_SHARE = _COL["hour_share_by_key"]
O_LAST_NORMAL = _COL["last_normal_age_s_by_key"]
O_KNOWN = _COL["known_identity_by_event"]
O_RECUR_REQ = _COL["recurring_requests_1h_by_key"]
O_RECUR_SPEND = _COL["recurring_spend_usd_1h_by_key"]
O_RECUR_SIZE = _COL["recurring_tokens_peak_by_key"]
O_KEY_AGE = _COL["key_age_h_by_key"]
O_POP_Z = _COL["tokens_vs_population_z_by_event"]
O_CV = _COL["interarrival_cv_by_key"]
O_GAP_MEAN = _COL["interarrival_mean_s_by_key"]
O_SAME = _COL["same_size_ratio_by_key"]
O_PSAME = _COL["same_prompt_ratio_by_key"]
O_NEW_EP = _COL["new_endpoint_by_key"]
O_NEW_UA = _COL["new_user_agent_by_key"]
O_NEW_MODEL = _COL["new_model_by_key"]
O_MODELS_24H = _COL["distinct_models_by_key_24h"]
O_SPEND_RATE = _COL["spend_rate_vs_baseline_by_key_1h"]

DISTINCT_CAP, COUNTRY_IPS_CAP = 512, 64
ENDPOINT_CAP, USER_AGENT_CAP, MODEL_CAP, COUNTRY_CAP, ASN_CAP = 256, 64, 64, 64, 128
NETWORK_CAP, PREFIX_CAP, UA_FAMILY_CAP = 64, 256, 32
GAP_ALPHA, GAP_CAP_S, MIN_GAPS, SAME_ALPHA = 0.1, 3600.0, 5.0, 0.1
ALL_TIME_S = 1e12
MIN_TRAVEL_ELAPSED_S = 60.0
SIZE_PEAK_FLOOR_TOKENS, SPEND_BASELINE_FLOOR_USD = 256.0, 0.10
POP_SIZE_MIN_N, NEVER_S = 100.0, 1e9
POP_WEEK_LAGS = (168, 336, 504, 672)
POP_DAY_LAGS = (24, 48, 72, 96, 120, 144)


@njit(cache=True)
def key_sets(i: int, ei: np.ndarray, ef: np.ndarray, off: np.ndarray, size: np.ndarray,
             mem: np.ndarray, tim: np.ndarray, oldest: np.ndarray, first: bool,
             o: np.ndarray) -> None:
    """The key's capped sets: addresses in the hour (all and in this country), and the
    novelty of endpoint, user agent, model, country and network."""
    ts = ef[i, F_TS]
    if ei[i, I_IP] >= 0:
        o[O_DIST_IPS] = set_add(off, size, mem, tim, oldest, ei[i, I_S_IPS], ei[i, I_IP], ts,
                                     3600.0, DISTINCT_CAP)[1]
        o[O_COUNTRY_IPS] = set_add(off, size, mem, tim, oldest, ei[i, I_S_CIPS], ei[i, I_IP],
                                        ts, 3600.0, COUNTRY_IPS_CAP)[1]
    new_ep = set_add(off, size, mem, tim, oldest, ei[i, I_S_EP], ei[i, I_EP], ts, 0.0,
                     ENDPOINT_CAP)[0]
    new_ua = set_add(off, size, mem, tim, oldest, ei[i, I_S_UA], ei[i, I_UA], ts, 0.0,
                     USER_AGENT_CAP)[0]
    o[O_NEW_EP] = 0.0 if first or not new_ep else 1.0
    o[O_NEW_UA] = 0.0 if first or not new_ua else 1.0
    if ei[i, I_MODEL] >= 0:
        new_model = set_add(off, size, mem, tim, oldest, ei[i, I_S_MDL], ei[i, I_MODEL], ts, 0.0,
                            MODEL_CAP)[0]
        o[O_NEW_MODEL] = 0.0 if first or not new_model else 1.0
    o[O_MODELS_24H] = set_count(off, size, tim, ei[i, I_S_MDL], ts, 86400.0)
    for s_col, m_col, cap, o_new, o_1h in ((I_S_CC, I_COUNTRY, COUNTRY_CAP, O_NEW_CC, O_CC_1H),
                                           (I_S_ASN, I_ASN, ASN_CAP, O_NEW_ASN, O_ASN_1H)):
        s = ei[i, s_col]
        if ei[i, m_col] >= 0:
            before = set_count(off, size, tim, s, ts, ALL_TIME_S)
            new = set_add(off, size, mem, tim, oldest, s, ei[i, m_col], ts, 0.0, cap)[0]
            o[o_new] = 1.0 if before > 0 and new else 0.0
            if m_col == I_COUNTRY:
                o[O_CC_SEEN] = before
        o[o_1h] = set_count(off, size, tim, s, ts, 3600.0)


@njit(cache=True)
def key_regularity(i: int, ei: np.ndarray, ef: np.ndarray, kew: np.ndarray, ks: np.ndarray,
                   o: np.ndarray) -> None:
    """Inter-arrival gaps and repeated sizes and prompts (EWM_GAP, EWM_SAME)."""
    k = ei[i, I_KEY]
    ts = ef[i, F_TS]
    held = ks[k, S_GAP_LAST]
    if math.isnan(held):
        ks[k, S_GAP_LAST] = ts
    elif ts - held >= 0:
        gap = ts - held
        ewm_update(kew[k, E_GAP], gap if gap < GAP_CAP_S else GAP_CAP_S, GAP_ALPHA)
        ks[k, S_GAP_LAST] = ts
    for col, e, x in ((S_SAME_LAST, E_SAME, ef[i, F_TOKENS]),
                      (S_PSAME_LAST, E_PSAME, ef[i, F_PROMPT])):
        held = ks[k, col]
        if not math.isnan(held):
            ewm_update(kew[k, e], 1.0 if held == x else 0.0, SAME_ALPHA)
        ks[k, col] = x
    g = kew[k, E_GAP]
    mean = g[0] if g[2] > 0 else 0.0
    cv = 1.0
    if g[2] >= MIN_GAPS:
        cv = math.sqrt(max(g[1], 0.0)) / mean if mean > 0 else 0.0
    o[O_CV] = cv
    o[O_GAP_MEAN] = mean
    o[O_SAME] = kew[k, E_SAME, 0] if kew[k, E_SAME, 2] > 0 else 0.0
    o[O_PSAME] = kew[k, E_PSAME, 0] if kew[k, E_PSAME, 2] > 0 else 0.0


@njit(cache=True)
def lag_sum(stamps: np.ndarray, values: np.ndarray, stamp_h: int,
            lags: tuple[int, ...]) -> tuple[float, int]:
    """Sum and number of the lagged hours that have data (0: no data yet)."""
    total, n = 0.0, 0
    for lag in lags:
        b = ring_get(stamps, values, stamp_h - lag)
        if b > 0:
            total += b
            n += 1
    return total, n


@njit(cache=True)
def population(i: int, ei: np.ndarray, ef: np.ndarray, pop_s: np.ndarray, pop_v: np.ndarray,
               psz: np.ndarray, o: np.ndarray) -> float:
    """Count the event in the population's hour ring; returns the population's last hour
    against the same hour in earlier weeks (or days); the request's size against the
    population's for its model."""
    ts = ef[i, F_TS]
    stamp_h = int(ts // 3600)
    ring_add(pop_s, pop_v, stamp_h, 1.0)
    pop_1h = ring_get(pop_s, pop_v, stamp_h) + ring_get(pop_s, pop_v, stamp_h - 1) * (
        1.0 - (ts % 3600) / 3600)
    total, n = lag_sum(pop_s, pop_v, stamp_h, POP_WEEK_LAGS)
    if n == 0:
        total, n = lag_sum(pop_s, pop_v, stamp_h, POP_DAY_LAGS)
    ratio = pop_1h / max(total / n, 1.0) if n else 1.0
    o[O_POP_RATE] = ratio
    e = psz[ei[i, I_PSZ]]
    z = 0.0
    if e[2] >= POP_SIZE_MIN_N:
        z = (ef[i, F_TOKENS_LOG] - e[0]) / max(math.sqrt(max(e[1], 0.0)), 0.25)
    o[O_POP_Z] = z
    return ratio


@njit(cache=True)
def key_baselines(i: int, ei: np.ndarray, ef: np.ndarray, kew: np.ndarray, how: np.ndarray,
                  kc: np.ndarray, ks: np.ndarray, rr_s: np.ndarray, rr_v: np.ndarray,
                  nr_s: np.ndarray, nr_v: np.ndarray, pop_ratio: float,
                  o: np.ndarray) -> None:
    """Size, latency and rate against the key's learned baselines and recurrences."""
    k = ei[i, I_KEY]
    ts = ef[i, F_TS]
    stamp_h = int(ts // 3600)
    tok, rate = kew[k, E_TOK], kew[k, E_RATE]
    o[O_TOKZ] = zscore(ef[i, F_TOKENS_LOG], tok)
    o[O_LATZ] = zscore(ef[i, F_LATENCY_LOG], kew[k, E_LAT])
    o[O_HISTORY] = tok[2]
    recur_req = recurring(rr_s[k, R_REQ], rr_v[k, R_REQ], stamp_h)
    recur_spend = recurring(rr_s[k, R_SPEND], rr_v[k, R_SPEND], stamp_h)
    recur_size = recurring(rr_s[k, R_SIZE], rr_v[k, R_SIZE], stamp_h)
    o[O_RECUR_REQ] = recur_req
    o[O_RECUR_SPEND] = recur_spend
    o[O_RECUR_SIZE] = recur_size
    peak = max(past_day_max(nr_s[k, N_SIZE_OK], nr_v[k, N_SIZE_OK], stamp_h), recur_size)
    o[O_TOK_PEAK] = peak
    o[O_TOK_VS_PEAK] = (ef[i, F_TOKENS] / max(peak, SIZE_PEAK_FLOOR_TOKENS)
                             if peak > 0 else 1.0)
    h = how[k, int((ts // 3600 + 72) % 168)]
    expected = max(h[0] if h[2] >= 3 else rate[0], recur_req)
    ratio = ef[i, F_R1H] / max(expected, 1.0) if rate[2] > 0 else 1.0
    o[O_RATE_HOW] = ratio
    o[O_RATE_5M] = ef[i, F_R5M] / max(expected / 12.0, 1.0) if rate[2] > 0 else 1.0
    o[O_KEY_VS_POP] = ratio / max(pop_ratio, 1.0)
    spend_peak = max(past_day_max(nr_s[k, N_SPEND_OK], nr_v[k, N_SPEND_OK], stamp_h),
                     recur_spend)
    o[O_SPEND_RATE] = (ef[i, F_SPEND1H] / max(spend_peak, SPEND_BASELINE_FLOOR_USD)
                            if spend_peak > 0 else 1.0)
    first = ks[k, S_FIRST]
    o[O_KEY_AGE] = 0.0 if math.isnan(first) else max(0.0, ts - first) / 3600.0


@njit(cache=True)
def key_geo(i: int, ei: np.ndarray, ef: np.ndarray, kew: np.ndarray, ks: np.ndarray,
            flags: np.ndarray, o: np.ndarray) -> float:
    """Travel since the key's previous located event and since its last one judged
    normal; returns the latter's time (NaN: none), which learning needs."""
    k = ei[i, I_KEY]
    ts = ef[i, F_TS]
    host = kew[k, E_HOST]
    o[O_HOST_SHARE] = host[0] if host[2] > 0 else 0.0
    f = ei[i, I_F_ASNO]
    o[O_UNTRUSTED_HOST] = 1.0 if f >= 0 and host[2] > 0 and not flags[f] else 0.0
    trusted_ts = np.nan
    if not ei[i, I_LOCATED]:
        return trusted_ts
    lat, lon = ef[i, F_LAT], ef[i, F_LON]
    if not math.isnan(ks[k, S_GEO_TS]):
        elapsed = abs(ts - ks[k, S_GEO_TS])
        d = haversine_km(ks[k, S_GEO_LAT], ks[k, S_GEO_LON], lat, lon)
        o[O_GEO_DIST] = d
        o[O_GEO_ELAPSED] = elapsed
        o[O_GEO_SPEED] = d / max(elapsed, MIN_TRAVEL_ELAPSED_S) * 3600.0
    ks[k, S_GEO_LAT], ks[k, S_GEO_LON], ks[k, S_GEO_TS] = lat, lon, ts
    trusted_ts = ks[k, S_TGEO_TS]
    if not math.isnan(trusted_ts):
        elapsed = abs(ts - trusted_ts)
        d = haversine_km(ks[k, S_TGEO_LAT], ks[k, S_TGEO_LON], lat, lon)
        o[O_T_DIST] = d
        o[O_T_ELAPSED] = elapsed
        o[O_T_SPEED] = d / max(elapsed, MIN_TRAVEL_ELAPSED_S) * 3600.0
        f = ei[i, I_F_TCC]
        o[O_UNTRUSTED_CC] = 1.0 if ei[i, I_COUNTRY] >= 0 and not (
            f >= 0 and flags[f]) else 0.0
    return trusted_ts


@njit(cache=True)
def _untrusted(ok: bool, n: float, cap: int, known: bool) -> float:
    # new only for a key whose normal traffic is known and not saturated
    return 1.0 if known and not ok and 0 < n < cap else 0.0


@njit(cache=True)
def key_identity(i: int, ei: np.ndarray, ef: np.ndarray, kc: np.ndarray, ks: np.ndarray,
                 flags: np.ndarray, o: np.ndarray) -> tuple[bool, bool, bool]:
    """The event's network, prefix and client library against the key's normal traffic,
    and that traffic's share in this hour of day; returns which of them learning adds."""
    k = ei[i, I_KEY]
    ts = ef[i, F_TS]
    net_ok = flags[ei[i, I_F_NET]]
    pfx_ok = ei[i, I_F_PFX] >= 0 and flags[ei[i, I_F_PFX]]
    ua_ok = flags[ei[i, I_F_UAF]]
    net_n, pfx_n, ua_n = kc[k, C_NET_N], kc[k, C_PFX_N], kc[k, C_UA_N]
    has_asn = ei[i, I_ASN] >= 0
    o[O_UNTRUSTED_NET] = _untrusted(net_ok, net_n, NETWORK_CAP, has_asn)
    o[O_UNTRUSTED_PFX] = _untrusted(pfx_ok, pfx_n, PREFIX_CAP, ei[i, I_HAS_PREFIX] > 0)
    o[O_UNTRUSTED_UA] = _untrusted(ua_ok, ua_n, UA_FAMILY_CAP, True)
    o[O_TRUSTED_NETS] = net_n
    hod = int(ts // 3600) % 24
    total = kc[k, C_HOURS_N]
    near = (kc[k, C_HOUR0 + (hod - 1) % 24] + kc[k, C_HOUR0 + hod]
            + kc[k, C_HOUR0 + (hod + 1) % 24])
    o[O_HOUR_SHARE] = near / total if total > 0 else 1.0
    last = ks[k, S_LAST_NORMAL]
    o[O_LAST_NORMAL] = NEVER_S if math.isnan(last) else max(0.0, ts - last)
    o[O_KNOWN] = 1.0 if ((net_ok or pfx_ok or not has_asn)
                              and (ua_ok or ua_n == 0)) else 0.0
    return (not net_ok and net_n < NETWORK_CAP, not pfx_ok and pfx_n < PREFIX_CAP,
            not ua_ok and ua_n < UA_FAMILY_CAP)


@njit(cache=True)
def ip_sets(i: int, ei: np.ndarray, ef: np.ndarray, off: np.ndarray, size: np.ndarray,
            mem: np.ndarray, tim: np.ndarray, oldest: np.ndarray, o: np.ndarray) -> None:
    """Distinct keys, and keys refused credentials, from the address in the hour."""
    if ei[i, I_IP] < 0:
        return
    ts, k = ef[i, F_TS], ei[i, I_KEY]
    o[O_DIST_KEYS] = set_add(off, size, mem, tim, oldest, ei[i, I_S_IPKEYS], k, ts, 3600.0,
                                  DISTINCT_CAP)[1]
    s = ei[i, I_S_IPFKEYS]
    if ei[i, I_AUTH_FAIL]:
        o[O_DIST_FKEYS] = set_add(off, size, mem, tim, oldest, s, k, ts, 3600.0, DISTINCT_CAP)[1]
    else:
        o[O_DIST_FKEYS] = set_count(off, size, tim, s, ts, 3600.0)


@njit(cache=True)
def learn(i: int, ei: np.ndarray, ef: np.ndarray, kew: np.ndarray, how: np.ndarray,
          kc: np.ndarray, ks: np.ndarray, rr_s: np.ndarray, rr_v: np.ndarray,
          nr_s: np.ndarray, nr_v: np.ndarray, flags: np.ndarray, psz: np.ndarray,
          new: tuple[bool, bool, bool], trusted_ts: float, alphas: tuple[float, float],
          o: np.ndarray) -> None:
    """The baseline updates of an event judged normal (`FeatureExtractor.learn_ops`)."""
    k = ei[i, I_KEY]
    ts = ef[i, F_TS]
    stamp_h = int(ts // 3600)
    cost, tokens = ef[i, F_COST], ef[i, F_TOKENS]
    ewm_alpha, how_alpha = alphas
    # recurrence
    ring_add(rr_s[k, R_REQ], rr_v[k, R_REQ], stamp_h, 1.0)
    if cost:
        ring_add(rr_s[k, R_SPEND], rr_v[k, R_SPEND], stamp_h, cost)
        ring_add(nr_s[k, N_SPEND_OK], nr_v[k, N_SPEND_OK], stamp_h, cost)
    if tokens:
        ring_max(rr_s[k, R_SIZE], rr_v[k, R_SIZE], stamp_h, tokens)
        ring_max(nr_s[k, N_SIZE_OK], nr_v[k, N_SIZE_OK], stamp_h, tokens)
        ewm_update(psz[ei[i, I_PSZ]], ef[i, F_TOKENS_LOG], ewm_alpha / 4)
    if not o[O_KEY_AGE]:
        ks[k, S_FIRST] = ts
    # identity
    ks[k, S_LAST_NORMAL] = ts
    for j, (f, member, count) in enumerate(((ei[i, I_F_NET], ei[i, I_ASN] >= 0, C_NET_N),
                                            (ei[i, I_F_PFX], ei[i, I_HAS_PREFIX] > 0,
                                             C_PFX_N),
                                            (ei[i, I_F_UAF], True, C_UA_N))):
        if new[j] and member:
            flags[f] = True
            kc[k, count] += 1.0
    kc[k, C_HOUR0 + stamp_h % 24] += 1.0
    kc[k, C_HOURS_N] += 1.0
    # baselines
    rate = ef[i, F_R1H]
    ewm_update(kew[k, E_TOK], ef[i, F_TOKENS_LOG], ewm_alpha)
    ewm_update(kew[k, E_LAT], ef[i, F_LATENCY_LOG], ewm_alpha)
    ewm_update(kew[k, E_RATE], rate, ewm_alpha)
    ewm_update(how[k, int((ts // 3600 + 72) % 168)], rate, how_alpha)
    hosting = ei[i, I_HOSTING] > 0
    ewm_update(kew[k, E_HOST], 1.0 if hosting else 0.0, ewm_alpha)
    if hosting and ei[i, I_F_ASNO] >= 0:
        flags[ei[i, I_F_ASNO]] = True
    # trusted place
    if ei[i, I_LOCATED] and (math.isnan(trusted_ts) or ts >= trusted_ts):
        ks[k, S_TGEO_LAT], ks[k, S_TGEO_LON] = ef[i, F_LAT], ef[i, F_LON]
        ks[k, S_TGEO_TS] = ts
    if ei[i, I_F_TCC] >= 0 and (math.isnan(trusted_ts) or o[O_UNTRUSTED_CC]):
        flags[ei[i, I_F_TCC]] = True


@njit(cache=True)
def run(ei: np.ndarray, ef: np.ndarray, learned: np.ndarray, start: int, stop: int,
        kew: np.ndarray, how: np.ndarray, kc: np.ndarray, ks: np.ndarray, rr_s: np.ndarray,
        rr_v: np.ndarray, nr_s: np.ndarray, nr_v: np.ndarray, flags: np.ndarray,
        off: np.ndarray, size: np.ndarray, mem: np.ndarray, tim: np.ndarray,
        oldest: np.ndarray, pop_s: np.ndarray, pop_v: np.ndarray, psz: np.ndarray,
        alphas: tuple[float, float], out: np.ndarray) -> None:
    """Events start..stop-1, in order: each one's observations and features (into row
    i - start of `out`, columns in `FEATURE_NAMES` order), then (when it was judged
    normal) its learning, before the next event."""
    for i in range(start, stop):
        o = out[i - start]
        first = math.isnan(ks[ei[i, I_KEY], S_GAP_LAST])
        key_sets(i, ei, ef, off, size, mem, tim, oldest, first, o)
        key_regularity(i, ei, ef, kew, ks, o)
        ip_sets(i, ei, ef, off, size, mem, tim, oldest, o)
        pop_ratio = population(i, ei, ef, pop_s, pop_v, psz, o)
        key_baselines(i, ei, ef, kew, how, kc, ks, rr_s, rr_v, nr_s, nr_v, pop_ratio, o)
        trusted_ts = key_geo(i, ei, ef, kew, ks, flags, o)
        new = key_identity(i, ei, ef, kc, ks, flags, o)
        if learned[i]:
            learn(i, ei, ef, kew, how, kc, ks, rr_s, rr_v, nr_s, nr_v, flags, psz, new,
                  trusted_ts, alphas, o)


@njit(cache=True)
def scatter_rows(rows: np.ndarray, out: np.ndarray, start: int, stop: int,
                 cols: np.ndarray) -> None:
    """Copy the compiled pass's columns of events start..stop-1 from its row buffer
    (one event a row) into the column-wise output."""
    for c in cols:
        for i in range(stop - start):
            out[start + i, c] = rows[i, c]


@njit(cache=True)
def tiled_window(group: np.ndarray, stamp: np.ndarray, cum: np.ndarray, before: np.ndarray,
                 frac: np.ndarray, n: int, rows: np.ndarray, out: np.ndarray,
                 col: int) -> None:
    """One window over events sorted by entity, then time, from the entity's running
    sums: the whole buckets stamp-n+1..stamp (this event included, later ones of its
    bucket not) plus the edge bucket stamp-n weighted by `frac`. Two pointers walk the
    rows (the first of the entity in bucket stamp-n+1 or later, and stamp-n or later)."""
    lo = 0
    edge_lo = 0
    for r in range(len(group)):
        g, s = group[r], stamp[r]
        while group[lo] != g or stamp[lo] < s - n + 1:
            lo += 1
        while group[edge_lo] != g or stamp[edge_lo] < s - n:
            edge_lo += 1
        out[rows[r], col] = (cum[r] - before[lo]) + (before[lo] - before[edge_lo]) * frac[r]
