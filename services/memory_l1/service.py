"""memory-l1: the sidecar next to each agent worker.

Answers `memory.get` (queue group) and `memory.get.<l1-id>` (this sidecar)
from the windows in `window.WindowStore` when a window can answer completely;
passes everything else to `memory.l2.get`, and fills a window from the reply
of a recent-miss (one L2 read in flight per user; concurrent misses wait for
it). Windows follow the `memory.changed.*` broadcast.

Core NATS delivers that broadcast at most once. A lost append shows up as a
gap and drops one window; a lost forget would not show, so whenever events
may have been lost (a reconnect, the subscription's queue filling up, events
that could not be checked) every window is dropped; and a window lives at most
`L1_TTL_S`, for the losses nothing shows.

Events arrive on their own subscription, whose callbacks nats-py runs in a
task of their own: a read that arrived after an event (a forget, an append)
could be answered before that event is applied (seen after a SIGSTOP: the
forget broadcast and the next read were in the socket together). A read
first waits until every event received before it is applied.

An event is applied only once its seq is known to lie within the log
(`gate.SeqGate`): a forged one with a huge seq would stick. A read of a
user whose event is being checked waits for that check (briefly): the
event may be a forget, or the append the read is behind.
"""

from __future__ import annotations

import asyncio

import msgspec
import structlog
from nats.aio.msg import Msg
from opentelemetry import trace

from services.memory_l1.context import assemble
from services.memory_l1.gate import SeqGate
from services.memory_l1.window import BEHIND, MISS, TOO_MANY, WindowStore
from shared import metrics, stream, subjects
from shared.served import Served
from shared.contract import (
    Changed, ContextParts, EvictRequest, GetReply, GetRequest, check_get, decoder, encode, fit_reply,
)
from shared.errors import PayloadTooLarge, TierError, Unavailable
from shared.ids import from_token
from shared.retention import Retention
from shared.service import Runtime

log = structlog.get_logger()

_changed = decoder(Changed)
_reply = decoder(GetReply)
_evict = decoder(EvictRequest)
SEARCH = "search"
# The events subscription's queue; reaching it means nats-py dropped events.
EVENTS_PENDING_MSGS = 65_536
EVENTS_PENDING_BYTES = 64 * 1024 * 1024
# How long a read behind min_seq waits for held events to be checked before going to L2
# (a check is one JetStream API round trip, well under a millisecond when all is well).
CHECK_WAIT_S = 0.1
# A context is served without L3's parts rather than wait longer than this for them.
CONTEXT_PARTS_TIMEOUT_S = 1.0


async def build(rt: Runtime, *, store: WindowStore | None = None) -> None:
    """Wire the sidecar (`store` lets tests look inside)."""
    s = rt.settings
    if store is None:
        # Never more of a user's messages than the log keeps (shared.retention).
        store = WindowStore(Retention.from_settings(s).window(s.l1_window), s.l1_max_users,
                            max_bytes=s.l1_max_bytes, ttl_s=s.l1_ttl_s)
    sidecar = Sidecar(rt, store)
    rt.spawn(sidecar.served.run(), "served-records")
    rt.spawn(sidecar.check_events(), "event-checks")
    await sidecar.listen()
    rt.endpoint("get", subjects.MEMORY_GET, GetRequest, sidecar.get, fast=sidecar.hit)
    # The subject is this sidecar's alone (nats.micro puts it in queue group "q" anyway).
    rt.endpoint("get-direct", subjects.memory_get_direct(s.l1_id), GetRequest, sidecar.get,
                queue_group=None, fast=sidecar.hit)


class _Flight:
    """A fill in flight for one user; its reply satisfies `min_seq`."""

    __slots__ = ("min_seq", "result")

    def __init__(self, min_seq: int | None, result: asyncio.Future) -> None:
        self.min_seq = min_seq
        self.result = result


