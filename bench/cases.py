"""The benchmark cases: each measures the service beside its raw NATS baseline, in the same run."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import importlib.util
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import msgspec
import nats
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.kv import KeyValue

from bench import load
from bench.procs import Child, Stack, free_port, running, unique, wait_for
from bench.stats import CPU, MSG_RATE, P50, P99, RATE, Metric, Row, Sample, Target
from schemas.triggers import (
    GatewayTrigger,
    StoredGatewayMapping,
    StreamTrigger,
    TriggerSource,
    TriggerTarget,
)

PREFIX = "ms.trigger"
CREATE = f"{PREFIX}.create.stream"
BASE_CREATE = "bench.baseline.create"
CONCURRENCY = 64
STORED, MATCHING = 10_000, 1_000


@dataclass
class Bench:
    """Everything a case needs: the knobs, the processes' stack, a client connection and the rows."""

    stack: Stack
    nc: Client
    http: load.Http
    reps: int
    seconds: float
    serial_max: int
    activations: int
    profile_dir: Path | None = None
    large: bool = False  # the scale case's 100,000 stored triggers too
    rows: list[Row] = field(default_factory=list)

    def row(
        self, case: str, metric: Metric, baseline_name: str = "", target: Target | None = None, note: str = ""
    ) -> Row:
        """A new row of the table."""
        row = Row(case, metric, baseline_name=baseline_name, target=target or Target(), note=note)
        self.rows.append(row)
        return row

    def skip(self, case: str, why: str) -> None:
        """A row saying that a case could not run."""
        self.rows.append(Row(case, Metric("-", "", True), note=why))

    async def connect(self, name: str) -> Client:
        """Another client connection to the run's server."""
        return await nats.connect(self.stack.nats_url, name=name)

    @contextlib.asynccontextmanager
    async def service(
        self,
        bucket: str | None = None,
        profile: str | None = None,
        env: dict[str, str] | None = None,
        name: str = "service",
        replicas: int = 1,
    ) -> AsyncIterator[Child]:
        """A `python -m service` process on a fresh (or the given) bucket, with `env` added; ready
        once `replicas` services answer on the bucket."""
        bucket = bucket or unique("bench")
        out = self.profile_dir / f"{profile}.txt" if profile and self.profile_dir else None
        child = self.stack.service(bucket, name=name, profile=out, env=env, replicas=replicas)
        async with running(child, timeout=120) as started:
            yield started


async def metered(child: Child, work: Awaitable[Sample]) -> Sample:
    """`work`'s sample, with the CPU time that `child` used meanwhile."""
    before = child.cpu_seconds()
    sample = await work
    sample.cpu_seconds = child.cpu_seconds() - before
    return sample


def create_body(name: str) -> bytes:
    """A create-stream request; the same bytes for the service, the baselines and wrk's script."""
    return (
        b'{"name":"%s","trigger_type":"stream","source":{"subject":"bench.s.%s","type":"stream"},'
        b'"target":{"subject":"bench.d.%s","type":"stream"}}' % ((name.encode(),) * 3)
    )


def creates(subject: str, prefix: str) -> Callable[[int], tuple[str, bytes]]:
    """Create requests with unique names `prefix-i`."""
    return lambda i: (subject, create_body(f"{prefix}-{i}"))


def _errors_note(samples: list[Sample]) -> str:
    errors = sum(s.errors for s in samples)
    kinds: collections.Counter[str] = collections.Counter()
    for sample in samples:
        kinds.update(sample.error_kinds)
    detail = ", ".join(f"{n} {kind}" for kind, n in kinds.most_common())
    return f"{errors} errors ({detail})" if detail else f"{errors} errors" if errors else ""


def _add(row: Row, ours: list[Sample], base: list[Sample], value: Callable[[Sample], float]) -> None:
    row.ours = [value(s) for s in ours]
    row.baseline = [value(s) for s in base]
    note = ", ".join(
        n for n in (_errors_note(ours), _errors_note(base) and f"baseline {_errors_note(base)}") if n
    )
    row.note = "; ".join(n for n in (row.note, note) if n)


# --- control plane over NATS -----------------------------------------------------------------


