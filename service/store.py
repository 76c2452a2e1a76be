"""The trigger records in a JetStream KV bucket: the only module that talks to JetStream.

Key layout: `<account>.<trigger_type>.<name>`, one key per trigger. Every write is a
compare-and-set (create-if-absent, or update at the last revision), so concurrent writers never
overwrite each other. A delete is a poison pill: a new revision whose record has
`type: deleted`, so the key's history keeps the whole life of the trigger.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import api
from nats.js.kv import KeyValue

from schemas.triggers import Trigger
from service import log
from service.errors import Conflict, NotFound, Unavailable

HISTORY = 64
_log = log.get("store")
_STREAM_NOT_FOUND = 10059
_encode = msgspec.json.Encoder().encode
_decode_record = msgspec.json.Decoder(Trigger).decode
_RECONNECT_CHECK = 0.25  # seconds between looks at the connection's reconnect count while idle
_RETRY_MIN, _RETRY_MAX = 0.1, 2.0  # seconds between attempts to watch a failing bucket again
_IDLE = object()  # no watch entry arrived in a while
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


Apply = Callable[[Change], Awaitable[None]]


Observer = Callable[[Change], None]
"""Something else that wants to see each change a follower applies (one watch, several users)."""


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


class _Reconnected(Exception):
    """The connection reconnected: the watch's consumer may have gone with a restarted server."""


