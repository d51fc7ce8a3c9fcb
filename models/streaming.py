"""A streaming anomaly detector for one key's univariate series, with mergeable state.

Each key's requests per minute, tokens per call and latency are univariate series with
a level that moves (a customer grows, a job starts), a daily rhythm, noise, and now and
then the anomaly we want: a spike, a sudden shift, a drift away from the pattern. A
windowed Gaussian (z-score over the last N points) reads every daily peak as an
anomaly and every step as one for a whole window. `SeasonalStream` instead predicts the
next point and scores how far it falls from the prediction, on the key's own scale:

* prediction = the point's phase of the day (hour of day: `phases` slots, a
  time-decayed mean each) corrected by how far the recent level (a fast decayed mean)
  has moved from the long-run level (a slow decayed mean of the same points). A phase
  never seen falls back to the recent level.
* residual scale = a decayed mean absolute residual, floored (`min_scale`) so a
  metronomic key does not turn a one-token change into an anomaly.
* score = the point's percentile among the key's own past normalised residuals (a
  decayed histogram of |z|), averaged with Cantelli's distribution-free bound
  z^2 / (1 + z^2) so that two points beyond everything seen are still ranked. The score
  reads the same on every key: 0.99 is "rarer than 99% of this key's normal points".

Learning is robust, so containment cannot feed itself: a point updates the means with
its residual clipped at `clip` scales, so a spike barely moves them, while a real shift
is learned within a few dozen points; after `shift_run` consecutive points beyond
`clip` scales on the same side, the recent level jumps to them (a new regime is a
change once, not an anomaly forever). Points the pipeline flags are scored but not
learned (`learn=False`).

State is a fixed list of floats. Every statistic is a time-decayed sum (weights
`2 ** -(age / half_life)`) held at a reference time, so two replicas' states of one key
merge by decaying both to the later reference time and adding (`merge`); the result is
the same whichever order the merges happen in. Only the run counter of the shift rule is
not a sum; a merge keeps the larger. In the service a replica does not write a key's
state back: it sends what learning one point added (`delta_since`), which the store
decays and adds to whatever the key holds (`DECAY_ADD`), so no replica's update is lost.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass

Z_EDGES: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0,
                              6.0, 8.0, 12.0, 20.0)
"""Bin edges of the |z| histogram: fine where normal points fall, coarse in the tail."""
N_BINS = len(Z_EDGES) + 1


@dataclass(frozen=True, slots=True)
class StreamParams:
    """Configuration shared by every key's series of one kind (not state)."""

    phases: int = 24
    """Slots of the daily cycle (24: hour of day); 1 for a series with no daily rhythm."""
    period_s: float = 86400.0
    fast_half_life_s: float = 2 * 3600.0
    """Half-life of the recent level."""
    slow_half_life_s: float = 3 * 86400.0
    """Half-life of the long-run level and of each phase's mean (a few periods)."""
    scale_half_life_s: float = 86400.0
    hist_half_life_s: float = 7 * 86400.0
    min_scale: float = 0.05
    """Floor of the residual scale, in the series' units (log1p units: ~5%)."""
    clip: float = 3.0
    shift_run: int = 8
    min_weight: float = 3.0
    """Decayed weight of learned points before a score is given (else 0.0, cold)."""
    log: bool = True
    """Model log1p(x): sizes and rates are multiplicative."""


# state layout: offsets into the float list
_T, _FW, _FS, _SW, _SS, _AW, _AS, _RUN, _HW = range(9)
_FIXED = 9


def state_size(p: StreamParams) -> int:
    return _FIXED + 2 * p.phases + N_BINS


def half_lives(p: StreamParams) -> list[float]:
    """Each state value's half-life, as a store's DECAY_ADD decays it (0 for the reference
    time, never added to; -1 for the shift rule's run counter, not a sum: the last write
    wins)."""
    hl = [0.0] * state_size(p)
    hl[_RUN] = -1.0
    hl[_FW] = hl[_FS] = p.fast_half_life_s
    hl[_SW] = hl[_SS] = p.slow_half_life_s
    hl[_AW] = hl[_AS] = p.scale_half_life_s
    hl[_HW] = p.hist_half_life_s
    for i in range(_FIXED, _FIXED + 2 * p.phases):
        hl[i] = p.slow_half_life_s
    for i in range(_FIXED + 2 * p.phases, len(hl)):
        hl[i] = p.hist_half_life_s
    return hl


