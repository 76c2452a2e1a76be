"""The project's own fuzz suite (issue 10, item 8): property-based requests to every NATS endpoint
of the operation table and every HTTP route of the sidecar.

Requests are generated from the same msgspec types the service decodes (`msgspec.inspect`), then
made hostile: wrong types, lengths at and just over each `max_length`, control characters,
combining marks, bidirectional text, lone surrogates (as `\\udxxx` escapes and as bytes that are
not UTF-8), emoji, NUL, huge and deeply nested values, forged cursors, raw bytes that are not JSON,
duplicate keys, numbers at the int64 edges and beyond, `1e309` and `NaN`; bearer tokens that are
missing, garbage, badly signed, expired or 20 KiB long; hostile HTTP methods, paths, queries and
headers. For every example:

- it is answered within its timeout (no hang), and never with a 5xx (501 only for a method
  the HTTP parser does not know, the status RFC 9110 gives it);
- the reply is an envelope: a JSON object with an integer `status_code` that equals the NATS
  micro error header (`Nats-Service-Error-Code`) or the HTTP status, an `error` when it is an
  error, a `body` when it is a success (a delete has none);
- a rejected request (any 4xx), and any read, leaves the KV stream's last sequence unchanged;
- an accepted create can be read back (and, for a gateway trigger, its route is served), and is
  deleted again so that examples do not pile up.

At the end the service and the sidecar still answer: a create and a get over NATS and over HTTP,
a stream route that carries a message, a gateway route, and `/healthz`.

One nats-server (the session's), one Trigger Service and one sidecar for the whole module, with a
subject prefix of their own, all on one event loop in a background thread; each example is a
synchronous hypothesis example that runs its requests on that loop.

Environment: `FUZZ_EXAMPLES` (examples per test, default 100: the file runs in well under a
minute), `FUZZ_SEED` (default none: derandomized, so every run tries the same examples; set it to
try others), `FUZZ_SHRINK=1` (shrink a failure to a minimal example: off by default, since every
step is real requests). No example database is written; a failure prints the request and the
reply it got (hypothesis notes). The defects the suite found are regression tests at the end.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import dataclasses
import json
import os
import re
import threading
import time
import typing
import urllib.parse
import uuid
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import hypothesis
import jwt
import msgspec
import nats
import pytest
from aiohttp import web
from hypothesis import HealthCheck, assume
from hypothesis import strategies as st
from msgspec import inspect as mi
from nats.aio.client import Client
from nats.aio.msg import Msg

from schemas import triggers as t
from service.app import running
from service.config import Settings
from service.gateway.api import TriggerApi
from service.gateway.app import MAX_HEADER_FIELD, running_gateway
from service.natsserver import NatsServer
from service.routing import OPERATIONS, Operation
from tests.conftest import make_settings
from tests.http_fixtures import on_free_port
from tests.support import SECRET, auth, token

T = TypeVar("T")

FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "100"))
FUZZ_SEED = os.environ.get("FUZZ_SEED")
# Shrinking a failure costs real requests (a hang costs its whole timeout each time): on request.
FUZZ_SHRINK = os.environ.get("FUZZ_SHRINK", "") not in ("", "0")

PREFIX = "fuzz.trigger"  # a prefix of its own: no other service instance answers these subjects
ACCOUNT = "acme"
NATS_TIMEOUT = 8.0  # the service answers every operation within about 5 s (OPERATION_DEADLINE)
SIDECAR_TIMEOUT = 8.0  # TRIGGER_REQUEST_TIMEOUT of the sidecar
HTTP_TIMEOUT = SIDECAR_TIMEOUT + 4.0
SERVED_WITHIN = 3.0  # seconds for the sidecar to serve an accepted gateway trigger's route

pytestmark = [
    # A hang guard for the whole test; each request has its own, much shorter timeout.
    pytest.mark.timeout(120 + 2 * FUZZ_EXAMPLES),
]


def fuzz_settings(test: Callable[..., None]) -> Callable[..., None]:
    """The hypothesis settings of every fuzz test: FUZZ_EXAMPLES examples, reproducible."""
    configured = hypothesis.settings(
        max_examples=FUZZ_EXAMPLES,
        deadline=None,  # a request crosses NATS, KV and HTTP: its time says nothing about the property
        database=None,  # no example database in the repository
        derandomize=FUZZ_SEED is None,
        print_blob=False,
        phases=[p for p in hypothesis.Phase if FUZZ_SHRINK or p is not hypothesis.Phase.shrink],
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
            HealthCheck.filter_too_much,
        ],
    )(test)
    if FUZZ_SEED is not None:
        configured = hypothesis.seed(int(FUZZ_SEED))(configured)
    return configured


# --- JSON text, hostile where Python's encoders would refuse -----------------------------------


@dataclass(frozen=True)
class Raw:
    """JSON text written as it is: `1e309`, `NaN`, `01`, a 5,000-digit integer."""

    text: str


@dataclass(frozen=True)
class Pairs:
    """A JSON object that may hold one key twice."""

    items: tuple[tuple[str, Any], ...]


@dataclass(frozen=True)
class Deep:
    """Arrays or objects nested `depth` levels deep (written without recursion)."""

    depth: int
    kind: str  # "list" or "object"

    def render(self) -> str:
        if self.kind == "list":
            return "[" * self.depth + "]" * self.depth
        return '{"a":' * self.depth + "1" + "}" * self.depth


def dump(value: Any, ascii_only: bool = True) -> str:
    """JSON text of `value`; a lone surrogate becomes a `\\udxxx` escape (ascii_only) or stays raw."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, Deep):
        return value.render()
    if value is None or isinstance(value, bool | float | str):
        return json.dumps(value, ensure_ascii=ascii_only)  # floats: NaN and Infinity as JavaScript
    if isinstance(value, int):
        return str(value)
    items = value.items if isinstance(value, Pairs) else value.items() if isinstance(value, dict) else None
    if items is not None:
        return "{" + ",".join(f"{dump(str(k), ascii_only)}:{dump(v, ascii_only)}" for k, v in items) + "}"
    return "[" + ",".join(dump(v, ascii_only) for v in value) + "]"


def encode(value: Any, ascii_only: bool = True) -> bytes:
    """The bytes of `dump(value)`; raw lone surrogates become bytes that are not UTF-8."""
    return dump(value, ascii_only).encode("utf-8", "surrogatepass")


# --- hostile values ----------------------------------------------------------------------------

CONTROL = [chr(c) for c in range(0x20)] + ["\x7f", "\x80", "\x85", "\x9f"]
COMBINING = ["\u0301", "\u0308", "\u20dd", "e\u0301", "\u0336" * 16, "\u0e49" * 8]
BIDI = ["\u202e", "\u202b", "\u200f", "\u2067", "\u061c", "\u05d0\u05d1\u05d2", "\u0627\u0644\u0639"]
INVISIBLE = ["\u200b", "\u200d", "\u2060", "\ufeff", "\u00ad", "\u2028", "\u2029", "\u3000", "\u00a0"]
EMOJI = ["\U0001f600", "\U0001f469\u200d\U0001f469\u200d\U0001f467", "\U0001f1fa\U0001f1f3", "\U0010ffff"]
ODD = ["\ufffd", "\ufffe", "\uffff", "\U000e0001", "\u0000"]
SURROGATES = ["\ud800", "\udfff", "\udc00", "\ud83d"]  # lone halves
# fmt: off
SYNTAX = ["", " ", ".", "..", "*", ">", "$", "%", "%00", "%2F", "%zz", "/", "\\", "'", '"', "=", "@", "#",
          "?"]
# fmt: on
INJECTION = ["<script>", "${jndi:ldap://x}", "'; DROP TABLE t;--", "{{7*7}}", "../../etc/passwd"]
PIECES = CONTROL + COMBINING + BIDI + INVISIBLE + EMOJI + ODD + SURROGATES + SYNTAX + INJECTION

# fmt: off
INT_EDGES = [
    -(2**63) - 1, -(2**63), -(2**31) - 1, -1, 0, 1, 2**31 - 1, 2**31, 2**53 + 1,
    2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**30, 10**400,
]
# fmt: on
# fmt: off
RAW_NUMBERS = [
    "1e309", "-1e309", "1e-400", "NaN", "-NaN", "Infinity", "-Infinity", "1.0", "-0", "0.5", "1E2",
    "01", "0x10", "+1", ".5", "1.", "-", "1e", "9223372036854775808", "-9223372036854775809",
    "18446744073709551616", "1" + "0" * 400, "1" + "0" * 5_000,
]
# fmt: on


def mostly(common: st.SearchStrategy[T], rare: st.SearchStrategy[T], tenths: int = 7) -> st.SearchStrategy[T]:
    """`common` about `tenths` times in ten, else `rare` (plain one_of lets the larger strategy win)."""

    @st.composite
    def pick(draw: st.DrawFn) -> T:
        return draw(common if draw(st.integers(0, 9)) < tenths else rare)

    return pick()


