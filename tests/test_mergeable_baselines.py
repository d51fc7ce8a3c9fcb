"""A key's streaming detectors merge across replicas: scorers interleaving one key's events
hold the single scorer's state and make its decisions (they used to write the state back
whole, one round trip late: two scorers alternating over 200 events of a key counted 100).
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from features.contract import Event
from features.extractor import FEATURE_NAMES
from features.keys import KeyHasher
from features.stores.base import DECAY_ADD, DEL, GET, GETS, SET, EntityOps, StateStore
from features.stores.memory import MemoryStore
from features.stores.packed import decayed_sums
from features.stores.redis_store import RedisStore
from models.detectors import (
    STREAM_HALF_LIVES,
    STREAM_PARAMS,
    STREAM_STATE_SIZE,
    STREAMS_FIELD,
    build_detectors,
)
from models.feature_space import model_features
from models.streaming import state_size
from serving.engine.scorer import Scorer

SECRET = "mergeable-baselines-secret-0123"
T0 = 1_767_225_600.0  # 2026-01-01, a Thursday


def one_key_events(days: float = 2.2, seed: int = 3, *, quiet: bool = False) -> list[Event]:
    """One key for two days and more: a daily rhythm, now and then a huge call, and on
    the second day a runaway loop (200 calls a fifth of a second apart). `quiet`: the
    rhythm alone."""
    rnd = random.Random(seed)
    t, out, burst_from = T0, [], None
    while t < T0 + days * 86400:
        n, hour = len(out), (t % 86400) / 3600
        if burst_from is None and t > T0 + 1.5 * 86400 and not quiet:
            burst_from = n
        in_burst = burst_from is not None and n - burst_from < 200
        t += 0.2 if in_burst else rnd.expovariate((1 + 2 * (8 <= hour < 18)) / 300)
        huge = n % 197 == 196 and not quiet
        tokens = 40_000 if huge else int(rnd.lognormvariate(6, 0.3))
        out.append(Event(api_key="sk-merge-one-key-0000000000", timestamp=t,
                         source_ip="198.51.100.7", endpoint="/v1/chat/completions",
                         tokens=tokens, latency_ms=rnd.uniform(200, 400)))
    return out


@pytest.fixture(scope="module")
def events() -> list[Event]:
    return one_key_events()


def _stores(backend: str, redis_url: str, n: int, tag: str) -> list[StateStore]:
    """`n` handles on one shared store, as `n` replicas hold."""
    if backend == "memory":
        return [MemoryStore()] * n
    return [RedisStore(redis_url, namespace=f"merge-{tag}-{n}") for _ in range(n)]


def _run(stores: list[StateStore], events: list[Event], *,
         immediate: bool) -> tuple[list[tuple[str, str, float]], list[float]]:
    """Events to the scorers in turn; their decisions and the key's stored streams."""
    scorers = [Scorer(store=store, hasher=KeyHasher(SECRET), immediate_learning=immediate,
                      detectors=build_detectors(model_dir=None, checkpoint=None,
                                                feature_names=model_features(FEATURE_NAMES)))
               for store in stores]
    decisions = [scorers[n % len(scorers)].score(e) for n, e in enumerate(events)]
    for scorer in scorers:
        scorer.flush()
    key_id = scorers[0].hasher.key_id(events[0].api_key)
    raw = stores[0].execute([EntityOps("k", key_id, [(GET, STREAMS_FIELD)])])[0][0]
    held = decayed_sums(raw, STREAM_STATE_SIZE)
    assert held is not None
    state = [held[0], *held[1]]
    return [(d.decision, d.severity, d.score) for d in decisions], state


