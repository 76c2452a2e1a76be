"""Declarative apply: `trigger-service plan|diff|apply|export`, a file of triggers against an account.

`plan` reads the account's live triggers (list, every page) and compares each entry of the file with
the live trigger of the same type and name, as configuration: the fields the request type defines
and the record stores, each with the default the request type fills in, so a default the service
wrote into the record (`timeout: 30000`, `is_public: false`) never shows as a change. The shapes
come from the msgspec types (`config_shape`), not from a list kept here. Triggers the file's
`owner` tag marks as its own (their `collection`) and that the file no longer names are deleted
with `--prune`; a trigger without that tag is never deleted.

`apply` runs the same plan and then executes it with compare-and-set on the revisions the plan
read: an update sends `revision`, a delete first checks that the trigger is still at its revision,
and a create expects the name to be free. A trigger changed in between stops the run (exit 1)
with a message saying so; nothing after it is applied.

Exit codes, for CI: 0 no changes, 2 changes (planned, or applied), 1 error.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Literal, NoReturn

import msgspec
from msgspec import inspect as mi

from schemas.triggers import GatewayTrigger, GatewayTriggerRequest, StreamTrigger
from service import paths
from service.client import ClientError, Refused, TriggerClient, connect
from service.manifest import REQUESTS, Manifest, ManifestError, TriggerRequest, dump, format_for, read

NO_CHANGES, ERROR, CHANGES = 0, 1, 2
# The stored record type of each trigger type (the request types are manifest.REQUESTS).
RECORDS: dict[str, type[msgspec.Struct]] = {"stream": StreamTrigger, "gateway": GatewayTrigger}
# Execution order: updates first (one may free a gateway path that a create then takes), then
# creates, then deletes (a trigger is removed only once its replacement is live).
_ORDER = {"update": 0, "create": 1, "delete": 2}
_encode = msgspec.json.Encoder().encode


class PlanError(Exception):
    """A plan that cannot be made or carried out safely."""


# --- configuration: what a plan compares ----------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """The configuration of a request Struct: its fields that the stored record also has, each
    either a leaf or (a Struct on both sides) a nested shape."""

    cls: type[msgspec.Struct]
    fields: tuple[tuple[str, str, Shape | None], ...]  # (attribute, JSON name, nested shape)


def _struct(info: mi.Type) -> type[msgspec.Struct] | None:
    """The Struct type a field holds (`X`, `X | None`, `Annotated[X, ...]`), else None."""
    while isinstance(info, mi.Metadata):
        info = info.type
    if isinstance(info, mi.StructType):
        return info.cls
    if isinstance(info, mi.UnionType):
        found = [s for s in (_struct(member) for member in info.types) if s is not None]
        return found[0] if len(found) == 1 else None
    return None


@functools.cache
def config_shape(request: type[msgspec.Struct], record: type[msgspec.Struct]) -> Shape:
    """The shape of the configuration a request type defines and its record type stores.

    A request field the record does not store (`trigger_type`, the tag; the response-only
    `gateway_mapping.subject`, `gateway`, `error` that are accepted and ignored) is not part of it.
    """
    request_info, record_info = mi.type_info(request), mi.type_info(record)
    assert isinstance(request_info, mi.StructType)
    assert isinstance(record_info, mi.StructType)
    stored = {f.encode_name: f for f in record_info.fields}
    fields: list[tuple[str, str, Shape | None]] = []
    for field in request_info.fields:
        if field.encode_name not in stored:
            continue
        inner, stored_inner = _struct(field.type), _struct(stored[field.encode_name].type)
        nested = config_shape(inner, stored_inner) if inner and stored_inner else None
        fields.append((field.name, field.encode_name, nested))
    return Shape(request, tuple(fields))


def _shape(trigger_type: str) -> Shape:
    return config_shape(REQUESTS[trigger_type], RECORDS[trigger_type])


def configuration(value: msgspec.Struct, shape: Shape) -> dict[str, Any]:
    """Every configuration field of a request, defaults included, as plain JSON values."""
    out: dict[str, Any] = {}
    for attr, name, nested in shape.fields:
        item = getattr(value, attr)
        if nested is not None and isinstance(item, msgspec.Struct):
            out[name] = configuration(item, nested)
        else:
            out[name] = msgspec.to_builtins(item)
    return out


def without_defaults(value: Any) -> Any:
    """A Struct as plain JSON values, leaving out every field at its type's default.

    (msgspec's own `omit_defaults` compares some defaults by identity, so a `timeout` of 30000
    decoded from a record would stay in.)
    """
    if isinstance(value, msgspec.Struct):
        out: dict[str, Any] = {}
        for field in msgspec.structs.fields(value):
            item = getattr(value, field.name)
            if field.default is not msgspec.NODEFAULT:
                default = field.default
            elif field.default_factory is not msgspec.NODEFAULT:
                default = field.default_factory()
            else:
                default = msgspec.NODEFAULT
            if default is not msgspec.NODEFAULT and type(item) is type(default) and item == default:
                continue
            out[field.encode_name] = without_defaults(item)
        return out
    if isinstance(value, dict):
        return {key: without_defaults(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [without_defaults(item) for item in value]
    return msgspec.to_builtins(value)


def _project(data: Mapping[str, Any], shape: Shape) -> dict[str, Any]:
    """The configuration fields of a stored record (a JSON object), as stored."""
    out: dict[str, Any] = {}
    for _, name, nested in shape.fields:
        if name in data:
            item = data[name]
            out[name] = _project(item, nested) if nested is not None and isinstance(item, dict) else item
    return out


def live_request(record: Mapping[str, Any]) -> TriggerRequest | None:
    """A live record as the create request that would make it (defaults filled in by the request
    type), or None when today's request type refuses it (a record of an older release)."""
    trigger_type = record["trigger_type"]
    projected = {**_project(record, _shape(trigger_type)), "trigger_type": trigger_type}
    try:
        return msgspec.convert(projected, REQUESTS[trigger_type])
    except msgspec.ValidationError:
        return None


