"""The operations of the Trigger API: plain async functions, Struct in and Struct out.

The caller is already authenticated and the request already decoded (service.routing does both);
what is left here is the meaning: semantic checks, the compare-and-set write, and the data plane.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import msgspec
from nats.nuid import NUID

from schemas.triggers import (
    DeleteReply,
    DeliveryStats,
    ExistsBody,
    GatewayTrigger,
    GatewayTriggerReply,
    GatewayTriggerRequest,
    GatewayTriggerUpdate,
    HistoryBody,
    HistoryEntry,
    HistoryReply,
    HistoryRequest,
    ListBody,
    ListQuery,
    ListReply,
    Metadata,
    PatchRequest,
    StoredGatewayMapping,
    StreamTrigger,
    StreamTriggerReply,
    StreamTriggerRequest,
    StreamTriggerUpdate,
    Trigger,
    TriggerRef,
    TriggerReply,
    UpdateRequest,
)
from service import log, paths, subjects
from service.auth import Caller
from service.config import Settings
from service.errors import (
    ApiError,
    BadRequest,
    Conflict,
    NotFound,
    PreconditionFailed,
    StaleRevision,
    Unauthorized,
    Unavailable,
)
from service.follower import Follower
from service.graph import Edge, RouteGraph, edge_of
from service.store import Apply, Change, TriggerStore, key_of, now_rfc3339, split_key

TRIGGER_TYPES = ("gateway", "stream", "subject")
SUBJECT_BYTES = 1024  # a route's SUB line must stay within nats-server's 4 KiB control line
FOLLOW_WITHIN = 2.0  # seconds a replica may take to follow the bucket up to a route it stored
CAS_ATTEMPTS = 3  # reads and writes of a change without a revision, while concurrent ones win
_log = log.get("handlers")


class Carrier(Protocol):
    """A data plane for stream triggers: makes a stored trigger's route live, or stops it."""

    @property
    def follower(self) -> Follower[Change]:
        """How far the route graph has followed the bucket."""

    @property
    def also(self) -> list[Apply]:
        """Other data planes that follow the same keys with the carrier's watch (appended before it
        is entered)."""

    async def check(self, account: str, trigger: StreamTrigger) -> None:
        """Raise a 4xx when this data plane cannot carry the trigger (called before it is stored)."""

    async def activate(
        self, key: str, revision: int, trigger: StreamTrigger, previous: StreamTrigger | None = None
    ) -> None:
        """Carry the trigger as stored at `revision`: when it is enabled, return only once a message
        published on S is delivered on D; when it is disabled, once nothing more is delivered.
        `previous` is the configuration it replaces (an update): the route changes make-before-break."""

    async def deactivate(self, key: str, trigger: StreamTrigger) -> None:
        """Stop the route; return only once nothing more is delivered."""


@dataclass
class Context:
    """What every handler needs."""

    settings: Settings
    store: TriggerStore
    graph: RouteGraph
    carrier: Carrier
    nuid: NUID = field(default_factory=NUID)
    # A durable route's counts for `get` (service.durable); None where no route is durable.
    delivery_stats: Callable[[str, StreamTrigger], Awaitable[DeliveryStats | None]] | None = None

    def subject(self, trigger_type: str, name: str) -> str:
        """The identifier subject `<prefix>.<type>.<name>` of a trigger."""
        return f"{self.settings.prefix}.{trigger_type}.{name}"


# --- create ----------------------------------------------------------------------------------


