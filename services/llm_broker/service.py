"""llm-broker: answers `llm.complete` from cache when, and only when, that is right.

Order of a request: validate (`policy.check_request`: the configured bounds and
the scope rule, then the prompt size; no upstream call for bad input) -> exact tier
(Redis) -> semantic tier (Postgres, inside the partition, every candidate
through the guard) -> single-flight upstream call -> store (only answers the
model finished, `policy.cacheable`). Hits never extend an entry's life.

`memory.changed` drives invalidation: a user's new message drops their entries
of invalidating classes; a forget drops all of them. Events are folded per
user and applied in batches (`changes`), so a burst never backs up the
subscription. Core NATS can still lose events (a reconnect, a slow consumer,
every broker down), so a hit of an invalidating class is also checked against
the user's newest message seq that the l2-gateway records, and against the
last time a broker found events lost (`policy.stale`), read in the exact
lookup's round trip.

Redis wiped or rolled back (`l2state`, judged from the l2-gateway's state read
in the same round trip): while the user seqs cannot be trusted (the state is
missing, replayed, older than one seen, or its applied position lags what the
log held half a grace ago), every invalidating hit, exact or semantic, is a
miss (`tiermem_llm_stale_refused_total{reason="redis_lost" | "rebuilding" |
"rolled_back" | "behind_log"}`); and the exact tier is dropped at once (a new
key epoch) with a distrust of every older invalidating entry
(`tiermem_llm_distrusts_total{cause="l2_epoch_changed" | "l2_rolled_back"}`),
so neither an entry of a forgotten user nor one invalidated after the snapshot
comes back with a rollback.

A store that is down or slow costs a request a miss, never a 500: a failed
lookup goes on to the model, a failed store still returns the answer paid for
(logged and counted); `llm.verdict` and `llm.stats`, which only the stores
can answer, get 503.

The gateway's forget job also asks `llm.forget` and retries until it is
answered: the event alone is core NATS and may be lost.
"""

from __future__ import annotations

import asyncio
import time

import msgspec
import structlog
from nats.aio.subscription import DEFAULT_SUB_PENDING_MSGS_LIMIT
from nats.errors import SlowConsumerError
from redis.asyncio import Redis

from shared import metrics, redis_client, subjects
from shared.contract import (
    CacheInfo, Changed, CompleteReply, CompleteRequest, CountTokensReply, CountTokensRequest,
    STREAM_HEADER, UPSTREAM_KEY_HEADER, ForgetReply, ForgetRequest, LLMStatsReply,
    LLMStatsRequest, LLMVerdict, LLMVerdictReply, PartitionBound, TextBlock, check_complete,
    decoder, encode,
)
from shared.embeddings import embedder_from_settings
from shared.errors import BadRequest, Unavailable
from shared.llm_config import Config
from shared.pricing import cost_usd
from shared.retention import Retention
from shared.served import Served
from shared.service import Runtime
from shared.settings import Settings
from shared.telemetry import tracer
from shared.upstream import Upstream, make_client

from . import admin, guard, stats, wordvec
from .thresholds import Thresholds
from .cache import STORE_ERRORS, Fence, ResponseCache, stores_down
from .changes import Batch, Pending
from .policy import (
    Entry, cacheable, check_request, exact_key, latest_user_text, new_entry, partition_key, stale,
    uncacheable, upstream_key_id,
)

log = structlog.get_logger()
_changed = decoder(Changed)
STATS_FLUSH_S = 0.5
DISTRUST_QUIET_S = 1.0  # a distrust this soon after the last one is neither logged nor counted
FORGET_CONCURRENCY = 8  # users forgotten at once (each a few round trips)
RETRY_MAX_S = 2.0  # the longest wait before re-applying a batch of changes that failed


