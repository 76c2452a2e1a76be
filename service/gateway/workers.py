"""Several sidecar processes on one port: TRIGGER_HTTP_WORKERS=N forks N workers before any of
them connects, each a whole sidecar (its own NATS connection and route table) listening on
TRIGGER_HTTP_ADDR with SO_REUSEPORT, so the kernel spreads the connections over them.

The parent only supervises: SIGTERM or SIGINT is passed on to every worker, each drains as a
single sidecar does, and the parent exits with the first non-zero exit code (0 when all are 0).
A worker that dies on its own stops the others too, so an orchestrator sees the sidecar fail and
restarts it whole, rather than running on with fewer workers unnoticed.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
from collections.abc import Callable


def supervise(workers: int, worker: Callable[[], int]) -> int:
    """Fork `workers` processes running `worker()` (its return value is the exit code); wait for them."""
    children: list[int] = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                _end_with_parent()
                code = worker()
            finally:
                os._exit(code)  # never run the parent's code (or its atexit handlers) in a worker
        children.append(pid)

    stopping = False

    def pass_on(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            _signal(pid, signum)

    signal.signal(signal.SIGTERM, pass_on)
    signal.signal(signal.SIGINT, pass_on)
    result = 0
    running = set(children)
    while running:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        running.discard(pid)
        code = os.waitstatus_to_exitcode(status)
        if code != 0 and result == 0:
            result = code if code > 0 else 1
        if not stopping:  # one worker ended by itself: end the sidecar
            stopping = True
            for other in running:
                _signal(other, signal.SIGTERM)
    return result


def _end_with_parent() -> None:
    """Linux: SIGTERM this worker should the supervisor die without passing a signal on (SIGKILL)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


_PR_SET_PDEATHSIG = 1


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)
