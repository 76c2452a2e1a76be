"""Node loss on a 3-node cluster with an R3 bucket: followers recover, replies tell the truth.

Each test kills nats-server processes it started (by PID) and bounds its load in count and time.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import nats
import pytest
from nats.aio.client import Client

from service.app import running
from service.config import Settings
from service.gateway.app import running_gateway
from service.natsserver import NatsCluster
from service.routing import Api
from service.store import TriggerStore, key_of
from tests.conftest import make_settings
from tests.http_fixtures import on_free_port
from tests.support import PREFIX, Reply, eventually, gateway_request, request, stream_request, unique

pytestmark = pytest.mark.slow
FOLLOW_WITHIN = 2.0  # the contract: every replica and sidecar follows a change within this long
ANSWER_WITHIN = 5.0  # README: every operation answers (503/504 when JetStream cannot) within this long


async def _client(cluster: NatsCluster) -> Client:
    return await nats.connect(servers=cluster.urls, max_reconnect_attempts=-1, reconnect_time_wait=0.2)


@contextlib.asynccontextmanager
async def _stack(cluster: NatsCluster) -> AsyncIterator[tuple[Settings, list[Api], str]]:
    """Two service replicas and a sidecar on one R3 bucket."""
    settings = make_settings(cluster.url, TRIGGER_REPLICAS=3)
    async with (
        running(settings) as one,
        running(settings) as two,
        running_gateway(on_free_port(settings)) as url,
    ):
        yield settings, [one, two], url


async def _settled(nc: Client, subject: str, body: Any = None, *, within: float = 30.0) -> Reply:
    """Send a request until it gets an answer other than 503 (an election can take seconds)."""
    deadline = time.monotonic() + within
    while True:
        with contextlib.suppress(nats.errors.TimeoutError, nats.errors.NoRespondersError):
            reply = await request(nc, subject, body, timeout=10)
            if reply.status != 503:
                return reply
        assert time.monotonic() < deadline, f"{subject} still unavailable after {within}s"
        await asyncio.sleep(0.05)  # between attempts


def _carries(api: Api, key: str) -> bool:
    return key in api._ctx.carrier.inner._routes  # type: ignore[attr-defined]


async def _served(http: aiohttp.ClientSession, url: str, path: str) -> int:
    """The status a fresh HTTP request to the sidecar gets (0 when its connection was cut)."""
    try:
        async with http.get(url + path) as response:
            return response.status
    except aiohttp.ClientConnectionError:  # the sidecar reconnecting to NATS meanwhile
        return 0


@pytest.mark.parametrize("victim", ["stream leader", "another node"])
async def test_followers_catch_up_within_two_seconds_after_a_node_is_sigkilled(cluster, victim):
    nc = await _client(cluster)
    try:
        async with (
            _stack(cluster) as (settings, replicas, url),
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http,
        ):
            old, new = unique("old"), unique("new")
            old_path, new_path = f"/{unique()}", f"/{unique()}"
            for body, kind in (
                (stream_request(old, f"in.{old}", f"out.{old}"), "stream"),
                (gateway_request(old, "GET", old_path), "gateway"),
            ):
                assert (await request(nc, f"{PREFIX}.create.{kind}", body, timeout=10)).status == 201
            await eventually(lambda: all(_carries(r, key_of("acme", "stream", old)) for r in replicas))

            leader = await cluster.stream_leader(f"KV_{settings.bucket}", nc)
            cluster.kill(leader if victim == "stream leader" else (leader + 1) % 3)
            await cluster.stream_leader(f"KV_{settings.bucket}", nc)  # a leader again

            created = await _settled(
                nc, f"{PREFIX}.create.stream", stream_request(new, f"in.{new}", f"out.{new}")
            )
            assert created.status == 201
            assert (
                await _settled(nc, f"{PREFIX}.create.gateway", gateway_request(new, "GET", new_path))
            ).status == 201
            assert (await _settled(nc, f"{PREFIX}.delete.stream.{old}")).status == 200
            assert (await _settled(nc, f"{PREFIX}.delete.gateway.{old}")).status == 200
            replied = time.monotonic()

            async def followed() -> bool:
                streams = all(
                    _carries(r, key_of("acme", "stream", new))
                    and not _carries(r, key_of("acme", "stream", old))
                    for r in replicas
                )
                gateway = (
                    await _served(http, url, new_path) not in (0, 404)
                    and await _served(http, url, old_path) == 404
                )
                return streams and gateway

            await eventually(followed, timeout=FOLLOW_WITHIN + 0.5)
            assert time.monotonic() - replied < FOLLOW_WITHIN + 0.5
    finally:
        await nc.close()


async def test_no_acknowledged_create_is_lost_and_no_503_was_stored_when_the_leader_is_sigkilled(cluster):
    nc = await _client(cluster)
    outcomes: dict[str, int] = {}
    try:
        async with _stack(cluster) as (settings, _, _url):
            stop = asyncio.Event()
            first_after_kill: list[float] = []
            durations: list[float] = []
            killed_at: list[float] = []

            async def create_until_stopped(worker: int) -> None:
                i = 0
                while not stop.is_set() and i < 400:
                    name = f"w{worker}-{i}"
                    i += 1
                    started = time.monotonic()
                    try:
                        reply = await request(
                            nc,
                            f"{PREFIX}.create.gateway",
                            gateway_request(name, "GET", f"/{name}"),
                            timeout=10,
                        )
                        outcomes[name] = reply.status
                        durations.append(time.monotonic() - started)
                        if reply.status == 201 and killed_at and not first_after_kill:
                            first_after_kill.append(time.monotonic())
                    except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
                        outcomes[name] = 0  # no reply at all

            workers = [asyncio.create_task(create_until_stopped(w)) for w in range(8)]
            await eventually(lambda: sum(s == 201 for s in outcomes.values()) >= 40, timeout=20)
            cluster.kill(await cluster.stream_leader(f"KV_{settings.bucket}", nc))
            killed_at.append(time.monotonic())
            await eventually(lambda: first_after_kill, timeout=20)
            await eventually(lambda: sum(s == 201 for s in outcomes.values()) >= 80, timeout=20)
            stop.set()
            await asyncio.gather(*workers)

            store = TriggerStore(nc, settings.bucket)

            async def stored_names() -> set[str]:
                return {key.split(".", 2)[2] for key, _ in await store.live("acme.gateway.*")}

            acknowledged = {n for n, s in outcomes.items() if s == 201}
            refused = {n for n, s in outcomes.items() if s == 503}
            unknown = {n for n, s in outcomes.items() if s == 504}  # 0: the reply was lost with a node
            assert acknowledged <= await stored_names()
            assert not refused & await stored_names()
            # An "outcome unknown" create is removed again should the store have committed it.
            await eventually(lambda: _none_of(unknown, stored_names), timeout=15)
            assert set(outcomes.values()) <= {201, 503, 504, 0}
            assert first_after_kill[0] - killed_at[0] < 15
            assert max(durations) < ANSWER_WITHIN + 2  # a gateway create is two writes
    finally:
        await nc.close()


async def _timed(nc: Client, subject: str, body: Any) -> tuple[Reply, float]:
    """The reply and how long it took, once a replica is reachable again (its connection may be
    reconnecting to the surviving node)."""
    deadline = time.monotonic() + 10
    while True:
        started = time.monotonic()
        try:
            return await request(nc, subject, body, timeout=15), time.monotonic() - started
        except nats.errors.NoRespondersError:
            assert time.monotonic() < deadline, "no replica reachable"
            await asyncio.sleep(0.05)  # between attempts


async def _none_of(names: set[str], stored: Any) -> bool:
    return not names & await stored()


async def test_every_operation_answers_within_a_bounded_time_without_quorum_and_none_lies(cluster):
    nc = await _client(cluster)
    try:
        async with _stack(cluster) as (settings, replicas, _url):
            kept = unique("kept")
            reply = await request(
                nc, f"{PREFIX}.create.stream", stream_request(kept, f"in.{kept}", f"out.{kept}")
            )
            assert reply.status == 201
            leader = await cluster.stream_leader(f"KV_{settings.bucket}", nc)
            others = [i for i in range(3) if i != leader]
            cluster.kill(others[0])
            cluster.kill(others[1])
            # Every connection on the surviving node again: from here on only JetStream is missing.
            survivor = cluster.servers[leader].port
            connections = [nc, *(r._nc for r in replicas)]
            await eventually(
                lambda: all(c.is_connected and c.connected_url.port == survivor for c in connections),
                timeout=10,
            )

            lost = unique("lost")
            operations = [
                (f"{PREFIX}.create.stream", stream_request(lost, f"in.{lost}", f"out.{lost}")),
                (f"{PREFIX}.get.stream.{kept}", None),
                (f"{PREFIX}.list", {"subject_pattern": f"{PREFIX}.stream.*"}),
                (f"{PREFIX}.history.stream.{kept}", None),
                (f"{PREFIX}.delete.stream.{kept}", None),
            ]
            statuses = {}
            for subject, body in operations:
                reply, took = await _timed(nc, subject, body)
                statuses[subject.split(".")[2]] = reply.status
                # A leader that lost its quorum may still answer reads from what it holds.
                writes = subject.split(".")[2] in ("create", "delete")
                assert reply.status in ((503, 504) if writes else (200, 503)), (subject, reply.envelope)
                assert took < ANSWER_WITHIN + 1, (subject, took)

            cluster.heal()

            # The create answered 503/504 is not there, and the delete answered 504 is completed.
            async def lost_is_gone() -> bool:
                return (await _settled(nc, f"{PREFIX}.get.stream.{lost}")).status == 404

            # 503: never stored; 504: removed again should the store have committed it meanwhile.
            await eventually(lost_is_gone, timeout=15)

            async def kept_is(status: int) -> bool:
                return (await _settled(nc, f"{PREFIX}.get.stream.{kept}")).status == status

            # 504: the delete is completed; 503: nothing was stored, the trigger is still there.
            await eventually(lambda: kept_is(404 if statuses["delete"] == 504 else 200), timeout=15)
            assert await lost_is_gone()
    finally:
        await nc.close()


async def test_two_replicas_never_both_accept_the_halves_of_a_cycle(cluster):
    """A->B and B->A sent at the same moment (each half to whichever replica takes it): one 201,
    one 400, and the loser leaves nothing live."""
    nc = await _client(cluster)
    try:
        async with _stack(cluster) as (settings, replicas, _url):
            pairs = [(unique("x"), unique("y")) for _ in range(20)]

            async def both(x: str, y: str) -> list[int]:
                replies = await asyncio.gather(
                    request(nc, f"{PREFIX}.create.stream", stream_request(f"{x}-fw", x, y), timeout=10),
                    request(nc, f"{PREFIX}.create.stream", stream_request(f"{x}-bw", y, x), timeout=10),
                )
                return sorted(r.status for r in replies)

            outcomes = await asyncio.gather(*(both(x, y) for x, y in pairs))
            assert outcomes == [[201, 400]] * len(pairs)
            store = TriggerStore(nc, settings.bucket)
            live = {key.split(".", 2)[2] for key, _ in await store.live("acme.stream.*")}
            for x, _ in pairs:
                assert len(live & {f"{x}-fw", f"{x}-bw"}) == 1

            def carried_once() -> bool:
                return all(
                    sum(_carries(r, key_of("acme", "stream", f"{x}-{d}")) for d in ("fw", "bw")) == 1
                    for r in replicas
                    for x, _ in pairs
                )

            await eventually(carried_once, timeout=FOLLOW_WITHIN)
    finally:
        await nc.close()


async def test_a_stack_started_while_a_node_is_down_serves(cluster):
    """Start-up with one node of three down (its peers keep a quorum): the replicas and the sidecar
    start, and a trigger created through them is live."""
    cluster.kill(2)
    nc = await _client(cluster)
    try:
        async with (
            _stack(cluster) as (_settings, replicas, url),
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http,
        ):
            name, path = unique("up"), f"/{unique()}"
            assert (
                await _settled(nc, f"{PREFIX}.create.gateway", gateway_request(name, "GET", path))
            ).status == 201
            stream = stream_request(name, f"in.{name}", f"out.{name}")
            assert (await _settled(nc, f"{PREFIX}.create.stream", stream)).status == 201
            await eventually(lambda: all(_carries(r, key_of("acme", "stream", name)) for r in replicas))
            await eventually(lambda: _served_not_404(http, url, path), timeout=FOLLOW_WITHIN)
    finally:
        await nc.close()


async def _served_not_404(http: aiohttp.ClientSession, url: str, path: str) -> bool:
    return await _served(http, url, path) not in (0, 404)
