"""One way to run a service: connect, register, serve, drain.

`run_service` connects to NATS, lets the service's `build` function create its
resources and endpoints on a `Runtime`, registers the endpoints with the NATS
service API (`$SRV.PING/INFO/STATS`), serves Prometheus metrics, and on
SIGTERM/SIGINT stops taking requests, lets in-flight ones finish, stops
background tasks, runs close hooks in reverse order and drains the connection.

The endpoint wrapper is the only place that touches raw messages: decode and
validate with msgspec, bind the log context, continue the caller's trace in a
CONSUMER span, call the pure handler, encode the reply or map the error to the
contract's headers and body. nats-py runs a subscription's callbacks one after
another, so each request runs in its own task behind a semaphore: an endpoint
that awaits Redis or Postgres handles `concurrency` requests at once, and a
full semaphore pushes back on the subscription instead of queueing unbounded.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec
import nats
import structlog
from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError, TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.micro import add_service
from nats.micro.request import Request
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode

from shared import metrics, telemetry
from shared.contract import ErrorDetail, ErrorReply, encode
from shared.errors import BadRequest, TierError, Unavailable, UpstreamTimeout, from_code
from shared.settings import Settings

T = TypeVar("T")
ERROR_HEADER = "Nats-Service-Error"
ERROR_CODE_HEADER = "Nats-Service-Error-Code"
VERSION = "0.1.0"

log = structlog.get_logger()


@dataclass
class _Endpoint:
    name: str
    subject: str
    handler: Callable[[Any], Awaitable[msgspec.Struct]]
    decoder: msgspec.json.Decoder
    queue_group: str | None
    concurrency: int


@dataclass
class Runtime:
    """What a service's `build` function gets: connections, settings, hooks."""

    name: str
    settings: Settings
    nc: NATS
    js: JetStreamContext
    endpoints: list[_Endpoint] = field(default_factory=list)
    _closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    _tasks: list[asyncio.Task] = field(default_factory=list)
    _in_flight: set[asyncio.Task] = field(default_factory=set)
    failed: asyncio.Event = field(default_factory=asyncio.Event)

    def endpoint(self, name: str, subject: str, request_type: type[T],
                 handler: Callable[[T], Awaitable[msgspec.Struct]], *,
                 queue_group: str | None = "q", concurrency: int | None = None) -> None:
        """Serve `subject` with `handler(request) -> reply` (queue_group None: every replica)."""
        self.endpoints.append(_Endpoint(
            name, subject, handler, msgspec.json.Decoder(request_type),
            queue_group, concurrency or self.settings.concurrency))

    def on_close(self, closer: Callable[[], Awaitable[None]]) -> None:
        self._closers.append(closer)

    def spawn(self, coro: Awaitable[None], name: str) -> None:
        """Run a background loop for the service's life; if it dies, the service stops."""
        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(self._background_done)
        self._tasks.append(task)

    def _background_done(self, task: asyncio.Task) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        log.error("background_task_died", task=task.get_name(), exc_info=exc)
        self.failed.set()  # let the orchestrator restart us rather than limp on

    async def request(self, subject: str, body: msgspec.Struct, reply_type: type[T], *,
                      timeout: float | None = None, decoder: msgspec.json.Decoder | None = None) -> T:
        """Request/reply carrying the trace; a remote error comes back as its TierError."""
        with telemetry.tracer.start_as_current_span(
                f"send {subject}", kind=SpanKind.CLIENT,
                attributes={"messaging.system": "nats", "messaging.destination.name": subject}):
            try:
                msg = await self.nc.request(subject, encode(body), headers=telemetry.inject(),
                                            timeout=timeout or self.settings.request_timeout_s)
            except NoRespondersError:
                raise Unavailable(f"no service is answering {subject}") from None
            except NatsTimeout:
                raise UpstreamTimeout(f"{subject} did not answer in time") from None
            return decode_reply(msg, decoder or msgspec.json.Decoder(reply_type))


def decode_reply(msg, decoder: msgspec.json.Decoder):
    """The reply's body, or the remote error it carries raised as a TierError."""
    code = (msg.headers or {}).get(ERROR_CODE_HEADER)
    if code:
        raise from_code(int(code), (msg.headers or {}).get(ERROR_HEADER, "error"))
    return decoder.decode(msg.data)


def error_reply(err: TierError) -> tuple[bytes, dict[str, str]]:
    body = encode(ErrorReply(ErrorDetail(code=err.code, message=err.message)))
    return body, {ERROR_HEADER: err.message, ERROR_CODE_HEADER: str(err.code)}


