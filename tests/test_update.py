"""A trigger's life over NATS: update (compare-and-set), enable and disable, the revision in every
reply, the `enabled` list filter, and the 409 of a create that tells a retry from a conflict."""

from __future__ import annotations

import re
from typing import Any

import pytest
from nats.aio.client import Client

from tests.support import Inbox, Reply, gateway_request, request, stream_request, unique

RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")

pytestmark = pytest.mark.usefixtures("service")


async def create_stream(nc: Client, name: str, source: str, target: str, **extra: Any) -> Reply:
    reply = await request(nc, "ms.trigger.create.stream", stream_request(name, source, target, **extra))
    assert reply.status == 201, reply.envelope
    return reply


async def update(nc: Client, trigger_type: str, name: str, body: dict[str, Any], **options: Any) -> Reply:
    return await request(nc, f"ms.trigger.update.{trigger_type}.{name}", body, **options)


async def patch(nc: Client, trigger_type: str, name: str, body: dict[str, Any], **options: Any) -> Reply:
    return await request(nc, f"ms.trigger.patch.{trigger_type}.{name}", body, **options)


async def history_types(nc: Client, trigger_type: str, name: str) -> list[str]:
    reply = await request(nc, f"ms.trigger.history.{trigger_type}.{name}")
    assert reply.status == 200, reply.envelope
    return [entry["type"] for entry in reply.body["results"]]


# --- update ------------------------------------------------------------------------------------


async def test_update_replaces_the_configuration_and_replies_200_with_the_new_revision(nc):
    name = unique()
    created = await create_stream(nc, name, "u.a", "u.b", description="first")
    body = stream_request(name, "u.a", "u.c", collection="c1")
    reply = await update(nc, "stream", name, body)

    assert reply.status == 200, reply.envelope
    record = reply.body
    assert record["type"] == "updated"
    assert RFC3339.match(record["updated_at"])
    assert record["created_at"] == created.body["created_at"]
    assert record["target"] == {"subject": "u.c", "type": "stream"}
    assert record["collection"] == "c1"
    assert "description" not in record  # a full replacement: what the body leaves out is gone
    assert record["revision"] > created.body["revision"]
    assert reply.envelope["metadata"] == {"subject": f"ms.trigger.stream.{name}"}
    got = await request(nc, f"ms.trigger.get.stream.{name}")
    assert got.body == record
    assert await history_types(nc, "stream", name) == ["created", "updated"]


async def test_a_stale_revision_is_409_and_changes_nothing(nc):
    name = unique()
    created = await create_stream(nc, name, "r.a", "r.b")
    first = created.body["revision"]
    ok = await update(nc, "stream", name, {**stream_request(name, "r.a", "r.c"), "revision": first})
    assert ok.status == 200, ok.envelope

    stale_body = await update(nc, "stream", name, {**stream_request(name, "r.a", "r.d"), "revision": first})
    stale_header = await update(
        nc, "stream", name, stream_request(name, "r.a", "r.d"), headers={"Trigger-Revision": str(first)}
    )
    for stale in (stale_body, stale_header):
        assert stale.status == 409, stale.envelope
        assert stale.envelope["error"].startswith("Conflict: ")
        assert f"revision {ok.body['revision']}" in stale.envelope["error"]
        assert stale.headers["Nats-Service-Error-Code"] == "409"
    got = await request(nc, f"ms.trigger.get.stream.{name}")
    assert got.body == ok.body
    assert await history_types(nc, "stream", name) == ["created", "updated"]

    current = ok.body["revision"]
    by_header = await update(
        nc, "stream", name, stream_request(name, "r.a", "r.e"), headers={"Trigger-Revision": str(current)}
    )
    assert by_header.status == 200, by_header.envelope
    assert by_header.body["target"]["subject"] == "r.e"


