"""Accounts mode on a 3-node operator-mode cluster: every server converges, also one that was down."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import nats.errors
import pytest
from nats.aio.client import Client

from service.accounts import bootstrap
from service.app import running
from service.natsserver import NatsCluster
from tests import test_accounts_mode as accounts
from tests.conftest import make_settings
from tests.support import Inbox, eventually, unique

pytestmark = pytest.mark.slow
CONVERGE_WITHIN = 2.0  # a server that rejoins holds the current JWTs within this long


@pytest.fixture(scope="module")
def operator_cluster(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[accounts.Operator, NatsCluster]]:
    root = tmp_path_factory.mktemp("operator-cluster")
    dev = bootstrap.create(root / "dev")

    def config(i: int, store: Path) -> Path:
        path = store / "nats-server.conf"
        path.write_text(
            bootstrap.server_config(
                dev, resolver_dir=store / "resolver", store_dir=store / "js", port=-1, http_port=None
            )
        )
        return path

    with NatsCluster(root=root / "nodes", config=config) as cluster:
        yield accounts.Operator(dev, cluster.servers[0], root), cluster


@pytest.fixture
async def stack(operator_cluster) -> AsyncIterator[tuple[accounts.Operator, NatsCluster, Client]]:
    operator, cluster = operator_cluster
    await asyncio.to_thread(cluster.heal)
    system_nc = await nats.connect(servers=cluster.urls, user_credentials=operator.dev.system.creds)
    settings = make_settings(cluster.url, TRIGGER_REPLICAS=3, **operator.settings_env())
    async with running(settings):
        yield operator, cluster, system_nc
    await system_nc.close()


async def _tenants(operator: accounts.Operator, cluster: NatsCluster, system_nc: Client):
    """Two fresh tenants, their users connected to the first node."""
    a = await accounts.new_tenant(operator, cluster.urls[0], system_nc)
    b = await accounts.new_tenant(operator, cluster.urls[0], system_nc)
    return a, b


async def _until_answered(call) -> int:
    """A request's status once JetStream answers again (a leader election after a kill).

    A request that got no answer in time is sent again: a create that was applied meanwhile then
    answers 409 with `same: true` (the idempotent retry), counted as its 201; a delete, 404.
    """
    deadline = time.monotonic() + 30
    retried = False
    while True:
        try:
            reply = await call()
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
            # The service's connection is moving to another node, or the answer came too late.
            assert time.monotonic() < deadline
            retried = True
            await asyncio.sleep(0.05)  # between attempts
            continue
        if retried and reply.status == 409 and (reply.body or {}).get("same"):
            return 201
        if retried and reply.status == 404:
            return 200
        if reply.status != 503 or time.monotonic() > deadline:
            return reply.status


async def _user_on(operator: accounts.Operator, tenant: accounts.Tenant, url: str) -> Client:
    creds = next(p for p in operator.root.glob("*.creds") if _account_of(p) == tenant.key)
    return await nats.connect(url, user_credentials=str(creds), max_reconnect_attempts=0)


def _account_of(creds: Path) -> str:
    token = creds.read_text().split("-----BEGIN NATS USER JWT-----")[1].split("------END")[0].strip()
    return str(accounts.jwt.decode(token).get("iss"))


async def _carried_on(pub: Client, sub: Client, inbox: Inbox, subject: str) -> bool:
    """Publish one probe on `subject` through one server and tell whether it arrived: both
    connections flushed in turn, so anything routed is in `inbox` by then."""
    probe = unique("probe").encode()
    await pub.publish(subject, probe)
    await pub.flush()
    await sub.flush()
    return probe in inbox.payloads


async def test_a_server_that_was_down_during_a_delete_stops_carrying_within_two_seconds(stack):
    operator, cluster, system_nc = stack
    a, b = await _tenants(operator, cluster, system_nc)
    base = unique("down")
    body = accounts.stream_body(f"{base}-t", f"{base}.in", f"{base}.out", account=b.key)
    assert (await accounts.create(a, body, b)).status == 201
    # A route that stays: once it carries on the returning node, that node has the accounts
    # loaded, so a probe the deleted route does not carry means something.
    control = accounts.stream_body(f"{base}-c", f"{base}.control", f"{base}.out", account=b.key)
    assert (await accounts.create(a, control, b)).status == 201

    cluster.kill(2)
    assert await _until_answered(lambda: accounts.delete(a, f"{base}-t")) == 200
    await asyncio.to_thread(cluster.restart, 2)
    rejoined = time.monotonic()

    url = cluster.servers[2].url
    pub, sub = await _user_on(operator, a, url), await _user_on(operator, b, url)
    try:
        inbox = await Inbox.on(sub, f"{base}.out")
        await eventually(lambda: _carried_on(pub, sub, inbox, f"{base}.control"), timeout=10, interval=0.05)

        quiet = 0  # probes in a row the deleted route did not carry (one alone may be a fluke)

        async def stopped() -> bool:
            nonlocal quiet
            quiet = 0 if await _carried_on(pub, sub, inbox, f"{base}.in") else quiet + 1
            return quiet >= 10

        await eventually(stopped, timeout=CONVERGE_WITHIN + 3, interval=0.05)
        assert time.monotonic() - rejoined < CONVERGE_WITHIN + 1.5
        for _ in range(10):  # and it stays stopped, while the node carries (a re-push being applied
            # there can hold up one probe of a live route, never let one of a deleted route through)
            assert not await _carried_on(pub, sub, inbox, f"{base}.in")
            await eventually(
                lambda: _carried_on(pub, sub, inbox, f"{base}.control"), timeout=2, interval=0.05
            )
    finally:
        await pub.close()
        await sub.close()
        await a.nc.close()
        await b.nc.close()


async def test_a_trigger_created_while_a_server_was_down_is_live_there_within_two_seconds(stack):
    operator, cluster, system_nc = stack
    a, b = await _tenants(operator, cluster, system_nc)
    base = unique("up")
    cluster.kill(2)
    body = accounts.stream_body(f"{base}-t", f"{base}.in", f"{base}.out", account=b.key)
    assert await _until_answered(lambda: accounts.create(a, body, b)) == 201
    await asyncio.to_thread(cluster.restart, 2)
    rejoined = time.monotonic()

    url = cluster.servers[2].url
    pub, sub = await _user_on(operator, a, url), await _user_on(operator, b, url)
    try:
        inbox = await Inbox.on(sub, f"{base}.out")
        await eventually(
            lambda: _carried_on(pub, sub, inbox, f"{base}.in"), timeout=CONVERGE_WITHIN + 3, interval=0.05
        )
        assert time.monotonic() - rejoined < CONVERGE_WITHIN + 1
    finally:
        await pub.close()
        await sub.close()
        await a.nc.close()
        await b.nc.close()
