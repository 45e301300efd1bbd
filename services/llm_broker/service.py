"""llm-broker: answers `llm.complete` from cache when, and only when, that is right.

Order of a request: validate (`policy.check_request`: the configured bounds and
the scope rule, then the prompt size; no upstream call for bad input) -> exact tier
(Redis) -> semantic tier (Postgres, inside the partition, every candidate
through the guard) -> single-flight upstream call -> store. Hits never extend
an entry's life. `memory.changed` drives invalidation: a user's new message
drops their entries of invalidating classes; a forget drops all of them. The
gateway's forget job also asks `llm.forget` and retries until it is answered:
the event alone is core NATS and may be lost.
"""

from __future__ import annotations

import asyncio
import time

import asyncpg
import msgspec
import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared import metrics, subjects
from shared.contract import (
    CacheInfo, Changed, CompleteReply, CompleteRequest, ForgetReply, ForgetRequest, LLMVerdict,
    LLMVerdictReply, TextBlock, check_complete, decoder,
)
from shared.errors import Unavailable
from shared.embeddings import embedder_from_settings
from shared.retention import Retention
from shared.served import Served
from shared.service import Runtime
from shared.telemetry import tracer

from . import guard, stats
from .thresholds import Thresholds
from .cache import ResponseCache
from .policy import (
    Config, Entry, check_request, cost_usd, exact_key, latest_user_text, new_entry, partition_key,
)
from .upstream import Upstream, make_client

