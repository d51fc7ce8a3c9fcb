"""Build a state store from a `--store` value: `memory` or a `redis://` URL."""

from __future__ import annotations

from features.stores.base import StateStore
from features.stores.memory import MemoryStore


def open_store(
    spec: str,
    *,
    namespace: str = "kw",
    timeout_s: float = 0.5,
    memory_max_entities: int = 200_000,
) -> StateStore:
    if spec in ("", "memory", "memory://"):
        return MemoryStore(max_entities=memory_max_entities)
    if spec.startswith(("redis://", "rediss://", "unix://")):
        from features.stores.redis_store import RedisStore

        return RedisStore(spec, namespace=namespace, timeout_s=timeout_s)
    raise ValueError(f"unknown store {spec!r}: use 'memory' or a redis:// URL")
