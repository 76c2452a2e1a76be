"""`make run` (service.devstack): which NATS server it uses, and the whole stack from start to Ctrl-C;
and `make run-cluster` (service.clusterstack) from start to Ctrl-C."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from pathlib import Path

import aiohttp
import pytest

from service import clusterstack, devstack
from service.natsserver import NatsServer
from tests.http_fixtures import call
from tests.support import stream_request, unique


def write_config(directory: Path, port: int, http_port: int) -> Path:
    """A copy of the project's nats-server.conf with these ports and a private store directory."""
    text = devstack.with_ports(Path("nats-server.conf").read_text(), port, http_port)
    text = text.replace('"./data/jetstream"', f'"{directory / "jetstream"}"')
    path = directory / "nats-server.conf"
    path.write_text(text)
    return path


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A scratch working directory (for `.dev/`), without NATS_URL."""
    config = Path("nats-server.conf").resolve()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "nats-server.conf").write_text(config.read_text())
    monkeypatch.delenv("NATS_URL", raising=False)
    return tmp_path


async def test_a_jetstream_server_on_the_port_is_reused(
    in_tmp: Path, nats_server: NatsServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """The configured port holds a NATS server with JetStream: it is used, nothing is started."""
    config = write_config(in_tmp, nats_server.port, devstack.free_port())
    async with contextlib.AsyncExitStack() as stack:
        url = await devstack.nats_url(stack, config)
    assert url == f"nats://127.0.0.1:{nats_server.port}"
    assert (
        f"port {nats_server.port} is taken by a NATS server with JetStream: reusing it"
        in capsys.readouterr().out
    )


async def test_a_server_without_jetstream_on_the_port_means_free_ports(
    in_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ports held by a server without JetStream: a config copy on free ports, and a server on them."""
    with NatsServer(jetstream=False) as plain:
        config = write_config(in_tmp, plain.port, plain.port)
        async with contextlib.AsyncExitStack() as stack:
            url = await devstack.nats_url(stack, config)
            assert url != plain.url
            assert await devstack.jetstream_at(url) is True
        assert await devstack.jetstream_at(url) is None, "the server it started is stopped"
        assert await devstack.jetstream_at(plain.url) is False, "the other server is left alone"
    said = capsys.readouterr().out
    assert f"port {plain.port} is taken by a NATS server without JetStream; starting nats-server" in said
    assert f"monitoring port {plain.port} is taken" in said
    written = (in_tmp / ".dev" / "nats-server.conf").read_text()
    assert f"port: {url.rsplit(':', 1)[1]}" in written


async def test_nats_url_that_answers_nothing_is_an_error(
    in_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NATS_URL pointing at nothing fails loudly rather than starting another server."""
    monkeypatch.setenv("NATS_URL", f"nats://127.0.0.1:{devstack.free_port()}")
    async with contextlib.AsyncExitStack() as stack:
        with pytest.raises(devstack.DevstackError, match="no NATS server answers there"):
            await devstack.nats_url(stack)


async def test_the_stack_starts_answers_and_stops_on_ctrl_c(in_tmp: Path, nats_server: NatsServer) -> None:
    """`python -m service.devstack`: banner with URL and token, a working API, then a clean SIGINT exit."""
    env = {
        **os.environ,
        "NATS_URL": nats_server.url,
        "TRIGGER_HTTP_ADDR": "127.0.0.1:0",
        "TRIGGER_BUCKET": unique("bucket"),
        "LOG_LEVEL": "warning",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service.devstack", env=env, stdout=asyncio.subprocess.PIPE, cwd=in_tmp
    )
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(60):
            while not lines or not lines[-1].startswith("export TOKEN="):
                line = (await proc.stdout.readline()).decode()
                assert line, "devstack ended before printing its banner:\n" + "".join(lines)
                lines.append(line.rstrip("\n"))
        url = next(line.split()[2] for line in lines if line.strip().startswith("HTTP API"))
        token = lines[-1].removeprefix("export TOKEN=")
        assert (in_tmp / ".dev" / "jwt-secret").is_file()
        async with aiohttp.ClientSession() as http:
            health = await call(http, "GET", f"{url}/healthz", account=None)
            assert health.status == 200, health.envelope
            listed = await call(
                http,
                "GET",
                f"{url}/trigger/triggers",
                account=None,
                headers={"Authorization": f"Bearer {token}"},
                params={"subject_pattern": "ms.trigger.>"},
            )
            assert listed.status == 200, listed.envelope
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(30):
            rest = (await proc.stdout.read()).decode()
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert "sidecar stopped" in rest
    assert "service stopped" in rest
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientConnectionError):
            await http.get(f"{url}/healthz")


async def test_the_cluster_stack_starts_answers_and_stops_on_ctrl_c(in_tmp: Path) -> None:
    """`python -m service.clusterstack`: three nodes, a trigger created through the sidecar, then a
    clean SIGINT exit that leaves no node, service or sidecar behind."""
    env = {
        **os.environ,
        "TRIGGER_HTTP_ADDR": "127.0.0.1:0",
        "TRIGGER_BUCKET": unique("bucket"),
        "LOG_LEVEL": "warning",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service.clusterstack", env=env, stdout=asyncio.subprocess.PIPE, cwd=in_tmp
    )
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(90):
            while not lines or lines[-1] != clusterstack.LAST_LINE:
                line = (await proc.stdout.readline()).decode()
                assert line, "clusterstack ended before printing its banner:\n" + "".join(lines)
                lines.append(line.rstrip("\n"))
        url = next(line.split()[2] for line in lines if line.strip().startswith("HTTP API"))
        token = next(line.removeprefix("export TOKEN=") for line in lines if line.startswith("export TOKEN="))
        nodes = [line.split() for line in lines if re.match(r"  n[123]   pid \d+ ", line)]
        assert [node[0] for node in nodes] == ["n1", "n2", "n3"]
        pids, urls = [int(node[2]) for node in nodes], [node[3] for node in nodes]
        assert f"kill -9 {pids[1]}" in lines
        assert all((in_tmp / "data" / "cluster" / name).is_dir() for name in ("n1", "n2", "n3"))
        async with aiohttp.ClientSession() as http:
            created = await call(
                http,
                "POST",
                f"{url}/trigger/stream",
                account=None,
                headers={"Authorization": f"Bearer {token}"},
                json=stream_request(unique(), "cluster.s", "cluster.d"),
            )
            assert created.status == 201, created.envelope
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(30):
            rest = (await proc.stdout.read()).decode()
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert "sidecar stopped" in rest
    assert "service-1 stopped" in rest
    assert "service-2 stopped" in rest
    assert "nats-server nodes stopped" in rest
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientConnectionError):
            await http.get(f"{url}/healthz")
    for pid, node_url in zip(pids, urls, strict=True):
        assert not await devstack._listening(node_url)
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
