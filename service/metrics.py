"""Prometheus metrics of the service and of the sidecar, one registry per instance.

Each `running(...)` (service or sidecar) has registries of its own, so that several replicas in
one process (the tests) never mix their numbers. Labels are bounded by what is stored, never by
what a caller sends: an operation name, a status code or class, and for per-trigger series the
trigger's account and name (its key in the bucket). A deleted trigger's series are removed.

Values that are cheaper to read than to keep up to date (routes live, a follower's lag) are
computed when scraped: `Metrics.render` first awaits every refresh registered with `on_scrape`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from typing import Any

import msgspec
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import Metric

from schemas.triggers import ErrorReply
from service import log
from service.errors import ApiError
from service.store import split_key

Refresh = Callable[[], Awaitable[None]]

# Seconds: from a fast KV read to a slow forward at a gateway route's longest timeout.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TRIGGER_LABELS = ("account", "trigger")
REFRESH_TIMEOUT = 2.0  # seconds a scrape waits for the values read at scrape time
_log = log.get("metrics")
_encode = msgspec.json.Encoder().encode


def trigger_labels(key: str) -> tuple[str, str]:
    """(account, trigger name) of a bucket key `<account>.<type>.<name>`."""
    account, _, name = split_key(key)
    return account, name


class Metrics:
    """A registry and what is refreshed before each scrape of it."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._refreshes: list[Refresh] = []
        self._series: dict[object, Any] = {}  # (name, status) -> its counter; name -> its histogram
        self.routes_live = Gauge(
            "trigger_routes_live",
            "Routes this replica carries or serves now, by kind",
            ["kind"],
            registry=self.registry,
        )
        self.follower_lag = Gauge(
            "trigger_follower_lag_sequences",
            "Stream sequences between the newest change of the followed keys in the bucket and the newest "
            "one this replica applied (0: caught up)",
            ["keys"],
            registry=self.registry,
        )

    def _answered(
        self, requests: Counter, duration: Histogram, name: str, status: int, seconds: float
    ) -> None:
        """Count one request answered under `name` (an operation, a route template: never a path, so
        the series stay few) with its status and time. The series are resolved once each: a
        labels() lookup per request cost as much as counting."""
        counter = self._series.get((name, status))
        if counter is None:
            counter = self._series[(name, status)] = requests.labels(name, str(status))
        counter.inc()
        timer = self._series.get(name)
        if timer is None:
            timer = self._series[name] = duration.labels(name)
        timer.observe(seconds)

    def live_routes(self, kind: str, count: Callable[[], float]) -> None:
        """Report `count()` as the routes of `kind` this replica carries, read at each scrape."""
        self.routes_live.labels(kind).set_function(count)

    def follow_lag(
        self, keys: str, position: Callable[[], int], newest: Callable[[], Awaitable[int]]
    ) -> None:
        """Keep the lag of a follower of `keys` (its `position()` behind `newest()`), read at each scrape."""
        child = self.follower_lag.labels(keys)

        async def refresh() -> None:
            child.set(max(0, await newest() - position()))

        self.on_scrape(refresh)

    def on_scrape(self, refresh: Refresh) -> None:
        """Await `refresh` before each scrape (bounded by REFRESH_TIMEOUT; a failure keeps the old value)."""
        self._refreshes.append(refresh)

    async def render(self, account: str | None = None) -> bytes:
        """The registry in the Prometheus text format; with `account`, only that account's
        per-trigger series (and every series that names no account)."""
        if self._refreshes:
            results = await asyncio.gather(
                *(asyncio.wait_for(refresh(), REFRESH_TIMEOUT) for refresh in self._refreshes),
                return_exceptions=True,
            )
            for result in results:
                if isinstance(result, BaseException):
                    _log.info("a metric was not refreshed for this scrape", error=str(result) or repr(result))
        if account is None:
            return generate_latest(self.registry)
        return generate_latest(_OneAccount(self.registry, account))


class _OneAccount:
    """A view of a registry holding one account's series only."""

    def __init__(self, registry: CollectorRegistry, account: str) -> None:
        self._registry, self._account = registry, account

    def collect(self) -> Iterator[Metric]:
        for family in self._registry.collect():
            family.samples = [
                s for s in family.samples if s.labels.get("account", self._account) == self._account
            ]
            yield family


