"""The simulator's HTTP edge: aiohttp.web's low-level server around `responder`.

Why aiohttp, and its low-level server: it is the project's one HTTP stack
(the metrics port and the HTTP gateway use it too), it gives keep-alive (the
SDK pools connections) and streaming for SSE, and `Simulator.handle` does its
own routing, so a router would only add a lookup. The body limit is ours (a
413 in the API's shape). Every response carries `x-simulator: tiermem` so
nobody mistakes it for the real API.

Routes:
    POST /v1/messages               the Messages API (JSON, or SSE with stream=true)
    POST /v1/messages/count_tokens  {"input_tokens": N}
    GET  /health                    {"status": "ok", "simulator": "tiermem"}
    GET  /stats, POST /stats/reset  counters: requests, by status/model/task, tokens
    GET  /faults, POST /faults      fault rules (see `Fault`); {"clear": true} drops them
    POST /reset                     counters, faults, prompt cache and RNGs, all at once

Settings (env `SIMULATOR_<NAME>`, CLI flags override): see `SimulatorSettings`.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
import random
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import msgspec
import structlog
from aiohttp import web

from services.llm_simulator import responder
from services.llm_simulator.responder import ApiError

log = structlog.get_logger()

Z95 = 1.6448536269514722  # standard normal quantile of 0.95
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
               500: "api_error", 529: "overloaded_error"}
DEFAULT_MESSAGES = {429: "This request would exceed the rate limit for your organization (simulated).",
                    500: "Internal server error", 529: "Overloaded"}


class SimulatorSettings(msgspec.Struct, frozen=True, kw_only=True):
    host: str = "127.0.0.1"
    port: int = 0  # 0: a free port, logged as `simulator_listening`
    seed: int = 0  # latency and random-share faults draw from RNGs seeded with this
    latency_median_s: float = 0.8  # lognormal request latency; median <= 0 disables it
    latency_p95_s: float = 1.5
    latency_per_token_s: float = 0.0  # added per output token
    cache_min_tokens: int = 1024  # shortest cacheable prefix (real: 1024-4096 by model)
    max_output_tokens: int = 128_000
    max_body_bytes: int = 32 * 1024 * 1024  # the real API's limit; larger gets 413
    faults: str = ""  # JSON: one fault rule or a list of them, active from the start
    api_keys: str = ""  # comma-separated keys it accepts (others: the API's 401); empty: any
    log_level: str = "info"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> "SimulatorSettings":
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        if env.get("LOG_LEVEL"):
            values["log_level"] = env["LOG_LEVEL"]
        for name in cls.__struct_fields__:
            raw = env.get(f"SIMULATOR_{name.upper()}")
            if raw is not None and raw != "":
                values[name] = raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return msgspec.convert(values, cls, strict=False)
        except msgspec.ValidationError as exc:
            raise SystemExit(f"bad setting: {exc}") from None


# --------------------------------------------------------------------------- faults


@dataclass
class Fault:
    """One rule: the next `count` requests (all, when None), each with chance `rate`,
    wait `delay_s` and then fail with `status` (or, without a status, answer normally;
    with `truncate_tokens`, cut short there with stop_reason "max_tokens", as a model
    that ran out of tokens). A test aid: the fault suite (`chaos`) drives these."""

    status: int | None = None
    count: int | None = None
    rate: float = 1.0
    delay_s: float = 0.0
    retry_after_s: float | None = None  # 429 default 1 s; fractions also go out as retry-after-ms
    message: str | None = None
    truncate_tokens: int | None = None

    @classmethod
    def parse(cls, raw: Any) -> "Fault":
        if not isinstance(raw, dict):
            raise ApiError("a fault must be a JSON object")
        unknown = set(raw) - {"status", "count", "rate", "delay_s", "retry_after_s", "message",
                             "truncate_tokens"}
        if unknown:
            raise ApiError(f"unknown fault fields: {sorted(unknown)}")
        try:
            fault = msgspec.convert(raw, cls, strict=False)
        except msgspec.ValidationError as exc:
            raise ApiError(f"bad fault: {exc}") from None
        if fault.status is None and fault.delay_s <= 0 and not fault.truncate_tokens:
            raise ApiError("a fault needs a status, a delay_s or truncate_tokens")
        if fault.truncate_tokens is not None and fault.truncate_tokens < 1:
            raise ApiError("fault truncate_tokens must be >= 1")
        if fault.status is not None and not 400 <= fault.status <= 599:
            raise ApiError("fault status must be 400..599")
        if not 0 < fault.rate <= 1 or (fault.count is not None and fault.count < 1) or fault.delay_s < 0:
            raise ApiError("fault rate must be in (0, 1], count >= 1, delay_s >= 0")
        return fault

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


def parse_faults(raw: Any) -> list[Fault]:
    return [Fault.parse(r) for r in (raw if isinstance(raw, list) else [raw])]


# --------------------------------------------------------------------------- the app


@dataclass
class Response:
    status: int
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    stream: AsyncIterator[bytes] | None = None  # SSE: chunks instead of `body`
    content_type: str = "application/json"


def _json(status: int, obj: Any, headers: list[tuple[str, str]] | None = None) -> Response:
    return Response(status, msgspec.json.encode(obj), headers or [])


def _request_id() -> str:
    return f"req_sim_{uuid.uuid4().hex[:24]}"


class Simulator:
    """State behind the routes: prompt cache, fault rules, counters, RNGs."""

    def __init__(self, settings: SimulatorSettings) -> None:
        self.settings = settings
        self.cache = responder.PromptCache(settings.cache_min_tokens)
        try:
            self.faults = parse_faults(msgspec.json.decode(settings.faults)) if settings.faults else []
        except (msgspec.DecodeError, ApiError) as exc:
            raise SystemExit(f"bad SIMULATOR_FAULTS / --faults: {exc}") from None
        self.keys = frozenset(k.strip() for k in settings.api_keys.split(",") if k.strip())
        self.in_flight = 0
        self.reseed()
        self.reset_stats()

    def reseed(self) -> None:
        self._latency_rng = random.Random(self.settings.seed)
        self._fault_rng = random.Random(self.settings.seed + 1)

    # ---------------------------------------------------------------- bookkeeping

    def reset_stats(self) -> None:
        self.started = time.time()
        self.requests = 0
        self.count_tokens_requests = 0
        self.by_status: Counter[str] = Counter()
        self.by_model: Counter[str] = Counter()
        self.by_task: Counter[str] = Counter()
        self.by_key: Counter[str] = Counter()  # requests by `key_fingerprint` of their API key
        self.tokens: Counter[str] = Counter(input=0, output=0, cache_creation_input=0, cache_read_input=0)
        self.faults_injected = 0

    def stats(self) -> dict:
        return {"simulator": "tiermem", "requests": self.requests,
                "by_status": dict(self.by_status), "by_model": dict(self.by_model),
                "by_task": dict(self.by_task), "by_key": dict(self.by_key),
                "tokens": dict(self.tokens),
                "faults_injected": self.faults_injected, "faults_active": len(self.faults),
                "in_flight": self.in_flight, "count_tokens_requests": self.count_tokens_requests,
                "prompt_cache_entries": len(self.cache), "since": self.started}

    def latency(self, output_tokens: int) -> float:
        s = self.settings
        base = 0.0
        if s.latency_median_s > 0:
            sigma = max(0.0, math.log(max(s.latency_p95_s, s.latency_median_s) / s.latency_median_s)) / Z95
            base = self._latency_rng.lognormvariate(math.log(s.latency_median_s), sigma)
        return base + s.latency_per_token_s * output_tokens

    def next_fault(self) -> Fault | None:
        for fault in self.faults:
            if fault.rate < 1 and self._fault_rng.random() >= fault.rate:
                continue
            if fault.count is not None:
                fault.count -= 1
                if fault.count == 0:
                    self.faults.remove(fault)
            return fault
        return None

    # ---------------------------------------------------------------- routing

    async def handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Response:
        path = path.split("?", 1)[0].rstrip("/") or "/"
        rid = _request_id()
        try:
            if path == "/v1/messages" and method == "POST":
                return await self._messages(headers, body, rid)
            if path == "/v1/messages/count_tokens" and method == "POST":
                return self._count_tokens(headers, body, rid)
            if path == "/health" and method == "GET":
                return _json(200, {"status": "ok", "simulator": "tiermem"})
            if path == "/stats" and method == "GET":
                return _json(200, self.stats())
            if path == "/stats/reset" and method == "POST":
                self.reset_stats()
                return _json(200, self.stats())
            if path == "/faults" and method == "GET":
                return _json(200, {"faults": [f.to_json() for f in self.faults]})
            if path == "/faults" and method == "POST":
                return self._set_faults(body)
            if path == "/reset" and method == "POST":
                self.reset_stats()
                self.faults.clear()
                self.cache.clear()
                self.reseed()
                return _json(200, self.stats())
            raise ApiError(f"{method} {path} not found", 404, "not_found_error")
        except ApiError as err:
            return _json(err.status, err.body(rid), [("request-id", rid)])
        except Exception:  # a simulator bug: answer like the API's own 500, keep serving
            log.exception("simulator_failed", method=method, path=path)
            err = ApiError("Internal server error", 500, "api_error")
            return _json(500, err.body(rid), [("request-id", rid)])

    def _set_faults(self, body: bytes) -> Response:
        raw = _decode(body)
        if isinstance(raw, dict) and raw.get("clear"):
            self.faults.clear()
            rest = {k: v for k, v in raw.items() if k != "clear"}
            raw = rest or None
        if raw is not None:
            added = parse_faults(raw)
            self.faults.extend(added)
            log.info("faults_added", faults=[f.to_json() for f in added])
        return _json(200, {"faults": [f.to_json() for f in self.faults]})

    def _count_tokens(self, headers: dict[str, str], body: bytes, rid: str) -> Response:
        self._check_key(headers)
        _check_headers(headers)
        self.count_tokens_requests += 1
        raw = _decode(body)
        if isinstance(raw, dict):
            raw = {**raw, "max_tokens": 1}  # count_tokens takes no max_tokens
        request = responder.parse_request(raw, max_output_tokens=self.settings.max_output_tokens)
        return _json(200, {"input_tokens": request.input_tokens}, [("request-id", rid)])

    async def _messages(self, headers: dict[str, str], body: bytes, rid: str) -> Response:
        self.requests += 1
        self.in_flight += 1
        model = "?"
        status = 500
        try:
            self._check_key(headers)
            _check_headers(headers)
            raw = _decode(body)
            if isinstance(raw, dict) and isinstance(raw.get("model"), str):
                model = raw["model"]
            fault = self.next_fault()
            if fault is not None:
                self.faults_injected += 1
                if fault.delay_s > 0:
                    await asyncio.sleep(fault.delay_s)
                if fault.status is not None:
                    status = fault.status
                    return self._fault_response(fault, rid)
            request = responder.parse_request(raw, max_output_tokens=self.settings.max_output_tokens)
            if fault is not None and fault.truncate_tokens:
                request.max_tokens = min(request.max_tokens, fault.truncate_tokens)
            reply = responder.respond(request, self.cache, time.monotonic())
            self.by_task[reply.task] += 1
            self.tokens.update(input=reply.usage.input_tokens, output=reply.output_tokens,
                               cache_creation_input=reply.usage.creation_tokens,
                               cache_read_input=reply.usage.read_tokens)
            delay = self.latency(reply.output_tokens)
            msg_id = f"msg_sim_{uuid.uuid4().hex[:24]}"
            message = reply.message(msg_id, request.model)
            extra = [("request-id", rid)]
            status = 200
            log.debug("messages", model=model, task=reply.task, latency_s=round(delay, 4),
                      input_tokens=reply.usage.input_tokens, output_tokens=reply.output_tokens,
                      cache_read=reply.usage.read_tokens, cache_creation=reply.usage.creation_tokens)
            if request.stream:
                return Response(200, headers=extra, stream=_sse(message, delay),
                                content_type="text/event-stream; charset=utf-8")
            await asyncio.sleep(delay)
            return _json(200, message, extra)
        except ApiError as err:
            status = err.status
            return _json(err.status, err.body(rid), [("request-id", rid)])
        finally:
            self.in_flight -= 1
            self.by_status[str(status)] += 1
            self.by_model[model] += 1

    def _check_key(self, headers: dict[str, str]) -> None:
        """Count the request under its key's fingerprint; refuse a key not in `api_keys`."""
        key = headers.get("x-api-key") or headers.get("authorization", "").removeprefix("Bearer ")
        if not key:
            raise ApiError("x-api-key header is required", 401, "authentication_error")
        self.by_key[key_fingerprint(key)] += 1
        if self.keys and key not in self.keys:
            raise ApiError("invalid x-api-key", 401, "authentication_error")

    def _fault_response(self, fault: Fault, rid: str) -> Response:
        status = fault.status or 500
        kind = ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
        message = fault.message or DEFAULT_MESSAGES.get(status, f"simulated {status}")
        headers = [("request-id", rid)]
        retry_after = fault.retry_after_s if fault.retry_after_s is not None else (1.0 if status == 429 else None)
        if retry_after is not None:
            headers.append(("retry-after", str(math.ceil(retry_after))))
            if retry_after != int(retry_after):
                headers.append(("retry-after-ms", str(round(retry_after * 1000))))
        log.info("fault_injected", status=status, delay_s=fault.delay_s)
        return _json(status, ApiError(message, status, kind).body(rid), headers)


