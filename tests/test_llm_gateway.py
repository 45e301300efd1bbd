"""llm-gateway: the Messages API over HTTP, through the real `anthropic` SDK and raw HTTP.

Real NATS, Redis and Postgres (tests/conftest.py), the llm-broker and the
gateway in-process as their own NATS identities, and the Claude simulator as
its own process behind the broker's SDK: a request goes SDK -> HTTP ->
gateway -> NATS -> broker -> SDK -> simulator, as in production. The
simulator's /stats count the upstream calls, so a hit is seen not to call it.
"""

from __future__ import annotations

import asyncio
import base64
import time

import anthropic
import httpx
import msgspec
import pytest

from devstack import servers
from services.llm_broker.service import build as build_broker
from services.llm_gateway import sse, translate
from services.llm_gateway.service import build as build_gateway
from shared.errors import BadRequest
from tests.helpers import Sim, running

KEY = "sk-gateway-test"
MODEL = "claude-haiku-4-5"
# A 1x1 PNG, and another (one pixel of another colour): the image is part of the key.
PNG_A = base64.b64encode(bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360f8cf00000301010018dd8db00000000049454e44ae426082")).decode()
PNG_B = base64.b64encode(bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c63f8ffff3f0005fe02fe0def46b80000000049454e44ae426082")).decode()
WEATHER = {"name": "get_weather", "description": "Get the current weather for a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                            "required": ["city"]}}


class Stack:
    def __init__(self, url: str, sim: Sim) -> None:
        self.url, self.sim = url, sim

    def sdk(self, **kw) -> anthropic.Anthropic:
        return anthropic.Anthropic(base_url=self.url, api_key=KEY, max_retries=0, **kw)

    def async_sdk(self, **kw) -> anthropic.AsyncAnthropic:
        return anthropic.AsyncAnthropic(base_url=self.url, api_key=KEY, max_retries=0, **kw)

    async def post(self, body: dict, headers: dict | None = None) -> httpx.Response:
        async with httpx.AsyncClient(timeout=30) as http:
            return await http.post(f"{self.url}/v1/messages", json=body, headers={
                "x-api-key": KEY, "anthropic-version": "2023-06-01", **(headers or {})})


@pytest.fixture
async def gateway(clean_state, simulator):
    sim = Sim(simulator)
    sim.reset()
    env = {**clean_state, "ANTHROPIC_BASE_URL": simulator}
    port = servers.free_port()
    async with running("llm-broker", build_broker, env, llm_max_retries=0, llm_timeout_s=5.0,
                       breaker_failures=50), \
            running("llm-gateway", build_gateway, env, gateway_port=port, gateway_api_keys=KEY):
        yield Stack(f"http://127.0.0.1:{port}", sim)


def ask(text: str, **extra) -> dict:
    return {"model": MODEL, "max_tokens": 300, "messages": [{"role": "user", "content": text}],
            **extra}


async def create(client: anthropic.AsyncAnthropic, **params):
    """The Message and the response headers of one call."""
    raw = await client.messages.with_raw_response.create(**params)
    return await raw.parse(), raw.headers


# --------------------------------------------------------------------------- SDK, miss and hit


async def test_sync_sdk_gets_a_miss_then_an_exact_hit_with_the_same_message(gateway):
    client = gateway.sdk()

    def call():
        raw = client.messages.with_raw_response.create(**ask("Is the Main St house available?"))
        return raw.parse(), raw.headers

    first, h1 = await asyncio.to_thread(call)
    again, h2 = await asyncio.to_thread(call)
    assert h1["tiermem-cache"] == "miss" and h1["tiermem-stored"] == "true"
    assert float(h1["tiermem-cost-usd"]) > 0 and float(h1["tiermem-saved-usd"]) == 0
    assert h2["tiermem-cache"] == "hit" and h2["tiermem-match"] == "exact"
    assert float(h2["tiermem-cost-usd"]) == 0
    assert float(h2["tiermem-saved-usd"]) == pytest.approx(float(h1["tiermem-cost-usd"]))
    assert h2["tiermem-entry"] == h1["tiermem-entry"] and float(h2["tiermem-age"]) >= 0
    assert first.type == "message" and first.content[0].type == "text" and first.content[0].text
    assert again.model_dump() == first.model_dump()
    assert gateway.sim.calls() == 1


async def test_async_sdk_gets_a_miss_then_a_hit_and_metadata_user_is_optional(gateway):
    client = gateway.async_sdk()
    first, h1 = await create(client, **ask("What are your office hours?"))
    again, h2 = await create(client, **ask("What are your office hours?",
                                           metadata={"user_id": "lead-7"}))
    assert (h1["tiermem-cache"], h2["tiermem-cache"]) == ("miss", "hit")  # scope global by default
    assert again.content == first.content and first.stop_reason == "end_turn"
    assert gateway.sim.calls() == 1


async def test_every_part_that_changes_the_answer_splits_the_key(gateway):
    client = gateway.async_sdk()
    base = ask("Tell me about the Oak Park listing.", system="You are a helpful agent.")
    variants = [
        base,
        {**base, "system": "You are a terse agent."},
        {**base, "max_tokens": 299},
        {**base, "extra_body": {"temperature": 0.5}},  # (current SDKs take it only so)
        {**base, "stop_sequences": ["ZZZ"]},
        {**base, "messages": [{"role": "user", "content": "Hi"},
                              {"role": "assistant", "content": "Hello!"},
                              *base["messages"]]},
        {**base, "tools": [WEATHER], "tool_choice": {"type": "none"}},
        {**base, "model": "claude-sonnet-4-5"},
    ]
    for params in variants:
        _, h = await create(client, **params)
        assert h["tiermem-cache"] == "miss", params
    for params in variants:
        _, h = await create(client, **params)
        assert h["tiermem-cache"] == "hit", params
    assert gateway.sim.calls() == len(variants)


async def test_a_system_prompt_as_blocks_with_cache_control_reaches_upstream_and_hits(gateway):
    client = gateway.async_sdk()
    system = [{"type": "text", "text": "You are a helpful agent. " * 300,
               "cache_control": {"type": "ephemeral"}}]
    first, h1 = await create(client, **ask("Hello there", system=system))
    # the simulator's prompt cache saw the breakpoint: the prefix was written
    assert first.usage.cache_creation_input_tokens > 0
    again, h2 = await create(client, **ask("Hello there", system=system))
    assert (h1["tiermem-cache"], h2["tiermem-cache"]) == ("miss", "hit")
    assert again.usage == first.usage


# --------------------------------------------------------------------------- streaming


async def test_a_stream_hit_replays_the_events_of_its_miss_byte_for_byte(gateway):
    body = ask("Can you describe the kitchen in the Elm St house?", stream=True)
    miss = await gateway.post(body)
    hit = await gateway.post(body)
    assert (miss.status_code, hit.status_code) == (200, 200)
    assert miss.headers["content-type"].startswith("text/event-stream")
    assert (miss.headers["tiermem-cache"], hit.headers["tiermem-cache"]) == ("miss", "hit")
    assert hit.content == miss.content
    assert "tiermem-cost-usd" not in miss.headers  # streamed through: sent before the cost was known
    assert float(hit.headers["tiermem-saved-usd"]) > 0
    check_event_sequence(parse_sse(miss.text))
    assert gateway.sim.calls() == 1


def parse_sse(text: str) -> list[tuple[str, dict]]:
    """The events of an SSE body framed as the API frames them (`event:`, `data:`, blank line)."""
    frames = text.split("\n\n")
    assert frames[-1] == ""  # every frame ends with a blank line
    events = []
    for frame in frames[:-1]:
        event_line, data_line = frame.split("\n")
        assert event_line.startswith("event: ") and data_line.startswith("data: ")
        name, data = event_line.removeprefix("event: "), msgspec.json.decode(data_line[6:])
        assert data["type"] == name
        events.append((name, data))
    return events


def check_event_sequence(events: list[tuple[str, dict]]) -> None:
    """The API's grammar: message_start, then each block's start, deltas, stop (pings
    anywhere), then message_delta and message_stop."""
    names = [n for n, _ in events if n != "ping"]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    open_block = None
    for name, data in events[1:-2]:
        if name == "content_block_start":
            assert open_block is None
            open_block = data["index"]
        elif name in ("content_block_delta", "content_block_stop"):
            assert data["index"] == open_block
            if name == "content_block_stop":
                open_block = None
        else:
            assert name == "ping", name
    assert open_block is None and "content_block_delta" in names


async def test_sdk_stream_builds_the_message_a_plain_call_returns(gateway):
    client = gateway.async_sdk()
    params = ask("Which schools are near the Maple Ave house?")
    async with client.messages.stream(**params) as stream:
        texts = [t async for t in stream.text_stream]
        streamed = await stream.get_final_message()
    async with client.messages.stream(**params) as stream:
        replayed = await stream.get_final_message()
    plain, h = await create(client, **params)
    assert h["tiermem-cache"] == "hit"
    assert "".join(texts) == streamed.content[0].text
    assert streamed.model_dump() == replayed.model_dump() == plain.model_dump()
    assert gateway.sim.calls() == 1


@pytest.fixture(scope="module")
def slow_simulator(tmp_path_factory):
    """A simulator that writes 20 ms a token, spread over its stream as the API's is."""
    import os

    env = {**os.environ, "SIMULATOR_LATENCY_MEDIAN_S": "0.002", "SIMULATOR_LATENCY_P95_S": "0.004",
           "SIMULATOR_LATENCY_PER_TOKEN_S": "0.02"}
    sim = servers.start_simulator(tmp_path_factory.mktemp("slow-sim"), env=env, die_with_parent=True)
    yield sim.url
    sim.stop()


async def test_a_miss_streams_through_as_the_model_writes_and_its_hit_replays_at_once(
        clean_state, slow_simulator):
    env = {**clean_state, "ANTHROPIC_BASE_URL": slow_simulator}
    port = servers.free_port()
    async with running("llm-broker", build_broker, env, llm_max_retries=0), \
            running("llm-gateway", build_gateway, env, gateway_port=port):
        url = f"http://127.0.0.1:{port}/v1/messages"
        body = ask("Could you tell me about the garden and the garage at the Pine St house?",
                   stream=True)
        timings, bodies = [], []
        async with httpx.AsyncClient(timeout=60) as http:
            for _ in range(2):
                started, arrived, chunks = time.perf_counter(), [], []
                async with http.stream("POST", url, json=body, headers={
                        "x-api-key": "k", "anthropic-version": "2023-06-01"}) as r:
                    async for chunk in r.aiter_bytes():
                        arrived.append(time.perf_counter() - started)
                        chunks.append(chunk)
                timings.append(arrived)
                bodies.append(b"".join(chunks))
    miss, hit = timings
    events = parse_sse(bodies[0].decode())
    output_tokens = events[-2][1]["usage"]["output_tokens"]
    assert output_tokens >= 15  # >= 0.3 s of writing at 20 ms a token
    # the first bytes left long before the model finished: streamed through, not buffered
    assert miss[-1] - miss[0] > 0.5 * output_tokens * 0.02, miss
    assert hit[-1] < 0.25 * miss[-1], (hit, miss)  # the hit is not paced by a model
    assert bodies[1] == bodies[0]


# --------------------------------------------------------------------------- tools, images


async def test_tool_use_is_cached_with_its_tools_and_answered_after_the_tool_result(gateway):
    client = gateway.async_sdk()
    params = ask("What is the weather in Paris today?", tools=[WEATHER])
    first, h1 = await create(client, **params)
    assert first.stop_reason == "tool_use" and h1["tiermem-stored"] == "true"
    call, = [b for b in first.content if b.type == "tool_use"]
    assert call.name == "get_weather" and "Paris" in call.input["city"]
    again, h2 = await create(client, **params)
    assert h2["tiermem-cache"] == "hit" and again.model_dump() == first.model_dump()
    other_tools = [{**WEATHER, "description": "Get the forecast for a city"}]
    _, h3 = await create(client, **{**params, "tools": other_tools})
    assert h3["tiermem-cache"] == "miss"  # the tools are in the key
    follow = {**params, "messages": [
        *params["messages"], {"role": "assistant", "content": [call.model_dump()]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                      "content": "Sunny, 21 C"}]}]}
    answer, h4 = await create(client, **follow)
    assert answer.stop_reason == "end_turn" and answer.content[0].type == "text"
    assert h4["tiermem-cache"] == "miss"
    async with client.messages.stream(**params) as stream:  # a hit, streamed
        streamed = await stream.get_final_message()
    assert streamed.model_dump() == first.model_dump()
    assert gateway.sim.calls() == 3


def image(data: str) -> dict:
    return {"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}},
        {"type": "text", "text": "What is in this image?"}]}


