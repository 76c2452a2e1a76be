"""Following the bucket: complete snapshots, then every change, with a watch that cannot die silently.

nats-py's KV watch decides that its snapshot is complete from the consumer's pending count alone,
which a consumer placed on a lagging replica (or created while the server still counts) reports
as 0 too early: snapshots came back short or empty. Here completeness is decided from the
stream's own state: before a snapshot, the stream leader names the newest message matching the
pattern (the horizon); the snapshot is complete only once a delivery at or past the horizon has
arrived with nothing pending behind it.

Each watch is an ordered push consumer (no acks, memory storage, one replica, flow control) with
an idle heartbeat. It is declared lost, and the bucket is watched again from a fresh snapshot,
when nothing (message or heartbeat) arrives for STALLED_AFTER seconds, when a delivery or a
heartbeat shows a gap in the consumer sequence, when the server reports a status, or when the
connection reconnects. A fresh snapshot re-yields every live record and retires only the keys it
no longer holds, so live routes stay up while a watch is re-established.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import itertools
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from service import log, subscriptions, timers
from service.errors import Unavailable
from service.jetstream import JetStream

HEARTBEAT = 0.5  # seconds between the server's idle heartbeats on a watch
STALLED_AFTER = 1.5  # a watch that delivered nothing, not even a heartbeat, for this long is lost
READ_ATTEMPTS = 3  # fresh consumers a one-shot read tries before it is a 503
_INACTIVE = 10.0  # the server removes a consumer whose subscriber went away after this long
_RETRY_MIN, _RETRY_MAX = 0.1, 1.0  # seconds between attempts to watch a failing bucket again
_APPLY_AGAIN = 1.0  # seconds between attempts at changes that failed to apply
_PLACEMENTS = 4  # attempts at placing the spare consumer on another server than the first
_NS = 1_000_000_000
_log = log.get("follower")
C = TypeVar("C")


class WatchLost(Exception):
    """The watch's consumer stopped delivering, skipped a message, or lost its connection."""


class Delivery:
    """One message of the bucket as a watch delivered it."""

    __slots__ = ("data", "deleted", "key", "pending", "seq", "time_ns")

    def __init__(self, key: str, seq: int, pending: int, data: bytes, deleted: bool, time_ns: int) -> None:
        self.key, self.seq, self.pending = key, seq, pending
        self.data, self.deleted, self.time_ns = data, deleted, time_ns


class OrderedConsumer:
    """One ephemeral ordered push consumer over a bucket's keys, checked delivery by delivery."""

    def __init__(self, js: JetStream, prefix: str) -> None:
        self._js = js
        self._nc: Client = js.nc
        self._prefix = prefix
        self._queue: collections.deque[Msg] = collections.deque()
        self._arrived = asyncio.Event()
        self._cseq = 0
        self._name = ""
        self._sub: subscriptions.DirectSubscription | None = None
        self.node = ""  # the server that holds the consumer (clustered JetStream)

    async def start(self, key_pattern: str, deliver_policy: str, start_seq: int = 0) -> None:
        """Create the consumer and subscribe to its deliveries (from `start_seq` when given)."""
        inbox = self._nc.new_inbox()
        self._name = inbox.rsplit(".", 1)[-1]
        self._sub = await subscriptions.subscribe(self._nc, inbox, self)
        config = {
            "name": self._name,
            "deliver_subject": inbox,
            "deliver_policy": "by_start_sequence" if start_seq else deliver_policy,
            "ack_policy": "none",
            "max_deliver": 1,
            "filter_subject": self._prefix + key_pattern,
            "replay_policy": "instant",
            "flow_control": True,
            "idle_heartbeat": int(HEARTBEAT * _NS),
            "inactive_threshold": int(_INACTIVE * _NS),
            "mem_storage": True,
            "num_replicas": 1,
        }
        if start_seq:
            config["opt_start_seq"] = start_seq
        stream = self._js.stream
        request = {"stream_name": stream, "config": config}
        info = await self._js.api(f"CONSUMER.CREATE.{stream}.{self._name}", request)
        self.node = str((info.get("cluster") or {}).get("leader") or "")

    def put_nowait(self, msg: Msg) -> None:
        """A delivery, as the client parses it (service.subscriptions)."""
        self._queue.append(msg)
        self._arrived.set()

    async def next(self) -> Delivery:
        """The next delivery; WatchLost when the watch can no longer be trusted."""
        while True:
            if not self._queue:
                self._arrived.clear()
                try:
                    async with asyncio.timeout(STALLED_AFTER):  # no task per wait, as wait_for makes
                        await self._arrived.wait()
                except TimeoutError:
                    raise WatchLost(f"nothing arrived for {STALLED_AFTER}s") from None
            msg = self._queue.popleft()
            headers = msg.headers
            if headers and "Status" in headers:
                await self._control(msg, headers)
                continue
            tokens = msg.reply.split(".")
            base = 2 if len(tokens) == 9 else 4  # $JS.ACK.<stream>... or $JS.ACK.<domain>.<hash>.<stream>...
            cseq = int(tokens[base + 4])
            if cseq != self._cseq + 1:
                raise WatchLost(f"consumer sequence jumped from {self._cseq} to {cseq}")
            self._cseq = cseq
            operation = headers.get("KV-Operation") if headers else None
            return Delivery(
                key=msg.subject[len(self._prefix) :],
                seq=int(tokens[base + 3]),
                pending=int(tokens[base + 6]),
                data=msg.data,
                deleted=operation in ("DEL", "PURGE") or bool(headers and "Nats-Marker-Reason" in headers),
                time_ns=int(tokens[base + 5]),
            )

    async def _control(self, msg: Msg, headers: dict[str, str]) -> None:
        status = headers["Status"]
        if status != "100":
            raise WatchLost(f"the server reported {status} {headers.get('Description', '')}".strip())
        if msg.reply:  # a flow-control request: everything before it has been taken in
            await self._nc.publish(msg.reply, b"")
        stalled = headers.get("Nats-Consumer-Stalled")
        if stalled:
            await self._nc.publish(stalled, b"")
        last = headers.get("Nats-Last-Consumer")
        if last is not None and int(last) != self._cseq:
            raise WatchLost(f"heartbeat says {last} delivered, {self._cseq} received")

    async def stop(self) -> None:
        """Unsubscribe and ask the server to remove the consumer (it goes by itself when inactive)."""
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._sub.unsubscribe()
            self._sub = None
            if self._nc.is_connected:
                with contextlib.suppress(nats.errors.Error):
                    await self._nc.publish(
                        f"$JS.API.CONSUMER.DELETE.{self._js.stream}.{self._name}",
                        b"",
                        reply=self._nc.new_inbox(),
                    )


