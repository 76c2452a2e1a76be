"""Accounts mode: stream triggers are real account export/import pairs in a nats-server in operator mode."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import nats
import nats.errors
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from service import config
from service.accounts import bootstrap, claims, devstack, jwt
from service.accounts.system import CLAIMS_UPDATE, SystemAccount
from service.app import running
from service.auth import mint
from service.config import Settings
from service.errors import Internal
from service.natsserver import NatsServer
from service.routing import Api
from service.store import TriggerStore, key_of
from tests.conftest import make_settings
from tests.support import Inbox, Reply, eventually, request, token, unique

API = "ms.trigger"


@dataclass
class Operator:
    """A nats-server in operator mode with the accounts `accounts init` made."""

    dev: bootstrap.DevOperator
    server: NatsServer
    root: Path

    def settings_env(self, **env: Any) -> dict[str, Any]:
        return {
            "NATS_CREDS": self.dev.service.creds,
            "TRIGGER_ROUTING": "accounts",
            "TRIGGER_OPERATOR_SEED": self.dev.signing_seed,
            "TRIGGER_SYSTEM_CREDS": self.dev.system.creds,
            "TRIGGER_RELAY_CREDS": self.dev.relay.creds,
            **env,
        }

    def settings(self, **env: Any) -> Settings:
        return make_settings(self.server.url, **self.settings_env(**env))


@dataclass
class Tenant:
    """A fresh account that imports the Trigger API, with one connected user."""

    key: str
    jwt: str
    nc: Client

    def token(self, *others: Tenant) -> dict[str, str]:
        return {"Authorization": f"Bearer {token(self.key, accounts=[o.key for o in others])}"}


@pytest.fixture(scope="module")
def operator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Operator]:
    root = tmp_path_factory.mktemp("operator")
    dev = bootstrap.create(root / "dev")
    config = root / "nats-server.conf"
    config.write_text(
        bootstrap.server_config(
            dev, resolver_dir=root / "resolver", store_dir=root / "jetstream", port=-1, http_port=None
        )
    )
    with NatsServer(config=config, store_dir=root / "jetstream") as server:
        yield Operator(dev, server, root)


@pytest.fixture(scope="module")
async def system_nc(operator: Operator) -> AsyncIterator[Client]:
    client = await nats.connect(operator.server.url, user_credentials=operator.dev.system.creds)
    yield client
    await client.close()


@pytest.fixture
async def nc_service(operator: Operator) -> AsyncIterator[Client]:
    """A connection in the service's account (where the bucket lives)."""
    client = await nats.connect(operator.server.url, user_credentials=operator.dev.service.creds)
    yield client
    await client.close()


@pytest.fixture
async def service(operator: Operator) -> AsyncIterator[Api]:
    async with running(operator.settings()) as api:
        yield api


@pytest.fixture
async def tenants(operator: Operator, system_nc: Client) -> AsyncIterator[list[Tenant]]:
    """Three fresh accounts (so tests never share an account's JWT), each with a connected user."""
    made = [await new_tenant(operator, operator.server.url, system_nc) for _ in range(3)]
    yield made
    for tenant in made:
        await tenant.nc.close()


async def new_tenant(operator: Operator, url: str, system_nc: Client) -> Tenant:
    """An account that imports the Trigger API, pushed to the server, with a connected user."""
    signer = jwt.read_seed(operator.dev.signing_seed)
    account, user = jwt.new_key("account"), jwt.new_key("user")
    api_import = {"subject": f"{API}.>", "account": operator.dev.service.public_key, "type": "service"}
    account_jwt = jwt.encode(
        jwt.account_claims(jwt.public_key(account), unique("tenant"), imports=[api_import]), signer
    )
    await push(system_nc, account_jwt)
    creds = operator.root / f"{jwt.public_key(user)}.creds"
    creds.write_text(
        jwt.creds(jwt.encode(jwt.user_claims(jwt.public_key(user), "u"), account), jwt.seed_of(user))
    )
    nc = await nats.connect(url, user_credentials=str(creds))
    return Tenant(jwt.public_key(account), account_jwt, nc)


