"""`/docs` and `/console` as HTTP serves them: offline pages whose every asset comes from the sidecar."""

from __future__ import annotations

import re

import aiohttp
import pytest
from nats.aio.client import Client

from tests import http_fixtures
from tests.http_fixtures import call
from tests.support import PREFIX, gateway_request, request, unique

gateway_url, http = http_fixtures.gateway_url, http_fixtures.http

_ASSET = re.compile(r'(?:src|href)="([^"]+)"')
_OUTSIDE = re.compile(r"https?://|//[a-z]", re.IGNORECASE)
# What a style sheet would load: `url(...)` and `@import` of an absolute or scheme-relative address.
_CSS_OUTSIDE = re.compile(r"""(?:url\(\s*|@import\s+)["']?(?:https?:|//)""", re.IGNORECASE)


@pytest.mark.parametrize("page", ["/docs", "/console"])
async def test_page_and_every_asset_it_names_are_served_from_the_sidecar(
    http: aiohttp.ClientSession, gateway_url: str, page: str
) -> None:
    """The page names only relative assets, each served here; the policy lets nothing else load."""
    async with http.get(gateway_url + page) as response:
        assert response.status == 200
        assert response.content_type == "text/html"
        html = await response.text()
        policy = response.headers["Content-Security-Policy"]
    assert "default-src 'self'" in policy
    assert "connect-src 'self'" in policy
    assert not _OUTSIDE.search(html), "the page names an outside address"
    assets = [asset for asset in _ASSET.findall(html) if not asset.startswith("data:")]
    assert len(assets) >= 2
    for asset in assets:
        async with http.get(f"{gateway_url}/{asset}") as response:
            assert response.status == 200, asset
            assert response.content_type in ("text/css", "text/javascript"), asset
            text = await response.text()
        if asset.endswith(".css"):
            assert not _CSS_OUTSIDE.search(text), f"{asset} loads from an outside address"
        elif not asset.endswith("swagger-ui-bundle.js"):  # the bundle holds its libraries' doc links
            assert not _OUTSIDE.search(text), f"{asset} names an outside address"


async def test_docs_bundle_is_swagger_ui_5_which_reads_openapi_3_1(
    http: aiohttp.ClientSession, gateway_url: str
) -> None:
    async with http.get(f"{gateway_url}/docs/swagger-ui-bundle.js") as response:
        bundle = await response.text()
    assert re.search(r'PACKAGE_VERSION:"5\.', bundle)
    async with http.get(f"{gateway_url}/openapi.json") as response:
        spec = await response.json()
    assert spec["openapi"].startswith("3.1")
    assert spec["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
    }


@pytest.mark.parametrize("method", ["POST", "DELETE"])
@pytest.mark.parametrize("path", ["/docs", "/console/console.js", "/console/api/triggers"])
async def test_pages_answer_other_methods_405(
    http: aiohttp.ClientSession, gateway_url: str, path: str, method: str
) -> None:
    reply = await call(http, method, gateway_url + path)
    assert (reply.status, reply.headers["Allow"]) == (405, "GET, HEAD")
    assert reply.envelope["status_code"] == 405


@pytest.mark.parametrize(
    "path", ["/docs/swagger-ui.css", "/docs/x", "/console/api/triggers", "/console/", "/%64ocs/x"]
)
async def test_paths_under_docs_and_console_are_reserved(nc: Client, service: object, path: str) -> None:
    """The pages' assets and the console's data live under /docs/ and /console/: no route can take them."""
    reply = await request(nc, f"{PREFIX}.create.gateway", gateway_request(unique(), "GET", path))
    assert reply.status == 400, reply.envelope
    assert "reserved" in reply.envelope["error"]
