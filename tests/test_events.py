"""Change events (issue 12, item 4): one event per change of a trigger, whichever replica made it.

Every test runs real service replicas (`running(settings)`) against the session's nats-server and
watches the bus as another service would: plain subscriptions on `<prefix>.events.<account>.>`,
a JetStream consumer of the events stream for catching up, and a nats.js client.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import nats.errors
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from service import config
from service.app import running
from service.events import ingest_subject, kind_of, stream_name
from service.natsserver import NatsCluster
from tests.conftest import make_settings
from tests.support import PREFIX, Inbox, Reply, eventually, gateway_request, request, stream_request, unique

JS_DIR = Path(__file__).parent / "js"


def _events(inbox: Inbox) -> list[dict[str, Any]]:
    return [msgspec.json.decode(m.data) for m in inbox.messages]


def _attempts(inbox: Inbox, key: str) -> list[Msg]:
    """The replicas' publishes of `key`'s events (every attempt, stored or refused)."""
    return [m for m in inbox.messages if (m.headers or {}).get("Nats-Msg-Id", "").startswith(f"{key}:")]


async def _history(nc: Client, account: str, trigger_type: str, name: str) -> list[dict[str, Any]]:
    reply = await request(nc, f"{PREFIX}.history.{trigger_type}.{name}", account=account)
    assert reply.status == 200, reply.envelope
    results: list[dict[str, Any]] = reply.body["results"]
    return results


async def _through_the_stream(nc: Client, bucket: str, *, within: float = 30.0) -> None:
    """Return once the events stream has decided everything published to it before this call.

    The stream stores (or refuses) what reaches it in order and republishes what it stores in
    that order, so once a message published now comes back republished, every publish that
    reached the server before it has been decided, and what was stored of them has been
    delivered to this connection.
    """
    barrier = unique("barrier")
    inbox = await Inbox.on(nc, f"{PREFIX}.events.{barrier}.>")
    deadline = time.monotonic() + within
    while True:  # an election of the stream's leader may be going on (cluster test)
        try:
            await nc.request(ingest_subject(PREFIX, bucket, f"{barrier}.stream.b"), b"{}", timeout=5)
            break
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
            assert time.monotonic() < deadline, "the events stream did not take a message"
    await inbox.first()


async def _stored(nc: Client, bucket: str, key: str) -> bool:
    """True when the events stream holds an event of `key` (read from the stream's leader)."""
    request_ = json.dumps({"last_by_subj": f"{PREFIX}.events.{key}"}).encode()
    try:
        reply = await nc.request(f"$JS.API.STREAM.MSG.GET.{stream_name(bucket, PREFIX)}", request_, timeout=2)
    except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
        return False
    return "message" in json.loads(reply.data)


async def _sentinel(nc: Client, bucket: str, account: str = "globex") -> str:
    """Create a trigger in `account` and return its key once its event is stored: the replicas
    publish the bucket's changes in order, so every change before it is an event by then."""
    name = unique("sentinel")
    body = stream_request(name, f"s.{name}", f"d.{name}")
    reply = await _settled(nc, f"{PREFIX}.create.stream", body, account=account)
    assert reply.status == 201, reply.envelope
    key = f"{account}.stream.{name}"
    await eventually(lambda: _stored(nc, bucket, key), timeout=30, interval=0.05)
    return key


async def _settled(
    nc: Client, subject: str, body: Any = None, *, account: str = "acme", within: float = 30.0
) -> Reply:
    """A request sent until it gets an answer other than 503 (an election can take seconds)."""
    deadline = time.monotonic() + within
    while True:
        with contextlib.suppress(nats.errors.TimeoutError, nats.errors.NoRespondersError):
            reply = await request(nc, subject, body, account=account, timeout=10)
            if reply.status != 503:
                return reply
        assert time.monotonic() < deadline, f"{subject} still unavailable after {within}s"
        await asyncio.sleep(0.05)  # a pause between attempts, not a wait for anything


def _check_against_history(event: dict[str, Any], entry: dict[str, Any], kind: str) -> None:
    assert event["kind"] == kind
    assert event["revision"] == entry["revision"]
    assert event["time"] == entry["time"]
    stored = {k: v for k, v in entry["record"].items() if k != "revision"}  # replies add `revision`
    assert event["record"] == stored


@contextlib.asynccontextmanager
async def _replicas(nc: Client, settings: config.Settings, count: int = 2) -> AsyncIterator[None]:
    """`count` service replicas; once they have stopped (nothing publishes any more), the events
    stream has decided everything they published."""
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(count):
            await stack.enter_async_context(running(settings))
        yield
    await _through_the_stream(nc, settings.bucket)


def test_kind_is_decided_from_the_record_and_the_one_before() -> None:
    assert kind_of("created", True, None) == "created"
    assert kind_of("created", False, True) == "created"  # a trigger created disabled
    assert kind_of("updated", True, True) == "updated"
    assert kind_of("updated", False, True) == "disabled"
    assert kind_of("updated", True, False) == "enabled"
    assert kind_of("updated", False, False) == "updated"  # changed while it stays disabled
    assert kind_of("updated", False, None) == "updated"
    assert kind_of("deleted", True, True) == "deleted"
    assert kind_of(None, True, None) == "deleted"  # the key removed outright


def test_events_max_age_is_a_setting_with_a_floor() -> None:
    assert make_settings("nats://x:1").events_max_age == 7 * 86400
    assert make_settings("nats://x:1", TRIGGER_EVENTS_MAX_AGE="3600").events_max_age == 3600
    with pytest.raises(config.ConfigError, match="TRIGGER_EVENTS_MAX_AGE"):
        make_settings("nats://x:1", TRIGGER_EVENTS_MAX_AGE="0")


async def test_two_replicas_publish_each_change_once_in_order_and_per_account(nc, settings):
    """A create, a gateway create and a delete through two replicas: one event each on a plain
    subscription, in order, matching the history; another account's subscription sees none of them."""
    acme = await Inbox.on(nc, f"{PREFIX}.events.acme.>")
    globex = await Inbox.on(nc, f"{PREFIX}.events.globex.>")
    everything = await Inbox.on(nc, f"{PREFIX}.events.>")
    attempts = await Inbox.on(nc, f"{PREFIX}.events-in.{settings.bucket}.>")
    async with _replicas(nc, settings):
        name, hook = unique("orders"), unique("hook")
        created = await request(nc, f"{PREFIX}.create.stream", stream_request(name, "shop.o", "audit.o"))
        assert created.status == 201, created.envelope
        gateway = await request(nc, f"{PREFIX}.create.gateway", gateway_request(hook, "POST", f"/{hook}"))
        assert gateway.status == 201, gateway.envelope
        deleted = await request(nc, f"{PREFIX}.delete.stream.{name}")
        assert deleted.status == 200, deleted.envelope
        sentinel = await _sentinel(nc, settings.bucket)
        stream_history = await _history(nc, "acme", "stream", name)
        gateway_history = await _history(nc, "acme", "gateway", hook)

    events = _events(acme)
    assert [(e["kind"], e["trigger_type"], e["name"]) for e in events] == [
        ("created", "stream", name),
        ("created", "gateway", hook),
        ("deleted", "stream", name),
    ]
    _check_against_history(events[0], stream_history[0], "created")
    _check_against_history(events[1], gateway_history[0], "created")
    _check_against_history(events[2], stream_history[1], "deleted")
    assert events[2]["record"]["type"] == "deleted"
    assert events[2]["record"]["deleted_at"]
    assert [e["revision"] for e in events] == sorted(e["revision"] for e in events)
    assert {e["account"] for e in events} == {"acme"}
    assert [m.subject for m in acme.messages] == [
        f"{PREFIX}.events.acme.stream.{name}",
        f"{PREFIX}.events.acme.gateway.{hook}",
        f"{PREFIX}.events.acme.stream.{name}",
    ]
    # Both replicas published these events; the stream kept one of each.
    assert len(_attempts(attempts, f"acme.stream.{name}")) >= 2
    # The other account sees its own event only, and every subject names its event's account.
    assert [e["name"] for e in _events(globex)] == [sentinel.split(".")[-1]]
    for msg in everything.messages:
        if msg.subject.startswith(f"{PREFIX}.events.barrier-"):
            continue
        assert msg.subject.split(".")[3] == msgspec.json.decode(msg.data)["account"]


async def test_a_late_watcher_catches_up_from_the_stream(nc, settings):
    """A JetStream consumer started after the changes reads the same events from stream sequence 1
    (filtered to one account), and from a time on."""
    acme = await Inbox.on(nc, f"{PREFIX}.events.acme.>")
    async with _replicas(nc, settings):
        names = [unique("late") for _ in range(3)]
        for name in names:
            reply = await request(
                nc, f"{PREFIX}.create.stream", stream_request(name, f"a.{name}", f"b.{name}")
            )
            assert reply.status == 201, reply.envelope
        reply = await request(nc, f"{PREFIX}.delete.stream.{names[0]}")
        assert reply.status == 200, reply.envelope
        await _sentinel(nc, settings.bucket)

    live = _events(acme)
    assert [e["kind"] for e in live] == ["created", "created", "created", "deleted"]
    js = nc.jetstream()
    stream = stream_name(settings.bucket, settings.prefix)

    async def caught_up(start: ConsumerConfig, expected: int) -> list[tuple[dict[str, Any], Msg]]:
        sub = await js.pull_subscribe(f"{PREFIX}.events.acme.>", stream=stream, config=start)
        try:
            messages: list[Msg] = []
            while len(messages) < expected:
                messages += await sub.fetch(expected - len(messages), timeout=5)
            assert (await sub.consumer_info()).num_pending == 0
            return [(msgspec.json.decode(m.data), m) for m in messages]
        finally:
            await sub.unsubscribe()

    from_start = await caught_up(
        ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=1, ack_policy=AckPolicy.NONE
        ),
        len(live),
    )
    assert [event for event, _ in from_start] == live
    # Each live event says where it is in the stream: a watcher resumes from there, or from a time.
    second = acme.messages[1].headers or {}
    assert int(second["Nats-Sequence"]) == from_start[1][1].metadata.sequence.stream
    from_time = await caught_up(
        ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_TIME,
            opt_start_time=second["Nats-Time-Stamp"],
            ack_policy=AckPolicy.NONE,
        ),
        len(live) - 1,
    )
    assert [event for event, _ in from_time] == live[1:]


