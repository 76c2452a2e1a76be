"""Hostile HTTP: one gateway path has one spelling, a rejected create changes nothing, and the
sidecar answers everything (parser rejections included) in the JSON envelope.

A real nats-server, the Trigger Service and the sidecar; raw bytes go over a plain TCP socket
where aiohttp's client would refuse or repair them.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import random
import re
from typing import Any

import aiohttp
import msgspec
import nats.js.errors
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from service import paths
from tests import http_fixtures
from tests.support import eventually, gateway_request, request, token, unique

pytestmark = pytest.mark.usefixtures("service")
gateway_url, http = http_fixtures.gateway_url, http_fixtures.http

RAW_DEADLINE = 5.0  # seconds a raw exchange may take before it counts as a hang


# --- helpers -------------------------------------------------------------------------------------


async def create(nc: Client, name: str, method: str, path: str, account: str = "acme", **mapping: Any) -> Any:
    """Create a gateway trigger over NATS; the whole reply envelope."""
    reply = await request(
        nc, "ms.trigger.create.gateway", gateway_request(name, method, path, **mapping), account=account
    )
    return reply.envelope


async def created(
    nc: Client, name: str, method: str, path: str, account: str = "acme", **mapping: Any
) -> Any:
    """Create a gateway trigger that must succeed; the stored record."""
    envelope = await create(nc, name, method, path, account, **mapping)
    assert envelope["status_code"] == 201, envelope
    return envelope["body"]


async def respond(
    nc: Client,
    subject: str,
    data: bytes = b"ok",
    seen: list[Msg] | None = None,
    headers: dict[str, str] | None = None,
) -> None:
    """A responder on `subject` that records each request and answers `data`."""

    async def cb(msg: Msg) -> None:
        if seen is not None:
            seen.append(msg)
        await nc.publish(msg.reply, data, headers=headers)

    await nc.subscribe(subject, cb=cb)
    await asyncio.sleep(0)
    await nc.flush()


async def serves(
    http: aiohttp.ClientSession, method: str, url: str, status: int = 200, **kwargs: Any
) -> bool:
    """True once `METHOD url` answers `status`."""
    async with http.request(method, url, **kwargs) as response:
        await response.read()
        return response.status == status


def bearer(account: str = "acme") -> dict[str, str]:
    return {"Authorization": f"Bearer {token(account)}"}


async def last_seq(nc: Client, bucket: str) -> int:
    return int((await nc.jetstream().stream_info(f"KV_{bucket}")).state.last_seq)


class RawReply(msgspec.Struct):
    """A response read off the wire."""

    status_line: bytes
    headers: dict[str, str]  # lower-case names
    body: bytes

    @property
    def status(self) -> int:
        return int(self.status_line.split(b" ")[1])

    def envelope(self) -> Any:
        assert self.headers.get("content-type") == "application/json", self
        return msgspec.json.decode(self.body)


async def _read_response(reader: asyncio.StreamReader) -> RawReply:
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = head[:-4].split(b"\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return RawReply(status_line, headers, body)


async def raw(base_url: str, data: bytes) -> RawReply:
    """Send raw bytes to the sidecar; the first response it sends back."""
    host, port = base_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(data)
        return await asyncio.wait_for(_read_response(reader), RAW_DEADLINE)
    finally:
        writer.close()


# --- 1. one gateway path has one spelling --------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "second"),
    [
        pytest.param("/caf%C3%A9", "/café", id="utf8-escapes-vs-raw"),
        pytest.param("/café", "/caf%c3%a9", id="raw-vs-lower-case-escapes"),
        pytest.param("/%7Euser", "/~user", id="unreserved-escape"),
        pytest.param("/%61%2D%5F%2e", "/a-_.", id="escaped-unreserved"),
        pytest.param("/a/%3a", "/a/%3A", id="escape-case"),
        pytest.param("/a/./b", "/a/b", id="dot-segment"),
        pytest.param("/a/x/../b", "/a/b", id="dot-dot-segment"),
        pytest.param("/a/%2E%2E/a/b", "/a/b", id="escaped-dot-dot"),
        pytest.param("/a//b", "/a/b", id="repeated-slash"),
        pytest.param("/a/b/.", "/a/b/", id="trailing-dot"),
    ],
)
async def test_two_accounts_cannot_hold_one_route_in_two_spellings(nc: Client, first: str, second: str):
    """Account A's route and account B's other spelling of the same URL: B's create is 409."""
    base = f"/{unique('p')}"
    await created(nc, unique(), "GET", base + first, account="tenant-a")
    reply = await create(nc, unique(), "GET", base + second, account="tenant-b")
    assert reply["status_code"] == 409, reply
    assert reply["error"].startswith("Conflict: ")


