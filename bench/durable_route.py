"""A durable stream trigger (service/durable.py) beside a minimal JetStream consumer on the same server.

Both sides capture S in a work-queue stream (file storage, `no_ack`) with one durable pull
consumer (explicit acks, 1,000 unacknowledged at most), fetch up to 64 messages at once
(durable.IN_HAND), deliver each as a request to D whose reply confirms it (`confirm: reply`) and
acknowledge it. The baseline (`baseline_responder.py --durable`) does nothing else: no retries,
no dead letter, no counts, no metrics. D's responder runs in the bench process and records when
each message arrived; the payload is the time it was published, so latency is end to end.
"""

from __future__ import annotations

import time

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import api

from bench.cases import Arrivals, Bench, _add, _create_route, metered
from bench.procs import Child, running, unique
from bench.stats import CPU, MSG_RATE, P50, P99, Sample
from service import durable

WINDOW = 1_000  # messages published and not yet confirmed at D, at most
CONFIRMED = b'{"status_code":200}'


class Confirming(Arrivals):
    """D's responder: confirms each message and keeps (arrived, published) times."""

    def __init__(self) -> None:
        super().__init__(keep=True)

    async def on_msg(self, msg: Msg) -> None:
        """Subscription callback."""
        await super().on_msg(msg)
        await msg.respond(CONFIRMED)


async def _durable_flow(pub: Client, sub: Client, send: str, receive: str, seconds: float) -> Sample:
    """Publish on `send` for `seconds` (at most WINDOW unconfirmed), then wait for the rest at `receive`."""
    confirming = Confirming()
    subscription = await sub.subscribe(receive, cb=confirming.on_msg, pending_msgs_limit=10 * WINDOW)
    await sub.flush()
    started = time.perf_counter()
    deadline = started + seconds
    sent = 0
    while time.perf_counter() < deadline:
        for _ in range(WINDOW // 2):
            await pub.publish(send, b"%f" % time.perf_counter())
        sent += WINDOW // 2
        await pub.flush()
        if not await confirming.reach(sent - WINDOW // 2, 15):
            break
    await confirming.reach(sent, 15)
    await subscription.unsubscribe()
    times = confirming.kept
    elapsed = (times[-1][0] if times else time.perf_counter()) - started
    sample = Sample(ok=len(times), errors=max(0, sent - len(times)), seconds=elapsed)
    sample.latencies_ms = [(arrived - published) * 1000 for arrived, published in times]
    return sample


async def _baseline_stream(nc: Client, source: str) -> str:
    """The baseline's capture stream and consumer, configured as service/durable.py configures its own."""
    js = nc.jetstream()
    stream = unique("BENCH_DURABLE").replace("-", "_")
    await js.add_stream(
        api.StreamConfig(
            name=stream,
            subjects=[source],
            retention=api.RetentionPolicy.WORK_QUEUE,
            storage=api.StorageType.FILE,
            discard=api.DiscardPolicy.OLD,
            no_ack=True,
        )
    )
    await js.add_consumer(
        stream,
        api.ConsumerConfig(
            durable_name=durable.CONSUMER,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=6.0,
            max_deliver=-1,
            max_ack_pending=durable.MAX_ACK_PENDING,
            deliver_policy=api.DeliverPolicy.ALL,
            replay_policy=api.ReplayPolicy.INSTANT,
        ),
    )
    return stream


async def durable_route(b: Bench) -> None:
    """Durable route against the minimal fetch-deliver-acknowledge consumer: rate, p50/p99, CPU."""
    case = "durable stream route (confirm: reply, 64 in hand)"
    pub, sub = await b.connect("bench-pub"), await b.connect("bench-sub")
    name = unique("dur")
    source, target = f"bench.dur.{name}.in", f"bench.dur.{name}.out"
    raw_source, raw_target = f"bench.rawdur.{name}.in", f"bench.rawdur.{name}.out"
    ours: list[Sample] = []
    base: list[Sample] = []
    stream = await _baseline_stream(b.nc, raw_source)
    consumer: Child = b.stack.responder("--durable", stream, raw_target, "--in-hand", str(durable.IN_HAND))
    try:
        async with b.service(profile="service-durable-route") as service, running(consumer):
            reply = await _create_route(
                b, name, source, target, delivery={"mode": "durable", "confirm": "reply"}
            )
            if reply.get("status_code") != 201:
                b.skip(case, f"create durable trigger answered {reply}")
                return
            await _durable_flow(pub, sub, source, target, 0.3)  # warm-up
            await _durable_flow(pub, sub, raw_source, raw_target, 0.3)
            for rep in range(b.reps):
                sides = [(service, source, target, ours), (consumer, raw_source, raw_target, base)]
                for child, send, receive, samples in sides if rep % 2 == 0 else sides[::-1]:
                    samples.append(await metered(child, _durable_flow(pub, sub, send, receive, b.seconds)))
    finally:
        await pub.drain()
        await sub.drain()
        await b.nc.jetstream().delete_stream(stream)
    baseline = "minimal JetStream consumer"
    note = "published at most 1,000 ahead of D's confirmations; latency from publish on S to D"
    _add(b.row(case, MSG_RATE, baseline, note=note), ours, base, lambda s: s.rate)
    _add(b.row(case, P50, baseline), ours, base, lambda s: s.p50)
    _add(b.row(case, P99, baseline), ours, base, lambda s: s.p99)
    _add(b.row(case, CPU, baseline, note="the delivering process's CPU"), ours, base, lambda s: s.cpu_us)


CASES = [("durable stream route", durable_route)]