async def test_update_disable_enable_are_events_of_their_kind(nc, settings):
    """Update, disable (patch `enabled: false`), enable: `updated`, `disabled`, `enabled`."""
    acme = await Inbox.on(nc, f"{PREFIX}.events.acme.>")
    async with _replicas(nc, settings):
        name = unique("life")
        reply = await request(nc, f"{PREFIX}.create.stream", stream_request(name, f"a.{name}", f"b.{name}"))
        assert reply.status == 201, reply.envelope
        updated = await request(
            nc, f"{PREFIX}.update.stream.{name}", stream_request(name, f"a.{name}", f"c.{name}")
        )
        assert updated.status == 200, updated.envelope
        for enabled in (False, True):
            patched = await request(nc, f"{PREFIX}.patch.stream.{name}", {"enabled": enabled})
            assert patched.status == 200, patched.envelope
        reply = await request(nc, f"{PREFIX}.delete.stream.{name}")
        assert reply.status == 200, reply.envelope
        await _sentinel(nc, settings.bucket)
        history = await _history(nc, "acme", "stream", name)

    events = _events(acme)
    kinds = ["created", "updated", "disabled", "enabled", "deleted"]
    assert [e["kind"] for e in events] == kinds
    for event, entry, kind in zip(events, history, kinds, strict=True):
        _check_against_history(event, entry, kind)
    assert events[1]["record"]["target"]["subject"] == f"c.{name}"
    assert events[2]["record"]["enabled"] is False
    assert "enabled" not in events[3]["record"] or events[3]["record"]["enabled"] is True