async def push(system_nc: Client, account_jwt: str) -> None:
    reply = json.loads((await system_nc.request(CLAIMS_UPDATE, account_jwt.encode(), timeout=5)).data)
    assert "error" not in reply, reply


async def current_claims(system_nc: Client, account: str) -> dict[str, Any]:
    """The account's claims as the server holds them now."""
    msg = await system_nc.request(f"$SYS.REQ.ACCOUNT.{account}.CLAIMS.LOOKUP", b"", timeout=5)
    return jwt.decode(msg.data.decode())["nats"]  # type: ignore[no-any-return]


def stream_body(
    name: str, source: str, target: str, kind: str = "stream", **target_fields: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": name,
        "trigger_type": "stream",
        "source": {"subject": source, "type": kind},
        "target": {"local_subject": target, "type": kind, **target_fields},
    }
    return body


async def create(tenant: Tenant, body: dict[str, Any], *targets: Tenant) -> Reply:
    return await request(
        tenant.nc, f"{API}.create.stream", body, headers=tenant.token(*targets), account=None
    )


async def delete(tenant: Tenant, name: str) -> Reply:
    return await request(tenant.nc, f"{API}.delete.stream.{name}", headers=tenant.token(), account=None)


# --- stream triggers -------------------------------------------------------------------------


async def test_stream_route_is_live_after_the_201_never_before_and_never_after_delete(
    service: Api, tenants: list[Tenant]
) -> None:
    a, b, _ = tenants
    base = unique("s")
    inbox = await Inbox.on(b.nc, f"{base}.d.>")
    await a.nc.publish(f"{base}.s.1.x", b"before")
    await a.nc.flush()

    name = unique()
    body = stream_body(name, f"{base}.s.*.x", f"{base}.d.*.y", account=b.key)
    reply = await create(a, body, b)
    assert reply.status == 201, reply.envelope
    assert reply.body["target"]["account"] == b.key
    await a.nc.publish(f"{base}.s.7.x", b"after", headers={"k": "v"})
    first = await inbox.first()
    assert (first.subject, first.data, first.headers) == (f"{base}.d.7.y", b"after", {"k": "v"})

    # A second live route into the same subscription orders the proof that the first has stopped.
    other = stream_body(unique(), f"{base}.s2", f"{base}.d.marker", account=b.key)
    assert (await create(a, other, b)).status == 201
    assert (await delete(a, name)).status == 200
    await a.nc.publish(f"{base}.s.8.x", b"deleted")
    await a.nc.publish(f"{base}.s2", b"marker")
    await eventually(lambda: b"marker" in inbox.payloads)
    assert inbox.payloads == [b"after", b"marker"]


async def test_service_route_with_stream_responses_carries_every_reply(
    service: Api, tenants: list[Tenant]
) -> None:
    a, b, _ = tenants
    base = unique("svc")

    async def respond(msg: Msg) -> None:
        for i in range(3):
            await a.nc.publish(msg.reply, f"{i}:{msg.subject}:{msg.data.decode()}".encode())

    await a.nc.subscribe(f"{base}.api.*", cb=respond)
    await a.nc.flush()
    name = unique()
    body = stream_body(name, f"{base}.api.*", f"{base}.call.*", kind="service", account=b.key, share=True)
    body["source"]["response_type"] = "Stream"
    reply = await create(a, body, b)
    assert reply.status == 201, reply.envelope

    inbox_subject = b.nc.new_inbox()
    replies = await Inbox.on(b.nc, inbox_subject)
    await b.nc.publish(f"{base}.call.7", b"q", reply=inbox_subject)
    await eventually(lambda: len(replies.messages) == 3)
    assert sorted(replies.payloads) == [f"{i}:{base}.api.7:q".encode() for i in range(3)]

    assert (await delete(a, name)).status == 200
    with pytest.raises(nats.errors.NoRespondersError):
        await b.nc.request(f"{base}.call.7", b"q", timeout=2)