async def test_an_image_request_passes_through_and_the_image_is_part_of_the_key(gateway):
    client = gateway.async_sdk()
    first, h1 = await create(client, model=MODEL, max_tokens=200, messages=[image(PNG_A)])
    assert first.usage.input_tokens >= 1600  # the simulator counted the image: it got there
    _, h2 = await create(client, model=MODEL, max_tokens=200, messages=[image(PNG_A)])
    _, h3 = await create(client, model=MODEL, max_tokens=200, messages=[image(PNG_B)])
    assert [h["tiermem-cache"] for h in (h1, h2, h3)] == ["miss", "hit", "miss"]
    assert gateway.sim.calls() == 2


async def test_a_document_request_passes_through_and_its_bytes_are_in_the_key(gateway):
    client = gateway.async_sdk()

    def doc(text: str) -> list[dict]:
        return [{"role": "user", "content": [
            {"type": "document", "source": {"type": "text", "media_type": "text/plain",
                                            "data": text}},
            {"type": "text", "text": "Summarise this document."}]}]

    first, h1 = await create(client, model=MODEL, max_tokens=200, messages=doc("Lease: 12 months."))
    _, h2 = await create(client, model=MODEL, max_tokens=200, messages=doc("Lease: 12 months."))
    _, h3 = await create(client, model=MODEL, max_tokens=200, messages=doc("Lease: 6 months."))
    assert first.stop_reason == "end_turn"
    assert [h["tiermem-cache"] for h in (h1, h2, h3)] == ["miss", "hit", "miss"]


