"""`make run-accounts`: the local stack in accounts (operator) mode.

It makes a development operator under `.dev/accounts` when there is none (see
service.accounts.bootstrap), starts nats-server in operator mode with the full resolver on
4222/8222 (or free ports when those are taken), then the service with TRIGGER_ROUTING=accounts
and the HTTP sidecar, and prints each tenant's creds, a token and examples to paste. Ctrl-C
stops them in reverse order.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from service import config
from service.accounts import bootstrap
from service.auth import mint
from service.devstack import (
    DEV_DIR,
    MONITOR_PORT,
    NATS_PORT,
    TOKEN_TTL,
    DevstackError,
    free_port,
    port_free,
    run_stack,
)
from service.natsserver import NatsServer, NatsServerError

ACCOUNTS_DIR = DEV_DIR / "accounts"


def say(text: str) -> None:
    """One line for the person at the terminal."""
    print(f"[make run-accounts] {text}", flush=True)


def operator(directory: Path) -> bootstrap.DevOperator:
    """The development operator under `directory`, made on first use."""
    if (directory / bootstrap.MANIFEST).is_file():
        return bootstrap.load(directory)
    say(f"no development operator in {directory}: making one (trigger-service accounts init {directory})")
    return bootstrap.create(directory)


async def start_nats(stack: contextlib.AsyncExitStack, dev: bootstrap.DevOperator) -> str:
    """nats-server in operator mode on 4222/8222, or on free ports when those are taken."""
    root = Path(dev.root)
    port = NATS_PORT if port_free(NATS_PORT) else free_port()
    http_port = MONITOR_PORT if port_free(MONITOR_PORT) else free_port()
    if (port, http_port) != (NATS_PORT, MONITOR_PORT):
        say(f"{NATS_PORT} or {MONITOR_PORT} is taken: nats-server listens on {port}, monitors on {http_port}")
    server_config = root / "nats-server.conf"
    server_config.write_text(
        bootstrap.server_config(
            dev,
            resolver_dir=root / "resolver",
            store_dir=root / "jetstream",
            port=port,
            http_port=http_port,
        )
    )
    server = NatsServer(config=server_config, store_dir=root / "jetstream")
    try:
        await asyncio.to_thread(server.start)
    except NatsServerError as exc:
        raise DevstackError(str(exc)) from None
    stack.push_async_callback(asyncio.to_thread, server.stop)
    say(f"NATS: started nats-server -c {server_config} (operator mode) on port {server.port}")
    return server.url


def banner(url: str, nats_url: str, dev: bootstrap.DevOperator, secret: str) -> str:
    """Each tenant's creds and token, and a cross-account trigger to paste."""
    a, b = dev.tenants[0], dev.tenants[1]
    lines = [
        "",
        "Trigger Service is running in accounts mode: a stream trigger is an export in the source",
        "account's JWT and an import in the target's, so NATS itself carries the data.",
        "",
        f"  HTTP API   {url}",
        f"  NATS       {nats_url}   (operator {dev.operator}, files in {dev.root})",
        "",
    ]
    for tenant, other in ((a, b), (b, a)):
        token = mint(secret, tenant.public_key, ttl=TOKEN_TTL, accounts=[other.public_key])
        lines += [
            f"  {tenant.name}  account {tenant.public_key}",
            f"            creds {tenant.creds}",
            f"            token (may target {other.name}): {token}",
        ]
    trigger = {
        "name": "orders",
        "trigger_type": "stream",
        "source": {"subject": "orders.created"},
        "target": {"account": b.public_key, "subject": "billing.orders"},
    }
    token_a = mint(secret, a.public_key, ttl=TOKEN_TTL, accounts=[b.public_key])
    lines += [
        "",
        f"export TOKEN_A={token_a}",
        f"# {a.name}'s orders.created appears as billing.orders in {b.name}:",
        f'curl -s -X POST {url}/trigger/stream -H "Authorization: Bearer $TOKEN_A" '
        f"-H 'Content-Type: application/json' -d '{json.dumps(trigger)}'",
        f"nats --server {nats_url} --creds {b.creds} sub billing.orders &",
        f"nats --server {nats_url} --creds {a.creds} pub orders.created hello",
        f'curl -s -X DELETE {url}/trigger/triggers/stream/orders -H "Authorization: Bearer $TOKEN_A"',
        "# the API over NATS, from a tenant's own account (it imports the Trigger API):",
        f"nats --server {nats_url} --creds {a.creds} req {dev.prefix}.list "
        f'\'{{"subject_pattern": "{dev.prefix}.>"}}\' -H "Authorization:Bearer $TOKEN_A"',
        "",
    ]
    return "\n".join(lines)


async def run(argv: Sequence[str], stop: asyncio.Event | None = None) -> int:
    """Start everything, print the banner, wait for Ctrl-C (or `stop`), stop everything; the exit status."""
    parser = argparse.ArgumentParser(prog="python -m service.accounts.devstack", description=__doc__)
    parser.add_argument("--dir", type=Path, default=ACCOUNTS_DIR, help="the development operator's files")
    args = parser.parse_args(argv)
    dev = operator(args.dir)

    def show(url: str, nats_url: str, settings: config.Settings, secret: str) -> str:
        return banner(url, nats_url, dev, secret)

    return await run_stack(functools.partial(start_nats, dev=dev), show, env=dev.env(), stop=stop, tell=say)


def main() -> None:
    """Entry point of `python -m service.accounts.devstack`."""
    raise SystemExit(asyncio.run(run(sys.argv[1:])))


if __name__ == "__main__":
    main()
