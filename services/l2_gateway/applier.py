"""Applies the durable log to Redis, in order, and tells the other tiers.

Every gateway replica reads the whole stream with a pull consumer of its own
starting after Redis's `tm:applied` position, applies messages in batches (one
pipelined round trip per batch), advances the position, acks, broadcasts
`memory.changed.<user>` for each message it was first to apply, and wakes the
appends waiting for their message to reach Redis.

Bounded backlog: the consumer is pulled one batch at a time (`MAX_BATCH`
messages, at most `PULL_MAX_BYTES`), the next pull going out while a batch is
applied, so the process holds at most two batches: 1,024 messages and 16 MiB,
whatever the backlog in the stream (it stays there, on disk). The server
enforces the same bound (`max_ack_pending` = two batches; each batch is acked,
`AckAll`, once applied). Why two batches of 512: batches grow with the load,
one in flight and one arriving keeps Redis busy without waiting for a pull's
round trip, and 512 is where a batch's pipeline already amortises its round
trip (`MAX_BATCH` was measured before). The push consumer this replaces
handed every message to an unbounded queue: a replica that fell behind
(Redis slow, catching up after an outage) held the whole backlog in memory.

Order: one pull at a time, in stream order; redeliveries and replays are
skipped by seq, and Redis's per-user guard makes any re-apply harmless. After
a reconnect (deliveries in flight may be lost), a pull that got no answer, or
a consumer the server lost, the consumer is made again from the position.

Defence in depth: a message whose JSON is not a log entry, or whose subject is
not its `user_id`'s (`memory.log.<user>`; nothing but this gateway may
publish there, but a bug or an operator could), is copied with why to the
dead-letter stream (`memory.deadletter.l2-gateway`), logged and counted, and
skipped: one bad message must not stop every user's writes (it used to crash
the applier on every restart).

Redis down: the batch is retried with backoff, the stream keeps everything,
nothing is skipped; appends still succeed (they stop waiting after a bound).

Redis lost or rolled back (`fence`): every batch advances the position in
the same round trip as it applies, by a script that refuses when the state
is gone, of another epoch, or behind what this process saw (and then deletes
it, so nobody trusts it). The applier that finds the state untrusted stops;
one gateway takes the lock, makes a new epoch and replays the whole log into
it (announcing only what it had not announced before), the others wait and
go on from where it ends. An idle applier checks the state on every empty
pull, and a reader that saw a rolled-back state asks its applier to check.
A window started by an append for a user Redis does not know (new, or
expired while idle) is marked partial and rebuilt from the log after the
batch; its first message is not announced (L1s cannot tell what came before).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import uuid

import msgspec
import structlog
from nats.errors import Error as NatsError, TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from redis.exceptions import RedisError

from shared import metrics, stream, subjects
from shared.contract import Changed, LogEntry, Message, encode
from shared.service import Runtime
from shared.telemetry import tracer

from .fence import REBUILDING, Seen, State
from .log_guard import LogGuard
from .redis_window import ADVANCED, NO_STATE, OTHER_EPOCH, WENT_BACK, RedisWindow

log = structlog.get_logger()
_entry = msgspec.json.Decoder(LogEntry)
MAX_BATCH = 512
MAX_ACK_PENDING = 2 * MAX_BATCH
PULL_MAX_BYTES = 8 << 20
PULL_EXPIRES_S = 5.0  # an idle pull is renewed this often; no answer at all means it was lost
ACK_WAIT_S = 60.0
CONSUMER = "l2-gateway"
# 409s that end one pull, not the consumer (any other status: make the consumer again).
_PULL_OVER = ("Batch Completed", "Message Size Exceeds MaxBytes")
_WAKE = object()  # queued to wake the consumer for pending repairs or a state check
_IDLE = object()  # a pull ended without messages: the consumer has delivered the whole log
_JOIN_POLL_S = 0.2  # how often a gateway waiting for another's replay looks again
_WHY = {NO_STATE: "lost", OTHER_EPOCH: "another epoch", WENT_BACK: "rolled back"}


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


class ConsumerLost(Exception):
    """The pull consumer cannot be trusted to deliver every message in order any more."""


class LogPuller:
    """This replica's pull consumer on the whole log, from a seq on, one batch at a time."""

    def __init__(self, rt: Runtime, start_seq: int) -> None:
        self.rt = rt
        self.start_seq = start_seq
        # Bounded by the pulls: at most one pull's messages, plus wake-up markers.
        self.queue: asyncio.Queue = asyncio.Queue()
        self.name = f"{CONSUMER}-{uuid.uuid4().hex[:12]}"
        self._left = 0  # messages the pull in flight may still deliver
        self._sub = None
        self._reconnects = 0
        self._max_bytes = PULL_MAX_BYTES

    async def open(self) -> None:
        nc = self.rt.nc
        inbox = nc.new_inbox()
        self._sub = await nc.subscribe(inbox, cb=self.queue.put)
        self._inbox = inbox
        await self.rt.js.add_consumer(subjects.STREAM, ConsumerConfig(
            name=self.name, deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=self.start_seq, ack_policy=AckPolicy.ALL, ack_wait=ACK_WAIT_S,
            max_ack_pending=MAX_ACK_PENDING, inactive_threshold=60.0, mem_storage=True,
            num_replicas=1))
        self._reconnects = nc.stats["reconnects"]
        # A message can be as large as the server allows; a pull must fit one.
        self._max_bytes = max(PULL_MAX_BYTES, nc.max_payload + 4096)

    async def close(self) -> None:
        try:
            if self._sub is not None:
                await self._sub.unsubscribe()
            await self.rt.js.delete_consumer(subjects.STREAM, self.name)
        except Exception:  # noqa: BLE001 - gone already; inactive_threshold cleans up the rest
            pass

    async def next_batch(self) -> list:
        """Messages (and wake-up markers) in stream order, at least one; the next pull
        goes out before returning, so it arrives while this batch is applied."""
        if self._left == 0:
            await self._pull()
        out: list = []
        while not out:
            try:
                # `timeout`, not `wait_for`: no task per batch, one event-loop turn less
                # between a delivery and its apply (on every append's path).
                async with asyncio.timeout(PULL_EXPIRES_S + 5):
                    first = await self.queue.get()
            except TimeoutError:
                raise ConsumerLost("a pull got no answer") from None
            got = [first]
            while len(got) < MAX_BATCH + 1 and not self.queue.empty():
                got.append(self.queue.get_nowait())
            for msg in got:
                if msg is _WAKE or not msg.headers or not msg.headers.get("Status"):
                    if msg is not _WAKE:
                        self._left -= 1
                    out.append(msg)
                elif self._status(msg):
                    out.append(_IDLE)
            if self.rt.nc.stats["reconnects"] != self._reconnects:
                raise ConsumerLost("reconnected: deliveries may have been lost")
            if self._left == 0:
                await self._pull()
        return out

    def _status(self, msg) -> bool:
        """Handle a status message; True if it ended a pull that delivered nothing."""
        status, why = msg.headers.get("Status"), msg.headers.get("Description", "")
        if status in ("404", "408") or (status == "409" and why in _PULL_OVER):
            idle = status != "409" and self._left == MAX_BATCH
            self._left = 0  # this pull is over: expired, done, or the next message did not fit
            return idle
        if status != "100":  # 100: heartbeat
            raise ConsumerLost(f"{status} {why}")
        return False

    async def _pull(self) -> None:
        body = msgspec.json.encode({"batch": MAX_BATCH, "max_bytes": self._max_bytes,
                                    "expires": int(PULL_EXPIRES_S * 1e9)})
        await self.rt.nc.publish(f"$JS.API.CONSUMER.MSG.NEXT.{subjects.STREAM}.{self.name}",
                                 body, reply=self._inbox)
        self._left = MAX_BATCH


