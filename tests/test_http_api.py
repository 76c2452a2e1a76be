"""The Trigger API over HTTP: real requests to a real sidecar, service and nats-server."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator

import aiohttp
import msgspec
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from schemas.openapi import document
from service.app import running
from service.config import Settings
from service.gateway.app import running_gateway
from service.natsserver import NatsServer
from tests import http_fixtures
from tests.conftest import make_settings
from tests.http_fixtures import call, on_free_port
from tests.support import gateway_request, stream_request, token, unique

gateway_url, http = http_fixtures.gateway_url, http_fixtures.http

JSON = "application/json"


class Recorder:
    """A stand-in for the service on a private prefix: records each request, answers 200 (or never)."""

    def __init__(self, prefix: str, answer: bool = True) -> None:
        self.prefix = prefix
        self.answer = answer
        self.url = ""
        self.messages: list[Msg] = []

    async def on_message(self, msg: Msg) -> None:
        self.messages.append(msg)
        if self.answer:
            await msg.respond(msgspec.json.encode({"status_code": 200, "body": {"seen": msg.subject}}))


@pytest.fixture
async def recorder(nc: Client, settings: Settings) -> AsyncIterator[Recorder]:
    """A recorder on a fresh prefix, with `url` set to a sidecar that forwards to it."""
    rec = Recorder(unique("p"))
    sub = await nc.subscribe(f"{rec.prefix}.>", cb=rec.on_message)
    await asyncio.sleep(0)
    await nc.flush()
    async with running_gateway(on_free_port(settings, prefix=rec.prefix)) as rec.url:
        yield rec
    await sub.unsubscribe()


# --- every route -----------------------------------------------------------------------------


async def test_stream_trigger_lifecycle_over_http(http: aiohttp.ClientSession, gateway_url: str) -> None:
    """Create (201), get (200), list (200), history (200), delete (200), then get is 404."""
    name = unique()
    created = await call(
        http, "POST", f"{gateway_url}/trigger/stream", json=stream_request(name, "a.b", "c.d")
    )
    assert created.status == 201, created.envelope
    assert created.headers["Content-Type"] == JSON
    assert created.body["subject"] == f"ms.trigger.stream.{name}"

    got = await call(http, "GET", f"{gateway_url}/trigger/triggers/stream/{name}")
    assert (got.status, got.envelope["metadata"]) == (200, {"subject": f"ms.trigger.stream.{name}"})
    assert got.body["source"] == {"subject": "a.b", "type": "stream"}

    listed = await call(
        http, "GET", f"{gateway_url}/trigger/triggers", params={"subject_pattern": "ms.trigger.stream.*"}
    )
    assert listed.status == 200, listed.envelope
    assert [r["name"] for r in listed.body["results"]] == [name]

    history = await call(http, "GET", f"{gateway_url}/trigger/triggers/stream/{name}/history")
    assert history.status == 200, history.envelope
    assert [entry["type"] for entry in history.body["results"]] == ["created"]

    deleted = await call(http, "DELETE", f"{gateway_url}/trigger/triggers/stream/{name}")
    assert (deleted.status, deleted.envelope) == (200, {"status_code": 200})

    gone = await call(http, "GET", f"{gateway_url}/trigger/triggers/stream/{name}")
    assert gone.status == 404
    assert gone.envelope["error"].startswith("Not found: ")


async def test_create_gateway_trigger_over_http(http: aiohttp.ClientSession, gateway_url: str) -> None:
    """POST /trigger/gateway answers 201 with the assigned mapping subject."""
    body = gateway_request(unique(), "GET", f"/{unique('path')}")
    created = await call(http, "POST", f"{gateway_url}/trigger/gateway", json=body)
    assert created.status == 201, created.envelope
    assert created.body["gateway_mapping_subject"].startswith("ms.trigger.gateway.")


async def test_list_limit_is_sent_as_a_number(http: aiohttp.ClientSession, gateway_url: str) -> None:
    """`limit` in the query string pages the list; `next_cursor` fetches the rest."""
    names = sorted(unique() for _ in range(3))
    for name in names:
        reply = await call(
            http, "POST", f"{gateway_url}/trigger/stream", json=stream_request(name, "x.y", "z.w")
        )
        assert reply.status == 201, reply.envelope
    url = f"{gateway_url}/trigger/triggers"
    first = await call(http, "GET", url, params={"subject_pattern": "ms.trigger.>", "limit": "2"})
    assert first.status == 200, first.envelope
    assert [r["name"] for r in first.body["results"]] == names[:2]
    rest = await call(
        http, "GET", url, params={"subject_pattern": "ms.trigger.>", "cursor": first.body["next_cursor"]}
    )
    assert [r["name"] for r in rest.body["results"]] == names[2:]


async def test_healthz_and_openapi(http: aiohttp.ClientSession, gateway_url: str) -> None:
    """/healthz is 200 while the service answers; /openapi.json is the generated document."""
    health = await call(http, "GET", f"{gateway_url}/healthz", account=None)
    assert health.status == 200, health.envelope
    assert health.body["status"] == "ok"
    spec = await call(http, "GET", f"{gateway_url}/openapi.json", account=None)
    assert spec.status == 200
    assert spec.envelope == msgspec.json.decode(msgspec.json.encode(document("ms.trigger")))


# --- update, enable and disable over HTTP ----------------------------------------------------


async def test_put_and_patch_are_compare_and_set_on_the_etag(
    http: aiohttp.ClientSession, gateway_url: str
) -> None:
    """GET's ETag is the revision; PUT and PATCH take it as If-Match (quoted or not) and answer a
    new ETag; a stale If-Match is 412 and changes nothing."""
    name = unique()
    url = f"{gateway_url}/trigger/triggers/stream/{name}"
    created = await call(
        http, "POST", f"{gateway_url}/trigger/stream", json=stream_request(name, "e.a", "e.b")
    )
    assert created.status == 201, created.envelope
    got = await call(http, "GET", url)
    etag = got.headers["ETag"]
    assert etag == f'"{created.body["revision"]}"'

    put = await call(http, "PUT", url, json=stream_request(name, "e.a", "e.c"), headers={"If-Match": etag})
    assert put.status == 200, put.envelope
    assert put.body["type"] == "updated"
    assert put.headers["ETag"] == f'"{put.body["revision"]}"'
    assert put.headers["ETag"] != etag

    stale = await call(http, "PUT", url, json=stream_request(name, "e.a", "e.d"), headers={"If-Match": etag})
    assert stale.status == 412, stale.envelope
    assert stale.envelope["error"].startswith("Precondition failed: ")
    assert "ETag" not in stale.headers
    stale_patch = await call(http, "PATCH", url, json={"enabled": False}, headers={"If-Match": etag})
    assert stale_patch.status == 412, stale_patch.envelope
    # The revision in the body is the NATS way: stale there is a 409, over HTTP too.
    in_body = await call(http, "PATCH", url, json={"enabled": False, "revision": created.body["revision"]})
    assert in_body.status == 409, in_body.envelope
    assert (await call(http, "GET", url)).body == put.body

    unquoted = put.headers["ETag"].strip('"')
    patched = await call(http, "PATCH", url, json={"enabled": False}, headers={"If-Match": unquoted})
    assert patched.status == 200, patched.envelope
    assert patched.body["enabled"] is False
    assert patched.headers["ETag"] == f'"{patched.body["revision"]}"'
    anything = await call(http, "PATCH", url, json={"enabled": True}, headers={"If-Match": "*"})
    assert anything.status == 200, anything.envelope
    latest = await call(http, "PUT", url, json=stream_request(name, "e.a", "e.f"))
    assert latest.status == 200, latest.envelope

    history = await call(http, "GET", f"{url}/history")
    assert [entry["type"] for entry in history.body["results"]] == [
        "created",
        "updated",
        "updated",
        "updated",
        "updated",
    ]


@pytest.mark.parametrize("if_match", ['W/"1"', '"1", "2"', "abc", '"0"', ""])
async def test_an_if_match_that_is_no_revision_is_400(
    http: aiohttp.ClientSession, gateway_url: str, if_match: str
) -> None:
    name = unique()
    assert (
        await call(http, "POST", f"{gateway_url}/trigger/stream", json=stream_request(name, "q.a", "q.b"))
    ).status == 201
    url = f"{gateway_url}/trigger/triggers/stream/{name}"
    reply = await call(http, "PATCH", url, json={"enabled": False}, headers={"If-Match": if_match})
    assert reply.status == 400, reply.envelope
    assert "If-Match" in reply.envelope["error"]


async def test_an_if_match_that_is_not_utf8_is_400_not_500(
    http: aiohttp.ClientSession, gateway_url: str
) -> None:
    """A header byte that is no UTF-8 (aiohttp reads it as a surrogate) can never travel over NATS."""
    host, port = gateway_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            b"PATCH /trigger/triggers/stream/abc HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Authorization: Bearer " + token().encode() + b'\r\nIf-Match: "1\xe9"\r\n'
            b'Content-Type: application/json\r\nContent-Length: 17\r\n\r\n{"enabled": true}'
        )
        answer = await asyncio.wait_for(reader.read(), timeout=5.0)
    finally:
        writer.close()
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 400 Bad Request", answer
    assert b"If-Match" in rest


async def test_put_and_patch_of_a_missing_trigger_are_404(
    http: aiohttp.ClientSession, gateway_url: str
) -> None:
    name = unique()
    url = f"{gateway_url}/trigger/triggers/gateway/{name}"
    put = await call(http, "PUT", url, json=gateway_request(name, "GET", f"/{name}"))
    patch = await call(http, "PATCH", url, json={"enabled": True})
    assert (put.status, patch.status) == (404, 404)


async def test_list_takes_enabled_as_a_query_parameter(http: aiohttp.ClientSession, gateway_url: str) -> None:
    account = unique("acct")
    names = sorted(unique() for _ in range(2))
    for name, enabled in zip(names, (True, False), strict=True):
        body = stream_request(name, f"{name}.a", f"{name}.b", enabled=enabled)
        reply = await call(http, "POST", f"{gateway_url}/trigger/stream", json=body, account=account)
        assert reply.status == 201, reply.envelope
    url = f"{gateway_url}/trigger/triggers"
    for value, expected in (("true", names[:1]), ("false", names[1:])):
        params = {"subject_pattern": "ms.trigger.>", "enabled": value}
        listed = await call(http, "GET", url, params=params, account=account)
        assert listed.status == 200, listed.envelope
        assert [r["name"] for r in listed.body["results"]] == expected
    bad = await call(
        http, "GET", url, params={"subject_pattern": "ms.trigger.>", "enabled": "1"}, account=account
    )
    assert bad.status == 400, bad.envelope


async def test_a_retried_create_over_http_is_409_with_the_live_record(
    http: aiohttp.ClientSession, gateway_url: str
) -> None:
    body = gateway_request(unique(), "GET", f"/{unique('p')}")
    created = await call(http, "POST", f"{gateway_url}/trigger/gateway", json=body)
    again = await call(http, "POST", f"{gateway_url}/trigger/gateway", json=body)
    assert again.status == 409, again.envelope
    assert again.body == {"same": True, "record": created.body}


# --- status mapping --------------------------------------------------------------------------


async def test_missing_or_bad_token_is_401(http: aiohttp.ClientSession, gateway_url: str) -> None:
    """The service's 401 envelope is the HTTP status."""
    url = f"{gateway_url}/trigger/triggers/stream/{unique()}"
    anonymous = await call(http, "GET", url, account=None)
    forged = await call(http, "GET", url, account=None, headers={"Authorization": "Bearer not.a.jwt"})
    for reply in (anonymous, forged):
        assert reply.status == 401
        assert reply.envelope["error"].startswith("Unauthorized: ")


