"""Large but valid state never breaks a read: `list` and `history` pages are bounded by the NATS
server's max payload as well as by count, and following `next_cursor` returns every record once,
in order, with `results_total` counting all of them on every page."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
from msgspec import inspect
from nats.aio.client import Client

from schemas.triggers import GatewayTriggerRequest, StreamTriggerRequest, TriggerSource, TriggerTarget
from service.app import running
from service.handlers import SUBJECT_BYTES
from service.natsserver import NatsServer
from tests import http_fixtures
from tests.conftest import make_settings
from tests.http_fixtures import call
from tests.support import auth, gateway_request, request, stream_request, unique

gateway_url, http = http_fixtures.gateway_url, http_fixtures.http

pytestmark = pytest.mark.usefixtures("service")

SMALL_MAX_PAYLOAD = 256 * 1024  # a quarter of nats-server's default 1 MiB
WIDE = "\U0001f600"  # one character, four bytes of UTF-8: a maximal text in characters is 4x in bytes
CONTROL = "\x01"  # one character, six bytes once JSON-escaped (\u0001)


def max_length(struct: type[msgspec.Struct], field: str) -> int:
    """The schema's `max_length` of one (optional) string field of a request type."""
    struct_info = inspect.type_info(struct)
    assert isinstance(struct_info, inspect.StructType)
    (info,) = [f for f in struct_info.fields if f.name == field]
    kind = info.type
    options = kind.types if isinstance(kind, inspect.UnionType) else (kind,)
    for option in options:
        if isinstance(option, inspect.Metadata):
            option = option.type
        if isinstance(option, inspect.StrType) and option.max_length is not None:
            return option.max_length
    raise AssertionError(f"{struct.__name__}.{field} has no max_length")


TEXT_MAX = max_length(GatewayTriggerRequest, "description")


def text(char: str = WIDE, length: int = TEXT_MAX) -> str:
    """A text of `length` characters (the schema's maximum by default)."""
    return char * length


def maximal_stream(name: str, i: int) -> dict[str, Any]:
    """A create-stream body whose every text field is at its maximum length."""
    body = stream_request(name, f"big.src.{i}", f"big.dst.{i}", collection=text(), description=text(CONTROL))
    body["source"].update(name=text(), description=text(CONTROL))
    body["target"]["name"] = text()
    return body


def maximal_gateway(name: str) -> dict[str, Any]:
    """A create-gateway body whose every text field is at its maximum length."""
    return {**gateway_request(name, "POST", f"/{name}"), "collection": text(), "description": text(CONTROL)}


async def create_many(nc: Client, count: int, account: str) -> list[dict[str, Any]]:
    """`count` maximal triggers, half stream and half gateway; their create replies' bodies."""

    async def create(i: int) -> dict[str, Any]:
        name = unique(f"big{i:02d}")
        if i % 2:
            reply = await request(nc, "ms.trigger.create.gateway", maximal_gateway(name), account=account)
        else:
            reply = await request(
                nc, "ms.trigger.create.stream", maximal_stream(name, i), account=account, timeout=30
            )
        assert reply.status == 201, reply.envelope
        return reply.body  # type: ignore[no-any-return]

    return list(await asyncio.gather(*(create(i) for i in range(count))))


async def all_pages(
    nc: Client, subject: str, query: dict[str, Any] | None = None, *, account: str = "acme"
) -> list[dict[str, Any]]:
    """Every page's body, following `next_cursor`; each reply is checked to be a 200 within the
    connection's max payload."""
    bodies: list[dict[str, Any]] = []
    cursor = None
    while True:
        payload = dict(query or {})
        if cursor is not None:
            payload["cursor"] = cursor
        data = msgspec.json.encode(payload) if payload or query is not None else b""
        msg = await nc.request(subject, data, timeout=30, headers=auth(account))
        assert len(msg.data) <= nc.max_payload
        envelope = msgspec.json.decode(msg.data)
        assert envelope["status_code"] == 200, envelope
        body = envelope["body"]
        assert body["results"], "a page always holds at least one record"
        bodies.append(body)
        cursor = body.get("next_cursor")
        if cursor is None:
            return bodies
        assert len(bodies) <= 100, "paging does not end"


