"""Change events: every change of a trigger record, published once on the bus, whichever replica made it.

Layout. Every event is a message on `<prefix>.events.<account>.<trigger_type>.<name>` whose JSON
body is an `Event`, stored in the JetStream stream `TRIGGER_EVENTS_<bucket>_<prefix>` (the record of the
events: a late watcher reads it from a stream sequence or a time) and republished by that stream
to the same subject for plain NATS subscribers. The replicas never publish on that subject
themselves: they publish to `<prefix>.events-in.<bucket>.<account>.<type>.<name>`, which only the
stream captures; the stream's subject transform stores the message under `<prefix>.events.…`
and its RePublish sends each *stored* message on once (nats-server republishes after the store
and only from the stream leader, never a duplicate it refused), so a subscriber sees one message
per change however many replicas published it.

Exactly once. Every replica follows the bucket's log, every revision of the trigger keys in
order, and publishes one event per revision with two guards: `Nats-Msg-Id: <key>:<revision>`
(the stream's duplicate window) and `Nats-Expected-Last-Subject-Sequence`, the stream sequence
of the key's previous event, so that a replica behind the others (by any amount of time) is
refused rather than stored twice; refused, it reads the key's last event and goes on. Since
every replica publishes in log order, the stream holds the events of every revision up to the
newest one it holds: a replica that (re)starts begins after that revision, not with a replay.
Should every event have aged out of the stream, a watermark says where the log was shipped to
(`<prefix>.events-mark.<bucket>`, one message that never expires), and the stream's metadata says
from which bucket revision on the stream exists (revisions before are not events).

Why not a controller over the newest state (`follower.following`): a snapshot re-yields every
live record at every start and after every lost watch, and it folds the revisions a gap held
into the newest one. Both are right for a data plane (the newest state is what must be live)
and wrong for events: a re-yield after the 2-minute duplicate window would be stored again, a
folded revision would never be an event. So this is a log follower on the same ordered consumer
(service.follower.OrderedConsumer), with the stream itself as the state it reconciles.

"After it is stored and live": the event of a stream trigger's revision is published once this
replica's carrier has applied that revision (or tried to, for at most LIVE_WITHIN seconds); a
gateway trigger is live on the sidecars, which follow the bucket on their own, within a second.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Literal

import msgspec
import nats.errors

from service import log
from service.config import Settings
from service.errors import Unavailable
from service.follower import Follower, OrderedConsumer, WatchLost, read
from service.jetstream import (
    ATTEMPT_TIMEOUT,
    DUPLICATE_IN_PROCESS,
    EXPECTED_LAST_SUBJECT_SEQUENCE,
    MSG_ID,
    STREAM_NOT_FOUND,
    WRITE_DEADLINE,
    WRONG_LAST_SEQUENCE,
    BucketMissing,
    JetStream,
    JetStreamError,
    NoAnswer,
    request_once,
)
from service.store import DUPLICATE_WINDOW, Change, TriggerStore, split_key

TRIGGER_KEYS = "*.*.*"  # every trigger key; internal keys (`=route.…`) match too and are skipped
LIVE_WITHIN = 2.0  # seconds an event waits for this replica's carrier to apply its revision
START_REVISION = "trigger_bucket_revision"  # stream metadata: bucket revisions up to it are not events
EXPECTED_LAST_SEQUENCE = "Nats-Expected-Last-Sequence"
_STREAM_NAME_IN_USE = 10058  # the stream exists with another configuration (another replica made it)
# JetStream cannot place a new stream now (no quorum, peers down, busy): not a wrong configuration.
_PLACEMENT_NOT_NOW = frozenset({10004, 10005, 10007, 10008, 10009, 10023, 10039, 10076, 10118})
_NEVER = frozenset({10052})  # "invalid ..." comes with code 500, but asking again will not help
_CONFLICT_ATTEMPTS = 3
_RETRY_PAUSE = 0.1
_RETRY_MIN, _RETRY_MAX = 0.1, 2.0
_NS = 1_000_000_000
_log = log.get("events")

Kind = Literal["created", "updated", "disabled", "enabled", "deleted"]


class Event(msgspec.Struct, kw_only=True, frozen=True):
    """One change of one trigger, as published on `<prefix>.events.<account>.<type>.<name>`."""

    kind: Kind
    revision: int  # the record's revision in the bucket (as `get`, `history` and updates use it)
    time: str  # when the revision was stored, RFC 3339 UTC
    account: str
    trigger_type: str
    name: str
    record: msgspec.Raw | None  # the record exactly as stored; null when the key was removed outright


class _Peek(msgspec.Struct):
    """The fields of a stored record that decide an event's kind."""

    type: str = ""
    enabled: bool = True  # left out of a record while it is true


