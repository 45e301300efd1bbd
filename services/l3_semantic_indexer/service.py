"""l3-semantic-indexer: the full history in Postgres + pgvector.

Runs the indexer (durable log -> embeddings -> Postgres) and answers
`memory.l3.get`: `recent` for any n, `search` (top-k by meaning, with a
score) and `context` (the parts of a context below a recent window: the
newest rolling summary, made in the background by summaries.py, and the
messages that match the query). L3 is the last tier: when asked for a `min_seq` it has not indexed
yet it waits a bounded time, then answers 503 rather than a stale reply.
A read without `min_seq` is held to the same rule for what the log has
held for half the audit grace (`shared.log_head`): an indexer that lags
that far makes L3 wait, then say 503, not answer without those messages.
"Full history" is what the log's retention keeps: the sweeper deletes the
rest.

A reply covers only rows at or below the indexers' floor (floor.py), and its
`seq` is at most that floor: replicas commit out of order, so a user's newer
row may be in Postgres while an older one is still in another replica's
batch, and memory-l1 installs a reply's `seq` as "complete up to here".
"""

from __future__ import annotations

import msgspec

from shared import metrics, stream, subjects
from shared.contract import (
    ContextParts, ForgetReply, GetReply, GetRequest, L3ForgetRequest, Message, check_get, encode, fit_reply,
)
from shared.embeddings import embedder_from_settings
from shared.errors import BadRequest, PayloadTooLarge, Unavailable
from shared.log_head import LogHead
from shared.retention import Retention
from shared.served import Served
from shared.service import Runtime
from shared.telemetry import tracer

from . import store, summaries
from .indexer import Indexer
from .sweeper import Sweeper

TIER = "l3"


async def build(rt: Runtime, *, before_commit=None) -> None:
    """Wire the indexer and the endpoints (`before_commit`: see `Indexer`; tests only)."""
    settings = rt.settings
    embedder = embedder_from_settings(settings)
    rt.on_close(embedder.aclose)
    # create_pool migrates first: connections can register the vector codec only after that.
    pool = await store.create_pool(settings.database_url, model_id=embedder.model_id,
                                   dim=embedder.dim)
    rt.on_close(pool.close)
    rt.ready_check("postgres", lambda: pool.fetchval("SELECT 1"))
    await stream.wait_for_stream(rt.js)
    await stream.ensure_dead_letter_stream(rt.js, settings.stream_replicas)
    indexer = Indexer(rt, pool, embedder, before_commit=before_commit)
    if settings.summary_block > 0:
        summarizer = summaries.Summarizer(rt, pool, indexer.floor, block=settings.summary_block,
                                          keep=settings.summary_keep, model=settings.summary_model)
        indexer.on_indexed = summarizer.note
        rt.spawn(summarizer.run(), "summarizer")
    rt.spawn(indexer.run(), "indexer")
    retention = Retention.from_settings(settings)
    if retention.drops_anything():
        rt.spawn(Sweeper(rt.js, pool, retention, settings.retain_sweep_s).run(), "retention-sweeper")
    rt.spawn(indexer.floor.watch(), "floor-watcher")
    head = LogHead(settings.audit_grace_s / 2)
    rt.spawn(head.watch(rt.js), "log-head")
    served = Served.from_settings(rt.nc, "l3-semantic-indexer", settings)
    rt.spawn(served.run(), "served-records")

    tier = L3Tier(rt, pool, embedder, indexer, head, served)
    rt.endpoint("get", subjects.MEMORY_L3_GET, GetRequest, tier.get, concurrency=32)
    rt.endpoint("forget", subjects.MEMORY_L3_FORGET, L3ForgetRequest, tier.forget, concurrency=8)


