"""A correction and a speed-up of nats-py's protocol parsing, applied when the service or the sidecar
starts.

The correction: nats-py matches `MSG`/`HMSG` lines with `\\s`, which also takes a vertical tab or
a form feed for a field separator. nats-server separates fields with spaces and tabs only and lets
any other byte stand in a subject, so one request to `<prefix>.get.stream.a\\x0bb` made the client
misread the line, drop the connection and reconnect, and the request was never answered. These
patterns separate fields the way the server does; the subject then reaches validation (a 400).

The speed-up: nats-py's header parser looks for whitespace in each header name with a generator,
a tenth of the cost of every message with headers (every watch delivery, every request from the
sidecar); `parse_header_lines` gives the same result with one precompiled search
(tests/test_natsproto.py compares the two on arbitrary bytes).
"""

from __future__ import annotations

import re

from nats.aio.client import Client
from nats.protocol import parser

ORIGINAL_PARSE_HEADER_LINES = Client._parse_header_lines  # kept for the test that compares the two

_FIELD = rb"[^ \t\r\n]+"
_SEP = rb"[ \t]+"
MSG_RE = re.compile(rb"\AMSG" + _SEP + rb"(" + _FIELD + rb")" + _SEP + rb"(" + _FIELD + rb")" + _SEP
                    + rb"((" + _FIELD + rb")" + _SEP + rb")?(\d+)\r\n")  # fmt: skip
HMSG_RE = re.compile(rb"\AHMSG" + _SEP + rb"(" + _FIELD + rb")" + _SEP + rb"(" + _FIELD + rb")" + _SEP
                     + rb"((" + _FIELD + rb")" + _SEP + rb")?(\d+)" + _SEP + rb"(\d+)\r\n")  # fmt: skip


_WHITESPACE = re.compile(r"\s")  # for str, what str.isspace() takes for whitespace


def parse_header_lines(raw: bytes) -> dict[str, str]:
    """nats-py's `Client._parse_header_lines`: `Name: Value` lines; a name that is not ASCII or holds
    whitespace is skipped; values are UTF-8 with replacement."""
    out: dict[str, str] = {}
    for line in raw.split(b"\r\n"):
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        try:
            key = name.strip().decode("ascii")
        except UnicodeDecodeError:
            continue
        if _WHITESPACE.search(key) is None:
            out[key] = value.strip().decode("utf-8", "replace")
    return out


def apply() -> None:
    """Use the server's field separators in nats-py's parser, and the faster header parser
    (idempotent)."""
    parser.MSG_RE = MSG_RE
    parser.HMSG_RE = HMSG_RE
    Client._parse_header_lines = staticmethod(parse_header_lines)  # type: ignore[method-assign]
