"""One trace follows a lookup across the tiers.

memory-l1, l2-gateway and the l3-semantic-indexer run in this process against
the real servers, exporting spans to memory; the test checks the parent/child
chain caller -> l1 -> l2 (-> Redis) -> l3 (-> embedding, Postgres).
"""

from __future__ import annotations


import msgspec

from services.l2_gateway.service import build as build_l2
from services.l3_semantic_indexer.service import build as build_l3
from services.memory_l1.service import build as build_l1
from shared import subjects, telemetry
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


async def test_a_lookup_is_one_trace_across_l1_l2_l3(clean_state, spans):
    env = clean_state
    async with running("l2-gateway", build_l2, env), \
            running("l3-semantic-indexer", build_l3, env), \
            running("memory-l1", build_l1, env):
        async with client(env["NATS_URL"]) as nc:
            last = 0
            for i in range(30):
                last = (await ok(nc, subjects.MEMORY_APPEND, {
                    "user_id": "traced", "bot_id": "b", "role": "user",
                    "text": f"we talked about mortgage option {i}", "msg_id": f"t{i}"}))["seq"]
            await ok(nc, subjects.MEMORY_L3_GET, {"user_id": "traced", "n": 1, "min_seq": last})

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
            kinds = {s.name: s.kind.name for s in search}
            assert kinds["memory.get process"] == kinds["memory.l3.get process"] == "CONSUMER"
            assert kinds["send memory.l3.get"] == "CLIENT"
