"""The stack under test: servers we can kill and restart, services as separate processes.

Why its own servers: a fault must SIGKILL nats-server, valkey or Postgres and
bring it back on the same port and folder, so the harness starts them
(`devstack.servers`, loopback only) and hands their URLs to `devstack.stack.up`,
which starts every service as its own process, as `just up` does. A 3-node
NATS cluster (`cluster=True`) gives the services all three URLs and streams
R3 (`STREAM_REPLICAS=3`).

Services that the suite kills are brought back by the stack's supervisor
(`devstack.supervise`, as `just up` runs it, with a short backoff here so that
back-to-back kill trials do not wait 30 s); `restart(service)` waits for it.
Extra instances (3 gateways, 2 indexers) are spawned and stopped here.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from devstack import servers, stack
from shared import bus, permissions

SIMULATOR_ENV = {"SIMULATOR_LATENCY_MEDIAN_S": "0.02", "SIMULATOR_LATENCY_P95_S": "0.05"}
RESTART_BACKOFF = "0.2,2,5"  # supervisor: first wait, cap, reset after (s)


@dataclass
class Proc:
    """A service process the harness started (a restart or an extra instance)."""

    name: str
    proc: subprocess.Popen

    @property
    def pid(self) -> int:
        return self.proc.pid


@dataclass
class Harness:
    root: Path
    cluster: bool = False
    servers: dict[str, servers.Server] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    extras: list[Proc] = field(default_factory=list)
    passwords: dict[str, str] = field(default_factory=dict)

    # ------------------------------------------------------------------ start / stop

    def start(self) -> dict[str, str]:
        """Servers, then every service via `devstack.stack.up`; returns the clients' env."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.passwords = {name: secrets.token_urlsafe(16) for name in permissions.ROLES}
        ids = self.root / "nats-identities.json"
        ids.write_text(json.dumps(self.passwords))
        ids.chmod(0o600)
        users = permissions.nats_users(self.passwords)
        if self.cluster:
            for i, spec in enumerate(servers.nats_cluster(3)):
                self.servers[f"nats{i}"] = servers.start_nats(self.root / f"nats{i}", users=users, cluster=spec)
            nats_url = ",".join(self.servers[f"nats{i}"].url for i in range(3))
            asyncio.run(self._jetstream_ready(nats_url))
        else:
            self.servers["nats"] = servers.start_nats(self.root / "nats", users=users)
            nats_url = self.servers["nats"].url
        self.servers["redis"] = servers.start_redis(self.root / "redis")
        self.servers["postgres"] = servers.start_postgres(self.root / "postgres")
        self.servers["llm-simulator"] = servers.start_simulator(self.root / "sim", env={**os.environ, **SIMULATOR_ENV})
        urls = {"NATS_URL": nats_url, "REDIS_URL": self.servers["redis"].url,
                "DATABASE_URL": self.servers["postgres"].url,
                "ANTHROPIC_BASE_URL": self.servers["llm-simulator"].url,
                "TIERMEM_NATS_IDENTITIES": str(ids)}
        if self.cluster:
            urls["STREAM_REPLICAS"] = "3"
        urls["TIERMEM_RESTART_BACKOFF"] = RESTART_BACKOFF
        os.environ.update(urls)  # what `stack.up`, its supervisor and the services it spawns read
        os.environ.pop("ANTHROPIC_API_KEY", None)
        self.env = {**urls, **stack.up(root=self.root / "stack", timeout=120)}
        return self.env

    async def _jetstream_ready(self, url: str, timeout: float = 60.0) -> None:
        """Wait until the cluster elected its JetStream meta leader: the gateway's start-up
        (stream and KV lookups) fails on a cluster that has none yet."""
        auth = bus.BusAuth(user=permissions.ADMIN, password=self.passwords[permissions.ADMIN])
        nc = await bus.connect(url, auth, connect_timeout=5)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    await nc.jetstream().account_info()
                    return
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.2)
        finally:
            await nc.close()

    def stop(self) -> None:
        for p in self.extras:
            servers.stop_process(p.pid, start_time=None, timeout=5, group=True)
        stack.down(root=self.root / "stack")
        for server in self.servers.values():
            server.stop(timeout=5)

    # ------------------------------------------------------------------ services

    def pid(self, service: str) -> int | None:
        """The service's current pid as the supervisor recorded it (None while it waits to restart it)."""
        for p in json.loads((self.root / "stack" / "stack.json").read_text())["processes"]:
            if p["name"] == service:
                return p["pid"]
        raise KeyError(service)

    def signal(self, service: str, sig: int) -> int | None:
        """Send `sig` to the service; returns the pid it went to."""
        pid = self.pid(service)
        try:
            if pid is not None:
                os.kill(pid, sig)
        except ProcessLookupError:
            pass
        return pid

    def _spawn(self, service: str, *, metrics_port: int = 0) -> Proc:
        module = next(s.module for s in stack.SERVICES if s.name == service)
        log = self.root / "stack" / "logs" / f"{service}.log"
        env = {**os.environ, "NATS_USER": service, "NATS_PASSWORD": self.passwords[service],
               "PII_HASH_KEY": (self.root / "stack" / "pii-hash-key").read_text().strip(),
               "METRICS_PORT": str(metrics_port), "PYTHONUNBUFFERED": "1"}
        proc = servers.spawn(service, [sys.executable, "-m", module], log_path=log, env=env, cwd=stack.REPO_ROOT)
        return Proc(service, proc)

    async def restart(self, service: str, killed: int | None, timeout: float = 60.0) -> None:
        """Wait until the supervisor has replaced the killed pid with a live one."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                pid = self.pid(service)
            except (KeyError, ValueError, OSError):  # stack.json mid-rewrite
                pid = None
            if pid is not None and pid != killed and servers.process_alive(pid):
                return
            await asyncio.sleep(0.05)
        raise TimeoutError(f"the supervisor did not restart {service} within {timeout:.0f} s")

    def add_instance(self, service: str) -> Proc:
        proc = self._spawn(service)
        self.extras.append(proc)
        return proc

    def remove_instance(self, proc: Proc) -> None:
        servers.stop_process(proc.pid, start_time=None, timeout=5, group=True)
        self.extras.remove(proc)

    # ------------------------------------------------------------------ servers

    def kill_server(self, name: str) -> None:
        """SIGKILL a server (Postgres: its whole process group, as the OOM killer takes a cgroup)."""
        server = self.servers[name]
        try:
            if name == "postgres":
                os.killpg(server.pid, signal.SIGKILL)
            else:
                os.kill(server.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if server.proc is not None:
            server.proc.wait(timeout=10)

    def start_server(self, name: str) -> None:
        """Start a stopped server again on its port and folder, with the options it was started with."""
        self.servers[name] = self.servers[name].start_again()
