"""Build a state store from a `--store` value: `memory`, a `redis://` URL, or
`redis+cluster://host:port` (any node of a Redis Cluster)."""

from __future__ import annotations

from pathlib import Path

from features.stores.base import StateStore
from features.stores.memory import MemoryStore


def open_store(
    spec: str,
    *,
    namespace: str = "kw",
    timeout_s: float = 0.5,
    memory_max_mb: float = 256.0,
    journal_path: Path | None = None,
) -> StateStore:
    """`journal_path`: where a memory store journals its enforcement writes (None: not)."""
    if spec in ("", "memory", "memory://"):
        return MemoryStore(max_mb=memory_max_mb, journal_path=journal_path)
    if spec.startswith("redis+cluster://"):
        from features.stores.redis_cluster import RedisClusterStore

        return RedisClusterStore(spec, namespace=namespace, timeout_s=timeout_s)
    if spec.startswith(("redis://", "rediss://", "unix://")):
        from features.stores.redis_store import RedisStore

        return RedisStore(spec, namespace=namespace, timeout_s=timeout_s)
    raise ValueError(f"unknown store {spec!r}: use 'memory', a redis:// URL or a "
                     "redis+cluster://host:port URL naming one node of a cluster")
