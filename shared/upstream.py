"""Calls to the model API through the official `anthropic` SDK.

Shared by every service that calls the model: the llm-broker (misses) and the
freshness-auditor (re-asks and its LLM judge) build their client here
(`make_client`), so both honour the same settings and map the same errors.

The SDK retries 408/409/429/5xx/overloaded with backoff (`max_retries`); a
semaphore bounds concurrent upstream calls; the breaker stops calling a
failing upstream. Errors leave as TierErrors with a clear message. Long
system prompts are marked with `cache_control` so Anthropic's
prompt cache bills repeats at the cached-read price.

A call may carry the caller's own API key (`api_key`, the gateway's
GATEWAY_UPSTREAM_KEY=caller): it is used for that call only (a copy of the
client sharing its connection pool; the key is no call option, so the SDK's
debug log of the options never shows it), and the API refusing it (401, 403)
or rate limiting it (429, after the SDK's retries) is the caller's error with
the API's status, not a failing upstream: one account's limits do not open the
breaker that every caller shares.
"""

from __future__ import annotations

import asyncio
import time

import anthropic
import msgspec
import structlog
from opentelemetry.trace import SpanKind

from shared.accumulate import Accumulator
from shared.breaker import Breaker
from shared.contract import CompleteRequest, CountTokensRequest, TextBlock, Usage
from shared.errors import BadRequest, TierError, Unavailable, UpstreamTimeout
from shared.settings import Settings
from shared.telemetry import tracer

log = structlog.get_logger()
CACHE_CONTROL_MIN_CHARS = 4096  # ~1024 tokens: below that Anthropic does not cache


class Answer:
    __slots__ = ("text", "content", "model", "stop_reason", "usage", "message")

    def __init__(self, text, content, model, stop_reason, usage, message=None) -> None:
        self.text, self.content, self.model = text, content, model
        self.stop_reason, self.usage = stop_reason, usage
        self.message = message  # the Message JSON as the API sent it


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

    def _client_for(self, api_key: str | None) -> anthropic.AsyncAnthropic:
        return self.client if api_key is None else self.client.with_options(api_key=api_key)

    async def count_tokens(self, req: CountTokensRequest, api_key: str | None = None) -> int:
        """The API's count of the request's input tokens (free; not behind the breaker)."""
        params = _params(req)
        del params["max_tokens"]
        client = self._client_for(api_key)
        async with self.limit:
            with tracer.start_as_current_span("anthropic messages.count_tokens",
                                              attributes={"gen_ai.request.model": req.model}):
                try:
                    raw = await client.messages.with_raw_response.count_tokens(**params)
                except (anthropic.AuthenticationError, anthropic.PermissionDeniedError) as exc:
                    raise _refused_key(exc, api_key) from None
                except anthropic.BadRequestError as exc:
                    raise BadRequest(f"the model API rejected the request: {exc.message}") from None
                except anthropic.APITimeoutError:
                    raise UpstreamTimeout("the model API did not answer in time") from None
                except anthropic.APIStatusError as exc:
                    raise TierError(f"the model API failed with {exc.status_code}",
                                    502 if exc.status_code < 500 else 503) from None
                except anthropic.APIConnectionError:
                    raise Unavailable("cannot reach the model API") from None
        try:
            return int(msgspec.json.decode(raw.http_response.content)["input_tokens"])
        except (msgspec.DecodeError, KeyError, TypeError, ValueError):
            raise TierError("the model API's token count is not one", 502) from None

    async def complete(self, req: CompleteRequest, on_event=None,
                       api_key: str | None = None) -> Answer:
        """The model's answer. With `on_event` (an async callable), the call streams and
        each event, as the API sent it, is handed to `on_event` as it arrives. `api_key`:
        the caller's, for this call (None: the client's own)."""
        if not self.breaker.allow(self.clock()):
            raise Unavailable("the model API is failing (circuit open) and no cached answer "
                              "fits; retry in a few seconds")
        params = _params(req)
        client = self._client_for(api_key)
        async with self.limit:
            with tracer.start_as_current_span(f"chat {req.model}", kind=SpanKind.CLIENT,
                                              attributes=_request_attributes(req)) as span:
                try:
                    self.calls += 1
                    if on_event is None:
                        raw = await client.messages.with_raw_response.create(**params)
                        message = _message_json(raw.http_response)
                    else:
                        message = await self._stream(client, params, on_event)
                except (anthropic.AuthenticationError, anthropic.PermissionDeniedError) as exc:
                    if api_key is not None:
                        self.breaker.success()  # the upstream is fine; the caller's key is not
                    else:
                        self.breaker.failure(self.clock())
                    raise _refused_key(exc, api_key) from None
                except anthropic.BadRequestError as exc:
                    self.breaker.success()  # the upstream is fine; the request is not
                    raise BadRequest(f"the model API rejected the request: {exc.message}") from None
                except anthropic.APITimeoutError:
                    self.breaker.failure(self.clock())
                    raise UpstreamTimeout("the model API did not answer in time") from None
                except anthropic.RateLimitError:
                    if api_key is not None:  # that account's limit, not everyone's: its 429
                        self.breaker.success()
                        raise TierError("the model API is rate limiting the caller's API key "
                                        "(after retries)", 429) from None
                    self.breaker.failure(self.clock())
                    raise Unavailable("the model API is rate limiting us (after retries)") from None
                except anthropic.APIStatusError as exc:
                    self.breaker.failure(self.clock())
                    raise TierError(f"the model API failed with {exc.status_code} after retries",
                                    502 if exc.status_code < 500 else 503) from None
                except anthropic.APIConnectionError:
                    self.breaker.failure(self.clock())
                    raise Unavailable("cannot reach the model API") from None
                except anthropic.APIError as exc:  # an `error` event in the middle of a stream
                    self.breaker.failure(self.clock())
                    raise Unavailable(f"the model API broke off its answer: {exc.message}") from None
                self.breaker.success()
                blocks = [TextBlock(text=b["text"]) for b in message.get("content") or ()
                          if b.get("type") == "text" and isinstance(b.get("text"), str)]
                u = message.get("usage") or {}
                usage = Usage(input_tokens=u.get("input_tokens") or 0,
                              output_tokens=u.get("output_tokens") or 0,
                              cache_creation_input_tokens=u.get("cache_creation_input_tokens") or 0,
                              cache_read_input_tokens=u.get("cache_read_input_tokens") or 0)
                if span.is_recording():
                    span.set_attributes(_response_attributes(message, usage))
        return Answer("".join(b.text for b in blocks), blocks, message.get("model", req.model),
                      message.get("stop_reason"), usage, message)

    async def _stream(self, client: anthropic.AsyncAnthropic, params: dict, on_event) -> dict:
        acc = Accumulator()
        stream = await client.messages.create(**params, stream=True)
        try:
            async for event in stream:
                data = event.to_dict()
                acc.add(data)
                await on_event(data)
            return acc.result()
        except (ValueError, KeyError, TypeError, IndexError, msgspec.DecodeError) as exc:
            raise TierError(f"the model API's stream is not a Message: {exc!r}", 502) from None
        finally:
            await stream.close()