async def create_over_nats(b: Bench) -> None:
    """Create stream trigger over NATS against a minimal decode + kv.create + reply responder."""
    ours_many: list[Sample] = []
    ours_one: list[Sample] = []
    base_many: list[Sample] = []
    base_one: list[Sample] = []
    responder = b.stack.responder("--create", BASE_CREATE, "--bucket", unique("bench-baseline"))
    async with running(responder):
        for rep in range(b.reps):
            for side in ("ours", "base") if rep % 2 == 0 else ("base", "ours"):
                prefix = unique("c")
                if side == "ours":
                    # a fresh bucket each time: the cost of a create grows with the stored stream triggers
                    async with b.service(profile="service-create") as service:
                        one, many = await _create_pair(b, CREATE, prefix, service)
                    ours_one.append(one)
                    ours_many.append(many)
                else:
                    one, many = await _create_pair(b, BASE_CREATE, prefix, responder)
                    base_one.append(one)
                    base_many.append(many)
    name = "minimal responder"
    loaded = f"create over NATS, {CONCURRENCY} in flight"
    serial = "create over NATS, one at a time"
    note = "fresh bucket per run"
    # The targets of issue 15.
    _add(b.row(loaded, RATE, name, Target(ratio=0.6), note), ours_many, base_many, lambda s: s.rate)
    _add(b.row(loaded, P50, name), ours_many, base_many, lambda s: s.p50)
    _add(b.row(loaded, P99, name), ours_many, base_many, lambda s: s.p99)
    _add(b.row(loaded, CPU, name, Target(ratio=2)), ours_many, base_many, lambda s: s.cpu_us)
    _add(b.row(serial, P50, name, Target(ratio=1.4), note), ours_one, base_one, lambda s: s.p50)
    _add(b.row(serial, P99, name), ours_one, base_one, lambda s: s.p99)


async def _create_pair(b: Bench, subject: str, prefix: str, responder: Child) -> tuple[Sample, Sample]:
    await load.closed_loop(
        load.requester(b.nc, creates(subject, prefix + "w")), concurrency=1, seconds=0.3, max_count=50
    )
    one = await load.closed_loop(
        load.requester(b.nc, creates(subject, prefix + "o")),
        concurrency=1,
        seconds=b.seconds,
        max_count=b.serial_max,
    )
    many = await metered(
        responder,
        load.closed_loop(
            load.requester(b.nc, creates(subject, prefix + "m")), concurrency=CONCURRENCY, seconds=b.seconds
        ),
    )
    return one, many


async def create_with_stored(b: Bench) -> None:
    """Create one at a time while 10,000 stream triggers are stored (the cycle check reads them)."""
    bucket = unique("bench-full")
    await _bucket(b.nc, bucket)
    await _preload(b.nc, bucket, [("other", "stream", f"s{i:05d}") for i in range(STORED)])
    ours: list[Sample] = []
    base: list[Sample] = []
    started: list[float] = []
    responder = b.stack.responder("--create", BASE_CREATE, "--bucket", unique("bench-baseline"))
    async with running(responder), b.service(bucket, profile="service-create-10k-stored") as service:
        started.append(service.start_seconds * 1000)
        for _ in range(b.reps):
            prefix = unique("f")
            for subject, child, samples in ((CREATE, service, ours), (BASE_CREATE, responder, base)):
                work = load.closed_loop(
                    load.requester(b.nc, creates(subject, prefix)),
                    concurrency=1,
                    seconds=b.seconds,
                    max_count=b.serial_max,
                )
                samples.append(await metered(child, work))
    case = f"create one at a time, {STORED:,} stream triggers stored"
    _add(b.row(case, P50, "minimal responder", Target(ratio=1.4)), ours, base, lambda s: s.p50)
    _add(b.row(case, RATE, "minimal responder"), ours, base, lambda s: s.rate)
    _add(b.row(case, CPU, "minimal responder"), ours, base, lambda s: s.cpu_us)
    b.row(
        f"service start, {STORED:,} stream triggers stored",
        Metric("start", "ms", False),
        note="spawn to answering $SRV.INFO; includes the Python start-up",
    ).ours = started


