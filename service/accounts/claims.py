"""An account's claims as the service keeps them: the account's own claims plus the triggers' entries.

Each account touched by a stream trigger has one record in the bucket (key `=claims.<account>`):
the claims the account had before the service changed it (`base`), the export or import each
trigger needs, keyed by the trigger's KV key, and the JWT last signed from them. Entries are
keyed per trigger, so concurrent changes for different triggers commute, and an export stays
while any trigger still needs it.
"""

from __future__ import annotations

import copy
from typing import Any

import msgspec

from schemas.triggers import StreamTrigger
from service.errors import Conflict

RECORD_PREFIX = "=claims."
PUSHED_KEPT = 32  # how many of the service's own recent JWTs an account's record recognises


def record_key(account: str) -> str:
    """The bucket key of an account's claims record (`=` keeps it apart from trigger keys)."""
    return RECORD_PREFIX + account


class Entry(msgspec.Struct, frozen=True):
    """The export or import one trigger needs; `created_at` tells incarnations of a key apart, and
    `revision` (the trigger's KV revision it was made from; 0 when unknown) the updates of one."""

    created_at: str
    claim: dict[str, Any]
    revision: int = 0


class AccountRecord(msgspec.Struct, kw_only=True):
    """One account's claims as the service keeps them."""

    account: str
    base: dict[str, Any]
    exports: dict[str, Entry] = msgspec.field(default_factory=dict)
    imports: dict[str, Entry] = msgspec.field(default_factory=dict)
    # key -> `created_at` of the newest incarnation removed: a late event of a deleted trigger
    # (a lagging follower) can never put its entry back, whatever order the writes arrive in.
    removed: dict[str, str] = msgspec.field(default_factory=dict)
    # key -> the newest revision of the trigger that changed its entries here (an update, a disable):
    # a late event of an older revision (a lagging follower) never undoes a newer change.
    revisions: dict[str, int] = msgspec.field(default_factory=dict)
    iat: int = 0
    jwt: str = ""
    pushed: list[str] = msgspec.field(default_factory=list)  # `jti`s of the JWTs it signed last

    def put(self, kind: str, key: str, entry: Entry) -> bool:
        """Set the `kind` ("exports" or "imports") entry of a trigger; True when that changed anything.

        An incarnation that was removed (or is older than one removed) is never put back, and
        neither is a revision older than one that changed this account's entries of the trigger.
        """
        if self.removed.get(key, "") >= entry.created_at:
            return False
        if entry.revision < self.revisions.get(key, 0):
            return False
        entries: dict[str, Entry] = getattr(self, kind)
        current = entries.get(key)
        if current is not None and (current.created_at, current.claim) == (entry.created_at, entry.claim):
            return False  # a newer revision that changes nothing here is no reason to push
        entries[key] = entry
        if entry.revision:
            self.revisions[key] = entry.revision
        return True

    def drop(self, kind: str, key: str, created_at: str, *, remember: bool = True, revision: int = 0) -> bool:
        """Remove a trigger's entry if it belongs to that incarnation and, with `remember` (the
        trigger is gone, not merely rolled back), never let it back; with `revision` (the trigger
        was disabled, or moved to another account, at that revision), never let an older revision
        back. True when anything changed."""
        changed = False
        if remember and self.removed.get(key, "") < created_at:
            self.removed[key] = created_at
            changed = True
        if revision > self.revisions.get(key, 0):
            self.revisions[key] = revision
            changed = True
        entries: dict[str, Entry] = getattr(self, kind)
        entry = entries.get(key)
        if (
            entry is not None
            and entry.created_at <= created_at
            and (not revision or entry.revision <= revision)
        ):
            del entries[key]
            changed = True
        return changed


encode_record = msgspec.json.Encoder().encode
decode_record = msgspec.json.Decoder(AccountRecord).decode


def base_of(claims: dict[str, Any]) -> dict[str, Any]:
    """An account JWT's claims without what every signing sets anew (`jti`, `iat`, `iss`)."""
    return {k: v for k, v in claims.items() if k not in ("jti", "iat", "iss")}