async def test_the_canonical_path_is_stored_and_every_spelling_reaches_its_route(
    nc: Client, gateway_url: str, http: aiohttp.ClientSession
):
    """The record holds the canonical path, and a request in another spelling reaches A's
    responder: B's trigger of the raw UTF-8 spelling never gets A's callers."""
    base = f"/{unique('p')}"
    record = await created(
        nc, unique(), "GET", f"{base}/caf%c3%a9//%7e/./x/../%e9", account="tenant-a", is_public=True
    )
    canonical = f"{base}/caf%C3%A9/~/%E9"
    assert record["gateway_mapping"]["path"] == canonical
    seen: list[Msg] = []
    await respond(nc, record["gateway_mapping_subject"], b"from A", seen)
    assert (await create(nc, unique(), "GET", f"{base}/café/~/%E9", account="tenant-b"))["status_code"] == 409

    await eventually(lambda: serves(http, "GET", gateway_url + canonical), timeout=1.0)
    for spelling in (canonical, f"{base}/caf%c3%a9/%7E/%e9", f"{base}//caf%C3%A9/x/../~/%E9"):
        reply = await raw(gateway_url, f"GET {spelling} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert (reply.status, reply.body) == (200, b"from A"), spelling
    assert {(m.headers or {})["Http-Path"] for m in seen} == {canonical}


@pytest.mark.parametrize("path", ["/x%2Fy", "/x%2fy", "/x/%2F", "/%2F"])
async def test_an_encoded_slash_in_a_trigger_path_is_400(nc: Client, settings: Any, path: str):
    before = await last_seq(nc, settings.bucket)
    reply = await create(nc, unique(), "GET", f"/{unique('p')}{path}")
    assert reply["status_code"] == 400, reply
    assert "%2F" in reply["error"]
    assert "$.gateway_mapping.path" in reply["error"]
    assert await last_seq(nc, settings.bucket) == before


async def test_a_request_with_an_encoded_slash_never_reaches_the_route_of_the_plain_slash(
    nc: Client, gateway_url: str, http: aiohttp.ClientSession
):
    base = f"/{unique('p')}"
    record = await created(nc, unique(), "GET", f"{base}/x/y", is_public=True)
    await respond(nc, record["gateway_mapping_subject"])
    await eventually(lambda: serves(http, "GET", f"{gateway_url}{base}/x/y"), timeout=1.0)
    assert (await raw(gateway_url, f"GET {base}/x/y HTTP/1.1\r\nHost: x\r\n\r\n".encode())).status == 200
    for spelling in (f"{base}/x%2Fy", f"{base}/x%2fy", f"{base}%2Fx/y"):
        reply = await raw(gateway_url, f"GET {spelling} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert reply.status == 404, spelling
        assert reply.envelope()["status_code"] == 404


@pytest.mark.parametrize(
    "path",
    [
        "/./healthz",
        "/%68ealthz",
        "/x/../healthz",
        "//healthz",
        "/a/%2e%2e/healthz",
        "/%2e/healthz",
        "/openapi%2Ejson",
        "/docs/x/../../docs",
        "//metrics",
        "/console",
        "/./console",
        "/%74rigger",
        "/trigger/",
        "//trigger/stream",
        "/x/../trigger/triggers/stream/a",
        "/trigger/./gateway",
    ],
)
async def test_reserved_paths_are_reserved_in_every_spelling(nc: Client, settings: Any, path: str):
    before = await last_seq(nc, settings.bucket)
    reply = await create(nc, unique(), "GET", path)
    assert reply["status_code"] == 400, reply
    assert "reserved" in reply["error"]
    assert await last_seq(nc, settings.bucket) == before


@pytest.mark.parametrize("path", ["/a%", "/a%4", "/a%zz/b", "/a/%G0"])
async def test_a_percent_sign_that_starts_no_escape_is_400(nc: Client, path: str):
    reply = await create(nc, unique(), "GET", f"/{unique('p')}{path}")
    assert reply["status_code"] == 400, reply
    assert "percent" in reply["error"]
    assert "$.gateway_mapping.path" in reply["error"]


_PIECES = [
    *("/", "/", "a", "Z", "0", "-", ".", "..", "_", "~", ":", "@", "!", "'", '"', "{", "\\", ";", "="),
    *("%", "%2e", "%2E", "%2f", "%41", "%7e", "%c3%a9", "%3a", "%25", "%00", "%zz", "%4", "é", "€", "😀"),
]
_UNRESERVED_ESCAPE = re.compile(r"%(?:[46][1-9A-F]|[57][0-9A]|3[0-9]|2[DE]|5F|7E)")


def test_the_canonical_form_is_one_fixed_point_of_every_spelling():
    """Over many generated paths: the form is idempotent, plain ASCII, without empty or dot
    segments or lower-case or unreserved escapes; and spelling a character another way (escaping
    an unreserved one, lower-casing an escape) never changes it."""
    rng = random.Random(20261201)
    for _ in range(5000):
        path = "/" + "".join(rng.choice(_PIECES) for _ in range(rng.randint(0, 12)))
        form = paths.canonical_or_none(path)
        if form is None:
            with pytest.raises(paths.PathError):
                paths.canonical(path)
            continue
        assert paths.canonical(form) == form, path
        assert form.isascii(), (path, form)
        assert form.startswith("/"), (path, form)
        assert "//" not in form, (path, form)
        assert not re.search(r"/\.\.?(?:/|$)", form), (path, form)
        assert not re.search(r"%[0-9A-F]?[a-f]", form), (path, form)
        assert not _UNRESERVED_ESCAPE.search(form), (path, form)
        assert "%2F" not in form
        respelt = re.sub(r"%[0-9A-F]{2}|[A-Za-z0-9._~-]", _respell, form)
        assert paths.canonical(respelt) == form, (path, respelt)


def _respell(match: re.Match[str]) -> str:
    """An escape in lower case; an unreserved character as a lower-case escape."""
    text = match.group()
    return text.lower() if text.startswith("%") else f"%{ord(text):02x}"


# --- 2. a rejected request changes nothing -------------------------------------------------------


async def test_rejected_gateway_creates_leave_the_bucket_unchanged(nc: Client, settings: Any):
    """409 for a name that exists, 409 for a route that is held, and 400s write nothing at all,
    not even a route claim."""
    name, held = unique(), f"/{unique('p')}"
    await created(nc, name, "GET", held)
    before = await last_seq(nc, settings.bucket)

    attempts: list[tuple[str, str, str, dict[str, Any], int]] = [
        (name, "GET", f"/{unique('p')}", {}, 409),  # the name exists; this route is free
        (name, "POST", held, {}, 409),  # the name exists; another method
        (name, "GET", held, {}, 409),  # the very same again
        (unique(), "GET", held, {"account": "other"}, 409),  # the route is held
        (unique(), "GET", f"/x/..{held}", {"account": "other"}, 409),  # held, in another spelling
        (unique(), "GET", "/./healthz", {}, 400),
        (unique(), "GET", f"/{unique('p')}/a%2Fb", {}, 400),
        (unique(), "GET", f"/{unique('p')}/%zz", {}, 400),
        (unique(), "FETCH", f"/{unique('p')}", {}, 400),
        (unique(), "DELETE", f"/{unique('p')}", {"timeout": 0}, 400),
        (name, "GET", "/%68ealthz", {}, 400),  # the 400 comes before the 409
    ]
    for i, (trigger, method, path, extra, status) in enumerate(attempts):
        reply = await create(nc, trigger, method, path, **extra)
        assert reply["status_code"] == status, (method, path, reply)
        assert await last_seq(nc, settings.bucket) == before, (i, method, path)


def claim_key(method: str, path: str) -> str:
    """The bucket key of a route claim, as README's key layout gives it."""
    return f"=route.{method}.{hashlib.sha256(f'{method} {path}'.encode()).hexdigest()}"


async def test_the_losers_of_a_race_for_one_name_release_their_route_claims(nc: Client, settings: Any):
    """Twenty creates of one name, each with its own path, at once: one 201; the others leave no
    claim on their paths behind, so any account can take those paths at once."""
    name, base = unique(), f"/{unique('p')}"
    own_paths = [f"{base}/{i}" for i in range(20)]
    replies = await asyncio.gather(*(create(nc, name, "GET", path) for path in own_paths))
    statuses = sorted(r["status_code"] for r in replies)
    assert statuses == [201] + [409] * 19, replies
    winner = next(r["body"]["gateway_mapping"]["path"] for r in replies if r["status_code"] == 201)

    kv = await nc.jetstream().key_value(settings.bucket)
    for path in own_paths:
        try:
            value = (await kv.get(claim_key("GET", path))).value
        except nats.js.errors.KeyNotFoundError:  # never claimed
            value = None
        if path == winner:
            assert value == f"acme.gateway.{name}".encode()
        else:
            assert not value, (path, value)


async def test_the_losers_of_a_race_for_one_name_and_route_leave_the_winner_its_claim(nc: Client):
    """Twenty creates of one name and one path at once: one 201, and the route stays held by the
    winner (a loser must not release the claim it shares with the winner)."""
    name, path = unique(), f"/{unique('p')}"
    replies = await asyncio.gather(*(create(nc, name, "GET", path) for _ in range(20)))
    assert sorted(r["status_code"] for r in replies) == [201] + [409] * 19, replies
    other = await create(nc, unique(), "GET", path, account="other")
    assert other["status_code"] == 409, other


# --- 3. the sidecar answers everything in the envelope -------------------------------------------


@pytest.mark.parametrize(
    ("data", "status", "words"),
    [
        pytest.param(b"get /x HTTP/1.1\r\nHost: x\r\n\r\n", 501, "method", id="lower-case-method"),
        pytest.param(b"FETCH /x HTTP/1.1\r\nHost: x\r\n\r\n", 501, "method", id="unknown-method"),
        pytest.param(
            "GET /caf\xe9 HTTP/1.1\r\nHost: x\r\n\r\n".encode("latin-1"),
            400,
            "request line",
            id="latin-1-in-request-line",
        ),
        pytest.param(
            "GET /café HTTP/1.1\r\nHost: x\r\n\r\n".encode(), 400, "request line", id="utf8-in-request-line"
        ),
        pytest.param(b"GET /x HTTP/9.9\r\nHost: x\r\n\r\n", 400, "request line", id="bad-version"),
        pytest.param(
            b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
            414,
            "65536",
            id="request-line-over-64-kib",
        ),
        pytest.param(
            b"GET /x HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 16_385 + b"\r\n\r\n",
            431,
            "16384",
            id="header-over-16-kib",
        ),
        pytest.param(
            b"GET /x HTTP/1.1\r\nHost: x\r\n" + b"X" * 16_385 + b": 1\r\n\r\n",
            431,
            "16384",
            id="header-name-over-16-kib",
        ),
        pytest.param(
            b"GET /x HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(200)) + b"\r\n",
            431,
            "128",
            id="too-many-headers",
        ),
        pytest.param(
            b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
            400,
            "request",
            id="bad-chunk-size",
        ),
        pytest.param(
            b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcXX\r\n0\r\n\r\n",
            400,
            "request",
            id="bad-chunk-end",
        ),
        pytest.param(
            b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", 400, "request", id="bad-length"
        ),
        pytest.param(
            b"GET /x HTTP/1.1\r\nHost: x\r\nX-A: a\x01b\r\n\r\n", 400, "request", id="control-in-header"
        ),
        pytest.param(
            b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\x00" * 32 + b"\r\n\r\n",
            400,
            "HTTPS",
            id="tls-handshake",
        ),
    ],
)
async def test_requests_the_parser_rejects_get_an_envelope(
    gateway_url: str, data: bytes, status: int, words: str
):
    reply = await raw(gateway_url, data)
    assert reply.status == status, reply
    envelope = reply.envelope()
    assert envelope["status_code"] == status
    assert set(envelope) == {"error", "status_code"}
    assert words in envelope["error"], envelope
    assert "x-request-id" in reply.headers


async def test_a_bearer_token_in_a_16_kib_header_line_is_accepted(
    nc: Client, gateway_url: str, http: aiohttp.ClientSession
):
    path = f"/{unique('p')}"
    record = await created(nc, unique(), "GET", path)
    await respond(nc, record["gateway_mapping_subject"], b"big token ok")
    await eventually(lambda: serves(http, "GET", gateway_url + path, headers=bearer()), timeout=1.0)

    def line(pad: int) -> bytes:
        return f"Authorization: Bearer {token('acme', pad='x' * pad)}".encode()

    pad = 12_000
    while len(line(pad + 1)) <= 16 * 1024:
        pad += 1
    while len(line(pad)) > 16 * 1024:
        pad -= 1
    assert 16 * 1024 - 4 <= len(line(pad)) <= 16 * 1024
    reply = await raw(gateway_url, f"GET {path} HTTP/1.1\r\nHost: x\r\n".encode() + line(pad) + b"\r\n\r\n")
    assert (reply.status, reply.body) == (200, b"big token ok")
    api = await raw(
        gateway_url, b"GET /trigger/triggers/stream/nothing HTTP/1.1\r\nHost: x\r\n" + line(pad) + b"\r\n\r\n"
    )
    assert api.status == 404, api


@pytest.mark.parametrize("target", ["gateway", "api"])
async def test_a_bad_chunk_after_the_body_started_is_a_400_envelope_not_a_hang(
    nc: Client, gateway_url: str, http: aiohttp.ClientSession, target: str
):
    """The body turns bad after the handler started reading it (the 100 Continue is the proof)."""
    if target == "gateway":
        path = f"/{unique('p')}"
        record = await created(nc, unique(), "POST", path, is_public=True)
        await respond(nc, record["gateway_mapping_subject"])
        await eventually(lambda: serves(http, "POST", gateway_url + path), timeout=1.0)
    else:
        path = "/trigger/stream"
    host, port = gateway_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token()}\r\n"
            "Expect: 100-continue\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        )
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), RAW_DEADLINE)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"3\r\n{}x\r\nzz\r\n")
        reply = await asyncio.wait_for(_read_response(reader), RAW_DEADLINE)
    finally:
        writer.close()
    assert reply.status == 400, reply
    assert reply.envelope()["error"].startswith("Invalid request: ")


