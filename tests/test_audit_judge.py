"""The auditor's pure verdicts: stale, fresh and inconclusive memory reads; answer agreement; budget."""

from __future__ import annotations

import pytest

from services.freshness_auditor.judge import (
    Budget, answers_agree, judge_memory, log_start, normalise_label,
)
from shared.contract import LogEntry, ServedMemory
from shared.stream import Logged

T0 = 1_000_000.0
GRACE = 1.0


def logged(*seq_times: tuple[int, float]) -> list[Logged]:
    entry = LogEntry(user_id="u", bot_id="b", role="user", text="hi", msg_id="m", ts="")
    return [Logged(seq, T0 + t, entry) for seq, t in seq_times]


def served(seqs: list[int], *, at: float, n: int = 3, min_seq: int | None = None,
           op: str = "recent") -> ServedMemory:
    return ServedMemory(tier="l2", user_id="u", op=op, n=n, min_seq=min_seq,
                        seq=max(seqs, default=0), seqs=seqs, at=T0 + at)


LOG = logged((1, 0.0), (2, 10.0), (3, 20.0), (4, 30.0), (5, 40.0))


def test_the_newest_n_as_of_the_read_are_fresh():
    assert judge_memory(served([2, 3, 4], at=35.0), LOG, grace_s=GRACE).verdict == "fresh"
    assert judge_memory(served([3, 4, 5], at=99.0), LOG, grace_s=GRACE).verdict == "fresh"


def test_lacking_a_message_stored_well_before_the_read_is_stale():
    v = judge_memory(served([2, 3, 4], at=45.0), LOG, grace_s=GRACE)
    assert (v.verdict, v.missing, v.unknown) == ("stale", [5], [])


def test_a_message_stored_within_the_grace_may_be_missing():
    assert judge_memory(served([2, 3, 4], at=40.5), LOG, grace_s=GRACE).verdict == "fresh"


def test_min_seq_is_exact_whatever_the_grace():
    v = judge_memory(served([2, 3, 4], at=40.5, min_seq=5), LOG, grace_s=GRACE)
    assert (v.verdict, v.missing) == ("stale", [5])


def test_holding_a_message_the_log_does_not_have_is_stale():
    v = judge_memory(served([3, 4, 99], at=35.0), LOG, grace_s=GRACE)
    assert (v.verdict, v.unknown) == ("stale", [99])


def test_holding_a_message_stored_after_the_read_is_stale():
    v = judge_memory(served([3, 4, 5], at=30.0), LOG, grace_s=GRACE)
    assert v.verdict == "stale" and v.unknown == [5]


def test_a_read_just_before_a_forget_is_inconclusive_not_stale():
    gone: list[Logged] = []  # the forget purged the log
    v = judge_memory(served([3, 4, 5], at=45.0), gone, grace_s=GRACE, forgotten_at=T0 + 46.0)
    assert v.verdict == "inconclusive"
    # forgotten long before the read: serving the old messages was a leak
    v = judge_memory(served([3, 4, 5], at=45.0), gone, grace_s=GRACE, forgotten_at=T0 + 41.0)
    assert v.verdict == "stale"


def test_search_replies_are_judged_only_on_what_they_hold():
    assert judge_memory(served([5, 1], at=45.0, op="search"), LOG, grace_s=GRACE).verdict == "fresh"
    assert judge_memory(served([7], at=45.0, op="search"), LOG, grace_s=GRACE).verdict == "stale"


def test_a_short_reply_needs_the_log_from_the_start():
    assert log_start(served([2, 3, 4], at=45.0)) == 2
    assert log_start(served([4, 5], at=45.0)) == 1  # fewer than n: maybe older ones are missing
    v = judge_memory(served([4, 5], at=45.0), LOG, grace_s=GRACE)
    assert (v.verdict, v.missing) == ("stale", [3])


@pytest.mark.parametrize("served_text, fresh, label, cosine, agree", [
    ("availability", "Availability.", True, None, True),
    ("availability", "pricing", True, None, False),
    ("The 3-bed on Main St is available.", "The 4-bed on Main St is available.", False, 0.97, False),
    ("Yes, we can tour it Saturday.", "Yes, a tour on Saturday works.", False, 0.93, True),
    ("Yes, we can tour it Saturday.", "The HOA fee is monthly.", False, 0.40, False),
])
def test_answers_agree_by_label_or_by_meaning(served_text, fresh, label, cosine, agree):
    assert answers_agree(served_text, fresh, label=label, cosine=cosine, min_cosine=0.9)[0] is agree


def test_labels_compare_without_case_space_or_final_stop():
    assert normalise_label("  Lead  Score: HOT. ") == "lead score: hot"


def test_the_budget_admits_audits_only_within_its_share_of_the_savings():
    budget = Budget(0.1)
    assert not budget.reserve(0.01)  # nothing saved yet
    for _ in range(10):
        budget.earn(0.01)
    assert budget.reserve(0.01)  # 0.1 * 0.10 saved = 0.01
    assert not budget.reserve(0.0001)
    budget.settle(0.01, 0.004)  # it cost less than booked
    assert budget.reserve(0.006)
    assert budget.spent <= budget.fraction * budget.saved + 1e-12
