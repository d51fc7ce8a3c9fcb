"""Shared fixtures: a real Redis server process, the real app over HTTP, test secrets."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from features.stores.local_server import LocalRedisCluster, LocalRedisServer
from serving.api.app import create_app
from serving.settings import Settings

TEST_SECRET = "test-secret-0123456789abcdef"
ADMIN_TOKEN = "test-admin-token-0123456789"
LIVE_HISTORY_S = 5 * 365 * 86400.0
"""How far behind the clock the test services accept events: the tests post fixed days."""


@pytest.fixture(scope="session")
def redis_server() -> Iterator[LocalRedisServer]:
    server = LocalRedisServer().start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def redis_url(redis_server: LocalRedisServer) -> Iterator[str]:
    """A clean database on the shared test server."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    yield redis_server.url
    client.close()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[LocalRedisCluster]:
    """A three-master Redis Cluster from the same redis-server binary."""
    cluster = LocalRedisCluster(masters=3).start()
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def cluster_url(redis_cluster: LocalRedisCluster) -> str:
    """The cluster's store spec (`redis+cluster://…`), emptied."""
    redis_cluster.flush()
    return redis_cluster.url


def make_settings(**overrides: object) -> Settings:
    base: dict[str, object] = {"secret": TEST_SECRET, "admin_token": ADMIN_TOKEN,
                               "data_dir": Path(tempfile.mkdtemp(prefix="keywatch-test-")),
                               # tests post fixed past days through the live API
                               "event_max_behind_s": LIVE_HISTORY_S}
    base.update(overrides)
    return Settings(**base)  # type: ignore[arg-type]


@pytest.fixture
def settings() -> Settings:
    return make_settings()


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as c:
        yield c
