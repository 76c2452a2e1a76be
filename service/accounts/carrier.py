"""Accounts mode's data plane: a stream trigger is an export in the source account's JWT and an
import in the target account's JWT, so NATS itself routes the data.

Every change of an account's claims is a compare-and-set on its record in the bucket
(service.accounts.claims), then a push of the signed JWT through the system account. After a
push the record is read again: when another writer moved it on meanwhile, its newer JWT is
pushed too, so the JWT the servers hold last is always the record's latest, whatever the order
in which concurrent pushes arrived (nats-server applies any pushed JWT, older `iat` or not).

An update changes the pair in an order that never leaves the route with both or neither for
longer than one push: the new export is added beside the old one (an export alone carries
nothing), then the import is replaced in one push of the target account (old out, new in, in one
JWT), then the old export goes. When the target account itself changes, the new account's import
comes first and the old one's goes next (two accounts cannot change in one push): for the moment
between the two pushes both receive. A disabled trigger has neither export nor import.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import json
import random
import time
from collections.abc import Callable

import nats.errors
from nats.aio.client import Client

from schemas.triggers import StreamTrigger
from service import log
from service.accounts import claims as c
from service.accounts import jwt
from service.accounts.system import SystemAccount
from service.config import Settings
from service.errors import BadRequest, NotFound, Unavailable
from service.relay import relay_of
from service.store import Apply, Change, Observer, TriggerStore, split_key
from service.streams import route_of

STREAM_KEYS = "*.stream.*"
USER_INFO = "$SYS.REQ.USER.INFO"  # answered by the server for any connection: its user and account
USER_INFO_WAIT = 2.0
MEMBERSHIP_INTERVAL = 0.5  # seconds between looks at which servers are up
DRIFT_INTERVAL = 2.0  # seconds between comparisons of the accounts' live JWTs with their triggers
_ATTEMPTS = 64

_log = log.get("accounts")

Mutation = Callable[[c.AccountRecord], bool]


class AccountsCarrier:
    """Carries stream triggers as account export/import pairs (the `Carrier` of service.handlers)."""

    def __init__(self, settings: Settings, store: TriggerStore, observe: Observer | None = None) -> None:
        self.settings = settings
        self._observe = observe
        self.store = store
        self._system: SystemAccount | None = None
        self._known: dict[str, StreamTrigger] = {}
        self._revisions: dict[str, int] = {}  # key -> the revision of the record in `_known`
        self._following = contextlib.AsyncExitStack()
        self.also: list[Apply] = []  # other data planes that follow the same keys with this watch
        self._loaded = False  # the start-up reconciliation is done: changes are carried as they come
        self._stopping = False
        self._reconciling: asyncio.Task[None] | None = None
        self._watchers: list[asyncio.Task[None]] = []
        self._locks: collections.defaultdict[str, asyncio.Lock] = collections.defaultdict(asyncio.Lock)
        self.service_account = ""  # the account the service itself connects in (learnt at start)
        # Where durable triggers are captured and delivered from (TRIGGER_RELAY_CREDS' account).
        self.relay_account = jwt.account_of_creds(settings.relay_creds) if settings.relay_creds else ""

    @property
    def system(self) -> SystemAccount:
        """The system-account connection (open while the carrier is entered)."""
        if self._system is None:
            raise RuntimeError("AccountsCarrier used outside `async with`")
        return self._system

    async def __aenter__(self) -> AccountsCarrier:
        self._system = await SystemAccount.open(self.settings, on_reconnect=self._on_reconnect)
        self.service_account = await _own_account(self.store.js.nc)
        following = self.store.following(STREAM_KEYS, [self._apply, *self.also], on_ready=self._loaded_all)
        try:
            self.follower = await self._following.enter_async_context(following)
        except BaseException:
            await self.__aexit__()
            raise
        self._watchers = [
            asyncio.create_task(self._watch_members(), name="accounts-membership"),
            asyncio.create_task(self._watch_drift(), name="accounts-drift"),
        ]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stopping = True
        for watcher in self._watchers:
            watcher.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        await self._following.aclose()
        if self._reconciling is not None:
            self._reconciling.cancel()
        if self._system is not None:
            await self._system.close()
            self._system = None

    # --- the Carrier protocol ----------------------------------------------------------------

    async def check(self, account: str, trigger: StreamTrigger) -> None:
        """Both accounts must be tenant accounts NATS knows, checked before anything is stored."""
        source, target = c.accounts_of(account, trigger)
        self._check_account(source, "the caller's account (token claim `account`)", "$")
        self._check_account(target, "`target.account`", "$.target.account")
        if trigger.durable and not self.relay_account:
            raise BadRequest(
                "durable delivery in accounts mode needs the relay account's credentials "
                "(TRIGGER_RELAY_CREDS) - at `$.delivery.mode`"
            )
        if target != source and not await self._exists(target):
            raise BadRequest(f"NATS knows no account {target} - at `$.target.account`")

    async def activate(
        self, key: str, revision: int, trigger: StreamTrigger, previous: StreamTrigger | None = None
    ) -> None:
        """Push the export, then the import (switching from `previous`, an update's configuration
        before); return once the servers applied both. Disabled: remove both, as a delete does."""
        if trigger.enabled:
            await self._ensure(key, trigger, always_push=True, revision=revision, previous=previous)
        else:
            await self._remove(key, trigger, always_push=True, revision=revision, previous=previous)

    async def deactivate(self, key: str, trigger: StreamTrigger) -> None:
        """Push the JWTs without the import, then without the export; return once applied."""
        await self._remove(key, trigger, always_push=True)

    # --- pairs -------------------------------------------------------------------------------

    async def _ensure(
        self,
        key: str,
        trigger: StreamTrigger,
        *,
        always_push: bool,
        revision: int = 0,
        previous: StreamTrigger | None = None,
    ) -> None:
        """Put the trigger's export and import, the export first; `previous` is the configuration
        an update replaces (switched from without a moment of neither, see the module)."""
        if trigger.durable or (previous is not None and previous.durable):
            await self._switch(key, trigger, always_push, revision, previous)
            return
        owner = split_key(key)[0]
        source, target = c.accounts_of(owner, trigger)
        export = c.Entry(trigger.created_at, c.export_of(trigger), revision)
        imported = c.Entry(trigger.created_at, c.import_of(source, trigger), revision)
        was = previous if previous is not None and previous.enabled else None
        if was is not None and was.created_at != trigger.created_at:
            was = None
        old_target = c.accounts_of(owner, was)[1] if was is not None else target
        old_export = c.export_of(was) if was is not None else export.claim
        # The old export stays while an old import may still use it, unless one push changes both.
        keep_old = old_export != export.claim and not (source == target == old_target)
        side = _side_key(key)

        def put_export(record: c.AccountRecord) -> bool:
            changed = record.put("exports", key, export)
            if keep_old:
                changed |= record.put("exports", side, c.Entry(trigger.created_at, old_export, revision))
            if target == source:  # a route within one account: it imports its own export
                changed |= record.put("imports", key, imported)
            return changed

        steps: list[tuple[str, Mutation]] = [(source, put_export)]
        if target != source:
            steps.append((target, lambda record: record.put("imports", key, imported)))
        touched: list[str] = []
        try:
            for account, mutate in steps:  # the export first
                touched.append(account)
                await self._update(account, mutate, always_push)
        except Exception:
            if was is None:  # a new pair: leave no half of it behind (an update's caller restores it)
                for account in reversed(touched):  # the import first
                    try:
                        rollback = _dropper(key, trigger.created_at, remember=False)
                        await self._update(account, rollback, False, create=False)
                    except Exception:
                        _log.exception("could not roll back a half pair", key=key, account=account)
            raise
        if old_target != target:  # moved to another account: the old import goes once the new is in
            drop_import = _import_dropper(key, trigger.created_at, revision)
            await self._update(old_target, drop_import, always_push, create=False)
        if keep_old:
            await self._update(source, _side_dropper(side), always_push, create=False)

    async def _remove(
        self,
        key: str,
        trigger: StreamTrigger,
        *,
        always_push: bool,
        revision: int = 0,
        previous: StreamTrigger | None = None,
    ) -> None:
        """Remove the trigger's import, then its export: for good (deleted), or, with `revision`,
        until a later revision enables it again (disabled)."""
        if trigger.durable or (previous is not None and previous.durable):
            configurations = [trigger] if previous is None else [trigger, previous]
            for kind in ("imports", "exports"):  # the imports first
                drop = _dropper(
                    key, trigger.created_at, remember=not revision, revision=revision, kinds=(kind,)
                )
                for account in self._accounts_of(key, configurations):
                    await self._update(account, drop, always_push, create=False)
            return
        owner = split_key(key)[0]
        source, target = c.accounts_of(owner, trigger)
        targets = {target}
        if previous is not None:
            targets.add(c.accounts_of(owner, previous)[1])
        drop = _dropper(key, trigger.created_at, remember=not revision, revision=revision)
        for account in sorted(targets - {source}):
            await self._update(account, drop, always_push, create=False)  # the import first
        await self._update(source, drop, always_push, create=False)

    # --- durable triggers: through the service's account (service.relay) -------------------

    def _entries(self, key: str, trigger: StreamTrigger) -> list[tuple[str, str, str, dict[str, object]]]:
        """(account, kind, entry key, claim) of every export and import the trigger needs. A
        direct one: S exported by the source account, imported by the target's. A durable one
        (captured and delivered by the service, service.durable): S exported to the service's
        account, D exported by the target account as a service to it, and the dead letters exported
        by the service's account to the source account."""
        source, target = c.accounts_of(split_key(key)[0], trigger)
        export = c.export_of(trigger)
        if not trigger.durable:
            return [(source, "exports", key, export), (target, "imports", key, c.import_of(source, trigger))]
        s, d = route_of(trigger)
        relay = relay_of(self.settings.bucket, key, trigger.created_at, s, d)
        own = self.relay_account
        entries: list[tuple[str, str, str, dict[str, object]]] = [
            (source, "exports", key, export),
            (
                target,
                "exports",
                _relay_key(key),
                {"subject": d, "type": "service", "response_type": "Singleton"},
            ),
            (
                own,
                "imports",
                key,
                {"subject": s, "account": source, "type": "stream", "local_subject": relay.captured},
            ),
            (
                own,
                "imports",
                _relay_key(key),
                {"subject": d, "account": target, "type": "service", "local_subject": relay.delivered},
            ),
        ]
        dead = trigger.delivery.dead_letter_subject if trigger.delivery is not None else None
        if dead:
            entries.append((own, "exports", _dead_key(key), {"subject": relay.dead, "type": "stream"}))
            import_dead: dict[str, object] = {
                "subject": relay.dead,
                "account": own,
                "type": "stream",
                "local_subject": dead,
            }
            entries.append((source, "imports", _dead_key(key), import_dead))
        return entries

    def _accounts_of(self, key: str, configurations: list[StreamTrigger]) -> list[str]:
        """Every account the configurations touch, in a stable order."""
        return sorted({account for t in configurations for account, *_ in self._entries(key, t)})

    async def _switch(
        self,
        key: str,
        trigger: StreamTrigger,
        always_push: bool,
        revision: int,
        previous: StreamTrigger | None,
    ) -> None:
        """Put what `trigger` needs (every export, then every import), then drop what only
        `previous` needed (imports first): make-before-break, so a switch between direct and
        durable may deliver a message both ways for a moment, never neither."""
        wanted = self._entries(key, trigger)
        for kind in ("exports", "imports"):
            for account in dict.fromkeys(a for a, k, *_ in wanted if k == kind):
                mine = [(k, e, claim) for a, k, e, claim in wanted if a == account and k == kind]
                await self._update(account, _putter(mine, trigger.created_at, revision), always_push)
        was = previous if previous is not None and previous.created_at == trigger.created_at else None
        if was is None or not was.enabled:
            return
        keep = {(a, k, e) for a, k, e, _ in wanted}
        stale = [(a, k, e) for a, k, e, _ in self._entries(key, was) if (a, k, e) not in keep]
        for kind in ("imports", "exports"):
            for account in dict.fromkeys(a for a, k, _ in stale if k == kind):
                gone = [e for a, k, e in stale if a == account and k == kind]
                drop = _kind_dropper(kind, gone, trigger.created_at, revision)
                await self._update(account, drop, always_push, create=False)

    def _check_account(self, account: str, what: str, where: str) -> None:
        if not jwt.is_account_key(account):
            raise BadRequest(
                f"{what} must be a NATS account public key in accounts mode, not {account!r} - at `{where}`"
            )
        if account == self.system.system_account:
            raise BadRequest(f"{what} may not be the system account - at `{where}`")
        if account == self.service_account:
            raise BadRequest(f"{what} may not be the Trigger Service's own account - at `{where}`")
        if account == self.relay_account:
            raise BadRequest(f"{what} may not be the Trigger Service's relay account - at `{where}`")
        allowed = self.settings.tenant_accounts
        if allowed and account not in allowed:
            raise BadRequest(f"{what} {account} is not a tenant account (TRIGGER_TENANTS) - at `{where}`")

    # --- one account's record: compare-and-set, then push --------------------------------------

    async def _update(
        self, account: str, mutate: Mutation, always_push: bool, *, create: bool = True
    ) -> None:
        """Apply `mutate` to the account's record at its last revision, sign, store, push.

        Without a record yet, one is made from the account's current JWT when `create`, else
        there is nothing to change.
        """
        key = c.record_key(account)
        async with self._locks[account]:  # writers of one replica take turns; replicas race by CAS
            await self._update_locked(account, key, mutate, always_push, create)

    async def _update_locked(
        self, account: str, key: str, mutate: Mutation, always_push: bool, create: bool
    ) -> None:
        """Change the service's own exports and imports in the account's JWT.

        The servers' live JWT is read first. One the service signed (its `jti` is among the
        record's recent ones, perhaps an older one still on its way) says nothing new; one signed
        elsewhere (nsc) becomes the record's base, less the service's own claims, so its edits
        (revocations, limits, signing keys, other exports and imports) are kept exactly, and a
        trigger's claim it lacks is drift, put back.
        """
        for attempt in range(_ATTEMPTS):
            raw, revision = await self.store.get_raw(key)
            if not raw and not create:
                return
            record = c.decode_record(raw) if raw else c.AccountRecord(account=account, base={})
            before = c.owned_claims(record)
            changed = mutate(record)
            token = await self.system.lookup(account)
            if token is None and create:
                raise BadRequest(f"NATS knows no account {account}")
            live = jwt.decode(token) if token else {}
            foreign = bool(token) and live.get("jti") not in record.pushed
            if foreign:
                record.base = c.others_of(live, before, c.owned_claims(record))
            desired = c.compose(record)
            if not changed:
                if not foreign:
                    if always_push and record.jwt:
                        await self._push_latest(key, record.jwt, revision)
                    return  # the servers hold (or are being sent) the service's latest
                if c.same(desired, live):
                    changed = True  # nothing to repair: just remember that JWT as the base
                else:
                    _log.warning(
                        "account JWT changed outside the service; merging and pushing",
                        account=account,
                        missing=c.missing(live, record),
                    )
            record.iat = max(int(time.time()), record.iat + 1, int(live.get("iat", 0)) + 1)
            desired["iat"] = record.iat
            record.jwt = self.system.sign(desired)
            record.pushed = [*record.pushed[-(c.PUSHED_KEPT - 1) :], str(jwt.decode(record.jwt)["jti"])]
            written = await self.store.put_raw(key, c.encode_record(record), revision)
            if written is not None:
                await self._push_latest(key, record.jwt, written)
                return
            await asyncio.sleep(random.uniform(0, 0.002 * min(attempt + 1, 10)))  # lost the race: again
        raise Unavailable(f"too many concurrent changes to account {account}; try again")

    async def _exists(self, account: str) -> bool:
        raw, _ = await self.store.get_raw(c.record_key(account))
        return bool(raw) or await self.system.knows(account)

    async def _push_latest(self, key: str, token: str, revision: int) -> None:
        """Push the record's newest JWT, until it holds still.

        nats-server applies any JWT pushed to it, older or not, so a replica that pushed a JWT
        another replica had already superseded would put back what the newer one removed: look
        at the record right before each push and push only its newest, then look again.
        """
        while True:
            raw, current = await self.store.get_raw(key)
            if raw is not None and current != revision:
                token, revision = c.decode_record(raw).jwt, current  # superseded before we pushed
            await self.system.push(token)
            raw, current = await self.store.get_raw(key)
            if raw is None or current == revision:
                return
            token, revision = c.decode_record(raw).jwt, current

    # --- reconciliation --------------------------------------------------------------------

    async def _on_reconnect(self) -> None:
        """After a reconnection, reconcile (in the background: this runs in the client's callback)."""
        if self._reconciling is None or self._reconciling.done():
            self._reconciling = asyncio.create_task(self._reconcile_quietly(), name="accounts-reconcile")

    async def _reconcile_quietly(self) -> None:
        try:
            await self._reconcile()
        except Exception:
            _log.exception("reconciliation after a reconnection failed")

    async def _loaded_all(self) -> None:
        """Every live trigger is known: make every account's JWT match them, in this and every replica."""
        await self._reconcile()
        self._loaded = True

    async def _apply(self, change: Change) -> None:
        """Bring the JWTs in line with one change of a trigger record (again and again: idempotent)."""
        if self._observe is not None:
            self._observe(change)
        if self._stopping:
            return
        key, record = change.key, change.record
        previous = self._known.pop(key, None)
        try:
            if isinstance(record, StreamTrigger):
                self._known[key] = record
                self._revisions[key] = change.revision
                if not self._loaded:
                    return
                # Decided from the key's newest revision, not from this (maybe late) event.
                newest = await self._newest(key)
                if newest is None or newest[0].created_at != record.created_at:
                    return  # deleted since, or created anew: that change's own event carries it
                current, revision = newest
                if previous is not None and previous.created_at != current.created_at:
                    await self._remove(key, previous, always_push=False)
                    previous = None
                self._known[key], self._revisions[key] = current, revision
                if current.enabled:
                    await self._ensure(key, current, always_push=False, revision=revision, previous=previous)
                else:
                    await self._remove(key, current, always_push=False, revision=revision, previous=previous)
            elif previous is not None:
                self._revisions.pop(key, None)
                await self._remove(key, previous, always_push=False)
        except Exception as exc:  # the request that made the change reports its own failure
            _log.info("follower could not apply a change", key=key, error=str(exc))

    async def _reconcile(self) -> None:
        """Drop entries of triggers that are gone, add missing ones, re-push every JWT.

        Runs at start and after the system connection reconnects: a restarted nats-server may
        hold only its preloaded JWTs, and pushes may have failed while it was away.
        """
        for record_key in await self.store.raw_keys(c.RECORD_PREFIX + "*"):
            raw, _ = await self.store.get_raw(record_key)
            if not raw:
                continue
            record = c.decode_record(raw)
            stale: list[tuple[str, str, c.Entry, bool]] = []
            for kind in ("exports", "imports"):
                for key, entry in getattr(record, kind).items():
                    needed, gone = await self._needed(key, record.account, kind, entry)
                    if not needed:  # an update's old export left behind is no incarnation to remember
                        stale.append((kind, key, entry, gone and key != _side_key(_trigger_key(key))))
            if stale:
                try:
                    await self._update(record.account, functools.partial(_drop_all, stale=stale), False)
                except Exception as exc:
                    _log.warning("could not reconcile an account", account=record.account, error=str(exc))
        for key, trigger in list(self._known.items()):
            if not trigger.enabled:
                continue
            try:
                await self._ensure(key, trigger, always_push=False, revision=self._revisions.get(key, 0))
            except Exception as exc:
                _log.warning("live trigger could not be carried", key=key, error=str(exc))
        await self._push_all()

    async def _push_all(self) -> None:
        """Push every account's latest JWT again (to servers that missed pushes while away)."""
        for record_key in await self.store.raw_keys(c.RECORD_PREFIX + "*"):
            raw, revision = await self.store.get_raw(record_key)
            if raw:
                try:
                    await self._push_latest(record_key, c.decode_record(raw).jwt, revision)
                except Exception as exc:
                    _log.warning("could not re-push an account JWT", key=record_key, error=str(exc))

    async def _watch_drift(self) -> None:
        """Every DRIFT_INTERVAL, compare each account's live JWT with what its triggers need:
        an export or import of a live trigger removed elsewhere is logged and put back."""
        while True:
            await asyncio.sleep(DRIFT_INTERVAL)
            try:
                for record_key in await self.store.raw_keys(c.RECORD_PREFIX + "*"):
                    account = record_key[len(c.RECORD_PREFIX) :]
                    await self._update(account, _unchanged, False, create=False)
            except Exception as exc:
                _log.warning("could not compare the accounts' JWTs with their triggers", error=str(exc))

    async def _watch_members(self) -> None:
        """Bring a server that (re)joined the cluster up to date within MEMBERSHIP_INTERVAL or so.

        A restarted nats-server has a new server id; it holds the JWTs it had, or its preloaded
        ones, until the full resolver's own sync (minutes), so a route deleted meanwhile would
        still carry data there.
        """
        seen: dict[str, float] = {}  # server id -> when it last answered
        previous: set[str] = set()
        while True:
            try:
                members = set(await self.system.members())
                now = time.monotonic()
                # Joined: never seen (a restarted server has a new id), or back after missing a
                # push; one that only missed a PING window has nothing to catch up on.
                back = members - previous
                joined = {m for m in back if m not in seen or seen[m] < self.system.last_push}
                if seen and joined:
                    _log.info("a server joined; pushing every account JWT again", servers=len(members))
                    await self._push_all()
                seen.update(dict.fromkeys(members, now))
                previous = members
            except Exception as exc:
                _log.warning("could not check the cluster's servers", error=str(exc))
            await asyncio.sleep(MEMBERSHIP_INTERVAL)

    async def _newest(self, key: str) -> tuple[StreamTrigger, int] | None:
        """The live stream trigger the bucket holds at `key` now, and its revision (not what this
        replica saw); None when there is none."""
        try:
            record, revision = await self.store.get(key)
        except NotFound:
            return None
        return (record, revision) if isinstance(record, StreamTrigger) else None

    async def _needed(self, key: str, account: str, kind: str, entry: c.Entry) -> tuple[bool, bool]:
        """(whether the account's `kind` entry of `key` is what the live trigger needs there now,
        whether that incarnation of the trigger is gone for good)."""
        newest = await self._newest(_trigger_key(key))
        if newest is None or newest[0].created_at != entry.created_at:
            return False, True
        trigger = newest[0]
        if not trigger.enabled:
            return False, False
        wanted = {(a, k, e): claim for a, k, e, claim in self._entries(_trigger_key(key), trigger)}
        return wanted.get((account, kind, key)) == entry.claim, False


