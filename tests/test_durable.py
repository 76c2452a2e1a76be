"""Durable stream triggers: every message published on S after the 201 reaches D at least once,
through replica loss, server restarts and failing targets; retries, backoff and the dead letter.

Loads are numbered sequences, bounded in count; every wait is a poll with a deadline.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import nats
import nats.errors
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from service.app import running
from service.config import Settings
from service.durable import IN_HAND, stats_stream_name, stream_name
from service.natsserver import NatsServer
from service.store import TriggerStore, key_of
from tests.conftest import make_settings
from tests.support import PREFIX, SECRET, Inbox, eventually, request, serving, stream_request, unique
from tests.test_accounts_mode import Operator, operator, stream_body  # noqa: F401 (the fixture)

OK = b'{"status_code": 200}'
QUICK = {"backoff": "linear", "backoff_delay_ms": 20, "backoff_max_ms": 100, "timeout_ms": 1000}
# Enough attempts for a target that is away for a while: about 20 s of retries.
PATIENT = {"attempts": 100, "backoff_max_ms": 200}


def durable(**fields: Any) -> dict[str, Any]:
    """A `delivery` object for a durable route with short pauses (the tests' time is bounded)."""
    return {"mode": "durable", **QUICK, **fields}


class Target:
    """A subscriber on D that answers as `answer` says and records every number it confirmed (OK)."""

    def __init__(self, answer: Callable[[int, int], bytes | None] | None = None) -> None:
        self.received: list[int] = []
        self.attempts: collections.Counter[int] = collections.Counter()
        self.messages: list[Msg] = []
        self._answer = answer or (lambda number, attempt: OK)
        self.sub: Any = None

    @classmethod
    async def on(
        cls, nc: Client, subject: str, answer: Callable[[int, int], bytes | None] | None = None
    ) -> Target:
        target = cls(answer)

        async def received(msg: Msg) -> None:
            number = int(msg.data)
            target.attempts[number] += 1
            reply = target._answer(number, target.attempts[number])
            if reply is None:
                return  # never confirms
            if reply == OK:
                target.received.append(number)
                target.messages.append(msg)
            if msg.reply:
                await nc.publish(msg.reply, reply)

        target.sub = await nc.subscribe(subject, cb=received, pending_msgs_limit=-1, pending_bytes_limit=-1)
        await asyncio.sleep(0)
        await nc.flush()
        return target

    def has_all(self, count: int) -> bool:
        return set(self.received) >= set(range(count))

    @property
    def duplicates(self) -> int:
        return len(self.received) - len(set(self.received))


async def publish_numbers(
    nc: Client, subject: str, numbers: range, headers: dict[str, str] | None = None
) -> None:
    for number in numbers:
        await nc.publish(subject, str(number).encode(), headers=headers)
    await nc.flush()


async def create(nc: Client, body: dict[str, Any]) -> dict[str, Any]:
    reply = await request(nc, f"{PREFIX}.create.stream", body, timeout=10)
    assert reply.status == 201, reply.envelope
    return reply.body  # type: ignore[no-any-return]


async def stats(nc: Client, name: str) -> dict[str, int]:
    reply = await request(nc, f"{PREFIX}.get.stream.{name}")
    assert reply.status == 200, reply.envelope
    return reply.body.get("delivery_stats") or {}  # type: ignore[no-any-return]


async def stream_exists(nc: Client, stream: str) -> bool:
    reply = json.loads((await nc.request(f"$JS.API.STREAM.INFO.{stream}", b"", timeout=5)).data)
    return "error" not in reply


def capture_stream(settings: Settings, body: dict[str, Any]) -> str:
    return stream_name(settings.bucket, key_of("acme", "stream", body["name"]), body["created_at"])


def report(label: str, target: Target) -> None:
    print(f"{label}: {len(set(target.received))} distinct, {target.duplicates} duplicates")


# --- the option ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("delivery", "source_type", "field"),
    [
        ({"mode": "direct", "attempts": 3}, "stream", "$.delivery.attempts"),
        ({"mode": "durable"}, "service", "$.delivery.mode"),
        ({"mode": "durable", "dead_letter_subject": "dead.*"}, "stream", "$.delivery.dead_letter_subject"),
        ({"mode": "durable", "dead_letter_subject": "in.x"}, "stream", "$.delivery.dead_letter_subject"),
        ({"mode": "durable", "dead_letter_subject": "$JS.API.x"}, "stream", "$.delivery.dead_letter_subject"),
        (
            {"mode": "durable", "backoff_delay_ms": 500, "backoff_max_ms": 100},
            "stream",
            "$.delivery.backoff_max_ms",
        ),
        ({"mode": "durable", "attempts": 0}, "stream", "$.delivery.attempts"),
        ({"mode": "durable", "confirm": "maybe"}, "stream", "$.delivery.confirm"),
        ({"mode": "later"}, "stream", "$.delivery.mode"),
        ({"mode": "durable", "retries": 3}, "stream", "$.delivery"),
    ],
)
async def test_bad_delivery_combinations_are_a_400_naming_the_field(
    service, nc, delivery, source_type, field
):
    name = unique()
    body = stream_request(name, "in.x", f"out.{name}", delivery=delivery)
    body["source"]["type"] = body["target"]["type"] = source_type
    reply = await request(nc, f"{PREFIX}.create.stream", body)
    assert reply.status == 400, reply.envelope
    assert field in reply.envelope["error"]
    assert (await request(nc, f"{PREFIX}.get.stream.{name}")).status == 404


