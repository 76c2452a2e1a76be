"""The operation table, and its wiring onto `nats.micro` endpoints.

This is the only place that sees a NATS message: it authenticates, decodes the request into its
Struct, calls the handler, and replies with the envelope. The HTTP sidecar derives its routes
from the same table.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
import typing
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
from nats.aio.client import Client
from nats.micro.request import Request as MicroRequest
from nats.micro.service import EndpointConfig, EndpointStats, Service, ServiceConfig

from schemas import triggers as t
from service import handlers, jetstream, log, replies, tracing
from service.auth import Authenticator, Caller
from service.errors import ApiError, BadRequest, Internal, Unavailable, invalid, too_deep
from service.metrics import ServiceMetrics

SERVICE_NAME = "trigger-service"
REQUEST_ID_HEADER = "X-Request-Id"

_log = log.get("routing")
_request_line = log.hot("routing", "request")
_encode = msgspec.json.Encoder().encode


@dataclass(frozen=True)
class Operation:
    """One operation of the API, over NATS and over HTTP."""

    name: str
    subject: str  # after the prefix; `*` tokens are the path parameters {type} and {name}
    http_method: str
    http_path: str
    write: bool
    request: Any  # a Struct type; for update, the union of one per trigger type (see `bodies`)
    reply: type[msgspec.Struct]
    handler: Callable[[handlers.Context, Caller, Any], Awaitable[msgspec.Struct]]
    summary: str
    success: int = 200
    # A change of one trigger by compare-and-set: `revision`, `Trigger-Revision` or `If-Match`.
    conditional: bool = False
    # The reply carries one record: over HTTP its revision is the `ETag`.
    etag: bool = False

    @property
    def from_subject(self) -> bool:
        """True when the request is only the subject's last two tokens: there is no payload."""
        return self.request is t.TriggerRef

    @property
    def names_trigger(self) -> bool:
        """True when the subject's last two tokens name one trigger (get, update, patch, delete, history)."""
        return self.subject.endswith(".*.*")

    @property
    def bodies(self) -> tuple[type[msgspec.Struct], ...]:
        """The request types the payload may be (update: one per trigger type)."""
        return typing.get_args(self.request) or (self.request,)


OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "create-stream", "create.stream", "POST", "/trigger/stream", True,
        t.StreamTriggerRequest, t.StreamTriggerReply, handlers.create_stream,
        "Create a stream trigger", 201,
    ),
    Operation(
        "create-gateway", "create.gateway", "POST", "/trigger/gateway", True,
        t.GatewayTriggerRequest, t.GatewayTriggerReply, handlers.create_gateway,
        "Create a gateway trigger", 201,
    ),
    Operation(
        "get", "get.*.*", "GET", "/trigger/triggers/{type}/{name}", False,
        t.TriggerRef, t.TriggerReply, handlers.get, "Get one trigger", etag=True,
    ),
    Operation(
        "update", "update.*.*", "PUT", "/trigger/triggers/{type}/{name}", True,
        t.StreamTriggerUpdate | t.GatewayTriggerUpdate, t.TriggerReply, handlers.update,
        "Replace a trigger's configuration (compare-and-set)", conditional=True, etag=True,
    ),
    Operation(
        "patch", "patch.*.*", "PATCH", "/trigger/triggers/{type}/{name}", True,
        t.EnabledPatch, t.TriggerReply, handlers.patch,
        "Disable or enable a trigger (compare-and-set)", conditional=True, etag=True,
    ),
    Operation(
        "list", "list", "GET", "/trigger/triggers", False,
        t.ListQuery, t.ListReply, handlers.list_triggers, "List triggers by subject pattern",
    ),
    Operation(
        "delete", "delete.*.*", "DELETE", "/trigger/triggers/{type}/{name}", True,
        t.TriggerRef, t.DeleteReply, handlers.delete, "Delete a trigger (poison pill)",
    ),
    Operation(
        "history", "history.*.*", "GET", "/trigger/triggers/{type}/{name}/history", False,
        t.HistoryQuery, t.HistoryReply, handlers.history, "History of one trigger",
    ),
)  # fmt: skip

_DECODERS: dict[str, msgspec.json.Decoder[msgspec.Struct]] = {
    op.name: msgspec.json.Decoder(op.request) for op in OPERATIONS if not op.names_trigger
}
_HISTORY_QUERY = msgspec.json.Decoder(t.HistoryQuery)
_UPDATES: dict[str, msgspec.json.Decoder[Any]] = {
    "stream": msgspec.json.Decoder(t.StreamTriggerUpdate),
    "gateway": msgspec.json.Decoder(t.GatewayTriggerUpdate),
}
_PATCH = msgspec.json.Decoder(t.EnabledPatch)
REVISION_HEADER = "Trigger-Revision"
_DIGITS = re.compile(r"[1-9][0-9]{0,18}")
_ENTITY_TAG = re.compile(r'"([1-9][0-9]{0,18})"|([1-9][0-9]{0,18})')


