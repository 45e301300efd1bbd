"""How the llm-broker holds `memory.changed` events until it applies them
(services/llm_broker/changes.py), pure: folded per user, bounded, nothing lost."""

from __future__ import annotations

from services.llm_broker.changes import Pending
from shared.contract import Changed, Message


def said(user: str, role: str = "user", seq: int = 1) -> Changed:
    return Changed(op="append", user_id=user, seq=seq, prev_seq=seq - 1, count=seq,
                   message=Message(seq=seq, msg_id=f"m{seq}", role=role, bot_id="b", text="hi",
                                   ts="2026-01-01T00:00:00Z"))


def forgot(user: str) -> Changed:
    return Changed(op="forget", user_id=user, seq=0, prev_seq=0, count=0)


def test_many_messages_of_one_user_fold_into_one_invalidation():
    pending = Pending()
    for seq in range(1, 500):
        assert pending.add(said("ann", seq=seq), now=1.0)
    pending.add(said("bob"), now=1.0)
    batch = pending.take()
    assert batch.spoke == {"ann", "bob"} and batch.forgot == set() and not batch.distrust_since
    assert not pending.ready.is_set()


def test_the_bot_speaking_is_nothing_to_apply():
    pending = Pending()
    assert pending.add(said("ann", role="assistant"), now=1.0)
    assert not pending.ready.is_set()


def test_a_batch_takes_at_most_its_size_and_leaves_the_rest_ready():
    pending = Pending()
    for i in range(12):
        pending.add(said(f"u{i}"), now=1.0)
    first = pending.take(most=5)
    assert len(first.spoke) == 5 and pending.ready.is_set()
    rest = pending.take(most=100)
    assert len(rest.spoke) == 7 and not first.spoke & rest.spoke


def test_past_the_limit_the_users_who_spoke_become_one_distrust_and_forgets_stay():
    pending = Pending(limit=3)
    pending.add(forgot("zoe"), now=1.0)
    for i in range(3):
        assert pending.add(said(f"u{i}"), now=1.0)
    assert pending.add(said("u1", seq=2), now=1.5)  # already held: no growth
    assert not pending.add(said("u3"), now=2.0)
    batch = pending.take()
    assert batch.spoke == set() and batch.forgot == {"zoe"} and batch.distrust_since == 2.0


def test_a_failed_batch_put_back_is_applied_again_with_what_came_meanwhile():
    pending = Pending()
    pending.add(said("ann"), now=1.0)
    pending.add(forgot("zoe"), now=1.0)
    pending.distrust(1.5)
    failed = pending.take()
    pending.add(said("bob"), now=2.0)
    pending.put_back(failed, now=2.0)
    again = pending.take()
    assert again.spoke == {"ann", "bob"} and again.forgot == {"zoe"}
    assert again.distrust_since == 1.5
