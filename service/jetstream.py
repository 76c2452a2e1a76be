"""The JetStream API calls the store and the follower make, with bounded time and settled writes.

Reads that must be complete or current go to the stream leader (`STREAM.MSG.GET`, `STREAM.INFO`),
which answers from the newest committed state; a direct get may be answered by a lagging
follower. Writes carry a message id and are retried until acknowledged: when an attempt timed
out (the leader may have stored it and lost the acknowledgement), a later "wrong last sequence"
is settled by reading the key back and comparing the message id, so a reply never claims that a
write failed while it was in fact stored.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import contextvars
import itertools
import os
import time
from dataclasses import dataclass
from typing import Any, Literal

import msgspec
import nats.errors
from nats.aio.client import Client

from service import log, requests, tracing
from service.errors import ApiError, Unavailable

ATTEMPT_TIMEOUT = 0.75  # seconds one JetStream request may take before it is tried again
READ_DEADLINE = 2.0  # a read that JetStream cannot answer is a 503 after this long
WRITE_DEADLINE = 3.0  # a write is settled (stored, refused, or outcome unknown) within this long (+0.5 s)
_RETRY_PAUSE = 0.1
_LAST_LOOK = 0.5  # seconds for reading back a write that was not acknowledged in time
MSG_ID = "Nats-Msg-Id"
EXPECTED_LAST_SUBJECT_SEQUENCE = "Nats-Expected-Last-Subject-Sequence"
NO_MESSAGE = 10037
WRONG_LAST_SEQUENCE = (10071, 10164)  # "wrong last sequence: N", and without the N
STREAM_NOT_FOUND = 10059
DUPLICATE_IN_PROCESS = 10158  # an earlier attempt with this message id is still being committed
OPERATION_DEADLINE = 5.0  # every API operation's JetStream calls together end within this long
_budget: contextvars.ContextVar[float | None] = contextvars.ContextVar("jetstream_budget", default=None)
_decode_json = msgspec.json.Decoder().decode
# What a retried request says while no answer comes, by NoAnswer.kind.
_API_SILENCE = {
    "no responders": "no JetStream server answered",
    "timeout": "JetStream did not answer in time",
    "not connected": "not connected to NATS",
}
_WRITE_SILENCE = {
    "no responders": "the bucket's stream has no leader",
    "timeout": "JetStream did not acknowledge the write",
    "not connected": "not connected to NATS",
}
_encode_json = msgspec.json.Encoder().encode
_log = log.get("jetstream")


class OutcomeUnknown(ApiError):
    """A write JetStream neither confirmed nor refused in time: `msg_id` on `subject` may yet be stored."""

    status, kind = 504, "Outcome unknown"

    def __init__(self, detail: str, subject: str = "", msg_id: str = "") -> None:
        super().__init__(detail)
        self.subject, self.msg_id = subject, msg_id


class BucketMissing(Unavailable):
    """The bucket's stream does not exist."""


class JetStreamError(Exception):
    """An error reply of the JetStream API."""

    def __init__(self, code: int, err_code: int, description: str) -> None:
        super().__init__(f"{description} (code {code}, error {err_code})")
        self.code, self.err_code, self.description = code, err_code, description


class WrongLastSequence(Exception):
    """A compare-and-set write found the subject at another sequence."""


class StoredMessage(msgspec.Struct, frozen=True):
    """One message of a stream, as the leader returned it."""

    subject: str
    seq: int
    data: bytes
    headers: dict[str, str]
    time: str


def start_budget(seconds: float = OPERATION_DEADLINE) -> None:
    """Bound every JetStream call made from now on in this task (a request's own, whose context
    ends with it) and in the tasks it starts to `seconds` in all."""
    _budget.set(time.monotonic() + seconds)


def unbounded() -> contextvars.Context:
    """A context without a budget, for background work started from inside a request."""
    context = contextvars.copy_context()
    context.run(_budget.set, None)
    return context


def _give_up(seconds: float) -> float:
    own = time.monotonic() + seconds
    limit = _budget.get()
    return own if limit is None else min(own, limit)


