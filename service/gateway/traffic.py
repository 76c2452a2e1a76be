"""The recent status mix of each gateway route, as this sidecar served it: what the console shows.

Counts are kept per route in slots of `SLOT` seconds over the last `WINDOW` seconds, keyed by the
trigger's mapping subject: it is unique to one trigger, so a route deleted and created again by
another account starts from nothing. A route idle for a whole window holds no counts and is
forgotten, so the table stays as small as the routes in use.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

import msgspec

WINDOW = 300.0  # seconds of the recent mix
SLOT = 10.0  # seconds a slot of counts covers
_SLOTS = int(WINDOW // SLOT)


class RecentTraffic(msgspec.Struct, kw_only=True):
    """A route's requests over the last `window_s` seconds, by HTTP status."""

    window_s: float
    statuses: dict[str, int]
    last_request_at: float | None = None  # Unix time of the newest request counted


class _Route:
    __slots__ = ("last", "slots")

    def __init__(self) -> None:
        self.slots: deque[tuple[int, dict[int, int]]] = deque()  # (slot number, status -> count)
        self.last = 0.0  # Unix time


class RouteTraffic:
    """Status counts per gateway route over the last WINDOW seconds."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._routes: dict[str, _Route] = {}
        self._sweep_at = 64  # forget idle routes when the table grows past this

    def record(self, subject: str, status: int) -> None:
        """Count one request that the route of mapping subject `subject` answered with `status`."""
        now = self._clock()
        slot = int(now // SLOT)
        route = self._routes.get(subject)
        if route is None:
            if len(self._routes) >= self._sweep_at:
                self._forget_idle(now)
            route = self._routes[subject] = _Route()
        slots = route.slots
        if not slots or slots[-1][0] != slot:
            slots.append((slot, {}))
            while slots[0][0] <= slot - _SLOTS:
                slots.popleft()
        counts = slots[-1][1]
        counts[status] = counts.get(status, 0) + 1
        route.last = now

    def recent(self, subject: str) -> RecentTraffic:
        """The route's counts over the last WINDOW seconds (none for a route not requested lately)."""
        statuses: dict[str, int] = {}
        route = self._routes.get(subject)
        if route is None:
            return RecentTraffic(window_s=WINDOW, statuses=statuses)
        oldest = int(self._clock() // SLOT) - _SLOTS
        for slot, counts in route.slots:
            if slot > oldest:
                for status, count in counts.items():
                    statuses[str(status)] = statuses.get(str(status), 0) + count
        return RecentTraffic(
            window_s=WINDOW, statuses=dict(sorted(statuses.items())), last_request_at=route.last
        )

    def _forget_idle(self, now: float) -> None:
        for subject in [s for s, route in self._routes.items() if route.last <= now - WINDOW]:
            del self._routes[subject]
        self._sweep_at = max(64, 2 * len(self._routes))
