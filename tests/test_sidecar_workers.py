"""TRIGGER_HTTP_WORKERS: several sidecar processes on one port (SO_REUSEPORT), supervised as one."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from service.devstack import free_port
from service.natsserver import NatsServer
from tests.support import eventually, unique
from tests.test_startup import SIDECAR, env_for, log_lines


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[list[tuple[subprocess.Popen[bytes], Path]]]:
    """Started sidecars, each in a session of its own: whatever is left of one (its workers) is
    killed at the end."""
    started: list[tuple[subprocess.Popen[bytes], Path]] = []
    yield started
    for proc, _ in started:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _start(
    started: list[tuple[subprocess.Popen[bytes], Path]], tmp_path: Path, env: dict[str, str]
) -> tuple[subprocess.Popen[bytes], Path]:
    log = tmp_path / f"sidecar-{len(started)}.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            SIDECAR, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    started.append((proc, log))
    return proc, log


def _children(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/task/{pid}/children").read_text().split()


def _events(log: Path, event: str) -> int:
    return sum(1 for line in log_lines(log) if line.get("event") == event)


async def _two_workers(
    nats_server: NatsServer, tmp_path: Path, processes: list[tuple[subprocess.Popen[bytes], Path]]
) -> tuple[subprocess.Popen[bytes], Path, int]:
    """A sidecar of two workers on a free port, once both have started: its process, log and port."""
    port = free_port()
    env = env_for(
        nats_server.url, unique("bucket"), TRIGGER_HTTP_ADDR=f"127.0.0.1:{port}", TRIGGER_HTTP_WORKERS="2"
    )
    proc, log = _start(processes, tmp_path, env)
    await eventually(lambda: _events(log, "started") == 2, timeout=30)
    return proc, log, port


async def test_two_workers_serve_one_port_and_stop_together_on_sigterm(
    nats_server: NatsServer, tmp_path: Path, processes
) -> None:
    proc, log, port = await _two_workers(nats_server, tmp_path, processes)
    connector = aiohttp.TCPConnector(force_close=True)  # a connection per request: spread over both
    async with aiohttp.ClientSession(connector=connector) as http:
        for _ in range(20):
            async with http.get(f"http://127.0.0.1:{port}/no/such/route") as response:
                assert response.status == 404
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait, 20) == 0
    assert _events(log, "stopped") == 2


async def test_a_worker_that_dies_ends_the_sidecar(
    nats_server: NatsServer, tmp_path: Path, processes
) -> None:
    proc, log, _ = await _two_workers(nats_server, tmp_path, processes)
    workers = [int(pid) for pid in _children(proc.pid)]
    assert len(workers) == 2
    os.kill(workers[0], signal.SIGKILL)
    assert await asyncio.to_thread(proc.wait, 20) != 0
    assert _events(log, "stopped") == 1  # the other worker drained and stopped


async def test_workers_on_port_0_are_refused_naming_the_variable(
    nats_server: NatsServer, tmp_path: Path, processes
) -> None:
    env = env_for(nats_server.url, unique("bucket"), TRIGGER_HTTP_WORKERS="2")  # TRIGGER_HTTP_ADDR port 0
    proc, log = _start(processes, tmp_path, env)
    assert await asyncio.to_thread(proc.wait, 20) == 2
    assert "TRIGGER_HTTP_WORKERS" in log.read_text()
