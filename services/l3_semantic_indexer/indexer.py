"""Consumes the durable log into Postgres: embed in batches, upsert, then ack.

A durable pull consumer shared by every indexer replica delivers each message
at least once; the upsert is idempotent on (user_id, msg_id), and a message is
acknowledged only after its row is committed, so a crash at any point loses
nothing and duplicates nothing.

`applied_through()` answers "has L3 stored every message up to seq N?" from
the consumer's ack floor, which is what `min_seq` needs across replicas.
"""

from __future__ import annotations

import asyncio

import msgspec
import structlog
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from shared import stream, subjects
from shared.contract import LogEntry
from shared.service import Runtime
from shared.telemetry import tracer

from . import store

log = structlog.get_logger()
_entry = msgspec.json.Decoder(LogEntry)


class Indexer:
    def __init__(self, rt: Runtime, pool, embedder) -> None:
        self.rt = rt
        self.pool = pool
        self.embedder = embedder
        self.batch = rt.settings.l3_batch
        self._floor = 0  # last known: every log message <= this is in Postgres

    async def run(self) -> None:
        psub = await self.rt.js.pull_subscribe(
            subjects.LOG_ALL, durable=subjects.L3_CONSUMER, stream=subjects.STREAM,
            config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=60,
                                  deliver_policy=DeliverPolicy.ALL, max_ack_pending=20_000))
        log.info("indexer_started", consumer=subjects.L3_CONSUMER)
        while True:
            try:
                msgs = await psub.fetch(self.batch, timeout=1.0)
            except (NatsTimeout, asyncio.TimeoutError):  # fetch raises either when idle
                continue
            await self._index(msgs)

    async def _index(self, msgs) -> None:
        rows = []
        for msg in msgs:
            entry = _entry.decode(msg.data)
            rows.append(store.Row(seq=msg.metadata.sequence.stream, user_id=entry.user_id,
                                  msg_id=entry.msg_id, bot_id=entry.bot_id, role=entry.role,
                                  text=entry.text, ts=entry.ts))
        with tracer.start_as_current_span("index batch", attributes={"batch": len(rows)}):
            vectors = await self.embedder.embed([r.text for r in rows], input_type="document")
            backoff = 0.1
            while True:
                try:
                    inserted = await store.upsert_batch(self.pool, rows, vectors,
                                                        self.embedder.model_id)
                    break
                except (OSError, store.TransientError) as exc:
                    log.warning("upsert_retry", error=str(exc), retry_in=backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
        for msg in msgs:
            await msg.ack()
        log.debug("indexed", batch=len(rows), inserted=inserted)

    async def applied_through(self, seq: int, wait_s: float) -> bool:
        """True once every log message up to `seq` is stored (waits up to `wait_s`)."""
        if seq <= self._floor:
            return True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while True:
            self._floor = await self._consumer_floor()
            if seq <= self._floor or loop.time() >= deadline:
                return seq <= self._floor
            await asyncio.sleep(0.02)

    async def _consumer_floor(self) -> int:
        info = await self.rt.js.consumer_info(subjects.STREAM, subjects.L3_CONSUMER)
        if info.num_pending == 0 and info.num_ack_pending == 0:
            return await stream.last_seq(self.rt.js)  # nothing outstanding: the whole log is in
        return info.ack_floor.stream_seq