# --- nothing published is lost ---------------------------------------------------------------


async def test_a_numbered_sequence_arrives_whole_and_the_record_counts_it(service, nc, settings):
    name, count = unique(), 3000
    target = await Target.on(nc, f"out.{name}")
    created = await create(nc, stream_request(name, f"in.{name}", f"out.{name}", delivery=durable()))
    assert created["delivery"]["mode"] == "durable"
    await publish_numbers(nc, f"in.{name}", range(count))
    await eventually(lambda: target.has_all(count), timeout=30)
    report("sequence", target)

    async def counted() -> bool:
        got = await stats(nc, name)
        return got.get("pending") == 0 and got.get("delivered", 0) >= count

    await eventually(counted, timeout=10)
    got = await stats(nc, name)
    assert got["dead_lettered"] == 0
    assert got["delivered"] == count
    info = json.loads(
        (await nc.request(f"$JS.API.STREAM.INFO.{capture_stream(settings, created)}", b"")).data
    )
    assert info["config"]["storage"] == "file"
    assert info["config"]["num_replicas"] == settings.replicas


async def test_a_wildcard_route_delivers_each_subject_on_its_own_target_subject(service, nc):
    name = unique()
    inbox = await Inbox.on(nc, f"out.{name}.*")

    async def confirm(msg: Msg) -> None:
        await nc.publish(msg.reply, OK)

    await nc.subscribe(f"out.{name}.*", cb=confirm)
    await create(nc, stream_request(name, f"in.{name}.*", f"out.{name}.*", delivery=durable()))
    for region in ("eu", "us"):
        await nc.publish(f"in.{name}.{region}", region.encode())
    await eventually(lambda: len(inbox.messages) >= 2)
    assert sorted((m.subject, m.data) for m in inbox.messages) == [
        (f"out.{name}.eu", b"eu"),
        (f"out.{name}.us", b"us"),
    ]


async def test_ordered_delivery_keeps_the_order_through_retries(service, nc):
    name, count = unique(), 300

    def fail_every_tenth_once(number: int, attempt: int) -> bytes:
        return b'{"status_code": 503}' if number % 10 == 0 and attempt == 1 else OK

    target = await Target.on(nc, f"out.{name}", fail_every_tenth_once)
    await create(nc, stream_request(name, f"in.{name}", f"out.{name}", delivery=durable(ordered=True)))
    await publish_numbers(nc, f"in.{name}", range(count))
    await eventually(lambda: target.has_all(count), timeout=30)
    confirmed = target.received
    assert confirmed == sorted(confirmed), "a message arrived out of order"  # a duplicate repeats the last
    report("ordered", target)


