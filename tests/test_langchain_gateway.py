"""LangChain apps reach the cache unchanged: `ChatAnthropic(base_url=...)` pointed at the llm-gateway.

The adapter people expect for an LLM cache in LangChain is none at all: the
real `langchain-anthropic` chat model, pointed at the gateway, gets the
exact cache (and a replayed stream) with no code of ours in the app. The
simulator's request count shows what reached the model.
"""

from __future__ import annotations

import asyncio

import pytest
from langchain_anthropic import ChatAnthropic

from devstack import servers
from services.llm_broker.service import build as build_broker
from services.llm_gateway.service import build as build_gateway
from tests.helpers import Sim, running

KEY = "sk-langchain-test"


@pytest.fixture
async def gateway_url(clean_state, simulator):
    Sim(simulator).reset()
    env = {**clean_state, "ANTHROPIC_BASE_URL": simulator}
    port = servers.free_port()
    async with running("llm-broker", build_broker, env, llm_max_retries=0, llm_timeout_s=5.0), \
            running("llm-gateway", build_gateway, env, gateway_port=port, gateway_api_keys=KEY):
        yield f"http://127.0.0.1:{port}"


async def test_chat_anthropic_through_the_gateway_is_served_from_the_cache(gateway_url, simulator):
    llm = ChatAnthropic(model="claude-haiku-4-5", base_url=gateway_url, api_key=KEY, max_retries=0,
                        max_tokens=200, temperature=0)
    question = "Does the Birch Lane condo allow pets?"
    first = await llm.ainvoke(question)
    calls = Sim(simulator).calls()
    again = await llm.ainvoke(question)
    assert again.content == first.content and first.content
    assert Sim(simulator).calls() == calls  # the repeat never reached the model

    streamed = "".join([c.content async for c in llm.astream(question)])  # a replayed stream
    assert streamed == first.content and Sim(simulator).calls() == calls

    other = await asyncio.to_thread(llm.invoke, "Does the Birch Lane condo have a gym?")  # sync, a miss
    assert other.content != first.content and Sim(simulator).calls() == calls + 1
