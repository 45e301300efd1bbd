"""The Prometheus metrics, pushed over OTLP as well (`pip install 'tiermem[otlp]'`).

Every metric is defined once, with prometheus_client (`shared.metrics`), and
served on `/metrics`. When `OTEL_EXPORTER_OTLP_METRICS_ENDPOINT` (or
`OTEL_EXPORTER_OTLP_ENDPOINT`, to which `/v1/metrics` is added) is set, this
bridge also hands the same registry to OpenTelemetry's SDK, which pushes it
every `OTEL_METRIC_EXPORT_INTERVAL` ms (default 15 s): one definition, two
exports, the same numbers.

Each family becomes observable instruments read at export time: a counter
a monotonic sum named as its Prometheus series (`..._total`), a gauge a
gauge, a histogram or summary its Prometheus series (`_bucket` with its
`le`, `_sum`, `_count`) as monotonic sums - OpenTelemetry has no observable
histogram, and these series are what a Prometheus backend stores anyway.
Labels become attributes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable

import structlog
from prometheus_client import REGISTRY, CollectorRegistry

log = structlog.get_logger()

SNAPSHOT_S = 1.0  # the instruments of one export share one walk of the registry


def endpoint_from_env(env=os.environ) -> str:
    if url := env.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"):
        return url
    if base := env.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return base.rstrip("/") + "/v1/metrics"
    return ""


_SERIES = {"counter": (("_total", "sum"),), "gauge": (("", "gauge"),),
           "histogram": (("_bucket", "sum"), ("_sum", "sum"), ("_count", "sum")),
           "summary": (("_sum", "sum"), ("_count", "sum"))}


def instruments(registry: CollectorRegistry) -> dict[str, str]:
    """Series name -> "sum" or "gauge": one instrument each, whether or not it has samples yet
    (a labelled metric has none until its first labels are used)."""
    return {family.name + suffix: kind for family in registry.collect()
            for suffix, kind in _SERIES.get(family.type, ())}


def series(registry: CollectorRegistry) -> dict[str, list[tuple[dict, float]]]:
    """Series name -> [(labels, value)] now."""
    out: dict[str, list] = {}
    for family in registry.collect():
        wanted = {family.name + suffix for suffix, _ in _SERIES.get(family.type, ())}
        for s in family.samples:
            if s.name in wanted:
                out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


def install(service: str, *, endpoint: str | None = None, registry: CollectorRegistry = REGISTRY,
            interval_ms: int | None = None):
    """Start pushing `registry` over OTLP; the MeterProvider (shut it down at exit), or None when
    no endpoint is set or the exporter is not installed."""
    endpoint = endpoint if endpoint is not None else endpoint_from_env()
    if not endpoint:
        return None
    try:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.metrics import CallbackOptions, Observation
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
        from opentelemetry.sdk.resources import Resource
    except ImportError:
        log.warning("otlp_exporter_missing", hint="pip install 'tiermem[otlp]'")
        return None
    interval = interval_ms or int(os.environ.get("OTEL_METRIC_EXPORT_INTERVAL", "15000"))
    reader = PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=endpoint), export_interval_millis=interval)
    provider = MeterProvider(resource=Resource.create({"service.name": service}), metric_readers=[reader])
    meter = provider.get_meter("tiermem")
    snapshot: dict = {"at": -SNAPSHOT_S, "series": {}}

    def current() -> dict:
        now = time.monotonic()
        if now - snapshot["at"] >= SNAPSHOT_S:
            snapshot.update(at=now, series=series(registry))
        return snapshot["series"]

    def observe(name: str):
        def callback(_options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(value, labels) for labels, value in current().get(name, [])]
        return callback

    for name, kind in instruments(registry).items():
        make = meter.create_observable_gauge if kind == "gauge" else meter.create_observable_counter
        make(name, callbacks=[observe(name)])
    log.info("otlp_metrics_export", endpoint=endpoint, interval_ms=interval)
    return provider
