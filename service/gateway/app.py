"""Start-up and shutdown of the HTTP sidecar: the static API routes, then the gateway triggers' routes.

Every answer is an envelope, whoever makes it: the routes, the access-log middleware for what a
route raises or fails to send, and the connection handler (`_Connection`) for what aiohttp's HTTP
parser refuses before any route sees the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import time
import typing
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import hdrs, web, web_protocol
from aiohttp.http import HttpVersion11
from aiohttp.http_exceptions import (
    BadHttpMethod,
    BadStatusLine,
    HttpProcessingError,
    InvalidURLError,
    LineTooLong,
)
from aiohttp.web_request import BaseRequest

from service import errors, log, metrics, tracing
from service.app import connect_supported, open_store, run_until_signalled
from service.auth import Authenticator
from service.config import Settings
from service.connections import finish
from service.errors import (
    ApiError,
    BadRequest,
    ExpectationFailed,
    GatewayTimeout,
    HeaderFieldsTooLarge,
    Internal,
    MethodNotImplemented,
    UriTooLong,
)
from service.gateway.api import (
    MAX_BODY,
    REQUEST_ID,
    TRACE,
    Handler,
    TriggerApi,
    error_response,
    malformed_body,
)
from service.gateway.console import Console
from service.gateway.forward import KEY_PATTERN, GatewayRoutes
from service.gateway.pages import add_pages
from service.gateway.traffic import RouteTraffic
from service.routing import REQUEST_ID_HEADER

_log = log.get("gateway")
_access_line = log.hot("gateway", "http")
_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")
_ENTITY_HEADERS = ("content-type", "content-length")
# A documented query (subject pattern and cursor of 1,024 characters each, percent-encoded UTF-8)
# can be 25 KB long: the request line limit must hold it.
MAX_REQUEST_LINE = 64 * 1024
# A header's name and its value, each: room for bearer tokens with many claims.
MAX_HEADER_FIELD = 16 * 1024
MAX_HEADERS = 128  # header lines of one request
# The envelope kind of the statuses aiohttp itself may raise.
_KINDS = {cls.status: cls.kind for cls in ApiError.__subclasses__() if cls.__module__ == errors.__name__}
_PRINTABLE = re.compile(r"[^\x20-\x7e]")
# How each connection is handled: no access log of aiohttp's (the middleware writes one line per
# request), and the parser's limits.
_CONNECTION: dict[str, Any] = {
    "access_log": None,
    "max_line_size": MAX_REQUEST_LINE,
    "max_field_size": MAX_HEADER_FIELD,
    "max_headers": MAX_HEADERS,
}
_METRICS = web.AppKey("metrics", metrics.SidecarMetrics)
_LOG_SAMPLE = web.AppKey("request_log_sample", float)
_GATEWAY_ROUTE = "/{tail}"  # the catch-all resource of the gateway triggers' routes
Lane = Callable[[web.Request], Awaitable[web.StreamResponse] | None]


def build_app(
    settings: Settings, api: TriggerApi, routes: GatewayRoutes, console: Console, max_body: int
) -> web.Application:
    """The aiohttp application: static routes first, then every other request to the gateway routes."""
    app = web.Application(middlewares=[_access_log], client_max_size=max_body)
    app[_METRICS], app[_LOG_SAMPLE] = routes.metrics, settings.request_log_sample
    api.add_routes(app.router, expect_handler=_expect_continue)
    # The caller's account's series (bearer token); Prometheus scrapes TRIGGER_METRICS_ADDR instead.
    auth = Authenticator(settings)
    app.router.add_get(
        "/metrics", metrics.handler(routes.metrics, lambda h: auth.authenticate(h, write=False).account)
    )
    add_pages(app.router, expect_handler=_expect_continue)
    console.add_routes(app.router, expect_handler=_expect_continue)
    app.router.add_route("*", "/{tail:.*}", console.observed(routes), expect_handler=_expect_continue)
    return app


@contextlib.asynccontextmanager
async def running_gateway(settings: Settings) -> AsyncIterator[str]:
    """The sidecar, from connect to drained connection; yields its base URL (port 0 picks a free port)."""
    async with contextlib.AsyncExitStack() as stack:
        nc = await connect_supported(settings, "trigger-gateway")
        stack.push_async_callback(finish, nc)
        store = await open_store(nc, settings)
        tracing.configure_from_environment()
        counts = metrics.SidecarMetrics()
        routes = await stack.enter_async_context(GatewayRoutes(settings, nc, store, counts))
        counts.follow_lag(
            KEY_PATTERN,
            lambda: routes.follower.position,
            lambda: store.js.horizon(store.prefix + KEY_PATTERN),
        )
        if settings.metrics_addr is not None:
            await stack.enter_async_context(metrics.listening(counts, settings.metrics_addr))
        # Read gateway bodies up to the server's max payload; the API routes stop at 1 MiB themselves.
        console = Console(settings, nc, RouteTraffic(), routes.metrics.registry)
        api = TriggerApi(settings, nc)
        app = build_app(settings, api, routes, console, max(MAX_BODY, nc.max_payload))
        runner = _Runner(app, fast_lane(api, routes, console, routes.metrics, settings.request_log_sample))
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        host, port = settings.http_addr.rsplit(":", 1)
        # With TRIGGER_HTTP_WORKERS > 1 every worker binds the same port (service.gateway.workers).
        await web.TCPSite(runner, host or None, int(port), reuse_port=settings.http_workers > 1).start()
        bound_port = runner.addresses[0][1]
        url = f"http://{host if host not in ('', '0.0.0.0') else '127.0.0.1'}:{bound_port}"
        _log.info("started", url=url, nats=nc.connected_url.netloc if nc.connected_url else None,
                  prefix=settings.prefix, bucket=settings.bucket)  # fmt: skip
        yield url


async def serve(settings: Settings) -> None:
    """Run until SIGINT or SIGTERM, then finish the requests in flight and return."""
    await run_until_signalled(running_gateway(settings), _log)


@web.middleware
async def _access_log(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id in and out, errors as envelopes, and one access-log line per request."""
    return await _served(
        request, handler, _route_of(request), request.app[_METRICS], request.app[_LOG_SAMPLE]
    )