class TriggerStore:
    """Trigger records in one KV bucket."""

    def __init__(self, nc: Client, kv: KeyValue, bucket: str) -> None:
        self._nc = nc  # its reconnects tell `follow` to watch again
        self.kv = kv
        self.bucket = bucket

    @classmethod
    async def open(cls, nc: Client, bucket: str, replicas: int = 1) -> TriggerStore:
        """Bind the bucket over `nc`, creating it when missing; an existing bucket is used as it is."""
        js = nc.jetstream()
        for _ in range(5):
            try:
                return cls(nc, await js.key_value(bucket), bucket)
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
                return cls(nc, await js.create_key_value(config), bucket)
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
            value, revision = await self.get_raw(claim_key)
            holder = (value or b"").decode()
            if holder == owner:
                return True
            if holder:
                try:
                    record, _ = await self.get(holder)
                    if holds(record):
                        return False
                except NotFound:
                    pass
            if await self.put_raw(claim_key, owner.encode(), revision) is not None:
                return True
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
        async with self._watcher(key_pattern) as watcher:
            while (entry := await watcher.updates(timeout=None)) is not None:
                change = _change(entry)
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
        keys: list[str] = []
        async with self._watcher(key_pattern, ignore_deletes=True, meta_only=True) as watcher:
            while (entry := await watcher.updates(timeout=None)) is not None:
                keys.append(entry.key)
        return keys

    async def follow(
        self, key_pattern: str, on_ready: Callable[[], Awaitable[None]] | None = None
    ) -> AsyncGenerator[Change, None]:
        """Every live record matching `key_pattern`, then every later change, forever.

        `on_ready` is awaited once, when the records that existed at the start have all been
        yielded; until then a failure ends the iteration with its error. Later, when the watch
        fails, the connection reconnects, or the consumer throws an exception in at a change
        (`athrow`), the bucket is watched again from a fresh snapshot: its records are yielded
        again, and a key yielded as live but missing from it is yielded as no longer live.
        """
        live: dict[str, int] = {}  # key -> revision of the record last yielded as live
        loaded = False
        retry = _RETRY_MIN
        while True:
            loading, snapshot, newest = True, set(), 0  # this watch's snapshot: keys, highest revision
            try:
                async with contextlib.aclosing(self._watch(key_pattern)) as changes:
                    async for change in changes:
                        if change is None:  # the snapshot is complete
                            # A missing key stopped being live before `newest`: a revision that
                            # retires its route but is older than any later record of the key.
                            for key in [key for key in live if key not in snapshot]:
                                yield Change(key, max(newest, live.pop(key)), None)
                            loading, retry = False, _RETRY_MIN
                            if not loaded:
                                if on_ready is not None:
                                    await on_ready()
                                loaded = True
                            continue
                        if loading:
                            snapshot.add(change.key)
                            newest = max(newest, change.revision)
                        if change.record is None:
                            live.pop(change.key, None)
                        else:
                            live[change.key] = change.revision
                        yield change
            except _Reconnected:
                _log.info("reconnected to NATS; watching the bucket again", keys=key_pattern)
            except Exception:
                if not loaded:
                    raise
                _log.exception("following the bucket failed; watching it again", keys=key_pattern)
                await asyncio.sleep(retry)
                retry = min(retry * 2, _RETRY_MAX)

    @contextlib.asynccontextmanager
    async def following(
        self,
        key_pattern: str,
        apply: Apply,
        on_ready: Callable[[], Awaitable[None]] | None = None,
    ) -> AsyncIterator[None]:
        """Apply every change of `follow(key_pattern)` in a task; entered once the first snapshot is applied.

        Entering fails with the error that stopped the first load. When `apply` fails on a change
        later, the bucket is watched again (and the change applied again). Leaving stops the task.
        """
        loaded = asyncio.get_running_loop().create_future()

        async def ready() -> None:
            if on_ready is not None:
                await on_ready()
            loaded.set_result(None)

        task = asyncio.create_task(self._apply_all(key_pattern, apply, ready), name=f"follow {key_pattern}")
        try:
            await asyncio.wait({task, loaded}, return_when=asyncio.FIRST_COMPLETED)
            if not loaded.done():
                task.result()  # the first load failed: its error
                raise Unavailable(f"stopped following {key_pattern} before loading it")
            yield
        finally:
            await _stop(task)
            loaded.cancel()

    async def _apply_all(
        self, key_pattern: str, apply: Apply, on_ready: Callable[[], Awaitable[None]]
    ) -> None:
        async with contextlib.aclosing(self.follow(key_pattern, on_ready)) as changes:
            change = await anext(changes)
            while True:
                try:
                    await apply(change)
                except Exception as exc:
                    change = await changes.athrow(exc)  # `follow` watches again, or fails the start-up
                else:
                    change = await anext(changes)

    async def _watch(self, key_pattern: str) -> AsyncGenerator[Change | None, None]:
        """One watch: its snapshot, None, then its changes; _Reconnected when the connection reconnects.

        After a reconnect the watch's consumer may be gone (a restarted server), and nats-py would
        not notice: `kv.watch` sets no idle heartbeat.
        """
        reconnects = self._nc.stats["reconnects"]
        async with self._watcher(key_pattern) as watcher:
            while True:
                entry = _ready(watcher)
                if entry is _IDLE:
                    try:
                        entry = await watcher.updates(timeout=_RECONNECT_CHECK)
                    except nats.errors.TimeoutError:
                        entry = _IDLE
                if self._nc.stats["reconnects"] != reconnects:
                    raise _Reconnected
                if entry is None:
                    yield None
                elif isinstance(entry, KeyValue.Entry):
                    yield _change(entry)
                elif entry is not _IDLE:
                    raise Unavailable("the bucket watch was stopped")

    @contextlib.asynccontextmanager
    async def _watcher(self, key_pattern: str, **options: bool) -> AsyncIterator[Any]:
        """A KV watcher (its initial values end with None), stopped on the way out."""
        watcher: Any = await _guard(self.kv.watch(key_pattern, **options))
        try:
            yield watcher
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()


def _ready(watcher: Any) -> Any:
    """The watcher's next entry if one is already queued, else _IDLE.

    `updates(timeout=...)` costs a `wait_for` per entry (about 40 us on Python 3.11), which a
    snapshot of thousands of records pays over and over; this peeks at nats-py's queue first.
    """
    queue = getattr(watcher, "_updates", None)
    if isinstance(queue, asyncio.Queue) and not queue.empty():
        return queue.get_nowait()
    return _IDLE


async def _stop(task: asyncio.Task[None]) -> None:
    """Cancel `task` until it is done: nats-py swallows a cancellation that lands in a publish."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.5)
    if not task.cancelled():
        task.exception()  # retrieved: the start-up already reported it


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
