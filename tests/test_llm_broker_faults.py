"""llm-broker under faults, against real NATS, Redis, Postgres and the simulator.

What must hold: an answer of an invalidating class built before the user's
latest message is never served, whatever happened to the events that should
have dropped it (lost while no broker ran, dropped by a slow consumer, lost
across a NATS restart); a store that is down, stuck or killed mid-query costs
a miss or a 503, never a 500; an answer paid for is returned even when it
cannot be cached, and only finished answers are cached; expired rows leave
Postgres.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time

import asyncpg
import pytest
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from services.l2_gateway.service import build as build_l2
from services.llm_broker.service import build as build_broker
from devstack import servers
from shared import lastseq, permissions, subjects
from shared.contract import Changed, Message, encode
from tests import helpers
from tests.helpers import call, client, eventually, ok, running
from tests.test_l2_gateway import FakeL3
from tests.test_llm_broker import Clock, Sim, req


def INTENT(text: str = "Is the house still available?", **extra) -> dict:  # noqa: N802
    """A lead_intent request: its class is invalidated by the user's messages."""
    return req(text, **extra)


def MARKET(text: str = "How is the market on Main St?", **extra) -> dict:  # noqa: N802
    """A market_context request: a class the user's messages do not touch."""
    return req(text, task="market", volatility="market_context", **extra)


@contextlib.asynccontextmanager
async def broker_running(env: dict, clock: Clock, **overrides):
    """The broker in-process as `running` does it; yields the Broker itself."""
    built = []
    limit = overrides.pop("events_pending_limit", None)
    extra = {} if limit is None else {"events_pending_limit": limit}

    async def build(rt):
        built.append(await build_broker(rt, clock=clock, **extra))
        return built[0]

    async with running("llm-broker", build, env, llm_max_retries=0, llm_timeout_s=5.0,
                       **overrides):
        yield built[0]


@pytest.fixture
def sim(simulator):
    s = Sim(simulator)
    s.reset()
    return s


