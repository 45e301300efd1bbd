"""One trace follows a lookup across the tiers.

memory-l1, l2-gateway and the l3-semantic-indexer run in this process against
the real servers, exporting spans to memory; the test checks the parent/child
chain caller -> l1 -> l2 (-> Redis) -> l3 (-> embedding, Postgres), down to the
Redis and Postgres client spans of the instrumentation packages, and that
those appear only under a kept span.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import asyncpg
import msgspec
import pytest
from redis.asyncio import Redis

from services.l2_gateway.service import build as build_l2
from services.l3_semantic_indexer.service import build as build_l3
from services.memory_l1.service import build as build_l1
from shared import subjects, telemetry
from tests.conftest import REPO
from tests.helpers import client, eventually, ok, running


def chain(finished, leaf_name: str) -> list[str]:
    """Names from the span called `leaf_name` up to the root."""
    by_id = {s.context.span_id: s for s in finished}
    span = next(s for s in finished if s.name == leaf_name)
    names = []
    while span is not None:
        names.append(span.name)
        span = by_id.get(span.parent.span_id) if span.parent else None
    return names


def db_spans(finished, system: str) -> list:
    return [s for s in finished if (s.attributes or {}).get("db.system") == system
            and s.kind.name == "CLIENT"]


async def fill(nc, user: str, n: int = 30) -> None:
    """`n` messages for `user`, indexed by L3 before this returns."""
    last = 0
    for i in range(n):
        last = (await ok(nc, subjects.MEMORY_APPEND, {
            "user_id": user, "bot_id": "b", "role": "user",
            "text": f"we talked about mortgage option {i}", "msg_id": f"t{i}"}))["seq"]
    await ok(nc, subjects.MEMORY_L3_GET, {"user_id": user, "n": 1, "min_seq": last})


async def lookup(nc, body: dict, spans):
    spans.clear()
    with telemetry.tracer.start_as_current_span("caller") as caller:
        msg = await nc.request(subjects.MEMORY_GET, msgspec.json.encode(body), timeout=10,
                               headers=telemetry.inject())
    trace_id = caller.get_span_context().trace_id

    def mine():
        return [s for s in spans.get_finished_spans() if s.context.trace_id == trace_id]

    # server-side spans end right after the reply is sent; the outermost (memory-l1's) last
    await eventually(lambda: any(s.name == "memory.get process" for s in mine()),
                     what="memory-l1's span ended")
    return msg, mine()


@contextlib.asynccontextmanager
async def memory_tiers(env: dict[str, str]):
    """L2, L3 and a sidecar in this process, with database spans on."""
    async with running("l2-gateway", build_l2, env, trace_db_spans=True), \
            running("l3-semantic-indexer", build_l3, env, trace_db_spans=True), \
            running("memory-l1", build_l1, env, trace_db_spans=True):
        yield


async def test_a_lookup_is_one_trace_across_l1_l2_l3(clean_state, spans):
    env = clean_state
    async with memory_tiers(env):
        async with client(env["NATS_URL"]) as nc:
            await fill(nc, "traced")

            msg, recent = await lookup(nc, {"user_id": "traced", "op": "recent", "n": 50}, spans)
            assert b'"tier":"l2"' in msg.data
            assert chain(recent, "redis read") == [
                "redis read", "memory.l2.get process", "send memory.l2.get",
                "memory.get process", "caller"]

            msg, search = await lookup(nc, {"user_id": "traced", "op": "search",
                                            "query": "mortgage", "k": 3}, spans)
            assert b'"tier":"l3"' in msg.data
            expected_tail = ["memory.l3.get process", "send memory.l3.get", "memory.l2.get process",
                             "send memory.l2.get", "memory.get process", "caller"]
            assert chain(search, "embed query") == ["embed query", *expected_tail]
            assert chain(search, "postgres search") == ["postgres search", *expected_tail]
            # the window read: one round trip, the state beside the user's read script
            (window_read,) = db_spans(recent, "redis")
            assert window_read.name == "HMGET EVALSHA"
            assert chain(recent, window_read.name)[1] == "redis read"
            pg = db_spans(search, "postgresql")
            assert pg and {chain(search, s.name)[1] for s in pg} == {"postgres search"}
            kinds = {s.name: s.kind.name for s in search}
            assert kinds["memory.get process"] == kinds["memory.l3.get process"] == "CONSUMER"
            assert kinds["send memory.l3.get"] == "CLIENT"


async def test_database_spans_only_under_kept_spans(clean_state, spans):
    """An unsampled lookup leaves no span, database spans included, and no
    database call starts a trace of its own (appliers, consumers, pings)."""
    env = clean_state
    async with memory_tiers(env):
        async with client(env["NATS_URL"]) as nc:
            await fill(nc, "unsampled")
            trace_id = os.urandom(16).hex()
            unsampled = {"traceparent": f"00-{trace_id}-{os.urandom(8).hex()}-00"}
            for body in ({"user_id": "unsampled", "op": "recent", "n": 50},
                         {"user_id": "unsampled", "op": "search", "query": "mortgage", "k": 3}):
                await nc.request(subjects.MEMORY_GET, msgspec.json.encode(body), timeout=10,
                                 headers=unsampled)
            _, sampled = await lookup(nc, {"user_id": "unsampled", "op": "recent", "n": 50}, spans)
            assert db_spans(sampled, "redis")  # they are on, and this trace is kept
    finished = spans.get_finished_spans()
    assert not [s for s in finished if format(s.context.trace_id, "032x") == trace_id]
    made = db_spans(finished, "redis") + db_spans(finished, "postgresql")
    assert made and all(s.parent is not None for s in made)


async def test_a_database_call_outside_any_span_makes_none(clean_state, spans):
    """Left to themselves the instrumentors would start a trace per command (the
    SDK samples a root span in); gated, only the call under a kept span has one."""
    telemetry.configure_tracing("test", db_spans=True)
    redis = Redis.from_url(clean_state["REDIS_URL"])
    pg = await asyncpg.connect(clean_state["DATABASE_URL"])
    try:
        await redis.ping()
        await pg.fetchval("SELECT 1")
        with telemetry.tracer.start_as_current_span("kept"):
            await redis.ping()
            await pg.fetchval("SELECT 2")
    finally:
        await redis.aclose()
        await pg.close()
    made = db_spans(spans.get_finished_spans(), "redis") + db_spans(
        spans.get_finished_spans(), "postgresql")
    assert sorted(s.name for s in made) == ["PING", "SELECT"]
    assert {s.parent.span_id for s in made} == {
        next(s for s in spans.get_finished_spans() if s.name == "kept").context.span_id}


async def test_without_trace_db_spans_a_trace_has_the_tier_spans_only(clean_state, spans):
    """Off by default (bench/results/db_spans.md): a process that turns them off unwraps
    the clients again, even after an earlier service in it turned them on."""
    env = clean_state
    telemetry.instrument_databases(True)
    async with running("l2-gateway", build_l2, env), running("memory-l1", build_l1, env):
        async with client(env["NATS_URL"]) as nc:
            await ok(nc, subjects.MEMORY_APPEND, {
                "user_id": "quiet", "bot_id": "b", "role": "user", "text": "hello", "msg_id": "q1"})
            _, found = await lookup(nc, {"user_id": "quiet", "op": "recent", "n": 50}, spans)
    assert "redis read" in {s.name for s in found}
    assert not db_spans(spans.get_finished_spans(), "redis")


@pytest.mark.parametrize("trace_file, on, wrapped", [(False, True, False), (True, True, True),
                                                     (True, False, False)])
def test_database_clients_are_wrapped_only_when_asked_in_a_process_that_exports(
        tmp_path, trace_file, on, wrapped):
    """Without an exporter no database span could be kept: the clients stay as they are."""
    code = ("import sys, asyncpg, redis.asyncio as r; from shared import telemetry;"
            "telemetry.configure_tracing('t', sys.argv[1], db_spans=sys.argv[2] == 'on');"
            "print(type(r.Redis.execute_command).__name__, type(asyncpg.Connection.fetch).__name__)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "spans.jsonl") if trace_file else "",
                          "on" if on else "off"],
                         cwd=REPO, capture_output=True, text=True, timeout=60, check=True,
                         env={k: v for k, v in os.environ.items() if not k.startswith("OTEL_")})
    assert (out.stdout.split() != ["function", "function"]) is wrapped, out.stdout