class RedisLost(Exception):
    """Redis's state is gone, replaced or rolled back: this epoch's windows cannot be trusted."""


class Applier:
    def __init__(self, rt: Runtime, window: RedisWindow, guard: LogGuard) -> None:
        self.rt = rt
        self.window = window
        self.fence = window.fence
        self.guard = guard
        self.position = 0  # every log message <= position is applied by us
        # The epoch this applier joined, and the highest position it saw there: its
        # batches go there and nowhere else. Not the fence's (shared with the readers,
        # which may have seen a newer epoch that another gateway is still replaying:
        # advancing that one with this position would mark the replay done too early).
        self.at = Seen()
        self.token = uuid.uuid4().hex  # this applier's value of the replay lock
        self.leading = False  # replaying the log into a new epoch, up to `_target`
        self._target = 0
        self._quiet_upto = 0  # messages up to here were announced before Redis was lost
        self._suspect = False  # a reader suspects the state: check it between two batches
        self._sweeper: asyncio.Task | None = None
        self._waiters: list[tuple[int, int, asyncio.Future]] = []  # heap by seq
        self._waiter_ids = itertools.count()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._repairs: dict[str, asyncio.Future] = {}
        self._dead = {r: metrics.dead_lettered.labels(CONSUMER, r)
                      for r in ("undecodable", "subject_mismatch")}

    async def repair(self, user_id: str, timeout: float) -> bool:
        """Rebuild the user's window from the log, between two applied batches
        (so that this applier does not apply to it meanwhile). False if it did
        not happen within `timeout`."""
        fut = self._repairs.get(user_id)
        if fut is None:
            fut = self._repairs[user_id] = asyncio.get_running_loop().create_future()
            self._queue.put_nowait(_WAKE)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except asyncio.TimeoutError:
            return False

    def repair_later(self, user_id: str) -> None:
        """Rebuild the user's window between two batches, nobody waiting (a read found it
        partial: its repair after the batch that started it failed or was lost)."""
        if user_id not in self._repairs:
            self._repairs[user_id] = asyncio.get_running_loop().create_future()
            self._queue.put_nowait(_WAKE)

    def on_bus_event(self, event: str, exc: Exception | None) -> None:
        """After a reconnect the pull in flight may be lost: wake the consumer so it is made
        again now, not when the pull's answer is overdue (up to ~10 s of appends unapplied)."""
        if event == "reconnected":
            self._queue.put_nowait(_WAKE)

    def suspect(self) -> None:
        """A reader saw the state go back: check it before the next batch (an idle
        applier would otherwise only notice at its next empty pull)."""
        if not self._suspect:
            self._suspect = True
            self._queue.put_nowait(_WAKE)

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
            puller = None
            try:
                if self.guard.lost:  # nothing to apply from; the guard's watch may see it restored
                    await asyncio.sleep(1.0)
                    continue
                start = await self._join()
                self.position = start
                puller = LogPuller(self.rt, start + 1)
                self._queue = puller.queue
                if self._repairs:
                    self._queue.put_nowait(_WAKE)
                await puller.open()
                log.info("applier_started", from_seq=start + 1, epoch=self.at.epoch,
                         replaying_to=self._target if self.leading else None)
                backoff = 0.1
                await self._consume(puller)
            except RedisLost as exc:
                log.error("l2_state_untrusted", why=str(exc), position=self.position)
                self._quiet_upto = max(self._quiet_upto, self.position)
                self.leading = False
            except (RedisError, OSError) as exc:
                log.warning("applier_redis_unavailable", error=str(exc), retry_in=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            except (ConsumerLost, NatsError, NatsTimeout, asyncio.TimeoutError) as exc:
                log.warning("applier_consumer_lost", error=str(exc) or repr(exc), retry_in=backoff)
                await self.guard.check()  # was the stream deleted under us?
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            finally:
                if puller is not None:
                    await puller.close()

    async def _join(self) -> int:
        """The position to apply from, in an epoch this process may trust: Redis's
        current one, or a new one this gateway makes and replays the log into
        (holding the lock), or, while another gateway replays, the position it
        reached once it is done. A replay whose gateway died (its lock expired) is
        carried on by whoever takes the lock next."""
        while True:
            seen = self.fence.seen
            state = await self.window.state()
            why = self.fence.judge(state, seen)
            if not why:
                self.leading = False
                self.at = Seen.of(state)
                return state.applied
            if not await self.window.take_lock(self.token):
                await asyncio.sleep(_JOIN_POLL_S)  # another gateway replays
                continue
            if why == REBUILDING:
                self.leading, self._target = True, state.rebuilding
                self.at = Seen.of(state)
                log.warning("l2_replay_taken_over", epoch=state.epoch, applied=state.applied)
                return state.applied
            if await self.window.state() != state:  # changed before we held the lock
                await self.window.release_lock(self.token)
                continue
            target = await stream.last_seq(self.rt.js)
            new = await self.window.new_epoch(self.fence.next_gen(state), target)
            self.fence.adopt(new)
            self.at = Seen.of(new)
            self.leading, self._target = target > 0, target
            if not self.leading:  # an empty log: nothing to replay
                await self.window.release_lock(self.token)
            log.warning("l2_new_epoch", epoch=new.epoch, why=why, replaying_to=target)
            return 0

    async def _consume(self, puller: LogPuller) -> None:
        while True:
            batch = await puller.next_batch()
            items = []
            last = None  # the batch's last log message: acked, and the position once applied
            idle = False
            for msg in batch:
                if msg is _WAKE:
                    continue
                if msg is _IDLE:
                    idle = True
                    continue
                last = msg
                seq = _stream_seq(msg.reply)
                if seq <= self.position:
                    continue  # redelivered, or replayed after a consumer reset
                entry = await self._check(msg, seq)
                if entry is not None:
                    items.append((entry.user_id, entry.at(seq), len(msg.data)))
            if last is not None:
                upto = _stream_seq(last.reply)
                if upto > self.position:
                    await self._apply(items, upto)
                await self.rt.nc.publish(last.reply, b"+ACK")  # AckAll: every message up to it
            if idle or self._suspect:
                # Idle: every message in the log was delivered and applied, so a replay
                # has reached its target even if the target itself was purged since.
                self._suspect = False
                await self._apply([], max(self.position, self._target) if idle and self.leading
                                  else self.position)
            if self._repairs:
                await self._run_repairs()

    async def _check(self, msg, seq: int) -> LogEntry | None:
        """The message's log entry, or None after dead-lettering it (see the module docstring)."""
        try:
            entry = _entry.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            reason, detail = "undecodable", str(exc)
        else:
            if msg.subject == subjects.log_subject(entry.user_id):
                return entry
            reason, detail = "subject_mismatch", "the subject is not memory.log.<its user_id>"
        self._dead[reason].inc()
        log.error("log_message_dead_lettered", seq=seq, subject=msg.subject, reason=reason,
                  detail=detail)
        try:
            await stream.dead_letter(self.rt.request_msg, CONSUMER, msg.subject, seq, msg.data,
                                     f"{reason}: {detail}", self.rt.settings.request_timeout_s)
        except (stream.PublishError, NatsError, NatsTimeout) as exc:
            # It stays in MEMORY at `seq`; the log line above says where.
            log.error("dead_letter_failed", seq=seq, error=str(exc) or repr(exc))
        return None

    async def _run_repairs(self) -> None:
        repairs, self._repairs = self._repairs, {}
        for user_id, fut in repairs.items():
            _settle(fut, await self._rebuild_user(user_id) is not None)

    async def _rebuild_user(self, user_id: str) -> list[int] | None:
        """Make the user's window what the log holds now; the seqs it holds, or None if
        that failed. The log is read whole, not only up to `position`: other gateways
        apply newer messages meanwhile, and a window older than what they applied is
        refused (read again, a few times)."""
        try:
            for _ in range(3):
                log_ = await stream.user_log(self.rt.nc, user_id)
                size = sum(len(encode(m.entry)) for m in log_)
                done = await self.window.rebuild(
                    self.at.epoch, user_id, [m.entry.at(m.seq) for m in log_[-self.window.window:]], len(log_),
                    size)
                if done:
                    log.info("l2_window_repaired", user_id=user_id, messages=len(log_))
                    return [m.seq for m in log_]
            log.warning("l2_window_repair_overtaken", user_id=user_id)
        except Exception as exc:  # noqa: BLE001 - a failed repair must not stop applying
            log.error("l2_window_repair_failed", user_id=user_id, error=str(exc))
        return None

    async def _apply(self, items: list[tuple[str, Message, int]], upto: int) -> None:
        at = self.at
        backoff = 0.05
        while True:
            try:
                with tracer.start_as_current_span("redis apply", attributes={"batch": len(items)}):
                    results, code, applied = await self.window.apply_batch(
                        items, upto, at, self.token, self.leading)
                break
            except (RedisError, OSError) as exc:
                log.warning("apply_retry", error=str(exc), retry_in=backoff, batch=len(items))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
        if code != ADVANCED:
            raise RedisLost(_WHY[code])  # nothing announced: the writes went to a dead epoch
        reached = State(at.epoch, at.gen, applied)
        self.at = at.after(reached)
        self.fence.saw(reached)
        self.position = max(self.position, upto)
        if self.leading and applied >= self._target:
            self.leading = False
            log.warning("l2_replay_done", epoch=at.epoch, applied=applied)
            # Beside the applier (a scan of every key): a rebuild must not wait for it.
            self._sweeper = asyncio.create_task(self._sweep(at.epoch))
        # A window started partial (the user was new, or expired while idle) counts
        # prev_seq and count from its first message only: rebuild it from the log
        # before the appends waiting see it, and announce its messages as the log says.
        partial = list({item[0]: None for item, res in zip(items, results) if res[3]})
        announce = [(user_id, msg, int(prev_seq), int(count))
                    for (user_id, msg, _), (done, prev_seq, count, *_) in zip(items, results)
                    if done and user_id not in partial]
        rebuilt = await asyncio.gather(*(self._rebuild_user(u) for u in partial))
        for user_id, seqs in zip(partial, rebuilt):
            if seqs is None:  # stays partial (reads pass down) until a later try succeeds
                self.repair_later(user_id)
            else:
                at = {seq: i for i, seq in enumerate(seqs)}
                announce.extend((user, msg, seqs[at[msg.seq] - 1] if at[msg.seq] else 0,
                                 at[msg.seq] + 1)
                                for (user, msg, _), res in zip(items, results)
                                if user == user_id and res[0] and msg.seq in at)
        for user_id, msg, prev_seq, count in sorted(announce, key=lambda a: a[1].seq):
            if msg.seq > self._quiet_upto:
                event = Changed(op="append", user_id=user_id, seq=msg.seq, prev_seq=prev_seq,
                                count=count, message=msg)
                await self.rt.nc.publish(subjects.changed_subject(user_id), encode(event))
        self._wake()

    async def _sweep(self, epoch: str) -> None:
        try:
            gone = await self.window.sweep(epoch)
            log.info("l2_old_epochs_swept", epoch=epoch, keys=gone)
        except (RedisError, OSError) as exc:  # idle expiry removes them in the end
            log.warning("l2_sweep_failed", error=str(exc))

    def _wake(self) -> None:
        waiters = self._waiters
        while waiters and waiters[0][0] <= self.position:
            _settle(heapq.heappop(waiters)[2], True)
