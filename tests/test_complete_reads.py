"""Reads are complete: list and every follower's snapshot hold every committed record, or fail.

nats-py's KV watch ends its initial values on the consumer's pending count alone; with other keys
of the bucket changing while it starts, it reported "no more values" before the first one (seen
here: 2 of 40 watches of 2,500 keys came back empty on nats-server 2.15.1). These tests read a
bucket of 2,500 triggers while other keys churn, many times and in parallel.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import msgspec
import nats
import pytest
from nats.aio.client import Client

from service.app import running
from service.natsserver import NatsCluster
from service.store import TriggerStore
from tests.conftest import make_settings
from tests.support import PREFIX, gateway_request, request, serving, unique

KEYS = 2_500
READS = 40  # 5 rounds of 8 at once


async def _fill(nc: Client, bucket: str, account: str) -> None:
    """KEYS gateway records of `account`, cloned from one the service created."""
    kv = await nc.jetstream().key_value(bucket)
    template = msgspec.json.decode((await kv.get(f"{account}.gateway.seed")).value)
    puts = []
    for i in range(KEYS - 1):
        record = dict(template, name=f"g{i}", subject=f"{PREFIX}.gateway.g{i}")
        puts.append(kv.put(f"{account}.gateway.g{i}", msgspec.json.encode(record)))
    for chunk in range(0, len(puts), 500):
        await asyncio.gather(*puts[chunk : chunk + 500])


@contextlib.asynccontextmanager
async def _churn(nc: Client, bucket: str) -> AsyncIterator[None]:
    """Other keys of the bucket keep changing meanwhile."""
    kv = await nc.jetstream().key_value(bucket)
    stop = asyncio.Event()

    async def write() -> None:
        i = 0
        while not stop.is_set():
            with contextlib.suppress(nats.errors.Error):
                await kv.put(f"other.gateway.w{i % 100}", b"{}")
            i += 1

    task = asyncio.create_task(write())
    try:
        yield
    finally:
        stop.set()
        await task


async def _check_lists(nc: Client) -> None:
    totals = []
    for _ in range(READS // 8):
        replies = await asyncio.gather(
            *[
                request(nc, f"{PREFIX}.list", {"subject_pattern": f"{PREFIX}.gateway.*"}, timeout=30)
                for _ in range(8)
            ]
        )
        totals += [(r.status, r.body["results_total"] if r.status == 200 else r.body) for r in replies]
    assert totals == [(200, KEYS)] * READS


async def _check_snapshots(nc: Client, bucket: str) -> None:
    store = TriggerStore(nc, bucket)
    counts = []
    for _ in range(READS // 8):
        counts += [len(keys) for keys in await asyncio.gather(*[store.raw_keys("acme.gateway.*")] * 8)]
    assert counts == [KEYS] * READS


@pytest.mark.slow
async def test_list_and_snapshots_are_complete_while_other_keys_change(service, nc, settings):
    reply = await request(nc, f"{PREFIX}.create.gateway", gateway_request("seed", "GET", f"/{unique()}"))
    assert reply.status == 201
    await _fill(nc, settings.bucket, "acme")
    async with _churn(nc, settings.bucket):
        await _check_lists(nc)
        await _check_snapshots(nc, settings.bucket)


@pytest.mark.slow
async def test_list_is_complete_on_an_r3_bucket_of_a_cluster(cluster: NatsCluster):
    settings = make_settings(cluster.url, TRIGGER_REPLICAS=3)
    client = await nats.connect(servers=cluster.urls)
    try:
        async with running(settings):
            await serving(client)  # the API's subscriptions have reached the client's server
            reply = await request(
                client, f"{PREFIX}.create.gateway", gateway_request("seed", "GET", f"/{unique()}"), timeout=10
            )
            assert reply.status == 201
            await _fill(client, settings.bucket, "acme")
            async with _churn(client, settings.bucket):
                await _check_lists(client)
                await _check_snapshots(client, settings.bucket)
    finally:
        await client.drain()