class ServiceMetrics(Metrics):
    """The Trigger Service's metrics: the API, the stream routes, the durable routes, the followers."""

    def __init__(self) -> None:
        super().__init__()
        r = self.registry
        self.api_requests = Counter(
            "trigger_api_requests",
            "API requests answered, by operation and status code",
            ["operation", "status"],
            registry=r,
        )
        self.api_duration = Histogram(
            "trigger_api_request_duration_seconds",
            "Time to answer an API request, by operation",
            ["operation"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        # Read at scrape time from a plain count: a gauge's locked inc and dec were 2 us a request.
        self.api_in_flight = 0
        Gauge("trigger_api_requests_in_flight", "API requests being served now", registry=r).set_function(
            lambda: self.api_in_flight
        )
        self.stream_messages = Counter(
            "trigger_stream_messages", "Messages a stream trigger's route carried", TRIGGER_LABELS, registry=r
        )
        self.stream_bytes = Counter(
            "trigger_stream_bytes",
            "Payload bytes a stream trigger's route carried",
            TRIGGER_LABELS,
            registry=r,
        )
        self.stream_failures = Counter(
            "trigger_stream_carry_failures",
            "Messages a stream trigger's route failed to carry",
            TRIGGER_LABELS,
            registry=r,
        )
        self.durable_delivered = Counter(
            "trigger_durable_delivered",
            "Messages a durable trigger delivered (confirmed)",
            TRIGGER_LABELS,
            registry=r,
        )
        self.durable_redelivered = Counter(
            "trigger_durable_redelivered", "Deliveries a durable trigger retried", TRIGGER_LABELS, registry=r
        )
        self.durable_dead_lettered = Counter(
            "trigger_durable_dead_lettered",
            "Messages a durable trigger sent to its dead-letter subject",
            TRIGGER_LABELS,
            registry=r,
        )
        self.durable_pending = Gauge(
            "trigger_durable_pending",
            "Messages captured by a durable trigger and not yet delivered",
            TRIGGER_LABELS,
            registry=r,
        )
        self._per_trigger = (
            self.stream_messages,
            self.stream_bytes,
            self.stream_failures,
            self.durable_delivered,
            self.durable_redelivered,
            self.durable_dead_lettered,
            self.durable_pending,
        )

    def api_answered(self, operation: str, status: int, seconds: float) -> None:
        """Count one answered API request of an operation."""
        self._answered(self.api_requests, self.api_duration, operation, status, seconds)

    def stream_route(self, key: str) -> StreamRouteMetrics:
        """The counters of the stream trigger at `key`, resolved once for the carrying hot path."""
        labels = trigger_labels(key)
        return StreamRouteMetrics(
            self.stream_messages.labels(*labels),
            self.stream_bytes.labels(*labels),
            self.stream_failures.labels(*labels),
        )

    def durable_route(self, key: str) -> DurableRouteMetrics:
        """The counters of the durable trigger at `key` (for service/durable.py)."""
        labels = trigger_labels(key)
        return DurableRouteMetrics(
            self.durable_delivered.labels(*labels),
            self.durable_redelivered.labels(*labels),
            self.durable_dead_lettered.labels(*labels),
            self.durable_pending.labels(*labels),
        )

    def forget(self, key: str) -> None:
        """Remove every series of the trigger at `key` (it was deleted)."""
        _remove(self._per_trigger, trigger_labels(key))


class StreamRouteMetrics:
    """One stream trigger's counters."""

    __slots__ = ("bytes", "failures", "messages")

    def __init__(self, messages: Counter, bytes_: Counter, failures: Counter) -> None:
        self.messages, self.bytes, self.failures = messages, bytes_, failures


class DurableRouteMetrics:
    """One durable trigger's counters: call `delivered.inc()`, `redelivered.inc()`,
    `dead_lettered.inc()` as they happen, and `pending.set(n)`."""

    __slots__ = ("dead_lettered", "delivered", "pending", "redelivered")

    def __init__(
        self, delivered: Counter, redelivered: Counter, dead_lettered: Counter, pending: Gauge
    ) -> None:
        self.delivered, self.redelivered = delivered, redelivered
        self.dead_lettered, self.pending = dead_lettered, pending


class SidecarMetrics(Metrics):
    """The HTTP sidecar's metrics: its HTTP requests, the gateway routes, its follower."""

    def __init__(self) -> None:
        super().__init__()
        r = self.registry
        self.http_requests = Counter(
            "trigger_http_requests",
            "HTTP requests answered by the sidecar, by route template and status",
            ["route", "status"],
            registry=r,
        )
        self.http_duration = Histogram(
            "trigger_http_request_duration_seconds",
            "Time to answer an HTTP request, by route template",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.http_in_flight = 0  # read at scrape time (as the service's api_in_flight)
        Gauge("trigger_http_requests_in_flight", "HTTP requests being served now", registry=r).set_function(
            lambda: self.http_in_flight
        )
        self.gateway_requests = Counter(
            "trigger_gateway_requests",
            "Requests on a gateway trigger's route, by status class (2xx ... 5xx)",
            [*TRIGGER_LABELS, "code"],
            registry=r,
        )
        self.gateway_rate_limited = Counter(
            "trigger_gateway_rate_limited",
            "Requests a gateway trigger refused with 429 (rate limit)",
            TRIGGER_LABELS,
            registry=r,
        )
        self.gateway_timeouts = Counter(
            "trigger_gateway_timeouts",
            "Requests a gateway trigger answered 504 (no reply in time)",
            TRIGGER_LABELS,
            registry=r,
        )
        self.gateway_no_responders = Counter(
            "trigger_gateway_no_responders",
            "Requests a gateway trigger answered 503 (no responder)",
            TRIGGER_LABELS,
            registry=r,
        )
        self.gateway_duration = Histogram(
            "trigger_gateway_request_duration_seconds",
            "Time to answer a request on a gateway trigger's route",
            TRIGGER_LABELS,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

    def http_answered(self, route: str, status: int, seconds: float) -> None:
        """Count one answered HTTP request of a route template."""
        self._answered(self.http_requests, self.http_duration, route, status, seconds)

    def gateway_route(self, key: str) -> GatewayRouteMetrics:
        """The counters of the gateway trigger at `key`, resolved once per stored revision."""
        labels = trigger_labels(key)
        return GatewayRouteMetrics(
            {code: self.gateway_requests.labels(*labels, code) for code in _CLASSES},
            self.gateway_rate_limited.labels(*labels),
            self.gateway_timeouts.labels(*labels),
            self.gateway_no_responders.labels(*labels),
            self.gateway_duration.labels(*labels),
        )

    def forget(self, key: str) -> None:
        """Remove every series of the gateway trigger at `key` (it was deleted)."""
        labels = trigger_labels(key)
        for code in _CLASSES:
            with contextlib.suppress(KeyError):
                self.gateway_requests.remove(*labels, code)
        _remove(
            (
                self.gateway_rate_limited,
                self.gateway_timeouts,
                self.gateway_no_responders,
                self.gateway_duration,
            ),
            labels,
        )


_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")


class GatewayRouteMetrics:
    """One gateway trigger's counters."""

    __slots__ = ("duration", "no_responders", "rate_limited", "requests", "timeouts")

    def __init__(
        self,
        requests: dict[str, Counter],
        rate_limited: Counter,
        timeouts: Counter,
        no_responders: Counter,
        duration: Histogram,
    ) -> None:
        self.requests, self.rate_limited, self.timeouts = requests, rate_limited, timeouts
        self.no_responders, self.duration = no_responders, duration

    def answered(self, status: int, seconds: float) -> None:
        """Count one answered request (its status class, its time)."""
        self.requests[_CLASSES[min(max(status // 100, 1), 5) - 1]].inc()
        self.duration.observe(seconds)


def _remove(families: Iterable[Counter | Gauge | Histogram], labels: tuple[str, ...]) -> None:
    for family in families:
        with contextlib.suppress(KeyError):
            family.remove(*labels)


def handler(
    metrics: Metrics, account_of: Callable[[Mapping[str, str]], str] | None = None
) -> Callable[[web.Request], Awaitable[web.Response]]:
    """An aiohttp handler serving `metrics`; with `account_of` (which raises an ApiError for a
    caller it refuses), only the series of the caller's account."""

    async def serve(request: web.Request) -> web.Response:
        account = None
        if account_of is not None:
            try:
                account = account_of(request.headers)
            except ApiError as error:
                body = _encode(ErrorReply(error=error.message, status_code=error.status))
                challenge = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
                return web.Response(
                    body=body, status=error.status, content_type="application/json", headers=challenge
                )
        text = await metrics.render(account)
        return web.Response(body=text, headers={"Content-Type": CONTENT_TYPE_LATEST})

    return serve


@contextlib.asynccontextmanager
async def listening(metrics: Metrics, addr: str) -> AsyncIterator[int]:
    """A private HTTP listener serving `GET /metrics` on `addr` (`host:port`, port 0: a free one);
    yields the bound port."""
    app = web.Application()
    app.router.add_get("/metrics", handler(metrics))
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    try:
        host, port = addr.rsplit(":", 1)
        site = web.TCPSite(runner, host or None, int(port))
        await site.start()
        bound = runner.addresses[0][1]
        _log.info("metrics listening", addr=f"{host or '0.0.0.0'}:{bound}")
        yield int(bound)
    finally:
        await runner.cleanup()