class Broker:
    """The request path; `clock` is injectable so TTL tests never sleep."""

    def __init__(self, config: Config, cache: ResponseCache, upstream: Upstream, embedder,
                 redis: Redis, max_prompt_chars: int, clock=time.time,
                 served: Served | None = None) -> None:
        self.config = config
        self.cache = cache
        self.upstream = upstream
        self.embedder = embedder
        self.redis = redis
        self.max_prompt_chars = max_prompt_chars
        self.clock = clock
        self._flights: dict[str, asyncio.Future] = {}
        self.totals = stats.Totals()
        self.served = served
        wordvec.load()  # the guard's word table (~0.3 s, once a process): at start, not on a hit
        self.thresholds = Thresholds(redis, guard.default_threshold(embedder.model_id),
                                     config.max_false_hit_rate)
        metrics.llm_false_hit_bound.set(config.max_false_hit_rate)
        self.invalidating = frozenset(config.invalidating())
        self.pending = Pending()
        self.distrust_before = 0.0  # this broker's own, before every broker has read it
        self.events_sub = None  # the `memory.changed` subscription, once made
        self.publish = None  # NATS publish, for streaming a miss through (`_call`)

    async def complete_keyed(self, req: CompleteRequest, headers: dict) -> CompleteReply:
        """`llm.complete.keyed` (only the llm-gateway may publish it): answered with the
        caller's API key from the `Tiermem-Upstream-Key` header, in that key's partitions."""
        api_key = headers.get(UPSTREAM_KEY_HEADER)
        if not api_key:
            raise BadRequest(f"{subjects.LLM_COMPLETE_KEYED} needs the caller's API key in "
                             f"the {UPSTREAM_KEY_HEADER} header")
        return await self.complete(req, api_key)

    async def complete(self, req: CompleteRequest, api_key: str | None = None) -> CompleteReply:
        """`api_key`: the caller's, to call the model with (None: the broker's own); never
        logged, and present in the cache only as a digest in the partition."""
        volatility = check_request(self.config, req)
        check_complete(req, self.max_prompt_chars)
        labels = (req.model, self.config.task_label(req.task), self.config.bot_label(req.bot_id))
        opts = req.cache
        bypass = "mode_off" if opts.mode == "off" else uncacheable(req)
        if bypass is not None:
            if bypass != "mode_off":
                metrics.llm_uncacheable.labels(labels[1], bypass).inc()
                log.info("uncacheable_request", reason=bypass)
            answer, cost = await self._call(req, labels, api_key=api_key)
            return await self._reply(req, labels, answer.text, answer.stop_reason, answer.usage,
                                     cost, 0.0, CacheInfo(status="off", reason=bypass),
                                     "uncached", answer.message)
        partition = partition_key(req, upstream_key_id(api_key) if api_key else None)
        key = exact_key(partition, req)
        now = self.clock()
        invalidating = req.cache.volatility in self.invalidating
        entry, fence = await self._exact(key, now, req.user_id if invalidating else None)
        if opts.refresh:
            entry = None  # asked to refresh: the lookup only read what a store is checked against
        if (entry is not None and self._young(entry, opts.max_age_s, now, labels[1])
                and await self._current(entry, fence, labels[1])):
            return await self._hit(req, labels, entry, "exact", 1.0, now)
        vector = None
        if opts.mode == "semantic" and req.plain_text() and not req.prefilled():  # tools, images, a prefill: exact
            with tracer.start_as_current_span("embed query"):
                vector = (await self.embedder.embed([latest_user_text(req)], input_type="query"))[0]
            found = None if opts.refresh else await self._semantic(
                req, partition, vector, now, labels[1], fence)
            if found is not None:
                entry, similarity, score, threshold = found
                return await self._hit(req, labels, entry, "semantic", similarity, now,
                                       score=score, threshold=threshold)
        user_seq = (fence.user_seqs.get(req.user_id) or 0) if fence is not None else 0
        with_tools = bool(req.tools)
        for _ in range(3):  # a concurrent identical request's answer cut short is no hit to share:
            entry, cost, leader, stored = await self._single_flight(
                req, key, partition, volatility, vector, labels, user_seq, api_key)
            if leader or cacheable(entry.stop_reason, with_tools):
                break  # (it is not cached either: this request asks the model itself)
        if not leader:  # answered by a concurrent identical request's upstream call
            return await self._hit(req, labels, entry, "exact", 1.0, self.clock())
        info = CacheInfo(status="miss", entry_id=entry.id if stored else None, stored=stored,
                         reason="refresh" if opts.refresh else None)
        return await self._reply(req, labels, entry.text, entry.stop_reason, entry.usage, cost,
                                 0.0, info, "misses", entry.message)

    def _young(self, entry: Entry, max_age_s: float | None, now: float, task_label: str) -> bool:
        """Within the request's `max_age_s` (if it set one)?"""
        if max_age_s is None or entry.age(now) <= max_age_s:
            return True
        metrics.llm_too_old.labels(task_label).inc()
        return False

    async def _exact(self, key: str, now: float,
                     user_id: str | None) -> tuple[Entry | None, Fence | None]:
        """The exact entry if fresh, and what hits are checked against (the user seq of
        `user_id`, given for an invalidating class); None for both when Redis fails.
        A lookup that found Redis wiped or rolled back (`l2state`) distrusts here too."""
        try:
            with tracer.start_as_current_span("redis get", attributes={"db.system": "redis"}):
                entry, fence = await self.cache.lookup(key, user_id, now)
        except STORE_ERRORS as exc:
            log.warning("exact_tier_unavailable", error=str(exc))
            return None, None
        if fence.distrusted:
            self.distrust(fence.distrusted)
        return (entry if entry is not None and entry.fresh(now) else None), fence

    async def _current(self, entry: Entry, fence: Fence | None, task_label: str) -> bool:
        """May `entry` be served, as far as the user's newer messages go (`policy.stale`)?"""
        reason = await self.stale_reason(entry, fence)
        if reason is None:
            return True
        metrics.llm_stale_refused.labels(task_label, reason).inc()
        log.info("stale_hit_refused", reason=reason, entry_user_seq=entry.user_seq)
        return False

    async def stale_reason(self, entry: Entry, fence: Fence | None) -> str | None:
        """Why `entry` may not be served because the user spoke, or that cannot be
        checked (None: it may be); counts nothing (`llm.admin.explain` asks it too)."""
        if entry.volatility not in self.invalidating:
            return None
        reason = None
        if fence is None:
            reason = "unverifiable"  # Redis failed: nothing to check against
        elif fence.untrusted:
            reason = fence.untrusted  # Redis wiped, rolled back or behind: its user seqs may be old
        else:
            seqs = fence.user_seqs
            if entry.user_id not in seqs:  # a global entry another user's request created
                try:
                    seqs[entry.user_id] = await self.cache.user_seq(entry.user_id)
                except STORE_ERRORS as exc:
                    log.warning("user_seq_unavailable", error=str(exc))
                    reason = "unverifiable"
            if reason is None:
                reason = stale(entry, seqs.get(entry.user_id),
                               max(fence.distrust_before, self.distrust_before))
        return reason

    async def _semantic(self, req: CompleteRequest, partition: str, vector, now: float,
                        task_label: str, fence: Fence | None):
        with tracer.start_as_current_span("postgres nearest", attributes={"db.system": "postgresql"}):
            try:
                candidates = await self.cache.nearest(partition, vector, now)
            except STORE_ERRORS as exc:
                log.warning("semantic_tier_unavailable", error=str(exc) or type(exc).__name__)
                return None
        query = latest_user_text(req)
        threshold = self.thresholds.get(partition)
        for cand in candidates:
            verdict = guard.decide(query, cand.entry.query, cand.similarity,
                                   threshold=threshold, space=self.embedder.model_id)
            if verdict.serve and cand.entry.fresh(now):
                if not (self._young(cand.entry, req.cache.max_age_s, now, task_label)
                        and await self._current(cand.entry, fence, task_label)):
                    continue
                log.info("semantic_hit", similarity=round(cand.similarity, 4), reason=verdict.reason)
                return cand.entry, cand.similarity, verdict.score, threshold
            metrics.llm_refused.labels(task_label, verdict.reason).inc()
            log.info("semantic_refused", similarity=round(cand.similarity, 4), reason=verdict.reason)
        return None

    async def _single_flight(self, req, key, partition, volatility, vector, labels, user_seq,
                             api_key=None):
        """One upstream call per exact key at a time; followers share its entry."""
        flight = self._flights.get(key)
        if flight is not None:
            entry, cost = await asyncio.shield(flight)
            return entry, cost, False, False
        flight = self._flights[key] = asyncio.get_running_loop().create_future()
        try:
            started = self.clock()
            events: list[dict] = []
            answer, cost = await self._call(req, labels, events, api_key)
            entry = new_entry(req, partition, answer.text, answer.stop_reason, answer.usage, cost,
                              volatility, self.clock(), user_seq, answer.message)
            entry.events = events or None
            stored = False
            if req.cache.store:
                stored = await self._store(entry, vector, started, labels[1], bool(req.tools))
            flight.set_result((entry, cost))
            return entry, cost, True, stored
        except BaseException as exc:
            flight.set_exception(exc if isinstance(exc, Exception) else RuntimeError("cancelled"))
            flight.exception()  # retrieved, in case nobody waits
            raise
        finally:
            self._flights.pop(key, None)

    async def _store(self, entry: Entry, vector, started: float, task_label: str,
                     with_tools: bool) -> bool:
        """Cache a paid answer if the model finished it (`policy.cacheable`); a store
        failure only costs the cache. True if it was cached."""
        if not cacheable(entry.stop_reason, with_tools):
            metrics.llm_not_cached.labels(task_label, "unfinished").inc()
            log.info("not_cached_unfinished", stop_reason=entry.stop_reason)
            return False
        try:
            stored = await self.cache.put(entry, vector, computed_at=started,
                                          invalidating=entry.volatility in self.invalidating)
        except STORE_ERRORS as exc:
            metrics.llm_not_cached.labels(task_label, "store_failed").inc()
            log.warning("cache_store_failed", error=str(exc) or type(exc).__name__)
            return False
        log.info(stored, volatility=entry.volatility)
        return stored == "cached"

    async def _call(self, req: CompleteRequest, labels, record: list | None = None,
                    api_key: str | None = None):
        """The model's answer and its cost; streamed through to `req.stream_to` when the
        request asks, each event also appended to `record` (given for a miss: its events
        are kept; the header says which it is, `miss` or `bypass`)."""
        on_event = None
        if req.stream_to is not None and self.publish is not None:
            subject = req.stream_to
            headers = {STREAM_HEADER: "miss" if record is not None else "bypass"}

            async def on_event(data: dict) -> None:
                if record is not None:
                    record.append(data)
                await self.publish(subject, encode(data), headers=headers)

        answer = await self.upstream.complete(req, on_event, api_key)
        cost = cost_usd(self.config.price_of(req.model), answer.usage)
        for kind in ("input_tokens", "output_tokens", "cache_creation_input_tokens",
                     "cache_read_input_tokens"):
            metrics.llm_tokens.labels(*labels, kind).inc(getattr(answer.usage, kind))
        metrics.llm_cost.labels(*labels).inc(cost)
        return answer, cost

    async def _hit(self, req, labels, entry: Entry, match: str, similarity: float, now: float,
                   *, score: float | None = None, threshold: float | None = None):
        info = CacheInfo(status="hit", match=match, similarity=round(similarity, 4),
                         age_s=round(entry.age(now), 3), entry_id=entry.id)
        metrics.llm_saved.labels(*labels).inc(entry.cost_usd)
        if self.served is not None:
            self.served.llm(entry.id, entry.partition, match, similarity, info.age_s,
                            entry.cost_usd, entry.text, req, score=score, threshold=threshold,
                            message=entry.message)
        return await self._reply(req, labels, entry.text, entry.stop_reason, entry.usage,
                                 0.0, entry.cost_usd, info, f"hits_{match}", entry.message,
                                 entry.events if req.stream_to is not None else None)

    async def _reply(self, req, labels, text, stop_reason, usage, cost, saved, info, outcome,
                     message=None, events=None):
        metrics.llm_requests.labels(*labels, info.status, info.match or "").inc()
        paid = outcome in ("misses", "uncached")
        self.totals.add(outcome, usage if paid else None, cost, saved)
        (log.debug if info.status == "hit" else log.info)(
            "llm_answer", cache=info.status, match=info.match, similarity=info.similarity,
            task=req.task, model=req.model, cost_usd=cost, saved_usd=saved)
        return CompleteReply(text=text, content=[TextBlock(text=text)], model=req.model,
                             stop_reason=stop_reason, usage=usage, cost_usd=round(cost, 8),
                             saved_usd=round(saved, 8), cache=info, message=message,
                             events=events)

    async def count_tokens(self, req: CountTokensRequest, headers: dict) -> CountTokensReply:
        """`llm.count_tokens` (the HTTP drop-in's; internal, so only the gateway and admin
        publish it): asked upstream, for an allowed model, with the caller's API key when
        the `Tiermem-Upstream-Key` header carries one."""
        if req.model not in self.config.models:
            raise BadRequest(f"model {req.model!r} is not allowed; allowed: "
                             f"{', '.join(self.config.models)}")
        return CountTokensReply(input_tokens=await self.upstream.count_tokens(
            req, headers.get(UPSTREAM_KEY_HEADER) or None))

    async def verdict(self, v: LLMVerdict) -> LLMVerdictReply:
        """The auditor re-asked an audited hit: count it; a wrong one is evicted. A
        semantic one is evidence for its partition's false-hit bound (`thresholds`):
        it may tighten or loosen the partition's threshold."""
        try:
            evicted = False
            if v.wrong:
                evicted = await self.cache.evict_id(v.entry_id)
                log.warning("llm_wrong_hit_evicted", entry_id=v.entry_id, match=v.match)
            st = await self.thresholds.record(v.partition, v.wrong, tighten=v.match == "semantic",
                                              score=v.score, served_at=v.threshold)
        except STORE_ERRORS as exc:
            raise stores_down(exc) from None
        return LLMVerdictReply(evicted=evicted, threshold=st.threshold, bound=PartitionBound(
            threshold=st.threshold, level=st.level, checks=st.checks, wrong=st.wrong,
            false_hit_rate=round(st.wrong / st.checks, 6) if st.checks else 0.0,
            upper_bound=round(st.upper, 6), max_false_hit_rate=self.thresholds.max_false_hit_rate,
            moves=st.version))

    async def flush_stats(self, every_s: float = STATS_FLUSH_S) -> None:
        """Background loop: add the counted totals to Redis for `llm.stats`."""
        while True:
            await asyncio.sleep(every_s)
            await self.drain()

    async def drain(self) -> None:
        try:
            await self.totals.flush(self.redis)
        except STORE_ERRORS as exc:
            log.warning("stats_not_flushed", error=str(exc))

    async def read_stats(self, _req: LLMStatsRequest) -> LLMStatsReply:
        await self.drain()  # this replica's latest counts, then everyone's
        try:
            return await stats.read(self.redis)
        except STORE_ERRORS as exc:
            raise stores_down(exc) from None

    async def forget(self, req: ForgetRequest) -> ForgetReply:
        """`llm.forget`: drop every entry of the user; the reply confirms it to the gateway."""
        try:
            dropped = await self.cache.forget(req.user_id, self.clock())
        except STORE_ERRORS as exc:
            raise Unavailable(f"the LLM cache could not forget the user: {exc}") from None
        log.info("llm_cache_forgot_user", user_id=req.user_id, dropped=dropped)
        return ForgetReply(user_id=req.user_id, deleted=dropped)

    async def on_changed(self, msg) -> None:
        """The events subscription's callback: fold the event in, no I/O (see `changes`)."""
        try:
            event = _changed.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("bad_change_event", error=str(exc))
            return
        if not self.pending.add(event, self.clock()):
            self.distrust("backlog_full")

    def on_bus_event(self, event: str, exc: Exception | None) -> None:
        """Events lost on the bus: after a reconnect, or a slow consumer on our subscription."""
        if event == "reconnected":
            self.distrust("reconnected")
        elif isinstance(exc, SlowConsumerError) and exc.sub is self.events_sub:
            self.distrust("slow_consumer")

    def distrust(self, why: str) -> None:
        """Change events may have been lost: refuse every invalidating-class entry created
        before now, here at once and, once `apply_changes` has written it, in every broker."""
        now = self.clock()
        quiet = now < self.distrust_before + DISTRUST_QUIET_S  # nats-py reports every drop
        self.distrust_before = max(self.distrust_before, now)
        self.pending.distrust(now)
        if not quiet:
            metrics.llm_distrusts.labels(why).inc()
            log.warning("llm_cache_distrusted", reason=why)

    async def apply_changes(self) -> None:
        """Background loop: apply the folded events in batches; a failed batch is retried."""
        backoff = 0.05
        while True:
            await self.pending.ready.wait()
            batch = self.pending.take()
            try:
                await self._apply(batch)
                backoff = 0.05
            except STORE_ERRORS as exc:
                self.pending.put_back(batch, self.clock())
                log.error("invalidation_failed", users=len(batch.spoke) + len(batch.forgot),
                          error=str(exc) or type(exc).__name__, retry_in=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, RETRY_MAX_S)

    async def _apply(self, batch: Batch) -> None:
        if batch.distrust_since:
            await self.cache.distrust(batch.distrust_since)
        if batch.spoke:
            dropped = await self.cache.invalidate(batch.spoke, sorted(self.invalidating),
                                                  self.clock())
            log.info("llm_cache_invalidated", users=len(batch.spoke), dropped=dropped)
        limit = asyncio.Semaphore(FORGET_CONCURRENCY)

        async def forget(user_id: str) -> None:
            async with limit:
                dropped = await self.cache.forget(user_id, self.clock())
            log.info("llm_cache_forgot_user", user_id=user_id, dropped=dropped)

        failed = [r for r in await asyncio.gather(*map(forget, batch.forgot), return_exceptions=True)
                  if isinstance(r, BaseException)]
        if failed:
            raise failed[0]  # the whole batch is retried: dropping twice is harmless

    async def sweep(self, every_s: float, batch: int) -> None:
        """Background loop: delete expired semantic rows, `batch` at a time, every `every_s`."""
        while True:
            await asyncio.sleep(every_s)
            try:
                while (deleted := await self.cache.sweep(self.clock(), batch)) == batch:
                    await asyncio.sleep(0)  # a backlog goes in short statements
            except STORE_ERRORS as exc:
                log.warning("sweep_failed", error=str(exc) or type(exc).__name__)
                continue
            if deleted:
                log.info("llm_entries_swept", deleted=deleted)


