"""The indexer's floor (what is provably in Postgres) against a real JetStream.

The test plays both the gateway (it publishes onto the log) and the indexer
(it fetches and acknowledges on the indexers' durable consumer), so it
decides exactly what the consumer has seen when the floor is read.
"""

from __future__ import annotations

from services.l3_semantic_indexer.floor import Floor
from services.l3_semantic_indexer.indexer import subscribe
from shared import stream, subjects
from tests.helpers import client


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
        assert not await floor.reach(indexed[-1] + 1, wait_s=0.1)

        for msg in await psub.fetch(1, timeout=5):
            await msg.ack_sync()
        assert await floor.reach(indexed[-1] + 1, wait_s=1)