async def create_stream(ctx: Context, caller: Caller, req: StreamTriggerRequest) -> StreamTriggerReply:
    """Store a stream trigger and make its route live (unless it is created disabled)."""
    _check_stream(ctx, caller, req)
    key = key_of(caller.account, "stream", req.name)
    record = _stream_record(ctx, req, created_at=now_rfc3339())
    edge = edge_of(caller.account, record, ctx.settings.routing == "single")
    cycle = _cycle(record)
    if ctx.graph.closes_cycle(edge, instead_of=key):  # a live trigger at `key` makes this a 409 anyway
        raise cycle
    await ctx.carrier.check(caller.account, record)
    try:
        revision = await ctx.store.create(key, record)
    except Conflict as exc:
        raise await _exists(ctx, key, record, exc) from None
    ctx.graph.apply(key, revision, record)
    await _check_against_earlier(ctx, key, edge, revision, cycle, lambda: _delete(ctx, key))
    try:
        await ctx.carrier.activate(key, revision, record)
    except BaseException:
        await _delete(ctx, key)  # never leave a stored trigger that does not carry data
        raise
    return StreamTriggerReply(body=_at(record, revision))


def _check_stream(ctx: Context, caller: Caller, req: StreamTriggerRequest) -> None:
    """Every check of a stream trigger's configuration that needs no state (401, 400)."""
    source = req.source.subject
    destination = req.target.local_subject or req.target.subject or source
    target_account = req.target.account or caller.account
    if target_account != caller.account:
        if not caller.may_target(target_account):
            raise Unauthorized(f"token's `accounts` claim does not include target account {target_account!r}")
        if ctx.settings.routing == "single":
            raise BadRequest(
                "`target.account` other than your own needs accounts mode (TRIGGER_ROUTING=accounts)"
                " - at `$.target.account`"
            )
    dead_letter = req.delivery.dead_letter_subject if req.delivery is not None else None
    for where, subject in (
        ("source.subject", source),
        ("target.subject", req.target.subject),
        ("target.local_subject", req.target.local_subject),
        ("delivery.dead_letter_subject", dead_letter),
    ):
        if subject and len(subject.encode()) > SUBJECT_BYTES:
            raise BadRequest(
                f"subject is {len(subject.encode())} bytes of UTF-8; at most {SUBJECT_BYTES} (a route's "
                f"subscription must fit the NATS protocol line) - at `$.{where}`"
            )
        if subject and (namespace := subjects.reserved_namespace(subject, ctx.settings.prefix)):
            raise BadRequest(
                f"subject {subject!r} reaches into the reserved namespace {namespace} (the platform's "
                "own subjects: JetStream, KV, system, inboxes, the Trigger API, anything starting with "
                f"`$`) - at `$.{where}`"
            )
    if subjects.wildcards(source) != subjects.wildcards(destination):
        raise BadRequest(
            f"source subject {source!r} and target subject {destination!r} must hold the same sequence "
            "of wildcards - at `$.target`"
        )
    if (target_account == caller.account or ctx.settings.routing == "single") and subjects.overlap(
        source, destination
    ):
        raise BadRequest(
            f"target subject {destination!r} overlaps source subject {source!r}: the route would "
            "loop - at `$.target`"
        )
    if dead_letter is not None and subjects.overlap(source, dead_letter):
        raise BadRequest(
            f"dead-letter subject {dead_letter!r} overlaps source subject {source!r}: a dead letter "
            "would be captured again - at `$.delivery.dead_letter_subject`"
        )


def _stream_record(
    ctx: Context, req: StreamTriggerRequest, *, created_at: str, updated_at: str | None = None
) -> StreamTrigger:
    """The record a stream trigger request stores: created, or (with `updated_at`) updated."""
    return StreamTrigger(
        name=req.name,
        stream=ctx.store.bucket,
        subject=ctx.subject("stream", req.name),
        type="created" if updated_at is None else "updated",
        created_at=created_at,
        updated_at=updated_at,
        collection=req.collection,
        description=req.description,
        enabled=req.enabled,
        source=req.source,
        target=req.target,
        delivery=req.delivery,
    )


def _cycle(record: StreamTrigger) -> BadRequest:
    source = record.source.subject
    destination = record.target.local_subject or record.target.subject or source
    return BadRequest(
        f"route {source!r} -> {destination!r} would close a cycle with existing stream "
        "triggers - at `$.target`"
    )


