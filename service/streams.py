"""Stream triggers carried by the service's own subscriptions (single-account mode).

A `stream` route is a queue subscription on S that republishes each message on D; a `service`
route is a queue subscription on D that forwards each request to S with the requester's reply
subject, so the responders answer the requester directly. Every replica follows the bucket and
subscribes in the same queue group (named after the trigger's key and its creation time, so one
group for the whole life of one incarnation, across its updates), so NATS hands each message to
one replica only.

An update that changes only where messages go keeps the subscription and switches its target in
place: each message is carried once, by the configuration current when it is taken up. This is
not only cheaper: a subscription replaced by another cannot promise it, because the server can
still hand the old one a message it routed to it before the UNSUB after answering the PING behind
that UNSUB, and the client drops a message for a subscription it has forgotten (seen: a few
messages lost in one update out of twenty at 10,000 messages a second).

An update that changes what is listened to is make-before-break on every replica: the new
subscription joins the same queue group and is flushed to the server before the old one is
drained. At every moment the group has a member; a message published on the old source while the
update is under way is carried under the old configuration or, as the new one says, not at all.
A disabled trigger has no subscription at all.

The routes use a connection of their own: a burst of carried messages then never queues in
front of the control plane's replies and KV traffic, and the data plane's flushes wait only for
its own traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from schemas.triggers import StreamTrigger
from service import log, replies, subjects
from service.config import Settings
from service.connections import finish
from service.errors import Unavailable
from service.metrics import ServiceMetrics, StreamRouteMetrics
from service.store import Apply, Change, Observer, TriggerStore
from service.subscriptions import Lane, RouteSubscription

Connect = Callable[[Settings, str], Awaitable[Client]]

STREAM_KEYS = "*.stream.*"  # every account: single-account mode shares one subject space
# NATS message tracing (ADR-41, nats-server 2.11+): what a route without `allow_trace` removes.
TRACE_DEST = "Nats-Trace-Dest"
_TRACE_HEADERS = frozenset({TRACE_DEST, "Nats-Trace-Only"})

_NOT_ALPHANUMERIC = re.compile(r"[^0-9A-Za-z]")
_log = log.get("streams")


class _Plane:
    """What every route of one data connection shares."""

    __slots__ = ("metrics", "publish")

    def __init__(self, data: Client, metrics: ServiceMetrics) -> None:
        self.publish, self.metrics = data.publish, metrics


class _Carry:
    """A route's subscription callback: republish each message, in the order received, on the
    route's current target (switched in place by an update that keeps what is listened to).

    Headers pass on unchanged (W3C `traceparent` among them), but for a NATS message trace
    (`Nats-Trace-Dest`): it goes on only where the trigger's `allow_trace` allows it, as a trace
    crosses an import or export in accounts mode only where its claim says `allow_trace`.

    Kept small (slots, the shared parts in `_Plane`): there is one per live route."""

    __slots__ = ("_counts", "_plane", "allow_trace", "deliver", "key", "listen")

    def __init__(self, plane: _Plane, key: str, listen: str, deliver: str, allow_trace: bool) -> None:
        self._plane, self.key = plane, key
        self.listen = listen
        self.deliver = deliver
        self.allow_trace = allow_trace
        # The route's series are made at its first message: three labelled children per route cost
        # 10% of a create's CPU, and memory for every route that never carries anything.
        self._counts: StreamRouteMetrics | None = None

    async def __call__(self, msg: Msg) -> None:
        deliver = self.deliver
        subject = (
            deliver if subjects.is_literal(deliver) else subjects.translate(msg.subject, self.listen, deliver)
        )
        headers = msg.headers
        if headers and TRACE_DEST in headers and not self.allow_trace:
            headers = {k: v for k, v in headers.items() if k not in _TRACE_HEADERS}
        plane, counts = self._plane, self._counts
        if counts is None:
            counts = self._counts = plane.metrics.stream_route(self.key)
        try:
            await plane.publish(subject, msg.data, reply=msg.reply, headers=headers)
        except nats.errors.Error as exc:
            counts.failures.inc()
            _log.warning("message not carried", subject=msg.subject, deliver=subject, error=str(exc))
        else:
            counts.messages.inc()
            counts.bytes.inc(len(msg.data))


@dataclass(frozen=True, slots=True)
class _Route:
    revision: int  # the newest revision applied
    incarnation: str  # the trigger's creation time: a delete and a new create make a new one
    plan: tuple[str, str] | None  # (listen, deliver), None while disabled
    subscription: RouteSubscription | None  # None while disabled
    carry: _Carry | None  # the subscription's callback, None while disabled


def _plan(trigger: StreamTrigger) -> tuple[str, str]:
    """(listen, deliver): the subject a route subscribes to, and where it sends what arrives."""
    source, destination = route_of(trigger)
    if trigger.source.kind == "service":  # requests to D are forwarded to the responders on S
        return destination, source
    return source, destination


def _incarnation(trigger: StreamTrigger) -> str:
    """A queue-group token of the trigger's incarnation: its creation time, digits and letters only."""
    return _NOT_ALPHANUMERIC.sub("", trigger.created_at) or "0"


