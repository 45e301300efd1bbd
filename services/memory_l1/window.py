"""The sidecar's policy: per-user windows of the newest messages, no I/O.

A window holds the newest <= `size` messages of one user and `seq`, the newest
seq of that user it has applied. It is contiguous: every message of the user
with seq in (oldest-in-window .. seq] is in it. `complete` means it holds all
of the user's messages. Anything that could break contiguity (a gap in the
change events, an event that makes no sense) drops the window instead; the
next read refills it from L2. A window therefore may be behind, never wrong,
and `min_seq` tells a read whether behind is good enough.

Windows live in an LRU bounded by `max_users` and by `max_bytes`, the text
bytes all windows hold together: a sidecar's memory must not depend on how
long its users' messages are (10 windows of 64 KiB texts are 640 KiB, 50,000
of them 32 GB). Either bound evicts whole windows, least recently used
first; a window alone over `max_bytes` is not kept (and evicts nothing). A forget leaves a tombstone (a
bounded LRU too) so that neither an L2 reply read before the forget nor a late
event from before it brings the user back; fills in flight at a forget are
voided, and a "first message" event older than any evicted tombstone is
ignored, so evicting a tombstone does not reopen the hole.

While a fill is in flight, change events for its user are recorded and
replayed onto the installed window, so that a reply that is one message
behind does not cost the next read another round trip.

A safety net under all of that: a window older than `ttl_s` since it was
filled (since its L2 read was sent, or since the event that made it) is a
miss, and the next read refills it. Events arrive at most once: a sidecar
that missed a forget cannot tell, and would serve the forgotten window for as
long as it kept it; with the TTL, for at most `ttl_s`. Later events do not
renew it: an event shows the window is contiguous, not that no forget
was missed in between. The cost is one L2 read per active user per `ttl_s`.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from shared.contract import Changed, GetReply, Message

MISS = "miss"
BEHIND = "behind_min_seq"
TOO_MANY = "too_many"


class Window:
    __slots__ = ("seq", "messages", "complete", "bytes", "born")

    def __init__(self, seq: int, messages: list[Message], complete: bool, born: float) -> None:
        self.seq = seq
        self.messages = messages  # oldest first, at most `size`
        self.complete = complete
        self.bytes = sum(map(text_bytes, messages))  # counted against `max_bytes`
        self.born = born  # the store's clock when its content was read (the TTL counts from it)

    def __repr__(self) -> str:
        return (f"Window(seq={self.seq}, complete={self.complete}, "
                f"seqs={[m.seq for m in self.messages]})")


class Fill:
    """One L2 read in flight that may become a window when its reply arrives."""

    __slots__ = ("user_id", "asked", "events", "void", "sent")

    def __init__(self, user_id: str, asked: int, sent: float) -> None:
        self.user_id = user_id
        self.asked = asked
        self.sent = sent  # when the read went out: its reply is at most this fresh
        self.events: list[Changed] = []  # change events seen meanwhile
        self.void = False  # set when the reply must not be installed


class WindowStore:
    """Windows of the users this sidecar serves, updated by change events and fills."""

    def __init__(self, size: int = 10, max_users: int = 50_000, *,
                 max_bytes: int = 256 * 1024 * 1024, max_buffered: int = 64,
                 ttl_s: float = 300.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.size = size
        self.max_users = max_users
        self.max_bytes = max_bytes
        self.max_buffered = max_buffered
        self.ttl_s = ttl_s
        self.clock = clock
        self.bytes = 0  # text bytes of every window held
        self._windows: OrderedDict[str, Window] = OrderedDict()
        self._tombstones: OrderedDict[str, int] = OrderedDict()
        self._fills: dict[str, list[Fill]] = {}
        self._floor = 0  # newest forget among the tombstones evicted

    def __len__(self) -> int:
        return len(self._windows)

    def window(self, user_id: str) -> Window | None:
        """The user's window, without touching its recency (for tests and metrics)."""
        return self._windows.get(user_id)

    # --- reads ---------------------------------------------------------------

    def recent(self, user_id: str, n: int, min_seq: int | None) -> GetReply | str:
        """The newest `n` messages as an l1 reply, or why L1 cannot answer (a reason)."""
        if n > self.size:
            return TOO_MANY
        w = self._windows.get(user_id)
        if w is None:
            return MISS
        if self.clock() - w.born > self.ttl_s:
            self.drop(user_id)  # the safety net: it may hold what a lost event would have removed
            return MISS
        if min_seq is not None and w.seq < min_seq:
            return BEHIND
        msgs = w.messages
        if len(msgs) < n and not w.complete:
            return MISS
        self._windows.move_to_end(user_id)
        return GetReply(user_id, "l1", w.seq, msgs[-n:])

    def fill_size(self, n: int) -> int | None:
        """How many messages to ask L2 for so the reply can fill a window (None: it cannot)."""
        return max(n, self.size) if n <= self.size else None

    # --- change events -------------------------------------------------------

    def matters(self, ev: Changed) -> bool:
        """Could applying `ev` change anything here? False: it is a no-op, whatever it says."""
        user = ev.user_id
        return ev.op == "forget" or ev.prev_seq == 0 or user in self._windows or user in self._fills

    def apply(self, ev: Changed) -> None:
        user = ev.user_id
        if ev.op == "forget":
            self._forget(user, ev.seq)
            return
        fills = self._fills.get(user)
        if fills:
            for fill in fills:
                if len(fill.events) < self.max_buffered:
                    fill.events.append(ev)
                else:
                    fill.void = True  # a busy user: don't guess, let the next read refill
        self._append(ev)

    def _append(self, ev: Changed) -> None:
        user = ev.user_id
        tomb = self._tombstones.get(user)
        if tomb is not None and ev.seq <= tomb:
            return  # from before a forget
        if ev.prev_seq == 0 and ev.seq <= self._floor:
            return  # maybe from before a forget whose tombstone is gone
        msg = ev.message
        sane = msg is not None and msg.seq == ev.seq and ev.prev_seq < ev.seq
        w = self._windows.get(user)
        if w is None:
            if sane and ev.prev_seq == 0 and ev.count == 1:  # a brand-new user
                self._put(user, Window(ev.seq, [msg], True, self.clock()))
            return
        if w.seq >= ev.seq:
            return  # duplicate or old
        if not sane or ev.prev_seq != w.seq or (w.complete and ev.count != len(w.messages) + 1):
            self.drop(user)  # we missed something
            return
        msgs = w.messages
        msgs.append(msg)
        grown = text_bytes(msg)
        if len(msgs) > self.size:
            grown -= text_bytes(msgs.pop(0))
        w.bytes += grown
        self.bytes += grown
        w.seq = ev.seq
        w.complete = w.complete and ev.count <= self.size
        if w.bytes > self.max_bytes:
            self.drop(user)  # too big to keep at all: no reason to evict the others
            return
        self._windows.move_to_end(user)
        self._evict()

    def _forget(self, user: str, seq: int) -> None:
        self.drop(user)
        for fill in self._fills.get(user, ()):
            fill.void = True  # it may have read before the forget
        if self._tombstones.get(user, -1) < seq:
            self._tombstones[user] = seq
        self._tombstones.move_to_end(user)
        while len(self._tombstones) > self.max_users:
            _, gone = self._tombstones.popitem(last=False)
            self._floor = max(self._floor, gone)

    def drop(self, user_id: str) -> None:
        w = self._windows.pop(user_id, None)
        if w is not None:
            self.bytes -= w.bytes

    def clear(self) -> None:
        """Forget everything: events may have been lost (reconnect, slow consumer)."""
        self._windows.clear()
        self.bytes = 0
        for fills in self._fills.values():
            for fill in fills:
                fill.void = True

    # --- fills ---------------------------------------------------------------

    def begin_fill(self, user_id: str, asked: int) -> Fill:
        fill = Fill(user_id, asked, self.clock())
        self._fills.setdefault(user_id, []).append(fill)
        return fill

    def finish_fill(self, fill: Fill, reply: GetReply) -> bool:
        """Install the reply of `fill` and replay the events seen meanwhile."""
        self._end(fill)
        if fill.void or not self.install(fill.user_id, reply, fill.asked, fill.sent):
            return False
        for ev in sorted(fill.events, key=_by_seq):
            self._append(ev)
        return True

    def abort_fill(self, fill: Fill) -> None:
        self._end(fill)

    def install(self, user_id: str, reply: GetReply, asked: int, sent: float | None = None) -> bool:
        """Make a window from an L2 reply to `recent` with n=`asked` (a read sent at `sent`,
        default now), unless it is older."""
        tomb = self._tombstones.get(user_id)
        if tomb is not None and reply.seq <= tomb:
            return False
        w = self._windows.get(user_id)
        if w is not None and w.seq >= reply.seq:
            return False
        msgs = reply.messages
        if msgs and msgs[-1].seq > reply.seq:
            return False  # not a reply we understand
        keep = msgs[max(0, len(msgs) - self.size):]
        born = self.clock() if sent is None else sent
        self._put(user_id, Window(reply.seq, keep, len(msgs) < asked, born))
        return True

    def _end(self, fill: Fill) -> None:
        fills = self._fills.get(fill.user_id)
        if fills is not None:
            try:
                fills.remove(fill)
            except ValueError:
                pass
            if not fills:
                del self._fills[fill.user_id]

    def _put(self, user_id: str, w: Window) -> None:
        self.drop(user_id)
        if w.bytes > self.max_bytes:
            return  # too big to keep at all: no reason to evict the others
        self._windows[user_id] = w
        self.bytes += w.bytes
        self._evict()

    def _evict(self) -> None:
        """Least recently used windows out until both bounds hold."""
        windows = self._windows
        while windows and (len(windows) > self.max_users or self.bytes > self.max_bytes):
            _, w = windows.popitem(last=False)
            self.bytes -= w.bytes


def text_bytes(msg: Message) -> int:
    """What a message costs against `max_bytes`: its text's UTF-8 bytes, as the
    contract's text limit counts them (a lone surrogate, which no append stores but a
    forged event may carry, must not raise here)."""
    return len(msg.text.encode("utf-8", "surrogatepass"))


def _by_seq(ev: Changed) -> int:
    return ev.seq
