"""Subscriptions without a task and a queue each: messages handed on as nats-py's client parses them.

nats-py gives every subscription with a callback an asyncio.Queue and a Task of its own: a message
waits in the queue for the next turn of the event loop, and every subscription costs about 4 KiB.
Two kinds here, both registered with the client as its own subscriptions are (so the client
parses their messages, re-subscribes them after a reconnect, and drains or closes them with the
connection), carrying only what the client reads of a subscription (nats-py as pinned in
requirements.lock):

- a direct subscription hands each message to its sink's `put_nowait` from within the client's
  read loop (a reply future set, a watch's deque filled): one turn of the loop less per message;
- a route subscription puts its messages in its connection's lane, where one task takes them in
  the order they arrived and awaits each one's callback: a route's messages stay in order, and a
  route waits for no other longer than the callbacks before it take (a route only republishes).
  100,000 stream routes then cost 2 KiB each, not 7.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import itertools
from collections.abc import Awaitable, Callable
from typing import Protocol

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.protocol import command as prot_command

from service import log

Callback = Callable[[Msg], Awaitable[None]]
_log = log.get("subscriptions")


class Sink(Protocol):
    """Where a direct subscription's messages go; called from the client's read loop: must not block
    or raise."""

    def put_nowait(self, msg: Msg) -> None: ...


class DirectSubscription:
    """A subscription as nats-py's client sees one, whose messages go to `sink.put_nowait`."""

    __slots__ = (
        "_closed",
        "_conn",
        "_id",
        "_pending_queue",
        "_pending_size",
        "_queue",
        "_received",
        "_subject",
    )
    # What the client reads of every subscription, the same for all of these.
    _max_msgs = 0
    _future = None
    _jsi = None
    _pending_bytes_limit = 0  # none: a burst is handed on, never dropped as a slow consumer
    _wait_for_msgs_task = None
    _message_iterator = None
    _pending_next_msgs_calls = None

    def __init__(self, nc: Client, subject: str, queue: str, sink: Sink) -> None:
        nc._sid += 1
        self._conn, self._id = nc, nc._sid
        self._subject, self._queue, self._pending_queue = subject, queue, sink
        # The client adds each message's size to `_pending_size`; with no byte limit nothing reads it,
        # so it is not kept down as messages are handed on.
        self._received = self._pending_size = 0
        self._closed = False

    @property
    def subject(self) -> str:
        return self._subject

    async def unsubscribe(self) -> None:
        """Remove the interest; messages not yet handed on are dropped."""
        self._check()
        self._forget()
        if not self._conn.is_reconnecting:
            await self._conn._send_unsubscribe(self._id)

    async def drain(self) -> None:
        """Remove the interest, and return once every message received before is handed on."""
        self._check()
        await self._drain()

    async def _drain(self) -> None:  # also called by the client for each subscription when it drains
        try:
            await self._conn._send_unsubscribe(self._id)
            await self._conn.flush()  # every message the server sent before the UNSUB has been parsed
            await self._handed_on()
        finally:
            self._forget()

    async def _handed_on(self) -> None:
        """Return once every message parsed so far is handed on (at once: the sink has it)."""

    def _check(self) -> None:
        conn = self._conn
        if conn.is_closed:
            raise nats.errors.ConnectionClosedError
        if conn.is_draining:
            raise nats.errors.ConnectionDrainingError
        if self._closed:
            raise nats.errors.BadSubscriptionError

    def _stop_processing(self) -> None:
        self._forget()

    def _forget(self) -> None:
        self._closed = True
        self._conn._remove_sub(self._id)


async def subscribe(nc: Client, subject: str, sink: Sink, queue: str = "") -> DirectSubscription:
    """Subscribe `sink` to `subject` (SUB written, not confirmed: flush to know the server has it)."""
    return await _register(DirectSubscription(nc, subject, queue, sink))


async def _register(sub: DirectSubscription) -> DirectSubscription:
    nc = sub._conn
    if nc.is_closed:
        raise nats.errors.ConnectionClosedError
    if nc.is_draining:
        raise nats.errors.ConnectionDrainingError
    nc._subs[sub._id] = sub  # type: ignore[assignment]
    await nc._send_command(prot_command.sub_cmd(sub._subject, sub._queue, sub._id))
    if nc._flush_queue is not None and nc._flush_queue.empty():  # as a publish: the flusher writes
        await nc._flush_pending()  # everything pending, so one kick at a time is enough
    return sub


class RouteSubscription(DirectSubscription):
    """One subscription of a lane: its messages are awaited by its callback in the lane's task."""

    __slots__ = ("_cb", "_lane")

    def __init__(self, lane: Lane, subject: str, queue: str, cb: Callback) -> None:
        super().__init__(lane.nc, subject, queue, lane)
        self._lane, self._cb = lane, cb

    async def _handed_on(self) -> None:
        await self._lane.handed_on(self._lane.received)

    def _forget(self) -> None:
        super()._forget()
        self._lane.subscriptions.pop(self._id, None)


class Lane:
    """The route subscriptions of one connection and the one task that awaits their callbacks."""

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
        sub = RouteSubscription(self, subject, queue, cb)
        self.subscriptions[sub._id] = sub
        try:
            await _register(sub)
        except BaseException:
            self.subscriptions.pop(sub._id, None)
            raise
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
                try:
                    await sub._cb(msg)
                except Exception as exc:
                    _log.exception("a route's callback failed", subject=msg.subject, error=str(exc))
            self._handed += 1
            while waiters and waiters[0][0] <= self._handed:
                waiter = heapq.heappop(waiters)[2]
                if not waiter.done():
                    waiter.set_result(None)
