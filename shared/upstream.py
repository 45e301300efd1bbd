"""Calls to the model API through the official `anthropic` SDK.

Shared by every service that calls the model: the llm-broker (misses) and the
freshness-auditor (re-asks and its LLM judge) build their client here
(`make_client`), so both honour the same settings and map the same errors.

The SDK retries 408/409/429/5xx/overloaded with backoff (`max_retries`); a
semaphore bounds concurrent upstream calls; the breaker stops calling a
failing upstream. Errors leave as TierErrors with a clear message. Long
system prompts are marked with `cache_control` so Anthropic's
prompt cache bills repeats at the cached-read price.
"""

from __future__ import annotations

import asyncio
import time

import anthropic
import structlog

from shared.breaker import Breaker
from shared.contract import CompleteRequest, TextBlock, Usage
from shared.errors import BadRequest, TierError, Unavailable, UpstreamTimeout
from shared.settings import Settings
from shared.telemetry import tracer

log = structlog.get_logger()
CACHE_CONTROL_MIN_CHARS = 4096  # ~1024 tokens: below that Anthropic does not cache


class Answer:
    __slots__ = ("text", "content", "model", "stop_reason", "usage")

    def __init__(self, text, content, model, stop_reason, usage) -> None:
        self.text, self.content, self.model = text, content, model
        self.stop_reason, self.usage = stop_reason, usage


def make_client(settings: Settings) -> anthropic.AsyncAnthropic:
    if not settings.anthropic_base_url and not settings.anthropic_api_key:
        raise SystemExit("set ANTHROPIC_API_KEY to call Claude, or ANTHROPIC_BASE_URL to use "
                         "the local simulator (`just up` does that for you)")
    return anthropic.AsyncAnthropic(
        api_key=settings.anthropic_api_key or "simulator",
        base_url=settings.anthropic_base_url or None,
        timeout=settings.llm_timeout_s, max_retries=settings.llm_max_retries)


class Upstream:
    def __init__(self, client: anthropic.AsyncAnthropic, settings: Settings, clock=time.time) -> None:
        self.client = client
        self.limit = asyncio.Semaphore(settings.llm_max_concurrency)
        self.breaker = Breaker(settings.breaker_failures, settings.breaker_cooldown_s)
        self.clock = clock
        self.calls = 0

    async def complete(self, req: CompleteRequest) -> Answer:
        if not self.breaker.allow(self.clock()):
            raise Unavailable("the model API is failing (circuit open) and no cached answer "
                              "fits; retry in a few seconds")
        params = _params(req)
        async with self.limit:
            with tracer.start_as_current_span("anthropic messages.create",
                                              attributes={"gen_ai.request.model": req.model}):
                try:
                    self.calls += 1
                    msg = await self.client.messages.create(**params)
                except anthropic.BadRequestError as exc:
                    self.breaker.success()  # the upstream is fine; the request is not
                    raise BadRequest(f"the model API rejected the request: {exc.message}") from None
                except anthropic.APITimeoutError:
                    self.breaker.failure(self.clock())
                    raise UpstreamTimeout("the model API did not answer in time") from None
                except anthropic.RateLimitError:
                    self.breaker.failure(self.clock())
                    raise Unavailable("the model API is rate limiting us (after retries)") from None
                except anthropic.APIStatusError as exc:
                    self.breaker.failure(self.clock())
                    raise TierError(f"the model API failed with {exc.status_code} after retries",
                                    502 if exc.status_code < 500 else 503) from None
                except anthropic.APIConnectionError:
                    self.breaker.failure(self.clock())
                    raise Unavailable("cannot reach the model API") from None
        self.breaker.success()
        blocks = [TextBlock(text=b.text) for b in msg.content if b.type == "text"]
        u = msg.usage
        usage = Usage(input_tokens=u.input_tokens, output_tokens=u.output_tokens,
                      cache_creation_input_tokens=u.cache_creation_input_tokens or 0,
                      cache_read_input_tokens=u.cache_read_input_tokens or 0)
        return Answer("".join(b.text for b in blocks), blocks, msg.model, msg.stop_reason, usage)


def _params(req: CompleteRequest) -> dict:
    params: dict = {"model": req.model, "max_tokens": req.max_tokens,
                    "messages": [{"role": m.role, "content": m.plain()} for m in req.messages]}
    system = req.system_text()
    if system:
        block = {"type": "text", "text": system}
        if len(system) >= CACHE_CONTROL_MIN_CHARS:
            block["cache_control"] = {"type": "ephemeral"}
        params["system"] = [block]
    for name in ("stop_sequences", "tools"):
        value = getattr(req, name)
        if value is not None:
            params[name] = value
    # Current SDKs no longer take sampling parameters as arguments; the ones a
    # caller sets still reach the API (and always split the cache's partitions).
    sampling = {n: getattr(req, n) for n in ("temperature", "top_p", "top_k")
                if getattr(req, n) is not None}
    if sampling:
        params["extra_body"] = sampling
    return params
