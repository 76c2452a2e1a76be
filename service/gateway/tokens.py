"""Bearer tokens already verified by the sidecar, remembered until they expire.

Checking a token's signature costs more than forwarding the request it came with, and a client
sends the same token with every request, so each token is verified once and its account kept
until its `exp` (never longer than `MAX_AGE`). Only valid tokens are remembered.
"""

from __future__ import annotations

import base64
import binascii
import time

import msgspec

from service.auth import Authenticator

MAX_AGE = 300.0  # seconds; a bound for tokens without `exp`
SIZE = 4096


class _Expiry(msgspec.Struct):
    exp: float | None = None


_decode_expiry = msgspec.json.Decoder(_Expiry).decode


class VerifiedTokens:
    """The account of each valid bearer token, verified once per token."""

    __slots__ = ("_auth", "_known")

    def __init__(self, auth: Authenticator) -> None:
        self._auth = auth
        self._known: dict[str, tuple[str, float]] = {}  # token -> (account, valid until, epoch s)

    def account(self, token: str) -> str:
        """The account of a valid token; raise Unauthorized when it is not valid."""
        now = time.time()
        known = self._known.get(token)
        if known is not None and now < known[1]:
            return known[0]
        account = self._auth.verify(token).account
        until = _expires_at(token)
        if until is not None:
            known_tokens = self._known
            known_tokens.pop(token, None)
            if len(known_tokens) >= SIZE:
                del known_tokens[next(iter(known_tokens))]  # the oldest entry
            known_tokens[token] = (account, min(until, now + MAX_AGE))
        return account


def _expires_at(token: str) -> float | None:
    """The `exp` of a token whose signature was just verified (inf without one); None if unreadable."""
    try:
        payload = token.split(".")[1]
        exp = _decode_expiry(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))).exp
    except (IndexError, binascii.Error, ValueError, msgspec.MsgspecError):
        return None
    return float("inf") if exp is None else exp
