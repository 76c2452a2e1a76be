"""Gateway triggers: the sidecar's dynamic HTTP routes, followed from the bucket, forwarded over NATS.

Each live gateway trigger is one `Route`, keyed by (method, canonical path): a request's path is
looked up in the same canonical form (service.paths) that the route was claimed in, so every
spelling of one URL reaches the one route that holds it. An HTTP request on it becomes a NATS
request to the trigger's mapping subject: the body is the payload, the method, path and raw query
string travel as `Http-*` headers next to the request's own end-to-end headers, and the reply
becomes the HTTP response.
"""

from __future__ import annotations

import contextlib
import functools
import math
import random
import re
import time
from collections.abc import Callable
from types import TracebackType

import msgspec
import nats.errors
from aiohttp import web
from multidict import CIMultiDictProxy
from nats.aio.client import Client

from schemas.triggers import ErrorReply, GatewayTrigger
from service import log, paths, requests
from service.auth import DEFAULT_ACCOUNT, Authenticator, bearer_token
from service.config import Settings
from service.errors import (
    ApiError,
    BadGateway,
    BadRequest,
    GatewayTimeout,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    TooManyRequests,
    Unauthorized,
    Unavailable,
)
from service.gateway.api import TRACE, malformed_body, not_connected
from service.gateway.ratelimit import SlidingWindow
from service.gateway.tokens import VerifiedTokens
from service.metrics import GatewayRouteMetrics, SidecarMetrics
from service.store import Change, TriggerStore, split_key

KEY_PATTERN = "*.gateway.*"
# Never forwarded: hop-by-hop headers (RFC 9110 section 7.6.1), and the header the gateway sets
# itself, so that a caller cannot forge it; so is every `Http-*` header (_FORGED_PREFIX), the
# gateway's own namespace.
_DROPPED = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "trigger-account",
        "traceparent",  # sent as the gateway's own span, from the validated incoming context
        "tracestate",
    }
)
_FORGED_PREFIX = "http-"
# What aiohttp can send as a header value (RFC 9110 section 5.5: no control character but tab).
_HEADER_VALUE = re.compile(r"[^\x00-\x08\x0a-\x1f\x7f]*")
_JSON_OBJECT_START = frozenset(b"{ \t\r\n")
_RESERVED_HEADERS_CHARS = 200  # the Http-* and Trigger-Account headers, without path and query
_NATS_HEADER_OVERHEAD = len(b"NATS/1.0\r\n\r\n")

_log = log.get("gateway")
_encode = msgspec.json.Encoder().encode


class _Envelope(msgspec.Struct):
    """The one field of the platform's reply envelope that the gateway reads."""

    status_code: int | None = None


_decode_envelope = msgspec.json.Decoder(_Envelope).decode


class Route:
    """One live gateway trigger, with everything the hot path needs computed once."""

    __slots__ = (
        "_counts",
        "_resolve",
        "enabled",
        "is_public",
        "key",
        "limit",
        "limiter",
        "method",
        "path",
        "revision",
        "subject",
        "subjects",
        "timeout",
    )

    def __init__(
        self,
        key: str,
        revision: int,
        trigger: GatewayTrigger,
        path: str,
        counts: Callable[[], GatewayRouteMetrics],
    ) -> None:
        mapping = trigger.gateway_mapping
        # The route's series (9 labelled children, a histogram among them) are made at its first
        # request: made for every route loaded, they were most of the sidecar's start-up and memory.
        self._resolve = counts
        self._counts: GatewayRouteMetrics | None = None
        self.key = key
        self.revision = revision
        self.method = mapping.method
        self.path = path  # canonical
        self.enabled = trigger.enabled
        self.is_public = mapping.is_public
        self.timeout = mapping.timeout / 1000
        self.subject = trigger.gateway_mapping_subject
        # One entry per percentage point, so picking a version by weight is one index.
        self.subjects: tuple[str, ...] | None = None
        if mapping.traffic_distribution:
            table = tuple(
                f"{self.subject}.{version}"
                for version, percent in mapping.traffic_distribution.items()
                for _ in range(percent)
            )
            self.subjects = table or None
        self.limit = (mapping.limit.request, mapping.limit.time) if mapping.limit is not None else None
        self.limiter: SlidingWindow | None = None
        if mapping.limit is not None:
            self.limiter = SlidingWindow(mapping.limit.request, mapping.limit.time / 1000)

    @property
    def counts(self) -> GatewayRouteMetrics:
        """The route's metric series."""
        counts = self._counts
        if counts is None:
            counts = self._counts = self._resolve()
        return counts

    def pick_subject(self) -> str:
        """The subject of the next request: the mapping subject, or a version chosen by weight."""
        table = self.subjects
        if table is None:
            return self.subject
        return table[int(random.random() * len(table))]