async def test_without_a_revision_an_update_applies_to_the_latest(nc):
    name = unique()
    await create_stream(nc, name, "l.a", "l.b")
    for target in ("l.c", "l.d", "l.e"):
        assert (await update(nc, "stream", name, stream_request(name, "l.a", target))).status == 200
    got = await request(nc, f"ms.trigger.get.stream.{name}")
    assert got.body["target"]["subject"] == "l.e"
    assert await history_types(nc, "stream", name) == ["created", "updated", "updated", "updated"]


@pytest.mark.parametrize(
    ("subject_type", "body", "status", "text"),
    [
        ("stream", {"revision": 1, "name": "other"}, 400, "must be the name the subject names"),
        ("stream", {"unknown": 1}, 400, "unknown"),
        ("stream", {"trigger_type": "gateway"}, 400, "trigger_type"),
        ("stream", {"target": {"subject": "{source}"}}, 400, "loop"),
        ("stream", {"target": {"subject": "$KV.x"}}, 400, "reserved namespace"),
        ("stream", {"revision": 0}, 400, "revision"),
        ("subject", {}, 400, "no configuration to update"),
    ],
    ids=["other name", "unknown field", "wrong type", "loop", "reserved", "revision 0", "subject type"],
)
async def test_an_update_is_validated_as_a_create_is(nc, subject_type, body, status, text):
    name = unique()
    created = await create_stream(nc, name, f"{name}.a", f"{name}.b")
    full = stream_request(name, f"{name}.a", f"{name}.c")
    for field, value in body.items():
        if field == "target":
            full["target"] = {"subject": value["subject"].format(source=f"{name}.a")}
        else:
            full[field] = value
    reply = await update(nc, subject_type, name, full)
    assert reply.status == status, reply.envelope
    assert text in reply.envelope["error"]
    assert (await request(nc, f"ms.trigger.get.stream.{name}")).body == created.body


async def test_an_update_of_a_missing_or_deleted_trigger_is_404(nc):
    name = unique()
    assert (await update(nc, "stream", name, stream_request(name, "m.a", "m.b"))).status == 404
    await create_stream(nc, name, "m.a", "m.b")
    assert (await request(nc, f"ms.trigger.delete.stream.{name}")).status == 200
    assert (await update(nc, "stream", name, stream_request(name, "m.a", "m.b"))).status == 404
    assert (await patch(nc, "stream", name, {"enabled": False})).status == 404
    other = await update(nc, "stream", name, stream_request(name, "m.a", "m.b"), account="intruder")
    assert other.status == 404


async def test_an_update_may_reverse_its_own_route_but_not_close_a_cycle_with_others(nc):
    base = unique("c")
    name = unique()
    await create_stream(nc, name, f"{base}.a", f"{base}.b")
    # The route it replaces does not count against it: a -> b becomes b -> a.
    reversed_ = await update(nc, "stream", name, stream_request(name, f"{base}.b", f"{base}.a"))
    assert reversed_.status == 200, reversed_.envelope

    other = unique()
    await create_stream(nc, other, f"{base}.x", f"{base}.y")
    cycle = await update(nc, "stream", other, stream_request(other, f"{base}.a", f"{base}.b"))
    assert cycle.status == 400, cycle.envelope
    assert "cycle" in cycle.envelope["error"]
    got = await request(nc, f"ms.trigger.get.stream.{other}")
    assert got.body["source"]["subject"] == f"{base}.x"


async def test_an_update_carries_to_the_new_target_from_its_reply_on(nc):
    base = unique("t")
    old, new = await Inbox.on(nc, f"{base}.old"), await Inbox.on(nc, f"{base}.new")
    name = unique()
    await create_stream(nc, name, f"{base}.src", f"{base}.old")
    await nc.publish(f"{base}.src", b"before")
    await old.wait_for(b"before")

    reply = await update(nc, "stream", name, stream_request(name, f"{base}.src", f"{base}.new"))
    assert reply.status == 200, reply.envelope
    await nc.publish(f"{base}.src", b"after")  # no retry: live when the 200 arrives
    await new.wait_for(b"after")
    assert old.payloads == [b"before"]


# --- enable and disable ------------------------------------------------------------------------


