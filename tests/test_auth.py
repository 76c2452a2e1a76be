"""Authentication first: 401 before anything else, scopes, keys, and the development switch."""

from __future__ import annotations

import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from service.app import running
from service.config import ConfigError
from tests.conftest import make_settings
from tests.support import SECRET, gateway_request, request, stream_request, token, unique

OPERATIONS = [
    ("ms.trigger.create.stream", stream_request("n", "a.b", "c.d")),
    ("ms.trigger.create.gateway", gateway_request("n", "GET", "/n")),
    ("ms.trigger.get.stream.n", None),
    ("ms.trigger.list", {"subject_pattern": "ms.trigger.>"}),
    ("ms.trigger.delete.stream.n", None),
    ("ms.trigger.history.stream.n", None),
]


def bearer(raw: str) -> dict[str, str]:
    return {"Authorization": raw}


def signed(**claims: object) -> dict[str, str]:
    """A correctly signed token with exactly these claims (no `exp` unless given)."""
    return bearer("Bearer " + jwt.encode(claims, SECRET, "HS256"))


LATER = int(time.time()) + 3600


BAD_CREDENTIALS = [
    pytest.param({}, "missing", id="missing"),
    pytest.param(bearer("Bearer"), "missing", id="empty-bearer"),
    pytest.param(bearer("Bearer not-a-jwt"), "invalid", id="malformed"),
    pytest.param(bearer(f"Basic {token()}"), "missing", id="wrong-scheme"),
    pytest.param(
        bearer("Bearer " + jwt.encode({"account": "acme"}, "another-secret-that-is-32-bytes-long", "HS256")),
        "invalid",
        id="bad-signature",
    ),
    pytest.param(
        bearer("Bearer " + jwt.encode({"account": "acme", "exp": int(time.time()) - 10}, SECRET, "HS256")),
        "expired",
        id="expired",
    ),
    pytest.param(bearer("Bearer " + jwt.encode({"sub": "x"}, SECRET, "HS256")), "invalid", id="no-account"),
    pytest.param(signed(account="a.b", exp=LATER), "`account`", id="bad-account"),
    pytest.param(signed(account="acme\n", exp=LATER), "`account`", id="account-trailing-newline"),
    pytest.param(signed(account=["acme"], exp=LATER), "`account`", id="account-not-a-string"),
    pytest.param(signed(account="acme"), "no `exp` claim", id="no-exp"),
    pytest.param(
        signed(account="acme", exp=str(LATER)), "`exp` must be a JSON number", id="exp-numeric-string"
    ),
    pytest.param(signed(account="acme", exp=True), "exp", id="exp-bool"),
    pytest.param(signed(account="acme", exp=None), "`exp`", id="exp-null"),
    pytest.param(signed(account="acme", exp=LATER, iat=str(LATER - 3600)), "`iat`", id="iat-string"),
    pytest.param(signed(account="acme", exp=LATER, nbf="0"), "`nbf`", id="nbf-string"),
    pytest.param(
        signed(account="acme", exp=LATER, accounts=["ok", "a.b"]), "`accounts`", id="accounts-bad-entry"
    ),
    pytest.param(signed(account="acme", exp=LATER, accounts=["ok\n"]), "`accounts`", id="accounts-newline"),
    pytest.param(
        bearer("Bearer " + jwt.encode({"account": "acme"}, SECRET * 2, "HS512")), "invalid", id="wrong-alg"
    ),
]


@pytest.mark.usefixtures("service")
@pytest.mark.parametrize(("headers", "says"), BAD_CREDENTIALS)
@pytest.mark.parametrize(("subject", "payload"), OPERATIONS, ids=[s for s, _ in OPERATIONS])
async def test_every_operation_needs_a_valid_token(nc, subject, payload, headers, says):
    reply = await request(nc, subject, payload, headers=headers, account=None)
    assert reply.status == 401
    assert reply.envelope["error"].startswith("Unauthorized: ")
    assert says in reply.envelope["error"]
    assert reply.headers["Nats-Service-Error-Code"] == "401"


@pytest.mark.usefixtures("service")
async def test_authentication_comes_before_validation(nc):
    reply = await request(nc, "ms.trigger.create.stream", b"not json", account=None)
    assert reply.status == 401


