"""The sidecar while its NATS connection is down: every route answers 503 at once, then serves again."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import nats
from nats.aio.msg import Msg

from service.app import running
from service.gateway.app import running_gateway
from service.natsserver import NatsServer
from tests.conftest import make_settings
from tests.http_fixtures import HttpReply, call, on_free_port
from tests.support import eventually, gateway_request, request, unique

DOWN = {"error": "Service unavailable: not connected to NATS (reconnecting)", "status_code": 503}


async def until(check: Callable[[], Awaitable[bool]], timeout: float) -> None:
    """Poll `check` until it says yes (tests.support.eventually, typed for a yes-or-no check)."""
    met: bool = await eventually(check, timeout=timeout)
    assert met


async def timed(http: aiohttp.ClientSession, url: str) -> tuple[HttpReply, float]:
    """GET `url` (with a valid token): the reply and the seconds it took."""
    started = time.monotonic()
    reply = await call(http, "GET", url)
    return reply, time.monotonic() - started


async def test_every_route_is_503_at_once_while_nats_is_down_and_serves_again_after(tmp_path: Path) -> None:
    server = NatsServer(store_dir=tmp_path).start()
    client = await nats.connect(server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.1)
    try:
        settings = make_settings(server.url)
        async with (
            running(settings),
            running_gateway(on_free_port(settings)) as base,
            aiohttp.ClientSession() as http,
        ):
            path = f"/{unique('p')}"
            created = await request(
                client, "ms.trigger.create.gateway", gateway_request(unique(), "GET", path, is_public=True)
            )
            assert created.status == 201, created.envelope

            async def pong(msg: Msg) -> None:
                await msg.respond(b"pong")

            await client.subscribe(created.body["gateway_mapping_subject"], cb=pong)
            await client.flush()
            api, route = f"{base}/trigger/triggers/stream/{unique()}", base + path

            async def answers(url: str, status: int) -> bool:
                return (await call(http, "GET", url)).status == status

            async def noticed() -> bool:  # the sidecar has seen the connection drop
                return bool((await call(http, "GET", f"{base}/healthz")).envelope == DOWN)

            await until(lambda: answers(route, 200), timeout=5)
            assert await answers(api, 404)

            port = server.port
            server.stop()
            await until(noticed, timeout=10)
            for url in (api, route):  # the gateway trigger's timeout is 30 s, the API's 10 s
                reply, took = await timed(http, url)
                assert (reply.status, reply.envelope) == (503, DOWN)
                assert took < 1.0

            server = NatsServer(store_dir=tmp_path, extra_args=("-p", str(port))).start()
            await until(lambda: answers(f"{base}/healthz", 200), timeout=20)
            await until(lambda: answers(route, 200), timeout=10)
            assert await answers(api, 404)
    finally:
        await client.close()
        server.stop()