def spliced(base: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """A string of `base` with hostile pieces inserted at, before or after a random position."""

    @st.composite
    def build(draw: st.DrawFn) -> str:
        value = draw(base)
        pieces = draw(st.lists(st.sampled_from(PIECES), min_size=1, max_size=3))
        at = draw(st.integers(0, len(value)))
        return value[:at] + "".join(pieces) + value[at:]

    return build()


hostile_text = st.one_of(
    st.lists(st.one_of(st.sampled_from(PIECES), st.text(max_size=6)), max_size=12).map("".join),
    st.text(max_size=40),
    st.sampled_from(["x" * 100_000, "\U0001f600" * 30_000, "\u0301" * 20_000, "\x00" * 10_000]),
)
hostile_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from(INT_EDGES),
    st.integers(),
    st.sampled_from(RAW_NUMBERS).map(Raw),
    st.floats(allow_nan=True, allow_infinity=True),
    hostile_text,
)
hostile_value = st.one_of(
    hostile_scalar,
    st.lists(hostile_scalar, max_size=5),
    st.dictionaries(hostile_text, hostile_scalar, max_size=5),
    st.builds(Deep, st.sampled_from([33, 64, 500, 5_000, 100_000]), st.sampled_from(["list", "object"])),
    st.sampled_from([["a"] * 20_000, {f"k{i}": i for i in range(5_000)}, [[[[[[[[]]]]]]]]]),
)
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1), st.text(max_size=10)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)

# --- values from the msgspec types ---------------------------------------------------------------

# Field-specific generators, next to the generic ones derived from the type (keyed by JSON path).
_ASCII_TOKEN = st.from_regex(r"[a-z0-9_-]{1,12}", fullmatch=True)
_plain_subjects = st.lists(_ASCII_TOKEN, min_size=1, max_size=4).map(lambda ts: "fz." + ".".join(ts))
_wild_subjects = st.lists(st.one_of(_ASCII_TOKEN, st.just("*")), min_size=1, max_size=4).map(
    lambda ts: "fz." + ".".join(ts) + ".>"
)
_segments = st.one_of(
    st.from_regex(r"[A-Za-z0-9\-._~!$&'()*+,;=:@]{1,12}", fullmatch=True),
    st.sampled_from(
        [".", "..", "%2E", "%2e%2E", "%41", "%c3%a9", "%2F", "%", "%zz", "", "caf\u00e9", "trigger"]
    ),
)
# fmt: off
ODD_PATHS = [
    "/trigger", "/trigger/", "/%74rigger/x", "/x/../trigger/a", "/healthz", "/./healthz", "//openapi.json",
    "/docs", "/metrics", "/console", "/", "/%2e%2e", "/a/%2F/b",
]
# fmt: on
_paths = st.one_of(
    st.lists(_segments, min_size=1, max_size=5).map(lambda ss: "/fz/" + "/".join(ss)),
    st.sampled_from(ODD_PATHS),
)
_versions = st.from_regex(t.VERSION_PATTERN, fullmatch=True)


@st.composite
def _distributions(draw: st.DrawFn) -> dict[str, int]:
    """Version weights that sum to 100 (valid), so creates with traffic_distribution succeed too."""
    cuts = sorted(draw(st.lists(st.integers(0, 100), max_size=4)))
    weights = [b - a for a, b in zip([0, *cuts], [*cuts, 100], strict=True)]
    names = draw(st.lists(_versions, min_size=len(weights), max_size=len(weights), unique=True))
    return dict(zip(names, weights, strict=True))


def _positions(names: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """What a cursor encodes: `<type>.<name>`, or `<type>.<name>@<revision>` for history."""
    kinds = st.sampled_from(["stream", "gateway", "subject", "other", ""])
    revisions = st.one_of(st.sampled_from(INT_EDGES).map(str), st.sampled_from(["", "0", "01", "-1", "x"]))
    return st.one_of(
        st.builds(lambda k, n: f"{k}.{n}", kinds, names),
        st.builds(lambda k, n, r: f"{k}.{n}@{r}", kinds, names, revisions),
        spliced(st.builds(lambda k, n: f"{k}.{n}", kinds, names)),
    )


def b64(text: str) -> str:
    """A cursor as the service writes them: URL-safe base64 without padding."""
    return base64.urlsafe_b64encode(text.encode("utf-8", "surrogatepass")).decode().rstrip("=")


names = st.from_regex(t.NAME_PATTERN, fullmatch=True)
cursors = st.one_of(
    st.from_regex(t.CURSOR_PATTERN, fullmatch=True).filter(lambda c: len(c) <= 1024),
    _positions(names).map(b64),
    _positions(names).map(lambda p: base64.b64encode(p.encode("utf-8", "surrogatepass")).decode()),
    st.just(b64("stream." + "a" * 760)),  # a forged name of 760 characters: 1,014 base64 characters
)
subject_patterns = st.one_of(
    st.builds(
        lambda tail: f"{PREFIX}.{tail}",
        st.one_of(
            st.sampled_from(["*", ">", "stream.*", "gateway.>", "subject.*", "*.*", "stream.>", "x.*"]),
            st.builds(lambda k, n: f"{k}.{n}", st.sampled_from(["stream", "gateway", "*"]), names),
        ),
    ),
    spliced(st.just(f"{PREFIX}.stream.*")),
)
OVERRIDES: dict[tuple[str, ...], st.SearchStrategy[Any]] = {
    ("source", "subject"): st.one_of(_plain_subjects, _wild_subjects),
    ("target", "subject"): st.one_of(_plain_subjects, _wild_subjects),
    ("target", "local_subject"): _plain_subjects,
    ("target", "account"): st.just(ACCOUNT),
    ("source", "info_url"): st.builds(lambda p: "https://example.com/" + p, _ASCII_TOKEN),
    ("gateway_mapping", "path"): _paths,
    ("gateway_mapping", "traffic_distribution"): _distributions(),
    ("gateway_mapping", "limit", "time"): st.integers(60_000, 10**9),  # never 429 a later example
    ("gateway_mapping", "limit", "request"): st.integers(1_000, 10**9),
    ("gateway_mapping", "timeout"): st.integers(1_000, 300_000),
    ("subject_pattern",): subject_patterns,
    ("cursor",): cursors,
}


def _unwrap(info: mi.Type) -> mi.Type:
    return info.type if isinstance(info, mi.Metadata) else info


def valid_values(info: mi.Type, path: tuple[str, ...] = ()) -> st.SearchStrategy[Any]:
    """Values of one msgspec type, within its constraints (the constraints a Struct's
    __post_init__ adds may still refuse some: that is a 400 like any other)."""
    info = _unwrap(info)
    generic = _generic(info, path)
    if path in OVERRIDES:
        return st.one_of(OVERRIDES[path], generic) if generic is not None else OVERRIDES[path]
    assert generic is not None, (path, info)
    return generic


def _generic(info: mi.Type, path: tuple[str, ...]) -> st.SearchStrategy[Any] | None:
    if isinstance(info, mi.StructType):
        required = {
            f.encode_name: valid_values(f.type, (*path, f.encode_name)) for f in info.fields if f.required
        }
        optional = {
            f.encode_name: valid_values(f.type, (*path, f.encode_name)) for f in info.fields if not f.required
        }
        return st.fixed_dictionaries(required, optional=optional)
    if isinstance(info, mi.UnionType):
        return st.one_of([valid_values(member, path) for member in info.types])
    if isinstance(info, mi.StrType):
        if info.pattern is not None:
            values = st.from_regex(info.pattern, fullmatch=True)
        else:
            values = st.text(max_size=40)
        low, high = info.min_length or 0, info.max_length
        return values.filter(lambda s: low <= len(s) and (high is None or len(s) <= high))
    if isinstance(info, mi.IntType):
        low = info.ge if info.ge is not None else None if info.gt is None else info.gt + 1
        high = info.le if info.le is not None else None if info.lt is None else info.lt - 1
        edges = [n for n in INT_EDGES if (low is None or n >= low) and (high is None or n <= high)]
        return st.one_of(st.integers(low, high), st.sampled_from(edges))
    if isinstance(info, mi.BoolType):
        return st.booleans()
    if isinstance(info, mi.LiteralType):
        return st.sampled_from(info.values)
    if isinstance(info, mi.NoneType):
        return st.none()
    if isinstance(info, mi.DictType):
        return st.dictionaries(
            valid_values(info.key_type, (*path, "*")), valid_values(info.value_type, (*path, "*")), max_size=4
        )
    if isinstance(info, mi.AnyType):
        return json_values
    return None


def fields_of(info: mi.Type, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], mi.Type]]:
    """Every field a request type has, nested Structs included, with its JSON path and its type."""
    info = _unwrap(info)
    if isinstance(info, mi.UnionType):
        return [item for member in info.types for item in fields_of(member, path)]
    if not isinstance(info, mi.StructType):
        return []
    found = []
    for f in info.fields:
        where = (*path, f.encode_name)
        found.append((where, f.type))
        found.extend(fields_of(f.type, where))
    return found


