"""Deletes from L3 what retention dropped from the log (`shared.retention`).

Why: the stream forgets old messages on its own (`max_age`,
`max_msgs_per_subject`), but Postgres kept every row it was ever given, so
L3 grew without bound and answered with messages the log no longer held.
Every `RETAIN_SWEEP_S` this deletes

- by age: rows below the log's first seq. Age drops the log's oldest
  messages first, so every message below it is gone (by age, count or
  forget); the rows above it are within the age limit.
- by count: rows beyond their user's newest `RETAIN_MAX_PER_USER`, as the
  stream keeps per subject (one subject per user).

Summaries that stand for a swept message go with it (`summaries.retire`);
the next one is made from the oldest messages still held.

In batches of `SWEEP_BATCH` rows, each one short transaction under its
users' locks (`l3.retire`), so the indexer's batches wait little behind it
and a first sweep over a large history does not hold Postgres for long.
A deleted row does not come back: a redelivery from the log is of a message
the log still holds, which is newer than any row swept.
"""

from __future__ import annotations

import asyncio

import structlog
from nats.errors import Error as NatsError, TimeoutError as NatsTimeout
from nats.js import JetStreamContext

from shared import metrics, subjects
from shared.retention import Retention

from . import store, summaries

log = structlog.get_logger()
SWEEP_BATCH = 1000
TIER = "l3"


class Sweeper:
    def __init__(self, js: JetStreamContext, pool, retention: Retention, every_s: float,
                 batch: int = SWEEP_BATCH) -> None:
        self.js = js
        self.pool = pool
        self.retention = retention
        self.every_s = every_s
        self.batch = batch
        self._deleted = {r: metrics.retention_deleted.labels(TIER, r) for r in ("age", "count")}

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.every_s)
            try:
                await self.sweep()
            except (store.TransientError, NatsError, NatsTimeout, asyncio.TimeoutError) as exc:
                log.warning("retention_sweep_failed", error=str(exc) or repr(exc),
                            retry_in=self.every_s)

    async def sweep(self) -> dict[str, int]:
        """One sweep to the end; returns the rows deleted by reason."""
        deleted = {}
        if self.retention.max_age_s:
            first = (await self.js.stream_info(subjects.STREAM)).state.first_seq
            deleted["age"] = await self._drain("age", store.retire_older, first)
        if self.retention.max_per_user:
            deleted["count"] = await self._drain("count", store.retire_beyond,
                                                 self.retention.max_per_user)
        if any(deleted.values()):
            deleted["summaries"] = await summaries.retire(self.pool)
            log.info("retention_swept", tier=TIER, **deleted)
        return deleted

    async def _drain(self, reason: str, retire, limit: int) -> int:
        total = 0
        while True:
            n = await retire(self.pool, limit, self.batch)
            total += n
            self._deleted[reason].inc(n)
            if n < self.batch:
                return total
            await asyncio.sleep(0)  # let reads and the indexer in between batches
