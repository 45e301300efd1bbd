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

from nats.js.api import ConsumerInfo

POLL_S = 0.02  # between two reads of the consumer while a min_seq read waits


def consumer_floor(last_seq_before: int, info: ConsumerInfo) -> int:
    """The floor that `info` proves, given the stream's last seq read BEFORE `info`.

    The ack floor alone is the proof. It stops short of the stream's end when
    the tail was deleted before delivery (a forget purges the user's
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

    `read_last_seq` and `read_consumer` are the two JetStream reads (the
    stream's last seq, the consumer's info); tests interleave writes with them.
    """

    def __init__(self, read_last_seq: Callable[[], Awaitable[int]],
                 read_consumer: Callable[[], Awaitable[ConsumerInfo]]) -> None:
        self.value = 0
        self._read_last_seq = read_last_seq
        self._read_consumer = read_consumer

    async def read(self) -> int:
        """Read the floor now (the stream's last seq first: see `consumer_floor`)."""
        last = await self._read_last_seq()
        self.value = max(self.value, consumer_floor(last, await self._read_consumer()))
        return self.value

    async def reach(self, seq: int, wait_s: float) -> bool:
        """True once every log message up to `seq` is stored (waits up to `wait_s`)."""
        if seq <= self.value:
            return True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while True:
            if seq <= await self.read() or loop.time() >= deadline:
                return seq <= self.value
            await asyncio.sleep(POLL_S)

    async def fresh(self) -> int:
        """The floor as read after this call began."""
        return await self.read()
