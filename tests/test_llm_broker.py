"""llm-broker against real NATS, Redis, Postgres and the simulator through the real SDK.

The simulator runs as its own process with near-zero latency; its /stats count
the upstream calls, /faults injects 429/529/500 and hangs. The broker runs
in-process with a controllable clock, so TTLs are tested without sleeping.
"""

from __future__ import annotations

import asyncio
import functools
import random
import time

import asyncpg
import httpx
import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from services.l2_gateway.service import build as build_l2
from services.llm_broker import guard
from services.llm_broker.service import build as build_broker
from devstack import servers
from shared import subjects
from shared.contract import ServedBatch, Usage
from shared.llm_config import Config
from shared.pricing import cost_usd
from tests.helpers import Sim, call, client, eventually, never_within, ok, running


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def broker(clean_state, simulator):
    sim = Sim(simulator)
    sim.reset()
    clock = Clock()
    env = {**clean_state, "ANTHROPIC_BASE_URL": simulator}
    async with running("llm-broker", functools.partial(build_broker, clock=clock), env,
                       llm_max_retries=2, llm_timeout_s=1.0, breaker_failures=3,
                       breaker_cooldown_s=30):
        async with client(env["NATS_URL"]) as nc:
            yield nc, sim, clock, env


def req(text: str, *, user: str = "lead-42", task: str = "intent", volatility: str = "lead_intent",
        mode: str = "semantic", scope: str = "user", history: list | None = None, **extra) -> dict:
    messages = [*(history or []), {"role": "user", "content": text}]
    return {"task": task, "user_id": user, "model": "claude-haiku-4-5",
            "system": "Classify the lead's intent. Answer with one label.", "max_tokens": 200,
            "temperature": 0, "messages": messages,
            "cache": {"volatility": volatility, "mode": mode, "scope": scope}, **extra}


async def test_identical_repeat_is_an_exact_hit_and_saves_what_the_miss_cost(broker):
    nc, sim, _, _ = broker
    first = await ok(nc, subjects.LLM_COMPLETE, req("Is the Main St house still available?"))
    again = await ok(nc, subjects.LLM_COMPLETE, req("Is the Main St house still available?"))
    assert first["cache"]["status"] == "miss" and first["cost_usd"] > 0 and first["saved_usd"] == 0
    assert again["cache"]["status"] == "hit" and again["cache"]["match"] == "exact"
    assert again["text"] == first["text"] and again["cost_usd"] == 0
    assert again["saved_usd"] == pytest.approx(first["cost_usd"])
    assert sim.calls() == 1
    usage = Usage(**first["usage"])
    price = Config.load().price_of("claude-haiku-4-5")
    assert first["cost_usd"] == pytest.approx(cost_usd(price, usage), abs=1e-8)
    assert set(first) >= {"text", "content", "model", "stop_reason", "usage", "cost_usd",
                          "saved_usd", "cache"}
    assert first["content"] == [{"text": first["text"], "type": "text"}]


async def test_paraphrase_in_the_same_partition_is_a_semantic_hit(broker):
    nc, sim, _, _ = broker
    await ok(nc, subjects.LLM_COMPLETE, req("Is the house on Main Street still available?"))
    hit = await ok(nc, subjects.LLM_COMPLETE, req("Is the house on Main Street still available"))
    assert hit["cache"]["status"] == "hit"
    para = await ok(nc, subjects.LLM_COMPLETE, req("is the house on main street still available ?"))
    assert para["cache"]["status"] == "hit", para["cache"]
    assert sim.calls() == 1


async def test_a_semantic_hits_record_carries_the_guard_score_and_the_threshold_it_passed(broker):
    """The auditor's verdict on it is weighed by them (services/llm_broker/bound.py)."""
    nc, _, _, _ = broker
    batches: list[ServedBatch] = []

    async def keep(msg) -> None:
        batches.append(msgspec.json.decode(msg.data, type=ServedBatch))

    sub = await nc.subscribe(subjects.audit_served("llm-broker"), cb=keep)
    await ok(nc, subjects.LLM_COMPLETE, req("Is the house on Main Street still available?"))
    hit = await ok(nc, subjects.LLM_COMPLETE, req("is the house on main street still available ?"))
    assert hit["cache"]["match"] == "semantic"
    await eventually(lambda: any(r.match == "semantic" for b in batches for r in b.llm),
                     what="the semantic hit published")
    await sub.unsubscribe()
    rec, = [r for b in batches for r in b.llm if r.match == "semantic"]
    assert rec.threshold == pytest.approx(guard.default_threshold(None), abs=0.5)
    assert rec.score is not None and rec.score >= rec.threshold