def key_fingerprint(key: str) -> str:
    """What the simulator shows of an API key (`/stats` `by_key`): which key a test's
    request reached it with, without keeping the key."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def _check_headers(headers: dict[str, str]) -> None:
    if not headers.get("x-api-key") and not headers.get("authorization"):
        raise ApiError("x-api-key header is required", 401, "authentication_error")
    if not headers.get("anthropic-version"):
        raise ApiError("anthropic-version: header is required")


def _decode(body: bytes) -> Any:
    try:
        return msgspec.json.decode(body) if body else None
    except msgspec.DecodeError as exc:
        raise ApiError(f"There was an error parsing the body of your request: {exc}") from None


def _event(name: str, data: dict) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + msgspec.json.encode(data) + b"\n\n"


PIECE = 16  # characters per text or thinking delta


def _block_events(block: dict) -> tuple[dict, list[dict]]:
    """A content block's `content_block_start` block and its deltas, as the API streams
    them: text in `text_delta`s; a tool call's input as one `input_json_delta`; thinking
    in `thinking_delta`s, then its `signature_delta`; any other block (redacted
    thinking) whole in its start, with no delta."""
    kind = block["type"]
    if kind == "text":
        text = block["text"]
        return {**block, "text": ""}, [{"type": "text_delta", "text": text[i:i + PIECE]}
                                       for i in range(0, len(text), PIECE)]
    if kind == "tool_use":
        return {**block, "input": {}}, [{"type": "input_json_delta", "partial_json":
                                         msgspec.json.encode(block["input"]).decode()}]
    if kind == "thinking":
        text = block["thinking"]
        return {**block, "thinking": "", "signature": ""}, [
            *({"type": "thinking_delta", "thinking": text[i:i + PIECE]}
              for i in range(0, len(text), PIECE)),
            {"type": "signature_delta", "signature": block["signature"]}]
    return block, []


async def _sse(message: dict, delay: float) -> AsyncIterator[bytes]:
    """The Messages streaming events for a finished `message`; the latency spreads over
    its text and thinking deltas. A `ping` follows the first block's start, as the API's."""
    blocks = [_block_events(b) for b in message["content"]]
    paced = sum(1 for _, deltas in blocks for d in deltas
                if d["type"] in ("text_delta", "thinking_delta"))
    pause = delay / (paced + 1)
    start = {**message, "content": [], "stop_reason": None, "stop_sequence": None,
             "usage": {**message["usage"], "output_tokens": 1}}
    await asyncio.sleep(pause)
    yield _event("message_start", {"type": "message_start", "message": start})
    for index, (head, deltas) in enumerate(blocks):
        yield _event("content_block_start", {"type": "content_block_start", "index": index,
                                             "content_block": head})
        if index == 0:
            yield _event("ping", {"type": "ping"})
        for delta in deltas:
            if delta["type"] in ("text_delta", "thinking_delta"):
                await asyncio.sleep(pause)
            yield _event("content_block_delta", {"type": "content_block_delta", "index": index,
                                                 "delta": delta})
        yield _event("content_block_stop", {"type": "content_block_stop", "index": index})
    yield _event("message_delta", {"type": "message_delta",
                                   "delta": {"stop_reason": message["stop_reason"],
                                             "stop_sequence": message["stop_sequence"]},
                                   "usage": {"output_tokens": message["usage"]["output_tokens"]}})
    yield _event("message_stop", {"type": "message_stop"})


# --------------------------------------------------------------------------- HTTP


class HttpServer:
    """`Simulator.handle` over HTTP/1.1 with keep-alive (aiohttp.web's low-level server)."""

    def __init__(self, app: Simulator, max_body_bytes: int) -> None:
        self.app = app
        self.max_body = max_body_bytes
        self._runner: web.ServerRunner | None = None

    async def start(self, host: str, port: int) -> str:
        self._runner = web.ServerRunner(web.Server(self._serve, access_log=None), handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port, backlog=1024).start()
        bound_host, bound_port = self._runner.addresses[0][:2]
        return f"http://{bound_host}:{bound_port}"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _serve(self, request: web.BaseRequest) -> web.StreamResponse:
        body = await self._body(request)
        if body is None:  # the rest of it is still on the wire: answer, then close
            err = ApiError("Request exceeds the maximum allowed number of bytes.", 413, "request_too_large")
            out = await self._send(request, _json(413, err.body(_request_id())))
            out.force_close()
            return out
        headers = {k.lower(): v for k, v in request.headers.items()}
        return await self._send(request, await self.app.handle(request.method, request.path_qs, headers, body))

    async def _body(self, request: web.BaseRequest) -> bytes | None:
        """The request body, or None when it is larger than the limit (not read further)."""
        if request.content_length is not None and request.content_length > self.max_body:
            return None
        chunks, size = [], 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
            if size > self.max_body:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    async def _send(self, request: web.BaseRequest, response: Response) -> web.StreamResponse:
        headers = {"Content-Type": response.content_type, "x-simulator": "tiermem", **dict(response.headers)}
        if response.stream is None:
            return web.Response(status=response.status, body=response.body, headers=headers)
        headers["Cache-Control"] = "no-cache"
        out = web.StreamResponse(status=response.status, headers=headers)
        await out.prepare(request)
        async for chunk in response.stream:
            await out.write(chunk)
        await out.write_eof()
        return out


async def run(settings: SimulatorSettings, stop: asyncio.Event, ready: asyncio.Future | None = None) -> None:
    """Serve until `stop` is set; `ready` gets the bound URL."""
    server = HttpServer(Simulator(settings), settings.max_body_bytes)
    url = await server.start(settings.host, settings.port)
    log.info("simulator_listening", url=url, seed=settings.seed,
             latency_median_s=settings.latency_median_s, latency_p95_s=settings.latency_p95_s,
             cache_min_tokens=settings.cache_min_tokens, faults=settings.faults or None,
             note="local Anthropic-compatible simulator, not the real API")
    if ready is not None:
        ready.set_result(url)
    try:
        await stop.wait()
    finally:
        await server.close()
        log.info("simulator_stopped")
