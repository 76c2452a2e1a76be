"""HTTP fixtures: the sidecar in-process on a free port, an HTTP client, and a request helper.

Use the fixtures in a test module by binding them there (pytest finds fixtures by module name,
and a plain import would trip ruff's F811 on every test that takes them as arguments):

    from tests import http_fixtures
    gateway_url, http = http_fixtures.gateway_url, http_fixtures.http
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgspec
import pytest
from multidict import CIMultiDict

from service.config import Settings
from service.gateway.app import running_gateway
from service.routing import Api
from tests.support import token


def on_free_port(settings: Settings, **changes: Any) -> Settings:
    """The same settings, with the sidecar on a free loopback port (and any other changes)."""
    return msgspec.structs.replace(settings, http_addr="127.0.0.1:0", **changes)


@pytest.fixture
async def gateway_url(settings: Settings, service: Api) -> AsyncIterator[str]:
    """Base URL of a sidecar (in this event loop) in front of the test's Trigger Service."""
    async with running_gateway(on_free_port(settings)) as url:
        yield url


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP client."""
    async with aiohttp.ClientSession() as session:
        yield session


@dataclass(frozen=True)
class HttpReply:
    """What an HTTP caller sees: status, headers (case-insensitive) and the decoded JSON envelope."""

    status: int
    headers: CIMultiDict[str]
    envelope: Any

    @property
    def body(self) -> Any:
        """The envelope's `body`, if any."""
        return self.envelope.get("body") if isinstance(self.envelope, dict) else None


async def call(
    http: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    account: str | None = "acme",
    headers: dict[str, str] | None = None,
    **kwargs: Any,
) -> HttpReply:
    """One HTTP request with a bearer token for `account` (none when None); the reply decoded."""
    sent = {"Authorization": f"Bearer {token(account)}"} if account is not None else {}
    sent.update(headers or {})
    async with http.request(method, url, headers=sent, **kwargs) as response:
        data = await response.read()
        envelope = msgspec.json.decode(data) if response.content_type == "application/json" else data
        return HttpReply(response.status, CIMultiDict(response.headers), envelope)