async def test_duplicate_create_is_409(http: aiohttp.ClientSession, gateway_url: str) -> None:
    """A second active trigger of the same name is a conflict."""
    body = stream_request(unique(), "m.n", "o.p")
    assert (await call(http, "POST", f"{gateway_url}/trigger/stream", json=body)).status == 201
    again = await call(http, "POST", f"{gateway_url}/trigger/stream", json=body)
    assert again.status == 409
    assert again.envelope["error"].startswith("Conflict: ")


@pytest.mark.parametrize(
    ("method", "path", "params", "data"),
    [
        ("POST", "/trigger/stream", None, b"{not json"),
        ("POST", "/trigger/stream", None, b""),
        ("POST", "/trigger/gateway", None, b"[1, 2]"),
        ("GET", "/trigger/triggers", {"subject_pattern": "ms.trigger.>", "limit": "many"}, None),
        ("GET", "/trigger/triggers", {"subject_pattern": "ms.trigger.>", "limit": "0"}, None),
        ("GET", "/trigger/triggers", {"subject_pattern": "ms.trigger.>", "typo": "1"}, None),
        ("GET", "/trigger/triggers", {}, None),
        ("GET", "/trigger/triggers/queue/abc", None, None),
    ],
)
async def test_bad_requests_reach_the_service_and_are_400(
    http: aiohttp.ClientSession,
    gateway_url: str,
    method: str,
    path: str,
    params: dict[str, str] | None,
    data: bytes | None,
) -> None:
    """Bodies that are not JSON, bad query values and unknown types: the service's 400."""
    reply = await call(
        http,
        method,
        f"{gateway_url}{path}",
        params=params,
        data=data,
        headers={"Content-Type": "application/json"},
    )
    assert reply.status == 400, reply.envelope
    assert reply.envelope["error"].startswith("Invalid request: ")
    assert reply.headers["Content-Type"] == JSON


