"""Rate limits of gateway routes: a sliding window per route and per sidecar replica."""

from __future__ import annotations

from collections import deque


class SlidingWindow:
    """At most `limit` accepted events in any `window` seconds.

    A log of the accepted events' times: exact at every instant (a fixed-window counter lets
    twice the limit through around a window boundary), and bounded by `limit` entries.
    """

    __slots__ = ("_limit", "_times", "_window")

    def __init__(self, limit: int, window: float) -> None:
        self._limit = limit
        self._window = window
        self._times: deque[float] = deque()

    def acquire(self, now: float) -> float:
        """Count one event at `now` (monotonic seconds): 0.0 when accepted, else seconds to wait."""
        times = self._times
        horizon = now - self._window
        while times and times[0] <= horizon:
            times.popleft()
        if len(times) < self._limit:
            times.append(now)
            return 0.0
        return times[0] - horizon