def allows_trace(trigger: StreamTrigger) -> bool:
    """True when a NATS message trace may pass the route: the side messages flow into allows it, as
    in accounts mode (a service export's `allow_trace` on the source, a stream import's on the
    target)."""
    side = trigger.source if trigger.source.kind == "service" else trigger.target
    return bool(side.allow_trace)


def route_of(trigger: StreamTrigger) -> tuple[str, str]:
    """(S, D) of a stream trigger: its source subject and where the data is delivered."""
    source = trigger.source.subject
    return source, trigger.target.local_subject or trigger.target.subject or source


class SubscriptionCarrier:
    """Carries every live stream trigger of the bucket with queue subscriptions."""

    def __init__(
        self,
        settings: Settings,
        store: TriggerStore,
        connect: Connect,
        observe: Observer | None = None,
        metrics: ServiceMetrics | None = None,
    ) -> None:
        self._settings = settings
        self._metrics = metrics or ServiceMetrics()
        self._metrics.live_routes(
            "stream", lambda: sum(r.subscription is not None for r in self._routes.values())
        )
        self._observe = observe
        self._store = store
        self._connect = connect
        self._data: Client | None = None
        self._lane: Lane | None = None  # the routes' subscriptions on the data connection
        self._plane: _Plane | None = None
        self._following = contextlib.AsyncExitStack()
        self.also: list[Apply] = []  # other data planes that follow the same keys with this watch
        self._routes: dict[str, _Route] = {}
        self._ended: dict[str, int] = {}  # key -> highest revision known to be no longer live
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._flush_timeout = math.ceil(settings.request_timeout)  # nats-py takes whole seconds

    async def __aenter__(self) -> SubscriptionCarrier:
        """Connect the data plane and return once every live trigger of the bucket is carried."""
        self._data = await self._connect(self._settings, "trigger-service-routes")
        self._lane = await Lane(self._data).__aenter__()
        self._plane = _Plane(self._data, self._metrics)
        try:
            following = self._store.following(STREAM_KEYS, [self._apply, *self.also], self._confirm_loaded)
            self.follower = await self._following.enter_async_context(following)
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop following the bucket, then finish the messages in hand and close the data plane."""
        await self._following.aclose()
        self._routes.clear()
        data, self._data = self._data, None
        if data is not None:
            await finish(data)  # unsubscribes every route once its received messages are carried
        lane, self._lane = self._lane, None
        if lane is not None:
            await lane.__aexit__(None, None, None)

    # --- the Carrier protocol -----------------------------------------------------------------

    async def check(self, account: str, trigger: StreamTrigger) -> None:
        """Any valid route can be carried by subscriptions."""

    async def activate(
        self, key: str, revision: int, trigger: StreamTrigger, previous: StreamTrigger | None = None
    ) -> None:
        """Carry the trigger as stored at `revision`: live (enabled) or carrying nothing more
        (disabled) once the request being answered gets its reply, which is sent on the data
        connection after the route's SUB (service.replies); outside a request, or with the data
        connection down, this returns once NATS confirms the subscription (else Unavailable).
        Within one incarnation the route changes make-before-break; `previous` is not needed, the
        carrier knows what it carries."""
        await self._carry_change(key, revision, trigger)
        data = self._connected()
        if not (data.is_connected and replies.send_on(data)):
            await self._confirm(data)

    async def _carry_change(self, key: str, revision: int, trigger: StreamTrigger) -> None:
        """Bring the route at `key` in line with the trigger as stored at `revision` (SUBs written,
        not confirmed)."""
        async with self._lock(key):
            if self._ended.get(key, 0) >= revision:
                return  # deleted already: a late event must not bring it back
            current = self._routes.get(key)
            if current is not None and current.revision >= revision:
                return  # an older event, or one already applied
            incarnation = _incarnation(trigger)
            # A durable trigger is carried by service.durable: here it carries nothing, as if disabled.
            plan = _plan(trigger) if trigger.enabled and not trigger.durable else None
            if current is not None and current.incarnation != incarnation:
                del self._routes[key]  # a new trigger of the same name: the old one is gone
                await self._stop(key, current)
                current = None
            if plan is None:  # disabled: nothing carried, the revision kept
                if current is not None:
                    await self._stop(key, current)
                self._routes[key] = _Route(revision, incarnation, None, None, None)
                return
            kept = current.carry if current is not None else None
            if current is not None and kept is not None and kept.listen == plan[0]:
                kept.deliver = plan[1]  # the same subscription: its target switched in place
                kept.allow_trace = allows_trace(trigger)
                self._routes[key] = _Route(revision, incarnation, plan, current.subscription, kept)
                return
            # Joins the same queue group.
            subscription, carry = await self._start(key, incarnation, plan, allows_trace(trigger))
            self._routes[key] = _Route(revision, incarnation, plan, subscription, carry)
            if current is not None:
                await self._drain(key, current)  # only now: the group never lacks a member

    async def deactivate(self, key: str, trigger: StreamTrigger) -> None:
        """Stop carrying the trigger at `key` (deleted); return once nothing more is carried."""
        async with self._lock(key):
            current = self._routes.pop(key, None)
            if current is not None:
                self._ended[key] = max(self._ended.get(key, 0), current.revision)
                await self._stop(key, current)
            self._metrics.forget(key)

    # --- following the bucket -----------------------------------------------------------------

    async def _apply(self, change: Change) -> None:
        """Bring the routes in line with one change of the bucket (again and again: idempotent)."""
        if self._observe is not None:
            self._observe(change)
        if isinstance(change.record, StreamTrigger):
            await self._carry_change(change.key, change.revision, change.record)
        elif change.record is None:
            await self._retire(change.key, change.revision)

    async def _retire(self, key: str, revision: int) -> None:
        """The key is not live at `revision`: stop any route created at or before it."""
        async with self._lock(key):
            self._ended[key] = max(self._ended.get(key, 0), revision)
            current = self._routes.get(key)
            if current is not None and current.revision <= revision:
                del self._routes[key]
                await self._stop(key, current)
                self._metrics.forget(key)

    # --- subscriptions ------------------------------------------------------------------------

    def _lock(self, key: str) -> asyncio.Lock:
        """One lock per key, alive while anyone holds or waits for it."""
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        return lock

    async def _start(
        self, key: str, incarnation: str, plan: tuple[str, str], allow_trace: bool
    ) -> tuple[RouteSubscription, _Carry]:
        if self._lane is None or self._plane is None:
            raise Unavailable("the stream-trigger data plane is not running")
        listen, deliver = plan
        carry = _Carry(self._plane, key, listen, deliver, allow_trace)
        subscription = await self._lane.subscribe(
            listen,
            # Shared by the replicas, and by the old and new route of an update; new per incarnation.
            f"{self._store.bucket}.{key}.{incarnation}",
            carry,
        )
        _log.debug("route started", key=key, listen=listen, deliver=deliver)
        return subscription, carry

    async def _confirm(self, data: Client) -> None:
        """Return once the server has processed every SUB written so far (a PING/PONG round trip)."""
        try:
            await data.flush(timeout=self._flush_timeout)
        except (TimeoutError, nats.errors.Error):
            raise Unavailable("NATS did not confirm the route's subscription") from None

    async def _confirm_loaded(self) -> None:
        """Once the first snapshot is applied: one round trip confirms every route's SUB (one per
        route made start-up with 100,000 stored a round trip per trigger)."""
        await self._confirm(self._connected())

    async def _drain(self, key: str, route: _Route) -> None:
        """Stop the old subscription of an updated route: the server gives it nothing more, and what
        it was given is carried (an unsubscribe would drop it)."""
        subscription = route.subscription
        if subscription is None:
            return
        try:
            await asyncio.wait_for(subscription.drain(), self._flush_timeout)
        except (TimeoutError, nats.errors.Error):
            _log.warning("old route not drained; unsubscribed", key=key)
            with contextlib.suppress(nats.errors.Error):
                await subscription.unsubscribe()
        _log.debug("old route drained", key=key, revision=route.revision)

    async def _stop(self, key: str, route: _Route) -> None:
        """Unsubscribe (messages not yet carried are dropped) and flush the UNSUB to the server."""
        if route.subscription is None:
            return
        with contextlib.suppress(nats.errors.Error):
            await route.subscription.unsubscribe()
        try:
            await self._connected().flush(timeout=self._flush_timeout)
        except (TimeoutError, nats.errors.Error, Unavailable):
            # The client already dropped the subscription, so nothing more is carried; a server
            # that did not get the UNSUB loses it with the connection.
            _log.warning("route stopped without confirmation from NATS", key=key)
        _log.debug("route stopped", key=key, revision=route.revision)

    def _connected(self) -> Client:
        if self._data is None:
            raise Unavailable("the stream-trigger data plane is not running")
        return self._data