async def test_requests_the_cache_cannot_key_pass_through_uncached(gateway):
    client = gateway.async_sdk()
    by_url = {"role": "user", "content": [
        {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}},
        {"type": "text", "text": "Describe it"}]}
    for _ in range(2):
        _, h = await create(client, model=MODEL, max_tokens=100, messages=[by_url])
        assert (h["tiermem-cache"], h["tiermem-bypass-reason"]) == ("bypass", "url_source")
    for _ in range(2):  # a field the contract does not name: nothing says it leaves the answer alone
        _, h = await create(client, **ask("Hello", extra_body={"service_tier": "auto"}))
        assert (h["tiermem-cache"], h["tiermem-bypass-reason"]) == ("bypass", "unknown_field")
    streamed = await gateway.post({**ask("Hello"), "service_tier": "auto", "stream": True})
    assert streamed.headers["tiermem-cache"] == "bypass"  # streamed through, and said so
    check_event_sequence(parse_sse(streamed.text))
    assert gateway.sim.calls() == 5


async def test_a_semantic_hit_for_a_plain_text_request(gateway):
    headers = {"tiermem-cache-mode": "semantic", "tiermem-task": "market_context",
               "tiermem-volatility": "market_context"}
    client = gateway.async_sdk(default_headers=headers)
    _, h1 = await create(client, **ask("Is the house on Main Street still available?"))
    _, h2 = await create(client, **ask("is the house on main street still available ?"))
    assert h1["tiermem-cache"] == "miss"
    assert (h2["tiermem-cache"], h2["tiermem-match"]) == ("hit", "semantic")
    assert 0 < float(h2["tiermem-similarity"]) <= 1
    assert gateway.sim.calls() == 1


