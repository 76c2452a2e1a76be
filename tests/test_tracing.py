"""W3C trace context end to end, OpenTelemetry spans, and the request log lines that carry the trace id."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from service import tracing
from service.devstack import free_port
from service.natsserver import NatsServer
from tests import http_fixtures, test_startup
from tests.support import Inbox, eventually, gateway_request, request, stream_request, token, unique
from tests.test_startup import SERVICE, SIDECAR, env_for, log_lines

gateway_url, http = http_fixtures.gateway_url, http_fixtures.http
spawn = test_startup.spawn
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
VALID = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")


def bearer(**extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token()}", **extra}


async def spy(nc: Client, subject: str) -> list[Msg]:
    """Every message on `subject`, as a copy next to the service's own queue subscription."""
    seen: list[Msg] = []

    async def received(msg: Msg) -> None:
        seen.append(msg)

    await nc.subscribe(subject, cb=received)
    await nc.flush()
    return seen


async def get(http: aiohttp.ClientSession, url: str, **headers: str) -> int:
    async with http.get(url, headers=bearer(**headers)) as response:
        await response.read()
        return response.status


# --- propagation (no spans) ---------------------------------------------------------------------


async def test_the_sidecar_sends_the_callers_trace_context_in_the_api_request(nc, gateway_url, http):
    seen = await spy(nc, "ms.trigger.get.>")
    status = await get(http, f"{gateway_url}/trigger/triggers/stream/{unique()}", traceparent=TRACEPARENT,
                       tracestate="vendor=abc")  # fmt: skip
    assert status == 404
    await eventually(lambda: seen)
    assert seen[0].headers is not None
    assert seen[0].headers["traceparent"] == TRACEPARENT  # no span of its own: passed on as it came
    assert seen[0].headers["tracestate"] == "vendor=abc"


async def test_the_sidecar_starts_a_trace_when_the_caller_sent_none_or_an_invalid_one(nc, gateway_url, http):
    seen = await spy(nc, "ms.trigger.get.>")
    url = f"{gateway_url}/trigger/triggers/stream/{unique()}"
    assert await get(http, url) == 404
    assert await get(http, url, traceparent=f"00-{'0' * 32}-{PARENT_ID}-01", tracestate="vendor=abc") == 404
    await eventually(lambda: len(seen) == 2)
    for msg in seen:
        assert msg.headers is not None
        assert VALID.fullmatch(msg.headers["traceparent"])
        assert "tracestate" not in msg.headers  # it belonged to the trace that was refused
    assert seen[0].headers["traceparent"][3:35] != seen[1].headers["traceparent"][3:35]  # type: ignore[index]


async def live_gateway_route(nc: Client, http: Any, gateway_url: str) -> tuple[str, list[Msg]]:
    """A gateway trigger `GET /<name>` served by a responder that keeps what it got; once it answers."""
    name = unique()
    reply = await request(nc, "ms.trigger.create.gateway", gateway_request(name, "GET", f"/{name}"))
    assert reply.status == 201
    seen: list[Msg] = []

    async def respond(msg: Msg) -> None:
        seen.append(msg)
        await nc.publish(msg.reply, b"ok")

    await nc.subscribe(reply.body["gateway_mapping_subject"], cb=respond)
    await nc.flush()
    await eventually(lambda: _status_is(http, f"{gateway_url}/{name}", 200))
    return name, seen


async def test_a_gateway_route_forwards_the_trace_context_to_the_responder(nc: Client, gateway_url, http):
    name, seen = await live_gateway_route(nc, http, gateway_url)
    assert await get(http, f"{gateway_url}/{name}", traceparent=TRACEPARENT, Traceparent=TRACEPARENT) == 200
    assert seen[-1].headers is not None
    assert seen[-1].headers["traceparent"] == TRACEPARENT
    assert "Traceparent" not in seen[-1].headers  # one traceparent, the gateway's


async def test_a_stream_route_passes_the_trace_context_on_unchanged(nc: Client, service):
    name = unique()
    source, target = f"m.{name}", f"d.{name}"
    assert (await request(nc, "ms.trigger.create.stream", stream_request(name, source, target))).status == 201
    inbox = await Inbox.on(nc, target)
    await nc.publish(source, b"x", headers={"traceparent": TRACEPARENT, "tracestate": "vendor=abc"})
    delivered = await inbox.first()
    assert delivered.headers == {"traceparent": TRACEPARENT, "tracestate": "vendor=abc"}


# --- spans (OpenTelemetry SDK, in-memory exporter) ----------------------------------------------


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Spans emitted while the test runs, through the SDK's in-memory exporter."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use(provider)
    yield exporter
    tracing.use(None)
    provider.shutdown()


def one(spans: InMemorySpanExporter, name: str) -> ReadableSpan:
    found = [span for span in spans.get_finished_spans() if span.name == name]
    assert len(found) == 1, [span.name for span in spans.get_finished_spans()]
    return found[0]