@pytest.mark.usefixtures("service")
async def test_read_only_token_reads_but_cannot_write(nc):
    name = unique()
    assert (await request(nc, "ms.trigger.create.stream", stream_request(name, "r.a", "r.b"))).status == 201
    reader = {"Authorization": f"Bearer {token('acme', scope='triggers:read')}"}
    assert (await request(nc, f"ms.trigger.get.stream.{name}", headers=reader)).status == 200
    assert (
        await request(nc, "ms.trigger.list", {"subject_pattern": "ms.trigger.>"}, headers=reader)
    ).status == 200
    assert (await request(nc, f"ms.trigger.history.stream.{name}", headers=reader)).status == 200
    denied = await request(
        nc, "ms.trigger.create.stream", stream_request(unique(), "r.c", "r.d"), headers=reader
    )
    assert denied.status == 401
    assert "triggers:write" in denied.envelope["error"]
    assert (await request(nc, f"ms.trigger.delete.stream.{name}", headers=reader)).status == 401
    assert (await request(nc, f"ms.trigger.get.stream.{name}")).status == 200


@pytest.mark.usefixtures("service")
async def test_write_scope_reads_too_and_other_scopes_do_nothing(nc):
    writer = {"Authorization": f"Bearer {token('acme', scope='profile triggers:write')}"}
    stranger = {"Authorization": f"Bearer {token('acme', scope='profile')}"}
    name = unique()
    assert (
        await request(nc, "ms.trigger.create.stream", stream_request(name, "w.a", "w.b"), headers=writer)
    ).status == 201
    assert (await request(nc, f"ms.trigger.get.stream.{name}", headers=writer)).status == 200
    assert (await request(nc, f"ms.trigger.get.stream.{name}", headers=stranger)).status == 401


async def test_public_key_tokens_are_verified(nats_server, nc, tmp_path):
    private = Ed25519PrivateKey.generate()
    pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (tmp_path / "key.pem").write_bytes(pem)
    settings = make_settings(
        nats_server.url, TRIGGER_JWT_SECRET="", TRIGGER_JWT_PUBLIC_KEY=tmp_path / "key.pem"
    )
    signed = jwt.encode({"account": "acme", "exp": int(time.time()) + 60}, private, algorithm="EdDSA")
    forged = jwt.encode({"account": "acme"}, Ed25519PrivateKey.generate(), algorithm="EdDSA")
    async with running(settings):
        ok = await request(
            nc,
            "ms.trigger.list",
            {"subject_pattern": "ms.trigger.>"},
            headers=bearer(f"Bearer {signed}"),
            account=None,
        )
        bad = await request(
            nc,
            "ms.trigger.list",
            {"subject_pattern": "ms.trigger.>"},
            headers=bearer(f"Bearer {forged}"),
            account=None,
        )
        hs = await request(nc, "ms.trigger.list", {"subject_pattern": "ms.trigger.>"})
    assert (ok.status, bad.status, hs.status) == (200, 401, 401)


async def test_development_switch_makes_every_caller_the_default_account(nats_server, nc):
    settings = make_settings(nats_server.url, TRIGGER_JWT_SECRET="", TRIGGER_AUTH="none")
    name = unique()
    async with running(settings):
        created = await request(
            nc, "ms.trigger.create.stream", stream_request(name, "dev.a", "dev.b"), account=None
        )
        got = await request(nc, f"ms.trigger.get.stream.{name}", account="ignored")
    assert (created.status, got.status) == (201, 200)
    kv = await nc.jetstream().key_value(settings.bucket)
    assert (await kv.get(f"default.stream.{name}")).value


async def test_tokens_without_exp_are_accepted_only_when_allowed(nats_server, nc):
    """TRIGGER_JWT_ALLOW_NO_EXP=true lets a token without `exp` in; every other rule still holds."""
    settings = make_settings(nats_server.url, TRIGGER_JWT_ALLOW_NO_EXP="true")
    query = {"subject_pattern": "ms.trigger.>"}
    async with running(settings):
        no_exp = await request(nc, "ms.trigger.list", query, headers=signed(account="acme"), account=None)
        string_exp = await request(
            nc, "ms.trigger.list", query, headers=signed(account="acme", exp=str(LATER)), account=None
        )
        bad_account = await request(
            nc, "ms.trigger.list", query, headers=signed(account="acme\n"), account=None
        )
    assert (no_exp.status, string_exp.status, bad_account.status) == (200, 401, 401)


@pytest.mark.parametrize(("value", "allowed"), [(None, False), ("false", False), ("true", True), ("1", True)])
def test_allow_no_exp_is_a_boolean_setting_off_by_default(value, allowed):
    env = {} if value is None else {"TRIGGER_JWT_ALLOW_NO_EXP": value}
    assert make_settings("nats://nats.invalid", **env).jwt_allow_no_exp is allowed


def test_a_bad_allow_no_exp_value_stops_the_start_with_the_variable():
    with pytest.raises(ConfigError, match="TRIGGER_JWT_ALLOW_NO_EXP"):
        make_settings("nats://nats.invalid", TRIGGER_JWT_ALLOW_NO_EXP="sometimes")
