"""The L1 window policy, without I/O: unit tests and a property test against a truth log."""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from services.memory_l1.window import BEHIND, MISS, TOO_MANY, WindowStore
from shared.contract import Changed, GetReply, Message


def msg(seq: int) -> Message:
    return Message(seq=seq, msg_id=f"m{seq}", role="user", bot_id="bot", text=f"text {seq}",
                   ts="2026-11-26T07:00:00.000Z")


def appended(user: str, seq: int, prev: int, count: int) -> Changed:
    return Changed(op="append", user_id=user, seq=seq, prev_seq=prev, count=count, message=msg(seq))


def forgot(user: str, seq: int) -> Changed:
    return Changed(op="forget", user_id=user, seq=seq, prev_seq=0, count=0)


def l2(user: str, seqs, asked: int = 10) -> GetReply:
    """What L2 answers to `recent` n=`asked` for a user whose messages have `seqs`."""
    seqs = list(seqs)
    return GetReply(user, "l2", seqs[-1] if seqs else 0, [msg(s) for s in seqs[-asked:]])


def seqs_of(answer) -> list[int]:
    assert isinstance(answer, GetReply), answer
    return [m.seq for m in answer.messages]


def filled(user: str, seqs, size: int = 10, **kw) -> WindowStore:
    store = WindowStore(size, **kw)
    assert store.install(user, l2(user, seqs, size), size)
    return store


# --- reads ------------------------------------------------------------------


def test_a_user_without_window_misses():
    assert WindowStore().recent("u", 5, None) == MISS


def test_a_filled_window_answers_the_newest_n_oldest_first():
    store = filled("u", range(1, 31))
    answer = store.recent("u", 3, None)
    assert answer.tier == "l1" and answer.seq == 30 and answer.user_id == "u"
    assert seqs_of(answer) == [28, 29, 30]
    assert seqs_of(store.recent("u", 10, None)) == list(range(21, 31))


def test_more_than_the_window_is_passed_down_even_with_the_whole_history():
    store = filled("u", [1, 2])
    assert store.recent("u", 11, None) == TOO_MANY


def test_a_short_history_is_complete_and_answers_any_n_up_to_the_window():
    store = filled("u", [4, 7, 9])
    assert store.window("u").complete
    assert seqs_of(store.recent("u", 10, None)) == [4, 7, 9]


def test_a_short_window_without_the_whole_history_misses_a_larger_n():
    store = WindowStore(10)
    assert store.install("u", l2("u", range(1, 6), asked=5), 5)  # 5 asked, 5 came: maybe more
    assert not store.window("u").complete
    assert seqs_of(store.recent("u", 5, None)) == [1, 2, 3, 4, 5]
    assert store.recent("u", 6, None) == MISS


def test_a_window_behind_min_seq_is_passed_down():
    store = filled("u", [3, 5])
    assert store.recent("u", 2, 6) == BEHIND
    assert seqs_of(store.recent("u", 2, 5)) == [3, 5]
    assert seqs_of(store.recent("u", 2, 0)) == [3, 5]


def test_the_fill_asks_for_a_whole_window_and_never_for_more_than_l1_serves():
    store = WindowStore(10)
    assert store.fill_size(1) == 10
    assert store.fill_size(10) == 10
    assert store.fill_size(11) is None


# --- change events -----------------------------------------------------------


def test_events_in_order_append_and_slide_the_window():
    store = filled("u", range(1, 11))  # exactly 10 asked, 10 came: not known complete
    for seq in range(11, 14):
        store.apply(appended("u", seq, seq - 1, seq))
    w = store.window("u")
    assert w.seq == 13 and [m.seq for m in w.messages] == list(range(4, 14))
    assert not w.complete
    assert seqs_of(store.recent("u", 2, 13)) == [12, 13]


def test_a_brand_new_user_gets_a_complete_window_until_it_outgrows_it():
    store = WindowStore(3)
    store.apply(appended("u", 5, 0, 1))
    assert store.window("u").complete
    store.apply(appended("u", 8, 5, 2))
    store.apply(appended("u", 9, 8, 3))
    assert store.window("u").complete and seqs_of(store.recent("u", 3, None)) == [5, 8, 9]
    store.apply(appended("u", 12, 9, 4))
    w = store.window("u")
    assert not w.complete and [m.seq for m in w.messages] == [8, 9, 12]