def error_reply(error: ApiError) -> tuple[bytes, dict[str, str]]:
    """Envelope and micro error headers of an error (a create's 409 carries the live trigger)."""
    if isinstance(error.body, t.ExistsBody):
        body = _encode(t.ExistsReply(error=error.message, body=error.body, status_code=error.status))
    else:
        body = _encode(t.ErrorReply(error=error.message, status_code=error.status))
    return body, {"Nats-Service-Error": error.message, "Nats-Service-Error-Code": str(error.status)}


def decode_request(
    op: Operation, subject: str, data: bytes, headers: Mapping[str, str] | None = None
) -> msgspec.Struct:
    """The request Struct of an operation, from the subject tokens, the JSON payload and (for a
    compare-and-set) the revision headers."""
    request_type: Any = op.request
    try:
        if op.names_trigger:
            trigger_type, name = subject.rsplit(".", 2)[-2:]
            ref = msgspec.convert({"trigger_type": trigger_type, "name": name}, t.TriggerRef)
            if op.from_subject:
                return ref
            if op.name == "update":
                decoder = _UPDATES.get(ref.trigger_type)
                if decoder is None:
                    raise BadRequest(f"a {ref.trigger_type} trigger has no configuration to update")
                request_type = decoder.type
                body = decoder.decode(data)
                revision, if_match = _revision(body.revision, headers or {})
                return t.UpdateRequest(ref=ref, body=body, revision=revision, if_match=if_match)
            if op.name == "patch":
                request_type = t.EnabledPatch
                patch = _PATCH.decode(data)
                revision, if_match = _revision(patch.revision, headers or {})
                return t.PatchRequest(ref=ref, body=patch, revision=revision, if_match=if_match)
            # history: the trigger from the subject, the page from the payload (none: the first)
            query = _HISTORY_QUERY.decode(data) if data else t.HistoryQuery()
            return t.HistoryRequest(ref=ref, query=query)
        return _DECODERS[op.name].decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise invalid(exc) from None
    except RecursionError:  # msgspec's own limit, far beyond the one the types hold fields to
        raise too_deep(data, request_type) from None


def _revision(in_body: int | None, headers: Mapping[str, str]) -> tuple[int | None, bool]:
    """The revision a compare-and-set must find, from the body's `revision`, the `Trigger-Revision`
    header or HTTP's `If-Match` (forwarded by the sidecar); and whether it came from `If-Match`.

    `If-Match: *` (any current record) and no revision at all apply the change to the latest
    revision; two revisions that disagree are a 400.
    """
    found: list[tuple[str, int]] = []
    if in_body is not None:
        found.append(("`revision`", in_body))
    header = headers.get(REVISION_HEADER)
    if header is not None:
        if not _DIGITS.fullmatch(header.strip()):
            raise BadRequest(
                f"header {REVISION_HEADER} must be a revision (a positive integer), not {header!r}"
            )
        found.append((REVISION_HEADER, int(header)))
    if_match = headers.get("If-Match")
    if if_match is not None and if_match.strip() != "*":
        tag = _ENTITY_TAG.fullmatch(if_match.strip())
        if tag is None:
            raise BadRequest(
                f'header If-Match must be one entity tag as an ETag gave it ("<revision>"), or *, '
                f"not {if_match!r}"
            )
        found.append(("If-Match", int(tag.group(1) or tag.group(2))))
    if len({revision for _, revision in found}) > 1:
        raise BadRequest(
            "the revision is given more than once, and not the same: "
            + ", ".join(f"{where} {revision}" for where, revision in found)
        )
    if not found:
        return None, False
    return found[0][1], any(where == "If-Match" for where, _ in found)


def as_api_error(exc: Exception) -> ApiError | None:
    """The reply for an exception raised while serving a request; None for an unexpected one (a 500).

    A JetStream error reply that reaches this far is not transient and not one the store maps: a
    400 means the store refused what the request asked for (bad input, never a 500); anything
    else is the store failing (503).
    """
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, jetstream.JetStreamError):
        if exc.code == 400:
            return BadRequest(f"the trigger store refused the request: {exc.description}")
        return Unavailable(f"the trigger store failed: {exc.description}")
    return None


@dataclass
class _Counts:
    """One endpoint's requests as this process answered them."""

    in_flight: int = 0
    peak_in_flight: int = 0
    answered: int = 0
    errors: int = 0
    last_error: str | None = None
    processing_ns: int = 0


