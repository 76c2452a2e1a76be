"""Every input is safe: patterns match whole strings, deep JSON is a 400, the store's refusals are 4xx.

Each case goes over NATS to a running service, and checks both the reply (a 4xx that names the
field) and the bucket (its last sequence unchanged: nothing was written, not even half a record).
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from typing import Any

import msgspec
import pytest

from schemas import triggers
from schemas.openapi import document
from schemas.triggers import MAX_JSON_BYTES, MAX_JSON_DEPTH
from service.jetstream import JetStream, JetStreamError
from service.routing import as_api_error
from tests.support import gateway_request, request, stream_request, unique
from tests.test_validation import bucket_state

pytestmark = pytest.mark.usefixtures("service")

# Characters no pattern may let through: a trailing newline (what `$` lets past under search
# semantics), other control characters, and Unicode whitespace.
HOSTILE = {"lf": "\n", "cr": "\r", "tab": "\t", "nul": "\x00", "u2028": "\u2028", "nbsp": "\u00a0"}


def _cursor(subject_key: str) -> str:
    return base64.urlsafe_b64encode(subject_key.encode()).decode().rstrip("=")


def _stream(**change: Any) -> Callable[[str], dict[str, Any]]:
    """A create-stream body with one field replaced by `value` (`at`: where the field lives)."""

    def build(value: str) -> dict[str, Any]:
        body = stream_request(unique(), "hostile.a", "hostile.b")
        body["source"]["info_url"] = "https://example.com/docs"
        where, field = change["at"]
        (body if where is None else body[where])[field] = value
        return body

    return build


def _gateway(field: str) -> Callable[[str], dict[str, Any]]:
    def build(value: str) -> dict[str, Any]:
        body = gateway_request(unique(), "GET", f"/{unique()}")
        if field == "name":
            body["name"] = value
        elif field == "path":
            body["gateway_mapping"]["path"] = value
        else:  # a version: a key of traffic_distribution
            body["gateway_mapping"]["traffic_distribution"] = {value: 100}
        return body

    return build


def _list(field: str) -> Callable[[str], dict[str, Any]]:
    def build(value: str) -> dict[str, Any]:
        query = {"subject_pattern": "ms.trigger.stream.*"}
        query[field] = value
        return query

    return build


# (subject, the valid value, the body carrying a value, what the 400 must name, the status of the
# valid value): one row per constrained string field of each request type.
FIELDS = [
    pytest.param("create.stream", "abc", _stream(at=(None, "name")), "`$.name`", 201, id="stream-name"),
    pytest.param(
        "create.stream",
        "a.b",
        _stream(at=("source", "subject")),
        "`$.source.subject`",
        201,
        id="source-subject",
    ),
    pytest.param(
        "create.stream",
        "c.d",
        _stream(at=("target", "subject")),
        "`$.target.subject`",
        201,
        id="target-subject",
    ),
    pytest.param(
        "create.stream",
        "c.e",
        _stream(at=("target", "local_subject")),
        "`$.target.local_subject`",
        201,
        id="target-local-subject",
    ),
    pytest.param(
        "create.stream",
        "acme",
        _stream(at=("target", "account")),
        "`$.target.account`",
        201,
        id="target-account",
    ),
    pytest.param(
        "create.stream",
        "https://example.com/info",
        _stream(at=("source", "info_url")),
        "info_url",
        201,
        id="source-info-url",
    ),
    pytest.param("create.gateway", "abc", _gateway("name"), "`$.name`", 201, id="gateway-name"),
    pytest.param(
        "create.gateway", "/a/b", _gateway("path"), "`$.gateway_mapping.path`", 201, id="gateway-path"
    ),
    pytest.param(
        "create.gateway",
        "v1",
        _gateway("version"),
        "`$.gateway_mapping.traffic_distribution`",
        201,
        id="traffic-version",
    ),
    pytest.param(
        "list", "ms.trigger.stream.*", _list("subject_pattern"), "`$.subject_pattern`", 200, id="list-pattern"
    ),
    pytest.param("list", _cursor("stream.abc"), _list("cursor"), "`$.cursor`", 200, id="list-cursor"),
    # history's page query: the trigger never existed, so the valid cursor gets as far as a 404
    pytest.param(
        "history.stream.abc",
        _cursor("stream.abc@1"),
        lambda value: {"cursor": value},
        "`$.cursor`",
        404,
        id="history-cursor",
    ),
]


@pytest.mark.parametrize(("subject", "valid", "build", "names", "ok"), FIELDS)
async def test_the_valid_value_of_each_field_is_accepted(nc, subject, valid, build, names, ok):
    """The control: the value the hostile cases start from is itself accepted."""
    reply = await request(nc, f"ms.trigger.{subject}", build(valid))
    assert reply.status == ok, reply.envelope


@pytest.mark.parametrize("where", ["end", "inside"])
@pytest.mark.parametrize("char", list(HOSTILE.values()), ids=list(HOSTILE))
@pytest.mark.parametrize(("subject", "valid", "build", "names", "ok"), FIELDS)
async def test_control_characters_and_unicode_whitespace_are_400_in_every_field(
    nc, settings, subject, valid, build, names, ok, char, where
):
    """A trailing newline, a control character or Unicode whitespace: 400 naming the field, nothing stored."""
    value = value_with(valid, char, where)
    before = await bucket_state(nc, settings)
    reply = await request(nc, f"ms.trigger.{subject}", build(value))
    assert reply.status == 400, reply.envelope
    error = reply.envelope["error"]
    assert error.startswith("Invalid request: ")
    assert names in error, error
    assert "regex" not in error, error  # the rule is said in words
    assert reply.headers["Nats-Service-Error-Code"] == "400"
    assert await bucket_state(nc, settings) == before


def value_with(valid: str, char: str, where: str) -> str:
    """`valid` with `char` appended, or inserted after its first character."""
    return valid + char if where == "end" else valid[:1] + char + valid[1:]


@pytest.mark.parametrize("where", ["end", "inside"])
@pytest.mark.parametrize("char", list(HOSTILE.values()), ids=list(HOSTILE))
async def test_a_signed_token_whose_account_has_a_control_character_is_401(nc, settings, char, where):
    """The token's `account` claim is one whole subject token, or the token is refused."""
    account = value_with("alpha", char, where)
    before = await bucket_state(nc, settings)
    reply = await request(
        nc, "ms.trigger.create.stream", stream_request(unique(), "tok.a", "tok.b"), account=account
    )
    assert reply.status == 401, reply.envelope
    assert reply.envelope["error"].startswith("Unauthorized: ")
    assert "`account`" in reply.envelope["error"]
    assert await bucket_state(nc, settings) == before