def counted(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(f"tiermem_llm_{name}_total", labels) or 0.0


async def status(nc, body) -> str:
    return (await ok(nc, subjects.LLM_COMPLETE, body))["cache"]["status"]


def user_said(user: str, seq: int) -> bytes:
    message = Message(seq=seq, msg_id=f"m{seq}", role="user", bot_id="b", text="hi",
                      ts="2026-01-01T00:00:00Z")
    return encode(Changed(op="append", user_id=user, seq=seq, prev_seq=seq - 1, count=seq,
                          message=message))


# --- stale answers when events are lost ----------------------------------------------


async def test_an_answer_from_before_the_users_latest_message_is_refused_though_its_event_was_lost(
        clean_state, sim):
    env, clock = {**clean_state, "ANTHROPIC_BASE_URL": sim.url}, Clock()
    append = {"user_id": "lead-42", "bot_id": "b", "text": "Actually, never mind."}
    async with running("l2-gateway", build_l2, env), client(env["NATS_URL"]) as nc:
        async with broker_running(env, clock):
            await ok(nc, subjects.MEMORY_APPEND, {**append, "role": "user", "msg_id": "m1"})
            assert await status(nc, INTENT()) == "miss"
            assert await status(nc, MARKET()) == "miss"
        # no broker runs: nobody hears these events
        await ok(nc, subjects.MEMORY_APPEND, {**append, "role": "assistant", "msg_id": "m2"})
        async with broker_running(env, clock):
            assert await status(nc, INTENT()) == "hit"  # the bot speaking changes nothing
        await ok(nc, subjects.MEMORY_APPEND, {**append, "role": "user", "msg_id": "m3"})
        refused = counted("stale_refused", task="intent", reason="user_spoke")
        async with broker_running(env, clock):
            assert await status(nc, INTENT()) == "miss"
            assert counted("stale_refused", task="intent", reason="user_spoke") > refused
            assert await status(nc, INTENT()) == "hit"  # the new answer knows the new message
            assert await status(nc, MARKET()) == "hit"  # a class the user's words do not touch
    assert sim.calls() == 3


async def test_a_slow_consumer_on_change_events_distrusts_every_older_invalidating_entry(
        clean_state, sim):
    env, clock = {**clean_state, "ANTHROPIC_BASE_URL": sim.url}, Clock()
    async with broker_running(env, clock, events_pending_limit=5), \
            client(env["NATS_URL"]) as nc:
        assert await status(nc, INTENT()) == "miss"
        assert await status(nc, MARKET()) == "miss"
        clock.now += 1  # the broker's clock only moves when told
        before = counted("distrusts", cause="slow_consumer")

        async def overflowed():  # else a burst of other users' events, more than nats-py may hold
            if counted("distrusts", cause="slow_consumer") > before:
                return True
            for i in range(2000):
                await nc.publish(subjects.changed_subject(f"u{i}"), user_said(f"u{i}", 1))
            await nc.flush()
            return False

        await eventually(overflowed, timeout=30, every=0.2,
                         what="a slow consumer: the bursts overflowing the subscription")
        # lead-42's event may have been among those dropped: its lead_intent answer is not trusted
        assert await status(nc, INTENT()) == "miss"
        assert await status(nc, MARKET()) == "hit"
        assert await status(nc, INTENT()) == "hit"  # built after the distrust


async def test_a_burst_of_change_events_is_applied_in_batches_not_one_by_one(clean_state, sim):
    """8,000 users speak at once, then the 40 whose answers are cached. One event at a
    time (a few Redis and Postgres round trips each) the last ones were applied ~10 s
    later, and until then those users' old answers were served."""
    env, clock = {**clean_state, "ANTHROPIC_BASE_URL": sim.url}, Clock()
    users = [f"lead-{i}" for i in range(40)]
    async with broker_running(env, clock), client(env["NATS_URL"]) as nc:
        await asyncio.gather(*(ok(nc, subjects.LLM_COMPLETE, INTENT(user=u)) for u in users))
        distrusts = [counted("distrusts", cause=c) for c in ("slow_consumer", "backlog_full")]
        conn = await asyncpg.connect(env["DATABASE_URL"])
        redis = Redis.from_url(env["REDIS_URL"])
        try:
            for i in range(8_000):
                await nc.publish(subjects.changed_subject(f"other-{i}"), user_said(f"other-{i}", 1))
            for u in users:
                await nc.publish(subjects.changed_subject(u), user_said(u, 1))
            await nc.flush()
            started = time.monotonic()
            await eventually(lambda: _none_left(conn, redis), timeout=30)
            took = time.monotonic() - started
        finally:
            await conn.close()
            await redis.aclose()
        assert took < 3.0, f"applying the burst took {took:.1f} s"
        # applied event by event: nothing was dropped, nor folded into a distrust
        assert [counted("distrusts", cause=c)
                for c in ("slow_consumer", "backlog_full")] == distrusts
        for u in users[:5]:
            assert await status(nc, INTENT(user=u)) == "miss"


async def _none_left(conn, redis: Redis) -> bool:
    """No lead_intent entry left in either tier."""
    in_pg = await conn.fetchval("SELECT count(*) FROM llm.entries WHERE volatility = 'lead_intent'")
    return in_pg == 0 and not [k async for k in redis.scan_iter(match="llm:x:*")]


async def test_after_a_nats_restart_invalidating_entries_from_before_it_are_refused(
        clean_redis, clean_db, sim, tmp_path):
    passwords = {name: secrets.token_urlsafe(16) for name in permissions.ROLES}
    users = permissions.nats_users(passwords)
    nats = servers.start_nats(tmp_path / "nats", users=users, die_with_parent=True)
    helpers.IDENTITIES[nats.url] = passwords
    env = {"NATS_URL": nats.url, "REDIS_URL": clean_redis, "DATABASE_URL": clean_db,
           "ANTHROPIC_BASE_URL": sim.url}
    clock = Clock()
    try:
        async with broker_running(env, clock), client(nats.url) as nc:
            assert await status(nc, INTENT()) == "miss"
            assert await status(nc, MARKET()) == "miss"
            clock.now += 1  # the broker's clock only moves when told
            reconnects = counted("distrusts", cause="reconnected")
            # events published while the server is down are lost to every subscriber
            nats.stop()
            nats = servers.start_nats(tmp_path / "nats", port=nats.port, users=users,
                                      die_with_parent=True)
            await eventually(lambda: _answers(nc), timeout=30)
            assert counted("distrusts", cause="reconnected") == reconnects + 1
            assert await status(nc, INTENT()) == "miss"
            assert await status(nc, MARKET()) == "hit"
    finally:
        helpers.IDENTITIES.pop(nats.url, None)
        nats.stop()


async def _answers(nc) -> bool:
    try:
        code, _ = await call(nc, subjects.LLM_STATS, {}, timeout=1)
    except Exception:  # noqa: BLE001 - not reconnected yet
        return False
    return code == 200


# --- Redis wiped or rolled back ---------------------------------------------------------


def said(user: str, msg_id: str, role: str = "user") -> dict:
    return {"user_id": user, "bot_id": "b", "role": role, "text": f"{role} says {msg_id}",
            "msg_id": msg_id}


async def test_after_redis_is_wiped_an_answer_from_before_the_users_latest_message_is_refused(
        clean_state, sim):
    """The wipe takes the user-seq keys with it, and no gateway has replayed the log yet:
    the semantic tier (Postgres) still holds an answer built before the user's latest
    message, whose event was lost, and nothing in Redis says the user spoke since."""
    env, clock = {**clean_state, "ANTHROPIC_BASE_URL": sim.url}, Clock()
    async with client(env["NATS_URL"]) as nc:
        async with running("l2-gateway", build_l2, env):
            await ok(nc, subjects.MEMORY_APPEND, said("lead-42", "m1", role="assistant"))
            async with broker_running(env, clock):
                assert await status(nc, INTENT()) == "miss"  # built before the user said anything
            # no broker runs: nobody hears this event
            await ok(nc, subjects.MEMORY_APPEND, said("lead-42", "m2"))
        async with broker_running(env, clock):
            assert await status(nc, MARKET()) == "miss"  # this broker sees the L2 state
            redis = Redis.from_url(env["REDIS_URL"])
            try:
                assert await redis.get(lastseq.key("lead-42")) == b"2"
                await redis.flushall()  # Redis restarted empty; no gateway replays the log yet
            finally:
                await redis.aclose()
            refused = counted("stale_refused", task="intent", reason="redis_lost")
            assert await status(nc, INTENT()) == "miss"
            assert counted("stale_refused", task="intent", reason="redis_lost") > refused
            assert await status(nc, INTENT("Is the house still available?!")) == "miss"
        # a gateway replays the log into a new epoch: hits come back once the check holds again
        async with running("l2-gateway", build_l2, env), broker_running(env, clock):
            async def hit() -> bool:
                return await status(nc, INTENT()) == "hit"
            await eventually(hit, timeout=20)


async def test_a_redis_rollback_brings_back_neither_a_forgotten_users_entries_nor_outdated_ones(
        clean_nats, clean_db, sim, tmp_path):
    """Redis restarts from an older snapshot: it holds the exact entries of a user forgotten
    since, and an answer built before the user's latest message next to the seq of the user's
    message before it (so the user-seq check alone would pass it)."""
    redis = servers.start_redis(tmp_path / "redis", die_with_parent=True)
    env = {"NATS_URL": clean_nats, "REDIS_URL": redis.url, "DATABASE_URL": clean_db,
           "ANTHROPIC_BASE_URL": sim.url}
    clock = Clock()
    admin = Redis.from_url(redis.url)
    try:
        async with client(clean_nats) as nc:
            await FakeL3().start(nc, llm_forget=False)  # memory.l3.*; the broker answers llm.forget
            async with running("l2-gateway", build_l2, env), broker_running(env, clock):
                await ok(nc, subjects.MEMORY_APPEND, said("lead-42", "m1"))
                await ok(nc, subjects.MEMORY_APPEND, said("gone", "g1"))
                assert await status(nc, INTENT()) == "miss"
                assert await status(nc, MARKET(user="gone")) == "miss"
                await admin.save()  # the snapshot Redis will go back to
                clock.now += 2  # the broker's clock only moves when told

                await ok(nc, subjects.MEMORY_APPEND, said("lead-42", "m3"))  # drops its intent answer
                await ok(nc, subjects.MEMORY_FORGET, {"user_id": "gone"})
                await eventually(lambda: _no_exact_entries(admin))
                assert await status(nc, MARKET("And Oak Ave?")) == "miss"  # sees the newer state

                redis.stop()  # no save on the way down: the restart loads the older snapshot
                redis = servers.start_redis(tmp_path / "redis", port=redis.port,
                                            die_with_parent=True)
                await admin.aclose()
                admin = Redis.from_url(redis.url)
                assert await admin.get(lastseq.key("lead-42")) == b"1"  # the older state is back
                assert not await _no_exact_entries(admin)
                await eventually(lambda: _answers(nc))  # the broker reconnected
                dropped = [counted("distrusts", cause=c)
                           for c in ("l2_rolled_back", "l2_epoch_changed")]
                assert await status(nc, MARKET(user="gone")) == "miss"
                assert await status(nc, INTENT()) == "miss"
                assert sum(counted("distrusts", cause=c)
                           for c in ("l2_rolled_back", "l2_epoch_changed")) > sum(dropped)
    finally:
        await admin.aclose()
        redis.stop()


async def _no_exact_entries(redis: Redis) -> bool:
    return not [k async for k in redis.scan_iter(match="llm:x:*")]


# --- stores that fail ------------------------------------------------------------------


async def test_a_postgres_backend_killed_mid_lookup_is_a_miss_not_a_500(clean_state, sim):
    env, clock = {**clean_state, "ANTHROPIC_BASE_URL": sim.url}, Clock()
    async with broker_running(env, clock, pg_command_timeout_s=30), \
            client(env["NATS_URL"]) as nc:
        assert await status(nc, MARKET()) == "miss"
        lock = await asyncpg.connect(env["DATABASE_URL"])
        try:
            tx = lock.transaction()
            await tx.start()
            await lock.execute("LOCK TABLE llm.entries IN ACCESS EXCLUSIVE MODE")
            asked = asyncio.create_task(call(nc, subjects.LLM_COMPLETE,
                                             MARKET("Is the market on Main St slowing?")))
            # The broker's lookup waits on our lock. (Not matched by its text: a statement that
            # waits while it is bound still shows the connection's previous query, "idle".)
            await eventually(lambda: lock.fetchval(
                "SELECT count(pg_terminate_backend(pid)) > 0 FROM pg_stat_activity"
                " WHERE wait_event_type = 'Lock' AND pid <> pg_backend_pid()"))
            await tx.rollback()
        finally:
            await lock.close()
        code, reply = await asked
        assert code == 200 and reply["cache"]["status"] == "miss"
        assert await status(nc, MARKET()) == "hit"  # the pool got a new connection


async def test_a_stuck_postgres_costs_a_miss_within_the_command_timeout_and_the_answer(
        clean_state, sim):
    env, clock = {**clean_state, "ANTHROPIC_BASE_URL": sim.url}, Clock()
    async with broker_running(env, clock, pg_command_timeout_s=0.5), \
            client(env["NATS_URL"]) as nc:
        lock = await asyncpg.connect(env["DATABASE_URL"])
        try:
            async with lock.transaction():
                await lock.execute("LOCK TABLE llm.entries IN ACCESS EXCLUSIVE MODE")
                started = time.monotonic()
                code, reply = await call(nc, subjects.LLM_COMPLETE, MARKET(), timeout=10)
                took = time.monotonic() - started
        finally:
            await lock.close()
    assert code == 200 and reply["cache"]["status"] == "miss" and reply["text"]
    assert took < 3  # the lookup and the insert each gave up after 0.5 s
    assert sim.calls() == 1


async def test_a_failed_insert_still_returns_the_answer_paid_for_and_is_counted(clean_state, sim):
    env, clock = {**clean_state, "ANTHROPIC_BASE_URL": sim.url}, Clock()
    async with broker_running(env, clock, pg_command_timeout_s=0.5), \
            client(env["NATS_URL"]) as nc:
        failed = counted("not_cached", task="other", reason="store_failed")
        lock = await asyncpg.connect(env["DATABASE_URL"])
        try:
            async with lock.transaction():  # reads go on, writes wait
                await lock.execute("LOCK TABLE llm.entries IN SHARE MODE")
                code, reply = await call(nc, subjects.LLM_COMPLETE, MARKET())
        finally:
            await lock.close()
        assert code == 200 and reply["cache"]["status"] == "miss" and reply["cost_usd"] > 0
        assert counted("not_cached", task="other", reason="store_failed") == failed + 1
        assert await status(nc, MARKET()) == "hit"  # the exact tier took it before Postgres failed


async def test_with_redis_down_complete_still_answers_and_stats_verdict_and_forget_are_503(
        clean_nats, clean_db, sim, tmp_path):
    redis = servers.start_redis(tmp_path / "redis", die_with_parent=True)
    env = {"NATS_URL": clean_nats, "REDIS_URL": redis.url, "DATABASE_URL": clean_db,
           "ANTHROPIC_BASE_URL": sim.url}
    try:
        async with broker_running(env, Clock()), client(clean_nats) as nc:
            assert await status(nc, INTENT()) == "miss"
            redis.stop()
            for body in (INTENT(), INTENT("Is the Oak Ave one available?"), MARKET()):
                assert await status(nc, body) == "miss"
            code, reply = await call(nc, subjects.LLM_STATS, {})
            assert code == 503 and "unavailable" in reply["error"]["message"]
            code, _ = await call(nc, subjects.LLM_VERDICT, {"entry_id": "x", "partition": "p",
                                                            "match": "exact", "wrong": True})
            assert code == 503
            code, reply = await call(nc, subjects.LLM_FORGET, {"user_id": "lead-42"})
            assert code == 503 and "could not forget" in reply["error"]["message"]
    finally:
        redis.stop()


# --- what is cached, and for how long ---------------------------------------------------


async def test_an_answer_cut_off_by_max_tokens_is_returned_but_never_cached(clean_state, sim):
    env, clock = {**clean_state, "ANTHROPIC_BASE_URL": sim.url}, Clock()
    async with broker_running(env, clock), client(env["NATS_URL"]) as nc:
        cut = INTENT(max_tokens=1)
        first = await ok(nc, subjects.LLM_COMPLETE, cut)
        assert first["stop_reason"] == "max_tokens" and first["cache"]["status"] == "miss"
        assert await status(nc, cut) == "miss"
        assert await status(nc, INTENT()) == "miss"
        assert await status(nc, INTENT()) == "hit"  # a finished answer is
    assert sim.calls() == 3


async def test_concurrent_identical_requests_do_not_share_an_answer_cut_short_as_a_hit(clean_state, sim):
    """Single flight: followers of a request share its upstream answer as an exact hit, but not
    one cut off by max_tokens (the fault suite saw one served as a hit)."""
    env, clock = {**clean_state, "ANTHROPIC_BASE_URL": sim.url}, Clock()
    async with broker_running(env, clock), client(env["NATS_URL"]) as nc:
        replies = await asyncio.gather(*(ok(nc, subjects.LLM_COMPLETE, INTENT("Is it still for sale?",
                                                                             max_tokens=1))
                                         for _ in range(4)))
    assert [r["stop_reason"] for r in replies] == ["max_tokens"] * 4
    assert [r["cache"]["status"] for r in replies] == ["miss"] * 4


async def test_expired_semantic_entries_are_swept_from_postgres(clean_state, sim):
    env, clock = {**clean_state, "ANTHROPIC_BASE_URL": sim.url}, Clock()
    async with broker_running(env, clock, llm_sweep_interval_s=0.05, llm_sweep_batch=2), \
            client(env["NATS_URL"]) as nc:
        for q in ("Is it available?", "Can I see it Sunday?", "Is the price firm?"):
            await ok(nc, subjects.LLM_COMPLETE, INTENT(q))  # lead_intent: 300 s
        await ok(nc, subjects.LLM_COMPLETE, MARKET())  # market_context: 3600 s
        conn = await asyncpg.connect(env["DATABASE_URL"])
        try:
            count = "SELECT count(*) FROM llm.entries WHERE volatility = $1"
            assert await conn.fetchval(count, "lead_intent") == 3
            clock.now += 300 + 61  # past the TTL and the sweep's grace for clock skew
            await eventually(lambda: _equals(conn.fetchval(count, "lead_intent"), 0))
            assert await conn.fetchval(count, "market_context") == 1
        finally:
            await conn.close()


async def _equals(value, expected) -> bool:
    return await value == expected