async def test_a_disabled_stream_trigger_carries_nothing_and_enabling_restores_it(nc):
    base = unique("e")
    inbox, witness = await Inbox.on(nc, f"{base}.dst"), await Inbox.on(nc, f"{base}.witness")
    name = unique()
    created = await create_stream(nc, name, f"{base}.src", f"{base}.dst")
    await create_stream(nc, unique(), f"{base}.src", f"{base}.witness")

    disabled = await patch(nc, "stream", name, {"enabled": False, "revision": created.body["revision"]})
    assert disabled.status == 200, disabled.envelope
    assert disabled.body["enabled"] is False
    assert disabled.body["type"] == "updated"
    assert RFC3339.match(disabled.body["updated_at"])
    assert disabled.body["revision"] > created.body["revision"]
    await nc.publish(f"{base}.src", b"while disabled")
    await witness.wait_for(b"while disabled")

    enabled = await patch(nc, "stream", name, {"enabled": True})
    assert enabled.status == 200, enabled.envelope
    assert "enabled" not in enabled.body  # true is the default, left out as defaults are
    await nc.publish(f"{base}.src", b"enabled again")  # no retry: live when the 200 arrives
    await inbox.wait_for(b"enabled again")
    await witness.wait_for(b"enabled again")
    assert inbox.payloads == [b"enabled again"]
    assert await history_types(nc, "stream", name) == ["created", "updated", "updated"]
    got = await request(nc, f"ms.trigger.get.stream.{name}")
    assert got.body == enabled.body


async def test_a_trigger_created_disabled_carries_nothing_until_an_update_enables_it(nc):
    base = unique("d")
    inbox, witness = await Inbox.on(nc, f"{base}.dst"), await Inbox.on(nc, f"{base}.witness")
    name = unique()
    created = await create_stream(nc, name, f"{base}.src", f"{base}.dst", enabled=False)
    assert created.body["enabled"] is False
    await create_stream(nc, unique(), f"{base}.src", f"{base}.witness")
    await nc.publish(f"{base}.src", b"disabled")
    await witness.wait_for(b"disabled")

    reply = await update(nc, "stream", name, stream_request(name, f"{base}.src", f"{base}.dst"))
    assert reply.status == 200, reply.envelope  # `enabled` left out of the full body: true
    await nc.publish(f"{base}.src", b"enabled")
    await inbox.wait_for(b"enabled")
    assert inbox.payloads == [b"enabled"]


async def test_a_patch_is_a_compare_and_set_and_changes_only_enabled(nc):
    name = unique()
    created = await create_stream(nc, name, "p.a", "p.b", description="kept")
    first = created.body["revision"]
    assert (await patch(nc, "stream", name, {"enabled": False})).status == 200
    stale = await patch(nc, "stream", name, {"enabled": True, "revision": first})
    assert stale.status == 409, stale.envelope
    got = await request(nc, f"ms.trigger.get.stream.{name}")
    assert got.body["enabled"] is False
    assert got.body["description"] == "kept"
    assert got.body["target"] == created.body["target"]
    for bad in ({}, {"enabled": "no"}, {"enabled": True, "description": "x"}):
        assert (await patch(nc, "stream", name, bad)).status == 400, bad
    assert (await patch(nc, "subject", name, {"enabled": True})).status == 404
    assert (await patch(nc, "gateway", name, {"enabled": True})).status == 404


async def test_revision_in_header_and_body_must_agree(nc):
    name = unique()
    created = await create_stream(nc, name, "h.a", "h.b")
    revision = created.body["revision"]
    reply = await patch(
        nc, "stream", name, {"enabled": False, "revision": revision}, headers={"Trigger-Revision": "999"}
    )
    assert reply.status == 400, reply.envelope
    assert (
        await patch(nc, "stream", name, {"enabled": False}, headers={"Trigger-Revision": "x"})
    ).status == 400
    same = await patch(
        nc,
        "stream",
        name,
        {"enabled": False, "revision": revision},
        headers={"Trigger-Revision": str(revision)},
    )
    assert same.status == 200, same.envelope


