"""The console's data: the caller's triggers with their recent traffic, and one trigger's record,
history and live counters, as JSON envelopes under `/console/api/`.

Records and history are read over NATS as the caller (the caller's token travels with each
request), so the service scopes them to the caller's account exactly as the API does. What the
sidecar adds is its own: each gateway route's recent status mix (`RouteTraffic`) and, when the
sidecar has metrics, every sample labelled with the trigger's subject and the caller's account.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable, Sequence
from typing import Annotated, Any, Literal, Protocol

import aiohttp
import msgspec
import nats.errors
from aiohttp import web
from msgspec import Meta
from multidict import MultiMapping
from nats.aio.client import Client
from prometheus_client.parser import text_string_to_metric_families

from service.auth import Authenticator
from service.config import Settings
from service.errors import ApiError, BadRequest, GatewayTimeout, Internal, Unavailable, invalid
from service.gateway.api import JSON, REQUEST_ID, ExpectHandler, Handler, error_response, not_connected
from service.gateway.forward import GatewayRoutes, Route
from service.gateway.pages import not_read
from service.gateway.traffic import RecentTraffic, RouteTraffic
from service.routing import REQUEST_ID_HEADER

TRIGGERS_PATH = "/console/api/triggers"
HISTORY_LIMIT = 64  # revisions shown: the most one history page holds
# A path parameter that is one trigger type or name (the names' own rule; types fit it too).
_PARAM = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
# The metric families of each trigger type, by name (service/metrics.py), labelled `account` and
# `trigger` (the name).
SCRAPE_TIMEOUT = 1.0  # seconds a service replica's metrics listener may take for the console
_FAMILIES = {"gateway": ("trigger_gateway_",), "stream": ("trigger_stream_", "trigger_durable_")}
_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


class _Sample(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def labels(self) -> dict[str, str]: ...
    @property
    def value(self) -> float: ...


class _Family(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def samples(self) -> Sequence[_Sample]: ...


class MetricsSource(Protocol):
    """What the console reads metrics from: a `prometheus_client.CollectorRegistry`, say."""

    def collect(self) -> Iterable[_Family]:
        """Every metric family, with its samples."""
        ...


class ConsoleQuery(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Query of `GET /console/api/triggers`: the list's own parameters, and two filters of the console's."""

    subject_pattern: str | None = None  # the service checks it; absent: every trigger
    type: Literal["gateway", "stream", "subject"] | None = None
    collection: Annotated[str, Meta(min_length=1, max_length=256)] | None = None
    enabled: bool | None = None
    limit: Annotated[int, Meta(ge=1, le=1000)] = 100
    cursor: str | None = None


class Sample(msgspec.Struct):
    """One metric sample of a trigger."""

    name: str
    labels: dict[str, str]
    value: float


class Row(msgspec.Struct):
    """One trigger of the table: its record, and its route's recent traffic (gateway triggers)."""

    record: Any
    traffic: RecentTraffic | None


class TriggersBody(msgspec.Struct, omit_defaults=True):
    results: list[Row]
    subject_pattern: str  # the pattern the service was asked
    next_cursor: str | None = None


class TriggerBody(msgspec.Struct):
    record: Any
    history: Any
    traffic: RecentTraffic | None
    metrics: list[Sample]


class _Reply(msgspec.Struct):
    body: Any
    status_code: int = 200


class _Refused(Exception):
    """The service answered with an error envelope: it goes to the caller unchanged."""

    def __init__(self, status: int, data: bytes) -> None:
        super().__init__(status)
        self.status = status
        self.data = data


