"""Start-up as a process: an old nats-server is refused, a bucket that cannot be opened yet is waited for."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import nats
import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client

from service import serverversion
from service.app import running, wait_for
from service.devstack import free_port
from service.errors import Unavailable
from service.natsserver import NatsServer
from tests.conftest import make_settings
from tests.http_fixtures import call
from tests.support import SECRET, Reply, eventually, request, unique

SERVICE = [sys.executable, "-m", "service"]
SIDECAR = [sys.executable, "-c", "from service.cli import gateway_main; gateway_main()"]
WAITING = "waiting for the trigger bucket"


def env_for(url: str, bucket: str, **extra: str) -> dict[str, str]:
    """The environment of a service or sidecar process (the sidecar on a free port)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRIGGER_", "NATS_"))}
    env.update(
        NATS_URL=url,
        TRIGGER_BUCKET=bucket,
        TRIGGER_JWT_SECRET=SECRET,
        TRIGGER_HTTP_ADDR="127.0.0.1:0",
        LOG_FORMAT="json",
        LOG_LEVEL="info",
    )
    env.update(extra)
    return env


def log_lines(path: Path) -> list[dict[str, object]]:
    """The JSON log lines written so far."""
    lines = []
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):  # a line being written
                lines.append(json.loads(line))
    return lines


def waits(path: Path) -> list[dict[str, object]]:
    return [line for line in log_lines(path) if line.get("event") == WAITING]


async def stopped(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM, then the exit code (within a bound)."""
    proc.send_signal(signal.SIGTERM)
    return await asyncio.to_thread(proc.wait, 20)


Spawn = Callable[[list[str], dict[str, str]], tuple[subprocess.Popen[bytes], Path]]


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    """Start processes with their output in a log file; kill any still running at the end."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(argv: list[str], env: dict[str, str]) -> tuple[subprocess.Popen[bytes], Path]:
        log = tmp_path / f"process-{len(procs)}.log"
        with log.open("w") as out:
            procs.append(subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT))
        return procs[-1], log

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


# --- the server's version ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "accepted"),
    [
        ("2.12.0", True),
        ("v2.12.0", True),
        ("2.15.1", True),
        ("3.0.0", True),
        ("2.11.99", False),
        ("2.9.10", False),
        ("1.99.99", False),
        ("", False),
        ("unknown", False),
    ],
)
def test_require_accepts_2_12_and_later_only(version: str, accepted: bool) -> None:
    if accepted:
        serverversion.require(version, where="nats://n1")
        return
    with pytest.raises(serverversion.ServerTooOld, match=r"^nats://n1 runs nats-server .*2\.12\.0"):
        serverversion.require(version, where="nats://n1")