@pytest.mark.parametrize("first,second", [
    ("What is the 30-year mortgage rate today?", "What is the 15-year mortgage rate today?"),
    ("How do I enable 2FA on my account?", "How do I disable 2FA on my account?"),
    ("Is the 3-bed still available?", "Is the 4-bed still available?"),
    ("We can afford the house.", "We cannot afford the house."),
    ("Is the Main St house still available?", "Is the Oak Ave house still available?"),
])
async def test_look_alike_requests_are_misses(broker, first, second):
    nc, sim, _, _ = broker
    await ok(nc, subjects.LLM_COMPLETE, req(first, task="reply", volatility="market_context"))
    second_reply = await ok(nc, subjects.LLM_COMPLETE,
                            req(second, task="reply", volatility="market_context"))
    assert second_reply["cache"]["status"] == "miss"
    assert sim.calls() == 2


async def test_earlier_turns_and_parameters_partition_the_cache(broker):
    nc, sim, _, _ = broker
    history = [{"role": "user", "content": "Hi, I saw the listing."},
               {"role": "assistant", "content": "Great, which one?"}]
    await ok(nc, subjects.LLM_COMPLETE, req("Is it still available?"))
    for variant in (req("Is it still available?", history=history),
                    req("Is it still available?", max_tokens=100),
                    req("Is it still available?", temperature=0.7),
                    req("Is it still available?", user="lead-43")):
        assert (await ok(nc, subjects.LLM_COMPLETE, variant))["cache"]["status"] == "miss"
    assert sim.calls() == 5


async def test_scope_user_never_serves_another_users_entry(broker):
    """Random traffic: every (user, question)'s first answer must be a miss."""
    nc, sim, _, _ = broker
    rng = random.Random(7)
    questions = ["Is the house still available?", "What is the asking price?",
                 "Can we schedule a viewing on Saturday?", "Do you accept FHA loans?",
                 "Please stop texting me."]
    traffic = [(f"u{rng.randrange(40)}", rng.choice(questions), rng.choice(["exact", "semantic"]))
               for _ in range(1500)]
    seen: set[tuple[str, str]] = set()
    wrong = 0
    for i in range(0, len(traffic), 50):
        batch = traffic[i:i + 50]
        replies = []
        for user, q, mode in batch:  # sequential per batch keeps "first" well defined
            replies.append(await ok(nc, subjects.LLM_COMPLETE, req(q, user=user, mode=mode)))
        for (user, q, _), reply in zip(batch, replies):
            first = (user, q) not in seen
            seen.add((user, q))
            if first and reply["cache"]["status"] == "hit":
                wrong += 1
    assert wrong == 0
    assert sim.calls() == len(seen)


async def _status(nc, body, status: str) -> bool:
    return (await ok(nc, subjects.LLM_COMPLETE, body))["cache"]["status"] == status


async def test_lead_intent_dropped_by_users_next_message_market_context_kept(broker):
    nc, sim, _, env = broker
    async with running("l2-gateway", build_l2, env):
        intent = req("Is the house still available?")
        market = req("How is the market on Main St?", task="market", volatility="market_context")
        await ok(nc, subjects.LLM_COMPLETE, intent)
        await ok(nc, subjects.LLM_COMPLETE, market)
        assert (await ok(nc, subjects.LLM_COMPLETE, intent))["cache"]["status"] == "hit"
        # the bot speaking does not invalidate; the lead speaking does
        await ok(nc, subjects.MEMORY_APPEND, {"user_id": "lead-42", "bot_id": "b", "role": "assistant",
                                               "text": "Yes it is!", "msg_id": "m1"})
        await never_within(0.3, lambda: _status(nc, intent, "miss"), every=0.05,
                           what="the bot's message invalidating")
        await ok(nc, subjects.MEMORY_APPEND, {"user_id": "lead-42", "bot_id": "b", "role": "user",
                                               "text": "Actually, never mind.", "msg_id": "m2"})
        await eventually(lambda: _status(nc, intent, "miss"), every=0.05,
                         what="lead_intent dropped by the user's message")
        assert (await ok(nc, subjects.LLM_COMPLETE, market))["cache"]["status"] == "hit"
        # forget drops every entry of the user
        # no L3 in this test: the forget answers 503, but caches are told first
        code, _ = await call(nc, subjects.MEMORY_FORGET, {"user_id": "lead-42"})
        assert code == 503
        await eventually(lambda: _status(nc, market, "miss"), every=0.05,
                         what="the user's entries dropped")


