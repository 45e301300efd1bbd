"""The fault suite's checks catch what they must, and its short version runs green end to end.

The pure checks (chaos.truth) are tested on hand-made truth logs: each would
let a loss, a stale read, a forgotten message or a stale LLM hit through if
it were wrong. The short run is `python -m chaos --short` (1 trial of a few
faults, the whole stack as separate processes), as `just test` knows it.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from chaos import truth as t
from tests.conftest import REPO


def log_of(*acks: t.Ack) -> t.Truth:
    truth = t.Truth()
    for a in acks:
        truth.ack(a)
    return truth


def read(user, seqs, ids, *, n=10, min_seq=None, at=100.0, tier="l1") -> t.Read:
    return t.Read(user, n, min_seq, at, at + 0.01, tier, tuple(seqs), tuple(ids))


def test_a_read_lacking_an_acked_message_older_than_the_grace_is_stale():
    truth = log_of(t.Ack("u", "a", 1, "user", 10.0), t.Ack("u", "b", 2, "user", 99.5))
    truth.reads.append(read("u", [1], ["a"]))  # lacks b, acked only 0.5 s before: within the grace
    assert t.stale_reads(truth, grace_s=1.0) == []
    truth.reads.append(read("u", [1], ["a"], at=101.0))  # 1.5 s after b's ack: must hold it
    (bad, why), = t.stale_reads(truth, grace_s=1.0)
    assert bad.t_sent == 101.0 and "grace" in why


def test_a_read_lacking_its_min_seq_is_stale_even_within_the_grace():
    truth = log_of(t.Ack("u", "a", 1, "user", 10.0), t.Ack("u", "b", 2, "user", 99.99))
    truth.reads.append(read("u", [1], ["a"], min_seq=2))
    (_, why), = t.stale_reads(truth, grace_s=1.0)
    assert "min_seq" in why


def test_a_message_pushed_out_of_the_window_by_newer_ones_is_not_missing():
    truth = log_of(*(t.Ack("u", f"m{i}", i, "user", float(i)) for i in range(1, 6)))
    truth.reads.append(read("u", [4, 5], ["m4", "m5"], n=2))
    assert t.stale_reads(truth, grace_s=1.0) == []


def test_a_poison_message_served_to_anyone_is_stale():
    truth = log_of(t.Ack("u", "a", 1, "user", 10.0))
    truth.reads.append(read("u", [1, 2], ["a", "poison-x"]))
    (_, why), = t.stale_reads(truth, grace_s=1.0, poison=frozenset({"poison-x"}))
    assert "poison" in why


def test_forgotten_data_served_after_the_forget_reply_is_counted_and_before_it_is_not():
    truth = log_of(t.Ack("f", "a", 1, "user", 10.0))
    truth.forgets["f"] = t.Forget("f", 50.0, 51.0)
    truth.reads.append(read("f", [1], ["a"], at=50.5))  # in flight during the forget: fine
    truth.reads.append(read("f", [1], ["a"], at=52.0, tier="l3"))
    truth.llm.append(t.LLMCall("f", "lead_intent", 53.0, 53.1, "hit", 10.0, "end_turn"))  # stored at 43.1
    truth.llm.append(t.LLMCall("f", "lead_intent", 60.0, 60.1, "hit", 1.0, "end_turn"))  # stored after it
    assert len(t.forgotten_served(truth)) == 2
    assert t.lost(truth, {"f": []}, {"f"}) == set()  # forgotten messages are not "lost"


def test_an_intent_hit_older_than_the_users_latest_message_is_stale():
    truth = log_of(t.Ack("u", "a", 1, "user", 100.0), t.Ack("u", "b", 2, "assistant", 200.0))
    fresh = t.LLMCall("u", "lead_intent", 150.0, 150.1, "hit", 40.0, "end_turn")  # stored at 110.1
    stale = t.LLMCall("u", "lead_intent", 150.0, 150.1, "hit", 60.0, "end_turn")  # stored at 90.1
    after_assistant = t.LLMCall("u", "lead_intent", 250.0, 250.1, "hit", 100.0, "end_turn")
    other_class = t.LLMCall("u", "market_context", 150.0, 150.1, "hit", 60.0, "end_turn")
    truth.llm += [fresh, stale, after_assistant, other_class]
    assert len(t.stale_llm_hits(truth, {"lead_intent"}, grace_s=1.0)) == 1


def test_an_intent_hit_stored_while_the_users_message_was_being_acknowledged_is_not_counted():
    """Stored after the append was sent, before its ack arrived: the gateway may have recorded
    the message by then (a sidecar frozen and thawed held the ack 0.27 s in one chaos trial)."""
    truth = log_of(t.Ack("u", "a", 1, "user", 100.3, t_sent=100.0))
    between = t.LLMCall("u", "lead_intent", 150.0, 150.1, "hit", 50.0, "end_turn")  # stored at 100.1
    before = t.LLMCall("u", "lead_intent", 150.0, 150.1, "hit", 50.2, "end_turn")  # stored at 99.9
    truth.llm += [between, before]
    assert t.stale_llm_hits(truth, {"lead_intent"}, grace_s=1.0) == [
        "u: lead_intent hit stored 0.10 s before the user's latest message"]


def test_a_hit_on_an_answer_cut_short_is_a_bad_llm_hit():
    truth = t.Truth()
    truth.llm.append(t.LLMCall("u", "reply", 1.0, 1.1, "hit", 0.5, "max_tokens"))
    assert t.stale_llm_hits(truth, set(), grace_s=1.0)


def test_lost_and_duplicates_compare_the_store_with_the_acks():
    truth = log_of(t.Ack("u", "a", 1, "user", 1.0), t.Ack("u", "b", 2, "user", 2.0))
    assert t.lost(truth, {"u": [(1, "a")]}, {"u"}) == {("u", "b")}
    assert t.lost(truth, {"u": [(1, "a")]}, {"u"}, before=1.5) == set()  # b came after the store was read
    assert t.duplicates({"u": [(1, "a"), (3, "a"), (2, "b")]}) == 1


def test_recovery_is_the_last_failure_after_the_heal_or_none_without_a_success():
    calls = [t.Call("get", 9.0, 9.5, False), t.Call("get", 10.2, 12.0, False), t.Call("get", 12.5, 12.6, True)]
    assert t.recovery_s(calls, healed=10.0, until=20.0) == pytest.approx(2.0)
    assert t.recovery_s(calls[:2], healed=10.0, until=20.0) is None
    assert t.recovery_s(calls[2:], healed=10.0, until=20.0) == 0.0


@pytest.mark.e2e
def test_short_fault_suite_runs_every_fault_and_finds_nothing_lost(tmp_path):
    out = tmp_path / "results"
    run = subprocess.run([sys.executable, "-m", "chaos", "--short", "--out", str(out), "--deadline", "120"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert (out / "chaos.md").exists(), run.stdout[-3000:] + run.stderr[-3000:]
    data = json.loads((out / "chaos.json").read_text())
    assert [r["fault"] for r in data["summary"]] == ["kill:l2-gateway", "stop:memory-l1", "llm-529", "poison"]
    assert data["options"]["checked"]["acked_appends"] > 50 and data["options"]["checked"]["llm_hits"] > 0
    assert run.returncode == 0, run.stdout[-3000:]
    assert (out / "chaos.png").stat().st_size > 0
