"""The trigger records in a JetStream KV bucket: the only module that talks to JetStream.

Key layout: `<account>.<trigger_type>.<name>`, one key per trigger. Every write is a
compare-and-set (create-if-absent, or update at the last revision), so concurrent writers never
overwrite each other. A delete is a poison pill: a new revision whose record has
`type: deleted`, so the key's history keeps the whole life of the trigger.

Reads of one key go to the stream leader (read-after-write); lists and histories are complete
snapshots (service.follower.read). A write whose acknowledgement was lost is settled before the
reply (service.jetstream); one that cannot be settled in time is answered 504 "outcome unknown"
and then compensated in the background: a create is removed again should the store commit it
later, a delete is completed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import api

from schemas.triggers import Trigger
from service import log
from service.errors import Conflict, NotFound, StaleRevision, Unavailable
from service.follower import Delivery, Follower, Keys, following, read
from service.jetstream import (
    WRITE_DEADLINE,
    BucketMissing,
    JetStream,
    OutcomeUnknown,
    WrongLastSequence,
    unbounded,
)

HISTORY = 64
DUPLICATE_WINDOW = 120.0  # seconds: how long JetStream may still commit a write it did not acknowledge
_SETTLE_PAUSE = 0.5
# Seconds a claim whose holder is not stored may still belong to a create under way: the create's
# whole budget (jetstream.OPERATION_DEADLINE) and a margin for clocks a little apart.
CLAIM_UNDER_WAY = 10.0
_WRITTEN_KEPT = 1024  # records of this process's own newest writes kept for its followers
_log = log.get("store")
_encode = msgspec.json.Encoder().encode
_decode_record = msgspec.json.Decoder(Trigger).decode


def _as_stored(record: Trigger) -> Trigger:
    """A record as stored: without `revision`, which only replies carry (the store assigns it)."""
    return msgspec.structs.replace(record, revision=None) if record.revision is not None else record


def key_of(account: str, trigger_type: str, name: str) -> str:
    """The KV key of one trigger."""
    return f"{account}.{trigger_type}.{name}"


def split_key(key: str) -> tuple[str, str, str]:
    """(account, trigger_type, name) of a KV key."""
    account, trigger_type, name = key.split(".", 2)
    return account, trigger_type, name


def now_rfc3339() -> str:
    """The current time, RFC 3339 in UTC with milliseconds."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Change(msgspec.Struct, frozen=True):
    """One event of a followed bucket: a live record, or `record=None` when the key stopped being live."""

    key: str
    revision: int
    record: Trigger | None


Observer = Callable[[Change], None]
"""Something else that wants to see each change a follower applies (one watch, several users)."""

Apply = Callable[[Change], Awaitable[None]]
"""A data plane's way of bringing itself in line with one change it follows (idempotent)."""


class Revision(msgspec.Struct, frozen=True):
    """One stored revision of a key."""

    revision: int
    time: str
    record: Trigger