def test_events_of_users_the_sidecar_never_served_are_ignored():
    store = WindowStore()
    store.apply(appended("u", 12, 9, 4))
    assert store.window("u") is None and len(store) == 0


def test_a_gap_in_the_events_drops_the_window():
    store = filled("u", [1, 2, 3])
    store.apply(appended("u", 6, 5, 5))  # we missed 4..5
    assert store.window("u") is None
    assert store.recent("u", 1, None) == MISS


def test_duplicate_and_old_events_are_ignored():
    store = filled("u", [1, 2, 3])
    store.apply(appended("u", 3, 2, 3))
    store.apply(appended("u", 2, 1, 2))
    assert store.window("u").seq == 3
    assert seqs_of(store.recent("u", 3, None)) == [1, 2, 3]


def test_a_complete_window_drops_when_the_count_disagrees():
    store = filled("u", [1, 2, 3])
    store.apply(appended("u", 4, 3, 7))  # the user has more than we hold
    assert store.window("u") is None


def test_an_append_whose_message_does_not_match_its_seq_drops_the_window():
    store = filled("u", [1, 2, 3])
    bad = Changed(op="append", user_id="u", seq=4, prev_seq=3, count=4, message=msg(5))
    store.apply(bad)
    assert store.window("u") is None


def test_forget_drops_the_window_and_rejects_a_late_fill():
    store = filled("u", [1, 2, 3])
    store.apply(forgot("u", 4))
    assert store.window("u") is None
    assert not store.install("u", l2("u", [1, 2, 3]), 10)  # read before the forget
    store.apply(appended("u", 3, 2, 3))  # a late event from before the forget
    assert store.window("u") is None
    store.apply(appended("u", 6, 0, 1))  # the user starts again
    assert seqs_of(store.recent("u", 10, 6)) == [6]


def test_a_forget_voids_fills_in_flight_even_once_its_tombstone_is_evicted():
    store = WindowStore(10, max_users=1)
    fill = store.begin_fill("a", 10)
    store.apply(forgot("a", 5))
    store.apply(forgot("b", 6))  # evicts a's tombstone
    assert not store.finish_fill(fill, l2("a", [1, 2, 3]))
    assert store.window("a") is None


def test_a_stale_brand_new_event_cannot_revive_a_forgotten_user():
    store = WindowStore(10, max_users=1)
    store.apply(forgot("a", 5))
    store.apply(forgot("b", 6))  # evicts a's tombstone
    store.apply(appended("a", 1, 0, 1))  # a duplicate from long before the forget
    assert store.window("a") is None
    store.apply(appended("c", 7, 0, 1))
    assert store.window("c") is not None


def test_a_fill_newer_than_the_forget_is_installed():
    store = WindowStore()
    store.apply(forgot("u", 4))
    assert store.install("u", l2("u", [5, 6]), 10)
    assert seqs_of(store.recent("u", 10, None)) == [5, 6]


def test_a_fill_older_than_the_window_is_not_installed():
    store = filled("u", [1, 2, 3])
    store.apply(appended("u", 4, 3, 4))
    assert not store.install("u", l2("u", [1, 2, 3]), 10)
    assert store.window("u").seq == 4


def test_a_reply_whose_messages_are_newer_than_its_seq_is_not_installed():
    store = WindowStore()
    assert not store.install("u", GetReply("u", "l2", 2, [msg(1), msg(3)]), 10)


# --- fills in flight ---------------------------------------------------------


def test_events_during_a_fill_are_replayed_onto_its_window():
    store = WindowStore()
    fill = store.begin_fill("u", 10)
    store.apply(appended("u", 4, 3, 3))  # no window yet: L2 will answer as of 3
    assert store.finish_fill(fill, l2("u", [1, 3]))
    assert store.window("u").seq == 4
    assert seqs_of(store.recent("u", 10, 4)) == [1, 3, 4]


def test_a_fill_when_events_may_have_been_lost_is_not_installed():
    store = WindowStore()
    fill = store.begin_fill("u", 10)
    store.clear()
    assert not store.finish_fill(fill, l2("u", [1, 3]))
    assert store.window("u") is None


def test_a_fill_for_a_user_too_busy_to_buffer_is_not_installed():
    store = WindowStore(max_buffered=2)
    fill = store.begin_fill("u", 10)
    for seq in (4, 5, 6):
        store.apply(appended("u", seq, seq - 1, seq))
    assert not store.finish_fill(fill, l2("u", [1, 2, 3]))


