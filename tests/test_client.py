"""The Python client package (`tiermem`) and its LangChain adapter, against the real stack.

Every service runs as its own process (`stack_processes`), the client
connects with the worker identity `just up` writes to stack.env, exactly as
an application would. One test drives a stand-in responder instead, to see
the headers the client sends (its trace context).
"""

from __future__ import annotations

import asyncio
import os
import uuid

import msgspec
import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from opentelemetry.sdk.trace import TracerProvider

import tiermem
from shared.settings import load_stack_env
from tests.conftest import reset_servers, stack_processes
from tests.helpers import client as raw_client, eventually, identity_env
from tiermem.langchain import TiermemChatMessageHistory

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
async def worker_env(nats_url, redis_url, database_url, tmp_path_factory):
    """The stack's stack.env: NATS_URL and the worker's credentials, nothing else of ours."""
    await reset_servers(nats_url, redis_url, database_url)
    state = tmp_path_factory.mktemp("stack")
    with stack_processes({**os.environ, "NATS_URL": nats_url, "REDIS_URL": redis_url,
                          "DATABASE_URL": database_url}, state):
        env = load_stack_env(state)
        assert env["NATS_WORKER_USER"] and env["NATS_WORKER_PASSWORD"]
        yield env


def user() -> str:
    return f"client-{uuid.uuid4().hex[:10]}"


async def test_async_client_round_trip_with_typed_replies(worker_env):
    u = user()
    async with await tiermem.AsyncClient.connect(env=worker_env) as tm:
        first = await tm.append(u, "sales-1", "user", "Is the loft on Pine Street still for sale?", msg_id="m-1")
        again = await tm.append(u, "sales-1", "user", "Is the loft on Pine Street still for sale?", msg_id="m-1")
        assert isinstance(first, tiermem.AppendReply) and not first.duplicate
        assert again.duplicate and again.seq == first.seq
        second = await tm.append(u, "sales-1", "assistant", "It is, and open for viewing Sunday.", msg_id="m-2")
        window = await tm.recent(u, 10, min_seq=second.seq)
        assert isinstance(window, tiermem.GetReply) and window.seq >= second.seq
        assert [(m.role, m.msg_id) for m in window.messages] == [("user", "m-1"), ("assistant", "m-2")]

        async def indexed():  # L3 indexes behind the write path: search finds it once indexed
            found = await tm.search(u, "loft for sale on Pine", k=3)
            return found if found.messages else None

        found = await eventually(indexed, timeout=10, every=0.1, what="L3 indexing the message")
        assert found.messages[0].msg_id == "m-1" and found.messages[0].score is not None

        gone = await tm.forget(u)
        assert isinstance(gone, tiermem.ForgetReply) and gone.deleted >= 2
        assert (await tm.recent(u, 10)).messages == []


async def test_errors_raise_the_exception_of_their_code_and_change_nothing(worker_env):
    u = user()
    async with await tiermem.AsyncClient.connect(env=worker_env) as tm:
        with pytest.raises(tiermem.BadRequest) as bad:
            await tm.append(u, "sales-1", "robot", "hello", msg_id="m-1")
        assert bad.value.code == 400 and "role" in bad.value.message
        with pytest.raises(tiermem.BadRequest):
            await tm.recent(u, 0)
        with pytest.raises(tiermem.PayloadTooLarge) as big:  # over the 64 KiB text limit: the gateway says 413
            await tm.append(u, "sales-1", "user", "x" * 70_000, msg_id="m-2")
        assert big.value.code == 413 and "65536" in big.value.message
        with pytest.raises(tiermem.PayloadTooLarge, match="the bus carries"):  # over NATS' max payload: not sent
            await tm.append(u, "sales-1", "user", "x" * (2 << 20), msg_id="m-3")
        assert (await tm.recent(u, 10)).messages == []


async def test_the_worker_identity_cannot_reach_internal_subjects(worker_env):
    async with await tiermem.AsyncClient.connect(env=worker_env) as tm:
        tm.get_subject, tm.timeout = "memory.l2.get", 1.0  # an internal tier: not on the worker's allow-list
        with pytest.raises(tiermem.UpstreamTimeout):  # the server drops the request: nobody answers it
            await tm.recent(user(), 1)


