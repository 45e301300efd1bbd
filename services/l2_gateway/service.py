"""l2-gateway: the durable write path and the Redis tier.

`memory.append`: validate, check the user's quota, publish to the stream
(`Nats-Msg-Id` = a hash of user and msg_id, `stream.store`), reply only after
the stream's ack; the applier puts it in Redis and broadcasts, and the reply
waits (boundedly) for that so the next read hits L2. If that wait runs out, a
user's own message still gets its seq recorded in Redis before the reply
(`shared.lastseq`: what the llm-broker checks its hits against). A read
passes down while the applied position lags what the log held half a grace
ago (`shared.log_head`). Appends are refused (503)
while the stream is lost (`log_guard`), and (507) while it is full
(`log_limits`); the per-user quota on bytes in the log is `quota`'s. The
stream's retention limits are set here at start-up (`shared.retention`).
`memory.forget` is a durable job (`forget`).
"""

from __future__ import annotations

import asyncio

import msgspec
import structlog
from nats.errors import TimeoutError as NatsTimeout
from redis.exceptions import RedisError

from shared import lastseq, metrics, redis_client, stream, subjects
from shared.contract import (
    AppendReply, AppendRequest, EvictReply, EvictRequest, ForgetRequest, GetRequest, L2Reply,
    check_append, check_get, encode, fit_reply,
)
from shared.errors import Unavailable
from shared.log_head import LogHead
from shared.retention import Retention
from shared.served import Served
from shared.service import Runtime
from shared.telemetry import tracer

from .applier import Applier
from .forget import Forgetter
from .fence import LOST, REBUILDING, ROLLED_BACK, Fence
from .log_guard import LogGuard
from .log_limits import log_full, watch_usage
from .quota import Quota
from .redis_window import RedisWindow, Snapshot

log = structlog.get_logger()
TIER = "l2"
APPEND_CONCURRENCY = 512


async def build(rt: Runtime) -> None:
    settings = rt.settings
    redis = redis_client.connect(settings, socket_timeout=2, socket_connect_timeout=2,
                                 health_check_interval=10)
    rt.on_close(redis.aclose)
    rt.ready_check("redis", redis.ping)
    retention = Retention.from_settings(settings)
    window = RedisWindow(redis, retention.window(settings.l2_window), settings.l2_idle_ttl_s, Fence())
    try:
        await window.load_scripts()
    except (RedisError, OSError) as exc:  # Redis down: appends go on; loaded on first use
        log.warning("l2_scripts_not_loaded", error=str(exc))
    guard = LogGuard(rt.js, settings.stream_replicas, settings.memory_stream_reinit)
    if await guard.open():
        await window.wipe()  # its windows and position describe the lost stream
    if not guard.lost:  # a stream not ours is left as it is
        await stream.apply_retention(rt.js, retention)
    rt.spawn(watch_usage(rt.js), "memory-stream-usage")
    rt.ready_check("memory-stream", guard.ready)
    rt.spawn(guard.watch(), "memory-stream-watch")
    await stream.ensure_dead_letter_stream(rt.js, settings.stream_replicas)
    applier = Applier(rt, window, guard)
    rt.spawn(applier.run(), "applier")
    rt.on_bus_event(applier.on_bus_event)
    head = LogHead(settings.audit_grace_s / 2)
    rt.spawn(head.watch(rt.js), "log-head")
    rt.spawn(_publish_due(head, window), "log-due")
    quota = Quota(window, settings.max_user_bytes,
                  recount=(lambda user: applier.repair(user, settings.request_timeout_s / 2))
                  if retention.drops_anything() else None)
    served = Served.from_settings(rt.nc, "l2-gateway", settings)
    rt.spawn(served.run(), "served-records")
    tier = L2Tier(rt, window, guard, applier, head, quota, served, retention)
    # An append mostly waits (for the stream's ack, then for the applier), and the
    # applier's batches grow with the appends waiting on them: many in flight is
    # cheap. With 128 clients in flight, 64 capped the batches; 512 measured ~15 %
    # more appends/s and ~8 % less CPU per append.
    rt.endpoint("append", subjects.MEMORY_APPEND, AppendRequest, tier.append,
                concurrency=max(settings.concurrency, APPEND_CONCURRENCY))
    rt.endpoint("get", subjects.MEMORY_L2_GET, GetRequest, tier.get)
    forgetter = Forgetter(rt, window, guard)
    await forgetter.open()
    rt.spawn(forgetter.work(), "forget-jobs")
    rt.endpoint("forget", subjects.MEMORY_FORGET, ForgetRequest, forgetter.forget, concurrency=8)
    rt.endpoint("forget-status", subjects.MEMORY_FORGET_STATUS, ForgetRequest, forgetter.status)
    rt.endpoint("evict", subjects.MEMORY_L2_EVICT, EvictRequest, tier.evict, concurrency=8)


