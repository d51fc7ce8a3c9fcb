"""The feature space the models see: which features, and on what scale.

Counts and sums are heavy-tailed (a quiet key sends 3 requests a minute, a batch job
3,000), and a min-max scaled or axis-split model is blind below a few large values. The
models therefore see `log1p` of every count, sum and speed, and ratios, flags and z-scores
as they are. Raw clock encodings and key age are left out: they would make every new key
or unusual hour look anomalous by itself. The same transform serves the streaming path
(one dict) and training (a DataFrame), so the offline model is scored on exactly the
scale it was fitted on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd

MODEL_FEATURES: tuple[str, ...] = (
    "requests_count_by_key_1m",
    "requests_count_by_key_5m",
    "tokens_sum_by_key_5m",
    "failure_ratio_by_key_5m",
    "auth_fail_ratio_by_key_5m",
    "tokens_log_by_event",
    "tokens_zscore_by_key",
    "latency_zscore_by_key",
    "rate_vs_hour_of_week_by_key_1h",
    "key_rate_vs_population_1h",
    "distinct_ips_by_key_1h",
    "distinct_countries_by_key_1h",
    "distinct_asns_by_key_1h",
    "geo_speed_kmh_by_key",
    "new_country_by_key",
    "new_asn_by_key",
    "hosting_asn_by_event",
    "interarrival_cv_by_key",
    "same_size_ratio_by_key",
    "new_model_by_key",
    "new_user_agent_by_key",
    "prompt_completion_ratio_by_event",
    "distinct_keys_by_ip_1h",
    "auth_fail_ratio_by_ip_5m",
)

LOG_SCALED = frozenset({
    "requests_count_by_key_1m", "requests_count_by_key_5m", "tokens_sum_by_key_5m",
    "rate_vs_hour_of_week_by_key_1h", "key_rate_vs_population_1h", "distinct_ips_by_key_1h",
    "distinct_countries_by_key_1h", "distinct_asns_by_key_1h", "geo_speed_kmh_by_key",
    "distinct_keys_by_ip_1h",
})


def model_features(available: tuple[str, ...] | list[str]) -> list[str]:
    """The model features present in an extractor's schema, in model order."""
    have = set(available)
    return [f for f in MODEL_FEATURES if f in have]


def to_model_space(values: Mapping[str, float], names: list[str]) -> dict[str, float]:
    """One event's model vector (a dict, as River and the offline scorer take it)."""
    out: dict[str, float] = {}
    for name in names:
        v = float(values.get(name, 0.0))
        if name in LOG_SCALED:
            v = math.log1p(max(v, 0.0))
        out[name] = v
    return out


def frame_to_model_space(df: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    """The same transform over a DataFrame of batch features (for training)."""
    out = pd.DataFrame(index=df.index)
    for name in names:
        col = df[name].astype(float) if name in df.columns else pd.Series(0.0, index=df.index)
        out[name] = np.log1p(col.clip(lower=0.0)) if name in LOG_SCALED else col
    return out