async def test_complete_returns_a_typed_reply_and_a_repeat_is_an_exact_hit(worker_env):
    u = user()
    body = {"task": "reply", "user_id": u, "model": "claude-haiku-4-5", "max_tokens": 100, "temperature": 0,
            "system": "You are a helpful real-estate assistant.",
            "messages": [{"role": "user", "content": "What are the HOA fees at 12 Birch Lane?"}],
            "cache": {"volatility": "market_context", "mode": "exact", "scope": "user"}}
    async with await tiermem.AsyncClient.connect(env=worker_env) as tm:
        miss = await tm.complete(msgspec.convert(body, tiermem.CompleteRequest))
        hit = await tm.complete(body)  # a plain dict works the same
    assert isinstance(miss, tiermem.CompleteReply) and miss.cache.status == "miss" and miss.text
    assert hit.cache.status == "hit" and hit.cache.match == "exact" and hit.text == miss.text
    assert hit.cost_usd == 0 and hit.saved_usd == miss.cost_usd > 0


def test_sync_client_from_plain_code(worker_env):
    u = user()
    with tiermem.Client(env=worker_env) as tm:
        ack = tm.append(u, "sales-1", "user", "Can I bring my dog to the showing?", msg_id="d-1")
        assert tm.recent(u, 5, min_seq=ack.seq).messages[-1].text == "Can I bring my dog to the showing?"
        with pytest.raises(tiermem.BadRequest):
            tm.search(u, "   ")
        assert tm.forget(u).deleted == 1


def test_connect_without_a_url_says_what_to_do():
    with pytest.raises(tiermem.TierError, match="NATS_URL is not set"):
        tiermem.Client(env={})


async def test_requests_continue_the_callers_trace(nats_url):
    """The traceparent the client sends is the application's open span, for both clients."""
    seen: list[dict] = []
    empty = msgspec.json.encode({"user_id": "u", "tier": "l1", "seq": 0, "messages": []})
    tracer = TracerProvider().get_tracer("app")
    async with raw_client(nats_url) as nc:
        async def answer(msg):
            seen.append(dict(msg.headers or {}))
            await msg.respond(empty)

        await nc.subscribe("memory.get.trace-probe", cb=answer)
        await nc.flush()
        tm = tiermem.AsyncClient(nc, sidecar="trace-probe")
        await tm.recent("u", 1)  # no open span: nothing to continue, no header
        with tracer.start_as_current_span("async-caller") as span:
            await tm.recent("u", 1)
            async_trace = format(span.get_span_context().trace_id, "032x")

        admin = {"NATS_URL": nats_url, **identity_env(nats_url, "admin")}
        sync = await asyncio.to_thread(tiermem.Client, env=admin, role="admin", sidecar="trace-probe")
        try:
            def in_span() -> str:
                with tracer.start_as_current_span("sync-caller") as s:
                    sync.recent("u", 1)
                    return format(s.get_span_context().trace_id, "032x")

            sync_trace = await asyncio.to_thread(in_span)
        finally:
            await asyncio.to_thread(sync.close)
    assert "traceparent" not in seen[0]
    assert seen[1]["traceparent"].split("-")[1] == async_trace
    assert seen[2]["traceparent"].split("-")[1] == sync_trace


# --------------------------------------------------------------------------- LangChain


def test_langchain_history_round_trip(worker_env):
    u = user()
    with tiermem.Client(env=worker_env) as tm:
        history = TiermemChatMessageHistory(u, bot_id="sales-1", client=tm)
        history.add_messages([SystemMessage("You sell homes."), HumanMessage("Any 2-bed condos downtown?")])
        history.add_ai_message("Two: one on 5th Ave, one on Pike St.")
        got = history.messages
        assert [type(m) for m in got] == [SystemMessage, HumanMessage, AIMessage]
        assert got[2].content == "Two: one on 5th Ave, one on Pike St."

        history.add_message(HumanMessage("Any 2-bed condos downtown?", id=got[1].id))  # a retry
        assert len(history.messages) == 3
        with pytest.raises(ValueError, match="tool"):
            history.add_message(ToolMessage("42", tool_call_id="t-1"))
        history.clear()
        assert history.messages == []


async def test_langchain_history_async(worker_env):
    u = user()
    async with await tiermem.AsyncClient.connect(env=worker_env) as tm:
        history = TiermemChatMessageHistory(u, bot_id="sales-1", async_client=tm)
        await history.aadd_messages([HumanMessage("Is parking included?"), AIMessage("Yes, one space.")])
        assert [m.content for m in await history.aget_messages()] == ["Is parking included?", "Yes, one space."]
        with pytest.raises(RuntimeError, match="a\\* methods"):
            history.messages  # noqa: B018 - only an AsyncClient
        await history.aclear()
        assert await history.aget_messages() == []