class Console:
    """`/console/api/`: the console page's data, for the caller's own triggers only."""

    def __init__(
        self, settings: Settings, nc: Client, traffic: RouteTraffic, metrics: MetricsSource | None = None
    ) -> None:
        self._settings = settings
        self._nc = nc
        self._auth = Authenticator(settings)
        self.traffic = traffic
        self._metrics = metrics

    def add_routes(self, router: web.UrlDispatcher, expect_handler: ExpectHandler | None = None) -> None:
        """Register the data endpoints (GET and HEAD; another method answers 405)."""
        for path, handler in (
            (TRIGGERS_PATH, self.triggers),
            (TRIGGERS_PATH + "/{type:[^/]+}/{name:[^/]+}", self.trigger),
        ):
            resource = router.add_resource(path)
            for method in ("GET", "HEAD"):
                resource.add_route(method, handler, expect_handler=expect_handler)
            resource.add_route("*", not_read, expect_handler=expect_handler)

    def observed(self, routes: GatewayRoutes) -> Handler:
        """`routes.handle`, counting each answer of a live route in `traffic`."""

        async def handle(request: web.Request) -> web.StreamResponse:
            route = routes.route_for(request.method, request.rel_url.raw_path)
            if route is None:
                return await routes.handle(request)  # its 404 or 405
            return await self.serve(routes, request, route)

        return handle

    async def serve(self, routes: GatewayRoutes, request: web.Request, route: Route) -> web.StreamResponse:
        """`routes.serve`, counting the answer in `traffic`."""
        response = await routes.serve(request, route)
        self.traffic.record(route.subject, response.status)
        return response

    async def triggers(self, request: web.Request) -> web.Response:
        """The caller's triggers that match the query, one page of the service's list."""
        try:
            self._auth.authenticate(request.headers, write=False)  # 401 before the 400
            query = _query(request.query)
            prefix = self._settings.prefix
            pattern = _narrowed(query.subject_pattern or f"{prefix}.>", prefix, query.type)
            ask: dict[str, Any] = {"subject_pattern": pattern, "limit": query.limit}
            if query.cursor is not None:
                ask["cursor"] = query.cursor
            if query.enabled is not None:
                ask["enabled"] = query.enabled
            body = await self._ask(f"{prefix}.list", _encode(ask), request)
        except ApiError as error:
            return error_response(error)
        except _Refused as refused:
            return _passed_on(refused)
        rows = [
            Row(record, self._recent(record))
            for record in body.get("results") or ()
            if (query.type is None or record.get("trigger_type") == query.type)
            and (query.collection is None or record.get("collection") == query.collection)
        ]
        reply = TriggersBody(results=rows, subject_pattern=pattern, next_cursor=body.get("next_cursor"))
        return web.Response(body=_encode(_Reply(reply)), content_type=JSON)

    async def trigger(self, request: web.Request) -> web.Response:
        """One of the caller's triggers: its record, its history and its live counters."""
        try:
            account = self._auth.authenticate(request.headers, write=False).account
            trigger_type, name = (_param(key, request.match_info[key]) for key in ("type", "name"))
            prefix = self._settings.prefix
            record = await self._ask(f"{prefix}.get.{trigger_type}.{name}", b"", request)
            history = await self._ask(
                f"{prefix}.history.{trigger_type}.{name}", _encode({"limit": HISTORY_LIMIT}), request
            )
        except ApiError as error:
            return error_response(error)
        except _Refused as refused:
            return _passed_on(refused)
        body = TriggerBody(record, history, self._recent(record), await self._samples(record, account))
        return web.Response(body=_encode(_Reply(body)), content_type=JSON)

    def _recent(self, record: Any) -> RecentTraffic | None:
        subject = record.get("gateway_mapping_subject") if record.get("trigger_type") == "gateway" else None
        return self.traffic.recent(subject) if isinstance(subject, str) else None

    async def _samples(self, record: Any, account: str) -> list[Sample]:
        """This trigger's metric samples: its type's families, labelled with its account and name
        (histogram buckets left out: count and sum say enough here), from the sidecar's own
        registry and, summed, from the service replicas' listeners (TRIGGER_SERVICE_METRICS)."""
        families = _FAMILIES.get(record.get("trigger_type"), ())
        labels = {"account": account, "trigger": record.get("name")}
        sources: list[Iterable[_Family]] = [self._metrics.collect()] if self._metrics is not None else []
        sources += await self._scrape_services()
        totals: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for source in sources:
            for family in source:
                if not family.name.startswith(families):
                    continue
                for sample in family.samples:
                    if sample.name.endswith(("_bucket", "_created")):
                        continue
                    if all(sample.labels.get(k) == v for k, v in labels.items()):
                        key = (sample.name, tuple(sorted(sample.labels.items())))
                        totals[key] = totals.get(key, 0.0) + sample.value
        return [Sample(name, dict(pairs), value) for (name, pairs), value in totals.items()]

    async def _scrape_services(self) -> list[Iterable[_Family]]:
        """The metric families of every service replica's listener that answers within a second
        (a replica down or slow leaves its counts out; the page says nothing more than it knows)."""
        addrs = self._settings.service_metrics_addrs
        if not addrs:
            return []

        async def scrape(session: aiohttp.ClientSession, addr: str) -> Iterable[_Family]:
            async with session.get(f"http://{addr}/metrics") as response:
                response.raise_for_status()
                return list(text_string_to_metric_families(await response.text()))

        timeout = aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            results = await asyncio.gather(*(scrape(session, a) for a in addrs), return_exceptions=True)
        return [r for r in results if not isinstance(r, BaseException)]

    async def _ask(self, subject: str, payload: bytes, request: web.Request) -> Any:
        """The body of the service's reply to a request made as the caller."""
        headers = {REQUEST_ID_HEADER: request[REQUEST_ID]}
        if authorization := request.headers.get("Authorization"):
            headers["Authorization"] = authorization
        if down := not_connected(self._nc):
            raise down
        timeout = self._settings.request_timeout
        try:
            reply = await self._nc.request(subject, payload, timeout=timeout, headers=headers)
        except nats.errors.NoRespondersError:
            raise Unavailable("no Trigger Service instance is running") from None
        except nats.errors.TimeoutError:
            raise GatewayTimeout(f"the Trigger Service did not answer within {timeout:g} s") from None
        except nats.errors.Error:
            raise Unavailable("not connected to NATS") from None
        try:
            envelope = _decode(reply.data)
            status = envelope["status_code"]
        except (msgspec.DecodeError, TypeError, KeyError):
            status = None
        if not isinstance(status, int) or not 100 <= status <= 599:
            raise Internal("the Trigger Service sent a reply that is not an envelope")
        if status >= 300:
            raise _Refused(status, reply.data)
        return envelope.get("body") or {}


