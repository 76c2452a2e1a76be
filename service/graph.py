"""The graph of live stream routes, kept from the bucket's changes: what the loop checks read.

A node is (space, subject): the subject space is the account in accounts mode, and one shared
space in single-account mode. An edge goes the way data flows: S -> D for a `stream` trigger,
D -> S for a `service` trigger (requests go from D to the responders on S).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from schemas.triggers import StreamTrigger
from service import subjects
from service.store import Change, split_key

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


class RouteGraph:
    """Every live stream route; literal tails are indexed, so a check from a literal subject is
    a dictionary lookup plus the wildcard tails, not a scan of every route."""

    def __init__(self, *, single: bool) -> None:
        self._single = single
        self._edges: dict[str, tuple[int, Edge | None]] = {}  # key -> (revision, edge or None=gone)
        # literal tail -> the key of its edge, or the keys when several (a set per tail made a
        # tenth of a stream route's memory, and most tails have one edge)
        self._literal: dict[Node, str | set[str]] = {}
        self._wild: dict[str, Edge] = {}  # key -> edge, for tails with a wildcard

    def observe(self, change: Change) -> None:
        """Take in one change of the bucket's stream triggers (the carrier's follower passes it on)."""
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

    def closes_cycle(self, edge: Edge, before: int | None = None, *, instead_of: str | None = None) -> bool:
        """True when a message carried along `edge` could come back to its tail (through routes
        stored before revision `before` only, when given; without the route at key `instead_of`,
        which `edge` replaces in an update)."""
        tail, head = edge
        pending, seen = [head], set()
        while pending:
            here = pending.pop()
            if here[0] == tail[0] and subjects.overlap(here[1], tail[1]):
                return True
            if here not in seen:
                seen.add(here)
                pending.extend(self._fed_by(here, before, instead_of))
        return False

    def _fed_by(self, node: Node, before: int | None, skip: str | None) -> Iterator[Node]:
        """The heads of the edges whose tail can match `node` (but the edge at key `skip`)."""
        space, subject = node
        if subjects.is_literal(subject):
            keys = self._literal.get(node, ())
            for key in (keys,) if isinstance(keys, str) else keys:
                revision, edge = self._edges[key]
                if edge is not None and key != skip and (before is None or revision < before):
                    yield edge[1]
            edges: Iterable[Edge] = (
                e
                for k, e in self._wild.items()
                if k != skip and (before is None or self._edges[k][0] < before)
            )
        else:  # a wildcard destination: any tail may match it
            edges = (
                e
                for k, (r, e) in self._edges.items()
                if e is not None and k != skip and (before is None or r < before)
            )
        for (tail_space, tail), head in edges:
            if tail_space == space and subjects.overlap(subject, tail):
                yield head

    def _index(self, key: str, edge: Edge) -> None:
        tail = edge[0]
        if subjects.is_literal(tail[1]):
            keys = self._literal.get(tail)
            if keys is None or keys == key:
                self._literal[tail] = key
            elif isinstance(keys, str):
                self._literal[tail] = {keys, key}
            else:
                keys.add(key)
        else:
            self._wild[key] = edge

    def _unindex(self, key: str, edge: Edge) -> None:
        tail = edge[0]
        self._wild.pop(key, None)
        keys = self._literal.get(tail)
        if keys == key:
            del self._literal[tail]
        elif isinstance(keys, set):
            keys.discard(key)
            if len(keys) == 1:
                self._literal[tail] = next(iter(keys))