async def _check_against_earlier(
    ctx: Context,
    key: str,
    edge: Edge,
    revision: int,
    cycle: BadRequest,
    withdraw: Callable[[], Awaitable[object]],
) -> None:
    """Check the stored route again against every route stored before it; `withdraw` it (400) if
    they would loop.

    Two replicas may check two routes that together close a cycle at the same moment, each
    before it has seen the other. The bucket orders them: once this replica has followed the
    bucket up to the new route's own revision, it knows every route stored before it, and the
    later of the two is the one that loses, on whichever replica it was created.
    """
    try:
        await ctx.carrier.follower.reached(revision, FOLLOW_WITHIN)
    except Unavailable:
        await withdraw()
        raise
    if ctx.graph.closes_cycle(edge, before=revision, instead_of=key):
        await withdraw()
        raise cycle


async def create_gateway(ctx: Context, caller: Caller, req: GatewayTriggerRequest) -> GatewayTriggerReply:
    """Store a gateway trigger; the sidecars serve it once they see it in the bucket.

    Every check comes before the first write, so a rejected create writes nothing: the path's
    canonical form (400), the name (409), then the route's claim (409). A create that loses the
    name to a concurrent one after claiming gives the claim back.
    """
    mapping = req.gateway_mapping
    path = _gateway_path(req)
    key = key_of(caller.account, "gateway", req.name)
    record = _gateway_record(
        ctx,
        req,
        path,
        mapping_subject=f"{ctx.settings.prefix}.gateway.{ctx.nuid.next().decode()}",
        created_at=now_rfc3339(),
    )
    try:
        live, revision = await ctx.store.get(key)
    except (NotFound, msgspec.MsgspecError):  # free, or undecodable (which the create replaces)
        pass
    else:
        raise _exists_error(key, live, revision, record)
    await _claim_route(ctx, mapping.method, path, key)
    try:
        revision = await ctx.store.create(key, record)
    except (Conflict, Unavailable) as exc:  # not stored (an unknown outcome keeps the claim: it may be)
        await _claim_route(ctx, mapping.method, path, key, release=True)
        if isinstance(exc, Conflict):
            raise await _exists(ctx, key, record, exc) from None
        raise
    return GatewayTriggerReply(body=_at(record, revision))


def _gateway_path(req: GatewayTriggerRequest) -> str:
    """The request's path in canonical form; 400 when it has none or is reserved."""
    try:
        return paths.trigger_path(req.gateway_mapping.path)
    except paths.PathError as exc:
        raise BadRequest(f"`path` {req.gateway_mapping.path!r} {exc} - at `$.gateway_mapping.path`") from None


def _gateway_record(
    ctx: Context,
    req: GatewayTriggerRequest,
    path: str,
    *,
    mapping_subject: str,
    created_at: str,
    updated_at: str | None = None,
) -> GatewayTrigger:
    """The record a gateway trigger request stores: created, or (with `updated_at`) updated."""
    mapping = req.gateway_mapping
    return GatewayTrigger(
        name=req.name,
        stream=ctx.store.bucket,
        subject=ctx.subject("gateway", req.name),
        type="created" if updated_at is None else "updated",
        created_at=created_at,
        updated_at=updated_at,
        collection=req.collection,
        description=req.description,
        enabled=req.enabled,
        gateway_mapping=StoredGatewayMapping(
            method=mapping.method,
            path=path,
            is_public=mapping.is_public,
            timeout=mapping.timeout,
            limit=mapping.limit,
            traffic_distribution=mapping.traffic_distribution,
        ),
        gateway_mapping_subject=mapping_subject,
    )


def _configuration(record: Trigger) -> tuple[object, ...]:
    """What a create or an update sets: everything but the names, times and ids the service assigns."""
    common = (record.collection, record.description, record.enabled)
    if isinstance(record, StreamTrigger):
        return ("stream", record.source, record.target, record.delivery, *common)
    return ("gateway", record.gateway_mapping, *common)


