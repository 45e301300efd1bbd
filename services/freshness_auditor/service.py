"""freshness-auditor: how often do the caches serve stale or wrong answers?

Every memory tier and the llm-broker publish batches of what they served
(`shared.served`, subject `audit.served.<source>`; one auditor replica gets
each batch through the queue group). The auditor:

- checks a sample (`audit_sample_rate`) of memory answers against the durable
  log, as of the moment each was served (`judge.judge_memory`); a stale one
  is counted and its user's window evicted from the tier that served it
  (every L1 drops it; L2 rebuilds it from the log, and the L1s drop their
  copies, which were filled from L2; L3 is the log's own index and is only
  counted);
- re-asks the model for LLM hits while the spend stays within
  `audit_llm_budget` of what the audited hits saved, compares the answers
  (`llm_judge.answers_agree`: labels by equality, free text by an entailment
  judge of its own, `entailment`, never the broker's guard; an answer that
  calls tools first by its calls, `judge.calls_agree`), and tells the
  broker each verdict (`llm.verdict`): a wrong hit is evicted; a semantic one
  is evidence for its partition's false-hit bound, which tightens or loosens
  its threshold (the broker's `bound`), and the partition's
  standing in the reply is kept for `audit.stats`;
- answers `audit.stats` with the counts and rates (kept in Redis, `tally`).

Each audit is a span in the trace of the lookup it audits, so a stale
finding opens on the request that served it. Audits run in a few worker
tasks behind bounded queues: a backlog sheds audits (counted), never memory.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import OrderedDict

import msgspec
import structlog
from nats.aio.msg import Msg
from opentelemetry import trace
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, TraceFlags
from redis.exceptions import RedisError

from shared import llm_judge, metrics, pii, redis_client, stream, subjects
from shared.contract import (
    AuditStatsReply, AuditStatsRequest, EvictReply, EvictRequest, LLMVerdict, LLMVerdictReply,
    ServedBatch, ServedLLM, ServedMemory, Usage, encode, tool_calls,
)
from shared.errors import TierError
from shared.ids import to_token
from shared.llm_config import Config
from shared.pricing import cost_usd
from shared.service import Runtime
from shared.telemetry import tracer
from shared.upstream import Upstream, make_client

from . import entailment, judge
from .tally import Tally

log = structlog.get_logger()
_batch = msgspec.json.Decoder(ServedBatch)
MEMORY_WORKERS = 4
LLM_WORKERS = 2
QUEUE_MAX = 5_000
AUDIT_BATCH = 256  # records a memory worker takes at once, grouped by user
FORGOTTEN_MAX = 100_000  # users whose forget time is remembered
FLUSH_S = 0.5
ESTIMATE_MARGIN = 1.25  # a re-ask is booked at this multiple of the hit's original cost


class Auditor:
    def __init__(self, rt: Runtime, tally: Tally, upstream: Upstream, config: Config,
                 free_text, *, rng: random.Random | None = None) -> None:
        """`free_text`: an `entailment` judge (TokenAlignment or LLMJudge)."""
        s = rt.settings
        self.rt = rt
        self.tally = tally
        self.upstream = upstream
        self.config = config
        self.free_text = free_text
        self.sample_rate = s.audit_sample_rate
        self.grace_s = s.audit_grace_s
        self.budget = judge.Budget(s.audit_llm_budget)
        self.rng = rng or random.Random()
        self.memory_queue: asyncio.Queue[ServedMemory] = asyncio.Queue(QUEUE_MAX)
        self.llm_queue: asyncio.Queue[tuple[ServedLLM, float]] = asyncio.Queue(QUEUE_MAX)
        self.forgotten: OrderedDict[str, float] = OrderedDict()
        self._checks: dict[tuple[str, str], list[int]] = {}  # (volatility, task) -> [checked, wrong]

    # --- intake --------------------------------------------------------------

    async def on_served(self, msg: Msg) -> None:
        try:
            batch = _batch.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("bad_served_batch", subject=msg.subject, error=str(exc))
            return
        if batch.dropped:
            self.tally.add("records_dropped", batch.dropped)
        for rec in batch.memory:
            tier = metrics.bounded(rec.tier, metrics.TIERS)
            self.tally.memory(tier, "served")
            metrics.audit_served.labels("memory", tier).inc()
            # a record of no known tier cannot be judged against one nor evicted from it
            if tier != metrics.OTHER and self.rng.random() < self.sample_rate:
                self._enqueue(self.memory_queue, rec, "memory")
        for hit in batch.llm:
            vol, task, match = self._llm_labels(hit)
            self.tally.llm(vol, task, "served", match)
            metrics.audit_served.labels("llm", match).inc()
            self.tally.add("saved_usd", hit.saved_usd)
            self.budget.earn(hit.saved_usd)
            estimate = hit.saved_usd * ESTIMATE_MARGIN
            if self.budget.reserve(estimate):
                if not self._enqueue(self.llm_queue, (hit, estimate), "llm"):
                    self.budget.settle(estimate, 0.0)
            else:
                self.tally.add("skipped_over_budget")
                metrics.audit_skipped.labels("llm", "over_budget").inc()

    def _llm_labels(self, hit: ServedLLM) -> tuple[str, str, str]:
        """Volatility class, task and match as metrics and counts name them (a fixed set)."""
        req = hit.request
        return (self.config.volatility_label(req.cache.volatility),
                self.config.task_label(req.task), metrics.bounded(hit.match, metrics.MATCHES))

    def _enqueue(self, queue: asyncio.Queue, item, kind: str) -> bool:
        try:
            queue.put_nowait(item)
            return True
        except asyncio.QueueFull:
            metrics.audit_skipped.labels(kind, "backlog").inc()
            return False

    async def on_forgotten(self, msg: Msg) -> None:
        """Remember when users were forgotten: a read just before that is not judged by the log after."""
        user = msg.subject.rpartition(".")[2]
        self.forgotten[user] = time.time()
        self.forgotten.move_to_end(user)
        while len(self.forgotten) > FORGOTTEN_MAX:
            self.forgotten.popitem(last=False)

    # --- memory audits -------------------------------------------------------

    async def memory_worker(self) -> None:
        """Audit what is queued, one log read per user for all of that user's records."""
        while True:
            batch = [await self.memory_queue.get()]
            while len(batch) < AUDIT_BATCH and not self.memory_queue.empty():
                batch.append(self.memory_queue.get_nowait())
            by_user: dict[str, list[ServedMemory]] = {}
            for rec in batch:
                by_user.setdefault(rec.user_id, []).append(rec)
            for user_id, recs in by_user.items():
                try:
                    await self.audit_memory(user_id, recs)
                except Exception as exc:  # noqa: BLE001 - one failed audit must not stop auditing
                    metrics.audit_skipped.labels("memory", "error").inc(len(recs))
                    log.warning("memory_audit_failed", user_id=user_id, error=repr(exc))

    async def audit_memory(self, user_id: str, recs: list[ServedMemory]) -> list[judge.MemoryVerdict]:
        """Judge one user's served records against one read of the log; evict each stale tier once."""
        entries = await stream.user_log(self.rt.nc, user_id, min(map(judge.log_start, recs)))
        forgotten = self.forgotten.get(to_token(user_id))
        verdicts, stale_tiers = [], set()
        user_ref = pii.user_ref(user_id)  # spans are exported: never the raw id
        for rec in recs:
            with _audit_span("audit memory", rec.trace_id, rec.span_id,
                             {"tiermem.tier": rec.tier, "tiermem.user_id": user_ref}) as span:
                # Read from the earliest start any record needs: older messages than a
                # record's own start change nothing of its newest n.
                verdict = judge.judge_memory(rec, entries, grace_s=self.grace_s,
                                             forgotten_at=forgotten)
                span.set_attribute("tiermem.audit.verdict", verdict.verdict)
            verdicts.append(verdict)
            self.tally.memory(rec.tier, "inconclusive" if verdict.verdict == "inconclusive"
                              else "checked")
            metrics.audit_checks.labels("memory", rec.tier, "", "", verdict.verdict).inc()
            if verdict.verdict == "stale":
                self.tally.memory(rec.tier, "stale")
                stale_tiers.add(rec.tier)
                log.warning("stale_read", tier=rec.tier, user_id=user_id, op=rec.op,
                            missing=verdict.missing[:10], unknown=verdict.unknown[:10],
                            served_trace_id=rec.trace_id)
        for tier in sorted(stale_tiers):
            if await self.evict(tier, user_id):
                self.tally.memory(tier, "evicted")
        return verdicts

    async def evict(self, tier: str, user_id: str) -> bool:
        body = encode(EvictRequest(user_id=user_id, reason="stale"))
        if tier == "l2":
            try:
                reply = await self.rt.request(subjects.MEMORY_L2_EVICT,
                                              EvictRequest(user_id=user_id, reason="stale"),
                                              EvictReply)
            except TierError as exc:
                log.error("l2_evict_failed", user_id=user_id, error=exc.message)
                return False
            if not reply.evicted:
                return False
            metrics.audit_evictions.labels("l2").inc()
        elif tier != "l1":
            return False  # L3 is rebuilt from the log by its indexer, not evicted
        # L1 windows are filled from L2: after either, every sidecar drops its copy.
        await self.rt.nc.publish(subjects.MEMORY_L1_EVICT, body)
        metrics.audit_evictions.labels("l1").inc()
        return True

    # --- LLM hit audits ------------------------------------------------------

    async def llm_worker(self) -> None:
        while True:
            hit, estimate = await self.llm_queue.get()
            try:
                await self.audit_llm(hit, estimate)
            except Exception as exc:  # noqa: BLE001 - the audit settled its own booking
                metrics.audit_skipped.labels("llm", "error").inc()
                log.warning("llm_audit_failed", entry_id=hit.entry_id, error=repr(exc))

    async def audit_llm(self, hit: ServedLLM, estimate: float) -> bool:
        """Re-ask, compare, report; returns whether the hit was wrong.

        Settles the re-ask's booking (`estimate`) exactly once, here: to what
        the call cost once it answered, to nothing if it failed. Whatever
        raises after that (the judge, the verdict request) leaves the spend as
        booked: the money was spent. With the LLM judge, a free-text audit
        books the judge's call too, before the re-ask: when the budget cannot
        pay for both, the audit is skipped (counted), never re-asked and left
        unjudged, nor judged by a weaker method."""
        req = hit.request
        vol, task, match = self._llm_labels(hit)
        label = task in self.config.label_tasks
        with _audit_span("audit llm hit", hit.trace_id, hit.span_id,
                         {"tiermem.task": task, "tiermem.volatility": vol,
                          "tiermem.match": hit.match}) as span:
            judge_booking = 0.0
            if not label and isinstance(self.free_text, llm_judge.LLMJudge):
                # the fresh answer is not known yet: booked as long as the served one (settled to cost)
                judge_booking = self._judge_estimate(hit, hit.text)
                if not self.budget.reserve(judge_booking):
                    self.budget.settle(estimate, 0.0)
                    self.tally.add("skipped_over_budget")
                    metrics.audit_skipped.labels("llm", "over_budget").inc()
                    span.set_attribute("tiermem.audit.verdict", "skipped")
                    return False
            try:
                answer = await self.upstream.complete(req)
            except BaseException:
                self.budget.settle(estimate + judge_booking, 0.0)
                raise
            spent = cost_usd(self.config.price_of(req.model), answer.usage)
            self.budget.settle(estimate, spent)
            self.tally.add("spend_usd", spent)
            metrics.audit_spend.inc(spent)
            support = None
            # an answer that calls tools is wrong when its calls are (no text to judge then)
            calls_differ = hit.tool_calls is not None and not judge.calls_agree(
                hit.tool_calls, tool_calls(answer.message) or [])
            if calls_differ:
                if judge_booking:
                    self.budget.settle(judge_booking, 0.0)
            elif not label and llm_judge.normalise_label(hit.text) != llm_judge.normalise_label(answer.text):
                support = await self._support(hit, answer.text, judge_booking)
                if support is None:
                    span.set_attribute("tiermem.audit.verdict", "unjudged")
                    return False
            elif judge_booking:
                self.budget.settle(judge_booking, 0.0)  # the same text: nothing to judge
            if calls_differ:
                agree, reason = False, "tool_calls_differ"
            else:
                agree, reason = llm_judge.answers_agree(hit.text, answer.text, label=label,
                                                    support=support,
                                                    threshold=self.free_text.threshold)
            wrong = not agree
            span.set_attribute("tiermem.audit.verdict", "wrong" if wrong else "right")
            self.tally.llm(vol, task, "checked", match)
            counts = self._checks.setdefault((vol, task), [0, 0])
            counts[0] += 1
            metrics.audit_checks.labels("llm", match, vol, task,
                                        "wrong" if wrong else "right").inc()
            if wrong:
                counts[1] += 1
                self.tally.llm(vol, task, "wrong", match)
                log.warning("wrong_llm_hit", task=task, volatility=vol, match=hit.match,
                            similarity=hit.similarity, reason=reason, entry_id=hit.entry_id,
                            served_trace_id=hit.trace_id)
            metrics.audit_false_hit_rate.labels(vol, task).set(counts[1] / counts[0])
            verdict = await self.rt.request(
                subjects.LLM_VERDICT, LLMVerdict(entry_id=hit.entry_id, partition=hit.partition,
                                                 match=hit.match, wrong=wrong, score=hit.score,
                                                 threshold=hit.threshold), LLMVerdictReply)
            if verdict.bound is not None and hit.match == "semantic":
                self.tally.partition(hit.partition, verdict.bound)
            if wrong and verdict.evicted:
                self.tally.llm(vol, task, "evicted", match)
                metrics.audit_evictions.labels("llm").inc()
            return wrong

    def _judge_estimate(self, hit: ServedLLM, fresh: str) -> float:
        """What to book for the LLM judge's call on the served answer and `fresh`."""
        return ESTIMATE_MARGIN * cost_usd(self.config.price_of(hit.request.model), Usage(
            input_tokens=llm_judge.prompt_tokens(hit.text, fresh),
            output_tokens=llm_judge.JUDGE_MAX_TOKENS))

    async def _support(self, hit: ServedLLM, fresh: str, booking: float) -> tuple[float, float] | None:
        """The free-text judge's support both ways; None when there is no verdict (the LLM
        judge answering anything but two yes/no words). `booking`: what `audit_llm` reserved
        for the LLM judge's call, settled here exactly once."""
        if not isinstance(self.free_text, llm_judge.LLMJudge):
            return await self.free_text.support(hit.text, fresh)
        try:
            support, usage = await self.free_text.ask(hit.text, fresh, model=hit.request.model)
        except BaseException:
            self.budget.settle(booking, 0.0)
            raise
        spent = cost_usd(self.config.price_of(hit.request.model), usage)
        self.budget.settle(booking, spent)
        self.tally.add("spend_usd", spent)
        metrics.audit_spend.inc(spent)
        if support is None:
            metrics.audit_skipped.labels("llm", "unjudged").inc()
            log.warning("audit_judge_unparsable", entry_id=hit.entry_id)
        return support

    # --- reporting -----------------------------------------------------------

    async def flush(self) -> None:
        try:
            await self.tally.flush()
        except (RedisError, OSError) as exc:
            log.warning("audit_counts_not_flushed", error=str(exc))

    async def flush_loop(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_S)
            await self.flush()

    async def stats(self, _req: AuditStatsRequest) -> AuditStatsReply:
        await self.flush()
        return await self.tally.read()


