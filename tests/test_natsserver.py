"""The suite's own nats-server launcher refuses servers older than the minimum version."""

from __future__ import annotations

import pytest

from service import natsserver


@pytest.fixture(autouse=True)
def _fresh_lookup():
    natsserver.binary.cache_clear()
    yield
    natsserver.binary.cache_clear()


def fake_server(tmp_path, version: str):
    path = tmp_path / "nats-server"
    path.write_text(f'#!/bin/sh\necho "nats-server: {version}"\n')
    path.chmod(0o755)
    return path


def test_an_old_nats_server_is_refused_with_the_minimum_version(tmp_path, monkeypatch):
    monkeypatch.setenv("NATS_SERVER_BIN", str(fake_server(tmp_path, "v2.8.4")))
    with pytest.raises(natsserver.NatsServerError, match=r">= 2\.9"):
        natsserver.binary()


def test_a_new_enough_nats_server_is_used(tmp_path, monkeypatch):
    path = fake_server(tmp_path, "v2.10.1")
    monkeypatch.setenv("NATS_SERVER_BIN", str(path))
    assert natsserver.binary() == str(path)
