"""`python -m bench.profile_l2 STACK_ENV LOAD [--seconds S]`: hold one l2-gateway load steady
so a sampling profiler can watch the gateway (`bench/results/profile_l2.md` says how it was used).

Why a driver of its own: `python -m bench` runs its steps one after the other for
a few seconds each, so a profile of the whole run mixes them. Each load here runs
alone for as long as asked, against a stack started with `python -m devstack up`:

- `append128`: `memory.append`, 128 in flight (the bench's durable-append load);
- `append1`: `memory.append`, one in flight;
- `l2get`: `memory.l2.get` recent n=50 for users holding 60 messages, one in flight;
- `js128`: the bare baseline of `append128`, acked JetStream publishes of the same
  bodies with a `Nats-Msg-Id` to a file stream of its own, 128 in flight.

It prints the rate and the latency percentiles it saw (no baselines: `python -m bench` has those).
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import time

import msgspec

from bench.stats import fmt_us, summarize
from shared import bus
from shared.permissions import ADMIN
from shared.settings import load_stack_env

USERS = 50
HELD = 60  # messages per user before `l2get` reads 50 of them


def _append_body(run: str, user: int, i: int) -> bytes:
    return msgspec.json.encode({"user_id": f"prof{run}-{user}", "bot_id": "sales-1",
                                "role": "user" if i % 2 else "assistant",
                                "text": f"message {i} of a conversation about the weather " * 3,
                                "msg_id": f"{run}-{user}-{i}"})


async def _drive(call, seconds: float, in_flight: int) -> list[float]:
    stop = time.monotonic() + seconds
    latencies: list[float] = []
    counter = iter(range(10**9))

    async def worker() -> None:
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            await call(next(counter))
            latencies.append(time.perf_counter() - t0)

    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return latencies


async def _drive_n(call, total: int, in_flight: int) -> None:
    """`total` calls, `in_flight` at a time (in order of `i` per worker, not overall)."""
    counter = iter(range(total))

    async def worker() -> None:
        for i in counter:
            await call(i)

    await asyncio.gather(*(worker() for _ in range(in_flight)))


async def main(env_path: str, load: str, seconds: float) -> None:
    env = load_stack_env(env_path)
    nc = await bus.connect_as(env, ADMIN, name="profile-l2", pending_size=64 * 1024 * 1024)
    run = secrets.token_hex(3)
    try:
        if load == "js128":
            from nats.js.api import StorageType, StreamConfig

            in_flight = 128
            js = nc.jetstream()
            await js.add_stream(StreamConfig(name="PROFILE_L2", subjects=["profile_l2.*"],
                                             storage=StorageType.FILE, duplicate_window=7200))

            async def call(i: int):
                await js.publish(f"profile_l2.u{i % USERS}", _append_body(run, i % USERS, i),
                                 headers={"Nats-Msg-Id": f"{run}-{i}"}, timeout=15)
        elif load.startswith("append"):
            in_flight = 128 if load == "append128" else 1

            async def call(i: int):
                await nc.request("memory.append", _append_body(run, i % USERS, i), timeout=15)
        else:
            in_flight = 1
            await _drive_n(lambda i: nc.request("memory.append", _append_body(run, i % USERS, i),
                                                timeout=15), USERS * HELD, 32)
            bodies = [msgspec.json.encode({"user_id": f"prof{run}-{u}", "op": "recent", "n": 50})
                      for u in range(USERS)]

            async def call(i: int):
                msg = await nc.request("memory.l2.get", bodies[i % USERS], timeout=5)
                if b'"tier":"l2"' not in msg.data:
                    raise RuntimeError(f"not an L2 answer: {msg.data[:200]!r}")
        t0 = time.monotonic()
        lat = await _drive(call, seconds, in_flight)
        s = summarize(lat)
        print(f"{load}: {len(lat) / (time.monotonic() - t0):,.0f}/s, p50 {fmt_us(s.p50)}, "
              f"p95 {fmt_us(s.p95)}, p99 {fmt_us(s.p99)} ({len(lat):,} calls)")
    finally:
        await nc.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("stack_env")
    p.add_argument("load", choices=("append128", "append1", "l2get", "js128"))
    p.add_argument("--seconds", type=float, default=15.0)
    a = p.parse_args()
    asyncio.run(main(a.stack_env, a.load, a.seconds))
