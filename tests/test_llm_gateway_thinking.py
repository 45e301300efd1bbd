"""Extended thinking end to end: the real `anthropic` SDK -> gateway -> broker -> simulator.

The simulator answers a request with `thinking` as the API does (a `thinking`
block with its `signature` before the text; streamed as `thinking_delta`s and a
`signature_delta`); the gateway and broker key on the thinking config, cache the
whole answer, thinking included, and replay it: a streamed exact hit is the
miss's event stream byte for byte. `redacted_thinking` passes through both ways.
"""

from __future__ import annotations

import anthropic
import httpx
import pytest
from anthropic._constants import ANTHROPIC_API_VERSION


from services.llm_simulator import responder
from tests.test_llm_gateway import ask, check_event_sequence, create, gateway, parse_sse  # noqa: F401

THINK = {"type": "enabled", "budget_tokens": 1024}
# Raw HTTP requests that the SDK's must hit send its `anthropic-version` (it is in the key).
AS_SDK = {"anthropic-version": ANTHROPIC_API_VERSION}


def thinking_ask(text: str, **extra) -> dict:
    return ask(text, max_tokens=2000, thinking=THINK, **extra)


async def test_a_thinking_answer_is_cached_whole_and_the_thinking_config_is_in_the_key(gateway):
    client = gateway.async_sdk()
    params = thinking_ask("Should the lead see the Main St house or the Oak St house first?")
    first, h1 = await create(client, **params)
    again, h2 = await create(client, **params)
    assert (h1["tiermem-cache"], h2["tiermem-cache"]) == ("miss", "hit")
    thinking, text = first.content
    assert thinking.type == "thinking" and thinking.thinking and thinking.signature
    assert text.type == "text" and text.text and first.stop_reason == "end_turn"
    assert again.model_dump() == first.model_dump()  # the thinking and its signature too
    for other in ({**params, "thinking": {"type": "enabled", "budget_tokens": 1500}},
                  {k: v for k, v in params.items() if k != "thinking"},
                  {**params, "thinking": {**THINK, "display": "omitted"}}):
        reply, h = await create(client, **other)
        assert h["tiermem-cache"] == "miss", other
    assert reply.content[0].type == "thinking" and reply.content[0].thinking == ""
    assert reply.content[0].signature  # omitted: only the signature comes
    assert gateway.sim.calls() == 4


async def test_a_streamed_thinking_miss_has_the_apis_events_and_its_hit_replays_them_exactly(gateway):
    body = thinking_ask("Which of the three listings has the largest garden?", stream=True)
    miss = await gateway.post(body, AS_SDK)
    hit = await gateway.post(body, AS_SDK)
    assert (miss.headers["tiermem-cache"], hit.headers["tiermem-cache"]) == ("miss", "hit")
    assert hit.content == miss.content
    events = parse_sse(miss.text)
    check_event_sequence(events)
    starts = [d["content_block"] for n, d in events if n == "content_block_start"]
    assert starts[0] == {"type": "thinking", "thinking": "", "signature": ""}
    assert starts[1] == {"type": "text", "text": ""}
    deltas = [d["delta"] for n, d in events if n == "content_block_delta" and d["index"] == 0]
    assert {d["type"] for d in deltas[:-1]} == {"thinking_delta"}
    assert deltas[-1]["type"] == "signature_delta" and deltas[-1]["signature"]
    assert gateway.sim.calls() == 1

    # the SDK adds the stream up to the message a plain call gets (a hit of the streamed entry)
    client = gateway.async_sdk()
    params = {k: v for k, v in body.items() if k != "stream"}
    async with client.messages.stream(**params) as stream:
        kinds = [e.type async for e in stream]
        streamed = await stream.get_final_message()
    plain, h = await create(client, **params)
    assert h["tiermem-cache"] == "hit" and plain.model_dump() == streamed.model_dump()
    assert "thinking" in kinds and "signature" in kinds  # the SDK's own thinking events
    assert streamed.content[0].signature == deltas[-1]["signature"]
    assert gateway.sim.calls() == 1


