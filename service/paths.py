"""HTTP paths in one canonical form: the one spelling in which a gateway route is stored, claimed
and looked up, so that no two spellings of one URL can be two routes.

The form is RFC 3986's normalisation (section 6.2.2) with two rules of the gateway's own:
- a percent-escape of an unreserved character (ALPHA DIGIT - . _ ~) is decoded; every other
  escape is kept, in upper-case hex; a `%` that starts no escape has no canonical form;
- a character a path may not hold as it is (non-ASCII, controls, space, `"<>\\^`{|}`) is
  percent-encoded, non-ASCII as UTF-8, so `/x/café` is `/x/caf%C3%A9`;
- `.` and `..` segments are resolved (section 5.2.4) after that decoding, so `%2E%2E` is `..`;
- repeated slashes are one slash (the gateway has no empty segments); a trailing slash is kept
  and significant;
- an encoded slash (`%2F`) has no canonical form: a segment cannot hold a slash, so `/x%2Fy` can
  never alias `/x/y`.

`canonical(canonical(p)) == canonical(p)` for every path that has a form.
"""

from __future__ import annotations

import re

MAX_LENGTH = 2048  # characters of a trigger's path in canonical form (the schema's limit)
# The sidecar's own routes (`service/gateway/api.py`), and the ones the contract keeps for later.
RESERVED = ("/trigger", "/healthz", "/openapi.json", "/docs", "/metrics", "/console")
# Reserved with everything under them: the API, and the docs' and the console's assets and data.
RESERVED_TREES = ("/trigger/", "/docs/", "/console/")

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# What a segment holds as it is (RFC 3986 `pchar` without escapes): unreserved, sub-delims, : and @.
_AS_IS = _UNRESERVED | frozenset(b"!$&'()*+,;=:@")
_HEX = frozenset(b"0123456789ABCDEFabcdef")
_SLASH = 0x2F
_PERCENT = 0x25
# Already canonical: segments of `pchar` without escapes, none empty (but a trailing slash), none
# `.` or `..`. Most paths are, and skip the byte-by-byte walk.
_CANONICAL = re.compile(r"(?:/(?!\.\.?(?:/|\Z))[A-Za-z0-9\-._~!$&'()*+,;=:@]+)*/?")


class PathError(ValueError):
    """A path without a canonical form; the message says why, in words."""


def canonical(path: str) -> str:
    """The canonical form of an absolute HTTP path; PathError when it has none."""
    if path[:1] != "/":
        raise PathError("must start with '/'")
    if _CANONICAL.fullmatch(path):
        return path
    try:
        data = path.encode()
    except UnicodeEncodeError:
        raise PathError("must be valid Unicode text (it holds a lone surrogate)") from None
    segments = data.split(b"/")[1:]
    kept: list[str] = []
    trailing = False  # the result ends with a slash
    for i, raw in enumerate(segments):
        segment = _segment(raw)
        last = i == len(segments) - 1
        if segment in (".", ".."):
            if segment == ".." and kept:
                kept.pop()
            trailing = last
        elif segment:
            kept.append(segment)
            trailing = False
        elif last:  # an empty segment: a repeated slash, or the trailing one
            trailing = True
    if not kept:
        return "/"
    return "/" + "/".join(kept) + ("/" if trailing else "")


def canonical_or_none(path: str) -> str | None:
    """The canonical form of a path, or None when it has none (no route can have that path)."""
    try:
        return canonical(path)
    except PathError:
        return None


def reserved(path: str) -> bool:
    """True for a canonical path the sidecar keeps for itself: every path of RESERVED, and
    everything under `/trigger`, `/docs` and `/console`."""
    return path in RESERVED or path.startswith(RESERVED_TREES)


def trigger_path(path: str) -> str:
    """A gateway trigger's path in canonical form; PathError when it has none, is reserved (in any
    spelling) or is longer than MAX_LENGTH once canonical."""
    form = canonical(path)
    if reserved(form):
        raise PathError(f"is reserved by the gateway (in canonical form it is {form!r})")
    if len(form) > MAX_LENGTH:
        raise PathError(f"is {len(form)} characters in canonical form, over the limit of {MAX_LENGTH}")
    return form


def _segment(raw: bytes) -> str:
    """One segment in canonical form."""
    if _PERCENT not in raw and all(byte in _AS_IS for byte in raw):
        return raw.decode()
    out: list[str] = []
    i, end = 0, len(raw)
    while i < end:
        byte = raw[i]
        if byte == _PERCENT:
            digits = raw[i + 1 : i + 3]
            if len(digits) != 2 or not (digits[0] in _HEX and digits[1] in _HEX):
                raise PathError("has a '%' that starts no percent-escape (a percent sign is written %25)")
            byte = int(digits, 16)
            if byte == _SLASH:
                raise PathError(
                    "holds an encoded slash (%2F): a path segment may not contain a slash; "
                    "separate segments with '/'"
                )
            i += 3
            out.append(chr(byte) if byte in _UNRESERVED else f"%{byte:02X}")
        else:
            i += 1
            out.append(chr(byte) if byte in _AS_IS else f"%{byte:02X}")
    return "".join(out)