class GatewayRoutes:
    """Serves every live gateway trigger's METHOD path; follows the bucket."""

    def __init__(
        self, settings: Settings, nc: Client, store: TriggerStore, metrics: SidecarMetrics | None = None
    ) -> None:
        self.metrics = metrics or SidecarMetrics()
        self.metrics.live_routes("gateway", lambda: len(self._routes))
        self._nc = nc
        self._store = store
        self._auth = Authenticator(settings)
        self._tokens = VerifiedTokens(self._auth)
        self._routes: dict[tuple[str, str], Route] = {}
        self._by_key: dict[str, Route] = {}
        self._methods: dict[str, set[str]] = {}  # path -> methods served, for 405 and `Allow`
        self._following = contextlib.AsyncExitStack()

    async def __aenter__(self) -> GatewayRoutes:
        """Load every live gateway trigger, then follow the bucket's changes."""
        self.follower = await self._following.enter_async_context(
            self._store.following(KEY_PATTERN, [self._apply])
        )
        _log.info("routes loaded", routes=len(self._routes), bucket=self._store.bucket)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Stop following the bucket."""
        await self._following.aclose()

    # --- following the bucket ----------------------------------------------------------------

    async def _apply(self, change: Change) -> None:
        record = change.record
        if not isinstance(record, GatewayTrigger):
            self._remove(change.key)
            self.metrics.forget(change.key)
            return
        current = self._by_key.get(change.key)
        if current is not None and current.revision >= change.revision:
            return  # the same revision again (a restarted watch), or an older one
        # Stored in canonical form since paths have one; a record from before is read in it too.
        path = paths.canonical_or_none(record.gateway_mapping.path)
        if path is None:
            self._remove(change.key)
            _log.warning("route has no canonical path: not served", key=change.key,
                         path=record.gateway_mapping.path)  # fmt: skip
            return
        route = Route(
            change.key,
            change.revision,
            record,
            path,
            functools.partial(self.metrics.gateway_route, change.key),
        )
        if current is not None and current.limit == route.limit:
            route.limiter = current.limiter  # an update that keeps the limit keeps its window
        # No await from here on: the table changes at once, so no request sees the route missing
        # (an update is never a 404) or half changed.
        self._remove(change.key)
        self._by_key[route.key] = route
        self._serve(route)
        _log.debug("route added", key=route.key, method=route.method, path=route.path)

    def _serve(self, route: Route) -> None:
        """Serve `route` unless an earlier trigger serves its method and path.

        Claims make one route one trigger; two can only meet here when records stored before paths
        were canonical spell one route twice, and then the earlier one keeps it.
        """
        held = self._routes.get((route.method, route.path))
        if held is not None and held.revision < route.revision:
            _log.warning("route already served by an earlier trigger", key=route.key, by=held.key,
                         method=route.method, path=route.path)  # fmt: skip
            return
        self._routes[route.method, route.path] = route
        self._methods.setdefault(route.path, set()).add(route.method)

    def _remove(self, key: str) -> None:
        route = self._by_key.pop(key, None)
        if route is None:
            return
        if self._routes.get((route.method, route.path)) is route:
            del self._routes[route.method, route.path]
            methods = self._methods.get(route.path)
            if methods is not None:
                methods.discard(route.method)
                if not methods:
                    del self._methods[route.path]
            waiting = [r for r in self._by_key.values() if (r.method, r.path) == (route.method, route.path)]
            if waiting:  # a trigger the removed one kept from the route (see _serve)
                self._serve(min(waiting, key=lambda r: r.revision))
        _log.debug("route removed", key=key, method=route.method, path=route.path)

    # --- serving -----------------------------------------------------------------------------

    def route_for(self, method: str, raw_path: str) -> Route | None:
        """The live route that serves `method` on a request's path as sent, if any."""
        path = paths.canonical_or_none(raw_path)
        return self._routes.get((method, path)) if path is not None else None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Serve one HTTP request on a gateway trigger's route, or 404."""
        # The path as sent, in the canonical form routes are stored and claimed in; one without a
        # canonical form (`%2F`, a `%` that starts no escape) is no route's.
        path = paths.canonical_or_none(request.rel_url.raw_path)
        route = self._routes.get((request.method, path)) if path is not None else None
        if route is None:
            return self._no_route(request, path)
        return await self.serve(request, route)

    async def serve(self, request: web.Request, route: Route) -> web.StreamResponse:
        """Serve one HTTP request on `route` (the one `route_for` names for it)."""
        started = time.perf_counter()
        response = await self._forward(request, route)
        route.counts.answered(response.status, time.perf_counter() - started)
        return response

    async def _forward(self, request: web.Request, route: Route) -> web.Response:
        """The answer of a gateway trigger's route: refused here, or the forward's reply."""
        method = request.method
        headers = request.headers
        account: str | None = None
        if self._auth.enabled:
            token = bearer_token(headers)
            if token is not None:
                try:
                    account = self._tokens.account(token)
                except Unauthorized as exc:
                    if not route.is_public:
                        return _error(exc, _CHALLENGE)
            elif not route.is_public:
                return _error(Unauthorized("missing bearer token (Authorization: Bearer <jwt>)"), _CHALLENGE)
        else:
            account = DEFAULT_ACCOUNT

        if not route.enabled:  # it keeps its route (and claim) while disabled
            name = split_key(route.key)[2]
            return _error(Unavailable(f"gateway trigger {name!r} for {method} {route.path} is disabled"))

        if down := not_connected(self._nc):  # at once, not after the route's timeout
            return _error(down)

        limiter = route.limiter
        if limiter is not None:
            wait = limiter.acquire(time.monotonic())
            if wait:
                route.counts.rate_limited.inc()
                retry_after = str(max(1, math.ceil(wait)))
                return _error(
                    TooManyRequests(f"rate limit of {method} {route.path} reached; retry in {retry_after} s"),
                    {"Retry-After": retry_after},
                )

        max_payload = self._nc.max_payload
        length = request.content_length
        if length is not None and length > max_payload:
            return _too_large(max_payload)
        try:
            body = await _read_body(request, max_payload) if request.body_exists else b""
        except web.RequestPayloadError:
            return _error(malformed_body())
        if body is None:
            return _too_large(max_payload)

        forwarded = _forwarded_headers(headers)
        if forwarded is None:
            return _error(BadRequest("header values must be UTF-8 to travel over NATS"))
        out, chars = forwarded
        query = request.rel_url.raw_query_string
        out["Http-Method"] = method
        out["Http-Path"] = route.path
        out["Http-Query"] = query
        if account is not None:
            out["Trigger-Account"] = account
        # Headers count against the max payload too, and the server drops the connection of a
        # client that sends more, so measure them exactly whenever a bound says they might not fit.
        chars += _RESERVED_HEADERS_CHARS + len(route.path) + len(query)
        if len(body) + 4 * chars > max_payload and len(body) + _header_size(out) > max_payload:
            return _too_large(max_payload)

        subject = route.pick_subject()
        with request[TRACE].child(
            f"forward {method} {route.path}", {"messaging.destination.name": subject}
        ) as trace:
            out.update(trace.headers())
            try:
                reply = await requests.request(self._nc, subject, body, wait=route.timeout, headers=out)
            except nats.errors.NoRespondersError:
                route.counts.no_responders.inc()
                return _error(Unavailable(f"no responder for {method} {route.path}"))
            except nats.errors.TimeoutError:
                if down := not_connected(self._nc):  # the connection dropped while we waited
                    return _error(down)
                route.counts.timeouts.inc()
                return _error(
                    GatewayTimeout(f"no reply for {method} {route.path} within {route.timeout:g} s")
                )
            except nats.errors.MaxPayloadError:
                return _too_large(max_payload)
            except nats.errors.Error:  # closed, draining, reconnecting, outbound buffer full, ...
                return _error(not_connected(self._nc) or Unavailable("not connected to NATS"))
        return _response(reply.data, reply.headers)

    def _no_route(self, request: web.Request, path: str | None) -> web.Response:
        methods = self._methods.get(path) if path is not None else None
        sent = request.rel_url.raw_path
        if methods:
            allow = ", ".join(sorted(methods))
            return _error(MethodNotAllowed(f"{sent} accepts {allow}"), {"Allow": allow})
        return _error(NotFound(f"no gateway route for {request.method} {sent}"))


