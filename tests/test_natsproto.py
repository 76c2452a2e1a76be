"""The header parser the service and the sidecar put in nats-py (service.natsproto) parses as nats-py's.

And a message with headers still arrives whole over a real server after the switch.
"""

from __future__ import annotations

import nats
from hypothesis import given, settings
from hypothesis import strategies as st

from service import natsproto
from service.natsserver import NatsServer

# Header blocks from the pieces that matter: names with and without whitespace or non-ASCII bytes,
# colons, CRLFs, bare CR or LF, values in and out of UTF-8.
_PIECES = st.sampled_from(
    [b"Name", b"Nats-Msg-Id", b"a b", b"\x1c", b"\t", b" ", b":", b": ", b"\r\n", b"\r", b"\n",
     b"value", b"\xc3\xa9", b"\xff", b"\xe2\x80\xa8", b"KV-Operation: DEL", b"", b"x\x0by"]
)  # fmt: skip


@settings(max_examples=2000, deadline=None)
@given(st.lists(st.one_of(_PIECES, st.binary(max_size=8)), max_size=12).map(b"".join))
def test_the_header_parser_gives_what_nats_pys_gives(raw: bytes) -> None:
    assert natsproto.parse_header_lines(raw) == natsproto.ORIGINAL_PARSE_HEADER_LINES(raw)


async def test_headers_arrive_whole_through_the_switched_parser(nats_server: NatsServer) -> None:
    natsproto.apply()
    nc = await nats.connect(nats_server.url)
    try:
        sub = await nc.subscribe("natsproto.headers")
        sent = {"Nats-Msg-Id": "abc", "Trace": "caf\u00e9", "Empty": ""}
        await nc.publish("natsproto.headers", b"x", headers=sent)
        msg = await sub.next_msg(timeout=2)
        assert msg.headers == sent
        assert msg.data == b"x"
    finally:
        await nc.close()