def test_an_aborted_fill_leaves_nothing_behind():
    store = WindowStore()
    fill = store.begin_fill("u", 10)
    store.abort_fill(fill)
    store.apply(appended("u", 4, 3, 4))
    assert store.window("u") is None and not store._fills


# --- TTL: the safety net under lost events ----------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_window_past_its_ttl_is_a_miss_and_dropped():
    clock = Clock()
    store = filled("u", [1, 2, 3], ttl_s=300, clock=clock)
    clock.now += 300
    assert seqs_of(store.recent("u", 3, None)) == [1, 2, 3]
    clock.now += 0.001
    assert store.recent("u", 3, None) == MISS
    assert store.window("u") is None and store.bytes == 0


def test_a_missed_forget_is_served_at_most_until_the_ttl():
    """The forget event never reached this store: nothing shows it, only the TTL ends it."""
    clock = Clock()
    store = filled("u", [1, 2, 3], ttl_s=60, clock=clock)
    clock.now += 59
    assert seqs_of(store.recent("u", 3, None)) == [1, 2, 3]  # what the TTL bounds
    clock.now += 2
    assert store.recent("u", 3, None) == MISS
    assert store.install("u", l2("u", []), 10)  # the refill reads L2, which has forgotten
    assert seqs_of(store.recent("u", 3, None)) == []


def test_events_do_not_renew_the_ttl():
    clock = Clock()
    store = filled("u", [1, 2], ttl_s=60, clock=clock)
    clock.now += 50
    store.apply(appended("u", 3, 2, 3))
    assert seqs_of(store.recent("u", 3, None)) == [1, 2, 3]
    clock.now += 11
    assert store.recent("u", 3, None) == MISS


def test_a_fill_counts_its_ttl_from_when_its_read_was_sent():
    clock = Clock()
    store = WindowStore(10, ttl_s=60, clock=clock)
    fill = store.begin_fill("u", 10)
    clock.now += 45  # a slow L2 reply is as old as the read that asked for it
    assert store.finish_fill(fill, l2("u", [1, 2]))
    clock.now += 16
    assert store.recent("u", 2, None) == MISS


def test_a_brand_new_users_window_counts_from_its_first_event():
    clock = Clock()
    store = WindowStore(10, ttl_s=60, clock=clock)
    clock.now += 100
    store.apply(appended("u", 5, 0, 1))
    clock.now += 60
    assert seqs_of(store.recent("u", 1, None)) == [5]
    clock.now += 1
    assert store.recent("u", 1, None) == MISS


# --- memory bounds -----------------------------------------------------------


def test_the_least_recently_used_user_is_evicted_at_the_bound():
    store = WindowStore(10, max_users=2)
    store.install("a", l2("a", [1]), 10)
    store.install("b", l2("b", [2]), 10)
    assert isinstance(store.recent("a", 1, None), GetReply)  # a is now the most recent
    store.install("c", l2("c", [3]), 10)
    assert len(store) == 2
    assert store.window("b") is None
    assert store.window("a") is not None and store.window("c") is not None


def test_an_update_refreshes_recency():
    store = WindowStore(10, max_users=2)
    store.install("a", l2("a", [1]), 10)
    store.install("b", l2("b", [2]), 10)
    store.apply(appended("a", 3, 1, 2))
    store.install("c", l2("c", [4]), 10)
    assert store.window("b") is None and store.window("a").seq == 3


