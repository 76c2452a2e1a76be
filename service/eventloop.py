"""The event loop the service and the sidecar run on: asyncio's own, or uvloop (the `fast` extra)
with `TRIGGER_EVENT_LOOP=uvloop` (measured in bench/RESULTS.md; README "Performance and scale").

asyncio stays the default: under uvloop, nats-py's close after the server went away writes to a
transport uvloop has already closed (RuntimeError instead of a clean exit 0 on SIGTERM).
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
from collections.abc import Coroutine
from typing import Any

from service.config import ConfigError

VARIABLE = "TRIGGER_EVENT_LOOP"
CHOICES = ("asyncio", "uvloop")


def chosen() -> str:
    """`asyncio` (the default) or `uvloop`, as TRIGGER_EVENT_LOOP says."""
    choice = os.environ.get(VARIABLE, "").strip().lower() or "asyncio"
    if choice not in CHOICES:
        raise ConfigError(f"{VARIABLE} must be one of {', '.join(CHOICES)}, not {choice!r}")
    if choice == "uvloop" and importlib.util.find_spec("uvloop") is None:
        raise ConfigError(
            f"{VARIABLE}=uvloop, but uvloop is not installed (pip install 'trigger-service[fast]')"
        )
    return choice


def run(main: Coroutine[Any, Any, None], loop: str) -> None:
    """Run `main` to completion on a new event loop of the kind `chosen()` named."""
    if loop == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main)
        return
    asyncio.run(main)
