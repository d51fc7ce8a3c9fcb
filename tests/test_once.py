"""At most once per token (the stream worker's store): a call delivered again answers what
the first delivery answered and applies nothing, whichever path the first one took
(computed on the worker's copy of the entity, or applied in the script), and whichever
worker gets it again.
"""

from __future__ import annotations

import random

import pytest

from features.stores.base import DECAY_ADD, GET, EntityOps
from features.stores.memory import MemoryStore
from features.stores.once import OnceRedisStore
from features.stores.results_codec import decode_results, encode_results
from tests.test_stores import normalise, random_ops


def _calls(rng: random.Random, ts: float) -> list[EntityOps]:
    out = []
    for ent in rng.sample(["x", "y", "z"], k=rng.randint(1, 2)):
        ops = random_ops(rng, ts)
        if rng.random() < 0.3:  # a packed field, read back as bytes
            ops += [(DECAY_ADD, "b|d", ts, [60.0, 3600.0], [1.0, rng.uniform(0, 5)]),
                    (GET, "b|d")]
        out.append(EntityOps("k", ent, ops))
    return out


@pytest.mark.parametrize("seed", range(3))
def test_a_call_delivered_again_answers_as_the_first_and_applies_nothing(
        redis_url: str, seed: int) -> None:
    rng = random.Random(seed)
    mem = MemoryStore()
    worker = OnceRedisStore(redis_url, namespace=f"once{seed}")
    other = OnceRedisStore(redis_url, namespace=f"once{seed}")  # holds no copies
    ts = 1_700_000_000.0
    for i in range(200):
        ts += rng.uniform(0, 40)
        reqs = _calls(rng, ts)
        expected = normalise(mem.execute(reqs))
        with worker.once(f"ev{i}"):
            assert normalise(worker.execute(reqs)) == expected
        if rng.random() < 0.3:  # delivered again, to this worker or to another
            again = rng.choice([worker, other])
            with again.once(f"ev{i}"):
                assert normalise(again.execute(reqs)) == expected
    assert worker.cache.hits > 100  # most first deliveries were computed on the copy
    # nothing was applied twice: outside a scope, Redis reads as the memory store does
    reads = [EntityOps("k", ent, [(GET, name) for name in ("a", "b", "c", "e:m", "b|d")])
             for ent in ("x", "y", "z")]
    assert normalise(other.execute(reads)) == normalise(mem.execute(reads))
    worker.close()
    other.close()


def test_results_are_kept_exactly() -> None:
    results = [None, [0.1 + 0.2, float("inf"), -0.0, 3], "text", [b"\x00\xff" * 9, None],
               [[1, 2.5], []], 7, float("-inf")]
    back = decode_results(encode_results(results))
    assert back == results and repr(back) == repr(results)
    assert [type(v) for v in back[1]] == [float, float, float, int]
    with pytest.raises(TypeError):
        encode_results([object()])
