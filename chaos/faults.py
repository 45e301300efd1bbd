"""The faults, each an inject / heal pair that the runner applies one at a time.

Why a table of small functions: a fault is what an operator would see go
wrong (a process killed or frozen, a server restarted empty or rolled back,
a slow replica, poison on the log, a model API failing), and each must be
undone exactly (heal) so the next trial starts from a working stack. The
heal's time is "the fault's end" from which recovery is measured.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx
import msgspec

from chaos.harness import Harness
from devstack import stack
from shared import subjects

SERVICES = [s.name for s in stack.SERVICES]
POISON_IDS = frozenset({"poison-other-user", "poison-no-text"})


@dataclass
class Context:
    """What a fault acts on; `state` carries what inject leaves for heal."""

    harness: Harness
    admin: object  # NATS connection as admin (poison, snapshots of the log)
    sim_url: str
    users: list[str]
    state: dict = field(default_factory=dict)


Step = Callable[[Context], Awaitable[None]]


@dataclass(frozen=True)
class Fault:
    name: str
    inject: Step
    heal: Step
    hold_s: float = 2.0  # how long the fault lasts before heal


async def _nothing(ctx: Context) -> None:
    return None


def _kill_service(name: str) -> Fault:
    killed: list[int | None] = []

    async def inject(ctx: Context) -> None:
        killed.append(ctx.harness.signal(name, signal.SIGKILL))

    async def heal(ctx: Context) -> None:
        await ctx.harness.restart(name, killed.pop())

    return Fault(f"kill:{name}", inject, heal, hold_s=1.0)


def _stop_service(name: str) -> Fault:
    async def inject(ctx: Context) -> None:
        ctx.harness.signal(name, signal.SIGSTOP)

    async def heal(ctx: Context) -> None:
        ctx.harness.signal(name, signal.SIGCONT)

    return Fault(f"stop:{name}", inject, heal, hold_s=2.0)


def _kill_server(name: str, *, gateways: int = 1) -> Fault:
    """SIGKILL a server, start it again on its port and folder (Redis comes back empty).
    With `gateways` > 1, that many l2-gateways run during the trial."""

    async def inject(ctx: Context) -> None:
        extra = [ctx.harness.add_instance("l2-gateway") for _ in range(gateways - 1)]
        ctx.state["extra"] = extra
        if extra:
            await asyncio.sleep(3.0)  # let them join the load before the wipe
        await asyncio.to_thread(ctx.harness.kill_server, name)

    async def heal(ctx: Context) -> None:
        await asyncio.to_thread(ctx.harness.start_server, name)

    label = f"kill:{name}" + (f"-{gateways}gw" if gateways > 1 else "")
    return Fault(label, inject, heal, hold_s=1.0)


def _postgres_restart() -> Fault:
    """A clean Postgres restart (fast shutdown) while the indexer commits batches."""

    async def inject(ctx: Context) -> None:
        await asyncio.to_thread(ctx.harness.servers["postgres"].stop, 10)

    async def heal(ctx: Context) -> None:
        await asyncio.to_thread(ctx.harness.start_server, "postgres")

    return Fault("restart:postgres", inject, heal, hold_s=1.0)


def _redis_rollback() -> Fault:
    """Redis fails over to a replica that is seconds behind: every key goes back to one
    point in time (an RDB snapshot taken at inject, loaded by a restart at heal)."""

    async def inject(ctx: Context) -> None:
        import redis.asyncio as aioredis

        r = aioredis.from_url(ctx.harness.env["REDIS_URL"])
        try:
            await r.save()  # the replica's copy: consistent, as of now
        finally:
            await r.aclose()

    async def heal(ctx: Context) -> None:
        harness = ctx.harness
        await asyncio.to_thread(harness.kill_server, "redis")
        await asyncio.to_thread(harness.start_server, "redis")  # loads the snapshot
        # The stack's valkey keeps nothing on disk: a later restart must come back empty.
        (harness.servers["redis"].data_dir / "dump.rdb").unlink(missing_ok=True)

    return Fault("redis-rollback", inject, heal, hold_s=3.0)


def _slow_indexer() -> Fault:
    """Two indexers, one frozen in bursts (SIGSTOP 0.3 s / SIGCONT 0.2 s): commits land out of order."""

    async def inject(ctx: Context) -> None:
        ctx.state["extra"] = [ctx.harness.add_instance("l3-semantic-indexer")]
        await asyncio.sleep(4.0)  # the second one loads its model and joins
        for _ in range(8):
            ctx.harness.signal("l3-semantic-indexer", signal.SIGSTOP)
            await asyncio.sleep(0.3)
            ctx.harness.signal("l3-semantic-indexer", signal.SIGCONT)
            await asyncio.sleep(0.2)

    return Fault("slow-indexer", inject, _nothing, hold_s=0.5)


def _poison() -> Fault:
    """Messages on the log that no client appended: garbage, another user's entry, one without text."""

    async def inject(ctx: Context) -> None:
        js = ctx.admin.jetstream()
        user = ctx.users[0]
        subject = subjects.log_subject(user)
        entry = {"user_id": ctx.users[1], "bot_id": "x", "role": "user", "text": "not yours",
                 "msg_id": "poison-other-user", "ts": "2024-01-01T00:00:00.000Z"}
        for payload in (b"\x00not json", msgspec.json.encode(entry),
                        msgspec.json.encode({**entry, "user_id": user, "msg_id": "poison-no-text", "text": None})):
            await js.publish(subject, payload, timeout=2)

    return Fault("poison", inject, _nothing, hold_s=2.0)


def _llm(name: str, rule: dict, hold_s: float = 2.0) -> Fault:
    async def inject(ctx: Context) -> None:
        async with httpx.AsyncClient(timeout=5) as c:
            (await c.post(f"{ctx.sim_url}/faults", json=rule)).raise_for_status()

    async def heal(ctx: Context) -> None:
        async with httpx.AsyncClient(timeout=5) as c:
            (await c.post(f"{ctx.sim_url}/faults", json={"clear": True})).raise_for_status()

    return Fault(name, inject, heal, hold_s=hold_s)


def _kill_nats_node(i: int) -> Fault:
    async def inject(ctx: Context) -> None:
        await asyncio.to_thread(ctx.harness.kill_server, f"nats{i}")

    async def heal(ctx: Context) -> None:
        await asyncio.to_thread(ctx.harness.start_server, f"nats{i}")

    return Fault(f"kill:nats{i}", inject, heal, hold_s=3.0)


def catalogue(cluster: bool = False) -> dict[str, Fault]:
    """Every fault by name. In a cluster, killing a NATS node replaces killing the one server."""
    faults = [*(_kill_service(s) for s in SERVICES), *(_stop_service(s) for s in SERVICES)]
    faults += [_kill_nats_node(1)] if cluster else [_kill_server("nats")]
    faults += [_kill_server("redis"), _kill_server("postgres"), _kill_server("redis", gateways=3),
               _redis_rollback(), _postgres_restart(), _slow_indexer(), _poison(),
               _llm("llm-429", {"status": 429, "retry_after_s": 0.2}), _llm("llm-529", {"status": 529}),
               _llm("llm-500", {"status": 500}), _llm("llm-hang", {"delay_s": 6.0}, hold_s=3.0),
               _llm("llm-truncated", {"truncate_tokens": 2})]
    return {f.name: f for f in faults}