async def watch(js: JetStream, prefix: str, key_pattern: str) -> AsyncGenerator[Delivery | None, None]:
    """One watch: the newest message of every key, None once that snapshot is complete, then changes.

    After the snapshot of a replicated bucket a second consumer follows the same keys, so that
    the loss of the node holding one consumer costs nothing: the other goes on, duplicates are
    dropped by stream sequence, and a replacement is started in the background (which needs the
    JetStream meta leader, itself re-elected after a node loss). Ends with WatchLost when no consumer is left,
    Unavailable when JetStream cannot say where the snapshot ends.
    """
    horizon = await js.horizon(prefix + key_pattern)
    replicated = await js.replicated()
    primary = OrderedConsumer(js, prefix)
    try:
        await primary.start(key_pattern, "last_per_subject")
        position = 0
        if horizon > 0:
            while True:
                delivery = await primary.next()
                position = delivery.seq
                yield delivery
                if delivery.seq >= horizon and delivery.pending == 0:
                    break
        yield None
        if not replicated:  # the stream lives on one server: a spare consumer would go with it
            while True:
                yield await primary.next()
    except BaseException:
        await primary.stop()
        raise
    async with _Pair(js, prefix, key_pattern, primary) as pair:
        while True:
            delivery = await pair.next(position)
            position = delivery.seq
            yield delivery


