"""A minimal aiohttp HTTP-to-NATS forwarder: the floor the HTTP sidecar is measured against.

Each `--route METHOD PATH SUBJECT` turns an HTTP request into a NATS request on SUBJECT (body as
payload, the gateway's `Http-Method`/`Http-Path`/`Http-Query` headers) and answers with the
reply's body; the status is the envelope's `status_code` when the reply is a JSON object that
has one, else 200. No authentication, no validation, no rate limits, no access log.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal

import msgspec
import nats
import nats.errors
from aiohttp import web


class _Status(msgspec.Struct):
    status_code: int = 200


_status = msgspec.json.Decoder(_Status).decode


async def main() -> None:
    """Serve until SIGTERM."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nats", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--route", nargs=3, action="append", default=[], metavar=("METHOD", "PATH", "SUBJECT")
    )
    parser.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args()

    nc = await nats.connect(args.nats, name="bench-baseline-forwarder")

    def forward(subject: str):  # type: ignore[no-untyped-def]
        async def handle(request: web.Request) -> web.Response:
            body = await request.read()
            headers = {
                "Http-Method": request.method,
                "Http-Path": request.path,
                "Http-Query": request.query_string,
            }
            try:
                reply = await nc.request(subject, body, timeout=args.timeout, headers=headers)
            except nats.errors.NoRespondersError:
                return web.Response(status=503)
            except nats.errors.TimeoutError:
                return web.Response(status=504)
            status = 200
            if reply.data[:1] == b"{":
                with contextlib.suppress(msgspec.DecodeError):
                    status = _status(reply.data).status_code
            return web.Response(body=reply.data, status=status, content_type="application/json")

        return handle

    app = web.Application()
    for method, path, subject in args.route:
        app.router.add_route(method, path, forward(subject))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", args.port).start()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()
    await nc.drain()


if __name__ == "__main__":
    asyncio.run(main())
