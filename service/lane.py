"""Many route subscriptions on one connection, without a task and a queue each.

nats-py gives every subscription with a callback an asyncio.Queue and a Task of its own: about
4 KiB a route, most of the memory of 100,000 stream routes. Here every route subscription of one
connection hands its messages to one lane, and one task takes them in the order they arrived and
calls each one's callback: a route's messages stay in order, and a route waits for no other longer
than the callbacks before it take (a route's callback only republishes).

The subscriptions are registered with the client as its own are, so the client parses their
messages, re-subscribes them after a reconnect, and drains or closes them with the connection;
they carry only what the client reads of a subscription (nats-py as pinned in requirements.lock;
tests/test_stream_routes.py covers reconnects, drains and updates).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import itertools
from collections.abc import Awaitable, Callable

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.protocol import command as prot_command

from service import log

Callback = Callable[[Msg], Awaitable[None]]
_log = log.get("lane")


class RouteSubscription:
    """One subscription of a lane, as nats-py's client sees a subscription."""

    __slots__ = (
        "_cb",
        "_closed",
        "_conn",
        "_id",
        "_lane",
        "_pending_size",
        "_queue",
        "_received",
        "_subject",
    )
    # What the client reads of every subscription, the same for all of these.
    _max_msgs = 0
    _future = None
    _jsi = None
    _pending_bytes_limit = 0  # none: a burst waits in the lane, never dropped as a slow consumer
    _wait_for_msgs_task = None
    _message_iterator = None
    _pending_next_msgs_calls = None

    def __init__(self, lane: Lane, sid: int, subject: str, queue: str, cb: Callback) -> None:
        self._lane, self._conn, self._id = lane, lane.nc, sid
        self._subject, self._queue, self._cb = subject, queue, cb
        self._received = self._pending_size = 0
        self._closed = False

    @property
    def _pending_queue(self) -> Lane:  # where the client puts each message it parsed for this one
        return self._lane

    @property
    def subject(self) -> str:
        return self._subject

    async def unsubscribe(self) -> None:
        """Remove the interest; messages received and not yet handed to the callback are dropped."""
        conn = self._conn
        if conn.is_closed:
            raise nats.errors.ConnectionClosedError
        if conn.is_draining:
            raise nats.errors.ConnectionDrainingError
        if self._closed:
            raise nats.errors.BadSubscriptionError
        self._forget()
        if not conn.is_reconnecting:
            await conn._send_unsubscribe(self._id)

    async def drain(self) -> None:
        """Remove the interest, and return once every message received before is handed on."""
        conn = self._conn
        if conn.is_closed:
            raise nats.errors.ConnectionClosedError
        if conn.is_draining:
            raise nats.errors.ConnectionDrainingError
        if self._closed:
            raise nats.errors.BadSubscriptionError
        await self._drain()

    async def _drain(self) -> None:  # also called by the client for each subscription when it drains
        try:
            await self._conn._send_unsubscribe(self._id)
            await self._conn.flush()  # every message the server sent before the UNSUB is in the lane
            await self._lane.handed_on(self._lane.received)
        finally:
            self._forget()

    def _stop_processing(self) -> None:
        self._forget()

    def _forget(self) -> None:
        self._closed = True
        self._lane.subscriptions.pop(self._id, None)
        self._conn._remove_sub(self._id)


class Lane:
    """The route subscriptions of one connection and the one task that calls their callbacks."""

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.subscriptions: dict[int, RouteSubscription] = {}
        self.received = 0  # messages put in the lane so far
        self._handed = 0  # messages taken out of it so far
        self._messages: collections.deque[Msg] = collections.deque()
        self._wake: asyncio.Future[None] | None = None
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []  # (received mark, tiebreak, future)
        self._tiebreak = itertools.count()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Lane:
        self._task = asyncio.create_task(self._run(), name="route lane")
        return self

    async def __aexit__(self, *exc: object) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for _, _, waiter in self._waiters:
            waiter.cancel()

    async def subscribe(self, subject: str, queue: str, cb: Callback) -> RouteSubscription:
        """Subscribe (SUB written, not confirmed: flush to know the server has it)."""
        nc = self.nc
        if nc.is_closed:
            raise nats.errors.ConnectionClosedError
        if nc.is_draining:
            raise nats.errors.ConnectionDrainingError
        nc._sid += 1
        sub = RouteSubscription(self, nc._sid, subject, queue, cb)
        self.subscriptions[sub._id] = sub
        nc._subs[sub._id] = sub  # type: ignore[assignment]
        await nc._send_command(prot_command.sub_cmd(subject, queue, sub._id))
        if nc._flush_queue is not None and nc._flush_queue.empty():  # as a publish: the flusher
            await nc._flush_pending()  # writes everything pending, so one kick at a time is enough
        return sub

    def put_nowait(self, msg: Msg) -> None:
        """The client hands over a message of one of the subscriptions."""
        self._messages.append(msg)
        self.received += 1
        wake = self._wake
        if wake is not None:
            self._wake = None
            wake.set_result(None)

    async def handed_on(self, mark: int) -> None:
        """Return once the first `mark` messages of the lane have been handed to their callbacks."""
        if self._handed >= mark:
            return
        waiter = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (mark, next(self._tiebreak), waiter))
        await waiter

    async def _run(self) -> None:
        messages, subscriptions, waiters = self._messages, self.subscriptions, self._waiters
        loop = asyncio.get_running_loop()
        while True:
            if not messages:
                self._wake = wake = loop.create_future()
                await wake
                continue
            msg = messages.popleft()
            sub = subscriptions.get(msg._sid or 0)  # None once unsubscribed: dropped
            if sub is not None:
                sub._pending_size -= len(msg.data)
                try:
                    await sub._cb(msg)
                except Exception as exc:
                    _log.exception("a route's callback failed", subject=msg.subject, error=str(exc))
            self._handed += 1
            while waiters and waiters[0][0] <= self._handed:
                waiter = heapq.heappop(waiters)[2]
                if not waiter.done():
                    waiter.set_result(None)
