"""Gateway triggers serve HTTP from the moment they are created, end to end.

A real nats-server, the Trigger Service, the HTTP sidecar and responders written here: a
trigger is created over NATS, then called over HTTP as a user of the gateway would.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import msgspec
import nats
import nats.errors
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from service.app import running
from service.config import Settings
from service.gateway.app import running_gateway
from service.natsserver import NatsServer
from tests import http_fixtures
from tests.conftest import make_settings
from tests.http_fixtures import on_free_port
from tests.support import eventually, gateway_request, request, token, unique

pytestmark = pytest.mark.usefixtures("service")
gateway_url, http = http_fixtures.gateway_url, http_fixtures.http

Responder = Callable[[Msg], Awaitable[None]]


def sidecar(settings: Settings) -> contextlib.AbstractAsyncContextManager[str]:
    """Another sidecar replica on a free port; yields its base URL."""
    return running_gateway(on_free_port(settings))


class Response(msgspec.Struct):
    """What an HTTP caller sees."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return msgspec.json.decode(self.body)


async def call(
    http: aiohttp.ClientSession, method: str, url: str, *, data: Any = None, **kwargs: Any
) -> Response:
    """One HTTP request, read to the end."""
    async with http.request(method, url, data=data, **kwargs) as response:
        return Response(response.status, dict(response.headers), await response.read())


async def create(
    nc: Client, name: str, method: str, path: str, *, prefix: str = "ms.trigger", **mapping: Any
) -> dict[str, Any]:
    """Create a gateway trigger over NATS; return the stored record."""
    reply = await request(nc, f"{prefix}.create.gateway", gateway_request(name, method, path, **mapping))
    assert reply.status == 201, reply.envelope
    body: dict[str, Any] = reply.body
    return body


async def delete(nc: Client, name: str) -> None:
    """Delete a gateway trigger over NATS."""
    reply = await request(nc, f"ms.trigger.delete.gateway.{name}")
    assert reply.status == 200, reply.envelope


async def respond(nc: Client, subject: str, cb: Responder) -> None:
    """Subscribe a responder and make sure the server has seen the subscription."""
    await nc.subscribe(subject, cb=cb)
    await asyncio.sleep(0)
    await nc.flush()


def replying(
    nc: Client, data: bytes = b"ok", headers: dict[str, str] | None = None, seen: list[Msg] | None = None
) -> Responder:
    """A responder that records each request and answers with `data` (and `headers`)."""

    async def cb(msg: Msg) -> None:
        if seen is not None:
            seen.append(msg)
        await nc.publish(msg.reply, data, headers=headers)

    return cb


async def raw_http(base_url: str, data: bytes) -> bytes:
    """Send raw bytes to the sidecar; everything it answers until it closes the connection."""
    host, port = base_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(data)
        return await asyncio.wait_for(reader.read(), timeout=2.0)
    finally:
        writer.close()


def bearer(account: str = "acme") -> dict[str, str]:
    """HTTP headers carrying a valid bearer token."""
    return {"Authorization": f"Bearer {token(account)}"}


async def served(http: aiohttp.ClientSession, method: str, url: str, status: int, **kwargs: Any) -> bool:
    """True once `METHOD url` answers `status`."""
    return (await call(http, method, url, **kwargs)).status == status


# --- lifecycle ---------------------------------------------------------------------------------


async def test_route_serves_within_one_second_of_201_and_404s_within_one_second_of_delete(
    nc, gateway_url, http
):
    name, path = unique(), f"/{unique('p')}"
    url = gateway_url + path
    await respond(nc, "ms.trigger.gateway.>", replying(nc, b"hello"))

    before = await call(http, "GET", url)
    assert before.status == 404
    assert before.json() == {"error": f"Not found: no gateway route for GET {path}", "status_code": 404}

    await create(nc, name, "GET", path, is_public=True)
    await eventually(lambda: served(http, "GET", url, 200), timeout=1.0)
    assert (await call(http, "GET", url)).body == b"hello"

    await delete(nc, name)
    await eventually(lambda: served(http, "GET", url, 404), timeout=1.0)


