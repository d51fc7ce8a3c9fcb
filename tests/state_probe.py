"""Read per-key totals straight out of Redis, to check what the store really holds."""

from __future__ import annotations

import redis

from features.keys import KeyHasher
from tests.conftest import TEST_SECRET


def redis_request_total(client: redis.Redis, key: str, *, namespace: str = "kw",
                        secret: str = TEST_SECRET) -> float:
    """Requests counted for a raw key: the sum of its hour-ring buckets in Redis.

    The hour ring holds 26 hourly buckets (`requests:h:<slot>`, with its stamp in
    `requests:h:<slot>:t`), so for events spread over less than a day this is the key's
    total request count.
    """
    key_id = KeyHasher(secret).key_id(key)
    fields = client.hgetall(f"{namespace}:{{k:{key_id}}}:h")
    total = 0.0
    for name, value in fields.items():
        name = name.decode() if isinstance(name, bytes) else name
        value = value.decode() if isinstance(value, bytes) else value
        if name.startswith("requests:h:") and not name.endswith(":t"):
            total += float(value)
    return total