def _exists_error(key: str, live: Trigger, revision: int, wanted: Trigger) -> Conflict:
    """The 409 of a create whose name a live trigger holds: it carries that trigger, and whether
    it is configured as the request asks (a retried create that had in fact succeeded)."""
    _, trigger_type, name = split_key(key)
    same = _configuration(live) == _configuration(wanted)
    detail = f"a {trigger_type} trigger named {name!r} already exists" + (
        " (configured as this request asks)" if same else " (configured otherwise)"
    )
    return Conflict(detail, body=ExistsBody(same=same, record=_at(live, revision)))


async def _exists(ctx: Context, key: str, wanted: Trigger, conflict: Conflict) -> Conflict:
    """The 409 for a create that lost its name: with the live trigger when it can still be read."""
    try:
        live, revision = await ctx.store.get(key)
    except (ApiError, msgspec.MsgspecError):  # deleted again meanwhile, or unreadable: the bare 409
        return conflict
    return _exists_error(key, live, revision, wanted)


async def _claim_route(ctx: Context, method: str, path: str, owner: str, *, release: bool = False) -> None:
    """Claim METHOD path for one trigger, across all accounts, by compare-and-set (409 when held);
    with `release`, give back a claim `owner` made for a trigger that was not stored after all.

    The claim is keyed by the canonical path (service.paths), the form the sidecars look requests
    up in, so one URL has one claim whatever its spelling.
    """
    path = paths.canonical(path)

    def holds(trigger: Trigger) -> bool:
        return (
            isinstance(trigger, GatewayTrigger)
            and trigger.gateway_mapping.method == method
            and paths.canonical_or_none(trigger.gateway_mapping.path) == path
        )

    digest = hashlib.sha256(f"{method} {path}".encode()).hexdigest()
    claim_key = f"=route.{method}.{digest}"
    if not release:
        if not await ctx.store.claim(claim_key, owner, holds):
            raise Conflict(f"route {method} {path} is already served by another gateway trigger")
        return
    try:
        value, revision = await ctx.store.get_raw(claim_key)
        if value != owner.encode():
            return  # taken over since: not ours to give back
        try:
            record, _ = await ctx.store.get(owner)
            if holds(record):
                return  # a concurrent create of the same trigger won, and holds this very route
        except NotFound:
            pass
        await ctx.store.put_raw(claim_key, b"", revision)  # only if unchanged since it was read
    except (ApiError, msgspec.MsgspecError):
        return  # left as it is: a claim whose holder does not hold the route is taken over by the next


# --- read ------------------------------------------------------------------------------------


async def get(ctx: Context, caller: Caller, ref: TriggerRef) -> TriggerReply:
    """One live trigger of the caller's account, with its revision."""
    key = key_of(caller.account, ref.trigger_type, ref.name)
    record, revision = await ctx.store.get(key)
    if isinstance(record, StreamTrigger) and record.durable and ctx.delivery_stats is not None:
        record = msgspec.structs.replace(record, delivery_stats=await ctx.delivery_stats(key, record))
    return TriggerReply(
        body=_at(record, revision), metadata=Metadata(subject=ctx.subject(ref.trigger_type, ref.name))
    )


def _at(record: _Item, revision: int) -> _Item:
    """The record as replies show it: with its revision in the bucket."""
    return msgspec.structs.replace(record, revision=revision)


async def list_triggers(ctx: Context, caller: Caller, query: ListQuery) -> ListReply:
    """The caller's live triggers whose subjects match a pattern (and that are enabled, or disabled,
    when `enabled` says so), ordered by subject."""
    key_filter = _key_filter(ctx.settings.prefix, caller.account, query.subject_pattern)
    after = _decode_cursor(query.cursor) if query.cursor else None
    if after is not None and "@" in after:  # a history cursor
        raise BadRequest(_NOT_A_CURSOR)
    found = sorted(
        (_subject_key(key), _at(record, revision))
        for key, record, revision in await ctx.store.live_revisions(key_filter)
        if query.enabled is None or record.enabled == query.enabled
    )
    remaining = [(k, r) for k, r in found if after is None or k > after]
    page = _fill([r for _, r in remaining], query.limit, _room(ctx))
    next_cursor = _encode_cursor(remaining[len(page) - 1][0]) if len(remaining) > len(page) else None
    return ListReply(
        body=ListBody(results=page, results_total=len(found), next_cursor=next_cursor),
        metadata=Metadata(subject=query.subject_pattern),
    )


