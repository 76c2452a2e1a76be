"""No tenant can route into the platform: reserved namespaces, the service's and the system's
accounts, and the allowed tenants (issue: accounts mode is safe to hand to tenants)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from nats.aio.client import Client

from service.app import running
from service.store import Change, key_of
from tests import test_accounts_mode as accounts
from tests.support import PREFIX, auth, request, stream_request, token, unique

operator, system_nc, nc_service, service, tenants = (
    accounts.operator,
    accounts.system_nc,
    accounts.nc_service,
    accounts.service,
    accounts.tenants,
)

RESERVED = [
    "$JS.API.STREAM.LIST",
    "$KV.quiva-trigger-config.acme.stream.x",
    "$O.files.x",
    "$SYS.REQ.SERVER.PING",
    "$SRV.PING",
    "_INBOX.abc.def",
    f"{PREFIX}.create.stream",
    "$ANYTHING.else",
    "*.reaches.in",
    ">",
]


async def _last_seq(nc: Client, bucket: str) -> int:
    return int((await nc.jetstream().stream_info(f"KV_{bucket}")).state.last_seq)


@pytest.mark.parametrize("subject", RESERVED)
@pytest.mark.parametrize("side", ["source", "target"])
async def test_no_route_reads_from_or_writes_into_a_reserved_namespace(nc, settings, side: str, subject: str):
    async with running(settings):
        before = await _last_seq(nc, settings.bucket)
        plain = (
            f"plain.{unique()}" + (".*" if subject.startswith("*") else "") + (".>" if subject == ">" else "")
        )
        source, target = (subject, plain) if side == "source" else (plain, subject)
        reply = await request(nc, f"{PREFIX}.create.stream", stream_request(unique(), source, target))
        assert reply.status == 400, reply.envelope
        assert "reserved namespace" in reply.envelope["error"]
        assert f"$.{side}.subject" in reply.envelope["error"]
        assert await _last_seq(nc, settings.bucket) == before


async def test_the_escalation_path_through_the_service_account_is_closed(
    operator: accounts.Operator, service: Any, nc_service: Client, tenants: list[accounts.Tenant]
):
    """A token naming the service's own account can neither route into `$KV.<bucket>.>` (which
    would let it forge a `=claims.<account>` record and have the operator key sign it) nor use the
    service's account as a route's source or target."""
    own = operator.dev.service.public_key
    bucket = service._ctx.store.bucket
    before = await _last_seq(nc_service, bucket)
    a = tenants[0]
    forged_claims = f"$KV.{bucket}.=claims.{a.key}"
    attempts = [
        (nc_service, own, stream_request(unique(), f"in.{unique()}", forged_claims), "$.target.subject"),
        (nc_service, own, stream_request(unique(), f"in.{unique()}", f"$KV.{bucket}.>"), "$.target.subject"),
        (nc_service, own, stream_request(unique(), f"in.{unique()}", f"out.{unique()}"), "$"),
    ]
    for nc, account, body, where in attempts:
        reply = await request(nc, f"{PREFIX}.create.stream", body, headers=auth(account), account=None)
        assert reply.status == 400, reply.envelope
        assert f"at `{where}`" in reply.envelope["error"]
    # A tenant may not target the service's account or the system account either.
    system = operator.dev.system.public_key
    for target in (own, system):
        body = accounts.stream_body(unique(), f"in.{unique()}", f"out.{unique()}", account=target)
        reply = await request(
            a.nc,
            f"{PREFIX}.create.stream",
            body,
            headers={"Authorization": f"Bearer {token(a.key, accounts=[target])}"},
            account=None,
        )
        assert reply.status == 400, reply.envelope
        assert "$.target.account" in reply.envelope["error"]
    assert await _last_seq(nc_service, bucket) == before


async def test_only_the_allowed_tenants_can_be_routed_between(
    operator: accounts.Operator, tenants: list[accounts.Tenant]
):
    a, b, c = tenants
    async with running(operator.settings(TRIGGER_TENANTS=f"{a.key},{b.key}")):
        allowed = accounts.stream_body(unique(), f"in.{unique()}", f"out.{unique()}", account=b.key)
        assert (await accounts.create(a, allowed, b)).status == 201
        refused = accounts.stream_body(unique(), f"in.{unique()}", f"out.{unique()}", account=c.key)
        reply = await accounts.create(a, refused, c)
        assert reply.status == 400, reply.envelope
        assert "TRIGGER_TENANTS" in reply.envelope["error"]


async def test_nothing_is_delivered_after_a_delete_under_churn(
    operator: accounts.Operator, tenants: list[accounts.Tenant]
):
    """Twenty concurrent creates, then twenty concurrent deletes, across two replicas: after each
    delete's 200, no message published on its source reaches its target."""
    a, b, _ = tenants
    settings = operator.settings()
    async with running(settings), running(settings):
        base = unique("churn")
        names = [f"r{i}" for i in range(20)]
        inbox = await accounts.Inbox.on(b.nc, f"{base}.out.>")
        bodies = [
            accounts.stream_body(f"{base}-{n}", f"{base}.in.{n}", f"{base}.out.{n}", account=b.key)
            for n in names
        ]
        created = await asyncio.gather(*(accounts.create(a, body, b) for body in bodies))
        assert [r.status for r in created] == [201] * len(names)

        async def delete_then_publish(n: str) -> None:
            reply = await accounts.delete(a, f"{base}-{n}")
            assert reply.status == 200, reply.envelope
            for i in range(20):
                await a.nc.publish(f"{base}.in.{n}", f"after-{i}".encode())
            await a.nc.flush()

        await asyncio.gather(*(delete_then_publish(n) for n in names))
        # A fresh route, created after every delete, proves the target would have received them.
        marker = accounts.stream_body(f"{base}-m", f"{base}.in.marker", f"{base}.out.marker", account=b.key)
        assert (await accounts.create(a, marker, b)).status == 201
        await a.nc.publish(f"{base}.in.marker", b"marker")
        await accounts.eventually(lambda: b"marker" in inbox.payloads, timeout=5)
        # Anything still in flight from a wrongly re-added route has had time to arrive.
        for _ in range(3):
            await b.nc.flush()
            await a.nc.flush()
        assert inbox.payloads == [b"marker"]