def _live_configuration(record: Mapping[str, Any]) -> dict[str, Any]:
    shape = _shape(record["trigger_type"])
    request = live_request(record)
    return configuration(request, shape) if request is not None else _project(record, shape)


def _desired(request: TriggerRequest, owner: str | None) -> TriggerRequest:
    """The entry as apply sends it: with the owner tag as its `collection`."""
    if owner is not None:
        request = msgspec.structs.replace(request, collection=owner)
    return request


def _desired_configuration(request: TriggerRequest) -> dict[str, Any]:
    """The configuration the service will store for a request: its path in the canonical form the
    service stores (service.paths, the service's own function)."""
    if isinstance(request, GatewayTriggerRequest):
        mapping = request.gateway_mapping
        canonical = msgspec.structs.replace(mapping, path=paths.trigger_path(mapping.path))
        request = msgspec.structs.replace(request, gateway_mapping=canonical)
    return configuration(request, _shape(request.trigger_type))


@dataclass(frozen=True)
class Diff:
    """One configuration field that differs: its dotted path, the live value and the file's."""

    field: str
    live: Any
    wanted: Any

    def __str__(self) -> str:
        return f"{self.field} {_show(self.live)} -> {_show(self.wanted)}"


def _show(value: Any) -> str:
    return _encode(value).decode()


def diff(live: Mapping[str, Any], wanted: Mapping[str, Any], shape: Shape, at: str = "") -> list[Diff]:
    """The fields of two configurations that differ, nested fields by their dotted path."""
    found: list[Diff] = []
    for _, name, nested in shape.fields:
        old, new = live.get(name), wanted.get(name)
        if nested is not None and isinstance(old, dict) and isinstance(new, dict):
            found.extend(diff(old, new, nested, f"{at}{name}."))
        elif old != new or type(old) is not type(new):
            found.append(Diff(f"{at}{name}", old, new))
    return found


