"""Helpers shared by the tests: tokens, requests, polling with a deadline, inboxes."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from service.auth import mint

SECRET = "test-secret-of-the-suite-32-bytes-long!"
PREFIX = "ms.trigger"
T = TypeVar("T")


def token(account: str = "acme", **claims: Any) -> str:
    """A valid HS256 bearer token for `account`."""
    return mint(SECRET, account, **claims)


def auth(account: str = "acme", **claims: Any) -> dict[str, str]:
    """NATS headers carrying a bearer token."""
    return {"Authorization": f"Bearer {token(account, **claims)}"}


def unique(prefix: str = "t") -> str:
    """A fresh name, so tests never see each other's data."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


class Reply(msgspec.Struct):
    """A decoded reply: the envelope and the NATS headers."""

    envelope: dict[str, Any]
    headers: dict[str, str]

    @property
    def status(self) -> int:
        return int(self.envelope["status_code"])

    @property
    def body(self) -> Any:
        return self.envelope.get("body")


async def request(
    nc: Client,
    subject: str,
    payload: Any = None,
    *,
    headers: dict[str, str] | None = None,
    account: str | None = "acme",
    timeout: float = 5.0,
) -> Reply:
    """Send a request to the service and decode its envelope."""
    hdrs = dict(auth(account)) if account is not None else {}
    hdrs.update(headers or {})
    if payload is None:
        data = b""
    elif isinstance(payload, bytes):
        data = payload
    else:
        data = msgspec.json.encode(payload)
    msg = await nc.request(subject, data, timeout=timeout, headers=hdrs or None)
    return Reply(msgspec.json.decode(msg.data), dict(msg.headers or {}))


def stream_request(name: str, source: str, target: str, **extra: Any) -> dict[str, Any]:
    """A create-stream body."""
    body: dict[str, Any] = {
        "name": name,
        "trigger_type": "stream",
        "source": {"subject": source, "type": "stream"},
        "target": {"subject": target, "type": "stream"},
    }
    body.update(extra)
    return body


def gateway_request(name: str, method: str, path: str, **mapping: Any) -> dict[str, Any]:
    """A create-gateway body."""
    return {
        "name": name,
        "trigger_type": "gateway",
        "gateway_mapping": {"method": method, "path": path, **mapping},
    }


async def eventually(
    check: Callable[[], Awaitable[T] | T], *, timeout: float = 5.0, interval: float = 0.01
) -> T:
    """Poll `check` until it returns a truthy value, or fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


class Inbox:
    """Every message delivered to one subscription, in arrival order."""

    def __init__(self) -> None:
        self.messages: list[Msg] = []

    @classmethod
    async def on(cls, nc: Client, subject: str) -> Inbox:
        """Subscribe to `subject`; return once the server has the subscription."""
        inbox = cls()

        async def received(msg: Msg) -> None:
            inbox.messages.append(msg)

        await nc.subscribe(subject, cb=received)
        await asyncio.sleep(0)
        await nc.flush()
        return inbox

    @property
    def payloads(self) -> list[bytes]:
        return [m.data for m in self.messages]

    async def first(self) -> Msg:
        """The first message, once there is one."""
        await eventually(lambda: self.messages)
        return self.messages[0]

    async def wait_for(self, *payloads: bytes, timeout: float = 5.0) -> None:
        """Return once every one of `payloads` has arrived."""
        await eventually(lambda: set(payloads) <= set(self.payloads), timeout=timeout)


async def serving(nc: Client, timeout: float = 10.0) -> None:
    """Return once a Trigger Service replica answers `$SRV.PING` on `nc`: on a cluster the
    service's subscriptions reach the other servers a moment after it started."""

    async def answered() -> bool:
        try:
            await nc.request("$SRV.PING.trigger-service", b"", timeout=0.5)
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
            return False
        return True

    await eventually(answered, timeout=timeout)
