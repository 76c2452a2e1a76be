"""The operations of the Trigger API: plain async functions, Struct in and Struct out.

The caller is already authenticated and the request already decoded (service.routing does both);
what is left here is the meaning: semantic checks, the compare-and-set write, and the data plane.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass, field
from typing import Protocol

from nats.nuid import NUID

from schemas.triggers import (
    DeleteReply,
    GatewayTrigger,
    GatewayTriggerReply,
    GatewayTriggerRequest,
    HistoryBody,
    HistoryEntry,
    HistoryReply,
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
from service import subjects
from service.auth import Caller
from service.config import Settings
from service.errors import BadRequest, Conflict, NotFound, Unauthorized, Unavailable
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
    """Store a gateway trigger; the sidecars serve it once they see it in the bucket."""
    mapping = req.gateway_mapping
    key = key_of(caller.account, "gateway", req.name)
    await _claim_route(ctx, mapping.method, mapping.path, key)
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
            path=mapping.path,
            is_public=mapping.is_public,
            timeout=mapping.timeout,
            limit=mapping.limit,
            traffic_distribution=mapping.traffic_distribution,
        ),
        gateway_mapping_subject=f"{ctx.settings.prefix}.gateway.{ctx.nuid.next().decode()}",
    )
    await ctx.store.create(key, record)
    return GatewayTriggerReply(body=record)


async def _claim_route(ctx: Context, method: str, path: str, owner: str) -> None:
    """Claim METHOD path for one trigger, across all accounts, by compare-and-set (409 when held)."""

    def holds(trigger: Trigger) -> bool:
        return (
            isinstance(trigger, GatewayTrigger)
            and trigger.gateway_mapping.method == method
            and trigger.gateway_mapping.path == path
        )

    digest = hashlib.sha256(f"{method} {path}".encode()).hexdigest()
    if not await ctx.store.claim(f"=route.{method}.{digest}", owner, holds):
        raise Conflict(f"route {method} {path} is already served by another gateway trigger")


# --- read ------------------------------------------------------------------------------------


async def get(ctx: Context, caller: Caller, ref: TriggerRef) -> TriggerReply:
    """One live trigger of the caller's account."""
    record, _ = await ctx.store.get(key_of(caller.account, ref.trigger_type, ref.name))
    return TriggerReply(body=record, metadata=Metadata(subject=ctx.subject(ref.trigger_type, ref.name)))


async def list_triggers(ctx: Context, caller: Caller, query: ListQuery) -> ListReply:
    """The caller's live triggers whose subjects match a pattern, ordered by subject."""
    key_filter = _key_filter(ctx.settings.prefix, caller.account, query.subject_pattern)
    after = _decode_cursor(query.cursor) if query.cursor else None
    found = sorted((_subject_key(key), record) for key, record in await ctx.store.live(key_filter))
    remaining = [(k, r) for k, r in found if after is None or k > after]
    page = remaining[: query.limit]
    next_cursor = _encode_cursor(page[-1][0]) if len(remaining) > len(page) else None
    return ListReply(
        body=ListBody(results=[r for _, r in page], results_total=len(found), next_cursor=next_cursor),
        metadata=Metadata(subject=query.subject_pattern),
    )


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


def _encode_cursor(subject_key: str) -> str:
    return base64.urlsafe_b64encode(subject_key.encode()).decode().rstrip("=")


_CURSOR = re.compile(r"^(?:gateway|stream|subject)\.[A-Za-z0-9][A-Za-z0-9_-]*$")


def _decode_cursor(cursor: str) -> str:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        after = base64.b64decode(padded, altchars=b"-_", validate=True).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        after = ""
    if not _CURSOR.match(after):
        raise BadRequest("`cursor` is not a cursor this service returned - at `$.cursor`")
    return after


async def history(ctx: Context, caller: Caller, ref: TriggerRef) -> HistoryReply:
    """Every stored revision of one trigger of the caller's account, oldest first."""
    revisions = await ctx.store.history(key_of(caller.account, ref.trigger_type, ref.name))
    results = [HistoryEntry(r.revision, r.time, r.record.type, r.record) for r in revisions]
    return HistoryReply(body=HistoryBody(results=results, results_total=len(results)))


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