async def test_a_late_create_event_after_the_delete_brings_nothing_back(
    service: Any, tenants: list[accounts.Tenant]
):
    """A follower that sees a trigger's create only after its delete was answered (a lagging
    watch) must not put the pair back: the data plane follows the key's newest revision."""
    a, b, _ = tenants
    base = unique("late")
    inbox = await accounts.Inbox.on(b.nc, f"{base}.out")
    body = accounts.stream_body(f"{base}-t", f"{base}.in", f"{base}.out", account=b.key)
    created = await accounts.create(a, body, b)
    assert created.status == 201
    key = key_of(a.key, "stream", f"{base}-t")
    record, revision = await service._ctx.store.get(key)
    assert (await accounts.delete(a, f"{base}-t")).status == 200

    carrier = service._ctx.carrier.inner  # the accounts carrier (inside the durable routes)
    carrier._loaded = True
    await carrier._apply(Change(key, revision, record))  # the stale event, delivered late
    carrier._known.pop(key, None)
    await carrier._ensure(key, record, always_push=True)  # a replica's late reconciliation of it

    marker = accounts.stream_body(f"{base}-m", f"{base}.in2", f"{base}.out", account=b.key)
    assert (await accounts.create(a, marker, b)).status == 201
    await a.nc.publish(f"{base}.in", b"after-delete")
    await a.nc.publish(f"{base}.in2", b"marker")
    await accounts.eventually(lambda: b"marker" in inbox.payloads, timeout=5)
    assert inbox.payloads == [b"marker"]


