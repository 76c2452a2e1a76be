"""A client of the Trigger API for the command line: the same operations over NATS or over HTTP.

Either transport sends the caller's bearer token and returns the envelope's body; an error
envelope becomes a `Refused` with its status and body (a stale revision is 412 over HTTP, 409 over
NATS). A service that cannot be reached is an `Unreachable`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any, Protocol

import aiohttp
import msgspec
import nats
import nats.errors
from nats.aio.client import Client

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode
LIST_LIMIT = 1000  # the most a list page may hold


class ClientError(Exception):
    """Anything that keeps an operation from getting an answer it can use."""


class Unreachable(ClientError):
    """The service did not answer: no connection, no responder, a timeout."""


class Refused(ClientError):
    """The service answered with an error envelope."""

    def __init__(self, status: int, error: str, body: Any = None) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.body = body


class _Transport(Protocol):
    async def call(
        self, op: str, tokens: tuple[str, ...], payload: Any, revision: int | None = None
    ) -> tuple[int, dict[str, Any]]:
        """Send one operation; return the status and the decoded envelope."""


class TriggerClient:
    """The Trigger API operations that `apply`, `plan` and `export` use."""

    def __init__(self, transport: _Transport, where: str) -> None:
        self._transport = transport
        self.where = where  # the service's address, for messages

    async def _call(
        self, op: str, tokens: tuple[str, ...], payload: Any = None, revision: int | None = None
    ) -> Any:
        status, envelope = await self._transport.call(op, tokens, payload, revision)
        if status >= 400:
            error = str(envelope.get("error") or f"status {status}")
            raise Refused(status, error, envelope.get("body"))
        return envelope.get("body")

    async def list_all(self, prefix: str, page: int = LIST_LIMIT) -> list[dict[str, Any]]:
        """Every live trigger of the caller's account, every page (of at most `page` records)."""
        records: list[dict[str, Any]] = []
        cursor: str | None = None
        while True:
            query: dict[str, Any] = {"subject_pattern": f"{prefix}.>", "limit": page}
            if cursor:
                query["cursor"] = cursor
            body = await self._call("list", (), query)
            records.extend(body.get("results") or [])
            cursor = body.get("next_cursor")
            if not cursor:
                return records

    async def get(self, trigger_type: str, name: str) -> dict[str, Any]:
        """One live trigger."""
        body: dict[str, Any] = await self._call("get", (trigger_type, name))
        return body

    async def create(self, trigger_type: str, request: dict[str, Any]) -> dict[str, Any]:
        """Create a trigger; its new record."""
        body: dict[str, Any] = await self._call("create", (trigger_type,), request)
        return body

    async def update(
        self, trigger_type: str, name: str, request: dict[str, Any], revision: int
    ) -> dict[str, Any]:
        """Replace a trigger's configuration if it is still at `revision`; its new record."""
        body: dict[str, Any] = await self._call("update", (trigger_type, name), request, revision)
        return body

    async def delete(self, trigger_type: str, name: str) -> None:
        """Delete a trigger."""
        await self._call("delete", (trigger_type, name))


class _Nats:
    """The operations as NATS requests on `<prefix>.<op>.<tokens>`."""

    def __init__(self, nc: Client, prefix: str, headers: dict[str, str], timeout: float) -> None:
        self._nc = nc
        self._prefix = prefix
        self._headers = headers
        self._timeout = timeout

    async def call(
        self, op: str, tokens: tuple[str, ...], payload: Any, revision: int | None = None
    ) -> tuple[int, dict[str, Any]]:
        subject = ".".join((self._prefix, op, *tokens))
        if revision is not None:
            payload = {**payload, "revision": revision}
        data = b"" if payload is None else _encode(payload)
        try:
            msg = await self._nc.request(subject, data, timeout=self._timeout, headers=self._headers or None)
        except nats.errors.NoRespondersError:
            raise Unreachable(
                f"no Trigger Service answers on {self._prefix}.{op} (is it running, is the prefix right?)"
            ) from None
        except nats.errors.TimeoutError:
            raise Unreachable(f"the Trigger Service did not answer {op} within {self._timeout:g} s") from None
        except nats.errors.Error as exc:
            raise Unreachable(f"NATS: {exc}") from None
        return _envelope(msg.data)