def fast_lane(
    api: TriggerApi, routes: GatewayRoutes, console: Console, counts: metrics.SidecarMetrics, sample: float
) -> Lane:
    """The way of an API request and of a request on a live gateway trigger's route past the
    application's router and middleware chain (a tenth of such a request's CPU): answered as the
    access-log middleware answers (`_served`), by the API's handler or the console-observed
    route. None for every other request, and for one that expects something (the application
    answers `Expect`)."""

    def lane(request: web.Request) -> Awaitable[web.StreamResponse] | None:
        if hdrs.EXPECT in request.headers:
            return None
        api_route = api.route_for(request)
        if api_route is not None:
            template, handler = api_route
            return _served(request, handler, template, counts, sample)
        route = routes.route_for(request.method, request.rel_url.raw_path)
        if route is None:
            return None
        return _served(request, lambda r: console.serve(routes, r, route), "gateway", counts, sample)

    return lane


async def _served(
    request: web.Request, handler: Handler, route: str, counts: metrics.SidecarMetrics, sample: float
) -> web.StreamResponse:
    """`handler`'s answer with the request id in and out, errors as envelopes, the request's metrics
    under the `route` template, and one access-log line."""
    started = time.perf_counter()
    incoming = request.headers.get(REQUEST_ID_HEADER, "")
    request_id = incoming if _REQUEST_ID.fullmatch(incoming) else f"{random.getrandbits(128):032x}"
    request[REQUEST_ID] = request_id
    span = request[TRACE] = tracing.begin(f"HTTP {route}", tracing.parse(request.headers))
    counts.http_in_flight += 1
    response: web.StreamResponse | None = None
    bound = log.bind_request(request_id=request_id, trace_id=span.trace_id)
    try:
        response = await _answer(request, handler, request_id)
    finally:
        log.unbind_request(bound)
        counts.http_in_flight -= 1
        status = response.status if response is not None else 499  # the caller went away
        elapsed = time.perf_counter() - started
        counts.http_answered(route, status, elapsed)
        span.end(status)
    if response.status >= 400 or sample >= 1.0 or random.random() < sample:
        _access_line(
            method=request.method,
            path=request.path,
            status=response.status,
            duration_ms=round(elapsed * 1000, 3),
            request_id=request_id,
            trace_id=span.trace_id,
        )
    return response