class Sidecar:
    def __init__(self, rt: Runtime, store: WindowStore) -> None:
        self.rt = rt
        self.store = store
        self._stats = rt.nc.stats
        self._reconnects = self._stats["reconnects"]
        self._events = None
        self._flights: dict[str, _Flight] = {}
        self._hit = metrics.answers.labels("l1", "recent")
        self.served = Served.from_settings(rt.nc, "memory-l1", rt.settings)
        self._l1_id = rt.settings.l1_id
        self._down = {r: metrics.passed_down.labels("l1", r)
                      for r in (MISS, BEHIND, TOO_MANY, SEARCH)}
        self.gate = SeqGate()
        self._check = asyncio.Event()  # events are held: run a check
        self._checked: list[tuple[str, asyncio.Future]] = []  # reads waiting for a user's held events
        self._refused = metrics.rejected.labels("memory-l1", "seq_beyond_log")
        self._events_done = 0  # events taken off the subscription's queue and handled
        self._events_waiters: list[tuple[int, asyncio.Future]] = []

    async def listen(self) -> None:
        self._events = await self.rt.nc.subscribe(
            subjects.CHANGED_ALL, cb=self.on_changed,
            pending_msgs_limit=EVENTS_PENDING_MSGS, pending_bytes_limit=EVENTS_PENDING_BYTES)
        # Every sidecar drops the window: any of them may hold the same stale copy.
        await self.rt.nc.subscribe(subjects.MEMORY_L1_EVICT, cb=self.on_evict)

    # --- reads ---------------------------------------------------------------

    def hit(self, req: GetRequest) -> msgspec.Raw | None:
        """The answer if it is an L1 hit (the wrapper sends it inline), else None.

        A hit too large to send raises 413 here, so the full path refuses it.
        """
        if (req.op != "recent" or self._stats["reconnects"] != self._reconnects
                or self._events_queued() or self.gate.holds(req.user_id)):
            return None
        answer = self.store.recent(req.user_id, req.n, req.min_seq)
        if answer.__class__ is GetReply:
            body = fit_reply(answer, "recent", self.rt.nc.max_payload)
            self._answered(req, answer)
            return body
        return None

    async def get(self, req: GetRequest) -> msgspec.Raw:
        check_get(req)
        if req.op == "context":
            return await self._context(req)
        if (queued := self._events_queued()) and not await self._events_handled(
                self._events_done + queued):
            return await self._pass_through(req, BEHIND)  # events before it are not applied
        self._check_reconnected()
        if req.op == "recent":
            if self.gate.holds(req.user_id):  # a held event (a forget, too) comes first
                await self._events_checked(req.user_id)
                if self.gate.holds(req.user_id):
                    return await self._pass_through(req, BEHIND)
            answer = self.store.recent(req.user_id, req.n, req.min_seq)
            if answer.__class__ is GetReply:
                body = fit_reply(answer, "recent", self.rt.nc.max_payload)
                self._answered(req, answer)
                return body
            reason = answer
        else:
            reason = SEARCH
        if reason == TOO_MANY or reason == SEARCH:  # nothing to fill from
            return await self._pass_through(req, reason)
        self._passed_down(reason)
        try:
            return fit_reply(await self._fill(req), "recent", self.rt.nc.max_payload)
        except PayloadTooLarge:
            if self.store.fill_size(req.n) == req.n:
                raise
            # The window a fill asks for is too big to send; what the caller asked may not be.
            return await self.rt.request(subjects.MEMORY_L2_GET, req, msgspec.Raw)

    async def _context(self, req: GetRequest) -> msgspec.Raw:
        """The recent window as `recent` serves it (read-your-writes), plus L3's parts
        below it; without those parts (L3 down or slow) the window alone, saying so."""
        recent = _reply.decode(await self.get(GetRequest(req.user_id, "recent", req.n, req.min_seq)))
        before = recent.messages[0].seq if recent.messages else recent.seq + 1
        parts = None
        try:
            parts = await self.rt.request(
                subjects.MEMORY_L2_GET,  # the gateway passes what is not `recent` on to L3
                GetRequest(req.user_id, "context", query=req.query, k=req.k, before_seq=before),
                ContextParts, timeout=CONTEXT_PARTS_TIMEOUT_S)
        except TierError as exc:
            log.warning("context_parts_unavailable", error=exc.message, code=exc.code)
            metrics.context_parts.labels("l3", "missing").inc()
        reply = assemble(recent, parts, req.budget_tokens, want_relevant=req.query is not None)
        for part, served in (("summary", reply.summary is not None), ("relevant", bool(reply.relevant))):
            metrics.context_parts.labels(part, "served" if served else "none").inc()
        body = encode(reply)
        if len(body) > self.rt.nc.max_payload:
            raise PayloadTooLarge(f"the context is {len(body)} bytes, over max_payload "
                                  f"{self.rt.nc.max_payload}; ask for a smaller budget_tokens")
        return msgspec.Raw(body)

    def _passed_down(self, reason: str) -> None:
        self._down[reason].inc()
        trace.get_current_span().set_attribute("tiermem.l1.passed_down", reason)

    async def _pass_through(self, req: GetRequest, reason: str) -> msgspec.Raw:
        """L2's answer, its JSON passed on undecoded, no window filled from it."""
        self._passed_down(reason)
        return await self.rt.request(subjects.MEMORY_L2_GET, req, msgspec.Raw)

    def _answered(self, req: GetRequest, answer: GetReply) -> None:
        self._hit.inc()
        self.served.memory("l1", req.user_id, "recent", req.n, req.min_seq, answer.seq,
                           answer.messages, self._l1_id)

    async def _fill(self, req: GetRequest) -> GetReply:
        flight = self._flights.get(req.user_id)
        min_seq = req.min_seq
        if flight is not None and (min_seq is None or (
                flight.min_seq is not None and flight.min_seq >= min_seq)):
            # Its reply is complete through its min_seq, so through ours too.
            return _newest(await asyncio.shield(flight.result), req.n)
        return _newest(await self._lead(req), req.n)

    async def _lead(self, req: GetRequest) -> GetReply:
        """Ask L2 for enough to fill the window; install; share the reply with waiters."""
        user = req.user_id
        asked = self.store.fill_size(req.n)
        flight = _Flight(req.min_seq, asyncio.get_running_loop().create_future())
        self._flights[user] = flight
        fill = self.store.begin_fill(user, asked)
        try:
            reply = await self.rt.request(
                subjects.MEMORY_L2_GET, GetRequest(user, "recent", asked, req.min_seq),
                GetReply, decoder=_reply)
        except BaseException as exc:
            self.store.abort_fill(fill)
            shared = exc if isinstance(exc, Exception) else Unavailable("memory-l1 is stopping")
            flight.result.set_exception(shared)
            flight.result.exception()  # retrieved: nobody may be waiting
            raise
        else:
            self._check_reconnected()  # voids this fill if events were lost meanwhile
            self.store.finish_fill(fill, reply)
            flight.result.set_result(reply)
            return reply
        finally:
            if self._flights.get(user) is flight:
                del self._flights[user]

    # --- change events -------------------------------------------------------

    def _events_queued(self) -> int:
        """Events received (before the request being handled) and not yet applied."""
        sub = self._events
        return sub.pending_msgs if sub is not None else 0

    async def _events_handled(self, count: int) -> bool:
        """Wait (at most CHECK_WAIT_S) until `count` events in all have been handled."""
        waiter = (count, asyncio.get_running_loop().create_future())
        self._events_waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter[1], CHECK_WAIT_S)
            return True
        except asyncio.TimeoutError:
            if waiter in self._events_waiters:
                self._events_waiters.remove(waiter)
            return False

    async def on_changed(self, msg: Msg) -> None:
        try:
            self._on_changed(msg)
        finally:
            self._events_done += 1
            if self._events_waiters:
                waiting, self._events_waiters = self._events_waiters, []
                for count, fut in waiting:
                    if count > self._events_done:
                        self._events_waiters.append((count, fut))
                    elif not fut.done():
                        fut.set_result(None)

    def _on_changed(self, msg: Msg) -> None:
        self._check_reconnected()
        sub = self._events
        if sub is not None and (
                sub.pending_msgs >= EVENTS_PENDING_MSGS - 1
                or sub.pending_bytes >= EVENTS_PENDING_BYTES - 2 * self.rt.nc.max_payload):
            self._lost("events_queue_full")  # nats-py may have dropped some
        try:
            ev = _changed.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
            user = from_token(msg.subject.rpartition(".")[2])
            log.warning("bad_change_event", subject=msg.subject, error=str(exc))
            self.store.drop(user)
            return
        if self.gate.admit(ev, self.store.matters(ev)):
            self.store.apply(ev)
        else:
            self._check.set()

    async def check_events(self) -> None:
        """Check held events against the stream's last seq, one request at a time."""
        while True:
            await self._check.wait()
            self._check.clear()
            while self.gate.waiting:
                number = self.gate.begin()
                try:
                    last = await stream.last_seq(self.rt.js)
                except Exception as exc:  # noqa: BLE001 - no stream, no JetStream, no answer
                    log.warning("change_events_unchecked", dropped=self.gate.fail(), error=repr(exc))
                    self._lost("change_events_unchecked")
                    self._wake()
                    break
                apply, refused = self.gate.settle(number, last)
                for ev in apply:
                    self.store.apply(ev)
                for ev in refused:
                    self._refused.inc()
                    log.warning("change_event_beyond_log", user_id=ev.user_id, seq=ev.seq,
                                last_seq=last, op=ev.op)
                self._wake()

    async def _events_checked(self, user_id: str) -> None:
        """Wait (at most CHECK_WAIT_S) until no event of this user is held.

        Waiting for "the user's events", not for a refresh number: a refresh
        already in flight may settle them, and then no further one runs.
        """
        fut = asyncio.get_running_loop().create_future()
        self._checked.append((user_id, fut))
        try:
            await asyncio.wait_for(fut, CHECK_WAIT_S)
        except asyncio.TimeoutError:
            pass

    def _wake(self) -> None:
        """After a refresh settled (or failed): wake the reads whose user has nothing held now."""
        waiting = self._checked
        self._checked = []
        for user_id, fut in waiting:
            if self.gate.holds(user_id):
                self._checked.append((user_id, fut))
            elif not fut.done():
                fut.set_result(None)

    async def on_evict(self, msg: Msg) -> None:
        try:
            user = _evict.decode(msg.data).user_id
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
            log.warning("bad_evict_request", error=str(exc))
            return
        self.store.drop(user)
        log.warning("l1_window_evicted", user_id=user)

    def _check_reconnected(self) -> None:
        if self._stats["reconnects"] != self._reconnects:
            self._lost("reconnected")  # events sent while we were away are gone

    def _lost(self, why: str) -> None:
        self._reconnects = self._stats["reconnects"]
        log.warning("l1_windows_dropped", reason=why, windows=len(self.store))
        self.store.clear()


def _newest(reply: GetReply, n: int) -> GetReply:
    if len(reply.messages) <= n:
        return reply
    return GetReply(reply.user_id, reply.tier, reply.seq, reply.messages[-n:])