def refuse_cluster(settings: Settings) -> None:
    """PUT, MARK_SPOKE and REPLACE_EPOCH (cache.py) and the thresholds' scripts name keys
    of several slots (the user's, `llm:epoch`, `llm:distrust_before`, other users'), and
    the lookup's pipeline relies on one connection's order (`llm:epoch` before the L2
    state): Redis Cluster would refuse them (CROSSSLOT) or lose that order. Refused at
    start-up rather than found on the first hit; docs/capacity.md says what it needs."""
    if settings.redis_cluster:
        raise SystemExit("llm-broker: REDIS_CLUSTER=1 is not supported yet; point its REDIS_URL "
                         "at a single Redis primary (the l2-gateway and the auditor take a cluster)")


async def build(rt: Runtime, *, clock=time.time,
                events_pending_limit: int = DEFAULT_SUB_PENDING_MSGS_LIMIT) -> Broker:
    """`events_pending_limit`: events nats-py holds for us before it drops them as
    a slow consumer's (tests make it small to see what a drop does)."""
    s = rt.settings
    refuse_cluster(s)
    config = Config.load(s.llm_config or None).with_retention(Retention.from_settings(s))
    embedder = embedder_from_settings(s)
    rt.on_close(embedder.aclose)
    redis = redis_client.connect(s, socket_timeout=2, socket_connect_timeout=2)
    rt.on_close(redis.aclose)
    rt.ready_check("redis", redis.ping)
    cache = await ResponseCache.open(redis, s.database_url, embedder.model_id,
                                     s.pg_command_timeout_s)
    rt.on_close(cache.close)
    rt.ready_check("postgres", lambda: cache.pool.fetchval("SELECT 1"))
    client = make_client(s)
    rt.on_close(client.close)
    served = Served.from_settings(rt.nc, "llm-broker", s)
    rt.spawn(served.run(), "served-records")
    broker = Broker(config, cache, Upstream(client, s, clock), embedder, redis,
                    s.llm_max_prompt_chars, clock, served)
    broker.publish = rt.nc.publish
    await broker.thresholds.load()
    rt.spawn(broker.thresholds.follow(), "thresholds")
    rt.on_close(broker.drain)  # the last counts land before Redis closes (hooks run in reverse)
    rt.spawn(broker.flush_stats(), "stats-flush")
    rt.spawn(broker.apply_changes(), "apply-changes")
    rt.spawn(broker.sweep(s.llm_sweep_interval_s, s.llm_sweep_batch), "sweep")
    rt.on_bus_event(broker.on_bus_event)
    # One replica handles each change event: the cache is shared.
    broker.events_sub = await rt.nc.subscribe(subjects.CHANGED_ALL, queue="llm-broker",
                                              cb=broker.on_changed,
                                              pending_msgs_limit=events_pending_limit)

    rt.endpoint("complete", subjects.LLM_COMPLETE, CompleteRequest, broker.complete, concurrency=256)
    rt.endpoint("complete_keyed", subjects.LLM_COMPLETE_KEYED, CompleteRequest,
                broker.complete_keyed, concurrency=256, headers=True)
    rt.endpoint("stats", subjects.LLM_STATS, LLMStatsRequest, broker.read_stats)
    rt.endpoint("count_tokens", subjects.LLM_COUNT_TOKENS, CountTokensRequest, broker.count_tokens,
                concurrency=64, headers=True)
    rt.endpoint("verdict", subjects.LLM_VERDICT, LLMVerdict, broker.verdict, concurrency=16)
    rt.endpoint("forget", subjects.LLM_FORGET, ForgetRequest, broker.forget, concurrency=8)
    admin.register(rt, broker)  # llm.admin.*: the admin identity's (and the gateway's) only
    return broker
