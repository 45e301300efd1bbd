"""`python -m devstack up|down|status`: the whole system on one machine, as separate processes.

Why: production runs every service as its own process talking over NATS; the
dev box and the end-to-end tests should too. `up` starts NATS, Redis and
Postgres (or uses `NATS_URL` / `REDIS_URL` / `DATABASE_URL` when set), then
the supervisor (`devstack.supervise`), which starts every service in `SERVICES`
and restarts any that dies, with backoff, as Kubernetes would. `up` returns
only when each service answers the NATS service API ping; a service that
exits before that fails `up`. If anything fails it stops what it started, so
nothing is left behind. Every started pid is recorded with its start time in
`<state>/stack.json` (by the supervisor, for services: restarts included), so
`down` stops exactly those processes and never a recycled pid; it stops the
supervisor first, so nothing is restarted behind its back. `<state>/stack.env`
holds the URLs for clients and tools.

The NATS server `up` starts fsyncs every JetStream write before it acks
(`sync_interval: always`, `NATS_SYNC_INTERVAL`): an acknowledged append
survives an OS or power crash, not only a crash of the server.

The bus is locked: a NATS server that `up` starts gets one user per role of
`shared.permissions`, with a fresh random password each `up`. Each service
gets its own (`NATS_USER` / `NATS_PASSWORD` in its environment only);
`stack.env` (owner-only) names the agent-worker and admin identities
(`NATS_WORKER_*`, `NATS_ADMIN_*`). With `NATS_URL` given, the server's users
are the operator's: `TIERMEM_NATS_IDENTITIES` may name a JSON file of
role -> password for them (the tests do this), else every service inherits
`NATS_USER` / `NATS_PASSWORD` / `NATS_CREDS` from the environment.

State folder: `TIERMEM_STATE_DIR`, default `.tiermem/` at the repo root
(`shared.settings.state_dir`; `shared.settings.load_stack_env` reads its stack.env).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import importlib.util
import json
import os
import signal
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from devstack import servers
from shared import bus, permissions
from shared.settings import REPO_ROOT, load_stack_env, state_dir


@dataclass(frozen=True)
class ServiceSpec:
    name: str  # NATS service API name, also the log file name
    module: str  # started as `python -m <module>`
    # A service that also serves HTTP to clients: the setting that takes its port
    # (a free one is picked at `up`, kept across restarts) and the stack.env
    # variable that names its base URL.
    http_port_var: str = ""
    url_var: str = ""


# Every service of the stack, in start order. Add new services here.
SERVICES: tuple[ServiceSpec, ...] = (
    ServiceSpec("memory-l1", "services.memory_l1"),
    ServiceSpec("l2-gateway", "services.l2_gateway"),
    ServiceSpec("l3-semantic-indexer", "services.l3_semantic_indexer"),
    ServiceSpec("llm-broker", "services.llm_broker"),
    ServiceSpec("llm-gateway", "services.llm_gateway", http_port_var="GATEWAY_PORT",
                url_var="TIERMEM_ANTHROPIC_BASE_URL"),
    ServiceSpec("freshness-auditor", "services.freshness_auditor"),
)

DEFAULT_UP_TIMEOUT = 60.0  # the l3 indexer loads an embedding model
NATS_SYNC_INTERVAL = "always"  # acked means on disk (the server's default fsyncs every 2 min)
SUPERVISOR = "supervisor"  # name and kind of the supervisor's record
SUPERVISOR_START_TIMEOUT = 30.0  # until it has started every service (an interpreter start, on a busy box)
SERVICE_STOP_TIMEOUT = 10.0


class StackError(RuntimeError):
    """`up` failed; the message names the culprit and carries its log tail."""


def metrics_env_name(service: str) -> str:
    return service.upper().replace("-", "_") + "_METRICS_URL"


# --------------------------------------------------------------------------- state file


class _State:
    """`stack.json`: every process `up` started, rewritten after each start (a crash mid-`up` is still cleanable).

    Two processes write it, `up` and the supervisor (every restart), so each
    write is a read-modify-write under the file's own lock (`edit`); readers
    see whole files only (atomic replace).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = root / "stack.json"
        self.env_path = root / "stack.env"
        self.processes: list[dict] = []
        self.urls: dict[str, str] = {}

    def load(self) -> _State:
        self.processes, self.urls = [], {}
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
            data = json.loads(self.path.read_text())
            self.processes = data.get("processes", [])
            self.urls = data.get("urls", {})
        return self

    def add(self, *records: dict) -> None:
        with self.edit():
            self.processes.extend(records)

    @contextlib.contextmanager
    def edit(self):
        """Load, let the block change `processes` / `urls`, save; not saved if the block raises."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".stack.json.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.load()
            yield self
            self.save()

    def save(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"processes": self.processes, "urls": self.urls}, indent=2))
        tmp.replace(self.path)

    def clear(self) -> None:
        self.processes, self.urls = [], {}
        for p in (self.path, self.env_path):
            p.unlink(missing_ok=True)


@contextlib.contextmanager
def _locked(root: Path):
    """One `up`/`down` at a time per state folder."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _say(msg: str) -> None:
    print(msg, flush=True)


