"""`python -m bench.db_spans [--rounds R] [--calls N]`: what the Redis and asyncpg client
instrumentation costs one call, by how the call is traced (`bench/results/db_spans.md`).

Why a bench of its own: a memory lookup's Redis or Postgres call is 100-400 µs,
so a few µs of wrapper are lost in the memory bench's noise on a shared box; here
one call is timed alone, the conditions interleaved in rounds so the box's
drifting load falls on all of them alike. Each p50 is compared with the same
call uninstrumented in the same run:

- `off`: not instrumented (the baseline);
- `no span`: instrumented, no span open (a process without exporters, a
  background loop): the gate (`shared.db_spans`) answers at once;
- `unsampled`: instrumented, under a caller's context with sampling off;
- `unsampled, ungated`: the same with the packages' own tracer (what they cost
  as shipped);
- `no span, ungated`: the packages as shipped with no span open, in a process
  that exports: each call starts a trace of its own;
- `kept`: under a kept span, the span made and handed to a processor that
  drops it (the cost of a database span in a sampled trace);
- `off again`: the baseline once more, last in each round: how far two
  measurements of the same thing drift apart here (the noise floor).

Starts its own Redis-compatible server and Postgres in a temp folder, unless
`REDIS_URL` / `DATABASE_URL` name running ones.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from pathlib import Path

import asyncpg
import uvloop
from opentelemetry import trace
from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
from opentelemetry.instrumentation.redis import RedisInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from redis.asyncio import Redis

from bench.stats import fmt_us, markdown_table, ratio, summarize
from devstack import servers
from shared import telemetry

CONDITIONS = ("off", "no span", "unsampled", "unsampled, ungated", "no span, ungated", "kept", "off again")
# a caller's context with the sampled flag off, as `traceparent` carries it
UNSAMPLED = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"}
# the l2-gateway's window read is one EVALSHA; this one does an LRANGE of 10 like it
SCRIPT = "return redis.call('LRANGE', KEYS[1], 0, 9)"


class _Drop(SpanExporter):
    def export(self, spans) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def _instrument(gated: bool | None) -> None:
    """None: off; True: through the gate; False: the packages' own tracers."""
    telemetry.instrument_databases(False)
    for instrumentor in (RedisInstrumentor(), AsyncPGInstrumentor()):
        if instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.uninstrument()
    if gated is None:
        return
    if gated:
        telemetry.instrument_databases(True)
    else:
        provider = trace.get_tracer_provider()
        RedisInstrumentor().instrument(tracer_provider=provider)
        AsyncPGInstrumentor().instrument(tracer_provider=provider)


@contextlib.contextmanager
def _condition(name: str):
    _instrument(None if name.startswith("off") else "ungated" not in name)
    if name.startswith("unsampled"):
        token = telemetry.continue_trace(UNSAMPLED)
        try:
            yield
        finally:
            telemetry.end_trace(token)
    elif name == "kept":
        with telemetry.tracer.start_as_current_span("kept"):
            yield
    else:
        yield


async def _time(call, n: int) -> tuple[list[float], float]:
    """Wall time of each call, and the process's CPU seconds for all of them (CPU is what
    the wrapper adds; it stays readable when the box's load stretches the wall times)."""
    out = []
    cpu0 = time.process_time()
    for _ in range(n):
        t0 = time.perf_counter()
        await call()
        out.append(time.perf_counter() - t0)
    return out, time.process_time() - cpu0


async def measure(redis_url: str, database_url: str, rounds: int, calls: int) -> dict:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(_Drop()))  # a process that exports
    trace.set_tracer_provider(provider)
    redis = Redis.from_url(redis_url)
    pg = await asyncpg.connect(database_url)
    try:
        await redis.delete("dbspans")
        await redis.rpush("dbspans", *[f"message {i}" for i in range(10)])
        sha = await redis.script_load(SCRIPT)
        await pg.execute("CREATE TEMP TABLE dbspans (id int PRIMARY KEY, body text)")
        await pg.execute("INSERT INTO dbspans SELECT g, 'row ' || g FROM generate_series(1, 1000) g")
        ops = {
            "redis EVALSHA (LRANGE 10)": lambda: redis.evalsha(sha, 1, "dbspans"),
            "postgres fetchrow by key": lambda: pg.fetchrow("SELECT body FROM dbspans WHERE id = $1", 7),
        }
        samples = {(op, c): [] for op in ops for c in CONDITIONS}
        cpu = dict.fromkeys(samples, 0.0)
        for _ in range(rounds):
            for name in CONDITIONS:
                with _condition(name):
                    for op, call in ops.items():
                        await _time(call, calls // 10)  # warm up this state
                        wall, seconds = await _time(call, calls)
                        samples[op, name] += wall
                        cpu[op, name] += seconds
        _instrument(None)
    finally:
        await redis.aclose()
        await pg.close()
    return {key: (summarize(values), cpu[key] / len(values) * 1e6) for key, values in samples.items()}


def table(results: dict) -> str:
    rows = []
    for (op, name), (s, cpu_us) in results.items():
        base, base_cpu = results[op, "off"]
        rows.append([op, name, fmt_us(s.p50), fmt_us(s.p95), f"{ratio(s.p50, base.p50):.3f}",
                     f"{cpu_us:.1f} µs", f"{cpu_us - base_cpu:+.1f} µs"])
    return markdown_table(["call", "traced as", "p50", "p95", "p50 / off", "CPU per call",
                           "CPU − off"], rows)


async def _main(args) -> None:
    with tempfile.TemporaryDirectory(prefix="dbspans-") as folder, contextlib.ExitStack() as started:
        urls = {}
        for name, var in (("redis", "REDIS_URL"), ("postgres", "DATABASE_URL")):
            if os.environ.get(var):
                urls[name] = os.environ[var]
                continue
            server = servers.server(name).start(Path(folder) / name, die_with_parent=True)
            started.callback(server.stop)
            urls[name] = server.url
        results = await measure(urls["redis"], urls["postgres"], args.rounds, args.calls)
    print(table(results))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.db_spans", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=10, help="interleaved rounds (default 10)")
    p.add_argument("--calls", type=int, default=500, help="timed calls per condition and round (default 500)")
    uvloop.run(_main(p.parse_args(argv)))


if __name__ == "__main__":
    main()
