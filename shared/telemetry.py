"""Logs and traces: structlog JSON lines carrying trace ids, OpenTelemetry spans.

One trace follows each lookup across the tiers: `inject` puts the current
span's context into the `traceparent`/`tracestate` headers of an outgoing NATS
message and `extract` continues it on the other side.

Exporters, by setting: `OTEL_EXPORTER_OTLP_ENDPOINT` (needs the `otlp` extra)
for a collector; `TRACE_FILE` for JSON lines of finished spans (the demo draws
its waterfall from them). Tests install their own in-memory exporter.

Spans are made only when something keeps them: an SDK span costs ~25 µs here
even with nowhere to go, several times a cache hit's own work. So `tracer`
skips spans while the tracer provider has no span processor (`recording()`),
and the endpoint wrapper then passes the caller's trace context through
unchanged (`continue_trace`): logs still carry the caller's trace id, and a
downstream tier that does export parents its spans to the caller's.

Redis and Postgres client spans (`EVALSHA`, `SELECT`, ...) come from the
maintained instrumentation packages, installed by `configure_tracing` when
`TRACE_DB_SPANS` is on (off by default) and the process exports spans; they
exist only under a span this process keeps (`shared.db_spans` says why and
what they cost).

No user id or text reaches a log line or a span raw (`shared.pii`): every log
event passes `pii.redact` before it is rendered, spans get refs where their
attributes are set, and exceptions a span records are scrubbed of per-user
subjects. Database spans carry sanitized statements and, on an error, its
type only (`shared.db_spans`).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import traceback
from typing import Mapping

import msgspec
import structlog
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.trace import StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from shared import pii

_propagator = TraceContextTextMapPropagator()


def recording() -> bool:
    """Does this process keep spans: has its tracer provider a span processor?

    Asked per span, because tests add processors after start-up. Looks at an
    SDK attribute; if that ever moves, the answer is "yes" (slower, still right).
    """
    provider = trace.get_tracer_provider()
    processors = getattr(getattr(provider, "_active_span_processor", None), "_span_processors", None)
    return processors is None or bool(processors)


class _NoSpan:
    """What `tracer.start_as_current_span` gives when no span would be kept."""

    def __enter__(self) -> trace.Span:
        return trace.get_current_span()

    def __exit__(self, *exc_info) -> bool:
        return False


_NO_SPAN = _NoSpan()


class _Tracer:
    """The OpenTelemetry tracer, minus spans nobody keeps (see `recording`)."""

    def __init__(self, real: trace.Tracer) -> None:
        self._real = real

    def start_as_current_span(self, name: str, **kwargs):
        if not recording():
            return _NO_SPAN
        return _Scrubbed(self._real.start_as_current_span(
            name, record_exception=False, set_status_on_exception=False, **kwargs))

    def __getattr__(self, attr: str):
        return getattr(self._real, attr)


tracer = _Tracer(trace.get_tracer("tiermem"))


class SpanErrors:
    """A span's context manager (`real`, started with the SDK's own exception recording
    off) that records an exception leaving it as `on_error` says. A class, not a
    generator: ~0.2 µs a span instead of ~4."""

    __slots__ = ("_real", "_span")

    def __init__(self, real) -> None:
        self._real = real

    def __enter__(self) -> trace.Span:
        self._span = self._real.__enter__()
        return self._span

    def __exit__(self, exc_type, exc, tb):
        if isinstance(exc, Exception):
            self.on_error(self._span, exc)
        return self._real.__exit__(exc_type, exc, tb)

    def on_error(self, span: trace.Span, exc: Exception) -> None:
        raise NotImplementedError


class _Scrubbed(SpanErrors):
    """What the SDK does with an exception leaving a span (an event, an error status),
    with per-user subjects in its message replaced by refs (`pii.scrub`)."""

    __slots__ = ()

    def on_error(self, span: trace.Span, exc: Exception) -> None:
        message = pii.scrub(str(exc))
        span.record_exception(exc, {
            "exception.message": message,
            "exception.stacktrace": pii.scrub("".join(traceback.format_exception(exc)))})
        span.set_status(StatusCode.ERROR, f"{type(exc).__name__}: {message}")


def configure_logging(service: str, level: str = "info") -> None:
    """JSON logs, one line per event, with service, trace and span ids; user ids
    as refs and no texts (`pii.redact` sees the finished event, exceptions rendered)."""
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _add_trace_ids,
            structlog.processors.format_exc_info,
            pii.redact,
            structlog.processors.JSONRenderer(serializer=_json_dumps),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level.upper(), logging.INFO)),
        logger_factory=structlog.BytesLoggerFactory(_Stdout()),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(service=service)


class _Stdout:
    """`sys.stdout`'s bytes as they are when a line is written, not when a logger
    was first used (loggers are cached then): a test that captures stdout gets
    every line, whatever ran before it. Costs well under 0.1 µs a line."""

    def write(self, data: bytes) -> int:
        return sys.stdout.buffer.write(data)

    def flush(self) -> None:
        sys.stdout.buffer.flush()


def _json_dumps(obj, **_kw) -> bytes:
    return msgspec.json.encode(obj, enc_hook=str)


def _add_trace_ids(_logger, _name, event: dict) -> dict:
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        event["trace_id"] = format(ctx.trace_id, "032x")
        event["span_id"] = format(ctx.span_id, "016x")
    return event


def configure_tracing(service: str, trace_file: str = "", db_spans: bool = False) -> TracerProvider:
    """Install the process's tracer provider (once) with the configured exporters, and
    the Redis/Postgres client instrumentation when `db_spans` (`TRACE_DB_SPANS`) and
    the process keeps spans at all: without an exporter no database span could ever
    be kept, so the clients stay unwrapped and pay nothing."""
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        provider = current  # already set up (tests, or several services in one process)
    else:
        provider = TracerProvider(resource=Resource.create({"service.name": service}))
        if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
            try:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            except ImportError:
                structlog.get_logger().warning(
                    "otlp_exporter_missing", hint="pip install 'tiermem[otlp]'")
            else:
                provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        if trace_file:
            provider.add_span_processor(BatchSpanProcessor(JsonLinesExporter(trace_file)))
        trace.set_tracer_provider(provider)
    instrument_databases(db_spans and recording())
    return provider


def instrument_databases(on: bool) -> None:
    """Redis and asyncpg client spans on or off, process-wide (`shared.db_spans`;
    imported only when wanted: the instrumentation packages take a while to load,
    which a process without them, such as an app using the client, need not pay)."""
    if on or "shared.db_spans" in sys.modules:
        from shared import db_spans

        db_spans.instrument(on)


def shutdown_tracing() -> None:
    provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        provider.force_flush(timeout_millis=2000)


class JsonLinesExporter(SpanExporter):
    """Appends finished spans as JSON lines; several processes may share the file."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._lock = threading.Lock()

    def export(self, spans: "list[ReadableSpan]") -> SpanExportResult:
        lines = [msgspec.json.encode(span_record(s)) + b"\n" for s in spans]
        with self._lock, open(self._path, "ab") as out:
            out.write(b"".join(lines))  # one write: lines of concurrent writers don't interleave
        return SpanExportResult.SUCCESS