log = structlog.get_logger()
_changed = decoder(Changed)
STATS_FLUSH_S = 0.5


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
        self.thresholds = Thresholds(redis, guard.default_threshold(embedder.model_id))

    async def complete(self, req: CompleteRequest) -> CompleteReply:
        volatility = check_request(self.config, req)
        check_complete(req, self.max_prompt_chars)
        labels = (req.model, self.config.task_label(req.task), self.config.bot_label(req.bot_id))
        if req.cache.mode == "off":
            answer, cost = await self._call(req, labels)
            return await self._reply(req, labels, answer.text, answer.stop_reason, answer.usage,
                                     cost, 0.0, CacheInfo(status="off"), "uncached")
        partition = partition_key(req)
        key = exact_key(partition, req)
        now = self.clock()
        entry = await self._exact(key, now)
        if entry is not None:
            return await self._hit(req, labels, entry, "exact", 1.0, now)
        vector = None
        if req.cache.mode == "semantic":
            with tracer.start_as_current_span("embed query"):
                vector = (await self.embedder.embed([latest_user_text(req)], input_type="query"))[0]
            found = await self._semantic(req, partition, vector, now, labels[1])
            if found is not None:
                return await self._hit(req, labels, found[0], "semantic", found[1], now)
        entry, cost, leader = await self._single_flight(req, key, partition, volatility, vector,
                                                        labels)
        if not leader:  # answered by a concurrent identical request's upstream call
            return await self._hit(req, labels, entry, "exact", 1.0, self.clock())
        return await self._reply(req, labels, entry.text, entry.stop_reason, entry.usage, cost,
                                 0.0, CacheInfo(status="miss"), "misses")

    async def _exact(self, key: str, now: float) -> Entry | None:
        try:
            with tracer.start_as_current_span("redis get", attributes={"db.system": "redis"}):
                entry = await self.cache.get_exact(key)
        except (RedisError, OSError) as exc:
            log.warning("exact_tier_unavailable", error=str(exc))
            return None
        return entry if entry is not None and entry.fresh(now) else None

    async def _semantic(self, req: CompleteRequest, partition: str, vector, now: float,
                        task_label: str):
        with tracer.start_as_current_span("postgres nearest", attributes={"db.system": "postgresql"}):
            try:
                candidates = await self.cache.nearest(partition, vector, now)
            except OSError as exc:
                log.warning("semantic_tier_unavailable", error=str(exc))
                return None
        query = latest_user_text(req)
        threshold = self.thresholds.get(partition)
        for cand in candidates:
            verdict = guard.decide(query, cand.entry.query, cand.similarity,
                                   threshold=threshold, space=self.embedder.model_id)
            if verdict.serve and cand.entry.fresh(now):
                log.info("semantic_hit", similarity=round(cand.similarity, 4), reason=verdict.reason)
                return cand.entry, cand.similarity
            metrics.llm_refused.labels(task_label, verdict.reason).inc()
            log.info("semantic_refused", similarity=round(cand.similarity, 4), reason=verdict.reason)
        return None

    async def _single_flight(self, req, key, partition, volatility, vector, labels):
        """One upstream call per exact key at a time; followers share its entry."""
        flight = self._flights.get(key)
        if flight is not None:
            entry, cost = await asyncio.shield(flight)
            return entry, cost, False
        flight = self._flights[key] = asyncio.get_running_loop().create_future()
        try:
            started = self.clock()
            answer, cost = await self._call(req, labels)
            entry = new_entry(req, partition, answer.text, answer.stop_reason, answer.usage, cost,
                              volatility, self.clock())
            try:
                stored = await self.cache.put(entry, vector, computed_at=started)
                log.info("cached" if stored else "not_cached_user_spoke", volatility=entry.volatility)
            except (RedisError, OSError) as exc:
                log.warning("cache_store_failed", error=str(exc))
            flight.set_result((entry, cost))
            return entry, cost, True
        except BaseException as exc:
            flight.set_exception(exc if isinstance(exc, Exception) else RuntimeError("cancelled"))
            flight.exception()  # retrieved, in case nobody waits
            raise
        finally:
            self._flights.pop(key, None)

    async def _call(self, req: CompleteRequest, labels):
        answer = await self.upstream.complete(req)
        cost = cost_usd(self.config.price_of(req.model), answer.usage)
        for kind in ("input_tokens", "output_tokens", "cache_creation_input_tokens",
                     "cache_read_input_tokens"):
            metrics.llm_tokens.labels(*labels, kind).inc(getattr(answer.usage, kind))
        metrics.llm_cost.labels(*labels).inc(cost)
        return answer, cost

    async def _hit(self, req, labels, entry: Entry, match: str, similarity: float, now: float):
        info = CacheInfo(status="hit", match=match, similarity=round(similarity, 4),
                         age_s=round(entry.age(now), 3))
        metrics.llm_saved.labels(*labels).inc(entry.cost_usd)
        if self.served is not None:
            self.served.llm(entry.id, entry.partition, match, similarity, info.age_s,
                            entry.cost_usd, entry.text, req)
        return await self._reply(req, labels, entry.text, entry.stop_reason, entry.usage,
                                 0.0, entry.cost_usd, info, f"hits_{match}")

    async def _reply(self, req, labels, text, stop_reason, usage, cost, saved, info, outcome):
        metrics.llm_requests.labels(*labels, info.status, info.match or "").inc()
        paid = outcome in ("misses", "uncached")
        self.totals.add(outcome, usage if paid else None, cost, saved)
        (log.debug if info.status == "hit" else log.info)(
            "llm_answer", cache=info.status, match=info.match, similarity=info.similarity,
            task=req.task, model=req.model, cost_usd=cost, saved_usd=saved)
        return CompleteReply(text=text, content=[TextBlock(text=text)], model=req.model,
                             stop_reason=stop_reason, usage=usage, cost_usd=round(cost, 8),
                             saved_usd=round(saved, 8), cache=info)

    async def verdict(self, v: LLMVerdict) -> LLMVerdictReply:
        """The auditor re-asked an audited hit: count it; a wrong one is evicted and,
        for a semantic match, tightens its partition's threshold."""
        evicted = False
        if v.wrong:
            evicted = await self.cache.evict_id(v.entry_id)
            log.warning("llm_wrong_hit_evicted", entry_id=v.entry_id, match=v.match)
        threshold = await self.thresholds.record(v.partition, v.wrong,
                                                 tighten=v.match == "semantic")
        return LLMVerdictReply(evicted=evicted, threshold=threshold)

    async def flush_stats(self, every_s: float = STATS_FLUSH_S) -> None:
        """Background loop: add the counted totals to Redis for `llm.stats`."""
        while True:
            await asyncio.sleep(every_s)
            await self.drain()

    async def drain(self) -> None:
        try:
            await self.totals.flush(self.redis)
        except (RedisError, OSError) as exc:
            log.warning("stats_not_flushed", error=str(exc))

    async def forget(self, req: ForgetRequest) -> ForgetReply:
        """`llm.forget`: drop every entry of the user; the reply confirms it to the gateway."""
        try:
            dropped = await self.cache.forget(req.user_id, self.clock())
        except (RedisError, OSError, asyncpg.PostgresError) as exc:
            raise Unavailable(f"the LLM cache could not forget the user: {exc}") from None
        log.info("llm_cache_forgot_user", user_id=req.user_id, dropped=dropped)
        return ForgetReply(user_id=req.user_id, deleted=dropped)

    async def on_changed(self, msg) -> None:
        try:
            event = _changed.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("bad_change_event", error=str(exc))
            return
        try:
            if event.op == "forget":
                dropped = await self.cache.forget(event.user_id, self.clock())
                log.info("llm_cache_forgot_user", user_id=event.user_id, dropped=dropped)
            elif event.message is not None and event.message.role == "user":
                dropped = await self.cache.invalidate(event.user_id, self.config.invalidating(),
                                                      self.clock())
                if dropped:
                    log.info("llm_cache_invalidated", user_id=event.user_id, dropped=dropped)
        except (RedisError, OSError) as exc:
            log.error("invalidation_failed", user_id=event.user_id, error=str(exc))