def encoded_size(records: list[Any]) -> int:
    """Bytes the records take as JSON, all together."""
    return sum(len(msgspec.json.encode(r)) for r in records)


async def clone_revisions(nc: Client, bucket: str, key: str, count: int) -> None:
    """Write `count` more revisions of a key straight into the bucket: valid record JSON cloned from
    the stored one (the API cannot update a trigger yet)."""
    kv = await nc.jetstream().key_value(bucket)
    entry = await kv.get(key)
    assert entry.value is not None
    stored = msgspec.json.decode(entry.value)
    for i in range(count):
        description = stored.get("description") or "    "
        stored["description"] = f"{i:04d}" + description[4:]  # a maximal one stays at the maximum length
        await kv.put(key, msgspec.json.encode(stored))


# --- list ------------------------------------------------------------------------------------


async def test_thirty_maximal_triggers_list_in_pages_within_the_max_payload(nc):
    """Thirty triggers whose text fields are all at the maximum length are more than one reply can
    carry: `list ms.trigger.>` pages them by bytes, every record once, ordered by subject."""
    account = unique("big")
    created = await create_many(nc, 30, account)
    assert encoded_size(created) > nc.max_payload, "the test needs more than one reply's worth"

    pages = await all_pages(nc, "ms.trigger.list", {"subject_pattern": "ms.trigger.>"}, account=account)

    assert len(pages) > 1
    assert all(page["results_total"] == 30 for page in pages)
    listed = [record for page in pages for record in page["results"]]
    assert listed == sorted(created, key=lambda r: r["subject"])


async def test_a_count_limit_smaller_than_the_byte_bound_still_pages_by_count(nc):
    """`limit` keeps its meaning: pages of at most `limit` records, whichever bound is reached first."""
    account = unique("big")
    created = await create_many(nc, 10, account)
    pages = await all_pages(
        nc, "ms.trigger.list", {"subject_pattern": "ms.trigger.stream.*", "limit": 2}, account=account
    )
    streams = sorted((r for r in created if r["trigger_type"] == "stream"), key=lambda r: r["subject"])
    assert [len(page["results"]) for page in pages] == [2, 2, 1]
    assert [r for page in pages for r in page["results"]] == streams
    assert all(page["results_total"] == 5 for page in pages)


