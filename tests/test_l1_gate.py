"""The sidecar's check of change events against the log, without I/O."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from services.memory_l1.gate import SeqGate
from shared.contract import Changed


def ev(seq: int, user: str = "u") -> Changed:
    return Changed(op="append", user_id=user, seq=seq, prev_seq=seq - 1, count=seq)


def test_an_event_within_the_last_seq_read_passes_at_once():
    gate = SeqGate()
    gate.begin()
    gate.settle(1, 10)
    assert gate.admit(ev(10)) and not gate.waiting


def test_an_event_beyond_it_waits_for_a_refresh_begun_after_it_arrived():
    gate = SeqGate()
    early = gate.begin()  # in flight before the event arrived
    assert not gate.admit(ev(5))
    assert gate.settle(early, 4) == ([], [])  # too old to judge it
    assert gate.waiting
    assert gate.settle(gate.begin(), 5) == ([ev(5)], [])


def test_an_event_still_beyond_the_log_after_its_refresh_is_refused_and_the_rest_go_on():
    gate = SeqGate()
    assert not gate.admit(ev(1005))
    assert not gate.admit(ev(6, "v"))  # behind a held event: held too, order kept
    assert gate.settle(gate.begin(), 6) == ([ev(6, "v")], [ev(1005)])
    assert not gate.waiting and gate.admit(ev(6))


def test_events_that_change_nothing_here_do_not_ask_the_stream_unless_others_wait():
    gate = SeqGate()
    assert gate.admit(ev(50), matters=False)
    assert not gate.admit(ev(51))
    assert not gate.admit(ev(52), matters=False)


def test_it_knows_whose_events_it_holds():
    gate = SeqGate()
    gate.admit(ev(3, "v"))
    gate.admit(ev(4))
    number = gate.begin()
    gate.admit(ev(10))  # arrived after that refresh began
    assert gate.holds("u") and gate.holds("v") and not gate.holds("w")
    gate.settle(number, 4)
    assert not gate.holds("v") and gate.holds("u")
    gate.settle(gate.begin(), 10)
    assert not gate.holds("u")


def test_a_failed_refresh_drops_what_it_held():
    gate = SeqGate()
    gate.admit(ev(3))
    gate.admit(ev(4))
    assert gate.fail() == 2 and not gate.waiting and not gate.holds("u")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["append", "forge", "begin", "settle"]),
                          st.integers(1, 3)), max_size=60))
def test_real_events_apply_in_order_and_forged_ones_never(actions):
    """The log grows; real events (seq within it) and forged ones (beyond it for good)
    arrive; refreshes begin and answer in any order allowed by one in flight."""
    gate = SeqGate()
    last = 0
    arrived: list[Changed] = []
    applied: list[Changed] = []
    refused: list[Changed] = []
    in_flight = None  # the number of the refresh in flight
    for action, k in actions:
        if action == "append":
            for _ in range(k):
                last += 1
                e = ev(last)
                arrived.append(e)
                if gate.admit(e):
                    applied.append(e)
        elif action == "forge":
            e = ev(10**9 + k)
            arrived.append(e)
            if gate.admit(e):
                applied.append(e)
        elif action == "begin" and in_flight is None and gate.waiting:
            in_flight = gate.begin()
        elif action == "settle" and in_flight is not None:
            ok, no = gate.settle(in_flight, last)  # the stream answers as it is now
            applied += ok
            refused += no
            in_flight = None
    while gate.waiting:  # let the checks catch up
        ok, no = gate.settle(gate.begin(), last)
        applied += ok
        refused += no
    assert all(e.seq <= last for e in applied)
    assert all(e.seq > 10**8 for e in refused)
    real = [e for e in arrived if e.seq <= last]
    assert applied == real  # every real one, in arrival order
    assert not gate.holds("u")