async def test_two_sidecar_replicas_both_serve_a_new_route_within_one_second(nc, settings, http):
    name, path = unique(), f"/{unique('p')}"
    async with sidecar(settings) as first, sidecar(settings) as second:
        trigger = await create(nc, name, "POST", path, is_public=True)
        await respond(nc, trigger["gateway_mapping_subject"], replying(nc, b"pong"))
        start = time.monotonic()
        await eventually(lambda: served(http, "POST", first + path, 200), timeout=1.0)
        await eventually(
            lambda: served(http, "POST", second + path, 200), timeout=1.0 - (time.monotonic() - start)
        )

        await delete(nc, name)
        start = time.monotonic()
        await eventually(lambda: served(http, "POST", first + path, 404), timeout=1.0)
        await eventually(
            lambda: served(http, "POST", second + path, 404), timeout=1.0 - (time.monotonic() - start)
        )


async def test_a_sidecar_started_later_serves_existing_routes_on_its_first_request(nc, settings, http):
    live, gone = unique(), unique()
    live_trigger = await create(nc, live, "GET", f"/{live}", is_public=True)
    await create(nc, gone, "GET", f"/{gone}", is_public=True)
    await delete(nc, gone)
    await respond(nc, live_trigger["gateway_mapping_subject"], replying(nc, b"already here"))

    async with sidecar(settings) as url:
        first = await call(http, "GET", f"{url}/{live}")
        assert (first.status, first.body) == (200, b"already here")
        assert (await call(http, "GET", f"{url}/{gone}")).status == 404


async def test_a_new_trigger_may_take_over_a_deleted_route(nc, gateway_url, http):
    path = f"/{unique('p')}"
    old, new = unique(), unique()
    old_trigger = await create(nc, old, "GET", path, is_public=True)
    await respond(nc, old_trigger["gateway_mapping_subject"], replying(nc, b"old"))
    await eventually(lambda: served(http, "GET", gateway_url + path, 200), timeout=1.0)
    await delete(nc, old)

    new_trigger = await create(nc, new, "GET", path, is_public=True)
    await respond(nc, new_trigger["gateway_mapping_subject"], replying(nc, b"new"))

    async def answers_new() -> bool:
        return (await call(http, "GET", gateway_url + path)).body == b"new"

    await eventually(answers_new, timeout=1.0)


async def test_routes_match_method_and_exact_path(nc, gateway_url, http):
    path = f"/{unique('p')}/items"
    trigger = await create(nc, unique(), "GET", path, is_public=True)
    head = await create(nc, unique(), "HEAD", f"{path}/head", is_public=True)
    await respond(nc, trigger["gateway_mapping_subject"], replying(nc, b"get"))
    await respond(nc, head["gateway_mapping_subject"], replying(nc, b""))
    await eventually(lambda: served(http, "HEAD", f"{gateway_url}{path}/head", 200), timeout=1.0)
    await eventually(lambda: served(http, "GET", gateway_url + path, 200), timeout=1.0)

    assert (await call(http, "GET", f"{gateway_url}{path}/")).status == 404  # trailing slash matters
    assert (await call(http, "GET", f"{gateway_url}{path}/head")).status == 405
    other = await call(http, "POST", gateway_url + path)
    assert other.status == 405
    assert other.headers["Allow"] == "GET"
    assert other.json()["error"].startswith("Method not allowed: ")
    assert (await call(http, "HEAD", gateway_url + path)).status == 405  # HEAD matches only HEAD triggers
    with_query = await call(http, "GET", f"{gateway_url}{path}?a=1")
    assert (with_query.status, with_query.body) == (200, b"get")


# --- forwarding --------------------------------------------------------------------------------


async def test_request_travels_as_body_and_headers_to_the_mapping_subject(nc, gateway_url, http):
    path = f"/{unique('p')}/orders"
    trigger = await create(nc, unique(), "PUT", path)
    seen: list[Msg] = []
    await respond(nc, trigger["gateway_mapping_subject"], replying(nc, b"done", seen=seen))
    await eventually(lambda: served(http, "PUT", gateway_url + path, 401), timeout=1.0)

    body = bytes(range(256)) * 10
    response = await call(
        http,
        "PUT",
        f"{gateway_url}{path}?b=2&a=%20x&a=y",
        data=body,
        headers={
            **bearer("globex"),
            "X-Custom": "value",
            "Content-Type": "application/x-thing",
            "Trigger-Account": "forged",
            "Http-Method": "forged",
            "Connection": "keep-alive, X-Private",
            "X-Private": "hop",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Upgrade": "h2c",
        },
    )

    assert (response.status, response.body) == (200, b"done")
    [msg] = seen
    assert msg.subject == trigger["gateway_mapping_subject"]
    assert msg.data == body
    headers = msg.headers or {}
    assert headers["Http-Method"] == "PUT"
    assert headers["Http-Path"] == path
    assert headers["Http-Query"] == "b=2&a=%20x&a=y"
    assert headers["Trigger-Account"] == "globex"
    assert headers["X-Custom"] == "value"
    assert headers["Content-Type"] == "application/x-thing"
    assert headers["Authorization"].startswith("Bearer ")
    assert headers["Content-Length"] == str(len(body))
    lowered = {name.lower() for name in headers}
    assert not lowered & {"connection", "x-private", "keep-alive", "te", "upgrade", "transfer-encoding"}


