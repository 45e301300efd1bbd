"""L2 stays honest when Redis loses or rolls back its data under several gateways (issue 11).

Three gateways run in this process against one valkey of the test's own (it
is flushed and restarted). A truth log kept by the test client says which
appends were acknowledged; every answer L2 gives itself is checked against
it. L3 is a stub answering empty with tier "l3": a pass-down is always
honest, so only L2's own answers are judged.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import msgspec
import pytest
import redis.asyncio as aioredis

from services.l2_gateway.applier import Applier, RedisLost
from services.l2_gateway.fence import LOST, REBUILDING, ROLLED_BACK, Fence, State
from services.l2_gateway.redis_window import RedisWindow
from services.l2_gateway.service import build
from devstack import servers
from shared import lastseq, subjects
from shared.log_head import LogHead
from shared.contract import Changed
from tests.helpers import client, eventually, ok, running
from tests.test_l2_gateway import FakeL3, append_body

GRACE_S = 1.0  # a read without min_seq may lack a message acknowledged this recently
N = 100  # messages each read asks for (L2's window)


@pytest.mark.parametrize("seen,state,why", [
    (None, None, LOST),
    (None, State("1-a", 1, 5), ""),
    (("1-a", 1, 9), State("1-a", 1, 5), ROLLED_BACK),  # the position went back
    (("2-b", 2, 9), State("1-a", 1, 50), ROLLED_BACK),  # an older epoch came back
    (("1-a", 1, 9), State("1-c", 1, 50), ROLLED_BACK),  # ours replaced without a newer generation
    (("1-a", 1, 9), State("2-b", 2, 0, 40), REBUILDING),  # a new epoch, replay under way
    (("1-a", 1, 9), State("2-b", 2, 40, 40), ""),
])
def test_the_fence_trusts_only_a_state_no_older_than_what_it_saw(seen, state, why):
    fence = Fence()
    if seen:
        fence.adopt(State(*seen))
    assert fence.judge(state, fence.seen) == why


def test_the_fence_judges_a_reply_by_what_was_seen_when_it_was_asked_for():
    """A state read before a newer one arrived (from the applier, on the same
    process) is not a rollback: it was simply older when it was read."""
    fence = Fence()
    fence.adopt(State("1-a", 1, 5))
    asked = fence.seen
    fence.saw(State("1-a", 1, 9))  # the applier advanced while the read was on its way
    assert fence.judge(State("1-a", 1, 7), asked) == ""
    assert fence.judge(State("1-a", 1, 7), fence.seen) == ROLLED_BACK


async def test_an_applier_never_advances_an_epoch_its_reader_saw_but_it_did_not_join(own_redis):
    """Redis wiped under two gateways: B makes a new epoch and replays the log into it;
    A's reader sees that epoch (and remembers it) before A's applier notices the wipe.
    A's next batch must not advance B's epoch with A's position: that would end B's
    replay before the messages in between were written, and L2 would answer without
    them."""
    r = aioredis.from_url(own_redis["server"].url)
    a = RedisWindow(r, 10, 60.0, Fence())
    b = RedisWindow(r, 10, 60.0, Fence())
    applier = Applier(rt=None, window=a, guard=None)
    assert await a.take_lock("a")
    a.fence.adopt(await a.new_epoch(1, 0))
    applier.at = a.fence.seen  # A's applier joined epoch 1 ...
    await applier._apply([], 10)  # ... and applied the log up to 10 in it
    await a.release_lock("a")

    await r.flushall()
    assert await b.take_lock("b")
    b.fence.adopt(await b.new_epoch(2, 30))  # B replays up to 30 into epoch 2
    assert await a.read("u", 5) == REBUILDING  # A's reader saw epoch 2
    with pytest.raises(RedisLost):
        await applier._apply([], 25)  # A's applier is still in epoch 1
    assert await b.state() == State(b.fence.epoch, 2, 0, 30)  # B's replay is untouched
    await r.aclose()


def test_the_log_head_names_a_position_only_once_it_is_older_than_the_lag():
    now = [100.0]
    head = LogHead(0.5, clock=lambda: now[0])
    assert head.due() == 0  # nothing known about the log yet
    head.saw(10)
    assert head.due() == 0  # known for less than the lag
    now[0] += 0.3
    head.saw(12)
    now[0] += 0.3  # 10 is known for 0.6 s, 12 for 0.3 s
    assert head.due() == 10
    head.saw(11)  # an older position learned late changes nothing
    now[0] += 0.3
    assert head.due() == 12
    assert len(head._samples) == 1  # only what a later answer can need is kept


async def test_a_read_passes_down_while_the_applier_lags_the_log(clean_nats, own_redis,
                                                                 monkeypatch):
    """The applier stalls (here: Redis writes hang; in the field, a consumer being made
    again after NATS restarted). Appends are still acknowledged; once one has been
    in the log for half the grace, L2 stops answering without it."""
    stalled = asyncio.Event()
    release = asyncio.Event()
    apply_batch = RedisWindow.apply_batch

    async def stalling(self, *args, **kwargs):
        if stalled.is_set():
            await release.wait()
        return await apply_batch(self, *args, **kwargs)

    monkeypatch.setattr(RedisWindow, "apply_batch", stalling)
    env = {"NATS_URL": clean_nats, "REDIS_URL": own_redis["server"].url}
    async with client(clean_nats) as nc:
        await FakeL3().start(nc)
        async with running("l2-gateway", build, env, append_apply_wait_s=0.1, audit_grace_s=1.0):
            await ok(nc, subjects.MEMORY_APPEND, append_body("lead-lag", 0))
            read = {"user_id": "lead-lag", "n": 5}
            assert (await ok(nc, subjects.MEMORY_L2_GET, read))["tier"] == "l2"
            stalled.set()
            await ok(nc, subjects.MEMORY_APPEND, append_body("lead-lag", 1))  # acked, not applied
            reply = await ok(nc, subjects.MEMORY_L2_GET, read)
            assert reply["tier"] == "l2" and len(reply["messages"]) == 1  # within the grace
            # past half the grace (0.5 s) the unapplied message is due: reads pass down
            await eventually(lambda: _tier_is(nc, read, "l3"), timeout=5, what="the read passed down")
            # and the broker is told (`lastseq.DUE` above what Redis applied; written every
            # `lastseq.DUE_EVERY_S`)
            r = aioredis.from_url(env["REDIS_URL"])

            async def due_written():
                state = lastseq.State.parse(await r.hmget(lastseq.STATE, lastseq.STATE_FIELDS))
                return int(await r.get(lastseq.DUE) or 0) > state.applied

            await eventually(due_written, what="the due position written above the applied one")
            await r.aclose()
            release.set()
            await eventually(lambda: _l2_holds(nc, read, 2))  # caught up: answered again


async def _l2_holds(nc, read: dict, count: int) -> bool:
    reply = await ok(nc, subjects.MEMORY_L2_GET, read)
    return reply["tier"] == "l2" and len(reply["messages"]) == count


async def _tier_is(nc, read: dict, tier: str) -> bool:
    return (await ok(nc, subjects.MEMORY_L2_GET, read))["tier"] == tier


class Truth:
    """What the test client was told, and every L2 answer that contradicts it."""

    def __init__(self) -> None:
        self.acked: dict[str, list[tuple[int, float]]] = {}  # user -> (seq, when acknowledged)
        self.violations: list[str] = []
        self.l2_answers = 0

    def check(self, user: str, sent_at: float, min_seq: int | None, reply: dict) -> None:
        if reply["tier"] != "l2":
            return
        self.l2_answers += 1
        got = {m["seq"] for m in reply["messages"]}
        # the newest N the user had when the read was sent (one writer per user)
        acked = [(s, t) for s, t in self.acked.get(user, []) if t < sent_at][-N:]
        if min_seq is not None:
            need = {s for s, _ in acked if s <= min_seq}
        else:
            need = {s for s, t in acked if t < sent_at - GRACE_S}
        if not need <= got:
            self.violations.append(f"{user} min_seq={min_seq}: L2 lacked {sorted(need - got)}")
        if acked and not got and reply["seq"] == 0:
            self.violations.append(f"{user} min_seq={min_seq}: L2 answered empty, seq 0")


async def read_and_check(nc, truth: Truth, user: str, min_seq: int | None) -> dict:
    body = {"user_id": user, "n": N, **({"min_seq": min_seq} if min_seq else {})}
    sent = time.monotonic()
    reply = await ok(nc, subjects.MEMORY_L2_GET, body)
    truth.check(user, sent, min_seq, reply)
    return reply


async def writer(nc, truth: Truth, user: str, stop: asyncio.Event) -> None:
    """Append, then read with the ack's seq as min_seq and without, until stopped."""
    i = 0
    while not stop.is_set():
        seq = (await ok(nc, subjects.MEMORY_APPEND, append_body(user, i)))["seq"]
        truth.acked.setdefault(user, []).append((seq, time.monotonic()))
        await read_and_check(nc, truth, user, seq)
        await read_and_check(nc, truth, user, None)
        i += 1