# --------------------------------------------------------------------------- what is never cached


async def test_an_answer_cut_off_by_max_tokens_is_not_cached(gateway):
    client = gateway.async_sdk()
    params = ask("Tell me everything about the neighbourhood schools and parks.", max_tokens=3)
    first, h1 = await create(client, **params)
    second, h2 = await create(client, **params)
    assert first.stop_reason == "max_tokens"
    assert (h1["tiermem-cache"], h1["tiermem-stored"]) == ("miss", "false")
    assert h2["tiermem-cache"] == "miss"
    assert gateway.sim.calls() == 2


async def test_an_upstream_error_is_not_cached_and_the_next_call_is_a_miss(gateway):
    client = gateway.async_sdk()
    gateway.sim.fault(status=500, count=1)
    with pytest.raises(anthropic.APIStatusError) as err:
        await create(client, **ask("Any news on the Birch Rd house?"))
    assert err.value.status_code == 529  # the broker's 503: nothing could answer
    assert err.value.body["error"]["type"] == "overloaded_error"
    _, h = await create(client, **ask("Any news on the Birch Rd house?"))
    assert h["tiermem-cache"] == "miss"


# --------------------------------------------------------------------------- per-request controls


async def test_cache_control_headers(gateway):
    client = gateway.async_sdk()
    q = ask("Do you allow pets in the rentals?")

    async def status(**headers) -> str:
        _, h = await create(client, **q, extra_headers=headers)
        return h["tiermem-cache"]

    assert await status(**{"tiermem-cache-mode": "off"}) == "bypass"
    assert await status(**{"tiermem-no-store": "true"}) == "miss"
    assert await status() == "miss"  # the no-store answer was not kept
    assert await status() == "hit"
    assert await status(**{"tiermem-force-refresh": "true"}) == "miss"
    assert await status(**{"tiermem-max-age": "0"}) == "miss"  # any age is too old
    assert await status(**{"tiermem-max-age": "3600"}) == "hit"
    assert await status(**{"tiermem-namespace": "tenant-b"}) == "miss"
    assert await status(**{"tiermem-namespace": "tenant-b"}) == "hit"
    assert gateway.sim.calls() == 6