async def test_public_route_forwards_without_token_and_without_trigger_account(nc, gateway_url, http):
    path = f"/{unique('p')}"
    trigger = await create(nc, unique(), "POST", path, is_public=True)
    seen: list[Msg] = []
    await respond(nc, trigger["gateway_mapping_subject"], replying(nc, seen=seen))
    await eventually(lambda: served(http, "POST", gateway_url + path, 200), timeout=1.0)

    forged = await call(http, "POST", gateway_url + path, headers={"trigger-account": "forged"})
    bad_token = await call(http, "POST", gateway_url + path, headers={"Authorization": "Bearer nope"})
    good = await call(http, "POST", gateway_url + path, headers=bearer("initech"))

    assert [forged.status, bad_token.status, good.status] == [200, 200, 200]
    accounts = [(m.headers or {}).get("Trigger-Account") for m in seen[-3:]]
    assert accounts == [None, None, "initech"]
    assert (seen[-1].headers or {})["Http-Query"] == ""


async def test_chunked_request_body_is_forwarded_whole(nc, gateway_url, http):
    path = f"/{unique('p')}"
    trigger = await create(nc, unique(), "POST", path, is_public=True)
    seen: list[Msg] = []
    await respond(nc, trigger["gateway_mapping_subject"], replying(nc, seen=seen))
    await eventually(lambda: served(http, "POST", gateway_url + path, 200), timeout=1.0)

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(5):
            yield f"part {i};".encode()

    response = await call(http, "POST", gateway_url + path, data=chunks())
    assert response.status == 200
    assert seen[-1].data == b"part 0;part 1;part 2;part 3;part 4;"
    assert "Transfer-Encoding" not in (seen[-1].headers or {})


@pytest.mark.parametrize(
    ("reply", "reply_headers", "status", "content_type"),
    [
        (b'{"status_code": 201, "body": {"id": 7}}', None, 201, "application/json"),
        (
            b'{"error": "Not found: no order", "status_code": 404}',
            {"Content-Type": "text/plain"},
            404,
            "application/json",
        ),
        (b' {"status_code": 599}', None, 599, "application/json"),
        (b'{"status_code": 700}', None, 200, "application/octet-stream"),
        (b'{"status_code": "201"}', None, 200, "application/octet-stream"),
        (b'{"status_code": 201.0}', None, 200, "application/octet-stream"),
        (b'{"id": 7}', {"Content-Type": "application/json"}, 200, "application/json"),
        (b"<p>hi</p>", {"Content-Type": "text/html; charset=utf-8"}, 200, "text/html; charset=utf-8"),
        (b"\x00\xffbinary", None, 200, "application/octet-stream"),
        (b"{not json", None, 200, "application/octet-stream"),
        (b"", None, 200, "application/octet-stream"),
    ],
)
async def test_reply_becomes_the_http_response(
    nc, gateway_url, http, reply, reply_headers, status, content_type
):
    path = f"/{unique('p')}"
    trigger = await create(nc, unique(), "GET", path, is_public=True)
    await respond(nc, trigger["gateway_mapping_subject"], replying(nc, reply, reply_headers))
    await eventually(lambda: served(http, "GET", gateway_url + path, status), timeout=1.0)

    response = await call(http, "GET", gateway_url + path)
    assert response.status == status
    assert response.body == reply
    assert response.headers["Content-Type"] == content_type