def _pad(path: tuple[str, ...], pattern: str | None, n: int, wide: bool) -> str:
    """A string of `n` characters that the field's pattern would take but for its length
    (`wide`: of characters that take 2-4 bytes in UTF-8 and are fine in that pattern, if any)."""
    char = "\U0001f600" if wide else "a"
    if path and path[-1] == "info_url":
        return ("https://example.com/" + char * n)[:n]
    if pattern == t.PATH_PATTERN:
        return ("/" + char * n)[:n]
    if pattern == t.SUBJECT_PATTERN and n > 2 and not wide:
        dotted = ("ab." * n)[:n]
        return dotted[:-1] + "c" if dotted.endswith(".") else dotted
    return char * n


def boundaries(path: tuple[str, ...], info: mi.Type) -> list[Any]:
    """Values at and just beyond the constraints of one field, read from its msgspec Meta."""
    info = _unwrap(info)
    if isinstance(info, mi.UnionType):
        return [value for member in info.types for value in boundaries(path, member)]
    if isinstance(info, mi.StrType):
        values = []
        for n in {info.min_length or 0, max((info.min_length or 0) - 1, 0), info.max_length or 0}:
            values.append(_pad(path, info.pattern, n, False))
        if info.max_length is not None:
            for wide in (False, True):
                values += [_pad(path, info.pattern, info.max_length, wide)]
                values += [_pad(path, info.pattern, info.max_length + 1, wide)]
        return values
    if isinstance(info, mi.IntType):
        values = list(INT_EDGES)
        for bound, step in ((info.ge, 0), (info.gt, 1), (info.le, 0), (info.lt, -1)):
            if bound is not None:
                values += [bound + step - 1, bound + step, bound + step + 1]
        return values
    if isinstance(info, mi.LiteralType):
        return [v.lower() if isinstance(v, str) else v for v in info.values] + ["", None, 0, []]
    if isinstance(info, mi.DictType):
        return [
            {},
            {"v1": 99},
            {"v1": 101},
            {f"v{i}": 1 for i in range(100)},
            {"a" * 64: 100},
            {"a" * 65: 100},
        ]
    return []


