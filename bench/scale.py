"""The scale the product is meant for, and creates spread over several replicas.

`scale`: a bucket seeded straight into its stream (bench.cases._preload: the store's record
format, pipelined writes) with N triggers: 1,000 stream triggers in the caller's account and the
rest, stream and gateway half and half, in nine other accounts. For each N (0, 1,000, 10,000, and
with `--large` 100,000): the service's time from spawn to serving and to every sampled route
carrying, the sidecar's time to its route table (it listens once the table is loaded), the RSS of
both once loaded, create and get p50 one at a time (against the minimal responder's create on a
bucket of the same size), and list of 1,000 of N against the raw filtered watch. A cost that is
O(1) in the triggers stored shows as the same create and get figures at every N.

`scale-out`: create throughput at 64 in flight with 1, 2 and 3 service replicas on one bucket (the
micro queue group spreads the requests), with the CPU of all replicas per create.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import msgspec
from nats.aio.msg import Msg

from bench import load
from bench.cases import (
    BASE_CREATE,
    CONCURRENCY,
    CREATE,
    MATCHING,
    PREFIX,
    Bench,
    _add,
    _bucket,
    _preload,
    creates,
    metered,
)
from bench.procs import Child, free_port, running, unique
from bench.stats import CPU, P50, RATE, Metric, Row, Sample, Target

SIZES = (1_000, 10_000)
LARGE = 100_000
PROBES = 20  # stream routes probed for "every route live", spread over the keys
START_MS = Metric("start", "ms", False)
RSS = Metric("RSS", "KiB", False)
PER_TRIGGER = Metric("RSS per trigger", "KiB", False)


def layout(total: int) -> list[tuple[str, str, str]]:
    """(account, trigger_type, name) of `total` triggers: MATCHING stream triggers in `default`,
    the rest stream and gateway alternately in nine other accounts."""
    keys = [("default", "stream", f"s{i:06d}") for i in range(min(total, MATCHING))]
    for i in range(total - len(keys)):
        trigger_type = "stream" if i % 2 == 0 else "gateway"
        keys.append((f"other{i % 9}", trigger_type, f"{trigger_type[0]}{i:06d}"))
    return keys


@contextlib.asynccontextmanager
async def _sidecar(b: Bench, bucket: str) -> AsyncIterator[Child]:
    async with running(b.stack.sidecar(bucket, free_port()), timeout=300) as child:
        yield child


async def _all_live(b: Bench, names: list[str], within: float) -> bool:
    """True once a message published on each probed route's source arrives at its target."""
    pending = set(names)

    async def arrived(msg: Msg) -> None:
        pending.discard(msg.subject.removeprefix("bench.d."))

    subscription = await b.nc.subscribe("bench.d.*", cb=arrived)
    await b.nc.flush()
    deadline = time.monotonic() + within
    try:
        while pending and time.monotonic() < deadline:
            for name in list(pending):
                await b.nc.publish(f"bench.s.{name}", b"probe")
            await b.nc.flush()
            await asyncio.sleep(0.005)
    finally:
        await subscription.unsubscribe()
    return not pending


