"""Bad input gets a 400 that names the field and the rule, and changes nothing in the bucket."""

from __future__ import annotations

import pytest

from tests.support import gateway_request, request, stream_request, unique

pytestmark = pytest.mark.usefixtures("service")


async def bucket_state(nc, settings):
    info = await nc.jetstream().stream_info(f"KV_{settings.bucket}")
    return info.state.last_seq, info.state.messages


async def assert_rejected(nc, settings, subject, payload, *, mentions, status=400):
    before = await bucket_state(nc, settings)
    reply = await request(nc, subject, payload)
    assert reply.status == status, reply.envelope
    error = reply.envelope["error"]
    assert error.startswith("Invalid request: " if status == 400 else "Unauthorized: ")
    for word in mentions:
        assert word in error, error
    assert reply.headers["Nats-Service-Error-Code"] == str(status)
    assert reply.headers["Nats-Service-Error"] == error
    assert "body" not in reply.envelope
    assert await bucket_state(nc, settings) == before
    return error


def with_source(**source):
    req = stream_request(unique(), "a.b", "c.d")
    req["source"].update(source)
    return req


def with_target(**target):
    req = stream_request(unique(), "a.b", "c.d")
    req["target"].update(target)
    return req


def with_mapping(**mapping):
    req = gateway_request(unique(), "GET", f"/{unique()}")
    req["gateway_mapping"].update(mapping)
    return req


STREAM_CASES = [
    pytest.param(b"not json", ["JSON"], id="not-json"),
    pytest.param(b"[1, 2]", ["object"], id="array"),
    pytest.param(b"", ["JSON"], id="empty"),
    pytest.param(
        {"trigger_type": "stream", "source": {"subject": "a"}, "target": {}}, ["name"], id="no-name"
    ),
    pytest.param(stream_request("a.b", "a", "b"), ["$.name", "A-Z"], id="name-dot"),
    pytest.param(stream_request("a*", "a", "b"), ["$.name"], id="name-star"),
    pytest.param(stream_request(">", "a", "b"), ["$.name"], id="name-gt"),
    pytest.param(stream_request("a b", "a", "b"), ["$.name"], id="name-space"),
    pytest.param(stream_request("", "a", "b"), ["$.name"], id="name-empty"),
    pytest.param(
        stream_request("-a", "a", "b"), ["$.name", "starting with a letter or digit"], id="name-dash"
    ),
    pytest.param(stream_request("a" * 129, "a", "b"), ["$.name"], id="name-too-long"),
    pytest.param(stream_request(123, "a", "b"), ["$.name", "str"], id="name-type"),
    pytest.param(
        {**stream_request("n", "a", "b"), "trigger_type": "gateway"}, ["$.trigger_type"], id="wrong-type"
    ),
    pytest.param({**stream_request("n", "a", "b"), "trigger_typ": "x"}, ["trigger_typ"], id="typo-field"),
    pytest.param(stream_request("n", "a..b", "c"), ["$.source.subject", "NATS subject"], id="empty-token"),
    pytest.param(stream_request("n", "a b", "c"), ["$.source.subject"], id="space"),
    pytest.param(stream_request("n", "a.>.b", "c.>.d"), ["$.source.subject"], id="gt-not-last"),
    pytest.param(stream_request("n", "a.b*", "c"), ["$.source.subject"], id="partial-wildcard"),
    pytest.param(stream_request("n", "a", "c."), ["$.target.subject"], id="target-trailing-dot"),
    pytest.param(with_source(type="pipe"), ["$.source.type"], id="bad-source-type"),
    pytest.param(with_source(response_type="Many"), ["$.source.response_type"], id="bad-response-type"),
    pytest.param(with_source(info_url="not a url"), ["info_url", "URL"], id="bad-info-url"),
    pytest.param(with_source(advertise="yes"), ["$.source.advertise", "bool"], id="bad-bool"),
    pytest.param(with_source(extra=1), ["extra"], id="unknown-source-field"),
    pytest.param(with_target(type="service"), ["$.target.type", "source.type"], id="type-mismatch"),
    pytest.param(stream_request("n", "a.*.x", "b.y"), ["wildcards", "$.target"], id="wildcard-count"),
    pytest.param(stream_request("n", "a.*.x", "b.>"), ["wildcards"], id="wildcard-kind"),
    pytest.param(stream_request("n", "a.>", "b.*"), ["wildcards"], id="gt-to-star"),
    pytest.param(stream_request("n", "a.b", "a.b"), ["loop"], id="loop-same"),
    pytest.param(stream_request("n", "a.>", "a.b.>"), ["loop"], id="loop-nested"),
    pytest.param(stream_request("n", "a.*.x", "a.x.*"), ["loop"], id="loop-overlap"),
    pytest.param(with_target(subject=None, local_subject=None), ["loop"], id="loop-default-target"),
    pytest.param(with_target(account="someone-else"), ["target account"], id="foreign-account-unauthorized"),
]


