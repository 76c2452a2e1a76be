"""The operations of the Trigger API: plain async functions, Struct in and Struct out.

The caller is already authenticated and the request already decoded (service.routing does both);
what is left here is the meaning: semantic checks, the compare-and-set write, and the data plane.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import msgspec
from nats.nuid import NUID

from schemas.triggers import (
    DeleteReply,
    GatewayTrigger,
    GatewayTriggerReply,
    GatewayTriggerRequest,
    HistoryBody,
    HistoryEntry,
    HistoryReply,
    HistoryRequest,
    ListBody,
    ListQuery,
    ListReply,
    Metadata,
    StoredGatewayMapping,
    StreamTrigger,
    StreamTriggerReply,
    StreamTriggerRequest,
    Trigger,
    TriggerRef,
    TriggerReply,
)
from service import paths, subjects
from service.auth import Caller
from service.config import Settings
from service.errors import ApiError, BadRequest, Conflict, NotFound, Unauthorized, Unavailable
from service.follower import Follower
from service.graph import Edge, RouteGraph, edge_of
from service.store import Change, TriggerStore, key_of, now_rfc3339, split_key

TRIGGER_TYPES = ("gateway", "stream", "subject")
FOLLOW_WITHIN = 2.0  # seconds a replica may take to follow the bucket up to a route it stored


class Carrier(Protocol):
    """A data plane for stream triggers: makes a stored trigger's route live, or stops it."""

    follower: Follower[Change]  # how far the route graph has followed the bucket

    async def check(self, account: str, trigger: StreamTrigger) -> None:
        """Raise a 4xx when this data plane cannot carry the trigger (called before it is stored)."""

    async def activate(self, key: str, revision: int, trigger: StreamTrigger) -> None:
        """Make the route live; return only once a message published on S is delivered on D."""

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

    def subject(self, trigger_type: str, name: str) -> str:
        """The identifier subject `<prefix>.<type>.<name>` of a trigger."""
        return f"{self.settings.prefix}.{trigger_type}.{name}"


# --- create ----------------------------------------------------------------------------------


async def create_stream(ctx: Context, caller: Caller, req: StreamTriggerRequest) -> StreamTriggerReply:
    """Store a stream trigger and make its route live."""
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
    for where, subject in (
        ("source.subject", source),
        ("target.subject", req.target.subject),
        ("target.local_subject", req.target.local_subject),
    ):
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

    key = key_of(caller.account, "stream", req.name)
    record = StreamTrigger(
        name=req.name,
        stream=ctx.store.bucket,
        subject=ctx.subject("stream", req.name),
        type="created",
        created_at=now_rfc3339(),
        collection=req.collection,
        description=req.description,
        source=req.source,
        target=req.target,
    )
    edge = edge_of(caller.account, record, ctx.settings.routing == "single")
    cycle = BadRequest(
        f"route {source!r} -> {destination!r} would close a cycle with existing stream "
        "triggers - at `$.target`"
    )
    if ctx.graph.closes_cycle(edge):
        raise cycle
    await ctx.carrier.check(caller.account, record)
    revision = await ctx.store.create(key, record)
    ctx.graph.apply(key, revision, record)
    await _check_against_earlier(ctx, key, edge, revision, cycle)
    try:
        await ctx.carrier.activate(key, revision, record)
    except BaseException:
        await _delete(ctx, key)  # never leave a stored trigger that does not carry data
        raise
    return StreamTriggerReply(body=record)


async def _check_against_earlier(
    ctx: Context, key: str, edge: Edge, revision: int, cycle: BadRequest
) -> None:
    """Check the stored route again against every route stored before it; withdraw it (400) if
    they would loop.

    Two replicas may check two routes that together close a cycle at the same moment, each
    before it has seen the other. The bucket orders them: once this replica has followed the
    bucket up to the new route's own revision, it knows every route stored before it, and the
    later of the two is the one that loses, on whichever replica it was created.
    """
    try:
        await ctx.carrier.follower.reached(revision, FOLLOW_WITHIN)
    except Unavailable:
        await _delete(ctx, key)
        raise
    if ctx.graph.closes_cycle(edge, before=revision):
        await _delete(ctx, key)
        raise cycle


async def create_gateway(ctx: Context, caller: Caller, req: GatewayTriggerRequest) -> GatewayTriggerReply:
    """Store a gateway trigger; the sidecars serve it once they see it in the bucket.

    Every check comes before the first write, so a rejected create writes nothing: the path's
    canonical form (400), the name (409), then the route's claim (409). A create that loses the
    name to a concurrent one after claiming gives the claim back.
    """
    mapping = req.gateway_mapping
    try:
        path = paths.trigger_path(mapping.path)
    except paths.PathError as exc:
        raise BadRequest(f"`path` {mapping.path!r} {exc} - at `$.gateway_mapping.path`") from None
    key = key_of(caller.account, "gateway", req.name)
    try:
        await ctx.store.get(key)
    except (NotFound, msgspec.MsgspecError):  # free, or undecodable (which the create replaces)
        pass
    else:
        raise Conflict(f"a gateway trigger named {req.name!r} already exists")
    await _claim_route(ctx, mapping.method, path, key)
    record = GatewayTrigger(
        name=req.name,
        stream=ctx.store.bucket,
        subject=ctx.subject("gateway", req.name),
        type="created",
        created_at=now_rfc3339(),
        collection=req.collection,
        description=req.description,
        gateway_mapping=StoredGatewayMapping(
            method=mapping.method,
            path=path,
            is_public=mapping.is_public,
            timeout=mapping.timeout,
            limit=mapping.limit,
            traffic_distribution=mapping.traffic_distribution,
        ),
        gateway_mapping_subject=f"{ctx.settings.prefix}.gateway.{ctx.nuid.next().decode()}",
    )
    try:
        await ctx.store.create(key, record)
    except (Conflict, Unavailable):  # not stored (an unknown outcome keeps the claim: it may be)
        await _claim_route(ctx, mapping.method, path, key, release=True)
        raise
    return GatewayTriggerReply(body=record)


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
    """One live trigger of the caller's account."""
    record, _ = await ctx.store.get(key_of(caller.account, ref.trigger_type, ref.name))
    return TriggerReply(body=record, metadata=Metadata(subject=ctx.subject(ref.trigger_type, ref.name)))


async def list_triggers(ctx: Context, caller: Caller, query: ListQuery) -> ListReply:
    """The caller's live triggers whose subjects match a pattern, ordered by subject."""
    key_filter = _key_filter(ctx.settings.prefix, caller.account, query.subject_pattern)
    after = _decode_cursor(query.cursor) if query.cursor else None
    if after is not None and "@" in after:  # a history cursor
        raise BadRequest(_NOT_A_CURSOR)
    found = sorted((_subject_key(key), record) for key, record in await ctx.store.live(key_filter))
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
        HistoryEntry(r.revision, r.time, r.record.type, r.record) for r in revisions if r.revision > after
    ]
    page = _fill(remaining, query.limit, _room(ctx))
    next_cursor = _encode_cursor(f"{position}@{page[-1].revision}") if len(remaining) > len(page) else None
    return HistoryReply(body=HistoryBody(results=page, results_total=len(revisions), next_cursor=next_cursor))


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
