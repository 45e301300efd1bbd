"""freshness-auditor against real NATS, Redis, Postgres and the simulator.

Memory: the tiers run in this process with every answer recorded and every
record audited. Stale windows are planted by writing Redis around the
applier's guard and by forging a change event to the sidecars; each must be
found, evicted and counted exactly once, while thousands of honest reads
raise no alarm. LLM: a wrong answer is planted in the broker's exact tier;
the auditor must re-ask the simulator, find it wrong, have it evicted, and
stay within its spend budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import types
import uuid

import httpx
import msgspec
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from services.freshness_auditor.service import ESTIMATE_MARGIN, Auditor, build as build_auditor
from services.l2_gateway.redis_window import STATE, keys
from services.l2_gateway.service import build as build_l2
from services.l3_semantic_indexer.service import build as build_l3
from services.llm_broker import thresholds
from services.llm_broker.policy import Entry, exact_key, partition_key
from services.llm_broker.service import build as build_broker
from services.memory_l1.service import build as build_l1
from shared import metrics, subjects, telemetry
from shared.contract import (
    CacheOptions, Changed, CompleteRequest, Message, ServedBatch, ServedLLM, ServedMemory, Usage, encode,
)
from shared.errors import TierError
from shared.llm_config import Config
from shared.pricing import cost_usd
from shared.settings import Settings
from shared.upstream import Answer
from tests.helpers import client, eventually, ok, running, stand_in_for_llm_forget

GRACE_S = 0.3
AUDIT = {"served_flush_s": 0.02, "audit_sample_rate": 1.0, "audit_grace_s": GRACE_S}
NO_MODEL = "http://127.0.0.1:9"  # memory tests never call the model


async def audit_stats(nc) -> dict:
    return await ok(nc, subjects.AUDIT_STATS, {})


async def stats_until(nc, done, timeout: float = 20.0) -> dict:
    """`audit.stats` once `done(stats)` holds (on timeout the failure shows the last stats)."""
    async def check():
        stats = await audit_stats(nc)
        assert done(stats), stats
        return stats

    return await eventually(check, timeout=timeout)


def tier(stats: dict, name: str) -> dict:
    return stats["memory"].get(name, {"served": 0, "checked": 0, "stale": 0, "evicted": 0})


@contextlib.asynccontextmanager
async def _clients(env: dict[str, str]):
    """A NATS client and a Redis client (to plant stale data around the services)."""
    async with client(env["NATS_URL"]) as nc:
        redis = Redis.from_url(env["REDIS_URL"])
        try:
            yield nc, redis
        finally:
            await redis.aclose()


@pytest.fixture
async def memory_stack(clean_state):
    env = {**clean_state, "ANTHROPIC_BASE_URL": NO_MODEL}
    async with running("l2-gateway", build_l2, env, **AUDIT), \
            running("l3-semantic-indexer", build_l3, env, **AUDIT), \
            running("memory-l1", build_l1, env, **AUDIT), \
            running("freshness-auditor", build_auditor, env, **AUDIT):
        async with _clients(env) as both:
            await stand_in_for_llm_forget(both[0])  # no llm-broker in this stack
            yield both


async def append(nc, user: str, text: str, role: str = "user") -> int:
    reply = await ok(nc, subjects.MEMORY_APPEND, {
        "user_id": user, "bot_id": "sales-1", "role": role, "text": text,
        "msg_id": uuid.uuid4().hex})
    return reply["seq"]


async def l2_keys(redis, user: str) -> list[str]:
    """The user's window keys in the L2 tier's current epoch."""
    return keys(user, (await redis.hget(STATE, "epoch")).decode())


def seqs(reply: dict) -> list[int]:
    return [m["seq"] for m in reply["messages"]]


async def test_thousands_of_honest_reads_raise_no_stale_alarm(memory_stack):
    nc, _ = memory_stack
    users = [f"lead-{i}" for i in range(25)]
    reads = 0

    async def conversation(user: str) -> int:
        done = 0
        for turn in range(40):
            seq = await append(nc, user, f"turn {turn}: is the {turn % 5 + 2}-bed still available?",
                               "user" if turn % 2 == 0 else "assistant")
            await ok(nc, subjects.MEMORY_GET, {"user_id": user, "n": 10, "min_seq": seq})
            await ok(nc, subjects.MEMORY_GET, {"user_id": user, "n": 5})
            done += 2
            if turn % 4 == 3:
                await ok(nc, subjects.MEMORY_GET, {"user_id": user, "n": 30})  # past L1's window
                done += 1
            if turn % 10 == 9:
                await ok(nc, subjects.MEMORY_GET, {"user_id": user, "op": "search",
                                                   "query": "which bedroom count", "k": 3})
                done += 1
        return done

    reads = sum(await asyncio.gather(*(conversation(u) for u in users)))
    assert reads >= 2000
    stats = await stats_until(nc, lambda s: sum(t["checked"] for t in s["memory"].values()) >= reads)
    checked = {name: t["checked"] for name, t in stats["memory"].items()}
    assert sum(checked.values()) >= reads, stats
    assert checked.get("l1", 0) > 1000 and checked.get("l2", 0) > 100 and checked.get("l3", 0) > 0
    assert all(t["stale"] == 0 for t in stats["memory"].values()), stats
    assert stats["records_dropped"] == 0


async def test_planted_stale_windows_are_found_evicted_and_counted_once_each(memory_stack):
    nc, redis = memory_stack

    # 1. L2 holds a message the log never acknowledged (written around the applier's guard).
    user = "lead-holds-fake"
    real = [await append(nc, user, f"message {i}") for i in range(3)]
    fake = Message(seq=real[-1] + 10_000, msg_id="planted", role="user", bot_id="x",
                   text="I want to cancel", ts="2026-11-26T00:00:00Z")
    await redis.zadd((await l2_keys(redis, user))[0], {encode(fake): fake.seq})
    served = await ok(nc, subjects.MEMORY_L2_GET, {"user_id": user, "n": 5})
    assert seqs(served)[-1] == fake.seq  # the planted message was served
    stats = await stats_until(nc, lambda s: tier(s, "l2")["evicted"] >= 1)
    assert (tier(stats, "l2")["stale"], tier(stats, "l2")["evicted"]) == (1, 1), stats
    assert seqs(await ok(nc, subjects.MEMORY_L2_GET, {"user_id": user, "n": 5})) == real

    # 2. L2 lacks an acknowledged message (removed behind the applier's back).
    user = "lead-lacks-one"
    real = [await append(nc, user, f"message {i}") for i in range(3)]
    window = (await l2_keys(redis, user))[0]
    newest = (await redis.zrange(window, -1, -1))[0]
    assert await redis.zrem(window, newest) == 1
    await asyncio.sleep(GRACE_S + 0.1)  # scenario: acknowledged longer than the grace before the read
    # (asked for more than it now holds, L2 would see its count is short and pass down)
    stale = await ok(nc, subjects.MEMORY_L2_GET, {"user_id": user, "n": 2})
    assert (stale["tier"], seqs(stale)) == ("l2", real[:2])
    stats = await stats_until(nc, lambda s: tier(s, "l2")["evicted"] >= 2)
    assert (tier(stats, "l2")["stale"], tier(stats, "l2")["evicted"]) == (2, 2), stats
    repaired = await ok(nc, subjects.MEMORY_L2_GET, {"user_id": user, "n": 5})
    assert (repaired["tier"], seqs(repaired)) == ("l2", real)

    # 3. A sidecar applies a forged change event: L1 serves a message the log does not have.
    # (Its seq lies within the log, another user's: one beyond the log the sidecar refuses.)
    user = "lead-forged-event"
    real = [await append(nc, user, f"message {i}") for i in range(2)]
    assert seqs(await ok(nc, subjects.MEMORY_GET, {"user_id": user, "n": 10, "min_seq": real[-1]})) == real
    someone_elses = await append(nc, "lead-someone-else", "their message")
    forged = Message(seq=someone_elses, msg_id="forged", role="user", bot_id="x",
                     text="forged", ts="2026-11-26T00:00:00Z")
    await nc.publish(subjects.changed_subject(user), encode(Changed(
        op="append", user_id=user, seq=forged.seq, prev_seq=real[-1], count=3, message=forged)))
    await nc.flush()

    async def forged_served():  # once the sidecar applied the forged event
        hit = await ok(nc, subjects.MEMORY_GET, {"user_id": user, "n": 10})
        assert (hit["tier"], seqs(hit)) == ("l1", [*real, forged.seq])
        return True

    await eventually(forged_served)
    stats = await stats_until(nc, lambda s: tier(s, "l1")["evicted"] >= 1)
    assert (tier(stats, "l1")["stale"], tier(stats, "l1")["evicted"]) == (1, 1), stats
    after = await ok(nc, subjects.MEMORY_GET, {"user_id": user, "n": 10})
    assert (after["tier"], seqs(after)) == ("l2", real)  # refilled from L2, the fake gone

    # Nothing else was stale: the counts are the planted cases, once every read was checked.
    stats = await stats_until(nc, lambda s: all(t["checked"] + t["inconclusive"] == t["served"]
                                                for t in s["memory"].values()))
    assert {name: t["stale"] for name, t in stats["memory"].items() if t["stale"]} == {"l1": 1, "l2": 2}


async def test_a_read_just_before_a_forget_is_inconclusive_and_one_after_it_stale(memory_stack):
    nc, _ = memory_stack
    user = "lead-forgotten"
    real = [await append(nc, user, f"message {i}") for i in range(3)]
    before = time.time()
    await asyncio.sleep(GRACE_S + 0.1)  # scenario: the read at `before` is a grace before the forget
    await ok(nc, subjects.MEMORY_FORGET, {"user_id": user})
    await asyncio.sleep(GRACE_S + 0.1)  # scenario: and the read at `after` a grace after it
    after = time.time()
    # What a tier would report had it served the user's window at those two moments
    # (tier l3: counted, never evicted, so nothing else happens).
    served = [ServedMemory(tier="l3", user_id=user, op="recent", n=10, min_seq=None, seq=real[-1],
                           seqs=real, at=at) for at in (before, after)]
    await nc.publish(subjects.audit_served("test"), encode(ServedBatch(source="test", memory=served)))
    stats = await stats_until(nc, lambda s: tier(s, "l3")["checked"]
                              + tier(s, "l3").get("inconclusive", 0) >= 2)
    l3 = tier(stats, "l3")
    assert (l3["inconclusive"], l3["stale"], l3["checked"]) == (1, 1, 1), stats


async def test_an_audit_is_a_span_in_the_trace_of_the_lookup_it_audits(memory_stack, spans):
    nc, _ = memory_stack
    await append(nc, "lead-traced", "hello")
    await ok(nc, subjects.MEMORY_GET, {"user_id": "lead-traced", "n": 10})  # fills L1
    with telemetry.tracer.start_as_current_span("caller") as caller:
        msg = await nc.request(subjects.MEMORY_GET, b'{"user_id": "lead-traced", "n": 10}',
                               timeout=10, headers=telemetry.inject())
    assert msgspec.json.decode(msg.data)["tier"] == "l1"
    trace_id = caller.get_span_context().trace_id
    audits = await eventually(lambda: [s for s in spans.get_finished_spans()
                                       if s.name == "audit memory" and s.context.trace_id == trace_id],
                              what="an audit span in the lookup's trace")
    served = next(s for s in spans.get_finished_spans()
                  if s.context.trace_id == trace_id and s.name.startswith("memory.get"))
    audit = audits[0]
    assert audit.parent.span_id == served.context.span_id
    assert [link.context.span_id for link in audit.links] == [served.context.span_id]
    assert audit.attributes["tiermem.audit.verdict"] == "fresh"


# --- LLM hits ----------------------------------------------------------------

BUDGET = 0.5


@pytest.fixture
async def llm_stack(clean_state, simulator):
    env = {**clean_state, "ANTHROPIC_BASE_URL": simulator}
    settings = {**AUDIT, "audit_llm_budget": BUDGET}
    async with running("llm-broker", build_broker, env, **settings), \
            running("freshness-auditor", build_auditor, env, **settings):
        async with _clients(env) as both:
            await stand_in_for_llm_forget(both[0])  # no llm-broker in this stack
            yield both


def intent(text: str) -> dict:
    return {"task": "intent", "user_id": "lead-7", "model": "claude-haiku-4-5",
            "system": "Classify the lead's intent. Answer with one label.", "max_tokens": 50,
            "temperature": 0, "messages": [{"role": "user", "content": text}],
            "cache": {"volatility": "lead_intent", "mode": "exact", "scope": "user"}}


async def test_a_planted_wrong_answer_is_found_by_re_asking_and_evicted_within_budget(llm_stack):
    nc, redis = llm_stack
    body = intent("Is the Main St house still available?")
    right = await ok(nc, subjects.LLM_COMPLETE, body)
    assert right["cache"]["status"] == "miss"

    # Plant: the cached answer says something else, and claims a price that funds audits.
    req = msgspec.convert(body, CompleteRequest)
    key, = [k async for k in redis.scan_iter(match=f"llm:x:*:{exact_key(partition_key(req), req)}")]
    entry = msgspec.msgpack.decode(await redis.get(key), type=Entry)
    wrong_text = "not_interested" if right["text"] != "not_interested" else "pricing"
    entry = msgspec.structs.replace(entry, text=wrong_text, cost_usd=0.01)
    await redis.set(key, msgspec.msgpack.encode(entry), ex=600)

    served_wrong = 0

    async def evicted():  # each hit adds to the budget; the audit comes once it is funded
        nonlocal served_wrong
        reply = await ok(nc, subjects.LLM_COMPLETE, body)
        if reply["cache"]["status"] == "hit":
            assert reply["text"] == wrong_text
            served_wrong += 1
            return None
        return reply

    reply = await eventually(evicted, every=0.05, what="the planted answer evicted")
    # Evicted: the same request misses, is answered right, and is cached right again.
    assert reply["text"] == right["text"]
    again = await ok(nc, subjects.LLM_COMPLETE, body)
    assert (again["cache"]["status"], again["text"]) == ("hit", right["text"])

    stats = await stats_until(
        nc, lambda s: s["llm_by_task"].get("intent", {}).get("served", 0) >= served_wrong + 1)
    by_task, by_class = stats["llm_by_task"]["intent"], stats["llm_by_volatility"]["lead_intent"]
    assert (by_task["wrong"], by_task["evicted"]) == (1, 1), stats
    assert (by_class["wrong"], by_class["evicted"]) == (1, 1), stats
    assert by_task["served"] == served_wrong + 1
    # The cap: audits spent at most BUDGET of what the audited hits saved, so some were skipped.
    assert 0 < stats["audit_spend_usd"] <= BUDGET * stats["saved_usd"] + 1e-9, stats
    assert stats["skipped_over_budget"] >= 1 and served_wrong >= 3


@pytest.fixture
async def judged_stack(clean_state, simulator):
    """Broker and auditor with the LLM judge, and budget enough to audit every free-text hit."""
    env = {**clean_state, "ANTHROPIC_BASE_URL": simulator}
    settings = {**AUDIT, "audit_llm_budget": 5.0, "audit_judge": "llm"}
    async with running("llm-broker", build_broker, env, **settings), \
            running("freshness-auditor", build_auditor, env, **settings):
        async with _clients(env) as (nc, _):
            yield nc, simulator


# A brief of our own: a kind of home the request lists is a fact of the question.
# Written for this test; not from the demo (services/agent_worker) nor from the broker
# guard's word lists (services/llm_broker/guard.py holds neither kind).
QUILLFEATHER = ("You are the assistant of Quillfeather Realty. Answer the client's text in two "
                "sentences. Kinds of property on our books: farmhouse, schoolhouse, boathouse, granary.")


# A long question: one changed word costs little cosine, so the guard serves the swap
# (wordllama cosine 0.94, guard score 0.96 against a default threshold of 0.94).
HARLOW = "the asking price of the old {k} on Harlow Road, the one by the river with the big barn and orchard?"


def reply_request(text: str) -> dict:
    return {"task": "reply", "user_id": "lead-9", "model": "claude-haiku-4-5", "system": QUILLFEATHER,
            "max_tokens": 300, "temperature": 0, "messages": [{"role": "user", "content": text}],
            "cache": {"volatility": "static", "mode": "semantic", "scope": "user"}}


def judge_calls(simulator: str) -> int:
    return httpx.get(f"{simulator}/stats").json()["by_task"].get("entailment", 0)


async def test_the_auditor_flags_a_wrong_free_text_hit_that_the_guard_passed(judged_stack):
    """Issue 12, part 4, end to end: the broker's guard serves the farmhouse's answer for
    the schoolhouse (one fact differs in a long question); the auditor re-asks the
    simulator, asks it (the LLM judge) whether the two answers entail each other, finds the
    hit wrong and has it evicted. A true paraphrase hit in the same partition is judged right."""
    nc, simulator = judged_stack
    judged_before = judge_calls(simulator)
    first = await ok(nc, subjects.LLM_COMPLETE, reply_request("Could you tell me " + HARLOW.format(k="farmhouse")))
    assert first["cache"]["status"] == "miss"

    para = await ok(nc, subjects.LLM_COMPLETE, reply_request("Can you tell me " + HARLOW.format(k="farmhouse")))
    assert (para["cache"]["status"], para["cache"]["match"]) == ("hit", "semantic"), para["cache"]
    stats = await stats_until(nc, lambda s: s["llm_by_task"].get("reply", {}).get("checked", 0) >= 1)
    assert (stats["llm_by_task"]["reply"]["checked"], stats["llm_by_task"]["reply"]["wrong"]) == (1, 0), stats

    other = await ok(nc, subjects.LLM_COMPLETE, reply_request("Could you tell me " + HARLOW.format(k="schoolhouse")))
    assert (other["cache"]["status"], other["cache"]["match"]) == ("hit", "semantic"), other["cache"]
    assert other["text"] == first["text"]  # the farmhouse's price, served for the schoolhouse
    stats = await stats_until(nc, lambda s: s["llm_by_task"]["reply"].get("evicted", 0) >= 1)
    reply = stats["llm_by_task"]["reply"]
    assert (reply["checked"], reply["wrong"], reply["evicted"]) == (2, 1, 1), stats
    assert judge_calls(simulator) - judged_before == 2  # both judged by the model, none skipped
    assert stats["skipped_over_budget"] == 0
    # Evicted: the schoolhouse is now answered for itself.
    again = await ok(nc, subjects.LLM_COMPLETE, reply_request("Could you tell me " + HARLOW.format(k="schoolhouse")))
    assert again["cache"]["status"] == "miss" and again["text"] != first["text"]


WEATHER = {"name": "get_weather", "description": "Get the current weather for a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                            "required": ["city"]}}


def weather_request(text: str) -> dict:
    return {"task": "reply", "user_id": "lead-3", "model": "claude-haiku-4-5", "max_tokens": 200,
            "tools": [WEATHER], "messages": [{"role": "user", "content": text}],
            "cache": {"volatility": "static", "mode": "exact", "scope": "user"}}


def calls(reply: dict) -> list[tuple[str, dict]]:
    return [(b["name"], b["input"]) for b in reply["message"]["content"] if b["type"] == "tool_use"]


async def test_a_tool_use_hit_is_judged_by_its_tool_calls_not_its_text(judged_stack, clean_state):
    """An answer that only calls a tool has no text: by text alone, any two such answers
    agree. The auditor compares the calls: a cached call for the wrong city is found
    wrong and evicted; the very call the model makes again is right."""
    nc, simulator = judged_stack
    judged_before = judge_calls(simulator)
    paris = weather_request("What is the weather in Paris today?")
    first = await ok(nc, subjects.LLM_COMPLETE, paris)
    assert (first["cache"]["status"], first["stop_reason"], first["text"]) == ("miss", "tool_use", "")
    again = await ok(nc, subjects.LLM_COMPLETE, paris)
    assert again["cache"]["status"] == "hit" and calls(again) == calls(first)
    stats = await stats_until(nc, lambda s: s["llm_by_task"].get("reply", {}).get("checked", 0) >= 1)
    assert (stats["llm_by_task"]["reply"]["checked"], stats["llm_by_task"]["reply"]["wrong"]) == (1, 0)

    # Plant: the cached answer for Lisbon calls the tool for London (and funds its audit).
    lisbon = weather_request("What is the weather in Lisbon today?")
    assert (await ok(nc, subjects.LLM_COMPLETE, lisbon))["cache"]["status"] == "miss"
    req = msgspec.convert(lisbon, CompleteRequest)
    redis = Redis.from_url(clean_state["REDIS_URL"])
    try:
        key, = [k async for k in redis.scan_iter(match=f"llm:x:*:{exact_key(partition_key(req), req)}")]
        entry = msgspec.msgpack.decode(await redis.get(key), type=Entry)
        content = [{**b, "input": {"city": "London"}} if b["type"] == "tool_use" else b
                   for b in entry.message["content"]]
        entry = msgspec.structs.replace(entry, message={**entry.message, "content": content},
                                        cost_usd=0.01)
        await redis.set(key, msgspec.msgpack.encode(entry), ex=600)
    finally:
        await redis.aclose()
    served = await ok(nc, subjects.LLM_COMPLETE, lisbon)
    assert served["cache"]["status"] == "hit" and calls(served) == [("get_weather", {"city": "London"})]
    assert served["text"] == ""  # the same (empty) text as the model's own answer

    stats = await stats_until(nc, lambda s: s["llm_by_task"]["reply"].get("evicted", 0) >= 1)
    reply = stats["llm_by_task"]["reply"]
    assert (reply["checked"], reply["wrong"], reply["evicted"]) == (2, 1, 1), stats
    assert judge_calls(simulator) == judged_before  # judged by the calls: no text to judge
    fresh = await ok(nc, subjects.LLM_COMPLETE, lisbon)  # evicted: asked again, and right
    assert fresh["cache"]["status"] == "miss" and calls(fresh)[0][1] != {"city": "London"}


async def test_a_free_text_audit_the_budget_cannot_judge_is_skipped_not_re_asked(clean_state, simulator):
    """With the LLM judge, a re-ask is only worth its cost if the judge's call fits too:
    otherwise the audit is skipped and counted, and nothing is spent."""
    env = {**clean_state, "ANTHROPIC_BASE_URL": simulator}
    cost = 0.001
    # the budget pays for the re-ask (1.25 x cost) but not for it and the judge's call
    settings = {**AUDIT, "audit_llm_budget": 1.3, "audit_judge": "llm"}
    request = msgspec.convert(reply_request("How much is the Harlow granary?"), CompleteRequest)
    hit = ServedLLM(entry_id="e1", partition="p", match="semantic", similarity=0.9, age_s=0.0,
                    saved_usd=cost, text="The granary in Harlow is $310,000. " * 40, at=time.time(),
                    request=request)
    async with running("freshness-auditor", build_auditor, env, **settings):
        async with client(env["NATS_URL"]) as nc:
            await nc.publish(subjects.audit_served("test"), encode(ServedBatch(source="test", llm=[hit])))
            stats = await stats_until(nc, lambda s: s["skipped_over_budget"] >= 1)
    assert stats["skipped_over_budget"] == 1 and stats["audit_spend_usd"] == 0, stats
    assert stats["llm_by_task"]["reply"].get("checked", 0) == 0


async def test_a_wrong_semantic_verdict_raises_its_partitions_threshold(llm_stack):
    nc, redis = llm_stack
    verdict = {"entry_id": "p1:abc", "partition": "p1", "match": "semantic", "wrong": False}
    first = await ok(nc, subjects.LLM_VERDICT, verdict)
    assert first["evicted"] is False
    raised = await ok(nc, subjects.LLM_VERDICT, {**verdict, "wrong": True})
    assert raised["threshold"] > first["threshold"]
    assert float(await redis.hget(thresholds.KEY, "p1")) == raised["threshold"]
    # the reply carries the partition's false-hit bound: one step up, evidence reset
    assert raised["bound"] == {"threshold": raised["threshold"], "level": 1, "checks": 0,
                               "wrong": 0, "false_hit_rate": 0.0, "upper_bound": 1.0,
                               "max_false_hit_rate": 0.01, "moves": 1}
    # a wrong exact hit is stale data, not loose matching: evicted, threshold unchanged
    exact = await ok(nc, subjects.LLM_VERDICT, {**verdict, "partition": "p2", "match": "exact",
                                               "wrong": True})
    assert exact["threshold"] == first["threshold"]
    assert await redis.hget(thresholds.KEY, "p2") is None


async def test_forged_tier_task_and_class_names_are_counted_as_other(clean_state):
    """Served records name a tier, a task and a class; the counts and metrics keep a fixed set."""
    env = {**clean_state, "ANTHROPIC_BASE_URL": NO_MODEL}
    request = msgspec.convert(intent("Is it available?"), CompleteRequest)
    batch = ServedBatch(source="forger", memory=[
        ServedMemory(tier=f"tier-{i}", user_id="lead-7", op="recent", n=1, min_seq=None, seq=1,
                     seqs=[1], at=time.time()) for i in range(30)], llm=[
        ServedLLM(entry_id=f"e{i}", partition="p", match=f"m{i}", similarity=1.0, age_s=0.0,
                  saved_usd=0.01, text="x", at=time.time(), request=msgspec.structs.replace(
                      request, task=f"task-{i}", cache=CacheOptions(volatility=f"class-{i}")))
        for i in range(30)])
    async with running("freshness-auditor", build_auditor, env, **AUDIT, audit_llm_budget=0.0):
        async with client(env["NATS_URL"]) as nc:
            await nc.publish(f"{subjects.AUDIT_SERVED_PREFIX}.forger", encode(batch))
            stats = await stats_until(nc, lambda s: s["llm_by_task"].get("other", {}).get(
                "served", 0) == 30 and tier(s, "other")["served"] == 30)
    assert set(stats["memory"]) == {"other"} and tier(stats, "other")["checked"] == 0
    assert set(stats["llm_by_task"]) == set(stats["llm_by_volatility"]) == {"other"}
    for family in text_string_to_metric_families(generate_latest().decode()):
        if family.name.startswith("tiermem_audit"):
            for sample in family.samples:
                assert not {"tier-0", "task-0", "class-0", "m0"} & set(sample.labels.values())


# --- the audit budget's books --------------------------------------------------


class _Tally:
    """Counts kept in memory (the auditor's `Tally` without Redis)."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}

    def add(self, name: str, amount: float = 1) -> None:
        self.totals[name] = self.totals.get(name, 0) + amount

    def llm(self, *_args) -> None:
        return None

    def partition(self, *_args) -> None:
        return None


class _Upstream:
    """Answers every re-ask with the same text at a known usage."""

    def __init__(self, text: str, usage: Usage) -> None:
        self.text, self.usage = text, usage

    async def complete(self, _req):
        return Answer(self.text, [], "claude-haiku-4-5", "end_turn", self.usage)


class _FailingVerdicts:
    """A runtime whose `llm.verdict` request fails (the broker is down)."""

    def __init__(self) -> None:
        self.settings = Settings.from_env({"NATS_URL": "nats://127.0.0.1:9"}, audit_llm_budget=1.0)
        self.asked = 0

    async def request(self, *_args, **_kwargs):
        self.asked += 1
        raise TierError("broker unavailable", 503)


async def test_an_audit_that_fails_after_its_re_ask_keeps_the_re_ask_spent():
    """The re-ask is settled once, at what it cost; a later failure must not un-book it
    (before: the worker settled it a second time, as if nothing had been spent)."""
    usage = Usage(input_tokens=400, output_tokens=20)
    config = Config.load()
    cost = cost_usd(config.price_of("claude-haiku-4-5"), usage)
    verdicts = _FailingVerdicts()
    auditor = Auditor(verdicts, _Tally(), _Upstream("hot", usage), config,
                      free_text=types.SimpleNamespace(threshold=0.5))  # a label task: never asked
    request = msgspec.convert({**intent("Is it still available?"), "task": "lead_score"},
                              CompleteRequest)
    hit = ServedLLM(entry_id="e1", partition="p", match="exact", similarity=1.0, age_s=0.0,
                    saved_usd=cost, text="hot", at=time.time(), request=request)
    estimate = ESTIMATE_MARGIN * cost
    auditor.budget.earn(10 * cost)
    assert auditor.budget.reserve(estimate)
    await auditor.llm_queue.put((hit, estimate))
    worker = asyncio.create_task(auditor.llm_worker())
    failed = metrics.audit_skipped.labels("llm", "error")
    before = failed._value.get()
    try:
        # it fails where meant to (telling the broker the verdict), and the worker handled it
        await eventually(lambda: verdicts.asked and failed._value.get() == before + 1, timeout=5,
                         what="the audit failing at its verdict")
    finally:
        worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await worker
    assert auditor.tally.totals["spend_usd"] == pytest.approx(cost)
    assert auditor.budget.spent == pytest.approx(cost)  # before the fix: cost - estimate < 0
