"""The service as a process: discovery, start-up checks, persistence, signals, failures."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest
from nats.js.api import StorageType

from service.app import running
from tests.conftest import make_settings
from tests.support import SECRET, eventually, request, stream_request, unique


@pytest.mark.usefixtures("service")
async def test_micro_discovery_lists_every_endpoint(nc, settings):
    info = json.loads((await nc.request("$SRV.INFO.trigger-service", b"", timeout=2)).data)
    assert info["name"] == "trigger-service"
    endpoints = {e["name"]: e for e in info["endpoints"]}
    assert {e["subject"] for e in endpoints.values()} == {
        "ms.trigger.create.stream",
        "ms.trigger.create.gateway",
        "ms.trigger.get.*.*",
        "ms.trigger.update.*.*",
        "ms.trigger.patch.*.*",
        "ms.trigger.list",
        "ms.trigger.delete.*.*",
        "ms.trigger.history.*.*",
    }
    assert endpoints["get"]["metadata"]["http"] == "GET /trigger/triggers/{type}/{name}"
    assert endpoints["create-stream"]["metadata"]["http"] == "POST /trigger/stream"
    assert endpoints["update"]["metadata"]["http"] == "PUT /trigger/triggers/{type}/{name}"
    assert endpoints["patch"]["metadata"]["http"] == "PATCH /trigger/triggers/{type}/{name}"
    ping = json.loads((await nc.request("$SRV.PING.trigger-service", b"", timeout=2)).data)
    assert ping["name"] == "trigger-service"

    await request(nc, "ms.trigger.list", {"subject_pattern": "ms.trigger.>"})
    await request(nc, "ms.trigger.list", {"subject_pattern": "nope"})
    await request(nc, f"ms.trigger.get.stream.{unique()}")
    stats = json.loads((await nc.request("$SRV.STATS.trigger-service", b"", timeout=2)).data)
    endpoints = {e["name"]: e for e in stats["endpoints"]}
    assert endpoints["list"]["num_requests"] == 2
    assert endpoints["list"]["num_errors"] == 1
    assert endpoints["list"]["last_error"].startswith("400:Invalid request: ")
    assert endpoints["list"]["average_processing_time"] > 0
    assert endpoints["list"]["data"]["in_flight"] == 0
    assert endpoints["get"]["num_errors"] == 1
    assert endpoints["get"]["last_error"].startswith("404:Not found: ")
    assert endpoints["create-stream"]["num_errors"] == 0


async def test_two_replicas_share_the_load_through_the_queue_group(nats_server, nc, settings):
    async with running(settings) as one, running(settings) as two:
        await asyncio.gather(
            *(request(nc, "ms.trigger.list", {"subject_pattern": "ms.trigger.>"}) for _ in range(60))
        )
        counts = [
            next(e for e in api.service.stats().endpoints if e.name == "list").num_requests
            for api in (one, two)
        ]
    assert sum(counts) == 60
    assert all(c > 0 for c in counts)


async def test_many_requests_in_flight_are_all_answered(nc, settings):
    async with running(settings):
        names = [unique() for _ in range(300)]
        replies = await asyncio.gather(
            *(
                request(nc, "ms.trigger.create.stream", stream_request(n, f"f.{i}", f"g.{i}"))
                for i, n in enumerate(names)
            )
        )
    assert {r.status for r in replies} == {201}


async def test_requests_run_concurrently_up_to_the_in_flight_bound(nats_server, nc):
    settings = make_settings(nats_server.url, TRIGGER_MAX_IN_FLIGHT=4)
    async with running(settings):
        replies = await asyncio.gather(
            *(
                request(nc, "ms.trigger.create.stream", stream_request(unique(), f"k.{i}", f"l.{i}"))
                for i in range(100)
            )
        )
        stats = json.loads((await nc.request("$SRV.STATS.trigger-service", b"", timeout=2)).data)
    assert {r.status for r in replies} == {201}
    created = next(e for e in stats["endpoints"] if e["name"] == "create-stream")
    assert created["num_requests"] == 100
    assert 1 < created["data"]["peak_in_flight"] <= 4


async def test_kv_unavailable_is_503(nats_server, nc):
    settings = make_settings(nats_server.url)
    async with running(settings):
        await nc.jetstream().delete_stream(f"KV_{settings.bucket}")
        reply = await request(nc, f"ms.trigger.get.stream.{unique()}")
        create = await request(nc, "ms.trigger.create.stream", stream_request(unique(), "u.a", "u.b"))
    assert (reply.status, create.status) == (503, 503)
    assert reply.envelope["error"].startswith("Service unavailable: ")


async def test_unexpected_error_is_a_bland_500_and_the_service_keeps_serving(nats_server, nc):
    settings = make_settings(nats_server.url)
    name = unique()
    async with running(settings):
        kv = await nc.jetstream().key_value(settings.bucket)
        await kv.put(f"acme.stream.{name}", b"\x00 not a record")
        broken = await request(nc, f"ms.trigger.get.stream.{name}")
        fine = await request(nc, "ms.trigger.create.stream", stream_request(unique(), "v.a", "v.b"))
    assert broken.status == 500
    assert broken.envelope == {
        "error": "Internal server error: unable to process the request",
        "status_code": 500,
    }
    assert broken.headers["Nats-Service-Error-Code"] == "500"
    assert fine.status == 201


# --- the process ----------------------------------------------------------------------------


def service_env(url: str, bucket: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRIGGER_", "NATS_"))}
    env.update(
        NATS_URL=url, TRIGGER_BUCKET=bucket, TRIGGER_JWT_SECRET=SECRET, LOG_FORMAT="json", LOG_LEVEL="info"
    )
    env.update(extra)
    return env


def start_process(env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "service"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def start_logged(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("w") as out:
        return subprocess.Popen([sys.executable, "-m", "service"], env=env, stdout=out, stderr=out)


async def wait_ready(nc, bucket: str) -> None:
    async def answers() -> bool:
        try:
            msg = await nc.request("$SRV.INFO.trigger-service", b"", timeout=0.5)
        except Exception:
            return False
        return json.loads(msg.data)["metadata"].get("bucket") == bucket

    await eventually(answers, timeout=20)


async def stop_process(proc: subprocess.Popen[str]) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    _, err = await asyncio.to_thread(proc.communicate, timeout=20)
    return proc.returncode, err


async def test_records_survive_a_restart_untouched_and_sigterm_exits_0(nats_server, nc):
    bucket = unique("bucket")
    env = service_env(nats_server.url, bucket)
    proc = start_process(env)
    try:
        await wait_ready(nc, bucket)
        names = [unique() for _ in range(5)]
        for i, name in enumerate(names):
            assert (
                await request(nc, "ms.trigger.create.stream", stream_request(name, f"p.{i}", f"q.{i}"))
            ).status == 201
        await request(nc, f"ms.trigger.delete.stream.{names[0]}")
        kv = await nc.jetstream().key_value(bucket)
        before = (await nc.jetstream().stream_info(f"KV_{bucket}")).state
        code, err = await stop_process(proc)
        assert code == 0, err
        lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
        created = [r for r in lines if r.get("event") == "request" and r.get("operation") == "create-stream"]
        assert len(created) == 5
        assert all(r["status"] == 201 and r["account"] == "acme" and "duration_ms" in r for r in created)
        assert all(r["subject"] == "ms.trigger.create.stream" for r in created)

        proc = start_process(env)
        await wait_ready(nc, bucket)
        after = (await nc.jetstream().stream_info(f"KV_{bucket}")).state
        assert (after.last_seq, after.messages) == (before.last_seq, before.messages)
        for name in names[1:]:
            assert (await request(nc, f"ms.trigger.get.stream.{name}")).status == 200
        assert (await request(nc, f"ms.trigger.get.stream.{names[0]}")).status == 404
        assert len(await kv.history(f"acme.stream.{names[0]}")) == 2
    finally:
        if proc.poll() is None:
            code, err = await stop_process(proc)
            assert code == 0, err


async def test_sigterm_drains_requests_in_flight(nats_server, nc):
    bucket = unique("bucket")
    # Warnings only: stderr is read at exit, and 200 requests' info lines would fill the pipe and
    # block the service's writes (its replies then wait for the SIGTERM).
    proc = start_process(service_env(nats_server.url, bucket, LOG_LEVEL="warning"))
    await wait_ready(nc, bucket)

    async def create(i: int):
        try:
            return await request(nc, "ms.trigger.create.stream", stream_request(f"n{i}", f"s.{i}", f"d.{i}"))
        except Exception:
            return None  # sent after the service stopped listening: no responders

    pending = [asyncio.create_task(create(i)) for i in range(200)]
    await asyncio.sleep(0)
    await eventually(lambda: any(t.done() for t in pending), timeout=10)
    code, err = await stop_process(proc)
    replies = await asyncio.gather(*pending)
    assert code == 0, err
    acknowledged = [r for r in replies if r is not None and r.status == 201]
    assert acknowledged
    kv = await nc.jetstream().key_value(bucket)
    for r in acknowledged:
        entry = await kv.get(f"acme.stream.{r.body['name']}")
        assert {**msgspec.json.decode(entry.value), "revision": entry.revision} == r.body


async def test_unreachable_nats_is_retried_and_sigterm_still_stops_the_start_up(tmp_path):
    from service.devstack import free_port

    env = service_env(f"nats://127.0.0.1:{free_port()}", unique("bucket"), LOG_LEVEL="warning")
    log = tmp_path / "service.log"
    proc = start_logged(env, log)
    try:
        await eventually(lambda: "NATS connection error; retrying" in log.read_text(), timeout=20)
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({}, "TRIGGER_JWT_SECRET or TRIGGER_JWT_PUBLIC_KEY"),
        ({"TRIGGER_AUTH": "none", "TRIGGER_REPLICAS": "three"}, "TRIGGER_REPLICAS"),
        ({"TRIGGER_AUTH": "sometimes"}, "TRIGGER_AUTH"),
        ({"TRIGGER_JWT_SECRET": "short"}, "TRIGGER_JWT_SECRET"),
        ({"TRIGGER_AUTH": "none", "TRIGGER_PREFIX": "ms..trigger"}, "TRIGGER_PREFIX"),
        ({"TRIGGER_AUTH": "none", "TRIGGER_ROUTING": "accounts"}, "TRIGGER_OPERATOR_SEED"),
    ],
)
def test_bad_configuration_refuses_to_start_naming_the_variable(env, says):
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("TRIGGER_", "NATS_"))}
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "service"], env={**clean, **env}, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2
    assert says in done.stderr
    assert time.monotonic() - started < 30


async def test_the_bucket_is_created_with_file_storage_and_history_64(nats_server, nc):
    settings = make_settings(nats_server.url)
    async with running(settings):
        info = await nc.jetstream().stream_info(f"KV_{settings.bucket}")
    assert info.config.max_msgs_per_subject == 64
    assert info.config.storage == StorageType.FILE
    assert info.config.num_replicas == 1


async def test_an_existing_bucket_is_bound_as_it_is(nats_server, nc):
    settings = make_settings(nats_server.url)
    kv = await nc.jetstream().create_key_value(bucket=settings.bucket, history=5)
    await kv.put("acme.stream.kept", b"not touched")
    async with running(settings):
        info = await nc.jetstream().stream_info(f"KV_{settings.bucket}")
    assert info.config.max_msgs_per_subject == 5
    assert (await kv.get("acme.stream.kept")).value == b"not touched"