async def _own_account(nc: Client) -> str:
    """The account of a connection, as the server it is connected to reports it."""
    try:
        msg = await nc.request(USER_INFO, b"", timeout=USER_INFO_WAIT)
        return str(json.loads(msg.data)["data"]["account"])
    except (nats.errors.Error, TimeoutError, ValueError, KeyError, TypeError) as exc:
        raise Unavailable(f"could not learn the service's own account ({USER_INFO}): {exc}") from None


def _unchanged(record: c.AccountRecord) -> bool:
    return False


def _side_key(key: str) -> str:
    """Where an update keeps a trigger's old export while its import switches (no trigger's key)."""
    return f"{key}.previous"


def _trigger_key(key: str) -> str:
    """The trigger key of an entry's key (itself, or the key a side key belongs to)."""
    return ".".join(key.split(".")[:3])


def _relay_key(key: str) -> str:
    """Where a durable trigger keeps its delivery pair (the target's service export, the service
    account's import of it)."""
    return f"{key}.relay"


def _dead_key(key: str) -> str:
    """Where a durable trigger keeps its dead-letter pair."""
    return f"{key}.dead"


def _dropper(
    key: str,
    created_at: str,
    *,
    remember: bool = True,
    revision: int = 0,
    kinds: tuple[str, ...] = ("imports", "exports"),
) -> Mutation:
    def drop(record: c.AccountRecord) -> bool:
        changed = False
        if "exports" in kinds:
            changed |= record.drop("exports", _side_key(key), created_at, remember=False)
        for entry_key in (key, _relay_key(key), _dead_key(key)):
            for kind in kinds:
                changed |= record.drop(kind, entry_key, created_at, remember=remember, revision=revision)
        return changed

    return drop