# --- revisions in replies, the list filter ----------------------------------------------------


async def test_every_reply_with_a_record_carries_its_revision(nc):
    account = unique("acct")
    name = unique()
    created = await request(
        nc, "ms.trigger.create.stream", stream_request(name, "v.a", "v.b"), account=account
    )
    gateway = await request(
        nc, "ms.trigger.create.gateway", gateway_request(name, "GET", f"/{name}"), account=account
    )
    got = await request(nc, f"ms.trigger.get.stream.{name}", account=account)
    listed = await request(nc, "ms.trigger.list", {"subject_pattern": "ms.trigger.>"}, account=account)
    history = await request(nc, f"ms.trigger.history.stream.{name}", account=account)
    assert isinstance(created.body["revision"], int)
    assert got.body["revision"] == created.body["revision"]
    assert [r["revision"] for r in listed.body["results"]] == [
        gateway.body["revision"],
        created.body["revision"],
    ]
    assert [e["record"]["revision"] for e in history.body["results"]] == [created.body["revision"]]
    assert history.body["results"][0]["revision"] == created.body["revision"]


async def test_list_filters_on_enabled(nc):
    account = unique("acct")
    names = sorted(unique() for _ in range(4))
    for i, name in enumerate(names):
        reply = await request(
            nc,
            "ms.trigger.create.stream",
            stream_request(name, f"f.{i}", f"g.{i}", enabled=i % 2 == 0),
            account=account,
        )
        assert reply.status == 201, reply.envelope
    pattern = {"subject_pattern": "ms.trigger.stream.*"}
    on = await request(nc, "ms.trigger.list", {**pattern, "enabled": True}, account=account)
    off = await request(nc, "ms.trigger.list", {**pattern, "enabled": False}, account=account)
    both = await request(nc, "ms.trigger.list", pattern, account=account)
    assert [r["name"] for r in on.body["results"]] == names[0::2]
    assert on.body["results_total"] == 2
    assert [r["name"] for r in off.body["results"]] == names[1::2]
    assert [r["name"] for r in both.body["results"]] == names
    first = await request(nc, "ms.trigger.list", {**pattern, "enabled": False, "limit": 1}, account=account)
    rest = await request(
        nc,
        "ms.trigger.list",
        {**pattern, "enabled": False, "cursor": first.body["next_cursor"]},
        account=account,
    )
    assert [r["name"] for r in first.body["results"] + rest.body["results"]] == names[1::2]
    assert (await request(nc, "ms.trigger.list", {**pattern, "enabled": "yes"})).status == 400


# --- idempotent retries of a create ----------------------------------------------------------


async def test_a_retried_create_is_409_saying_the_trigger_exists_as_asked(nc):
    name = unique()
    body = stream_request(name, "i.a", "i.b", description="d")
    created = await create_stream(nc, name, "i.a", "i.b", description="d")
    again = await request(nc, "ms.trigger.create.stream", body)
    assert again.status == 409, again.envelope
    assert again.envelope["error"].startswith("Conflict: ")
    assert again.body == {"same": True, "record": created.body}
    assert again.headers["Nats-Service-Error-Code"] == "409"

    other = await request(nc, "ms.trigger.create.stream", stream_request(name, "i.a", "i.c"))
    assert other.status == 409
    assert other.body == {"same": False, "record": created.body}
    disabled = await request(nc, "ms.trigger.create.stream", {**body, "enabled": False})
    assert disabled.body["same"] is False


async def test_a_retried_gateway_create_is_409_saying_the_trigger_exists_as_asked(nc):
    name, path = unique(), f"/{unique('p')}"
    first = await request(nc, "ms.trigger.create.gateway", gateway_request(name, "GET", path, timeout=500))
    assert first.status == 201, first.envelope
    again = await request(nc, "ms.trigger.create.gateway", gateway_request(name, "GET", path, timeout=500))
    assert again.status == 409, again.envelope
    assert again.body == {"same": True, "record": first.body}
    # The same path in another spelling is the same configuration: paths are stored canonical.
    spelled = await request(
        nc, "ms.trigger.create.gateway", gateway_request(name, "GET", f"/.{path}", timeout=500)
    )
    assert spelled.body["same"] is True
    other = await request(nc, "ms.trigger.create.gateway", gateway_request(name, "GET", path))
    assert other.body == {"same": False, "record": first.body}
    # A route held by another trigger (perhaps of another account) reveals no record.
    held = await request(nc, "ms.trigger.create.gateway", gateway_request(unique(), "GET", path), account="b")
    assert held.status == 409
    assert "body" not in held.envelope


