"""No tenant can route into the platform: reserved namespaces, the service's and the system's
accounts, and the allowed tenants (issue: accounts mode is safe to hand to tenants)."""

from __future__ import annotations

from typing import Any

import pytest
from nats.aio.client import Client

from service.app import running
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