async def test_an_unknown_target_account_is_a_quick_400(service: Any, tenants: list[accounts.Tenant]):
    a = tenants[0]
    stranger = accounts.jwt.public_key(accounts.jwt.new_key("account"))
    body = accounts.stream_body(unique(), f"in.{unique()}", f"out.{unique()}", account=stranger)
    started = time.monotonic()
    reply = await request(
        a.nc,
        f"{PREFIX}.create.stream",
        body,
        headers={"Authorization": f"Bearer {token(a.key, accounts=[stranger])}"},
        account=None,
    )
    took = time.monotonic() - started
    assert reply.status == 400, reply.envelope
    assert "$.target.account" in reply.envelope["error"]
    assert took < 0.25  # the issue asks for 50 ms; a loaded CI machine gets some room


async def _edit_like_nsc(operator: accounts.Operator, system_nc: Client, account: str, edit: Any) -> None:
    """Change an account's live JWT the way an operator does with nsc: read it, edit, sign, push."""
    msg = await system_nc.request(f"$SYS.REQ.ACCOUNT.{account}.CLAIMS.LOOKUP", b"", timeout=5)
    claims = accounts.jwt.decode(msg.data.decode())
    edit(claims["nats"])
    claims["iat"] = int(claims.get("iat", 0)) + 1
    claims.pop("jti", None)
    await accounts.push(
        system_nc, accounts.jwt.encode(claims, accounts.jwt.read_seed(operator.dev.signing_seed))
    )


async def test_revocations_and_foreign_claims_made_with_nsc_survive_trigger_changes_and_restarts(
    operator: accounts.Operator, system_nc: Client, tenants: list[accounts.Tenant]
):
    a, b, _ = tenants
    revoked = accounts.jwt.public_key(accounts.jwt.new_key("user"))
    foreign = {"subject": f"theirs.{unique()}", "type": "stream"}

    def nsc_edit(nats: dict[str, Any]) -> None:
        nats["revocations"] = {revoked: 1_700_000_000}
        nats.setdefault("exports", []).append(foreign)
        nats["limits"]["conn"] = 42

    settings = operator.settings()
    async with running(settings):
        first = accounts.stream_body(unique(), f"one.{unique()}", f"out.{unique()}", account=b.key)
        assert (await accounts.create(a, first, b)).status == 201
        await _edit_like_nsc(operator, system_nc, a.key, nsc_edit)
        second = accounts.stream_body(unique(), f"two.{unique()}", f"out.{unique()}", account=b.key)
        assert (await accounts.create(a, second, b)).status == 201
        claims = await accounts.current_claims(system_nc, a.key)
        assert claims["revocations"] == {revoked: 1_700_000_000}
        assert foreign in claims["exports"]
        assert claims["limits"]["conn"] == 42
        assert {first["source"]["subject"], second["source"]["subject"]} <= {
            e["subject"] for e in claims["exports"]
        }
        assert (await accounts.delete(a, first["name"])).status == 200
    async with running(settings):  # a restart re-pushes what the triggers need, and nothing else changes
        claims = await accounts.current_claims(system_nc, a.key)
        assert claims["revocations"] == {revoked: 1_700_000_000}
        assert foreign in claims["exports"]
        subjects = {e["subject"] for e in claims["exports"]}
        assert second["source"]["subject"] in subjects
        assert first["source"]["subject"] not in subjects


async def test_an_import_removed_outside_the_service_is_put_back_within_seconds(
    operator: accounts.Operator, system_nc: Client, service: Any, tenants: list[accounts.Tenant]
):
    a, b, _ = tenants
    base = unique("drift")
    body = accounts.stream_body(f"{base}-t", f"{base}.in", f"{base}.out", account=b.key)
    assert (await accounts.create(a, body, b)).status == 201

    def remove_import(nats: dict[str, Any]) -> None:
        nats["imports"] = [i for i in nats.get("imports") or [] if i.get("subject") != f"{base}.in"]

    await _edit_like_nsc(operator, system_nc, b.key, remove_import)
    assert f"{base}.in" not in {
        i["subject"] for i in (await accounts.current_claims(system_nc, b.key)).get("imports", [])
    }

    async def repaired() -> bool:
        imports = (await accounts.current_claims(system_nc, b.key)).get("imports") or []
        return f"{base}.in" in {i["subject"] for i in imports}

    await accounts.eventually(repaired, timeout=6)
