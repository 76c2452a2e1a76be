"""One small error tree: each error carries its status code and the kind of the envelope."""

from __future__ import annotations

import re

import msgspec
from msgspec import inspect

from schemas.triggers import MAX_JSON_DEPTH, PATTERN_RULES


class ApiError(Exception):
    """An error that reaches the caller as `{"error": "<Kind>: <detail>", "status_code": N}`, with
    a `body` as well when it carries one (a create's 409 carries the live trigger)."""

    status: int = 500
    kind: str = "Internal server error"

    def __init__(self, detail: str, body: msgspec.Struct | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.body = body

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


class StaleRevision(Conflict):
    """A compare-and-set on a revision the trigger is no longer at."""


class PreconditionFailed(ApiError):
    status, kind = 412, "Precondition failed"


class PayloadTooLarge(ApiError):
    status, kind = 413, "Payload too large"


class UriTooLong(ApiError):
    status, kind = 414, "URI too long"


class ExpectationFailed(ApiError):
    status, kind = 417, "Expectation failed"


class TooManyRequests(ApiError):
    status, kind = 429, "Too many requests"


class HeaderFieldsTooLarge(ApiError):
    status, kind = 431, "Request header fields too large"


class Internal(ApiError):
    status, kind = 500, "Internal server error"


class MethodNotImplemented(ApiError):
    status, kind = 501, "Not implemented"


class BadGateway(ApiError):
    status, kind = 502, "Bad gateway"


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


# The tokens of JSON text that nesting depends on: strings (so brackets inside them are skipped),
# brackets and commas.
_JSON_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[][{},]')


def too_deep(data: bytes, request: type[msgspec.Struct]) -> BadRequest:
    """The 400 for a body msgspec could not decode for its nesting (RecursionError): it names the
    field that holds the deep value, and the limit."""
    path = _deep_path(data, MAX_JSON_DEPTH)
    return BadRequest(
        f"JSON nested deeper than {MAX_JSON_DEPTH} levels (the limit) - at `{_field_of(path, request)}`"
    )


def _deep_path(data: bytes, limit: int) -> list[str | int]:
    """Keys and indices down to the first array or object of `data` nested deeper than `limit`."""
    path: list[str | int] = []  # per open container: the current key or index
    key_next = False
    for match in _JSON_TOKENS.finditer(data):
        token = match.group()
        if token[:1] == b'"':
            if key_next:
                path[-1] = token[1:-1].decode(errors="replace")
                key_next = False
        elif token in (b"[", b"{"):
            if len(path) == limit:
                break
            path.append(0 if token == b"[" else "")
            key_next = token == b"{"
        elif token in (b"]", b"}"):
            if path:
                path.pop()
            key_next = False
        elif path:  # a comma
            if isinstance(path[-1], int):
                path[-1] += 1
            else:
                key_next = True
    return path


def _field_of(path: list[str | int], request: type[msgspec.Struct]) -> str:
    """The `$.a.b` of the request field `path` leads into: as far as the path follows Struct fields."""
    where, info = "$", inspect.type_info(request)
    for step in path:
        if isinstance(info, inspect.UnionType):  # e.g. `TriggerTarget | None`
            info = next((t for t in info.types if isinstance(t, inspect.StructType)), info)
        if not isinstance(info, inspect.StructType):
            break
        field = next((f for f in info.fields if f.encode_name == step), None)
        if field is None:
            break
        where, info = f"{where}.{step}", field.type
    return where