@contextlib.asynccontextmanager
async def gateways(env: dict, count: int = 3):
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(count):
            await stack.enter_async_context(running("l2-gateway", build, env,
                                                    append_apply_wait_s=0.2))
        yield


async def caught_up(nc, truth: Truth) -> bool:
    """Every user's full history is answered by L2 again."""
    for user, acked in truth.acked.items():
        if not acked:
            continue
        reply = await read_and_check(nc, truth, user, acked[-1][0])
        if reply["tier"] != "l2":
            return False
    return True


@pytest.fixture
async def own_redis(tmp_path):
    """A valkey of this test's own (flushed, restarted), under tmp_path/redis."""
    server = servers.start_redis(tmp_path / "redis", die_with_parent=True)
    holder = {"server": server, "folder": tmp_path / "redis"}
    yield holder
    holder["server"].stop()


async def test_redis_flushed_under_three_gateways_never_answers_incomplete(clean_nats, own_redis):
    redis = own_redis["server"]
    env = {"NATS_URL": clean_nats, "REDIS_URL": redis.url}
    truth, stop = Truth(), asyncio.Event()
    r = aioredis.from_url(redis.url)
    async with client(clean_nats) as nc:
        await FakeL3().start(nc)
        async with gateways(env):
            users = [f"lead-f{i}" for i in range(12)]
            load = [asyncio.create_task(writer(nc, truth, u, stop)) for u in users]
            await asyncio.sleep(1.5)  # scenario: load before the flush
            before = truth.l2_answers
            await r.flushall()
            await asyncio.sleep(3.0)  # scenario: load while the gateways rebuild
            stop.set()
            await asyncio.gather(*load)
            await eventually(lambda: caught_up(nc, truth), timeout=20)
    await r.aclose()
    assert before > 0 and truth.l2_answers > before
    assert truth.violations == []