@contextlib.contextmanager
def signals_ignored():
    """Ctrl-C and SIGTERM are ignored while the block runs: stopping half a stack is worse."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def _interrupt(signum, frame):
    """SIGTERM (a CI timeout, say) during `up` cleans up like Ctrl-C does."""
    raise KeyboardInterrupt(f"signal {signum}")


# --------------------------------------------------------------------------- up


def up(
    *,
    services: list[str] | None = None,
    timeout: float = DEFAULT_UP_TIMEOUT,
    root: Path | None = None,
) -> dict[str, str]:
    """Start servers and services; return the stack.env mapping. Raises StackError after cleaning up.

    `services`: names from SERVICES to start (None = all, [] = servers only).
    """
    root = root or state_dir()
    specs = _select(services)
    with _locked(root):
        state = _State(root).load()
        if state.processes:
            alive = [p for p in state.processes if servers.process_alive(p["pid"], p["start_time"])]
            wanted = {s.name for s in specs} | {s.name for s in servers.SERVERS if not os.environ.get(s.url_var)}
            if len(alive) == len(state.processes) and wanted <= {p["name"] for p in alive}:
                _say(f"stack already up (state {state.path}); `down` first to restart")
                return load_stack_env(root)
            _say("stopping the leftovers of a previous stack")
            _stop_all(state)
        state.clear()
        t0 = time.monotonic()
        try:
            env = _start_servers(state, root)
            _write_env(state, env)
            logs = _plan_services(state, root, specs, env)
            _write_env(state, env)
            if logs:
                _start_supervisor(state, root)
                _wait_for_services(env, state, logs, timeout)
        except BaseException as e:
            known = isinstance(e, (StackError, servers.ServerStartError))
            why = "see below" if known else "interrupted" if isinstance(e, KeyboardInterrupt) else repr(e)
            _say(f"up failed ({why}); stopping what was started")
            with signals_ignored():  # a second Ctrl-C must not leave half the stack running
                _stop_all(state)
                state.clear()
            if known:
                raise StackError(str(e)) from e
            raise
        _say(f"stack up in {time.monotonic() - t0:.1f} s; environment in {state.env_path}")
        return env


def _select(names: list[str] | None) -> list[ServiceSpec]:
    if names is None:
        return list(SERVICES)
    by_name = {s.name: s for s in SERVICES}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise StackError(f"unknown service(s) {unknown}; known: {[s.name for s in SERVICES]}")
    return [by_name[n] for n in names]


def _start_servers(state: _State, root: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for spec in servers.SERVERS:
        name, var = spec.name, spec.url_var
        given = os.environ.get(var)
        if var == "ANTHROPIC_BASE_URL" and not given and os.environ.get("ANTHROPIC_API_KEY"):
            _say(f"{name:<9} not started: ANTHROPIC_API_KEY is set, the llm-broker calls Claude")
            continue
        if given:
            if var in _DEFAULT_PORTS:
                _check_reachable(var, given)
            env[var] = given
            _say(f"{name:<9} using {var}={given}")
            continue
        t = time.monotonic()
        extra: dict = {}
        record_extra: dict = {}
        if name == "nats":
            monitor = servers.free_port()
            extra = {"users": permissions.nats_users(_new_identities(root)), "sync_interval": NATS_SYNC_INTERVAL,
                     "monitor_port": monitor}
            record_extra = {"monitor_url": f"http://{servers.HOST}:{monitor}"}
        server = spec.start(root / name, log_path=root / "logs" / f"{name}.log", **extra)
        state.add({**server.record(), **record_extra})
        env[var] = server.url
        _say(f"{name:<9} started on {servers.HOST}:{server.port} (pid {server.pid}, "
             f"{time.monotonic() - t:.1f} s, log {server.log_path})")
    with state.edit():
        state.urls = dict(env)
    env.update(_tool_identities(identities(root)))
    env.update({"NATS_MONITOR_URL": p["monitor_url"] for p in state.processes if p.get("monitor_url")})
    return env


IDENTITIES_FILE = "nats-identities.json"


def _new_identities(root: Path) -> dict[str, str]:
    """A fresh password per role for the NATS server `up` starts, kept owner-only in the state folder."""
    import secrets

    passwords = {name: secrets.token_urlsafe(24) for name in permissions.ROLES}
    _write_private(root / IDENTITIES_FILE, json.dumps(passwords, indent=1))
    return passwords


def identities(root: Path | None = None) -> dict[str, str]:
    """role -> NATS password: of the server `up` started, else of `TIERMEM_NATS_IDENTITIES` ({} if neither)."""
    path = (root or state_dir()) / IDENTITIES_FILE
    given = os.environ.get("TIERMEM_NATS_IDENTITIES")
    if not os.environ.get("NATS_URL") and path.exists():
        return json.loads(path.read_text())
    if given:
        return json.loads(Path(given).read_text())
    return {}


def _tool_identities(passwords: dict[str, str]) -> dict[str, str]:
    """The stack.env lines that let tools and workers connect: worker and admin users."""
    env = {}
    for role, prefix in ((permissions.WORKER, "NATS_WORKER_"), (permissions.ADMIN, "NATS_ADMIN_")):
        if role in passwords:
            env[f"{prefix}USER"], env[f"{prefix}PASSWORD"] = role, passwords[role]
    return env


def _pii_hash_key(root: Path) -> str:
    """The key of the user refs in logs (`shared.pii`): one per state folder, so refs stay the
    same across services and restarts, and differ between installations."""
    path = root / "pii-hash-key"
    if not path.exists():
        import secrets

        _write_private(path, secrets.token_hex(32))
    return path.read_text().strip()


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_text(text)


_DEFAULT_PORTS = {"NATS_URL": 4222, "REDIS_URL": 6379, "DATABASE_URL": 5432}


def _check_reachable(var: str, url: str) -> None:
    """A stale URL (say, a sourced stack.env of a stack that is down) must fail here, not in every service."""
    parts = urlsplit(url.split(",")[0])
    host, port = parts.hostname or "127.0.0.1", parts.port or _DEFAULT_PORTS[var]
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError as e:
        raise StackError(f"{var}={url} is not reachable ({e}); unset {var} to start a local server") from e


def _plan_services(state: _State, root: Path, specs: list[ServiceSpec], env: dict[str, str]) -> dict[str, int]:
    """One record per service for the supervisor to start (no pid yet); returns name -> size of its log
    (where this run's output starts, for error messages)."""
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    records, offsets = [], {}
    ports: set[int] = set()
    _pii_hash_key(root)  # created here, once, not by the supervisor's first starts at the same time
    for spec in specs:
        if not _module_exists(spec.module):
            raise StackError(f"service {spec.name}: module {spec.module} has no __main__.py (not written yet?)")
        while (port := servers.free_port()) in ports:
            pass
        ports.add(port)
        log_path = logs / f"{spec.name}.log"
        offsets[spec.name] = log_path.stat().st_size if log_path.exists() else 0
        metrics_url = f"http://{servers.HOST}:{port}/metrics"
        own_env = {}
        if spec.http_port_var:
            while (http_port := servers.free_port()) in ports:
                pass
            ports.add(http_port)
            own_env = {spec.http_port_var: str(http_port), "GATEWAY_HOST": servers.HOST}
            env[spec.url_var] = f"http://{servers.HOST}:{http_port}"
        records.append({"name": spec.name, "kind": "service", "pid": None, "start_time": None,
                        "stop_signal": int(signal.SIGTERM), "log": str(log_path),
                        "cmd": [sys.executable, "-m", spec.module], "metrics_port": port,
                        "metrics_url": metrics_url, "restarts": 0, "last_exit": None, "next_start_at": None,
                        "env": own_env})
        env[metrics_env_name(spec.name)] = metrics_url
    state.add(*records)
    return offsets


def service_env(name: str, root: Path, urls: dict[str, str], metrics_port: int,
                own: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of service `name`: ours, the servers' URLs, its own NATS identity, the PII key,
    and `own` (what its record keeps for it: the HTTP port of a service serving clients).

    Built again for every start (the supervisor's restarts too) instead of
    stored, so the passwords stay in the owner-only identities file.
    """
    return {**os.environ, **{s.url_var: urls[s.url_var] for s in servers.SERVERS if s.url_var in urls},
            **_service_identity(name, identities(root)),
            "PII_HASH_KEY": os.environ.get("PII_HASH_KEY") or _pii_hash_key(root),
            "METRICS_PORT": str(metrics_port), "PYTHONUNBUFFERED": "1", **(own or {})}


def _start_supervisor(state: _State, root: Path) -> None:
    """`python -m devstack.supervise <root>`: it starts the planned services and restarts them when they die."""
    log_path = root / "logs" / f"{SUPERVISOR}.log"
    cmd = [sys.executable, "-m", "devstack.supervise", str(root)]
    with state.edit():  # recorded before it can write: its first edit waits for this one
        proc = servers.spawn(SUPERVISOR, cmd, log_path=log_path, cwd=REPO_ROOT)
        state.processes.append({"name": SUPERVISOR, "kind": SUPERVISOR, "pid": proc.pid,
                                "start_time": servers.process_start_time(proc.pid),
                                "stop_signal": int(signal.SIGTERM), "log": str(log_path), "cmd": cmd})
    _say(f"{SUPERVISOR:<9} started (pid {proc.pid}, log {log_path})")


def _failure(record: dict, since: int, what: str) -> str:
    tail = servers.log_tail(record["log"], since=since)
    return f"service {record['name']} {what}; last lines of {record['log']}:\n{tail}"


def _service_identity(name: str, passwords: dict[str, str]) -> dict[str, str]:
    """A service's own NATS user, when the stack knows the server's users (else it inherits the environment's)."""
    if name not in passwords:
        return {}
    return {"NATS_USER": name, "NATS_PASSWORD": passwords[name], "NATS_CREDS": "", "NATS_NKEY_SEED": ""}


def _module_exists(module: str) -> bool:
    spec = importlib.util.find_spec(module)
    return bool(spec and spec.submodule_search_locations and any(
        (Path(p) / "__main__.py").exists() for p in spec.submodule_search_locations))


def _write_env(state: _State, env: dict[str, str]) -> None:
    _write_private(state.env_path, "".join(f"{k}={v}\n" for k, v in env.items()))


def _wait_for_services(env: dict[str, str], state: _State, logs: dict[str, int], timeout: float) -> None:
    asyncio.run(_ping_until_up(env, state, logs, timeout))


async def _ping_until_up(env: dict[str, str], state: _State, logs: dict[str, int], timeout: float) -> None:
    """Until every service answers its ping as the pid the supervisor recorded, each within `timeout` of
    its start. A service that exits before that fails `up` (a bad setting does not get better with
    restarts), as does the supervisor's death."""
    t0 = time.monotonic()
    since: dict[str, float] = {}  # when each service was first seen started
    nc = await bus.connect_as({**os.environ, **env}, permissions.ADMIN, connect_timeout=5,
                              allow_reconnect=False)
    try:
        pending = dict(logs)
        while pending:
            state.load()
            for p in state.processes:
                if p.get("kind") == SUPERVISOR and not servers.process_alive(p["pid"], p["start_time"]):
                    raise StackError(f"the supervisor exited; last lines of {p['log']}:\n"
                                     f"{servers.log_tail(p['log'])}")
            records = {p["name"]: p for p in state.processes if p.get("kind") == "service" and p["name"] in pending}
            for name, record in records.items():
                if last := record.get("last_exit"):
                    raise StackError(_failure(record, pending[name], f"exited with code {last['code']}"))
            started = [r for r in records.values() if r["pid"] is not None]
            since.update({r["name"]: time.monotonic() for r in started if r["name"] not in since})
            answered = await asyncio.gather(*(_ping(nc, r["name"], r["pid"]) for r in started))
            for record, ok in zip(started, answered):
                if ok:
                    _say(f"{record['name']:<9} up (pid {record['pid']}, {time.monotonic() - t0:.1f} s, "
                         f"metrics {record['metrics_url']}, log {record['log']})")
                    del pending[record["name"]]
            if waiting := [n for n in pending if n not in since]:
                if time.monotonic() - t0 > SUPERVISOR_START_TIMEOUT:
                    raise StackError(f"the supervisor did not start {', '.join(waiting)} within "
                                     f"{SUPERVISOR_START_TIMEOUT:.0f} s; see {state.root / 'logs' / SUPERVISOR}.log")
            late = [n for n in pending if n in since and time.monotonic() - since[n] > timeout]
            if late:
                name, *others = late
                also = f" (nor did {', '.join(others)})" if others else ""
                raise StackError(_failure(records[name], pending[name],
                                          f"did not answer $SRV.PING.{name} within {timeout:.0f} s{also}"))
            if pending:
                await asyncio.sleep(0.1)
    finally:
        await nc.close()


async def _ping(nc, name: str, pid: int | None = None, timeout: float = 0.3) -> bool:
    """True when an instance of `name` answers $SRV.PING.<name>.

    Every instance on this NATS answers; when a reply carries `metadata.pid`,
    only the one with our `pid` counts, so another stack's instance sharing
    the server cannot make ours look up.
    """
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    try:
        await nc.publish(f"$SRV.PING.{name}", b"", reply=inbox)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            info = json.loads((await sub.next_msg(timeout=left)).data)
            theirs = (info.get("metadata") or {}).get("pid")
            if info.get("name") == name and (pid is None or theirs is None or theirs == str(pid)):
                return True
    except Exception:  # timeout (nobody answered yet) or an odd reply: not up
        pass
    finally:
        await sub.unsubscribe()
    return False


# --------------------------------------------------------------------------- down / status


def down(*, root: Path | None = None) -> int:
    """Stop every process `up` recorded, services first. Idempotent; returns how many were stopped."""
    root = root or state_dir()
    with _locked(root):
        state = _State(root).load()
        if not state.processes:
            _say(f"nothing to stop (no processes recorded in {state.path})")
            state.clear()
            return 0
        stopped = _stop_all(state)
        state.clear()
        return stopped


def _stop_all(state: _State) -> int:
    """The supervisor, then services (in parallel, SIGTERM then SIGKILL after 10 s), then servers in
    reverse start order. Services are read again once the supervisor is gone: their latest pids."""

    def stop(p: dict) -> str:
        t = time.monotonic()
        done = servers.stop_process(p["pid"], start_time=p["start_time"], sig=p.get("stop_signal", signal.SIGTERM),
                                    timeout=SERVICE_STOP_TIMEOUT, group=p.get("kind") == "service")
        if done:
            return f"stopped {p['name']} (pid {p['pid']}, {time.monotonic() - t:.1f} s)"
        return f"{p['name']} (pid {p['pid']}) was not running"

    count = 0
    supervisors = [p for p in state.processes if p.get("kind") == SUPERVISOR]
    for p in supervisors:
        line = stop(p)
        _say(line)
        count += line.startswith("stopped")
    if supervisors:
        state.load()
    services = [p for p in state.processes if p.get("kind") == "service"]
    others = [p for p in state.processes if p.get("kind") not in ("service", SUPERVISOR)]
    if services:
        with ThreadPoolExecutor(max_workers=len(services)) as pool:
            for line in pool.map(stop, reversed(services)):
                _say(line)
                count += line.startswith("stopped")
    for p in reversed(others):
        line = stop(p)
        _say(line)
        count += line.startswith("stopped")
    return count


def status(*, root: Path | None = None) -> int:
    """Print what runs; exit code 0 when everything recorded is alive, 1 when not, 3 when the stack is down."""
    root = root or state_dir()
    state = _State(root).load()
    if not state.processes:
        _say(f"stack is down (no processes recorded in {state.path})")
        for var, url in state.urls.items():
            _say(f"  {var}={url}")
        return 3
    pings: dict[str, bool] = {}
    services = {p["name"]: p["pid"] for p in state.processes if p.get("kind") == "service" and p["pid"]}
    env = load_stack_env(root)
    if services and env.get("NATS_URL"):
        with contextlib.suppress(Exception):
            pings = asyncio.run(_ping_all(env, services))
    all_ok = True
    for p in state.processes:
        alive = servers.process_alive(p["pid"], p["start_time"])
        where = p.get("url") or p.get("metrics_url", "")
        extra = ""
        if p.get("kind") == "service":
            extra = (" ping ok" if pings.get(p["name"]) else " no ping reply") if alive else ""
            all_ok &= bool(pings.get(p["name"]))
            extra += restart_note(p, time.time())
        all_ok &= alive
        _say(f"{p['name']:<20} pid {p['pid'] or '-':<8} {'running' if alive else 'DEAD':<8} {where}{extra}")
    for var, url in env.items():
        if var in ("NATS_URL", "REDIS_URL", "DATABASE_URL"):
            _say(f"  {var}={url}")
    return 0 if all_ok else 1


def restart_note(record: dict, now: float) -> str:
    """What the supervisor did to a service, for `status`: ", restarts 2 (last: exit -9 at 10:31:02)",
    and while it waits to start it again, ", next start in 3.5 s"; "" for a service that never exited."""
    last = record.get("last_exit")
    if not last:
        return ""
    note = f", restarts {record.get('restarts', 0)} (last: exit {last['code']} at " \
           f"{time.strftime('%H:%M:%S', time.localtime(last['at']))})"
    if record.get("next_start_at"):
        note += f", next start in {max(0.0, record['next_start_at'] - now):.1f} s"
    return note


async def _ping_all(env: dict[str, str], services: dict[str, int]) -> dict[str, bool]:
    nc = await bus.connect_as({**os.environ, **env}, permissions.ADMIN, connect_timeout=2,
                              allow_reconnect=False)
    try:
        answers = await asyncio.gather(*(_ping(nc, n, pid) for n, pid in services.items()))
        return dict(zip(services, answers))
    finally:
        await nc.close()


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="start servers and services; wait until every service answers a ping")
    p_up.add_argument("--no-services", action="store_true", help="start only NATS, Redis and Postgres")
    p_up.add_argument("--services", help="comma-separated service names to start (default: all)")
    p_up.add_argument("--timeout", type=float,
                      default=float(os.environ.get("TIERMEM_UP_TIMEOUT", DEFAULT_UP_TIMEOUT)),
                      help="seconds to wait for every service's ping (default 60)")
    sub.add_parser("down", help="stop what `up` started")
    sub.add_parser("status", help="show what runs")
    args = parser.parse_args(argv)

    if args.command == "up":
        signal.signal(signal.SIGTERM, _interrupt)
        names = [] if args.no_services else (
            [n.strip() for n in args.services.split(",") if n.strip()] if args.services else None)
        try:
            up(services=names, timeout=args.timeout)
        except StackError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            return 1
        except KeyboardInterrupt:
            return 130
        return 0
    if args.command == "down":
        down()
        return 0
    return status()