async def build(rt: Runtime, *, clock=time.time) -> Broker:
    s = rt.settings
    config = Config.load(s.llm_config or None).with_retention(Retention.from_settings(s))
    embedder = embedder_from_settings(s)
    rt.on_close(embedder.aclose)
    redis = Redis.from_url(s.redis_url, **s.redis_auth(), socket_timeout=2, socket_connect_timeout=2)
    rt.on_close(redis.aclose)
    rt.ready_check("redis", redis.ping)
    cache = await ResponseCache.open(redis, s.database_url, embedder.model_id)
    rt.on_close(cache.close)
    rt.ready_check("postgres", lambda: cache.pool.fetchval("SELECT 1"))
    client = make_client(s)
    rt.on_close(client.close)
    served = Served.from_settings(rt.nc, "llm-broker", s)
    rt.spawn(served.run(), "served-records")
    broker = Broker(config, cache, Upstream(client, s, clock), embedder, redis,
                    s.llm_max_prompt_chars, clock, served)
    await broker.thresholds.load()
    rt.spawn(broker.thresholds.follow(), "thresholds")
    rt.on_close(broker.drain)  # the last counts land before Redis closes (hooks run in reverse)
    rt.spawn(broker.flush_stats(), "stats-flush")
    # One replica handles each change event: the cache is shared.
    await rt.nc.subscribe(subjects.CHANGED_ALL, queue="llm-broker", cb=broker.on_changed)

    async def get_stats(_req: stats.StatsRequest) -> stats.StatsReply:
        await broker.drain()  # this replica's latest counts, then everyone's
        return await stats.read(redis)

    rt.endpoint("complete", subjects.LLM_COMPLETE, CompleteRequest, broker.complete, concurrency=256)
    rt.endpoint("stats", subjects.LLM_STATS, stats.StatsRequest, get_stats)
    rt.endpoint("verdict", subjects.LLM_VERDICT, LLMVerdict, broker.verdict, concurrency=16)
    rt.endpoint("forget", subjects.LLM_FORGET, ForgetRequest, broker.forget, concurrency=8)
    return broker