class TriggerStore:
    """Trigger records in one KV bucket."""

    def __init__(self, nc: Client, bucket: str) -> None:
        self.bucket = bucket
        self.prefix = f"$KV.{bucket}."
        self.js = JetStream(nc, f"KV_{bucket}")
        self._nc = nc
        self._settling: set[asyncio.Task[None]] = set()  # writes whose outcome is still being settled
        # The records this process wrote, by stream sequence, with their bytes, newest last: the
        # followers of this replica take a record from here instead of decoding it again when the
        # delivery at that sequence holds the same bytes (a bucket made again restarts its
        # sequences). A create waits for its follower, so the delivery comes within moments.
        self._written: dict[int, tuple[bytes, Trigger]] = {}

    @classmethod
    async def open(cls, nc: Client, bucket: str, replicas: int = 1) -> TriggerStore:
        """Bind the bucket over `nc`, creating it when missing; an existing bucket is used as it is."""
        store = cls(nc, bucket)
        for _ in range(5):
            try:
                await store.js.info()
                return store
            except BucketMissing:
                pass
            config = api.KeyValueConfig(
                bucket=bucket,
                history=HISTORY,
                storage=api.StorageType.FILE,
                replicas=replicas,
                description="Trigger Service records",
            )
            try:
                await nc.jetstream(timeout=WRITE_DEADLINE).create_key_value(config)
                return store
            except nats.js.errors.BadRequestError:
                continue  # another replica won the race: bind it
            except (TimeoutError, nats.errors.Error, nats.js.errors.Error) as exc:
                raise Unavailable(f"could not create the KV bucket {bucket!r}: {exc}") from None
        raise Unavailable(f"could not create or bind the KV bucket {bucket!r}")

    async def close(self) -> None:
        """Wait a little for writes still being settled (a stop must not abandon a compensation)."""
        if self._settling:
            await asyncio.wait(self._settling, timeout=WRITE_DEADLINE)

    async def get(self, key: str) -> tuple[Trigger, int]:
        """The live record at `key` and its revision, read from the stream leader; NotFound when
        missing or deleted."""
        message = await self.js.last(self.prefix + key)
        if message is None or not message.data or message.headers.get("KV-Operation") in ("DEL", "PURGE"):
            raise NotFound("no such trigger")
        record = _decode_record(message.data)  # a corrupt record is an error, not a missing trigger
        if record.type == "deleted":
            raise NotFound("no such trigger")
        return record, message.seq

    async def create(self, key: str, record: Trigger) -> int:
        """Store a new trigger unless a live one holds the key (Conflict)."""
        stored = _as_stored(record)
        data = _encode(stored)
        subject = self.prefix + key
        try:
            try:
                return self._wrote(await self.js.publish(subject, data, 0), data, stored)
            except WrongLastSequence:
                pass
            # The key exists: it may only be re-used over a deleted record, at that exact revision.
            current = await self.js.last(subject)
            if current is not None and _live_record(key, current.seq, current.data, current.headers) is None:
                try:
                    return self._wrote(await self.js.publish(subject, data, current.seq), data, stored)
                except WrongLastSequence:
                    pass
        except OutcomeUnknown as exc:
            self._settle_later(exc, lambda seq: self._undo_create(key, seq, record))
            raise OutcomeUnknown(
                f"{exc.detail}; the trigger is not created: should the store commit it later, the "
                "service deletes it again, so the create can be retried",
                exc.subject,
                exc.msg_id,
            ) from None
        _, trigger_type, name = split_key(key)
        raise Conflict(f"a {trigger_type} trigger named {name!r} already exists")

    async def update(self, key: str, record: Trigger, revision: int) -> int:
        """Replace the live trigger at `key` with `record` if the key is still at `revision`; the new
        revision. StaleRevision when it moved on; OutcomeUnknown when JetStream did not tell in time
        (the update may still be stored: nothing is compensated, a get shows which revision holds)."""
        stored = _as_stored(record)
        data = _encode(stored)
        try:
            return self._wrote(await self.js.publish(self.prefix + key, data, revision), data, stored)
        except WrongLastSequence:
            raise StaleRevision(f"the trigger is no longer at revision {revision}") from None
        except OutcomeUnknown as exc:
            raise OutcomeUnknown(
                f"{exc.detail}; the update may still be stored: get the trigger to see which revision holds",
                exc.subject,
                exc.msg_id,
            ) from None

    async def claim(self, claim_key: str, owner: str, holds: Callable[[Trigger], bool]) -> bool:
        """Make `owner` the holder of `claim_key`; False when a live record still `holds` it.

        A claim is taken over at its revision, so claims need no clean-up, when its holder was
        deleted, holds something else now, or was never stored and the claim is older than
        CLAIM_UNDER_WAY: a create claims before it stores its record, so a holder not stored yet
        may be a create still under way (taking that over answered two creates 201).
        """
        for _ in range(3):
            value, revision, stored_at = await self._raw(claim_key)
            holder = (value or b"").decode()
            if holder == owner:
                return True
            if holder:
                held = await self.js.last(self.prefix + holder)
                if held is None:
                    if _age(stored_at) < CLAIM_UNDER_WAY:
                        return False
                else:
                    record = _live_record(holder, held.seq, held.data, held.headers)
                    if record is not None and holds(record):
                        return False
            if await self.put_raw(claim_key, owner.encode(), revision) is not None:
                return True
        return False

    async def mark_deleted(self, key: str) -> tuple[Trigger, int]:
        """Write the poison pill for a live trigger: (the record, the pill's revision); NotFound when
        it is missing or already deleted."""
        for _ in range(3):
            record, revision = await self.get(key)
            try:
                return record, await self._tombstone(key, record, revision)
            except WrongLastSequence:
                continue  # it changed under us: look again
            except OutcomeUnknown as exc:
                finish = functools.partial(self._finish_delete, key, revision)
                self._settle_later(exc, None, finish)
                raise OutcomeUnknown(
                    f"{exc.detail}; the service completes the delete once the store answers again",
                    exc.subject,
                    exc.msg_id,
                ) from None
        raise Conflict("the trigger changed during the delete; try again")

    async def live(self, key_pattern: str) -> list[tuple[str, Trigger]]:
        """Every live record whose key matches `key_pattern`: complete, or Unavailable."""
        return [(key, record) for key, record, _ in await self.live_revisions(key_pattern)]

    async def live_revisions(self, key_pattern: str) -> list[tuple[str, Trigger, int]]:
        """Every live record whose key matches `key_pattern`, with its revision: complete, or Unavailable."""
        found: list[tuple[str, Trigger, int]] = []
        for delivery in await read(self.js, self.prefix, key_pattern):
            record = self._change(delivery).record
            if record is not None:
                found.append((delivery.key, record, delivery.seq))
        return found

    async def history(self, key: str) -> list[Revision]:
        """Every stored revision of `key`, oldest first (complete, or Unavailable); NotFound when it
        never existed."""
        revisions = [
            Revision(d.seq, _rfc3339_ns(d.time_ns), record)
            for d in await read(self.js, self.prefix, key, history=True)
            if not d.deleted and d.data and (record := _decode_or_none(key, d.seq, d.data)) is not None
        ]
        if not revisions:
            raise NotFound("no such trigger")
        return revisions

    # Raw values under keys outside the trigger layout (a first token starting with `=`, which no
    # account name can), read and written by compare-and-set: e.g. accounts mode's claims records.

    async def get_raw(self, key: str) -> tuple[bytes | None, int]:
        """The value at `key` and its revision; (None, 0) when the key holds nothing."""
        value, revision, _ = await self._raw(key)
        return value, revision

    async def _raw(self, key: str) -> tuple[bytes | None, int, str]:
        """(value, revision, when it was stored); value None when deleted, (None, 0, "") when never."""
        message = await self.js.last(self.prefix + key)
        if message is None:
            return None, 0, ""
        if message.headers.get("KV-Operation") in ("DEL", "PURGE"):
            return None, message.seq, message.time
        return message.data, message.seq, message.time

    async def put_raw(self, key: str, value: bytes, last: int) -> int | None:
        """Write `value` if `key` is still at revision `last` (0: holds nothing); None when it moved on."""
        try:
            return await self.js.publish(self.prefix + key, value, last)
        except WrongLastSequence:
            return None

    async def raw_keys(self, key_pattern: str) -> list[str]:
        """Every key matching `key_pattern` that holds a value."""
        return [d.key for d in await read(self.js, self.prefix, key_pattern) if not d.deleted and d.data]

    def following(
        self,
        key_pattern: str,
        applies: Sequence[Apply],
        on_ready: Callable[[], Awaitable[None]] | None = None,
    ) -> contextlib.AbstractAsyncContextManager[Follower[Change]]:
        """Apply every change of the keys matching `key_pattern` with each of `applies`, one watch
        for all (see follower.following)."""
        keys = Keys(self.js, self.prefix, key_pattern, self._change, _retired, _is_live)
        return following(keys, applies, on_ready)

    # --- writes whose outcome was unknown ------------------------------------------------------

    async def _tombstone(self, key: str, record: Trigger, revision: int) -> int:
        tombstone = msgspec.structs.replace(record, type="deleted", deleted_at=now_rfc3339(), revision=None)
        data = _encode(tombstone)
        return self._wrote(await self.js.publish(self.prefix + key, data, revision), data, tombstone)

    def _wrote(self, seq: int, data: bytes, record: Trigger) -> int:
        written = self._written
        written[seq] = (data, record)
        if len(written) > _WRITTEN_KEPT:
            del written[next(iter(written))]
        return seq

    async def _undo_create(self, key: str, seq: int, record: Trigger) -> None:
        with contextlib.suppress(WrongLastSequence):  # changed since: not ours to undo any more
            await self._tombstone(key, record, seq)
            _log.warning("removed a trigger whose create was answered 504", key=key, revision=seq)

    async def _finish_delete(self, key: str, revision: int) -> None:
        with contextlib.suppress(WrongLastSequence, NotFound):
            current, now = await self.get(key)
            if now == revision:
                await self._tombstone(key, current, revision)
                _log.warning("completed a delete answered 'outcome unknown'", key=key, revision=revision)

    def _settle_later(
        self,
        exc: OutcomeUnknown,
        on_stored: Callable[[int], Awaitable[None]] | None,
        on_not_stored: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Watch for the write's outcome for as long as JetStream could still commit it."""

        async def settle() -> None:
            give_up = time.monotonic() + DUPLICATE_WINDOW
            while time.monotonic() < give_up:
                try:
                    seq = await self.js.stored_as(exc.subject, exc.msg_id)
                except Unavailable:
                    await asyncio.sleep(_SETTLE_PAUSE)
                    continue
                try:
                    if seq is not None:
                        if on_stored is not None:
                            await on_stored(seq)
                        return
                    if on_not_stored is not None:
                        await on_not_stored()
                        return
                except (Unavailable, OutcomeUnknown):
                    pass
                await asyncio.sleep(_SETTLE_PAUSE)
            _log.warning("gave up settling a write", subject=exc.subject, msg_id=exc.msg_id)

        task = asyncio.create_task(settle(), name=f"settle {exc.subject}", context=unbounded())
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    def _change(self, delivery: Delivery) -> Change:
        record = None
        if not delivery.deleted and delivery.data:
            written = self._written.get(delivery.seq)
            if written is not None and written[0] == delivery.data:
                record = written[1] if written[1].type != "deleted" else None
            else:
                record = _live_record(delivery.key, delivery.seq, delivery.data, None)
        return Change(delivery.key, delivery.seq, record)


def _retired(key: str, revision: int) -> Change:
    return Change(key, revision, None)


def _is_live(change: Change) -> bool:
    return change.record is not None


def _decode_or_none(key: str, revision: int, data: bytes) -> Trigger | None:
    try:
        return _decode_record(data)
    except msgspec.DecodeError:  # corrupt, or not a record this release understands
        _log.warning("skipping an undecodable record", key=key, revision=revision)
        return None


def _live_record(key: str, revision: int, data: bytes, headers: dict[str, str] | None) -> Trigger | None:
    """The record in a stored value when it is a live trigger; None for deletes and tombstones."""
    if headers and headers.get("KV-Operation") in ("DEL", "PURGE"):
        return None
    if not data:
        return None
    record = _decode_or_none(key, revision, data)
    if record is None or record.type == "deleted":
        return None
    return record


def _age(stored_at: str) -> float:
    """Seconds since a message's stored time (RFC 3339 as JetStream gives it); 0 when unreadable."""
    try:
        moment = datetime.fromisoformat(stored_at)
    except ValueError:
        return 0.0
    return (datetime.now(UTC) - moment).total_seconds()


def _rfc3339_ns(time_ns: int) -> str:
    moment = datetime.fromtimestamp(time_ns / 1e9, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