_NEVER = frozenset({10052})  # "invalid subject" comes with code 500, but asking again will not help


def _transient(error: JetStreamError) -> bool:
    """An error that means "not now" (no leader, no quorum, JetStream busy), not "never"."""
    if error.err_code in _NEVER:
        return False
    return error.code in (408, 500, 503) or error.err_code in (10008, 10076, 10077, 10118)


def _parse_headers(raw: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in raw.decode(errors="replace").split("\r\n")[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip()] = value.strip()
    return headers


@dataclass(frozen=True)
class NoAnswer:
    """Why one JetStream request got no answer: `no responders` (no leader, or no JetStream),
    `timeout` (it may have been processed), or `not connected`."""

    kind: Literal["no responders", "timeout", "not connected"]


async def request_once(
    nc: Client, subject: str, payload: bytes, wait: float, headers: dict[str, str] | None = None
) -> dict[str, Any] | JetStreamError | NoAnswer:
    """One JetStream request waiting `wait` seconds: its reply, the error JetStream answered, or why
    no answer came."""
    try:
        msg = await requests.request(nc, subject, payload, wait=wait, headers=headers)
    except nats.errors.NoRespondersError:
        return NoAnswer("no responders")
    except (TimeoutError, nats.errors.TimeoutError):
        return NoAnswer("timeout")
    except (nats.errors.ConnectionClosedError, nats.errors.ConnectionReconnectingError):
        return NoAnswer("not connected")
    reply = _decode_json(msg.data) if msg.data else {}
    if not isinstance(reply, dict):
        reply = {}
    error = reply.get("error")
    if not error:
        return reply
    return JetStreamError(
        int(error.get("code", 0)), int(error.get("err_code", 0)), str(error.get("description"))
    )


class JetStream:
    """The JetStream API of one stream, over one connection."""

    def __init__(self, nc: Client, stream: str) -> None:
        self.nc = nc
        self.stream = stream
        self._id_prefix = os.urandom(12).hex() + "-"
        self._id_sequence = itertools.count(1)

    async def api(self, verb: str, request: dict[str, Any], deadline: float = READ_DEADLINE) -> Any:
        """`$JS.API.<verb>`, retried while JetStream cannot answer; Unavailable after `deadline`."""
        payload = _encode_json(request)
        give_up = _give_up(deadline)
        reason = "JetStream did not answer"
        while True:
            remaining = give_up - time.monotonic()
            if remaining <= 0:
                raise Unavailable(f"the trigger store is not available ({reason})")
            outcome = await request_once(self.nc, f"$JS.API.{verb}", payload, min(ATTEMPT_TIMEOUT, remaining))
            if isinstance(outcome, NoAnswer):
                reason = _API_SILENCE[outcome.kind]
            elif isinstance(outcome, JetStreamError):
                if outcome.err_code == STREAM_NOT_FOUND:
                    raise BucketMissing("the trigger bucket does not exist")
                if not _transient(outcome):
                    raise outcome
                reason = outcome.description
            else:
                return outcome
            await asyncio.sleep(min(_RETRY_PAUSE, max(0.0, give_up - time.monotonic())))

    async def info(self) -> dict[str, Any]:
        """The stream's info, from its leader."""
        reply: dict[str, Any] = await self.api(f"STREAM.INFO.{self.stream}", {})
        return reply

    async def replicated(self) -> bool:
        """True when the stream is kept on more than one server."""
        config = (await self.info()).get("config") or {}
        return int(config.get("num_replicas") or 1) > 1

    async def last(self, subject: str, deadline: float = READ_DEADLINE) -> StoredMessage | None:
        """The newest message on `subject` (wildcards allowed), from the leader; None when there is none."""
        return await self._get({"last_by_subj": subject}, deadline)

    async def at(self, seq: int) -> StoredMessage | None:
        """The message at `seq`, from the leader; None when there is none."""
        return await self._get({"seq": seq})

    async def _get(self, request: dict[str, Any], deadline: float = READ_DEADLINE) -> StoredMessage | None:
        try:
            reply = await self.api(f"STREAM.MSG.GET.{self.stream}", request, deadline)
        except JetStreamError as exc:
            if exc.err_code == NO_MESSAGE:
                return None
            raise
        message = reply["message"]
        raw_headers = message.get("hdrs")
        return StoredMessage(
            subject=message["subject"],
            seq=int(message["seq"]),
            data=base64.b64decode(message.get("data") or ""),
            headers=_parse_headers(base64.b64decode(raw_headers)) if raw_headers else {},
            time=str(message.get("time", "")),
        )

    async def horizon(self, subject: str) -> int:
        """The sequence of the newest message on `subject`: a complete read includes at least that."""
        newest = await self.last(subject)
        return newest.seq if newest is not None else 0

    async def publish(self, subject: str, data: bytes, expected_last: int) -> int:
        """Store `data` on `subject` if the subject is still at `expected_last` (0: holds nothing).

        Returns the new sequence; WrongLastSequence when the subject moved on; Unavailable when
        nothing was stored; OutcomeUnknown when an attempt may have been stored and JetStream
        did not tell within WRITE_DEADLINE.
        """
        with tracing.span("trigger store write", {"messaging.system": "nats", "trigger.stored_on": subject}):
            return await self._publish(subject, data, expected_last)

    async def _publish(self, subject: str, data: bytes, expected_last: int) -> int:
        # A random prefix of this object's own and a sequence, as NUID makes ids but without its
        # character loop: no system call per write (os.urandom and uuid4 each cost 3-4% of a
        # create, NUID 2.6%). Unique within the duplicate window across every writer.
        msg_id = f"{self._id_prefix}{next(self._id_sequence)}"
        headers = {MSG_ID: msg_id, EXPECTED_LAST_SUBJECT_SEQUENCE: str(expected_last)}
        give_up = _give_up(WRITE_DEADLINE)
        uncertain = False  # an attempt may have reached the leader without our hearing back
        reason = "JetStream did not answer"
        while True:
            remaining = give_up - time.monotonic()
            if remaining <= 0:
                break
            outcome = await request_once(self.nc, subject, data, min(ATTEMPT_TIMEOUT, remaining), headers)
            if isinstance(outcome, NoAnswer):
                uncertain |= outcome.kind == "timeout"
                reason = _WRITE_SILENCE[outcome.kind]
            elif not isinstance(outcome, JetStreamError):
                return int(outcome["seq"])
            elif outcome.err_code == DUPLICATE_IN_PROCESS:
                uncertain, reason = True, "the write is still being committed"
            elif outcome.err_code in WRONG_LAST_SEQUENCE:
                if uncertain:
                    try:
                        stored = await self.stored_as(subject, msg_id)
                    except Unavailable:
                        break  # cannot tell: outcome unknown
                    if stored is not None:
                        return stored
                raise WrongLastSequence(outcome.description)
            elif outcome.err_code == STREAM_NOT_FOUND:
                raise BucketMissing("the trigger bucket does not exist")
            elif _transient(outcome):
                reason = outcome.description
            else:
                raise outcome
            await asyncio.sleep(min(_RETRY_PAUSE, max(0.0, give_up - time.monotonic())))
        if uncertain:
            with contextlib.suppress(Unavailable):
                stored = await self.stored_as(subject, msg_id, _LAST_LOOK)
                if stored is not None:
                    return stored
            raise OutcomeUnknown(
                f"the trigger store did not confirm the write in time ({reason})", subject, msg_id
            )
        raise Unavailable(f"the trigger store is not available ({reason}); nothing was stored")

    async def stored_as(self, subject: str, msg_id: str, deadline: float = READ_DEADLINE) -> int | None:
        """The sequence of the newest message on `subject` when it carries `msg_id`, else None."""
        newest = await self.last(subject, deadline)
        if newest is not None and newest.headers.get(MSG_ID) == msg_id:
            return newest.seq
        return None