async def test_traffic_distribution_splits_requests_by_weight(nc, gateway_url, http):
    path = f"/{unique('p')}"
    trigger = await create(
        nc, unique(), "POST", path, is_public=True, traffic_distribution={"v1": 70, "v2": 30, "v3": 0}
    )
    subject = trigger["gateway_mapping_subject"]
    counts: Counter[str] = Counter()

    async def count(msg: Msg) -> None:
        counts[msg.subject] += 1
        await msg.respond(msg.subject.encode())

    await respond(nc, f"{subject}.*", count)
    await eventually(lambda: served(http, "POST", gateway_url + path, 200), timeout=1.0)
    counts.clear()

    async def one() -> int:
        return (await call(http, "POST", gateway_url + path)).status

    total = 2000
    for _ in range(total // 100):
        assert set(await asyncio.gather(*(one() for _ in range(100)))) == {200}

    assert sum(counts.values()) == total
    assert abs(counts[f"{subject}.v1"] / total - 0.70) <= 0.05, counts
    assert abs(counts[f"{subject}.v2"] / total - 0.30) <= 0.05, counts
    assert counts[f"{subject}.v3"] == 0
    assert counts[subject] == 0


# --- rules: authentication, rate limit, timeout, size ----------------------------------------


async def test_private_route_needs_a_valid_token_of_any_account(nc, gateway_url, http):
    path = f"/{unique('p')}"
    trigger = await create(nc, unique(), "GET", path)
    await respond(nc, trigger["gateway_mapping_subject"], replying(nc, b"secret"))
    await eventually(lambda: served(http, "GET", gateway_url + path, 200, headers=bearer()), timeout=1.0)

    anonymous = await call(http, "GET", gateway_url + path)
    assert anonymous.status == 401
    assert anonymous.json()["error"].startswith("Unauthorized: ")
    assert anonymous.json()["status_code"] == 401
    assert anonymous.headers["WWW-Authenticate"] == "Bearer"
    for bad in ("Bearer not-a-jwt", f"Bearer {token('acme', ttl=-10)}", "Basic dXNlcjpwYXNz", "Bearer "):
        assert (await call(http, "GET", gateway_url + path, headers={"Authorization": bad})).status == 401, (
            bad
        )
    other = await call(http, "GET", gateway_url + path, headers=bearer("someone-else"))
    assert (other.status, other.body) == (200, b"secret")


async def test_a_token_stops_opening_a_private_route_when_it_expires(nc, gateway_url, http):
    path = f"/{unique('p')}"
    trigger = await create(nc, unique(), "GET", path)
    await respond(nc, trigger["gateway_mapping_subject"], replying(nc))
    short_lived = {"Authorization": f"Bearer {token('acme', ttl=2)}"}
    await eventually(lambda: served(http, "GET", gateway_url + path, 200, headers=short_lived), timeout=1.0)

    await eventually(lambda: served(http, "GET", gateway_url + path, 401, headers=short_lived), timeout=3.0)
    assert (await call(http, "GET", gateway_url + path, headers=short_lived)).json() == {
        "error": "Unauthorized: token has expired",
        "status_code": 401,
    }


async def test_rate_limit_answers_429_with_retry_after_beyond_the_limit(nc, gateway_url, http):
    path = f"/{unique('p')}"
    trigger = await create(nc, unique(), "GET", path, limit={"request": 3, "time": 60_000})
    await respond(nc, trigger["gateway_mapping_subject"], replying(nc))
    await eventually(lambda: served(http, "GET", gateway_url + path, 401), timeout=1.0)

    for _ in range(5):  # refused before the limit: not counted
        assert (await call(http, "GET", gateway_url + path)).status == 401
    statuses = [(await call(http, "GET", gateway_url + path, headers=bearer())).status for _ in range(3)]
    assert statuses == [200, 200, 200]
    over = await call(http, "GET", gateway_url + path, headers=bearer())
    assert over.status == 429
    assert over.json()["error"].startswith("Too many requests: ")
    assert 1 <= int(over.headers["Retry-After"]) <= 60


async def test_rate_limit_window_slides(nc, gateway_url, http):
    path = f"/{unique('p')}"
    trigger = await create(nc, unique(), "GET", path, is_public=True, limit={"request": 2, "time": 300})
    await respond(nc, trigger["gateway_mapping_subject"], replying(nc))
    await eventually(lambda: served(http, "GET", gateway_url + path, 429), timeout=1.0)

    refused = await call(http, "GET", gateway_url + path)
    assert refused.status == 429
    assert refused.headers["Retry-After"] == "1"  # under a second rounds up to one
    await eventually(lambda: served(http, "GET", gateway_url + path, 200), timeout=1.0)


async def test_no_reply_within_timeout_is_504(nc, gateway_url, http):
    path = f"/{unique('p')}"
    trigger = await create(nc, unique(), "GET", path, is_public=True, timeout=100)

    async def silent(msg: Msg) -> None:
        pass

    await respond(nc, trigger["gateway_mapping_subject"], silent)
    await eventually(lambda: served(http, "GET", gateway_url + path, 504), timeout=1.0)
    start = time.monotonic()
    response = await call(http, "GET", gateway_url + path)
    assert response.status == 504
    assert time.monotonic() - start < 1.0
    assert response.json() == {
        "error": f"Gateway timeout: no reply for GET {path} within 0.1 s",
        "status_code": 504,
    }


async def test_no_responder_is_503(nc, gateway_url, http):
    path = f"/{unique('p')}"
    await create(nc, unique(), "DELETE", path, is_public=True)
    await eventually(lambda: served(http, "DELETE", gateway_url + path, 503), timeout=1.0)
    response = await call(http, "DELETE", gateway_url + path)
    assert response.json() == {
        "error": f"Service unavailable: no responder for DELETE {path}",
        "status_code": 503,
    }


async def test_body_over_the_nats_max_payload_is_413_and_the_gateway_stays_up(nc, gateway_url, http):
    path = f"/{unique('p')}"
    trigger = await create(nc, unique(), "POST", path, is_public=True)
    seen: list[Msg] = []
    await respond(nc, trigger["gateway_mapping_subject"], replying(nc, seen=seen))
    await eventually(lambda: served(http, "POST", gateway_url + path, 200), timeout=1.0)
    limit = nc.max_payload

    too_big = await call(http, "POST", gateway_url + path, data=io.BytesIO(b"x" * (limit + 1)))
    assert too_big.status == 413
    assert too_big.json()["error"].startswith("Payload too large: ")
    # The body alone fits, but not with the headers that travel with it.
    with_headers = await call(http, "POST", gateway_url + path, data=io.BytesIO(b"x" * (limit - 10)))
    assert with_headers.status == 413

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(3):
            yield b"y" * (limit // 2)

    assert (await call(http, "POST", gateway_url + path, data=chunks())).status == 413
    many_headers = {f"X-Big-{i}": "h" * 8000 for i in range(20)}
    big_headers = await call(
        http, "POST", gateway_url + path, data=b"x" * (limit - 100_000), headers=many_headers
    )
    assert big_headers.status == 413
    fits = await call(http, "POST", gateway_url + path, data=b"z" * (limit // 2))
    assert fits.status == 200
    assert len(seen[-1].data) == limit // 2


async def test_without_authentication_every_request_is_allowed_as_the_default_account(nats_server, nc, http):
    # Its own prefix, so that the suite's service (with authentication) does not answer.
    settings = make_settings(nats_server.url, TRIGGER_AUTH="none", TRIGGER_PREFIX="ms.open")
    path = f"/{unique('p')}"
    async with running(settings), sidecar(settings) as url:
        trigger = await create(nc, unique(), "GET", path, prefix="ms.open")
        seen: list[Msg] = []
        await respond(nc, trigger["gateway_mapping_subject"], replying(nc, seen=seen))
        await eventually(lambda: served(http, "GET", url + path, 200), timeout=1.0)
        assert (seen[-1].headers or {})["Trigger-Account"] == "default"


async def test_header_value_that_is_not_utf8_is_400(nc, gateway_url, http):
    path = f"/{unique('p')}"
    trigger = await create(nc, unique(), "GET", path, is_public=True)
    await respond(nc, trigger["gateway_mapping_subject"], replying(nc))
    await eventually(lambda: served(http, "GET", gateway_url + path, 200), timeout=1.0)

    request_bytes = f"GET {path} HTTP/1.1\r\nHost: x\r\nX-Latin: caf\xe9\r\nConnection: close\r\n\r\n"
    raw = await raw_http(gateway_url, request_bytes.encode("latin-1"))
    status_line, _, rest = raw.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 400 Bad Request"
    assert rest.endswith(
        b'{"error":"Invalid request: header values must be UTF-8 to travel over NATS","status_code":400}'
    )
    assert (await call(http, "GET", gateway_url + path, headers={"X-Utf8": "café"})).status == 200


async def test_routes_keep_following_the_bucket_across_a_nats_restart(tmp_path, http):
    server = NatsServer(store_dir=tmp_path).start()
    try:
        settings = make_settings(server.url)
        client = await nats.connect(server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.1)
        async with running(settings), sidecar(settings) as url:
            old, new = unique(), unique()
            await create(client, old, "GET", f"/{old}", is_public=True)
            await respond(client, "ms.trigger.gateway.>", replying(client))
            await eventually(lambda: served(http, "GET", f"{url}/{old}", 200), timeout=1.0)

            port = server.port
            server.stop()
            server = NatsServer(store_dir=tmp_path, extra_args=("-p", str(port))).start()

            async def created() -> bool:
                body = gateway_request(new, "GET", f"/{new}", is_public=True)
                with contextlib.suppress(nats.errors.Error):
                    reply = await request(client, "ms.trigger.create.gateway", body, timeout=1.0)
                    return reply.status in (201, 409)  # 409: an earlier attempt stored it
                return False

            await eventually(created, timeout=10.0)
            await eventually(lambda: served(http, "GET", f"{url}/{new}", 200), timeout=1.0)
            await delete(client, old)
            await eventually(lambda: served(http, "GET", f"{url}/{old}", 404), timeout=1.0)
        await client.drain()
    finally:
        server.stop()


# --- updates and enable/disable ----------------------------------------------------------------


async def update(nc: Client, name: str, method: str, path: str, **mapping: Any) -> dict[str, Any]:
    """Replace a gateway trigger's configuration over NATS; return the new record."""
    reply = await request(
        nc, f"ms.trigger.update.gateway.{name}", gateway_request(name, method, path, **mapping)
    )
    assert reply.status == 200, reply.envelope
    body: dict[str, Any] = reply.body
    return body


async def on_every_sidecar(
    check: Callable[[str], Awaitable[bool]], urls: list[str], within: float = 1.0
) -> None:
    """Return once `check(url)` holds on every sidecar, all within `within` seconds from now."""
    start = time.monotonic()
    for url in urls:

        async def holds(url: str = url) -> bool:
            return await check(url)

        await eventually(holds, timeout=max(0.01, within - (time.monotonic() - start)))


@contextlib.asynccontextmanager
async def hammering(
    http: aiohttp.ClientSession, urls: list[str], method: str, path: str
) -> AsyncIterator[Counter[int]]:
    """Requests (with a token) to one route on every sidecar, one after another, while inside;
    yields the count of every status seen."""
    statuses: Counter[int] = Counter()

    async def run(url: str) -> None:
        while True:
            statuses[(await call(http, method, url, headers=bearer())).status] += 1

    tasks = [asyncio.create_task(run(url + path)) for url in urls]
    try:
        yield statuses
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_change_of_split_limit_or_is_public_applies_on_every_sidecar_within_a_second(
    nc, settings, http
):
    name, path = unique(), f"/{unique('p')}"
    async with sidecar(settings) as first, sidecar(settings) as second:
        urls = [first, second]
        trigger = await create(nc, name, "GET", path, is_public=True)
        subject = trigger["gateway_mapping_subject"]

        async def answer(msg: Msg) -> None:
            await msg.respond(msg.subject.removeprefix(subject).encode() or b"-")

        await respond(nc, f"{subject}.>", answer)
        await respond(nc, subject, answer)

        async def body_is(url: str, body: bytes) -> bool:
            return (await call(http, "GET", url + path)).body == body

        await on_every_sidecar(lambda url: body_is(url, b"-"), urls)
        async with hammering(http, urls, "GET", path) as statuses:
            await update(nc, name, "GET", path, is_public=True, traffic_distribution={"v2": 100})
            await on_every_sidecar(lambda url: body_is(url, b".v2"), urls)

            await update(nc, name, "GET", path, is_public=False, traffic_distribution={"v2": 100})
            await on_every_sidecar(lambda url: served(http, "GET", url + path, 401), urls)

            limit = {"request": 1, "time": 60_000}
            await update(nc, name, "GET", path, traffic_distribution={"v2": 100}, limit=limit)
            await on_every_sidecar(lambda url: served(http, "GET", url + path, 429, headers=bearer()), urls)
    assert statuses[200] > 0
    assert set(statuses) <= {200, 429}, statuses  # never a 404 or a 5xx while the route changed


SLOW_RESPONDER = 0.3  # seconds: over a 100 ms route timeout, well under a 2 s one


async def test_a_change_of_timeout_applies_on_every_sidecar_within_a_second(nc, settings, http):
    name, path = unique(), f"/{unique('p')}"
    async with sidecar(settings) as first, sidecar(settings) as second:
        urls = [first, second]
        trigger = await create(nc, name, "POST", path, is_public=True, timeout=2000)

        async def slow(msg: Msg) -> None:
            await asyncio.sleep(SLOW_RESPONDER)  # the behaviour under test: a responder that takes its time
            await msg.respond(b"late")

        await respond(nc, trigger["gateway_mapping_subject"], slow)
        await on_every_sidecar(lambda url: served(http, "POST", url + path, 200), urls)
        await update(nc, name, "POST", path, is_public=True, timeout=100)
        await on_every_sidecar(lambda url: served(http, "POST", url + path, 504), urls)
        await update(nc, name, "POST", path, is_public=True, timeout=2000)
        await on_every_sidecar(lambda url: served(http, "POST", url + path, 200), urls)


async def test_an_update_that_keeps_the_limit_keeps_its_window(nc, gateway_url, http):
    name, path = unique(), f"/{unique('p')}"
    trigger = await create(nc, name, "GET", path, is_public=True, limit={"request": 1, "time": 60_000})
    await respond(nc, trigger["gateway_mapping_subject"], replying(nc))
    await eventually(lambda: served(http, "GET", gateway_url + path, 429), timeout=1.0)
    await update(nc, name, "GET", path, is_public=True, limit={"request": 1, "time": 60_000}, timeout=5000)
    await update(nc, name, "GET", path, is_public=True, limit={"request": 1, "time": 60_000}, timeout=6000)
    # Still limited: the window was not reset by an update that did not change it.
    for _ in range(5):
        assert (await call(http, "GET", gateway_url + path)).status == 429


async def test_a_change_of_path_moves_the_route(nc, gateway_url, http):
    name, old, new = unique(), f"/{unique('p')}", f"/{unique('p')}"
    trigger = await create(nc, name, "GET", old, is_public=True)
    await respond(nc, trigger["gateway_mapping_subject"], replying(nc, b"moved"))
    await eventually(lambda: served(http, "GET", gateway_url + old, 200), timeout=1.0)

    await update(nc, name, "GET", new, is_public=True)
    await eventually(lambda: served(http, "GET", gateway_url + new, 200), timeout=1.0)
    assert (await call(http, "GET", gateway_url + old)).status == 404
    # The old path is free: another trigger takes it and is served there.
    other = await create(nc, unique(), "GET", old, is_public=True)
    await respond(nc, other["gateway_mapping_subject"], replying(nc, b"other"))

    async def answers_other() -> bool:
        return (await call(http, "GET", gateway_url + old)).body == b"other"

    await eventually(answers_other, timeout=1.0)
    assert (await call(http, "GET", gateway_url + new)).body == b"moved"


async def test_a_disabled_gateway_trigger_answers_503_and_keeps_its_route(nc, gateway_url, http):
    name, path = unique(), f"/{unique('p')}"
    trigger = await create(nc, name, "GET", path)
    await respond(nc, trigger["gateway_mapping_subject"], replying(nc, b"on"))
    url = gateway_url + path
    await eventually(lambda: served(http, "GET", url, 200, headers=bearer()), timeout=1.0)
    async with hammering(http, [gateway_url], "GET", path) as statuses:
        reply = await request(nc, f"ms.trigger.patch.gateway.{name}", {"enabled": False})
        assert reply.status == 200, reply.envelope
        await eventually(lambda: served(http, "GET", url, 503, headers=bearer()), timeout=1.0)
        disabled = await call(http, "GET", url, headers=bearer())
        assert disabled.json() == {
            "error": f"Service unavailable: gateway trigger {name!r} for GET {path} is disabled",
            "status_code": 503,
        }
        assert (await call(http, "GET", url)).status == 401  # authentication first, as ever
        other = gateway_request(unique(), "GET", path)
        taken = await request(nc, "ms.trigger.create.gateway", other, account="b")
        assert taken.status == 409, taken.envelope  # nobody takes the path meanwhile

        reply = await request(nc, f"ms.trigger.patch.gateway.{name}", {"enabled": True})
        assert reply.status == 200, reply.envelope
        await eventually(lambda: served(http, "GET", url, 200, headers=bearer()), timeout=1.0)
    assert set(statuses) <= {200, 503}, statuses  # never a 404 while it was switched off and on