@pytest.mark.parametrize("name", ["a.b", "*", ">", "a%20b", "x" * 300, "a%00b"])
async def test_path_parameter_that_is_not_one_token_is_400_without_forwarding(
    http: aiohttp.ClientSession, recorder: Recorder, name: str
) -> None:
    """A name that would change the subject never reaches NATS."""
    rec, url = recorder, recorder.url
    reply = await call(http, "GET", f"{url}/trigger/triggers/stream/{name}")
    assert reply.status == 400, reply.envelope
    assert "path parameter `name`" in reply.envelope["error"]
    assert (await call(http, "GET", f"{url}/trigger/triggers/stream/ok")).status == 200
    assert [m.subject for m in rec.messages] == [f"{rec.prefix}.get.stream.ok"]


async def test_wrong_method_on_a_known_path_is_405(http: aiohttp.ClientSession, gateway_url: str) -> None:
    """405 envelope with an Allow header, not a gateway route lookup."""
    reply = await call(http, "PATCH", f"{gateway_url}/trigger/stream", json={})
    assert reply.status == 405
    assert reply.headers["Allow"] == "POST"
    assert reply.envelope["error"].startswith("Method not allowed: ")
    on_item = await call(http, "POST", f"{gateway_url}/trigger/triggers/stream/abc")
    assert (on_item.status, on_item.headers["Allow"]) == (405, "DELETE, GET, PATCH, PUT")


