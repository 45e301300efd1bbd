"""Context assembly: memory.get op "context" (policy unit tests, then the real stack).

The stack runs with small summary blocks (10 messages, 5 kept verbatim) so
a test history of a few dozen messages gets several summaries.
"""

from __future__ import annotations

import os
import uuid

import asyncpg
import pytest
from hypothesis import given, strategies as st

import tiermem
from services.llm_simulator.responder import count_tokens as simulator_count
from services.memory_l1.context import NEWEST, assemble
from shared import tokens
from shared.contract import ContextParts, GetReply, Message, Summary
from shared.settings import load_stack_env
from tests.conftest import reset_servers, stack_processes
from tests.helpers import eventually


def msg(seq: int, text: str = "", role: str = "user", score: float | None = None) -> Message:
    return Message(seq=seq, msg_id=f"m{seq}", role=role, bot_id="b", text=text or f"message number {seq}",
                   ts="2026-12-06T00:00:00Z", score=score)


def window(*seqs: int) -> GetReply:
    return GetReply(user_id="u", tier="l1", seq=seqs[-1] if seqs else 0, messages=[msg(s) for s in seqs])


# --------------------------------------------------------------------------- policy


def test_everything_fits_a_generous_budget():
    parts = ContextParts("u", 20, Summary("Lead wants a 2-bed condo.", 1, 10, 8), [msg(12, score=0.9)])
    reply = assemble(window(16, 17, 18, 19, 20), parts, 10_000, want_relevant=True)
    assert [m.seq for m in reply.messages] == [16, 17, 18, 19, 20]
    assert reply.summary == parts.summary and [m.seq for m in reply.relevant] == [12]
    assert reply.covers == {"messages": [16, 20], "summary": [1, 10], "relevant": [12]}
    assert reply.missing == [] and reply.seq == 20 and 0 < reply.tokens <= 10_000


def test_a_tight_budget_keeps_the_newest_turn_then_the_summary_then_relevant_then_older_window():
    each = tokens.message_tokens(msg(1).text)
    summary = Summary("s" * 30, 1, 10, tokens.estimate("s" * 30))
    parts = ContextParts("u", 20, summary, [msg(12, score=0.9), msg(13, score=0.8)])
    budget = NEWEST * each + summary.tokens + tokens.MESSAGE_OVERHEAD + each + 1
    reply = assemble(window(16, 17, 18, 19, 20), parts, budget, want_relevant=True)
    assert [m.seq for m in reply.messages] == [19, 20]  # the window stays contiguous, newest kept
    assert reply.summary is not None and [m.seq for m in reply.relevant] == [12]
    assert reply.tokens <= budget


def test_relevant_messages_already_in_the_window_are_not_repeated():
    parts = ContextParts("u", 20, None, [msg(19, score=0.9), msg(3, score=0.5)])
    reply = assemble(window(18, 19, 20), parts, 10_000, want_relevant=True)
    assert [m.seq for m in reply.relevant] == [3]
    assert reply.missing == ["summary"]


def test_without_l3_the_window_is_served_and_the_reply_says_what_is_missing():
    reply = assemble(window(1, 2, 3), None, 10_000, want_relevant=True)
    assert [m.seq for m in reply.messages] == [1, 2, 3]
    assert reply.summary is None and reply.relevant == []
    assert reply.missing == ["summary", "relevant"]


def test_a_budget_smaller_than_the_newest_message_returns_nothing_rather_than_a_gap():
    reply = assemble(window(1, 2), ContextParts("u", 2, Summary("x", 1, 1, 1), []), 1, want_relevant=False)
    assert reply.messages == [] and reply.summary is None and reply.tokens == 0


@given(st.lists(st.text(min_size=1, max_size=300), min_size=1, max_size=30), st.integers(1, 3000))
def test_the_budget_is_never_exceeded_and_the_window_is_a_contiguous_newest_suffix(texts, budget):
    recent = GetReply("u", "l1", len(texts), [msg(i + 1, t) for i, t in enumerate(texts)])
    reply = assemble(recent, ContextParts("u", 0, Summary("abc", 1, 1, 1), []), budget, want_relevant=False)
    assert reply.tokens <= budget
    seqs = [m.seq for m in reply.messages]
    assert seqs == list(range(len(texts) - len(seqs) + 1, len(texts) + 1))