@pytest.mark.parametrize(("payload", "mentions"), STREAM_CASES)
async def test_bad_stream_requests_are_rejected(nc, settings, payload, mentions):
    status = 401 if mentions == ["target account"] else 400
    await assert_rejected(nc, settings, "ms.trigger.create.stream", payload, mentions=mentions, status=status)


async def test_foreign_target_account_needs_accounts_mode(nc, settings):
    req = with_target(account="partner")
    before = await bucket_state(nc, settings)
    reply = await request(
        nc, "ms.trigger.create.stream", req, headers={"Authorization": f"Bearer {_token_with_partner()}"}
    )
    assert reply.status == 400
    assert "accounts mode" in reply.envelope["error"]
    assert await bucket_state(nc, settings) == before


def _token_with_partner():
    from tests.support import token

    return token("acme", accounts=["partner"])


GATEWAY_CASES = [
    pytest.param(with_mapping(method="FETCH"), ["$.gateway_mapping.method"], id="method"),
    pytest.param(with_mapping(method="get"), ["$.gateway_mapping.method"], id="method-case"),
    pytest.param(with_mapping(path="no-slash"), ["$.gateway_mapping.path"], id="path-slash"),
    pytest.param(with_mapping(path="/a?b=1"), ["$.gateway_mapping.path"], id="path-query"),
    pytest.param(with_mapping(path="/a b"), ["$.gateway_mapping.path"], id="path-space"),
    pytest.param(with_mapping(path="/trigger"), ["reserved"], id="reserved-trigger"),
    pytest.param(with_mapping(path="/trigger/x"), ["reserved"], id="reserved-under-trigger"),
    pytest.param(with_mapping(path="/healthz"), ["reserved"], id="reserved-healthz"),
    pytest.param(with_mapping(path="/openapi.json"), ["reserved"], id="reserved-openapi"),
    pytest.param(with_mapping(path="/docs"), ["reserved"], id="reserved-docs"),
    pytest.param(with_mapping(path="/metrics"), ["reserved"], id="reserved-metrics"),
    pytest.param(with_mapping(limit={"request": 1}), ["time"], id="limit-no-time"),
    pytest.param(
        with_mapping(limit={"request": 0, "time": 10}), ["$.gateway_mapping.limit.request"], id="limit-0"
    ),
    pytest.param(
        with_mapping(limit={"request": 1, "time": 0}), ["$.gateway_mapping.limit.time"], id="time-0"
    ),
    pytest.param(with_mapping(timeout=0), ["$.gateway_mapping.timeout", ">= 1"], id="timeout-0"),
    pytest.param(with_mapping(timeout=300_001), ["$.gateway_mapping.timeout", "<= 300000"], id="timeout-max"),
    pytest.param(with_mapping(is_public="no"), ["$.gateway_mapping.is_public"], id="public-type"),
    pytest.param(with_mapping(traffic_distribution={"1": 90, "2": 5}), ["sum to 100"], id="split-sum"),
    pytest.param(
        with_mapping(traffic_distribution={"a.b": 100}), ["traffic_distribution"], id="split-version"
    ),
    pytest.param(with_mapping(traffic_distribution={"1": 101}), ["<= 100"], id="split-range"),
    pytest.param(with_mapping(traffic_distribution={}), ["traffic_distribution"], id="split-empty"),
    pytest.param({"name": "g", "trigger_type": "gateway"}, ["gateway_mapping"], id="no-mapping"),
    pytest.param({**with_mapping(), "trigger_type": "stream"}, ["$.trigger_type"], id="wrong-type"),
]