def _query(params: MultiMapping[str]) -> ConsoleQuery:
    """The query, or a 400 that names the parameter and the rule (a repeated one is not a string)."""
    raw: dict[str, str | list[str]] = {}
    for key in params:
        values = params.getall(key)
        raw[key] = values[0] if len(values) == 1 else values
    try:
        return msgspec.convert(raw, ConsoleQuery, strict=False)
    except msgspec.ValidationError as exc:
        raise invalid(exc) from None


def _param(name: str, value: str) -> str:
    """A path parameter that is one trigger type or name, else a 400 before anything is sent."""
    if not _PARAM.fullmatch(value):
        raise BadRequest(
            f"path parameter `{name}` must be 1-128 characters of A-Z a-z 0-9 _ -, starting with a "
            "letter or digit"
        )
    return value


def _narrowed(pattern: str, prefix: str, trigger_type: str | None) -> str:
    """The pattern, narrowed to one trigger type where its type token is a wildcard, so that the
    service filters the type by key (`ms.trigger.>` and `stream`: `ms.trigger.stream.>`)."""
    if trigger_type is None or not pattern.startswith(prefix + "."):
        return pattern
    tokens = pattern[len(prefix) + 1 :].split(".")
    if tokens in (["*"], [">"]):  # `<prefix>.*` means every trigger, as the list reads it
        return f"{prefix}.{trigger_type}.>"
    if tokens[0] == "*":
        return ".".join((prefix, trigger_type, *tokens[1:]))
    return pattern


def _passed_on(refused: _Refused) -> web.Response:
    return web.Response(body=refused.data, status=refused.status, content_type=JSON)
