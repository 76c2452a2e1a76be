"""Every operation's success path over NATS request/reply, and its state errors (404, 409)."""

from __future__ import annotations

import asyncio
import hashlib
import re
from datetime import datetime

import msgspec
import pytest

from service import store as store_module
from tests.support import gateway_request, request, stream_request, unique

RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")

pytestmark = pytest.mark.usefixtures("service")


async def stored(nc, settings, key):
    """The record stored under `key`, straight from the KV bucket."""
    kv = await nc.jetstream().key_value(settings.bucket)
    entry = await kv.get(key)
    return msgspec.json.decode(entry.value), entry.revision


# --- create ----------------------------------------------------------------------------------


async def test_create_stream_replies_201_with_every_field_and_stores_it(nc, settings):
    name = unique()
    req = stream_request(
        name,
        "ms.data.source",
        "ms.data.target",
        collection="my-collection",
        description="Stream data processing trigger",
    )
    req["source"]["response_type"] = "Stream"
    req["target"]["name"] = "target-name"
    reply = await request(nc, "ms.trigger.create.stream", req)

    assert reply.status == 201
    body = reply.body
    for field, value in req.items():
        assert body[field] == value
    assert body["stream"] == settings.bucket
    assert body["subject"] == f"ms.trigger.stream.{name}"
    assert body["trigger_type"] == "stream"
    assert body["type"] == "created"
    assert RFC3339.match(body["created_at"])
    record, revision = await stored(nc, settings, f"acme.stream.{name}")
    assert "revision" not in record  # stored without it: replies carry it
    assert {**record, "revision": revision} == body


async def test_create_gateway_fills_defaults_and_assigns_a_unique_mapping_subject(nc, settings):
    first, second = unique(), unique()
    a = await request(nc, "ms.trigger.create.gateway", gateway_request(first, "GET", f"/{first}"))
    b = await request(
        nc,
        "ms.trigger.create.gateway",
        gateway_request(
            second,
            "POST",
            f"/{second}/",
            is_public=True,
            limit={"request": 5, "time": 1000},
            timeout=1500,
            traffic_distribution={"1": 90, "v-2": 10},
        ),
    )
    assert (a.status, b.status) == (201, 201)
    mapping = a.body["gateway_mapping"]
    assert mapping == {"method": "GET", "path": f"/{first}", "is_public": False, "timeout": 30000}
    assert b.body["gateway_mapping"] == {
        "method": "POST",
        "path": f"/{second}/",
        "is_public": True,
        "timeout": 1500,
        "limit": {"request": 5, "time": 1000},
        "traffic_distribution": {"1": 90, "v-2": 10},
    }
    subjects = {a.body["gateway_mapping_subject"], b.body["gateway_mapping_subject"]}
    assert len(subjects) == 2
    assert all(re.match(r"^ms\.trigger\.gateway\.[A-Za-z0-9]+$", s) for s in subjects)
    assert a.body["subject"] == f"ms.trigger.gateway.{first}"
    assert a.body["trigger_type"] == "gateway"
    assert a.body["type"] == "created"
    record, revision = await stored(nc, settings, f"acme.gateway.{second}")
    assert {**record, "revision": revision} == b.body


async def test_response_only_gateway_fields_are_accepted_and_ignored(nc):
    req = gateway_request(unique(), "GET", f"/{unique()}", subject="x", gateway="y", error="z")
    reply = await request(nc, "ms.trigger.create.gateway", req)
    assert reply.status == 201
    assert not {"subject", "gateway", "error"} & set(reply.body["gateway_mapping"])


async def test_same_name_twice_is_409_and_keeps_the_first(nc, settings):
    name = unique()
    first = await request(nc, "ms.trigger.create.stream", stream_request(name, "a.one", "b.one"))
    again = await request(nc, "ms.trigger.create.stream", stream_request(name, "a.two", "b.two"))
    assert first.status == 201
    assert again.status == 409
    assert again.envelope["error"].startswith("Conflict: ")
    record, _ = await stored(nc, settings, f"acme.stream.{name}")
    assert record["source"]["subject"] == "a.one"


