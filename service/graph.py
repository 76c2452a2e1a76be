"""The graph of live stream routes, followed from the bucket: what the loop checks read.

A node is (space, subject): the subject space is the account in accounts mode, and one shared
space in single-account mode. An edge goes the way data flows: S -> D for a `stream` trigger,
D -> S for a `service` trigger (requests go from D to the responders on S).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import TracebackType

from schemas.triggers import StreamTrigger
from service import subjects
from service.store import Change, TriggerStore, split_key

Node = tuple[str, str]
Edge = tuple[Node, Node]
SHARED = ""


def edge_of(account: str, trigger: StreamTrigger, single: bool) -> Edge:
    """The edge a trigger of `account` adds, the way data flows."""
    source = trigger.source.subject
    destination = trigger.target.local_subject or trigger.target.subject or source
    here = SHARED if single else account
    there = SHARED if single else (trigger.target.account or account)
    s, d = (here, source), (there, destination)
    return (d, s) if trigger.source.kind == "service" else (s, d)


def _first(subject: str) -> str:
    return subject.split(".", 1)[0]


class RouteGraph:
    """Every live stream route, indexed by the first token of its tail so a check is not a scan."""

    def __init__(self, store: TriggerStore, *, single: bool) -> None:
        self._store = store
        self._single = single
        self._edges: dict[str, tuple[int, Edge | None]] = {}  # key -> (revision, edge or None=gone)
        self._by_token: dict[tuple[str, str], set[str]] = {}  # (space, first token of tail) -> keys
        self._wild: dict[str, Edge] = {}  # edges whose tail starts with a wildcard
        self._following = contextlib.AsyncExitStack()

    async def __aenter__(self) -> RouteGraph:
        """Load every live route, then keep following the bucket."""
        await self._following.enter_async_context(self._store.following("*.stream.*", self._apply_change))
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Stop following the bucket."""
        await self._following.aclose()

    async def _apply_change(self, change: Change) -> None:
        if change.record is None or isinstance(change.record, StreamTrigger):
            self.apply(change.key, change.revision, change.record)

    def apply(self, key: str, revision: int, trigger: StreamTrigger | None) -> None:
        """Record a trigger's state at `revision` (None: no longer live); older news is ignored."""
        known = self._edges.get(key)
        if known is not None and known[0] > revision:
            return
        if known is not None and known[1] is not None:
            self._unindex(key, known[1])
        edge = None
        if trigger is not None:
            edge = edge_of(split_key(key)[0], trigger, self._single)
            self._index(key, edge)
        self._edges[key] = (revision, edge)

    def closes_cycle(self, edge: Edge) -> bool:
        """True when a message carried along `edge` could come back to its tail."""
        tail, head = edge
        pending, seen = [head], set()
        while pending:
            here = pending.pop()
            if here[0] == tail[0] and subjects.overlap(here[1], tail[1]):
                return True
            if here not in seen:
                seen.add(here)
                pending.extend(self._fed_by(here))
        return False

    def _fed_by(self, node: Node) -> Iterator[Node]:
        """The heads of the edges whose tail can match `node`."""
        space, subject = node
        first = _first(subject)
        if first in ("*", ">"):
            edges = [e for _, e in self._edges.values() if e is not None]
        else:
            edges = list(self._wild.values())
            edges += [e for k in self._by_token.get((space, first), ()) if (e := self._edges[k][1])]
        for (tail_space, tail), head in edges:
            if tail_space == space and subjects.overlap(subject, tail):
                yield head

    def _index(self, key: str, edge: Edge) -> None:
        (space, tail), _ = edge
        first = _first(tail)
        if first in ("*", ">"):
            self._wild[key] = edge
        else:
            self._by_token.setdefault((space, first), set()).add(key)

    def _unindex(self, key: str, edge: Edge) -> None:
        (space, tail), _ = edge
        self._wild.pop(key, None)
        bucket = self._by_token.get((space, _first(tail)))
        if bucket is not None:
            bucket.discard(key)
            if not bucket:
                del self._by_token[(space, _first(tail))]