async def test_a_restarted_replica_publishes_nothing_again(nc, settings):
    """A replica that starts after changes were published goes on after them: no replay of the
    records it loads (so nothing can be stored twice once the duplicate window has passed)."""
    acme = await Inbox.on(nc, f"{PREFIX}.events.acme.>")
    attempts = await Inbox.on(nc, f"{PREFIX}.events-in.{settings.bucket}.>")
    name = unique("kept")
    async with _replicas(nc, settings, 1):
        reply = await request(nc, f"{PREFIX}.create.stream", stream_request(name, f"a.{name}", f"b.{name}"))
        assert reply.status == 201, reply.envelope
        await _sentinel(nc, settings.bucket)
    before = len(_attempts(attempts, f"acme.stream.{name}"))
    async with _replicas(nc, settings):
        await _sentinel(nc, settings.bucket)
    assert len(_attempts(attempts, f"acme.stream.{name}")) == before == 1
    assert [e["kind"] for e in _events(acme)] == ["created"]


async def test_events_aged_out_of_the_stream_are_not_published_again(nc, nats_server):
    """With every event past the stream's max age, a replica that starts later still knows where
    the bucket's log was published to (the watermark), and publishes only what came after."""
    settings = make_settings(nats_server.url, TRIGGER_EVENTS_MAX_AGE="1")
    stream = stream_name(settings.bucket, settings.prefix)
    acme = await Inbox.on(nc, f"{PREFIX}.events.acme.>")
    attempts = await Inbox.on(nc, f"{PREFIX}.events-in.{settings.bucket}.>")
    name = unique("old")
    async with _replicas(nc, settings, 1):
        reply = await request(nc, f"{PREFIX}.create.stream", stream_request(name, f"a.{name}", f"b.{name}"))
        assert reply.status == 201, reply.envelope
        await eventually(lambda: acme.messages)

    async def no_event_left() -> bool:
        last = {"last_by_subj": f"{PREFIX}.events.>"}
        reply = await nc.request(f"$JS.API.STREAM.MSG.GET.{stream}", json.dumps(last).encode(), timeout=2)
        return bool(json.loads(reply.data).get("error", {}).get("err_code") == 10037)  # no message

    await eventually(no_event_left, timeout=10, interval=0.1)
    async with _replicas(nc, settings, 1):
        sentinel = unique("new")
        reply = await request(nc, f"{PREFIX}.create.stream", stream_request(sentinel, f"a.{sentinel}", "x.y"))
        assert reply.status == 201, reply.envelope
        await eventually(lambda: len(acme.messages) >= 2, timeout=10)
    assert len(_attempts(attempts, f"acme.stream.{name}")) == 1
    assert [(e["kind"], e["name"]) for e in _events(acme)] == [("created", name), ("created", sentinel)]


