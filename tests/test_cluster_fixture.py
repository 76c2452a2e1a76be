"""The `cluster` fixture: three nats-servers form one JetStream cluster, an R3 bucket lives on it, and
its nodes can be killed, stopped and restarted on the same ports and stores while the bucket answers."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client
from nats.js.kv import KeyValue

from service.natsserver import NatsCluster
from tests.support import eventually, unique


async def _quiet(exc: Exception) -> None:
    """Connections to a node the test kills report its loss; that is the point, not an error."""


async def connect(*urls: str) -> Client:
    return await nats.connect(
        servers=list(urls), error_cb=_quiet, reconnect_time_wait=0.1, max_reconnect_attempts=-1
    )


@pytest.fixture
async def client(cluster: NatsCluster) -> AsyncIterator[Client]:
    """A connection that knows every node."""
    nc = await connect(*cluster.urls)
    yield nc
    await nc.close()


@pytest.fixture
async def bucket(client: Client) -> AsyncIterator[KeyValue]:
    """A fresh R3 KV bucket."""
    name = unique("bucket")
    kv = await client.jetstream().create_key_value(bucket=name, replicas=3, history=5)
    yield kv
    await client.jetstream().delete_key_value(name)


async def put_when_possible(kv: KeyValue, key: str, value: bytes) -> int:
    """kv.put, retried while the bucket's stream elects a leader; the revision."""

    async def attempt() -> int | None:
        try:
            return await asyncio.wait_for(kv.put(key, value), 3)
        except (nats.errors.Error, TimeoutError):
            return None

    return await eventually(attempt, timeout=30, interval=0.1)


def test_three_nodes_form_one_jetstream_cluster(cluster: NatsCluster) -> None:
    assert len(cluster.servers) == 3
    assert len({server.port for server in cluster.servers}) == 3
    assert cluster.url == ",".join(cluster.urls)
    assert len({server.store_dir for server in cluster.servers}) == 3
    for i, server in enumerate(cluster.servers):
        varz = cluster.monitor(i, "/varz")[1]
        assert varz["server_name"] == f"n{i + 1}"
        assert varz["cluster"]["name"] == "trigger-test"
        assert server.store_dir == cluster.root / f"n{i + 1}"
        meta = cluster.monitor(i, "/jsz")[1]["meta_cluster"]
        assert meta["cluster_size"] == 3
        assert meta["leader"] in cluster.names
    assert cluster.ready() is None
    assert cluster.meta_leader() in range(3)


@pytest.mark.slow  # the election after a SIGKILL takes seconds
async def test_an_r3_bucket_survives_a_sigkilled_leader_and_its_restart(
    cluster: NatsCluster, client: Client, bucket: KeyValue
) -> None:
    stream = f"KV_{(await bucket.status()).bucket}"
    info = await client.jetstream().stream_info(stream)
    assert info.config.num_replicas == 3
    assert info.cluster is not None
    assert len(info.cluster.replicas or []) == 2
    await bucket.put("key", b"one")

    leader = await cluster.stream_leader(stream, client)
    node = cluster.servers[leader]
    pid, port, store = node.pid, node.port, node.store_dir
    assert pid is not None
    cluster.kill(leader)
    assert not node.running
    assert node.proc is not None
    assert node.proc.returncode == -signal.SIGKILL
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)

    await put_when_possible(bucket, "key", b"two")  # a new leader, elected by the other two
    entry = await bucket.get("key")
    assert entry.value == b"two"
    assert await cluster.stream_leader(stream, client) != leader

    await asyncio.to_thread(cluster.restart, leader)
    assert node.running
    assert (node.port, node.store_dir) == (port, store)
    assert node.pid != pid
    direct = await connect(node.url)  # the restarted node alone: it has caught up
    try:
        kv = await direct.jetstream().key_value((await bucket.status()).bucket)
        assert (await kv.get("key")).value == b"two"
        await kv.put("key", b"three")
    finally:
        await direct.close()
    assert (await bucket.get("key")).value == b"three"


async def test_a_stopped_node_is_brought_back_by_heal(cluster: NatsCluster, bucket: KeyValue) -> None:
    """SIGTERM one node: the bucket answers at once (two of three are a quorum); heal restarts it."""
    stopped = 2  # any node
    port = cluster.servers[stopped].port
    cluster.stop_node(stopped)
    assert not cluster.servers[stopped].running
    assert cluster.ready() is not None
    revision = await put_when_possible(bucket, "key", b"while one is down")
    assert (await bucket.get("key")).revision == revision
    await asyncio.to_thread(cluster.heal)
    assert cluster.servers[stopped].running
    assert cluster.servers[stopped].port == port
    assert cluster.ready() is None
