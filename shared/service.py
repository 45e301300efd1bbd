"""One way to run a service: connect, register, serve, drain.

`run_service` connects to NATS, lets the service's `build` function create its
resources and endpoints on a `Runtime`, registers the endpoints with the NATS
service API (`$SRV.PING/INFO/STATS`), serves `/metrics`, `/livez` and `/readyz`
on the metrics port (`shared.health`; readiness asks NATS and whatever the
service registered with `Runtime.ready_check`), and on
SIGTERM/SIGINT stops taking requests, lets in-flight ones finish, stops
background tasks, runs close hooks in reverse order and drains the connection.

The endpoint wrapper is the only place that touches raw messages: decode and
validate with msgspec, bind the log context, continue the caller's trace (in a
CONSUMER span when this process keeps spans, see `telemetry`), call the pure
handler, encode the reply or map the error to the contract's headers and body.
nats-py runs a subscription's callbacks one after another, so each request runs
in its own task behind a semaphore: an endpoint that awaits Redis or Postgres
handles `concurrency` requests at once, and a full semaphore pushes back on the
subscription instead of queueing unbounded.

The wrapper and `Runtime.request` are on every request's path, and on this
2-core box each turn of the event loop and each microsecond shows in a cache
hit (a bare round trip is ~200 µs): what they do per request was measured and
kept to the minimum (bench/results/memory.md has the framework's floor).
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import NoRespondersError, TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.micro import add_service
from nats.micro.request import Request
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode

from shared import bus, metrics, otlp_metrics, pii, telemetry
from shared.contract import ErrorDetail, ErrorReply, encode
from shared.errors import BadRequest, TierError, Unavailable, UpstreamTimeout, from_code
from shared.health import Health, HealthServer
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
    handler: Callable[[Any], Awaitable[msgspec.Struct | msgspec.Raw]]
    decoder: msgspec.json.Decoder
    queue_group: str | None
    concurrency: int
    fast: Callable[[Any], msgspec.Struct | None] | None = None
    headers: bool = False  # the handler takes the request's NATS headers too


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
    replies: Replies | None = None  # set by run_service once connected
    readiness: Health = field(default_factory=Health)  # what /readyz asks
    bus_events: BusEvents = field(default_factory=lambda: BusEvents())  # run_service's
    _http: HealthServer | None = None

    def endpoint(self, name: str, subject: str, request_type: type[T],
                 handler: Callable[[T], Awaitable[msgspec.Struct | msgspec.Raw]], *,
                 queue_group: str | None = "q", concurrency: int | None = None,
                 fast: Callable[[T], msgspec.Struct | None] | None = None,
                 headers: bool = False) -> None:
        """Serve `subject` with `handler(request) -> reply` (queue_group None: every replica).

        `headers`: call `handler(request, headers)` with the request's NATS headers
        (a dict, empty when none came), for what must not travel in the body.

        The reply is a Struct, or `msgspec.Raw` for JSON passed on as it came
        (a tier forwarding another tier's reply need not decode it).

        `fast(request) -> reply | None` is a synchronous shortcut (a cache hit)
        tried inline, with no task and no span, for requests nobody traces; None
        or an exception falls back to `handler`.
        """
        self.endpoints.append(_Endpoint(
            name, subject, handler, msgspec.json.Decoder(request_type),
            queue_group, concurrency or self.settings.concurrency, fast, headers))

    def ready_check(self, name: str, check: Callable[[], Awaitable[object]]) -> None:
        """`/readyz` also asks `check()` (e.g. `redis.ping`), only when probed; NATS always."""
        self.readiness.add(name, check)

    def on_bus_event(self, listener: Callable[[str, Exception | None], None]) -> None:
        """`listener(event, error)` hears of "disconnected", "reconnected" and "error"
        (e.g. nats-py's SlowConsumerError): core NATS messages may have been lost."""
        self.bus_events.listeners.append(listener)

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
        """Request/reply carrying the trace; a remote error comes back as its TierError.

        `reply_type` may be `msgspec.Raw`: the reply's JSON, checked but not decoded.
        """
        with telemetry.tracer.start_as_current_span(
                f"send {subject}", kind=SpanKind.CLIENT,
                attributes={"messaging.system": "nats", "messaging.destination.name": subject}):
            try:
                msg = await self.request_msg(subject, encode(body), headers=telemetry.inject() or None,
                                             timeout=timeout)
            except NoRespondersError:
                raise Unavailable(f"no service is answering {subject}") from None
            except NatsTimeout:
                raise UpstreamTimeout(f"{subject} did not answer in time") from None
            return decode_reply(msg, decoder or _decoder_for(reply_type))

    async def request_msg(self, subject: str, payload: bytes, *, headers: dict[str, str] | None = None,
                          timeout: float | None = None) -> Msg:
        """A bare request through the runtime's reply inbox (`Replies`), for protocols of
        our own (the stream's acks); raises nats' NoRespondersError and TimeoutError."""
        assert self.replies is not None, "run_service sets up the reply inbox"
        return await self.replies.request(subject, payload, headers,
                                          timeout or self.settings.request_timeout_s)


class Replies:
    """Request/reply through one wildcard inbox; a reply resolves its request directly.

    nats-py's `request` does the same over its own inbox, but hands the reply on
    through `asyncio.wait_for` and done-callbacks: more event-loop turns, ~30 µs
    of a ~220 µs round trip here, and every L1 miss and L2 miss pays it.
    """

    def __init__(self, nc: NATS) -> None:
        self._nc = nc
        self._prefix = nc.new_inbox()
        self._next = 0
        self._waiting: dict[str, asyncio.Future] = {}

    async def start(self) -> Replies:
        await self._nc.subscribe(f"{self._prefix}.*", cb=self._on_reply)
        return self

    async def _on_reply(self, msg: Msg) -> None:
        fut = self._waiting.pop(msg.subject, None)
        if fut is not None and not fut.done():
            fut.set_result(msg)

    async def request(self, subject: str, payload: bytes, headers: dict[str, str] | None,
                      timeout: float) -> Msg:
        self._next += 1
        inbox = f"{self._prefix}.{self._next}"
        loop = asyncio.get_running_loop()
        fut = self._waiting[inbox] = loop.create_future()
        timer = loop.call_later(timeout, _expire, fut)
        try:
            await self._nc.publish(subject, payload, reply=inbox, headers=headers)
            msg = await fut
        finally:
            timer.cancel()
            self._waiting.pop(inbox, None)
        if msg.headers and msg.headers.get("Status") == NO_RESPONDERS:
            raise NoRespondersError
        return msg


NO_RESPONDERS = "503"  # the server's status when nobody subscribes to the subject


def _expire(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_exception(NatsTimeout())


_decoders: dict[type, msgspec.json.Decoder] = {}


def _decoder_for(reply_type: type) -> msgspec.json.Decoder:
    """Building a decoder costs more than using one: one per reply type."""
    decoder = _decoders.get(reply_type)
    if decoder is None:
        decoder = _decoders[reply_type] = msgspec.json.Decoder(reply_type)
    return decoder


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
    """The subscription callback for one endpoint (see the module docstring).

    Everything that does not change per request is prepared here: metric
    children, span name, the log context. The span is made only when it will be
    kept (`telemetry.traced`); otherwise the caller's trace context is passed
    through as is.
    """
    semaphore = asyncio.Semaphore(ep.concurrency)
    hist = metrics.latency.labels(rt.name, ep.name)
    gauge = metrics.in_flight.labels(rt.name, ep.name)
    outcomes = _Outcomes(rt.name, ep.name)
    answered = outcomes[200]
    fast = ep.fast
    span_name = f"{ep.subject} process"
    # Each request's task starts from a copy of this: the endpoint is in its log
    # lines without binding (and unbinding) it per request.
    log_context = contextvars.copy_context()
    log_context.run(structlog.contextvars.bind_contextvars, endpoint=ep.name)

    async def process(req: Request) -> None:
        started = time.perf_counter()
        headers = req.headers
        if telemetry.traced(headers):
            with telemetry.tracer.start_as_current_span(
                    span_name, context=telemetry.extract(headers), kind=SpanKind.CONSUMER,
                    attributes={"messaging.system": "nats",
                                "messaging.destination.name": req.subject,
                                "tiermem.service": rt.name}) as span:
                code = await answer(req, span)
        else:
            token = telemetry.continue_trace(headers)
            try:
                code = await answer(req, None)
            finally:
                telemetry.end_trace(token)
        outcomes[code].inc()
        hist.observe(time.perf_counter() - started)

    async def answer(req: Request, span: trace.Span | None) -> int:
        """Decode, handle, reply; returns the outcome code. Never raises."""
        try:
            try:
                body = ep.decoder.decode(req.data)
            except msgspec.ValidationError as exc:
                raise BadRequest(f"invalid request: {exc}") from None
            except (msgspec.DecodeError, UnicodeDecodeError) as exc:
                raise BadRequest(f"malformed JSON: {exc}") from None
            reply = await (ep.handler(body, req.headers or {}) if ep.headers else ep.handler(body))
            await req.respond(encode(reply))
            return 200
        except TierError as err:
            await _respond_error(req, err, span)
            return err.code
        except Exception:
            log.exception("handler_failed", subject=req.subject)
            await _respond_error(req, TierError("internal error", 500), span)
            return 500

    async def _respond_error(req: Request, err: TierError, span: trace.Span | None) -> None:
        if span is not None:
            span.set_status(StatusCode.ERROR, pii.scrub(err.message))
            span.set_attribute("tiermem.error_code", err.code)
        (log.warning if err.code < 500 else log.error)(
            "request_failed", subject=req.subject, code=err.code, reason=err.message)
        body, headers = error_reply(err)
        try:
            await req.respond(body, headers=headers)
        except Exception:  # the caller may have gone; nothing else to do
            log.warning("error_reply_failed", subject=req.subject)

    def done(task: asyncio.Task) -> None:
        rt._in_flight.discard(task)
        semaphore.release()
        gauge.dec()

    async def handle(req: Request) -> None:
        # A span and a task cost more than a cache hit's whole reply (a hit went
        # from 1.7x a bare round trip to ~1.1x), so hits for callers that are not
        # tracing the request are answered inline.
        if fast is not None and not telemetry.traced(req.headers):
            started = time.perf_counter()
            try:
                reply = fast(ep.decoder.decode(req.data))
            except Exception:
                reply = None  # bad input and surprises take the full path
            if reply is not None:
                await req.respond(encode(reply))
                answered.inc()
                hist.observe(time.perf_counter() - started)
                return
        await semaphore.acquire()  # back-pressure on the subscription when full
        gauge.inc()
        task = asyncio.create_task(process(req), context=log_context.copy())
        rt._in_flight.add(task)
        task.add_done_callback(done)

    return handle


class _Outcomes(dict):
    """`tiermem_requests` children of one endpoint by outcome code, made on first use."""

    def __init__(self, service: str, endpoint: str) -> None:
        super().__init__()
        self._labels = (service, endpoint)

    def __missing__(self, code: int):
        child = self[code] = metrics.requests.labels(*self._labels, str(code))
        return child


async def run_service(name: str, description: str,
                      build: Callable[[Runtime], Awaitable[None]], *,
                      settings: Settings | None = None,
                      stop: asyncio.Event | None = None,
                      ready: asyncio.Event | None = None) -> int:
    """Run one service until SIGTERM/SIGINT (or `stop`); returns the exit code."""
    settings = settings or Settings.from_env()
    telemetry.configure_logging(name, settings.log_level)
    pii.configure(settings.pii_hash_key, settings.pii_raw_ids)
    telemetry.configure_tracing(name, settings.trace_file, settings.trace_db_spans)
    meters = otlp_metrics.install(name)  # None unless an OTLP endpoint is set
    stop = stop or asyncio.Event()
    own_signals = ready is None  # in-process test runs leave signals alone
    if own_signals:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)

    events = BusEvents()
    nc = await bus.connect(settings.nats_url, bus.BusAuth.of(settings), role=name, name=name,
                           max_reconnect_attempts=-1, reconnect_time_wait=0.5, connect_timeout=5,
                           drain_timeout=STEP_TIMEOUT_S - 1,
                           error_cb=events.error, disconnected_cb=events.disconnected,
                           reconnected_cb=events.reconnected)
    rt = Runtime(name=name, settings=settings, nc=nc, js=nc.jetstream(),
                 replies=await Replies(nc).start(), bus_events=events)
    if meters is not None:  # the last export goes out on the way down
        rt.on_close(lambda: asyncio.to_thread(meters.shutdown))
    service = None
    try:
        rt.ready_check("nats", lambda: _nats_answers(nc))
        if settings.metrics_port:  # up during build: /livez answers, /readyz says "starting"
            rt._http = HealthServer(rt.readiness)
            await rt._http.start(settings.metrics_host, settings.metrics_port)
        await build(rt)
        service = await add_service(nc, name=name, version=VERSION, description=description,
                                    metadata={"instance": settings.l1_id,
                                              "pid": str(os.getpid())})
        # nats.micro puts an endpoint without a queue group into "q"; a group of its
        # own per process is what "every replica gets it" takes.
        solo = f"{name}-{service.id}"
        for ep in rt.endpoints:
            await service.add_endpoint(name=ep.name, subject=ep.subject,
                                       handler=_wrap(rt, ep), queue_group=ep.queue_group or solo)
        # The server has our subscriptions before we say we're up. Twice: nats-py
        # 2.16 writes a flush's PING straight to the socket, ahead of SUBs still
        # in its pending buffer; the second PING goes out after them.
        await nc.flush()
        await nc.flush()
        rt.readiness.phase = "up"
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


STEP_TIMEOUT_S = 5.0  # the longest any one shutdown step may take
SLOW_STEP_S = 1.0  # a step slower than this is logged, named


async def _shutdown(rt: Runtime, service) -> None:
    """Stop taking requests, finish what is in flight, close everything.

    Every step is bounded and a slow one is logged by name, so a stuck
    dependency shows itself instead of hanging the process. The NATS
    connection is closed even if the shutdown itself is cancelled (a
    supervisor's deadline): a half-stopped service still subscribed would
    go on taking a share of its queue groups' messages."""
    log.info("service_stopping", in_flight=len(rt._in_flight))
    rt.readiness.phase = "stopping"
    try:
        if service is not None:
            await _step("endpoints", service.stop())  # no new requests
        if rt._in_flight:
            await _step("in_flight", asyncio.wait(list(rt._in_flight)),
                        timeout=rt.settings.request_timeout_s)
        for task in rt._tasks:
            task.cancel()
        if rt._tasks:
            await _step("tasks", asyncio.wait(rt._tasks))
        for closer in reversed(rt._closers):
            await _step(f"close:{getattr(closer, '__qualname__', closer)}", closer())
        if not rt.nc.is_closed:
            await _step("nats_drain", rt.nc.drain())
    finally:
        if not rt.nc.is_closed:
            try:
                await rt.nc.close()
            except Exception:  # NATS already gone: nothing left to flush
                log.warning("nats_close_failed")
    if rt._http is not None:
        await rt._http.close()
    telemetry.shutdown_tracing()
    log.info("service_stopped")


async def _step(name: str, work: Awaitable, timeout: float | None = None) -> None:
    """One bounded shutdown step: a failure or timeout is logged and the shutdown goes on."""
    timeout = STEP_TIMEOUT_S if timeout is None else timeout
    started = time.perf_counter()
    try:
        await asyncio.wait_for(work, timeout)
    except TimeoutError:
        log.error("shutdown_step_timeout", step=name, timeout_s=timeout)
    except Exception:
        log.exception("shutdown_step_failed", step=name)
    else:
        took = time.perf_counter() - started
        if took > SLOW_STEP_S:
            log.warning("shutdown_step_slow", step=name, seconds=round(took, 3))


def main(name: str, description: str, build: Callable[[Runtime], Awaitable[None]]) -> None:
    """Entry point for a service's `__main__`: uvloop, run, exit with its code."""
    import uvloop

    raise SystemExit(uvloop.run(run_service(name, description, build)))


async def _nats_answers(nc: NATS) -> None:
    """Readiness: connected, and the server answers a PING."""
    if not nc.is_connected:
        raise ConnectionError("not connected to NATS")
    await nc.flush(timeout=1)


class BusEvents:
    """nats-py's connection callbacks: each event is logged and passed on to the
    service's listeners (`Runtime.on_bus_event`), since these callbacks are all
    that hears of messages lost across a reconnect or past a slow consumer's limit."""

    def __init__(self) -> None:
        self.listeners: list[Callable[[str, Exception | None], None]] = []

    def _tell(self, event: str, exc: Exception | None = None) -> None:
        for listener in self.listeners:
            try:
                listener(event, exc)
            except Exception:
                log.exception("bus_event_listener_failed", bus_event=event)

    async def error(self, exc: Exception) -> None:
        log.warning("nats_error", error=str(exc))
        self._tell("error", exc)

    async def disconnected(self) -> None:
        log.warning("nats_disconnected")
        self._tell("disconnected")

    async def reconnected(self) -> None:
        log.info("nats_reconnected")
        self._tell("reconnected")
