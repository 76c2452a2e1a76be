"""`make run-cluster`: a local three-node NATS cluster, two Trigger Service replicas and a sidecar.

Three nats-servers (n1..n3) form the JetStream cluster `trigger-local` on 127.0.0.1, on client,
cluster and monitoring ports chosen free at start, with their stores under ./data/cluster/n1..n3
(kept between runs). The bucket is made with three replicas (TRIGGER_REPLICAS=3); two service
processes and one HTTP sidecar connect with every node's URL. Once they answer it prints the
development token, the sidecar's URL, each node's PID and URLs, and how to kill a node and watch the
stack carry on. SIGUSR1 restarts every node that is down (on its ports, with its store). Ctrl-C
(SIGINT) or SIGTERM stops the sidecar, the replicas and the nodes, in that order.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from service import config, devstack
from service.auth import mint
from service.devstack import DEV_ACCOUNT, TOKEN_TTL, DevstackError, run_stack
from service.natsserver import NatsCluster, NatsServerError

CLUSTER_DIR = Path("data/cluster")
CLUSTER_NAME = "trigger-local"
REPLICAS = 2  # service processes
LAST_LINE = "Ctrl-C stops the sidecar, both service replicas and the three nodes."


def say(text: str) -> None:
    """One line for the person at the terminal."""
    print(f"[make run-cluster] {text}", flush=True)


class ClusterStack:
    """The cluster of one `make run-cluster`, started by `start`, stopped by the exit stack."""

    def __init__(self, root: Path = CLUSTER_DIR) -> None:
        self.cluster = NatsCluster(name=CLUSTER_NAME, root=root.resolve())
        self._healing: asyncio.Task[None] | None = None

    async def start(self, stack: contextlib.AsyncExitStack) -> str:
        """Start the three nodes, wait for the cluster; its comma-joined URLs (for NATS_URL)."""
        try:
            await asyncio.to_thread(self.cluster.start)
        except NatsServerError as exc:
            raise DevstackError(str(exc)) from None
        stack.push_async_callback(self._stop)
        for name, server in zip(self.cluster.names, self.cluster.servers, strict=True):
            say(f"NATS: {name} (pid {server.pid}) on {server.url}, store {server.store_dir}")
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGUSR1, self._heal)
        stack.callback(loop.remove_signal_handler, signal.SIGUSR1)
        return self.cluster.url

    def _heal(self) -> None:
        if self._healing is None or self._healing.done():
            self._healing = asyncio.create_task(self.heal())

    async def heal(self) -> None:
        """Restart every node that is down and say where it runs."""
        down = [
            name for name, s in zip(self.cluster.names, self.cluster.servers, strict=True) if not s.running
        ]
        if not down:
            say("SIGUSR1: every node is running")
            return
        say(f"SIGUSR1: restarting {', '.join(down)}")
        try:
            await asyncio.to_thread(self.cluster.heal)
        except NatsServerError as exc:
            say(f"cannot restart: {exc}")
            return
        for name in down:
            server = self.cluster.servers[self.cluster.index(name)]
            say(f"NATS: {name} is back (pid {server.pid}) on {server.url}; the cluster is ready")

    async def _stop(self) -> None:
        if self._healing is not None:
            self._healing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._healing
        await asyncio.to_thread(self.cluster.stop)
        say("nats-server nodes stopped")

    def banner(self, url: str, nats: str, settings: config.Settings, secret: str) -> str:
        """The nodes, the token and examples (as `make run` prints them), and what to try."""
        token = mint(secret, DEV_ACCOUNT, ttl=TOKEN_TTL)
        base = devstack.banner(url, nats, settings.prefix, token, devstack._python())
        return cluster_banner(self.cluster, url, nats, settings, base)


def cluster_banner(cluster: NatsCluster, url: str, nats: str, settings: config.Settings, base: str) -> str:
    """`base` (the banner of `make run`) framed by the nodes and the fault drill."""
    auth = '-H "Authorization: Bearer $TOKEN"'
    nodes = "\n".join(
        f"  {name}   pid {server.pid}   {server.url}   monitor http://127.0.0.1:{server.monitor_port}"
        for name, server in zip(cluster.names, cluster.servers, strict=True)
    )
    first, second = cluster.servers[0], cluster.servers[1]
    create = (
        '{"name":"watch-\'$i\'","trigger_type":"stream","source":{"subject":"watch.\'$i\'"},'
        '"target":{"subject":"watched.\'$i\'"}}'
    )
    return f"""
NATS cluster "{cluster.name}": three nodes, bucket {settings.bucket} with {settings.replicas} replicas,
{REPLICAS} service replicas behind one sidecar ({url}).

{nodes}
{base}
# which node leads the bucket's stream, and whether its replicas are current
nats --server {nats} stream info KV_{settings.bucket}
curl -s http://127.0.0.1:{first.monitor_port}/jsz | grep -A3 meta_cluster

# watch the stack carry on: a new trigger every half second through the sidecar (in another terminal)
i=0; while sleep 0.5; do i=$((i+1)); curl -s -o /dev/null -m 10 -w "$(date +%T) watch-$i %{{http_code}}\\n" \\
  -X POST {url}/trigger/stream {auth} -H 'Content-Type: application/json' -d '{create}'; done

# crash a node (here n2); the other two are a quorum: writes go on after a new leader is elected
kill -9 {second.pid}
# bring every node that is down back, on its ports and store (this stack's pid is {os.getpid()})
kill -USR1 {os.getpid()}
# two nodes down: no quorum, writes answer 503 (never a false 201) until one is back

{LAST_LINE}
"""


async def run(argv: Sequence[str]) -> int:
    """Start everything, print the banner, wait for Ctrl-C, stop everything; the exit status."""
    if argv:
        print(__doc__, file=sys.stderr)
        return 2
    nodes = ClusterStack()
    return await run_stack(
        nodes.start, nodes.banner, env={"TRIGGER_REPLICAS": "3"}, tell=say, replicas=REPLICAS
    )


def main() -> None:
    """Entry point of `python -m service.clusterstack`."""
    raise SystemExit(asyncio.run(run(sys.argv[1:])))


if __name__ == "__main__":
    main()