class L3Tier:
    """The L3 tier's request handlers, over the parts `build` wires together."""

    def __init__(self, rt: Runtime, pool, embedder, indexer: Indexer, head: LogHead,
                 served: Served) -> None:
        self.rt = rt
        self.settings = rt.settings
        self.pool = pool
        self.embedder = embedder
        self.indexer = indexer
        self.head = head
        self.served = served

    async def read(self, req: GetRequest, vector, upto: int) -> tuple[list[Message], int]:
        """The rows at or below seq `upto` that answer `req`, and the user's newest seq."""
        if req.op == "search":
            with tracer.start_as_current_span("postgres search", attributes={"db.system": "postgresql"}):
                return await store.search(self.pool, req.user_id, req.query, vector, req.k,
                                          self.embedder.model_id, floor=upto)
        with tracer.start_as_current_span("postgres recent", attributes={"db.system": "postgresql"}):
            return await store.recent(self.pool, req.user_id, req.n, floor=upto)

    async def reach(self, seq: int, why: str) -> bool:
        """Wait (bounded) until the floor covers `seq`; a span when it has to wait, so a
        slow trace shows time spent behind the indexer, not in Postgres."""
        if seq <= self.indexer.floor.value:
            return True
        with tracer.start_as_current_span("wait for indexer", attributes={"why": why, "seq": seq}):
            return await self.indexer.floor.reach(seq, self.settings.l3_min_seq_wait_s)

    async def get(self, req: GetRequest) -> msgspec.Raw:
        check_get(req)
        floor = self.indexer.floor
        if req.min_seq is not None and not await self.reach(req.min_seq, "min_seq"):
            raise Unavailable(f"L3 has not indexed up to seq {req.min_seq} yet; retry shortly")
        due = self.head.due()
        if not await self.reach(due, "log_head"):
            raise Unavailable(f"L3's indexing lags the log (indexed up to seq {floor.value}, "
                              f"the log held {due} {self.head.lag_s:g} s ago); retry shortly")
        vector = None
        if req.query is not None and req.op != "recent":
            with tracer.start_as_current_span("embed query",
                                              attributes={"model": self.embedder.model_id}):
                vector = (await self.embedder.embed([req.query], input_type="query"))[0]
        upto = floor.value
        if req.op == "context":
            return await self.parts(req, vector, upto)
        messages, newest = await self.read(req, vector, upto)
        # The user has rows above the floor this process knows: learn the floor now, and if
        # some of those rows are still not provably complete, claim only what is.
        if newest > upto and (fresh := await self.read_floor()) > upto:
            upto = fresh
            messages, newest = await self.read(req, vector, upto)
        seq = newest if newest <= upto else await store.newest_upto(self.pool, req.user_id, upto)
        reply = fit_reply(GetReply(user_id=req.user_id, tier=TIER, seq=seq, messages=messages),
                          req.op, self.rt.nc.max_payload)
        metrics.answers.labels(TIER, req.op).inc()
        self.served.memory(TIER, req.user_id, req.op, req.k if req.op == "search" else req.n,
                           req.min_seq, seq, messages)
        return reply

    async def read_floor(self) -> int:
        with tracer.start_as_current_span("read floor"):
            return await self.indexer.floor.fresh()

    async def parts(self, req: GetRequest, vector, upto: int) -> msgspec.Raw:
        """L3's share of a context: below the caller's window, the newest summary and
        the messages that best match the query (none without one)."""
        below = upto if req.before_seq is None else min(upto, req.before_seq - 1)
        relevant: list[Message] = []
        with tracer.start_as_current_span("postgres context", attributes={"db.system": "postgresql"}):
            summary = await summaries.latest(self.pool, req.user_id, below)
            if vector is not None and below > 0:
                relevant, _ = await store.search(self.pool, req.user_id, req.query, vector,
                                                 req.k, self.embedder.model_id, floor=below)
            seq = await store.newest_upto(self.pool, req.user_id, upto)
        metrics.answers.labels(TIER, req.op).inc()
        body = encode(ContextParts(req.user_id, seq, summary, relevant))
        if len(body) > self.rt.nc.max_payload:
            raise PayloadTooLarge(f"the context parts are {len(body)} bytes, over max_payload "
                                  f"{self.rt.nc.max_payload}; ask for fewer relevant messages (k)")
        return msgspec.Raw(body)

    async def forget(self, req: L3ForgetRequest) -> ForgetReply:
        # The tombstone would also void messages not yet written: a forged or confused
        # upto_seq beyond the log must not delete a user's future.
        last = await stream.last_seq(self.rt.js)
        if req.upto_seq > last:
            raise BadRequest(f"upto_seq {req.upto_seq} is beyond the log's last seq {last}; "
                             "nothing was deleted")
        deleted = await store.forget(self.pool, req.user_id, req.upto_seq)
        return ForgetReply(user_id=req.user_id, deleted=deleted)