@given(st.text(max_size=2000))
def test_the_estimate_never_undercounts_the_simulators_tokenizer(text):
    assert tokens.estimate(text) >= simulator_count(text)


# --------------------------------------------------------------------------- the real stack

BLOCK, KEEP = 10, 5


@pytest.fixture(scope="module")
async def stack_env(nats_url, redis_url, database_url, tmp_path_factory):
    await reset_servers(nats_url, redis_url, database_url)
    state = tmp_path_factory.mktemp("stack")
    with stack_processes({**os.environ, "NATS_URL": nats_url, "REDIS_URL": redis_url,
                          "DATABASE_URL": database_url, "SUMMARY_BLOCK": str(BLOCK),
                          "SUMMARY_KEEP": str(KEEP)}, state):
        yield {**load_stack_env(state), "DATABASE_URL": database_url}


async def fill(tm, user: str, start: int, count: int) -> int:
    seq = 0
    for i in range(start, start + count):
        text = ("My budget is $450,000 and I need a garage for two cars." if i == 2
                else f"Message {i}: we talked about showing times and the neighborhood.")
        seq = (await tm.append(user, "sales-1", "user" if i % 2 == 0 else "assistant", text,
                               msg_id=f"c-{i}")).seq
    return seq


async def eventually_summary(tm, user: str, upto_at_least: int) -> tiermem.ContextReply:
    async def summarised():
        got = await tm.context(user, 5000, n=10)
        return got if got.summary and got.summary.upto_seq >= upto_at_least else None

    return await eventually(summarised, timeout=30, every=0.2, what=f"a summary up to seq {upto_at_least}")


@pytest.mark.e2e
async def test_context_on_the_stack_budget_min_seq_summary_refresh_and_forget(stack_env):
    user = f"ctx-{uuid.uuid4().hex[:8]}"
    async with await tiermem.AsyncClient.connect(env=stack_env) as tm:
        last = await fill(tm, user, 0, 30)
        got = await tm.context(user, 120, n=10, min_seq=last, query="budget and garage")
        assert got.seq >= last and got.messages[-1].seq == last  # read-your-writes
        assert got.tokens <= 120 and got.budget_tokens == 120

        # 30 messages, blocks of 10 with 5 kept: the summaries reach message 20 (its seq).
        seqs = [m.seq for m in (await tm.recent(user, 30)).messages]
        got = await eventually_summary(tm, user, seqs[19])
        assert got.summary.from_seq == seqs[0] and got.covers["summary"] == [seqs[0], got.summary.upto_seq]
        assert got.summary.text and got.summary.tokens == tokens.estimate(got.summary.text)

        found = await tm.context(user, 5000, n=5, query="what budget did the lead give?")
        assert any(m.seq == seqs[2] for m in found.relevant)  # an old message, found by search
        assert all(m.seq < found.messages[0].seq for m in found.relevant)

        more = await fill(tm, user, 30, 10)  # the summary is extended as messages arrive
        seqs = [m.seq for m in (await tm.recent(user, 40)).messages]
        assert seqs[-1] == more
        await eventually_summary(tm, user, seqs[29])

        await tm.forget(user)
        gone = await tm.context(user, 5000, n=10, query="budget")
        assert gone.messages == [] and gone.summary is None and gone.relevant == []
    conn = await asyncpg.connect(stack_env["DATABASE_URL"])
    try:
        assert await conn.fetchval("SELECT count(*) FROM l3.summaries WHERE user_id = $1", user) == 0
    finally:
        await conn.close()


@pytest.mark.e2e
async def test_context_rejects_bad_input_with_400(stack_env):
    async with await tiermem.AsyncClient.connect(env=stack_env) as tm:
        for bad in ({"budget_tokens": 0}, {"budget_tokens": 10**7}, {"query": "   "}):
            with pytest.raises(tiermem.BadRequest):
                await tm.context("ctx-bad", **bad)
