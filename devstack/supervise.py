"""`python -m devstack.supervise <state folder>`: start the stack's services and restart any that dies.

Why: Kubernetes restarts a crashed pod; the local stack must too, or every
fault test (and every dev box after one crash) needs a hand to bring a
service back. `devstack.stack up` writes one record per service into
`<state>/stack.json` (command, log, metrics port; no pid yet) and starts this
process, which starts each service as its own child (so it learns the exit
code of every death) and, when one exits, starts it again with the same
command and environment after an exponential backoff (`Backoff`). Every start
and exit is written back to the record (pid, start time, restarts, last exit),
so `down` stops the latest pid and `status` shows the restarts.

The environment of a service is rebuilt for every start by
`devstack.stack.service_env` (its own NATS identity comes from the owner-only
identities file): no password is written anywhere else.

Stopping: `down` sends SIGTERM to this process first and waits for it to be
gone before it stops the services, so a service that `down` stops is never
restarted. SIGTERM is deferred only while a new child is spawned and recorded
(`_sigterm_deferred`), so no started service is ever missing from the record.
Services are not stopped when this process dies: `down` stops them by pid.

`TIERMEM_RESTART_BACKOFF="first,max,reset_after"` (seconds, default
"0.5,30,60") tunes the backoff.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from devstack import servers, stack

POLL_S = 0.1  # how often exits are noticed and due restarts made


@dataclass(frozen=True)
class Backoff:
    """Wait `first` seconds before the first restart, then twice the previous wait up to `cap`;
    a service that ran `reset_after` seconds or more before it exited starts again at `first`."""

    first: float = 0.5
    cap: float = 30.0
    reset_after: float = 60.0

    def delay(self, previous: float | None, uptime: float) -> float:
        if previous is None or uptime >= self.reset_after:
            return self.first
        return min(self.cap, previous * 2)

    @classmethod
    def parse(cls, text: str) -> Backoff:
        """ "first,cap,reset_after" in seconds, e.g. "0.5,30,60"."""
        first, cap, reset_after = (float(x) for x in text.split(","))
        if not 0 < first <= cap or reset_after < 0:
            raise ValueError(f"backoff {text!r}: want 0 < first <= max and reset_after >= 0")
        return cls(first, cap, reset_after)


class StackGone(Exception):
    """The service's record is gone from stack.json: the stack was taken down without us."""


@dataclass
class _Child:
    name: str
    proc: subprocess.Popen | None = None
    started: float = 0.0  # monotonic time of the last start
    delay: float | None = None  # the last backoff wait
    due: float = 0.0  # monotonic time of the next start, while proc is None


class Supervisor:
    def __init__(self, root: Path, backoff: Backoff) -> None:
        self.root = root
        self.backoff = backoff
        self.state = stack._State(root)
        self.children = [_Child(p["name"]) for p in self.state.load().processes if p.get("kind") == "service"]

    def run(self) -> None:
        for child in self.children:
            self._start(child)
        while True:
            time.sleep(POLL_S)
            self.step(time.monotonic())

    def step(self, now: float) -> None:
        """Note every exit and make every restart that is due."""
        for child in self.children:
            if child.proc is not None and (code := child.proc.poll()) is not None:
                self._exited(child, code, now)
            elif child.proc is None and now >= child.due:
                self._start(child)

    def _exited(self, child: _Child, code: int, now: float) -> None:
        uptime = now - child.started
        child.proc, child.delay = None, self.backoff.delay(child.delay, uptime)
        child.due = now + child.delay
        at = time.time()
        self._update(child.name, last_exit={"code": code, "at": at}, next_start_at=at + child.delay)
        _say(f"{child.name} exited with code {code} after {uptime:.1f} s; starting it again in {child.delay:g} s")

    def _start(self, child: _Child) -> None:
        with _sigterm_deferred(), self.state.edit():
            record = self._record(child.name)
            env = stack.service_env(child.name, self.root, self.state.urls, record["metrics_port"],
                                    record.get("env"))
            proc = servers.spawn(child.name, record["cmd"], log_path=Path(record["log"]), env=env,
                                 cwd=stack.REPO_ROOT)
            restarted = child.proc is None and child.started > 0
            record.update(pid=proc.pid, start_time=servers.process_start_time(proc.pid), next_start_at=None,
                          restarts=record.get("restarts", 0) + restarted)
        child.proc, child.started = proc, time.monotonic()
        _say(f"{child.name} {'restarted' if restarted else 'started'} (pid {proc.pid})")

    def _update(self, name: str, **fields) -> None:
        with self.state.edit():
            self._record(name).update(fields)

    def _record(self, name: str) -> dict:
        for p in self.state.processes:
            if p.get("kind") == "service" and p["name"] == name:
                return p
        raise StackGone(name)


@contextlib.contextmanager
def _sigterm_deferred():
    """SIGTERM waits until the block is done: a child spawned inside it is in stack.json before we die."""
    got: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        if got:
            signal.raise_signal(signal.SIGTERM)


def _say(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m devstack.supervise <state folder>", file=sys.stderr)
        return 2
    backoff = Backoff.parse(os.environ.get("TIERMEM_RESTART_BACKOFF") or "0.5,30,60")
    supervisor = Supervisor(Path(args[0]), backoff)
    _say(f"supervising {', '.join(c.name for c in supervisor.children)} (backoff {backoff})")
    try:
        supervisor.run()
    except StackGone as e:
        _say(f"{e} is no longer in stack.json: the stack is down; nothing left to supervise")
    return 0


if __name__ == "__main__":
    sys.exit(main())
