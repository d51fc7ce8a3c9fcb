"""Perturbed generator parameters: the same kinds of tenants and incidents, other numbers.

A detector whose thresholds were chosen on one simulation learns that simulation's
constants (this batch job's size, that leak's rate). A perturbation redraws them per
seed within wide ranges, the way traffic written by someone else would differ:

- every legitimate archetype's request rate and request size, each 0.3-3x (log-uniform);
- every incident kind's rate and size, each 0.3-3x;
- schedules shifted: every key's daily rhythm and batch hour by up to +-3 h, and the
  calendar (the simulation starts on another weekday of another month, with a month end
  in the judged days);
- the chat-model mix: each model's popularity multiplied by a log-normal factor.

`Perturbation.identity()` changes nothing; `Perturbation.draw(rng, ...)` draws one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import numpy as np

SCALE_RANGE = (0.3, 3.0)
SHIFT_RANGE_H = 3.0


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


@dataclass(frozen=True)
class Perturbation:
    """Multipliers and shifts applied on top of the archetypes' own parameter ranges."""

    rate: dict[str, float] = field(default_factory=dict)
    """Per legitimate archetype: request-rate multiplier (missing: 1)."""
    size: dict[str, float] = field(default_factory=dict)
    """Per legitimate archetype: request-size (tokens) multiplier."""
    attack_rate: dict[str, float] = field(default_factory=dict)
    """Per incident scenario: rate multiplier."""
    attack_size: dict[str, float] = field(default_factory=dict)
    """Per incident scenario: request-size multiplier."""
    shift_h: float = 0.0
    """Added to every key's daily rhythm and batch start hour."""
    model_mix: dict[str, float] = field(default_factory=dict)
    """Per chat model: popularity multiplier."""
    start: datetime | None = None
    """Simulation start (None: the simulator's default)."""

    @classmethod
    def identity(cls) -> Perturbation:
        return cls()

    @property
    def is_identity(self) -> bool:
        return self == Perturbation()

    @classmethod
    def draw(cls, rng: np.random.Generator, *, archetypes: tuple[str, ...],
             scenarios: tuple[str, ...], models: tuple[str, ...], days: int) -> Perturbation:
        lo, hi = SCALE_RANGE
        return cls(
            rate={a: _log_uniform(rng, lo, hi) for a in archetypes},
            size={a: _log_uniform(rng, lo, hi) for a in archetypes},
            attack_rate={s: _log_uniform(rng, lo, hi) for s in scenarios},
            attack_size={s: _log_uniform(rng, lo, hi) for s in scenarios},
            shift_h=float(rng.uniform(-SHIFT_RANGE_H, SHIFT_RANGE_H)),
            model_mix={m: float(rng.lognormal(0.0, 0.8)) for m in models},
            start=_start_with_month_end(rng, days),
        )

    def rate_of(self, archetype: str) -> float:
        return self.rate.get(archetype, 1.0)

    def size_of(self, archetype: str) -> float:
        return self.size.get(archetype, 1.0)

    def attack_rate_of(self, scenario: str) -> float:
        return self.attack_rate.get(scenario, 1.0)

    def attack_size_of(self, scenario: str) -> float:
        return self.attack_size.get(scenario, 1.0)

    def describe(self) -> dict[str, object]:
        """JSON-able, rounded, for meta.json and the report."""
        def r(d: dict[str, float]) -> dict[str, float]:
            return {k: round(v, 3) for k, v in sorted(d.items())}

        return {"rate": r(self.rate), "size": r(self.size), "attack_rate": r(self.attack_rate),
                "attack_size": r(self.attack_size), "shift_h": round(self.shift_h, 2),
                "model_mix": r(self.model_mix),
                "start": self.start.isoformat() if self.start else None}


def _start_with_month_end(rng: np.random.Generator, days: int) -> datetime:
    """A start in 2024-2025 such that the last day of a month falls in the judged days
    (the last two), so month-end jobs run where they are judged; the weekday is random.
    In the past, because the event contract refuses timestamps from the future."""
    year = int(rng.choice([2024, 2025]))
    month = int(rng.integers(1, 13))
    first_next = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)
    month_end = first_next - timedelta(days=1)
    test_days = min(2, days)
    test_start = month_end - timedelta(days=int(rng.integers(0, test_days)))
    return test_start - timedelta(days=max(0, days - 2))
