"""Fixtures: one real nats-server per test session on a random port; a fresh bucket per test; and,
for the tests that ask for it, a three-node JetStream cluster."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import nats
import pytest
from nats.aio.client import Client

from service import config, log
from service.app import running
from service.natsserver import NatsCluster, NatsServer
from service.routing import Api
from tests.support import SECRET, unique


@pytest.fixture(scope="session")
def nats_server() -> Iterator[NatsServer]:
    """A private nats-server with JetStream, for the whole session."""
    with NatsServer() as server:
        yield server


@pytest.fixture(scope="session")
def nats_cluster() -> Iterator[NatsCluster]:
    """A private three-node JetStream cluster (n1..n3), started when a test first needs it; use `cluster`."""
    with NatsCluster() as nodes:
        yield nodes


@pytest.fixture
def cluster(nats_cluster: NatsCluster) -> NatsCluster:
    """The session's cluster with every node up and the cluster ready (a test before may have killed or
    stopped nodes: they are restarted on their ports and stores first). Every test uses fresh buckets."""
    nats_cluster.heal()
    return nats_cluster


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[Client]:
    """A client connection for the test itself."""
    client = await nats.connect(nats_server.url)
    yield client
    await client.drain()


def make_settings(url: str, **overrides: Any) -> config.Settings:
    """Settings for a service under test: a fresh bucket, JWT auth with the suite's secret."""
    env = {
        "NATS_URL": url,
        "TRIGGER_BUCKET": unique("bucket"),
        "TRIGGER_JWT_SECRET": SECRET,
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "warning",
    }
    env.update({k: str(v) for k, v in overrides.items()})
    return config.load(env)


@pytest.fixture
def settings(nats_server: NatsServer) -> config.Settings:
    """Settings with a fresh bucket."""
    return make_settings(nats_server.url)


@pytest.fixture
async def service(settings: config.Settings) -> AsyncIterator[Api]:
    """The Trigger Service running in the test's event loop."""
    async with running(settings) as api:
        yield api


@pytest.fixture(scope="session", autouse=True)
def _quiet_logs() -> None:
    """Only warnings and errors from the service while tests run."""
    log.configure("warning", "json")
