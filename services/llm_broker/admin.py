"""Operators' view of the LLM cache: `llm.admin.lookup`, `.delete`, `.flush`, `.explain`.

Only the admin identity (and the llm-gateway, which serves them over HTTP to
holders of its admin token) may publish these subjects (`shared.permissions`).

Each operation goes through the broker's own code, so what it shows is what a
request gets: lookups read the exact tier with `ResponseCache.lookup` (under
the key epoch in force), `explain` keys the request with `policy` and judges
candidates with the guard at the partition's current threshold and with the
same staleness check as a hit. `explain` never calls the model and stores
nothing; like any request, its exact lookup may notice a wiped Redis and move
the key epoch, which is the broker's state, not an entry.
"""

from __future__ import annotations

import structlog

from shared import subjects
from shared.contract import (
    AdminCandidate, AdminDeleteReply, AdminEntry, AdminEntryRequest, AdminExplainReply,
    AdminFlushReply, AdminFlushRequest, CompleteRequest, GuardVerdict, check_complete,
)
from shared.errors import BadRequest, NotFound

from . import guard
from .cache import STORE_ERRORS, stores_down
from .policy import Entry, check_request, exact_key, latest_user_text, partition_key, uncacheable

log = structlog.get_logger()


class Admin:
    def __init__(self, broker) -> None:
        self.broker = broker
        self.cache = broker.cache

    async def lookup(self, req: AdminEntryRequest) -> AdminEntry:
        now = self.broker.clock()
        try:
            exact = await self._read_exact(req.entry_id, now)
            semantic = await self.cache.semantic_entry(req.entry_id)
        except STORE_ERRORS as exc:
            raise stores_down(exc) from None
        entry = exact or semantic
        if entry is None:
            raise NotFound(f"no cached entry {req.entry_id!r} (expired and collected, "
                           f"deleted, or never stored)")
        tiers = [name for name, e in (("exact", exact), ("semantic", semantic)) if e is not None]
        return view(entry, now, tiers)

    async def delete(self, req: AdminEntryRequest) -> AdminDeleteReply:
        """Both tiers. The lookup first makes sure the exact key is read under the key
        epoch in force (a broker that has served nothing yet has not read it)."""
        try:
            await self._read_exact(req.entry_id, self.broker.clock())
            deleted = await self.cache.evict_id(req.entry_id)
        except STORE_ERRORS as exc:
            raise stores_down(exc) from None
        log.warning("llm_admin_deleted", entry_id=req.entry_id, deleted=deleted)
        return AdminDeleteReply(entry_id=req.entry_id, deleted=deleted)

    async def flush(self, req: AdminFlushRequest) -> AdminFlushReply:
        given = [n for n in ("partition", "namespace", "user_id") if getattr(req, n) is not None]
        if len(given) != 1:
            raise BadRequest("give exactly one of partition, namespace or user_id")
        try:
            if req.partition is not None:
                deleted = await self.cache.flush_partition(req.partition)
            elif req.namespace is not None:
                deleted = await self.cache.flush_namespace(req.namespace)
            else:  # as a forget does: an answer in flight for the user is not stored after it
                deleted = await self.cache.forget(req.user_id, self.broker.clock())
        except STORE_ERRORS as exc:
            raise stores_down(exc) from None
        log.warning("llm_admin_flushed", partition=req.partition, namespace=req.namespace,
                    user_id=req.user_id, deleted=deleted)
        return AdminFlushReply(deleted=deleted, partition=req.partition,
                               namespace=req.namespace, user_id=req.user_id)

    async def explain(self, req: CompleteRequest) -> AdminExplainReply:
        """What `Broker.complete` would do with `req` now, step by step in its order."""
        b = self.broker
        check_request(b.config, req)  # a request the broker refuses is refused here too (400)
        check_complete(req, b.max_prompt_chars)
        opts = req.cache
        bypass = "mode_off" if opts.mode == "off" else uncacheable(req)
        if bypass is not None:
            return AdminExplainReply(decision="bypass", reason=bypass)
        partition = partition_key(req)
        key = exact_key(partition, req)
        now = b.clock()
        invalidating = opts.volatility in b.invalidating
        entry, fence = await b._exact(key, now, req.user_id if invalidating else None)
        out = AdminExplainReply(decision="miss", partition=partition, exact_key=key,
                                would_store=opts.store)
        if fence is None:
            out.reason = "exact_tier_unavailable"
        if entry is not None:
            out.exact = view(entry, now, ["exact"])
            out.exact_refused = await self._refused(entry, fence, opts.max_age_s, now)
        if opts.refresh:
            out.reason = "refresh"
            return out
        if entry is not None and out.exact_refused is None:
            out.decision, out.entry_id = "hit_exact", entry.id
            return out
        if opts.mode != "semantic" or not req.plain_text():
            return out
        out.semantic = True
        query = latest_user_text(req)
        vector = (await b.embedder.embed([query], input_type="query"))[0]
        try:
            candidates = await self.cache.nearest(partition, vector, now)
        except STORE_ERRORS as exc:
            log.warning("semantic_tier_unavailable", error=str(exc) or type(exc).__name__)
            out.reason = "semantic_tier_unavailable"
            return out
        out.threshold = b.thresholds.get(partition)
        for cand in candidates:
            verdict = guard.decide(query, cand.entry.query, cand.similarity,
                                   threshold=out.threshold, space=b.embedder.model_id)
            refused = (await self._refused(cand.entry, fence, opts.max_age_s, now)
                       if verdict.serve else None)
            out.candidates.append(AdminCandidate(
                entry_id=cand.entry.id, query=cand.entry.query,
                similarity=round(cand.similarity, 4), refused=refused,
                guard=GuardVerdict(serve=verdict.serve, reason=verdict.reason,
                                   score=round(verdict.score, 4))))
            if verdict.serve and refused is None and out.entry_id is None:
                out.decision, out.entry_id = "hit_semantic", cand.entry.id
        return out

    async def _read_exact(self, entry_id: str, now: float) -> Entry | None:
        """The exact tier's entry (expired or not) under the key epoch in force; a read
        that found Redis wiped or rolled back distrusts as a request's would."""
        entry, fence = await self.cache.lookup(entry_id, None, now)
        if fence.distrusted:
            self.broker.distrust(fence.distrusted)
        return entry

    async def _refused(self, entry: Entry, fence, max_age_s: float | None,
                       now: float) -> str | None:
        """Why a hit on `entry` would still be refused (None: it would be served)."""
        if not entry.fresh(now):
            return "expired"
        if max_age_s is not None and entry.age(now) > max_age_s:
            return "too_old"
        return await self.broker.stale_reason(entry, fence)


