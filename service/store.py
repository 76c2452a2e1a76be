"""The trigger records in a JetStream KV bucket: the only module that talks to JetStream.

Key layout: `<account>.<trigger_type>.<name>`, one key per trigger. Every write is a
compare-and-set (create-if-absent, or update at the last revision), so concurrent writers never
overwrite each other. A delete is a poison pill: a new revision whose record has
`type: deleted`, so the key's history keeps the whole life of the trigger.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import msgspec
import nats.errors
import nats.js.errors
from nats.js import JetStreamContext, api
from nats.js.kv import KeyValue

from schemas.triggers import Trigger
from service import log
from service.errors import Conflict, NotFound, Unavailable

HISTORY = 64
_log = log.get("store")
_STREAM_NOT_FOUND = 10059
_encode = msgspec.json.Encoder().encode
_decode_record = msgspec.json.Decoder(Trigger).decode
T = TypeVar("T")


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


def _rfc3339(moment: object) -> str:
    if not isinstance(moment, datetime):  # nats-py types it as int, but watch entries carry a datetime
        return now_rfc3339()
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Change(msgspec.Struct, frozen=True):
    """One event of a followed bucket: a live record, or `record=None` when the key stopped being live."""

    key: str
    revision: int
    record: Trigger | None


class Revision(msgspec.Struct, frozen=True):
    """One stored revision of a key."""

    revision: int
    time: str
    record: Trigger


async def _guard(call: Awaitable[T]) -> T:
    """Translate an unreachable or failing JetStream into a 503."""
    try:
        return await call
    except (TimeoutError, nats.errors.TimeoutError, nats.errors.NoRespondersError):
        raise Unavailable("the trigger store (JetStream KV) did not answer") from None
    except nats.errors.ConnectionClosedError:
        raise Unavailable("not connected to NATS") from None
    except nats.js.errors.NoStreamResponseError:
        raise Unavailable("the trigger bucket's stream did not answer") from None
    except nats.js.errors.ServiceUnavailableError:
        raise Unavailable("JetStream is unavailable") from None
    except nats.js.errors.NotFoundError as exc:
        # nats-py reports a missing key as KeyNotFoundError raised while handling the server's
        # NotFoundError; only "stream not found" means the bucket itself is gone.
        cause = exc.__context__ if isinstance(exc, nats.js.errors.KeyNotFoundError) else exc
        if getattr(cause, "err_code", None) == _STREAM_NOT_FOUND:
            raise Unavailable("the trigger bucket does not exist") from None
        raise


class TriggerStore:
    """Trigger records in one KV bucket."""

    def __init__(self, kv: KeyValue, bucket: str) -> None:
        self.kv = kv
        self.bucket = bucket

    @classmethod
    async def open(cls, js: JetStreamContext, bucket: str, replicas: int = 1) -> TriggerStore:
        """Bind the bucket, creating it when missing; an existing bucket is used as it is."""
        for _ in range(5):
            try:
                return cls(await js.key_value(bucket), bucket)
            except nats.js.errors.BucketNotFoundError:
                pass
            config = api.KeyValueConfig(
                bucket=bucket,
                history=HISTORY,
                storage=api.StorageType.FILE,
                replicas=replicas,
                description="Trigger Service records",
            )
            with contextlib.suppress(nats.js.errors.BadRequestError):  # another replica won the race
                return cls(await js.create_key_value(config), bucket)
        raise Unavailable(f"could not create or bind the KV bucket {bucket!r}")

    async def get(self, key: str) -> tuple[Trigger, int]:
        """The live record at `key` and its revision; NotFound when missing or deleted."""
        try:
            entry = await _guard(self.kv.get(key))
        except nats.js.errors.KeyNotFoundError:
            raise NotFound("no such trigger") from None
        record = _decode_record(entry.value or b"")
        if record.type == "deleted":
            raise NotFound("no such trigger")
        return record, int(entry.revision or 0)

    async def create(self, key: str, record: Trigger) -> int:
        """Store a new trigger unless a live one holds the key (Conflict)."""
        data = _encode(record)
        try:
            return await _guard(self.kv.create(key, data))
        except nats.js.errors.KeyWrongLastSequenceError:
            pass
        # The key exists: it may only be re-used over a deleted record, at that exact revision.
        try:
            await self.get(key)
        except NotFound:
            entry = await _guard(self.kv.get(key))
            try:
                return await _guard(self.kv.update(key, data, last=entry.revision))
            except nats.js.errors.KeyWrongLastSequenceError:
                pass
        _, trigger_type, name = split_key(key)
        raise Conflict(f"a {trigger_type} trigger named {name!r} already exists")

    async def claim(self, claim_key: str, owner: str, holds: Callable[[Trigger], bool]) -> bool:
        """Make `owner` the holder of `claim_key`; False when a live record still `holds` it.

        A claim whose holder was deleted (or never written) is stale and is taken over at its
        revision, so claims need no clean-up.
        """
        for _ in range(3):
            try:
                await _guard(self.kv.create(claim_key, owner.encode()))
                return True
            except nats.js.errors.KeyWrongLastSequenceError:
                pass
            try:
                entry = await _guard(self.kv.get(claim_key))
            except nats.js.errors.KeyNotFoundError:
                continue
            holder = (entry.value or b"").decode()
            if holder == owner:
                return True
            try:
                record, _ = await self.get(holder)
                if holds(record):
                    return False
            except NotFound:
                pass
            try:
                await _guard(self.kv.update(claim_key, owner.encode(), last=entry.revision))
                return True
            except nats.js.errors.KeyWrongLastSequenceError:
                continue
        return False

    async def mark_deleted(self, key: str) -> tuple[Trigger, int]:
        """Write the poison pill for a live trigger: (the record, the pill's revision); NotFound when
        it is missing or already deleted."""
        for _ in range(3):
            record, revision = await self.get(key)
            tombstone = msgspec.structs.replace(record, type="deleted", deleted_at=now_rfc3339())
            try:
                return record, await _guard(self.kv.update(key, _encode(tombstone), last=revision))
            except nats.js.errors.KeyWrongLastSequenceError:
                continue  # it changed under us: look again
        raise Conflict("the trigger changed during the delete; try again")

    async def live(self, key_pattern: str) -> list[tuple[str, Trigger]]:
        """Every live record whose key matches `key_pattern`, filtered by the server."""
        found: list[tuple[str, Trigger]] = []
        async for change in self._watch(key_pattern, follow=False):
            if change.record is not None:
                found.append((change.key, change.record))
        return found

    async def history(self, key: str) -> list[Revision]:
        """Every stored revision of `key`, oldest first; NotFound when it never existed."""
        try:
            entries = await _guard(self.kv.history(key))
        except nats.js.errors.NoKeysError:
            raise NotFound("no such trigger") from None
        revisions = [
            Revision(int(entry.revision or 0), _rfc3339(entry.created), _decode_record(entry.value))
            for entry in entries
            if entry.value and entry.operation is None
        ]
        if not revisions:
            raise NotFound("no such trigger")
        return revisions

    # Raw values under keys outside the trigger layout (a first token starting with `=`, which no
    # account name can), read and written by compare-and-set: e.g. accounts mode's claims records.

    async def get_raw(self, key: str) -> tuple[bytes | None, int]:
        """The value at `key` and its revision; (None, 0) when the key holds nothing."""
        try:
            entry = await _guard(self.kv.get(key))
        except nats.js.errors.KeyNotFoundError:
            return None, 0
        return entry.value or b"", entry.revision or 0

    async def put_raw(self, key: str, value: bytes, last: int) -> int | None:
        """Write `value` if `key` is still at revision `last` (0: holds nothing); None when it moved on."""
        try:
            if last == 0:
                return await _guard(self.kv.create(key, value))
            return await _guard(self.kv.update(key, value, last=last))
        except nats.js.errors.KeyWrongLastSequenceError:
            return None

    async def raw_keys(self, key_pattern: str) -> list[str]:
        """Every key matching `key_pattern` that holds a value."""
        watcher: Any = await _guard(self.kv.watch(key_pattern, ignore_deletes=True, meta_only=True))
        keys: list[str] = []
        try:
            while (entry := await watcher.updates(timeout=None)) is not None:
                keys.append(entry.key)
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()
        return keys

    async def follow(
        self, key_pattern: str, on_ready: Callable[[], Awaitable[None]] | None = None
    ) -> AsyncIterator[Change]:
        """Every live record matching `key_pattern`, then every later change, forever.

        `on_ready` is awaited once the records that existed at the start have all been yielded.
        """
        async for change in self._watch(key_pattern, follow=True, on_ready=on_ready):
            yield change

    async def _watch(
        self,
        key_pattern: str,
        *,
        follow: bool,
        on_ready: Callable[[], Awaitable[None]] | None = None,
    ) -> AsyncIterator[Change]:
        watcher = await _guard(self.kv.watch(key_pattern))
        try:
            while True:
                entry: Any = await watcher.updates(timeout=None)  # type: ignore[no-untyped-call]
                if entry is None:  # the initial values have all been delivered
                    if on_ready is not None:
                        await on_ready()
                    if not follow:
                        return
                    continue
                yield _change(entry)
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()  # type: ignore[no-untyped-call]


def _change(entry: Any) -> Change:
    record: Trigger | None = None
    if entry.operation is None and entry.value:
        try:
            decoded = _decode_record(entry.value)
        except msgspec.DecodeError:  # corrupt, or not a record this release understands
            _log.warning("skipping an undecodable record", key=entry.key, revision=entry.revision)
            decoded = None
        if decoded is not None and decoded.type != "deleted":
            record = decoded
    return Change(entry.key, entry.revision, record)
