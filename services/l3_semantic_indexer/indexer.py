"""Consumes the durable log into Postgres: embed in batches, upsert, then ack.

A durable pull consumer shared by every indexer replica delivers each message
at least once; the upsert is idempotent on (user_id, msg_id), and a message is
acknowledged only after its row is committed, so a crash at any point loses
nothing and duplicates nothing.

`floor` (floor.Floor) answers "has L3 stored every message up to seq N?"
from the consumer's ack floor, which is what `min_seq` needs across replicas.

Poison. A message the gateway did not write (undecodable, or on another
user's subject than its `user_id`'s) would fail its batch on every
redelivery and the indexer would crash-loop behind it, or index one user's
text as another's. It is copied to `memory.deadletter.l3-semantic-indexer`
(kept by the stream `MEMORY_DEAD`), acknowledged, counted and logged, and
the batch goes on without it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime

import msgspec
import structlog
from nats.errors import NoRespondersError, TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from shared import metrics, stream, subjects
from shared.contract import LogEntry
from shared.ids import is_valid_id
from shared.service import Runtime
from shared.telemetry import tracer

from . import store
from .floor import Floor

log = structlog.get_logger()
_entry = msgspec.json.Decoder(LogEntry)
UNDECODABLE = "undecodable"
SUBJECT_MISMATCH = "subject_mismatch"


class Poison(Exception):
    """A log message the indexer cannot store; `reason` is one of the two above."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def to_row(subject: str, seq: int, data: bytes) -> store.Row:
    """The row a log message becomes, or Poison if it is not one the gateway wrote."""
    try:
        entry = _entry.decode(data)
        ts = datetime.fromisoformat(entry.ts)
        for text in (entry.msg_id, entry.bot_id, entry.role, entry.text):
            text.encode("utf-8")  # a JSON-escaped lone surrogate: Postgres would refuse the batch
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
        raise Poison(UNDECODABLE, str(exc)) from None
    if not is_valid_id(entry.user_id) or subject != subjects.log_subject(entry.user_id):
        raise Poison(SUBJECT_MISMATCH, f"user_id {entry.user_id!r} does not own {subject}")
    return store.Row(seq=seq, user_id=entry.user_id, msg_id=entry.msg_id, bot_id=entry.bot_id,
                     role=entry.role, text=entry.text, ts=ts)


# How long a batch delivered to an indexer that died stays unacknowledged before another
# gets it: every later message's L3 read (with min_seq) waits on it, so short; an indexer
# whose batch takes longer (Postgres down, retrying) says so with `in_progress`.
ACK_WAIT_S = 10


async def subscribe(js):
    """The indexers' shared durable pull consumer of the whole log."""
    return await js.pull_subscribe(
        subjects.LOG_ALL, durable=subjects.L3_CONSUMER, stream=subjects.STREAM,
        config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=ACK_WAIT_S,
                              deliver_policy=DeliverPolicy.ALL, max_ack_pending=20_000))


class Indexer:
    """`before_commit`, if given, is awaited with each batch's rows before they are
    committed (tests slow one replica down with it)."""

    def __init__(self, rt: Runtime, pool, embedder, *,
                 before_commit: Callable[[Sequence[store.Row]], Awaitable[None]] | None = None) -> None:
        self.rt = rt
        self.pool = pool
        self.embedder = embedder
        self.batch = rt.settings.l3_batch
        self.floor = Floor(lambda: stream.last_seq(rt.js),
                           lambda: rt.js.consumer_info(subjects.STREAM, subjects.L3_CONSUMER))
        self._before_commit = before_commit
        self.on_indexed: Callable[[set[str]], None] | None = None  # the users of each committed batch
        self._dead = {r: metrics.dead_lettered.labels(subjects.L3_CONSUMER, r)
                      for r in (UNDECODABLE, SUBJECT_MISMATCH)}

    async def run(self) -> None:
        psub = await subscribe(self.rt.js)
        log.info("indexer_started", consumer=subjects.L3_CONSUMER)
        while True:
            try:
                msgs = await psub.fetch(self.batch, timeout=1.0)
            except (NatsTimeout, asyncio.TimeoutError):  # fetch raises either when idle
                continue
            await self._index(msgs)

    async def _index(self, msgs) -> None:
        rows, good = [], []
        for msg in msgs:
            seq = msg.metadata.sequence.stream
            try:
                rows.append(to_row(msg.subject, seq, msg.data))
                good.append(msg)
            except Poison as bad:
                await self._dead_letter(msg, seq, bad)
        if not rows:
            return
        with tracer.start_as_current_span("index batch", attributes={"batch": len(rows)}):
            vectors = await self.embedder.embed([r.text for r in rows], input_type="document")
            if self._before_commit is not None:
                await self._before_commit(rows)
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
                    for msg in good:  # still ours: not redelivered to another replica meanwhile
                        await msg.in_progress()
        for msg in good[:-1]:
            await msg.ack()
        # The last ack waits for the server's reply: acks are processed in order, so the
        # floor read that follows (`nudge`) sees the whole batch acknowledged.
        try:
            await good[-1].ack_sync(timeout=self.rt.settings.request_timeout_s)
        except (NatsTimeout, NoRespondersError, asyncio.TimeoutError):
            log.debug("ack_unconfirmed", seq=good[-1].metadata.sequence.stream)
        self.floor.nudge()
        log.debug("indexed", batch=len(rows), inserted=inserted)
        if self.on_indexed is not None:
            self.on_indexed({r.user_id for r in rows})

    async def _dead_letter(self, msg, seq: int, bad: Poison) -> None:
        """Keep `msg` in the dead-letter stream, then take it off the log's consumer.

        If the dead-letter stream does not take it, it is not acknowledged
        either: redelivered after `ack_wait`, it is tried again.
        """
        try:
            await stream.dead_letter(self.rt.request_msg, subjects.L3_CONSUMER, msg.subject, seq, msg.data,
                                     bad.reason, self.rt.settings.request_timeout_s)
        except Exception as exc:  # noqa: BLE001 - whatever it is, the message stays on the log
            log.error("dead_letter_failed", seq=seq, reason=bad.reason, error=repr(exc))
            return
        await msg.ack()
        self._dead[bad.reason].inc()
        log.error("log_message_dead_lettered", seq=seq, subject=msg.subject, reason=bad.reason,
                  detail=bad.detail)
