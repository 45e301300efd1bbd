"""The indexer's floor (what is provably in Postgres) and the L3 replies it caps.

Real JetStream and Postgres. The first test plays both the gateway (it
publishes onto the log) and the indexer (it fetches and acknowledges on the
indexers' durable consumer), so it decides exactly what the consumer has seen
when the floor is read. The second runs two indexer replicas in-process, one
held in the middle of a batch, so that a newer message is committed before
an older one.
"""

from __future__ import annotations

import asyncio
import functools

from services.l3_semantic_indexer.floor import Floor
from services.l3_semantic_indexer.indexer import subscribe
from services.l3_semantic_indexer.service import build
from shared import stream, subjects
from shared.contract import LogEntry, encode
from tests.helpers import call, client, eventually, never_within, ok, running


async def test_a_message_stored_between_the_two_reads_of_the_floor_is_not_counted_as_indexed(clean_nats):
    async with client(clean_nats) as nc:
        js = nc.jetstream()
        await stream.ensure_stream(js)
        psub = await subscribe(js)

        async def append() -> int:
            return (await js.publish(subjects.log_subject("lead-1"), b"{}")).seq

        indexed = [await append() for _ in range(3)]
        for msg in await psub.fetch(3, timeout=5):
            await msg.ack_sync()  # "indexed": nothing pending, nothing unacknowledged

        reads = 0

        async def read(what):
            nonlocal reads
            value = await what()
            reads += 1
            if reads == 1:
                await append()  # stored between the two reads, seen by neither indexer nor consumer
            return value

        floor = Floor(lambda: read(lambda: stream.last_seq(js)),
                      lambda: read(lambda: js.consumer_info(subjects.STREAM, subjects.L3_CONSUMER)))
        assert await floor.read() == indexed[-1]
        watcher = asyncio.create_task(floor.watch())
        try:
            assert not await floor.reach(indexed[-1] + 1, wait_s=0.1)
            for msg in await psub.fetch(1, timeout=5):
                await msg.ack_sync()
            assert await floor.reach(indexed[-1] + 1, wait_s=1)
        finally:
            watcher.cancel()


def holding(msg_id: str, held: asyncio.Event, release: asyncio.Event):
    """A `before_commit` hook: the batch holding `msg_id` waits for `release` (sets `held`)."""

    async def hold(rows):
        if any(r.msg_id == msg_id for r in rows):
            held.set()
            await release.wait()

    return hold


async def append_message(js, user: str, i: int) -> int:
    entry = LogEntry(user_id=user, bot_id="sales-1", role="user", text=f"message {i}",
                     msg_id=f"{user}-{i}", ts="2026-11-26T07:00:00.000Z")
    return (await js.publish(subjects.log_subject(user), encode(entry))).seq


async def test_with_two_indexers_a_reply_never_claims_a_seq_while_an_older_message_is_uncommitted(clean_state):
    user = "lead-2"
    held, release = asyncio.Event(), asyncio.Event()
    hold = holding(f"{user}-1", held, release)  # the slow replica: stuck with message 1 until released

    async def append(i: int) -> int:
        return await append_message(js, user, i)

    async def replies(body: dict) -> list[dict]:
        """The answers of both replicas (the queue group picks one per request)."""
        return [await ok(nc, subjects.MEMORY_L3_GET, body) for _ in range(8)]

    # A grace long enough that the held message never counts as overdue here (the next test).
    env = {**clean_state, "LOG_LEVEL": "warning", "L3_BATCH": "1", "L3_MIN_SEQ_WAIT_S": "0.2",
           "AUDIT_GRACE_S": "600"}
    async with client(clean_state["NATS_URL"]) as nc:
        js = nc.jetstream()
        await stream.ensure_stream(js)  # the gateway's job: the indexer waits for it
    async with client(clean_state["NATS_URL"]) as nc, \
            running("l3-semantic-indexer", functools.partial(build, before_commit=hold), env):
        js = nc.jetstream()
        old = await append(0)
        await ok(nc, subjects.MEMORY_L3_GET, {"user_id": user, "n": 10, "min_seq": old})
        first = await append(1)
        await asyncio.wait_for(held.wait(), 10)
        async with running("l3-semantic-indexer", build, env):
            second = await append(2)

            async def second_acked():  # the fast replica has committed and acknowledged message 2
                info = await js.consumer_info(subjects.STREAM, subjects.L3_CONSUMER)
                return info.num_pending == 0 and info.num_ack_pending == 1

            await eventually(second_acked, every=0.01)

            for reply in await replies({"user_id": user, "n": 10}):
                assert (reply["seq"], [m["seq"] for m in reply["messages"]]) == (old, [old])
            for reply in await replies({"user_id": user, "op": "search", "query": "message", "k": 5}):
                assert (reply["seq"], [m["seq"] for m in reply["messages"]]) == (old, [old])
            code, _ = await call(nc, subjects.MEMORY_L3_GET, {"user_id": user, "n": 10, "min_seq": first})
            assert code == 503

            release.set()
            for reply in await replies({"user_id": user, "n": 10, "min_seq": second}):
                assert (reply["seq"], [m["seq"] for m in reply["messages"]]) == (
                    second, [old, first, second])


