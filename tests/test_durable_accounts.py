"""Durable stream triggers in accounts mode: captured and delivered through the service's account
(service.relay), with the tenants' JWTs saying who may send what to whom."""

from __future__ import annotations

from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg

from tests import test_accounts_mode as accounts
from tests.support import Inbox, eventually, request, token, unique

operator, system_nc, nc_service, service, tenants = (
    accounts.operator,
    accounts.system_nc,
    accounts.nc_service,
    accounts.service,
    accounts.tenants,
)

OK = b'{"status_code": 200}'
FAILED = b'{"error": "Internal server error: no", "status_code": 500}'


def durable_body(name: str, source: str, target: str, account: str, dead: str) -> dict[str, Any]:
    body = accounts.stream_body(name, source, target, account=account)
    body["delivery"] = {
        "mode": "durable",
        "attempts": 2,
        "backoff": "linear",
        "backoff_delay_ms": 20,
        "backoff_max_ms": 50,
        "timeout_ms": 1000,
        "dead_letter_subject": dead,
    }
    return body


async def relay_imports(system_nc: Client, account: str) -> list[dict[str, Any]]:
    claims = await accounts.current_claims(system_nc, account)
    return [
        i for i in claims.get("imports") or [] if str(i.get("local_subject", "")).startswith("trigger-relay.")
    ]


async def test_a_durable_route_between_two_accounts_delivers_through_the_service_account(
    service: Any, system_nc: Client, tenants: list[accounts.Tenant]
):
    """A's messages reach B's subscriber (which confirms each), the one B always refuses goes to A's
    dead-letter subject, C sees nothing, `get` counts it all; after the delete nothing more is
    delivered and the service account's relay imports are gone."""
    a, b, c = tenants
    base = unique("relay")
    received: list[bytes] = []

    async def target(msg: Msg) -> None:
        if msg.data != b"7":
            received.append(msg.data)
        await b.nc.publish(msg.reply, FAILED if msg.data == b"7" else OK)

    await b.nc.subscribe(f"{base}.out", cb=target)
    await b.nc.flush()
    dead = await Inbox.on(a.nc, f"{base}.dead")
    seen_by_c = await Inbox.on(c.nc, f"{base}.>")
    body = durable_body(f"{base}-t", f"{base}.in", f"{base}.out", b.key, f"{base}.dead")
    reply = await accounts.create(a, body, b)
    assert reply.status == 201, reply.envelope
    own = service._ctx.carrier.inner.relay_account
    mine = [i for i in await relay_imports(system_nc, own) if i["subject"] in (f"{base}.in", f"{base}.out")]
    assert sorted((i["subject"], i["type"]) for i in mine) == [
        (f"{base}.in", "stream"),
        (f"{base}.out", "service"),
    ]

    numbers = [str(n).encode() for n in range(200)]
    for number in numbers:
        await a.nc.publish(f"{base}.in", number)
    await a.nc.flush()
    await eventually(lambda: dead.messages, timeout=10)
    letter = dead.messages[0]
    assert letter.data == b"7"
    assert (letter.headers or {})["Trigger-Original-Subject"] == f"{base}.in"
    assert (letter.headers or {})["Trigger-Attempts"] == "2"
    await eventually(lambda: len(received) >= 199, timeout=10)
    assert sorted(received, key=int) == [n for n in numbers if n != b"7"]

    async def counted() -> bool:
        got = await request(a.nc, f"{accounts.API}.get.stream.{base}-t", headers=a.token(), account=None)
        stats = got.body.get("delivery_stats") or {}
        return stats.get("delivered") == 199 and stats.get("dead_lettered") == 1 and stats.get("pending") == 0

    await eventually(counted, timeout=5)

    assert (await accounts.delete(a, f"{base}-t")).status == 200
    before = len(received)
    await a.nc.publish(f"{base}.in", b"after-delete")
    await a.nc.flush()
    # A direct route created after the delete orders the proof: what it carries has been routed.
    marker = accounts.stream_body(f"{base}-m", f"{base}.marker", f"{base}.marked", account=b.key)
    assert (await accounts.create(a, marker, b)).status == 201
    marked = await Inbox.on(b.nc, f"{base}.marked")
    await a.nc.publish(f"{base}.marker", b"marker")
    await marked.wait_for(b"marker")
    await b.nc.flush()
    assert len(received) == before
    assert seen_by_c.payloads == []
    assert not [i for i in await relay_imports(system_nc, own) if i["subject"].startswith(base)]


async def test_without_the_relay_account_a_durable_trigger_is_a_400_and_the_relay_is_no_tenant(
    operator: accounts.Operator, tenants: list[accounts.Tenant]
):
    a, b, _ = tenants
    base = unique("norelay")
    body = durable_body(f"{base}-t", f"{base}.in", f"{base}.out", b.key, f"{base}.dead")
    async with accounts.running(operator.settings(TRIGGER_RELAY_CREDS="")):
        reply = await accounts.create(a, body, b)
        assert reply.status == 400, reply.envelope
        assert "TRIGGER_RELAY_CREDS" in reply.envelope["error"]
        assert "$.delivery.mode" in reply.envelope["error"]
    async with accounts.running(operator.settings()):
        relay = accounts.stream_body(
            f"{base}-r", f"{base}.in", f"{base}.out", account=operator.dev.relay.public_key
        )
        allowed = {"Authorization": f"Bearer {token(a.key, accounts=[operator.dev.relay.public_key])}"}
        reply = await request(a.nc, f"{accounts.API}.create.stream", relay, headers=allowed, account=None)
        assert reply.status == 400, reply.envelope
        assert "relay account" in reply.envelope["error"]


async def test_an_update_between_direct_and_durable_loses_nothing_after_each_200(
    service: Any, tenants: list[accounts.Tenant]
):
    """Numbers published after each update's 200 all reach B (durable: at least once)."""
    a, b, _ = tenants
    base = unique("switch")
    received: list[bytes] = []

    async def target(msg: Msg) -> None:
        received.append(msg.data)
        if msg.reply:
            await b.nc.publish(msg.reply, OK)

    await b.nc.subscribe(f"{base}.out", cb=target)
    await b.nc.flush()
    direct = accounts.stream_body(f"{base}-t", f"{base}.in", f"{base}.out", account=b.key)
    durable = durable_body(f"{base}-t", f"{base}.in", f"{base}.out", b.key, f"{base}.dead")
    assert (await accounts.create(a, direct, b)).status == 201
    sent: list[bytes] = []
    for step, body in enumerate((durable, direct, durable)):
        reply = await request(
            a.nc, f"{accounts.API}.update.stream.{base}-t", body, headers=a.token(b), account=None, timeout=10
        )
        assert reply.status == 200, reply.envelope
        for i in range(50):
            sent.append(f"{step}-{i}".encode())
            await a.nc.publish(f"{base}.in", sent[-1])
        await a.nc.flush()
        await eventually(lambda: set(sent) <= set(received), timeout=10)
