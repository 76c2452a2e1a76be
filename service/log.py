"""structlog, configured once: context variables first, JSON when not on a terminal."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

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
    factory: Callable[..., structlog.typing.WrappedLogger] = (
        structlog.BytesLoggerFactory(file=sys.stderr.buffer)
        if use_json
        else structlog.PrintLoggerFactory(file=sys.stderr)
    )
    numeric = logging.getLevelName(level.upper())
    structlog.configure(
        processors=[
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


_encoder = msgspec.json.Encoder(enc_hook=repr)  # what JSON cannot hold is logged as its repr()


def _encode_line(event: dict[str, object], **_: object) -> bytes:
    return _encoder.encode(event)


def get(name: str) -> structlog.typing.FilteringBoundLogger:
    """A logger bound to a component name."""
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger(component=name)
    return logger
