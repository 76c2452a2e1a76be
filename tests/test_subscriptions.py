"""Subscriptions without a task each (service.subscriptions) and requests on them (service.requests),
against a real nats-server: order, drains, unsubscribes, reconnects, timeouts, no responders."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import nats.errors
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from service import requests
from service.natsserver import NatsServer
from service.subscriptions import Lane
from tests.support import eventually, unique


@pytest.fixture
async def lane(nc: Client) -> AsyncIterator[Lane]:
    async with Lane(nc) as lane:
        yield lane


async def test_each_routes_messages_arrive_once_and_in_order(nc: Client, lane: Lane) -> None:
    base = unique("lane")
    got: dict[str, list[bytes]] = {"a": [], "b": []}

    def keep(name: str):  # type: ignore[no-untyped-def]
        async def cb(msg: Msg) -> None:
            got[name].append(msg.data)

        return cb

    for name in got:
        await lane.subscribe(f"{base}.{name}", "", keep(name))
    await nc.flush()
    sender = await nats.connect(nc.connected_url.geturl() if nc.connected_url else "")
    try:
        for i in range(500):
            await sender.publish(f"{base}.a", b"%d" % i)
            await sender.publish(f"{base}.b", b"%d" % i)
        await sender.flush()
    finally:
        await sender.close()
    expected = [b"%d" % i for i in range(500)]
    await eventually(lambda: got["a"] == expected and got["b"] == expected, timeout=5)


async def test_drain_hands_on_what_arrived_and_unsubscribe_drops_what_waits(nc: Client, lane: Lane) -> None:
    base = unique("lane")
    release = asyncio.Event()
    carried: list[bytes] = []
    dropped: list[bytes] = []

    async def slow(msg: Msg) -> None:  # holds the lane until released: messages queue behind it
        await release.wait()
        carried.append(msg.data)

    async def fast(msg: Msg) -> None:
        dropped.append(msg.data)

    drained = await lane.subscribe(f"{base}.drained", "", slow)
    gone = await lane.subscribe(f"{base}.gone", "", fast)
    await nc.flush()
    for i in range(3):
        await nc.publish(f"{base}.drained", b"%d" % i)
    await nc.publish(f"{base}.gone", b"queued")
    await nc.flush()
    await eventually(lambda: lane.received == 4, timeout=5)
    await gone.unsubscribe()  # its message waits behind the held one: dropped
    draining = asyncio.create_task(drained.drain())
    await nc.flush()  # the drain's own round trip is answered before this one's
    for _ in range(3):
        await asyncio.sleep(0)  # turns of the loop for the drain to go on, were it not waiting
    assert not draining.done()  # waits for the messages it received
    release.set()
    await asyncio.wait_for(draining, 5)
    assert carried == [b"0", b"1", b"2"]
    assert dropped == []
    await nc.publish(f"{base}.drained", b"late")
    await nc.flush()
    assert lane.received == 4  # nothing more for a drained subscription


async def test_a_route_subscription_is_subscribed_again_after_a_reconnect(tmp_path: Path) -> None:
    server = NatsServer(store_dir=tmp_path / "a").start()
    try:
        reconnected = asyncio.Event()

        async def on_reconnect() -> None:
            reconnected.set()

        nc = await nats.connect(
            server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.1, reconnected_cb=on_reconnect
        )
        got: list[bytes] = []

        async def keep(msg: Msg) -> None:
            got.append(msg.data)

        async with Lane(nc) as lane:
            await lane.subscribe("after.restart", "q", keep)
            await nc.flush()
            port = server.port
            server.stop()
            server = NatsServer(store_dir=tmp_path / "b", extra_args=("-p", str(port))).start()
            await asyncio.wait_for(reconnected.wait(), 10)
            await nc.publish("after.restart", b"again")
            await nc.flush()
            await eventually(lambda: got == [b"again"], timeout=5)
        await nc.close()
    finally:
        server.stop()


async def test_requests_get_their_replies_time_out_and_see_no_responders(nc: Client) -> None:
    subject = unique("echo")

    async def echo(msg: Msg) -> None:
        await msg.respond(msg.data + b"!")

    await nc.subscribe(subject, cb=echo)
    await nc.flush()
    replies = await asyncio.gather(*(requests.request(nc, subject, b"%d" % i, wait=2) for i in range(50)))
    assert [r.data for r in replies] == [b"%d!" % i for i in range(50)]

    silent = unique("silent")

    async def ignore(msg: Msg) -> None:
        pass

    await nc.subscribe(silent, cb=ignore)
    await nc.flush()
    with pytest.raises(nats.errors.TimeoutError):
        await requests.request(nc, silent, b"", wait=0.05)
    with pytest.raises(nats.errors.NoRespondersError):
        await requests.request(nc, unique("nobody"), b"", wait=2)