def child_of(span: ReadableSpan, parent: ReadableSpan) -> bool:
    assert span.parent is not None
    assert parent.context is not None
    assert span.context is not None
    return span.parent.span_id == parent.context.span_id and span.context.trace_id == parent.context.trace_id


async def test_spans_for_the_api_operation_and_the_store_write_follow_the_callers_trace(
    nc, gateway_url, http, spans
):
    body = stream_request(unique(), f"m.{unique()}", f"d.{unique()}")
    async with http.post(
        f"{gateway_url}/trigger/stream", json=body, headers=bearer(traceparent=TRACEPARENT)
    ) as r:
        assert r.status == 201
    await eventually(lambda: any(s.name == "HTTP /trigger/stream" for s in spans.get_finished_spans()))

    incoming = one(spans, "HTTP /trigger/stream")
    assert incoming.kind is SpanKind.SERVER
    assert incoming.context is not None
    assert f"{incoming.context.trace_id:032x}" == TRACE_ID
    assert incoming.parent is not None
    assert f"{incoming.parent.span_id:016x}" == PARENT_ID
    forward = one(spans, "trigger API request")
    assert forward.kind is SpanKind.CLIENT
    assert child_of(forward, incoming)
    operation = one(spans, "trigger-service create-stream")
    assert operation.kind is SpanKind.SERVER
    assert child_of(operation, forward)
    assert operation.attributes is not None
    assert operation.attributes["trigger.status_code"] == 201
    writes = [s for s in spans.get_finished_spans() if s.name == "trigger store write"]
    assert writes
    assert all(child_of(write, operation) for write in writes)


async def test_a_gateway_forward_has_a_span_and_the_responder_sees_it_as_parent(
    nc: Client, gateway_url, http, spans
):
    name, seen = await live_gateway_route(nc, http, gateway_url)
    spans.clear()
    assert await get(http, f"{gateway_url}/{name}", traceparent=TRACEPARENT) == 200

    forward = one(spans, f"forward GET /{name}")
    assert forward.kind is SpanKind.CLIENT
    assert forward.context is not None
    assert child_of(forward, one(spans, "HTTP gateway"))
    assert seen[-1].headers is not None
    assert seen[-1].headers["traceparent"] == f"00-{TRACE_ID}-{forward.context.span_id:016x}-01"


# --- request log lines --------------------------------------------------------------------------


async def started_url(log: Path) -> str:
    lines = await eventually(lambda: [x for x in log_lines(log) if x.get("event") == "started"], timeout=20)
    return str(lines[0]["url"])


async def test_request_log_lines_carry_the_trace_id_and_sampling_keeps_the_errors(
    nats_server: NatsServer, spawn: Any, http: aiohttp.ClientSession
):
    bucket = unique("bucket")
    _, service_log = spawn(SERVICE, env_for(nats_server.url, bucket, TRIGGER_REQUEST_LOG_SAMPLE="0"))
    await eventually(lambda: any(x.get("event") == "started" for x in log_lines(service_log)), timeout=20)
    sidecar_env = env_for(nats_server.url, bucket, TRIGGER_HTTP_ADDR=f"127.0.0.1:{free_port()}")
    _, sidecar_log = spawn(SIDECAR, sidecar_env)
    url = await started_url(sidecar_log)
    missing = f"{url}/trigger/triggers/stream/{unique()}"
    # One after the other: once the second one's line is written, the first one's would be too.
    assert (
        await get(
            http, f"{url}/trigger/triggers?subject_pattern=ms.trigger.%3E", **{"X-Request-Id": "req-200"}
        )
        == 200
    )
    assert await get(http, missing, traceparent=TRACEPARENT, **{"X-Request-Id": "req-404"}) == 404

    def service_line(request_id: str) -> list[dict[str, object]]:
        return [
            x for x in log_lines(service_log) if x.get("event") == "request" and x["request_id"] == request_id
        ]

    line = (await eventually(lambda: service_line("req-404")))[0]
    assert line["trace_id"] == TRACE_ID
    assert line["status"] == 404
    assert line["operation"] == "get"
    assert line["account"] == "acme"
    assert isinstance(line["duration_ms"], float)
    assert str(line["subject"]).startswith("ms.trigger.get.")
    http_lines = await eventually(
        lambda: [
            x for x in log_lines(sidecar_log) if x.get("event") == "http" and x.get("request_id") == "req-200"
        ]
    )
    sidecar_line = next(x for x in log_lines(sidecar_log) if x.get("request_id") == "req-404")
    assert sidecar_line["trace_id"] == TRACE_ID
    assert sidecar_line["status"] == 404
    assert http_lines[0]["trace_id"] != TRACE_ID  # a trace the sidecar started
    # TRIGGER_REQUEST_LOG_SAMPLE=0 on the service: its successful requests have no line, its errors do.
    assert not service_line("req-200")


async def _status_is(http: aiohttp.ClientSession, url: str, expected: int) -> bool:
    return await get(http, url) == expected