async def test_count_tokens_is_asked_upstream_through_the_broker(gateway):
    client = gateway.async_sdk()
    params = {"model": MODEL, "messages": [{"role": "user", "content": "How big is the lot?"}],
              "system": "You are a real estate agent."}
    counted = await client.messages.count_tokens(**params)
    direct = httpx.post(f"{gateway.sim.url}/v1/messages/count_tokens", json=params,
                        headers={"x-api-key": "x", "anthropic-version": "2023-06-01"}).json()
    assert counted.input_tokens == direct["input_tokens"] > 0


# --------------------------------------------------------------------------- errors


async def test_errors_come_in_the_apis_shape_and_status_and_the_sdk_raises_its_exception(
        gateway, capfd):
    client = gateway.async_sdk()
    with pytest.raises(anthropic.BadRequestError) as err:
        await client.messages.create(**{**ask("Hi"), "model": "claude-mythical-9"})
    assert err.value.body["type"] == "error"
    assert err.value.body["error"]["type"] == "invalid_request_error"
    assert "claude-mythical-9" in err.value.body["error"]["message"]
    with pytest.raises(anthropic.AuthenticationError):
        await anthropic.AsyncAnthropic(base_url=gateway.url, api_key="sk-wrong",
                                       max_retries=0).messages.create(**ask("Hi"))
    with pytest.raises(anthropic.BadRequestError, match="tiermem-cache-mode"):
        await client.messages.create(**ask("Hi"), extra_headers={"tiermem-cache-mode": "fuzzy"})
    with pytest.raises(anthropic.BadRequestError, match="needs a user"):
        await client.messages.create(**ask("Hi"), extra_headers={"tiermem-scope": "user"})
    assert gateway.sim.calls() == 0
    async with httpx.AsyncClient() as http:
        for body, says in ((b"{not json", "parsing the body"),
                           (b'{"model": "claude-haiku-4-5", "messages": []}', "max_tokens: Field required")):
            r = await http.post(f"{gateway.url}/v1/messages", content=body,
                                headers={"x-api-key": KEY, "content-type": "application/json"})
            assert r.status_code == 400
            got = r.json()
            assert got["type"] == "error" and got["error"]["type"] == "invalid_request_error"
            assert says in got["error"]["message"] and got["request_id"].startswith("req_tm_")
    for stream in (False, True):  # past what the bus or the broker take: 413, in the API's shape
        r = await gateway.post(ask("x" * 1_200_000, stream=stream))
        assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"
    await create(client, **ask("Hi"))  # and one that succeeds
    out, err = capfd.readouterr()
    assert "http_messages" in out  # the gateway's lines were captured ...
    assert KEY not in out + err and "sk-wrong" not in out + err  # ... and no API key is in them