async def test_body_over_one_mebibyte_is_413_without_forwarding(
    http: aiohttp.ClientSession, recorder: Recorder
) -> None:
    """Declared or chunked, a body over 1 MiB is refused by the sidecar itself."""
    rec, url = recorder, recorder.url
    big = io.BytesIO(b"x" * ((1 << 20) + 1))

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(17):
            yield b"y" * 65536

    for data in (big, chunks()):
        reply = await call(http, "POST", f"{url}/trigger/stream", data=data)
        assert reply.status == 413, reply.envelope
        assert reply.envelope["error"].startswith("Payload too large: ")
    exactly = await call(http, "POST", f"{url}/trigger/stream", data=io.BytesIO(b"z" * (1 << 20)))
    assert exactly.status == 413, "1 MiB plus the NATS headers is over the server's max payload"
    assert (await call(http, "POST", f"{url}/trigger/stream", data=b"{}")).status == 200
    assert [len(m.data) for m in rec.messages] == [2]


async def test_no_reply_within_the_timeout_is_504(
    http: aiohttp.ClientSession, nc: Client, settings: Settings
) -> None:
    """A responder that never answers: 504 after the sidecar's request timeout."""
    prefix = unique("p")
    silent = Recorder(prefix, answer=False)
    await nc.subscribe(f"{prefix}.>", cb=silent.on_message)
    await asyncio.sleep(0)
    await nc.flush()
    async with running_gateway(on_free_port(settings, prefix=prefix, request_timeout=0.2)) as url:
        reply = await call(http, "GET", f"{url}/trigger/triggers/stream/abc")
    assert reply.status == 504
    assert reply.envelope["error"].startswith("Gateway timeout: ")
    assert len(silent.messages) == 1


