"""Applies the durable log to Redis, in order, and tells the other tiers.

Every gateway replica reads the whole stream with an ordered consumer starting
after Redis's `tm:applied` position, applies messages in batches (one
pipelined round trip per batch), advances the position, broadcasts
`memory.changed.<user>` for each message it was first to apply, and wakes the
appends waiting for their message to reach Redis.

Redis down: the batch is retried with backoff, the stream keeps everything,
nothing is skipped; appends still succeed (they stop waiting after a bound).
Redis restarted empty (the position key vanished under us): the tier's data
cannot be trusted, so it is wiped and rebuilt from the start of the log.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import msgspec
import structlog
from nats.js.api import ConsumerConfig, DeliverPolicy
from redis.exceptions import RedisError

from shared import subjects
from shared.contract import Changed, LogEntry, Message, encode
from shared.service import Runtime
from shared.telemetry import tracer

from .redis_window import RedisWindow

log = structlog.get_logger()
_entry = msgspec.json.Decoder(LogEntry)
MAX_BATCH = 512


class RedisLost(Exception):
    """Redis lost the applied position: its windows cannot be trusted."""


class Applier:
    def __init__(self, rt: Runtime, window: RedisWindow) -> None:
        self.rt = rt
        self.window = window
        self.position = 0  # every log message <= position is applied by us
        self._waiters: dict[int, asyncio.Future] = {}
        self._queue: asyncio.Queue = asyncio.Queue()

    async def wait_applied(self, seq: int, timeout: float) -> bool:
        """Wait until the message at `seq` is in Redis; False if that took too long."""
        if seq <= self.position:
            return True
        fut = self._waiters.get(seq)
        if fut is None:
            fut = self._waiters[seq] = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def run(self) -> None:
        backoff = 0.1
        while True:
            sub = None
            try:
                start = await self.window.position() or 0
                self.position = start
                self._queue = asyncio.Queue()
                queue = self._queue
                sub = await self.rt.js.subscribe(
                    subjects.LOG_ALL, ordered_consumer=True, cb=queue.put,
                    config=ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                                          opt_start_seq=start + 1))
                log.info("applier_started", from_seq=start + 1)
                backoff = 0.1
                await self._consume(queue)
            except RedisLost:
                log.error("redis_lost_state_rebuilding_from_log", position=self.position)
                await self._wipe()
            except (RedisError, OSError) as exc:
                log.warning("applier_redis_unavailable", error=str(exc), retry_in=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            finally:
                if sub is not None:
                    try:
                        await sub.unsubscribe()
                    except Exception:
                        pass

    async def _consume(self, queue: asyncio.Queue) -> None:
        while True:
            batch = [await queue.get()]
            while len(batch) < MAX_BATCH and not queue.empty():
                batch.append(queue.get_nowait())
            items = []
            for msg in batch:
                seq = msg.metadata.sequence.stream
                if seq <= self.position:
                    continue  # redelivered after a consumer reset
                entry = _entry.decode(msg.data)
                items.append((entry.user_id, entry.at(seq)))
            if items:
                await self._apply(items)

    async def _apply(self, items: list[tuple[str, Message]]) -> None:
        backoff = 0.05
        while True:
            try:
                with tracer.start_as_current_span("redis apply", attributes={"batch": len(items)}):
                    results, prev = await self.window.apply_batch(items)
                break
            except (RedisError, OSError) as exc:
                log.warning("apply_retry", error=str(exc), retry_in=backoff, batch=len(items))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
        if prev is None and self.position > 0:
            raise RedisLost()
        self.position = items[-1][1].seq
        for (user_id, msg), (applied, prev_seq, count) in zip(items, results):
            if applied:
                event = Changed(op="append", user_id=user_id, seq=msg.seq,
                                prev_seq=int(prev_seq), count=int(count), message=msg)
                await self.rt.nc.publish(subjects.changed_subject(user_id), encode(event))
        self._wake()

    def _wake(self) -> None:
        done = [s for s in self._waiters if s <= self.position]
        for seq in done:
            fut = self._waiters.pop(seq)
            if not fut.done():
                fut.set_result(None)

    async def _wipe(self) -> None:
        """Drop every tiermem key so the replay from seq 1 rebuilds clean windows."""
        async for key in self.window.redis.scan_iter(match="tm:*", count=1000):
            await self.window.redis.delete(key)
        self.position = 0
