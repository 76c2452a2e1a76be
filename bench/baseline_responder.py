"""The minimal NATS responders the service is measured against, in a process of their own.

`--create SUBJECT --bucket BUCKET`: decode the create request's JSON, `kv.create` it under the
same key layout as the service, and reply with a 201 envelope; nothing else (no validation, no
micro framework, no logging). `--echo SUBJECT`: reply with a small fixed JSON payload (the NATS
responder behind a gateway trigger). Each request runs in its own task, as in the service.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Coroutine
from typing import Any

import msgspec
import nats
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

    await nc.flush()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()
    await nc.drain()


if __name__ == "__main__":
    asyncio.run(main())