async def test_same_name_different_type_is_two_triggers(nc):
    name = unique()
    s = await request(nc, "ms.trigger.create.stream", stream_request(name, "a.x", "b.x"))
    g = await request(nc, "ms.trigger.create.gateway", gateway_request(name, "GET", f"/{name}"))
    assert (s.status, g.status) == (201, 201)


async def test_fifty_concurrent_creates_of_one_name_give_one_201(nc, settings):
    name = unique()
    replies = await asyncio.gather(
        *(
            request(nc, "ms.trigger.create.stream", stream_request(name, f"src.{i}", f"dst.{i}"))
            for i in range(50)
        )
    )
    statuses = sorted(r.status for r in replies)
    assert statuses == [201] + [409] * 49
    winner = next(r for r in replies if r.status == 201)
    record, revision = await stored(nc, settings, f"acme.stream.{name}")
    assert {**record, "revision": revision} == winner.body
    kv = await nc.jetstream().key_value(settings.bucket)
    assert len(await kv.history(f"acme.stream.{name}")) == 1


async def test_gateway_route_is_held_across_accounts(nc):
    path = f"/{unique()}"
    mine = await request(nc, "ms.trigger.create.gateway", gateway_request(unique(), "GET", path))
    theirs = await request(
        nc, "ms.trigger.create.gateway", gateway_request(unique(), "GET", path), account="other"
    )
    other_method = await request(nc, "ms.trigger.create.gateway", gateway_request(unique(), "POST", path))
    assert (mine.status, theirs.status, other_method.status) == (201, 409, 201)
    assert "GET " + path in theirs.envelope["error"]


async def test_gateway_route_is_free_again_after_delete(nc):
    name, path = unique(), f"/{unique()}"
    assert (await request(nc, "ms.trigger.create.gateway", gateway_request(name, "PUT", path))).status == 201
    assert (await request(nc, f"ms.trigger.delete.gateway.{name}")).status == 200
    taken = await request(
        nc, "ms.trigger.create.gateway", gateway_request(unique(), "PUT", path), account="b"
    )
    assert taken.status == 201


async def test_concurrent_gateways_on_one_route_give_one_201(nc):
    path = f"/{unique()}"
    replies = await asyncio.gather(
        *(
            request(nc, "ms.trigger.create.gateway", gateway_request(unique(), "GET", path), account=f"a{i}")
            for i in range(10)
        )
    )
    assert sorted(r.status for r in replies) == [201] + [409] * 9


def _route_claim_key(method: str, path: str) -> str:
    """Where the service keeps the claim of one gateway route (service.handlers `_claim_route`)."""
    return f"=route.{method}.{hashlib.sha256(f'{method} {path}'.encode()).hexdigest()}"


async def test_a_route_claimed_by_a_create_still_under_way_is_not_taken_over(nc, settings):
    """A claims the route and has not stored its trigger yet: B's create of the same route is a 409,
    not a take-over that ends with both answered 201 (seen: two 201s among 10 concurrent creates)."""
    path = f"/{unique()}"
    kv = await nc.jetstream().key_value(settings.bucket)
    await kv.create(_route_claim_key("GET", path), f"a0.gateway.{unique()}".encode())  # A's claim
    reply = await request(
        nc, "ms.trigger.create.gateway", gateway_request(unique(), "GET", path), account="b"
    )
    assert reply.status == 409, reply.envelope
    assert "already served" in reply.envelope["error"]


@pytest.mark.parametrize("holder", ["deleted", "abandoned"])
async def test_a_stale_route_claim_is_taken_over(nc, settings, monkeypatch, holder):
    """A claim whose holder was deleted is free at once; one whose holder was never stored is free
    once a create could no longer be under way (here the window is made short)."""
    path = f"/{unique()}"
    if holder == "deleted":
        name = unique()
        created = await request(
            nc, "ms.trigger.create.gateway", gateway_request(name, "GET", path), account="a"
        )
        assert created.status == 201, created.envelope
        assert (await request(nc, f"ms.trigger.delete.gateway.{name}", account="a")).status == 200
    else:
        monkeypatch.setattr(store_module, "CLAIM_UNDER_WAY", 0.0)
        kv = await nc.jetstream().key_value(settings.bucket)
        await kv.create(_route_claim_key("GET", path), f"a0.gateway.{unique()}".encode())
    reply = await request(
        nc, "ms.trigger.create.gateway", gateway_request(unique(), "GET", path), account="b"
    )
    assert reply.status == 201, reply.envelope


