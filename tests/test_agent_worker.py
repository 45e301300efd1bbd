"""The reference agent worker as a user of tiermem's public surface.

Pure tests of the prompts it builds from an assembled context, and tests over
a real NATS server with stand-in responders on the public subjects (the
transport seam, as in test_client.py), to see exactly what the worker sends
through `tiermem.AsyncClient`: its trace context, the context read, the reply
with prompt-cache breakpoints, and the quality check's calls.
"""

from __future__ import annotations

import json
import random

import msgspec
import pytest

from services.agent_worker import bot, scenario
from services.agent_worker.bot import Bot, CallLog, LeadState, SimClock, sim_start
from services.agent_worker.measured import Measured
from shared.contract import CompleteRequest, ContextReply, Message, Summary, check_complete
from tests.helpers import client as raw_client
from tiermem import AsyncClient

EPHEMERAL = {"type": "ephemeral"}


def plan() -> scenario.LeadPlan:
    return scenario.plan_fleet(1, run="t", bots=3, days=1, mix=scenario.Mix.parse(""), seed=3)[0]


def msg(seq: int, role: str, text: str) -> Message:
    return Message(seq=seq, msg_id=f"m{seq}", role=role, bot_id="qualifier-1", text=text, ts="2026-03-02T09:00:00Z")


def context(summary: bool = True, relevant: bool = True) -> ContextReply:
    window = [msg(40, "user", "Is the Oak Park house still open on Saturday?"),
              msg(41, "assistant", "It is! Want a time?"),
              msg(42, "user", "How much are the taxes there?")]
    return ContextReply(
        user_id="u", tier="l1", seq=42, messages=window,
        relevant=[msg(12, "user", "My budget is $450k"), msg(7, "user", "We need 3 beds")] if relevant else [],
        summary=Summary("Lead wants a 3-bed in Oak Park, budget $450k.", 1, 30, 14) if summary else None,
        tokens=300, budget_tokens=2000, covers={}, missing=[])


def test_a_reply_from_context_caches_the_system_prompt_and_the_summary():
    p = plan()
    req = bot.context_reply_request(p, context(), bot="qualifier-1", role="qualifier")
    system = req["system"]
    assert [b["cache_control"] for b in system] == [EPHEMERAL, EPHEMERAL]
    assert system[0]["text"] == bot.REPLY_SYSTEMS["qualifier"]
    assert "messages 1-30" in system[1]["text"] and "budget $450k" in system[1]["text"]
    # Nothing after the stable prefix carries a breakpoint: it changes with every question.
    assert all(isinstance(m["content"], str) for m in req["messages"])
    first = req["messages"][0]["content"]
    assert first.startswith(bot.profile(p))
    assert first.index("We need 3 beds") < first.index("My budget is $450k")  # older messages by seq
    assert [m["role"] for m in req["messages"]] == ["user", "user", "assistant", "user"] or \
        req["messages"][-1]["content"] == "How much are the taxes there?"
    assert req["messages"][-1]["content"].endswith("How much are the taxes there?")
    # The broker and the API take it as it is (system as text blocks, at most 4 breakpoints).
    check_complete(msgspec.convert(req, CompleteRequest), 1_000_000)


def test_without_a_summary_only_the_system_prompt_is_a_breakpoint_and_the_window_is_the_conversation():
    p = plan()
    req = bot.context_reply_request(p, context(summary=False, relevant=False), role="nurture",
                                    instruction=bot.INSTRUCTIONS["nurture"])
    assert req["system"] == [{"type": "text", "text": bot.REPLY_SYSTEMS["nurture"], "cache_control": EPHEMERAL}]
    assert req["messages"][0]["content"] == bot.profile(p) + "\nIs the Oak Park house still open on Saturday?"
    assert req["messages"][-1]["content"].endswith(bot.INSTRUCTIONS["nurture"])


# --------------------------------------------------------------------------- over NATS


def _complete_reply(text: str, cache: str = "miss") -> bytes:
    return json.dumps({"text": text, "content": [{"type": "text", "text": text}], "model": bot.SONNET,
                       "stop_reason": "end_turn",
                       "usage": {"input_tokens": 100, "output_tokens": 10, "cache_creation_input_tokens": 0,
                                 "cache_read_input_tokens": 5000},
                       "cost_usd": 0.002, "saved_usd": 0.0, "cache": {"status": cache}}).encode()


