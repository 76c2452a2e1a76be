"""Stream triggers carry data in single-account mode, end to end against a real nats-server."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import msgspec
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from schemas.triggers import StreamTrigger, TriggerSource, TriggerTarget
from service.app import connect, running
from service.config import Settings
from service.store import TriggerStore, now_rfc3339
from service.streams import SubscriptionCarrier
from tests.support import Inbox, Reply, eventually, request, stream_request, unique

BINARY = bytes(range(256)) * 4
OTHER = "other.trigger"


async def create(
    nc: Client,
    source: str,
    target: str | None,
    *,
    name: str | None = None,
    kind: str = "stream",
    response_type: str | None = None,
    prefix: str = "ms.trigger",
) -> Reply:
    body = stream_request(name or unique(), source, target or source)
    body["source"]["type"] = body["target"]["type"] = kind
    if response_type:
        body["source"]["response_type"] = response_type
    if target is None:
        del body["target"]["subject"]
    return await request(nc, f"{prefix}.create.stream", body)


async def created(nc: Client, source: str, target: str, **options: Any) -> str:
    reply = await create(nc, source, target, **options)
    assert reply.status == 201, reply.envelope
    return str(reply.body["name"])


async def delete(nc: Client, name: str, prefix: str = "ms.trigger") -> None:
    reply = await request(nc, f"{prefix}.delete.stream.{name}")
    assert reply.status == 200, reply.envelope


def subjects() -> tuple[str, str]:
    base = unique("s")
    return f"{base}.src", f"{base}.dst"


async def settle(nc: Client, source: str, *inboxes: Inbox) -> None:
    """Publish one sentinel on a live route and wait until every inbox has it: whatever was
    published before has had its chance to be carried."""
    await nc.publish(source, b"sentinel")
    for inbox in inboxes:
        await inbox.wait_for(b"sentinel")


async def carried(nc: Client, source: str, inbox: Inbox, payload: bytes, timeout: float = 5.0) -> None:
    """Publish on the source until the payload shows up in the inbox (the route may not be live yet)."""

    async def probe() -> bool:
        await nc.publish(source, payload)
        await nc.flush()
        return payload in inbox.payloads

    await eventually(probe, timeout=timeout, interval=0.02)


# --- stream routes ---------------------------------------------------------------------------


@pytest.mark.usefixtures("service")
async def test_stream_route_is_live_when_the_201_arrives_and_keeps_payload_and_headers(nc):
    source, destination = subjects()
    inbox = await Inbox.on(nc, destination)
    await nc.publish(source, b"before creation")

    await created(nc, source, destination)
    await nc.publish(source, BINARY, headers={"X-Trace": "abc-1", "Content-Type": "application/x-thing"})
    await nc.publish(source, b"")

    await eventually(lambda: len(inbox.messages) == 2)
    binary, empty = inbox.messages
    assert binary.data == BINARY
    assert binary.headers == {"X-Trace": "abc-1", "Content-Type": "application/x-thing"}
    assert binary.subject == destination
    assert empty.data == b""
    assert b"before creation" not in inbox.payloads


@pytest.mark.usefixtures("service")
async def test_stream_route_keeps_the_reply_subject(nc):
    source, destination = subjects()

    async def respond(msg: Msg) -> None:
        await nc.publish(msg.reply, b"pong:" + msg.data)

    await nc.subscribe(destination, cb=respond)
    await created(nc, source, destination)
    answer = await nc.request(source, b"ping", timeout=2)
    assert answer.data == b"pong:ping"


@pytest.mark.usefixtures("service")
async def test_local_subject_wins_over_target_subject(nc):
    source, destination = subjects()
    inbox = await Inbox.on(nc, destination)
    body = stream_request(unique(), source, f"{destination}.ignored")
    body["target"]["local_subject"] = destination
    assert (await request(nc, "ms.trigger.create.stream", body)).status == 201
    await nc.publish(source, b"local")
    await inbox.wait_for(b"local")


@pytest.mark.usefixtures("service")
async def test_star_wildcards_map_token_by_token(nc):
    base = unique("w")
    inbox = await Inbox.on(nc, f"{base}.b.>")
    await created(nc, f"{base}.a.*.x.*", f"{base}.b.*.y.*")
    await nc.publish(f"{base}.a.1.x.2", b"one-two")
    await nc.publish(f"{base}.a.1.z.2", b"not matched")
    await inbox.wait_for(b"one-two")
    assert [(m.subject, m.data) for m in inbox.messages] == [(f"{base}.b.1.y.2", b"one-two")]


@pytest.mark.usefixtures("service")
async def test_trailing_wildcard_carries_every_remaining_token(nc):
    base = unique("w")
    inbox = await Inbox.on(nc, f"{base}.b.>")
    await created(nc, f"{base}.a.>", f"{base}.b.out.>")
    await nc.publish(f"{base}.a.1", b"short")
    await nc.publish(f"{base}.a.1.2.3", b"long")
    await inbox.wait_for(b"short", b"long")
    assert [m.subject for m in inbox.messages] == [f"{base}.b.out.1", f"{base}.b.out.1.2.3"]


@pytest.mark.usefixtures("service")
async def test_a_burst_of_10000_messages_arrives_complete_and_in_order(nc):
    source, destination = subjects()
    inbox = await Inbox.on(nc, destination)
    await created(nc, source, destination)
    expected = [str(i).encode() for i in range(10_000)]
    for payload in expected:
        await nc.publish(source, payload)
    await nc.flush()
    await eventually(lambda: len(inbox.messages) >= len(expected), timeout=20)
    assert inbox.payloads == expected


# --- service routes --------------------------------------------------------------------------


async def responder(nc: Client, subject: str, replies: int) -> list[Msg]:
    """Answer every request on `subject` with `replies` messages; return the requests seen."""
    seen: list[Msg] = []

    async def answer(msg: Msg) -> None:
        seen.append(msg)
        for i in range(replies):
            await nc.publish(msg.reply, f"{msg.data.decode()}:{i}".encode(), headers={"Seq": str(i)})

    await nc.subscribe(subject, cb=answer)
    await asyncio.sleep(0)
    await nc.flush()
    return seen


@pytest.mark.usefixtures("service")
async def test_service_route_singleton_reply_goes_straight_to_the_requester(nc):
    source, destination = subjects()
    seen = await responder(nc, source, replies=1)
    await created(nc, source, destination, kind="service", response_type="Singleton")

    answer = await nc.request(destination, b"q", timeout=2, headers={"X-Caller": "me"})
    assert answer.data == b"q:0"
    (forwarded,) = seen
    assert forwarded.subject == source
    assert forwarded.headers == {"X-Caller": "me"}
    assert forwarded.reply == answer.subject  # the requester's own inbox, no hop on the way back


@pytest.mark.parametrize("response_type", ["Stream", "Chunked"])
@pytest.mark.usefixtures("service")
async def test_service_route_several_replies_all_reach_the_requester(nc, response_type):
    source, destination = subjects()
    await responder(nc, source, replies=5)
    await created(nc, source, destination, kind="service", response_type=response_type)

    reply_to = nc.new_inbox()
    inbox = await Inbox.on(nc, reply_to)
    await nc.publish(destination, b"q", reply=reply_to)
    await eventually(lambda: len(inbox.messages) == 5)
    assert inbox.payloads == [f"q:{i}".encode() for i in range(5)]


@pytest.mark.usefixtures("service")
async def test_service_route_maps_wildcards_from_target_back_to_source(nc):
    base = unique("w")
    seen = await responder(nc, f"{base}.svc.>", replies=1)
    await created(nc, f"{base}.svc.*.get", f"{base}.api.*.read", kind="service")
    answer = await nc.request(f"{base}.api.7.read", b"q", timeout=2)
    assert answer.data == b"q:0"
    assert [m.subject for m in seen] == [f"{base}.svc.7.get"]


@pytest.mark.usefixtures("service")
async def test_nothing_answers_a_service_route_before_creation(nc):
    source, destination = subjects()
    await responder(nc, source, replies=1)
    with pytest.raises(Exception, match="no responders"):
        await nc.request(destination, b"q", timeout=2)


# --- loops -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "target"),
    [("{b}.x", "{b}.x"), ("{b}.a.>", "{b}.a.b.>"), ("{b}.a.*.x", "{b}.a.x.*"), ("{b}.x", None)],
    ids=["same subject", "nested trailing wildcard", "crossing stars", "no target subject"],
)
@pytest.mark.usefixtures("service")
async def test_a_target_the_source_matches_is_refused(nc, source, target):
    base = unique("l")
    reply = await create(nc, source.format(b=base), target.format(b=base) if target else None)
    assert reply.status == 400, reply.envelope
    assert "loop" in reply.envelope["error"]


@pytest.mark.parametrize("reverse", [False, True], ids=["a-to-b first", "b-to-a first"])
@pytest.mark.usefixtures("service")
async def test_a_route_back_to_its_source_is_refused(nc, reverse):
    base = unique("l")
    a, b = f"{base}.a", f"{base}.b"
    first, second = ((b, a), (a, b)) if reverse else ((a, b), (b, a))
    await created(nc, *first)
    reply = await create(nc, *second)
    assert reply.status == 400, reply.envelope
    assert "cycle" in reply.envelope["error"]


@pytest.mark.parametrize("service_first", [False, True], ids=["stream first", "service first"])
@pytest.mark.usefixtures("service")
async def test_a_service_route_that_feeds_a_stream_route_back_is_refused(nc, service_first):
    # stream a -> b carries a to b; service S=a, D=b forwards requests on b to a: together, a loop.
    base = unique("l")
    a, b = f"{base}.a", f"{base}.b"
    first, second = ({"kind": "service"}, {}) if service_first else ({}, {"kind": "service"})
    await created(nc, a, b, **first)
    reply = await create(nc, a, b, **second)
    assert reply.status == 400, reply.envelope
    assert "cycle" in reply.envelope["error"]


@pytest.mark.usefixtures("service")
async def test_a_longer_cycle_through_wildcards_is_refused(nc):
    base = unique("l")
    await created(nc, f"{base}.a.*", f"{base}.b.*")
    await created(nc, f"{base}.b.>", f"{base}.c.>")
    reply = await create(nc, f"{base}.c.*", f"{base}.a.*")
    assert reply.status == 400, reply.envelope
    assert "cycle" in reply.envelope["error"]


@pytest.mark.usefixtures("service")
async def test_a_deleted_route_no_longer_counts_for_cycles(nc):
    base = unique("l")
    name = await created(nc, f"{base}.a", f"{base}.b")
    await delete(nc, name)
    assert (await create(nc, f"{base}.b", f"{base}.a")).status == 201


@pytest.mark.usefixtures("service")
async def test_cycles_are_found_through_any_of_several_routes_from_one_source(nc):
    """Three routes leave `a`; the cycle back through the one to `c` is found while it lives, and
    deleting the others, or it, changes the answer only as it should."""
    base = unique("l")
    a, b, c, d = (f"{base}.{x}" for x in "abcd")
    to_b = await created(nc, a, b)
    to_c = await created(nc, a, c)
    to_d = await created(nc, a, d)
    assert "cycle" in (await create(nc, c, a)).envelope["error"]
    await delete(nc, to_b)
    await delete(nc, to_d)
    assert "cycle" in (await create(nc, c, a)).envelope["error"]  # the one left from `a` still counts
    await delete(nc, to_c)
    assert (await create(nc, c, a)).status == 201
    assert "cycle" in (await create(nc, a, c)).envelope["error"]  # a new route from `a` counts again


# --- delete ----------------------------------------------------------------------------------


@pytest.mark.usefixtures("service")
async def test_delete_stops_the_route_before_the_200(nc):
    source, destination = subjects()
    gone, witness = await Inbox.on(nc, destination), await Inbox.on(nc, f"{destination}.witness")
    name = await created(nc, source, destination)
    await created(nc, source, f"{destination}.witness")
    await nc.publish(source, b"while live")
    await gone.wait_for(b"while live")

    await delete(nc, name)
    late = [f"late {i}".encode() for i in range(20)]
    for payload in late:
        await nc.publish(source, payload)
    await witness.wait_for(*late)
    await settle(nc, source, witness)  # the deleted route had every chance to carry
    assert gone.payloads == [b"while live"]


@pytest.mark.usefixtures("service")
async def test_a_name_created_again_carries_to_its_new_target_only(nc):
    source, first = subjects()
    second = f"{first}.again"
    old, new = await Inbox.on(nc, first), await Inbox.on(nc, second)
    name = await created(nc, source, first)
    await delete(nc, name)
    await created(nc, source, second, name=name)
    await nc.publish(source, b"after")
    await new.wait_for(b"after")
    await settle(nc, source, new)
    assert old.payloads == []


# --- replicas and restarts -------------------------------------------------------------------


async def test_live_triggers_are_carried_again_after_a_restart(nc, settings):
    source, destination = subjects()
    inbox, gone = await Inbox.on(nc, destination), await Inbox.on(nc, f"{destination}.deleted")
    async with running(settings):
        await created(nc, source, destination)
        deleted = await created(nc, source, f"{destination}.deleted")
        await delete(nc, deleted)
    async with running(settings):
        await nc.publish(source, b"first after restart")  # no retry: live before the service answers
        await inbox.wait_for(b"first after restart")
        await settle(nc, source, inbox)
    assert inbox.payloads == [b"first after restart", b"sentinel"]
    assert gone.payloads == []


async def test_two_replicas_carry_each_message_once_per_trigger(nc, settings):
    source, destination = subjects()
    one, two = await Inbox.on(nc, f"{destination}.1"), await Inbox.on(nc, f"{destination}.2")
    async with running(settings):
        await created(nc, source, f"{destination}.1")
        await created(nc, source, f"{destination}.2")
        async with running(settings):  # starts once both triggers are live in it
            expected = [str(i).encode() for i in range(500)]
            for payload in expected:
                await nc.publish(source, payload)
            await one.wait_for(*expected)
            await two.wait_for(*expected)
            await settle(nc, source, one, two)
    assert sorted(one.payloads) == sorted([*expected, b"sentinel"])
    assert sorted(two.payloads) == sorted([*expected, b"sentinel"])


def other_replica(settings: Settings) -> Settings:
    """A replica of the same service (same bucket) that answers on its own prefix, so a test can
    choose which replica handles a request."""
    return msgspec.structs.replace(settings, prefix=OTHER)


async def test_a_trigger_created_through_one_replica_is_live_in_another_within_a_second(nc, settings):
    source, destination = subjects()
    inbox = await Inbox.on(nc, destination)
    async with running(settings):
        async with running(other_replica(settings)):
            await created(nc, source, destination, prefix=OTHER)
            started = time.monotonic()
        # Only the replica that learnt of the trigger by watching the bucket is left.
        await carried(nc, source, inbox, b"via the other replica", timeout=1.0 - (time.monotonic() - started))


async def test_a_trigger_deleted_through_one_replica_stops_in_another_within_a_second(nc, settings):
    source, destination = subjects()
    gone, witness = await Inbox.on(nc, destination), await Inbox.on(nc, f"{destination}.witness")
    async with running(settings):
        async with running(other_replica(settings)):
            name = await created(nc, source, destination)
            await delete(nc, name, prefix=OTHER)
            # Created after the delete: the remaining replica applies the bucket's changes in order,
            # so once it carries the witness it has stopped the deleted route.
            await created(nc, source, f"{destination}.witness", prefix=OTHER)
            started = time.monotonic()
        await carried(nc, source, witness, b"probe", timeout=1.0 - (time.monotonic() - started))
        after = [f"after {i}".encode() for i in range(20)]
        for payload in after:
            await nc.publish(source, payload)
        await witness.wait_for(*after)
        await settle(nc, source, witness)
    assert not set(gone.payloads) & {*after, b"sentinel"}


# --- the carrier's contract, event by event --------------------------------------------------


def stream_trigger(source: str, destination: str) -> StreamTrigger:
    return StreamTrigger(
        name=unique(),
        stream="b",
        subject="ms.trigger.stream.x",
        type="created",
        created_at=now_rfc3339(),
        source=TriggerSource(subject=source),
        target=TriggerTarget(subject=destination),
    )


async def test_carrier_applies_events_by_revision_and_never_revives_a_deleted_route(nc, settings):
    source, destination = subjects()
    old, new, witness = [await Inbox.on(nc, f"{destination}.{i}") for i in ("old", "new", "witness")]
    store = await TriggerStore.open(nc, settings.bucket)
    first, second = stream_trigger(source, f"{destination}.old"), stream_trigger(source, f"{destination}.new")
    async with SubscriptionCarrier(settings, store, connect) as carrier:
        await carrier.activate("acme.stream.witness", 1, stream_trigger(source, f"{destination}.witness"))
        await carrier.activate("acme.stream.x", 5, first)
        await carrier.activate("acme.stream.x", 5, first)  # the handler, then the watch: one route
        await nc.publish(source, b"once")
        await old.wait_for(b"once")

        await carrier.deactivate("acme.stream.x", first)  # stopped when it returns
        await carrier.activate("acme.stream.x", 5, first)  # a late event of the deleted revision
        await nc.publish(source, b"after delete")
        await witness.wait_for(b"after delete")

        await carrier.activate("acme.stream.x", 7, second)  # a new incarnation
        await carrier.activate("acme.stream.x", 6, first)  # an older revision arriving after it
        await nc.publish(source, b"new")
        await settle(nc, source, new, witness)
    assert old.payloads == [b"once"]
    assert new.payloads == [b"new", b"sentinel"]


# --- updates and enable/disable --------------------------------------------------------------


async def update(nc: Client, name: str, source: str, target: str, prefix: str = "ms.trigger") -> None:
    reply = await request(nc, f"{prefix}.update.stream.{name}", stream_request(name, source, target))
    assert reply.status == 200, reply.envelope


async def patch(nc: Client, name: str, enabled: bool, prefix: str = "ms.trigger") -> None:
    reply = await request(nc, f"{prefix}.patch.stream.{name}", {"enabled": enabled})
    assert reply.status == 200, reply.envelope


@pytest.mark.parametrize("replicas", [2, 1])
async def test_an_update_under_load_delivers_every_message_exactly_once(nc, settings, replicas):
    """6,000 numbered messages at a steady 10,000 a second, the target changed after the first
    1,000: every number arrives once, on the old target or the new one, none lost, none twice.

    The rate is what makes the switch visible: with two replicas, a new queue group per revision
    doubles what is published while one replica has switched and the other not yet (a millisecond
    or two); with one, stopping the old subscription before the new one is up loses what is
    published meanwhile; and a replaced subscription loses the few messages the server hands it
    after confirming its UNSUB (about one run in twenty before the target was switched in place)."""
    source, first = subjects()
    second = f"{first}.new"
    old, new = await Inbox.on(nc, first), await Inbox.on(nc, second)
    total, batch, rate = 6000, 10, 10_000
    async with running(settings):
        name = await created(nc, source, first)
        async with contextlib.AsyncExitStack() as more:
            for _ in range(replicas - 1):  # each starts once the trigger is live in it: all carry it
                await more.enter_async_context(running(settings))
            updating: asyncio.Task[None] | None = None
            started = time.monotonic()
            for start in range(0, total, batch):
                for i in range(start, start + batch):
                    await nc.publish(source, str(i).encode())
                if start == 1000:
                    updating = asyncio.create_task(update(nc, name, source, second))
                # Steady: batch by batch on a schedule of `rate` messages a second.
                await asyncio.sleep(max(0.0, started + (start + batch) / rate - time.monotonic()))
            await nc.flush()
            assert updating is not None
            await updating

            def numbers() -> list[bytes]:
                return [p for p in old.payloads + new.payloads if p != b"sentinel"]

            with contextlib.suppress(AssertionError):  # lost messages: the assertion below says which
                await eventually(lambda: len(numbers()) >= total, timeout=10)
            await settle(nc, source, new)  # anything still on its way has arrived
    received = sorted(int(p) for p in numbers())
    assert received == list(range(total)), (len(received), len(set(received)))
    assert old.payloads, "the switch happened while messages flowed"
    assert new.payloads, "the switch happened while messages flowed"
    assert b"sentinel" not in old.payloads


@pytest.mark.usefixtures("service")
async def test_an_update_of_the_source_carries_from_the_new_source_only(nc):
    base = unique("u")
    inbox = await Inbox.on(nc, f"{base}.dst")
    name = await created(nc, f"{base}.one", f"{base}.dst")
    await update(nc, name, f"{base}.two", f"{base}.dst")
    await nc.publish(f"{base}.one", b"old source")
    await nc.publish(f"{base}.two", b"new source")
    await inbox.wait_for(b"new source")
    await settle(nc, f"{base}.two", inbox)
    assert inbox.payloads == [b"new source", b"sentinel"]


@pytest.mark.usefixtures("service")
async def test_an_update_that_changes_a_stream_route_into_a_service_route(nc):
    source, destination = subjects()
    seen = await responder(nc, source, replies=1)
    name = await created(nc, source, destination)
    body = stream_request(name, source, destination)
    body["source"]["type"] = body["target"]["type"] = "service"
    reply = await request(nc, f"ms.trigger.update.stream.{name}", body)
    assert reply.status == 200, reply.envelope
    answer = await nc.request(destination, b"q", timeout=2)
    assert answer.data == b"q:0"
    assert [m.subject for m in seen] == [source]


async def test_disable_and_enable_through_one_replica_apply_in_another_within_a_second(nc, settings):
    source, destination = subjects()
    inbox, witness = await Inbox.on(nc, destination), await Inbox.on(nc, f"{destination}.witness")
    async with running(settings):
        async with running(other_replica(settings)):
            name = await created(nc, source, destination)
            await patch(nc, name, False, prefix=OTHER)
            # Created after the disable: the remaining replica applies the bucket's changes in order,
            # so once it carries the witness it has stopped the disabled route.
            await created(nc, source, f"{destination}.witness", prefix=OTHER)
            started = time.monotonic()
        await carried(nc, source, witness, b"probe", timeout=1.0 - (time.monotonic() - started))
        during = [f"disabled {i}".encode() for i in range(20)]
        for payload in during:
            await nc.publish(source, payload)
        await witness.wait_for(*during)
        async with running(other_replica(settings)):
            await patch(nc, name, True, prefix=OTHER)
            started = time.monotonic()
        await carried(nc, source, inbox, b"enabled", timeout=1.0 - (time.monotonic() - started))
    assert not set(inbox.payloads) & set(during)


async def test_carrier_switches_an_updated_route_and_never_revives_an_older_revision(nc, settings):
    source, destination = subjects()
    old, new, witness = [await Inbox.on(nc, f"{destination}.{i}") for i in ("old", "new", "witness")]
    store = await TriggerStore.open(nc, settings.bucket)
    first = stream_trigger(source, f"{destination}.old")
    second = msgspec.structs.replace(
        first, target=TriggerTarget(subject=f"{destination}.new"), type="updated"
    )
    off = msgspec.structs.replace(second, enabled=False)
    async with SubscriptionCarrier(settings, store, connect) as carrier:
        await carrier.activate("acme.stream.witness", 1, stream_trigger(source, f"{destination}.witness"))
        await carrier.activate("acme.stream.x", 5, first)
        await carrier.activate("acme.stream.x", 6, second)
        await carrier.activate("acme.stream.x", 5, first)  # the older revision, late
        await nc.publish(source, b"updated")
        await settle(nc, source, new, witness)
        await carrier.activate("acme.stream.x", 7, off)
        await carrier.activate("acme.stream.x", 6, second)  # the enabled revision, late
        await nc.publish(source, b"disabled")
        await witness.wait_for(b"disabled")
        await settle(nc, source, witness)
    assert old.payloads == []
    assert new.payloads == [b"updated", b"sentinel"]
