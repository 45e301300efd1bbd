"""`memory.forget` as a durable job that cannot be lost.

Why: a forget used to run its steps once. With L3 down it answered 503 after
the purge and nobody retried, so the user's rows stayed searchable; the LLM
cache heard of it through one core-NATS event, which may be lost.

Now a forget first records a job in the JetStream work-queue stream `FORGET`
(`memory.forgetjob.<user>`: the user and `upto_seq`, the log position it
covers), then runs the steps:

1. purge the user's messages up to `upto_seq` from the log (the source every
   other tier is rebuilt from: if this fails, nothing else is tried);
2. wipe the user's Redis window (its `floor` keeps late appliers out) and
   broadcast the forget event to every memory-l1 and the auditor;
3. `llm.forget` to the llm-broker and `memory.l3.forget` to the indexer, each
   a request whose reply confirms it.

All finished within the request: the job is deleted and the reply is the
contract's `{"user_id", "deleted"}`. A step failed: 503 saying the forget is
recorded, which tiers it waits for, and that it will finish by itself;
retrying is harmless (every step is idempotent) and answers 200 once every
tier confirmed. The job stays in the stream, where the gateways' durable pull
consumer retries it, with backoff capped at `FORGET_RETRY_MAX_S`, until every
step confirmed in one attempt; then it is acked and leaves the stream. A job
is not taken by the consumer before the request that recorded it had its
chance (`not_before`), so the two rarely run at once (harmless if they do).

memory-l1 cannot confirm (a broadcast to an unknown number of sidecars): a
sidecar that missed the event serves the forgotten window at most `L1_TTL_S`
longer (`services.memory_l1.window`).

Pending jobs: `memory.forget.status` (admin) answers
`{"user_id", "pending", "since", "upto_seq"}`; each failed attempt logs
`forget_pending` with the tiers waited for, each completion `forget_completed`.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import msgspec
import structlog
from nats.errors import Error as NatsError, TimeoutError as NatsTimeout
from nats.js.api import (
    AckPolicy, ConsumerConfig, DiscardPolicy, RetentionPolicy, StorageType, StreamConfig,
)
from nats.js.errors import NotFoundError
from redis.exceptions import RedisError

from shared import stream, subjects
from shared.contract import (
    Changed, ForgetJob, ForgetReply, ForgetRequest, ForgetStatus, L3ForgetRequest, decoder, encode,
)
from shared.errors import TierError, Unavailable
from shared.ids import to_token
from shared.service import Runtime

from .log_guard import LogGuard
from .redis_window import RedisWindow

log = structlog.get_logger()

MAX_JOBS = 1_000_000  # pending forgets kept at most; past it a forget gets 503 (never dropped)
ACK_WAIT_S = 120.0  # longer than an attempt: its steps time out after request_timeout_s each
PARALLEL_JOBS = 16
FIRST_RETRY_S = 0.5


_job = decoder(ForgetJob)


def job_subject(user_id: str) -> str:
    return f"{subjects.FORGET_JOB_PREFIX}.{to_token(user_id)}"


def retry_delay(attempt: int, cap_s: float) -> float:
    """Backoff before attempt `attempt + 1` (1-based): 0.5 s doubling, at most `cap_s`."""
    return min(cap_s, FIRST_RETRY_S * 2 ** max(attempt - 1, 0))


def pending_message(job: int, waiting: list[str]) -> str:
    """The 503 of a forget that could not finish within its request."""
    return (f"the forget is recorded (job {job}) and will complete by itself; waiting for: "
            f"{', '.join(waiting)}. Retrying is harmless and answers 200 once every tier "
            f"has confirmed")


class Outcome(msgspec.Struct):
    deleted: int = 0
    waiting: list[str] = msgspec.field(default_factory=list)  # tiers that did not confirm


class Forgetter:
    def __init__(self, rt: Runtime, window: RedisWindow, guard: LogGuard) -> None:
        self.rt = rt
        self.window = window
        self.guard = guard
        self.retry_cap_s = rt.settings.forget_retry_max_s
        self.budget_s = rt.settings.request_timeout_s

    async def open(self) -> None:
        try:
            await self.rt.js.stream_info(subjects.FORGET_STREAM)
        except NotFoundError:
            await self.rt.js.add_stream(StreamConfig(
                name=subjects.FORGET_STREAM, subjects=[f"{subjects.FORGET_JOB_PREFIX}.*"],
                retention=RetentionPolicy.WORK_QUEUE, storage=StorageType.FILE,
                discard=DiscardPolicy.NEW, max_msgs=MAX_JOBS, allow_direct=True,
                num_replicas=self.rt.settings.stream_replicas))

    # --- memory.forget ----------------------------------------------------------

    async def forget(self, req: ForgetRequest) -> ForgetReply:
        if self.guard.lost:
            raise Unavailable(self.guard.lost)
        started = time.time()
        upto = await stream.last_seq(self.rt.js)
        job = ForgetJob(req.user_id, upto, started, started + self.budget_s + 1.0)
        seq = await self._record(job)
        try:  # each tier gets most of the budget, so a slow one is named in the 503
            outcome = await asyncio.wait_for(self.run(job, 0.8 * self.budget_s), self.budget_s)
        except asyncio.TimeoutError:
            outcome = Outcome(waiting=["the tiers (the request's time ran out)"])
        if outcome.waiting:
            log.warning("forget_pending", user_id=req.user_id, job=seq, waiting=outcome.waiting)
            raise Unavailable(pending_message(seq, outcome.waiting))
        await self._delete(seq)
        log.info("forget_completed", user_id=req.user_id, job=seq, deleted=outcome.deleted)
        return ForgetReply(user_id=req.user_id, deleted=outcome.deleted)

    async def _record(self, job: ForgetJob) -> int:
        try:
            ack = await stream.publish(self.rt.request_msg, job_subject(job.user_id), encode(job),
                                       uuid.uuid4().hex, self.budget_s)
        except (stream.PublishError, NatsTimeout) as exc:
            raise Unavailable(f"the forget could not be recorded ({exc}); nothing was deleted, "
                              "retry") from None
        return ack.seq

    async def _delete(self, seq: int) -> None:
        """Done: the job leaves the stream (if this fails the consumer runs it once more)."""
        try:
            await self.rt.request_msg(f"$JS.API.STREAM.MSG.DELETE.{subjects.FORGET_STREAM}",
                                      msgspec.json.encode({"seq": seq, "no_erase": True}),
                                      timeout=self.budget_s)
        except (NatsError, NatsTimeout) as exc:
            log.warning("forget_job_not_deleted", job=seq, error=str(exc) or repr(exc))

    # --- the steps ---------------------------------------------------------------

    async def run(self, job: ForgetJob, timeout: float) -> Outcome:
        """Every step once; the tiers that did not confirm are in `waiting`."""
        try:
            purged = await stream.purge_user(self.rt.nc, job.user_id, job.upto_seq + 1)
        except (NatsError, NatsTimeout, RuntimeError) as exc:
            log.warning("forget_step_failed", step="log", error=str(exc) or repr(exc))
            return Outcome(waiting=["the log"])
        redis, llm, l3 = await asyncio.gather(
            self._redis(job), self._ask("llm-broker", subjects.LLM_FORGET,
                                         ForgetRequest(job.user_id), timeout),
            self._ask("l3-semantic-indexer", subjects.MEMORY_L3_FORGET,
                      L3ForgetRequest(job.user_id, job.upto_seq), timeout))
        waiting = [tier for tier, done in (("redis", redis), ("llm-broker", llm is not None),
                                           ("l3-semantic-indexer", l3 is not None)) if not done]
        return Outcome(deleted=max(purged, l3 or 0), waiting=waiting)

    async def _redis(self, job: ForgetJob) -> bool:
        done = True
        try:
            await self.window.forget(job.user_id, job.upto_seq)
        except (RedisError, OSError) as exc:
            log.warning("forget_step_failed", step="redis", error=str(exc))
            done = False
        # Every sidecar drops its window (a refill from an L2 reply older than the
        # forget is refused by their tombstone), whether or not Redis answered.
        event = encode(Changed(op="forget", user_id=job.user_id, seq=job.upto_seq, prev_seq=0,
                               count=0))
        await self.rt.nc.publish(subjects.changed_subject(job.user_id), event)
        await self.rt.nc.publish(subjects.forgotten_subject(job.user_id), event)
        return done

    async def _ask(self, tier: str, subject: str, body: msgspec.Struct,
                   timeout: float) -> int | None:
        """The count the tier deleted, or None if it did not confirm."""
        try:
            return (await self.rt.request(subject, body, ForgetReply, timeout=timeout)).deleted
        except (TierError, NatsError) as exc:
            log.warning("forget_step_failed", step=tier, error=str(exc) or repr(exc))
            return None

    # --- the retries -------------------------------------------------------------

    async def work(self) -> None:
        """Run recorded jobs until each has confirmed everywhere; every replica pulls.

        One job per fetch (nats-py's batch fetch waits out its whole expiry for a
        partial batch: seconds of delay for a job that just became due), at most
        `PARALLEL_JOBS` attempts at once: a tier that hangs costs each its timeout.
        """
        sub = await self.rt.js.pull_subscribe(
            f"{subjects.FORGET_JOB_PREFIX}.*", durable=subjects.FORGET_CONSUMER,
            stream=subjects.FORGET_STREAM,
            config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=ACK_WAIT_S,
                                  max_deliver=-1, max_ack_pending=1024))
        slots = asyncio.Semaphore(PARALLEL_JOBS)
        async with asyncio.TaskGroup() as attempts:
            while True:
                await slots.acquire()
                try:
                    (msg,) = await sub.fetch(1, timeout=5)
                except NatsTimeout:
                    slots.release()
                    continue
                except NatsError as exc:
                    slots.release()
                    log.warning("forget_jobs_unreachable", error=str(exc) or repr(exc))
                    await asyncio.sleep(1.0)
                    continue
                attempts.create_task(self._attempt_in(slots, msg))

    async def _attempt_in(self, slots: asyncio.Semaphore, msg) -> None:
        try:
            await self._attempt(msg)
        except Exception as exc:  # noqa: BLE001 - redelivered after ack_wait: nothing is lost
            log.error("forget_attempt_failed", error=str(exc) or repr(exc))
        finally:
            slots.release()

    async def _attempt(self, msg) -> None:
        try:
            job = _job.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.error("forget_job_unreadable", error=str(exc))
            await msg.term()
            return
        now = time.time()
        if now < job.not_before:
            await msg.nak(delay=job.not_before - now)
            return
        attempt = msg.metadata.num_delivered
        outcome = await self.run(job, self.budget_s)
        if outcome.waiting:
            delay = retry_delay(attempt, self.retry_cap_s)
            log.warning("forget_pending", user_id=job.user_id, job=msg.metadata.sequence.stream,
                        attempt=attempt, waiting=outcome.waiting, retry_in=delay,
                        pending_s=round(now - job.recorded_at, 1))
            await msg.nak(delay=delay)
            return
        await msg.ack()
        log.info("forget_completed", user_id=job.user_id, job=msg.metadata.sequence.stream,
                 attempt=attempt, pending_s=round(time.time() - job.recorded_at, 1))

    # --- memory.forget.status ---------------------------------------------------

    async def status(self, req: ForgetRequest) -> ForgetStatus:
        """The user's oldest pending forget job, if any (one direct get)."""
        body = msgspec.json.encode({"seq": 1, "next_by_subj": job_subject(req.user_id)})
        msg = await self.rt.request_msg(f"$JS.API.DIRECT.GET.{subjects.FORGET_STREAM}", body)
        status = (msg.headers or {}).get("Status")
        if status == "404":
            return ForgetStatus(req.user_id, pending=False)
        if status:
            raise Unavailable(f"forget jobs unreadable: {status} {msg.headers.get('Description', '')}")
        job = _job.decode(msg.data)
        return ForgetStatus(req.user_id, pending=True, since=job.recorded_at,
                            upto_seq=job.upto_seq)