_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def _forwarded_headers(headers: CIMultiDictProxy[str]) -> tuple[dict[str, str], int] | None:
    """The request's end-to-end headers and their length in characters; None when one is not UTF-8.

    Repeated headers are joined with ', ' (RFC 9110 section 5.3).
    """
    dropped = _DROPPED
    connection = headers.get("Connection")
    if connection:
        dropped = dropped | {token.strip().lower() for token in connection.split(",")}
    out: dict[str, str] = {}
    chars = 0
    for name, value in headers.items():
        lowered = name.lower()
        if lowered in dropped or lowered.startswith(_FORGED_PREFIX):
            continue
        if not value.isascii() and not _is_utf8(value):
            return None
        chars += len(name) + len(value) + 6
        previous = out.get(name)
        out[name] = value if previous is None else f"{previous}, {value}"
    return out, chars


def _is_utf8(value: str) -> bool:
    """False for a value holding bytes that were not UTF-8 (decoded by aiohttp as surrogates)."""
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def _header_size(headers: dict[str, str]) -> int:
    """Bytes the headers take in a NATS message (they count against the max payload)."""
    return _NATS_HEADER_OVERHEAD + sum(len(k.encode()) + len(v.encode()) + 4 for k, v in headers.items())


async def _read_body(request: web.Request, limit: int) -> bytes | None:
    """The whole request body, or None when it is longer than `limit`."""
    if request.content_length is not None:  # already checked against `limit`
        return await request.content.read()
    chunks = bytearray()
    async for chunk in request.content.iter_any():
        chunks += chunk
        if len(chunks) > limit:
            return None
    return bytes(chunks)


