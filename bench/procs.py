"""The processes under test, each started as deployed and in its own process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg

from bench import profiling

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
PY = sys.executable


class ChildFailed(RuntimeError):
    """A child process exited or did not become ready in time."""


def free_port() -> int:
    """A TCP port that was free a moment ago on the loopback interface."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def unique(prefix: str) -> str:
    """A fresh name for a bucket, a trigger or a subject token."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def console_script(name: str, module_call: str) -> list[str]:
    """The console script `name` from this venv, else the same entry point through `python -c`."""
    script = Path(PY).with_name(name)
    if script.exists():
        return [str(script)]
    return [PY, "-c", module_call]


@dataclass
class Child:
    """One child process, its log in a file, and how to tell that it is ready."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_dir: Path
    ready_line: str | None = None  # a regex expected in the log, else `ready_port` accepting
    ready_port: int | None = None
    ready_check: Callable[[], Awaitable[bool]] | None = None
    url: str = ""  # where an HTTP child listens
    start_seconds: float = field(default=0.0, init=False)  # from spawn to ready
    profiler: profiling.Profiler | None = None
    proc: asyncio.subprocess.Process | None = field(default=None, init=False)
    _offset: int = field(default=0, init=False)

    @property
    def log_path(self) -> Path:
        """Where the child's stdout and stderr go."""
        return self.log_dir / f"{self.name}.log"

    async def start(self, timeout: float = 30.0) -> Child:
        """Start the process and wait until it is ready."""
        argv = self.profiler.wrap(self.argv) if self.profiler else self.argv
        env = {**os.environ, **self.env, "PYTHONPATH": str(ROOT)}
        self._offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                *argv,
                cwd=ROOT,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        spawned = time.monotonic()
        deadline = spawned + timeout
        pattern = re.compile(self.ready_line) if self.ready_line else None
        while not await self._ready(pattern):
            if self.proc.returncode is not None or time.monotonic() > deadline:
                tail = self.tail()
                await self.stop()
                raise ChildFailed(f"{self.name} did not start:\n{tail}")
            await asyncio.sleep(0.02)
        self.start_seconds = time.monotonic() - spawned
        if self.profiler:
            await self.profiler.started(self.proc.pid)
        return self

    async def _ready(self, pattern: re.Pattern[str] | None) -> bool:
        if self.ready_check is not None:
            return await self.ready_check()
        if pattern is not None:
            with self.log_path.open("rb") as log:
                log.seek(self._offset)
                return bool(pattern.search(log.read().decode(errors="replace")))
        if self.ready_port is not None:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.ready_port)
            except OSError:
                return False
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return True
        return True

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the process and its child processes (a sidecar's workers) have
        used so far; 0 when it is not running."""
        if self.proc is None:
            return 0.0
        return sum(_cpu_ticks(pid) for pid in _family(self.proc.pid)) / os.sysconf("SC_CLK_TCK")

    def rss_kib(self) -> int:
        """The process's resident memory in KiB; 0 when it is not running."""
        if self.proc is None:
            return 0
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def tail(self, lines: int = 20) -> str:
        """The last lines of the child's log."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    async def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (the child drains), then SIGKILL when it does not exit in time."""
        proc = self.proc
        if self.profiler:
            await self.profiler.stopping()
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


def _cpu_ticks(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


def _family(pid: int) -> list[int]:
    """`pid` and every live descendant of it."""
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{current}/task").iterdir():
                queue += [int(child) for child in (task / "children").read_text().split()]
    return found


@contextlib.asynccontextmanager
async def running(child: Child, timeout: float = 30.0) -> AsyncIterator[Child]:
    """A started child, stopped on exit."""
    await child.start(timeout)
    try:
        yield child
    finally:
        await child.stop()


@dataclass
class Stack:
    """Where the processes of one bench run connect and log."""

    nats_url: str
    log_dir: Path
    log_level: str = "info"
    nc: Client | None = None  # to see a service register with `nats.micro`

    def service_env(self, bucket: str, **extra: str) -> dict[str, str]:
        """The environment of a service or sidecar process, as deployed but without authentication."""
        return {
            "NATS_URL": self.nats_url,
            "TRIGGER_BUCKET": bucket,
            "TRIGGER_AUTH": "none",
            "TRIGGER_ROUTING": "single",
            "LOG_FORMAT": "json",
            "LOG_LEVEL": self.log_level,
            **extra,
        }

    def service(
        self,
        bucket: str,
        name: str = "service",
        profile: Path | None = None,
        env: dict[str, str] | None = None,
        replicas: int = 1,
    ) -> Child:
        """`python -m service` on `bucket` (with `env` added), ready once `replicas` services on the
        bucket answer (this one being the last to start)."""
        argv = [PY, "-m", "service"]
        child = Child(
            name,
            argv,
            self.service_env(bucket, **(env or {})),
            self.log_dir,
            ready_check=self._serving(bucket, replicas),
        )
        return profiling.attach(child, profile) if profile else child

    def _serving(self, bucket: str, replicas: int = 1) -> Callable[[], Awaitable[bool]]:
        """True once `replicas` services on `bucket` answer `$SRV.INFO` (every replica's answer is read)."""

        async def check() -> bool:
            assert self.nc is not None
            inbox = self.nc.new_inbox()
            found = asyncio.Event()
            ids: set[str] = set()

            async def on_info(msg: Msg) -> None:
                with contextlib.suppress(msgspec.DecodeError, AttributeError):  # e.g. a no-responders status
                    info = msgspec.json.decode(msg.data)
                    if info.get("metadata", {}).get("bucket") == bucket:
                        ids.add(str(info.get("id")))
                        if len(ids) >= replicas:
                            found.set()

            subscription = await self.nc.subscribe(inbox, cb=on_info)
            try:
                await self.nc.publish("$SRV.INFO.trigger-service", b"", reply=inbox)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(found.wait(), 0.1)
            finally:
                await subscription.unsubscribe()
            return found.is_set()

        return check

    def sidecar(
        self, bucket: str, port: int, profile: Path | None = None, env: dict[str, str] | None = None
    ) -> Child:
        """`trigger-gateway` on `bucket`, serving HTTP on `port` (with `env` added)."""
        argv = console_script("trigger-gateway", "from service.cli import gateway_main; gateway_main()")
        env = self.service_env(bucket, TRIGGER_HTTP_ADDR=f"127.0.0.1:{port}", **(env or {}))
        child = Child("sidecar", argv, env, self.log_dir, ready_port=port, url=f"http://127.0.0.1:{port}")
        return profiling.attach(child, profile) if profile else child

    def responder(self, *args: str) -> Child:
        """The baseline responder (`bench/baseline_responder.py`)."""
        argv = [PY, str(BENCH / "baseline_responder.py"), "--nats", self.nats_url, *args]
        return Child("baseline-responder", argv, {}, self.log_dir, ready_line=r"(?m)^ready$")

    def forwarder(self, port: int, *routes: tuple[str, str, str]) -> Child:
        """The minimal HTTP-to-NATS forwarder (`bench/baseline_forwarder.py`), METHOD PATH SUBJECT routes."""
        argv = [PY, str(BENCH / "baseline_forwarder.py"), "--nats", self.nats_url, "--port", str(port)]
        for method, path, subject in routes:
            argv += ["--route", method, path, subject]
        return Child(
            "baseline-forwarder", argv, {}, self.log_dir, ready_port=port, url=f"http://127.0.0.1:{port}"
        )


def which(name: str) -> str | None:
    """Path of an executable on PATH."""
    return shutil.which(name)


async def wait_for(check: Callable[[], Awaitable[bool]], timeout: float, interval: float = 0.01) -> bool:
    """Poll `check` until it is true (True) or the deadline passes (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return True
        await asyncio.sleep(interval)
    return False
