"""Helpers shared by the service tests: run a service in-process, talk raw NATS, wait.

Waiting: a test never sleeps a fixed time hoping something has happened (it
passes when the behaviour is merely slow to show and fails on a loaded box).
It waits with `eventually` (until a check passes, with a generous timeout
that costs nothing when the check passes early) or proves something does not
happen with `never_within` (the check is watched for the whole window, which
is the claim). A sleep left in a test is part of the scenario (a TTL or a
grace period that must pass) and says so beside it.

The test NATS server is locked (tests/conftest.py): `IDENTITIES` holds its
role -> password table, and every connection here presents the identity of
its role (a service in-process: its own, by name; a test client: admin unless
asked otherwise).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import time
from collections.abc import AsyncIterator, Callable

import httpx
import msgspec

from shared import bus, permissions, subjects
from shared.service import ERROR_CODE_HEADER, run_service
from shared.settings import Settings

IDENTITIES: dict[str, dict[str, str]] = {}  # NATS URL -> role -> password, of servers the tests started


def auth(url: str, role: str) -> bus.BusAuth:
    """Credentials of `role` on the server at `url` (a server given by NATS_URL: the environment's)."""
    passwords = IDENTITIES.get(url)
    if passwords is None:
        return bus.BusAuth.from_env(os.environ, role if role in (permissions.WORKER, permissions.ADMIN) else None)
    return bus.BusAuth(user=role, password=passwords[role])


def identity_env(url: str, role: str) -> dict[str, str]:
    """`NATS_USER` / `NATS_PASSWORD` of `role` for a service's settings ({} on a server given by URL)."""
    passwords = IDENTITIES.get(url)
    return {"NATS_USER": role, "NATS_PASSWORD": passwords[role]} if passwords else {}


@contextlib.asynccontextmanager
async def running(name: str, build, env: dict[str, str], **overrides) -> AsyncIterator[Settings]:
    """Run one service's `build` in this process until the block ends, as its own NATS
    identity (a name that is no role, such as a probe, runs as admin)."""
    role = name if name in permissions.ROLES else permissions.ADMIN
    settings = Settings.from_env({**identity_env(env["NATS_URL"], role), **env}, **overrides)
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(run_service(name, name, build, settings=settings,
                                           stop=stop, ready=ready))
    waiter = asyncio.create_task(ready.wait())
    done, _ = await asyncio.wait({task, waiter}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        waiter.cancel()
        task.result()  # raises why it died
        raise RuntimeError(f"{name} stopped before it was ready")
    if waiter not in done:
        raise TimeoutError(f"{name} did not become ready")
    try:
        yield settings
    finally:
        stop.set()
        try:
            await asyncio.wait_for(task, timeout=30)
        except TimeoutError:
            raise TimeoutError(f"{name} did not stop within 30 s (its log names the slow step)") from None


@contextlib.asynccontextmanager
async def client(url: str, identity: str = permissions.ADMIN, **kwargs):
    """A raw NATS connection as `identity` (admin: the tests' own view of the bus)."""
    nc = await bus.connect(url, auth(url, identity), **kwargs)
    try:
        yield nc
    finally:
        await nc.close()


async def call(nc, subject: str, body, timeout: float = 10.0) -> tuple[int, dict]:
    """Send a request; returns (error code or 200, decoded JSON body)."""
    data = body if isinstance(body, bytes) else msgspec.json.encode(body)
    msg = await nc.request(subject, data, timeout=timeout)
    code = int((msg.headers or {}).get(ERROR_CODE_HEADER, 200))
    return code, msgspec.json.decode(msg.data)


async def ok(nc, subject: str, body, timeout: float = 10.0) -> dict:
    code, reply = await call(nc, subject, body, timeout)
    assert code == 200, reply
    return reply


async def stand_in_for_llm_forget(nc) -> list[str]:
    """Answer `llm.forget` as the llm-broker would, for stacks run without one (a forget
    completes only once every tier confirmed it); returns the users asked for, as they come."""
    asked: list[str] = []

    async def forget(msg) -> None:
        user = msgspec.json.decode(msg.data)["user_id"]
        asked.append(user)
        await msg.respond(msgspec.json.encode({"user_id": user, "deleted": 0}))

    await nc.subscribe(subjects.LLM_FORGET, cb=forget)
    await nc.flush()
    return asked


async def _checked(check: Callable[[], object]):
    """`check()`'s value, awaited if it is a coroutine function's; an AssertionError it
    raises is returned (a check may assert instead of returning a bool)."""
    try:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        return value
    except AssertionError as exc:
        return exc


async def eventually(check: Callable[[], object], timeout: float = 10.0, every: float = 0.02,
                     what: str | None = None):
    """Wait until `check()` passes; its value.

    `check` is a plain or async callable. It passes when it returns a truthy
    value without raising AssertionError (a check that asserts returns True at
    its end). Fails after `timeout` seconds with the check's last assertion, or
    `what` did not happen."""
    deadline = time.monotonic() + timeout
    while True:
        value = await _checked(check)
        if value and not isinstance(value, AssertionError):
            return value
        if time.monotonic() >= deadline:
            if isinstance(value, AssertionError):
                raise AssertionError(f"not within {timeout} s: {value}") from value
            raise AssertionError(f"not within {timeout} s: {what or 'the condition'} "
                                 f"(last value {value!r})")
        await asyncio.sleep(every)


async def never_within(seconds: float, happened: Callable[[], object], every: float = 0.02,
                       what: str | None = None) -> None:
    """Assert `happened()` stays false for `seconds`: watched the whole window (first at once,
    last at its end), so it fails as soon as the thing happens. `happened` is a plain or async
    callable; an AssertionError it raises counts as happened."""
    deadline = time.monotonic() + seconds
    while True:
        value = await _checked(happened)
        if value:
            raise AssertionError(f"{what or 'it'} happened within {seconds} s: {value!r}")
        if time.monotonic() >= deadline:
            return
        await asyncio.sleep(min(every, max(0.0, deadline - time.monotonic())))


class Sim:
    """The LLM simulator's control endpoints: how many requests reached it, reset, faults."""

    def __init__(self, url: str) -> None:
        self.url = url

    def calls(self) -> int:
        return httpx.get(f"{self.url}/stats").json()["requests"]

    def reset(self) -> None:
        httpx.post(f"{self.url}/reset")

    def fault(self, **rule) -> None:
        httpx.post(f"{self.url}/faults", json=rule).raise_for_status()