async def test_redis_rolled_back_to_an_older_snapshot_is_not_served_as_complete(clean_nats,
                                                                                 own_redis):
    redis = own_redis["server"]
    env = {"NATS_URL": clean_nats, "REDIS_URL": redis.url}
    truth = Truth()
    r = aioredis.from_url(redis.url)
    async with client(clean_nats) as nc:
        await FakeL3().start(nc)
        async with gateways(env):
            users = [f"lead-r{i}" for i in range(6)]

            async def append(user: str, i: int) -> int:
                seq = (await ok(nc, subjects.MEMORY_APPEND, append_body(user, i)))["seq"]
                truth.acked.setdefault(user, []).append((seq, time.monotonic()))
                return seq

            for i in range(3):
                for u in users:
                    await append(u, i)
            await eventually(lambda: caught_up(nc, truth))
            await r.save()  # the snapshot Redis will go back to
            snapshot_seq = truth.acked[users[-1]][-1][0]
            for i in range(3, 6):
                for u in users[:-1]:
                    await append(u, i)
            # the last user is forgotten after the snapshot: the old state still holds it
            await ok(nc, subjects.MEMORY_FORGET, {"user_id": users[-1]})
            truth.acked[users[-1]] = []
            await eventually(lambda: caught_up(nc, truth))
            await asyncio.sleep(GRACE_S)  # scenario: every ack older than the grace, so reads must hold all

            redis.stop()  # no save on the way down: the restart loads the older snapshot
            redis = own_redis["server"] = servers.start_redis(
                own_redis["folder"], port=redis.port, die_with_parent=True)
            await r.aclose()
            r = aioredis.from_url(redis.url)
            assert await r.dbsize() > 0  # the older state really is back

            forgotten_served = []
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                for u in users[:-1]:
                    await read_and_check(nc, truth, u, snapshot_seq)
                    await read_and_check(nc, truth, u, None)
                gone = await ok(nc, subjects.MEMORY_L2_GET, {"user_id": users[-1]})
                if gone["tier"] == "l2" and gone["messages"]:
                    forgotten_served.append(gone)
                if await caught_up(nc, truth):
                    break
                await asyncio.sleep(0.05)
            assert truth.violations == [] and forgotten_served == []
            assert await caught_up(nc, truth)  # and L2 serves again, rebuilt
    await r.aclose()


async def test_an_idle_users_expired_window_is_a_miss_and_comes_back_complete(clean_nats,
                                                                              own_redis):
    env = {"NATS_URL": clean_nats, "REDIS_URL": own_redis["server"].url}
    r = aioredis.from_url(env["REDIS_URL"])
    async with client(clean_nats) as nc:
        l3 = FakeL3()
        await l3.start(nc)
        events: list[Changed] = []

        async def on_changed(msg):
            events.append(msgspec.json.decode(msg.data, type=Changed))

        await nc.subscribe(subjects.changed_subject("lead-idle"), cb=on_changed)
        async with running("l2-gateway", build, env, l2_idle_ttl_s=1.0):
            first = [(await ok(nc, subjects.MEMORY_APPEND, append_body("lead-idle", i)))["seq"]
                     for i in range(3)]
            assert (await ok(nc, subjects.MEMORY_L2_GET, {"user_id": "lead-idle"}))["tier"] == "l2"

            async def expired():
                return not [k async for k in r.scan_iter(match="tm:{lead-idle}:*")]

            await eventually(expired, timeout=5)
            # expired: a miss, not "this user has no messages"
            reply = await ok(nc, subjects.MEMORY_L2_GET, {"user_id": "lead-idle", "n": 5})
            assert reply["tier"] == "l3" and l3.gets[-1].user_id == "lead-idle"
            # the user comes back: the window is rebuilt from the log, not started from scratch
            back = (await ok(nc, subjects.MEMORY_APPEND, append_body("lead-idle", 3)))["seq"]
            reply = await ok(nc, subjects.MEMORY_L2_GET, {"user_id": "lead-idle", "n": 5,
                                                          "min_seq": back})
            assert reply["tier"] == "l2"
            assert [m["seq"] for m in reply["messages"]] == [*first, back]
            await eventually(lambda: events and events[-1].seq == back)
            # and L1s are told the truth about what came before it
            assert (events[-1].prev_seq, events[-1].count) == (first[-1], 4)
    await r.aclose()
