"""`make run`: nats-server with JetStream, the Trigger Service and the HTTP sidecar, on this machine.

It starts `nats-server -c nats-server.conf` (unless NATS_URL names a running server, or a NATS
server with JetStream already listens on the configured port), then the service and the sidecar
as child processes, and prints the URL, a development token and examples to paste. Ctrl-C
(SIGINT) or SIGTERM stops them in reverse order. It only ever stops processes it started.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import secrets
import shlex
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import nats

from service import config
from service.app import stop_signal
from service.auth import mint
from service.natsserver import NatsServer, NatsServerError

DEV_DIR = Path(".dev")
SERVER_CONFIG = Path("nats-server.conf")
DEV_ACCOUNT = "dev"
TOKEN_TTL = 7 * 86_400
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
SIDECAR = "from service.cli import gateway_main; gateway_main()"
NATS_PORT, MONITOR_PORT, HTTP_PORT = 4222, 8222, 8080  # the well-known local ports


class DevstackError(Exception):
    """The stack cannot start; the message says why and what to do."""


def say(text: str) -> None:
    """One line for the person at the terminal."""
    print(f"[make run] {text}", flush=True)


# --- the pieces ------------------------------------------------------------------------------


def dev_secret(directory: Path = DEV_DIR) -> str:
    """The local JWT secret, made once and kept under `directory` so tokens survive restarts."""
    path = directory / "jwt-secret"
    if path.is_file() and len(secret := path.read_text().strip()) >= 32:
        return secret
    directory.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(48)
    path.touch(mode=0o600)
    path.write_text(secret + "\n")
    return secret


def port_free(port: int, host: str = "0.0.0.0") -> bool:
    """True when a server could listen on `host:port` now (as nats-server does, with SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def free_port(host: str = "0.0.0.0") -> int:
    """A port that is free now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


async def jetstream_at(url: str) -> bool | None:
    """None when no NATS server answers at `url`; else whether it has JetStream for us."""

    async def quiet(exc: Exception) -> None:
        return None

    if not await _listening(url):
        return None
    try:
        # nats-py may retry a failed initial connect for a while: bound the whole attempt.
        connecting = nats.connect(
            url, connect_timeout=2, allow_reconnect=False, max_reconnect_attempts=0, error_cb=quiet
        )
        nc = await asyncio.wait_for(connecting, 3)
    except Exception:  # refused, not NATS, TLS, auth: in every case nothing usable answers there
        return None
    try:
        await nc.jetstream(timeout=2).account_info()
        return True
    except Exception:  # no responders, disabled for the account, timeout: no JetStream for us
        return False
    finally:
        await nc.close()


async def _listening(url: str) -> bool:
    """True when something accepts TCP connections at the (first) server of a NATS URL."""
    parts = urlsplit(url.split(",")[0] if "://" in url else f"nats://{url}")
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(parts.hostname, parts.port or NATS_PORT), 2
        )
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


def config_port(text: str, key: str, default: int) -> int:
    """The value of `key: N` in a nats-server configuration."""
    match = re.search(rf"^\s*{key}\s*[:=]\s*(\d+)\s*$", text, re.MULTILINE)
    return int(match.group(1)) if match else default


def with_ports(text: str, port: int, http_port: int) -> str:
    """The configuration with its client and monitoring ports replaced."""
    for key, value in (("port", port), ("http_port", http_port)):
        line = re.compile(rf"^(\s*){key}\s*[:=]\s*\d+\s*$", re.MULTILINE)
        text = line.sub(rf"\g<1>{key}: {value}", text) if line.search(text) else f"{key}: {value}\n{text}"
    return text


async def nats_url(stack: contextlib.AsyncExitStack, server_config: Path = SERVER_CONFIG) -> str:
    """The URL of a NATS server with JetStream: NATS_URL's, one already on the port, or one started here."""
    if url := os.environ.get("NATS_URL"):
        jetstream = await jetstream_at(url)
        if jetstream is None:
            raise DevstackError(f"NATS_URL={url}: no NATS server answers there (unset it to start one here)")
        if not jetstream:
            raise DevstackError(f"NATS_URL={url}: that server has no JetStream, which the service needs")
        say(f"NATS: using the server at NATS_URL={url}")
        return url
    text = _read_config(server_config)
    port, http_port = config_port(text, "port", NATS_PORT), config_port(text, "http_port", MONITOR_PORT)
    chosen_port, chosen_http = port, http_port
    if not port_free(port):
        local = f"nats://127.0.0.1:{port}"
        jetstream = await jetstream_at(local)
        if jetstream:
            say(f"NATS: port {port} is taken by a NATS server with JetStream: reusing it, not starting one")
            return local
        chosen_port = free_port()
        holder = "a NATS server without JetStream" if jetstream is False else "another program"
        say(
            f"NATS: port {port} is taken by {holder}; starting nats-server on free port {chosen_port} instead"
        )
    if not port_free(http_port):
        chosen_http = free_port()
        say(f"NATS: monitoring port {http_port} is taken; nats-server monitors on {chosen_http} instead")
    if (chosen_port, chosen_http) != (port, http_port):
        server_config = _write_config(with_ports(text, chosen_port, chosen_http))
    server = NatsServer(config=server_config)
    try:
        await asyncio.to_thread(server.start)
    except NatsServerError as exc:
        raise DevstackError(str(exc)) from None
    stack.push_async_callback(_stop_nats, server)
    say(f"NATS: started nats-server -c {server_config} (pid {_pid(server)}) on port {server.port}")
    return server.url


def _read_config(path: Path) -> str:
    if not path.is_file():
        raise DevstackError(f"{path} not found: run `make run` from the project's directory")
    return path.read_text()


def _write_config(text: str) -> Path:
    DEV_DIR.mkdir(parents=True, exist_ok=True)
    path = DEV_DIR / "nats-server.conf"
    path.write_text(text)
    return path


def http_addr(addr: str) -> str:
    """TRIGGER_HTTP_ADDR, or the same host on a free port when that port is taken (or 0)."""
    host, port = addr.rsplit(":", 1)
    if int(port) != 0 and port_free(int(port), host or "0.0.0.0"):
        return addr
    chosen = free_port(host or "0.0.0.0")
    if int(port) != 0:
        say(f"HTTP: port {port} is taken; the sidecar listens on free port {chosen} instead")
    return f"{host}:{chosen}"


# --- the children ----------------------------------------------------------------------------


async def start_child(
    stack: contextlib.AsyncExitStack, name: str, argv: Sequence[str], env: dict[str, str]
) -> asyncio.subprocess.Process:
    """A child process in its own session (a terminal's Ctrl-C reaches us, and we stop it in order)."""
    proc = await asyncio.create_subprocess_exec(*argv, env=env, start_new_session=True)
    stack.push_async_callback(_stop_child, name, proc)
    return proc


async def _stop_child(name: str, proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)
        except TimeoutError:
            say(f"{name} did not stop within {STOP_TIMEOUT:g} s: killing it")
            proc.kill()
            await proc.wait()
    say(f"{name} stopped")


async def _stop_nats(server: NatsServer) -> None:
    await asyncio.to_thread(server.stop)
    say("nats-server stopped")


def _pid(server: NatsServer) -> int | None:
    return server.proc.pid if server.proc is not None else None


async def wait_ready(url: str, children: dict[str, asyncio.subprocess.Process], stop: asyncio.Event) -> None:
    """Poll `/healthz` until the sidecar answers 200 (so the service answers too)."""
    deadline = time.monotonic() + READY_TIMEOUT
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
        while not stop.is_set():
            for name, proc in children.items():
                if proc.returncode is not None:
                    raise DevstackError(f"the {name} exited with status {proc.returncode} (its log is above)")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with http.get(f"{url}/healthz") as response:
                    if response.status == 200:
                        return
            if time.monotonic() > deadline:
                raise DevstackError(f"{url}/healthz did not answer 200 within {READY_TIMEOUT:g} s")
            await asyncio.sleep(0.2)


async def until_stopped(children: dict[str, asyncio.subprocess.Process], stop: asyncio.Event) -> int:
    """Wait for SIGINT/SIGTERM (0) or for a child to exit on its own (1)."""
    waits = {asyncio.ensure_future(proc.wait()): name for name, proc in children.items()}
    stopper = asyncio.ensure_future(stop.wait())
    done, pending = await asyncio.wait({stopper, *waits}, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    if stopper in done:
        say("stopping")
        return 0
    name = waits[next(iter(done - {stopper}))]
    say(f"the {name} exited with status {children[name].returncode}: stopping the rest")
    return 1


# --- what the person at the terminal reads ---------------------------------------------------


def banner(url: str, nats: str, prefix: str, token: str, python: str) -> str:
    """The URL, the token, and examples to paste."""
    auth = '-H "Authorization: Bearer $TOKEN"'
    create = (
        '{"name": "orders", "trigger_type": "stream", "source": {"subject": "orders.created"}, '
        '"target": {"subject": "billing.orders"}}'
    )
    script = (
        "import asyncio, json, os, nats\n"
        "async def main():\n"
        f"    nc = await nats.connect(servers={json.dumps(nats.split(','))})\n"
        f'    query = json.dumps({{"subject_pattern": "{prefix}.>"}}).encode()\n'
        f'    msg = await nc.request("{prefix}.list", query, headers={{"Authorization": "Bearer " + '
        'os.environ["TOKEN"]})\n'
        "    print(msg.data.decode())\n"
        "    await nc.close()\n"
        "asyncio.run(main())"
    )
    return f"""
Trigger Service is running. Ctrl-C stops the sidecar and the service (and nats-server, if started here).

  HTTP API   {url}   (OpenAPI document: {url}/openapi.json, health: {url}/healthz)
  NATS       {nats}   (API subjects {prefix}.*)
  token      account "{DEV_ACCOUNT}", valid {TOKEN_TTL // 86_400} days, signed with {DEV_DIR}/jwt-secret

export TOKEN={token}

# create a stream trigger (orders.created -> billing.orders), get it, list all, history, delete
curl -s -X POST {url}/trigger/stream {auth} -H 'Content-Type: application/json' -d '{create}'
curl -s {url}/trigger/triggers/stream/orders {auth}
curl -sG {url}/trigger/triggers --data-urlencode 'subject_pattern={prefix}.>' {auth}
curl -s {url}/trigger/triggers/stream/orders/history {auth}
curl -s -X DELETE {url}/trigger/triggers/stream/orders {auth}

# the same API over NATS, with the NATS CLI
nats --server {nats} req {prefix}.list '{{"subject_pattern": "{prefix}.>"}}' -H "Authorization:Bearer $TOKEN"
# or with Python
{python} -c {shlex.quote(script)}
"""


def _python() -> str:
    """The interpreter to show: relative to the project when it lives there."""
    with contextlib.suppress(ValueError):
        return str(Path(sys.executable).relative_to(Path.cwd()))
    return sys.executable


# --- the whole stack -------------------------------------------------------------------------


async def run(argv: Sequence[str]) -> int:
    """Start everything, print the banner, wait for Ctrl-C, stop everything; the exit status."""
    parser = argparse.ArgumentParser(prog="python -m service.devstack", description=__doc__)
    parser.add_argument("--accounts", action="store_true", help="accounts (operator) mode")
    args, rest = parser.parse_known_args(argv)
    if args.accounts:
        from service.accounts.devstack import run as run_accounts  # it builds on this module

        return await run_accounts(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return await run_stack(nats_url, _banner)


def _banner(url: str, nats: str, settings: config.Settings, secret: str) -> str:
    token = mint(secret, DEV_ACCOUNT, ttl=TOKEN_TTL)
    return banner(url, nats, settings.prefix, token, _python())


async def run_stack(
    start_nats: Callable[[contextlib.AsyncExitStack], Awaitable[str]],
    show: Callable[[str, str, config.Settings, str], str],
    *,
    env: Mapping[str, str] | None = None,
    stop: asyncio.Event | None = None,
    tell: Callable[[str], None] = say,
    replicas: int = 1,
) -> int:
    """NATS from `start_nats`, then the service (`replicas` processes of it) and the sidecar with JWT
    auth (and `env`); print `show(url, nats_url, settings, secret)` once they answer, wait for
    SIGINT/SIGTERM (or `stop`) or a child's exit, stop everything in reverse order; the exit status."""
    if stop is None:
        stop = stop_signal()
    async with contextlib.AsyncExitStack() as stack:
        try:
            secret = dev_secret()
            nats_server = await start_nats(stack)
            addr = http_addr(os.environ.get("TRIGGER_HTTP_ADDR") or f"127.0.0.1:{HTTP_PORT}")
            child_env = {
                **os.environ,
                **(env or {}),
                "NATS_URL": nats_server,
                "TRIGGER_JWT_SECRET": secret,
                "TRIGGER_HTTP_ADDR": addr,
                "TRIGGER_AUTH": "jwt",
            }
            child_env.pop("TRIGGER_JWT_PUBLIC_KEY", None)
            try:
                settings = config.load(child_env)  # a bad variable fails here, by name, not in a child
            except config.ConfigError as exc:
                raise DevstackError(f"configuration error: {exc}") from None
            names = ["service"] if replicas == 1 else [f"service-{i + 1}" for i in range(replicas)]
            children = {
                name: await start_child(stack, name, [sys.executable, "-m", "service"], child_env)
                for name in names
            }
            sidecar = [sys.executable, "-c", SIDECAR]
            children["sidecar"] = await start_child(stack, "sidecar", sidecar, child_env)
            host, port = addr.rsplit(":", 1)
            url = f"http://{host if host not in ('', '0.0.0.0') else '127.0.0.1'}:{port}"
            await wait_ready(url, children, stop)
            if stop.is_set():
                return 0
            print(show(url, nats_server, settings, secret), flush=True)
            return await until_stopped(children, stop)
        except DevstackError as exc:
            tell(f"cannot start: {exc}")
            return 1


def main() -> None:
    """Entry point of `python -m service.devstack`."""
    raise SystemExit(asyncio.run(run(sys.argv[1:])))


if __name__ == "__main__":
    main()