# --- the plan --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    """One change of a plan: what it does to which trigger, the body it sends, and the live
    revision the plan read (update and delete: the compare-and-set)."""

    action: Literal["create", "update", "delete"]
    trigger_type: str
    name: str
    body: dict[str, Any] | None = None
    revision: int | None = None
    diffs: tuple[Diff, ...] = ()

    @property
    def label(self) -> str:
        """`stream/orders`."""
        return f"{self.trigger_type}/{self.name}"

    def __str__(self) -> str:
        sign = {"create": "+", "update": "~", "delete": "-"}[self.action]
        line = f"{sign} {self.action} {self.label}"
        if self.diffs:
            line += ": " + ", ".join(str(d) for d in self.diffs)
        return line


@dataclass(frozen=True)
class Plan:
    """The changes that make the account match the file, in the order they are executed, and the
    owned triggers that only `--prune` would delete."""

    changes: tuple[Change, ...]
    not_pruned: tuple[str, ...] = ()

    def summary(self) -> str:
        """`Plan: 1 to create, 2 to update, 0 to delete.`"""
        counts = {action: sum(c.action == action for c in self.changes) for action in _ORDER}
        return (
            f"Plan: {counts['create']} to create, {counts['update']} to update, {counts['delete']} to delete."
        )


def make_plan(manifest: Manifest, live: Sequence[Mapping[str, Any]], *, prune: bool) -> Plan:
    """Compare the file with the live records (every trigger of the account)."""
    if prune and manifest.owner is None:
        raise PlanError(
            f"--prune needs an `owner` in {manifest.source}: only triggers carrying the file's owner "
            "tag are ever deleted"
        )
    by_key = {
        (r["trigger_type"], r["name"]): r
        for r in live
        if isinstance(r, Mapping) and r.get("trigger_type") in REQUESTS and isinstance(r.get("name"), str)
    }
    owner = manifest.owner
    changes: list[Change] = []
    foreign: list[str] = []
    for entry in manifest.entries:
        request = _desired(entry.request, owner)
        trigger_type, name = entry.key
        body: dict[str, Any] = msgspec.to_builtins(request)
        record = by_key.get(entry.key)
        if record is None:
            changes.append(Change("create", trigger_type, name, body))
            continue
        if owner is not None and record.get("collection") not in (None, owner):
            foreign.append(
                f"{trigger_type}/{name} (triggers[{entry.index}]) belongs to owner "
                f"{record.get('collection')!r} (its `collection`), not to this file's {owner!r}: "
                "it is left alone; remove it from the file, or change its collection first"
            )
            continue
        diffs = diff(_live_configuration(record), _desired_configuration(request), _shape(trigger_type))
        if diffs:
            changes.append(Change("update", trigger_type, name, body, _revision(record), tuple(diffs)))
    if foreign:
        raise PlanError("\n".join(foreign))
    not_pruned: list[str] = []
    if owner is not None:
        wanted = {entry.key for entry in manifest.entries}
        for key in sorted(by_key):
            record = by_key[key]
            if key in wanted or record.get("collection") != owner:
                continue
            if prune:
                changes.append(Change("delete", *key, revision=_revision(record)))
            else:
                not_pruned.append("/".join(key))
    changes.sort(key=lambda c: _ORDER[c.action])  # stable: file order within each kind
    return Plan(tuple(changes), tuple(not_pruned))


def _revision(record: Mapping[str, Any]) -> int:
    revision = record.get("revision")
    if not isinstance(revision, int) or isinstance(revision, bool):
        raise PlanError(
            f"the service returned {record.get('trigger_type')}/{record.get('name')} without a "
            "`revision`, so it cannot be changed by compare-and-set (a Trigger Service without update?)"
        )
    return revision


# --- executing a plan ------------------------------------------------------------------------


class Stopped(Exception):
    """A change that could not be applied: the run stops there."""


@dataclass
class Applied:
    """What a run did so far."""

    created: int = 0
    updated: int = 0
    deleted: int = 0

    @property
    def total(self) -> int:
        """Changes applied."""
        return self.created + self.updated + self.deleted


async def execute(client: TriggerClient, plan: Plan, out: IO[str], done: Applied | None = None) -> Applied:
    """Apply the plan's changes in order, each a compare-and-set on what the plan read; one
    progress line per change. Raises Stopped at the first change that fails."""
    done = done if done is not None else Applied()
    for change in plan.changes:
        if change.action == "create":
            await _create(client, change, out)
            done.created += 1
        elif change.action == "update":
            await _update(client, change, out)
            done.updated += 1
        else:
            await _delete(client, change, out)
            done.deleted += 1
    return done


async def _create(client: TriggerClient, change: Change, out: IO[str]) -> None:
    assert change.body is not None
    try:
        record = await client.create(change.trigger_type, change.body)
    except Refused as exc:
        # A 409 for the name carries the live trigger and whether it is the one asked for; a 409
        # without them is another conflict (a gateway route another trigger serves).
        exists = exc.body if exc.status == 409 and isinstance(exc.body, dict) else {}
        if exists.get("same") is True:  # created meanwhile (a retry, another apply), exactly as asked
            print(f"  {change.label} exists already, as the file asks", file=out)
            return
        if exists.get("same") is False:
            raise Stopped(
                f"{change.label} was created by somebody else since the plan read the account (now at "
                f"revision {_rev(exists.get('record'))}, configured otherwise): run the plan again"
            ) from None
        raise Stopped(f"create {change.label}: {exc.error}") from None
    print(f"  created {change.label} (revision {_rev(record)})", file=out)


async def _update(client: TriggerClient, change: Change, out: IO[str]) -> None:
    assert change.body is not None
    assert change.revision is not None
    try:
        record = await client.update(change.trigger_type, change.name, change.body, change.revision)
    except Refused as exc:
        if exc.status == 404:
            raise Stopped(f"{change.label} was deleted since the plan read it") from None
        if exc.status in (409, 412):  # a stale revision, or a conflict of another kind (a held path)
            now = await _current_revision(client, change)
            if now != change.revision:
                raise _changed(change, now) from None
        raise Stopped(f"update {change.label}: {exc.error}") from None
    print(f"  updated {change.label} (revision {_rev(record)})", file=out)


async def _delete(client: TriggerClient, change: Change, out: IO[str]) -> None:
    # Delete takes no revision: check the one the plan read right before, so that a trigger
    # changed since (its owner tag taken away, say) is never deleted on the strength of a stale read.
    now = await _current_revision(client, change)
    if now is None:
        print(f"  {change.label} is gone already", file=out)
        return
    if now != change.revision:
        raise _changed(change, now)
    try:
        await client.delete(change.trigger_type, change.name)
    except Refused as exc:
        if exc.status != 404:
            raise Stopped(f"delete {change.label}: {exc.error}") from None
    print(f"  deleted {change.label}", file=out)


async def _current_revision(client: TriggerClient, change: Change) -> int | None:
    try:
        record = await client.get(change.trigger_type, change.name)
    except Refused as exc:
        if exc.status == 404:
            return None
        raise Stopped(f"get {change.label}: {exc.error}") from None
    revision = record.get("revision")
    return revision if isinstance(revision, int) else -1


def _changed(change: Change, now: int | None) -> Stopped:
    state = "deleted" if now is None else f"changed (it is at revision {now} now)"
    return Stopped(
        f"{change.label} was {state} after the plan read it at revision {change.revision}: "
        "somebody else changed it meanwhile; run the plan again"
    )


def _rev(record: Any) -> Any:
    return record.get("revision", "?") if isinstance(record, dict) else "?"


# --- export ----------------------------------------------------------------------------------


def export_document(live: Sequence[Mapping[str, Any]], owner: str | None) -> tuple[dict[str, Any], list[str]]:
    """The live triggers (those tagged `owner`, when given) as a file `apply` takes unchanged:
    each as its create request, defaults left out. Also the warnings for records today's types refuse."""
    entries: list[dict[str, Any]] = []
    warnings: list[str] = []
    records = [r for r in live if r.get("trigger_type") in REQUESTS]
    for record in sorted(records, key=lambda r: (r["trigger_type"], r["name"])):
        if owner is not None and record.get("collection") != owner:
            continue
        request = live_request(record)
        entry: dict[str, Any]
        if request is None:
            label = f"{record['trigger_type']}/{record['name']}"
            warnings.append(f"{label} is stored in a form today's request type refuses; exported as stored")
            entry = {
                "name": record["name"],
                "trigger_type": record["trigger_type"],
                **_project(record, _shape(record["trigger_type"])),
            }
        else:
            entry = without_defaults(request)
        if owner is not None:
            entry.pop("collection", None)  # apply fills in the owner tag
        entries.append(entry)
    document: dict[str, Any] = {"owner": owner} if owner is not None else {}
    document["triggers"] = entries
    return document, warnings


