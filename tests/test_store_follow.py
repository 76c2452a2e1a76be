"""Followers of the bucket (stream routes, the route graph) keep following it when nats-server restarts.

After a restart the KV watch's consumer is gone with the old server: every follower must watch
again from a fresh snapshot, or it silently stops seeing the changes other replicas make.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import msgspec
import nats
import pytest
from nats.aio.client import Client

from schemas.triggers import StreamTrigger
from service.app import running
from service.config import Settings
from service.natsserver import NatsServer
from service.store import Change, TriggerStore
from tests.conftest import make_settings
from tests.support import Inbox, Reply, eventually, request, stream_request, unique

API, OTHER = "ms.trigger", "other.trigger"


class Restartable:
    """A private nats-server that can be restarted on its port, with the store it had or an empty one."""

    def __init__(self, store_dir: Path) -> None:
        self.server = NatsServer(store_dir=store_dir).start()
        self.url = self.server.url

    def restart(self, store_dir: Path) -> None:
        port = self.server.port
        self.server.stop()
        self.server = NatsServer(store_dir=store_dir, extra_args=("-p", str(port))).start()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Restartable]:
    """A server of the test's own: restarting the session's one would disturb every other test."""
    restartable = Restartable(tmp_path / "store")
    yield restartable
    restartable.server.stop()


@pytest.fixture
async def client(server: Restartable) -> AsyncIterator[Client]:
    """The test's connection, reconnecting quickly after a restart."""
    nc = await nats.connect(server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.1)
    yield nc
    await nc.close()


def other_replica(settings: Settings) -> Settings:
    """Another replica on the same bucket, answering on its own prefix: it makes the changes that
    the replica under test can only learn by following the bucket."""
    return msgspec.structs.replace(settings, prefix=OTHER)


async def create(nc: Client, prefix: str, source: str, target: str) -> Reply:
    return await request(nc, f"{prefix}.create.stream", stream_request(unique(), source, target))


async def created(nc: Client, prefix: str, source: str, target: str) -> str:
    reply = await create(nc, prefix, source, target)
    assert reply.status == 201, reply.envelope
    return str(reply.body["name"])


async def carried(nc: Client, source: str, inbox: Inbox, timeout: float = 10.0) -> None:
    """Publish on the source until a message shows up in the inbox (the route may not be live yet)."""
    payload = unique().encode()

    async def probe() -> bool:
        await nc.publish(source, payload)
        await nc.flush()
        return payload in inbox.payloads

    await eventually(probe, timeout=timeout, interval=0.05)


async def not_carried_any_more(nc: Client, source: str, gone: Inbox, live: Inbox) -> None:
    """Messages on the source reach the live route's inbox and none reaches the stopped one's."""
    after = [unique().encode() for _ in range(20)]
    for payload in after:
        await nc.publish(source, payload)
    await live.wait_for(*after)
    assert not set(gone.payloads) & set(after)


async def test_stream_routes_and_the_route_graph_follow_changes_made_after_a_restart(
    server: Restartable, client: Client, tmp_path: Path
) -> None:
    base = unique("s")
    source = f"{base}.src"
    old, second = await Inbox.on(client, f"{base}.old"), await Inbox.on(client, f"{base}.w2")
    settings = make_settings(server.url)
    async with running(settings):
        name = await created(client, API, source, f"{base}.old")
        await carried(client, source, old)

        server.restart(tmp_path / "store")
        async with running(other_replica(settings)):
            await created(client, OTHER, source, f"{base}.w1")
            reply = await request(client, f"{OTHER}.delete.stream.{name}")
            assert reply.status == 200, reply.envelope
            await created(client, OTHER, source, f"{base}.w2")

        # Only the replica under test is left, and it applies the bucket's changes in order.
        await carried(client, source, second)
        await not_carried_any_more(client, source, old, second)

        # Its route graph followed too: the deleted route no longer blocks its reverse (until
        # then the create is refused, storing nothing), and the route made before the delete
        # closes a cycle.
        async def reverse_accepted() -> bool:
            return (await create(client, API, f"{base}.old", source)).status == 201

        await eventually(reverse_accepted, timeout=10.0)
        cycle = await create(client, API, f"{base}.w1", source)
        assert cycle.status == 400, cycle.envelope
        assert "would close a cycle" in cycle.envelope["error"]


