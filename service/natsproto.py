"""A correction to nats-py's protocol parser, applied when the service or the sidecar starts.

nats-py matches `MSG`/`HMSG` lines with `\\s`, which also takes a vertical tab or a form feed for a
field separator. nats-server separates fields with spaces and tabs only and lets any other byte
stand in a subject, so one request to `<prefix>.get.stream.a\\x0bb` made the client misread the
line, drop the connection and reconnect, and the request was never answered. These patterns
separate fields the way the server does; the subject then reaches validation (a 400).
"""

from __future__ import annotations

import re

from nats.protocol import parser

_FIELD = rb"[^ \t\r\n]+"
_SEP = rb"[ \t]+"
MSG_RE = re.compile(rb"\AMSG" + _SEP + rb"(" + _FIELD + rb")" + _SEP + rb"(" + _FIELD + rb")" + _SEP
                    + rb"((" + _FIELD + rb")" + _SEP + rb")?(\d+)\r\n")  # fmt: skip
HMSG_RE = re.compile(rb"\AHMSG" + _SEP + rb"(" + _FIELD + rb")" + _SEP + rb"(" + _FIELD + rb")" + _SEP
                     + rb"((" + _FIELD + rb")" + _SEP + rb")?(\d+)" + _SEP + rb"(\d+)\r\n")  # fmt: skip


def apply() -> None:
    """Use the server's field separators in nats-py's parser (idempotent)."""
    parser.MSG_RE = MSG_RE
    parser.HMSG_RE = HMSG_RE
