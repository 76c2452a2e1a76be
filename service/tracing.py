"""W3C trace context (`traceparent`, `tracestate`) from HTTP into NATS, and OpenTelemetry spans.

The trace headers always travel: the sidecar takes a valid `traceparent` from the HTTP request or
starts a trace, and sends it in the NATS request of the API operation or the gateway forward;
the service reads it from the NATS request, so every request log line carries the trace id.

Spans are emitted only when OpenTelemetry (the `otel` extra) is installed and configured: a
tracer provider installed by the application's launcher (`opentelemetry-instrument`), or the
standard `OTEL_*` variables asking for an exporter (`configure_from_environment`). Otherwise no
OpenTelemetry code runs at all: the cost is the header propagation.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
from collections.abc import Iterator, Mapping
from typing import Any

TRACEPARENT, TRACESTATE = "traceparent", "tracestate"
TRACER_NAME = "trigger-service"
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-[^\s]*)?")
_ZERO_TRACE, _ZERO_PARENT = "0" * 32, "0" * 16
_MAX_TRACESTATE = 512  # characters of `tracestate` passed on (the W3C limit is 32 entries)

try:
    from opentelemetry import context as _context
    from opentelemetry import trace as _trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    from opentelemetry.trace.status import Status, StatusCode
except ImportError:  # the `otel` extra is not installed: propagation only
    _trace = None  # type: ignore[assignment]

_tracer: Any = None  # an OpenTelemetry Tracer while spans are emitted
_configured = False


class TraceContext:
    """One position in a trace: the `traceparent` (and `tracestate`) to send on."""

    __slots__ = ("traceparent", "tracestate")

    def __init__(self, traceparent: str, tracestate: str | None = None) -> None:
        self.traceparent, self.tracestate = traceparent, tracestate

    @property
    def trace_id(self) -> str:
        """The 32 hex digits of the trace id."""
        return self.traceparent[3:35]

    def headers(self) -> dict[str, str]:
        """The W3C headers of this position."""
        if self.tracestate:
            return {TRACEPARENT: self.traceparent, TRACESTATE: self.tracestate}
        return {TRACEPARENT: self.traceparent}


def parse(headers: Mapping[str, str] | None) -> TraceContext | None:
    """The trace context of valid W3C headers (a later version is read as version 00); else None."""
    if not headers:
        return None
    value = headers.get(TRACEPARENT) or headers.get("Traceparent")
    if not value:
        return None
    match = _TRACEPARENT.fullmatch(value.strip())
    if match is None:
        return None
    version, trace_id, parent_id, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest) or trace_id == _ZERO_TRACE or parent_id == _ZERO_PARENT:
        return None
    state = headers.get(TRACESTATE) or headers.get("Tracestate")
    if state is not None:
        state = state.strip()[:_MAX_TRACESTATE] or None
    return TraceContext(f"00-{trace_id}-{parent_id}-{flags}", state)


def new() -> TraceContext:
    """A new trace: random ids, not sampled (nothing recorded it)."""
    # Random, not secret (as OpenTelemetry's own id generator): no system call for each request.
    return TraceContext(f"00-{random.getrandbits(128):032x}-{random.getrandbits(64):016x}-00")


def enabled() -> bool:
    """True while spans are emitted."""
    return _tracer is not None


def use(provider: Any) -> None:
    """Emit spans through `provider` (an OpenTelemetry TracerProvider), or none with None."""
    global _tracer, _configured
    _tracer = provider.get_tracer(TRACER_NAME) if provider is not None else None
    _configured = True


def configure_from_environment(environ: Mapping[str, str] | None = None) -> None:
    """Once per process: emit spans when OpenTelemetry is installed and either a tracer provider is
    installed already or the standard variables ask for an exporter (`OTEL_TRACES_EXPORTER` other
    than `none`, or an `OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT`); `OTEL_SDK_DISABLED=true` wins."""
    global _configured
    if _configured or _trace is None:
        return
    _configured = True
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return
    installed = _trace.get_tracer_provider()
    if not isinstance(installed, _trace.ProxyTracerProvider):
        use(installed)
        return
    exporter_name = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if exporter_name == "none" or not (exporter_name or endpoint):
        return
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

    exporter: SpanExporter
    if exporter_name == "console":
        exporter = ConsoleSpanExporter()
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()  # reads OTEL_EXPORTER_OTLP_* itself
    # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES name the process; OTEL_TRACES_SAMPLER samples.
    provider = TracerProvider(resource=Resource.create({"service.name": TRACER_NAME}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    _trace.set_tracer_provider(provider)
    use(provider)


class Span:
    """A request's span at a process boundary (or, without spans, its trace context alone)."""

    __slots__ = ("_otel", "_token", "context")

    def __init__(self, context: TraceContext, otel: Any = None, token: Any = None) -> None:
        self.context, self._otel, self._token = context, otel, token

    @property
    def trace_id(self) -> str:
        """The trace id, for the log lines."""
        return self.context.trace_id

    def child(
        self, name: str, attributes: Mapping[str, Any] | None = None
    ) -> contextlib.AbstractContextManager[TraceContext]:
        """A client span under this one (a NATS request); yields the context to send with it
        (without spans, only that: no generator per request)."""
        if self._otel is None or _tracer is None:
            return contextlib.nullcontext(self.context)
        return self._client_span(name, attributes)

    @contextlib.contextmanager
    def _client_span(self, name: str, attributes: Mapping[str, Any] | None) -> Iterator[TraceContext]:
        assert _tracer is not None
        with _tracer.start_as_current_span(name, kind=_trace.SpanKind.CLIENT, attributes=attributes) as span:
            yield _context_of(span, self.context.tracestate)

    def end(self, status: int) -> None:
        """End the span with the status the request was answered with (5xx: an error)."""
        if self._otel is None:
            return
        self._otel.set_attribute("trigger.status_code", status)
        if status >= 500:
            self._otel.set_status(Status(StatusCode.ERROR))
        self._otel.end()
        if self._token is not None:
            _context.detach(self._token)


def begin(
    name: str,
    parent: TraceContext | None,
    *,
    server: bool = True,
    attributes: Mapping[str, Any] | None = None,
) -> Span:
    """The span of one request, under `parent` (the caller's context) or starting a trace; current
    in this task until `end`. Without spans: `parent` passed on as it is, or a new trace."""
    if _tracer is None:
        return Span(parent or new())
    parent_context = None
    if parent is not None:
        parent_context = TraceContextTextMapPropagator().extract(parent.headers())
    kind = _trace.SpanKind.SERVER if server else _trace.SpanKind.INTERNAL
    span = _tracer.start_span(name, context=parent_context, kind=kind, attributes=attributes)
    token = _context.attach(_trace.set_span_in_context(span, parent_context))
    return Span(_context_of(span, parent.tracestate if parent else None), span, token)


_NO_SPAN = contextlib.nullcontext()


def span(name: str, attributes: Mapping[str, Any] | None = None) -> contextlib.AbstractContextManager[Any]:
    """An internal span under the current one (a store write); nothing without spans (and then no
    generator per call: one per KV write showed in a create's profile)."""
    if _tracer is None:
        return _NO_SPAN
    manager: contextlib.AbstractContextManager[Any] = _tracer.start_as_current_span(
        name, attributes=attributes
    )
    return manager


def _context_of(span: Any, tracestate: str | None) -> TraceContext:
    ctx = span.get_span_context()
    return TraceContext(f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}", tracestate)