def view(entry: Entry, now: float, tiers: list[str]) -> AdminEntry:
    return AdminEntry(
        entry_id=entry.id, partition=entry.partition, user_id=entry.user_id,
        namespace=entry.namespace, task=entry.task, model=entry.model,
        volatility=entry.volatility, query=entry.query, text=entry.text,
        stop_reason=entry.stop_reason, usage=entry.usage, cost_usd=entry.cost_usd,
        created_at=entry.created_at, age_s=round(entry.age(now), 3),
        expires_at=entry.expires_at, ttl_left_s=round(entry.expires_at - now, 3),
        fresh=entry.fresh(now), tiers=tiers)


def register(rt, broker) -> Admin:
    admin = Admin(broker)
    rt.endpoint("admin_lookup", subjects.LLM_ADMIN_LOOKUP, AdminEntryRequest, admin.lookup)
    rt.endpoint("admin_delete", subjects.LLM_ADMIN_DELETE, AdminEntryRequest, admin.delete)
    rt.endpoint("admin_flush", subjects.LLM_ADMIN_FLUSH, AdminFlushRequest, admin.flush)
    rt.endpoint("admin_explain", subjects.LLM_ADMIN_EXPLAIN, CompleteRequest, admin.explain,
                concurrency=8)
    return admin