async def test_a_route_missing_from_the_bucket_after_a_restart_stops_being_carried(
    server: Restartable, client: Client, tmp_path: Path
) -> None:
    """The server comes back with an empty store: the routes it no longer holds stop."""
    base = unique("s")
    source = f"{base}.src"
    old, first, second = [await Inbox.on(client, f"{base}.{i}") for i in ("old", "w1", "w2")]
    settings = make_settings(server.url)
    async with running(settings):
        await created(client, API, source, f"{base}.old")
        await carried(client, source, old)

        server.restart(tmp_path / "empty")
        async with running(other_replica(settings)):  # it makes the bucket again
            await created(client, OTHER, source, f"{base}.w1")
        await carried(client, source, first)  # the replica under test watches the new bucket
        # Made after the new snapshot was applied, so carried only after the missing route stopped.
        async with running(other_replica(settings)):
            await created(client, OTHER, source, f"{base}.w2")
        await carried(client, source, second)
        await not_carried_any_more(client, source, old, second)


async def test_a_change_that_fails_to_apply_never_holds_up_the_others(nc, settings):
    """A data plane that cannot apply one key's change (every time) still gets every other change,
    and the failing one is tried again until it applies."""
    async with running(settings):
        kv = await nc.jetstream().key_value(settings.bucket)
        created = await request(
            nc, f"{API}.create.stream", stream_request(unique(), f"in.{unique()}", "out.x")
        )
        record = created.envelope["body"]
        await kv.put("acme.stream.bad", msgspec.json.encode(dict(record, name="bad")))
        await kv.put("acme.stream.good", msgspec.json.encode(dict(record, name="good")))
        store = TriggerStore(nc, settings.bucket)
        applied: list[str] = []

        async def apply(change: Change) -> None:
            if change.key == "acme.stream.bad" and "acme.stream.later" not in applied:
                raise RuntimeError("cannot carry this one (until the others are in)")
            applied.append(change.key)

        async with store.following("acme.stream.*", [apply]):
            await eventually(lambda: "acme.stream.good" in applied, timeout=5)
            await kv.put("acme.stream.later", msgspec.json.encode(dict(record, name="later")))
            await eventually(lambda: "acme.stream.later" in applied, timeout=5)
            await eventually(lambda: "acme.stream.bad" in applied, timeout=10)


async def test_a_follower_takes_this_replicas_own_writes_as_written_and_decodes_the_others(nc, settings):
    """The records this process stored reach its followers as the very records it wrote (no decoding
    again); a record another writer stored at a sequence is decoded from its bytes, never mistaken
    for one of ours."""
    async with running(settings):  # a record as the service stores it, to write more like it
        template = await request(nc, f"{API}.create.stream", stream_request("t", f"in.{unique()}", "out.x"))
    store = await TriggerStore.open(nc, settings.bucket)
    kv = await nc.jetstream().key_value(settings.bucket)
    body = {k: v for k, v in template.envelope["body"].items() if k != "revision"}
    record = msgspec.convert(dict(body, name="mine", subject=f"{API}.stream.mine"), StreamTrigger)
    changes: dict[str, Change] = {}

    async def apply(change: Change) -> None:
        changes[change.key] = change

    async with store.following("acme.stream.*", [apply]):
        mine = await store.create("acme.stream.mine", record)
        other = msgspec.structs.replace(record, name="theirs")
        theirs = await kv.put("acme.stream.theirs", msgspec.json.encode(other))
        await eventually(lambda: {"acme.stream.mine", "acme.stream.theirs"} <= changes.keys(), timeout=5)
    assert changes["acme.stream.mine"].revision == mine
    assert changes["acme.stream.mine"].record is store._written[mine][1]
    assert changes["acme.stream.theirs"].revision == theirs
    assert changes["acme.stream.theirs"].record == other
    assert theirs not in store._written


async def test_data_planes_sharing_one_watch_each_get_every_change_and_fail_alone(nc, settings):
    """Two data planes on one watch: one failing to apply a change does not keep it from the other,
    and only the one that failed is asked again."""
    store = await TriggerStore.open(nc, settings.bucket)
    kv = await nc.jetstream().key_value(settings.bucket)
    record = stream_request("x", f"in.{unique()}", "out.x", created_at="2026-12-02T00:00:00.000Z")
    first: list[str] = []
    second: list[str] = []
    failures = 0

    async def failing_once(change: Change) -> None:
        nonlocal failures
        if change.key == "acme.stream.a" and failures == 0:
            failures += 1
            raise RuntimeError("not now")
        first.append(change.key)

    async def steady(change: Change) -> None:
        second.append(change.key)

    async with store.following("acme.stream.*", [failing_once, steady]):
        await kv.put("acme.stream.a", msgspec.json.encode(dict(record, name="a")))
        await eventually(lambda: "acme.stream.a" in second, timeout=5)
        await eventually(lambda: "acme.stream.a" in first, timeout=5)  # tried again a second later
    assert failures == 1
    assert second.count("acme.stream.a") == 1  # the plane that applied it was not asked again
