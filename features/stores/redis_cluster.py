"""The shared store on a Redis Cluster: the same Lua script, each call sent to its slot's node.

Why it works unchanged: every key of an entity carries the entity's hash tag
(`<ns>:{<kind>:<id>}:…`), so each script call touches one slot, and an event's calls go
out grouped by node: one round trip per node that holds one of the event's entities
(at most three for key, address and population), in parallel order of nodes. A reply of
MOVED/ASK (slots being resharded) refreshes the slot map and resends exactly the calls
that were refused (a refused call ran nothing).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import redis
from redis.cluster import RedisCluster
from redis.exceptions import AskError, MovedError, ResponseError

from features.stores.base import StoreError
from features.stores.redis_store import LuaScript, RedisStore, pack_evalsha, raw_pool


class RedisClusterStore(RedisStore):
    """`RedisStore` over a Redis Cluster (`redis+cluster://host:port` names any node)."""

    def __init__(self, url: str, *, namespace: str = "kw", idle_ttl_s: int = 8 * 86400,
                 timeout_s: float = 0.5) -> None:
        plain = url.replace("redis+cluster://", "redis://", 1)
        cluster = RedisCluster.from_url(plain, socket_timeout=timeout_s,
                                        socket_connect_timeout=timeout_s,
                                        decode_responses=True)
        super().__init__(url, namespace=namespace, idle_ttl_s=idle_ttl_s,
                         timeout_s=timeout_s, client=cluster)  # type: ignore[arg-type]
        self.cluster = cluster
        self._node_pools: dict[str, redis.ConnectionPool] = {}

    def describe(self) -> str:
        return f"redis cluster ({self._safe_url()}, {len(self.cluster.get_primaries())} primaries)"

    def ping(self) -> bool:
        try:
            return bool(self.cluster.ping(target_nodes=RedisCluster.PRIMARIES))
        except redis.RedisError:
            return False

    def _node_pool(self, name: str, client: redis.Redis) -> redis.ConnectionPool:
        """The node's pool of raw (undecoded) replies: the script's are binary."""
        pool = self._node_pools.get(name)
        if pool is None:
            pool = self._node_pools[name] = raw_pool(client)
        return pool

    def close(self) -> None:
        super().close()
        for pool in self._node_pools.values():
            pool.disconnect()

    def run_script(self, script: LuaScript,
                   calls: Sequence[tuple[Sequence[str], Sequence[str | bytes]]]) -> list[Any]:
        packed = [pack_evalsha(script.sha, keys, argv) for keys, argv in calls]
        replies: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        try:
            for attempt in range(3):
                by_node: dict[str, list[int]] = defaultdict(list)
                nodes = {}
                for i in todo:
                    node = self.cluster.get_node_from_key(calls[i][0][0])
                    by_node[node.name].append(i)
                    nodes[node.name] = node
                moved = []
                for name, idxs in by_node.items():
                    client = self.cluster.get_redis_connection(nodes[name])
                    got = self._run_on(client, self._node_pool(name, client), script,
                                       [packed[i] for i in idxs])
                    for i, reply in zip(idxs, got, strict=True):
                        if isinstance(reply, MovedError | AskError):
                            moved.append(i)
                        replies[i] = reply
                if not moved or attempt == 2:
                    break
                self.cluster.nodes_manager.initialize()  # the slots moved: ask again
                todo = moved
            for reply in replies:
                if isinstance(reply, ResponseError):
                    raise reply
        except redis.RedisError as exc:
            raise StoreError(f"redis cluster store failed: {exc}") from exc
        return replies
