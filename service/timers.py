"""Deadlines on futures without `asyncio.timeout` or `asyncio.wait_for`.

Both are general (a task per `wait_for`, the current task looked up and a context manager per
`timeout`) and showed as a tenth of a create's CPU when every request and every wait for the
follower took one. A future that only needs to fail at a deadline needs a timer and nothing else.
"""

from __future__ import annotations

import asyncio
from typing import Any


def fail_after(
    future: asyncio.Future[Any], seconds: float, error: type[BaseException], *args: object
) -> asyncio.TimerHandle:
    """Fail `future` with `error(*args)` after `seconds` unless it is done by then; cancel the
    returned handle once it is."""
    return asyncio.get_running_loop().call_later(seconds, _fail, future, error, args)


def _fail(future: asyncio.Future[Any], error: type[BaseException], args: tuple[object, ...]) -> None:
    if not future.done():
        future.set_exception(error(*args))