async def test_one_trace_follows_an_http_request_to_the_model_with_genai_attributes(
        gateway, spans):
    from shared import telemetry

    with telemetry.tracer.start_as_current_span("caller") as caller:
        r = await gateway.post(ask("Is the Oak St house near a park?"), telemetry.inject())
    assert r.status_code == 200
    await asyncio.sleep(0.1)  # server spans end right after the response is sent
    mine = [s for s in spans.get_finished_spans()
            if s.context.trace_id == caller.get_span_context().trace_id]
    by_id = {s.context.span_id: s for s in mine}
    span = next(s for s in mine if s.name == f"chat {MODEL}")
    names = []
    while span is not None:
        names.append(span.name)
        span = by_id.get(span.parent.span_id) if span.parent else None
    assert names == [f"chat {MODEL}", "llm.complete process", "POST /v1/messages", "caller"]
    chat = next(s for s in mine if s.name == f"chat {MODEL}").attributes
    body = r.json()
    assert (chat["gen_ai.operation.name"], chat["gen_ai.provider.name"]) == ("chat", "anthropic")
    assert chat["gen_ai.request.model"] == MODEL and chat["gen_ai.response.id"] == body["id"]
    assert chat["gen_ai.usage.input_tokens"] == body["usage"]["input_tokens"]
    assert chat["gen_ai.usage.output_tokens"] == body["usage"]["output_tokens"]
    assert "gen_ai.usage.cache_read.input_tokens" in chat
    assert tuple(chat["gen_ai.response.finish_reasons"]) == ("end_turn",)
    server = next(s for s in mine if s.name == "POST /v1/messages").attributes
    assert server["http.response.status_code"] == 200 and server["tiermem.cache"] == "miss"


# --------------------------------------------------------------------------- pure parts


