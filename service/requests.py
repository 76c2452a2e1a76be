"""NATS requests as nats-py makes them (one wildcard reply subscription per connection), cheaper.

nats-py's `Client.request` draws a random token from `secrets` (a system call) and waits with
`asyncio.wait_for` (a task) for every request: together a tenth of a create's CPU in the service
and of a gateway request's in the sidecar. Here a token is a counter under the connection's own
random inbox prefix, the wait is a timer on the reply's future (service.timers), and the reply sets
the future as the client parses it (service.subscriptions), a turn of the event loop sooner. The
errors are nats-py's: NoRespondersError, TimeoutError, and whatever a publish raises.
"""

from __future__ import annotations

import asyncio
import itertools
import weakref
from typing import Any

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from service import subscriptions, timers

_NO_RESPONDERS = "503"
_requesters: weakref.WeakKeyDictionary[Client, _Requester] = weakref.WeakKeyDictionary()


async def request(
    nc: Client,
    subject: str,
    payload: bytes = b"",
    wait: float = 0.5,
    headers: dict[str, Any] | None = None,
) -> Msg:
    """The reply to a request on `subject` within `wait` seconds, as `nc.request(...)` gives it."""
    requester = _requesters.get(nc)
    if requester is None:
        requester = _requesters[nc] = _Requester(nc)
    return await requester.request(subject, payload, wait, headers)


class _Requester:
    def __init__(self, nc: Client) -> None:
        self._nc = nc
        self._prefix = ""
        self._ready = False  # subscribed to the replies
        self._starting: asyncio.Future[None] | None = None
        self._tokens = itertools.count(1)
        self._waiting: dict[str, asyncio.Future[Msg]] = {}

    async def request(self, subject: str, payload: bytes, wait: float, headers: dict[str, Any] | None) -> Msg:
        nc = self._nc
        if nc.is_draining_pubs:
            raise nats.errors.ConnectionDrainingError
        if not self._ready:
            await self._start()
        token = str(next(self._tokens))
        reply: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()
        self._waiting[token] = reply
        timer = timers.fail_after(reply, wait, nats.errors.TimeoutError)
        try:
            await nc.publish(subject, payload, reply=self._prefix + token, headers=headers)
            msg = await reply
        finally:
            timer.cancel()
            self._waiting.pop(token, None)
        if msg.headers and msg.headers.get("Status") == _NO_RESPONDERS:
            raise nats.errors.NoRespondersError
        return msg

    async def _start(self) -> None:
        """Subscribe to the replies (once, whichever request comes first)."""
        if self._starting is not None:
            await asyncio.shield(self._starting)
            return
        self._starting = asyncio.get_running_loop().create_future()
        try:
            prefix = self._nc.new_inbox() + "."
            self._prefix = prefix  # before the SUB: a reply may be parsed as soon as it is written
            await subscriptions.subscribe(self._nc, prefix + "*", self)
            self._ready = True
            self._starting.set_result(None)
        except BaseException as exc:
            self._starting.set_exception(exc)
            self._starting.exception()  # retrieved: the request that started it raises it
            self._starting = None
            raise

    def put_nowait(self, msg: Msg) -> None:
        """A reply, as the client parses it (service.subscriptions): its request's future is set."""
        reply = self._waiting.get(msg.subject[len(self._prefix) :])
        if reply is not None and not reply.done():
            reply.set_result(msg)
