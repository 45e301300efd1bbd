"""Run a shard of the simulated lead fleet against tiermem until the plan ends or SIGTERM.

It talks to tiermem only through the public client package (`tiermem.AsyncClient`),
each call timed and traced by `measured.py`.

Settings (environment, read once at start):

| variable | default | meaning |
|---|---|---|
| `NATS_URL` | `.tiermem/stack.env` | the stack |
| `NATS_WORKER_USER`, `NATS_WORKER_PASSWORD` | `.tiermem/stack.env` | the agent-worker identity (or `NATS_USER`/`NATS_PASSWORD`, `NATS_CREDS`; see `shared.bus`) |
| `WORKER_ID` | `POD_NAME`, else `worker-<host>-<pid>` | names this worker in its call log |
| `L1_ID` | `POD_NAME` | read through this sidecar (`memory.get.<L1_ID>`); unset: the `memory.get` queue group |
| `WORKER_LOG` | stdout | JSON-lines call log |
| `WORKER_SHARD`, `WORKER_SHARDS` | 0, 1 | this worker takes leads with index % shards == shard |
| `DEMO_LEADS`, `DEMO_BOTS`, `DEMO_DAYS` | 500, 3, 1 | the fleet (bots by role, see `scenario.ROLES`) and how many simulated days |
| `DEMO_SPEED` | 240 | simulated seconds per wall second (240: the 16-hour day in 4 minutes) |
| `DEMO_MIX` | see `scenario.Mix` | the call mix, e.g. `search=0.1,market=0.8` |
| `DEMO_SEED`, `DEMO_RUN` | 1, random | the plan's seed; the run id that prefixes lead ids |
| `DEMO_T0` | after seeding | unix time simulated time starts (the demo sets it for every worker) |
| `DEMO_SEED_HISTORY` | 1 | append each lead's imported history first |
| `DEMO_DATE` | 2026-03-02 | day 1 of simulated time (message timestamps) |
| `DEMO_BASELINE` | 1 | price what a fleet without tiermem would have sent (`baseline.py`), through `count_tokens` |
| `ANTHROPIC_BASE_URL`, `ANTHROPIC_API_KEY` | `.tiermem/stack.env` | the Messages API the baseline counts tokens with (the simulator) |

The llm-broker's TTLs and the model's latency are wall-clock: against a stack
that `just demo` did not start (it scales them, see demo/run.py), run at
`DEMO_SPEED=1` (real time) or the compressed days will find answers fresher
than they would be.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import time
from typing import Mapping

import anthropic
import msgspec

from services.agent_worker import scenario
from services.agent_worker.baseline import Baseline
from services.agent_worker.bot import Bot, CallLog, SimClock, sim_start
from services.agent_worker.measured import Measured
from services.agent_worker.scenario import Mix
from shared.bus import BusAuth, connect, connect_as
from shared.errors import TierError
from shared.permissions import WORKER
from tiermem import AsyncClient

SEED_CONCURRENCY = 32


class WorkerSettings(msgspec.Struct, frozen=True, kw_only=True):
    nats_url: str
    worker_id: str
    auth: BusAuth = BusAuth()
    l1_id: str = ""
    log_path: str = ""
    shard: int = 0
    shards: int = 1
    leads: int = scenario.LEADS
    bots: int = scenario.BOTS
    days: int = scenario.DAYS
    speed: float = scenario.SPEED
    mix: str = ""
    seed: int = 1
    run: str = ""
    t0: float = 0.0
    seed_history: bool = True
    date: str = "2026-03-02"
    # the same-run baseline (baseline.py): priced through this Messages API endpoint
    baseline: bool = True
    anthropic_base_url: str = ""
    anthropic_api_key: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "WorkerSettings":
        if env is None:
            from shared.settings import load_stack_env

            env = {**load_stack_env(), **os.environ}
        pod = env.get("POD_NAME", "")
        raw = {
            "nats_url": env.get("NATS_URL"), "auth": BusAuth.from_env(env, WORKER),
            "worker_id": env.get("WORKER_ID") or pod or f"worker-{socket.gethostname()}-{os.getpid()}",
            "l1_id": env.get("L1_ID") or pod,
            "log_path": env.get("WORKER_LOG"),
            "shard": env.get("WORKER_SHARD"), "shards": env.get("WORKER_SHARDS"),
            "leads": env.get("DEMO_LEADS"), "bots": env.get("DEMO_BOTS"), "days": env.get("DEMO_DAYS"),
            "speed": env.get("DEMO_SPEED"), "mix": env.get("DEMO_MIX"), "seed": env.get("DEMO_SEED"),
            "run": env.get("DEMO_RUN") or secrets.token_hex(3), "t0": env.get("DEMO_T0"),
            "seed_history": env.get("DEMO_SEED_HISTORY"), "date": env.get("DEMO_DATE"),
            "baseline": env.get("DEMO_BASELINE"), "anthropic_base_url": env.get("ANTHROPIC_BASE_URL"),
            "anthropic_api_key": env.get("ANTHROPIC_API_KEY"),
        }
        values = {k: v for k, v in raw.items() if v not in (None, "")}
        if "nats_url" not in values:
            raise SystemExit("NATS_URL is not set: run `just up` or point NATS_URL at a server")
        try:
            settings = msgspec.convert(values, cls, strict=False)
            Mix.parse(settings.mix)
        except (msgspec.ValidationError, ValueError) as exc:
            raise SystemExit(f"bad setting: {exc}") from None
        if settings.speed <= 0 or settings.days < 1 or settings.leads < 1 or settings.bots < 1:
            raise SystemExit("bad setting: DEMO_SPEED > 0, DEMO_DAYS, DEMO_LEADS, DEMO_BOTS >= 1")
        return settings


async def run(s: WorkerSettings, stop: asyncio.Event) -> int:
    mix = Mix.parse(s.mix)
    plans = scenario.plan_fleet(s.leads, run=s.run, bots=s.bots, days=s.days, mix=mix, seed=s.seed,
                                shard=s.shard, shards=s.shards)
    nc = await connect(s.nats_url, s.auth, name=f"agent-worker {s.worker_id}", max_reconnect_attempts=-1,
                       reconnect_time_wait=0.5, connect_timeout=5)
    calls = CallLog(s.log_path, s.worker_id)
    client = AsyncClient(nc, sidecar=s.l1_id)
    try:
        if s.seed_history:
            t0 = time.perf_counter()
            sent, errors = await seed(client, plans, sim_start(s.date))
            calls.write({"kind": "seeded", "messages": sent, "errors": errors,
                         "s": round(time.perf_counter() - t0, 2)})
        clock = SimClock(s.t0 or time.time(), s.speed, sim_start(s.date))
        calls.write({"kind": "start", "leads": len(plans), "events": sum(len(p.events) for p in plans),
                     "t0": clock.t0, "speed": s.speed, "days": s.days, "run": s.run,
                     "sidecar": s.l1_id or "(queue group)"})
        baseline = _baseline(s, calls)
        bot = Bot(client, Measured(mix["trace"]), calls, clock, mix, baseline)
        tasks = [asyncio.create_task(bot.run_lead(p)) for p in plans]
        flusher = asyncio.create_task(_flush_every(calls, 0.5))
        stopper = asyncio.create_task(stop.wait())
        done = asyncio.gather(*tasks)
        await asyncio.wait([done, stopper], return_when=asyncio.FIRST_COMPLETED)
        finished = done.done()
        if finished and done.exception() is None and bot.checks:  # the last quality checks, unless stopped
            draining = asyncio.create_task(bot.drain_checks())
            await asyncio.wait([draining, stopper], return_when=asyncio.FIRST_COMPLETED)
            draining.cancel()
        for t in (*tasks, *bot.checks, flusher, stopper):
            t.cancel()
        await asyncio.gather(done, *bot.checks, flusher, stopper, return_exceptions=True)
        if finished and done.exception() is not None:
            raise done.exception()
        if baseline is not None and finished:
            await baseline.drain()
        calls.write({"kind": "end", "finished": finished, "calls": calls.calls, "errors": calls.errors})
        return 0
    finally:
        calls.close()
        await nc.close()


def _baseline(s: WorkerSettings, calls: CallLog) -> Baseline | None:
    """The pricer of the fleet without tiermem, when there is an endpoint to count tokens with."""
    if not s.baseline or not (s.anthropic_base_url or s.anthropic_api_key):
        calls.write({"kind": "baseline_off", "why": "DEMO_BASELINE=0" if not s.baseline
                     else "no ANTHROPIC_BASE_URL or ANTHROPIC_API_KEY to count tokens with"})
        return None
    client = anthropic.AsyncAnthropic(base_url=s.anthropic_base_url or None,
                                      api_key=s.anthropic_api_key or "simulator", max_retries=2)
    return Baseline(client, calls.write, seed=f"{s.seed}:{s.shard}")


async def seed(client: AsyncClient, plans: list[scenario.LeadPlan], start) -> tuple[int, int]:
    """Append every lead's imported history (in order per lead, leads in parallel); (sent, errors)."""
    stamp = SimClock(0, 1, start).iso
    sem = asyncio.Semaphore(SEED_CONCURRENCY)
    sent = errors = 0

    async def one(plan: scenario.LeadPlan) -> None:
        nonlocal sent, errors
        async with sem:
            for j, (role, text, at) in enumerate(plan.history):
                sent += 1
                try:
                    await client.append(plan.user_id, plan.bot_id, role, text, msg_id=f"{plan.user_id}:h{j}",
                                        ts=stamp(at))
                except TierError:
                    errors += 1

    await asyncio.gather(*(one(p) for p in plans))
    return sent, errors


async def seed_fleet(env: Mapping[str, str], plans: list[scenario.LeadPlan],
                     date: str = "2026-03-02") -> tuple[int, int]:
    """`seed` over a connection of its own, as the agent worker of `env` (the demo seeds once for all its workers)."""
    nc = await connect_as(env, WORKER, connect_timeout=5)
    try:
        return await seed(AsyncClient(nc), plans, sim_start(date))
    finally:
        await nc.close()


async def _flush_every(calls: CallLog, every: float) -> None:
    while True:
        await asyncio.sleep(every)
        calls.flush()