def test_sse_events_of_a_message_with_text_and_a_tool_call():
    message = {"id": "msg_1", "type": "message", "role": "assistant", "model": MODEL,
               "content": [{"type": "text", "text": "x" * 100},
                           {"type": "tool_use", "id": "toolu_1", "name": "f",
                            "input": {"a": [1, 2], "b": "y" * 60}}],
               "stop_reason": "tool_use", "stop_sequence": None,
               "usage": {"input_tokens": 5, "output_tokens": 40}}
    events = sse.events(message)
    names = [n for n, _ in events]
    assert names == ["message_start", "ping",
                     "content_block_start", *["content_block_delta"] * 3, "content_block_stop",
                     "content_block_start", *["content_block_delta"] * 2, "content_block_stop",
                     "message_delta", "message_stop"]
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    text = "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta"
                   and d["index"] == 0)
    raw = "".join(d["delta"]["partial_json"] for n, d in events if n == "content_block_delta"
                  and d["index"] == 1)
    assert text == "x" * 100 and msgspec.json.decode(raw) == message["content"][1]["input"]
    assert events[-2][1]["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    assert events[-2][1]["usage"]["output_tokens"] == 40


def test_headers_map_onto_cache_options_and_bad_values_are_refused():
    assert translate.cache_options({}) == {"mode": "exact", "scope": "global",
                                           "volatility": "static", "refresh": False, "store": True}
    opts = translate.cache_options({"tiermem-cache-mode": "semantic", "tiermem-max-age": "30",
                                    "tiermem-no-store": "1", "tiermem-force-refresh": "yes",
                                    "tiermem-namespace": "acme", "tiermem-volatility": "lead_score"})
    assert opts == {"mode": "semantic", "scope": "global", "volatility": "lead_score",
                    "refresh": True, "store": False, "namespace": "acme", "max_age_s": 30.0}
    for bad in ({"tiermem-max-age": "soon"}, {"tiermem-max-age": "-1"},
                {"tiermem-no-store": "maybe"}, {"tiermem-cache-mode": "fuzzy"}):
        with pytest.raises(BadRequest):
            translate.cache_options(bad)


def test_the_request_body_maps_onto_llm_complete_keeping_every_field():
    body = {**ask("Hi", metadata={"user_id": "lead-9"}, tools=[WEATHER],
                  tool_choice={"type": "auto"}, thinking={"type": "enabled", "budget_tokens": 1024}),
            "stream": True, "service_tier": "auto"}
    asked = translate.complete_body(body, {"anthropic-beta": "a-1, b-2",
                                           "anthropic-version": "2023-06-01"})
    assert asked.stream is True
    out = asked.body
    assert out["user_id"] == "lead-9" and out["task"] == "messages"
    assert out["extra"] == {"service_tier": "auto"} and "stream" not in out
    assert out["betas"] == ["a-1", "b-2"] and out["anthropic_version"] == "2023-06-01"
    for name in ("tools", "tool_choice", "thinking", "metadata", "messages", "max_tokens"):
        assert out[name] == body[name]


# --------------------------------------------------------------------------- the stack


@pytest.mark.e2e
async def test_just_up_starts_the_gateway_and_names_it_in_stack_env(
        nats_url, redis_url, database_url, tmp_path):
    """`devstack up` (what `just up` runs), every service its own process: an app
    reads TIERMEM_ANTHROPIC_BASE_URL and talks to it with the unmodified SDK."""
    import os

    from shared.settings import load_stack_env as load_env
    from tests.conftest import reset_servers, stack_processes

    await reset_servers(nats_url, redis_url, database_url)
    env = {**os.environ, "NATS_URL": nats_url, "REDIS_URL": redis_url, "DATABASE_URL": database_url}
    env.pop("ANTHROPIC_API_KEY", None)
    env.pop("ANTHROPIC_BASE_URL", None)  # `up` starts the simulator for the broker
    with stack_processes(env, tmp_path):
        urls = load_env(tmp_path)
        base = urls["TIERMEM_ANTHROPIC_BASE_URL"]
        assert base != urls["ANTHROPIC_BASE_URL"]  # the broker's upstream is not the gateway
        client = anthropic.AsyncAnthropic(base_url=base, api_key="any", max_retries=0)
        params = ask("Is parking included with the Cedar St condo?")
        async with client.messages.stream(**params) as stream:
            streamed = await stream.get_final_message()
        plain, headers = await create(client, **params)
        assert headers["tiermem-cache"] == "hit"
        assert plain.model_dump() == streamed.model_dump()


async def test_an_error_after_the_stream_began_goes_out_as_the_apis_error_event(clean_nats):
    """The status is sent with the first event; a later failure can only be an event.
    A stand-in answers `llm.complete` as a broker whose upstream broke off would."""
    from services.llm_broker.service import STREAM_HEADER
    from shared.service import ERROR_CODE_HEADER, ERROR_HEADER
    from tests.helpers import client

    env = {"NATS_URL": clean_nats}
    port = servers.free_port()
    async with client(clean_nats) as nc, \
            running("llm-gateway", build_gateway, env, gateway_port=port):
        async def broker(msg) -> None:
            to = msgspec.json.decode(msg.data)["stream_to"]
            start = {"type": "message_start", "message": {
                "id": "msg_1", "type": "message", "role": "assistant", "model": MODEL,
                "content": [], "stop_reason": None, "stop_sequence": None,
                "usage": {"input_tokens": 3, "output_tokens": 1}}}
            await nc.publish(to, msgspec.json.encode(start), headers={STREAM_HEADER: "miss"})
            await nc.publish(msg.reply, b'{"error": {"code": 503, "message": "broke off"}}', headers={
                ERROR_HEADER: "the model API broke off its answer", ERROR_CODE_HEADER: "503"})

        await nc.subscribe("llm.complete", cb=broker)
        await nc.flush()
        async with httpx.AsyncClient(timeout=10) as http:
            r = await http.post(f"http://127.0.0.1:{port}/v1/messages",
                                json=ask("Hi", stream=True), headers={"x-api-key": "k"})
        assert r.status_code == 200 and r.headers["tiermem-cache"] == "miss"
        events = parse_sse(r.text)
        assert [n for n, _ in events] == ["message_start", "error"]
        assert events[1][1]["error"] == {"type": "overloaded_error",
                                         "message": "the model API broke off its answer"}
        with pytest.raises(anthropic.APIStatusError, match="broke off"):
            sdk = anthropic.AsyncAnthropic(base_url=f"http://127.0.0.1:{port}", api_key="k",
                                           max_retries=0)
            async with sdk.messages.stream(**ask("Hi")) as stream:
                await stream.get_final_message()


def test_the_events_of_a_message_add_up_to_it_again():
    from shared.accumulate import Accumulator

    message = {"id": "msg_1", "type": "message", "role": "assistant", "model": MODEL,
               "content": [{"type": "thinking", "thinking": "t" * 70, "signature": "sig"},
                           {"type": "text", "text": "Hello " * 30},
                           {"type": "tool_use", "id": "toolu_1", "name": "f",
                            "input": {"q": "é" * 50, "n": [1, {"x": None}]}},
                           {"type": "redacted_thinking", "data": "opaque"}],
               "stop_reason": "tool_use", "stop_sequence": None,
               "usage": {"input_tokens": 12, "output_tokens": 99,
                         "cache_read_input_tokens": 0}}
    acc = Accumulator()
    for _, data in sse.events(message):
        acc.add(data)
    assert acc.result() == message


def test_anthropic_version_and_beta_go_upstream_as_headers():
    from shared.upstream import _params
    from shared.contract import CompleteRequest

    req = msgspec.convert({**translate.complete_body(
        ask("Hi"), {"anthropic-version": "2023-06-01",
                    "anthropic-beta": "prompt-caching-2024-07-31,files-api-2025-04-14"}).body},
        CompleteRequest)
    params = _params(req)
    assert params["extra_headers"] == {
        "anthropic-beta": "prompt-caching-2024-07-31,files-api-2025-04-14",
        "anthropic-version": "2023-06-01"}


async def test_a_prefill_and_consecutive_user_turns_pass_through_the_sdk_as_the_api_takes_them(gateway):
    client = gateway.async_sdk()
    params = {"model": MODEL, "max_tokens": 300, "messages": [
        {"role": "user", "content": "Hi, I saw your ad."},
        {"role": "user", "content": "Is the Cedar St condo still available?"},
        {"role": "assistant", "content": "Yes,"}]}
    first, h1 = await create(client, **params)
    again, h2 = await create(client, **params)
    assert h1["tiermem-cache"] == "miss" and h2["tiermem-cache"] == "hit"
    assert again.model_dump() == first.model_dump() and first.content[0].text
    with pytest.raises(anthropic.BadRequestError, match="whitespace"):
        await client.messages.create(**{**params, "messages": [*params["messages"][:2],
                                                               {"role": "assistant", "content": "Yes, "}]})