# --- get -------------------------------------------------------------------------------------


async def test_get_returns_the_record_as_created(nc):
    name = unique()
    created = await request(nc, "ms.trigger.create.stream", stream_request(name, "g.a", "g.b"))
    reply = await request(nc, f"ms.trigger.get.stream.{name}")
    assert reply.status == 200
    assert reply.body == created.body
    assert reply.envelope["metadata"] == {"subject": f"ms.trigger.stream.{name}"}


@pytest.mark.parametrize("trigger_type", ["stream", "gateway", "subject"])
async def test_get_missing_is_404(nc, trigger_type):
    reply = await request(nc, f"ms.trigger.get.{trigger_type}.{unique()}")
    assert reply.status == 404
    assert reply.envelope["error"].startswith("Not found: ")
    assert reply.headers["Nats-Service-Error-Code"] == "404"


async def test_other_accounts_triggers_are_invisible(nc):
    name = unique()
    await request(nc, "ms.trigger.create.stream", stream_request(name, "i.a", "i.b"))
    for op in ("get", "history", "delete"):
        reply = await request(nc, f"ms.trigger.{op}.stream.{name}", account="intruder")
        assert reply.status == 404, op
    listed = await request(nc, "ms.trigger.list", {"subject_pattern": "ms.trigger.>"}, account="intruder")
    assert listed.body["results"] == []
    assert (await request(nc, f"ms.trigger.get.stream.{name}")).status == 200


async def test_same_name_in_two_accounts_is_two_triggers(nc):
    name = unique()
    a = await request(nc, "ms.trigger.create.stream", stream_request(name, "t.a", "t.b"), account="one")
    b = await request(nc, "ms.trigger.create.stream", stream_request(name, "u.a", "u.b"), account="two")
    assert (a.status, b.status) == (201, 201)
    got = await request(nc, f"ms.trigger.get.stream.{name}", account="two")
    assert got.body["source"]["subject"] == "u.a"


# --- list ------------------------------------------------------------------------------------


async def make_some(nc, account):
    names = sorted(unique() for _ in range(3))
    for i, name in enumerate(names):
        await request(
            nc, "ms.trigger.create.stream", stream_request(name, f"l.{i}", f"m.{i}"), account=account
        )
    gateways = sorted(unique() for _ in range(2))
    for name in gateways:
        await request(
            nc, "ms.trigger.create.gateway", gateway_request(name, "GET", f"/{name}"), account=account
        )
    return names, gateways


@pytest.mark.parametrize("pattern", ["ms.trigger.>", "ms.trigger.*"])
async def test_list_everything_ordered_by_subject(nc, pattern):
    account = unique("acct")
    streams, gateways = await make_some(nc, account)
    reply = await request(nc, "ms.trigger.list", {"subject_pattern": pattern}, account=account)
    assert reply.status == 200
    subjects = [r["subject"] for r in reply.body["results"]]
    expected = sorted(
        [f"ms.trigger.gateway.{n}" for n in gateways] + [f"ms.trigger.stream.{n}" for n in streams]
    )
    assert subjects == expected
    assert reply.body["results_total"] == 5
    assert "next_cursor" not in reply.body
    assert reply.envelope["metadata"] == {"subject": pattern}


async def test_list_by_type_and_by_name(nc):
    account = unique("acct")
    streams, gateways = await make_some(nc, account)
    by_type = await request(
        nc, "ms.trigger.list", {"subject_pattern": "ms.trigger.gateway.*"}, account=account
    )
    assert [r["name"] for r in by_type.body["results"]] == gateways
    by_name = await request(
        nc, "ms.trigger.list", {"subject_pattern": f"ms.trigger.*.{streams[1]}"}, account=account
    )
    assert [r["name"] for r in by_name.body["results"]] == [streams[1]]


