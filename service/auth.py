"""Bearer tokens: verify a JWT and turn it into the caller's account and rights."""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeGuard

import jwt
import msgspec

from schemas.triggers import ACCOUNT_PATTERN, PATTERN_RULES
from service.config import Settings
from service.errors import Unauthorized

DEFAULT_ACCOUNT = "default"
_ACCOUNT = re.compile(ACCOUNT_PATTERN)  # whole-string: always `fullmatch`
_ACCOUNT_RULE = PATTERN_RULES[ACCOUNT_PATTERN]
_NUMERIC_DATES = ("exp", "nbf", "iat")  # RFC 7519 NumericDate claims: JSON numbers
_ASYMMETRIC = ["EdDSA", "ES256", "RS256"]
READ, WRITE = "triggers:read", "triggers:write"


class Caller(msgspec.Struct, frozen=True):
    """Who is calling: the account every record is scoped to, and what the token allows."""

    account: str
    scopes: frozenset[str] | None = None  # None: no `scope` claim, so read and write
    accounts: frozenset[str] = frozenset()

    def can(self, write: bool) -> bool:
        """True when the token's scope allows this kind of operation."""
        if self.scopes is None:
            return True
        return WRITE in self.scopes if write else bool(self.scopes & {READ, WRITE})

    def may_target(self, account: str) -> bool:
        """True when the caller may route data into `account`."""
        return account == self.account or account in self.accounts


class Authenticator:
    """Verifies `Authorization: Bearer <jwt>` with the configured key."""

    def __init__(self, settings: Settings) -> None:
        self.enabled = settings.auth == "jwt"
        self._required = ["account"] if settings.jwt_allow_no_exp else ["account", "exp"]
        self._key: Any
        if settings.jwt_public_key:
            self._key = Path(settings.jwt_public_key).read_text()
            self._algorithms = _ASYMMETRIC
        else:
            self._key = settings.jwt_secret or ""
            self._algorithms = ["HS256"]

    def authenticate(self, headers: Mapping[str, str] | None, *, write: bool) -> Caller:
        """Return the caller for these headers, or raise Unauthorized."""
        if not self.enabled:
            return Caller(DEFAULT_ACCOUNT)
        caller = self.verify(bearer_token(headers))
        if not caller.can(write):
            needed = WRITE if write else f"{READ} or {WRITE}"
            raise Unauthorized(f"token scope does not allow this operation (needs {needed})")
        return caller

    def verify(self, token: str | None) -> Caller:
        """Verify a raw token (signature, expiry, claims); raise Unauthorized when it is not valid."""
        if not token:
            raise Unauthorized("missing bearer token (Authorization: Bearer <jwt>)")
        try:
            claims = jwt.decode(
                token, self._key, algorithms=self._algorithms, options={"require": self._required}
            )
        except jwt.ExpiredSignatureError:
            raise Unauthorized("token has expired") from None
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthorized(f"invalid bearer token: no `{exc.claim}` claim") from None
        except jwt.InvalidTokenError:
            raise Unauthorized("invalid bearer token") from None
        for name in _NUMERIC_DATES:
            value = claims.get(name)
            # PyJWT reads `int(value)`, so it takes "9999999999" or true; RFC 7519 says a number.
            if name in claims and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise Unauthorized(
                    f"invalid bearer token: `{name}` must be a JSON number (seconds since the epoch)"
                )
        account = claims.get("account")
        if not _is_account(account):
            raise Unauthorized(f"token `account` claim must be {_ACCOUNT_RULE}")
        scope = claims.get("scope")
        others = claims.get("accounts") or []
        if isinstance(others, str):
            others = others.split()
        if (scope is not None and not isinstance(scope, str)) or not isinstance(others, list):
            raise Unauthorized("token `scope` must be a string and `accounts` a list")
        if not all(_is_account(other) for other in others):
            raise Unauthorized(f"token `accounts` claim must list accounts of {_ACCOUNT_RULE}")
        return Caller(account, frozenset(scope.split()) if scope is not None else None, frozenset(others))


def _is_account(value: object) -> TypeGuard[str]:
    """True for one whole account identifier (a single subject token), nothing before or after it."""
    return isinstance(value, str) and _ACCOUNT.fullmatch(value) is not None


def bearer_token(headers: Mapping[str, str] | None) -> str | None:
    """The raw token of an `Authorization: Bearer` header, if any."""
    value = (headers or {}).get("Authorization") or (headers or {}).get("authorization")
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def mint(secret: str, account: str, *, ttl: int = 86_400, **claims: Any) -> str:
    """Sign an HS256 token (development tokens and tests)."""
    now = int(time.time())
    payload = {"account": account, "iat": now, "exp": now + ttl, **claims}
    return jwt.encode(payload, secret, algorithm="HS256")