async def test_a_publishers_request_on_s_gets_only_the_answer_of_its_own_responder(service, nc):
    name = unique()
    target = await Target.on(nc, f"out.{name}")
    await create(nc, stream_request(name, f"in.{name}", f"out.{name}", delivery=durable()))

    async def pong(msg: Msg) -> None:
        await nc.publish(msg.reply, b"pong")

    await nc.subscribe(f"in.{name}", cb=pong)
    replies = await Inbox.on(nc, f"replies.{name}")
    await nc.publish(f"in.{name}", b"7", reply=f"replies.{name}")
    await eventually(lambda: 7 in target.received)
    await eventually(lambda: replies.messages)
    # The durable delivery happened after the capture, and the capture would have acknowledged
    # before that: had it, a second reply would be here by now (same connection, in order).
    await nc.flush()
    assert replies.payloads == [b"pong"]


async def test_a_stopping_replica_settles_the_deliveries_in_hand_before_it_goes(nc, settings):
    """A clean stop (SIGTERM, a rolling restart) fetches no more, lets the deliveries it has in
    hand finish and acknowledges them: nothing it delivered is delivered again by the next replica."""
    name, count = unique(), 20
    held: list[Msg] = []
    numbers: list[int] = []

    async def hold(msg: Msg) -> None:  # confirms nothing until the replica is stopping
        numbers.append(int(msg.data))
        held.append(msg)

    await nc.subscribe(f"out.{name}", cb=hold)
    key = key_of("acme", "stream", name)
    async with contextlib.AsyncExitStack() as stack:
        api = await stack.enter_async_context(running(settings))
        created = await create(
            nc, stream_request(name, f"in.{name}", f"out.{name}", delivery=durable(timeout_ms=10_000))
        )
        await publish_numbers(nc, f"in.{name}", range(count))
        await eventually(lambda: len(held) == count, timeout=10)
        stopping = asyncio.create_task(stack.aclose())
        await eventually(lambda: api._ctx.carrier.counts(key) is None, timeout=10)  # type: ignore[attr-defined]
        for msg in held:  # the confirmations arrive once the replica has let go of the route
            await nc.publish(msg.reply, OK)
        await nc.flush()
        await stopping
    consumer = f"$JS.API.CONSUMER.INFO.{capture_stream(settings, created)}.deliver"

    async def settled() -> bool:  # well within ack_wait (11 s), after which JetStream would redeliver
        info = json.loads((await nc.request(consumer, b"", timeout=5)).data)
        return info["num_ack_pending"] == 0 and info["num_pending"] == 0

    await eventually(settled, timeout=5)
    assert sorted(numbers) == list(range(count))


async def test_messages_published_while_no_replica_runs_are_delivered_when_one_starts(nc, settings):
    name = unique()
    target = await Target.on(nc, f"out.{name}")
    async with running(settings):
        await create(nc, stream_request(name, f"in.{name}", f"out.{name}", delivery=durable()))
        await publish_numbers(nc, f"in.{name}", range(500))
        await eventually(lambda: target.has_all(500), timeout=15)
    before = collections.Counter(target.received)
    await publish_numbers(nc, f"in.{name}", range(500, 1000))  # no replica runs
    async with running(settings):
        await eventually(lambda: target.has_all(1000), timeout=15)
    report("restart", target)
    # Confirmed before the restart: not delivered again after it.
    assert collections.Counter(n for n in target.received if n < 500) == before


def _service_env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRIGGER_", "NATS_"))}
    env.update(
        NATS_URL=settings.nats_url,
        TRIGGER_BUCKET=settings.bucket,
        TRIGGER_JWT_SECRET=SECRET,
        LOG_FORMAT="json",
        LOG_LEVEL="warning",
    )
    return env


