"""The Trigger API over HTTP: one static route per operation of the table, forwarded over NATS.

Nothing here interprets a request beyond what the subject needs: the service decodes, validates
and authenticates, and its envelope's `status_code` becomes the HTTP status. A request refused
here (a path parameter that is no subject token, a body over 1 MiB) is authenticated first, as
the service would, so that an anonymous caller learns nothing about its request.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Awaitable, Callable, Mapping

import msgspec
import nats.errors
from aiohttp import web
from nats.aio.client import Client

from schemas.openapi import HealthBody, HealthReply, document
from schemas.triggers import ErrorReply
from service import log, requests, tracing
from service.auth import Authenticator
from service.config import Settings
from service.errors import (
    ApiError,
    BadRequest,
    GatewayTimeout,
    Internal,
    MethodNotAllowed,
    PayloadTooLarge,
    Unavailable,
)
from service.routing import OPERATIONS, REQUEST_ID_HEADER, SERVICE_NAME, Operation

MAX_BODY = 1 << 20  # the contract's limit for an API request body (1 MiB)
REQUEST_ID = web.RequestKey("request_id", str)
TRACE = web.RequestKey("trace", tracing.Span)  # the request's span (or trace context), set by the middleware
JSON = "application/json"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ExpectHandler = Callable[[web.Request], Awaitable[web.StreamResponse | None]]

_log = log.get("gateway.api")
_encode = msgspec.json.Encoder().encode
_PATH_PARAM = re.compile(r"{(\w+)}")
# One NATS subject token: no separator, no wildcard, no whitespace or control character; short
# enough that the subject stays far below the server's control-line limit.
_TOKEN = re.compile(r"[^\s\x00-\x1f\x7f.*>]{1,256}")
_DIGITS = re.compile(r"[0-9]{1,18}")
_HEADER_TEXT = re.compile(r"[\x20-\x7e\t]{0,1024}")  # what a forwarded header value may hold
_PING_SUBJECT = f"$SRV.PING.{SERVICE_NAME}"
_HEADER_LINE = len(b"NATS/1.0\r\n\r\n")


class _Revision(msgspec.Struct):
    revision: int | None = None


class _Envelope(msgspec.Struct):
    status_code: int
    body: _Revision | None = None  # a record's revision becomes the ETag


class _Status(msgspec.Struct):
    status_code: int


class _Ping(msgspec.Struct):
    id: str
    version: str


_decode_envelope = msgspec.json.Decoder(_Envelope).decode
_decode_status = msgspec.json.Decoder(_Status).decode
_decode_ping = msgspec.json.Decoder(_Ping).decode


def not_connected(nc: Client) -> Unavailable | None:
    """A 503 while the NATS connection is down, else None.

    While nats-py reconnects it buffers a request and waits for the reply until the timeout, so
    every request would be a 504 that took the whole timeout; answering at once is kinder.
    """
    if nc.is_connected:
        return None
    return Unavailable("not connected to NATS" + (" (reconnecting)" if nc.is_reconnecting else ""))


def malformed_body() -> BadRequest:
    """The 400 for a request body the HTTP parser refused part-way (bad chunked encoding, a short body)."""
    return BadRequest("the request body is malformed (its chunked encoding or length is not valid HTTP/1.1)")


def error_response(error: ApiError, headers: Mapping[str, str] | None = None) -> web.Response:
    """The JSON envelope of an error, with its status."""
    body = _encode(ErrorReply(error=error.message, status_code=error.status))
    return web.Response(body=body, status=error.status, content_type=JSON, headers=headers)


class TriggerApi:
    """The static routes: the operation table, `/healthz` and `/openapi.json`."""

    def __init__(self, settings: Settings, nc: Client) -> None:
        self._settings = settings
        self._nc = nc
        self._auth = Authenticator(settings)
        self._openapi = _encode(document(settings.prefix))
        self._subjects = {op.name: f"{settings.prefix}.{op.subject}".split(".") for op in OPERATIONS}
        self._params = {op.name: _PATH_PARAM.findall(op.http_path) for op in OPERATIONS}
        # The routes `route_for` serves without the router: static paths, and by method the ones
        # that name one trigger.
        self._static = {(op.http_method, op.http_path): op for op in OPERATIONS if "{" not in op.http_path}
        self._by_name = {op.http_method: op for op in OPERATIONS if op.http_path.endswith("/{type}/{name}")}
        self._history = next(op for op in OPERATIONS if op.http_path.endswith("/{type}/{name}/history"))

    def add_routes(self, router: web.UrlDispatcher, expect_handler: ExpectHandler | None = None) -> None:
        """Register every static route; a known path with another method answers 405."""
        handlers: dict[str, dict[str, Handler]] = {
            "/healthz": {"GET": self.health},
            "/openapi.json": {"GET": self.openapi},
        }
        for op in OPERATIONS:
            handlers.setdefault(op.http_path, {})[op.http_method] = self._forwarder(op)
        for path, methods in handlers.items():
            # A parameter takes any characters but `/` (aiohttp's default also stops at `{` and
            # `}`, which sent such requests past the API to the gateway routes): the handlers
            # then refuse what is not a valid token, after authentication.
            resource = router.add_resource(_PATH_PARAM.sub(r"{\1:[^/]+}", path))
            for method, handler in methods.items():
                resource.add_route(method, handler, expect_handler=expect_handler)
            resource.add_route("*", _not_allowed(sorted(methods)), expect_handler=expect_handler)

    async def openapi(self, request: web.Request) -> web.Response:
        """The OpenAPI document."""
        return web.Response(body=self._openapi, content_type=JSON)

    async def health(self, request: web.Request) -> web.Response:
        """200 when connected to NATS and a Trigger Service instance answers a micro PING."""
        if down := not_connected(self._nc):
            return error_response(down)
        try:
            reply = await self._nc.request(
                _PING_SUBJECT, b"", timeout=min(2.0, self._settings.request_timeout)
            )
            ping = _decode_ping(reply.data)
        except nats.errors.NoRespondersError:
            return error_response(Unavailable("no Trigger Service instance is running"))
        except nats.errors.TimeoutError:
            return error_response(Unavailable("the Trigger Service did not answer its PING"))
        except (nats.errors.Error, msgspec.DecodeError, msgspec.ValidationError):
            return error_response(Unavailable("the Trigger Service PING failed"))
        body = HealthReply(body=HealthBody(status="ok", service_id=ping.id, service_version=ping.version))
        return web.Response(body=_encode(body), content_type=JSON)

    def route_for(self, request: web.Request) -> tuple[str, Handler] | None:
        """The route template and handler of an API request that needs no router: one of the
        operation table's routes, with a path that holds no percent-escape (so its parameters are
        what aiohttp's router would find); None for every other request (the application routes
        it, and answers its 404s and 405s)."""
        raw = request.rel_url.raw_path
        if not raw.startswith("/trigger/") or "%" in raw:
            return None
        method = request.method
        op = self._static.get((method, raw))
        if op is not None:
            return op.http_path, functools.partial(self._forward, op, {})
        parts = raw.split("/")  # "", "trigger", "triggers", type, name[, "history"]
        if len(parts) == 5 and parts[2] == "triggers":
            op = self._by_name.get(method)
        elif len(parts) == 6 and parts[2] == "triggers" and parts[5] == "history" and method == "GET":
            op = self._history
        if op is None or not parts[3] or not parts[4]:
            return None
        return op.http_path, functools.partial(self._forward, op, {"type": parts[3], "name": parts[4]})

    def _forwarder(self, op: Operation) -> Handler:
        subject = f"{self._settings.prefix}.{op.subject}"
        params = _PATH_PARAM.findall(op.http_path)
        if subject.count("*") != len(params):
            raise ValueError(f"{op.name}: {op.http_path} does not fill every `*` of {subject}")

        async def forward(request: web.Request) -> web.Response:
            return await self._forward(op, request.match_info, request)

        forward.__doc__ = f"{op.http_method} {op.http_path}: {op.summary}."
        return forward

    async def _forward(
        self, op: Operation, path_params: Mapping[str, str], request: web.Request
    ) -> web.Response:
        """One operation's request, forwarded over NATS, with the path's parameters."""
        try:
            try:
                tokens = iter([_token(name, path_params[name]) for name in self._params[op.name]])
                target = ".".join(next(tokens) if part == "*" else part for part in self._subjects[op.name])
                if_match = _if_match(request) if op.conditional else None
                payload = await self._payload(op, request)
            except ApiError:
                self._auth.authenticate(request.headers, write=op.write)  # 401 before the 400
                raise
            return await self._request(target, payload, request, if_match, op.etag)
        except ApiError as error:
            return error_response(error)

    async def _payload(self, op: Operation, request: web.Request) -> bytes:
        if (request.content_length or 0) > MAX_BODY:
            raise PayloadTooLarge(f"the request body is over {MAX_BODY} bytes")
        if op.from_subject:
            return b""
        if op.http_method == "GET":
            return _encode({key: _query_value(key, request.query.getall(key)) for key in request.query})
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise PayloadTooLarge(f"the request body is over {MAX_BODY} bytes") from None
        except web.RequestPayloadError:
            raise malformed_body() from None
        if len(body) > MAX_BODY:
            raise PayloadTooLarge(f"the request body is over {MAX_BODY} bytes")
        return body

    async def _request(
        self, subject: str, payload: bytes, request: web.Request, if_match: str | None, etag: bool
    ) -> web.Response:
        headers = {REQUEST_ID_HEADER: request[REQUEST_ID]}
        if authorization := request.headers.get("Authorization"):
            headers["Authorization"] = authorization
        if if_match is not None:
            headers["If-Match"] = if_match  # the service reads it, and answers a stale one 412
        if len(payload) + _headers_size(headers) > self._nc.max_payload:
            raise PayloadTooLarge(
                f"the request is over the NATS server's max payload ({self._nc.max_payload} bytes)"
            )
        if down := not_connected(self._nc):
            raise down
        timeout = self._settings.request_timeout
        try:
            with request[TRACE].child(
                "trigger API request", {"messaging.destination.name": subject}
            ) as trace:
                headers.update(trace.headers())
                reply = await requests.request(self._nc, subject, payload, wait=timeout, headers=headers)
        except nats.errors.NoRespondersError:
            raise Unavailable("no Trigger Service instance is running") from None
        except nats.errors.TimeoutError:
            if down := not_connected(self._nc):  # the connection dropped while we waited
                raise down from None
            raise GatewayTimeout(f"the Trigger Service did not answer within {timeout:g} s") from None
        except nats.errors.MaxPayloadError:
            raise PayloadTooLarge("the request is over the NATS server's max payload") from None
        except nats.errors.Error:
            raise Unavailable("not connected to NATS") from None
        revision = None
        try:
            if etag:
                envelope = _decode_envelope(reply.data)
                status = envelope.status_code
                revision = envelope.body.revision if envelope.body is not None else None
            else:
                status = _decode_status(reply.data).status_code
        except (msgspec.DecodeError, msgspec.ValidationError):
            status = 0
        if not 100 <= status <= 599:
            _log.error("reply is not an envelope", subject=subject, size=len(reply.data))
            raise Internal("the Trigger Service sent a reply that is not an envelope")
        response = web.Response(body=reply.data, status=status, content_type=JSON)
        if revision is not None and status < 300:
            response.headers["ETag"] = f'"{revision}"'
        return response


def _not_allowed(allowed: list[str]) -> Handler:
    async def not_allowed(request: web.Request) -> web.Response:
        error = MethodNotAllowed(f"{request.method} {request.path} (allowed: {', '.join(allowed)})")
        return error_response(error, headers={"Allow": ", ".join(allowed)})

    return not_allowed


def _token(name: str, value: str) -> str:
    """A path parameter that is one valid subject token, else a 400 before anything is sent."""
    if not _TOKEN.fullmatch(value):
        raise BadRequest(
            f"path parameter `{name}` must be one NATS subject token (1-256 characters, "
            "no '.', '*', '>', whitespace or control characters)"
        )
    return value


def _if_match(request: web.Request) -> str | None:
    """The request's `If-Match`, for the service to read; a 400 when NATS cannot carry it."""
    value = request.headers.get("If-Match")
    if value is not None and not _HEADER_TEXT.fullmatch(value):
        raise BadRequest(
            'header If-Match must be one entity tag as an ETag gave it ("<revision>"), or *, in '
            "printable ASCII"
        )
    return value


def _query_value(key: str, values: list[str]) -> object:
    """A query parameter as a JSON value: `limit` as an integer when it is digits, `enabled` as a
    boolean when it is `true` or `false`."""
    if len(values) > 1:
        return values  # the service says that it wants one value
    value = values[0]
    if key == "limit" and _DIGITS.fullmatch(value):
        return int(value)
    if key == "enabled" and value in ("true", "false"):
        return value == "true"
    return value


def _headers_size(headers: Mapping[str, str]) -> int:
    """Bytes the headers add to a NATS message (the server's max payload counts them)."""
    return _HEADER_LINE + sum(len(k) + len(v.encode()) + 4 for k, v in headers.items())
