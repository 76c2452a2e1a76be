"""Start-up and shutdown of the HTTP sidecar: the static API routes, then the gateway triggers' routes."""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import AsyncIterator

import structlog
from aiohttp import web

from service import log
from service.app import connect_supported, finish, open_store, run_until_signalled
from service.config import Settings
from service.errors import ApiError, Internal
from service.gateway.api import MAX_BODY, REQUEST_ID, Handler, TriggerApi, error_response
from service.gateway.forward import GatewayRoutes
from service.routing import REQUEST_ID_HEADER

_log = log.get("gateway")
_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")
_ENTITY_HEADERS = ("content-type", "content-length")
MAX_REQUEST_LINE = 64 * 1024
# The envelope kind of the statuses aiohttp itself may raise.
_KINDS = {cls.status: cls.kind for cls in ApiError.__subclasses__()}


def build_app(settings: Settings, api: TriggerApi, routes: GatewayRoutes, max_body: int) -> web.Application:
    """The aiohttp application: static routes first, then every other request to the gateway routes."""
    app = web.Application(middlewares=[_access_log], client_max_size=max_body)
    api.add_routes(app.router)
    app.router.add_route("*", "/{tail:.*}", routes.handle)
    return app


@contextlib.asynccontextmanager
async def running_gateway(settings: Settings) -> AsyncIterator[str]:
    """The sidecar, from connect to drained connection; yields its base URL (port 0 picks a free port)."""
    async with contextlib.AsyncExitStack() as stack:
        nc = await connect_supported(settings, "trigger-gateway")
        stack.push_async_callback(finish, nc)
        store = await open_store(nc, settings)
        routes = await stack.enter_async_context(GatewayRoutes(settings, nc, store))
        # Read gateway bodies up to the server's max payload; the API routes stop at 1 MiB themselves.
        app = build_app(settings, TriggerApi(settings, nc), routes, max(MAX_BODY, nc.max_payload))
        # A documented query (subject pattern and cursor of 1,024 characters each, percent-encoded
        # UTF-8) can be 25 KB long: the request line limit must hold it.
        runner = web.AppRunner(app, access_log=None, handle_signals=False, max_line_size=MAX_REQUEST_LINE)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        host, port = settings.http_addr.rsplit(":", 1)
        await web.TCPSite(runner, host or None, int(port)).start()
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
    started = time.perf_counter()
    incoming = request.headers.get(REQUEST_ID_HEADER, "")
    request_id = incoming if _REQUEST_ID.fullmatch(incoming) else os.urandom(16).hex()
    request[REQUEST_ID] = request_id
    response: web.StreamResponse
    with structlog.contextvars.bound_contextvars(request_id=request_id):
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            kind = _KINDS.get(exc.status, exc.reason)
            kept = {k: v for k, v in exc.headers.items() if k.lower() not in _ENTITY_HEADERS}
            response = error_response(_Raised(exc.status, kind, exc.reason.lower()), headers=kept)
        except Exception:
            _log.exception("request failed", method=request.method, path=request.path)
            response = error_response(Internal("unable to process the request"))
    if not response.prepared:
        response.headers[REQUEST_ID_HEADER] = request_id
    _log.info(
        "http",
        method=request.method,
        path=request.path,
        status=response.status,
        duration_ms=round((time.perf_counter() - started) * 1000, 3),
        request_id=request_id,
    )
    return response


class _Raised(ApiError):
    """An HTTP error that aiohttp raised, in the envelope's words."""

    def __init__(self, status: int, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.kind = status, kind