def short(value: Any, limit: int = 300) -> str:
    """A repr cut to `limit` characters, with the full length: what a failure report needs."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


@dataclass(frozen=True)
class Body:
    """One generated request body: the value, how it was made, and the bytes sent."""

    data: bytes
    how: str

    def __repr__(self) -> str:
        return f"Body({short(self.data)}, {self.how!r})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # how hypothesis prints an example
        printer.text(repr(self))


class Headers(list[tuple[bytes, bytes]]):
    """HTTP header lines, with a repr a failure report can print."""

    def __repr__(self) -> str:
        return f"Headers({short(list(self), 600)})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))


def _set(tree: Any, path: tuple[str, ...], value: Any) -> Any:
    if not path:
        return value
    node = dict(tree) if isinstance(tree, dict) else {}
    node[path[0]] = _set(node.get(path[0]), path[1:], value)
    return node


def _drop(tree: Any, path: tuple[str, ...]) -> Any:
    if not isinstance(tree, dict) or path[0] not in tree:
        return tree
    node = dict(tree)
    if len(path) == 1:
        del node[path[0]]
    else:
        node[path[0]] = _drop(node[path[0]], path[1:])
    return node


def _duplicate(tree: Any, path: tuple[str, ...], value: Any, first: bool) -> Any:
    """The object at `path[:-1]` with key `path[-1]` twice: the hostile value first or last."""
    if not isinstance(tree, dict):
        return tree
    if len(path) > 1:
        node = dict(tree)
        node[path[0]] = _duplicate(tree.get(path[0]), path[1:], value, first)
        return node
    items = list(tree.items())
    extra = (path[0], value)
    return Pairs(tuple([extra, *items] if first else [*items, extra]))


def bodies(cls: Any, fixed: dict[str, Any] | None = None) -> st.SearchStrategy[Body]:
    """Request bodies of `cls` (a Struct, or a union of them): valid, mutated field by field,
    replaced whole, or broken as bytes; `fixed` sets top-level fields before any mutation."""
    members = typing.get_args(cls)
    if members:  # an untagged union msgspec cannot describe as one: each member on its own
        return st.one_of([bodies(member, fixed) for member in members])
    info = mi.type_info(cls)
    fields = fields_of(info)
    paths = [p for p, _ in fields]
    edges = {p: values for p, f in fields if (values := boundaries(p, f))}  # by field: each as likely
    edge_paths = list(edges)
    valid = valid_values(info)

    @st.composite
    def build(draw: st.DrawFn) -> Body:
        tree = draw(valid)
        if fixed and isinstance(tree, dict):
            tree = {**tree, **fixed}
        how = draw(st.sampled_from(["valid", "boundary", "mutated", "mutated", "replaced", "bytes"]))
        notes = []
        if how == "boundary":  # one field at or just beyond a limit, the rest valid
            path = draw(st.sampled_from(edge_paths))
            tree = _set(tree, path, draw(st.sampled_from(edges[path])))
            notes.append(".".join(path))
        elif how == "mutated":
            for _ in range(draw(st.integers(1, 3))):
                kind = draw(
                    st.sampled_from(["hostile", "boundary", "boundary", "splice", "drop", "unknown", "dup"])
                )
                path = draw(st.sampled_from(paths))
                if kind == "hostile":
                    tree = _set(tree, path, draw(hostile_value))
                elif kind == "boundary":
                    path = draw(st.sampled_from(edge_paths))
                    tree = _set(tree, path, draw(st.sampled_from(edges[path])))
                elif kind == "splice":
                    tree = _set(tree, path, draw(spliced(st.text(max_size=8))))
                elif kind == "drop":
                    tree = _drop(tree, path)
                elif kind == "unknown":
                    tree = _set(
                        tree, (*path[:-1], draw(st.sampled_from(["x", "Name", "name ", "", "\x00"]))), 1
                    )
                else:
                    tree = _duplicate(tree, path, draw(hostile_value), draw(st.booleans()))
                notes.append(f"{kind}:{'.'.join(path)}")
        elif how == "replaced":
            tree = draw(hostile_value)
        data = encode(tree, ascii_only=draw(st.booleans()))
        if how == "bytes":
            data = draw(broken_bytes(data))
        return Body(data, f"{how} {' '.join(notes)}".strip())

    return build()


@st.composite
def broken_bytes(draw: st.DrawFn, data: bytes) -> bytes:
    """`data` (JSON text) broken as bytes: cut short, a byte changed, junk before or after, another
    encoding, bytes that are not UTF-8 inside a string."""
    kind = draw(st.sampled_from(["cut", "flip", "append", "prepend", "utf16", "utf32", "notutf8", "nul"]))
    if kind == "cut":
        return data[: draw(st.integers(0, max(len(data) - 1, 0)))]
    if kind == "flip" and data:
        at = draw(st.integers(0, len(data) - 1))
        return data[:at] + bytes([draw(st.integers(0, 255))]) + data[at + 1 :]
    if kind == "append":
        return data + draw(st.sampled_from([b"x", b",", b"}", b" {}", b"\x00", b"\xff", b"\n\n"]))
    if kind == "prepend":
        return draw(st.sampled_from([b"\xef\xbb\xbf", b"\x00", b" ", b"[", b")]}'\n"])) + data
    if kind in ("utf16", "utf32"):
        return data.decode("utf-8", "surrogatepass").encode(f"{kind[:3]}-{kind[3:]}", "surrogatepass")
    if kind == "notutf8" and b'"' in data:
        at = data.index(b'"') + 1
        return (
            data[:at]
            + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf8\x88"]))
            + data[at:]
        )
    return data + b"\x00"


# fmt: off
ODD_PAYLOADS = [
    b"", b" ", b"\n", b"null", b"true", b"0", b'""', b"[]", b"{}", b"{", b"}", b'{"', b"\xef\xbb\xbf{}",
    b"\x00", b"{}\x00", b"{} {}", b"{},", b"[{}]", b'{"a":1,"a":2}', b'{"__proto__":{}}', b"NaN",
    b"1e309", b'"\\ud800"', b'{"\\ud800":1}', b"\xff\xfe{\x00}\x00", b"[" * 100_000, b"{" * 100_000,
]
# fmt: on
raw_payloads = st.one_of(
    st.sampled_from(ODD_PAYLOADS),
    st.binary(max_size=256),
    st.builds(Deep, st.sampled_from([33, 1_000, 100_000]), st.sampled_from(["list", "object"])).map(encode),
    st.sampled_from([b"x" * 500_000, b'{"name":"' + b"a" * 900_000 + b'"}']),
)

# --- bearer tokens ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Auth:
    """An Authorization header (`value` None: no header) and what it must get: `bad`, refused (401)
    by every operation of the API; `read_only`, a token whose scope allows reading only;
    `verifies`, a token that is itself valid (signature, expiry, claims), which is all a gateway
    route asks of it."""

    value: str | None
    bad: bool
    name: str = "Authorization"
    read_only: bool = False
    verifies: bool = False

    def __repr__(self) -> str:
        return f"Auth({short(self.value)}, bad={self.bad}, name={self.name!r}, read_only={self.read_only})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))

    def refused(self, write: bool) -> bool:
        """True when an operation (a write, or a read) must answer 401 to this header."""
        return self.bad or (self.read_only and write)

    def over_http(self) -> Auth:
        """The same header as HTTP reads it: header names are case-insensitive there."""
        if self.name == "AUTHORIZATION":
            return dataclasses.replace(self, bad=False)
        return self


def _signed(claims: dict[str, Any], secret: str = SECRET, algorithm: str = "HS256") -> str:
    now = int(time.time())
    return jwt.encode(
        {"account": ACCOUNT, "iat": now, "exp": now + 3600, **claims}, secret, algorithm=algorithm
    )


def _unsigned(claims: dict[str, Any]) -> str:
    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part({'account': ACCOUNT, **claims})}."


def _flip_signature(value: str) -> str:
    head, _, signature = value.rpartition(".")
    return f"{head}.{signature[:-2]}{'A' if signature[-2] != 'A' else 'B'}{signature[-1]}"


_header_text = st.text(st.characters(exclude_characters="\r\n", exclude_categories=["Cs"]), max_size=60)
PAD = "x" * (20 * 1024)
# fmt: off
ODD_AUTHORIZATIONS = [
    "", " ", "Bearer", "Bearer ", "Bearer     ", "Bearer \t ", "bearer", "Basic dXNlcjpwYXNz", "Bearer null",
    "Token abc", "Bearer a.b.c", "Bearer ...", "Bearer " + "a" * (20 * 1024), "Bearer " + "\u00e9" * 500,
    "Bearer \x00", "Bearer \U0001f600", "Bearer \u2028x", "Bearer a\u0085b", "Bearer eyJ", "Bearer ..",
]
# fmt: on
auths = st.one_of(
    st.builds(lambda: Auth(f"Bearer {token(ACCOUNT)}", bad=False, verifies=True)),
    st.builds(lambda: Auth(f"Bearer {token(ACCOUNT, pad=PAD)}", bad=False, verifies=True)),  # 20 KiB
    st.builds(lambda: Auth(f"bearer  {token(ACCOUNT)}", bad=False, name="authorization", verifies=True)),
    st.builds(
        lambda: Auth(
            f"Bearer {token(ACCOUNT, scope='triggers:read')}", bad=False, read_only=True, verifies=True
        )
    ),
    st.just(Auth(None, bad=True)),
    st.sampled_from(ODD_AUTHORIZATIONS).map(lambda v: Auth(v, bad=True)),
    _header_text.map(lambda v: Auth(v, bad=True)),
    _header_text.map(lambda v: Auth(f"Bearer {v}", bad=True)),
    st.builds(lambda: Auth(f"Bearer {_signed({}, secret='another-secret-of-32-bytes-or-more!!')}", bad=True)),
    st.builds(lambda: Auth(f"Bearer {token(ACCOUNT, ttl=-60)}", bad=True)),  # expired
    st.builds(lambda: Auth(f"Bearer {_unsigned({})}", bad=True)),  # alg none
    st.builds(lambda: Auth(f"Bearer {_flip_signature(token(ACCOUNT))}", bad=True)),
    st.builds(lambda: Auth(f"Bearer {token(ACCOUNT)[:-10]}", bad=True)),  # cut short
    st.builds(
        lambda: Auth("Bearer " + jwt.encode({"account": ACCOUNT}, SECRET, algorithm="HS256"), bad=True)
    ),
    st.builds(lambda: Auth(f"Bearer {_signed({'exp': '9999999999'})}", bad=True)),
    st.builds(lambda: Auth(f"Bearer {_signed({'account': 'a.b'})}", bad=True)),
    st.builds(lambda: Auth(f"Bearer {_signed({'account': 'x' * 129})}", bad=True)),
    st.builds(lambda: Auth(f"Bearer {_signed({'scope': 'triggers:none'})}", bad=True, verifies=True)),
    # NATS headers are case-sensitive: the service reads `Authorization` and `authorization` only.
    st.builds(lambda: Auth(f"Bearer {token(ACCOUNT)}", bad=True, name="AUTHORIZATION", verifies=True)),
)

# --- the endpoints of the operation table ------------------------------------------------------

TRIGGER_TYPES = ["gateway", "stream", "subject"]
# A subject token that can travel in a NATS subject (no separator, space or line break, not a
# whole-token wildcard, not a lone surrogate) however hostile otherwise.
_NO_TRAVEL = re.compile(r"[. \t\r\n\ud800-\udfff]")


def _travels(token: str) -> bool:
    return (
        bool(token)
        and token not in ("*", ">")
        and not _NO_TRAVEL.search(token)
        and len(token.encode()) <= 1_000
    )


travelling_tokens = st.one_of(
    spliced(names),
    st.text(st.characters(exclude_characters=". \t\r\n", exclude_categories=["Cs"]), min_size=1, max_size=40),
    st.sampled_from(["a" * 128, "a" * 129, "\U0001f600" * 200, "-a", "_a", "A" * 255, "a*", ">a", "$a"]),
).filter(_travels)


@dataclass(frozen=True)
class Call:
    """One request to one endpoint of the table."""

    op: Operation
    subject: str  # after the prefix
    trigger_type: str | None = None
    name: str | None = None


def _named(op: Operation) -> st.SearchStrategy[Call]:
    """A call of a named operation: mostly a real type and a valid name, else hostile tokens."""
    return st.builds(
        lambda k, n: Call(op, op.subject.replace("*.*", f"{k}.{n}"), k, n),
        mostly(st.sampled_from(TRIGGER_TYPES), travelling_tokens),
        mostly(st.one_of(st.sampled_from(PRECREATED), names), travelling_tokens),
    )


PRECREATED = ["pre-a", "pre-b", "pre-c"]  # names that named examples may create first
OPS = {op.name: op for op in OPERATIONS}
calls = st.one_of([_named(op) if op.names_trigger else st.just(Call(op, op.subject)) for op in OPERATIONS])


def payloads(op: Operation) -> st.SearchStrategy[Body]:
    """Payloads for one operation: bodies of its request type, and raw bytes."""
    return st.one_of(bodies(op.request), raw_payloads.map(lambda data: Body(data, "raw")))


# --- the running stack -----------------------------------------------------------------------------


@dataclass
class NatsAnswer:
    envelope: Any
    headers: dict[str, str]

    def __repr__(self) -> str:
        return f"NatsAnswer({short(self.envelope, 1000)}, {short(self.headers, 1000)})"


@dataclass
class HttpAnswer:
    status: int
    headers: dict[str, str]  # lower-case names; the last of repeated ones
    body: bytes

    def __repr__(self) -> str:
        return f"HttpAnswer({self.status}, {short(self.headers, 1000)}, {short(self.body, 1000)})"


@dataclass(frozen=True)
class GatewayRoute:
    """A gateway trigger the module serves, with an echoing responder on its subject."""

    method: str
    path: str
    is_public: bool


ROUTES = [
    GatewayRoute("POST", "/fuzz/echo", False),
    GatewayRoute("GET", "/fuzz/echo", True),
    GatewayRoute("PUT", "/fuzz/a/b/", False),
]


class Stack:
    """The service, the sidecar and a client connection on one event loop in a background thread."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stream = f"KV_{settings.bucket}"
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="fuzz-loop", daemon=True)
        self._thread.start()
        self._stop = asyncio.Event()
        self._ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._keeper = asyncio.run_coroutine_threadsafe(self._keep(), self.loop)
        self.nc: Client
        self.host, self.port = "", 0
        try:
            self._ready.result(60)
        except BaseException:
            self._halt()
            raise

    async def _keep(self) -> None:
        try:
            async with contextlib.AsyncExitStack() as stack:
                await stack.enter_async_context(running(self.settings))
                url = await stack.enter_async_context(running_gateway(on_free_port(self.settings)))
                host, port = url.removeprefix("http://").split(":")
                self.host, self.port = host, int(port)
                self.nc = await nats.connect(self.settings.nats_url)
                stack.push_async_callback(self.nc.drain)
                await self._serve_routes()
                self._ready.set_result(None)
                await self._stop.wait()
        except BaseException as exc:
            if not self._ready.done():
                self._ready.set_exception(exc)
            raise

    async def _serve_routes(self) -> None:
        """The module's gateway triggers (account `owner`), each with an echoing responder."""
        for route in ROUTES:
            body = {
                "name": "route-" + uuid.uuid4().hex[:8],
                "trigger_type": "gateway",
                "gateway_mapping": {
                    "method": route.method,
                    "path": route.path,
                    "is_public": route.is_public,
                    "timeout": 5_000,
                },
            }
            reply = await self._nats(
                f"{PREFIX}.create.gateway", encode(body), {"Authorization": f"Bearer {token('owner')}"}
            )
            assert reply.envelope["status_code"] == 201, reply.envelope
            await self.nc.subscribe(reply.envelope["body"]["gateway_mapping_subject"], cb=self._echo)
        await asyncio.sleep(0)
        await self.nc.flush()
        for route in ROUTES:
            deadline = time.monotonic() + 10
            while (await self._http(request_bytes(route.method, route.path, [], b""))).status == 404:
                assert time.monotonic() < deadline, f"{route} not served"
                await asyncio.sleep(0.02)

    async def _echo(self, msg: Msg) -> None:
        """Answer a gateway request with what the sidecar forwarded: its Http-* headers and account."""
        headers = msg.headers or {}
        body = {
            "http": {k: v for k, v in headers.items() if k.lower().startswith("http-")},
            "account": headers.get("Trigger-Account"),
            "size": len(msg.data),
        }
        await msg.respond(msgspec.json.encode({"status_code": 200, "body": body}))

    def close(self) -> None:
        """Stop the sidecar and the service (drained), then the loop."""
        self.loop.call_soon_threadsafe(self._stop.set)
        try:
            self._keeper.result(60)
        finally:
            self._halt()

    def _halt(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self.loop.is_running():
            self.loop.close()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float, what: str) -> T:
        """Run `coro` on the stack's loop; a failure if it takes longer than `timeout` (a hang)."""
        future = asyncio.run_coroutine_threadsafe(asyncio.wait_for(coro, timeout), self.loop)
        try:
            return future.result(timeout + 5)
        except TimeoutError:
            future.cancel()
            raise AssertionError(f"no answer within {timeout:g} s: {what}") from None

    # --- requests ------------------------------------------------------------------------------

    async def _nats(self, subject: str, data: bytes, headers: dict[str, str] | None) -> NatsAnswer:
        msg = await self.nc.request(subject, data, timeout=NATS_TIMEOUT, headers=headers or None)
        try:
            envelope = msgspec.json.decode(msg.data)
        except msgspec.DecodeError:
            raise AssertionError(f"reply to {subject} is not JSON: {msg.data[:200]!r}") from None
        return NatsAnswer(envelope, dict(msg.headers or {}))

    def nats(self, subject: str, data: bytes, headers: dict[str, str] | None = None) -> NatsAnswer:
        """One NATS request to `<prefix>.<subject>`."""
        full = f"{PREFIX}.{subject}"
        return self.run(self._nats(full, data, headers), NATS_TIMEOUT + 1, f"NATS {full!r}")

    async def _http(self, data: bytes, head: bool = False) -> HttpAnswer:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            writer.write(data)
            while True:
                answer = await _read_response(reader, head)
                if not 100 <= answer.status < 200:
                    return answer
        finally:
            writer.close()

    def http(self, data: bytes, head: bool = False) -> HttpAnswer:
        """One raw HTTP/1.1 exchange with the sidecar: the final (non-1xx) response."""
        return self.run(self._http(data, head), HTTP_TIMEOUT, f"HTTP {data[:120]!r}")

    async def _last_seq(self) -> int:
        return int((await self.nc.jetstream().stream_info(self.stream)).state.last_seq)

    def last_seq(self) -> int:
        """The KV stream's last sequence: any write, even of half a record or a claim, moves it."""
        return self.run(self._last_seq(), 10, "stream info")


