"""The console: its JSON data over HTTP, and the page and `/docs` in a real headless Chromium.

The browser is Debian's Chromium (`make setup` installs it), driven by Playwright over CDP;
Playwright's own browser builds are never downloaded. Only where no Chromium could be installed
do the browser tests skip, and they say so.
"""

from __future__ import annotations

import asyncio
import io
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import msgspec
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from PIL import Image
from playwright.async_api import Browser, Page, async_playwright

from service.app import running
from service.devstack import free_port
from service.gateway.app import running_gateway
from service.natsserver import NatsServer
from tests import http_fixtures
from tests.conftest import make_settings
from tests.http_fixtures import HttpReply, call, on_free_port
from tests.support import Inbox, eventually, gateway_request, stream_request, token, unique

gateway_url, http = http_fixtures.gateway_url, http_fixtures.http

CHROMIUM = "/usr/bin/chromium"
_LAUNCH_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
_LOCAL_HOSTS = {"127.0.0.1", "localhost", "[::1]", "::1"}


async def console(
    http: aiohttp.ClientSession, url: str, account: str | None = "acme", **query: str
) -> HttpReply:
    return await call(http, "GET", f"{url}/console/api/triggers", account=account, params=query)


async def create(
    http: aiohttp.ClientSession, url: str, kind: str, body: dict[str, Any], account: str = "acme"
) -> Any:
    reply = await call(http, "POST", f"{url}/trigger/{kind}", account=account, json=body)
    assert reply.status == 201, reply.envelope
    return reply.body


def names(reply: HttpReply) -> list[str]:
    assert reply.status == 200, reply.envelope
    return [row["record"]["name"] for row in reply.body["results"]]


# --- the JSON endpoints ----------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/console/api/triggers", "/console/api/triggers/stream/x"])
async def test_console_data_needs_the_bearer_token(
    http: aiohttp.ClientSession, gateway_url: str, path: str
) -> None:
    reply = await call(http, "GET", gateway_url + path, account=None)
    assert reply.status == 401
    assert reply.envelope["error"].startswith("Unauthorized: ")


async def test_console_lists_only_the_callers_triggers(http: aiohttp.ClientSession, gateway_url: str) -> None:
    """Another account's triggers never appear, in the table or as one trigger's page (404)."""
    collection = unique("c")
    ours = unique("ours")
    theirs = unique("theirs")
    await create(
        http, gateway_url, "stream", stream_request(ours, f"{ours}.in", f"{ours}.out", collection=collection)
    )
    await create(
        http, gateway_url, "stream",
        stream_request(theirs, f"{theirs}.in", f"{theirs}.out", collection=collection), account="rival",
    )  # fmt: skip

    assert names(await console(http, gateway_url, collection=collection)) == [ours]
    assert names(await console(http, gateway_url, "rival", collection=collection)) == [theirs]
    detail = await call(http, "GET", f"{gateway_url}/console/api/triggers/stream/{theirs}")
    assert detail.status == 404, detail.envelope
    assert detail.envelope["error"].startswith("Not found: ")


async def test_console_filters_by_pattern_type_collection_and_enabled(
    http: aiohttp.ClientSession, gateway_url: str
) -> None:
    collection = unique("c")
    stream, gateway, off = unique("s"), unique("g"), unique("off")
    await create(
        http,
        gateway_url,
        "stream",
        stream_request(stream, f"{stream}.in", f"{stream}.out", collection=collection),
    )
    await create(
        http,
        gateway_url,
        "gateway",
        {**gateway_request(gateway, "GET", f"/{gateway}"), "collection": collection},
    )
    await create(
        http, gateway_url, "stream", stream_request(off, f"{off}.in", f"{off}.out", collection=collection)
    )
    disabled = await call(
        http, "PATCH", f"{gateway_url}/trigger/triggers/stream/{off}", json={"enabled": False}
    )
    assert disabled.status == 200, disabled.envelope
    await create(http, gateway_url, "stream", stream_request(unique("other"), "o.in", "o.out"))

    assert sorted(names(await console(http, gateway_url, collection=collection))) == sorted(
        [stream, gateway, off]
    )
    assert names(await console(http, gateway_url, collection=collection, type="gateway")) == [gateway]
    typed = await console(http, gateway_url, collection=collection, type="stream", enabled="true")
    assert names(typed) == [stream]
    assert typed.body["subject_pattern"] == "ms.trigger.stream.>"  # the type went into the key filter
    assert names(await console(http, gateway_url, collection=collection, enabled="false")) == [off]
    pattern = await console(http, gateway_url, subject_pattern=f"ms.trigger.*.{gateway}")
    assert names(pattern) == [gateway]


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ({"limit": "0"}, "$.limit"),
        ({"limit": "ten"}, "$.limit"),
        ({"type": "bogus"}, "$.type"),
        ({"enabled": "maybe"}, "$.enabled"),
        ({"colour": "red"}, "colour"),
        ({"subject_pattern": "not.under.prefix"}, "subject_pattern"),
    ],
)
async def test_console_refuses_a_bad_query_with_a_400_naming_the_parameter(
    http: aiohttp.ClientSession, gateway_url: str, query: dict[str, str], field: str
) -> None:
    reply = await console(http, gateway_url, **query)
    assert reply.status == 400, reply.envelope
    assert reply.envelope["status_code"] == 400
    assert reply.envelope["error"].startswith("Invalid request: ")
    assert field in reply.envelope["error"]


