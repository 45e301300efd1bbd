"""llm-gateway: the Anthropic Messages API over HTTP, answered through the llm-broker.

An app written against the `anthropic` SDK changes only its base URL
(`ANTHROPIC_BASE_URL`, or `base_url=`): `POST /v1/messages` becomes one
`llm.complete` request on NATS (`translate`), so the cache rules, the single
upstream path with its retries and breaker, and the cost accounting stay in
the broker. `POST /v1/messages/count_tokens` goes the same way as
`llm.count_tokens`. The gateway keeps no state: replicas scale behind any
HTTP load balancer.

`stream: true` is streamed through on a miss: the broker streams the model's
answer and publishes each event as the API sent it, which the gateway writes
out as it arrives, while the broker records the events and the message it adds
up to. A hit replays exactly the events its miss sent (or, for an entry made by
a call that did not stream, the API's event sequence built from its message,
`sse`). An error after the first event can no longer change the status: it
goes out as the API's `error` event.

Errors leave in the API's own shape and status (`translate.error_body`). The
caller's API key (`x-api-key`, or `authorization: Bearer`) is checked against
`GATEWAY_API_KEYS` when set, and never logged: no header is logged at all.
`GATEWAY_UPSTREAM_KEY` says whose key the model is called with: `gateway` (the
default: the broker's own ANTHROPIC_API_KEY; the caller's key stays here) or
`caller` (the caller's key goes to the broker in the `Tiermem-Upstream-Key`
NATS header of `llm.complete.keyed` / `llm.count_tokens`, subjects only this
service may publish; the broker calls upstream with it and keeps the answers
of each key apart, `policy.partition_key`).
"""

from __future__ import annotations

import asyncio
import secrets
import time

import msgspec
import structlog
from aiohttp import web
from nats.errors import MaxPayloadError, NoRespondersError, TimeoutError as NatsTimeout
from opentelemetry.trace import SpanKind, StatusCode

from shared import metrics, subjects, telemetry
from shared.contract import (
    STREAM_HEADER, UPSTREAM_KEY_HEADER, CompleteReply, CountTokensReply, encode,
)
from shared.errors import BadRequest, PayloadTooLarge, TierError, Unavailable, UpstreamTimeout
from shared.service import NO_RESPONDERS, Runtime, decode_reply

from . import admin, sse, translate

log = structlog.get_logger()
_complete_reply = msgspec.json.Decoder(CompleteReply)
_count_reply = msgspec.json.Decoder(CountTokensReply)


class AuthError(TierError):
    code = 401