async def _read_response(reader: asyncio.StreamReader, head: bool) -> HttpAnswer:
    lines = (await reader.readuntil(b"\r\n\r\n"))[:-4].split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if head or status in (204, 304) or 100 <= status < 200:
        return HttpAnswer(status, headers, b"")
    if "content-length" in headers:
        return HttpAnswer(status, headers, await reader.readexactly(int(headers["content-length"])))
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            body += await reader.readexactly(size + 2)
            body = body[:-2]
        await reader.readuntil(b"\r\n")
        return HttpAnswer(status, headers, body)
    return HttpAnswer(status, headers, await reader.read())


def request_bytes(method: str, target: str | bytes, headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
    """An HTTP/1.1 request as bytes, framed by Content-Length."""
    line = (method.encode("utf-8", "surrogatepass") if isinstance(method, str) else method) + b" "
    line += target.encode("utf-8", "surrogatepass") if isinstance(target, str) else target
    out = [line + b" HTTP/1.1", b"Host: fuzz"]
    out += [name + b": " + value for name, value in headers]
    out += [b"Content-Length: " + str(len(body)).encode(), b"", b""]
    return b"\r\n".join(out) + body


@pytest.fixture(scope="module")
def fx(nats_server: NatsServer) -> Iterator[Stack]:
    """The module's stack: a Trigger Service and a sidecar (prefix `fuzz.trigger`, a fresh bucket)."""
    settings = make_settings(nats_server.url, TRIGGER_PREFIX=PREFIX, TRIGGER_REQUEST_TIMEOUT=SIDECAR_TIMEOUT)
    stack = Stack(settings)
    try:
        yield stack
    finally:
        stack.close()


# --- the properties ------------------------------------------------------------------------------


def nats_status(answer: NatsAnswer, op: Operation) -> int:
    """The status of a NATS reply, once it is checked to be a well-formed envelope and no 5xx."""
    envelope = answer.envelope
    assert isinstance(envelope, dict), envelope
    status = envelope.get("status_code")
    assert isinstance(status, int), envelope
    assert not isinstance(status, bool), envelope
    assert status < 500, envelope
    code = answer.headers.get("Nats-Service-Error-Code")
    if status >= 400:
        assert isinstance(envelope.get("error"), str), envelope
        assert envelope["error"], envelope
        assert code == str(status), (code, envelope)
        # nats-py writes a header value stripped, with line breaks as spaces (no header injection).
        said = answer.headers.get("Nats-Service-Error")
        assert said is not None, answer
        assert said.split() == envelope["error"].split(), answer
    else:
        assert status == op.success, (op.name, envelope)
        assert code is None, answer
        assert "error" not in envelope, envelope
        assert "body" in envelope or op.name == "delete", envelope
    return status


def http_status(answer: HttpAnswer, method: str, target: str) -> int:
    """The status of an HTTP reply, once it is checked to be a well-formed envelope and no 5xx
    (but a 501 for a method the parser does not know)."""
    status = answer.status
    if method == "HEAD":  # no body to check
        assert status < 500, answer
        return status
    if status == 200 and "/openapi.json" in urllib.parse.unquote(target):  # in any spelling
        assert msgspec.json.decode(answer.body)["openapi"].startswith("3."), answer.body[:100]
        return status
    assert answer.headers.get("content-type", "").startswith("application/json"), answer
    envelope = msgspec.json.decode(answer.body)
    assert isinstance(envelope, dict), envelope
    assert envelope.get("status_code") == status, (status, envelope)
    if status == 501:
        assert method not in KNOWN_METHODS, (method, envelope)
        assert "method" in envelope["error"], envelope
    else:
        assert status < 500, (method, target, envelope)
    if status >= 400:
        assert isinstance(envelope.get("error"), str), envelope
        assert envelope["error"], envelope
    else:
        assert "error" not in envelope, envelope
    return status


def nats_headers(auth: Auth) -> dict[str, str]:
    return {} if auth.value is None else {auth.name: auth.value}


def valid_headers() -> dict[str, str]:
    """NATS headers with a fresh valid token (tests/support.py)."""
    return auth(ACCOUNT)


def after_accepted(fx: Stack, record: Any) -> None:
    """An accepted create: its record reads back; a gateway trigger's route is served; then it goes."""
    assert isinstance(record, dict), record
    kind, name = record["trigger_type"], record["name"]
    got = fx.nats(f"get.{kind}.{name}", b"", valid_headers())
    assert nats_status(got, OPS["get"]) == 200, got.envelope
    assert _without_revision(got.envelope["body"]) == _without_revision(record)
    if kind == "gateway":
        mapping = record["gateway_mapping"]
        assert_served(fx, mapping["method"], mapping["path"])
    gone = fx.nats(f"delete.{kind}.{name}", b"", valid_headers())
    assert nats_status(gone, OPS["delete"]) == 200, gone.envelope


def _without_revision(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != "revision"}


def assert_served(fx: Stack, method: str, path: str) -> None:
    """The sidecar serves METHOD path within SERVED_WITHIN seconds: anything but its 404."""
    deadline = time.monotonic() + SERVED_WITHIN
    while True:
        answer = fx.http(request_bytes(method, path, [], b""), head=method == "HEAD")
        if answer.status != 404:
            return
        assert time.monotonic() < deadline, f"{method} {path} is not served {SERVED_WITHIN} s after its 201"
        fx.run(asyncio.sleep(0.02), 1, "sleep")


def nats_example(fx: Stack, call: Call, body: Body, headers: dict[str, str], refused: bool) -> int:
    """Send one NATS example and check every property; its status."""
    # A message over the server's max payload never leaves the client (nats-py refuses it).
    assume(
        len(body.data) + sum(len(k) + len(v.encode()) + 4 for k, v in headers.items()) + 64
        <= fx.nc.max_payload
    )
    hypothesis.note(f"NATS request: {PREFIX}.{call.subject!r} headers={short(headers, 2000)} {body!r}")
    before = fx.last_seq()
    answer = fx.nats(call.subject, body.data, headers)
    hypothesis.note(f"NATS reply: {answer!r}")
    status = nats_status(answer, call.op)
    hypothesis.event(f"{call.op.name} {status}")  # the spread of answers: --hypothesis-show-statistics
    after = fx.last_seq()
    if refused:
        assert status == 401, answer.envelope
    if status >= 400 or not call.op.write:
        assert after == before, f"{call.subject} answered {status} and wrote {after - before} messages"
    if status == 201:
        after_accepted(fx, answer.envelope["body"])
    assert fx.nc.is_connected
    return status


def still_answers(fx: Stack) -> None:
    """The service answers over NATS and the sidecar says it is healthy."""
    answer = fx.nats("get.stream.still-there", b"", valid_headers())
    assert nats_status(answer, OPS["get"]) in (200, 404)
    health = fx.http(request_bytes("GET", "/healthz", [], b""))
    assert health.status == 200, health


# --- NATS: every endpoint of the operation table --------------------------------------------------


@fuzz_settings
@hypothesis.given(body=bodies(t.StreamTriggerRequest))
def test_create_stream_over_nats(fx: Stack, body: Body) -> None:
    """create.stream with bodies of StreamTriggerRequest, valid and hostile."""
    nats_example(fx, Call(OPS["create-stream"], "create.stream"), body, valid_headers(), refused=False)


@fuzz_settings
@hypothesis.given(body=bodies(t.GatewayTriggerRequest))
def test_create_gateway_over_nats(fx: Stack, body: Body) -> None:
    """create.gateway with bodies of GatewayTriggerRequest, valid and hostile."""
    nats_example(fx, Call(OPS["create-gateway"], "create.gateway"), body, valid_headers(), refused=False)


@fuzz_settings
@hypothesis.given(body=bodies(t.ListQuery))
def test_list_over_nats(fx: Stack, body: Body) -> None:
    """list with ListQuery payloads: patterns, limits and forged cursors."""
    nats_example(fx, Call(OPS["list"], "list"), body, valid_headers(), refused=False)


def _precreate(fx: Stack, kind: str, name: str) -> None:
    """Create `kind` trigger `name` (if it does not exist), so that a named example finds one."""
    tag = uuid.uuid4().hex[:10]
    if kind == "stream":
        body = {
            "name": name,
            "trigger_type": "stream",
            "source": {"subject": f"fz.pre.{tag}"},
            "target": {"subject": f"fz.post.{tag}"},
        }
    else:
        body = {
            "name": name,
            "trigger_type": "gateway",
            "gateway_mapping": {"method": "GET", "path": f"/fz/{tag}"},
        }
    answer = fx.nats(f"create.{kind}", encode(body), valid_headers())
    assert nats_status(answer, OPS[f"create-{kind}"]) in (201, 409), answer.envelope


REVISIONS = [str(n) for n in INT_EDGES] + ["", " 1", "1 ", "+1", "0x1", "1_0", "1.0", "\uff11", "\u0661", "x"]
ENTITY_TAGS = ['"1"', 'W/"1"', "*", '"abc"', '"' + "9" * 30 + '"', '"1", "2"', "", '"', "1", '"\u00e9"']
# The compare-and-set headers of the conditional operations, hostile or not.
revision_headers = st.one_of(
    st.just({}),
    st.sampled_from(REVISIONS).map(lambda v: {"Trigger-Revision": v}),
    st.sampled_from(ENTITY_TAGS).map(lambda v: {"If-Match": v}),
    st.builds(
        lambda a, b: {"Trigger-Revision": a, "If-Match": b},
        st.sampled_from(REVISIONS),
        st.sampled_from(ENTITY_TAGS),
    ),
)
NAMED = [op for op in OPERATIONS if op.names_trigger]


def named_payloads(call: Call) -> st.SearchStrategy[Body]:
    """Payloads of a named operation; for one whose body names the trigger too (update), bodies
    that name the subject's trigger as well, so that some get past the first checks."""
    own = typing.get_args(call.op.request) or (call.op.request,)
    fitting = [
        bodies(cls, {"name": call.name, "trigger_type": call.trigger_type})
        for cls in own
        if "name" in {f.encode_name for f in getattr(mi.type_info(cls), "fields", ())}
    ]
    return st.one_of(payloads(call.op), *fitting)


@fuzz_settings
@hypothesis.given(
    call=st.one_of([_named(op) for op in NAMED]),
    data=st.data(),
    precreate=st.booleans(),
)
def test_named_operations_over_nats(fx: Stack, call: Call, data: st.DataObject, precreate: bool) -> None:
    """Every operation that names one trigger in its subject (get, delete, history, and any other
    of the table), of every trigger type and of hostile type and name tokens, on triggers that
    exist and that do not, with hostile payloads and compare-and-set headers."""
    assert call.trigger_type is not None
    assert call.name is not None
    if precreate and call.trigger_type in ("stream", "gateway") and re.fullmatch(t.NAME_PATTERN, call.name):
        _precreate(fx, call.trigger_type, call.name)
    body = data.draw(named_payloads(call), label="payload")
    headers = {**valid_headers(), **data.draw(revision_headers, label="headers")}
    status = nats_example(fx, call, body, headers, refused=False)
    if call.op.name == "history" and status == 200:
        for entry in fx.nats(call.subject, b"", valid_headers()).envelope["body"]["results"]:
            assert entry["record"]["name"] == call.name


@fuzz_settings
@hypothesis.given(call=calls, data=st.data())
def test_raw_payloads_on_every_endpoint_over_nats(fx: Stack, call: Call, data: st.DataObject) -> None:
    """Every endpoint of the table, with payloads that are not JSON, not UTF-8, empty, huge, deep."""
    body = data.draw(st.one_of(raw_payloads.map(lambda b: Body(b, "raw")), bodies(call.op.request)))
    nats_example(fx, call, body, valid_headers(), refused=False)


@fuzz_settings
@hypothesis.given(call=calls, auth=auths, data=st.data())
def test_bearer_tokens_on_every_endpoint_over_nats(
    fx: Stack, call: Call, auth: Auth, data: st.DataObject
) -> None:
    """Every endpoint with hostile Authorization headers: a bad one is a 401 whatever the body
    (authentication comes first), and writes nothing."""
    body = data.draw(payloads(call.op), label="payload")
    nats_example(fx, call, body, nats_headers(auth), refused=auth.refused(call.op.write))


def test_the_fuzz_covers_every_operation_of_the_table() -> None:
    """Every operation has a request type to generate from, and a named one every trigger type."""
    assert {op.name for op in OPERATIONS} == set(OPS)
    for op in OPERATIONS:
        for member in typing.get_args(op.request) or (op.request,):
            assert isinstance(mi.type_info(member), mi.StructType), op.name
    assert sorted(TRIGGER_TYPES) == sorted(t.TriggerType.__args__)


# --- HTTP: every route of the sidecar ------------------------------------------------------------

# The sidecar's static routes: one per path of the operation table, and its own two.
STATIC_ROUTES = sorted({op.http_path for op in OPERATIONS} | {"/healthz", "/openapi.json"})


def test_the_fuzz_covers_every_static_route_of_the_sidecar() -> None:
    """Every route the sidecar registers is one the HTTP examples are sent to (the rest of the
    paths fall to the gateway routes, which the gateway example covers)."""
    app = web.Application()
    settings = make_settings("nats://nats.invalid", TRIGGER_PREFIX=PREFIX)
    TriggerApi(settings, typing.cast(Client, None)).add_routes(app.router)
    assert {resource.canonical for resource in app.router.resources()} <= set(STATIC_ROUTES)


KNOWN_METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"]
methods = mostly(
    st.sampled_from(KNOWN_METHODS),
    st.one_of(
        st.sampled_from(
            ["get", "Post", "FETCH", "PROPFIND", "M-SEARCH", "QUERY", "PURGE", "X", "GET\x00", "G ET"]
        ),
        st.from_regex(r"[A-Z]{1,12}", fullmatch=True),
    ),
)


def _quoted(value: str, how: str) -> str:
    """A path parameter as a request target carries it: percent-encoded in full, as needed, or raw."""
    raw = value.encode("utf-8", "surrogatepass")
    if how == "all":
        return "".join(f"%{b:02X}" for b in raw)
    if how == "needed":
        return urllib.parse.quote(raw, safe="")
    return raw.decode("latin-1")  # raw bytes: the parser refuses what is not ASCII


def _respelled(path: str, how: str) -> str:
    """Another spelling of a path: dot segments, doubled slashes, escapes of unreserved characters."""
    if how == "dot":
        return path.replace("/", "/./", 1)
    if how == "dotdot":
        return "/x/.." + path
    if how == "double":
        return path.replace("/", "//")
    if how == "escaped":
        return re.sub(r"[a-z]", lambda m: f"%{ord(m.group()):02x}", path, count=2)
    if how == "escaped-dots":
        return "/x/%2E%2E" + path
    if how == "trailing":
        return path + "/"
    return path


@st.composite
def api_targets(draw: st.DrawFn) -> str:
    """A request target on one of the sidecar's static routes, hostile in its path and query."""
    path = draw(st.sampled_from(STATIC_ROUTES))
    for param in ("{type}", "{name}"):
        if param in path:
            value = draw(
                st.one_of(st.sampled_from(TRIGGER_TYPES), names, hostile_text.filter(lambda s: len(s) < 400))
            )
            path = path.replace(
                param, _quoted(value, draw(st.sampled_from(["needed", "needed", "all", "raw"])))
            )
    path = _respelled(
        path,
        draw(st.sampled_from(["", "", "", "dot", "dotdot", "double", "escaped", "escaped-dots", "trailing"])),
    )
    return path + draw(queries)


def _query_pair(key: str, value: str) -> str:
    def quoted(text: str) -> str:
        return urllib.parse.quote(text.encode("utf-8", "surrogatepass"), safe="")

    return f"{quoted(key)}={quoted(value)}"


queries = st.one_of(
    st.just(""),
    st.just("?"),
    st.lists(
        st.tuples(
            st.sampled_from(["subject_pattern", "limit", "cursor", "x", "", "limit[]", "__proto__"]),
            st.one_of(
                subject_patterns,
                cursors,
                st.sampled_from(INT_EDGES).map(str),
                st.sampled_from(RAW_NUMBERS),
                hostile_text.filter(lambda s: len(s) < 300),
            ),
        ),
        max_size=4,
    ).map(lambda pairs: "?" + "&".join(_query_pair(k, v) for k, v in pairs)),
    st.sampled_from(["?a", "?=", "?&&", "?%", "?%zz=1", "?a=1;b=2", "?limit=1&limit=2", "?" + "a" * 30_000]),
)

_SAFE_VALUE = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60)
# fmt: off
HEADER_NAMES = [
    "Http-Method", "Http-Path", "Http-Query", "HTTP-PATH", "http-x", "Http-", "Trigger-Account",
    "X-Request-Id", "If-Match", "If-None-Match", "Trigger-Revision", "Content-Type", "Accept", "Connection",
    "Expect", "Cookie", "Origin", "Nats-Service-Error-Code", "Authorization2", "X-Forwarded-For", "Forwarded",
    "Te", "Keep-Alive",
]
# fmt: on