def _probes(keys: list[tuple[str, str, str]]) -> list[str]:
    streams = [name for _, trigger_type, name in keys if trigger_type == "stream"]
    step = max(1, len(streams) // PROBES)
    return [*streams[::step], *streams[-1:]] if streams else []


class Level:
    """The figures measured at one number of stored triggers."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.figures: dict[str, list[float]] = {}
        self.samples: dict[str, list[Sample]] = {}

    def add(self, name: str, value: float) -> None:
        self.figures.setdefault(name, []).append(value)


async def _measure(b: Bench, size: int) -> Level:
    level = Level(size)
    bucket = unique(f"bench-scale{size}")
    keys = layout(size)
    await _bucket(b.nc, bucket)
    if keys:
        await _preload(b.nc, bucket, keys)
    probes = _probes(keys)
    spawned = time.monotonic()
    async with b.service(bucket) as service:
        level.add("start", service.start_seconds * 1000)
        if probes and not await _all_live(b, probes, 60):
            raise RuntimeError(f"with {size:,} stored, a probed route did not carry within 60 s")
        level.add("live", (time.monotonic() - spawned) * 1000)
        level.add("service rss", service.rss_kib())
        async with _sidecar(b, bucket) as sidecar:
            level.add("sidecar start", sidecar.start_seconds * 1000)
            level.add("sidecar rss", sidecar.rss_kib())
        await _reads(b, level, service, keys)
    return level


async def _reads(b: Bench, level: Level, service: Child, keys: list[tuple[str, str, str]]) -> None:
    """Create, get and list one at a time on the seeded bucket, the raw baselines beside them."""
    names = [name for account, _, name in keys if account == "default"]
    responder_bucket = unique("bench-scale-baseline")
    await _bucket(b.nc, responder_bucket)
    if keys:  # the minimal responder creates into a bucket of the same size
        await _preload(b.nc, responder_bucket, keys)
    kv = await b.nc.jetstream().key_value(responder_bucket)
    pattern = msgspec.json.encode({"subject_pattern": f"{PREFIX}.stream.*"})

    async def list_call(_: int) -> bool:
        msg = await b.nc.request(f"{PREFIX}.list", pattern, timeout=60)
        return load.OK in msg.data and b'"results_total":%d' % len(names) in msg.data

    async def raw_watch(_: int) -> bool:
        return await load.watched(kv, "default.stream.*") == len(names)

    async def raw_get(i: int) -> bool:
        return bool((await kv.get(f"default.stream.{names[i * 7919 % len(names)]}")).value)

    def get_request(i: int) -> tuple[str, bytes]:
        return f"{PREFIX}.get.stream.{names[i * 7919 % len(names)]}", b""

    def serial(call: Callable[[int], Awaitable[bool]]) -> Awaitable[Sample]:
        return load.closed_loop(call, concurrency=1, seconds=b.seconds / 2, max_count=b.serial_max)

    # Reads first: the creates below add keys to both buckets (unequally: the responder is faster).
    for _ in range(b.reps if names else 0):
        level.samples.setdefault("get", []).append(await serial(load.requester(b.nc, get_request)))
        level.samples.setdefault("raw get", []).append(await serial(raw_get))
        for key, call in (("list", list_call), ("watch", raw_watch)):
            work = load.closed_loop(call, concurrency=1, seconds=b.seconds / 2, max_count=20)
            level.samples.setdefault(key, []).append(await work)
    async with running(b.stack.responder("--create", BASE_CREATE, "--bucket", responder_bucket)) as responder:
        for _ in range(b.reps):
            prefix = unique("x")
            for key, subject, child in (("create", CREATE, service), ("base create", BASE_CREATE, responder)):
                work = serial(load.requester(b.nc, creates(subject, prefix)))
                level.samples.setdefault(key, []).append(await metered(child, work))


async def scale(b: Bench) -> None:
    """Start, memory and per-operation cost at 0, 1,000, 10,000 (and with --large 100,000) stored."""
    sizes = [0, *SIZES, *((LARGE,) if b.large else ())]
    levels = [await _measure(b, size) for size in sizes]
    empty = levels[0]
    for level in levels:
        n = f"{level.size:,} stored"
        f, s = level.figures, level.samples
        if level.size:
            b.row(
                f"scale: service start, {n}",
                START_MS,
                target=_start_target(level.size),
                note="spawn to answering $SRV.INFO (every route loaded)",
            ).ours = f["start"]
            b.row(
                f"scale: every probed route live, {n}",
                START_MS,
                target=_live_target(level.size),
                note=f"spawn to a message carried on each of {PROBES + 1} routes",
            ).ours = f["live"]
            b.row(
                f"scale: sidecar route table loaded, {n}",
                START_MS,
                target=_sidecar_target(level.size),
                note="spawn to listening (it listens once loaded)",
            ).ours = f["sidecar start"]
        b.row(f"scale: service RSS, {n}", RSS).ours = f["service rss"]
        b.row(f"scale: sidecar RSS, {n}", RSS).ours = f["sidecar rss"]
        if level.size:
            streams = sum(1 for _, t, _ in layout(level.size) if t == "stream")
            gateways = level.size - streams
            per_route = _growth(f["service rss"], empty.figures["service rss"], streams)
            b.row(
                f"scale: service RSS per stream route, {n}",
                PER_TRIGGER,
                target=Target(absolute=2),
                note="(RSS - RSS with 0) / stream triggers",
            ).ours = per_route
            if gateways:
                b.row(
                    f"scale: sidecar RSS per gateway route, {n}",
                    PER_TRIGGER,
                    note="(RSS - RSS with 0) / gateway triggers",
                ).ours = _growth(f["sidecar rss"], empty.figures["sidecar rss"], gateways)
        create = f"scale: create one at a time, {n}"
        _add(
            b.row(create, P50, "minimal responder, same size"), s["create"], s["base create"], lambda x: x.p50
        )
        _add(
            b.row(create, CPU, "minimal responder, same size"),
            s["create"],
            s["base create"],
            lambda x: x.cpu_us,
        )
        if level.size:
            unchanged = Row(create, P50, baseline_name="ours, empty bucket", target=Target(ratio=1.1))
            _add(unchanged, s["create"], empty.samples["create"], lambda x: x.p50)
            b.rows.append(unchanged)
            _add(
                b.row(f"scale: get one at a time, {n}", P50, "raw kv.get"),
                s["get"],
                s["raw get"],
                lambda x: x.p50,
            )
            _add(
                b.row(f"scale: list {MATCHING:,} of {n}", P50, "raw filtered kv.watch", Target(ratio=1.1)),
                s["list"],
                s["watch"],
                lambda x: x.p50,
            )


def _growth(values: list[float], empty: list[float], count: int) -> list[float]:
    return [(value - statistics.median(empty)) / count for value in values]


def _start_target(size: int) -> Target:
    return Target(absolute=5_000) if size >= LARGE else Target()


def _live_target(size: int) -> Target:
    return Target(absolute=10_000) if size >= LARGE else Target()


def _sidecar_target(size: int) -> Target:
    return Target(absolute=3_000) if size >= LARGE else Target()


async def scale_out(b: Bench) -> None:
    """Create throughput at 64 in flight with 1, 2 and 3 replicas on one bucket; CPU of them all."""
    samples: dict[int, list[Sample]] = {1: [], 2: [], 3: []}
    for _ in range(b.reps):
        for replicas in samples:
            bucket = unique("bench-out")
            async with contextlib.AsyncExitStack() as stack:
                children = [
                    await stack.enter_async_context(
                        b.service(bucket, name=f"service-{i + 1}", replicas=i + 1)
                    )
                    for i in range(replicas)
                ]
                prefix = unique("r")
                await load.closed_loop(
                    load.requester(b.nc, creates(CREATE, prefix + "w")), concurrency=8, seconds=0.3
                )
                before = sum(c.cpu_seconds() for c in children)
                sample = await load.closed_loop(
                    load.requester(b.nc, creates(CREATE, prefix)), concurrency=CONCURRENCY, seconds=b.seconds
                )
                sample.cpu_seconds = sum(c.cpu_seconds() for c in children) - before
                samples[replicas].append(sample)
    note = "2 cores shared with nats-server and the load generator: the per-replica cost, not linear scaling"
    for replicas in (1, 2, 3):
        case = f"scale-out: create over NATS, {CONCURRENCY} in flight, {replicas} replica(s)"
        base = samples[1] if replicas > 1 else []
        _add(
            b.row(case, RATE, "1 replica" if base else "", note=note if replicas == 1 else ""),
            samples[replicas],
            base,
            lambda x: x.rate,
        )
        _add(
            b.row(case, CPU, "1 replica" if base else "", note="all replicas' CPU per create"),
            samples[replicas],
            base,
            lambda x: x.cpu_us,
        )


CASES = [("scale", scale), ("scale-out", scale_out)]
