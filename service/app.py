"""Start-up and shutdown of the Trigger Service process."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from typing import Any

import nats
import structlog
from nats.aio.client import Client

from service import log
from service.auth import Authenticator
from service.config import Settings
from service.graph import RouteGraph
from service.handlers import Carrier, Context
from service.routing import Api
from service.store import Observer, TriggerStore

_log = log.get("app")


async def connect(settings: Settings, name: str) -> Client:
    """A NATS connection that keeps reconnecting for as long as the process lives."""

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


def make_carrier(settings: Settings, store: TriggerStore, observe: Observer) -> Carrier:
    """The data plane chosen by configuration; it shows each change it follows to `observe` too."""
    if settings.routing == "accounts":
        from service.accounts.carrier import AccountsCarrier

        return AccountsCarrier(settings, store, observe)
    from service.streams import SubscriptionCarrier

    return SubscriptionCarrier(settings, store, connect, observe)


@contextlib.asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[Api]:
    """The service, from connect to drained connection."""
    async with contextlib.AsyncExitStack() as stack:
        nc = await connect(settings, "trigger-service")
        stack.push_async_callback(nc.drain)
        store = await TriggerStore.open(nc, settings.bucket, settings.replicas)
        graph = RouteGraph(single=settings.routing == "single")  # fed by the carrier's one bucket watch
        carrier = make_carrier(settings, store, graph.observe)
        if isinstance(carrier, contextlib.AbstractAsyncContextManager):
            await stack.enter_async_context(carrier)  # loads every live trigger before serving
        api = Api(nc, Context(settings, store, graph, carrier), Authenticator(settings))
        await api.start()
        stack.push_async_callback(api.stop)
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