def _response(data: bytes, headers: dict[str, str] | None) -> web.Response:
    """The HTTP response for a NATS reply: an envelope's status, or 200 with the reply's content
    type; 502 for a reply that cannot be one (an interim status, a content type HTTP cannot carry)."""
    if data and data[0] in _JSON_OBJECT_START:
        try:
            status = _decode_envelope(data).status_code
        except msgspec.MsgspecError:
            status = None
        if status is not None and 100 <= status <= 599:
            if status < 200:  # an interim status is no answer: the caller would wait for a final one
                return _error(
                    BadGateway(f"the responder answered the interim status {status} (a reply needs 200-599)")
                )
            return web.Response(body=data, status=status, headers={"Content-Type": "application/json"})
    content_type = None
    if headers:
        content_type = headers.get("Content-Type")
        if content_type is None:
            content_type = next((v for k, v in headers.items() if k.lower() == "content-type"), None)
    if content_type is not None and not _HEADER_VALUE.fullmatch(content_type):
        return _error(
            BadGateway("the responder's Content-Type holds a control character, which HTTP cannot carry")
        )
    return web.Response(body=data, headers={"Content-Type": content_type or "application/octet-stream"})


def _too_large(max_payload: int) -> web.Response:
    return _error(PayloadTooLarge(f"request body over the NATS max payload of {max_payload} bytes"))


def _error(exc: ApiError, headers: dict[str, str] | None = None) -> web.Response:
    """An error envelope with its status."""
    body = _encode(ErrorReply(error=exc.message, status_code=exc.status))
    response = web.Response(body=body, status=exc.status, headers=headers)
    response.headers["Content-Type"] = "application/json"
    return response