async def test_a_trigger_within_one_account_is_an_export_and_import_of_itself(
    service: Api, tenants: list[Tenant]
) -> None:
    a = tenants[0]
    base = unique("self")
    inbox = await Inbox.on(a.nc, f"{base}.out.>")
    reply = await create(a, stream_body(unique(), f"{base}.in.>", f"{base}.out.>"))
    assert reply.status == 201, reply.envelope
    await a.nc.publish(f"{base}.in.p.q", b"x")
    assert (await inbox.first()).subject == f"{base}.out.p.q"


async def test_twenty_concurrent_creations_across_two_replicas_all_reach_the_jwts(
    operator: Operator, tenants: list[Tenant], system_nc: Client
) -> None:
    a, b, _ = tenants
    base = unique("many")
    settings = operator.settings()
    async with running(settings), running(settings):
        bodies = [stream_body(unique(), f"{base}.s{i}", f"{base}.d{i}", account=b.key) for i in range(20)]
        replies = await asyncio.gather(*(create(a, body, b) for body in bodies))
        assert [r.status for r in replies] == [201] * 20, [r.envelope for r in replies if r.status != 201]

        exported = {e["subject"] for e in (await current_claims(system_nc, a.key)).get("exports", [])}
        imported = {
            i.get("local_subject") for i in (await current_claims(system_nc, b.key)).get("imports", [])
        }
        assert {f"{base}.s{i}" for i in range(20)} <= exported
        assert {f"{base}.d{i}" for i in range(20)} <= imported
        inbox = await Inbox.on(b.nc, f"{base}.*")
        for i in range(20):
            await a.nc.publish(f"{base}.s{i}", str(i).encode())
        await eventually(lambda: len(inbox.messages) == 20)


async def test_an_export_stays_while_another_trigger_needs_it(
    service: Api, tenants: list[Tenant], system_nc: Client
) -> None:
    a, b, c = tenants
    base = unique("shared")
    first, second = unique(), unique()
    assert (await create(a, stream_body(first, f"{base}.s", f"{base}.b", account=b.key), b)).status == 201
    assert (await create(a, stream_body(second, f"{base}.s", f"{base}.c", account=c.key), c)).status == 201
    inbox = await Inbox.on(c.nc, f"{base}.c")

    assert (await delete(a, first)).status == 200
    assert [e["subject"] for e in (await current_claims(system_nc, a.key))["exports"]] == [f"{base}.s"]
    assert "imports" not in await current_claims(system_nc, b.key) or all(
        i["account"] != a.key for i in (await current_claims(system_nc, b.key))["imports"]
    )
    await a.nc.publish(f"{base}.s", b"still")
    assert (await inbox.first()).data == b"still"

    assert (await delete(a, second)).status == 200
    assert "exports" not in await current_claims(system_nc, a.key)


async def test_a_clashing_import_is_a_409_and_leaves_no_half_pair(
    service: Api, tenants: list[Tenant], system_nc: Client
) -> None:
    a, b, c = tenants
    base = unique("clash")
    taken = stream_body(unique(), f"{base}.a", f"{base}.call", kind="service", account=b.key)
    assert (await create(a, taken, b)).status == 201
    clash = stream_body(unique(), f"{base}.c", f"{base}.call", kind="service", account=b.key)
    reply = await create(c, clash, b)
    assert reply.status == 409, reply.envelope
    assert f"{base}.call" in reply.envelope["error"]
    assert "exports" not in await current_claims(system_nc, c.key)
    assert (
        await request(c.nc, f"{API}.get.stream.{clash['name']}", headers=c.token(), account=None)
    ).status == 404


async def test_accounts_must_be_nats_account_keys(service: Api, tenants: list[Tenant]) -> None:
    a = tenants[0]
    stranger = jwt.public_key(jwt.new_key("account"))  # a valid key that NATS does not know
    for target, status in (("acme", 400), (stranger, 400)):
        reply = await create(a, stream_body(unique(), "x.s", "x.d", account=target), Tenant(target, "", a.nc))
        assert reply.status == status, reply.envelope
        assert "target.account" in reply.envelope["error"] or "account" in reply.envelope["error"]
    reply = await create(a, stream_body(unique(), "x.s", "x.d", account=tenants[1].key))
    assert reply.status == 401, reply.envelope  # the token does not name that account


