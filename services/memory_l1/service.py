"""memory-l1: the sidecar next to each agent worker.

Answers `memory.get` (queue group) and `memory.get.<l1-id>` (this sidecar)
from the windows in `window.WindowStore` when a window can answer completely;
passes everything else to `memory.l2.get`, and fills a window from the reply
of a recent-miss (one L2 read in flight per user; concurrent misses wait for
it). Windows follow the `memory.changed.*` broadcast.

Core NATS delivers that broadcast at most once. A lost append shows up as a
gap and drops one window; a lost forget would not show, so whenever events
may have been lost (a reconnect, or the subscription's queue filling up) every
window is dropped.
"""

from __future__ import annotations

import asyncio

import msgspec
import structlog
from nats.aio.msg import Msg
from opentelemetry import trace

from services.memory_l1.window import BEHIND, MISS, TOO_MANY, WindowStore
from shared import metrics, subjects
from shared.served import Served
from shared.contract import Changed, EvictRequest, GetReply, GetRequest, check_get, decoder
from shared.errors import Unavailable
from shared.ids import from_token
from shared.service import Runtime

log = structlog.get_logger()

_changed = decoder(Changed)
_reply = decoder(GetReply)
_evict = decoder(EvictRequest)
SEARCH = "search"
# The events subscription's queue; reaching it means nats-py dropped events.
EVENTS_PENDING_MSGS = 65_536
EVENTS_PENDING_BYTES = 64 * 1024 * 1024


async def build(rt: Runtime, *, store: WindowStore | None = None) -> None:
    """Wire the sidecar (`store` lets tests look inside)."""
    s = rt.settings
    if store is None:
        store = WindowStore(s.l1_window, s.l1_max_users, max_bytes=s.l1_max_bytes)
    sidecar = Sidecar(rt, store)
    rt.spawn(sidecar.served.run(), "served-records")
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

    async def listen(self) -> None:
        self._events = await self.rt.nc.subscribe(
            subjects.CHANGED_ALL, cb=self.on_changed,
            pending_msgs_limit=EVENTS_PENDING_MSGS, pending_bytes_limit=EVENTS_PENDING_BYTES)
        # Every sidecar drops the window: any of them may hold the same stale copy.
        await self.rt.nc.subscribe(subjects.MEMORY_L1_EVICT, cb=self.on_evict)

    # --- reads ---------------------------------------------------------------

    def hit(self, req: GetRequest) -> GetReply | None:
        """The answer if it is an L1 hit (the wrapper sends it inline), else None."""
        if req.op != "recent" or self._stats["reconnects"] != self._reconnects:
            return None
        answer = self.store.recent(req.user_id, req.n, req.min_seq)
        if answer.__class__ is GetReply:
            self._answered(req, answer)
            return answer
        return None

    async def get(self, req: GetRequest) -> GetReply | msgspec.Raw:
        check_get(req)
        self._check_reconnected()
        if req.op == "recent":
            answer = self.store.recent(req.user_id, req.n, req.min_seq)
            if answer.__class__ is GetReply:
                self._answered(req, answer)
                return answer
            reason = answer
        else:
            reason = SEARCH
        self._down[reason].inc()
        trace.get_current_span().set_attribute("tiermem.l1.passed_down", reason)
        if reason == TOO_MANY or reason == SEARCH:
            # nothing to fill from: pass the lower tier's JSON through undecoded
            return await self.rt.request(subjects.MEMORY_L2_GET, req, msgspec.Raw)
        return await self._fill(req)

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

    async def on_changed(self, msg: Msg) -> None:
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
        self.store.apply(ev)

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