@st.composite
def hostile_headers(draw: st.DrawFn) -> Headers:
    """Header lines other than Authorization, Host and the body's framing (those the hostile HTTP
    tests cover): hostile names and values, `Http-*` ones that must never reach a responder."""
    out = Headers()
    for _ in range(draw(st.integers(0, 3))):
        name = draw(
            st.one_of(
                st.sampled_from(HEADER_NAMES),
                st.from_regex(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,20}", fullmatch=True),
                st.sampled_from(["X Y", "X(Y)", "\u00e9", "X\x00", ""]),
            )
        )
        if name.lower() in ("content-length", "transfer-encoding", "upgrade", "host", "authorization"):
            continue
        value = draw(
            st.one_of(
                _SAFE_VALUE,
                _header_text,
                st.sampled_from(
                    ["100-continue", "close", "keep-alive, te", "a" * 17_000, "\u00e9\u00e8", "\x01"]
                ),
            )
        )
        if name.lower() == "connection" and "upgrade" in value.lower():
            continue
        out.append((name.encode("utf-8", "surrogatepass"), value.encode("utf-8", "surrogatepass")))
    return out


def auth_header(auth: Auth) -> list[tuple[bytes, bytes]]:
    if auth.value is None:
        return []
    return [(auth.name.encode(), auth.value.encode("utf-8", "surrogatepass"))]


