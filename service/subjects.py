"""NATS subject arithmetic: wildcard mapping, overlap and cycles between routes."""

from __future__ import annotations


def tokens(subject: str) -> list[str]:
    """The dot-separated tokens of a subject."""
    return subject.split(".")


def wildcards(subject: str) -> list[str]:
    """The wildcard tokens of a subject, in order."""
    return [t for t in tokens(subject) if t in ("*", ">")]


def is_literal(subject: str) -> bool:
    """True when the subject has no wildcard token."""
    return ("*" not in subject and ">" not in subject) or not wildcards(subject)


def overlap(a: str, b: str) -> bool:
    """True when some concrete subject matches both patterns."""
    if "*" not in a and ">" not in a and "*" not in b and ">" not in b:
        return a == b  # two literal subjects (the common case: no splitting)
    ta, tb = tokens(a), tokens(b)
    for x, y in zip(ta, tb, strict=False):
        if x == ">" or y == ">":
            return True
        if x != y and x != "*" and y != "*":
            return False
    return len(ta) == len(tb)


# The platform's own subjects: no route may read from them or write into them.
RESERVED = ("$JS.>", "$KV.>", "$O.>", "$SYS.>", "$SRV.>", "_INBOX.>")


def reserved_namespace(subject: str, api_prefix: str) -> str | None:
    """The reserved namespace `subject` falls into or can match (a wildcard can reach into one),
    or None: the JetStream, KV, object store, system and micro APIs, inboxes, the Trigger API, and
    any subject whose first token starts with `$`."""
    # Each of RESERVED is `<token>.>`: overlapped by `>`, or by two tokens or more whose first is
    # that token or `*` (as `overlap` finds, without splitting seven patterns for each check).
    parts = tokens(subject)
    first = parts[0]
    if first == ">" or (first == "*" and len(parts) > 1):
        return RESERVED[0]
    if len(parts) > 1 and (namespace := _RESERVED_BY_FIRST.get(first)) is not None:
        return namespace
    api = f"{api_prefix}.>"
    if overlap(subject, api):
        return api
    if first.startswith("$"):
        return "$…"
    return None


_RESERVED_BY_FIRST = {namespace.removesuffix(".>"): namespace for namespace in RESERVED}


def matches(subject: str, pattern: str) -> bool:
    """True when the concrete `subject` matches `pattern`."""
    ts, tp = tokens(subject), tokens(pattern)
    for i, p in enumerate(tp):
        if p == ">":
            return len(ts) > i
        if i >= len(ts) or (p != "*" and p != ts[i]):
            return False
    return len(ts) == len(tp)


def translate(subject: str, source: str, destination: str) -> str:
    """Map a concrete subject matching `source` onto `destination`, wildcard by wildcard.

    The i-th `*` of the source fills the i-th `*` of the destination; a trailing `>` carries the
    remaining tokens.
    """
    if is_literal(destination):
        return destination
    ts, tsrc = tokens(subject), tokens(source)
    captured: list[str] = []
    rest: list[str] = []
    for i, p in enumerate(tsrc):
        if p == "*":
            captured.append(ts[i])
        elif p == ">":
            rest = ts[i:]
    out: list[str] = []
    it = iter(captured)
    for p in tokens(destination):
        if p == "*":
            out.append(next(it))
        elif p == ">":
            out.extend(rest)
        else:
            out.append(p)
    return ".".join(out)