async def test_the_largest_valid_stream_trigger_is_read_whole(nc, settings):
    """A stream trigger with every bounded field at its maximum length, in the characters that take
    the most bytes once JSON-encoded, is one record of some 140 KB: get, list and history return it."""
    name = "n" * max_length(StreamTriggerRequest, "name")
    subject_max = max_length(TriggerSource, "subject")
    body = maximal_stream(name, 0)
    body.update(collection=text(CONTROL), description=text(CONTROL))
    body["target"]["name"] = text(CONTROL)
    url = "https://x/"
    # Subjects are bounded by bytes too (handlers.SUBJECT_BYTES of UTF-8, so that a route's SUB
    # line fits nats-server's control line): the widest valid subjects are that many bytes.
    body["source"].update(
        subject=text("\u00e9", SUBJECT_BYTES // 2),
        name=text(CONTROL),
        info_url=url + WIDE * (max_length(TriggerSource, "info_url") - len(url)),
    )
    body["target"].update(
        subject=text("\U0001f601", SUBJECT_BYTES // 4), local_subject=text("\U0001f602", SUBJECT_BYTES // 4)
    )
    assert max_length(TriggerTarget, "local_subject") == subject_max
    created = await request(nc, "ms.trigger.create.stream", body, timeout=30)
    assert created.status == 201, created.envelope
    size = len(msgspec.json.encode(created.body))
    assert 100_000 < size < 160_000

    got = await request(nc, f"ms.trigger.get.stream.{name}")
    assert got.body == created.body
    (listed,) = await all_pages(nc, "ms.trigger.list", {"subject_pattern": f"ms.trigger.stream.{name}"})
    assert listed["results"] == [created.body]
    await clone_revisions(nc, settings.bucket, f"acme.stream.{name}", nc.max_payload // size + 1)
    history = await all_pages(nc, f"ms.trigger.history.stream.{name}")
    assert len(history) > 1
    assert sum(len(page["results"]) for page in history) == nc.max_payload // size + 2


# --- history ---------------------------------------------------------------------------------


async def test_a_history_larger_than_the_max_payload_is_paged(nc, settings):
    """A trigger whose revisions together exceed the max payload: `history` pages them, oldest
    first, every revision once, `results_total` the full count on every page."""
    name = unique()
    key = f"acme.stream.{name}"
    created = await request(nc, "ms.trigger.create.stream", maximal_stream(name, 0), timeout=30)
    assert created.status == 201
    size = len(msgspec.json.encode(created.body))
    extra = nc.max_payload // size + 3
    assert extra + 2 <= 64, "the bucket keeps 64 revisions of a key"
    await clone_revisions(nc, settings.bucket, key, extra)
    assert (await request(nc, f"ms.trigger.delete.stream.{name}")).status == 200

    pages = await all_pages(nc, f"ms.trigger.history.stream.{name}")

    kv = await nc.jetstream().key_value(settings.bucket)
    stored = await kv.history(key)
    assert len(stored) == extra + 2
    assert len(pages) > 1
    assert all(page["results_total"] == len(stored) for page in pages)
    entries = [entry for page in pages for entry in page["results"]]
    assert [e["revision"] for e in entries] == [s.revision for s in stored]
    # A reply's record carries its revision; the stored value does not.
    assert [{k: v for k, v in e["record"].items() if k != "revision"} for e in entries] == [
        msgspec.json.decode(s.value) for s in stored
    ]
    assert [e["type"] for e in entries] == ["created"] * (extra + 1) + ["deleted"]


async def test_history_limit_and_cursor_page_by_count(nc, settings):
    """`limit` on `history` bounds the page by count; `next_cursor`, passed back as `cursor`, goes on
    after the last revision returned."""
    name = unique()
    assert (await request(nc, "ms.trigger.create.stream", stream_request(name, "h.a", "h.b"))).status == 201
    await clone_revisions(nc, settings.bucket, f"acme.stream.{name}", 4)
    pages = await all_pages(nc, f"ms.trigger.history.stream.{name}", {"limit": 2})
    assert [len(page["results"]) for page in pages] == [2, 2, 1]
    revisions = [e["revision"] for page in pages for e in page["results"]]
    assert revisions == sorted(set(revisions))
    assert all(page["results_total"] == 5 for page in pages)
    whole = await all_pages(nc, f"ms.trigger.history.stream.{name}")
    assert [e["revision"] for e in whole[0]["results"]] == revisions
    assert "next_cursor" not in whole[0]


async def test_history_cursors_belong_to_one_trigger_and_to_history(nc, settings):
    """A history cursor is refused by another trigger's history and by list; a list cursor by history;
    a bad page request is a 400 that names the field."""
    name, other = unique(), unique()
    for n in (name, other):
        assert (
            await request(nc, "ms.trigger.create.stream", stream_request(n, f"{n}.a", f"{n}.b"))
        ).status == 201
    await clone_revisions(nc, settings.bucket, f"acme.stream.{name}", 1)
    first = await request(nc, f"ms.trigger.history.stream.{name}", {"limit": 1})
    cursor = first.body["next_cursor"]
    listed = await request(nc, "ms.trigger.list", {"subject_pattern": "ms.trigger.>", "limit": 1})
    list_cursor = listed.body["next_cursor"]

    cases = [
        (f"ms.trigger.history.stream.{other}", {"cursor": cursor}, "$.cursor"),
        (f"ms.trigger.history.stream.{name}", {"cursor": list_cursor}, "$.cursor"),
        ("ms.trigger.list", {"subject_pattern": "ms.trigger.>", "cursor": cursor}, "$.cursor"),
        (f"ms.trigger.history.stream.{name}", {"cursor": "%%%"}, "$.cursor"),
        (f"ms.trigger.history.stream.{name}", {"limit": 0}, "$.limit"),
        (f"ms.trigger.history.stream.{name}", {"limit": 65}, "$.limit"),
        (f"ms.trigger.history.stream.{name}", {"limit": "2"}, "$.limit"),
        (f"ms.trigger.history.stream.{name}", {"name": other}, "name"),
        (f"ms.trigger.history.stream.{name}", [], "object"),
        (f"ms.trigger.history.stream.{name}", b"not json", "JSON"),
    ]
    for subject, payload, mention in cases:
        reply = await request(nc, subject, payload)
        assert reply.status == 400, (payload, reply.envelope)
        assert mention in reply.envelope["error"], (payload, reply.envelope)

    rest = await request(nc, f"ms.trigger.history.stream.{name}", {"cursor": cursor})
    assert rest.status == 200
    assert [e["revision"] for e in rest.body["results"]] > [e["revision"] for e in first.body["results"]]
    assert rest.body["results_total"] == 2


async def test_history_pages_over_http_with_query_parameters(nc, settings, http, gateway_url):
    """The sidecar carries `limit` and `cursor` of `history` from the query string."""
    name = unique()
    assert (await request(nc, "ms.trigger.create.stream", stream_request(name, "q.a", "q.b"))).status == 201
    await clone_revisions(nc, settings.bucket, f"acme.stream.{name}", 2)
    url = f"{gateway_url}/trigger/triggers/stream/{name}/history"
    first = await call(http, "GET", url, params={"limit": "1"})
    assert first.status == 200, first.envelope
    assert len(first.body["results"]) == 1
    rest = await call(http, "GET", url, params={"cursor": first.body["next_cursor"]})
    assert rest.status == 200, rest.envelope
    assert len(rest.body["results"]) == 2
    assert "next_cursor" not in rest.body
    assert rest.body["results_total"] == first.body["results_total"] == 3


# --- the max payload is the server's ---------------------------------------------------------


@pytest.fixture(scope="module")
def small_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """A nats-server whose max payload is 256 KiB rather than the default 1 MiB."""
    root: Path = tmp_path_factory.mktemp("small-payload")
    config = root / "nats-server.conf"
    config.write_text(f"max_payload: {SMALL_MAX_PAYLOAD}\n")
    store = root / "store"
    args = ["-a", "127.0.0.1", "-p", "-1", "-js", "-sd", str(store)]
    with NatsServer(config=config, store_dir=store, extra_args=args) as server:
        yield server


async def test_pages_follow_the_max_payload_of_the_server(small_server):
    """On a server with a smaller max payload the pages are smaller: the bound is the connection's
    `max_payload`, not a constant."""
    settings = make_settings(small_server.url)
    client = await nats.connect(small_server.url)
    try:
        assert client.max_payload == SMALL_MAX_PAYLOAD
        async with running(settings):
            created = await create_many(client, 8, "acme")
            assert encoded_size(created) > SMALL_MAX_PAYLOAD
            pages = await all_pages(client, "ms.trigger.list", {"subject_pattern": "ms.trigger.>"})
            assert len(pages) > 1
            assert [r for page in pages for r in page["results"]] == sorted(
                created, key=lambda r: r["subject"]
            )

            stream = next(r for r in created if r["trigger_type"] == "stream")
            size = len(msgspec.json.encode(stream))
            extra = SMALL_MAX_PAYLOAD // size + 1
            await clone_revisions(client, settings.bucket, f"acme.stream.{stream['name']}", extra)
            history = await all_pages(client, f"ms.trigger.history.stream.{stream['name']}")
            assert len(history) > 1
            assert sum(len(page["results"]) for page in history) == extra + 1
    finally:
        await client.drain()