# --- the command line ------------------------------------------------------------------------


class _Usage(Exception):
    """A command line argparse refused: exit code 1 (2 means changes here)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _Usage(f"{self.prog}: {message}")


def _parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--token", default=environ.get("TRIGGER_TOKEN"), help="bearer token (TRIGGER_TOKEN)")
    common.add_argument(
        "--url", help="the HTTP sidecar's base URL, e.g. http://127.0.0.1:8080 (instead of NATS)"
    )
    common.add_argument(
        "--nats-url", default=environ.get("NATS_URL", "nats://127.0.0.1:4222"), help="NATS servers (NATS_URL)"
    )
    common.add_argument("--creds", default=environ.get("NATS_CREDS"), help="NATS creds file (NATS_CREDS)")
    common.add_argument(
        "--prefix", default=environ.get("TRIGGER_PREFIX", "ms.trigger"), help="API prefix (TRIGGER_PREFIX)"
    )
    common.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for each answer")
    parser = _Parser(
        prog="trigger-service",
        description="Keep an account's triggers in a file: plan, apply and export them. "
        "Exit codes: 0 no changes, 2 changes (planned or applied), 1 error.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, text in (
        ("plan", "show what apply would change"),
        ("diff", "the same as plan"),
        ("apply", "make the account's triggers match the file"),
    ):
        cmd = sub.add_parser(name, parents=[common], help=text, description=text)
        cmd.add_argument("-f", "--file", required=True, help="the triggers file (YAML or JSON; - for stdin)")
        cmd.add_argument(
            "--prune",
            action="store_true",
            help="also delete the owner's triggers that the file no longer names",
        )
        if name == "apply":
            cmd.add_argument("-y", "--yes", action="store_true", help="apply without asking")
    export = sub.add_parser(
        "export", parents=[common], help="write the live triggers as a file apply takes unchanged"
    )
    export.add_argument("-o", "--output", help="write to this file (default: standard output)")
    export.add_argument("--owner", help="export only the triggers with this owner tag, as that owner's file")
    export.add_argument("--format", choices=("yaml", "json"), help="default: by the extension, else YAML")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`trigger-service plan|diff|apply|export ...`; returns the exit code."""
    return asyncio.run(run(sys.argv[1:] if argv is None else argv))


