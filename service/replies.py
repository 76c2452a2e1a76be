"""Which connection a request's success reply goes out on.

A stream route is live at its 201: the route's SUB must reach the server before the requester
can see the reply. Instead of a flush (a PING/PONG round trip on the data connection) before
replying, the carrier writes the SUB to its data connection and asks for the reply to be sent
on that same connection, after it: the server processes one connection's protocol in order, so
by the time the reply is delivered the subscription is in place.

Each request runs in a task of its own (service.routing), so the choice is a context variable
set when the request's handling begins: it holds for that request and for no other, and code
that runs outside a request (a follower, a test) sees no request to answer.
"""

from __future__ import annotations

from contextvars import ContextVar

from nats.aio.client import Client
from nats.micro.request import Request


class _Reply:
    __slots__ = ("via",)

    def __init__(self) -> None:
        self.via: Client | None = None


_current: ContextVar[_Reply | None] = ContextVar("reply", default=None)


def begin() -> None:
    """A request is being handled in this context (service.routing, first thing in each task)."""
    _current.set(_Reply())


def send_on(connection: Client) -> bool:
    """Send the current request's success reply on `connection`, after what it has written so far;
    False when no request is being handled here (the caller must confirm at the server itself)."""
    reply = _current.get()
    if reply is None:
        return False
    reply.via = connection
    return True


async def respond(request: Request, body: bytes) -> None:
    """Send `body` as the reply to `request`: on the connection chosen with `send_on`, else on the
    connection the request came in on."""
    reply, inbox = _current.get(), request._msg.reply  # nats.micro has no public accessor of the inbox
    via = reply.via if reply is not None else None
    if via is not None and inbox and via.is_connected:
        await via.publish(inbox, body)
        return
    await request.respond(body)