async def get_and_list(b: Bench) -> None:
    """Get against a raw KV get; list of 1,000 of 10,000 triggers against a raw filtered KV watch."""
    bucket = unique("bench-read")
    kv = await _bucket(b.nc, bucket)
    # 1,000 stream triggers in the caller's account, 9,000 gateway triggers in nine others
    keys = [("default", "stream", f"s{i:05d}") for i in range(MATCHING)]
    keys += [(f"other{i % 9}", "gateway", f"g{i:05d}") for i in range(STORED - MATCHING)]
    await _preload(b.nc, bucket, keys)
    names = [name for _, _, name in keys[:MATCHING]]

    def get_request(i: int) -> tuple[str, bytes]:
        return f"{PREFIX}.get.stream.{names[i * 7919 % MATCHING]}", b""

    async def raw_get(i: int) -> bool:
        entry = await kv.get(f"default.stream.{names[i * 7919 % MATCHING]}")
        return bool(entry.value)

    pattern = f"{PREFIX}.stream.*"
    list_payload = msgspec.json.encode({"subject_pattern": pattern})

    async def list_call(_: int) -> bool:
        msg = await b.nc.request(f"{PREFIX}.list", list_payload, timeout=30)
        return load.OK in msg.data and b'"results_total":%d' % MATCHING in msg.data

    async def raw_watch(_: int) -> bool:
        return await load.watched(kv, "default.stream.*") == MATCHING

    samples: dict[str, list[Sample]] = {k: [] for k in ("get1", "get64", "rget1", "rget64", "list", "watch")}
    async with b.service(bucket, profile="service-get-list") as service:
        ours_get = load.requester(b.nc, get_request)
        await load.closed_loop(ours_get, concurrency=1, seconds=0.2, max_count=50)
        await load.closed_loop(list_call, concurrency=1, seconds=0.2, max_count=2)
        for _ in range(b.reps):
            samples["get1"].append(
                await load.closed_loop(ours_get, concurrency=1, seconds=b.seconds / 2, max_count=b.serial_max)
            )
            samples["rget1"].append(
                await load.closed_loop(raw_get, concurrency=1, seconds=b.seconds / 2, max_count=b.serial_max)
            )
            samples["get64"].append(
                await metered(service, load.closed_loop(ours_get, concurrency=CONCURRENCY, seconds=b.seconds))
            )
            samples["rget64"].append(
                await load.closed_loop(raw_get, concurrency=CONCURRENCY, seconds=b.seconds)
            )
            samples["list"].append(
                await metered(service, load.closed_loop(list_call, concurrency=1, seconds=b.seconds))
            )
            samples["watch"].append(await load.closed_loop(raw_watch, concurrency=1, seconds=b.seconds))
    get64, get1 = f"get over NATS, {CONCURRENCY} in flight", "get over NATS, one at a time"
    _add(
        b.row(get64, RATE, "raw kv.get", Target(ratio=0.7)),
        samples["get64"],
        samples["rget64"],
        lambda s: s.rate,
    )
    _add(b.row(get64, CPU, note="the service's CPU"), samples["get64"], [], lambda s: s.cpu_us)
    _add(b.row(get1, P50, "raw kv.get"), samples["get1"], samples["rget1"], lambda s: s.p50)
    _add(b.row(get1, P99, "raw kv.get"), samples["get1"], samples["rget1"], lambda s: s.p99)
    lst = f"list {MATCHING:,} of {STORED:,} triggers, one at a time"
    watch = "raw filtered kv.watch"
    _add(b.row(lst, P50, watch, Target(ratio=1.1)), samples["list"], samples["watch"], lambda s: s.p50)
    _add(b.row(lst, P99, watch), samples["list"], samples["watch"], lambda s: s.p99)


async def _bucket(nc: Client, bucket: str) -> KeyValue:
    from nats.js import api

    config = api.KeyValueConfig(bucket=bucket, history=64, storage=api.StorageType.FILE)
    return await nc.jetstream().create_key_value(config)