class _Pair:
    """Two consumers of the same keys, merged in stream order; a lost one is replaced."""

    def __init__(self, js: JetStream, prefix: str, key_pattern: str, first: OrderedConsumer) -> None:
        self._js, self._prefix, self._pattern = js, prefix, key_pattern
        self._merged: asyncio.Queue[Delivery | WatchLost] = asyncio.Queue()
        self._readers: dict[asyncio.Task[None], OrderedConsumer] = {}
        self._position = 0
        self._stopping: set[asyncio.Task[None]] = set()
        self._read(first)
        self._spare: asyncio.Task[None] | None = None

    async def __aenter__(self) -> _Pair:
        self._spare = asyncio.create_task(self._add_spare())
        return self

    async def __aexit__(self, *exc: object) -> None:
        tasks = [*self._readers, *([self._spare] if self._spare else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(c.stop() for c in self._readers.values()), return_exceptions=True)

    def _read(self, consumer: OrderedConsumer) -> None:
        async def pump() -> None:
            try:
                while True:
                    self._merged.put_nowait(await consumer.next())
            except WatchLost as exc:
                self._merged.put_nowait(exc)

        task = asyncio.create_task(pump())
        self._readers[task] = consumer
        task.add_done_callback(lambda done: self._ended(done))

    def _ended(self, task: asyncio.Task[None]) -> None:
        consumer = self._readers.pop(task, None)
        if consumer is not None:
            stopping = asyncio.get_running_loop().create_task(consumer.stop())
            self._stopping.add(stopping)
            stopping.add_done_callback(self._stopping.discard)

    async def _add_spare(self) -> None:
        """Start a consumer from just after what was yielded, retrying until JetStream answers."""
        pause = _RETRY_MIN
        for attempt in range(1, 1_000_000):
            consumer = OrderedConsumer(self._js, self._prefix)
            try:
                await consumer.start(self._pattern, "by_start_sequence", self._position + 1)
            except Exception as exc:
                await consumer.stop()
                _log.info("spare watch not started yet", keys=self._pattern, reason=str(exc))
                await asyncio.sleep(pause)
                pause = min(pause * 2, _RETRY_MAX)
                continue
            taken = {c.node for c in self._readers.values()}
            if consumer.node and consumer.node in taken and attempt < _PLACEMENTS:
                await consumer.stop()  # on the same server as the other: one node loss would take both
                continue
            self._read(consumer)
            return

    async def next(self, position: int) -> Delivery:
        """The next delivery after `position` from either consumer; WatchLost when both are lost."""
        self._position = position
        while True:
            item = await self._merged.get()
            if isinstance(item, WatchLost):
                if not any(not t.done() for t in self._readers):
                    raise item
                _log.info("one of two watches lost; the other goes on", keys=self._pattern, reason=str(item))
                if self._spare is None or self._spare.done():
                    self._spare = asyncio.create_task(self._add_spare())
                continue
            if item.seq > position:
                return item


async def read(js: JetStream, prefix: str, key_pattern: str, *, history: bool = False) -> list[Delivery]:
    """Every key's newest message (or, with `history`, every message), complete as of the call.

    A consumer that stops delivering (its node went away) is replaced by a fresh one; after
    READ_ATTEMPTS the read is a 503, never a shorter answer.
    """
    for _ in range(READ_ATTEMPTS):
        horizon = await js.horizon(prefix + key_pattern)
        if horizon == 0:
            return []
        found: dict[str, Delivery] = {}
        found_all: list[Delivery] = []
        consumer = OrderedConsumer(js, prefix)
        try:
            await consumer.start(key_pattern, "all" if history else "last_per_subject")
            while True:
                delivery = await consumer.next()
                if history:
                    found_all.append(delivery)
                else:
                    found.pop(delivery.key, None)  # a later revision of a key replaces the earlier one
                    found[delivery.key] = delivery
                if delivery.seq >= horizon and delivery.pending == 0:
                    return found_all if history else list(found.values())
        except WatchLost as exc:
            _log.info("read lost its consumer; reading again", keys=key_pattern, reason=str(exc))
        finally:
            await consumer.stop()
    raise Unavailable("the trigger store did not deliver a complete answer")


class Follower(Generic[C]):
    """The state of one follow: how far it has applied the bucket."""

    def __init__(self) -> None:
        self.position = 0  # the stream sequence of the newest change applied
        # (seq, tiebreak, future) of every `reached` waiting, soonest first: an advance wakes only
        # the waiters it satisfies (waking them all made 64 creates in flight cost O(64) each)
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._tiebreak = itertools.count()

    def advance(self, seq: int) -> None:
        """Record that the change at `seq` was applied."""
        if seq > self.position:
            self.position = seq
            waiters = self._waiters
            while waiters and waiters[0][0] <= seq:
                waiter = heapq.heappop(waiters)[2]
                if not waiter.done():
                    waiter.set_result(None)

    async def reached(self, seq: int, within: float) -> None:
        """Return once the change at `seq` (or a later one) is applied; Unavailable after `within` s."""
        if self.position >= seq:
            return
        waiter = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (seq, next(self._tiebreak), waiter))
        timer = timers.fail_after(
            waiter, within, Unavailable, "the service has not caught up with the trigger store"
        )
        try:
            await waiter
        finally:
            timer.cancel()
            waiter.cancel()  # a no-op once resolved; a cancelled waiter is dropped by a later advance


Apply = Callable[[C], Awaitable[None]]


@dataclass(frozen=True)
class Keys(Generic[C]):
    """What a follower follows: the keys of a bucket matching a pattern, and how to read a change."""

    js: JetStream
    prefix: str  # the bucket's subject prefix, `$KV.<bucket>.`
    pattern: str
    decode: Callable[[Delivery], C]
    retire: Callable[[str, int], C]  # the change that says a key is no longer live at a revision
    is_live: Callable[[C], bool]