async def test_unknown_expectation_is_a_417_envelope(gateway_url: str):
    for path in ("/trigger/stream", f"/{unique('p')}"):
        reply = await raw(
            gateway_url,
            f"POST {path} HTTP/1.1\r\nHost: x\r\nExpect: x-magic\r\nContent-Length: 0\r\n\r\n".encode(),
        )
        assert reply.status == 417, reply
        assert reply.envelope()["status_code"] == 417


async def test_every_incoming_http_prefixed_header_is_stripped(
    nc: Client, gateway_url: str, http: aiohttp.ClientSession
):
    path = f"/{unique('p')}"
    record = await created(nc, unique(), "POST", path, is_public=True)
    seen: list[Msg] = []
    await respond(nc, record["gateway_mapping_subject"], seen=seen)
    await eventually(lambda: serves(http, "POST", gateway_url + path), timeout=1.0)
    seen.clear()

    forged = {
        "Http-Account": "forged",
        "Http-Host": "evil.example",
        "Http-Status": "200",
        "HTTP-METHOD": "DELETE",
        "http-path": "/elsewhere",
        "Http-Query": "admin=1",
        "hTtP-x": "1",
        "X-Kept": "yes",
    }
    assert await serves(http, "POST", gateway_url + path, headers=forged)
    [msg] = seen
    headers = msg.headers or {}
    assert {k for k in headers if k.lower().startswith("http-")} == {"Http-Method", "Http-Path", "Http-Query"}
    assert (headers["Http-Method"], headers["Http-Path"], headers["Http-Query"]) == ("POST", path, "")
    assert headers["X-Kept"] == "yes"