def owned_claims(record: AccountRecord) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The exports and imports the service's triggers put into the account's JWT."""
    return [e.claim for e in record.exports.values()], [e.claim for e in record.imports.values()]


def others_of(
    live: dict[str, Any], *owned: tuple[list[dict[str, Any]], list[dict[str, Any]]]
) -> dict[str, Any]:
    """The account's live claims without the exports and imports the service owns (now or before):
    everything someone else put there (nsc's revocations, limits, signing keys, their own
    exports and imports) is kept exactly."""
    claims = copy.deepcopy(base_of(live))
    nats = claims.setdefault("nats", {})
    for field, index in (("exports", 0), ("imports", 1)):
        ours = [o[index] for o in owned]
        kept = [v for v in nats.get(field) or [] if not any(v in mine for mine in ours)]
        if kept:
            nats[field] = kept
        else:
            nats.pop(field, None)
    return claims


def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """True when two account claims differ in nothing but what every signing sets anew."""
    return base_of(a) == base_of(b)


def missing(live: dict[str, Any], record: AccountRecord) -> list[str]:
    """The subjects of owned exports and imports the live claims lack (drift)."""
    nats = live.get("nats") or {}
    exports, imports = owned_claims(record)
    gone = [
        e
        for e in exports
        if not any(
            contains(x.get("subject", ""), e["subject"]) and x.get("type") == e.get("type")
            for x in nats.get("exports") or []
        )
    ]
    gone += [i for i in imports if i not in (nats.get("imports") or [])]
    return [str(claim.get("subject")) for claim in gone]


def accounts_of(source_account: str, trigger: StreamTrigger) -> tuple[str, str]:
    """(source account, target account) of a trigger stored under `source_account`."""
    return source_account, trigger.target.account or source_account


def export_of(trigger: StreamTrigger) -> dict[str, Any]:
    """The export a trigger needs in its source account."""
    source = trigger.source
    claim: dict[str, Any] = {"subject": source.subject, "type": source.kind}
    if source.kind == "service":  # nats-server refuses response_type on stream exports
        claim["response_type"] = source.response_type or "Singleton"
        if source.allow_trace:
            claim["allow_trace"] = True
    optional = {
        "name": source.name,
        "description": source.description,
        "info_url": source.info_url,
        "advertise": source.advertise or None,
    }
    claim.update({k: v for k, v in optional.items() if v is not None})
    return claim


def import_of(source_account: str, trigger: StreamTrigger) -> dict[str, Any]:
    """The import a trigger needs in its target account: S of the source account, seen locally as D."""
    source, target = trigger.source, trigger.target
    destination = target.local_subject or target.subject or source.subject
    claim: dict[str, Any] = {"subject": source.subject, "account": source_account, "type": source.kind}
    if destination != source.subject:
        # `local_subject` is where stream messages appear, and where service requests are sent;
        # its `*` map positionally onto those of `subject`.
        claim["local_subject"] = destination
    if target.name is not None:
        claim["name"] = target.name
    if source.kind == "service" and target.share:  # nats-server refuses share on stream imports
        claim["share"] = True
    if source.kind == "stream" and target.allow_trace:
        claim["allow_trace"] = True
    return claim


def compose(record: AccountRecord) -> dict[str, Any]:
    """The account's claims: its own, plus every trigger's export and import (Conflict when they clash)."""
    claims = copy.deepcopy(record.base)
    nats = claims.setdefault("nats", {})
    exports = _merge_exports(
        list(nats.get("exports") or []), [record.exports[k].claim for k in sorted(record.exports)]
    )
    imports = list(nats.get("imports") or []) + [record.imports[k].claim for k in sorted(record.imports)]
    _check_service_imports(imports)
    for field, values in (("exports", exports), ("imports", imports)):
        if values:
            nats[field] = values
        else:
            nats.pop(field, None)
    claims["iat"] = record.iat
    return claims


def _merge_exports(own: list[dict[str, Any]], needed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Own exports plus the needed ones, an export inside another of its type being covered by it.

    nats-server refuses an account whose exports of one type contain one another.
    """
    merged = list(own)
    own_ids = {id(e) for e in own}
    for export in needed:
        same_type = [e for e in merged if e.get("type") == export["type"]]
        cover = next((e for e in same_type if contains(e["subject"], export["subject"])), None)
        if cover is not None:
            if cover.get("response_type", "Singleton") != export.get("response_type", "Singleton"):
                raise Conflict(
                    f"subject {export['subject']!r} is already exported as a service with response type "
                    f"{cover.get('response_type', 'Singleton')!r} - at `$.source.response_type`"
                )
            continue
        inside = [e for e in same_type if contains(export["subject"], e["subject"])]
        if any(id(e) in own_ids for e in inside):
            raise Conflict(
                f"the source account already exports a subject inside {export['subject']!r} "
                "- at `$.source.subject`"
            )
        inside_ids = {id(e) for e in inside}
        merged = [e for e in merged if id(e) not in inside_ids] + [export]
    return merged


def _check_service_imports(imports: list[dict[str, Any]]) -> None:
    """nats-server refuses service imports whose local subjects overlap: say so before pushing."""
    seen: list[str] = []
    for claim in imports:
        if claim.get("type") != "service":
            continue
        local = claim.get("to") or claim.get("local_subject") or claim["subject"]
        for other in seen:
            if contains(local, other) or contains(other, local):
                raise Conflict(
                    f"service subject {local!r} overlaps {other!r}, which the target account already "
                    "imports - at `$.target`"
                )
        seen.append(local)


def contains(outer: str, inner: str) -> bool:
    """True when every subject matching `inner` also matches `outer`."""
    o, i = outer.split("."), inner.split(".")
    for n, token in enumerate(o):
        if token == ">":
            return len(i) > n
        if n >= len(i) or i[n] == ">":
            return False
        if token != "*" and token != i[n]:
            return False
    return len(i) == len(o)
