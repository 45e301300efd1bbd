"""Redis and Postgres client spans from the maintained instrumentation packages, only
under kept spans (`shared.telemetry.instrument_databases` turns them on and off;
`TRACE_DB_SPANS`, off by default: even gated, a call pays ~10 µs of CPU).

The packages as shipped start a span for every call (a trace of its own where
none is open) and build its statement and attributes before asking for one,
even when the span is then dropped: 1.3-2.8x a Redis or Postgres call's client
CPU on unsampled traffic (bench/results/db_spans.md). Here they get a tracer
that makes spans only under a recording parent (`_UnderKeptSpans`), and a call
outside one skips their wrappers: asyncpg's instrumentor returns early, Redis's
asyncio wrappers get a gate in front (`_skip_unless_kept`).

What a database span may carry: the statement as the packages sanitize it
(Redis: the command with every argument `?`; Postgres: the SQL with `$n`
placeholders, parameters never captured) and, on an error, the exception's
type only, never its message (drivers quote values: tests/test_pii.py).
"""

from __future__ import annotations

import importlib

import wrapt
from opentelemetry import trace
from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
from opentelemetry.instrumentation.redis import RedisInstrumentor
from opentelemetry.instrumentation.utils import unwrap
from opentelemetry.trace import StatusCode

from shared.telemetry import _NO_SPAN, SpanErrors


def instrument(on: bool) -> None:
    """Redis and asyncpg client spans, process-wide, made only under kept spans.

    The instrumentors patch the client classes, so this is per process, not per
    service: the last call wins (tests running several services in one process
    share it).
    """
    for instrumentor in (_RedisUnderKeptSpans(), _AsyncPGUnderKeptSpans()):  # singletons
        if on and not instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.instrument(tracer_provider=_UNDER_KEPT_SPANS)
        elif not on and instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.uninstrument()


class _RedisUnderKeptSpans(RedisInstrumentor):
    """Redis's instrumentor, with a gate in front of its asyncio wrappers: they
    format the command (`EVALSHA ? ? ...`) and name the span before asking for
    one (bench/results/db_spans.md). A call outside a kept span goes to redis-py
    itself (`__wrapped__`: what the package's wrapper wraps)."""

    _instance = None  # a singleton of its own, not the base class's
    _GATED = (("redis.asyncio.client", "Redis", "execute_command"),
              ("redis.asyncio.client", "Pipeline", "execute"),
              ("redis.asyncio.client", "Pipeline", "immediate_execute_command"),
              ("redis.asyncio.cluster", "RedisCluster", "execute_command"),
              ("redis.asyncio.cluster", "ClusterPipeline", "execute"))

    def _instrument(self, **kwargs):
        super()._instrument(**kwargs)
        for module, owner, method in self._GATED:
            wrapt.wrap_function_wrapper(module, f"{owner}.{method}", _skip_unless_kept)

    def _uninstrument(self, **kwargs):
        for module, owner, method in self._GATED:
            unwrap(getattr(importlib.import_module(module), owner), method)  # the gate
        super()._uninstrument(**kwargs)


def _skip_unless_kept(wrapped, _instance, args, kwargs):
    if trace.get_current_span().is_recording():
        return wrapped(*args, **kwargs)
    return wrapped.__wrapped__(*args, **kwargs)


class _AsyncPGUnderKeptSpans(AsyncPGInstrumentor):
    """asyncpg's instrumentor, which builds a query's name and attributes (regex,
    ~7 dict entries) before it asks for a span: unsampled, nearly as much CPU
    again as the key lookup itself (bench/results/db_spans.md). Here a call
    outside a kept span goes straight to asyncpg."""

    _instance = None  # a singleton of its own, not the base class's

    async def _do_execute(self, func, instance, args, kwargs):
        if not trace.get_current_span().is_recording():
            return await func(*args, **kwargs)
        return await super()._do_execute(func, instance, args, kwargs)

    async def _do_cursor_execute(self, func, instance, args, kwargs):
        if not trace.get_current_span().is_recording():
            return await func(*args, **kwargs)
        return await super()._do_cursor_execute(func, instance, args, kwargs)

    async def _do_prepared_execute(self, func, instance, args, kwargs):
        if not trace.get_current_span().is_recording():
            return await func(*args, **kwargs)
        return await super()._do_prepared_execute(func, instance, args, kwargs)


class _UnderKeptSpansProvider(trace.TracerProvider):
    """What the instrumentors get as their tracer provider: the process's own
    tracers, gated by `_UnderKeptSpans`."""

    def get_tracer(self, name, version=None, schema_url=None, attributes=None):
        return _UnderKeptSpans(trace.get_tracer(name, version, None, schema_url, attributes))


class _UnderKeptSpans(trace.Tracer):
    """A tracer whose spans exist only as children of a span being recorded.

    A database call outside any kept span (an unsampled request, a request in
    a process without exporters, a background loop) gets the current
    non-recording span back, for a contextvar read; the instrumentors check
    `is_recording()` before setting attributes. Errors set the span's status
    to the exception's type, never its message (see the module docstring).
    """

    def __init__(self, real: trace.Tracer) -> None:
        self._real = real

    def start_span(self, name, context=None, *args, **kwargs) -> trace.Span:
        if not trace.get_current_span(context).is_recording():
            return trace.get_current_span(context)
        kwargs.update(record_exception=False, set_status_on_exception=False)
        return self._real.start_span(name, context, *args, **kwargs)

    def start_as_current_span(self, name, context=None, *args, **kwargs):
        if not trace.get_current_span(context).is_recording():
            return _NO_SPAN
        kwargs.update(record_exception=False, set_status_on_exception=False)
        return _TypeOnly(self._real.start_as_current_span(name, context, *args, **kwargs))


class _TypeOnly(SpanErrors):
    """An exception leaving a database span: status ERROR, `error.type`, no message."""

    __slots__ = ()

    def on_error(self, span: trace.Span, exc: Exception) -> None:
        span.set_attribute("error.type", type(exc).__qualname__)
        span.set_status(StatusCode.ERROR, type(exc).__qualname__)


_UNDER_KEPT_SPANS = _UnderKeptSpansProvider()