async def test_a_read_without_min_seq_is_refused_while_indexing_lags_the_log_past_the_lag(clean_state):
    """The indexer is stuck on a message (Postgres slow, a replica frozen): once that
    message has been in the log for half the audit grace, L3 answers 503 rather than a
    reply without it, also to reads that name no min_seq."""
    user = "lead-lag"
    held, release = asyncio.Event(), asyncio.Event()
    hold = holding(f"{user}-1", held, release)

    async def append(i: int) -> int:
        return await append_message(js, user, i)

    env = {**clean_state, "LOG_LEVEL": "warning", "L3_BATCH": "1", "L3_MIN_SEQ_WAIT_S": "0.2",
           "AUDIT_GRACE_S": "1.0"}
    read = {"user_id": user, "n": 10}
    async with client(clean_state["NATS_URL"]) as nc:
        js = nc.jetstream()
        await stream.ensure_stream(js)
        async with running("l3-semantic-indexer", functools.partial(build, before_commit=hold), env):
            old = await append(0)
            await ok(nc, subjects.MEMORY_L3_GET, {**read, "min_seq": old})
            first = await append(1)
            await asyncio.wait_for(held.wait(), 10)
            await asyncio.sleep(1.0)  # scenario: message 1 is in the log for longer than the lag (0.5 s)
            code, body = await call(nc, subjects.MEMORY_L3_GET, read)
            assert code == 503 and "lags the log" in body["error"]["message"]
            release.set()
            reply = await ok(nc, subjects.MEMORY_L3_GET, read)
            assert [m["seq"] for m in reply["messages"]] == [old, first]


async def test_requests_waiting_for_the_floor_share_one_reading_loop(clean_nats):
    async with client(clean_nats) as nc:
        js = nc.jetstream()
        await stream.ensure_stream(js)
        await subscribe(js)
        reads = 0

        async def last_seq() -> int:
            nonlocal reads
            reads += 1
            return await stream.last_seq(js)

        floor = Floor(last_seq, lambda: js.consumer_info(subjects.STREAM, subjects.L3_CONSUMER))
        watcher = asyncio.create_task(floor.watch())
        try:
            waits = [floor.reach(1, wait_s=0.3) for _ in range(50)]
            assert await asyncio.gather(*waits, floor.fresh()) == [False] * 50 + [0]
        finally:
            watcher.cancel()
        # one reading every POLL_S (0.02 s) for 0.3 s, whatever the number of waiters;
        # each polling for itself, they would have read about 50 * 15 times
        assert reads <= 25


async def test_a_nudge_after_an_acknowledged_batch_reads_the_floor_without_any_read_waiting(clean_nats):
    """The indexer nudges the floor after each batch it had acknowledged: reads then find it
    current instead of each paying for a reading of its own. No nudge, no reading."""
    async with client(clean_nats) as nc:
        js = nc.jetstream()
        await stream.ensure_stream(js)
        psub = await subscribe(js)
        last = 0
        for _ in range(3):
            last = (await js.publish(subjects.log_subject("lead-n"), b"{}")).seq
        msgs = await psub.fetch(3, timeout=5)
        for msg in msgs[:-1]:
            await msg.ack()
        await msgs[-1].ack_sync()  # as the indexer does: the last ack confirmed
        floor = Floor(lambda: stream.last_seq(js),
                      lambda: js.consumer_info(subjects.STREAM, subjects.L3_CONSUMER))
        watcher = asyncio.create_task(floor.watch())
        try:
            await never_within(0.2, lambda: floor.value, what="a floor reading nobody asked for")
            floor.nudge()
            await eventually(lambda: floor.value == last, timeout=5, what="the nudged reading")
        finally:
            watcher.cancel()
