"""The Prometheus registry pushed over OTLP (shared/otlp_metrics.py) to a real OTLP/HTTP receiver.

The receiver is a small aiohttp server decoding the exporter's protobuf
requests with OpenTelemetry's own proto classes; what arrives must equal
what /metrics would say for the same registry.
"""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from devstack.servers import free_port
from shared import otlp_metrics

pytest.importorskip("opentelemetry.exporter.otlp.proto.http")
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2  # noqa: E402


def points(requests: list[bytes]) -> dict[str, dict[tuple, float]]:
    """Metric name -> {sorted attribute items: value} from the last export that carried it."""
    out: dict[str, dict[tuple, float]] = {}
    for body in requests:
        req = metrics_service_pb2.ExportMetricsServiceRequest.FromString(body)
        for rm in req.resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    data = m.sum.data_points if m.HasField("sum") else m.gauge.data_points
                    out[m.name] = {tuple(sorted((a.key, a.value.string_value) for a in p.attributes)):
                                   (p.as_double if p.HasField("as_double") else p.as_int) for p in data}
    return out


async def test_counters_gauges_and_histograms_arrive_as_prometheus_says(monkeypatch):
    registry = CollectorRegistry()
    hits = Counter("t_hits", "hits", ["tier"], registry=registry)
    depth = Gauge("t_depth", "depth", registry=registry)
    lat = Histogram("t_latency_seconds", "latency", ["op"], buckets=(0.001, 0.01), registry=registry)
    Counter("t_unused", "a labelled counter never used", ["x"], registry=registry)
    hits.labels("l1").inc(3)
    hits.labels("l2").inc()
    depth.set(7)
    lat.labels("get").observe(0.005)

    received: list[bytes] = []

    async def collect(request: web.Request) -> web.Response:
        received.append(await request.read())
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/v1/metrics", collect)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
        provider = otlp_metrics.install("test-service", registry=registry, interval_ms=600_000)
        assert provider is not None
        hits.labels("l1").inc()  # read at export time, not at install
        await asyncio.to_thread(provider.force_flush)
        await asyncio.to_thread(provider.shutdown)
    finally:
        await runner.cleanup()
    got = points(received)
    assert got["t_hits_total"] == {(("tier", "l1"),): 4.0, (("tier", "l2"),): 1.0}
    assert got["t_depth"] == {(): 7.0}
    assert got["t_latency_seconds_count"] == {(("op", "get"),): 1.0}
    assert got["t_latency_seconds_bucket"][(("le", "0.001"), ("op", "get"))] == 0.0
    assert got["t_latency_seconds_bucket"][(("le", "0.01"), ("op", "get"))] == 1.0
    assert got["t_latency_seconds_sum"] == {(("op", "get"),): pytest.approx(0.005)}


def test_no_endpoint_no_export(monkeypatch):
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", raising=False)
    assert otlp_metrics.install("x", registry=CollectorRegistry()) is None
    assert otlp_metrics.endpoint_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/"}) == "http://c:4318/v1/metrics"
    assert otlp_metrics.endpoint_from_env({"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://m/x"}) == "http://m/x"