async def _stand_in(nc, sidecar: str, seen: list[tuple[str, dict, dict]], judge_says: str = "yes yes"):
    """Answers memory.append, memory.get.<sidecar> and llm.complete as the contract says."""
    async def answer(msg):
        body = json.loads(msg.data)
        seen.append((msg.subject, body, dict(msg.headers or {})))
        if msg.subject == "memory.append":
            await msg.respond(json.dumps({"user_id": body["user_id"], "seq": 42, "duplicate": False}).encode())
        elif body.get("op") == "context":
            await msg.respond(msgspec.json.encode(context()))
        elif msg.subject.startswith("memory.get"):
            await msg.respond(json.dumps({"user_id": body["user_id"], "tier": "l1", "seq": 42,
                                          "messages": []}).encode())
        elif body["task"] == "audit_judge":
            await msg.respond(_complete_reply(judge_says))
        elif body["task"] == "lead_score":
            await msg.respond(_complete_reply("55"))
        else:
            await msg.respond(_complete_reply(f"answer to {body['task']}"))

    for subject in ("memory.append", f"memory.get.{sidecar}", "llm.complete"):
        await nc.subscribe(subject, cb=answer)
    await nc.flush()


@pytest.mark.parametrize("share, sampled", [(1.0, 1), (0.0, 0)])
async def test_lookups_carry_the_workers_own_span_and_its_sampling(nats_url, tmp_path, share, sampled):
    """The traceparent is the span the worker opened (its id is what the call log says);
    sampled at `trace` share for lookups, never for appends and LLM calls."""
    seen: list = []
    log_path = tmp_path / "calls.jsonl"
    async with raw_client(nats_url) as nc:
        await _stand_in(nc, "probe-trace", seen)
        log = CallLog(str(log_path), "w")
        b = Bot(AsyncClient(nc, sidecar="probe-trace"), Measured(share), log,
                SimClock(0, 1, sim_start("2026-03-02")), scenario.Mix.parse(f"trace={share},search=1,quality=0"))
        await b.context("u", {"lead": "u"}, query="taxes?", min_seq=41)
        await b.read(b.client.recent("u", 10), {"lead": "u"}, n=10)
        await b.append("u", "qualifier-1", "user", "hi", "m1", {"lead": "u"})
        log.close()
    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    headers = [h for _, _, h in seen]
    assert all(h["traceparent"].startswith("00-") for h in headers)
    # the sampled bit of the trace flags (the SDK may set others, e.g. W3C's random-trace-id bit)
    assert [int(h["traceparent"][-2:], 16) & 1 for h in headers] == [sampled, sampled, 0]
    if sampled:
        assert [r["trace"] for r in records[:2]] == [h["traceparent"].split("-")[1] for h in headers[:2]]
    else:
        assert not any("trace" in r for r in records)
    assert len({h["traceparent"].split("-")[1] for h in headers}) == 3  # a trace each, not a shared one


async def test_a_reply_turn_reads_context_sends_breakpoints_and_a_sampled_quality_check(nats_url, tmp_path):
    seen: list = []
    log_path = tmp_path / "calls.jsonl"
    p = plan()
    async with raw_client(nats_url) as nc:
        await _stand_in(nc, "probe-reply", seen)
        log = CallLog(str(log_path), "w")
        b = Bot(AsyncClient(nc, sidecar="probe-reply"), Measured(0.0), log,
                SimClock(0, 1, sim_start("2026-03-02")),
                scenario.Mix.parse("market=0,long_read=0,history_read=0,search=0,quality=1,quality_max=1"))
        state = LeadState(p)
        text = "How much are the taxes there?"
        for i in range(2):  # the second reply finds the bound spent: no second check
            state.transcript.append({"role": "user", "text": text})  # as run_lead does
            await b.inbound(p, "qualifier-1", text, i, {"lead": p.user_id, "ix": f"0:{i}"}, random.Random(1),
                            random.Random(2), state)
        await b.drain_checks()  # the check runs beside the interaction
        log.close()
    gets = [body for subject, body, _ in seen if subject == "memory.get.probe-reply"]
    assert gets[0] == {"user_id": p.user_id, "op": "context", "budget_tokens": bot.CONTEXT_BUDGET,
                       "n": bot.CONTEXT_N, "k": bot.CONTEXT_K, "query": text, "min_seq": 42}
    llm = [body for subject, body, _ in seen if subject == "llm.complete"]
    replies = [r for r in llm if r["task"] == "reply"]
    assert len(replies) == 2
    assert [blk["cache_control"] for blk in replies[0]["system"]] == [EPHEMERAL, EPHEMERAL]
    full = [r for r in llm if r["task"] == bot.QUALITY_TASK]
    assert len(full) == 1 and full[0]["cache"]["mode"] == "off"
    assert isinstance(full[0]["system"], str)  # the whole transcript, as a fleet without tiermem asks
    assert full[0]["messages"][-1]["content"].endswith(text)
    judged = [r for r in llm if r["task"] == "audit_judge"]
    assert len(judged) == 1 and judged[0]["cache"]["mode"] == "off"
    assert judged[0]["messages"][0]["content"] == f"A: answer to reply\n\nB: answer to {bot.QUALITY_TASK}"
    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    quality = [r for r in records if r["kind"] == "quality"]
    assert len(quality) == 1
    assert quality[0]["agree"] is True and quality[0]["support"] == [1.0, 1.0]
    assert quality[0]["full"]["cache_read_input_tokens"] == 5000 and quality[0]["judge"]["output_tokens"] == 10
    assert [r["kind"] for r in records if r["kind"] in ("context", "append")][:2] == ["append", "context"]