# --- gateway triggers over NATS --------------------------------------------------------------


async def test_a_gateway_update_keeps_its_mapping_subject_and_moves_its_claim(nc):
    name, path, new_path = unique(), f"/{unique('p')}", f"/{unique('p')}"
    created = await request(nc, "ms.trigger.create.gateway", gateway_request(name, "GET", path))
    taken = unique()
    held = await request(
        nc, "ms.trigger.create.gateway", gateway_request(taken, "GET", new_path), account="b"
    )
    assert (created.status, held.status) == (201, 201)

    blocked = await update(nc, "gateway", name, gateway_request(name, "GET", new_path))
    assert blocked.status == 409, blocked.envelope
    assert f"GET {new_path}" in blocked.envelope["error"]
    assert (await request(nc, f"ms.trigger.delete.gateway.{taken}", account="b")).status == 200

    moved = await update(nc, "gateway", name, gateway_request(name, "GET", f"{new_path}/./", is_public=True))
    assert moved.status == 200, moved.envelope
    assert moved.body["gateway_mapping"]["path"] == f"{new_path}/"
    assert moved.body["gateway_mapping_subject"] == created.body["gateway_mapping_subject"]
    # The old path is free after; the new one is held.
    assert (
        await request(nc, "ms.trigger.create.gateway", gateway_request(unique(), "GET", path), account="c")
    ).status == 201
    assert (
        await request(
            nc, "ms.trigger.create.gateway", gateway_request(unique(), "GET", f"{new_path}/"), account="c"
        )
    ).status == 409
    assert await history_types(nc, "gateway", name) == ["created", "updated"]


async def test_a_disabled_gateway_trigger_keeps_its_claim(nc):
    name, path = unique(), f"/{unique('p')}"
    assert (await request(nc, "ms.trigger.create.gateway", gateway_request(name, "PUT", path))).status == 201
    disabled = await patch(nc, "gateway", name, {"enabled": False})
    assert disabled.status == 200, disabled.envelope
    assert disabled.body["enabled"] is False
    taken = await request(
        nc, "ms.trigger.create.gateway", gateway_request(unique(), "PUT", path), account="b"
    )
    assert taken.status == 409, taken.envelope


async def test_history_shows_every_revision(nc):
    name = unique()
    await create_stream(nc, name, "y.a", "y.b")
    await update(nc, "stream", name, stream_request(name, "y.a", "y.c"))
    await patch(nc, "stream", name, {"enabled": False})
    await request(nc, f"ms.trigger.delete.stream.{name}")
    reply = await request(nc, f"ms.trigger.history.stream.{name}")
    results = reply.body["results"]
    assert [r["type"] for r in results] == ["created", "updated", "updated", "deleted"]
    assert [r["record"]["target"]["subject"] for r in results] == ["y.b", "y.c", "y.c", "y.c"]
    assert [r["record"].get("enabled", True) for r in results] == [True, True, False, False]
    revisions = [r["revision"] for r in results]
    assert revisions == sorted(set(revisions))


async def test_a_get_right_after_an_update_answers_its_revision(nc):
    """Read-after-write: a get right after an update's 200 answers the new revision."""
    name = unique()
    await create_stream(nc, name, "w.a", "w.b")
    for target in ("w.c", "w.d"):
        reply = await update(nc, "stream", name, stream_request(name, "w.a", target))
        got = await request(nc, f"ms.trigger.get.stream.{name}")
        assert got.body["revision"] == reply.body["revision"]