def http_example(
    fx: Stack, method: str, target: str, headers: list[tuple[bytes, bytes]], body: bytes, writes: bool
) -> HttpAnswer:
    """Send one HTTP example and check every property common to all routes; the answer."""
    sent = request_bytes(method, target, headers, body)
    hypothesis.note(f"HTTP request: {short(sent, 2000)}")  # printed with a failure
    before = fx.last_seq()
    answer = fx.http(sent, head=method == "HEAD")
    hypothesis.note(f"HTTP reply: {answer!r}")
    status = http_status(answer, method, target)
    hypothesis.event(f"HTTP {status}")
    after = fx.last_seq()
    if status >= 400 or not writes:
        assert after == before, (
            f"{method} {target[:200]} answered {status} and wrote {after - before} messages"
        )
    if status == 201:
        after_accepted(fx, msgspec.json.decode(answer.body)["body"])
    return answer


WRITE_METHODS = {op.http_method for op in OPERATIONS if op.write}
BODY_OPS = [op for op in OPERATIONS if not op.from_subject and op.http_method != "GET"]


def _writes(method: str, target: str) -> bool:
    """True when a request may write: the method of a writing operation, on an API path."""
    return method in WRITE_METHODS and "/trigger" in urllib.parse.unquote(target)


@fuzz_settings
@hypothesis.given(method=methods, target=api_targets(), headers=hostile_headers(), auth=auths, data=st.data())
def test_api_routes_over_http(
    fx: Stack, method: str, target: str, headers: list[tuple[bytes, bytes]], auth: Auth, data: st.DataObject
) -> None:
    """The sidecar's static routes with hostile methods, paths, queries, headers, tokens and bodies."""
    body = data.draw(st.one_of(st.just(Body(b"", "empty")), *[payloads(op) for op in BODY_OPS]))
    http_example(fx, method, target, [*auth_header(auth), *headers], body.data, _writes(method, target))


def _api_path(op: Operation, trigger_type: str, name: str) -> str:
    return op.http_path.replace("{type}", trigger_type).replace("{name}", _quoted(name, "needed"))


@fuzz_settings
@hypothesis.given(
    op=st.sampled_from(BODY_OPS),
    trigger_type=st.sampled_from(TRIGGER_TYPES),
    name=st.one_of(st.sampled_from(PRECREATED), names),
    data=st.data(),
)
def test_request_bodies_over_http(
    fx: Stack, op: Operation, trigger_type: str, name: str, data: st.DataObject
) -> None:
    """Every route that takes a body (the creates, and any other of the table), with bodies of
    its request types, valid and hostile."""
    body = data.draw(payloads(op), label="body")
    headers = [
        (b"Authorization", valid_headers()["Authorization"].encode()),
        (b"Content-Type", b"application/json"),
    ]
    http_example(fx, op.http_method, _api_path(op, trigger_type, name), headers, body.data, writes=True)


@fuzz_settings
@hypothesis.given(op=st.sampled_from(OPERATIONS), auth=auths.map(Auth.over_http), data=st.data())
def test_bad_tokens_on_every_api_route_are_401_over_http(
    fx: Stack, op: Operation, auth: Auth, data: st.DataObject
) -> None:
    """Each route of the table with its own method and a token that must be refused: 401 before
    anything about the request, whatever its path parameters, query or body (431 when the header
    line is over the parser's limit, 400 when the parser refuses the header's bytes)."""
    assume(auth.refused(op.write))
    # A name that is a path segment of its own (not empty, no slash, not a dot segment), so that the
    # path is the operation's route and no other.
    segment = hostile_text.filter(lambda s: 0 < len(s) < 300 and "/" not in s and s not in (".", ".."))
    name = data.draw(st.one_of(names, segment), label="name")
    target = _api_path(op, data.draw(st.sampled_from(TRIGGER_TYPES)), name) + data.draw(queries)
    body = data.draw(payloads(op), label="body").data if op in BODY_OPS else b""
    answer = http_example(fx, op.http_method, target, auth_header(auth), body, writes=False)
    value = auth.value or ""
    line = len(auth.name) + 2 + len(value.encode("utf-8", "surrogatepass"))
    if re.fullmatch(r"[\t\x20-\x7e]*", value) and line <= MAX_HEADER_FIELD and len(target) < 60_000:
        assert answer.status == 401, (answer.status, answer.body[:300])
    else:
        assert answer.status in (400, 401, 414, 431), (answer.status, answer.body[:300])


ROUTE_SPELLINGS = ["", "", "dot", "dotdot", "double", "escaped", "escaped-dots", "trailing"]