async def test_list_leaves_out_deleted_triggers(nc):
    account = unique("acct")
    streams, _ = await make_some(nc, account)
    assert (await request(nc, f"ms.trigger.delete.stream.{streams[0]}", account=account)).status == 200
    reply = await request(nc, "ms.trigger.list", {"subject_pattern": "ms.trigger.stream.>"}, account=account)
    assert [r["name"] for r in reply.body["results"]] == streams[1:]
    assert reply.body["results_total"] == 2


async def test_list_pages_with_limit_and_cursor(nc):
    account = unique("acct")
    names = sorted(unique() for _ in range(7))
    await asyncio.gather(
        *(
            request(nc, "ms.trigger.create.stream", stream_request(n, f"p.{i}", f"q.{i}"), account=account)
            for i, n in enumerate(names)
        )
    )
    seen, cursor, pages = [], None, 0
    while True:
        query = {"subject_pattern": "ms.trigger.>", "limit": 3}
        if cursor:
            query["cursor"] = cursor
        reply = await request(nc, "ms.trigger.list", query, account=account)
        assert reply.status == 200
        assert reply.body["results_total"] == 7
        seen += [r["name"] for r in reply.body["results"]]
        pages += 1
        cursor = reply.body.get("next_cursor")
        if not cursor:
            break
    assert seen == names
    assert pages == 3


async def test_list_of_an_empty_account_is_empty(nc):
    reply = await request(nc, "ms.trigger.list", {"subject_pattern": "ms.trigger.>"}, account=unique("empty"))
    assert reply.status == 200
    assert reply.body == {"results": [], "results_total": 0}


# --- delete and history ----------------------------------------------------------------------


async def test_delete_is_a_poison_pill_kept_in_history(nc, settings):
    name = unique()
    created = await request(nc, "ms.trigger.create.stream", stream_request(name, "d.a", "d.b"))
    reply = await request(nc, f"ms.trigger.delete.stream.{name}")
    assert reply.envelope == {"status_code": 200}
    assert (await request(nc, f"ms.trigger.get.stream.{name}")).status == 404
    assert (await request(nc, f"ms.trigger.delete.stream.{name}")).status == 404
    record, _ = await stored(nc, settings, f"acme.stream.{name}")
    assert record["type"] == "deleted"
    assert RFC3339.match(record["deleted_at"])
    assert {k: v for k, v in record.items() if k not in ("type", "deleted_at")} == {
        k: v for k, v in created.body.items() if k not in ("type", "revision")
    }


async def test_recreate_after_delete_and_history_keeps_both(nc):
    name = unique()
    first = await request(nc, "ms.trigger.create.stream", stream_request(name, "h.a", "h.b"))
    await request(nc, f"ms.trigger.delete.stream.{name}")
    second = await request(nc, "ms.trigger.create.stream", stream_request(name, "h.c", "h.d"))
    assert (first.status, second.status) == (201, 201)
    assert (await request(nc, f"ms.trigger.get.stream.{name}")).body == second.body

    history = await request(nc, f"ms.trigger.history.stream.{name}")
    assert history.status == 200
    results = history.body["results"]
    assert [r["type"] for r in results] == ["created", "deleted", "created"]
    assert history.body["results_total"] == 3
    revisions = [r["revision"] for r in results]
    assert revisions == sorted(revisions)
    assert len(set(revisions)) == 3
    assert results[0]["record"] == first.body
    assert results[2]["record"] == second.body
    for r in results:
        assert RFC3339.match(r["time"])
        datetime.fromisoformat(r["time"].replace("Z", "+00:00"))


async def test_delete_gateway_then_missing(nc):
    name = unique()
    await request(nc, "ms.trigger.create.gateway", gateway_request(name, "GET", f"/{name}"))
    assert (await request(nc, f"ms.trigger.delete.gateway.{name}")).envelope == {"status_code": 200}
    assert (await request(nc, f"ms.trigger.get.gateway.{name}")).status == 404


@pytest.mark.parametrize("trigger_type", ["stream", "subject"])
async def test_delete_and_history_of_missing_is_404(nc, trigger_type):
    assert (await request(nc, f"ms.trigger.delete.{trigger_type}.{unique()}")).status == 404
    assert (await request(nc, f"ms.trigger.history.{trigger_type}.{unique()}")).status == 404
