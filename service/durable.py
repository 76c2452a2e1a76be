"""Durable stream triggers: at-least-once delivery through JetStream (single-account mode).

A stream trigger with `delivery.mode` `durable` is carried here instead of by a plain
subscription (service.streams leaves it alone). For each such trigger, live and enabled, there is

- a capture stream `TRIGGER_DURABLE_<digest of bucket, key and creation time>` storing S (file
  storage, the bucket's replicas, work-queue retention: a confirmed message is removed). It is
  created with `no_ack`, so a publisher's request on S gets no JetStream acknowledgement it did
  not ask for: S behaves for everybody else exactly as before;
- one durable pull consumer, `deliver`, shared by every replica: each message is in one
  replica's hands at a time, and a killed replica's unconfirmed messages come back to the others
  after `ack_wait` (the confirmation timeout plus ACK_GRACE).

Each replica fetches and delivers: a request to D whose reply confirms it (`reply`: an envelope
`status_code` >= 400, a `Nats-Service-Error` header, no responder or no reply in time are
failures), or a publish to D that JetStream acknowledges (`jetstream`, with `Nats-Msg-Id`
`<capture stream>:<sequence>`, so a retry is not stored twice within the target stream's
duplicate window). A failure is negatively acknowledged with the backoff as its delay (retries are
ours, not the consumer's `backoff`/`max_deliver`: the attempt number is the consumer's delivery
count, so a delivery lost with a killed replica counts as an attempt); after the last attempt the
message goes to the dead-letter subject, unchanged, with headers saying why, and is acknowledged,
so it is never delivered again. `ordered`: the consumer lets one message be in flight
(`max_ack_pending` 1), whichever replica holds it.

Counts shared by all replicas and kept across restarts: the capture stream's state (messages
captured, still pending) and, in one small stream of the bucket (TRIGGER_DURABLE_STATS_<bucket>), a
marker message per redelivery and per dead letter, counted by subject.

Delete, disable, or a switch back to `direct`: the replica that answers the request stops its
deliveries and removes the capture stream (with its consumer and its markers) before replying;
the messages not yet delivered are discarded and their number logged. The other replicas stop
when they follow the change, and remove the stream too unless the bucket says it is wanted
again. Updates keep the stream (a changed S is a stream update, atomic at the server) and switch
the delivery settings in place.

A replica that stops (SIGTERM, a rolling restart) fetches no more and lets the deliveries it has
in hand finish, confirmed or failed, for up to STOP_GRACE: what it delivered is not delivered
again by the next.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import weakref
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import msgspec
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from schemas.triggers import (
    DEFAULT_ATTEMPTS,
    DEFAULT_CONFIRM,
    DEFAULT_TIMEOUT_MS,
    Delivery,
    DeliveryStats,
    StreamTrigger,
)
from service import log, requests, subjects
from service.config import Settings
from service.connections import finish
from service.errors import Conflict, NotFound, Unavailable
from service.follower import Follower
from service.handlers import Carrier
from service.jetstream import WRITE_DEADLINE, BucketMissing, JetStream, JetStreamError
from service.metrics import DurableRouteMetrics, ServiceMetrics
from service.relay import incarnation_digest, relay_of
from service.store import Apply, Change, TriggerStore
from service.streams import Connect, route_of

CONSUMER = "deliver"
STREAM_PREFIX = "TRIGGER_DURABLE_"
IN_HAND = 64  # messages one replica delivers at once on an unordered route
MAX_ACK_PENDING = 1_000  # messages in flight on an unordered route, over all replicas
ACK_GRACE = 1.0  # seconds `ack_wait` exceeds the confirmation timeout: a slow attempt is not taken over
FETCH_WAIT = 1.0  # seconds one fetch waits for messages
STOP_GRACE = 10.0  # seconds a stopping replica waits for its deliveries in hand (each ends by its timeout)
ERROR_CHARS = 512  # the longest `Trigger-Last-Error` header value
_STREAM_NAME_IN_USE = 10058  # the stream exists with another configuration
_SUBJECTS_OVERLAP = 10065  # another stream of the account stores an overlapping subject
_RETRY_MIN, _RETRY_MAX = 0.1, 2.0
_NS = 1_000_000_000
_log = log.get("durable")


class _Envelope(msgspec.Struct):
    status_code: Any = None


class _PubAck(msgspec.Struct):
    seq: int = 0
    error: dict[str, Any] | None = None


_decode_envelope = msgspec.json.Decoder(_Envelope).decode
_decode_puback = msgspec.json.Decoder(_PubAck).decode
_UNSAFE_IN_HEADER = re.compile(r"[\x00-\x1f\x7f]+")


def stream_name(bucket: str, key: str, created_at: str) -> str:
    """The capture stream of one incarnation of a trigger (a delete and a new create: a new one)."""
    return STREAM_PREFIX + incarnation_digest(bucket, key, created_at)


def stats_stream_name(bucket: str) -> str:
    """The stream of every durable route's markers (redeliveries, dead letters) of a bucket."""
    return f"{STREAM_PREFIX}STATS_{bucket}"