@pytest.mark.parametrize("char", ["\x00", "\u2028", "\u00a0", "\x85"], ids=["nul", "u2028", "nbsp", "nel"])
@pytest.mark.parametrize("operation", ["get", "delete", "history"])
async def test_a_trigger_name_in_the_subject_with_a_control_character_is_400(nc, settings, operation, char):
    """The name token of get/delete/history subjects (newline, CR and tab cannot travel in a subject)."""
    before = await bucket_state(nc, settings)
    reply = await request(nc, f"ms.trigger.{operation}.stream.a{char}b")
    assert reply.status == 400, reply.envelope
    assert "`$.name`" in reply.envelope["error"]
    assert await bucket_state(nc, settings) == before


async def test_a_cursor_whose_decoded_subject_ends_in_a_newline_is_400(nc):
    reply = await request(
        nc, "ms.trigger.list", {"subject_pattern": "ms.trigger.>", "cursor": _cursor("stream.abc\n")}
    )
    assert reply.status == 400, reply.envelope


PATTERNS = [name for name in dir(triggers) if name.endswith("_PATTERN")]


def test_every_pattern_is_whole_string_and_has_its_own_rule():
    """`\\A...\\Z` everywhere, and no two patterns alike (PATTERN_RULES is keyed by the pattern)."""
    patterns = [getattr(triggers, name) for name in PATTERNS]
    assert all(p.startswith(r"\A") and p.endswith(r"\Z") for p in patterns), PATTERNS
    assert set(triggers.PATTERN_RULES) == set(patterns)
    assert len(set(patterns)) == len(patterns)


def _document_patterns(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["pattern"]] if isinstance(node.get("pattern"), str) else []
        return own + [p for value in node.values() for p in _document_patterns(value)]
    if isinstance(node, list):
        return [p for value in node for p in _document_patterns(value)]
    return []


def test_the_openapi_document_carries_the_patterns_as_ecma_whole_string_patterns():
    """`^...$` there (ECMA's `$` is the very end): the same strings pass as in the service."""
    published = set(_document_patterns(document()))
    assert published == {triggers.ecma_pattern(getattr(triggers, name)) for name in PATTERNS}
    for pattern in published:
        assert pattern.startswith("^"), pattern
        assert pattern.endswith("$"), pattern
        assert r"\A" not in pattern, pattern
        assert r"\Z" not in pattern, pattern
        # What ECMA reads: `$` only at the very end, so a trailing newline never matches.
        ecma = re.compile(pattern[:-1] + r"\Z")
        for char in HOSTILE.values():
            assert not ecma.search("a" + char), (pattern, char)


# --- JSON nested too deeply ------------------------------------------------------------------


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def gateway_with(field: str, raw: bytes) -> bytes:
    """A create-gateway body whose `gateway_mapping.<field>` is the raw JSON `raw`."""
    body = msgspec.json.encode(gateway_request(unique(), "GET", f"/{unique()}"))
    return body[:-2] + b',"' + field.encode() + b'":' + raw + b"}}"


