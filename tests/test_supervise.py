"""`just up` keeps services running: the supervisor restarts one that dies, with backoff, and `down` wins."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from devstack import servers, stack
from devstack.supervise import Backoff
from tests.helpers import client
from tests.test_servers import FAKE_SERVICE, _fake_services, _in_thread, _servers_from_env, processes_mentioning

# --------------------------------------------------------------------------- the policy


def test_backoff_doubles_from_first_up_to_the_cap_while_a_service_keeps_crashing():
    backoff = Backoff(first=0.5, cap=30, reset_after=60)
    delays, previous = [], None
    for _ in range(9):
        previous = backoff.delay(previous, uptime=0.2)
        delays.append(previous)
    assert delays == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]


def test_backoff_starts_over_after_a_service_ran_long_enough():
    backoff = Backoff(first=0.5, cap=30, reset_after=60)
    assert backoff.delay(16, uptime=59.9) == 30
    assert backoff.delay(16, uptime=60) == 0.5


def test_backoff_parses_its_setting_and_refuses_nonsense():
    assert Backoff.parse("0.2,5,10") == Backoff(0.2, 5, 10)
    for bad in ("0,5,10", "6,5,10", "1,5", "1,5,-1"):
        with pytest.raises(ValueError):
            Backoff.parse(bad)


def test_restart_note_names_the_count_the_last_exit_and_the_wait():
    at = time.mktime((2026, 1, 2, 10, 31, 2, 0, 0, -1))
    running = {"restarts": 2, "last_exit": {"code": -9, "at": at}, "next_start_at": None}
    waiting = {**running, "next_start_at": at + 4}
    assert stack.restart_note(running, at + 1) == ", restarts 2 (last: exit -9 at 10:31:02)"
    assert stack.restart_note(waiting, at + 1) == ", restarts 2 (last: exit -9 at 10:31:02), next start in 3.0 s"
    assert stack.restart_note({"restarts": 0, "last_exit": None}, at) == ""


# --------------------------------------------------------------------------- the supervisor at work


def _records(state: Path) -> dict[str, dict]:
    return {p["name"]: p for p in json.loads((state / "stack.json").read_text())["processes"]}


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.05)
    return value


async def _ping_pid(url: str, name: str) -> str | None:
    """The pid that the instance of `name` answering $SRV.PING claims, None if none answers."""
    async with client(url) as nc:
        try:
            msg = await nc.request(f"$SRV.PING.{name}", b"", timeout=0.5)
        except Exception:
            return None
        return json.loads(msg.data)["metadata"]["pid"]


def _status(state: Path, capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = _in_thread(stack.status, root=state)
    return code, capsys.readouterr().out


@pytest.fixture
def fake_stack(tmp_path, monkeypatch, server_env):
    """`up` against the test servers with fake services; yields (state folder, modules); `down` after."""
    _servers_from_env(monkeypatch, server_env)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "unused")  # no simulator: only the fakes start
    state = tmp_path / "state"

    def start(bodies: dict[str, str]) -> list[str]:
        modules = _fake_services(tmp_path, monkeypatch, bodies)
        _in_thread(stack.up, root=state, timeout=30)
        return modules

    yield state, start
    _in_thread(stack.down, root=state)


def test_a_killed_service_is_restarted_and_answers_its_ping_again(fake_stack, server_env, capsys):
    state, start = fake_stack
    start({"fake-a": FAKE_SERVICE})
    first = _records(state)["fake-a"]
    assert first["restarts"] == 0 and first["last_exit"] is None

    t = time.monotonic()
    os.kill(first["pid"], signal.SIGKILL)
    _wait_for(lambda: _in_thread(asyncio.run, _ping_pid(server_env["NATS_URL"], "fake-a")) not in
              (None, str(first["pid"])), timeout=10, what="a new fake-a answers $SRV.PING")
    assert time.monotonic() - t < 5  # 0.5 s of backoff, an interpreter start, a NATS connect

    record = _records(state)["fake-a"]
    assert record["pid"] != first["pid"] and servers.process_alive(record["pid"], record["start_time"])
    assert record["restarts"] == 1 and record["last_exit"]["code"] == -signal.SIGKILL
    assert _in_thread(asyncio.run, _ping_pid(server_env["NATS_URL"], "fake-a")) == str(record["pid"])
    code, out = _status(state, capsys)
    assert code == 0, out
    assert "ping ok, restarts 1 (last: exit -9 at " in out


CRASH_AFTER_FIRST_RUN = """
import os, sys, time
starts = os.environ["FAKE_STARTS_FILE"]
first = not os.path.exists(starts)
with open(starts, "a") as f:
    f.write(str(time.time()) + "\\n")