def make_judge(kind: str, upstream: Upstream):
    """The free-text judge the `AUDIT_JUDGE` setting names."""
    kind = (kind or "llm").strip().lower()
    if kind == "embedding":
        return entailment.TokenAlignment()
    if kind == "llm":
        return llm_judge.LLMJudge(upstream)
    raise SystemExit(f"unknown AUDIT_JUDGE {kind!r}; choose embedding or llm")


def _audit_span(name: str, trace_id: str, span_id: str, attributes: dict):
    """A span in the audited request's trace (child of, and linked to, the span that served it)."""
    if not trace_id:
        return tracer.start_as_current_span(name, attributes=attributes)
    served = SpanContext(int(trace_id, 16), int(span_id, 16), is_remote=True,
                         trace_flags=TraceFlags(TraceFlags.SAMPLED))
    return tracer.start_as_current_span(
        name, context=trace.set_span_in_context(NonRecordingSpan(served)),
        links=[Link(served, {"tiermem.link": "audited"})], attributes=attributes)


async def build(rt: Runtime) -> Auditor:
    s = rt.settings
    redis = redis_client.connect(s, socket_timeout=2, socket_connect_timeout=2)
    rt.on_close(redis.aclose)
    rt.ready_check("redis", redis.ping)
    client = make_client(s)
    rt.on_close(client.close)
    upstream = Upstream(client, s)
    free_text = make_judge(s.audit_judge, upstream)
    rt.on_close(free_text.aclose)
    config = Config.load(s.llm_config or None)
    auditor = Auditor(rt, Tally(redis, s.audit_llm_budget), upstream, config, free_text)
    rt.on_close(auditor.flush)
    for i in range(MEMORY_WORKERS):
        rt.spawn(auditor.memory_worker(), f"memory-audit-{i}")
    for i in range(LLM_WORKERS):
        rt.spawn(auditor.llm_worker(), f"llm-audit-{i}")
    rt.spawn(auditor.flush_loop(), "audit-flush")
    await rt.nc.subscribe(subjects.AUDIT_SERVED_ALL, queue="freshness-auditor",
                          cb=auditor.on_served, pending_msgs_limit=100_000)
    # Forgets only: `memory.changed.*` would bring every append too.
    await rt.nc.subscribe(subjects.FORGOTTEN_ALL, cb=auditor.on_forgotten)
    rt.endpoint("stats", subjects.AUDIT_STATS, AuditStatsRequest, auditor.stats)
    return auditor
