"""Prometheus metrics: the service's own listener and the sidecar's `/metrics`, scraped with the
real parser and checked against the traffic each test sent."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from prometheus_client.parser import text_string_to_metric_families

from service import config
from service.app import running
from service.devstack import free_port
from service.gateway.app import running_gateway
from service.natsserver import NatsServer
from service.routing import Api
from tests import http_fixtures
from tests.conftest import make_settings
from tests.http_fixtures import on_free_port
from tests.support import Inbox, eventually, gateway_request, request, stream_request, token, unique

http = http_fixtures.http
DASHBOARD = Path(__file__).parent.parent / "deploy" / "grafana-dashboard.json"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
def settings(nats_server: NatsServer) -> config.Settings:
    """Settings with a fresh bucket and the service's metrics listener on a free port."""
    return make_settings(nats_server.url, TRIGGER_METRICS_ADDR="127.0.0.1:0")


@pytest.fixture
async def service(settings: config.Settings) -> AsyncIterator[Api]:
    async with running(settings) as api:
        yield api


@pytest.fixture
async def sidecar(settings: config.Settings, service: Api) -> AsyncIterator[str]:
    async with running_gateway(on_free_port(settings)) as url:
        yield url


def parse(text: str) -> Samples:
    """Every sample of a scrape, by (name, labels)."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    """The sample `name{labels}`, or None when the scrape has no such series."""
    return samples.get((name, frozenset(labels.items())))


async def scrape(http: aiohttp.ClientSession, url: str, account: str | None = None) -> Samples:
    headers = {"Authorization": f"Bearer {token(account)}"} if account else {}
    async with http.get(url, headers=headers) as response:
        assert response.status == 200, await response.text()
        assert response.headers["Content-Type"].startswith("text/plain")
        return parse(await response.text())


def service_metrics(api: Api) -> str:
    return f"http://127.0.0.1:{api.metrics_port}/metrics"


async def test_api_requests_are_counted_by_operation_and_status_with_their_latency(nc, service, http):
    names = [unique() for _ in range(7)]
    for name in names:
        reply = await request(nc, "ms.trigger.create.stream", stream_request(name, f"m.{name}", f"d.{name}"))
        assert reply.status == 201, reply.envelope
    for _ in range(3):
        assert (await request(nc, f"ms.trigger.get.stream.{unique('missing')}")).status == 404
    assert (await request(nc, "ms.trigger.list", {}, account=None)).status == 401

    samples = await scrape(http, service_metrics(service))
    assert value(samples, "trigger_api_requests_total", operation="create-stream", status="201") == 7
    assert value(samples, "trigger_api_requests_total", operation="get", status="404") == 3
    assert value(samples, "trigger_api_requests_total", operation="list", status="401") == 1
    assert value(samples, "trigger_api_request_duration_seconds_count", operation="create-stream") == 7
    assert value(samples, "trigger_api_request_duration_seconds_bucket", operation="get", le="+Inf") == 3
    assert value(samples, "trigger_api_requests_in_flight") == 0
    assert value(samples, "trigger_routes_live", kind="stream") == 7
    assert value(samples, "trigger_follower_lag_sequences", keys="*.stream.*") == 0


async def test_a_stream_route_counts_what_it_carried_and_its_series_go_when_it_is_deleted(
    nc: Client, service, http
):
    name = unique()
    source, target = f"m.{name}", f"d.{name}"
    assert (await request(nc, "ms.trigger.create.stream", stream_request(name, source, target))).status == 201
    inbox = await Inbox.on(nc, target)
    payloads = [f"message-{i:02d}".encode() for i in range(5)]  # 10 bytes each
    for payload in payloads:
        await nc.publish(source, payload)
    await inbox.wait_for(*payloads)

    samples = await scrape(http, service_metrics(service))
    assert value(samples, "trigger_stream_messages_total", account="acme", trigger=name) == 5
    assert value(samples, "trigger_stream_bytes_total", account="acme", trigger=name) == 50
    assert value(samples, "trigger_stream_carry_failures_total", account="acme", trigger=name) == 0

    assert (await request(nc, f"ms.trigger.delete.stream.{name}")).status == 200
    samples = await scrape(http, service_metrics(service))
    assert not [key for key in samples if ("trigger", name) in key[1]], "a deleted trigger's series remain"
    assert value(samples, "trigger_routes_live", kind="stream") == 0


async def test_a_durable_route_counts_delivered_redelivered_dead_lettered_and_pending(
    nc: Client, service, http
):
    """Four messages to a target that fails message 3 every time and message 1 once: 3 delivered,
    1 redelivery of message 1 plus 2 of message 3, 1 dead letter, nothing pending at the end."""
    name = unique()
    attempts: dict[bytes, int] = {}

    async def target(msg: Msg) -> None:
        attempts[msg.data] = attempts.get(msg.data, 0) + 1
        failing = msg.data == b"3" or (msg.data == b"1" and attempts[msg.data] == 1)
        await nc.publish(msg.reply, b'{"status_code": 500}' if failing else b'{"status_code": 200}')

    await nc.subscribe(f"out.{name}", cb=target)
    dead = await Inbox.on(nc, f"dead.{name}")
    delivery = {
        "mode": "durable",
        "attempts": 3,
        "backoff": "linear",
        "backoff_delay_ms": 20,
        "backoff_max_ms": 50,
        "timeout_ms": 1000,
        "dead_letter_subject": f"dead.{name}",
    }
    body = stream_request(name, f"in.{name}", f"out.{name}", delivery=delivery)
    assert (await request(nc, "ms.trigger.create.stream", body)).status == 201
    for number in (b"0", b"1", b"2", b"3"):
        await nc.publish(f"in.{name}", number)
    await dead.wait_for(b"3")

    async def counted() -> bool:
        samples = await scrape(http, service_metrics(service))
        return (
            value(samples, "trigger_durable_delivered_total", account="acme", trigger=name) == 3
            and value(samples, "trigger_durable_pending", account="acme", trigger=name) == 0
        )

    await eventually(counted, timeout=5)
    samples = await scrape(http, service_metrics(service))
    assert value(samples, "trigger_durable_redelivered_total", account="acme", trigger=name) == 3
    assert value(samples, "trigger_durable_dead_lettered_total", account="acme", trigger=name) == 1
    assert (await request(nc, f"ms.trigger.delete.stream.{name}")).status == 200
    samples = await scrape(http, service_metrics(service))
    assert not [key for key in samples if ("trigger", name) in key[1]], "a deleted trigger's series remain"


async def create_gateway(nc: Client, name: str, path: str, **mapping: object) -> str:
    reply = await request(nc, "ms.trigger.create.gateway", gateway_request(name, "GET", path, **mapping))
    assert reply.status == 201, reply.envelope
    subject: str = reply.body["gateway_mapping_subject"]
    return subject


async def get_status(http: aiohttp.ClientSession, url: str) -> int:
    async with http.get(url, headers={"Authorization": f"Bearer {token()}"}) as response:
        await response.read()
        return response.status


async def test_a_gateway_route_counts_statuses_rate_limits_timeouts_and_no_responders(
    nc: Client, sidecar, http
):
    answered, limited, slow, alone = (unique() for _ in range(4))
    subject = await create_gateway(nc, answered, f"/{answered}")
    limited_subject = await create_gateway(nc, limited, f"/{limited}", limit={"request": 2, "time": 60_000})
    slow_subject = await create_gateway(nc, slow, f"/{slow}", timeout=100)
    await create_gateway(nc, alone, f"/{alone}")

    async def reply(msg: Msg) -> None:
        await nc.publish(msg.reply, b"ok")

    for listen in (subject, limited_subject):
        await nc.subscribe(listen, cb=reply)
    await nc.subscribe(slow_subject, cb=_ignore)  # takes requests, never answers
    await nc.flush()
    await eventually(lambda: answers(http, f"{sidecar}/{answered}", 200))
    for _ in range(3):
        assert await get_status(http, f"{sidecar}/{answered}") == 200
    assert [await get_status(http, f"{sidecar}/{limited}") for _ in range(3)] == [200, 200, 429]
    assert await get_status(http, f"{sidecar}/{slow}") == 504
    assert await get_status(http, f"{sidecar}/{alone}") == 503

    samples = await scrape(http, f"{sidecar}/metrics", "acme")
    assert value(samples, "trigger_gateway_requests_total", account="acme", trigger=answered, code="2xx") == 4
    assert value(samples, "trigger_gateway_requests_total", account="acme", trigger=limited, code="2xx") == 2
    assert value(samples, "trigger_gateway_requests_total", account="acme", trigger=limited, code="4xx") == 1
    assert value(samples, "trigger_gateway_rate_limited_total", account="acme", trigger=limited) == 1
    assert value(samples, "trigger_gateway_timeouts_total", account="acme", trigger=slow) == 1
    assert value(samples, "trigger_gateway_no_responders_total", account="acme", trigger=alone) == 1
    assert value(samples, "trigger_gateway_requests_total", account="acme", trigger=alone, code="5xx") == 1
    assert (
        value(samples, "trigger_gateway_request_duration_seconds_count", account="acme", trigger=answered)
        == 4
    )
    assert value(samples, "trigger_routes_live", kind="gateway") == 4
    assert value(samples, "trigger_http_requests_total", route="gateway", status="200") == 6
    assert value(samples, "trigger_follower_lag_sequences", keys="*.gateway.*") == 0

    assert (await request(nc, f"ms.trigger.delete.gateway.{answered}")).status == 200
    await eventually(lambda: answers(http, f"{sidecar}/{answered}", 404))
    samples = await scrape(http, f"{sidecar}/metrics", "acme")
    assert not [key for key in samples if ("trigger", answered) in key[1]], (
        "a deleted trigger's series remain"
    )
    assert value(samples, "trigger_routes_live", kind="gateway") == 3


async def test_the_sidecars_metrics_need_a_token_and_show_only_the_callers_account(nc, sidecar, http):
    name = unique()
    await create_gateway(nc, name, f"/{name}")
    await eventually(lambda: answers(http, f"{sidecar}/{name}", 503))  # no responder

    async with http.get(f"{sidecar}/metrics") as response:
        assert response.status == 401
        assert response.headers["WWW-Authenticate"] == "Bearer"
        assert (await response.json())["status_code"] == 401
    mine = await scrape(http, f"{sidecar}/metrics", "acme")
    theirs = await scrape(http, f"{sidecar}/metrics", "other")
    assert value(mine, "trigger_gateway_no_responders_total", account="acme", trigger=name) == 1
    assert not [key for key in theirs if ("account", "acme") in key[1]]
    assert value(theirs, "trigger_routes_live", kind="gateway") is not None  # series of no account


async def test_api_requests_over_http_are_answered_and_counted_alike_in_every_spelling(nc, sidecar, http):
    """A plain path and one with percent-escapes take different ways through the sidecar (the fast
    lane, aiohttp's router): the same answers, counted under the same route template."""
    name = unique()
    auth = {"Authorization": f"Bearer {token('acme')}"}
    body = stream_request(name, f"m.{name}", f"d.{name}")
    async with http.post(f"{sidecar}/trigger/stream", json=body, headers=auth) as response:
        assert response.status == 201, await response.text()
    answers_ = []
    for path in (f"/trigger/triggers/stream/{name}", "/trigger/triggers/%73tream/" + name):
        async with http.get(f"{sidecar}{path}", headers=auth) as response:
            answers_.append((response.status, response.headers.get("ETag"), (await response.json())["body"]))
    assert answers_[0] == answers_[1]
    assert answers_[0][0] == 200
    assert answers_[0][2]["name"] == name
    async with http.get(f"{sidecar}/trigger/triggers/stream/{unique()}", headers=auth) as response:
        assert response.status == 404
    async with http.delete(f"{sidecar}/trigger/triggers/stream/{name}/history", headers=auth) as response:
        assert response.status == 405  # not a route of the table: the router's answer
    samples = await scrape(http, f"{sidecar}/metrics", "acme")
    assert value(samples, "trigger_http_requests_total", route="/trigger/stream", status="201") == 1
    by_name = "/trigger/triggers/{type}/{name}"
    assert value(samples, "trigger_http_requests_total", route=by_name, status="200") == 2
    assert value(samples, "trigger_http_requests_total", route=by_name, status="404") == 1


async def test_the_sidecars_private_listener_serves_every_account_without_a_token(
    nc: Client, settings: config.Settings, service, http
):
    private = f"127.0.0.1:{free_port()}"
    async with running_gateway(on_free_port(settings, metrics_addr=private)) as url:
        mine, theirs = unique(), unique()
        await create_gateway(nc, mine, f"/{mine}")
        reply = await request(nc, "ms.trigger.create.gateway", gateway_request(theirs, "GET", f"/{theirs}"),
                              account="other")  # fmt: skip
        assert reply.status == 201
        await eventually(lambda: answers(http, f"{url}/{mine}", 503))
        await eventually(lambda: answers(http, f"{url}/{theirs}", 503))
        samples = await scrape(http, f"http://{private}/metrics")
    assert value(samples, "trigger_gateway_requests_total", account="acme", trigger=mine, code="5xx") == 1
    assert value(samples, "trigger_gateway_requests_total", account="other", trigger=theirs, code="5xx") == 1


async def test_every_metric_the_grafana_dashboard_queries_exists_in_a_scrape(nc, service, sidecar, http):
    name = unique()
    await create_gateway(nc, name, f"/{name}")
    assert (
        await request(nc, "ms.trigger.create.stream", stream_request(name, f"m.{name}", f"d.{name}"))
    ).status
    await eventually(lambda: answers(http, f"{sidecar}/{name}", 503))
    await nc.publish(f"m.{name}", b"x")
    await nc.flush()
    service.metrics.durable_route(f"acme.stream.{name}")  # durable series exist once a durable route runs

    exported = set(await scrape(http, service_metrics(service))) | set(
        await scrape(http, f"{sidecar}/metrics", "acme")
    )
    names = {sample_name for sample_name, _ in exported}
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    queried = {m for q in queries for m in re.findall(r"\btrigger_[a-z_]+\b", q)}
    assert len(queried) >= 15, queried
    assert queried <= names, f"the dashboard queries metrics no scrape has: {sorted(queried - names)}"


def test_metrics_settings_are_checked_at_start_up():
    with pytest.raises(config.ConfigError, match="TRIGGER_METRICS_ADDR"):
        make_settings("nats://127.0.0.1:1", TRIGGER_METRICS_ADDR="nowhere")
    with pytest.raises(config.ConfigError, match="TRIGGER_REQUEST_LOG_SAMPLE"):
        make_settings("nats://127.0.0.1:1", TRIGGER_REQUEST_LOG_SAMPLE="2")


async def _ignore(msg: Msg) -> None:
    """A responder that never answers."""


async def answers(http: aiohttp.ClientSession, url: str, expected: int) -> bool:
    """True once GET `url` (with acme's token) answers `expected`."""
    return await get_status(http, url) == expected