def _route_of(request: web.Request) -> str:
    """The metrics label of a request: its route's template, `gateway` or `unmatched`; never the path."""
    resource = request.match_info.route.resource
    if resource is None:
        return "unmatched"
    canonical = resource.canonical
    return "gateway" if canonical == _GATEWAY_ROUTE else canonical


async def _answer(request: web.Request, handler: Handler, request_id: str) -> web.StreamResponse:
    """The request's answer, sent: the handler's, or an envelope for what it raised."""
    response: web.StreamResponse
    try:
        response = _unmet_expectation(request) or await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        kind = _KINDS.get(exc.status, exc.reason)
        kept = {k: v for k, v in exc.headers.items() if k.lower() not in _ENTITY_HEADERS}
        response = error_response(_Raised(exc.status, kind, exc.reason.lower()), headers=kept)
    except web.RequestPayloadError:  # the body turned out not to be HTTP part-way
        response = _closing(error_response(malformed_body()))
    except ConnectionError:
        raise  # the caller has gone: nothing to answer, nothing to log but at debug level
    except Exception:
        _log.exception("request failed", method=request.method, path=request.path)
        response = error_response(Internal("unable to process the request"))
    if not response.prepared:
        response.headers[REQUEST_ID_HEADER] = request_id
    response = await _send(request, response, request_id)
    return response


async def _send(request: web.Request, response: web.StreamResponse, request_id: str) -> web.StreamResponse:
    """Send the response here rather than after the middleware, so that a failure while sending it
    (a header value aiohttp refuses to write) is still answered with an envelope, as long as none
    of it was written."""
    try:
        await response.prepare(request)
        await response.write_eof()
    except ConnectionError:
        raise  # the caller has gone: nothing to answer
    except Exception:
        if request.writer.output_size:
            raise
        _log.exception("response failed", method=request.method, path=request.path, status=response.status)
        response = error_response(
            Internal("unable to send the response"), headers={REQUEST_ID_HEADER: request_id}
        )
        await response.prepare(request)
        await response.write_eof()
    return response


async def _expect_continue(request: web.Request) -> None:
    """`Expect: 100-continue` as aiohttp answers it; any other expectation is left to the
    middleware (`_unmet_expectation`), which answers it with an envelope."""
    if request.version == HttpVersion11 and request.headers.get(hdrs.EXPECT, "").lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the interim response is not the response


def _unmet_expectation(request: web.BaseRequest) -> web.Response | None:
    """417 for an `Expect` other than 100-continue (RFC 9110 section 10.1.1); HTTP/1.0 has none."""
    expect = request.headers.get(hdrs.EXPECT)
    if expect is None or request.version != HttpVersion11 or expect.lower() == "100-continue":
        return None
    detail = f"unknown expectation {_PRINTABLE.sub('?', expect[:64])!r} (only 100-continue is understood)"
    return _closing(error_response(ExpectationFailed(detail)))


def _closing(response: web.Response) -> web.Response:
    """The response, with the connection closed after it."""
    response.force_close()
    return response


def _refusal(exc: HttpProcessingError, line_limit: int, field_limit: int) -> ApiError:
    """What the HTTP parser refused, in the envelope's words and with the status that says it."""
    if isinstance(exc, LineTooLong):
        if exc.args[1:2] == (line_limit,):
            return UriTooLong(f"the request line is over {line_limit} bytes")
        return HeaderFieldsTooLarge(f"a header's name or value is over {field_limit} bytes")
    if exc.message == "Too many headers received":
        return HeaderFieldsTooLarge(f"more than {MAX_HEADERS} header lines")
    if isinstance(exc, BadHttpMethod):
        if "HTTPS" in exc.message:
            return BadRequest("HTTPS sent to a plain HTTP port")
        return MethodNotImplemented(
            "unknown HTTP method (methods are case-sensitive: GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS)"
        )
    reason = _PRINTABLE.sub("?", exc.message.split("\n", 1)[0].rstrip(": "))[:80]
    if isinstance(exc, BadStatusLine | InvalidURLError):
        return BadRequest(f"malformed request line ({reason}; bytes outside ASCII must be percent-encoded)")
    return BadRequest(f"malformed HTTP request ({reason})")


