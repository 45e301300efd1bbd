"""The indexer's floor: the highest log seq such that every message up to it is in Postgres.

Several indexer replicas share one durable consumer and commit their batches
in whatever order they finish, so a user's newest row in Postgres proves
nothing about the rows below it. What does: the consumer's ack floor (every
message up to it was acknowledged, and the indexer acknowledges a message
only after its row is committed). `memory.l3.get` answers only from rows at
or below the floor, and a `min_seq` read waits for the floor to reach it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog
from nats.js.api import ConsumerInfo

log = structlog.get_logger()

POLL_S = 0.02  # between two reads of the consumer while a min_seq read waits


def consumer_floor(last_seq_before: int, info: ConsumerInfo) -> int:
    """The floor that `info` proves, given the stream's last seq read BEFORE `info`.

    The ack floor alone is the proof (`delivered` adds nothing: with nothing
    unacknowledged it equals the ack floor). It stops short of the stream's
    end when the tail was deleted before delivery (a forget purges the user's
    messages), so when the consumer has nothing left to deliver and nothing
    unacknowledged, every message that existed when `info` was read is in,
    which includes every message up to `last_seq_before`. A last seq read
    after `info` could name a message stored between the two reads, that the
    consumer never saw: counting it would answer a `min_seq` read before its
    row exists.
    """
    floor = info.ack_floor.stream_seq
    if info.num_pending == 0 and info.num_ack_pending == 0:
        return max(floor, last_seq_before)
    return floor


class Floor:
    """The floor as this process last read it (`value`, never lower than before).

    One loop per process (`watch`) reads it while some request waits, and
    once after each batch this process's indexer acknowledges (`nudge`): a
    read wakes every waiter it satisfies, so N waiting requests cost one
    reading every POLL_S, not N (and requests arriving together share one).
    Without the nudge the floor was read only when a request needed more
    than `value`, so under steady appends nearly every read found it stale
    (the log head's due seq had moved on) and paid for a reading of its own,
    and a `min_seq` read learned of its batch only at the next POLL_S tick
    (bench/results/profile_memory.md).
    A reading that fails leaves `value` as it was: a `min_seq` read then
    times out with 503, a read without one is capped at the older floor.

    `read_last_seq` and `read_consumer` are the two JetStream reads (the
    stream's last seq, the consumer's info); tests interleave writes with them.
    """

    def __init__(self, read_last_seq: Callable[[], Awaitable[int]],
                 read_consumer: Callable[[], Awaitable[ConsumerInfo]]) -> None:
        self.value = 0
        self._read_last_seq = read_last_seq
        self._read_consumer = read_consumer
        self._wanted = asyncio.Event()  # someone arrived: read now
        self._reach: list[tuple[int, asyncio.Future]] = []
        self._fresh: list[asyncio.Future] = []
        self._failing = False

    async def read(self) -> int:
        """Read the floor now (the stream's last seq first: see `consumer_floor`)."""
        last = await self._read_last_seq()
        self.value = max(self.value, consumer_floor(last, await self._read_consumer()))
        return self.value

    async def reach(self, seq: int, wait_s: float) -> bool:
        """True once every log message up to `seq` is stored (waits up to `wait_s`)."""
        if seq <= self.value:
            return True
        waiter = (seq, asyncio.get_running_loop().create_future())
        self._reach.append(waiter)
        self._wanted.set()
        try:
            await asyncio.wait_for(waiter[1], wait_s)
        except asyncio.TimeoutError:
            pass
        finally:
            if waiter in self._reach:
                self._reach.remove(waiter)
        return seq <= self.value

    def nudge(self) -> None:
        """This process's indexer just had a batch acknowledged: read the floor now
        (coalesced with any reading already due), so reads find it current."""
        self._wanted.set()

    async def fresh(self) -> int:
        """The floor as read after this call began (or as it was, if that reading failed)."""
        fut = asyncio.get_running_loop().create_future()
        self._fresh.append(fut)
        self._wanted.set()
        return await fut

    async def watch(self) -> None:
        """Read the floor whenever someone waits for it, and wake whom it satisfies."""
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            fresh, self._fresh = self._fresh, []
            try:
                await self.read()
                self._failing = False
            except Exception as exc:  # noqa: BLE001 - JetStream unreachable: keep the old floor
                if not self._failing:
                    log.warning("l3_floor_unreadable", error=repr(exc), floor=self.value)
                self._failing = True
            for fut in fresh:
                if not fut.done():
                    fut.set_result(self.value)
            for seq, fut in self._reach:
                if seq <= self.value and not fut.done():
                    fut.set_result(None)
            if any(not fut.done() for _, fut in self._reach):
                try:  # still waited for: read again after POLL_S, or as soon as someone new asks
                    await asyncio.wait_for(self._wanted.wait(), POLL_S)
                except asyncio.TimeoutError:
                    self._wanted.set()