ANY_FIELDS = ["subject", "gateway", "error"]


@pytest.mark.parametrize("field", ANY_FIELDS)
async def test_the_untyped_gateway_fields_accept_json_up_to_the_limit(nc, field):
    reply = await request(nc, "ms.trigger.create.gateway", gateway_with(field, nested(MAX_JSON_DEPTH)))
    assert reply.status == 201, reply.envelope
    assert field not in reply.body["gateway_mapping"]


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 500, 5_000, 100_000])
@pytest.mark.parametrize("field", ANY_FIELDS)
async def test_deeply_nested_json_in_an_untyped_field_is_400_naming_field_and_limit(
    nc, settings, field, depth
):
    """Not a RecursionError and a 500: however deep, the 400 names the field and the limit."""
    before = await bucket_state(nc, settings)
    reply = await request(nc, "ms.trigger.create.gateway", gateway_with(field, nested(depth)))
    assert reply.status == 400, reply.envelope
    error = reply.envelope["error"]
    assert f"`$.gateway_mapping.{field}`" in error, error
    assert f"{MAX_JSON_DEPTH} levels" in error, error
    assert await bucket_state(nc, settings) == before


@pytest.mark.parametrize("field", ANY_FIELDS)
async def test_a_large_untyped_field_is_400_naming_field_and_limit(nc, settings, field):
    before = await bucket_state(nc, settings)
    raw = msgspec.json.encode(["x" * 100] * (MAX_JSON_BYTES // 100))
    reply = await request(nc, "ms.trigger.create.gateway", gateway_with(field, raw))
    assert reply.status == 400, reply.envelope
    error = reply.envelope["error"]
    assert f"`$.gateway_mapping.{field}`" in error, error
    assert f"{MAX_JSON_BYTES} bytes" in error, error
    assert await bucket_state(nc, settings) == before


async def test_deep_nesting_in_an_object_value_names_the_field(nc):
    raw = b'{"a":' * 3_000 + b"1" + b"}" * 3_000
    reply = await request(nc, "ms.trigger.create.gateway", gateway_with("gateway", raw))
    assert reply.status == 400, reply.envelope
    assert "`$.gateway_mapping.gateway`" in reply.envelope["error"]


@pytest.mark.parametrize("raw", [nested(100_000), b"{" * 100_000, b'{"x":' * 50_000 + b"1" + b"}" * 50_000])
@pytest.mark.parametrize("subject", ["create.stream", "create.gateway", "list"])
async def test_a_deeply_nested_body_is_400_on_every_operation(nc, subject, raw):
    reply = await request(nc, f"ms.trigger.{subject}", raw)
    assert reply.status == 400, reply.envelope


# --- list patterns the store could refuse ----------------------------------------------------

HOSTILE_PATTERNS = [
    "ms.trigger.a..b",
    "ms.trigger. x",
    "ms.trigger.>.x",
    "ms.trigger.\u0000",
    "ms.trigger.stream.\u0000",
    "ms.trigger.stream.a\u2028",
    "ms.trigger.stream.*x",
    "ms.trigger.stream.>>",
    "ms.trigger.stream.",
    ".ms.trigger.stream",
    "ms.trigger.stream.$a",
    "ms.trigger.stream.\u00e9t\u00e9",
    "ms.trigger.stream.a\ufffdb",
    "ms.trigger.*.*.*",
    "ms.trigger.>.>",
    "ms.trigger." + "x" * 10_000,
    "ms.trigger.stream." + ".".join(["a"] * 300),
]


@pytest.mark.parametrize("pattern", HOSTILE_PATTERNS, ids=range(len(HOSTILE_PATTERNS)))
async def test_hostile_list_patterns_are_4xx_never_5xx(nc, pattern):
    reply = await request(nc, "ms.trigger.list", {"subject_pattern": pattern})
    assert reply.status < 500, reply.envelope
    if reply.status >= 400:
        assert reply.envelope["error"].startswith("Invalid request: ")


async def test_a_jetstream_refusal_of_bad_input_is_400_and_any_other_is_503(nc, settings):
    """A real JetStream error reply (a message get that names no message): 400 for a 400, else 503."""
    js = JetStream(nc, f"KV_{settings.bucket}")
    with pytest.raises(JetStreamError) as refused:
        await js.api(f"STREAM.MSG.GET.KV_{settings.bucket}", {})
    assert refused.value.code == 400
    bad = as_api_error(refused.value)
    assert bad is not None
    assert bad.status == 400
    assert (
        bad.message == f"Invalid request: the trigger store refused the request: {refused.value.description}"
    )
    other = as_api_error(JetStreamError(404, 10014, "consumer not found"))
    assert other is not None
    assert other.status == 503
    assert as_api_error(ValueError("a bug")) is None