async def test_llm_forget_confirms_and_an_answer_in_flight_at_the_forget_is_not_cached(broker):
    nc, sim, clock, _ = broker
    kept = req("Is the Main St house still available?", user="lead-f")
    await ok(nc, subjects.LLM_COMPLETE, kept)
    sim.fault(delay_s=0.5, count=1)  # the next answer is still being computed at the forget
    before = sim.calls()
    in_flight = asyncio.create_task(ok(nc, subjects.LLM_COMPLETE, req("Any news?", user="lead-f")))
    await eventually(lambda: sim.calls() > before, what="the request upstream")
    clock.now += 1
    assert await ok(nc, subjects.LLM_FORGET, {"user_id": "lead-f"}) == {"user_id": "lead-f", "deleted": 1}
    assert (await in_flight)["cache"]["status"] == "miss"
    assert (await ok(nc, subjects.LLM_COMPLETE, kept))["cache"]["status"] == "miss"
    assert (await ok(nc, subjects.LLM_COMPLETE, req("Any news?", user="lead-f")))["cache"]["status"] == "miss"


async def test_ttl_is_absolute_and_a_hit_never_extends_it(broker):
    nc, sim, clock, _ = broker
    intent, market = req("Is it available?"), req("Market update please", volatility="market_context")
    await ok(nc, subjects.LLM_COMPLETE, intent)
    await ok(nc, subjects.LLM_COMPLETE, market)
    clock.now += 200
    hit = await ok(nc, subjects.LLM_COMPLETE, intent)
    assert hit["cache"]["status"] == "hit" and hit["cache"]["age_s"] == pytest.approx(200, abs=1)
    clock.now += 101  # 301 s after storing: past lead_intent's 300 s despite the hit at 200 s
    assert (await ok(nc, subjects.LLM_COMPLETE, intent))["cache"]["status"] == "miss"
    assert (await ok(nc, subjects.LLM_COMPLETE, market))["cache"]["status"] == "hit"
    clock.now += 3300
    assert (await ok(nc, subjects.LLM_COMPLETE, market))["cache"]["status"] == "miss"


async def test_concurrent_identical_misses_make_one_upstream_call(broker):
    nc, sim, _, _ = broker
    sim.fault(delay_s=0.3, count=1)  # hold the first call open while the others arrive
    replies = await asyncio.gather(*(ok(nc, subjects.LLM_COMPLETE, req("Same question?"))
                                     for _ in range(50)))
    assert sim.calls() == 1
    assert len({r["text"] for r in replies}) == 1
    assert sum(r["cache"]["status"] == "miss" for r in replies) == 1


@pytest.mark.parametrize("status", [429, 529, 500])
async def test_transient_upstream_errors_are_retried(broker, status):
    nc, sim, _, _ = broker
    sim.fault(status=status, count=2)
    reply = await ok(nc, subjects.LLM_COMPLETE, req(f"Retry me {status}?"))
    assert reply["cache"]["status"] == "miss"
    assert sim.calls() == 3


async def test_upstream_down_gives_clear_errors_and_cached_answers_still_served(broker):
    nc, sim, _, _ = broker
    cached = req("Is the Main St house still available?")
    await ok(nc, subjects.LLM_COMPLETE, cached)
    sim.fault(status=529, count=1000)
    code, body = await call(nc, subjects.LLM_COMPLETE, req("Something new?"), timeout=30)
    assert code == 503 and "529" in body["error"]["message"]
    assert (await ok(nc, subjects.LLM_COMPLETE, cached))["cache"]["status"] == "hit"
    for i in range(3):  # open the breaker
        await call(nc, subjects.LLM_COMPLETE, req(f"More new {i}?"), timeout=30)
    before = sim.calls()
    code, body = await call(nc, subjects.LLM_COMPLETE, req("Yet another?"))
    assert code == 503 and "circuit" in body["error"]["message"]
    assert sim.calls() == before  # refused without calling upstream
    assert (await ok(nc, subjects.LLM_COMPLETE, cached))["cache"]["status"] == "hit"
    sim.fault(clear=True)


async def test_upstream_timeout_maps_to_504(broker):
    nc, sim, _, _ = broker
    sim.fault(delay_s=3, count=3)
    code, body = await call(nc, subjects.LLM_COMPLETE, req("Slow one?"), timeout=30)
    assert code == 504 and "time" in body["error"]["message"]
    sim.fault(clear=True)