class _EventPeek(msgspec.Struct):
    revision: int
    kind: str = ""
    record: _Peek | None = None


class _Mark(msgspec.Struct):
    revision: int


_encode = msgspec.json.Encoder().encode
_decode_peek = msgspec.json.Decoder(_Peek).decode
_decode_event = msgspec.json.Decoder(_EventPeek).decode
_decode_mark = msgspec.json.Decoder(_Mark).decode
_SILENCE = {  # what a retried publish says while no answer comes, by NoAnswer.kind
    "no responders": "the change-events stream has no leader",
    "timeout": "JetStream did not acknowledge the event",
    "not connected": "not connected to NATS",
}


@dataclass(frozen=True)
class _Shipped:
    """The newest event of one key in the stream."""

    revision: int
    seq: int  # its stream sequence: the compare-and-set of the key's next event
    enabled: bool
    live: bool


class EventsStreamMismatch(RuntimeError):
    """The events stream exists but does not capture what this service publishes."""


def kind_of(record_type: str | None, enabled: bool, enabled_before: bool | None) -> Kind:
    """The kind of a change: `record_type` None when the key was removed outright; `enabled_before`
    None when the previous revision is not known (or there is none)."""
    if record_type is None or record_type == "deleted":
        return "deleted"
    if record_type == "created":
        return "created"
    if enabled_before is not None and enabled != enabled_before:
        return "enabled" if enabled else "disabled"
    return "updated"


def stream_name(bucket: str, prefix: str) -> str:
    """The events stream of a bucket under one API prefix (two prefixes on one bucket, two streams)."""
    return f"TRIGGER_EVENTS_{bucket}_{prefix.replace('.', '_')}"


def event_subject(prefix: str, key: str) -> str:
    """Where the event of a trigger key is published (and stored): `<prefix>.events.<key>`."""
    return f"{prefix}.events.{key}"


def ingest_subject(prefix: str, bucket: str, key: str) -> str:
    """Where the replicas publish the event of a key: captured by the events stream only."""
    return f"{prefix}.events-in.{bucket}.{key}"


def mark_subject(prefix: str, bucket: str) -> str:
    """The events stream's watermark: the newest bucket revision that was published as an event."""
    return f"{prefix}.events-mark.{bucket}"


def stream_config(settings: Settings, start_revision: int) -> dict[str, Any]:
    """The events stream's configuration; bucket revisions up to `start_revision` are not events."""
    prefix, bucket = settings.prefix, settings.bucket
    max_age = settings.events_max_age
    return {
        "name": stream_name(bucket, prefix),
        "description": "Trigger Service change events",
        "subjects": [f"{prefix}.events-in.{bucket}.>", mark_subject(prefix, bucket)],
        "subject_transform": {"src": f"{prefix}.events-in.{bucket}.>", "dest": f"{prefix}.events.>"},
        "republish": {"src": f"{prefix}.events.>", "dest": f"{prefix}.events.>"},
        "retention": "limits",
        "discard": "old",
        "storage": "file",
        "num_replicas": settings.replicas,
        "max_age": int(max_age * _NS),
        "duplicate_window": int(min(DUPLICATE_WINDOW, max_age) * _NS),
        "allow_msg_ttl": True,  # the watermark never expires (`Nats-TTL: never`)
        "allow_rollup_hdrs": True,  # and is one message (`Nats-Rollup: sub`)
        "metadata": {START_REVISION: str(start_revision)},
    }


