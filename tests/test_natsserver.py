"""The suite's own nats-server launcher: which binary it runs, and that it refuses servers older than
the minimum version; and a server restarted on the same ports and store."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import nats
import pytest

from service import natsserver, serverversion


@pytest.fixture(autouse=True)
def _fresh_lookup(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("NATS_SERVER_BIN", raising=False)
    natsserver.binary.cache_clear()
    yield
    natsserver.binary.cache_clear()


def fake_server(directory: Path, version: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "nats-server"
    path.write_text(f'#!/bin/sh\necho "nats-server: {version}"\n')
    path.chmod(0o755)
    return path


@pytest.fixture
def no_venv_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An interpreter with no nats-server beside it, and a PATH without one."""
    monkeypatch.setattr(sys, "executable", str(tmp_path / "novenv" / "python"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))


@pytest.mark.parametrize("version", ["v2.8.4", "v2.9.25", "v2.11.9"])
def test_an_old_nats_server_is_refused_with_the_minimum_version(tmp_path, monkeypatch, version):
    path = fake_server(tmp_path, version)
    monkeypatch.setenv("NATS_SERVER_BIN", str(path))
    with pytest.raises(natsserver.NatsServerError) as refused:
        natsserver.binary()
    message = str(refused.value)
    assert f"{path} runs nats-server {version}" in message
    assert f"needs nats-server {serverversion.MINIMUM_TEXT} or later" in message
    assert serverversion.MINIMUM_TEXT == "2.12.0"


def test_a_server_of_unknown_version_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "nats-server"
    path.write_text("#!/bin/sh\necho something else\n")
    path.chmod(0o755)
    monkeypatch.setenv("NATS_SERVER_BIN", str(path))
    with pytest.raises(natsserver.NatsServerError, match=r"needs nats-server 2\.12\.0 or later"):
        natsserver.binary()


def test_a_binary_that_cannot_run_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("NATS_SERVER_BIN", str(tmp_path / "missing"))
    with pytest.raises(natsserver.NatsServerError, match="cannot be run"):
        natsserver.binary()


@pytest.mark.parametrize("version", ["v2.12.0", "v2.15.1", "v3.0.0"])
def test_a_new_enough_nats_server_is_used(tmp_path, monkeypatch, version):
    path = fake_server(tmp_path, version)
    monkeypatch.setenv("NATS_SERVER_BIN", str(path))
    assert natsserver.binary() == str(path)


def test_nats_server_bin_wins_over_the_venv_and_path(tmp_path, monkeypatch):
    chosen = fake_server(tmp_path / "chosen", "v2.12.1")
    fake_server(tmp_path / "venv", "v2.15.1")
    fake_server(tmp_path / "path", "v2.15.1")
    monkeypatch.setattr(sys, "executable", str(tmp_path / "venv" / "python"))
    monkeypatch.setenv("PATH", str(tmp_path / "path"))
    monkeypatch.setenv("NATS_SERVER_BIN", str(chosen))
    assert natsserver.binary() == str(chosen)


def test_the_one_beside_the_interpreter_wins_over_path(tmp_path, monkeypatch):
    venv = fake_server(tmp_path / "venv", "v2.15.1")
    fake_server(tmp_path / "path", "v2.15.1")
    monkeypatch.setattr(sys, "executable", str(tmp_path / "venv" / "python"))
    monkeypatch.setenv("PATH", str(tmp_path / "path"))
    assert natsserver.binary() == str(venv)


def test_path_is_the_last_resort(tmp_path, monkeypatch, no_venv_server):
    on_path = fake_server(tmp_path / "empty", "v2.12.0")
    assert natsserver.binary() == str(on_path)


@pytest.mark.usefixtures("no_venv_server")
def test_no_nats_server_anywhere_says_how_to_get_one():
    with pytest.raises(natsserver.NatsServerError, match=r"make setup.*nats-server-bin.*NATS_SERVER_BIN"):
        natsserver.binary()


def test_the_venv_has_the_nats_server_pyproject_pins():
    """`make setup` installs nats-server-bin: its binary is the one found by default, at the pinned
    version."""
    dev = tomllib.loads(Path("pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    pinned = next(re.fullmatch(r"nats-server-bin==([\d.]+)", d) for d in dev if "nats-server-bin" in d)
    assert pinned is not None
    found = natsserver.binary()
    assert found == str(Path(sys.executable).parent / "nats-server")
    out = subprocess.run([found, "--version"], capture_output=True, text=True, check=True).stdout
    assert serverversion.parse(out) == serverversion.parse(pinned[1])


async def test_a_restarted_server_keeps_its_port_and_its_store(tmp_path):
    server = natsserver.NatsServer(store_dir=tmp_path / "store").start()
    try:
        port, pid = server.port, server.pid
        nc = await nats.connect(server.url)
        kv = await nc.jetstream().create_key_value(bucket="kept")
        await kv.put("key", b"value")
        await nc.close()
        server.kill()
        assert not server.running
        server.restart()
        assert (server.port, server.running) == (port, True)
        assert server.pid != pid
        nc = await nats.connect(server.url)
        kv = await nc.jetstream().key_value("kept")
        assert (await kv.get("key")).value == b"value"
        await nc.close()
    finally:
        server.stop()
    assert (tmp_path / "store").is_dir(), "a store it did not make stays"
