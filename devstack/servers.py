"""The servers of the local stack, one spec each, and the process helpers they share.

`SERVERS` is the table every starter reads (`devstack.stack`, the test
fixtures, the fault suite): the server's name (its state folder and log), the
variable that points at an existing server instead of starting one, and its
starter. Each starter takes a folder and keyword options and returns a
`Server` whose `start_again()` brings the same server back on its port.

    start_nats(folder, *, port=None, log_path=None, timeout=30, die_with_parent=False,
               users=None, tls=None, cluster=None, sync_interval=None, monitor_port=None)
    start_redis(folder, ..., cluster_port=None) / start_redis_cluster(folder, masters=3) / start_postgres(folder, ..., database="tiermem") / start_simulator(folder, ..., env=None)
    nats_cluster(size) -> [NatsCluster]             # the cluster= of each node
    ensure_database(port, name) / psql(bins, port, sql, db=...)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from devstack.nats import NatsCluster, nats_cluster, nats_server_binary, start_nats
from devstack.postgres import ensure_database, postgres_at, postgres_bin_dir, psql, start_postgres
from devstack.process import (HOST, Server, ServerStartError, free_port, log_tail, process_alive,
                              process_start_time, spawn, stop_process)
from devstack.redis import RedisClusterServers, start_redis, start_redis_cluster, valkey_server_binary
from devstack.simulator import start_simulator

__all__ = [
    "HOST", "SERVERS", "NatsCluster", "RedisClusterServers", "Server", "ServerSpec", "ServerStartError", "ensure_database", "free_port",
    "log_tail", "nats_cluster", "nats_server_binary", "postgres_bin_dir", "process_alive", "process_start_time",
    "postgres_at", "psql", "server", "spawn", "start_nats", "start_postgres", "start_redis", "start_redis_cluster", "start_simulator", "stop_process",
    "valkey_server_binary",
]


@dataclass(frozen=True)
class ServerSpec:
    name: str  # its folder under the state folder, and its log name
    url_var: str  # set in the environment: use that server, start none
    start: Callable[..., Server]


SERVERS: tuple[ServerSpec, ...] = (
    ServerSpec("nats", "NATS_URL", start_nats),
    ServerSpec("redis", "REDIS_URL", start_redis),
    ServerSpec("postgres", "DATABASE_URL", start_postgres),
    # The Claude API stand-in; `devstack.stack` skips it when ANTHROPIC_API_KEY is set (Claude itself).
    ServerSpec("llm-simulator", "ANTHROPIC_BASE_URL", start_simulator),
)


def server(name: str) -> ServerSpec:
    for spec in SERVERS:
        if spec.name == name:
            return spec
    raise KeyError(f"no server {name!r}; known: {[s.name for s in SERVERS]}")