if not first:
    sys.exit(3)  # every start after the first crashes at once
""" + FAKE_SERVICE


def test_a_service_that_keeps_crashing_is_restarted_ever_more_slowly(fake_stack, monkeypatch, tmp_path, capsys):
    state, start = fake_stack
    starts = tmp_path / "starts"
    monkeypatch.setenv("FAKE_STARTS_FILE", str(starts))
    monkeypatch.setenv("TIERMEM_RESTART_BACKOFF", "0.3,1.2,60")
    start({"fake-crashy": CRASH_AFTER_FIRST_RUN})

    os.kill(_records(state)["fake-crashy"]["pid"], signal.SIGKILL)
    def four_restarts() -> list[float] | None:
        times = [float(x) for x in starts.read_text().split()]
        return times if len(times) >= 5 else None

    times = _wait_for(four_restarts, timeout=15, what="four restarts")
    gaps = [b - a for a, b in zip(times[1:], times[2:])]  # between crashing starts: 0.6, 1.2, 1.2 s + a start
    assert gaps[0] > 0.5 and gaps[1] > gaps[0] + 0.3, gaps
    assert gaps[2] < gaps[1] + 0.4, gaps  # capped at 1.2 s

    record = _records(state)["fake-crashy"]
    assert record["restarts"] >= 4 and record["last_exit"]["code"] == 3
    code, out = _status(state, capsys)
    assert code == 1, out  # not all is well
    shown = re.search(r"fake-crashy .*, restarts (\d+) \(last: exit 3 at \d\d:\d\d:\d\d\)", out)
    assert shown and int(shown[1]) >= 4, out


def test_down_stops_the_supervisor_and_the_latest_pid_and_nothing_comes_back(fake_stack, server_env):
    state, start = fake_stack
    modules = start({"fake-a": FAKE_SERVICE, "fake-b": FAKE_SERVICE})
    killed = _records(state)["fake-a"]["pid"]
    os.kill(killed, signal.SIGKILL)
    _wait_for(lambda: _records(state)["fake-a"]["restarts"] == 1 and _records(state)["fake-a"]["pid"] != killed,
              timeout=10, what="fake-a restarted")
    records = _records(state)

    assert _in_thread(stack.down, root=state) == 3  # supervisor, the new fake-a, fake-b
    for name in ("supervisor", "fake-a", "fake-b"):
        assert not servers.process_alive(records[name]["pid"], records[name]["start_time"]), name
    time.sleep(1.0)  # longer than the first backoff: a supervisor still at work would have restarted them
    assert processes_mentioning(str(state)) == []
    assert [m for m in modules if processes_mentioning(m)] == []
    assert not (state / "stack.json").exists()


def test_down_while_a_service_waits_for_its_restart_leaves_nothing(fake_stack, monkeypatch, tmp_path):
    state, start = fake_stack
    monkeypatch.setenv("FAKE_STARTS_FILE", str(tmp_path / "starts"))
    monkeypatch.setenv("TIERMEM_RESTART_BACKOFF", "2,2,60")
    modules = start({"fake-crashy": CRASH_AFTER_FIRST_RUN})
    os.kill(_records(state)["fake-crashy"]["pid"], signal.SIGKILL)
    _wait_for(lambda: _records(state)["fake-crashy"]["next_start_at"], timeout=5, what="the exit is noticed")

    _in_thread(stack.down, root=state)
    time.sleep(2.5)  # past the restart that was due
    assert processes_mentioning(modules[0]) == [] and processes_mentioning(str(state)) == []
    assert (tmp_path / "starts").read_text().count("\n") == 1  # never started again
