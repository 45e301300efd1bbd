"""A forget cannot be lost: real NATS, Redis and Postgres, the tiers in-process.

A tier that is down while a user is forgotten is played by leaving its
`running` block: the forget answers 503 (recorded, pending), the job waits in
the `FORGET` stream, and once the tier runs again the gateways' consumer
finishes it without anyone calling `memory.forget` again.
"""

from __future__ import annotations

import functools

import asyncpg
import pytest

from services.l2_gateway.forget import retry_delay
from services.l2_gateway.service import build as build_l2
from services.l3_semantic_indexer.service import build as build_l3
from services.llm_broker.service import build as build_broker
from shared import subjects
from tests.helpers import (
    call, client, eventually, never_within, ok, running, stand_in_for_llm_forget,
)
from tests.test_l2_gateway import FakeL3, append_body
from tests.test_llm_broker import req as llm_req

FAST_RETRY = {"forget_retry_max_s": 0.3, "log_level": "warning"}


async def pending(nc, user: str) -> bool:
    return (await ok(nc, subjects.MEMORY_FORGET_STATUS, {"user_id": user}))["pending"]


async def l3_rows(db_url: str, user: str) -> int:
    conn = await asyncpg.connect(db_url)
    try:
        return await conn.fetchval("SELECT count(*) FROM l3.messages WHERE user_id = $1", user)
    finally:
        await conn.close()


def test_retries_back_off_doubling_up_to_the_cap():
    assert [retry_delay(a, 60) for a in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 4.0]
    assert retry_delay(20, 60) == 60 and retry_delay(1, 0.3) == 0.3


async def test_a_forget_while_l3_is_down_is_pending_and_completes_once_l3_is_back(clean_state):
    env = {**clean_state, "LOG_LEVEL": "warning"}
    async with client(env["NATS_URL"]) as nc, running("l2-gateway", build_l2, env, **FAST_RETRY):
        await stand_in_for_llm_forget(nc)
        async with running("l3-semantic-indexer", build_l3, env):
            for i in range(3):
                await ok(nc, subjects.MEMORY_APPEND, append_body("gone", i))
                last = (await ok(nc, subjects.MEMORY_APPEND, append_body("kept", i)))["seq"]
            indexed = await ok(nc, subjects.MEMORY_L3_GET, {"user_id": "kept", "n": 5, "min_seq": last})
            assert len(indexed["messages"]) == 3
        # L3 is down now
        code, body = await call(nc, subjects.MEMORY_FORGET, {"user_id": "gone"})
        assert code == 503
        assert "recorded" in body["error"]["message"]
        assert "l3-semantic-indexer" in body["error"]["message"]
        assert await pending(nc, "gone")
        assert await l3_rows(env["DATABASE_URL"], "gone") == 3  # still there, and the job knows
        # the tiers that confirmed serve nothing of the user from the reply on
        assert (await ok(nc, subjects.MEMORY_L2_GET, {"user_id": "gone", "n": 10}))["messages"] == []
        # several retries meet no L3; the job stays
        await never_within(1.0, lambda: _not(pending(nc, "gone")), every=0.1,
                           what="the job done without L3")
        # a later append is not covered by the pending forget
        after = (await ok(nc, subjects.MEMORY_APPEND, append_body("gone", 7)))["seq"]
        async with running("l3-semantic-indexer", build_l3, env):
            await eventually(lambda: _not(pending(nc, "gone")), timeout=15)
            reply = await ok(nc, subjects.MEMORY_L3_GET, {"user_id": "gone", "n": 10, "min_seq": after})
            assert [m["msg_id"] for m in reply["messages"]] == ["gone-7"]
            assert await l3_rows(env["DATABASE_URL"], "kept") == 3
        info = await nc.jetstream().stream_info(subjects.FORGET_STREAM)
        assert info.state.messages == 0


async def _not(awaitable) -> bool:
    return not await awaitable


async def test_a_forget_that_completes_in_its_request_leaves_no_job_to_run_again(clean_state):
    env = {**clean_state, "LOG_LEVEL": "warning"}
    async with client(env["NATS_URL"]) as nc:
        tiers = FakeL3()
        await tiers.start(nc)
        async with running("l2-gateway", build_l2, env, **FAST_RETRY):
            await ok(nc, subjects.MEMORY_APPEND, append_body("gone", 1))
            assert await ok(nc, subjects.MEMORY_FORGET, {"user_id": "gone"}) == {
                "user_id": "gone", "deleted": 1}
            assert not await pending(nc, "gone")
            # until past the job's not_before: the consumer finds nothing to run again
            await never_within(1.5, lambda: len(tiers.forgets) > 1, every=0.1, what="the job run again")
            assert len(tiers.forgets) == 1 and tiers.llm_forgets == ["gone"]


@pytest.fixture
async def broker_env(clean_state, simulator):
    return {**clean_state, "ANTHROPIC_BASE_URL": simulator, "LOG_LEVEL": "warning"}


async def test_a_forget_while_the_llm_broker_is_down_removes_its_entries_once_it_is_back(broker_env):
    env = broker_env
    broker = functools.partial(running, "llm-broker", build_broker, env)
    question = llm_req("Is the Main St house still available?", user="lead-9")
    async with client(env["NATS_URL"]) as nc:
        await FakeL3().start(nc, llm_forget=False)  # the real broker answers llm.forget
        async with running("l2-gateway", build_l2, env, **FAST_RETRY):
            async with broker():
                assert (await ok(nc, subjects.LLM_COMPLETE, question))["cache"]["status"] == "miss"
                assert (await ok(nc, subjects.LLM_COMPLETE, question))["cache"]["status"] == "hit"
            # the broker is down: the forget event it would have heard is lost on core NATS
            code, body = await call(nc, subjects.MEMORY_FORGET, {"user_id": "lead-9"})
            assert code == 503 and "llm-broker" in body["error"]["message"]
            assert await pending(nc, "lead-9")
            async with broker():
                await eventually(lambda: _not(pending(nc, "lead-9")), timeout=15)
                assert (await ok(nc, subjects.LLM_COMPLETE, question))["cache"]["status"] == "miss"