def _putter(entries: list[tuple[str, str, dict[str, object]]], created_at: str, revision: int) -> Mutation:
    """Put each (kind, entry key, claim) as the trigger's entry at `revision`."""

    def put(record: c.AccountRecord) -> bool:
        changed = False
        for kind, entry_key, claim in entries:
            changed |= record.put(kind, entry_key, c.Entry(created_at, dict(claim), revision))
        return changed

    return put


def _kind_dropper(kind: str, entry_keys: list[str], created_at: str, revision: int) -> Mutation:
    """Drop entries a trigger's newer configuration no longer needs (it lives on)."""

    def drop(record: c.AccountRecord) -> bool:
        changed = False
        for entry_key in entry_keys:
            changed |= record.drop(kind, entry_key, created_at, remember=False, revision=revision)
        return changed

    return drop


def _import_dropper(key: str, created_at: str, revision: int) -> Mutation:
    """Drop a trigger's import from an account it no longer targets (its export may stay there)."""

    def drop(record: c.AccountRecord) -> bool:
        return record.drop("imports", key, created_at, remember=False, revision=revision)

    return drop


def _side_dropper(side: str) -> Mutation:
    def drop(record: c.AccountRecord) -> bool:
        entry = record.exports.get(side)
        return entry is not None and record.drop("exports", side, entry.created_at, remember=False)

    return drop


def _drop_all(record: c.AccountRecord, stale: list[tuple[str, str, c.Entry, bool]]) -> bool:
    """Drop each stale entry that is still as it was found (a concurrent change may have renewed it);
    remember the incarnations that are gone for good."""
    changed = False
    for kind, key, entry, gone in stale:
        if getattr(record, kind).get(key) == entry:
            changed |= record.drop(kind, key, entry.created_at, remember=gone)
    return changed