def sized(user: str, seq: int, nbytes: int) -> GetReply:
    """L2's reply for a user whose one message has a text of `nbytes` bytes."""
    m = Message(seq=seq, msg_id=f"m{seq}", role="user", bot_id="bot", text="é" * (nbytes // 2),
                ts="2026-11-26T07:00:00.000Z")
    return GetReply(user, "l2", seq, [m])


def test_windows_over_the_byte_bound_are_evicted_least_recently_used_first():
    store = WindowStore(10, max_bytes=1000)
    store.install("a", sized("a", 1, 400), 10)
    store.install("b", sized("b", 2, 400), 10)
    assert isinstance(store.recent("a", 1, None), GetReply)  # a is now the most recent
    store.install("c", sized("c", 3, 400), 10)
    assert store.window("b") is None
    assert store.window("a") is not None and store.window("c") is not None
    assert store.bytes == 800


def test_a_window_alone_over_the_byte_bound_is_not_kept():
    store = WindowStore(10, max_bytes=1000)
    store.install("a", sized("a", 1, 400), 10)
    store.install("big", sized("big", 2, 1200), 10)
    assert store.window("big") is None and store.recent("big", 1, None) == MISS
    assert store.window("a") is not None and store.bytes == 400


def test_a_window_that_grows_past_the_byte_bound_evicts_others_first():
    store = WindowStore(3, max_bytes=30)
    store.install("a", l2("a", [1]), 10)  # "text 1": 6 bytes
    store.apply(appended("b", 2, 0, 1))
    for seq in range(3, 6):
        store.apply(appended("b", seq, seq - 1, seq - 1))  # b holds 3 messages: 18 bytes
    assert store.window("a") is not None and store.bytes == 24
    store.apply(appended("b", 10, 5, 5))  # slides: 5 and 10 replace 2 and 3; b is 19 bytes
    assert store.window("b").bytes == 19 and store.bytes == 25
    store.install("c", l2("c", [20]), 10)  # 7 more: over 30, a (least recent) goes
    assert store.window("a") is None and store.bytes == 26


def test_the_byte_count_follows_drops_forgets_and_clears():
    store = filled("u", range(1, 5))
    store.install("v", l2("v", [7, 8]), 10)
    assert store.bytes == 4 * 6 + 2 * 6
    store.apply(forgot("u", 6))
    assert store.bytes == 12
    store.drop("v")
    assert store.bytes == 0
    store.install("w", l2("w", [9]), 10)
    store.clear()
    assert store.bytes == 0 and len(store) == 0


def test_tombstones_are_bounded_too():
    store = WindowStore(10, max_users=2)
    for i, user in enumerate("abc"):
        store.apply(forgot(user, i + 1))
    assert len(store._tombstones) == 2 and "a" not in store._tombstones


# --- property: never an incomplete or too-stale answer -----------------------


class WindowsVersusTruth(RuleBasedStateMachine):
    """A truth log of appends (and forgets) for a few users; its change events reach
    the store late, twice, out of order or not at all; fills read the truth at a
    random moment while they are in flight. Every answer must be exactly the
    newest n messages of the truth as of the answer's seq, and satisfy min_seq."""

    USERS = ("a", "b")

    def __init__(self) -> None:
        super().__init__()
        self.seq = 0
        self.ops: dict[str, list[tuple[int, Message | None]]] = {u: [] for u in self.USERS}
        self.network: list[Changed] = []  # published, not yet delivered
        self.delivered: list[Changed] = []
        self.forgot: dict[str, int] = {}  # newest forget the store has seen, per user
        self.fills: list[list] = []  # [Fill, reply snapshot or None]
        self.store = WindowStore()
        self.answers = 0

    @initialize(size=st.integers(1, 4), max_users=st.integers(1, 3),
                max_bytes=st.integers(5, 40) | st.just(1 << 30))
    def setup(self, size: int, max_users: int, max_bytes: int) -> None:
        self.store = WindowStore(size, max_users, max_bytes=max_bytes, max_buffered=8)

    # the truth and L2's view of it

    def truth_as_of(self, user: str, seq: int) -> list[Message]:
        current: list[Message] = []
        for s, m in self.ops[user]:
            if s > seq:
                break
            current = [] if m is None else current + [m]
        return current

    def now(self, user: str) -> list[Message]:
        return self.truth_as_of(user, self.seq)

    def l2_reply(self, user: str, asked: int) -> GetReply:
        current = self.now(user)
        return GetReply(user, "l2", current[-1].seq if current else 0, current[-asked:])

    # writes

    @rule(user=st.sampled_from(USERS), k=st.integers(1, 5))
    def append(self, user: str, k: int) -> None:
        for _ in range(k):
            before = self.now(user)
            self.seq += 1
            m = msg(self.seq)
            self.ops[user].append((self.seq, m))
            self.network.append(Changed(op="append", user_id=user, seq=self.seq,
                                        prev_seq=before[-1].seq if before else 0,
                                        count=len(before) + 1, message=m))

    @rule(user=st.sampled_from(USERS))
    def forget(self, user: str) -> None:
        self.seq += 1
        self.ops[user].append((self.seq, None))
        self.network.append(forgot(user, self.seq))

    # the broadcast: late, reordered, duplicated, lost (forgets are never lost:
    # the service drops every window when it may have lost events)

    @precondition(lambda self: self.network)
    @rule(k=st.integers(1, 8))
    def deliver_in_order(self, k: int) -> None:
        for ev in self.network[:k]:
            self.apply(ev)
        del self.network[:k]

    @precondition(lambda self: self.network)
    @rule(i=st.integers(0, 1000))
    def deliver(self, i: int) -> None:
        ev = self.network.pop(i % len(self.network))
        self.apply(ev)

    @precondition(lambda self: self.delivered)
    @rule(i=st.integers(0, 1000))
    def deliver_again(self, i: int) -> None:
        self.apply(self.delivered[i % len(self.delivered)])

    @precondition(lambda self: any(e.op == "append" for e in self.network))
    @rule(i=st.integers(0, 1000))
    def lose(self, i: int) -> None:
        appends = [e for e in self.network if e.op == "append"]
        self.network.remove(appends[i % len(appends)])

    def apply(self, ev: Changed) -> None:
        self.store.apply(ev)
        self.delivered.append(ev)
        if ev.op == "forget":
            self.forgot[ev.user_id] = max(self.forgot.get(ev.user_id, 0), ev.seq)

    # fills

    @rule(user=st.sampled_from(USERS), n=st.integers(1, 4), l2_reads_now=st.booleans())
    def begin_fill(self, user: str, n: int, l2_reads_now: bool) -> None:
        asked = self.store.fill_size(min(n, self.store.size))
        fill = self.store.begin_fill(user, asked)
        self.fills.append([fill, self.l2_reply(user, asked) if l2_reads_now else None])

    @precondition(lambda self: self.fills)
    @rule(i=st.integers(0, 1000))
    def l2_reads(self, i: int) -> None:
        entry = self.fills[i % len(self.fills)]
        if entry[1] is None:
            entry[1] = self.l2_reply(entry[0].user_id, entry[0].asked)

    @precondition(lambda self: self.fills)
    @rule(i=st.integers(0, 1000), fails=st.booleans())
    def finish_fill(self, i: int, fails: bool) -> None:
        fill, reply = self.fills.pop(i % len(self.fills))
        if fails:
            self.store.abort_fill(fill)
        else:
            self.store.finish_fill(fill, reply or self.l2_reply(fill.user_id, fill.asked))

    # reads

    @rule(user=st.sampled_from(USERS), n=st.integers(1, 5), data=st.data())
    def read(self, user: str, n: int, data) -> None:
        current = self.now(user)
        newest = current[-1].seq if current else 0
        min_seq = data.draw(st.none() | st.integers(0, newest))
        answer = self.store.recent(user, n, min_seq)
        if not isinstance(answer, GetReply):
            assert answer in (MISS, BEHIND, TOO_MANY)
            return
        self.answers += 1
        assert answer.tier == "l1" and answer.user_id == user
        assert n <= self.store.size
        assert min_seq is None or answer.seq >= min_seq
        assert answer.seq <= self.seq
        forgot = self.forgot.get(user, 0)
        assert all(m.seq > forgot for m in answer.messages), "served data from before a forget"
        expected = self.truth_as_of(user, answer.seq)
        assert answer.messages == expected[-n:], (answer.seq, seqs_of(answer), expected)

    @invariant()
    def both_bounds_hold_and_the_byte_count_is_exact(self) -> None:
        held = [self.store.window(u) for u in self.USERS]
        counted = sum(len(m.text.encode()) for w in held if w for m in w.messages)
        assert self.store.bytes == counted <= self.store.max_bytes
        assert all(w.bytes == sum(len(m.text.encode()) for m in w.messages) for w in held if w)

    @invariant()
    def every_window_is_the_truth_as_of_its_seq(self) -> None:
        assert len(self.store) <= self.store.max_users
        for user in self.USERS:
            w = self.store.window(user)
            if w is None:
                continue
            expected = self.truth_as_of(user, w.seq)
            assert w.messages == expected[-self.store.size:], (user, w, expected)
            assert not w.complete or len(expected) <= self.store.size
            forgot = self.forgot.get(user, 0)
            assert all(m.seq > forgot for m in w.messages), "holds data from before a forget"


WindowsVersusTruth.TestCase.settings = settings(
    max_examples=400, stateful_step_count=60, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestWindowsVersusTruth = WindowsVersusTruth.TestCase