@contextlib.asynccontextmanager
async def replica_process(settings: Settings) -> AsyncIterator[asyncio.subprocess.Process]:
    """A service replica in its own process, killed (by its PID) at the end if it still runs."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        env=_service_env(settings),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await asyncio.wait_for(proc.wait(), 10)


async def _replicas(nc: Client, at_least: int) -> bool:
    """True once `at_least` service replicas answer `$SRV.PING` (each is serving, its routes loaded)."""
    inbox = nc.new_inbox()
    answers = await nc.subscribe(inbox)
    try:
        await nc.publish("$SRV.PING.trigger-service", b"", reply=inbox)
        seen = set()
        with contextlib.suppress(TimeoutError, nats.errors.TimeoutError):
            while len(seen) < at_least:
                seen.add(json.loads((await answers.next_msg(timeout=0.5)).data)["id"])
        return len(seen) >= at_least
    finally:
        await answers.unsubscribe()


async def test_a_replica_killed_mid_burst_loses_nothing(service, nc, settings):
    name, count = unique(), 3000
    confirming = False  # until the kill: each replica then holds at most IN_HAND unconfirmed
    target = await Target.on(nc, f"out.{name}", lambda number, attempt: OK if confirming else None)
    await create(nc, stream_request(name, f"in.{name}", f"out.{name}", delivery=durable(timeout_ms=2000)))
    async with replica_process(settings) as victim:
        await eventually(lambda: _replicas(nc, 2), timeout=20)  # the victim delivers too
        await publish_numbers(nc, f"in.{name}", range(count))
        # More messages at the target than one replica holds: the victim has some in hand.
        await eventually(lambda: len(target.attempts) > IN_HAND, timeout=15)
        victim.kill()  # SIGKILL: its messages in hand are never confirmed
    confirming = True
    await eventually(lambda: target.has_all(count), timeout=30)
    report("kill", target)

    async def settled() -> dict[str, int] | None:
        counted = await stats(nc, name)
        return counted if counted["pending"] == 0 else None

    counted = await eventually(settled, timeout=10)
    assert counted["redelivered"] > 0  # the victim's unconfirmed messages, taken over


async def test_two_replicas_share_the_work_and_deliver_each_message_once(nc, settings):
    name, count = unique(), 2000
    target = await Target.on(nc, f"out.{name}")
    async with running(settings) as one, running(settings) as two:
        await create(nc, stream_request(name, f"in.{name}", f"out.{name}", delivery=durable()))
        await publish_numbers(nc, f"in.{name}", range(count))
        await eventually(lambda: target.has_all(count), timeout=30)
        key = key_of("acme", "stream", name)

        def shares_of_all() -> list[int] | None:
            # A replica counts a message once its confirmation is acknowledged, just after the target has it.
            shares = [api._ctx.carrier.counts(key).delivered for api in (one, two)]  # type: ignore[attr-defined]
            return shares if sum(shares) >= count else None

        shares = await eventually(shares_of_all, timeout=10)
    report("two replicas", target)
    assert target.duplicates == 0
    assert sum(shares) == count
    assert min(shares) > 0, shares


async def test_a_restarted_nats_server_and_an_absent_target_lose_nothing(tmp_path):
    with NatsServer(store_dir=tmp_path / "store") as server:
        settings = make_settings(server.url)
        nc = await nats.connect(server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.1)
        try:
            name = unique()
            async with running(settings):
                body = stream_request(name, f"in.{name}", f"out.{name}", delivery=durable(**PATIENT))
                await create(nc, body)
                await publish_numbers(nc, f"in.{name}", range(500))  # nobody on D yet

                async def captured() -> bool:
                    return (await stats(nc, name)).get("pending") == 500

                await eventually(captured, timeout=10)
                server.kill()
                server.restart()
                await eventually(lambda: nc.stats["reconnects"] >= 1 and nc.is_connected, timeout=15)
                await publish_numbers(nc, f"in.{name}", range(500, 1000))
                target = await Target.on(nc, f"out.{name}")
                await eventually(lambda: target.has_all(1000), timeout=30)
                report("server restart", target)
        finally:
            await nc.close()


# --- retries, backoff, dead letter -----------------------------------------------------------


async def test_a_target_failing_the_first_times_gets_every_message_with_retries(service, nc):
    name, count, failures = unique(), 20, 2
    target = await Target.on(
        nc,
        f"out.{name}",
        lambda number, attempt: b'{"status_code": 500}' if attempt <= failures else OK,
    )
    dead = await Inbox.on(nc, f"dead.{name}")
    await create(
        nc,
        stream_request(
            name,
            f"in.{name}",
            f"out.{name}",
            delivery=durable(attempts=failures + 1, dead_letter_subject=f"dead.{name}"),
        ),
    )
    await publish_numbers(nc, f"in.{name}", range(count))
    await eventually(lambda: target.has_all(count), timeout=15)
    assert all(target.attempts[n] == failures + 1 for n in range(count))

    async def counted() -> bool:
        got = await stats(nc, name)
        return got.get("delivered") == count and got.get("redelivered") == count * failures

    await eventually(counted, timeout=5)
    assert dead.messages == []


@pytest.mark.parametrize("failure", ["never confirms", "error envelope", "service error header"])
async def test_a_message_given_up_on_goes_to_the_dead_letter_unchanged_with_headers(service, nc, failure):
    name, attempts = unique(), 3
    sent: list[Msg] = []

    async def failing(msg: Msg) -> None:
        sent.append(msg)
        if failure == "error envelope":
            await nc.publish(msg.reply, b'{"error": "Internal server error: boom", "status_code": 500}')
        elif failure == "service error header":
            await nc.publish(
                msg.reply, b"", headers={"Nats-Service-Error": "boom", "Nats-Service-Error-Code": "500"}
            )

    await nc.subscribe(f"out.{name}", cb=failing)
    dead = await Inbox.on(nc, f"dead.{name}")
    created = await create(
        nc,
        stream_request(
            name,
            f"in.{name}",
            f"out.{name}",
            delivery=durable(attempts=attempts, timeout_ms=200, dead_letter_subject=f"dead.{name}"),
        ),
    )
    await nc.publish(f"in.{name}", b"payload-1", headers={"Order-Id": "42"})
    letter = await dead.first()
    assert letter.data == b"payload-1"
    headers = letter.headers or {}
    assert headers["Order-Id"] == "42"
    assert headers["Trigger-Subject"] == created["subject"]
    assert headers["Trigger-Attempts"] == str(attempts)
    assert headers["Trigger-Original-Subject"] == f"in.{name}"
    assert headers["Trigger-Original-Time"].endswith("Z")
    expected = {"never confirms": "no confirmation", "error envelope": "500", "service error header": "boom"}
    assert expected[failure] in headers["Trigger-Last-Error"]
    assert len(sent) == attempts

    async def settled() -> bool:
        got = await stats(nc, name)
        return got.get("dead_lettered") == 1 and got.get("pending") == 0

    await eventually(settled, timeout=5)
    # Never delivered again: a later message is delivered and dead-lettered alone.
    await nc.publish(f"in.{name}", b"payload-2")
    await eventually(lambda: len(dead.messages) == 2, timeout=10)
    assert [m.data for m in dead.messages] == [b"payload-1", b"payload-2"]
    assert len(sent) == 2 * attempts


async def test_jetstream_confirmation_stores_every_message_once_in_the_target_stream(service, nc):
    name, count = unique(), 500
    stream = f"TARGET_{name.replace('-', '_')}"
    js = nc.jetstream()
    await js.add_stream(name=stream, subjects=[f"out.{name}"])
    try:
        await create(
            nc, stream_request(name, f"in.{name}", f"out.{name}", delivery=durable(confirm="jetstream"))
        )
        await publish_numbers(nc, f"in.{name}", range(count))

        async def stored() -> bool:
            return (await js.stream_info(stream)).state.messages >= count

        await eventually(stored, timeout=20)
        assert (await js.stream_info(stream)).state.messages == count
    finally:
        await js.delete_stream(stream)


# --- its life ----------------------------------------------------------------------------------


async def test_delete_stops_delivery_before_the_200_and_removes_the_capture(service, nc, settings):
    name = unique()
    created = await create(
        nc,
        stream_request(name, f"in.{name}", f"out.{name}", delivery=durable(**PATIENT)),
    )
    stream = capture_stream(settings, created)
    await publish_numbers(nc, f"in.{name}", range(50))  # nobody on D: they wait in the capture

    async def captured() -> bool:
        return (await stats(nc, name)).get("pending") == 50

    await eventually(captured, timeout=10)
    assert await stream_exists(nc, stream)
    assert (await request(nc, f"{PREFIX}.delete.stream.{name}")).status == 200
    assert not await stream_exists(nc, stream)
    key = key_of("acme", "stream", name)
    assert service._ctx.carrier.counts(key) is None
    target = await Target.on(nc, f"out.{name}")
    await publish_numbers(nc, f"in.{name}", range(50, 60))
    await nc.flush()
    assert target.received == []
    markers = json.loads(
        (
            await nc.request(
                f"$JS.API.STREAM.INFO.{stats_stream_name(settings.bucket)}",
                json.dumps(
                    {"subjects_filter": f"{PREFIX}.durable-stats.{settings.bucket}.{stream}.*"}
                ).encode(),
            )
        ).data
    )
    assert not (markers.get("state") or {}).get("subjects")


async def test_disable_removes_the_capture_and_enable_starts_a_fresh_one(service, nc, settings):
    name = unique()
    created = await create(nc, stream_request(name, f"in.{name}", f"out.{name}", delivery=durable()))
    stream = capture_stream(settings, created)
    reply = await request(nc, f"{PREFIX}.patch.stream.{name}", {"enabled": False})
    assert reply.status == 200, reply.envelope
    assert not await stream_exists(nc, stream)
    reply = await request(nc, f"{PREFIX}.patch.stream.{name}", {"enabled": True})
    assert reply.status == 200, reply.envelope
    target = await Target.on(nc, f"out.{name}")
    await publish_numbers(nc, f"in.{name}", range(100))
    await eventually(lambda: target.has_all(100), timeout=10)


async def test_an_update_switches_between_direct_and_durable_and_loses_nothing_after_each_200(
    service, nc, settings
):
    name = unique()
    target = await Target.on(nc, f"out.{name}")
    body = stream_request(name, f"in.{name}", f"out.{name}")
    created = await create(nc, body)
    stream = capture_stream(settings, created)
    reply = await request(nc, f"{PREFIX}.update.stream.{name}", {**body, "delivery": durable()})
    assert reply.status == 200, reply.envelope
    assert await stream_exists(nc, stream)
    await publish_numbers(nc, f"in.{name}", range(200))
    await eventually(lambda: target.has_all(200), timeout=10)
    assert target.duplicates == 0  # the plain subscription carries nothing any more
    reply = await request(nc, f"{PREFIX}.update.stream.{name}", {**body, "delivery": {"mode": "direct"}})
    assert reply.status == 200, reply.envelope
    assert not await stream_exists(nc, stream)
    await publish_numbers(nc, f"in.{name}", range(200, 400))
    await eventually(lambda: target.has_all(400), timeout=10)


async def test_a_durable_source_that_another_capture_stores_is_a_409(service, nc):
    name, other = unique(), unique()
    await create(nc, stream_request(name, f"in.{name}.*", f"out.{name}.*", delivery=durable()))
    reply = await request(
        nc,
        f"{PREFIX}.create.stream",
        stream_request(other, f"in.{name}.x", f"out.{other}", delivery=durable()),
        timeout=10,
    )
    assert reply.status == 409, reply.envelope
    assert "$.source.subject" in reply.envelope["error"]
    assert (await request(nc, f"{PREFIX}.get.stream.{other}")).status == 404


@pytest.mark.slow  # a three-node cluster and a leader election
async def test_captured_messages_survive_the_loss_of_the_capture_streams_leader(cluster):
    settings = make_settings(cluster.url, TRIGGER_REPLICAS=3)
    nc = await nats.connect(servers=cluster.urls, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    try:
        async with running(settings):
            await serving(nc)  # the API's subscriptions have reached the client's server
            name = unique()
            created = await create(
                nc, stream_request(name, f"in.{name}", f"out.{name}", delivery=durable(**PATIENT))
            )
            stream = capture_stream(settings, created)
            await publish_numbers(nc, f"in.{name}", range(1000))  # nobody on D yet

            async def captured() -> bool:
                return (await stats(nc, name)).get("pending") == 1000

            await eventually(captured, timeout=10)
            cluster.kill(await cluster.stream_leader(stream, nc))
            await cluster.stream_leader(stream, nc)  # a new leader, from the two replicas left
            target = await Target.on(nc, f"out.{name}")
            await eventually(lambda: target.has_all(1000), timeout=30)
            report("leader loss", target)
    finally:
        await nc.close()


async def test_a_capture_left_behind_by_a_delete_made_while_no_replica_ran_is_removed_at_start(nc, settings):
    name = unique()
    async with running(settings):
        created = await create(nc, stream_request(name, f"in.{name}", f"out.{name}", delivery=durable()))
    stream = capture_stream(settings, created)
    store = await TriggerStore.open(nc, settings.bucket)
    await store.mark_deleted(key_of("acme", "stream", name))  # no replica runs to remove the capture
    assert await stream_exists(nc, stream)
    async with running(settings):
        assert not await stream_exists(nc, stream)