def _rfc3339(time_ns: int) -> str:
    moment = datetime.fromtimestamp(time_ns / 1e9, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _shipped(seq: int, data: bytes) -> _Shipped | None:
    """What a stored event says about its key; None for a message that is not an event."""
    try:
        event = _decode_event(data)
    except msgspec.DecodeError:
        return None
    record = event.record
    return _Shipped(
        event.revision,
        seq,
        record.enabled if record is not None else True,
        event.kind != "deleted",
    )


class ChangeEvents:
    """Publishes one event for every revision of every trigger key, in the bucket's order."""

    def __init__(self, settings: Settings, store: TriggerStore, live: Follower[Change] | None = None) -> None:
        self._settings = settings
        self._store = store
        self._live = live  # the carrier's follower: an event waits until it applied the revision
        self.stream = stream_name(store.bucket, settings.prefix)
        self._events = JetStream(store.js.nc, self.stream)
        self._nc = store.js.nc
        self._prefix = settings.prefix
        self._shipped: dict[str, _Shipped] = {}  # key -> its newest event in the stream, as known here
        self.position = 0  # the bucket revision handled last (published, found published, or skipped)
        self._task: asyncio.Task[None] | None = None
        self._following: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def open(self, start_revision: int | None = None) -> None:
        """Bind the events stream, creating it when missing (another replica may race to it)."""
        for _ in range(5):
            try:
                info = await self._events.info()
                break
            except BucketMissing:
                pass
            if start_revision is None:  # a new stream: what the bucket holds already is no event
                bucket = await self._store.js.info()
                start_revision = int((bucket.get("state") or {}).get("last_seq") or 0)
            config = stream_config(self._settings, start_revision)
            try:
                info = await self._events.api(f"STREAM.CREATE.{self.stream}", config, WRITE_DEADLINE)
                _log.info("created the change-events stream", stream=self.stream, start=start_revision)
                break
            except JetStreamError as exc:
                if exc.err_code == _STREAM_NAME_IN_USE:
                    continue  # another replica created it first: bind it
                if exc.err_code in _PLACEMENT_NOT_NOW:  # start-up waits (app.wait_for) and tries again
                    raise Unavailable(
                        f"the change-events stream cannot be placed yet: {exc.description}"
                    ) from None
                raise EventsStreamMismatch(
                    f"could not create the change-events stream {self.stream}: {exc.description}"
                ) from None
        else:
            raise Unavailable(f"could not create or bind the change-events stream {self.stream}")
        self._check(info.get("config") or {})

    def _check(self, config: dict[str, Any]) -> None:
        wanted = stream_config(self._settings, 0)
        if wanted["subjects"][0] not in (config.get("subjects") or []):
            raise EventsStreamMismatch(
                f"the stream {self.stream} does not capture {wanted['subjects'][0]} (made for another "
                "TRIGGER_PREFIX?): delete it or set TRIGGER_PREFIX to match"
            )
        if int(config.get("max_age") or 0) != wanted["max_age"]:
            _log.warning(
                "the change-events stream keeps its own max age; TRIGGER_EVENTS_MAX_AGE applies to "
                "a stream the service creates",
                stream=self.stream,
                max_age_s=int(config.get("max_age") or 0) / _NS,
            )

    async def __aenter__(self) -> ChangeEvents:
        """Start publishing in a task; return once it follows the bucket's log (every change from
        now on becomes an event of this replica too)."""
        self._task = asyncio.create_task(self._run(), name=f"change events {self._store.bucket}")
        try:
            await self._following
        except BaseException:
            await _stop(self._task)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop; a change not yet published is published by another replica, or after a restart."""
        if self._task is not None:
            await _stop(self._task)
            self._task = None

    # --- following the bucket's log ---------------------------------------------------------

    async def _run(self) -> None:
        retry = _RETRY_MIN
        while True:
            try:
                start = await self._sync()
                consumer = OrderedConsumer(self._store.js, self._store.prefix)
                try:
                    await consumer.start(TRIGGER_KEYS, "by_start_sequence", start + 1)
                    if not self._following.done():
                        self._following.set_result(None)
                    while True:
                        delivery = await consumer.next()
                        retry = _RETRY_MIN
                        if delivery.seq > self.position:
                            await self._ship(
                                delivery.key, delivery.seq, delivery.data, delivery.deleted, delivery.time_ns
                            )
                            self.position = delivery.seq
                finally:
                    await consumer.stop()
            except BucketMissing as exc:
                # The bucket's own stream missing fails the follower of every data plane too; the
                # events stream missing (deleted by hand) is made again from what was shipped.
                _log.warning("change events: a stream is missing", reason=str(exc))
                try:
                    await self.open(start_revision=self.position)
                except Exception as again:
                    _log.warning("change events: could not create the stream again", reason=str(again))
            except (WatchLost, Unavailable) as exc:
                log_ = _log.info if self._following.done() else _log.warning  # a start-up waits
                log_("change events: following the bucket again", reason=str(exc))
            except Exception as exc:
                _log.exception("change events failed; following the bucket again", error=str(exc))
            await asyncio.sleep(retry)
            retry = min(retry * 2, _RETRY_MAX)

    async def _sync(self) -> int:
        """Learn from the stream what was published; the bucket revision to go on after."""
        info = await self._events.info()
        metadata = (info.get("config") or {}).get("metadata") or {}
        start = int(metadata.get(START_REVISION) or 0)
        shipped: dict[str, _Shipped] = {}
        for delivery in await read(self._events, f"{self._prefix}.events.", ">"):
            found = _shipped(delivery.seq, delivery.data)
            if found is not None:
                shipped[delivery.key] = found
        self._shipped = shipped
        newest = max((s.revision for s in shipped.values()), default=0)
        mark = await self._events.last(mark_subject(self._prefix, self._store.bucket))
        marked = _mark_of(mark.data) if mark is not None else 0
        if newest > marked:  # the replica that stored the newest event stopped before marking it
            await self._mark(newest, {EXPECTED_LAST_SUBJECT_SEQUENCE: str(mark.seq if mark else 0)})
        return max(start, marked, newest, self.position)

    async def _ship(self, key: str, revision: int, data: bytes, removed: bool, time_ns: int) -> None:
        """Publish the event of one revision, unless the stream holds it (or a later one) already."""
        if key.startswith("="):
            return  # an internal key (a route claim), not a trigger
        account, trigger_type, name = split_key(key)
        record_type: str | None = None
        enabled = True
        if not removed and data:
            try:
                peek = _decode_peek(data)
            except msgspec.DecodeError:
                _log.warning("no event for an undecodable record", key=key, revision=revision)
                return
            record_type, enabled = peek.type, peek.enabled
        before = self._shipped.get(key)
        if record_type is None and before is not None and not before.live:
            return  # a deleted trigger's key removed outright: nothing changed for the trigger
        if record_type not in (None, "deleted", "created") and before is None:
            before = await self._previous(key, revision)  # its events aged out: ask the bucket
        kind = kind_of(record_type, enabled, before.enabled if before is not None else None)
        if self._live is not None and trigger_type == "stream":
            try:
                await self._live.reached(revision, LIVE_WITHIN)
            except Unavailable:
                _log.info("publishing an event before the carrier applied it", key=key, revision=revision)
        event = Event(
            kind=kind,
            revision=revision,
            time=_rfc3339(time_ns),
            account=account,
            trigger_type=trigger_type,
            name=name,
            record=msgspec.Raw(data) if record_type is not None else None,
        )
        payload = _encode(event)
        subject = ingest_subject(self._prefix, self._store.bucket, key)
        for _ in range(_CONFLICT_ATTEMPTS):
            last = self._shipped.get(key)
            if last is not None and last.seq > 0 and last.revision >= revision:
                _log.debug("event already published", key=key, revision=revision)
                return
            headers = {
                MSG_ID: f"{key}:{revision}",
                EXPECTED_LAST_SUBJECT_SEQUENCE: str(last.seq if last is not None else 0),
            }
            try:
                seq, duplicate = await self._publish(subject, payload, headers)
            except _Refused:
                # Another replica published this key's event (or a later one): read what it holds.
                stored = await self._events.last(event_subject(self._prefix, key))
                found = _shipped(stored.seq, stored.data) if stored is not None else None
                if found is None:
                    self._shipped.pop(key, None)
                else:
                    self._shipped[key] = found
                continue
            except JetStreamError as exc:
                _log.error(
                    "the events stream refused an event; it is not published",
                    key=key,
                    revision=revision,
                    error=exc.description,
                )
                return
            self._shipped[key] = _Shipped(revision, seq, enabled, kind != "deleted")
            if not duplicate:
                _log.debug("event published", key=key, revision=revision, kind=kind, seq=seq)
                await self._mark(revision, {EXPECTED_LAST_SEQUENCE: str(seq)})
            return
        raise Unavailable(f"the event of {key} at revision {revision} kept meeting other replicas' events")

    async def _previous(self, key: str, revision: int) -> _Shipped | None:
        """The key's revision before `revision`, from the bucket's history (None: there is none)."""
        earlier = [
            d for d in await read(self._store.js, self._store.prefix, key, history=True) if d.seq < revision
        ]
        if not earlier:
            return None
        newest = earlier[-1]
        if newest.deleted or not newest.data:
            return _Shipped(newest.seq, 0, True, False)
        try:
            peek = _decode_peek(newest.data)
        except msgspec.DecodeError:
            return None
        return _Shipped(newest.seq, 0, peek.enabled, peek.type != "deleted")

    async def _publish(self, subject: str, payload: bytes, headers: dict[str, str]) -> tuple[int, bool]:
        """Store one event: (stream sequence, duplicate); _Refused when the key's last event is not
        the one `headers` expect; Unavailable when JetStream did not answer in time (retried)."""
        give_up = time.monotonic() + WRITE_DEADLINE
        reason = "JetStream did not answer"
        while True:
            remaining = give_up - time.monotonic()
            if remaining <= 0:
                raise Unavailable(f"the change-events stream is not available ({reason})")
            outcome = await request_once(self._nc, subject, payload, min(ATTEMPT_TIMEOUT, remaining), headers)
            if isinstance(outcome, NoAnswer):
                # After a timeout it may have been stored: the same headers again are then refused
                # (or a duplicate).
                reason = _SILENCE[outcome.kind]
            elif not isinstance(outcome, JetStreamError):
                return int(outcome["seq"]), bool(outcome.get("duplicate"))
            elif outcome.err_code in WRONG_LAST_SEQUENCE:
                raise _Refused(outcome.description)
            elif outcome.err_code == STREAM_NOT_FOUND:
                raise BucketMissing("the change-events stream does not exist")
            elif outcome.err_code == DUPLICATE_IN_PROCESS:
                reason = "another replica's publish of this event is still being committed"
            elif outcome.err_code in _NEVER or outcome.code not in (408, 500, 503):
                raise outcome
            else:
                reason = outcome.description
            await asyncio.sleep(min(_RETRY_PAUSE, max(0.0, give_up - time.monotonic())))

    async def _mark(self, revision: int, condition: dict[str, str]) -> None:
        """Move the watermark to `revision` if `condition` holds (fire and forget: a later event or
        the next start moves it too)."""
        headers = {"Nats-TTL": "never", "Nats-Rollup": "sub", **condition}
        try:
            await self._nc.publish(
                mark_subject(self._prefix, self._store.bucket), _encode(_Mark(revision)), headers=headers
            )
        except nats.errors.Error as exc:
            _log.info("change events: watermark not written", revision=revision, reason=str(exc))


class _Refused(Exception):
    """The stream refused an event: the key's last event there is not the one expected."""


def _mark_of(data: bytes) -> int:
    try:
        return _decode_mark(data).revision
    except msgspec.DecodeError:
        return 0


async def _stop(task: asyncio.Task[None]) -> None:
    """Cancel `task` until it is done: nats-py swallows a cancellation that lands in a publish."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.5)
    if not task.cancelled():
        task.exception()  # retrieved: it was logged already
