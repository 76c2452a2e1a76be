"""Ways to run the processes: uvloop against asyncio's loop (service and sidecar), and several
sidecar workers on one port (SO_REUSEPORT, TRIGGER_HTTP_WORKERS) against one.

Each variant is measured beside the same minimal baseline as the default (the minimal responder
for creates over NATS; the minimal aiohttp forwarder, on asyncio, for the sidecar), interleaved
in one run, so the ratios of the variants can be set side by side. CPU per op counts every
worker process of a sidecar.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator

import msgspec

from bench import load
from bench.cases import (
    BASE_CREATE,
    CONCURRENCY,
    CREATE,
    PREFIX,
    Bench,
    _add,
    _wrk,
    creates,
    metered,
    public_get,
)
from bench.procs import Child, free_port, running, unique, wait_for
from bench.stats import CPU, RATE, Sample

UVLOOP = {"TRIGGER_EVENT_LOOP": "uvloop"}
SIDECARS: dict[str, dict[str, str]] = {
    "asyncio, 1 worker": {},
    "uvloop, 1 worker": UVLOOP,
    "asyncio, 2 workers": {"TRIGGER_HTTP_WORKERS": "2"},
    "uvloop, 2 workers": {**UVLOOP, "TRIGGER_HTTP_WORKERS": "2"},
}


async def service_loop(b: Bench) -> None:
    """Create over NATS, 64 in flight, on asyncio and on uvloop, beside the minimal responder."""
    samples: dict[str, list[Sample]] = {"asyncio": [], "uvloop": [], "base": []}
    async with running(
        b.stack.responder("--create", BASE_CREATE, "--bucket", unique("bench-b"))
    ) as responder:
        for rep in range(b.reps):
            order = ["asyncio", "uvloop", "base"]
            for side in order[rep % 3 :] + order[: rep % 3]:
                prefix = unique("u")
                call = load.requester(b.nc, creates(BASE_CREATE if side == "base" else CREATE, prefix))
                if side == "base":
                    samples[side].append(
                        await metered(
                            responder, load.closed_loop(call, concurrency=CONCURRENCY, seconds=b.seconds)
                        )
                    )
                    continue
                async with b.service(env=UVLOOP if side == "uvloop" else None) as service:
                    warm = load.requester(b.nc, creates(CREATE, prefix + "w"))
                    await load.closed_loop(warm, concurrency=8, seconds=0.3)
                    work = load.closed_loop(call, concurrency=CONCURRENCY, seconds=b.seconds)
                    samples[side].append(await metered(service, work))
    for loop in ("asyncio", "uvloop"):
        case = f"event loop: create over NATS, {CONCURRENCY} in flight, service on {loop}"
        _add(b.row(case, RATE, "minimal responder"), samples[loop], samples["base"], lambda s: s.rate)
        _add(b.row(case, CPU, "minimal responder"), samples[loop], samples["base"], lambda s: s.cpu_us)


@contextlib.asynccontextmanager
async def _sidecar(b: Bench, bucket: str, env: dict[str, str]) -> AsyncIterator[Child]:
    workers = int(env.get("TRIGGER_HTTP_WORKERS", "1"))
    child = b.stack.sidecar(bucket, free_port(), env=env)
    child.name = unique("sidecar")  # a log of its own: its workers' start lines are counted
    async with running(child, timeout=60):

        async def all_started() -> bool:
            return len(re.findall(r'"event": ?"started"', child.tail(200))) >= workers

        if not await wait_for(all_started, 30, 0.05):
            raise RuntimeError(f"not every sidecar worker started:\n{child.tail()}")
        yield child


async def sidecar_variants(b: Bench) -> None:
    """A gateway route and a create with the minimal responder behind, for each sidecar variant."""
    bucket = unique("bench-var")
    path = f"/bench/{unique('echo')}"
    body = public_get(unique("gw"), path)
    route: dict[str, list[Sample]] = {name: [] for name in [*SIDECARS, "forwarder"]}
    create: dict[str, list[Sample]] = {name: [] for name in [*SIDECARS, "forwarder"]}
    async with b.service(bucket):
        msg = await b.nc.request(f"{PREFIX}.create.gateway", msgspec.json.encode(body), timeout=10)
        subject = msgspec.json.decode(msg.data)["body"]["gateway_mapping_subject"]
    forwarder = b.stack.forwarder(free_port(), ("GET", path, subject), ("POST", "/trigger/stream", CREATE))
    echo = b.stack.responder("--echo", subject)
    creator = b.stack.responder("--create", CREATE, "--bucket", unique("bench-var-b"))
    async with running(echo), running(creator), running(forwarder):
        for rep in range(b.reps):
            names = [*SIDECARS, "forwarder"]
            for name in names[rep % len(names) :] + names[: rep % len(names)]:
                async with contextlib.AsyncExitStack() as stack:
                    if name == "forwarder":
                        child = forwarder
                    else:
                        child = await stack.enter_async_context(_sidecar(b, bucket, SIDECARS[name]))

                    async def served(url: str = child.url) -> bool:
                        return await load.http_status(url + path) == 200

                    if not await wait_for(served, 5.0, 0.02):
                        raise RuntimeError(f"{name}: the gateway route is not served")
                    route[name].append(await _wrk(b, child, "GET", path))
                    create[name].append(
                        await _wrk(b, child, "POST", "/trigger/stream", "create-stream", unique("v"))
                    )
    fwd = route["forwarder"], create["forwarder"]
    for name in SIDECARS:
        case = f"sidecar on {name}: gateway trigger request, {CONCURRENCY} in flight"
        _add(b.row(case, RATE, "minimal forwarder"), route[name], fwd[0], lambda s: s.rate)
        _add(b.row(case, CPU, "minimal forwarder"), route[name], fwd[0], lambda s: s.cpu_us)
        case = f"sidecar on {name}: create over HTTP, minimal responder behind"
        _add(b.row(case, RATE, "minimal forwarder"), create[name], fwd[1], lambda s: s.rate)
        _add(b.row(case, CPU, "minimal forwarder"), create[name], fwd[1], lambda s: s.cpu_us)


CASES = [("event loop", service_loop), ("sidecar variants", sidecar_variants)]