# Bytes of every reply kept for all but the records: the envelope (with a pattern of up to 1,024
# characters in `metadata`, 4 KiB at most), the cursor, and headers. Records fill the rest.
_REPLY_RESERVE = 16 * 1024
_sizer = msgspec.json.Encoder()
_scratch = bytearray()
_Item = TypeVar("_Item", bound=msgspec.Struct)


def _room(ctx: Context) -> int:
    """Bytes the records of one reply may take: the max payload of the connection the service
    replies on (the server's, as it announced it) less the reserve."""
    return ctx.store.js.nc.max_payload - _REPLY_RESERVE


def _fill(items: Sequence[_Item], limit: int, room: int) -> list[_Item]:
    """The first of `items` that make one page: at most `limit`, and no more than `room` bytes once
    encoded; always the first one, so that paging moves on (a record is bounded by the schema)."""
    page: list[_Item] = []
    for item in items[:limit]:
        _sizer.encode_into(item, _scratch)  # each item encoded once to count it; the reply once
        room -= len(_scratch) + 1  # and the comma that separates it from the next
        if room < 0 and page:
            break
        page.append(item)
    return page


def _subject_key(key: str) -> str:
    _, trigger_type, name = split_key(key)
    return f"{trigger_type}.{name}"


def _key_filter(prefix: str, account: str, pattern: str) -> str:
    """The KV key filter for a trigger subject pattern, scoped to one account."""
    base = subjects.tokens(prefix)
    parts = subjects.tokens(pattern)
    if parts[: len(base)] != base or len(parts) == len(base):
        raise BadRequest(f"`subject_pattern` must be under {prefix}. - at `$.subject_pattern`")
    rest = parts[len(base) :]
    if rest == ["*"]:  # the published docs use `<prefix>.*` for "all triggers"
        rest = [">"]
    if rest[0] not in ("*", ">", *TRIGGER_TYPES):
        raise BadRequest(
            f"`subject_pattern` token {rest[0]!r} must be a trigger type ({', '.join(TRIGGER_TYPES)}) "
            "or a wildcard - at `$.subject_pattern`"
        )
    return ".".join([account, *rest])


def _encode_cursor(position: str) -> str:
    """An opaque cursor for a position: the last `<type>.<name>` a list page returned, or
    `<type>.<name>@<revision>` for the last revision a history page returned."""
    return base64.urlsafe_b64encode(position.encode()).decode().rstrip("=")


_CURSOR = re.compile(r"\A(?:gateway|stream|subject)\.[A-Za-z0-9][A-Za-z0-9_-]*(?:@[1-9][0-9]{0,18})?\Z")
_NOT_A_CURSOR = "`cursor` is not a cursor this service returned - at `$.cursor`"


def _decode_cursor(cursor: str) -> str:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        after = base64.b64decode(padded, altchars=b"-_", validate=True).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        after = ""
    if not _CURSOR.match(after):
        raise BadRequest(_NOT_A_CURSOR)
    return after


async def history(ctx: Context, caller: Caller, req: HistoryRequest) -> HistoryReply:
    """The stored revisions of one trigger of the caller's account, oldest first, one page at a time."""
    ref, query = req.ref, req.query
    position = f"{ref.trigger_type}.{ref.name}"
    after = 0
    if query.cursor:
        cursor_of, _, revision = _decode_cursor(query.cursor).partition("@")
        if cursor_of != position or not revision:  # a list cursor, or another trigger's
            raise BadRequest("`cursor` is not a cursor of this trigger's history - at `$.cursor`")
        after = int(revision)
    revisions = await ctx.store.history(key_of(caller.account, ref.trigger_type, ref.name))
    remaining = [
        HistoryEntry(r.revision, r.time, r.record.type, _at(r.record, r.revision))
        for r in revisions
        if r.revision > after
    ]
    page = _fill(remaining, query.limit, _room(ctx))
    next_cursor = _encode_cursor(f"{position}@{page[-1].revision}") if len(remaining) > len(page) else None
    return HistoryReply(body=HistoryBody(results=page, results_total=len(revisions), next_cursor=next_cursor))