async def test_a_nats_js_client_consumes_the_events(nats_server, nc, settings):
    """The nats.js (v2) client in tests/js subscribes to `<prefix>.events.>` and reads the events."""
    node = shutil.which("node")
    if node is None:
        pytest.fail(
            "node not found: the change-events test runs a nats.js client (Node.js 18+, `make setup`)"
        )
    if not (JS_DIR / "node_modules" / "nats").is_dir():
        pytest.fail(f"the nats.js client is not installed: run `make setup` (npm ci --prefix {JS_DIR})")
    async with _replicas(nc, settings):
        consumer = await asyncio.create_subprocess_exec(
            node,
            str(JS_DIR / "consume_events.mjs"),
            nats_server.url,
            "2",
            "20",
            f"{PREFIX}.events.acme.>",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            assert consumer.stdout is not None
            assert consumer.stderr is not None
            ready = await asyncio.wait_for(consumer.stdout.readline(), 20)
            assert json.loads(ready) == {"ready": True}, ready
            name = unique("js")
            reply = await request(
                nc, f"{PREFIX}.create.stream", stream_request(name, f"a.{name}", f"b.{name}")
            )
            assert reply.status == 201, reply.envelope
            reply = await request(nc, f"{PREFIX}.delete.stream.{name}")
            assert reply.status == 200, reply.envelope
            out, err = await asyncio.wait_for(consumer.communicate(), 25)
            assert consumer.returncode == 0, err.decode()
        finally:
            if consumer.returncode is None:
                consumer.kill()
                await consumer.wait()
        history = await _history(nc, "acme", "stream", name)
    lines = [json.loads(line) for line in out.decode().splitlines()]
    assert [(e["kind"], e["revision"], e["name"]) for e in lines] == [
        ("created", history[0]["revision"], name),
        ("deleted", history[1]["revision"], name),
    ]
    assert all(e["subject"] == f"{PREFIX}.events.acme.stream.{name}" for e in lines)
    assert 0 < lines[0]["seq"] < lines[1]["seq"]


@pytest.mark.slow
async def test_on_a_cluster_each_revision_is_one_stored_event_across_a_leader_kill(cluster: NatsCluster):
    """R3 bucket and events stream, two replicas; the events stream's leader is SIGKILLed half-way:
    every revision of every trigger is exactly one event in the stream, in order, and no plain
    subscriber gets one twice."""
    settings = make_settings(cluster.url, TRIGGER_REPLICAS=3)
    nc = await nats.connect(servers=cluster.urls, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    try:
        acme = await Inbox.on(nc, f"{PREFIX}.events.acme.>")
        names = [unique("r3") for _ in range(10)]
        async with _replicas(nc, settings):
            for i, name in enumerate(names):
                if i == len(names) // 2:
                    leader = await cluster.stream_leader(stream_name(settings.bucket, settings.prefix), nc)
                    cluster.kill(leader)
                body = stream_request(name, f"a.{name}", f"b.{name}")
                reply = await _settled(nc, f"{PREFIX}.create.stream", body)
                assert reply.status in (201, 409, 504), reply.envelope  # 409: an attempt before was stored
            await _sentinel(nc, settings.bucket)
            histories = {
                name: (await _settled(nc, f"{PREFIX}.history.stream.{name}")).body["results"]
                for name in names
            }

        sub = await nc.jetstream().pull_subscribe(
            f"{PREFIX}.events.acme.>",
            stream=stream_name(settings.bucket, settings.prefix),
            config=ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=1, ack_policy=AckPolicy.NONE
            ),
        )
        stored: list[dict[str, Any]] = []
        expected = sum(len(h) for h in histories.values())
        while len(stored) < expected:
            stored += [
                msgspec.json.decode(m.data) for m in await sub.fetch(expected - len(stored), timeout=10)
            ]
        assert (await sub.consumer_info()).num_pending == 0
        await sub.unsubscribe()
    finally:
        await nc.close()

    by_name: dict[str, list[int]] = collections.defaultdict(list)
    for event in stored:
        by_name[event["name"]].append(event["revision"])
    assert by_name == {name: [entry["revision"] for entry in history] for name, history in histories.items()}
    assert [e["revision"] for e in stored] == sorted(e["revision"] for e in stored)
    live = [(e["name"], e["revision"]) for e in _events(acme)]
    assert len(live) == len(set(live))  # plain NATS may miss one at the election; never doubles one