class Gateway:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        s = rt.settings
        self.keys = frozenset(k.strip() for k in s.gateway_api_keys.split(",") if k.strip())
        self.forward_key = s.gateway_upstream_key == "caller"
        self.timeout = s.gateway_timeout_s
        self.url = ""  # once listening

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.rt.settings.gateway_max_body_bytes)
        app.router.add_post("/v1/messages", self.messages)
        app.router.add_post("/v1/messages/count_tokens", self.count_tokens)
        app.router.add_get("/health", self.health)
        admin.add_routes(app, self, _json)  # only with GATEWAY_ADMIN_TOKEN set
        return app

    async def health(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "service": "llm-gateway"})

    async def messages(self, request: web.Request) -> web.StreamResponse:
        """One trace per request: a SERVER span continuing the caller's `traceparent`
        (OpenTelemetry's HTTP and GenAI conventions), parent of the broker's spans."""
        headers = request.headers
        if not telemetry.traced(headers):
            token = telemetry.continue_trace(headers)
            try:
                return await self._messages(request, None)
            finally:
                telemetry.end_trace(token)
        with telemetry.tracer.start_as_current_span(
                "POST /v1/messages", context=telemetry.extract(headers), kind=SpanKind.SERVER,
                attributes={"http.request.method": "POST", "http.route": "/v1/messages",
                            "gen_ai.operation.name": "chat",
                            "gen_ai.provider.name": "anthropic"}) as span:
            return await self._messages(request, span)

    async def _messages(self, request: web.Request, span) -> web.StreamResponse:
        rid = _request_id()
        started = time.perf_counter()
        cache, status = "none", 500
        try:
            headers = self._checked_headers(request)
            asked = translate.complete_body(await _json(request), headers)
            keyed = self._upstream_key(headers)
            if span is not None and isinstance(asked.body.get("model"), str):
                span.set_attribute("gen_ai.request.model", asked.body["model"])
            if asked.stream:
                stream = Stream(request, rid)
                try:
                    cache = await self._stream(asked.body, stream, keyed)
                except TierError as err:
                    if not stream.started:
                        raise
                    status = translate.error_status(err)  # the 200 is sent: an `error` event
                    await stream.error(status, err.message)
                    return stream.response
                status = 200
                return stream.response
            subject = subjects.LLM_COMPLETE_KEYED if keyed else subjects.LLM_COMPLETE
            reply = await self._ask(subject, asked.body, _complete_reply, keyed)
            out = {**translate.cache_headers(reply), "request-id": rid}
            cache, status = out["tiermem-cache"], 200
            return web.Response(body=encode(translate.message_of(reply)),
                                content_type="application/json", headers=out)
        except TierError as err:
            status = translate.error_status(err)
            return _error(status, err.message, rid)
        except (ConnectionError, asyncio.CancelledError):
            raise  # the caller went away mid-stream: nothing to answer
        except Exception:
            log.exception("http_messages_failed", request_id=rid)
            return _error(500, "internal error", rid)
        finally:
            if span is not None:
                span.set_attributes({"http.response.status_code": status, "tiermem.cache": cache})
                if status >= 500:
                    span.set_status(StatusCode.ERROR)
            metrics.gateway_requests.labels("messages", str(status), cache).inc()
            # a log line costs a noticeable share of a hit: hits at debug, as the broker does
            (log.debug if cache == "hit" else log.info)(
                "http_messages", request_id=rid, status=status, cache=cache,
                ms=round((time.perf_counter() - started) * 1000, 2))

    async def count_tokens(self, request: web.Request) -> web.Response:
        rid = _request_id()
        status = 500
        try:
            headers = self._checked_headers(request)
            body = translate.count_body(await _json(request), headers)
            reply = await self._ask(subjects.LLM_COUNT_TOKENS, body, _count_reply,
                                    self._upstream_key(headers))
            status = 200
            return web.Response(body=encode(reply), content_type="application/json",
                                headers={"request-id": rid})
        except TierError as err:
            status = translate.error_status(err)
            return _error(status, err.message, rid)
        except Exception:
            log.exception("http_count_tokens_failed", request_id=rid)
            return _error(500, "internal error", rid)
        finally:
            metrics.gateway_requests.labels("count_tokens", str(status), "none").inc()

    def _checked_headers(self, request: web.Request) -> dict[str, str]:
        """The request's headers, lower-case, once the caller's key is accepted."""
        headers = {k.lower(): v for k, v in request.headers.items()}
        key = _caller_key(headers)
        if not key:
            raise AuthError("x-api-key header is required")
        if self.keys and not any(secrets.compare_digest(key, k) for k in self.keys):
            raise AuthError("invalid x-api-key")
        return headers

    def _upstream_key(self, headers: dict[str, str]) -> dict[str, str]:
        """The NATS header carrying the caller's key to the broker ({}: the broker's own key)."""
        return {UPSTREAM_KEY_HEADER: _caller_key(headers)} if self.forward_key else {}

    async def _stream(self, body: dict, stream: "Stream", keyed: dict[str, str]) -> str:
        """Answer `body` as a stream; returns what the cache did.

        The request's reply subject is also its `stream_to`: on a miss the broker
        publishes each event there as the model writes it, then replies, and one
        subscription gets them in that order. The first event opens the response
        (a miss: the cost is not known yet, so only `tiermem-cache: miss` is sent);
        a reply with no event before it (a hit) is sent whole: the events its miss
        recorded, or ones rebuilt from its message (`sse`)."""
        nc = self.rt.nc
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        try:
            try:
                await nc.publish(subjects.LLM_COMPLETE_KEYED if keyed else subjects.LLM_COMPLETE,
                                 encode({**body, "stream_to": inbox}), reply=inbox,
                                 headers={**telemetry.inject(), **keyed} or None)
            except MaxPayloadError:
                raise _too_large(nc) from None
            deadline = time.monotonic() + self.timeout
            while True:
                try:
                    msg = await sub.next_msg(timeout=max(deadline - time.monotonic(), 0.001))
                except NatsTimeout:
                    raise UpstreamTimeout(
                        f"the llm-broker did not answer within {self.timeout:g} s") from None
                headers = msg.headers or {}
                if kind := headers.get(STREAM_HEADER):
                    if not stream.started:
                        await stream.start({"tiermem-cache": "bypass" if kind == "bypass" else "miss"})
                    await stream.send(msg.data)
                    continue
                if headers.get("Status") == NO_RESPONDERS:
                    raise Unavailable(f"no llm-broker is answering {subjects.LLM_COMPLETE}")
                reply = decode_reply(msg, _complete_reply)
                break
        finally:
            await sub.unsubscribe()
        out = translate.cache_headers(reply)
        if not stream.started:
            await stream.start(out)
            for data in reply.events or [d for _, d in sse.events(translate.message_of(reply))]:
                await stream.send(encode(data))
        await stream.end()
        return out["tiermem-cache"]

    async def _ask(self, subject: str, body: dict, decoder: msgspec.json.Decoder,
                   keyed: dict[str, str] | None = None):
        """`keyed`: the header carrying the caller's key (`_upstream_key`), if it goes along."""
        try:
            msg = await self.rt.request_msg(subject, encode(body),
                                            headers={**telemetry.inject(), **(keyed or {})} or None,
                                            timeout=self.timeout)
        except NoRespondersError:
            raise Unavailable(f"no llm-broker is answering {subject}") from None
        except MaxPayloadError:
            raise _too_large(self.rt.nc) from None
        except NatsTimeout:
            raise UpstreamTimeout(f"the llm-broker did not answer within {self.timeout:g} s") from None
        return decode_reply(msg, decoder)


