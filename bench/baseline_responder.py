"""The minimal NATS responders the service is measured against, in a process of their own.

`--create SUBJECT --bucket BUCKET`: decode the create request's JSON, `kv.create` it under the
same key layout as the service, and reply with a 201 envelope; nothing else (no validation, no
micro framework, no logging). `--echo SUBJECT`: reply with a small fixed JSON payload (the NATS
responder behind a gateway trigger). `--durable STREAM TARGET`: the minimal JetStream consumer
a durable route is measured against: fetch from the stream's durable consumer `deliver` up to
`--in-hand` messages at once, request TARGET with each (the reply confirms it) and acknowledge it.
Each request runs in its own task, as in the service.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Coroutine
from typing import Any

import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import api

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode
ECHO_REPLY = b'{"ok":true,"status_code":200}'


async def _bucket(js: nats.js.JetStreamContext, name: str) -> nats.js.kv.KeyValue:
    try:
        return await js.key_value(name)
    except nats.js.errors.BucketNotFoundError:
        config = api.KeyValueConfig(bucket=name, history=64, storage=api.StorageType.FILE)
        return await js.create_key_value(config)


async def main() -> None:
    """Serve until SIGTERM."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nats", required=True)
    parser.add_argument("--create")
    parser.add_argument("--bucket", default="bench-baseline")
    parser.add_argument("--echo")
    parser.add_argument("--durable", nargs=2, metavar=("STREAM", "TARGET"))
    parser.add_argument("--in-hand", type=int, default=64)
    args = parser.parse_args()

    nc = await nats.connect(args.nats, name="bench-baseline-responder")
    tasks: set[asyncio.Task[None]] = set()

    def spawn(work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    if args.create:
        kv = await _bucket(nc.jetstream(), args.bucket)

        async def create(msg: Msg) -> None:
            request = _decode(msg.data)
            try:
                await kv.create(f"default.stream.{request['name']}", msg.data)
                reply = {"body": request, "status_code": 201}
            except nats.js.errors.KeyWrongLastSequenceError:
                reply = {"error": "Conflict: exists", "status_code": 409}
            await msg.respond(_encode(reply))

        async def on_create(msg: Msg) -> None:
            spawn(create(msg))

        await nc.subscribe(args.create, queue="baseline", cb=on_create)

    if args.echo:

        async def on_echo(msg: Msg) -> None:
            await msg.respond(ECHO_REPLY)

        await nc.subscribe(args.echo, queue="baseline", cb=on_echo)

    if args.durable:
        spawn(_consume(nc, *args.durable, args.in_hand))

    await nc.flush()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()
    await nc.drain()


async def _consume(nc: nats.NATS, stream: str, target: str, in_hand: int) -> None:
    """Fetch, deliver by request, acknowledge: `in_hand` messages at a time at most."""
    pull = await nc.jetstream().pull_subscribe_bind("deliver", stream=stream)
    in_flight: set[asyncio.Task[None]] = set()

    async def deliver(msg: Msg) -> None:
        try:
            await nc.request(target, msg.data, timeout=5)
        except (TimeoutError, nats.errors.Error):
            await msg.nak()
            return
        await msg.ack()

    while True:
        while len(in_flight) >= in_hand:
            await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
        try:
            messages = await pull.fetch(in_hand - len(in_flight), timeout=1.0)
        except (TimeoutError, nats.errors.TimeoutError):
            continue
        for msg in messages:
            task = asyncio.create_task(deliver(msg))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)


if __name__ == "__main__":
    asyncio.run(main())