@pytest.mark.parametrize("answer, expected", [
    ("a", (False, "adds_content", [1.0, 0.0])),  # the judge: A entails B, B does not entail A
    (f"answer to {bot.QUALITY_TASK}", (True, "same", None)),  # the same text: no judge asked
])
async def test_the_quality_record_is_the_judges_verdict(nats_url, tmp_path, answer, expected):
    seen: list = []
    log_path = tmp_path / "calls.jsonl"
    p = plan()
    async with raw_client(nats_url) as nc:
        await _stand_in(nc, "probe-no", seen, judge_says="yes no")
        log = CallLog(str(log_path), "w")
        b = Bot(AsyncClient(nc, sidecar="probe-no"), Measured(0.0), log, SimClock(0, 1, sim_start("2026-03-02")),
                scenario.Mix.parse("quality=1"))
        await b.check_quality(answer, bot.reply_request(p, [{"role": "user", "text": "hi"}]), context(),
                              {"lead": "u"})
        log.close()
    (q,) = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert (q["agree"], q["reason"], q.get("support")) == expected
    assert ("judge" in q) == (expected[2] is not None)
    assert sum(body.get("task") == "audit_judge" for _, body, _ in seen) == (expected[2] is not None)


def test_the_results_count_agreement_from_the_logged_judgements():
    from demo import results

    records = [{"kind": "quality", "model": bot.SONNET, "agree": a, "reason": "r", "code": 200,
                "full": {"input_tokens": 1000, "output_tokens": 0}, "judge": {"input_tokens": 0, "output_tokens": 0}}
               for a in (True, True, False)]
    records.append({"kind": "quality", "model": bot.SONNET, "code": 200, "full": {"input_tokens": 0}})
    prices = {"default": {"input": 3.0, "output": 15.0, "cache_write": 3.75, "cache_read": 0.3}}
    q = results.quality(records, prices)
    assert (q["agree"], q["judged"], q["sampled"], q["unjudged"]) == (2, 3, 4, 1)
    assert q["rate"] == pytest.approx(2 / 3) and q["cost_usd"] == pytest.approx(3 * 1000 * 3.0 / 1e6)
    assert "quality: 2/3 agree (66.7 %)" in "\n".join(results._context_lines(None, q))


def test_summary_calls_are_priced_into_tiermem_steps_of_the_waterfall():
    from demo import broker_tasks, results

    text = "\n".join([
        '# TYPE tiermem_llm_requests counter',
        'tiermem_llm_requests_total{model="claude-haiku-4-5",task="summary",bot="",status="miss",match=""} 3.0',
        'tiermem_llm_requests_total{model="claude-haiku-4-5",task="reply",bot="",status="hit",match="exact"} 5.0',
        '# TYPE tiermem_llm_tokens counter',
        'tiermem_llm_tokens_total{model="claude-haiku-4-5",task="summary",bot="",kind="input_tokens"} 3000.0',
        'tiermem_llm_tokens_total{model="claude-haiku-4-5",task="summary",bot="",kind="output_tokens"} 300.0',
        ""])
    tasks = broker_tasks.parse(text)
    assert tasks["summary"]["requests"] == 3 and tasks["reply"]["by_status"] == {"hit": 5}
    assert broker_tasks.delta(tasks, {})["summary"]["tokens"]["claude-haiku-4-5"]["input_tokens"] == 3000
    prices = {"default": {"input": 1.0, "output": 5.0, "cache_write": 1.25, "cache_read": 0.1}}
    base = [{"kind": "baseline", "task": "reply", "model": "m", "input_tokens": 10_000, "output_tokens": 0}]
    without = results.waterfall(base, [], prices)
    with_summaries = results.waterfall(base, [], prices, tasks["summary"])
    added = (3000 * 1.0 + 300 * 5.0) / 1e6
    steps = list(with_summaries["steps"].values())
    assert steps[0] == list(without["steps"].values())[0]  # the baseline has no summaries
    assert steps[1:] == pytest.approx([v + added for v in list(without["steps"].values())[1:]])
    assert with_summaries["summaries"]["requests"] == 3
