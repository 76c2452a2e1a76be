"""Start-up and shutdown of the Trigger Service process."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import nats
import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client

from service import log, metrics, natsproto, serverversion, tracing
from service.auth import Authenticator
from service.config import Settings
from service.connections import finish
from service.durable import DurableRoutes
from service.errors import Unavailable
from service.events import ChangeEvents
from service.graph import RouteGraph
from service.handlers import Carrier, Context
from service.routing import Api
from service.store import Observer, TriggerStore

_log = log.get("app")
T = TypeVar("T")
WAIT_FIRST, WAIT_MAX = 0.1, 2.0  # seconds between start-up attempts: doubling from the first to the most
# JetStream API errors that mean "not now" rather than "never" (nats-server's errors.json): no
# quorum or leader yet, a node of the placement down, JetStream not (yet) enabled.
_NOT_NOW = frozenset(
    {
        10004,  # incomplete results
        10005,  # no suitable peers for placement
        10007,  # JetStream cluster not assigned to this server
        10008,  # JetStream system temporarily unavailable
        10009,  # JetStream cluster can not handle request
        10023,  # insufficient resources
        10039,  # JetStream not enabled for account
        10076,  # JetStream not enabled
        10118,  # stream is offline
    }
)


async def connect(settings: Settings, name: str) -> Client:
    """A NATS connection that keeps reconnecting for as long as the process lives."""
    natsproto.apply()

    async def on_error(exc: Exception) -> None:
        _log.warning("NATS connection error; retrying", connection=name, error=str(exc) or repr(exc))

    options: dict[str, Any] = {
        "servers": settings.nats_url.split(","),
        "name": name,
        "error_cb": on_error,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5,
        "connect_timeout": 5,
    }
    if settings.nats_creds:
        options["user_credentials"] = settings.nats_creds
    return await nats.connect(**options)


async def connect_supported(settings: Settings, name: str) -> Client:
    """`connect`, then ServerTooOld (with the connection closed) unless the server is new enough."""
    nc = await connect(settings, name)
    url = nc.connected_url
    where = f"{url.scheme}://{url.hostname}:{url.port}" if url is not None else "the NATS server"
    try:
        serverversion.require(str(nc._server_info.get("version") or ""), where=where)
    except serverversion.ServerTooOld:
        await nc.close()
        raise
    return nc


def not_available_now(exc: BaseException) -> bool:
    """True for a failure that may pass by itself: JetStream or the bucket not answering yet."""
    if isinstance(exc, Unavailable | TimeoutError):
        return True
    if isinstance(exc, nats.js.errors.APIError):
        return isinstance(exc, nats.js.errors.ServiceUnavailableError) or exc.err_code in _NOT_NOW
    # Any other client error (no responders, reconnecting, ...) but a connection closed for good.
    return isinstance(exc, nats.errors.Error) and not isinstance(exc, nats.errors.ConnectionClosedError)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, nats.js.errors.APIError):
        if exc.description:
            return f"{exc.description} (error {exc.err_code})" if exc.err_code else exc.description
        if isinstance(exc, nats.js.errors.ServiceUnavailableError):
            return "JetStream is not answering (no JetStream server responded)"
    if isinstance(exc, Unavailable):
        return exc.detail
    return str(exc) or type(exc).__name__


async def wait_for(what: str, attempt: Callable[[], Awaitable[T]]) -> T:
    """`attempt()` until it succeeds, for as long as it fails with something `not_available_now`.

    Logs one warning per failed attempt, `waiting for <what>` with the reason; waits 0.1 s after
    the first failure, doubling up to 2 s. Cancelling (a signal during start-up) stops the wait.
    """
    delay = WAIT_FIRST
    while True:
        try:
            return await attempt()
        except Exception as exc:
            if not not_available_now(exc):
                raise
            _log.warning(f"waiting for {what}", reason=_reason(exc), retry_in=delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, WAIT_MAX)


def make_carrier(
    settings: Settings, store: TriggerStore, observe: Observer, counts: metrics.ServiceMetrics | None = None
) -> Carrier:
    """The data plane chosen by configuration; it shows each change it follows to `observe` too."""
    if settings.routing == "accounts":
        from service.accounts.carrier import AccountsCarrier

        return AccountsCarrier(settings, store, observe)
    from service.streams import SubscriptionCarrier

    return SubscriptionCarrier(settings, store, connect, observe, counts)


async def open_store(nc: Client, settings: Settings) -> TriggerStore:
    """The trigger bucket, waited for while JetStream cannot answer (no quorum, a leader election)."""
    return await wait_for(
        "the trigger bucket", lambda: TriggerStore.open(nc, settings.bucket, settings.replicas)
    )


@contextlib.asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[Api]:
    """The service, from connect to drained connection."""
    tracing.configure_from_environment()
    async with contextlib.AsyncExitStack() as stack:
        nc = await connect_supported(settings, "trigger-service")
        stack.push_async_callback(finish, nc)
        store = await open_store(nc, settings)
        stack.push_async_callback(store.close)  # lets writes still being settled finish first
        graph = RouteGraph(single=settings.routing == "single")  # fed by the carrier's one bucket watch
        counts = metrics.ServiceMetrics()
        # Durable stream triggers (in accounts mode through the relay account, service.relay) around
        # the carrier of the others: one watch of the stream triggers applies each change to both.
        carrier = DurableRoutes(
            settings, store, connect, make_carrier(settings, store, graph.observe, counts), counts
        )
        await stack.enter_async_context(carrier)  # loads every live trigger before serving
        follower = carrier.follower
        pattern = "*.stream.*"  # the keys both carriers follow
        counts.follow_lag(
            pattern, lambda: follower.position, lambda: store.js.horizon(store.prefix + pattern)
        )
        # Change events: entered after the carriers, so each event waits for the carrier to apply
        # its revision (and it stops before the carrier does); follows the bucket before serving.
        events = ChangeEvents(settings, store, follower)
        await wait_for("the change-events stream", events.open)
        await stack.enter_async_context(events)
        context = Context(settings, store, graph, carrier, delivery_stats=carrier.stats)
        api = Api(nc, context, Authenticator(settings), counts)
        await api.start()
        stack.push_async_callback(api.stop)
        if settings.metrics_addr is not None:
            api.metrics_port = await stack.enter_async_context(
                metrics.listening(counts, settings.metrics_addr)
            )
        _log.info(
            "started",
            nats=nc.connected_url.netloc if nc.connected_url else None,
            bucket=settings.bucket,
            prefix=settings.prefix,
            routing=settings.routing,
            auth=settings.auth,
        )
        yield api


def stop_signal() -> asyncio.Event:
    """An event that SIGINT or SIGTERM sets."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def run_until_signalled(
    process: contextlib.AbstractAsyncContextManager[object], logger: structlog.typing.FilteringBoundLogger
) -> None:
    """Run `process` until SIGINT or SIGTERM, then leave it (which drains it) and return.

    A signal during start-up (say, while NATS cannot be reached yet) abandons the start-up.
    """
    stop = stop_signal()
    async with contextlib.AsyncExitStack() as stack:
        starting = asyncio.create_task(stack.enter_async_context(process))
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
            logger.info("stopped before start-up completed")
            return
        stopping.cancel()
        starting.result()  # a failed start-up raises here
        await stop.wait()
        logger.info("stopping")
    logger.info("stopped")


async def serve(settings: Settings) -> None:
    """Run until SIGINT or SIGTERM, then drain in-flight requests and return."""
    await run_until_signalled(running(settings), _log)