async def test_service_stopped_is_503(http: aiohttp.ClientSession) -> None:
    """With the service gone (its own nats-server, so no other service answers): 503 and unhealthy."""
    with NatsServer() as server:
        settings = on_free_port(make_settings(server.url))
        async with running_gateway(settings) as url:
            async with running(settings):
                assert (await call(http, "GET", f"{url}/healthz")).status == 200
                listed = await call(
                    http, "GET", f"{url}/trigger/triggers", params={"subject_pattern": "ms.trigger.>"}
                )
                assert listed.status == 200
            health = await call(http, "GET", f"{url}/healthz")
            listed = await call(
                http, "GET", f"{url}/trigger/triggers", params={"subject_pattern": "ms.trigger.>"}
            )
    for reply in (health, listed):
        assert reply.status == 503, reply.envelope
        assert reply.envelope["error"].startswith("Service unavailable: ")


# --- headers ---------------------------------------------------------------------------------


async def test_authorization_and_request_id_travel_as_nats_headers(
    http: aiohttp.ClientSession, recorder: Recorder
) -> None:
    """The caller's Authorization and X-Request-Id reach NATS; the id comes back; list's query is JSON."""
    rec, url = recorder, recorder.url
    bearer = f"Bearer {token('acme')}"
    reply = await call(
        http,
        "GET",
        f"{url}/trigger/triggers",
        account=None,
        headers={"Authorization": bearer, "X-Request-Id": "req-42"},
        params={"subject_pattern": "ms.trigger.>", "limit": "7", "cursor": "c"},
    )
    assert reply.status == 200, reply.envelope
    assert reply.headers["X-Request-Id"] == "req-42"
    [msg] = rec.messages
    assert msg.headers is not None
    assert (msg.headers["Authorization"], msg.headers["X-Request-Id"]) == (bearer, "req-42")
    assert msgspec.json.decode(msg.data) == {"subject_pattern": "ms.trigger.>", "limit": 7, "cursor": "c"}


async def test_a_request_id_is_made_when_none_comes(http: aiohttp.ClientSession, recorder: Recorder) -> None:
    """Without X-Request-Id, the sidecar makes one, sends it over NATS and returns it."""
    rec, url = recorder, recorder.url
    reply = await call(http, "GET", f"{url}/trigger/triggers/stream/abc", account=None)
    [msg] = rec.messages
    assert msg.headers is not None
    assert reply.headers["X-Request-Id"] == msg.headers["X-Request-Id"]
    assert len(reply.headers["X-Request-Id"]) >= 16
    assert "Authorization" not in msg.headers


async def test_other_paths_go_to_the_gateway_routes(http: aiohttp.ClientSession, gateway_url: str) -> None:
    """A path that is no static route is a gateway trigger's, or 404."""
    reply = await call(http, "GET", f"{gateway_url}/{unique('nothing-here')}")
    assert reply.status == 404
    assert reply.envelope["status_code"] == 404