@fuzz_settings
@hypothesis.given(
    route=st.sampled_from(ROUTES),
    method=mostly(st.sampled_from([r.method for r in ROUTES]), methods, 5),
    spelling=st.sampled_from(ROUTE_SPELLINGS),
    query=st.one_of(st.just(""), st.from_regex(r"\?[A-Za-z0-9%=&;:@/?,!$'()*+._~-]{0,40}", fullmatch=True)),
    headers=hostile_headers(),
    auth=auths.map(Auth.over_http),
    body=st.one_of(st.binary(max_size=64), raw_payloads).map(lambda data: Body(data, "raw")),
)
def test_gateway_route_over_http(
    fx: Stack,
    route: GatewayRoute,
    method: str,
    spelling: str,
    query: str,
    headers: list[tuple[bytes, bytes]],
    auth: Auth,
    body: Body,
) -> None:
    """A gateway trigger's route in other spellings, with hostile methods, headers, tokens and bodies:
    what reaches the responder carries the sidecar's Http-* headers and account, never the caller's."""
    target = _respelled(route.path, spelling) + query
    answer = http_example(fx, method, target, [*auth_header(auth), *headers], body.data, writes=False)
    if answer.status != 200 or method == "HEAD":
        return
    forwarded = msgspec.json.decode(answer.body)["body"]
    assert forwarded["http"] == {"Http-Method": method, "Http-Path": route.path, "Http-Query": query[1:]}, (
        forwarded
    )
    valid = auth.verifies and auth.value is not None
    assert forwarded["account"] == (ACCOUNT if valid else None), (auth, forwarded)
    assert forwarded["size"] == len(body.data)


# --- at the end: both still answer ---------------------------------------------------------------


def test_after_the_fuzz_the_service_and_the_sidecar_still_answer(fx: Stack) -> None:
    """A create and a get over NATS and over HTTP, a route that carries a message, a gateway
    route, and /healthz: nothing the examples sent left either process broken."""
    tag = uuid.uuid4().hex[:10]
    body = {
        "name": f"alive-{tag}",
        "trigger_type": "stream",
        "source": {"subject": f"fz.alive.{tag}"},
        "target": {"subject": f"fz.alive-out.{tag}"},
    }
    created = fx.nats("create.stream", encode(body), valid_headers())
    assert nats_status(created, OPS["create-stream"]) == 201, created.envelope
    got = fx.nats(f"get.stream.alive-{tag}", b"", valid_headers())
    assert nats_status(got, OPS["get"]) == 200, got.envelope

    async def carried() -> bytes:
        sub = await fx.nc.subscribe(f"fz.alive-out.{tag}")
        await asyncio.sleep(0)
        await fx.nc.flush()
        await fx.nc.publish(f"fz.alive.{tag}", b"still carried")
        msg = await sub.next_msg(timeout=5)
        await sub.unsubscribe()
        return msg.data

    assert fx.run(carried(), 6, "a message through the new route") == b"still carried"

    auth = [(b"Authorization", valid_headers()["Authorization"].encode())]
    http_body = encode({**body, "name": f"alive-http-{tag}", "source": {"subject": f"fz.alive-http.{tag}"}})
    posted = fx.http(request_bytes("POST", "/trigger/stream", auth, http_body))
    assert http_status(posted, "POST", "/trigger/stream") == 201, posted
    read = fx.http(request_bytes("GET", f"/trigger/triggers/stream/alive-http-{tag}", auth, b""))
    assert http_status(read, "GET", "/trigger/triggers") == 200, read
    echoed = fx.http(request_bytes("GET", "/fuzz/echo?x=1", [], b""))
    assert echoed.status == 200, echoed
    assert msgspec.json.decode(echoed.body)["body"]["http"]["Http-Query"] == "x=1"
    still_answers(fx)


# --- what the fuzz suite found, now regression tests -------------------------------------------


@contextlib.asynccontextmanager
async def _own_stack(nats_url: str) -> Any:
    """A Trigger Service and a sidecar of their own (a prefix and a bucket of their own), for an
    input that may break them; yields (client, prefix, sidecar URL)."""
    prefix = f"repro{uuid.uuid4().hex[:8]}.trigger"
    settings = make_settings(nats_url, TRIGGER_PREFIX=prefix)
    async with running(settings), running_gateway(on_free_port(settings)) as url:
        nc = await nats.connect(nats_url)
        try:
            yield nc, prefix, url
        finally:
            await nc.drain()


def _in_own_loop(coro: Coroutine[Any, Any, None]) -> None:
    """Run a coroutine in a loop of its own (a thread: pytest-asyncio may own this one), 60 s at most."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, coro).result(60)


async def _status(nc: Client, subject: str, body: Any, timeout: float = NATS_TIMEOUT) -> Any:
    reply = await nc.request(
        subject, body if isinstance(body, bytes) else encode(body), timeout=timeout, headers=valid_headers()
    )
    return msgspec.json.decode(reply.data)


@pytest.mark.parametrize("field", ["source", "target"])
def test_a_subject_over_1024_utf8_bytes_is_400_and_every_route_still_carries(
    nats_server: NatsServer, field: str
) -> None:
    """Found by the fuzz suite: 1,024 characters of 4 bytes each (valid by `max_length`) took the
    route's SUB or PUB line over nats-server's 4,096-byte control line, the server closed the
    service's route connection, and no stream route carried anything from then on."""

    async def scenario() -> None:
        async with _own_stack(nats_server.url) as (nc, prefix, _url):
            subjects = {"source": "fz.wide", "target": "fz.wide-out", field: "\U0001f600" * 1024}
            body = {
                "name": "wide",
                "trigger_type": "stream",
                "source": {"subject": subjects["source"]},
                "target": {"subject": subjects["target"]},
            }
            envelope = await _status(nc, f"{prefix}.create.stream", body)
            assert envelope["status_code"] == 400, envelope
            assert f"`$.{field}.subject`" in envelope["error"], envelope
            after = {
                "name": "after",
                "trigger_type": "stream",
                "source": {"subject": "fz.after"},
                "target": {"subject": "fz.after-out"},
            }
            sub = await nc.subscribe("fz.after-out")
            await asyncio.sleep(0)
            await nc.flush()
            assert (await _status(nc, f"{prefix}.create.stream", after))["status_code"] == 201
            await nc.publish("fz.after", b"carried")
            assert (await sub.next_msg(timeout=3)).data == b"carried"

    _in_own_loop(scenario())


@pytest.mark.parametrize("time_ms", [10**400, 31_536_000_001], ids=["1e400", "a-year-and-1-ms"])
def test_a_rate_limit_window_beyond_its_bound_is_400(fx: Stack, time_ms: int) -> None:
    """Found by the fuzz suite: `limit.time` = 10**400 was accepted (201), and the sidecar could
    never build the route (OverflowError), so it answered 404 while the route's claim was held."""
    body = {
        "name": "huge-window",
        "trigger_type": "gateway",
        "gateway_mapping": {
            "method": "GET",
            "path": "/fz/huge-window",
            "limit": {"request": 1, "time": time_ms},
        },
    }
    before = fx.last_seq()
    answer = fx.nats("create.gateway", encode(body), valid_headers())
    assert nats_status(answer, OPS["create-gateway"]) == 400, answer
    assert "`$.gateway_mapping.limit.time`" in answer.envelope["error"], answer
    assert fx.last_seq() == before


@pytest.mark.parametrize("char", ["\x0b", "\x0c"], ids=["vt", "ff"])
def test_a_vertical_tab_or_form_feed_in_a_subject_is_answered_400(nats_server: NatsServer, char: str) -> None:
    """Found by the fuzz suite: nats-server delivers \\x0b and \\x0c in a subject token, nats-py's MSG
    parser took them for separators, so the request was never answered and the service's
    connection failed to parse and reconnected, once for each such request."""

    async def scenario() -> None:
        async with _own_stack(nats_server.url) as (nc, prefix, _url):
            envelope = await _status(nc, f"{prefix}.get.stream.a{char}b", b"", timeout=3)
            assert envelope["status_code"] == 400, envelope
            assert (await _status(nc, f"{prefix}.get.stream.after", b"", timeout=3))["status_code"] == 404

    _in_own_loop(scenario())


@pytest.mark.parametrize("account", [None, ACCOUNT], ids=["anonymous", "authenticated"])
@pytest.mark.parametrize("name", ["a%7Db", "%7B", "a%7B%7Db"])
def test_a_brace_in_a_path_parameter_reaches_the_api_route(fx: Stack, account: str | None, name: str) -> None:
    """Found by the fuzz suite: aiohttp's default `[^{}/]+` sent a path parameter with a brace past
    the API routes to the gateway routes (404 `no gateway route`, without authentication)."""
    headers = [] if account is None else [(b"Authorization", f"Bearer {token(account)}".encode())]
    answer = fx.http(request_bytes("GET", f"/trigger/triggers/stream/{name}", headers, b""))
    assert answer.status == (401 if account is None else 400), answer
    assert http_status(answer, "GET", "/trigger/triggers") == answer.status


@pytest.mark.parametrize(
    ("method", "target"), [("CONNECT", "/x"), ("CONNECT", "example.com:443"), ("OPTIONS", "*")]
)
def test_an_unknown_expectation_on_a_request_no_route_matches_is_a_417_envelope(
    fx: Stack, method: str, target: str
) -> None:
    """Found by the fuzz suite: a request no route matches (CONNECT's target is an authority,
    `OPTIONS *`) with an `Expect` other than 100-continue got aiohttp's own 417 in text/plain,
    since aiohttp runs the expect handler of the route it matched before any middleware."""
    answer = fx.http(request_bytes(method, target, [(b"Expect", b"foo")], b""))
    assert answer.status == 417, answer
    assert http_status(answer, method, target) == 417
