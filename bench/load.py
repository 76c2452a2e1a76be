"""Load generators: NATS requests from this process, HTTP from wrk (else an aiohttp client loop)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp
import nats.errors
from nats.aio.client import Client
from nats.js.kv import KeyValue

from bench.procs import BENCH, which
from bench.stats import Sample

OK = b'"status_code":2'  # every 2xx envelope (ours and the baselines') contains this


async def closed_loop(
    call: Callable[[int], Awaitable[bool]], *, concurrency: int, seconds: float, max_count: int = 10**7
) -> Sample:
    """`concurrency` callers in a loop for `seconds` (or `max_count` calls); `call(i)` -> succeeded."""
    sample = Sample()
    counter = itertools.count()
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < deadline:
            i = next(counter)
            if i >= max_count:
                return
            started = time.perf_counter()
            try:
                ok = await call(i)
                kind = "rejected"
            except (nats.errors.Error, TimeoutError) as exc:
                ok, kind = False, type(exc).__name__
            if ok:
                sample.ok += 1
                sample.latencies_ms.append((time.perf_counter() - started) * 1000)
            else:
                sample.errors += 1
                sample.error_kinds[kind] += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    sample.seconds = time.perf_counter() - started
    return sample


def requester(
    nc: Client, subject_payload: Callable[[int], tuple[str, bytes]]
) -> Callable[[int], Awaitable[bool]]:
    """A call that sends one NATS request and accepts any 2xx envelope."""

    async def call(i: int) -> bool:
        subject, payload = subject_payload(i)
        msg = await nc.request(subject, payload, timeout=10)
        return OK in msg.data

    return call


def ensure_wrk() -> str | None:
    """Path of wrk, installing the Debian package when running as root with apt-get; None if impossible."""
    found = which("wrk")
    if found or os.environ.get("BENCH_NO_WRK"):
        return None if os.environ.get("BENCH_NO_WRK") else found
    if os.geteuid() != 0 or not which("apt-get"):
        return None
    print("installing wrk (Debian package)", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "wrk"]):
        if subprocess.run(command, env=env, capture_output=True, check=False).returncode != 0:
            return None
    return which("wrk")


@dataclass(frozen=True)
class Http:
    """How HTTP load is generated in this run."""

    wrk: str | None

    @property
    def tool(self) -> str:
        """The load generator's name, for the results."""
        return "wrk" if self.wrk else "aiohttp client loop (wrk not available)"

    async def run(
        self, url: str, method: str, path: str, *, kind: str, prefix: str, connections: int, seconds: float
    ) -> Sample:
        """`connections` keep-alive connections sending METHOD path for `seconds`."""
        if self.wrk:
            return await _wrk(self.wrk, url, method, path, kind, prefix, connections, seconds)
        return await _aiohttp_loop(url, method, path, kind, prefix, connections, seconds)


async def _wrk(
    wrk: str, url: str, method: str, path: str, kind: str, prefix: str, connections: int, seconds: float
) -> Sample:
    argv = [
        wrk,
        "-t",
        "1",
        "-c",
        str(connections),
        "-d",
        f"{max(1, round(seconds))}s",
        "--timeout",
        "10s",
        "-s",
        str(BENCH / "wrk.lua"),
        url,
        "--",
        method,
        path,
        kind,
        prefix,
    ]
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    text = out.decode(errors="replace")
    line = next((ln for ln in text.splitlines() if ln.startswith("WRK_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result:\n{text[-2000:]}")
    result = json.loads(line.removeprefix("WRK_JSON "))
    errors = sum(
        result[k] for k in ("status_errors", "connect_errors", "read_errors", "write_errors", "timeouts")
    )
    sample = Sample(
        ok=result["requests"] - result["status_errors"],
        errors=errors,
        seconds=result["duration_us"] / 1e6,
    )
    sample.reported = (result["p50_us"] / 1000, result["p99_us"] / 1000)
    return sample


async def _aiohttp_loop(
    url: str, method: str, path: str, kind: str, prefix: str, connections: int, seconds: float
) -> Sample:
    sample = Sample()
    counter = itertools.count()
    deadline = time.perf_counter() + seconds

    def body(i: int) -> bytes | None:
        if kind != "create-stream":
            return None
        name = f"{prefix}-{i}"
        return json.dumps(
            {
                "name": name,
                "trigger_type": "stream",
                "source": {"subject": f"bench.s.{name}", "type": "stream"},
                "target": {"subject": f"bench.d.{name}", "type": "stream"},
            }
        ).encode()

    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(url, connector=connector) as session:

        async def worker() -> None:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                try:
                    async with session.request(
                        method, path, data=body(next(counter)), headers={"Content-Type": "application/json"}
                    ) as resp:
                        await resp.read()
                        ok = resp.status < 400
                except aiohttp.ClientError:
                    ok = False
                if ok:
                    sample.ok += 1
                    sample.latencies_ms.append((time.perf_counter() - started) * 1000)
                else:
                    sample.errors += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(connections)))
        sample.seconds = time.perf_counter() - started
    return sample


async def http_status(url: str, method: str = "GET", body: bytes | None = None) -> int:
    """The status of one HTTP request (0 when the connection fails)."""
    with contextlib.suppress(aiohttp.ClientError, TimeoutError):
        async with (
            aiohttp.ClientSession() as session,
            session.request(
                method,
                url,
                data=body,
                headers={"Content-Type": "application/json"},
                timeout=aiohttp.ClientTimeout(total=5),
            ) as resp,
        ):
            await resp.read()
            return resp.status
    return 0


async def watched(kv: KeyValue, keys: str) -> int:
    """How many live entries a filtered `kv.watch` delivers until it is current (as service.store reads)."""
    watcher = await kv.watch(keys)
    found = 0
    while await watcher.updates(timeout=None) is not None:
        found += 1
    await watcher.stop()
    return found