async def run(
    argv: Sequence[str],
    *,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
    stdin: IO[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> int:
    """The command line in the running event loop; returns the exit code."""
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    inp = stdin or sys.stdin
    try:
        args = _parser(os.environ if environ is None else environ).parse_args(list(argv))
    except _Usage as exc:
        print(f"error: {exc}", file=err)
        return ERROR
    try:
        if args.command == "export":
            return await _export(args, out, err)
        return await _plan_and_apply(args, out, err, inp)
    except ManifestError as exc:
        for line in exc.errors:
            print(f"error: {line}", file=err)
        return ERROR
    except (ClientError, PlanError) as exc:
        for line in _explain(exc).splitlines():
            print(f"error: {line}", file=err)
        return ERROR


def _client(args: argparse.Namespace) -> Any:
    return connect(
        token=args.token,
        url=args.url,
        nats_url=args.nats_url,
        creds=args.creds,
        prefix=args.prefix,
        request_timeout=args.timeout,
    )


def _explain(exc: Exception) -> str:
    if isinstance(exc, Refused) and exc.status == 401:
        return f"{exc.error} (pass the account's token with --token or TRIGGER_TOKEN)"
    return str(exc)


async def _plan_and_apply(args: argparse.Namespace, out: IO[str], err: IO[str], inp: IO[str]) -> int:
    stdin_text = await asyncio.to_thread(inp.read) if args.file == "-" else None
    manifest = await asyncio.to_thread(read, args.file, stdin_text)
    applying = args.command == "apply"
    client: TriggerClient
    async with _client(args) as client:
        live = await client.list_all(args.prefix)
        plan = make_plan(manifest, live, prune=args.prune)
        for change in plan.changes:
            print(change, file=out)
        if plan.not_pruned:
            print(
                f"  ({len(plan.not_pruned)} trigger(s) tagged {manifest.owner!r} are not in the file; "
                f"--prune would delete them: {', '.join(plan.not_pruned)})",
                file=out,
            )
        if not plan.changes:
            print(f"No changes: the live triggers match {manifest.source}.", file=out)
            return NO_CHANGES
        print(plan.summary(), file=out)
        if not applying:
            return CHANGES
        if not args.yes:
            if args.file == "-" or not inp.isatty():
                print(
                    "error: apply asks before it changes anything: pass --yes when there is no terminal to "
                    "ask on. Nothing applied.",
                    file=err,
                )
                return ERROR
            print("Apply these changes? Only 'yes' applies them: ", end="", file=out, flush=True)
            answer = await asyncio.to_thread(inp.readline)
            if answer.strip() != "yes":
                print("Nothing applied.", file=out)
                return ERROR
        done = Applied()
        try:
            await execute(client, plan, out, done)
        except Stopped as exc:
            print(f"error: stopped: {exc}", file=err)
            print(f"Applied {done.total} of {len(plan.changes)} changes before stopping.", file=out)
            return ERROR
        except ClientError as exc:
            print(f"error: {_explain(exc)}", file=err)
            print(f"Applied {done.total} of {len(plan.changes)} changes before stopping.", file=out)
            return ERROR
        print(f"Applied: {done.created} created, {done.updated} updated, {done.deleted} deleted.", file=out)
        return CHANGES


async def _export(args: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    client: TriggerClient
    async with _client(args) as client:
        live = await client.list_all(args.prefix)
    document, warnings = export_document(live, args.owner)
    for warning in warnings:
        print(f"warning: {warning}", file=err)
    when = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    text = dump(
        document,
        format_for(args.output, args.format),
        header=f"exported by `trigger-service export` from {_without_userinfo(client.where)} at {when}",
    )
    if args.output and args.output != "-":
        try:
            await asyncio.to_thread(Path(args.output).write_text, text, encoding="utf-8")
        except OSError as exc:
            raise PlanError(f"cannot write {args.output}: {exc.strerror or exc}") from None
        print(f"wrote {len(document['triggers'])} trigger(s) to {args.output}", file=err)
    else:
        out.write(text)
    return NO_CHANGES


def _without_userinfo(where: str) -> str:
    """Server addresses without the user or password they may carry (not for a file's header)."""
    parts = []
    for part in where.split(","):
        scheme, sep, rest = part.strip().rpartition("://")
        authority, slash, path = rest.partition("/")
        parts.append(f"{scheme}{sep}{authority.rpartition('@')[2]}{slash}{path}")
    return ",".join(parts)
