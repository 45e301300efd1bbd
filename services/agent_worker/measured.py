"""tiermem's own client (`tiermem.AsyncClient`) as the worker measures it.

The worker is a user of the public client like any application, so what it
adds is only what a fleet's operator would: each call is timed as the caller
sees it and runs inside an OpenTelemetry span of the worker's own, which the
client carries on as the request's `traceparent`.

Sampling is the SDK's (`TraceIdRatioBased`): a `trace_share` of lookups
(`recent`, `search`, `context`) get a sampled span, so every tier records its
spans and one lookup can be followed across L1, L2 and L3 (the demo's trace
waterfall); the rest, and every append and LLM call, get an unsampled span.
An unsampled `traceparent` is what tells the services not to record: a
request without one starts a new, recorded trace in each tier. The worker's
spans are not exported (the call log has the worker's side of each call).

Errors come back as the client raises them (`shared.errors`, one exception
per code); a `Call` keeps the code and the message, so the call log counts
them without the worker stopping.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Awaitable

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, TraceIdRatioBased

from shared.errors import TierError


@dataclass
class Call:
    code: int  # 200, or the error's code (504 a timeout, 503 nobody answers)
    reply: Any  # the client's typed reply; None on an error
    error: str
    ms: float  # round trip as the caller saw it
    started: float  # unix time the request left
    trace_id: str
    sampled: bool

    @property
    def ok(self) -> bool:
        return self.code == 200


class Measured:
    """`await measured(client.recent(...), lookup=True)`: the call, timed, in a span of its own."""

    def __init__(self, trace_share: float = 0.0) -> None:
        self._lookups = TracerProvider(sampler=TraceIdRatioBased(trace_share)).get_tracer("agent-worker")
        self._others = TracerProvider(sampler=ALWAYS_OFF).get_tracer("agent-worker")

    async def __call__(self, pending: Awaitable[Any], *, name: str, lookup: bool = False) -> Call:
        """Run `pending` (an un-awaited client call) inside a CLIENT span named `name`."""
        tracer = self._lookups if lookup else self._others
        with tracer.start_as_current_span(name, kind=trace.SpanKind.CLIENT) as span:
            ctx = span.get_span_context()
            started = time.time()
            t0 = time.perf_counter()
            try:
                reply = await pending
            except TierError as exc:
                return Call(exc.code, None, exc.message, (time.perf_counter() - t0) * 1000, started,
                            format(ctx.trace_id, "032x"), ctx.trace_flags.sampled)
            return Call(200, reply, "", (time.perf_counter() - t0) * 1000, started,
                        format(ctx.trace_id, "032x"), ctx.trace_flags.sampled)