async def test_a_thinking_answer_cached_unstreamed_is_replayed_as_the_apis_thinking_stream(gateway):
    client = gateway.async_sdk()
    params = thinking_ask("Is the Pine St house close to a train station?")
    plain, h1 = await create(client, **params)
    r = await gateway.post({**params, "stream": True}, AS_SDK)
    assert (h1["tiermem-cache"], r.headers["tiermem-cache"]) == ("miss", "hit")
    events = parse_sse(r.text)
    check_event_sequence(events)
    names = [d["delta"]["type"] for n, d in events if n == "content_block_delta"]
    assert "thinking_delta" in names and "signature_delta" in names
    async with client.messages.stream(**params) as stream:
        replayed = await stream.get_final_message()
    assert replayed.model_dump() == plain.model_dump()


async def test_redacted_thinking_passes_through_cached_and_back_upstream(gateway):
    client = gateway.async_sdk()
    params = thinking_ask(f"Tell me about the Elm St house. {responder.REDACTED_TRIGGER}")
    first, h1 = await create(client, **params)
    assert [b.type for b in first.content] == ["thinking", "redacted_thinking", "text"]
    assert first.content[1].data
    async with client.messages.stream(**params) as stream:  # an exact hit, streamed
        replayed = await stream.get_final_message()
    assert replayed.model_dump() == first.model_dump()
    # the next turn sends the thinking blocks back unchanged, as the API asks: keyed, cached
    turn = thinking_ask("And how large is its garden?")
    turn["messages"] = [params["messages"][0],
                        {"role": "assistant", "content": [b.model_dump() for b in first.content]},
                        *turn["messages"]]
    follow, h2 = await create(client, **turn)
    again, h3 = await create(client, **turn)
    assert (h2["tiermem-cache"], h3["tiermem-cache"]) == ("miss", "hit")
    assert follow.content[0].type == "thinking" and again.model_dump() == follow.model_dump()
    assert gateway.sim.calls() == 2


async def test_the_api_refusals_of_a_bad_thinking_config_reach_the_sdk_uncached(gateway):
    client = gateway.async_sdk()
    bad = [{"thinking": {"type": "enabled", "budget_tokens": 1000}},  # below 1024
           {"thinking": {"type": "enabled", "budget_tokens": 2000}},  # not below max_tokens
           {"thinking": THINK, "tools": [{"name": "t", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "any"}}]
    for extra in bad:
        with pytest.raises(anthropic.BadRequestError):
            await client.messages.create(**{**ask("Hi there", max_tokens=2000), **extra})
    for extra in bad[:1]:  # the same again: refused again, nothing was cached
        with pytest.raises(anthropic.BadRequestError, match="budget_tokens"):
            await client.messages.create(**{**ask("Hi there", max_tokens=2000), **extra})


def test_simulator_thinking_counts_against_max_tokens_and_is_cut_at_its_budget():
    request = responder.parse_request(thinking_ask("x " * 5000))
    blocks, tokens = responder.thinking_blocks(request)
    assert tokens <= 1024 and len(blocks[0]["thinking"]) <= 1024 * responder.CHARS_PER_TOKEN
    reply = responder.respond(request, responder.PromptCache(), 0.0)
    assert reply.output_tokens >= tokens + 1 and reply.output_tokens <= 2000
    assert reply.message("m", "claude-haiku-4-5")["content"][0] == blocks[0]
    off = responder.parse_request(ask("x", thinking={"type": "disabled"}))
    assert responder.thinking_blocks(off) == ((), 0)


async def test_raw_sse_of_the_simulator_frames_thinking_as_the_api(simulator):
    """Straight from the simulator, no gateway: the events the broker records on a miss."""
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.post(f"{simulator}/v1/messages", json=thinking_ask("Hi", stream=True),
                            headers={"x-api-key": "k", "anthropic-version": "2023-06-01"})
    events = parse_sse(r.text)
    check_event_sequence(events)
    names = [n if n != "content_block_delta" else d["delta"]["type"] for n, d in events]
    first_stop = names.index("content_block_stop")
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[first_stop - 1] == "signature_delta"
    assert set(names[3:first_stop - 1]) == {"thinking_delta"}