async def follow(
    keys: Keys[C], on_ready: Callable[[], Awaitable[None]] | None = None
) -> AsyncGenerator[tuple[C, int], None]:
    """(change, seq) for every live key matching `keys.pattern`, then for every later change, forever.

    `on_ready` is awaited once, when the first complete snapshot has been yielded. When a watch
    is lost, JetStream fails, or the consumer throws an exception in at a change (`athrow`), the
    bucket is watched again from a fresh snapshot: its records are yielded again, and a key
    yielded as live but missing from it is yielded as `retire(key, revision)`. Until the first
    snapshot is complete, failures are logged and retried (a start-up waits for the bucket).
    """
    live: dict[str, int] = {}  # key -> revision of the change last yielded as live
    loaded = False
    retry = _RETRY_MIN
    while True:
        loading, snapshot, newest = True, set(), 0
        try:
            async with contextlib.aclosing(watch(keys.js, keys.prefix, keys.pattern)) as deliveries:
                async for delivery in deliveries:
                    if delivery is None:  # the snapshot is complete
                        # A missing key stopped being live before `newest`: a revision that
                        # retires its route but is older than any later record of the key.
                        for key in [key for key in live if key not in snapshot]:
                            yield keys.retire(key, max(newest, live.pop(key))), 0
                        loading, retry = False, _RETRY_MIN
                        if not loaded:
                            if on_ready is not None:
                                await on_ready()
                            loaded = True
                        continue
                    if loading:
                        snapshot.add(delivery.key)
                        newest = max(newest, delivery.seq)
                    change = keys.decode(delivery)
                    if keys.is_live(change):
                        live[delivery.key] = delivery.seq
                    else:
                        live.pop(delivery.key, None)
                    yield change, delivery.seq
        except (WatchLost, Unavailable) as exc:
            log_ = _log.info if loaded else _log.warning
            log_(
                "watching the bucket again" if loaded else "waiting for the trigger bucket",
                keys=keys.pattern,
                reason=str(exc),
            )
        except Exception as exc:
            _log.exception(
                "following the bucket failed; watching it again", keys=keys.pattern, error=str(exc)
            )
        await asyncio.sleep(retry)
        retry = min(retry * 2, _RETRY_MAX)


@contextlib.asynccontextmanager
async def following(
    keys: Keys[C], applies: Sequence[Apply[C]], on_ready: Callable[[], Awaitable[None]] | None = None
) -> AsyncIterator[Follower[C]]:
    """Apply every change of `follow(...)` with each of `applies` (data planes sharing one watch),
    in a task; entered once the first snapshot is applied.

    A change that fails to apply (NATS did not confirm a subscription, a record the data plane
    cannot carry) is logged and tried again every second, by the data plane that failed, until
    it, or a newer change of its key, applies; it never holds up the changes of other keys or
    the other data planes. Leaving stops the tasks.
    """
    follower: Follower[C] = Follower()
    loaded = asyncio.get_running_loop().create_future()

    async def ready() -> None:
        if on_ready is not None:
            await on_ready()
        loaded.set_result(None)

    # (data plane, key) -> the key's newest change, which that data plane failed to apply: tried again
    pending: dict[tuple[int, str], C] = {}

    async def attempt(plane: int, change: C, again: bool = False) -> None:
        failed = (plane, str(getattr(change, "key", "")))
        if again and pending.get(failed) is not change:
            return  # a newer change of the key came meanwhile
        try:
            await applies[plane](change)
        except Exception as exc:
            if not again:
                _log.warning(
                    "could not apply a change; trying it again", key=failed[1], error=str(exc) or repr(exc)
                )
                pending[failed] = change
        else:
            if not again or pending.get(failed) is change:
                pending.pop(failed, None)

    async def run() -> None:
        changes = follow(keys, ready)
        planes = range(len(applies))
        async with contextlib.aclosing(changes):
            async for change, seq in changes:
                for plane in planes:
                    await attempt(plane, change)  # one failing key never holds up the others
                follower.advance(seq)

    async def retry() -> None:
        while True:
            await asyncio.sleep(_APPLY_AGAIN)
            for (plane, _), change in list(pending.items()):
                await attempt(plane, change, again=True)

    task = asyncio.create_task(run(), name=f"follow {keys.pattern}")
    retrying = asyncio.create_task(retry(), name=f"apply again {keys.pattern}")
    try:
        await asyncio.wait({task, loaded}, return_when=asyncio.FIRST_COMPLETED)
        if not loaded.done():
            task.result()  # the follow ended before loading: its error
            raise Unavailable(f"stopped following {keys.pattern} before loading it")
        yield follower
    finally:
        await _stop(retrying)
        await _stop(task)
        loaded.cancel()


async def _stop(task: asyncio.Task[None]) -> None:
    """Cancel `task` until it is done: nats-py swallows a cancellation that lands in a publish."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.5)
    if not task.cancelled():
        task.exception()  # retrieved: the start-up already reported it
