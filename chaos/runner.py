"""One fault trial after another under load, each judged against the truth log.

A trial: seed a user to forget (messages, a read, a cached intent), run the
load for a moment, inject the fault, forget that user while the fault lasts,
heal, wait (bounded) until the workload's requests succeed again, then read
the durable log and L3 back (waiting, bounded, for L3 to catch up) and count
what the truth log says must not happen. Every wait has a deadline; the whole
run has one too (`deadline_s`): trials that would start past it are skipped
and say so.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import asyncpg

from chaos import truth as t
from chaos.faults import POISON_IDS, Context, Fault
from chaos.workload import INTENT, Workload, watch_forgotten
from shared import stream, subjects

GRACE_S = 1.0  # AUDIT_GRACE_S: how old an acknowledged message must be before a read may not lack it
PRE_S = 1.0
SETTLE_OK_S = 1.5  # recovered: every request of this long a window succeeded
SETTLE_MAX_S = 30.0
L3_CATCH_UP_S = 20.0


@dataclass
class TrialResult:
    fault: str
    trial: int
    acked_lost: int = 0
    duplicates: int = 0
    stale_served: int = 0
    forgotten_served: int = 0
    stale_llm_hits: int = 0
    recovery_s: float | None = None
    forget_ok: bool = True
    timeline: list = field(default_factory=list)  # (s after inject, p95 ms, errors)
    notes: list[str] = field(default_factory=list)


@dataclass
class Stores:
    """What was lost and duplicated so far (cumulative), to attribute each trial's new findings."""

    lost: set = field(default_factory=set)
    duplicates: int = 0


async def read_stores(admin, database_url: str, users: list[str]) -> tuple[dict, dict]:
    """The durable log and L3 of `users`: {user: [(seq, msg_id)]} each."""
    log = {}
    for user in users:
        log[user] = [(m.seq, m.entry.msg_id) for m in await stream.user_log(admin, user)]
    conn = await asyncpg.connect(database_url, timeout=5)
    try:
        rows = await conn.fetch("SELECT user_id, seq, msg_id FROM l3.messages WHERE user_id = ANY($1::text[])",
                                users, timeout=10)
    finally:
        await conn.close()
    l3: dict = {u: [] for u in users}
    for r in rows:
        l3[r["user_id"]].append((r["seq"], r["msg_id"]))
    return log, l3


async def check_stores(ctx: Context, truth: t.Truth, stores: Stores, wait_s: float) -> tuple[int, int, list[str]]:
    """New acknowledged appends missing from the log or L3, new duplicates, and why. Waits (bounded)
    for L3 to index what the log holds before it counts anything missing from L3."""
    deadline = time.monotonic() + wait_s
    notes: list[str] = []
    while True:
        snapshot = time.time()
        try:
            log, l3 = await read_stores(ctx.admin, ctx.harness.env["DATABASE_URL"], ctx.users)
        except Exception as e:  # noqa: BLE001 - a store still down: retry until the deadline
            if time.monotonic() > deadline:
                return 0, 0, [f"stores unreadable: {e!r}"]
            await asyncio.sleep(0.5)
            continue
        lost_log, lost_l3 = t.lost(truth, log, ctx.users, snapshot), t.lost(truth, l3, ctx.users, snapshot)
        if not lost_l3 - lost_log or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    lost = lost_log | lost_l3
    new = lost - stores.lost
    stores.lost |= lost
    dups = t.duplicates(log) + t.duplicates(l3)
    new_dups = max(0, dups - stores.duplicates)
    stores.duplicates = max(dups, stores.duplicates)
    if new & lost_log:
        notes.append(f"{len(new & lost_log)} acked append(s) missing from the durable log "
                     f"({await _what_is_there(ctx, truth, new & lost_log)})")
    if new & lost_l3:
        notes.append(f"{len(new & lost_l3)} acked append(s) missing from L3 after {wait_s:.0f} s")
    return len(new), new_dups, notes


