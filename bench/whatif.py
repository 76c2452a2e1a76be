"""What-if runs behind bench/RESULTS.md: the service (or sidecar) with a proposed fix patched in.

    BENCH_SERVICE_ARGV=bench/whatif.py WHATIF=literal-index python -m bench create
    BENCH_SIDECAR_ARGV=bench/whatif.py WHATIF_GATEWAY=1 WHATIF=fast-log python -m bench gateway

WHATIF is a comma-separated list of:
- `literal-index`: `RouteGraph` finds the routes fed by a literal subject with one dict lookup
  on the whole subject, not by scanning every route whose tail has the same first token;
- `no-cycle-check`: no loop check at all (the upper bound of the gain above);
- `batch-start`: at start-up the carrier subscribes every live route, then flushes once;
- `fast-log`: structlog renders JSON with msgspec and writes bytes.
This patches the service's internals to measure a fix before anyone writes it: it is an
experiment, not part of `make bench`, and it breaks when those internals change.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator

import msgspec
import structlog
from nats.aio.client import Client

from service import log as service_log
from service import subjects
from service.cli import gateway_main, service_main
from service.graph import Edge, Node, RouteGraph
from service.streams import SubscriptionCarrier

MODES = set(filter(None, os.environ.get("WHATIF", "").split(",")))


def _literal_index() -> None:
    """RouteGraph indexes edges by the first token of their tail; index literal tails by the whole
    subject instead, so a literal node finds its edges with one dict lookup (two literal subjects
    overlap only when equal); tails with wildcards stay indexed by their first token."""
    literal: dict[tuple[str, str], set[str]] = {}

    def index(self: RouteGraph, key: str, edge: Edge) -> None:
        (space, tail), _ = edge
        if subjects.is_literal(tail):
            literal.setdefault((space, tail), set()).add(key)
        else:
            original_index(self, key, edge)

    def unindex(self: RouteGraph, key: str, edge: Edge) -> None:
        (space, tail), _ = edge
        keys = literal.get((space, tail))
        if keys is not None:
            keys.discard(key)
            if not keys:
                del literal[(space, tail)]
        original_unindex(self, key, edge)

    def fed_by(self: RouteGraph, node: Node) -> Iterator[Node]:
        space, subject = node
        if not subjects.is_literal(subject):
            yield from original_fed_by(self, node)  # a wildcard node: the original lookup
            return
        keys = literal.get((space, subject), set())
        edges = [e for k in keys if (e := self._edges[k][1])]
        edges += list(self._wild.values())
        edges += [
            e for k in self._by_token.get((space, subject.split(".", 1)[0]), ()) if (e := self._edges[k][1])
        ]
        for (tail_space, tail), head in edges:
            if tail_space == space and subjects.overlap(subject, tail):
                yield head

    original_index, original_unindex, original_fed_by = (
        RouteGraph._index,
        RouteGraph._unindex,
        RouteGraph._fed_by,
    )
    RouteGraph._index = index  # type: ignore[method-assign]
    RouteGraph._unindex = unindex  # type: ignore[method-assign]
    RouteGraph._fed_by = fed_by  # type: ignore[method-assign]


def _no_cycle_check() -> None:
    RouteGraph.closes_cycle = lambda self, edge: False  # type: ignore[method-assign]


def _batch_start() -> None:
    """At start-up, subscribe every route of the snapshot and flush once, not once per route."""
    starting = False
    original_flush = Client.flush
    original_enter = SubscriptionCarrier.__aenter__

    async def flush(self: Client, timeout: int = 10) -> None:
        if not starting:
            await original_flush(self, timeout)

    async def enter(self: SubscriptionCarrier) -> SubscriptionCarrier:
        nonlocal starting
        starting = True
        try:
            carrier = await original_enter(self)
        finally:
            starting = False
        await self._connected().flush()  # one round trip for the whole snapshot
        return carrier

    Client.flush = flush  # type: ignore[method-assign]
    SubscriptionCarrier.__aenter__ = enter  # type: ignore[method-assign]


def _fast_log() -> None:
    def configure(level: str = "info", fmt: str = "auto") -> None:
        numeric = logging.getLevelName(level.upper())
        structlog.configure(
            processors=[
                structlog.contextvars.merge_contextvars,
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                structlog.processors.format_exc_info,
                structlog.processors.JSONRenderer(serializer=lambda event, **_: msgspec.json.encode(event)),
            ],
            wrapper_class=structlog.make_filtering_bound_logger(numeric),
            logger_factory=structlog.BytesLoggerFactory(file=sys.stderr.buffer),
            cache_logger_on_first_use=True,
        )
        logging.basicConfig(level=max(numeric, logging.WARNING), stream=sys.stderr, format="%(message)s")

    service_log.configure = configure


PATCHES = {
    "literal-index": _literal_index,
    "no-cycle-check": _no_cycle_check,
    "batch-start": _batch_start,
    "fast-log": _fast_log,
}

if __name__ == "__main__":
    for mode in MODES:
        PATCHES[mode]()
    gateway_main() if os.environ.get("WHATIF_GATEWAY") else service_main()