async def test_console_refuses_a_path_parameter_that_is_no_name(
    http: aiohttp.ClientSession, gateway_url: str
) -> None:
    reply = await call(http, "GET", f"{gateway_url}/console/api/triggers/stream/a.b")
    assert reply.status == 400, reply.envelope
    assert "path parameter `name`" in reply.envelope["error"]


async def test_console_sums_a_stream_triggers_counters_over_the_service_replicas(
    http: aiohttp.ClientSession, nats_server: NatsServer, nc: Client
) -> None:
    """Two service replicas with metrics listeners, each carrying part of 10 messages: the console's
    page of the trigger shows their sum (and a replica's listener that is down is left out)."""
    addrs = [f"127.0.0.1:{free_port()}" for _ in range(3)]  # the third listens nowhere
    base = make_settings(nats_server.url)
    name = unique("s")
    source, target = f"{name}.in", f"{name}.out"
    inbox = await Inbox.on(nc, target)
    async with (
        running(msgspec.structs.replace(base, metrics_addr=addrs[0])),
        running(msgspec.structs.replace(base, metrics_addr=addrs[1])),
        running_gateway(on_free_port(msgspec.structs.replace(base, service_metrics=",".join(addrs)))) as url,
    ):
        await create(http, url, "stream", stream_request(name, source, target))
        payloads = [f"m{i}".encode() for i in range(10)]  # 2 bytes each
        for payload in payloads:
            await nc.publish(source, payload)
        await inbox.wait_for(*payloads)
        detail = await call(http, "GET", f"{url}/console/api/triggers/stream/{name}")
    assert detail.status == 200, detail.envelope
    counted = {s["name"]: s["value"] for s in detail.body["metrics"]}
    assert counted["trigger_stream_messages_total"] == 10
    assert counted["trigger_stream_bytes_total"] == 20


async def test_console_shows_a_gateway_routes_recent_status_mix_and_its_metrics(
    http: aiohttp.ClientSession, gateway_url: str, nc: Client
) -> None:
    """Requests answered 200 and 418 by the responder are counted by status, in the table and in the
    trigger's page, next to the sidecar's metrics of that trigger."""
    name = unique("g")
    created = await create(http, gateway_url, "gateway", gateway_request(name, "POST", f"/{name}"))

    async def respond(msg: Msg) -> None:
        status = 418 if msg.data == b"teapot" else 200
        await msg.respond(msgspec.json.encode({"status_code": status}))

    sub = await nc.subscribe(created["gateway_mapping_subject"], cb=respond)
    await asyncio.sleep(0)
    await nc.flush()
    try:
        await eventually(lambda: _status(http, f"{gateway_url}/{name}", b"ok", 200), timeout=5)
        for body in (b"ok", b"ok", b"teapot"):
            async with http.post(
                f"{gateway_url}/{name}", data=body, headers={"Authorization": f"Bearer {token()}"}
            ):
                pass
    finally:
        await sub.unsubscribe()

    listed = await console(http, gateway_url, subject_pattern=f"ms.trigger.gateway.{name}")
    assert names(listed) == [name]
    traffic = listed.body["results"][0]["traffic"]
    assert traffic["statuses"] == {"200": 3, "418": 1}
    assert traffic["window_s"] == 300

    detail = await call(http, "GET", f"{gateway_url}/console/api/triggers/gateway/{name}")
    assert detail.status == 200, detail.envelope
    assert detail.body["record"]["subject"] == f"ms.trigger.gateway.{name}"
    assert [entry["type"] for entry in detail.body["history"]["results"]] == ["created"]
    assert detail.body["traffic"]["statuses"] == {"200": 3, "418": 1}
    counted = {
        (s["name"], s["labels"].get("code")): s["value"]
        for s in detail.body["metrics"]
        if s["name"] == "trigger_gateway_requests_total"
    }
    assert counted[("trigger_gateway_requests_total", "2xx")] == 3
    assert counted[("trigger_gateway_requests_total", "4xx")] == 1
    assert {s["labels"]["trigger"] for s in detail.body["metrics"]} == {name}


async def _status(http: aiohttp.ClientSession, url: str, body: bytes, expected: int) -> bool:
    async with http.post(url, data=body, headers={"Authorization": f"Bearer {token()}"}) as response:
        return response.status == expected


# --- in a real browser -----------------------------------------------------------------------


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    """Debian's headless Chromium, launched once for this module (a fresh context per test)."""
    if not shutil.which(CHROMIUM):
        pytest.skip(
            f"no browser: {CHROMIUM} is missing (`make setup` installs Debian's chromium with apt-get)"
        )
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=_LAUNCH_FLAGS
        )
        yield launched
        await launched.close()


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    """A page in a fresh context that records every address it asks for and every console error."""
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    tab = await context.new_page()
    tab.requested = []  # type: ignore[attr-defined]
    tab.errors = []  # type: ignore[attr-defined]
    tab.on("request", lambda r: tab.requested.append(r.url))  # type: ignore[attr-defined]
    tab.on("console", lambda m: m.type == "error" and tab.errors.append(m.text))  # type: ignore[attr-defined]
    tab.on("pageerror", lambda e: tab.errors.append(str(e)))  # type: ignore[attr-defined]
    yield tab
    await context.close()