def stats_subject(settings: Settings, stream: str, kind: str) -> str:
    """Where a marker of one capture stream is stored: `kind` is `redelivered` or `dead` (or `*`)."""
    return f"{settings.prefix}.durable-stats.{settings.bucket}.{stream}.{kind}"


@dataclass
class DeliveryCounts:
    """What this replica did for one route since it started (for metrics; `get` shows the totals)."""

    delivered: int = 0
    redelivered: int = 0
    failed_attempts: int = 0
    dead_lettered: int = 0


@dataclass
class _Plan:
    """What a route does with each message: switched in place by an update."""

    trigger: str  # the trigger's subject, `<prefix>.stream.<name>`
    source: str  # S, as the trigger names it
    listen: str  # what the capture stream stores: S, or its relay subject in accounts mode
    deliver: str
    delivery: Delivery
    dead: str | None  # where a dead letter is published (None: dropped and logged)

    def original(self, subject: str) -> str:
        """The subject a captured message was published on, as its publisher named it."""
        if self.listen == self.source:
            return subject
        return subjects.translate(subject, self.listen, self.source)


@dataclass
class _Route:
    revision: int  # the newest revision applied
    stream: str | None  # None while not durable (disabled, or switched to direct)
    plan: _Plan | None
    task: asyncio.Task[None] | None = None  # fetches, and starts a delivery of each message
    in_hand: set[asyncio.Task[None]] = field(default_factory=set)  # deliveries not settled yet
    counts: DeliveryCounts = field(default_factory=DeliveryCounts)
    meters: DurableRouteMetrics | None = None  # the same counts, as Prometheus series


def _wanted(trigger: StreamTrigger | None) -> bool:
    return trigger is not None and trigger.durable and trigger.enabled


async def _cancelled(tasks: set[asyncio.Task[None]]) -> None:
    """Cancel `tasks` until they are done: nats-py swallows a cancellation that lands in a publish
    (an ack, say), so one cancel may not be enough."""
    while pending := {task for task in tasks if not task.done()}:
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=0.1)


