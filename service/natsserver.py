"""Run a private nats-server as a child process (tests, benchmarks and the local stack)."""

from __future__ import annotations

import functools
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

_READY = "Server is ready"
_CLIENT_PORT = re.compile(r"Listening for client connections on [^\s]+:(\d+)")


MINIMUM_VERSION = (2, 9)


class NatsServerError(RuntimeError):
    """nats-server is missing, too old, or did not start."""


@functools.cache
def binary() -> str:
    """Path of the nats-server binary (NATS_SERVER_BIN, else PATH), checked to be at least 2.9."""
    path = (
        os.environ.get("NATS_SERVER_BIN")
        or shutil.which("nats-server")
        or shutil.which("nats-server", path="/usr/sbin:/usr/local/sbin")  # Debian's place, off some PATHs
    )
    if not path:
        raise NatsServerError(
            "nats-server not found: install it (Debian: apt-get install nats-server) or set NATS_SERVER_BIN"
        )
    out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout
    found = re.search(r"v?(\d+)\.(\d+)", out)
    if not found or (int(found.group(1)), int(found.group(2))) < MINIMUM_VERSION:
        raise NatsServerError(
            f"{path} is {out.strip() or 'of unknown version'}; nats-server >= 2.9 is needed"
        )
    return path


class NatsServer:
    """A nats-server child process on a random loopback port with its own store directory."""

    def __init__(
        self,
        *,
        config: str | Path | None = None,
        jetstream: bool = True,
        store_dir: str | Path | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self._own_dir = store_dir is None
        self.store_dir = Path(store_dir or tempfile.mkdtemp(prefix="nats-store-"))
        args = [binary()]
        if config is not None:
            args += ["-c", str(config)]
        else:
            args += ["-a", "127.0.0.1", "-p", "-1"]
            if jetstream:
                args += ["-js", "-sd", str(self.store_dir)]
        self.args = [*args, *extra_args]
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0
        self.log: list[str] = []

    @property
    def url(self) -> str:
        """The client URL."""
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> NatsServer:
        """Start the server and wait for "Server is ready" in its log."""
        self.proc = subprocess.Popen(
            self.args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        ready = threading.Event()

        def pump() -> None:
            assert self.proc is not None
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.log.append(line.rstrip())
                if m := _CLIENT_PORT.search(line):
                    self.port = int(m.group(1))
                if _READY in line:
                    ready.set()

        self._pump = threading.Thread(target=pump, daemon=True)
        self._pump.start()
        deadline = time.monotonic() + timeout
        while not ready.is_set():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise NatsServerError("nats-server did not start:\n" + "\n".join(self.log[-20:]))
            ready.wait(0.05)
        return self

    def stop(self) -> None:
        """Stop the server (and remove its store directory when it made one)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stdout is not None:
            self._pump.join(5)  # it reads stdout until EOF: closing it under the thread breaks its read
            self.proc.stdout.close()
        if self._own_dir:
            shutil.rmtree(self.store_dir, ignore_errors=True)

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