@pytest.mark.parametrize("status", [100, 101, 103, 199])
async def test_an_interim_status_in_a_responders_envelope_is_502(
    nc: Client, gateway_url: str, http: aiohttp.ClientSession, status: int
):
    path = f"/{unique('p')}"
    record = await created(nc, unique(), "GET", path, is_public=True)
    await respond(nc, record["gateway_mapping_subject"], b'{"status_code": %d}' % status)
    await eventually(lambda: serves(http, "GET", gateway_url + path, 502), timeout=1.0)

    reply = await raw(gateway_url, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert reply.status == 502, reply
    envelope = reply.envelope()
    assert envelope["status_code"] == 502
    assert envelope["error"].startswith("Bad gateway: ")
    assert str(status) in envelope["error"]


async def test_a_reply_header_that_cannot_be_sent_is_a_502_envelope(
    nc: Client, gateway_url: str, http: aiohttp.ClientSession
):
    """A responder's Content-Type with a control character would fail while the response is sent."""
    path = f"/{unique('p')}"
    record = await created(nc, unique(), "GET", path, is_public=True)
    await respond(nc, record["gateway_mapping_subject"], b"x", headers={"Content-Type": "text/plain\x01"})
    await eventually(lambda: serves(http, "GET", gateway_url + path, 502), timeout=1.0)

    reply = await raw(gateway_url, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert reply.status == 502, reply
    assert reply.envelope()["error"].startswith("Bad gateway: ")


@pytest.mark.parametrize(
    ("method", "path", "data"),
    [
        pytest.param("GET", "/trigger/triggers/stream/a.b", None, id="bad-name"),
        pytest.param("DELETE", "/trigger/triggers/stream/" + "x" * 300, None, id="long-name"),
        pytest.param("GET", "/trigger/triggers/stream/a%00b/history", None, id="nul-in-name"),
        pytest.param("POST", "/trigger/stream", b"x" * ((1 << 20) + 1), id="body-over-1-mib"),
    ],
)
async def test_an_anonymous_api_request_is_401_before_anything_about_its_request(
    gateway_url: str, http: aiohttp.ClientSession, method: str, path: str, data: bytes | None
):
    async with http.request(method, gateway_url + path, data=data and io.BytesIO(data)) as response:
        envelope = await response.json()
    assert (response.status, envelope["status_code"]) == (401, 401), envelope
    assert envelope["error"].startswith("Unauthorized: ")
    async with http.request(
        method, gateway_url + path, data=data and io.BytesIO(data), headers=bearer()
    ) as response:
        assert response.status == (413 if data else 400)