# --- update and patch ------------------------------------------------------------------------


async def update(ctx: Context, caller: Caller, req: UpdateRequest) -> TriggerReply:
    """Replace a live trigger's configuration by compare-and-set, and change its route to match:
    a stream route make-before-break, a gateway route's claim moved with its path."""
    ref, body = req.ref, req.body
    if body.name != ref.name:
        raise BadRequest(
            f"`name` {body.name!r} must be the name the subject names ({ref.name!r}) - at `$.name`"
        )
    key = key_of(caller.account, ref.trigger_type, ref.name)
    record: Trigger
    if isinstance(body, StreamTriggerUpdate):
        record, revision = await _update_stream(ctx, caller, key, body, req)
    else:
        record, revision = await _update_gateway(ctx, key, body, req)
    return TriggerReply(
        body=_at(record, revision), metadata=Metadata(subject=ctx.subject(ref.trigger_type, ref.name))
    )


async def _update_stream(
    ctx: Context, caller: Caller, key: str, body: StreamTriggerUpdate, req: UpdateRequest
) -> tuple[StreamTrigger, int]:
    _check_stream(ctx, caller, body)
    for _ in range(CAS_ATTEMPTS):
        previous, at = await _current(ctx, key, req.revision, req.if_match)
        if not isinstance(previous, StreamTrigger):
            raise NotFound("no such trigger")
        record = _stream_record(ctx, body, created_at=previous.created_at, updated_at=now_rfc3339())
        edge = edge_of(caller.account, record, ctx.settings.routing == "single")
        cycle = _cycle(record)
        if ctx.graph.closes_cycle(edge, instead_of=key):
            raise cycle
        await ctx.carrier.check(caller.account, record)
        try:
            revision = await ctx.store.update(key, record, at)
        except StaleRevision:
            _stale_unless_latest(req)
            continue
        ctx.graph.apply(key, revision, record)

        async def withdraw(previous: StreamTrigger = previous, revision: int = revision) -> None:
            await _restore(ctx, key, previous, revision)

        await _check_against_earlier(ctx, key, edge, revision, cycle, withdraw)
        await _carry(ctx, key, revision, record, previous)
        return record, revision
    raise Conflict("the trigger kept changing during the update; try again")


async def _update_gateway(
    ctx: Context, key: str, body: GatewayTriggerUpdate, req: UpdateRequest
) -> tuple[GatewayTrigger, int]:
    path = _gateway_path(body)
    method = body.gateway_mapping.method
    for _ in range(CAS_ATTEMPTS):
        previous, at = await _current(ctx, key, req.revision, req.if_match)
        if not isinstance(previous, GatewayTrigger):
            raise NotFound("no such trigger")
        record = _gateway_record(
            ctx,
            body,
            path,
            mapping_subject=previous.gateway_mapping_subject,  # what the responders subscribe to
            created_at=previous.created_at,
            updated_at=now_rfc3339(),
        )
        old = previous.gateway_mapping
        moved = (old.method, paths.canonical_or_none(old.path)) != (method, path)
        if moved:
            await _claim_route(ctx, method, path, key)  # 409 when another trigger holds it
        try:
            revision = await ctx.store.update(key, record, at)
        except (StaleRevision, Unavailable) as exc:  # not stored (an unknown outcome keeps the claim)
            if moved:
                await _claim_route(ctx, method, path, key, release=True)
            if isinstance(exc, StaleRevision):
                _stale_unless_latest(req)
                continue
            raise
        # The old route's claim still names this trigger, which no longer holds it: the next
        # trigger to claim that route takes it over (claims need no clean-up).
        return record, revision
    raise Conflict("the trigger kept changing during the update; try again")