class _Http:
    """The operations as requests to the HTTP sidecar's `/trigger/...` routes."""

    def __init__(self, session: aiohttp.ClientSession, base: str, headers: dict[str, str]) -> None:
        self._session = session
        self._base = base.rstrip("/")
        self._headers = headers

    async def call(
        self, op: str, tokens: tuple[str, ...], payload: Any, revision: int | None = None
    ) -> tuple[int, dict[str, Any]]:
        headers = dict(self._headers)
        params: dict[str, str] | None = None
        data: bytes | None = None
        if op == "create":
            method, path, data = "POST", f"/trigger/{tokens[0]}", _encode(payload)
        elif op == "list":
            method, path = "GET", "/trigger/triggers"
            params = {key: str(value) for key, value in payload.items()}
        else:
            path = "/trigger/triggers/" + "/".join(tokens)
            method = {"get": "GET", "update": "PUT", "delete": "DELETE"}[op]
            if op == "update":
                data = _encode(payload)
                headers["If-Match"] = f'"{revision}"'
        if data is not None:
            headers["Content-Type"] = "application/json"
        try:
            async with self._session.request(
                method, self._base + path, params=params, data=data, headers=headers
            ) as response:
                body = await response.read()
                status = response.status
        except TimeoutError:
            raise Unreachable(f"{self._base} did not answer {method} {path} in time") from None
        except aiohttp.ClientError as exc:
            raise Unreachable(f"{self._base}: {exc}") from None
        try:
            return _envelope(body)
        except Unreachable:
            if status >= 400:  # not the API's envelope (a proxy's page, say): still an error
                return status, {"error": f"HTTP {status}", "status_code": status}
            raise


def _envelope(data: bytes) -> tuple[int, dict[str, Any]]:
    try:
        envelope = _decode(data)
    except msgspec.DecodeError:
        envelope = None
    if not isinstance(envelope, dict) or not isinstance(envelope.get("status_code"), int):
        raise Unreachable("the answer is not a Trigger API envelope")
    return envelope["status_code"], envelope


@contextlib.asynccontextmanager
async def connect(
    *,
    token: str | None,
    url: str | None = None,
    nats_url: str = "nats://127.0.0.1:4222",
    creds: str | None = None,
    prefix: str = "ms.trigger",
    request_timeout: float = 10.0,
) -> AsyncIterator[TriggerClient]:
    """A client over HTTP when `url` is given, else over NATS; closed on exit."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if url:
        session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=request_timeout))
        client = TriggerClient(_Http(session, url, headers), url)
        try:
            yield client
        finally:
            await session.close()
        return

    failures: list[Exception] = []

    async def remember(exc: Exception) -> None:  # reported once, below, rather than logged by nats-py
        failures.append(exc)

    try:
        # Each server is tried twice, half a second apart (nats-py counts the first try as a
        # reconnect); a connection lost later is not re-established: a run is short.
        nc = await nats.connect(
            servers=[server.strip() for server in nats_url.split(",") if server.strip()],
            user_credentials=creds or None,
            connect_timeout=request_timeout,
            max_reconnect_attempts=1,
            reconnect_time_wait=0.5,
            allow_reconnect=False,
            error_cb=remember,
        )
    except Exception as exc:  # nats-py raises several kinds (OSError, its own errors, timeouts)
        cause = failures[-1] if failures else exc
        reason = str(cause) or type(cause).__name__
        raise Unreachable(f"cannot connect to NATS at {nats_url}: {reason}") from None
    client = TriggerClient(_Nats(nc, prefix, headers, request_timeout), nats_url)
    try:
        yield client
    finally:
        with contextlib.suppress(Exception):
            await nc.drain()
