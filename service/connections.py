"""Ending a NATS connection at shutdown, whatever state NATS left it in."""

from __future__ import annotations

import contextlib

import nats.errors
from nats.aio.client import Client


async def finish(nc: Client) -> None:
    """Drain the connection (what is in flight completes); close it when it is not connected now,
    or when it is lost while draining.

    A shutdown must not fail because NATS went away: nats-py refuses to drain a connection that
    is reconnecting, and its close first writes what it buffered meanwhile onto the lost socket.
    """
    if nc.is_closed:
        return
    if not (nc.is_connecting or nc.is_reconnecting):
        try:
            await nc.drain()
            return
        except (nats.errors.Error, OSError):
            pass  # lost while draining: closed below
    with contextlib.suppress(nats.errors.Error, OSError):  # the connection is gone either way
        await nc.close()