async def test_a_rejected_target_account_leaves_no_record(service: Api, tenants: list[Tenant]) -> None:
    a = tenants[0]
    name = unique()
    stranger = jwt.public_key(jwt.new_key("account"))
    reply = await create(a, stream_body(name, "y.s", "y.d", account=stranger), Tenant(stranger, "", a.nc))
    assert reply.status == 400, reply.envelope
    history = await request(a.nc, f"{API}.history.stream.{name}", headers=a.token(), account=None)
    assert history.status == 404


async def test_a_cycle_across_accounts_is_refused(service: Api, tenants: list[Tenant]) -> None:
    a, b = tenants[0], tenants[1]
    base = unique("cyc")
    there = await create(a, stream_body(unique(), f"{base}.a", f"{base}.b", account=b.key), b)
    assert there.status == 201, there.envelope
    back = await create(b, stream_body(unique(), f"{base}.b", f"{base}.a", account=a.key), a)
    assert back.status == 400, back.envelope
    assert "cycle" in back.envelope["error"]
    elsewhere = await create(b, stream_body(unique(), f"{base}.b", f"{base}.c", account=a.key), a)
    assert elsewhere.status == 201, elsewhere.envelope


async def update(tenant: Tenant, body: dict[str, Any], *targets: Tenant) -> Reply:
    return await request(
        tenant.nc, f"{API}.update.stream.{body['name']}", body, headers=tenant.token(*targets), account=None
    )


async def patch(tenant: Tenant, name: str, enabled: bool) -> Reply:
    return await request(
        tenant.nc, f"{API}.patch.stream.{name}", {"enabled": enabled}, headers=tenant.token(), account=None
    )


async def test_an_update_switches_the_pair_and_leaves_only_the_new_one(
    service: Api, tenants: list[Tenant], system_nc: Client
) -> None:
    a, b, _ = tenants
    base = unique("upd")
    inbox = await Inbox.on(b.nc, f"{base}.>")
    name = unique()
    assert (await create(a, stream_body(name, f"{base}.s1", f"{base}.d1", account=b.key), b)).status == 201
    assert (
        await create(a, stream_body(unique(), f"{base}.m", f"{base}.marker", account=b.key), b)
    ).status == 201
    await a.nc.publish(f"{base}.s1", b"one")
    await eventually(lambda: b"one" in inbox.payloads)

    reply = await update(a, stream_body(name, f"{base}.s2", f"{base}.d2", account=b.key), b)
    assert reply.status == 200, reply.envelope
    assert reply.body["type"] == "updated"
    await a.nc.publish(f"{base}.s1", b"old source")  # no retry: switched when the 200 arrives
    await a.nc.publish(f"{base}.s2", b"two")
    await a.nc.publish(f"{base}.m", b"marker")
    await eventually(lambda: b"marker" in inbox.payloads)
    assert [(m.subject, m.data) for m in inbox.messages] == [
        (f"{base}.d1", b"one"),
        (f"{base}.d2", b"two"),
        (f"{base}.marker", b"marker"),
    ]
    exported = {e["subject"] for e in (await current_claims(system_nc, a.key))["exports"]}
    assert exported == {f"{base}.s2", f"{base}.m"}  # the old export went once the import switched
    imported = {i.get("local_subject") for i in (await current_claims(system_nc, b.key))["imports"]}
    assert f"{base}.d1" not in imported
    assert f"{base}.d2" in imported


async def test_an_update_may_move_the_import_to_another_account(
    service: Api, tenants: list[Tenant], system_nc: Client
) -> None:
    a, b, c = tenants
    base = unique("move")
    in_b, in_c = await Inbox.on(b.nc, f"{base}.d"), await Inbox.on(c.nc, f"{base}.d")
    name = unique()
    assert (await create(a, stream_body(name, f"{base}.s", f"{base}.d", account=b.key), b)).status == 201
    reply = await update(a, stream_body(name, f"{base}.s", f"{base}.d", account=c.key), c)
    assert reply.status == 200, reply.envelope
    await a.nc.publish(f"{base}.s", b"moved")
    await eventually(lambda: b"moved" in in_c.payloads)
    assert all(i["account"] != a.key for i in (await current_claims(system_nc, b.key)).get("imports", []))
    assert in_b.payloads == []