async def _what_is_there(ctx: Context, truth: t.Truth, missing: set) -> str:
    """For the report: what the stream holds at the seq an append was acknowledged with."""
    seqs = {a.msg_id: a.seq for acks in truth.acks.values() for a in acks}
    out = []
    for user, msg_id in sorted(missing)[:3]:
        seq = seqs[msg_id]
        try:
            msg = await ctx.admin.jetstream().get_msg(subjects.STREAM, seq)
            out.append(f"seq {seq} of {user}/{msg_id} now holds {msg.subject}")
        except Exception as e:  # noqa: BLE001 - gone (purged, deleted) is the finding
            out.append(f"seq {seq} of {user}/{msg_id}: {type(e).__name__}")
    return "; ".join(out)


async def _recovered(truth: t.Truth, healed: float) -> float:
    """Wait (bounded) until every request of the last SETTLE_OK_S succeeded; returns when."""
    end = time.time() + SETTLE_MAX_S
    while time.time() < end:
        now = time.time()
        window = [c for c in truth.calls if c.t_sent >= max(healed, now - SETTLE_OK_S)]
        if now - healed >= SETTLE_OK_S and window and all(c.ok for c in window):
            return now
        await asyncio.sleep(0.25)
    return time.time()



async def run_trial(ctx: Context, w: Workload, truth: t.Truth, stores: Stores, fault: Fault, trial: int,
                    tag: str) -> TrialResult:
    fuser = f"forget-{tag}"
    for _ in range(3):
        await w.append(fuser, role="user", text=f"{fuser} lives at 12 Elm street and wants the house")
    await w.read(fuser, 10)
    await w.intent(fuser)
    ctx.state = {}
    t0 = time.time()
    await asyncio.sleep(PRE_S)
    injected = time.time()
    result = TrialResult(fault.name, trial)
    stop_watch = asyncio.Event()

    async def forget_then_watch() -> bool:
        ok = await w.forget(fuser, deadline=injected + fault.hold_s + SETTLE_MAX_S)
        if ok:
            await watch_forgotten(w, fuser, stop_watch)
        return ok

    try:
        await fault.inject(ctx)
        watcher = asyncio.create_task(forget_then_watch())
        await asyncio.sleep(fault.hold_s)
    finally:
        healed = time.time()
        await fault.heal(ctx)
    back = await _recovered(truth, healed)
    await asyncio.sleep(1.0)  # the forgotten user is watched a little after recovery too
    stop_watch.set()
    try:
        result.forget_ok = await asyncio.wait_for(watcher, timeout=SETTLE_MAX_S)
    except asyncio.TimeoutError:
        result.forget_ok = False
    ended = time.time()
    for proc in ctx.state.get("extra", []):
        ctx.harness.remove_instance(proc)
    result.recovery_s = t.recovery_s(truth.calls, healed, back + 0.01)
    result.timeline = t.p95_timeline(truth.calls, injected - PRE_S, ended)
    stale = t.stale_reads(truth, GRACE_S, since=t0, until=ended, poison=POISON_IDS)
    result.stale_served = len(stale)
    result.notes += sorted({why for _, why in stale})[:3]
    forgotten = t.forgotten_served(truth, since=t0, until=ended)
    result.forgotten_served = len(forgotten)
    result.notes += forgotten[:2]
    llm = t.stale_llm_hits(truth, {INTENT}, GRACE_S, since=t0, until=ended)
    result.stale_llm_hits = len(llm)
    result.notes += llm[:2]
    result.acked_lost, result.duplicates, notes = await check_stores(ctx, truth, stores, L3_CATCH_UP_S)
    result.notes += notes
    if not result.forget_ok:
        result.notes.append("the forget never succeeded")
    if result.recovery_s is None:
        result.notes.append(f"not recovered {SETTLE_MAX_S:.0f} s after the fault")
    return result
