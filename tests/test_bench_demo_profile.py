"""bench.demo_profile reads a demo run's call logs and spans as the demo writes them."""

from __future__ import annotations

import json

from bench.demo_profile import profile


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_profile_counts_tiers_finds_the_slow_reads_and_sums_spans_per_trace(tmp_path):
    calls = [{"kind": "get", "code": 200, "tier": "l1", "n": 10, "ms": 1.0} for _ in range(18)]
    calls += [{"kind": "search", "code": 200, "tier": "l3", "ms": 30.0, "trace": "t1"},
              {"kind": "get", "code": 200, "tier": "l2", "n": 50, "ms": 5.0},
              {"kind": "get", "code": 503, "tier": None, "n": 10, "ms": 99.0},  # not a lookup answered
              {"kind": "append", "code": 200, "ms": 3.0}]
    _write(tmp_path / "calls-0.jsonl", calls)
    t0 = 1_000_000_000
    spans = [
        {"trace_id": "t1", "span_id": "a", "parent_id": "w", "service": "memory-l1",
         "name": "memory.get.demo-w0 process", "start_ns": t0, "end_ns": t0 + 28_000_000},
        {"trace_id": "t1", "span_id": "b", "parent_id": "a", "service": "l3-semantic-indexer",
         "name": "wait for indexer", "start_ns": t0, "end_ns": t0 + 4_000_000},
        {"trace_id": "t1", "span_id": "c", "parent_id": "a", "service": "l3-semantic-indexer",
         "name": "wait for indexer", "start_ns": t0, "end_ns": t0 + 6_000_000},
        {"trace_id": "other", "span_id": "d", "parent_id": None, "service": "llm-broker",
         "name": "x", "start_ns": t0, "end_ns": t0 + 1},
    ]
    _write(tmp_path / "spans.jsonl", spans)
    r = profile(tmp_path)
    assert r["lookups"] == 20
    assert r["share"] == {"l1": 0.9, "l2": 0.05, "l3": 0.05}
    assert r["slowest_5pct"]["by"] == {"l3 search": 1}
    l3 = r["traced_spans_ms"]["l3"]
    assert l3["l3-semantic-indexer: wait for indexer"]["p50"] == 10.0  # two spans of one trace, summed
    assert l3["memory-l1: memory.get.<l1-id> process"]["p50"] == 28.0
    assert l3["(worker's time outside the first service's span)"]["p50"] == 2.0
    assert set(r["traced_spans_ms"]) == {"l3"}