class SeasonalStream:
    """One key's series: score a point (`score`), then learn it (`learn`).

    Examples
    --------
    >>> s = SeasonalStream(StreamParams(phases=1, fast_half_life_s=20, slow_half_life_s=200,
    ...                                 scale_half_life_s=50, hist_half_life_s=500))
    >>> for t in range(200):
    ...     _ = s.observe(t, 10.0 + (t % 3))
    >>> s.score(200, 11.0) < 0.9 < s.score(200, 500.0)
    True
    """

    __slots__ = ("p", "v")

    def __init__(self, params: StreamParams | None = None,
                 state: Sequence[float] | None = None) -> None:
        self.p = params or StreamParams()
        n = state_size(self.p)
        if state is None:
            self.v = [0.0] * n
        else:
            if len(state) != n:
                raise ValueError(f"a stream state has {n} values, not {len(state)}")
            self.v = [float(x) for x in state]

    @classmethod
    def wrap(cls, params: StreamParams, values: list[float]) -> SeasonalStream:
        """A stream over `values`, taken as they are (floats, the right length, not shared
        with anyone): a key's streams are rebuilt for every event, and copying and
        converting their state each time was a measurable part of scoring one."""
        out = cls.__new__(cls)
        out.p = params
        out.v = values
        return out

    # ---- time ------------------------------------------------------------------------
    def _decay_to(self, ts: float) -> None:
        """Bring every decayed sum to time `ts` (never backwards: a late point is
        counted at the reference time)."""
        v, p = self.v, self.p
        dt = ts - v[_T]
        if v[_T] == 0.0:
            v[_T] = ts
            return
        if dt <= 0:
            return
        f = 0.5 ** (dt / p.fast_half_life_s)
        s = 0.5 ** (dt / p.slow_half_life_s)
        a = 0.5 ** (dt / p.scale_half_life_s)
        h = 0.5 ** (dt / p.hist_half_life_s)
        v[_FW] *= f
        v[_FS] *= f
        v[_SW] *= s
        v[_SS] *= s
        v[_AW] *= a
        v[_AS] *= a
        v[_HW] *= h
        mid = _FIXED + 2 * p.phases
        v[_FIXED:mid] = [x * s for x in v[_FIXED:mid]]
        v[mid:] = [x * h for x in v[mid:]]
        v[_T] = ts

    def _phase(self, ts: float) -> int:
        p = self.p
        return int((ts % p.period_s) / p.period_s * p.phases) % p.phases

    # ---- model -----------------------------------------------------------------------
    def _y(self, x: float) -> float:
        return math.log1p(max(x, 0.0)) if self.p.log else float(x)

    def warm(self) -> bool:
        return self.v[_SW] >= self.p.min_weight

    def _base(self, ts: float) -> float:
        """The long-run expectation at `ts`: its phase's mean, or the overall mean for a
        phase not seen yet."""
        v, p = self.v, self.p
        i = _FIXED + 2 * self._phase(ts)
        if p.phases > 1 and v[i] > 0.5:
            return v[i + 1] / v[i]
        return v[_SS] / v[_SW] if v[_SW] > 1e-12 else 0.0

    def predict(self, ts: float) -> tuple[float, float]:
        """(prediction, residual scale) at `ts`, in model units (state unchanged): the
        long-run expectation plus the recent offset from it (the level's recent move)."""
        v, p = self.v, self.p
        offset = v[_FS] / v[_FW] if v[_FW] > 1e-12 else 0.0
        scale = v[_AS] / v[_AW] * 1.25 if v[_AW] > 1e-12 else p.min_scale
        return self._base(ts) + offset, max(scale, p.min_scale)

    def zscore(self, ts: float, x: float) -> float:
        """Signed residual of `x` against the prediction, in residual scales."""
        pred, scale = self.predict(ts)
        return (self._y(x) - pred) / scale

    def score(self, ts: float, x: float) -> float:
        """Anomaly score in [0, 1] of `x` at `ts` (0.0 while cold)."""
        if not self.warm():
            return 0.0
        return self.score_of_z(self.zscore(ts, x))

    def score_of_z(self, z: float) -> float:
        """The score of a point whose `zscore` is `z` (for a caller that needs both)."""
        z = abs(z)
        return (self._hist_percentile(z) + z * z / (1.0 + z * z)) / 2.0

    def _hist_percentile(self, z: float) -> float:
        v, p = self.v, self.p
        base = _FIXED + 2 * p.phases
        total = v[_HW]
        if total <= 1e-12:
            return 0.5
        b = bisect_right(Z_EDGES, z)
        below = sum(v[base:base + b])
        return min(1.0, (below + 0.5 * v[base + b]) / total)

    def tracks_regime(self, ts: float, x: float) -> bool:
        """Whether `x` at `ts` moves the shift rule's run (it is beyond `clip` scales, or a
        run is under way that it continues or ends): a point that is not learned must
        still be shown to `learn(flagged=True)` then."""
        return self.warm() and (self.v[_RUN] != 0.0 or abs(self.zscore(ts, x)) > self.p.clip)

    def learn(self, ts: float, x: float, *, flagged: bool = False) -> None:
        """Learn one point, robustly (its residual clipped). A point the pipeline flagged
        is not learned, but it still counts towards the shift rule: a level that stays
        beyond `clip` scales for `shift_run` points is a new regime, and the recent level
        jumps to it, so being flagged cannot keep a key flagged for ever."""
        p = self.p
        y = self._y(x)
        pred, scale = self.predict(ts) if self.v[_SW] > 0 else (y, p.min_scale)
        r = y - pred
        warm = self.warm()
        self._decay_to(ts)
        v = self.v
        if warm:
            z = r / scale
            if abs(z) > p.clip:
                step = math.copysign(1.0, z)
                v[_RUN] = v[_RUN] + step if v[_RUN] * z > 0 else step
            else:
                v[_RUN] = 0.0
            if abs(v[_RUN]) >= p.shift_run:  # a new regime: the recent level jumps to it
                v[_FS] = v[_FW] * (y - self._base(ts))
                v[_RUN] = 0.0
                return
            if flagged:
                return
            v[_HW] += 1.0
            v[_FIXED + 2 * p.phases + bisect_right(Z_EDGES, abs(z))] += 1.0
            clipped = pred + max(-p.clip * scale, min(p.clip * scale, r))
            abs_r = min(abs(r), 2 * p.clip * scale)
        elif flagged:
            return
        else:
            clipped, abs_r = y, abs(r)
        base = self._base(ts) if v[_SW] > 0 else clipped
        v[_FW] += 1.0
        v[_FS] += clipped - base
        v[_SW] += 1.0
        v[_SS] += clipped
        i = _FIXED + 2 * self._phase(ts)
        v[i] += 1.0
        v[i + 1] += clipped
        v[_AW] += 1.0
        v[_AS] += abs_r

    def observe(self, ts: float, x: float, *, learn: bool = True) -> float:
        """Score, then learn unless told not to; returns the score."""
        s = self.score(ts, x)
        self.learn(ts, x, flagged=not learn)
        return s

    # ---- replicas ----------------------------------------------------------------------
    @property
    def ref_time(self) -> float:
        return self.v[_T]

    def at(self, ts: float) -> SeasonalStream:
        """A copy whose reference time is `ts` (0: a fresh state)."""
        out = SeasonalStream.wrap(self.p, self.v.copy())
        out.v[_T] = ts
        return out

    def delta_since(self, before: SeasonalStream) -> list[float]:
        """What learning added to `before` (this stream's earlier state), at this state's
        reference time: the increment a store adds (DECAY_ADD with `half_lives`), so that
        replicas learning one key send updates that merge instead of overwriting."""
        old = SeasonalStream.wrap(before.p, before.v.copy())
        if self.v[_T]:
            old._decay_to(self.v[_T])
        d = [new - was for new, was in zip(self.v, old.v, strict=True)]
        d[_T] = 0.0
        d[_RUN] = self.v[_RUN]  # not a sum: sent as it is (see `half_lives`)
        return d

    def merge(self, other: SeasonalStream) -> SeasonalStream:
        """The state of both (two replicas' views of one key): sums added at the later
        reference time. Commutative and associative (up to float rounding)."""
        a = SeasonalStream(self.p, self.v)
        b = SeasonalStream(other.p, other.v)
        ts = max(a.v[_T], b.v[_T])
        if ts:
            a._decay_to(ts)
            b._decay_to(ts)
        out = [x + y for x, y in zip(a.v, b.v, strict=True)]
        out[_T] = ts
        out[_RUN] = max(a.v[_RUN], b.v[_RUN], key=abs)
        return SeasonalStream(self.p, out)


def windowed_zscores(xs: Sequence[float], window: int = 48, log: bool = True) -> list[float]:
    """The baseline the detector must beat: |z| of each point against the mean and
    standard deviation of the `window` points before it."""
    ys = [math.log1p(max(x, 0.0)) if log else float(x) for x in xs]
    out = []
    for i, y in enumerate(ys):
        past = ys[max(0, i - window):i]
        if len(past) < 3:
            out.append(0.0)
            continue
        m = sum(past) / len(past)
        sd = math.sqrt(sum((q - m) ** 2 for q in past) / (len(past) - 1))
        out.append(abs(y - m) / max(sd, 1e-9))
    return out