async def patch(ctx: Context, caller: Caller, req: PatchRequest) -> TriggerReply:
    """Switch a live trigger off or on by compare-and-set; nothing else changes. A disabled stream
    route carries nothing once this answers; an enabled one is live when it answers."""
    ref = req.ref
    if ref.trigger_type == "subject":
        raise NotFound("no such trigger")
    key = key_of(caller.account, ref.trigger_type, ref.name)
    for _ in range(CAS_ATTEMPTS):
        previous, at = await _current(ctx, key, req.revision, req.if_match)
        record = msgspec.structs.replace(
            previous, enabled=req.body.enabled, type="updated", updated_at=now_rfc3339(), revision=None
        )
        try:
            revision = await ctx.store.update(key, record, at)
        except StaleRevision:
            _stale_unless_latest(req)
            continue
        if isinstance(record, StreamTrigger) and isinstance(previous, StreamTrigger):
            ctx.graph.apply(key, revision, record)  # a disabled route keeps its place in the graph
            await _carry(ctx, key, revision, record, previous)
        return TriggerReply(
            body=_at(record, revision), metadata=Metadata(subject=ctx.subject(ref.trigger_type, ref.name))
        )
    raise Conflict("the trigger kept changing; try again")


async def _current(ctx: Context, key: str, revision: int | None, if_match: bool) -> tuple[Trigger, int]:
    """The live trigger at `key` and its revision; 404, or stale when it is not at `revision`."""
    record, current = await ctx.store.get(key)
    if revision is not None and revision != current:
        raise _stale(f"the trigger is at revision {current}, not {revision}: read it again", if_match)
    return record, current


def _stale(detail: str, if_match: bool) -> ApiError:
    """A stale revision: 412 when it came as HTTP's `If-Match`, else 409."""
    return PreconditionFailed(detail) if if_match else StaleRevision(detail)


def _stale_unless_latest(req: UpdateRequest | PatchRequest) -> None:
    """A compare-and-set lost to a concurrent change: stale when the caller named a revision; without
    one the change applies to the latest, so read it again."""
    if req.revision is not None:
        raise _stale(f"the trigger changed after revision {req.revision}: read it again", req.if_match)


async def _carry(
    ctx: Context, key: str, revision: int, record: StreamTrigger, previous: StreamTrigger
) -> None:
    """Bring the route in line with a stored change; when that fails, put the previous configuration
    back (a failed change is answered as an error and leaves the trigger as it was)."""
    try:
        await ctx.carrier.activate(key, revision, record, previous)
    except BaseException:
        await _restore(ctx, key, previous, revision)
        raise


async def _restore(ctx: Context, key: str, previous: StreamTrigger, revision: int) -> None:
    """Store `previous` again over the change at `revision` (if nothing changed it since) and carry it."""
    restored = msgspec.structs.replace(previous, type="updated", updated_at=now_rfc3339(), revision=None)
    try:
        back = await ctx.store.update(key, restored, revision)
        ctx.graph.apply(key, back, restored)
        await ctx.carrier.activate(key, back, restored)
    except Exception as exc:
        _log.warning("could not restore a trigger after a failed change", key=key, error=str(exc))


# --- delete ----------------------------------------------------------------------------------


async def delete(ctx: Context, caller: Caller, ref: TriggerRef) -> DeleteReply:
    """Poison-pill a live trigger and stop its route before replying."""
    if ref.trigger_type == "subject":
        raise NotFound("no such trigger")
    key = key_of(caller.account, ref.trigger_type, ref.name)
    record = await _delete(ctx, key)
    if isinstance(record, StreamTrigger):
        await ctx.carrier.deactivate(key, record)
    return DeleteReply()


async def _delete(ctx: Context, key: str) -> Trigger:
    record, revision = await ctx.store.mark_deleted(key)
    ctx.graph.apply(key, revision, None)
    return record