def stored_record(bucket: str, trigger_type: str, name: str) -> bytes:
    """A valid stored record (service/store.py's format) of a stream or a gateway trigger."""
    common = {
        "name": name,
        "stream": bucket,
        "subject": f"{PREFIX}.{trigger_type}.{name}",
        "type": "created",
        "created_at": "2024-01-01T00:00:00.000Z",
    }
    if trigger_type == "stream":
        return _encode(
            StreamTrigger(
                **common,
                source=TriggerSource(subject=f"bench.s.{name}", type="stream"),
                target=TriggerTarget(subject=f"bench.d.{name}", type="stream"),
            )
        )
    return _encode(
        GatewayTrigger(
            **common,
            gateway_mapping=StoredGatewayMapping(
                method="GET", path=f"/bench/{name}", is_public=False, timeout=30_000
            ),
            gateway_mapping_subject=f"{PREFIX}.gateway.bench{name}",
        )
    )


_encode = msgspec.json.Encoder().encode
SEED_WINDOW = 4_096  # writes awaiting their JetStream acknowledgement, at most


async def _preload(nc: Client, bucket: str, keys: list[tuple[str, str, str]]) -> None:
    """Store one valid record per (account, trigger_type, name) straight into the bucket's stream:
    pipelined publishes, SEED_WINDOW unacknowledged at most, every acknowledgement checked."""
    inbox = nc.new_inbox()
    acked, refused = 0, 0
    waiter: list[tuple[int, asyncio.Future[None]]] = []

    async def on_ack(msg: Msg) -> None:
        nonlocal acked, refused
        acked += 1
        if b'"error"' in msg.data:
            refused += 1
        if waiter and acked >= waiter[0][0] and not waiter[0][1].done():
            waiter[0][1].set_result(None)

    async def reach(count: int) -> None:
        if acked >= count:
            return
        future = asyncio.get_running_loop().create_future()
        waiter[:] = [(count, future)]
        await asyncio.wait_for(future, 60)

    subscription = await nc.subscribe(inbox + ".*", cb=on_ack, pending_msgs_limit=4 * SEED_WINDOW)
    try:
        for i, (account, trigger_type, name) in enumerate(keys):
            await nc.publish(
                f"$KV.{bucket}.{account}.{trigger_type}.{name}",
                stored_record(bucket, trigger_type, name),
                reply=f"{inbox}.{i}",
            )
            if (i + 1) % (SEED_WINDOW // 2) == 0:
                await nc.flush()
                await reach(i + 1 - SEED_WINDOW // 2)
        await nc.flush()
        await reach(len(keys))
    finally:
        await subscription.unsubscribe()
    if refused:
        raise RuntimeError(f"preload: JetStream refused {refused} of {len(keys)} records")


# --- HTTP sidecar ----------------------------------------------------------------------------


def public_get(name: str, path: str) -> dict[str, object]:
    """The create request of a public gateway trigger for `GET path`."""
    return {
        "name": name,
        "trigger_type": "gateway",
        "gateway_mapping": {"method": "GET", "path": path, "is_public": True},
    }


def _sidecar_missing() -> str | None:
    if importlib.util.find_spec("service.gateway.app") is None:
        return "not available yet: service/gateway/app.py (the HTTP sidecar) is missing"
    return None


@contextlib.asynccontextmanager
async def _sidecar(b: Bench, bucket: str, profile: str | None = None) -> AsyncIterator[Child]:
    out = b.profile_dir / f"{profile}.txt" if profile and b.profile_dir else None
    async with running(b.stack.sidecar(bucket, free_port(), profile=out), timeout=60) as child:
        yield child


async def _wrk(
    b: Bench, child: Child, method: str, path: str, kind: str = "plain", prefix: str = ""
) -> Sample:
    """HTTP load on `child` with CONCURRENCY connections, with the CPU that `child` used."""
    work = b.http.run(
        child.url, method, path, kind=kind, prefix=prefix, connections=CONCURRENCY, seconds=b.seconds
    )
    return await metered(child, work)


async def create_over_http(b: Bench) -> None:
    """Create through the sidecar against a minimal aiohttp forwarder and against NATS directly.

    Twice: with the service behind both fronts (end to end), and with the minimal responder
    answering `create.stream` instead (the HTTP front's own cost, whatever the service's).
    """
    case = f"create over HTTP, {CONCURRENCY} connections"
    missing = _sidecar_missing()
    if missing:
        b.skip(case, missing)
        return
    bucket = unique("bench-http")
    forwarder = b.stack.forwarder(free_port(), ("POST", "/trigger/stream", CREATE))
    async with _sidecar(b, bucket, profile="sidecar-create") as sidecar, running(forwarder):
        async with b.service(bucket):
            status = await load.http_status(f"{sidecar.url}/trigger/stream", "POST", create_body(unique("p")))
        if status != 201:
            b.skip(case, f"not available yet: POST /trigger/stream on the sidecar answered {status}, not 201")
            return

        def fresh_service() -> contextlib.AbstractAsyncContextManager[Child]:
            return b.service()  # a fresh bucket for each run, as in the NATS create case

        def responder() -> contextlib.AbstractAsyncContextManager[Child]:
            return running(b.stack.responder("--create", CREATE, "--bucket", unique("bench-baseline")))

        end_to_end = await _http_creates(b, sidecar, forwarder, fresh_service)
        front_only = await _http_creates(b, sidecar, forwarder, responder)
    for title, samples, note, target in (
        (case, end_to_end, f"{b.http.tool}; fresh bucket per run", Target()),
        (f"{case}, minimal responder behind", front_only, "the HTTP front's own cost", Target(ratio=0.9)),
    ):
        ours, base = samples["sidecar"], samples["forwarder"]
        fwd = "minimal forwarder"
        _add(b.row(title, RATE, fwd, target, note), ours, base, lambda s: s.rate)
        _add(b.row(title, P50, fwd), ours, base, lambda s: s.p50)
        _add(b.row(title, P99, fwd), ours, base, lambda s: s.p99)
        _add(b.row(title, CPU, fwd, note="the HTTP process's CPU"), ours, base, lambda s: s.cpu_us)
        _add(b.row(title, RATE, "the same over NATS directly"), ours, samples["nats"], lambda s: s.rate)


async def _http_creates(
    b: Bench,
    sidecar: Child,
    forwarder: Child,
    backend: Callable[[], contextlib.AbstractAsyncContextManager[Child]],
) -> dict[str, list[Sample]]:
    """Creates through the sidecar, the forwarder and NATS directly, each with a new `backend`."""
    samples: dict[str, list[Sample]] = {"sidecar": [], "forwarder": [], "nats": []}
    order = list(samples)
    for rep in range(b.reps):
        for side in order[rep % 3 :] + order[: rep % 3]:
            prefix = unique("h")
            async with backend():
                if side == "nats":
                    call = load.requester(b.nc, creates(CREATE, prefix))
                    sample = await load.closed_loop(call, concurrency=CONCURRENCY, seconds=b.seconds)
                else:
                    child = sidecar if side == "sidecar" else forwarder
                    sample = await _wrk(b, child, "POST", "/trigger/stream", "create-stream", prefix)
            samples[side].append(sample)
    return samples


async def gateway_request(b: Bench) -> None:
    """A gateway trigger's HTTP route to a NATS responder, against a direct NATS request to it."""
    case = f"gateway trigger request, {CONCURRENCY} in flight"
    missing = _sidecar_missing()
    if missing:
        b.skip(case, missing)
        return
    bucket = unique("bench-gw")
    path = f"/bench/{unique('echo')}"
    body = public_get(unique("gw"), path)
    samples: dict[str, list[Sample]] = {"sidecar": [], "forwarder": [], "nats": []}
    async with b.service(bucket), _sidecar(b, bucket, profile="sidecar-gateway") as sidecar:
        msg = await b.nc.request(f"{PREFIX}.create.gateway", msgspec.json.encode(body), timeout=10)
        reply = msgspec.json.decode(msg.data)
        if reply.get("status_code") != 201:
            b.skip(case, f"create gateway answered {reply}")
            return
        subject = reply["body"]["gateway_mapping_subject"]
        forwarder = b.stack.forwarder(free_port(), ("GET", path, subject))
        async with running(b.stack.responder("--echo", subject)), running(forwarder):

            async def served() -> bool:
                return await load.http_status(sidecar.url + path) == 200

            if not await wait_for(served, 3.0, 0.05):
                status = await load.http_status(sidecar.url + path)
                b.skip(case, f"not available yet: the sidecar answers {status} on a gateway trigger's route")
                return
            direct = load.requester(b.nc, lambda _: (subject, b""))
            for _ in range(b.reps):
                samples["sidecar"].append(await _wrk(b, sidecar, "GET", path))
                samples["forwarder"].append(await _wrk(b, forwarder, "GET", path))
                samples["nats"].append(
                    await load.closed_loop(direct, concurrency=CONCURRENCY, seconds=b.seconds)
                )
    ours, fwd, nats_s = samples["sidecar"], samples["forwarder"], samples["nats"]
    _add(b.row(case, RATE, "direct NATS request", note=b.http.tool), ours, nats_s, lambda s: s.rate)
    _add(b.row(case, P50, "direct NATS request"), ours, nats_s, lambda s: s.p50)
    _add(b.row(case, P99, "direct NATS request"), ours, nats_s, lambda s: s.p99)
    _add(b.row(case, RATE, "minimal forwarder", Target(ratio=0.9)), ours, fwd, lambda s: s.rate)
    _add(b.row(case, CPU, "minimal forwarder", note="the HTTP process's CPU"), ours, fwd, lambda s: s.cpu_us)


# --- stream routes ---------------------------------------------------------------------------


class Arrivals:
    """Counts the messages a subscription receives and lets a caller wait for a count."""

    def __init__(self, keep: bool = False) -> None:
        self.count = 0
        self.last = 0.0
        self.first = 0.0
        self.keep = keep
        self.kept: list[tuple[float, float]] = []  # (arrived, sent) when the payload is a send time
        self._waiter: tuple[int, asyncio.Future[None]] | None = None

    async def on_msg(self, msg: Msg) -> None:
        """Subscription callback."""
        now = time.perf_counter()
        self.count += 1
        self.last = now
        if self.count == 1:
            self.first = now
        if self.keep:
            self.kept.append((now, float(msg.data)))
        if self._waiter and self.count >= self._waiter[0] and not self._waiter[1].done():
            self._waiter[1].set_result(None)

    async def reach(self, count: int, timeout: float) -> bool:
        """Wait until `count` messages have arrived; False at the deadline."""
        if self.count >= count:
            return True
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiter = (count, future)
        try:
            await asyncio.wait_for(future, timeout)
            return True
        except TimeoutError:
            return False
        finally:
            self._waiter = None


async def _flow(pub: Client, sub: Client, send: str, receive: str, count: int, window: int = 1000) -> Sample:
    """Messages/s from `send` to `receive`, with at most `window` messages unreceived at any time."""
    arrivals = Arrivals()
    subscription = await sub.subscribe(receive, cb=arrivals.on_msg, pending_msgs_limit=10 * window)
    await asyncio.sleep(0)
    await sub.flush()
    payload = b"x" * 128
    started = time.perf_counter()
    sent = 0
    while sent < count:
        batch = min(window // 2, count - sent)
        for _ in range(batch):
            await pub.publish(send, payload)
        sent += batch
        await pub.flush()
        if not await arrivals.reach(sent - window // 2, 10):
            break
    await arrivals.reach(count, 10)
    elapsed = (arrivals.last or time.perf_counter()) - started
    await subscription.unsubscribe()
    return Sample(ok=arrivals.count, errors=count - arrivals.count, seconds=elapsed)


async def _ping(pub: Client, sub: Client, send: str, receive: str, count: int, seconds: float) -> Sample:
    """One message at a time from `send` to `receive`: the latency of each."""
    arrivals = Arrivals()
    subscription = await sub.subscribe(receive, cb=arrivals.on_msg)
    await asyncio.sleep(0)
    await sub.flush()
    sample = Sample()
    deadline = time.perf_counter() + seconds
    started = time.perf_counter()
    for i in range(count):
        if time.perf_counter() > deadline:
            break
        sent_at = time.perf_counter()
        await pub.publish(send, b"ping")
        if await arrivals.reach(i + 1 - sample.errors, 2):
            sample.ok += 1
            sample.latencies_ms.append((arrivals.last - sent_at) * 1000)
        else:
            sample.errors += 1
    sample.seconds = time.perf_counter() - started
    await subscription.unsubscribe()
    return sample


async def _create_route(b: Bench, name: str, source: str, target: str, **extra: object) -> dict[str, object]:
    body = {
        "name": name,
        "trigger_type": "stream",
        "source": {"subject": source, "type": "stream"},
        "target": {"subject": target, "type": "stream"},
        **extra,
    }
    reply = await b.nc.request(CREATE, msgspec.json.encode(body), timeout=10)
    decoded: dict[str, object] = msgspec.json.decode(reply.data)
    return decoded


async def _route_missing(b: Bench, pub: Client, sub: Client) -> str | None:
    """None when the service carries stream routes, else why not."""
    name = unique("probe")
    source, target = f"bench.probe.{name}.in", f"bench.probe.{name}.out"
    arrivals = Arrivals()
    subscription = await sub.subscribe(target, cb=arrivals.on_msg)
    await asyncio.sleep(0)
    await sub.flush()
    reply = await _create_route(b, name, source, target)
    if reply.get("status_code") != 201:
        return f"create stream trigger answered {reply}"

    async def delivered() -> bool:
        await pub.publish(source, b"probe")
        return await arrivals.reach(1, 0.05)

    found = await wait_for(delivered, 2.0, 0.0)
    await subscription.unsubscribe()
    if not found:
        return "not available yet: the service does not carry stream routes (service/streams.py)"
    return None


async def stream_route(b: Bench) -> None:
    """A stream route (single-account mode) against a direct publish/subscribe on the same server."""
    case = "stream route (single account)"
    pub, sub = await b.connect("bench-pub"), await b.connect("bench-sub")
    try:
        async with b.service(profile="service-stream-route") as service:
            missing = await _route_missing(b, pub, sub)
            if missing:
                b.skip(case, missing)
                return
            name = unique("route")
            source, target = f"bench.route.{name}.in", f"bench.route.{name}.out"
            reply = await _create_route(b, name, source, target)
            assert reply.get("status_code") == 201, reply
            direct = f"bench.direct.{name}"
            count = max(2_000, int(20_000 * b.seconds))
            flows: tuple[list[Sample], list[Sample]] = ([], [])
            pings: tuple[list[Sample], list[Sample]] = ([], [])
            await _flow(pub, sub, source, target, 2_000)  # warm-up
            for _ in range(b.reps):
                flows[0].append(await metered(service, _flow(pub, sub, source, target, count)))
                flows[1].append(await _flow(pub, sub, direct, direct, count))
                pings[0].append(await _ping(pub, sub, source, target, b.serial_max, b.seconds / 2))
                pings[1].append(await _ping(pub, sub, direct, direct, b.serial_max, b.seconds / 2))
    finally:
        await pub.drain()
        await sub.drain()
    base = "direct publish/subscribe"
    _add(
        b.row(case, MSG_RATE, base, Target(ratio=0.5), "128-byte messages, 1,000 unreceived at most"),
        *flows,
        lambda s: s.rate,
    )
    _add(b.row(case, CPU, note="the service's CPU per carried message"), flows[0], [], lambda s: s.cpu_us)
    _add(b.row(f"{case}, one message at a time", P50, base), *pings, lambda s: s.p50)
    _add(b.row(f"{case}, one message at a time", P99, base), *pings, lambda s: s.p99)


async def activation(b: Bench) -> None:
    """From the 201 reply to the first message on the new route; from the delete reply to the last."""
    case = "activation"
    pub, sub = await b.connect("bench-pub"), await b.connect("bench-sub")
    try:
        async with b.service():
            missing = await _route_missing(b, pub, sub)
            if missing:
                b.skip(f"{case} of a stream route", missing)
            else:
                await _stream_activation(b, pub, sub)
    finally:
        await pub.drain()
        await sub.drain()
    await _gateway_activation(b)


async def _stream_activation(b: Bench, pub: Client, sub: Client) -> None:
    first_ms: list[float] = []
    last_ms: list[float] = []
    leaked = 0
    for _ in range(b.reps):
        rep_first: list[float] = []
        rep_last: list[float] = []
        for _ in range(b.activations):
            name = unique("act")
            source, target = f"bench.act.{name}.in", f"bench.act.{name}.out"
            arrivals = Arrivals(keep=True)
            subscription = await sub.subscribe(target, cb=arrivals.on_msg)
            await asyncio.sleep(0)
            await sub.flush()
            reply = await _create_route(b, name, source, target)
            created = time.perf_counter()
            assert reply.get("status_code") == 201, reply
            while arrivals.count == 0 and time.perf_counter() - created < 2:
                await pub.publish(source, b"%f" % time.perf_counter())
                await asyncio.sleep(0.0002)
            rep_first.append((arrivals.first - created) * 1000 if arrivals.count else 2000.0)

            # publish every 0.2 ms before, during and after the delete
            stop = asyncio.Event()

            publisher = asyncio.create_task(_publish_until(stop, pub, source))
            await asyncio.sleep(0.01)
            msg = await b.nc.request(f"{PREFIX}.delete.stream.{name}", b"", timeout=10)
            deleted = time.perf_counter()
            assert load.OK in msg.data, msg.data
            await asyncio.sleep(0.05)
            stop.set()
            await publisher
            await pub.flush()
            await sub.flush()
            rep_last.append(max(0.0, (arrivals.last - deleted) * 1000))
            leaked += sum(1 for _, sent in arrivals.kept if sent > deleted)
            await subscription.unsubscribe()
        first_ms.append(max(rep_first))
        last_ms.append(max(rep_last))
    note = f"worst of {b.activations} per run"
    b.row(
        "activation: 201 reply -> first message on the route",
        Metric("worst", "ms", False),
        target=Target(absolute=5),
        note=note,
    ).ours = first_ms
    row = b.row(
        "deactivation: delete reply -> last message on the route",
        Metric("worst", "ms", False),
        target=Target(absolute=5),
        note=note,
    )
    row.ours = last_ms
    if leaked:
        row.note += f"; {leaked} messages published after a delete reply were still delivered"


async def _publish_until(stop: asyncio.Event, pub: Client, subject: str) -> None:
    """Publish the send time on `subject` every 0.2 ms until `stop` is set."""
    while not stop.is_set():
        await pub.publish(subject, b"%f" % time.perf_counter())
        await asyncio.sleep(0.0002)


async def _gateway_activation(b: Bench) -> None:
    case = "activation: gateway 201 reply -> route served by the sidecar"
    missing = _sidecar_missing()
    if missing:
        b.skip(case, missing)
        return
    bucket = unique("bench-gwact")
    worst: list[float] = []
    async with b.service(bucket), _sidecar(b, bucket) as sidecar, aiohttp.ClientSession(sidecar.url) as http:

        async def served(path: str) -> bool:
            async with http.get(path) as resp:
                await resp.read()
                return resp.status != 404

        for _ in range(b.reps):
            times: list[float] = []
            for _ in range(max(3, b.activations // 4)):
                name, path = unique("gwa"), f"/bench/{unique('act')}"
                body = public_get(name, path)
                msg = await b.nc.request(f"{PREFIX}.create.gateway", msgspec.json.encode(body), timeout=10)
                created = time.perf_counter()
                assert load.OK in msg.data, msg.data
                if not await wait_for(functools.partial(served, path), 3.0, 0.001):
                    b.skip(
                        case,
                        "not available yet: the sidecar does not serve a created gateway trigger's route",
                    )
                    return
                times.append((time.perf_counter() - created) * 1000)
            worst.append(max(times))
    b.row(
        case,
        Metric("worst", "ms", False),
        target=Target(absolute=5),
        note="polled over HTTP every 1 ms; contract: within 1 s",
    ).ours = worst


CASES: list[tuple[str, Callable[[Bench], Awaitable[None]]]] = [
    ("create over NATS", create_over_nats),
    ("create with 10,000 stored", create_with_stored),
    ("get and list over NATS", get_and_list),
    ("create over HTTP", create_over_http),
    ("stream route", stream_route),
    ("gateway trigger request", gateway_request),
    ("activation", activation),
]