def _wrap(rt: Runtime, ep: _Endpoint) -> Callable[[Request], Awaitable[None]]:
    semaphore = asyncio.Semaphore(ep.concurrency)
    counter = metrics.requests
    hist = metrics.latency.labels(rt.name, ep.name)
    gauge = metrics.in_flight.labels(rt.name, ep.name)

    async def process(req: Request) -> None:
        started = time.perf_counter()
        code = 200
        parent = telemetry.extract(req.headers)
        with telemetry.tracer.start_as_current_span(
                f"{ep.subject} process", context=parent, kind=SpanKind.CONSUMER,
                attributes={"messaging.system": "nats",
                            "messaging.destination.name": req.subject,
                            "tiermem.service": rt.name}) as span, \
                structlog.contextvars.bound_contextvars(endpoint=ep.name):
            try:
                try:
                    body = ep.decoder.decode(req.data)
                except msgspec.ValidationError as exc:
                    raise BadRequest(f"invalid request: {exc}") from None
                except (msgspec.DecodeError, UnicodeDecodeError) as exc:
                    raise BadRequest(f"malformed JSON: {exc}") from None
                reply = await ep.handler(body)
                await req.respond(encode(reply))
            except TierError as err:
                code = err.code
                await _respond_error(req, err, span)
            except Exception:
                code = 500
                log.exception("handler_failed", subject=req.subject)
                await _respond_error(req, TierError("internal error", 500), span)
            finally:
                counter.labels(rt.name, ep.name, str(code)).inc()
                hist.observe(time.perf_counter() - started)

    async def _respond_error(req: Request, err: TierError, span: trace.Span) -> None:
        span.set_status(StatusCode.ERROR, err.message)
        span.set_attribute("tiermem.error_code", err.code)
        (log.warning if err.code < 500 else log.error)(
            "request_failed", subject=req.subject, code=err.code, reason=err.message)
        body, headers = error_reply(err)
        try:
            await req.respond(body, headers=headers)
        except Exception:  # the caller may have gone; nothing else to do
            log.warning("error_reply_failed", subject=req.subject)

    async def handle(req: Request) -> None:
        await semaphore.acquire()  # back-pressure on the subscription when full
        gauge.inc()
        task = asyncio.create_task(process(req))
        rt._in_flight.add(task)

        def done(t: asyncio.Task) -> None:
            rt._in_flight.discard(t)
            semaphore.release()
            gauge.dec()

        task.add_done_callback(done)

    return handle


async def run_service(name: str, description: str,
                      build: Callable[[Runtime], Awaitable[None]], *,
                      settings: Settings | None = None,
                      stop: asyncio.Event | None = None,
                      ready: asyncio.Event | None = None) -> int:
    """Run one service until SIGTERM/SIGINT (or `stop`); returns the exit code."""
    settings = settings or Settings.from_env()
    telemetry.configure_logging(name, settings.log_level)
    telemetry.configure_tracing(name, settings.trace_file)
    stop = stop or asyncio.Event()
    own_signals = ready is None  # in-process test runs leave signals alone
    if own_signals:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)

    nc = await nats.connect(settings.nats_url, name=name, max_reconnect_attempts=-1,
                            reconnect_time_wait=0.5, connect_timeout=5,
                            error_cb=_nats_error, disconnected_cb=_nats_disconnected,
                            reconnected_cb=_nats_reconnected)
    rt = Runtime(name=name, settings=settings, nc=nc, js=nc.jetstream())
    service = None
    try:
        await build(rt)
        service = await add_service(nc, name=name, version=VERSION, description=description,
                                    metadata={"instance": settings.l1_id,
                                              "pid": str(os.getpid())})
        for ep in rt.endpoints:
            await service.add_endpoint(name=ep.name, subject=ep.subject,
                                       handler=_wrap(rt, ep), queue_group=ep.queue_group)
        await nc.flush()  # the server has our subscriptions before we say we're up
        metrics.serve(settings.metrics_port, settings.metrics_host)
        log.info("service_started", subjects=[e.subject for e in rt.endpoints],
                 metrics_port=settings.metrics_port, settings=repr(settings))
        if ready is not None:
            ready.set()
        waiters = [asyncio.create_task(stop.wait()), asyncio.create_task(rt.failed.wait())]
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for w in waiters:
            w.cancel()
        return 1 if rt.failed.is_set() else 0
    finally:
        await _shutdown(rt, service)


async def _shutdown(rt: Runtime, service) -> None:
    log.info("service_stopping", in_flight=len(rt._in_flight))
    if service is not None:
        await service.stop()  # no new requests
    if rt._in_flight:
        await asyncio.wait(list(rt._in_flight), timeout=rt.settings.request_timeout_s)
    for task in rt._tasks:
        task.cancel()
    await asyncio.gather(*rt._tasks, return_exceptions=True)
    for closer in reversed(rt._closers):
        try:
            await closer()
        except Exception:
            log.exception("close_hook_failed")
    try:
        await asyncio.wait_for(rt.nc.drain(), timeout=5)
    except Exception:
        await rt.nc.close()
    telemetry.shutdown_tracing()
    log.info("service_stopped")


def main(name: str, description: str, build: Callable[[Runtime], Awaitable[None]]) -> None:
    """Entry point for a service's `__main__`: uvloop, run, exit with its code."""
    import uvloop

    raise SystemExit(uvloop.run(run_service(name, description, build)))


async def _nats_error(exc: Exception) -> None:
    log.warning("nats_error", error=str(exc))


async def _nats_disconnected() -> None:
    log.warning("nats_disconnected")


async def _nats_reconnected() -> None:
    log.info("nats_reconnected")
