"""Read per-key totals straight out of Redis, to check what the store really holds."""

from __future__ import annotations

import redis

from features.keys import KeyHasher
from features.stores.packed import ring_cells, unpack_ring
from features.stores.redis_store import raw_pool
from tests.conftest import TEST_SECRET


def redis_request_total(client: redis.Redis, key: str, *, namespace: str = "kw",
                        secret: str = TEST_SECRET) -> float:
    """Requests counted for a raw key: the sum of its hour-ring buckets in Redis.

    The hour ring is one packed field (`requests:h`: a (stamp, value) cell per hourly
    slot, `features.stores.packed`), so for events spread over less than a day this is
    the key's total request count.
    """
    key_id = KeyHasher(secret).key_id(key)
    raw = redis.Redis(connection_pool=raw_pool(client))
    try:
        blob = raw.hget(f"{namespace}:{{k:{key_id}}}:h", "requests:h") or b""
    finally:
        raw.close()
    return sum(value for _, _, value in ring_cells(unpack_ring(blob)))