def _caller_key(headers: dict[str, str]) -> str:
    """The API key the caller presented: `x-api-key`, else an `authorization: Bearer` token."""
    return headers.get("x-api-key") or headers.get("authorization", "").removeprefix("Bearer ")


async def _json(request: web.Request):
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge("Request exceeds the maximum allowed number of bytes.") from None
    try:
        return msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise BadRequest(f"There was an error parsing the body of your request: {exc}") from None


class Stream:
    """One SSE response: opened with the headers known when the first event is ready."""

    def __init__(self, request: web.Request, rid: str) -> None:
        self.request, self.rid = request, rid
        self.response = web.StreamResponse(status=200)
        self.started = False

    async def start(self, headers: dict[str, str]) -> None:
        self.response.headers.update({**headers, "request-id": self.rid,
                                      "content-type": "text/event-stream; charset=utf-8",
                                      "cache-control": "no-cache"})
        await self.response.prepare(self.request)
        self.started = True

    async def send(self, data: bytes) -> None:
        """One event, `data` its JSON (its `type` names the event)."""
        await self.response.write(sse.frame(data))

    async def error(self, status: int, message: str) -> None:
        await self.send(encode(translate.error_body(status, message, self.rid)))
        await self.end()

    async def end(self) -> None:
        await self.response.write_eof()


def _error(status: int, message: str, rid: str) -> web.Response:
    return web.Response(status=status, body=encode(translate.error_body(status, message, rid)),
                        content_type="application/json", headers={"request-id": rid})


def _too_large(nc) -> PayloadTooLarge:
    return PayloadTooLarge(f"the request is larger than the bus takes ({nc.max_payload} bytes, "
                           f"the NATS server's max_payload)")


def _request_id() -> str:
    return f"req_tm_{secrets.token_hex(12)}"


async def build(rt: Runtime) -> Gateway:
    """Listen on GATEWAY_HOST:GATEWAY_PORT (0: a free port, logged); stop listening first
    on the way out, while NATS still answers the requests in flight."""
    gateway = Gateway(rt)
    runner = web.AppRunner(gateway.app(), access_log=None, handle_signals=False,
                           shutdown_timeout=rt.settings.request_timeout_s)
    await runner.setup()
    site = web.TCPSite(runner, rt.settings.gateway_host, rt.settings.gateway_port)
    await site.start()
    rt.on_close(runner.cleanup)
    host, port = runner.addresses[0][:2]
    gateway.url = f"http://{host}:{port}"
    log.info("gateway_listening", url=gateway.url)
    return gateway