async def test_a_disabled_trigger_has_no_pair_and_enabling_restores_it(
    service: Api, tenants: list[Tenant], system_nc: Client
) -> None:
    a, b, _ = tenants
    base = unique("off")
    inbox = await Inbox.on(b.nc, f"{base}.>")
    name = unique()
    assert (await create(a, stream_body(name, f"{base}.s", f"{base}.d", account=b.key), b)).status == 201
    assert (
        await create(a, stream_body(unique(), f"{base}.m", f"{base}.marker", account=b.key), b)
    ).status == 201

    off = await patch(a, name, False)
    assert off.status == 200, off.envelope
    assert {e["subject"] for e in (await current_claims(system_nc, a.key))["exports"]} == {f"{base}.m"}
    await a.nc.publish(f"{base}.s", b"while disabled")
    await a.nc.publish(f"{base}.m", b"marker")
    await eventually(lambda: b"marker" in inbox.payloads)

    on = await patch(a, name, True)
    assert on.status == 200, on.envelope
    await a.nc.publish(f"{base}.s", b"enabled")  # no retry: live when the 200 arrives
    await eventually(lambda: b"enabled" in inbox.payloads)
    assert inbox.payloads == [b"marker", b"enabled"]


async def test_a_restarted_service_re_pushes_the_current_jwts(
    operator: Operator, tenants: list[Tenant], system_nc: Client
) -> None:
    a, b, _ = tenants
    base = unique("restart")
    settings = operator.settings()
    async with running(settings):
        reply = await create(a, stream_body(unique(), f"{base}.s", f"{base}.d", account=b.key), b)
        assert reply.status == 201, reply.envelope
    # A server that lost the pushed JWTs holds only the preloaded ones (newer iat: they win).
    for tenant in (a, b):
        original = jwt.decode(tenant.jwt)
        original.pop("iat")
        await push(system_nc, jwt.encode(original, jwt.read_seed(operator.dev.signing_seed)))
    assert "exports" not in await current_claims(system_nc, a.key)
    inbox = await Inbox.on(b.nc, f"{base}.d")
    async with running(settings):
        await a.nc.publish(f"{base}.s", b"back")
        assert (await inbox.first()).data == b"back"


async def test_a_trigger_deleted_while_no_service_ran_loses_its_pair_at_the_next_start(
    operator: Operator, tenants: list[Tenant], system_nc: Client, nc_service: Client
) -> None:
    a, b, _ = tenants
    base = unique("gone")
    settings = operator.settings()
    name = unique()
    async with running(settings):
        reply = await create(a, stream_body(name, f"{base}.s", f"{base}.d", account=b.key), b)
        assert reply.status == 201, reply.envelope
    store = await TriggerStore.open(nc_service, settings.bucket)
    await store.mark_deleted(key_of(a.key, "stream", name))  # as a replica that crashed before deactivating
    assert "exports" in await current_claims(system_nc, a.key)
    async with running(settings):
        assert "exports" not in await current_claims(system_nc, a.key)
        assert all(i["account"] != a.key for i in (await current_claims(system_nc, b.key))["imports"])