def span_record(span: ReadableSpan) -> dict:
    ctx = span.get_span_context()
    return {
        "trace_id": format(ctx.trace_id, "032x"),
        "span_id": format(ctx.span_id, "016x"),
        "parent_id": format(span.parent.span_id, "016x") if span.parent else None,
        "name": span.name,
        "kind": span.kind.name,
        "service": span.resource.attributes.get("service.name"),
        "start_ns": span.start_time,
        "end_ns": span.end_time,
        "attributes": dict(span.attributes or {}),
        "status": span.status.status_code.name,
    }


def inject(headers: dict[str, str] | None = None) -> dict[str, str]:
    """Headers carrying the current trace context to the next hop (empty if none:
    pass `inject() or None` to nats-py, which sends an empty dict as a header block)."""
    headers = {} if headers is None else headers
    _propagator.inject(headers)
    return headers


def traced(headers: Mapping[str, str] | None) -> bool:
    """Will this request's span be kept? Only if this process records spans and
    the caller did not turn sampling off in its `traceparent` (no header: a new
    trace). Untraced requests skip the span (and cache hits the task too)."""
    if not recording():
        return False
    parent = headers.get("traceparent") if headers else None
    if not parent:
        return True
    try:
        return bool(int(parent[-2:], 16) & 1)  # the trace-flags' sampled bit
    except ValueError:
        return True  # malformed: let the propagator decide


def continue_trace(headers: Mapping[str, str] | None) -> object | None:
    """Make the caller's trace context current without a span of our own.

    For requests that are not traced here: outgoing requests then carry the
    caller's context on, and log lines its trace id. Returns the token for
    `end_trace` (None when the caller sent no context: nothing to undo).
    """
    if not headers or "traceparent" not in headers:
        return None
    return otel_context.attach(_propagator.extract(headers))


def end_trace(token: object | None) -> None:
    if token is not None:
        otel_context.detach(token)


def extract(headers: Mapping[str, str] | None) -> otel_context.Context:
    return _propagator.extract(headers or {})
