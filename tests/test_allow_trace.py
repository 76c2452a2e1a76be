"""`allow_trace` on a single-account stream route: a NATS message trace (`Nats-Trace-Dest`,
nats-server 2.11+) goes on through the route only where the trigger allows it, as a trace crosses
an import or export in accounts mode only where the JWT's `allow_trace` says so."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from nats.aio.client import Client

from tests.support import Inbox, eventually, request, stream_request, unique

pytestmark = pytest.mark.usefixtures("service")
TRACE_DEST = "Nats-Trace-Dest"


def ingress_subjects(traces: Inbox) -> list[str]:
    """The subjects of every message the server reported entering it, from the trace events."""
    events: list[dict[str, Any]] = [
        event for msg in traces.messages for event in msgspec.json.decode(msg.data).get("events", [])
    ]
    return [event["subj"] for event in events if event.get("type") == "in"]


async def create(nc: Client, name: str, source: str, target: str, **target_fields: Any) -> None:
    body = stream_request(name, source, target)
    body["target"].update(target_fields)
    reply = await request(nc, "ms.trigger.create.stream", body)
    assert reply.status == 201, reply.envelope


async def test_a_trace_passes_a_route_that_allows_it_and_stops_at_one_that_does_not(nc: Client):
    blocked, allowed = unique(), unique()
    await create(nc, blocked, f"m.{blocked}", f"d.{blocked}")
    await create(nc, allowed, f"m.{allowed}", f"d.{allowed}", allow_trace=True)
    trace_dest = f"traces.{unique()}"
    traces = await Inbox.on(nc, trace_dest)
    stopped = await Inbox.on(nc, f"d.{blocked}")
    passed = await Inbox.on(nc, f"d.{allowed}")

    await nc.publish(f"m.{blocked}", b"one", headers={TRACE_DEST: trace_dest})
    delivered = await stopped.first()
    assert delivered.data == b"one"
    assert TRACE_DEST not in (delivered.headers or {}), "the route passed the trace on"

    await nc.publish(f"m.{allowed}", b"two", headers={TRACE_DEST: trace_dest})
    delivered = await passed.first()
    assert (delivered.headers or {}).get(TRACE_DEST) == trace_dest
    # The server reports the route's publish on D: the trace went on through the route.
    await eventually(lambda: f"d.{allowed}" in ingress_subjects(traces))

    # Trace messages leave the server in order: the blocked route's publish, earlier, made none.
    seen = ingress_subjects(traces)
    assert f"m.{blocked}" in seen, "the traced message itself was traced"
    assert f"d.{blocked}" not in seen, "the trace went on through a route without allow_trace"


async def test_a_service_route_follows_the_sources_allow_trace(nc: Client):
    name = unique()
    source, target = f"svc.{name}", f"front.{name}"
    body = stream_request(name, source, target)
    body["source"].update(type="service", allow_trace=True)
    body["target"]["type"] = "service"
    assert (await request(nc, "ms.trigger.create.stream", body)).status == 201
    trace_dest = f"traces.{unique()}"
    traces = await Inbox.on(nc, trace_dest)

    async def answer(msg: Any) -> None:
        await nc.publish(msg.reply, b"pong")

    await nc.subscribe(source, cb=answer)
    await nc.flush()
    reply = await nc.request(target, b"ping", timeout=5, headers={TRACE_DEST: trace_dest})
    assert reply.data == b"pong"
    await eventually(lambda: source in ingress_subjects(traces))