def _refused_key(exc: anthropic.APIStatusError, api_key: str | None) -> TierError:
    """The API refused a key: the caller's (its own 401/403, to fix on its side) or ours
    (the service is misconfigured: 502). The API's message is not repeated: it may
    quote what it was sent."""
    if api_key is not None:
        return TierError("the model API refused the caller's API key", exc.status_code)
    return TierError(f"the model API refused the service's API key ({exc.status_code})", 502)


def _request_attributes(req: CompleteRequest) -> dict:
    """The OpenTelemetry GenAI semantic conventions' request attributes of a chat call."""
    attrs = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "anthropic",
             "gen_ai.request.model": req.model, "gen_ai.request.max_tokens": req.max_tokens}
    for name in ("temperature", "top_p", "top_k"):
        value = getattr(req, name)
        if value is not None:
            attrs[f"gen_ai.request.{name}"] = value
    if req.stop_sequences:
        attrs["gen_ai.request.stop_sequences"] = req.stop_sequences
    return attrs


def _response_attributes(message: dict, usage: Usage) -> dict:
    """Its response attributes: id, model, finish reason and token usage (the prompt
    cache's reads and writes included)."""
    attrs = {"gen_ai.usage.input_tokens": usage.input_tokens,
             "gen_ai.usage.output_tokens": usage.output_tokens,
             "gen_ai.usage.cache_read.input_tokens": usage.cache_read_input_tokens,
             "gen_ai.usage.cache_creation.input_tokens": usage.cache_creation_input_tokens}
    for key, name in (("id", "gen_ai.response.id"), ("model", "gen_ai.response.model")):
        if isinstance(message.get(key), str):
            attrs[name] = message[key]
    if message.get("stop_reason"):
        attrs["gen_ai.response.finish_reasons"] = [message["stop_reason"]]
    return attrs


def _message_json(response) -> dict:
    """The Message as the API sent it, every field kept (the SDK's model of it may not
    know them all); a body that is no Message is the upstream's failure."""
    try:
        message = msgspec.json.decode(response.content)
    except msgspec.DecodeError:
        message = None
    if not isinstance(message, dict) or message.get("type") != "message":
        raise TierError("the model API answered with something that is not a Message", 502)
    return message


def _params(req: CompleteRequest | CountTokensRequest) -> dict:
    """The SDK call for `req`: every field of the request as the caller sent it. A
    system prompt given as a plain string is sent as one block, marked for the
    prompt cache when long; one given as blocks is sent as it is."""
    params: dict = {"model": req.model, "max_tokens": getattr(req, "max_tokens", 0),
                    "messages": [{"role": m.role, "content": m.content} for m in req.messages]}
    if isinstance(req.system, list):
        params["system"] = req.system
    elif req.system:
        block = {"type": "text", "text": req.system}
        if len(req.system) >= CACHE_CONTROL_MIN_CHARS:
            block["cache_control"] = {"type": "ephemeral"}
        params["system"] = [block]
    for name in ("stop_sequences", "tools", "tool_choice", "thinking", "metadata"):
        value = getattr(req, name, None)
        if value is not None:
            params[name] = value
    # Current SDKs no longer take sampling parameters as arguments; the ones a
    # caller sets still reach the API (and always split the cache's partitions).
    # Fields this contract does not name (`extra`) go the same way.
    body = {n: getattr(req, n, None) for n in ("temperature", "top_p", "top_k")
            if getattr(req, n, None) is not None}
    body.update(req.extra or {})
    if body:
        params["extra_body"] = body
    headers = {}
    if req.betas:
        headers["anthropic-beta"] = ",".join(req.betas)
    if req.anthropic_version:
        headers["anthropic-version"] = req.anthropic_version
    if headers:
        params["extra_headers"] = headers
    return params
