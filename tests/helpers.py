"""Helpers shared by the service tests: run a service in-process, talk raw NATS."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import msgspec
import nats

from shared.service import ERROR_CODE_HEADER, run_service
from shared.settings import Settings


@contextlib.asynccontextmanager
async def running(name: str, build, env: dict[str, str], **overrides) -> AsyncIterator[Settings]:
    """Run one service's `build` in this process until the block ends."""
    settings = Settings.from_env(env, **overrides)
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
        await asyncio.wait_for(task, timeout=30)


@contextlib.asynccontextmanager
async def client(url: str):
    nc = await nats.connect(url)
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
