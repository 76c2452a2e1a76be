"""One small error tree: each error carries its status code and the kind of the envelope."""

from __future__ import annotations

import re

import msgspec

from schemas.triggers import PATTERN_RULES


class ApiError(Exception):
    """An error that reaches the caller as `{"error": "<Kind>: <detail>", "status_code": N}`."""

    status: int = 500
    kind: str = "Internal server error"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail

    @property
    def message(self) -> str:
        """The envelope's `error` text."""
        return f"{self.kind}: {self.detail}"


class BadRequest(ApiError):
    status, kind = 400, "Invalid request"


class Unauthorized(ApiError):
    status, kind = 401, "Unauthorized"


class NotFound(ApiError):
    status, kind = 404, "Not found"


class MethodNotAllowed(ApiError):
    status, kind = 405, "Method not allowed"


class Conflict(ApiError):
    status, kind = 409, "Conflict"


class PayloadTooLarge(ApiError):
    status, kind = 413, "Payload too large"


class TooManyRequests(ApiError):
    status, kind = 429, "Too many requests"


class Internal(ApiError):
    status, kind = 500, "Internal server error"


class Unavailable(ApiError):
    status, kind = 503, "Service unavailable"


class GatewayTimeout(ApiError):
    status, kind = 504, "Gateway timeout"


_REGEX_RULES = {f"`str` matching regex {pattern!r}": rule for pattern, rule in PATTERN_RULES.items()}
_REGEX = re.compile(r"`str` matching regex '(?:[^'\\]|\\.)*'")


def invalid(exc: msgspec.ValidationError | msgspec.DecodeError) -> BadRequest:
    """Translate a msgspec error into a 400 that names the field and the rule in words."""
    if isinstance(exc, msgspec.ValidationError):
        text = _REGEX.sub(lambda m: _REGEX_RULES.get(m.group(0), m.group(0)), str(exc))
    else:
        text = "body is not valid JSON"
    return BadRequest(text)