def _timeout(delivery: Delivery) -> float:
    return (delivery.timeout_ms if delivery.timeout_ms is not None else DEFAULT_TIMEOUT_MS) / 1000


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class DurableRoutes:
    """Carries the durable stream triggers of the bucket, and passes every route to `inner` too
    (the subscription carrier), so that a switch between `direct` and `durable` is make-before-break."""

    def __init__(
        self,
        settings: Settings,
        store: TriggerStore,
        connect: Connect,
        inner: Carrier,
        metrics: ServiceMetrics | None = None,
    ) -> None:
        self._settings = settings
        self._relayed = settings.routing == "accounts"  # through the relay account (service.relay)
        self._metrics = metrics or ServiceMetrics()
        self._metrics.on_scrape(self._refresh_pending)
        self._store = store
        self._connect = connect
        self._inner = inner
        inner.also.append(self._apply)  # one watch of the stream triggers for both data planes
        self._data: Client | None = None
        self._entered = contextlib.AsyncExitStack()  # the inner carrier
        self._durable: dict[str, _Route] = {}
        self._ended: dict[str, int] = {}  # key -> highest revision known to be no longer live
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._stats_ready = False
        self._flush_timeout = math.ceil(settings.request_timeout)

    @property
    def follower(self) -> Follower[Change]:
        """How far the route graph has followed the bucket (the inner carrier's watch)."""
        return self._inner.follower

    @property
    def also(self) -> list[Apply]:
        """Other data planes that follow the stream triggers with the inner carrier's watch."""
        return self._inner.also

    @property
    def inner(self) -> Carrier:
        """The carrier of every route that is not durable (and of a durable one's pairs in
        accounts mode)."""
        return self._inner

    def counts(self, key: str) -> DeliveryCounts | None:
        """This replica's counts for the durable route at `key`, while it carries one."""
        route = self._durable.get(key)
        return route.counts if route is not None and route.stream is not None else None

    async def __aenter__(self) -> DurableRoutes:
        """Connect the durable data plane, then enter the inner carrier, whose watch applies every
        change here too; return once every live trigger is carried and every live durable trigger
        is delivered from."""
        relay = self._settings.relay_creds if self._relayed else None  # accounts mode: the relay account
        settings = msgspec.structs.replace(self._settings, nats_creds=relay) if relay else self._settings
        self._data = await self._connect(settings, "trigger-service-durable")
        try:
            if isinstance(self._inner, contextlib.AbstractAsyncContextManager):
                await self._entered.enter_async_context(self._inner)
            await self._collect_orphans()
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
        """Stop the inner carrier (and with it following the bucket), then every route: no more
        fetches, the deliveries in hand given STOP_GRACE to settle (what is still unconfirmed
        after that comes back to other replicas)."""
        await self._entered.aclose()
        routes, self._durable = list(self._durable.values()), {}
        await asyncio.gather(*(self._stop_deliveries(route, grace=STOP_GRACE) for route in routes))
        data, self._data = self._data, None
        if data is not None:
            await finish(data)  # unsubscribes every route once its received messages are carried

    # --- the Carrier protocol -----------------------------------------------------------------

    async def check(self, account: str, trigger: StreamTrigger) -> None:
        """What the inner carrier checks; JetStream itself checks the capture when it is created."""
        await self._inner.check(account, trigger)

    async def activate(
        self, key: str, revision: int, trigger: StreamTrigger, previous: StreamTrigger | None = None
    ) -> None:
        """Carry the trigger as stored at `revision`: a durable one from its capture stream (which
        exists when this returns), any other by the inner carrier; the new way starts first."""
        if _wanted(trigger):
            await self._reconcile(key, revision, trigger, previous, definitive=True)
            await self._inner.activate(key, revision, trigger, previous)
        else:
            await self._inner.activate(key, revision, trigger, previous)
            await self._reconcile(key, revision, trigger, previous, definitive=True)

    async def deactivate(self, key: str, trigger: StreamTrigger) -> None:
        """Stop the route (deleted): deliveries stop and the capture stream is gone when this returns."""
        await self._inner.deactivate(key, trigger)
        async with self._lock(key):
            current = self._durable.pop(key, None)
            if current is not None:
                self._ended[key] = max(self._ended.get(key, 0), current.revision)
                await self._stop_deliveries(current)
            streams = {current.stream} if current is not None and current.stream else set()
            if trigger.durable:
                streams.add(self._stream_of(key, trigger))
            for stream in streams:
                await self._remove(key, stream, definitive=True)

    async def stats(self, key: str, trigger: StreamTrigger) -> DeliveryStats | None:
        """The route's counts over all replicas; None when it is not durable now or JetStream cannot tell."""
        if not _wanted(trigger):
            return None
        stream = self._stream_of(key, trigger)
        markers = stats_stream_name(self._settings.bucket)
        try:
            info = await self._js(stream).api(f"STREAM.INFO.{stream}", {})
            marked = await self._js(markers).api(
                f"STREAM.INFO.{markers}", {"subjects_filter": stats_subject(self._settings, stream, "*")}
            )
        except (Unavailable, JetStreamError) as exc:
            _log.info("durable route counts not available", key=key, reason=str(exc))
            return None
        state, by_subject = info.get("state") or {}, (marked.get("state") or {}).get("subjects") or {}
        pending, captured = int(state.get("messages", 0)), int(state.get("last_seq", 0))
        dead = int(by_subject.get(stats_subject(self._settings, stream, "dead"), 0))
        return DeliveryStats(
            delivered=max(0, captured - pending - dead),
            redelivered=int(by_subject.get(stats_subject(self._settings, stream, "redelivered"), 0)),
            pending=pending,
            dead_lettered=dead,
        )

    # --- following the bucket -----------------------------------------------------------------

    async def _apply(self, change: Change) -> None:
        """Bring this replica's durable routes in line with one change of the bucket (idempotent)."""
        record = change.record
        if record is None or isinstance(record, StreamTrigger):
            await self._reconcile(change.key, change.revision, record, None, definitive=False)

    async def _reconcile(
        self,
        key: str,
        revision: int,
        trigger: StreamTrigger | None,
        previous: StreamTrigger | None,
        *,
        definitive: bool,
    ) -> None:
        """Make the durable route at `key` what `trigger` (None: not live) at `revision` asks for.

        `definitive`: the caller stored this revision (an API request), so a capture stream that it
        no longer wants is removed at once; a change merely followed removes one only when the
        bucket, read again, does not want it either (a newer revision may have brought it back).
        """
        if (
            trigger is not None
            and not trigger.durable
            and not (previous is not None and previous.durable)
            and key not in self._durable
        ):
            return  # a direct route this replica never delivered durably: nothing to do (most changes)
        async with self._lock(key):
            if self._ended.get(key, 0) >= revision:
                return  # deleted already: a late event must not bring it back
            current = self._durable.get(key)
            if current is not None and current.revision >= revision:
                return  # an older event, or one already applied
            wanted = self._stream_of(key, trigger) if trigger is not None and _wanted(trigger) else None
            stale = {current.stream} if current is not None and current.stream else set()
            if previous is not None and previous.durable:
                stale.add(self._stream_of(key, previous))
            stale.discard(wanted)
            if current is not None and current.stream in stale:
                await self._stop_deliveries(current)
                current = None
            for stream in stale:
                await self._remove(key, stream, definitive)
            if trigger is None:
                self._durable.pop(key, None)
                self._ended[key] = max(self._ended.get(key, 0), revision)
                return
            if wanted is None:
                if key in self._durable or stale:
                    self._durable[key] = _Route(revision, None, None)  # keeps the revision
                return
            plan = self._plan(key, trigger)
            await self._ensure(key, wanted, trigger)
            if current is not None and current.stream == wanted and current.task is not None:
                current.revision, current.plan = revision, plan  # the same stream: switched in place
                return
            route = _Route(revision, wanted, plan, meters=self._metrics.durable_route(key))
            route.task = asyncio.create_task(self._deliveries(route), name=f"durable {key}")
            self._durable[key] = route

    def _lock(self, key: str) -> asyncio.Lock:
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        return lock

    def _plan(self, key: str, trigger: StreamTrigger) -> _Plan:
        """The route's plan; in accounts mode through the relay account's subjects."""
        source, destination = route_of(trigger)
        delivery = trigger.delivery
        assert delivery is not None
        if not self._relayed:
            return _Plan(trigger.subject, source, source, destination, delivery, delivery.dead_letter_subject)
        relay = relay_of(self._settings.bucket, key, trigger.created_at, source, destination)
        dead = relay.dead if delivery.dead_letter_subject else None
        return _Plan(trigger.subject, source, relay.captured, relay.delivered, delivery, dead)

    def _stream_of(self, key: str, trigger: StreamTrigger) -> str:
        return stream_name(self._settings.bucket, key, trigger.created_at)

    # --- JetStream objects --------------------------------------------------------------------

    async def _refresh_pending(self) -> None:
        """Before a scrape: each durable route's messages captured and not yet settled."""
        for route in list(self._durable.values()):
            if route.stream is not None and route.meters is not None:
                info = await self._js(route.stream).api(f"STREAM.INFO.{route.stream}", {})
                route.meters.pending.set(int((info.get("state") or {}).get("messages", 0)))

    def _js(self, stream: str) -> JetStream:
        if self._data is None:
            raise Unavailable("the durable data plane is not running")
        return JetStream(self._data, stream)

    async def _ensure(self, key: str, stream: str, trigger: StreamTrigger) -> None:
        """Create (or bring up to date) the capture stream and its consumer; idempotent."""
        await self._ensure_stats()
        delivery = trigger.delivery
        assert delivery is not None
        source = self._plan(key, trigger).listen
        config = {
            "name": stream,
            "description": f"Trigger Service durable route of {trigger.subject}",
            "subjects": [source],
            "retention": "workqueue",
            "storage": "file",
            "num_replicas": self._settings.replicas,
            "discard": "old",
            "no_ack": True,  # publishers on S get no acknowledgement they did not ask for
            "metadata": {"trigger_bucket": self._settings.bucket, "trigger_key": key},
        }
        js = self._js(stream)
        try:
            try:
                await js.api(f"STREAM.CREATE.{stream}", config, WRITE_DEADLINE)
            except JetStreamError as exc:
                if exc.err_code != _STREAM_NAME_IN_USE:
                    raise
                await js.api(f"STREAM.UPDATE.{stream}", config, WRITE_DEADLINE)  # S changed
            consumer = {
                "durable_name": CONSUMER,
                "ack_policy": "explicit",
                "ack_wait": int((_timeout(delivery) + ACK_GRACE) * _NS),
                "max_deliver": -1,  # the attempts are counted here, and the last goes to the dead letter
                "max_ack_pending": 1 if delivery.ordered else MAX_ACK_PENDING,
                "deliver_policy": "all",
                "replay_policy": "instant",
            }
            await js.api(
                f"CONSUMER.CREATE.{stream}.{CONSUMER}",
                {"stream_name": stream, "config": consumer},
                WRITE_DEADLINE,
            )
        except JetStreamError as exc:
            if exc.err_code == _SUBJECTS_OVERLAP:
                raise Conflict(
                    f"source subject {source!r} overlaps what another JetStream stream stores (another "
                    "durable trigger's, or a stream of your own): JetStream stores a subject in one "
                    "stream only - at `$.source.subject`"
                ) from None
            raise Unavailable(f"JetStream refused the durable route's stream: {exc.description}") from None

    async def _ensure_stats(self) -> None:
        if self._stats_ready:
            return
        name = stats_stream_name(self._settings.bucket)
        config = {
            "name": name,
            "description": "Trigger Service durable routes: a marker per redelivery and dead letter",
            "subjects": [f"{self._settings.prefix}.durable-stats.{self._settings.bucket}.>"],
            "retention": "limits",
            "storage": "file",
            "num_replicas": self._settings.replicas,
            "no_ack": True,
        }
        with contextlib.suppress(JetStreamError):  # in use: another replica created it
            await self._js(name).api(f"STREAM.CREATE.{name}", config, WRITE_DEADLINE)
        self._stats_ready = True

    async def _remove(self, key: str, stream: str, definitive: bool) -> None:
        """Delete a capture stream (its consumer and markers with it), unless the bucket wants it."""
        if not definitive and await self._still_wanted(key, stream):
            return
        js = self._js(stream)
        try:
            info = await js.api(f"STREAM.INFO.{stream}", {})
        except BucketMissing:
            return  # removed already (by the replica that answered the request)
        discarded = int((info.get("state") or {}).get("messages", 0))
        with contextlib.suppress(BucketMissing):
            await js.api(f"STREAM.DELETE.{stream}", {}, WRITE_DEADLINE)
        markers = stats_stream_name(self._settings.bucket)
        with contextlib.suppress(BucketMissing):
            await self._js(markers).api(
                f"STREAM.PURGE.{markers}",
                {"filter": stats_subject(self._settings, stream, "*")},
                WRITE_DEADLINE,
            )
        _log.info("durable route removed", key=key, stream=stream, discarded=discarded)

    async def _collect_orphans(self) -> None:
        """Once every live trigger is applied: remove the capture streams of this bucket that no live
        durable trigger wants (a replica that died between storing a delete and removing the stream,
        or a change made while no replica ran, leaves one behind)."""
        offset, carried = 0, {route.stream for route in self._durable.values()}
        try:
            while True:
                page = await self._js("").api("STREAM.LIST", {"offset": offset})
                streams = page.get("streams") or []
                for info in streams:
                    config = info.get("config") or {}
                    name, metadata = str(config.get("name", "")), config.get("metadata") or {}
                    key = metadata.get("trigger_key")
                    if (
                        metadata.get("trigger_bucket") == self._settings.bucket
                        and key
                        and name not in carried
                    ):
                        await self._remove(str(key), name, definitive=False)
                offset += len(streams)
                if not streams or offset >= int(page.get("total", 0)):
                    return
        except (Unavailable, JetStreamError) as exc:  # the next start tries again
            _log.warning("orphaned capture streams not collected", reason=str(exc))

    async def _still_wanted(self, key: str, stream: str) -> bool:
        try:
            record, _ = await self._store.get(key)
        except NotFound:
            return False
        return (
            isinstance(record, StreamTrigger) and _wanted(record) and self._stream_of(key, record) == stream
        )

    # --- deliveries ---------------------------------------------------------------------------

    async def _stop_deliveries(self, route: _Route, grace: float = 0.0) -> None:
        """Fetch no more for the route, give its deliveries in hand `grace` seconds to settle, and
        cancel what is left."""
        task, route.task = route.task, None
        if task is not None:
            await _cancelled({task})
        if route.in_hand and grace > 0:
            await asyncio.wait(route.in_hand, timeout=grace)
        await _cancelled(route.in_hand)

    async def _deliveries(self, route: _Route) -> None:
        """Fetch from the shared consumer and deliver, for as long as the route lives; waits out
        JetStream outages and restarts (the connection reconnects by itself)."""
        assert route.stream is not None
        pause = _RETRY_MIN
        while route.task is not None:
            data = self._data
            if data is None:
                return
            in_hand = route.in_hand  # outlives this loop: a stop lets the deliveries finish
            pull = None
            try:
                pull = await data.jetstream().pull_subscribe_bind(CONSUMER, stream=route.stream)
                while route.task is not None:
                    plan = route.plan
                    assert plan is not None
                    room = 1 if plan.delivery.ordered else IN_HAND  # ordered: settled before the next
                    while in_hand and len(in_hand) >= room:
                        await asyncio.wait(in_hand, return_when=asyncio.FIRST_COMPLETED)
                    try:
                        messages = await pull.fetch(room - len(in_hand), timeout=FETCH_WAIT)
                    except (TimeoutError, nats.errors.TimeoutError):
                        continue
                    pause = _RETRY_MIN
                    for msg in messages:
                        task = asyncio.create_task(self._deliver(route, msg))
                        in_hand.add(task)
                        task.add_done_callback(in_hand.discard)
            except Exception as exc:
                _log.info(
                    "durable route waiting for JetStream", stream=route.stream, reason=str(exc) or repr(exc)
                )
            finally:
                if pull is not None:
                    with contextlib.suppress(nats.errors.Error):
                        await pull.unsubscribe()
            await asyncio.sleep(pause)
            pause = min(pause * 2, _RETRY_MAX)

    async def _deliver(self, route: _Route, msg: Msg) -> None:
        """One attempt at one message: confirmed, retried later, or dead-lettered."""
        plan, stream = route.plan, route.stream
        assert plan is not None
        assert stream is not None
        delivery = plan.delivery
        attempt = msg.metadata.num_delivered or 1
        if attempt > 1:
            route.counts.redelivered += 1
            if route.meters is not None:
                route.meters.redelivered.inc()
            await self._mark(stream, "redelivered")
        deliver = plan.deliver
        subject = (
            deliver if subjects.is_literal(deliver) else subjects.translate(msg.subject, plan.listen, deliver)
        )
        error = await self._send(subject, msg, delivery, f"{stream}:{msg.metadata.sequence.stream}")
        try:
            if error is None:
                await msg.ack()
                route.counts.delivered += 1
                if route.meters is not None:
                    route.meters.delivered.inc()
                return
            route.counts.failed_attempts += 1
            if attempt < (delivery.attempts or DEFAULT_ATTEMPTS):
                await msg.nak(delay=delivery.pause(attempt))
                return
            await self._dead_letter(plan, msg, attempt, error)
            await msg.ack()
            route.counts.dead_lettered += 1
            if route.meters is not None:
                route.meters.dead_lettered.inc()
            await self._mark(stream, "dead")
        except (TimeoutError, nats.errors.Error) as exc:  # it comes back after `ack_wait`
            _log.warning("durable delivery not settled", stream=stream, subject=msg.subject, error=str(exc))

    async def _send(self, subject: str, msg: Msg, delivery: Delivery, msg_id: str) -> str | None:
        """Deliver `msg` on `subject` and wait for the confirmation; None, or why it failed."""
        data = self._data
        if data is None:
            return "the durable data plane stopped"
        timeout = _timeout(delivery)
        headers = dict(msg.headers) if msg.headers else None
        by_jetstream = (delivery.confirm or DEFAULT_CONFIRM) == "jetstream"
        if by_jetstream:
            headers = {"Nats-Msg-Id": msg_id, **(headers or {})}
        try:
            reply = await requests.request(data, subject, msg.data, wait=timeout, headers=headers)
        except nats.errors.NoRespondersError:
            if by_jetstream:
                return f"no JetStream stream stores {subject!r}"
            return f"no responder on {subject!r}"
        except (TimeoutError, nats.errors.TimeoutError):
            return f"no confirmation within {timeout:g} s"
        except nats.errors.Error as exc:
            return str(exc) or type(exc).__name__
        if by_jetstream:
            return _puback_error(reply.data)
        return _reply_error(reply)

    async def _dead_letter(self, plan: _Plan, msg: Msg, attempt: int, error: str) -> None:
        """Publish the message, unchanged, on the dead-letter subject with headers saying why."""
        target = plan.dead
        if target is None:
            _log.warning(
                "durable delivery given up; no dead-letter subject", trigger=plan.trigger, error=error
            )
            return
        data = self._data
        assert data is not None
        headers = dict(msg.headers or {})
        headers.update(
            {
                "Trigger-Subject": plan.trigger,
                "Trigger-Attempts": str(attempt),
                "Trigger-Last-Error": _UNSAFE_IN_HEADER.sub(" ", error)[:ERROR_CHARS],
                "Trigger-Original-Subject": plan.original(msg.subject),
                "Trigger-Original-Time": _rfc3339(msg.metadata.timestamp),
            }
        )
        await data.publish(target, msg.data, headers=headers)
        await data.flush(timeout=self._flush_timeout)

    async def _mark(self, stream: str, kind: str) -> None:
        """Count one redelivery or dead letter in the markers stream (best effort: a core publish)."""
        data = self._data
        if data is not None:
            with contextlib.suppress(nats.errors.Error):
                await data.publish(stats_subject(self._settings, stream, kind), b"")


def _reply_error(reply: Msg) -> str | None:
    """Why a target's reply is a failure (a service error header, an envelope status >= 400), or None."""
    headers = reply.headers or {}
    if "Nats-Service-Error" in headers:
        code = headers.get("Nats-Service-Error-Code", "")
        return f"service error {code} {headers['Nats-Service-Error']}".replace("  ", " ").strip()
    if reply.data[:1] == b"{":
        try:
            status = _decode_envelope(reply.data).status_code
        except msgspec.DecodeError:
            return None
        if isinstance(status, int) and not isinstance(status, bool) and status >= 400:
            return f"reply status_code {status}"
    return None


def _puback_error(data: bytes) -> str | None:
    """Why a JetStream publish acknowledgement is not one, or None."""
    try:
        ack = _decode_puback(data)
    except msgspec.DecodeError:
        return "the reply is not a JetStream acknowledgement"
    if ack.error is not None:
        return f"JetStream refused the message: {ack.error.get('description', ack.error)}"
    if ack.seq <= 0:
        return "the reply is not a JetStream acknowledgement"
    return None