@pytest.mark.parametrize(("payload", "mentions"), GATEWAY_CASES)
async def test_bad_gateway_requests_are_rejected(nc, settings, payload, mentions):
    await assert_rejected(nc, settings, "ms.trigger.create.gateway", payload, mentions=mentions)


LIST_CASES = [
    pytest.param({}, ["subject_pattern"], id="missing"),
    pytest.param({"subject_pattern": "ms.>"}, ["under ms.trigger."], id="not-under-prefix"),
    pytest.param({"subject_pattern": ">"}, ["under ms.trigger."], id="everything"),
    pytest.param({"subject_pattern": "ms.trigger"}, ["under ms.trigger."], id="prefix-itself"),
    pytest.param({"subject_pattern": "ms.trigger..x"}, ["$.subject_pattern"], id="invalid"),
    pytest.param({"subject_pattern": "ms.trigger.bogus.*"}, ["trigger type"], id="unknown-type"),
    pytest.param({"subject_pattern": "ms.trigger.>", "limit": 0}, ["$.limit"], id="limit-0"),
    pytest.param({"subject_pattern": "ms.trigger.>", "limit": 1001}, ["$.limit"], id="limit-max"),
    pytest.param({"subject_pattern": "ms.trigger.>", "cursor": "%%%"}, ["cursor"], id="cursor"),
    pytest.param({"subject_pattern": "ms.trigger.>", "page": 2}, ["page"], id="unknown-field"),
]


@pytest.mark.parametrize(("payload", "mentions"), LIST_CASES)
async def test_bad_list_queries_are_rejected(nc, settings, payload, mentions):
    await assert_rejected(nc, settings, "ms.trigger.list", payload, mentions=mentions)


@pytest.mark.parametrize(
    ("subject", "mentions"),
    [
        ("ms.trigger.get.bogus.name", ["$.trigger_type"]),
        ("ms.trigger.get.stream.-x", ["$.name"]),
        ("ms.trigger.delete.pipe.name", ["$.trigger_type"]),
        ("ms.trigger.history.stream.-x", ["$.name"]),
    ],
)
async def test_bad_trigger_references_are_rejected(nc, settings, subject, mentions):
    await assert_rejected(nc, settings, subject, None, mentions=mentions)


async def test_a_rejected_request_leaves_an_existing_trigger_alone(nc, settings):
    name = unique()
    created = await request(nc, "ms.trigger.create.stream", stream_request(name, "keep.a", "keep.b"))
    bad = stream_request(name, "keep.a", "keep.a")
    await assert_rejected(nc, settings, "ms.trigger.create.stream", bad, mentions=["loop"])
    assert (await request(nc, f"ms.trigger.get.stream.{name}")).body == created.body


async def test_a_cycle_across_triggers_is_refused_in_both_orders(nc, settings):
    account = unique("acct")
    first = await request(
        nc, "ms.trigger.create.stream", stream_request(unique(), "cy.a", "cy.b"), account=account
    )
    assert first.status == 201
    back = await request(
        nc, "ms.trigger.create.stream", stream_request(unique(), "cy.b", "cy.a"), account=account
    )
    assert back.status == 400
    assert "cycle" in back.envelope["error"]
    chain = await request(
        nc, "ms.trigger.create.stream", stream_request(unique(), "cy.b", "cy.c"), account=account
    )
    assert chain.status == 201
    closing = await request(
        nc, "ms.trigger.create.stream", stream_request(unique(), "cy.*", "cy2.*"), account=account
    )
    assert closing.status == 201
    wild = await request(
        nc, "ms.trigger.create.stream", stream_request(unique(), "cy2.*", "cy.*"), account=account
    )
    assert wild.status == 400