class OldNats:
    """Just enough of a NATS server for a client to connect: INFO saying 2.9.10, PONG to each PING."""

    INFO = b'INFO {"server_id":"x","version":"2.9.10","proto":1,"max_payload":1048576,"headers":true}\r\n'

    async def __aenter__(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"nats://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(self.INFO)
        while line := await reader.readline():
            if line.strip().upper() == b"PING":
                writer.write(b"PONG\r\n")
                await writer.drain()
        writer.close()


@pytest.mark.parametrize("argv", [SERVICE, SIDECAR], ids=["service", "sidecar"])
async def test_an_old_nats_server_is_refused_with_one_line_and_exit_code_2(argv: list[str]) -> None:
    async with OldNats() as url:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            env=env_for(url, unique("bucket"), LOG_LEVEL="warning"),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    text = err.decode()
    assert proc.returncode == 2, text
    assert text.strip().splitlines() == [
        f"unsupported NATS server: {url} runs nats-server 2.9.10; "
        "the Trigger Service needs nats-server 2.12.0 or later"
    ]


# --- waiting for the bucket -------------------------------------------------------------------


@pytest.mark.parametrize("nats_down", [False, True], ids=["connected", "nats-down"])
@pytest.mark.parametrize("argv", [SERVICE, SIDECAR], ids=["service", "sidecar"])
async def test_without_jetstream_it_waits_logging_why_and_sigterm_stops_it(
    argv: list[str], nats_down: bool, spawn: Spawn
) -> None:
    server = NatsServer(jetstream=False).start()
    try:
        proc, log = spawn(argv, env_for(server.url, unique("bucket")))
        await eventually(lambda: len(waits(log)) >= 2, timeout=20)
        if nats_down:  # and then NATS goes away too: the signal still ends the wait
            server.stop()
            await eventually(lambda: "NATS connection error; retrying" in log.read_text(), timeout=20)
        assert proc.poll() is None, log.read_text()
        first = waits(log)[0]
        assert first["level"] == "warning"
        assert first["reason"]
        assert first["retry_in"] == 0.1
        assert await stopped(proc) == 0, log.read_text()
    finally:
        server.stop()
    assert "Traceback" not in log.read_text()
    assert any(line.get("event") == "stopped before start-up completed" for line in log_lines(log))


@pytest.mark.parametrize("argv", [SERVICE, SIDECAR], ids=["service", "sidecar"])
async def test_it_starts_serving_once_jetstream_answers(
    argv: list[str], spawn: Spawn, tmp_path: Path
) -> None:
    port, bucket = free_port("127.0.0.1"), unique("bucket")
    at_port = ("-p", str(port))
    url = f"nats://127.0.0.1:{port}"
    without = NatsServer(jetstream=False, extra_args=at_port).start()
    try:
        proc, log = spawn(argv, env_for(url, bucket))
        await eventually(lambda: waits(log), timeout=20)
    finally:
        without.stop()
    # The same address, now with JetStream: the process reconnects and its next attempt opens the bucket.
    with NatsServer(store_dir=tmp_path / "js", extra_args=at_port) as server:
        assert server.url == url
        nc = await nats.connect(url)
        try:
            if argv == SERVICE:
                reply: Reply | None = await eventually(lambda: _listed(nc), timeout=20)
                assert reply is not None
                assert reply.status == 200, reply.envelope
            else:
                started = await eventually(
                    lambda: [r for r in log_lines(log) if r.get("event") == "started"], timeout=20
                )
                async with (
                    running(make_settings(url, TRIGGER_BUCKET=bucket)),
                    aiohttp.ClientSession() as http,
                ):
                    got = await call(http, "GET", f"{started[0]['url']}/trigger/triggers/stream/{unique()}")
                assert got.status == 404, got.envelope
            assert proc.poll() is None
            assert await stopped(proc) == 0, log.read_text()
        finally:
            await nc.close()
    assert "Traceback" not in log.read_text()


async def _listed(nc: Client) -> Reply | None:
    """The service's answer to a list request, once it answers."""
    try:
        return await request(nc, "ms.trigger.list", {"subject_pattern": "ms.trigger.>"}, timeout=0.5)
    except nats.errors.Error:
        return None


@pytest.mark.parametrize("argv", [SERVICE, SIDECAR], ids=["service", "sidecar"])
async def test_sigterm_while_nats_is_down_after_start_up_exits_0(argv: list[str], spawn: Spawn) -> None:
    server = NatsServer().start()
    try:
        proc, log = spawn(argv, env_for(server.url, unique("bucket")))
        await eventually(lambda: any(r.get("event") == "started" for r in log_lines(log)), timeout=20)
        server.stop()
        await eventually(lambda: "NATS connection error; retrying" in log.read_text(), timeout=20)
        assert await stopped(proc) == 0, log.read_text()
    finally:
        server.stop()
    assert "Traceback" not in log.read_text()


@pytest.mark.parametrize(
    ("error", "waited"),
    [
        (Unavailable("the trigger store is not available"), True),
        (TimeoutError(), True),
        (nats.errors.NoRespondersError(), True),
        (nats.js.errors.ServiceUnavailableError(), True),
        (nats.js.errors.APIError(code=500, err_code=10008, description="temporarily unavailable"), True),
        (nats.js.errors.BadRequestError(code=400, err_code=10052, description="invalid config"), False),
        (nats.errors.ConnectionClosedError(), False),
        (ValueError("a bug"), False),
    ],
)
async def test_wait_for_retries_what_may_pass_and_raises_the_rest_at_once(
    error: Exception, waited: bool
) -> None:
    attempts: list[None] = []

    async def attempt() -> str:
        attempts.append(None)
        if len(attempts) == 1:
            raise error
        return "opened"

    if waited:
        assert await wait_for("the thing", attempt) == "opened"
        assert len(attempts) == 2
    else:
        with pytest.raises(type(error)):
            await wait_for("the thing", attempt)
        assert len(attempts) == 1