async def test_a_restarted_nats_server_gets_the_current_jwts_back(operator: Operator, tmp_path: Path) -> None:
    """A server restarted with only its preloaded JWTs: the service re-pushes when it reconnects."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = tmp_path / "nats-server.conf"
    resolver, store = tmp_path / "resolver", tmp_path / "jetstream"
    config.write_text(
        bootstrap.server_config(
            operator.dev, resolver_dir=resolver, store_dir=store, port=port, http_port=None
        )
    )
    first = NatsServer(config=config, store_dir=store).start()
    servers = [first]
    a_dev, b_dev = operator.dev.tenants  # preloaded: they survive the loss of the resolver directory
    a = await nats.connect(first.url, user_credentials=a_dev.creds, reconnect_time_wait=0.1)
    b = await nats.connect(first.url, user_credentials=b_dev.creds, reconnect_time_wait=0.1)
    try:
        async with running(make_settings(first.url, **operator.settings_env())):
            token_a = {"Authorization": f"Bearer {token(a_dev.public_key, accounts=[b_dev.public_key])}"}
            body = stream_body(unique(), "restart.s", "restart.d", account=b_dev.public_key)
            reply = await request(a, f"{API}.create.stream", body, headers=token_a, account=None)
            assert reply.status == 201, reply.envelope
            inbox = await Inbox.on(b, "restart.d")
            first.stop()
            shutil.rmtree(resolver)
            servers.append(NatsServer(config=config, store_dir=store).start())

            async def carried() -> bool:
                with contextlib.suppress(nats.errors.Error):
                    await a.publish("restart.s", b"again")
                return bool(inbox.messages)

            await eventually(carried, timeout=10, interval=0.1)
    finally:
        await a.close()
        await b.close()
        for server in servers:
            server.stop()


async def test_tenants_call_the_trigger_api_through_their_import(operator: Operator) -> None:
    """The accounts `init` made: a tenant user reaches the service in its own account."""
    async with running(operator.settings()):
        nc = await nats.connect(operator.server.url, user_credentials=operator.dev.tenants[0].creds)
        try:
            reply = await request(
                nc, f"{API}.list", {"subject_pattern": f"{API}.>"}, account=operator.dev.tenants[0].public_key
            )
        finally:
            await nc.close()
    assert reply.status == 200, reply.envelope


# --- units -----------------------------------------------------------------------------------


async def test_a_jwt_the_operator_did_not_sign_is_never_pushed(
    operator: Operator, system_nc: Client, tenants: list[Tenant]
) -> None:
    pushed = await Inbox.on(system_nc, CLAIMS_UPDATE)
    system = await SystemAccount.open(operator.settings())
    try:
        claims_of_a = jwt.decode(tenants[0].jwt)
        with pytest.raises(Internal):
            await system.push(jwt.encode(claims_of_a, jwt.new_key("operator")))
        await system.push(system.sign(claims_of_a))  # a trusted one, to order the observation
    finally:
        await system.close()
    await eventually(lambda: pushed.messages)
    assert [jwt.decode(m.data.decode())["iss"] for m in pushed.messages] == [jwt.public_key(system.signer)]


async def test_the_service_refuses_to_start_with_a_key_the_servers_do_not_trust(
    operator: Operator, tmp_path: Path
) -> None:
    seed = tmp_path / "other.nk"
    seed.write_text(jwt.seed_of(jwt.new_key("operator")))
    with pytest.raises(config.ConfigError, match="TRIGGER_OPERATOR_SEED"):
        async with running(operator.settings(TRIGGER_OPERATOR_SEED=str(seed))):
            pass


def test_accounts_mode_refuses_to_start_without_its_keys() -> None:
    with pytest.raises(config.ConfigError, match="TRIGGER_OPERATOR_SEED and TRIGGER_SYSTEM_CREDS"):
        config.load({"TRIGGER_ROUTING": "accounts", "TRIGGER_AUTH": "none"})


def test_jwt_round_trip_and_verification() -> None:
    signer, other = jwt.new_key("operator"), jwt.new_key("operator")
    token_ = jwt.encode({"sub": "A", "nats": {"type": "account", "version": 2}}, signer)
    header, payload, _ = token_.split(".")
    assert "=" not in token_
    assert json.loads(jwt._unb64(header)) == {"typ": "JWT", "alg": "ed25519-nkey"}
    claims_ = jwt.verify(token_, {jwt.public_key(signer)})
    assert claims_["iss"] == jwt.public_key(signer)
    assert len(claims_["jti"]) == 52
    with pytest.raises(jwt.JwtError):
        jwt.verify(token_, {jwt.public_key(other)})
    forged = f"{header}.{payload[:-2]}AA.{token_.split('.')[2]}"
    with pytest.raises(jwt.JwtError):
        jwt.verify(forged, {jwt.public_key(signer)})


@pytest.mark.parametrize(
    ("outer", "inner", "expected"),
    [
        ("a.>", "a.b", True),
        ("a.*", "a.b", True),
        ("a.*", "a.>", False),
        ("a.b", "a.*", False),
        ("a.>", "a.>", True),
        ("a.*.c", "a.b.c", True),
        ("a.b", "a.b.c", False),
    ],
)
def test_subject_containment(outer: str, inner: str, expected: bool) -> None:
    assert claims.contains(outer, inner) is expected


def test_exports_inside_another_are_covered_by_it() -> None:
    record = claims.AccountRecord(account="A", base={"sub": "A", "nats": {}})
    record.put("exports", "k1", claims.Entry("t1", {"subject": "a.b", "type": "stream"}))
    record.put("exports", "k2", claims.Entry("t2", {"subject": "a.>", "type": "stream"}))
    record.put("exports", "k3", claims.Entry("t3", {"subject": "a.b", "type": "service"}))
    exports = claims.compose(record)["nats"]["exports"]
    assert sorted((e["subject"], e["type"]) for e in exports) == [("a.>", "stream"), ("a.b", "service")]
    record.drop("exports", "k2", "t2")
    assert sorted(e["subject"] for e in claims.compose(record)["nats"]["exports"]) == ["a.b", "a.b"]


def test_bootstrap_cli_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert bootstrap.main([str(tmp_path / "d")]) == 0
    dev = bootstrap.load(tmp_path / "d")
    assert [a.name for a in dev.tenants] == list(bootstrap.TENANTS)
    assert jwt.decode(Path(dev.service.jwt).read_text())["nats"]["limits"]["disk_storage"] == -1
    assert bootstrap.main([str(tmp_path / "d")]) == 1
    assert "--force" in capsys.readouterr().err
    assert "resolver_preload" in (tmp_path / "d" / "nats-server.conf").read_text()


async def test_make_run_accounts_carries_a_cross_account_trigger(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The local stack in accounts mode, end to end: HTTP create, then NATS carries tenant-a to tenant-b."""
    monkeypatch.chdir(tmp_path)  # `.dev/jwt-secret` lands here
    monkeypatch.setenv("TRIGGER_HTTP_ADDR", "127.0.0.1:0")
    free = devstack.port_free  # never the well-known ports: the stack falls back to free ones
    well_known = (devstack.NATS_PORT, devstack.MONITOR_PORT)
    monkeypatch.setattr(
        devstack, "port_free", lambda port, host="0.0.0.0": port not in well_known and free(port, host)
    )
    shown: dict[str, Any] = {}
    monkeypatch.setattr(devstack, "banner", lambda *args: shown.update(args=args) or "")
    stop = asyncio.Event()
    stack = asyncio.create_task(devstack.run(["--dir", str(tmp_path / "accounts")], stop))
    try:
        await eventually(lambda: shown or stack.done(), timeout=60, interval=0.1)
        url, nats_url, dev, secret = shown["args"]
        a, b = dev.tenants
        a_nc = await nats.connect(nats_url, user_credentials=a.creds)
        b_nc = await nats.connect(nats_url, user_credentials=b.creds)
        try:
            inbox = await Inbox.on(b_nc, "billing.orders")
            body = {
                "name": "orders",
                "trigger_type": "stream",
                "source": {"subject": "orders.created"},
                "target": {"account": b.public_key, "subject": "billing.orders"},
            }
            headers = {"Authorization": f"Bearer {mint(secret, a.public_key, accounts=[b.public_key])}"}
            async with (
                aiohttp.ClientSession() as http,
                http.post(f"{url}/trigger/stream", json=body, headers=headers) as response,
            ):
                assert response.status == 201, await response.text()
            await a_nc.publish("orders.created", b"hello")
            assert (await inbox.first()).data == b"hello"
        finally:
            await a_nc.close()
            await b_nc.close()
    finally:
        stop.set()
        assert await stack == 0
