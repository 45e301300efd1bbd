"""Served records: what a tier or the llm-broker answered, for the freshness-auditor.

A tier calls `Served.memory(...)` or `Served.llm(...)` right after it decides
its answer. That call only appends a tuple to a list (about a microsecond,
no encoding, no I/O); a background task turns the list into one
`ServedBatch` message on `audit.served.<source>` every `served_flush_s`. So a
record costs the serving path nothing it waits for, and the auditor gets one
message per flush rather than one per request.

Bounded: at most `served_queue_max` records wait between flushes; beyond that
records are shed and counted (the batch's `dropped`, the
`tiermem_served_records_dropped` metric), never queued without limit.
`served_publish_rate` < 1 records only that share of answers (0: none).
Core NATS publishing is fire-and-forget: with no auditor running the batches
go nowhere, which is what auditing off means.
"""

from __future__ import annotations

import asyncio
import random
import time

import msgspec
import structlog
from opentelemetry import trace

from shared import metrics, subjects
from shared.contract import (
    CompleteRequest, Message, ServedBatch, ServedLLM, ServedMemory, encode, tool_calls,
)

log = structlog.get_logger()


class _Seq(msgspec.Struct):
    seq: int


_seq = msgspec.json.Decoder(_Seq)


def _seqs(messages: list) -> list[int]:
    """Seqs of a reply's messages: `Message`s, or their JSON as L2 keeps it."""
    return [m.seq if m.__class__ is Message else _seq.decode(m).seq for m in messages]


def _trace_ids() -> tuple[str, str]:
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return "", ""
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


class Served:
    """One per process; `start` it from the service's build (`rt.spawn`)."""

    def __init__(self, nc, source: str, *, rate: float = 1.0, flush_s: float = 0.05,
                 queue_max: int = 10_000, clock=time.time) -> None:
        self.nc = nc
        self.source = source
        self.subject = subjects.audit_served(source)
        self.rate = min(max(rate, 0.0), 1.0)
        self.flush_s = flush_s
        self.queue_max = queue_max
        self.clock = clock
        self._memory: list[tuple] = []
        self._llm: list[tuple] = []
        self._dropped = 0
        self._dropped_metric = metrics.served_dropped.labels(source)

    @classmethod
    def from_settings(cls, nc, source: str, settings) -> "Served":
        return cls(nc, source, rate=settings.served_publish_rate,
                   flush_s=settings.served_flush_s, queue_max=settings.served_queue_max)

    def _take(self) -> bool:
        if self.rate <= 0.0 or (self.rate < 1.0 and random.random() >= self.rate):
            return False
        if len(self._memory) + len(self._llm) >= self.queue_max:
            self._dropped += 1
            self._dropped_metric.inc()
            return False
        return True

    def memory(self, tier: str, user_id: str, op: str, n: int, min_seq: int | None, seq: int,
               messages: list, l1_id: str = "") -> None:
        """Record a `memory.get` answer (`messages` as replied: kept by reference)."""
        if self._take():
            self._memory.append((tier, user_id, op, n, min_seq, seq, messages, self.clock(),
                                 l1_id, *_trace_ids()))

    def llm(self, entry_id: str, partition: str, match: str, similarity: float, age_s: float,
            saved_usd: float, text: str, request: CompleteRequest, *,
            score: float | None = None, threshold: float | None = None,
            message: dict | None = None) -> None:
        """Record an llm-broker cache hit (`score`, `threshold`: the guard's, for a semantic one;
        `message`: the Message served, kept by reference, its tool calls read at the flush)."""
        if self._take():
            self._llm.append((entry_id, partition, match, similarity, age_s, saved_usd, text,
                              request, self.clock(), *_trace_ids(), score, threshold, message))

    def batch(self) -> ServedBatch | None:
        """Everything recorded since the last call, as one batch (None if nothing)."""
        if not (self._memory or self._llm or self._dropped):
            return None
        memory, llm, dropped = self._memory, self._llm, self._dropped
        self._memory, self._llm, self._dropped = [], [], 0
        return ServedBatch(
            source=self.source, dropped=dropped,
            memory=[ServedMemory(tier=t, user_id=u, op=op, n=n, min_seq=ms, seq=seq,
                                 seqs=_seqs(msgs), at=at, l1_id=l1, trace_id=tid, span_id=sid)
                    for t, u, op, n, ms, seq, msgs, at, l1, tid, sid in memory],
            llm=[ServedLLM(entry_id=e, partition=p, match=m, similarity=sim, age_s=age,
                           saved_usd=saved, text=text, request=req, at=at, trace_id=tid,
                           span_id=sid, score=score, threshold=threshold,
                           tool_calls=tool_calls(message))
                 for e, p, m, sim, age, saved, text, req, at, tid, sid, score, threshold, message
                 in llm])

    async def flush(self) -> None:
        batch = self.batch()
        if batch is not None:
            try:
                await self.nc.publish(self.subject, encode(batch))
            except Exception as exc:  # noqa: BLE001 - auditing must never break serving
                log.warning("served_batch_not_sent", error=str(exc),
                            records=len(batch.memory) + len(batch.llm))

    async def run(self) -> None:
        """Background loop: one batch per interval; the last one on the way out."""
        try:
            while True:
                await asyncio.sleep(self.flush_s)
                await self.flush()
        finally:
            await self.flush()
