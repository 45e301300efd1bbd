"""When the llm-broker trusts Redis's user seqs, and when it drops its exact tier
(services/llm_broker/l2state.py), pure: no I/O."""

from __future__ import annotations

import itertools

import pytest

from services.llm_broker import l2state
from services.llm_broker.l2state import (
    EPOCH_CHANGED, LOST, REBUILDING, ROLLED_BACK, WENT_BACK, KeyEpoch, Seen, View,
)
from shared.lastseq import State


def view() -> View:
    tokens = itertools.count(1)
    return View(new_token=lambda: f"k{next(tokens)}")


def bound(epoch: str, token: str = "k0", maker: Seen | None = None) -> str:
    return KeyEpoch(token, epoch, maker or Seen(epoch or None, 1 if epoch else 0, 0)).encode()


def settled(v: View, state: State | None, raw: str) -> str | None:
    """Judge, and adopt what a replacement would install; the token in use after."""
    j = v.judge(state, raw)
    v.adopt(j.replace.encode() if j.replace else raw)
    return v.token


def test_without_a_gateway_the_user_seqs_are_trusted_as_ever_and_one_key_epoch_is_made():
    v = view()
    j = v.judge(None, None)
    assert (j.untrusted, j.cause, j.distrust) == ("", EPOCH_CHANGED, False)
    raw = j.replace.encode()
    v.adopt(raw)
    assert v.judge(None, raw).untrusted == "" and v.judge(None, raw).token == "k1"
    assert v.judge(None, raw).replace is None


@pytest.mark.parametrize("state,why", [
    (State("1-a", 1, 9), ""),
    (State("1-a", 1, 12), ""),  # moved on
    (None, LOST),  # wiped
    (State("1-a", 1, 5), ROLLED_BACK),  # the position went back
    (State("1-c", 1, 50), ROLLED_BACK),  # another epoch of the same generation
    (State("2-b", 2, 0, 40), REBUILDING),  # a new epoch, replay under way
    (State("2-b", 2, 40, 40), ""),  # replayed
])
def test_the_user_seqs_are_trusted_only_in_a_state_no_older_than_what_was_seen(state, why):
    v = view()
    raw = bound("1-a")
    assert settled(v, State("1-a", 1, 9), raw) == "k0"
    assert v.judge(state, raw).untrusted == why


def test_a_state_seen_once_is_expected_after_a_restart_by_the_key_epochs_binding():
    """A broker that never saw a state itself: `llm:epoch` says one existed."""
    assert view().judge(None, bound("1-a")).untrusted == LOST


@pytest.mark.parametrize("state,raw", [
    (State("2-b", 2, 0, 40), bound("1-a")),  # the gateway made a new epoch
    (State("2-b", 2, 0, 40), None),  # Redis wiped, the gateway's new epoch already there
    (None, bound("1-a")),  # the state was deleted (the gateway found it rolled back)
    (State("1-a", 1, 9), "garbage"),
])
def test_a_key_epoch_bound_to_another_l2_epoch_or_missing_is_replaced_with_a_distrust(state, raw):
    v = view()
    j = v.judge(state, raw)
    assert j.token is None and j.cause == EPOCH_CHANGED and j.distrust
    assert j.replace.bound == (state.epoch if state else "")


def test_a_rollback_this_broker_sees_retires_the_restored_key_epoch_once():
    first, second = view(), view()
    restored = bound("1-a", maker=Seen("1-a", 1, 3))  # made before the snapshot was taken
    for v in (first, second):
        assert settled(v, State("1-a", 1, 9), restored) == "k0"
    second.judge(State("1-a", 1, 7), restored)  # saw less than the first before the rollback
    j = first.judge(State("1-a", 1, 5), restored)
    assert (j.untrusted, j.cause, j.distrust) == (ROLLED_BACK, WENT_BACK, True)
    assert j.replace.maker == Seen("1-a", 1, 9)
    new = j.replace.encode()
    first.adopt(new)
    # neither broker replaces it again: its maker had seen what they saw
    for v in (first, second):
        j = v.judge(State("1-a", 1, 5), new)
        assert (j.untrusted, j.replace, j.token) == (ROLLED_BACK, None, "k1")


def test_a_broker_that_saw_more_retires_a_key_epoch_made_by_one_that_saw_less():
    v = view()
    assert settled(v, State("1-a", 1, 20), bound("1-a")) == "k0"
    made_after_a_smaller_rollback = bound("1-a", "k7", maker=Seen("1-a", 1, 9))
    assert v.judge(State("1-a", 1, 5), made_after_a_smaller_rollback).cause == WENT_BACK


def test_a_late_read_from_before_a_new_epoch_replaces_nothing():
    """Concurrent lookups: one sent before the gateway's new epoch comes back after
    another saw it. It is judged against what was seen when it was sent."""
    v = view()
    settled(v, State("1-a", 1, 9), bound("1-a"))
    before = v.seen
    settled(v, State("2-b", 2, 3), bound("2-b", "k5"))  # the concurrent one, back first
    j = v.judge(State("1-a", 1, 9), bound("1-a"), before)
    assert (j.untrusted, j.token, j.replace) == ("", None, None)
    assert v.seen == Seen("2-b", 2, 3)


def test_progress_seen_by_a_concurrent_read_is_no_rollback_nor_a_reason_to_miss():
    v = view()
    raw = bound("1-a")
    settled(v, State("1-a", 1, 9), raw)
    before = v.seen
    v.judge(State("1-a", 1, 15), raw)
    j = v.judge(State("1-a", 1, 12), raw, before)
    assert (j.untrusted, j.token, j.replace) == ("", "k0", None)
    assert v.seen.applied == 15


@pytest.mark.parametrize("maker,mine,covers", [
    (Seen("1-a", 1, 9), Seen("1-a", 1, 9), True),
    (Seen("1-a", 1, 8), Seen("1-a", 1, 9), False),
    (Seen("2-b", 2, 0), Seen("1-a", 1, 9), True),
    (Seen("1-c", 1, 99), Seen("1-a", 1, 9), False),  # same generation, another epoch
])
def test_covers(maker, mine, covers):
    assert maker.covers(mine) is covers


def test_key_epoch_values_round_trip_and_malformed_ones_read_as_missing():
    value = KeyEpoch("ab12", "3-x", Seen("3-x", 3, 17))
    assert KeyEpoch.parse(value.encode().encode()) == value
    assert KeyEpoch.parse(KeyEpoch("ab12", "", Seen()).encode()) == KeyEpoch("ab12", "", Seen())
    for bad in (None, "", "x", "a/b/c/d/e/f", "/b/c/1/2", "a/b/c/x/2"):
        assert KeyEpoch.parse(bad) is None


def test_the_user_seqs_are_untrusted_while_the_state_applied_less_than_the_log_held_long_enough():
    state = State("1-a", 1, 40)
    assert l2state.behind_log(state, 41) == l2state.BEHIND_LOG
    assert l2state.behind_log(state, 40) == ""
    assert l2state.behind_log(state, None) == ""  # no gateway wrote it (or it expired, idle)
    assert l2state.behind_log(None, 41) == ""  # no state: `View.judge` says why