def _weights(state: list[float]) -> list[float]:
    """The learned weights of each stream (how much it learned), decayed: recent level,
    long-run level, residual scale, and each phase of the day."""
    out, at = [], 1
    for p in STREAM_PARAMS.values():
        v = state[at:at + state_size(p)]
        out += [v[1], v[3], v[5], *v[9:9 + 2 * p.phases:2]]
        at += state_size(p)
    return out


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_interleaved_scorers_hold_the_single_scorers_state_and_decisions(
        backend: str, redis_url: str, events: list[Event]) -> None:
    """Learning sent at once (as a service on Redis does): two and four scorers fed
    in turn hold exactly the state of one, and decide exactly as it does."""
    one, one_state = _run(_stores(backend, redis_url, 1, "imm"), events, immediate=True)
    assert {s for _, s, _ in one} >= {"none", "low", "medium"}  # the detectors in play
    for n in (2, 4):
        many, state = _run(_stores(backend, redis_url, n, "imm"), events, immediate=True)
        assert many == one
        assert state == pytest.approx(one_state, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_deferred_learning_loses_no_update(backend: str, redis_url: str) -> None:
    """Learning sent with the scorer's next round trip (`deferred`): a scorer reads the
    key one event behind each other scorer, so sums that depend on what it read (the
    residuals' scale, their histogram) differ a little; but every event's learning is
    added: on a key whose events are all learned, the streams' weights are the single
    scorer's, and so are the verdicts."""
    events = one_key_events(days=1.2, quiet=True)
    one, one_state = _run(_stores(backend, redis_url, 1, "def"), events, immediate=False)
    assert all(s in ("none", "low") for _, s, _ in one)  # nothing flagged: all learned
    for n in (2, 4):
        many, state = _run(_stores(backend, redis_url, n, "def"), events, immediate=False)
        assert state[0] == one_state[0]  # one reference time: the last event's
        assert _weights(state) == pytest.approx(_weights(one_state), rel=1e-9)
        assert [d for d, _, _ in many] == [d for d, _, _ in one]


@pytest.mark.parametrize("make", [lambda url: MemoryStore(),
                                  lambda url: RedisStore(url, namespace="merge-op")],
                         ids=["memory", "redis"])
def test_decay_add_commutes_and_both_stores_agree(
        make: Callable[[str], StateStore], redis_url: str) -> None:
    """Deltas sent in either order give one state; memory and Redis hold the same bytes;
    a value that is not a sum (half-life < 0) takes the last write."""
    hl = [3600.0, 0.0, -1.0]
    d1, d2 = (1700000000.0, [2.0, 1.0, 5.0]), (1700003600.0, [4.0, 1.0, 7.0])
    store = make(redis_url)

    def apply(entity: str, *deltas: tuple[float, list[float]]) -> bytes:
        for ts, d in deltas:
            store.execute([EntityOps("k", entity, [(DECAY_ADD, "b|f", ts, hl, d)])])
        return store.execute([EntityOps("k", entity, [(GET, "b|f")])])[0][0]

    forward, backward = apply("a", d1, d2), apply("b", d2, d1)
    (t_fwd, fwd), (t_bwd, bwd) = decayed_sums(forward, 3), decayed_sums(backward, 3)
    assert t_fwd == t_bwd == 1700003600.0
    assert fwd[:2] == pytest.approx(bwd[:2]) == [2.0 * 0.5 + 4.0, 2.0]
    assert (fwd[2], bwd[2]) == (7.0, 5.0)
    other = MemoryStore()
    for ts, d in (d1, d2):
        other.execute([EntityOps("k", "a", [(DECAY_ADD, "b|f", ts, hl, d)])])
    assert other.execute([EntityOps("k", "a", [(GET, "b|f")])])[0][0] == forward


def test_the_script_and_the_memory_store_hold_the_same_sums(redis_url: str) -> None:
    """Random deltas of the key streams' real shape (every half-life they use), early,
    late and simultaneous, and a held vector of another length: the script (copies off,
    so Lua does the arithmetic) and the memory store hold the same bytes after every
    write, and the sums are the decayed additions the op promises."""
    rng = random.Random(7)
    redis_store = RedisStore(redis_url, namespace="merge-sums", cache_mb=0)
    memory = MemoryStore()
    ts, held = T0, None
    for step in range(120):
        ts += rng.choice((-7200.0, 0.0, 0.5, 61.0, 3600.0, 90000.0)) * rng.random()
        size = STREAM_STATE_SIZE if step != 60 else 5  # once: a vector of another length
        hls, d = STREAM_HALF_LIVES[:size], [rng.gauss(0, 10) * rng.choice((1.0, 1e-9, 1e6))
                                     for _ in range(size)]
        op = [(DECAY_ADD, STREAMS_FIELD, ts, hls, d), (GET, STREAMS_FIELD)]
        got = [store.execute([EntityOps("k", "sums", op)])[0][1]
               for store in (redis_store, memory)]
        assert got[0] == got[1], step
        expected = _expected(held, ts, hls, d)
        held = decayed_sums(got[1], size)
        assert held is not None
        assert held[0] == expected[0] and held[1] == pytest.approx(expected[1], rel=1e-12)


def _expected(held: tuple[float, list[float]] | None, ts: float, hls: list[float],
              d: list[float]) -> tuple[float, list[float]]:
    """DECAY_ADD as `features.stores.base` states it, one sum at a time."""
    if held is not None and len(held[1]) != len(d):
        held = None
    t0, values = held if held is not None else (0.0, [0.0] * len(d))
    t1 = max(t0, ts)
    out = []
    for v, x, hl in zip(values, d, hls, strict=True):
        if hl < 0:
            out.append(x)
        elif hl == 0:
            out.append(v + x)
        else:
            out.append(v * 0.5 ** ((t1 - t0) / hl) + x * 0.5 ** ((t1 - ts) / hl))
    return t1, out


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_a_scored_key_moves_its_text_sums_to_the_packed_field(backend: str,
                                                               redis_url: str) -> None:
    """A key whose sums are held as text (written before they were packed): its first
    learned event carries them into the packed field and deletes the text, so an active
    key does not keep 2.4 KB of dead state for good."""
    from models.detectors import TEXT_STREAMS_FIELD, KeyStreams

    events = one_key_events(days=0.3, quiet=True)
    store = _stores(backend, redis_url, 1, "text")[0]
    scorer = Scorer(store=store, hasher=KeyHasher(SECRET), detectors=build_detectors(
        model_dir=None, checkpoint=None, feature_names=model_features(FEATURE_NAMES)))
    key_id = scorer.hasher.key_id(events[0].api_key)
    learned = KeyStreams()
    for i in range(40):
        for stream in learned.streams.values():
            stream.learn(events[0].timestamp - 3600 + 60 * i, 5.0 + i % 3)
    ref = max(stream.ref_time for stream in learned.streams.values())
    text = f"{ref!r}|" + ",".join(repr(x) for stream in learned.streams.values()
                                  for x in stream.at(ref).v)
    store.execute([EntityOps("k", key_id, [(SET, TEXT_STREAMS_FIELD, text)])])
    fresh = [e.model_copy(update={"api_key": e.api_key + "-fresh"}) for e in events[:5]]
    for event in [*events[:5], *fresh]:
        scorer.score(event)
    scorer.flush()
    packed, old = store.execute([EntityOps("k", key_id, [(GET, STREAMS_FIELD),
                                                        (GET, TEXT_STREAMS_FIELD)])])[0]
    assert old is None
    fresh_id = scorer.hasher.key_id(fresh[0].api_key)
    alone = KeyStreams(store.execute([EntityOps("k", fresh_id, [(GET, STREAMS_FIELD)])])[0])
    now = KeyStreams([packed, None, None])
    weight = 3  # the learned points' decayed count (`models.streaming`): the text's plus
    for name, stream in learned.streams.items():  # the five events' (learned alike)
        both = stream.at(ref).merge(alone.streams[name])
        assert stream.v[weight] > 10
        assert now.streams[name].v[weight] == pytest.approx(both.v[weight], rel=1e-9)


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_text_sums_found_beside_packed_ones_are_added_in(backend: str,
                                                         redis_url: str) -> None:
    """Text sums beside a packed field (an outage's spooled delta created the packed field
    without them, or an older replica wrote them again) are not in it yet: the next delta
    adds them and deletes the text, so the key's learning is neither lost nor counted
    twice. Checked on the learned points' decayed count against a key that holds the same
    packed field without the text."""
    from models.detectors import TEXT_STREAMS_FIELD, KeyStreams

    events = one_key_events(days=0.3, quiet=True)
    store = _stores(backend, redis_url, 1, "beside")[0]
    scorer = Scorer(store=store, hasher=KeyHasher(SECRET), detectors=build_detectors(
        model_dir=None, checkpoint=None, feature_names=model_features(FEATURE_NAMES)))
    start = events[0].timestamp
    outage, text = KeyStreams(), KeyStreams()
    for i in range(40):
        for stream in text.streams.values():
            stream.learn(start - 7200 + 60 * i, 5.0 + i % 3)
    for i in range(3):
        for stream in outage.streams.values():
            stream.learn(start - 600 + 60 * i, 6.0)
    ref = max(stream.ref_time for stream in text.streams.values())
    text_field = f"{ref!r}|" + ",".join(repr(x) for stream in text.streams.values()
                                        for x in stream.at(ref).v)
    plain = [e.model_copy(update={"api_key": e.api_key + "-plain"}) for e in events[:5]]
    ids = [scorer.hasher.key_id(e.api_key) for e in (events[0], plain[0])]
    for key_id in ids:
        store.execute([EntityOps("k", key_id, [outage.delta_op()])])
    store.execute([EntityOps("k", ids[0], [(SET, TEXT_STREAMS_FIELD, text_field)])])
    for event in [*events[:5], *plain]:
        scorer.score(event)
    scorer.flush()
    (with_text, old), (without, _) = [store.execute([EntityOps("k", key_id, [
        (GET, STREAMS_FIELD), (GET, TEXT_STREAMS_FIELD)])])[0] for key_id in ids]
    assert old is None
    weight = 3  # the learned points' decayed count (`models.streaming`)
    a, b = KeyStreams([with_text, None, None]), KeyStreams([without, None, None])
    for name, stream in text.streams.items():
        carried = stream.at(ref)
        carried._decay_to(a.streams[name].ref_time)
        assert carried.v[weight] > 10
        assert a.streams[name].v[weight] - b.streams[name].v[weight] == pytest.approx(
            carried.v[weight], rel=1e-6)


def test_a_key_learned_as_text_keeps_its_state() -> None:
    """A key whose sums were stored as text (`TEXT_STREAMS_FIELD`, before they were
    packed) keeps them: its first delta carries all of that state into the packed field,
    at the text's reference time."""
    from models.detectors import KeyStreams

    learned = KeyStreams()
    for i in range(50):
        for s in learned.streams.values():
            s.learn(T0 + 60 * i, 10.0 + i % 3)
    ref = max(s.ref_time for s in learned.streams.values())
    text = f"{ref!r}|" + ",".join(repr(x) for s in learned.streams.values()
                                  for x in s.at(ref).v)
    store = MemoryStore()
    store.execute([EntityOps("k", "key", [(SET, "ksd", text)])])
    _carry_over(store, "key")
    again = KeyStreams(store.execute([EntityOps("k", "key", [STREAMS_READ])])[0][0])
    assert again.superseded == ()  # the text is gone
    for name, s in learned.streams.items():
        assert again.streams[name].v == pytest.approx(s.at(ref).v, rel=1e-12)


def test_a_key_learned_before_keeps_its_state() -> None:
    """A key whose streams were written back whole (the legacy field) keeps them: its
    first delta carries all of that state into the mergeable field."""
    from models.detectors import KeyStreams

    legacy = KeyStreams()
    for i in range(50):
        for s in legacy.streams.values():
            s.learn(T0 + 60 * i, 10.0 + i % 3)
    raw = ",".join(repr(x) for s in legacy.streams.values() for x in s.v)
    store = MemoryStore()
    store.execute([EntityOps("k", "key", [(SET, "ks", raw)])])
    _carry_over(store, "key")
    again = KeyStreams(store.execute([EntityOps("k", "key", [STREAMS_READ])])[0][0])
    assert again.superseded == ()
    for name, s in legacy.streams.items():
        assert again.streams[name].v == pytest.approx(s.v, rel=1e-12)


STREAMS_READ = (GETS, 3, STREAMS_FIELD, "ksd", "ks")
"""What the detectors read of a key's streams: the packed field, the text, the legacy."""


def _carry_over(store: StateStore, key: str) -> None:
    """A first delta as the detectors send it: what was read, carried into the packed
    field, the older fields deleted."""
    from models.detectors import KeyStreams

    streams = KeyStreams(store.execute([EntityOps("k", key, [STREAMS_READ])])[0][0])
    store.execute([EntityOps("k", key, [streams.delta_op(), *(
        (DEL, name) for name in streams.superseded)])])