class L2Tier:
    """The l2-gateway's request handlers, over the parts `build` wires together."""

    def __init__(self, rt: Runtime, window: RedisWindow, guard: LogGuard, applier: Applier,
                 head: LogHead, quota: Quota, served: Served, retention: Retention) -> None:
        self.rt = rt
        self.settings = rt.settings
        self.window = window
        self.guard = guard
        self.applier = applier
        self.head = head
        self.quota = quota
        self.served = served
        self.retention = retention
        self.answered = metrics.answers.labels(TIER, "recent")
        self.passed_down = {r: metrics.passed_down.labels(TIER, r) for r in _REASONS}

    async def append(self, req: AppendRequest) -> AppendReply:
        settings, guard, quota = self.settings, self.guard, self.quota
        entry = check_append(req, settings.max_text_bytes)
        if guard.lost:
            raise Unavailable(guard.lost)
        payload = encode(entry)
        size = len(payload)
        await quota.admit(req.user_id, size)
        try:
            try:
                ack = await stream.store(self.rt.request_msg, req.user_id, req.msg_id, payload,
                                         settings.request_timeout_s)
            except (NatsTimeout, stream.PublishError) as exc:
                if isinstance(exc, stream.PublishError) and exc.full:
                    raise log_full(exc.refusal.description) from None
                if await guard.check():
                    raise Unavailable(guard.lost) from None
                raise Unavailable(f"the durable log did not acknowledge the append ({exc!r}); "
                                  "retry with the same msg_id, it is deduplicated") from None
            self.head.saw(ack.seq)
            if not ack.duplicate:
                if not await self.applier.wait_applied(ack.seq, settings.append_apply_wait_s):
                    log.warning("append_not_yet_in_l2", seq=ack.seq)
                    if entry.role == "user":
                        await self._note_user_seq(req.user_id, ack.seq)
        finally:
            quota.release(req.user_id, size)
        return AppendReply(user_id=req.user_id, seq=ack.seq, duplicate=bool(ack.duplicate))

    async def _note_user_seq(self, user_id: str, seq: int) -> None:
        """The reply goes out before the applier wrote the message: record the user's
        newest message seq now, or the llm-broker could serve an answer built before it
        (`shared.lastseq`). Best effort, bounded: Redis down costs a log line, not the
        append (the applier sets it once Redis is back)."""
        try:
            async with asyncio.timeout(self.settings.append_apply_wait_s):
                await self.window.note_user_seq(user_id, seq)
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("user_seq_not_noted", seq=seq, error=str(exc) or type(exc).__name__)

    async def get(self, req: GetRequest) -> msgspec.Raw:
        check_get(req)
        if req.op != "recent":
            return await self._down(req, "search")
        if req.n > self.settings.l2_window:
            return await self._down(req, "too_many")
        try:
            with tracer.start_as_current_span("redis read", attributes={"db.system": "redis"}):
                snap = await self.window.read(req.user_id, req.n)
        except (RedisError, OSError) as exc:
            log.warning("l2_unavailable", error=str(exc))
            return await self._down(req, "redis_unavailable")
        if isinstance(snap, str):  # Redis cannot answer for this user (see `fence`)
            if snap == ROLLED_BACK:
                self.applier.suspect()
            return await self._down(req, snap)
        reason = _why_not(snap, req, self.retention.held(snap.count),
                          snap.complete_through() < self.head.due())
        if reason:
            if reason == "partial":
                self.applier.repair_later(req.user_id)
            return await self._down(req, reason)
        reply = fit_reply(L2Reply(user_id=req.user_id, tier=TIER, seq=snap.last,
                                  messages=snap.messages), "recent", self.rt.nc.max_payload)
        self.answered.inc()
        self.served.memory(TIER, req.user_id, "recent", req.n, req.min_seq, snap.last,
                           snap.messages)
        return reply

    async def _down(self, req: GetRequest, reason: str) -> msgspec.Raw:
        """L3's reply, passed on as it came (up to 1,000 messages: no decode and re-encode)."""
        self.passed_down[reason].inc()
        return await self.rt.request(subjects.MEMORY_L3_GET, req, msgspec.Raw)

    async def evict(self, req: EvictRequest) -> EvictReply:
        """The auditor found this user's window stale: rebuild it from the log."""
        done = await self.applier.repair(req.user_id, self.settings.request_timeout_s)
        log.warning("l2_window_evicted", user_id=req.user_id, reason=req.reason, rebuilt=done)
        return EvictReply(user_id=req.user_id, evicted=done)


async def _publish_due(head: LogHead, window: RedisWindow) -> None:
    """Keep `shared.lastseq.DUE` at what this gateway knows the log held half a grace ago
    (the llm-broker distrusts the user seqs while Redis's applied position is below it)."""
    written = 0
    while True:
        await asyncio.sleep(lastseq.DUE_EVERY_S)
        due = head.due()
        if due > written:
            try:
                await window.note_due(due)
                written = due
            except (RedisError, OSError) as exc:  # the applier's own retries say Redis is down
                log.debug("log_due_not_written", error=str(exc))


_REASONS = ("search", "too_many", "redis_unavailable", "behind_min_seq", "behind_log", LOST,
            REBUILDING, ROLLED_BACK, "not_held", "partial")


def _why_not(snap: Snapshot, req: GetRequest, held: int, behind_log: bool) -> str:
    """Why this snapshot cannot answer the request completely ('' if it can); `held`: how many
    of the user's messages the log holds at most (retention drops the rest); `behind_log`: the
    snapshot lags messages the log has held for too long (`shared.log_head`)."""
    if req.min_seq is not None and snap.complete_through() < req.min_seq:
        return "behind_min_seq"
    if behind_log:
        return "behind_log"
    if snap.partial and len(snap.messages) < req.n:
        return "partial"  # what came before the window's oldest message is not known here
    if len(snap.messages) < req.n and len(snap.messages) < held:
        return "too_many"  # the user has more than the window still holds
    return ""