@pytest.mark.parametrize("patch,code", [
    ({"messages": []}, 400),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, 400),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "The "}]}, 400),
    ({"messages": [{"role": "robot", "content": "a"}]}, 400),
    ({"cache": {"volatility": "weather", "mode": "semantic", "scope": "user"}}, 400),
    ({"cache": {"volatility": "static", "mode": "fuzzy", "scope": "user"}}, 400),
    ({"max_tokens": -5}, 400),
    ({"temperature": 3}, 400),
    ({"user_id": "bad id"}, 400),
    ({"user_id": None}, 400),  # scope user needs the user
    ({"messages": [{"role": "user", "content": "x" * 500_001}]}, 413),
])
async def test_bad_input_is_rejected_without_an_upstream_call(broker, patch, code):
    nc, sim, _, _ = broker
    body = {**req("Is it available?"), **patch}
    status, reply = await call(nc, subjects.LLM_COMPLETE, body)
    assert status == code and reply["error"]["code"] == code
    msg = await nc.request(subjects.LLM_COMPLETE, msgspec.json.encode(body), timeout=10)
    assert msg.headers["Nats-Service-Error-Code"] == str(code)
    assert sim.calls() == 0


async def test_consecutive_turns_and_a_prefill_are_answered_as_the_api_does_and_a_prefill_keys_exactly(broker):
    nc, sim, _, _ = broker
    two = req("I saw the listing.", history=[{"role": "user", "content": "Hi there."}])
    first = await ok(nc, subjects.LLM_COMPLETE, two)
    assert first["cache"]["status"] == "miss" and first["text"]
    prefill = {**req("Is the Cedar St condo still available?"), "messages": [
        {"role": "user", "content": "Is the Cedar St condo still available?"},
        {"role": "assistant", "content": "Yes"}]}
    a = await ok(nc, subjects.LLM_COMPLETE, prefill)
    b = await ok(nc, subjects.LLM_COMPLETE, prefill)
    assert a["cache"]["status"] == "miss" and b["cache"] == {**b["cache"], "status": "hit", "match": "exact"}
    other = {**prefill, "messages": [prefill["messages"][0], {"role": "assistant", "content": "No"}]}
    c = await ok(nc, subjects.LLM_COMPLETE, other)  # same question, another prefill: never a semantic hit
    assert c["cache"]["status"] == "miss"
    assert sim.calls() == 3


async def test_llm_stats_add_up(broker):
    nc, sim, _, _ = broker
    a = await ok(nc, subjects.LLM_COMPLETE, req("Is it available?"))
    b = await ok(nc, subjects.LLM_COMPLETE, req("Is it available?"))
    c = await ok(nc, subjects.LLM_COMPLETE, req("Cache off please?", mode="off"))
    async def counted():  # totals are written just after each reply
        stats = await ok(nc, subjects.LLM_STATS, {})
        return stats if stats["requests"] == 3 else None

    stats = await eventually(counted, what="three requests counted")
    assert stats["requests"] == 3 and stats["hits_exact"] == 1
    assert stats["misses"] == 1 and stats["uncached"] == 1 and stats["upstream_calls"] == 2
    assert stats["cost_usd"] == pytest.approx(a["cost_usd"] + c["cost_usd"])
    assert stats["saved_usd"] == pytest.approx(b["saved_usd"])
    assert stats["input_tokens"] == a["usage"]["input_tokens"] + c["usage"]["input_tokens"]


async def test_long_system_prompt_uses_prompt_caching_at_the_discounted_price(broker):
    nc, sim, _, _ = broker
    system = "You are a careful real-estate assistant. " * 150  # ~6,000 chars, over the minimum
    first = await ok(nc, subjects.LLM_COMPLETE, req("Tell me about the area?", mode="off", system=system))
    second = await ok(nc, subjects.LLM_COMPLETE, req("And the schools?", mode="off", system=system))
    assert first["usage"]["cache_creation_input_tokens"] > 0
    assert second["usage"]["cache_read_input_tokens"] == first["usage"]["cache_creation_input_tokens"]
    price = Config.load().price_of("claude-haiku-4-5")
    assert second["cost_usd"] == pytest.approx(cost_usd(price, Usage(**second["usage"])), abs=1e-8)
    uncached = Usage(input_tokens=second["usage"]["input_tokens"]
                     + second["usage"]["cache_read_input_tokens"],
                     output_tokens=second["usage"]["output_tokens"])
    assert second["cost_usd"] < cost_usd(price, uncached)


