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
import heapq
import itertools

import msgspec
import structlog
from nats.js.api import ConsumerConfig, DeliverPolicy
from redis.exceptions import RedisError

from shared import stream, subjects
from shared.contract import Changed, LogEntry, Message, encode
from shared.service import Runtime
from shared.telemetry import tracer

from .redis_window import RedisWindow

log = structlog.get_logger()
_entry = msgspec.json.Decoder(LogEntry)
MAX_BATCH = 512
_REPAIR = object()  # queued to wake the consumer for pending repairs


def _stream_seq(reply: str) -> int:
    """A delivered message's stream sequence, read from its ack subject.

    `$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<ts>.<pending>`,
    or with `<domain>.<account hash>` after `ACK` (and a token at the end) on
    newer servers. `msg.metadata` parses the same subject into dataclasses and a
    datetime, ~3 % of the gateway's CPU under an append load.
    """
    tokens = reply.split(".")
    return int(tokens[5] if len(tokens) == 9 else tokens[7])


def _settle(fut: asyncio.Future, applied: bool) -> None:
    if not fut.done():
        fut.set_result(applied)


class RedisLost(Exception):
    """Redis lost the applied position: its windows cannot be trusted."""


class Applier:
    def __init__(self, rt: Runtime, window: RedisWindow) -> None:
        self.rt = rt
        self.window = window
        self.position = 0  # every log message <= position is applied by us
        self._waiters: list[tuple[int, int, asyncio.Future]] = []  # heap by seq
        self._waiter_ids = itertools.count()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._repairs: dict[str, asyncio.Future] = {}

    async def repair(self, user_id: str, timeout: float) -> bool:
        """Rebuild the user's window from the log, between two applied batches.

        Done by the applier itself so that no batch is applied while the
        window is replaced: the log as of `position` is exactly what Redis
        must hold. False if it did not happen within `timeout`.
        """
        fut = self._repairs.get(user_id)
        if fut is None:
            fut = self._repairs[user_id] = asyncio.get_running_loop().create_future()
            self._queue.put_nowait(_REPAIR)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except asyncio.TimeoutError:
            return False

    async def wait_applied(self, seq: int, timeout: float) -> bool:
        """Wait until the message at `seq` is in Redis; False if that took too long.

        Every append waits here, so it is a bare future and a timer rather than
        `wait_for(shield(...))`: the future's result says which came first.
        """
        if seq <= self.position:
            return True
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        heapq.heappush(self._waiters, (seq, next(self._waiter_ids), fut))
        timer = loop.call_later(timeout, _settle, fut, False)
        try:
            return await fut
        finally:
            timer.cancel()

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
                    subjects.LOG_ALL, stream=subjects.STREAM, ordered_consumer=True, cb=queue.put,
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
                if msg is _REPAIR:
                    continue
                seq = _stream_seq(msg.reply)
                if seq <= self.position:
                    continue  # redelivered after a consumer reset
                entry = _entry.decode(msg.data)
                items.append((entry.user_id, entry.at(seq)))
            if items:
                await self._apply(items)
            if self._repairs:
                await self._run_repairs()

    async def _run_repairs(self) -> None:
        repairs, self._repairs = self._repairs, {}
        for user_id, fut in repairs.items():
            try:
                log_ = [m for m in await stream.user_log(self.rt.nc, user_id)
                        if m.seq <= self.position]
                done = await self.window.rebuild(
                    user_id, [m.entry.at(m.seq) for m in log_[-self.window.window:]], len(log_))
                log.info("l2_window_repaired", user_id=user_id, messages=len(log_), done=done)
                _settle(fut, done)
            except Exception as exc:  # noqa: BLE001 - a failed repair must not stop applying
                log.error("l2_window_repair_failed", user_id=user_id, error=str(exc))
                _settle(fut, False)

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
        waiters = self._waiters
        while waiters and waiters[0][0] <= self.position:
            _settle(heapq.heappop(waiters)[2], True)

    async def _wipe(self) -> None:
        """Drop every tiermem key so the replay from seq 1 rebuilds clean windows."""
        async for key in self.window.redis.scan_iter(match="tm:*", count=1000):
            await self.window.redis.delete(key)
        self.position = 0