def outside(requested: list[str]) -> list[str]:
    """The addresses asked for that are neither on this machine nor inline data."""
    return [
        url
        for url in requested
        if urlsplit(url).scheme not in ("data", "blob") and urlsplit(url).hostname not in _LOCAL_HOSTS
    ]


async def test_console_in_a_browser_shows_the_trigger_created_by_the_test(
    http: aiohttp.ClientSession, gateway_url: str, page: Page, tmp_path: Path
) -> None:
    """Token in, the table shows the new trigger's row (DOM and screenshot), its page shows record and
    history, and nothing was asked of any host but the sidecar."""
    name = unique("browser")
    await create(
        http, gateway_url, "stream", stream_request(name, f"{name}.in", f"{name}.out", collection="shown")
    )

    await page.goto(f"{gateway_url}/console")
    await page.fill("#token", token())
    await page.click("#auth button[type=submit]")
    row = page.locator(f'#triggers tbody tr[data-subject="ms.trigger.stream.{name}"]')
    await row.wait_for(timeout=10_000)
    cells = await row.locator("td").all_inner_texts()
    assert cells[:4] == [f"ms.trigger.stream.{name}", "stream", "shown", "yes"]
    assert cells[6] == f"{name}.in → {name}.out"

    shot = tmp_path / "console.png"
    await page.screenshot(path=str(shot), full_page=True)
    box = await row.bounding_box()
    assert box is not None
    image = Image.open(io.BytesIO(shot.read_bytes())).convert("RGB")
    region = image.crop(
        (int(box["x"]), int(box["y"]), int(box["x"] + box["width"]), int(box["y"] + box["height"]))
    )
    colours = region.getcolors(maxcolors=1 << 16)
    assert colours is not None
    assert len(colours) > 8, "the row's region of the screenshot is blank"
    background = max(colours)[1]
    inked = sum(count for count, colour in colours if sum(colour) < sum(background) - 200)
    assert inked > 50, "no text drawn in the row's region"

    await row.click()
    await page.locator("#detail-title", has_text=f"ms.trigger.stream.{name}").wait_for(timeout=10_000)
    assert f'"name": "{name}"' in await page.inner_text("#record")
    assert await page.locator("#history tbody tr td:nth-child(3)").all_inner_texts() == ["created"]
    assert outside(page.requested) == []  # type: ignore[attr-defined]
    assert page.errors == []  # type: ignore[attr-defined]


async def test_console_in_a_browser_refreshes_itself(
    http: aiohttp.ClientSession, gateway_url: str, page: Page
) -> None:
    """A trigger created after the page loaded appears without any click (the page polls every 5 s)."""
    collection = unique("c")
    await page.goto(f"{gateway_url}/console")
    await page.fill("#collection", collection)
    await page.fill("#token", token())
    await page.click("#auth button[type=submit]")
    await page.locator("#empty").wait_for(state="visible", timeout=10_000)
    name = unique("later")
    await create(
        http, gateway_url, "stream", stream_request(name, f"{name}.in", f"{name}.out", collection=collection)
    )
    await page.locator(f'#triggers tbody tr[data-subject="ms.trigger.stream.{name}"]').wait_for(
        timeout=15_000
    )


async def test_docs_in_a_browser_render_every_operation_and_try_one_with_the_token(
    http: aiohttp.ClientSession, gateway_url: str, page: Page
) -> None:
    """Swagger UI renders the served /openapi.json offline; Authorize takes the bearer token and a
    tried operation's request carries it (the reply is 200)."""
    async with http.get(f"{gateway_url}/openapi.json") as response:
        spec = await response.json()
    operations = sum(len(item) for item in spec["paths"].values())

    await page.goto(f"{gateway_url}/docs")
    await page.locator(".opblock").first.wait_for(timeout=20_000)
    assert await page.locator(".opblock").count() == operations
    assert (await page.locator(".info .title").first.inner_text()).startswith("Trigger Service")

    await page.click("button.authorize")
    await page.fill(".modal-ux input[type=text], .modal-ux input[type=password]", token())
    await page.click(".modal-ux button.authorize")
    await page.click(".modal-ux button.btn-done")

    block = page.locator("#operations-default-list")
    await block.locator(".opblock-summary").click()
    # the page opens every operation ready to try (tryItOutEnabled)
    await block.locator('tr[data-param-name="subject_pattern"] input').fill("ms.trigger.>")
    await block.locator("button.execute").click()
    status = block.locator(".live-responses-table .response .response-col_status").first
    await status.wait_for(timeout=10_000)
    assert (await status.inner_text()).strip() == "200"

    assert outside(page.requested) == []  # type: ignore[attr-defined]
    assert page.errors == []  # type: ignore[attr-defined]
