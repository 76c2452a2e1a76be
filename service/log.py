"""structlog, configured once: context variables first, JSON when not on a terminal."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import contextvars
import datetime
import logging
import sys
import threading
from collections.abc import Callable
from typing import BinaryIO

import msgspec
import structlog


def configure(level: str = "info", fmt: str = "auto") -> None:
    """Configure structlog and the standard library's logging for the whole process."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    # JSON lines through msgspec, written as bytes: 9 us a line against 14 us with the standard
    # library's json and print() (bench/RESULTS.md; the request and access lines are one per request)
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer(serializer=_encode_line)
        if use_json
        else structlog.dev.ConsoleRenderer()
    )
    lines = LineWriter(sys.stderr.buffer) if use_json else None
    factory: Callable[..., structlog.typing.WrappedLogger] = (
        (lambda *_: lines) if lines is not None else structlog.PrintLoggerFactory(file=sys.stderr)
    )
    numeric = logging.getLevelName(level.upper())
    _hot.writer, _hot.info = lines, numeric <= logging.INFO
    structlog.configure(
        processors=[
            _merge_request,
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info if use_json else structlog.processors.StackInfoRenderer(),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=max(numeric, logging.WARNING), stream=sys.stderr, format="%(message)s")


class LineWriter:
    """JSON log lines written once per turn of the event loop: one write for every line of a turn
    (a write per line was 5% of a create's CPU at 64 in flight); at once outside an event loop,
    and what is left at exit."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self._lines: list[bytes] = []
        self._scheduled = False
        self._lock = threading.Lock()  # a line may come from another thread
        atexit.register(self.flush)

    def msg(self, message: bytes) -> None:
        with self._lock:
            self._lines.append(message + b"\n")
            if self._scheduled:
                return
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
            else:
                self._scheduled = True
        if loop is None:
            self.flush()
        else:
            loop.call_soon(self.flush)

    log = debug = info = warn = warning = fatal = failure = err = error = critical = exception = msg

    def flush(self) -> None:
        with self._lock:
            self._scheduled = False
            lines, self._lines = self._lines, []
        if lines:
            with contextlib.suppress(OSError, ValueError):  # a closed or broken stderr loses the lines
                self._file.write(b"".join(lines))
                self._file.flush()


_request: contextvars.ContextVar[dict[str, object] | None] = contextvars.ContextVar(
    "log_request", default=None
)


def bind_request(**fields: object) -> contextvars.Token[dict[str, object] | None]:
    """Fields every line logged in this context carries (a request's subject, request id, trace
    id): one context variable for all of them, where structlog's `bind_contextvars` sets one per
    field (3-4 us a request); `unbind_request` with the token undoes it."""
    return _request.set(fields)


def unbind_request(token: contextvars.Token[dict[str, object] | None]) -> None:
    """Undo `bind_request`."""
    _request.reset(token)


def _merge_request(
    logger: structlog.typing.WrappedLogger, method: str, event: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    fields = _request.get()
    if fields:
        for key, value in fields.items():
            event.setdefault(key, value)
    return event


class _Hot:
    """How `hot` lines are written: straight to the JSON writer (None: through structlog)."""

    writer: LineWriter | None = None
    info = True  # info lines are logged


_hot = _Hot()


def hot(component: str, event: str) -> Callable[..., None]:
    """A logger of one info line written once per request (the service's request line, the
    sidecar's access line), with every field it carries given: in JSON, the line structlog's
    processors would write (the component, the fields, the event, its level and an ISO time in
    UTC), encoded and handed to the writer at once, which is a third of the cost; else through
    structlog. The context variables are not merged in: pass what the line needs."""
    logger = get(component)

    def line(**fields: object) -> None:
        writer = _hot.writer
        if writer is None:
            logger.info(event, **fields)
        elif _hot.info:
            now = datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")
            record = {"component": component, **fields, "event": event, "level": "info", "timestamp": now}
            writer.msg(_encoder.encode(record))

    return line


_encoder = msgspec.json.Encoder(enc_hook=repr)  # what JSON cannot hold is logged as its repr()


def _encode_line(event: dict[str, object], **_: object) -> bytes:
    return _encoder.encode(event)


def get(name: str) -> structlog.typing.FilteringBoundLogger:
    """A logger bound to a component name."""
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger(component=name)
    return logger