async def cached_entries(env: dict) -> int:
    """Entries in both tiers: exact (Redis) and semantic (Postgres)."""
    redis = Redis.from_url(env["REDIS_URL"])
    try:
        exact = len([k async for k in redis.scan_iter(match="llm:x:*")])
    finally:
        await redis.aclose()
    conn = await asyncpg.connect(env["DATABASE_URL"])
    try:
        return exact + await conn.fetchval("SELECT count(*) FROM llm.entries")
    finally:
        await conn.close()


CONFIG = Config.load()
HISTORY = [{"role": "user", "content": "I'm Ann; we are divorcing, budget $400k."},
           {"role": "assistant", "content": "Thanks Ann, noted."}]


@pytest.mark.parametrize("patch,code,says", [
    ({"model": "claude-mythical-9"}, 400, ", ".join(CONFIG.models)),
    ({"max_tokens": CONFIG.max_tokens + 1}, 400, f"max_tokens is {CONFIG.max_tokens + 1}"),
    ({"messages": [{"role": "user", "content": "ok"}] * (CONFIG.max_messages + 1)}, 413,
     f"limit is {CONFIG.max_messages}"),
    ({"tools": [{"name": "lookup", "description": "d" * 400_000,
                 "input_schema": {"type": "object"}}]}, 413, "tools and stop_sequences"),
    ({"stop_sequences": ["s" * 100_000] * 4 + ["t"]}, 413, "tools and stop_sequences"),
    ({"cache": {"volatility": "lead_intent", "mode": "exact", "scope": "global"}}, 400,
     "global_tasks"),
    ({"task": "market_context", "messages": [*HISTORY, {"role": "user", "content": "Market?"}],
      "cache": {"volatility": "market_context", "mode": "exact", "scope": "global"}}, 400,
     "conversation"),
])
async def test_requests_over_a_bound_are_refused_before_cache_and_upstream(broker, patch, code, says):
    nc, sim, _, env = broker
    status, reply = await call(nc, subjects.LLM_COMPLETE, {**req("Is it available?"), **patch})
    assert (status, reply["error"]["code"]) == (code, code)
    assert says in reply["error"]["message"], reply
    assert sim.calls() == 0
    assert await cached_entries(env) == 0


async def test_a_global_task_shares_one_answer_between_users(broker):
    nc, sim, _, env = broker
    ask = functools.partial(req, task="market_context", volatility="market_context",
                            scope="global")
    first = await ok(nc, subjects.LLM_COMPLETE, ask("How is the market in Oak Park?", user="lead-1"))
    other = await ok(nc, subjects.LLM_COMPLETE, ask("How is the market in Oak Park?", user="lead-2"))
    assert first["cache"]["status"] == "miss"
    assert other["cache"]["status"] == "hit" and other["text"] == first["text"]
    assert sim.calls() == 1 and await cached_entries(env) == 2  # one entry, in both tiers


async def test_metric_labels_stay_a_fixed_set_whatever_tasks_and_bots_clients_send(
        clean_state, simulator):
    sim = Sim(simulator)
    sim.reset()
    port = servers.free_port()
    env = {**clean_state, "ANTHROPIC_BASE_URL": simulator}
    async with running("llm-broker", build_broker, env, metrics_port=port), \
            client(env["NATS_URL"]) as nc:
        await asyncio.gather(*(ok(nc, subjects.LLM_COMPLETE,
                                  req(f"Question {i}?", task=f"task-{i}", bot_id=f"bot-{i}",
                                      mode="exact"))
                               for i in range(100)))
        async with httpx.AsyncClient(timeout=10) as http:
            scrape = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
    tasks, bots, other_requests = set(), set(), 0.0
    for family in text_string_to_metric_families(scrape):
        if family.name.startswith("tiermem_llm"):
            for sample in family.samples:
                tasks.add(sample.labels.get("task"))
                bots.add(sample.labels.get("bot"))
                if sample.name == "tiermem_llm_requests_total" and sample.labels["task"] == "other":
                    other_requests += sample.value
    known_tasks = {*CONFIG.tasks, *CONFIG.label_tasks, *CONFIG.global_tasks, *CONFIG.request_tasks}
    assert tasks - {None} <= known_tasks | {"other"}
    assert bots - {None} <= {*CONFIG.bots, "", "other"}
    assert other_requests >= 100  # counted, under one name
    assert sim.calls() == 100
