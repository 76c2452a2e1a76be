"""What observability costs: the per-request log line, and the per-message metrics of a stream route.

The request line (service/routing.py `Api._serve`) is measured end to end: creates over NATS
against a service with the line on every request (the default) and one with
`TRIGGER_REQUEST_LOG_SAMPLE=0` (only 4xx/5xx logged), fresh buckets, interleaved. The stream
route's counters (service/streams.py `_Carry.__call__`: messages and bytes per carried message) are
timed in this process on the service's own metric objects: a route's CPU per carried message is
tens of microseconds, too little for a difference of a few to show above the runs' spread.
"""

from __future__ import annotations

import time

from bench import load
from bench.cases import CONCURRENCY, CREATE, Bench, _add, creates, metered
from bench.procs import unique
from bench.stats import CPU, P50, RATE, Metric, Sample
from service.metrics import ServiceMetrics

SILENT = {"TRIGGER_REQUEST_LOG_SAMPLE": "0"}


async def request_log(b: Bench) -> None:
    """Create over NATS with the request line on every request, against the line sampled at 0."""
    case = f"request log line: create over NATS, {CONCURRENCY} in flight"
    serial = "request log line: create over NATS, one at a time"
    ours_many: list[Sample] = []
    ours_one: list[Sample] = []
    base_many: list[Sample] = []
    base_one: list[Sample] = []
    for rep in range(b.reps):
        for logged in (True, False) if rep % 2 == 0 else (False, True):
            prefix = unique("l")
            async with b.service(env=None if logged else SILENT) as service:
                await load.closed_loop(
                    load.requester(b.nc, creates(CREATE, prefix + "w")),
                    concurrency=1,
                    seconds=0.3,
                    max_count=50,
                )
                one = await load.closed_loop(
                    load.requester(b.nc, creates(CREATE, prefix + "o")),
                    concurrency=1,
                    seconds=b.seconds / 2,
                    max_count=b.serial_max,
                )
                many = await metered(
                    service,
                    load.closed_loop(
                        load.requester(b.nc, creates(CREATE, prefix + "m")),
                        concurrency=CONCURRENCY,
                        seconds=b.seconds,
                    ),
                )
            (ours_one if logged else base_one).append(one)
            (ours_many if logged else base_many).append(many)
    silent = "TRIGGER_REQUEST_LOG_SAMPLE=0"
    note = "ours: every request logged (the default); ratio = cost of the line"
    _add(b.row(case, RATE, silent, note=note), ours_many, base_many, lambda s: s.rate)
    _add(b.row(case, CPU, silent), ours_many, base_many, lambda s: s.cpu_us)
    _add(b.row(serial, P50, silent), ours_one, base_one, lambda s: s.p50)


async def route_metrics(b: Bench) -> None:
    """The counters `_Carry.__call__` moves per carried message, timed on ServiceMetrics' own objects."""
    counts = ServiceMetrics().stream_route(f"default.stream.{unique('m')}")
    messages, size = counts.messages, 128
    rounds = 200_000

    def timed(count: bool) -> float:
        started = time.perf_counter()
        for _ in range(rounds):
            if count:
                messages.inc()
                counts.bytes.inc(size)
        return (time.perf_counter() - started) * 1e6 / rounds

    ours: list[float] = []
    for _ in range(b.reps):
        ours.append(timed(True) - timed(False))
    b.row(
        "stream route: per-message metrics (messages + bytes counters)",
        Metric("CPU per message", "us", False),
        note="timed in the bench process; compare the stream route's CPU per carried message",
    ).ours = ours


CASES = [("request log line", request_log), ("stream route metrics", route_metrics)]
