"""llm-gateway with GATEWAY_UPSTREAM_KEY=caller: the model is called with the caller's key.

The simulator here accepts only two keys (SIMULATOR_API_KEYS), as the real API
accepts only valid ones: the broker's own key would be refused, so every answer
proves the caller's key reached upstream, and `/stats` `by_key` says whose it
was. Real NATS, Redis and Postgres; the SDK drives the gateway over HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid

import anthropic
import asyncpg
import httpx
import msgspec
import pytest
from prometheus_client import generate_latest
from redis.asyncio import Redis

from devstack import servers
from services.llm_broker.service import build as build_broker
from services.llm_gateway.service import build as build_gateway
from services.llm_simulator.app import key_fingerprint
from shared import permissions, subjects
from shared.contract import UPSTREAM_KEY_HEADER
from tests.helpers import Sim, client, eventually, running
from tests.test_llm_gateway import MODEL, ask, create, parse_sse

# Long and unique, so a find in any captured text is this key and nothing else.
KEY_A = f"sk-ant-caller-a-{uuid.uuid4().hex}"
KEY_B = f"sk-ant-caller-b-{uuid.uuid4().hex}"
BOGUS = f"sk-ant-bogus-{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def keyed_simulator(tmp_path_factory):
    env = {**os.environ, "SIMULATOR_LATENCY_MEDIAN_S": "0.002", "SIMULATOR_LATENCY_P95_S": "0.004",
           "SIMULATOR_API_KEYS": f"{KEY_A},{KEY_B}"}
    sim = servers.start_simulator(tmp_path_factory.mktemp("keyed-sim"), env=env,
                                  die_with_parent=True)
    yield sim.url
    sim.stop()


class Keyed:
    def __init__(self, url: str, sim: Sim, env: dict) -> None:
        self.url, self.sim, self.env = url, sim, env

    def sdk(self, key: str) -> anthropic.AsyncAnthropic:
        return anthropic.AsyncAnthropic(base_url=self.url, api_key=key, max_retries=0)

    def by_key(self) -> dict[str, int]:
        return httpx.get(f"{self.sim.url}/stats").json()["by_key"]


@pytest.fixture
async def caller_mode(clean_state, keyed_simulator):
    sim = Sim(keyed_simulator)
    sim.reset()
    env = {**clean_state, "ANTHROPIC_BASE_URL": keyed_simulator}
    port = servers.free_port()
    async with running("llm-broker", build_broker, env, llm_max_retries=0, llm_timeout_s=5.0,
                       breaker_failures=2, log_level="debug", served_flush_s=0.02), \
            running("llm-gateway", build_gateway, env, gateway_port=port, log_level="debug",
                    gateway_upstream_key="caller"):
        yield Keyed(f"http://127.0.0.1:{port}", sim, env)


async def test_each_callers_key_calls_the_model_and_keys_never_share_answers(caller_mode):
    a, b = caller_mode.sdk(KEY_A), caller_mode.sdk(KEY_B)
    params = ask("What are the office hours of the Main St branch?")
    first, h1 = await create(a, **params)
    again, h2 = await create(a, **params)
    other, h3 = await create(b, **params)
    other_again, h4 = await create(b, **params)
    assert [h["tiermem-cache"] for h in (h1, h2, h3, h4)] == ["miss", "hit", "miss", "hit"]
    assert h3["tiermem-entry"] != h1["tiermem-entry"]  # B got its own entry, not A's
    assert again.model_dump() == first.model_dump() and other_again.content == other.content
    assert caller_mode.by_key() == {key_fingerprint(KEY_A): 1, key_fingerprint(KEY_B): 1}

    # A key the API refuses gets the API's 401, never another key's cached answer ...
    for _ in range(3):  # ... and, the caller's fault, it does not open the breaker (2 failures)
        with pytest.raises(anthropic.AuthenticationError):
            await create(caller_mode.sdk(BOGUS), **params)
    _, h5 = await create(a, **ask("Is parking included at the Main St house?"))
    assert h5["tiermem-cache"] == "miss"
    # so does the API rate limiting one caller's account: its 429, not everyone's breaker
    caller_mode.sim.fault(status=429, count=3, retry_after_s=0)
    for question in ("Is there a pool?", "Is there a gym?", "Is there a lift?"):
        with pytest.raises(anthropic.RateLimitError):
            await create(b, **ask(question))
    _, h6 = await create(a, **ask("Is there a sauna?"))
    assert h6["tiermem-cache"] == "miss"

    # streamed, and count_tokens, go with the caller's key too
    async with a.messages.stream(**ask("Describe the garden of the Elm St house.")) as stream:
        streamed = await stream.get_final_message()
    assert streamed.content[0].text
    counted = await a.messages.count_tokens(model=MODEL, messages=params["messages"])
    assert counted.input_tokens > 0
    with pytest.raises(anthropic.AuthenticationError):
        await caller_mode.sdk(BOGUS).messages.count_tokens(model=MODEL, messages=params["messages"])
    assert caller_mode.by_key()[key_fingerprint(KEY_A)] == 5  # first, parking, sauna, stream, count


async def test_the_callers_key_is_in_no_log_span_cache_entry_or_audit_record(
        caller_mode, capfd, caplog, spans):
    caplog.set_level(logging.DEBUG)  # the SDK's and httpx's own debug lines too
    async with client(caller_mode.env["NATS_URL"]) as nc:
        audited = await nc.subscribe(subjects.AUDIT_SERVED_ALL)
        await nc.flush()
        a = caller_mode.sdk(KEY_A)
        semantic = {"tiermem-cache-mode": "semantic", "tiermem-scope": "user",
                    "tiermem-user": "lead-7"}
        for _ in range(2):  # a miss then a hit, each way, and one into the semantic tier
            await create(a, **ask("Which schools are near the Maple Ave house?"))
            await create(a, **ask("Is the Oak St house near a park?"), extra_headers=semantic)
            async with httpx.AsyncClient(timeout=30) as http:
                r = await http.post(f"{caller_mode.url}/v1/messages",
                                    json=ask("Tell me about the Pine St garage.", stream=True),
                                    headers={"authorization": f"Bearer {KEY_A}",
                                             "anthropic-version": "2023-06-01"})
            assert r.status_code == 200 and parse_sse(r.text)
        with pytest.raises(anthropic.AuthenticationError):
            await create(caller_mode.sdk(BOGUS), **ask("Hi there"))
        records = []

        async def three_hits():
            while True:
                try:
                    records.append((await audited.next_msg(timeout=0.05)).data)
                except (asyncio.TimeoutError, TimeoutError):
                    break
            return len(b"".join(records).split(b'"entry_id"')) - 1 >= 3 or None

        await eventually(three_hits, what="the hits' served records")
    redis = Redis.from_url(caller_mode.env["REDIS_URL"])
    try:
        stored = [k + (await redis.dump(k) or b"") async for k in redis.scan_iter()]
    finally:
        await redis.aclose()
    conn = await asyncpg.connect(caller_mode.env["DATABASE_URL"])
    try:
        rows = [str(r) for r in await conn.fetch("SELECT * FROM llm.entries")]
    finally:
        await conn.close()
    assert rows and stored  # the cache holds the answers ...
    out, err = capfd.readouterr()
    assert "http_messages" in out and "llm_answer" in out  # the services' lines were captured
    span_text = " ".join(f"{s.name} {dict(s.attributes)} {[e.attributes for e in s.events]}"
                         for s in spans.get_finished_spans())
    assert spans.get_finished_spans()
    texts = {"logs": out + err + caplog.text, "spans": span_text, "metrics": generate_latest(),
             "redis": b"".join(stored),
             "postgres": "".join(rows), "audit records": b"".join(records)}
    for key in (KEY_A, BOGUS):
        for where, text in texts.items():
            needle = key.encode() if isinstance(text, bytes) else key
            assert needle not in text, f"{where} holds a caller's key"


async def test_a_key_header_on_the_public_subject_is_ignored(caller_mode):
    """Only `llm.complete.keyed`, which the bus lets only the gateway publish
    (tests/test_bus_permissions.py), takes a key: a worker's header on `llm.complete`
    does not make the broker call with it (the simulator refuses the broker's own)."""
    body = {"task": "messages", "model": MODEL, "max_tokens": 100,
            "messages": [{"role": "user", "content": "Is the Main St house available?"}],
            "cache": {"mode": "exact", "scope": "global"}}
    async with client(caller_mode.env["NATS_URL"], permissions.WORKER) as nc:
        msg = await nc.request(subjects.LLM_COMPLETE, msgspec.json.encode(body), timeout=10,
                               headers={UPSTREAM_KEY_HEADER: KEY_A})
    assert msg.headers["Nats-Service-Error-Code"] == "502"  # the service's own key was refused
    assert key_fingerprint(KEY_A) not in caller_mode.by_key()