class Api:
    """Serves the operation table as one `nats.micro` service."""

    def __init__(
        self, nc: Client, ctx: handlers.Context, auth: Authenticator, metrics: ServiceMetrics | None = None
    ) -> None:
        self._nc = nc
        self._ctx = ctx
        self._auth = auth
        self.metrics = metrics or ServiceMetrics()
        self._log_sample = ctx.settings.request_log_sample
        self._span_names = {op.name: f"trigger-service {op.name}" for op in OPERATIONS}
        self._span_attributes = {
            op.name: {"messaging.system": "nats", "trigger.operation": op.name} for op in OPERATIONS
        }
        self.metrics_port: int | None = None  # the bound port of TRIGGER_METRICS_ADDR's listener
        self._slots = asyncio.Semaphore(ctx.settings.max_in_flight)
        self._tasks: set[asyncio.Task[None]] = set()
        self._counts = {op.name: _Counts() for op in OPERATIONS}
        self.service: Service | None = None

    async def start(self) -> Service:
        """Register the service and one endpoint per operation."""
        from service import __version__

        prefix = self._ctx.settings.prefix
        service = Service(
            self._nc,
            ServiceConfig(
                name=SERVICE_NAME,
                version=__version__,
                description="Create, read, list, update, disable, enable and delete triggers; carry them.",
                metadata={"bucket": self._ctx.store.bucket, "prefix": prefix},
                stats_handler=self._stats,
            ),
        )
        await service.start()
        for op in OPERATIONS:
            await service.add_endpoint(
                EndpointConfig(
                    name=op.name,
                    subject=f"{prefix}.{op.subject}",
                    handler=self._handler(op),
                    metadata={"http": f"{op.http_method} {op.http_path}", "summary": op.summary},
                )
            )
        await asyncio.sleep(0)  # a request sent once start() returns finds the endpoints at the server
        await self._nc.flush()
        self.service = service
        return service

    def _handler(self, op: Operation) -> Callable[[MicroRequest], Awaitable[None]]:
        async def on_request(request: MicroRequest) -> None:
            # micro awaits one handler at a time per endpoint: hand each request to its own
            # task, and block here (back-pressure) once max_in_flight requests are running.
            await self._slots.acquire()
            task = asyncio.create_task(self._serve(op, request))
            self._tasks.add(task)
            task.add_done_callback(self._done)

        return on_request

    def _stats(self, stats: EndpointStats) -> dict[str, int]:
        """Fill `$SRV.STATS` from our own counts: micro only sees the hand-off to the task."""
        counts = self._counts[stats.name]
        stats.num_errors = counts.errors
        stats.last_error = counts.last_error
        stats.processing_time = counts.processing_ns
        stats.average_processing_time = counts.processing_ns // max(counts.answered, 1)
        return {"in_flight": counts.in_flight, "peak_in_flight": counts.peak_in_flight}

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()

    async def _serve(self, op: Operation, request: MicroRequest) -> None:
        started = time.perf_counter()
        replies.begin()
        counts = self._counts[op.name]
        counts.in_flight += 1
        counts.peak_in_flight = max(counts.peak_in_flight, counts.in_flight)
        self.metrics.api_in_flight += 1
        headers = request.headers or {}
        status, account, error = 500, None, "500:Internal server error"
        span = tracing.begin(
            self._span_names[op.name], tracing.parse(headers), attributes=self._span_attributes[op.name]
        )
        # Each request runs in a task of its own, whose context dies with it: bind, no unbind.
        log.bind_request(
            subject=request.subject, request_id=headers.get(REQUEST_ID_HEADER), trace_id=span.trace_id
        )
        try:
            caller = self._auth.authenticate(headers, write=op.write)
            account = caller.account
            payload = decode_request(op, request.subject, request.data, headers)
            jetstream.start_budget()  # this task's context ends with the request
            reply = await op.handler(self._ctx, caller, payload)
            status = op.success
            await replies.respond(request, _encode(reply))
        except Exception as exc:
            answer = as_api_error(exc)
            if answer is None:
                _log.exception("request failed")
                await self._respond_error(request, Internal("unable to process the request"))
            else:
                if not isinstance(exc, ApiError):
                    _log.warning("JetStream refused a request", error=str(exc))
                status, error = answer.status, f"{answer.status}:{answer.message}"
                await self._respond_error(request, answer)
        finally:
            elapsed = time.perf_counter() - started
            counts.in_flight -= 1
            counts.answered += 1
            counts.processing_ns += int(elapsed * 1e9)
            if status >= 400:
                counts.errors += 1
                counts.last_error = error
            self.metrics.api_in_flight -= 1
            self.metrics.api_answered(op.name, status, elapsed)
            span.end(status)
            if status >= 400 or self._log_sample >= 1.0 or random.random() < self._log_sample:
                _request_line(
                    subject=request.subject,
                    request_id=headers.get(REQUEST_ID_HEADER),
                    trace_id=span.trace_id,
                    operation=op.name,
                    account=account,
                    status=status,
                    duration_ms=round(elapsed * 1000, 3),
                )

    async def _respond_error(self, request: MicroRequest, error: ApiError) -> None:
        body, headers = error_reply(error)
        try:
            await request.respond(body, headers=headers)
        except Exception:  # the requester is gone, or the connection closed: nothing to tell
            _log.warning("reply not sent", status=error.status)

    async def stop(self) -> None:
        """Stop taking requests, then wait for the ones in flight to finish."""
        if self.service is not None:
            await self.service.stop()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=30)