class _Connection(web_protocol.RequestHandler):
    """aiohttp's handler of one HTTP connection, with every answer of its own in the envelope.

    aiohttp answers what its parser refuses (and what escapes the application) itself, in plain
    text, before any route or middleware sees the request: `handle_error` is where it does.
    """

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """The envelope for a request aiohttp could not hand to the application, or that failed there."""
        if isinstance(exc, ConnectionError):
            raise exc  # the caller has gone (aiohttp closes the connection quietly)
        if request.writer.output_size > 0:
            raise ConnectionError("the response was sent in part; only closing the connection is left")
        request_id = f"{random.getrandbits(128):032x}"
        if isinstance(exc, HttpProcessingError):
            error = _refusal(exc, self.max_line_size, self.max_field_size)
        elif status == 504:
            error = GatewayTimeout("the request took too long")
        else:
            _log.error("request failed", exc_info=exc, request_id=request_id)
            error = Internal("unable to process the request")
        _log.info(
            "http", method=None, path=None, status=error.status, error=error.message, request_id=request_id
        )
        return _closing(error_response(error, headers={REQUEST_ID_HEADER: request_id}))

    def data_received(self, data: bytes) -> None:
        """Parse what came in; a request body the parser refuses part-way fails the body's reader.

        aiohttp 3.14's C parser, refusing the rest of a chunked body it already began to deliver,
        queues the refusal as if it were the next request and leaves the current body waiting for
        ever: the handler reading it would hang. So the current body fails instead (the handler
        answers 400), and the connection closes after that answer.
        """
        request, queued = self._current_request, len(self._messages)
        super().data_received(data)
        if request is None or len(self._messages) == queued:
            return
        if isinstance(self._messages[-1][0], web_protocol._ErrInfo) and not request.content.is_eof():
            request.content.set_exception(web.RequestPayloadError("the request body is not valid HTTP/1.1"))
            request.content.feed_eof()  # nothing more comes: no lingering read of the rest
            self.close()  # after this request's answer; the refusal queued behind it is dropped


class _Server(web.Server):
    """aiohttp's low-level server, making `_Connection`s; the fast lane first."""

    def __init__(self, app_server: web.Server, lane: Lane) -> None:
        handler = app_server.request_handler

        async def unmet_first(request: web.BaseRequest) -> web.StreamResponse:
            # aiohttp answers an unknown `Expect` itself, in text, for a request that matches no
            # route (CONNECT's authority form, `OPTIONS *`) before any middleware sees it.
            unrouted = request.method == "CONNECT" or not request.raw_path.startswith("/")
            if unrouted and (refused := _unmet_expectation(request)):
                return refused
            # The application's request factory made it: a web.Request without its match yet.
            served = None if unrouted else lane(typing.cast(web.Request, request))
            return await (served if served is not None else handler(request))

        super().__init__(unmet_first, request_factory=app_server.request_factory)

    def __call__(self) -> web_protocol.RequestHandler:
        """A handler for one new connection."""
        return _Connection(self, loop=asyncio.get_running_loop(), **_CONNECTION)


class _Runner(web.AppRunner):
    """An AppRunner whose connections answer in the envelope (`_Connection`), the fast lane first."""

    def __init__(self, app: web.Application, lane: Lane) -> None:
        super().__init__(app, handle_signals=False)
        self._lane = lane

    async def _make_server(self) -> web.Server:
        return _Server(await super()._make_server(), self._lane)  # the application's, started and frozen


class _Raised(ApiError):
    """An HTTP error that aiohttp raised, in the envelope's words."""

    def __init__(self, status: int, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.kind = status, kind
