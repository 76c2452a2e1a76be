"""The system-account connection: who the trusted operator is, account lookups, and claim pushes."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import nats
import nats.errors
from nats.aio.client import Client

from service import log
from service.accounts import jwt
from service.config import ConfigError, Settings
from service.errors import ApiError, BadRequest, Internal, Unavailable

CLAIMS_UPDATE = "$SYS.REQ.CLAIMS.UPDATE"
CLAIMS_LOOKUP = "$SYS.REQ.ACCOUNT.{}.CLAIMS.LOOKUP"
CLAIMS_LIST = "$SYS.REQ.CLAIMS.LIST"  # a full resolver's every account key
VARZ = "$SYS.REQ.SERVER.PING.VARZ"
PING = "$SYS.REQ.SERVER.PING"
REPLY_WINDOW = 2.0  # seconds to wait for every server of a cluster to answer
LOOKUP_WAIT = 0.5  # seconds to wait for a server that knows the account
PUSH_ATTEMPTS = 3
# Seconds to wait for every server up to answer a PING: the servers may still count one that just
# died as active, and a membership check must not wait a whole REPLY_WINDOW for it.
MEMBERS_WINDOW = 0.5

_log = log.get("accounts")


class StartupError(ConfigError):
    """Accounts mode cannot work with this configuration; the message says why."""


class SystemAccount:
    """Signs account claims with the operator's key and pushes them through the system account."""

    def __init__(self, nc: Client, signer: Any, window: float = REPLY_WINDOW) -> None:
        self.nc = nc
        self.signer = signer
        self.window = window
        self.trusted: frozenset[str] = frozenset()
        self.system_account = ""
        self.servers = 1
        self.last_push = 0.0  # monotonic time of the last push every server up acknowledged
        self._accounts: frozenset[str] = frozenset()  # accounts the servers were last seen to know

    @classmethod
    async def open(
        cls, settings: Settings, on_reconnect: Callable[[], Awaitable[None]] | None = None
    ) -> SystemAccount:
        """Connect with TRIGGER_SYSTEM_CREDS, learn the trusted operator, check the signing key.

        `on_reconnect` is awaited after each reconnection: the server may have restarted with
        only its preloaded JWTs.
        """
        assert settings.operator_seed  # config.load checks both
        assert settings.system_creds
        signer = jwt.read_seed(settings.operator_seed)

        async def reconnected() -> None:
            if on_reconnect is not None:
                await on_reconnect()

        async def failed(exc: Exception) -> None:
            _log.warning("system-account connection error; retrying", error=str(exc) or repr(exc))

        async def disconnected() -> None:
            _log.warning("system-account connection lost; reconnecting")

        nc = await nats.connect(
            servers=settings.nats_url.split(","),
            name="trigger-service-system",
            user_credentials=settings.system_creds,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            connect_timeout=5,
            reconnected_cb=reconnected,
            error_cb=failed,
            disconnected_cb=disconnected,
        )
        self = cls(nc, signer)
        try:
            await self.discover()
            key = jwt.public_key(signer)
            if key not in self.trusted:
                raise StartupError(
                    f"TRIGGER_OPERATOR_SEED: key {key} is not a key of the operator the NATS servers trust"
                )
        except BaseException:
            await nc.close()
            raise
        return self

    async def discover(self) -> None:
        """Ask every server for its trusted operators, and count the servers that answer."""
        replies = await self._gather(VARZ, b"", expected=None)
        if not replies:
            raise StartupError(
                "TRIGGER_SYSTEM_CREDS: no server answered on the system account "
                "(are these the system account's credentials, and is the server in operator mode?)"
            )
        trusted: set[str] = set()
        for reply in replies:
            for operator in (reply.get("data") or {}).get("trusted_operators_claim") or []:
                trusted.add(operator["sub"])
                trusted.update(operator.get("nats", {}).get("signing_keys") or [])
                self.system_account = operator.get("nats", {}).get("system_account", "")
        self.trusted = frozenset(trusted)
        self.servers = len(replies)

    def sign(self, claims: dict[str, Any]) -> str:
        """An account JWT of `claims`, signed with the operator's signing key."""
        return jwt.encode(claims, self.signer)

    async def knows(self, account: str) -> bool:
        """True when the servers hold a JWT for `account` (their account list, asked again on a miss)."""
        if account in self._accounts:
            return True
        replies = await self._gather(CLAIMS_LIST, b"", expected=self.servers)
        if not replies:
            raise Unavailable("NATS did not answer the account list")
        known: set[str] = set()
        for reply in replies:
            known.update(reply.get("data") or [])
        self._accounts = frozenset(known)
        return account in self._accounts

    async def lookup(self, account: str) -> str | None:
        """The account's current JWT as the servers hold it; None when they know no such account."""
        try:
            msg = await self.nc.request(CLAIMS_LOOKUP.format(account), b"", timeout=LOOKUP_WAIT)
            return msg.data.decode() or None
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
            pass
        # A server with the full resolver does not answer for an account it does not know:
        # silence means "no such account" only when the servers answer otherwise.
        try:
            await self.nc.request(PING, b"", timeout=self.window)
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
            raise Unavailable("NATS did not answer the account lookup") from None
        return None

    async def push(self, token: str) -> None:
        """Push an account JWT to every server; return once all that answered applied it.

        Raises before sending anything when the JWT is not signed by a trusted operator key:
        nats-server answers such a push with success and ignores it.
        """
        try:
            claims = jwt.verify(token, self.trusted)
        except jwt.JwtError as exc:
            _log.error("refused to push an account JWT", reason=str(exc))
            raise Internal("refused to push an account JWT the trusted operator did not sign") from None
        account = claims.get("sub")
        for _ in range(PUSH_ATTEMPTS):
            members = len(await self.members()) or 1  # the cluster as it is now, not as it was
            replies = await self._gather(CLAIMS_UPDATE, token.encode(), expected=members)
            errors = [r["error"] for r in replies if r.get("error")]
            if errors:
                _log.error("NATS refused an account JWT", account=account, errors=errors)
                raise _refusal(errors[0])
            if len(replies) < members:
                _log.warning(
                    "fewer servers acknowledged an account JWT than are up; pushing again",
                    account=account,
                    up=members,
                    acknowledged=len(replies),
                )
                continue
            if await self._held_everywhere(str(account), claims, members):
                self.servers = members
                self.last_push = time.monotonic()
                return
            _log.info(
                "a server holds an older JWT than the one it acknowledged; pushing again", account=account
            )
        raise Unavailable(f"not every NATS server acknowledged the update of account {account}")

    async def _held_everywhere(self, account: str, claims: dict[str, Any], members: int) -> bool:
        """True when every server up holds this JWT or a newer one.

        A server keeps the newer of two JWTs, but checks and writes without holding a lock: two
        pushes of one account arriving together (two replicas' changes) can leave the older one
        stored, a deleted pair back in service. Asking every server closes that window.
        """
        held = await self._gather(CLAIMS_LOOKUP.format(account), b"", expected=members, decode=_claims_of)
        if len(held) < members:
            return False
        iat = int(claims.get("iat", 0))
        return all(h.get("jti") == claims.get("jti") or int(h.get("iat", 0)) > iat for h in held)

    async def members(self) -> dict[str, str]:
        """The servers up now, id -> name (the first answer says how many servers are active)."""
        replies = await self._gather(PING, b"", expected=_active_servers, window=MEMBERS_WINDOW)
        return {
            str(r["server"]["id"]): str(r["server"].get("name", ""))
            for r in replies
            if isinstance(r.get("server"), dict) and "id" in r["server"]
        }

    async def _gather(
        self,
        subject: str,
        data: bytes,
        expected: int | Callable[[dict[str, Any]], int] | None,
        window: float | None = None,
        decode: Callable[[bytes], dict[str, Any]] = json.loads,
    ) -> list[dict[str, Any]]:
        """Replies to one request from every server: until `expected` came (a number, or one the
        first reply tells), or the window closed."""
        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox)
        replies: list[dict[str, Any]] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.window if window is None else window)
        count = expected if isinstance(expected, int) else None
        sizer = expected if callable(expected) else _cluster_size
        try:
            await self.nc.publish(subject, data, reply=inbox)
            while count is None or len(replies) < count:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    msg = await sub.next_msg(timeout=remaining)
                except nats.errors.TimeoutError:
                    break
                try:
                    replies.append(decode(msg.data))
                except ValueError:
                    replies.append({"error": {"description": "reply is not JSON"}})
                if count is None:  # the first reply says how many servers to expect
                    count = sizer(replies[0])
        finally:
            await sub.unsubscribe()
        return replies

    async def close(self) -> None:
        """Close the system-account connection."""
        await self.nc.close()


def _claims_of(data: bytes) -> dict[str, Any]:
    """The claims of a looked-up JWT; no claims for an empty answer (an unknown account)."""
    try:
        return jwt.decode(data.decode()) if data else {}
    except (jwt.JwtError, UnicodeDecodeError):
        raise ValueError("not a JWT") from None


def _active_servers(ping_reply: dict[str, Any]) -> int:
    return int((ping_reply.get("statsz") or {}).get("active_servers") or 1)


def _cluster_size(varz_reply: dict[str, Any]) -> int:
    data = varz_reply.get("data") or {}
    meta = (data.get("jetstream") or {}).get("meta") or {}
    if meta.get("cluster_size"):
        return int(meta["cluster_size"])
    routes = (data.get("cluster") or {}).get("urls") or []
    return 1 + len(routes)


def _refusal(error: dict[str, Any]) -> ApiError:
    description = str(error.get("description", ""))
    if "validation" in description:
        return BadRequest(f"NATS refused the account update: {description.split(': ', 1)[-1]}")
    return Internal("NATS refused the account update")
