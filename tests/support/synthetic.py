"""Labelled synthetic feature vectors for the detectors' tests and speed/quality checks.

This is *not* the traffic simulator (``training/`` owns that, from raw events up). It draws
per-event feature vectors directly, shaped like the ones the feature extractor emits (heavy-tailed
counts, rare flags, ratios, a time-of-day encoding), and injects the attacks keywatch is for, each
with a random intensity so that some anomalies are subtle. It lets ``models/`` be tested with a
quality floor without depending on code written in parallel.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["ANOMALY_KINDS", "FEATURE_NAMES", "anomalies", "normal_traffic", "traffic"]

FEATURE_NAMES: list[str] = [
    "requests_count_by_key_1m",
    "requests_count_by_key_1h",
    "tokens_log1p",
    "latency_ms_log1p",
    "fail_ratio_by_key_5m",
    "auth_fail_ratio_by_key_5m",
    "distinct_ips_by_key_1h",
    "distinct_countries_by_key_1h",
    "geo_velocity_kmh",
    "new_country_flag",
    "interarrival_cv_by_key_5m",
    "endpoint_novelty",
    "requests_count_by_ip_5m",
    "hour_sin",
    "hour_cos",
]

ANOMALY_KINDS = ("runaway_loop", "leaked_key", "resource_drain", "resold_key", "stuffing")


def normal_traffic(n: int, rng: np.random.Generator) -> pd.DataFrame:
    """``n`` ordinary events from a population of keys with different habits."""
    key_rate = rng.lognormal(mean=1.2, sigma=0.7, size=n)  # requests/min habit of the key
    per_min = rng.poisson(key_rate).astype(float)
    hour = rng.uniform(0, 2 * np.pi, size=n)
    return pd.DataFrame(
        {
            "requests_count_by_key_1m": per_min,
            "requests_count_by_key_1h": rng.poisson(key_rate * 60).astype(float),
            "tokens_log1p": rng.normal(6.0, 0.6, size=n),
            "latency_ms_log1p": rng.normal(6.2, 0.35, size=n),
            "fail_ratio_by_key_5m": rng.beta(1.0, 40.0, size=n),
            "auth_fail_ratio_by_key_5m": rng.beta(0.3, 300.0, size=n),
            "distinct_ips_by_key_1h": 1.0 + rng.poisson(0.4, size=n),
            "distinct_countries_by_key_1h": 1.0 + rng.binomial(1, 0.03, size=n),
            "geo_velocity_kmh": rng.exponential(20.0, size=n) * rng.binomial(1, 0.2, size=n),
            "new_country_flag": rng.binomial(1, 0.004, size=n).astype(float),
            "interarrival_cv_by_key_5m": rng.gamma(6.0, 1.0 / 6.0, size=n),
            "endpoint_novelty": rng.binomial(1, 0.02, size=n).astype(float),
            "requests_count_by_ip_5m": rng.poisson(key_rate * 5).astype(float),
            "hour_sin": np.sin(hour),
            "hour_cos": np.cos(hour),
        },
        columns=FEATURE_NAMES,
    )


def anomalies(kind: str, n: int, rng: np.random.Generator) -> pd.DataFrame:
    """``n`` events of one attack pattern, each with its own intensity in ``[0.5, 1.5]``."""
    df = normal_traffic(n, rng)
    k = rng.uniform(0.5, 1.5, size=n)
    if kind == "runaway_loop":
        df["requests_count_by_key_1m"] = rng.poisson(60 * k).astype(float) + 20
        df["requests_count_by_key_1h"] = df["requests_count_by_key_1m"] * 55
        df["requests_count_by_ip_5m"] = df["requests_count_by_key_1m"] * 5
        df["interarrival_cv_by_key_5m"] = rng.uniform(0.0, 0.1, size=n)
    elif kind == "leaked_key":
        df["geo_velocity_kmh"] = rng.uniform(1500, 9000, size=n) * k
        df["new_country_flag"] = 1.0
        df["distinct_countries_by_key_1h"] = 2.0 + rng.poisson(k)
        df["distinct_ips_by_key_1h"] += rng.poisson(2 * k)
    elif kind == "resource_drain":
        df["tokens_log1p"] = rng.normal(9.0 + k, 0.3)
        df["latency_ms_log1p"] = rng.normal(8.0 + k / 2, 0.3)
    elif kind == "resold_key":
        df["distinct_ips_by_key_1h"] = 8.0 + rng.poisson(20 * k)
        df["distinct_countries_by_key_1h"] = 2.0 + rng.poisson(4 * k)
        df["endpoint_novelty"] = rng.binomial(1, 0.3, size=n).astype(float)
    elif kind == "stuffing":
        df["auth_fail_ratio_by_key_5m"] = np.clip(rng.normal(0.7 * k, 0.1), 0.2, 1.0)
        df["fail_ratio_by_key_5m"] = np.maximum(df["auth_fail_ratio_by_key_5m"], 0.3)
        df["requests_count_by_ip_5m"] = rng.poisson(200 * k).astype(float) + 50
    else:
        raise ValueError(f"unknown anomaly kind {kind!r}; expected one of {ANOMALY_KINDS}")
    return df


def traffic(
    n: int, *, anomaly_fraction: float = 0.02, seed: int = 0
) -> tuple[pd.DataFrame, np.ndarray]:
    """A shuffled mix of normal events and every anomaly kind.

    Returns
    -------
    (DataFrame, numpy.ndarray)
        The feature vectors (columns ``FEATURE_NAMES``) and a 0/1 label per row.
    """
    rng = np.random.default_rng(seed)
    n_anomalies = round(n * anomaly_fraction)
    parts = [normal_traffic(n - n_anomalies, rng)]
    labels = [np.zeros(n - n_anomalies, dtype=int)]
    for i, kind in enumerate(ANOMALY_KINDS):
        count = n_anomalies // len(ANOMALY_KINDS) + (i < n_anomalies % len(ANOMALY_KINDS))
        parts.append(anomalies(kind, count, rng))
        labels.append(np.ones(count, dtype=int))
    df = pd.concat(parts, ignore_index=True)
    y = np.concatenate(labels)
    order = rng.permutation(len(df))
    return df.iloc[order].reset_index(drop=True), y[order]
