"""Prometheus metrics shared by every service, served over HTTP by `shared.health`.

Metrics are module-level (one registry per process); the `service` label
keeps several services apart when tests run them in one process.

Label values come from a fixed set. Prometheus keeps one series per distinct
label combination, so a label fed from request input (an LLM `task`, a
`bot_id`, a tier named in a served record) would let any client create series
without bound; such values pass through `bounded` first, which keeps the
known ones and turns the rest into `other`.
"""

from __future__ import annotations

from collections.abc import Collection

from prometheus_client import Counter, Gauge, Histogram

OTHER = "other"
TIERS = ("l1", "l2", "l3")  # memory tiers, as served records name them
MATCHES = ("exact", "semantic")  # how an LLM cache hit matched


def bounded(value: str, known: Collection[str]) -> str:
    """`value` if it is one of `known`, else `other`: a label's values stay a fixed set."""
    return value if value in known else OTHER


# Latency buckets from 50 µs to 5 s: tiers answer in well under a millisecond.
_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
            0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

requests = Counter("tiermem_requests", "Requests handled, by outcome code",
                   ["service", "endpoint", "code"])
latency = Histogram("tiermem_request_seconds", "Time to handle a request",
                    ["service", "endpoint"], buckets=_BUCKETS)
in_flight = Gauge("tiermem_requests_in_flight", "Requests being handled",
                  ["service", "endpoint"])
answers = Counter("tiermem_memory_answers", "memory reads answered, by tier and op",
                  ["tier", "op"])
passed_down = Counter("tiermem_memory_passed_down",
                      "memory reads a tier passed to the next, by reason",
                      ["tier", "reason"])
summaries = Counter("tiermem_summaries", "Rolling summaries the l3-semantic-indexer made or failed to make",
                    ["outcome"])
context_parts = Counter("tiermem_context_parts",
                        "Parts of memory.get op context answers, by part and outcome "
                        "(served, trimmed to the budget, missing)", ["part", "outcome"])
rejected = Counter("tiermem_rejected_messages",
                   "Internal bus messages refused as forged or unusable, by service and reason",
                   ["service", "reason"])

llm_requests = Counter("tiermem_llm_requests", "llm.complete requests by cache outcome",
                       ["model", "task", "bot", "status", "match"])
llm_tokens = Counter("tiermem_llm_tokens", "Upstream tokens paid for, by kind",
                     ["model", "task", "bot", "kind"])
llm_cost = Counter("tiermem_llm_cost_usd", "Upstream spend in USD", ["model", "task", "bot"])
llm_saved = Counter("tiermem_llm_saved_usd", "Spend avoided by cache hits in USD",
                    ["model", "task", "bot"])
llm_refused = Counter("tiermem_llm_semantic_refused",
                      "Semantic candidates the guard refused, by reason", ["task", "reason"])
llm_stale_refused = Counter("tiermem_llm_stale_refused",
                            "Hits of invalidating classes refused as possibly older than the "
                            "user's latest message, by reason", ["task", "reason"])
llm_not_cached = Counter("tiermem_llm_not_cached",
                         "Paid answers not cached: unfinished (max_tokens, tool_use) or the "
                         "store failed", ["task", "reason"])
llm_uncacheable = Counter("tiermem_llm_uncacheable",
                          "Requests passed upstream uncached because the cache cannot key them "
                          "safely (policy.uncacheable), by reason", ["task", "reason"])
llm_too_old = Counter("tiermem_llm_too_old",
                      "Fresh entries not served because the request's max_age_s refused them",
                      ["task"])
gateway_requests = Counter("tiermem_gateway_requests",
                           "HTTP requests of the llm-gateway, by route, status and cache outcome",
                           ["route", "status", "cache"])
llm_distrusts = Counter("tiermem_llm_distrusts",
                        "Times the broker found change events may have been lost, by cause",
                        ["cause"])
llm_false_hit_bound = Gauge("tiermem_llm_false_hit_bound",
                            "The broker's max_false_hit_rate: the share of a partition's semantic "
                            "hits that may be wrong (services/llm_broker/bound.py)")

audit_served = Counter("tiermem_audit_served", "Served records the auditor received",
                       ["kind", "tier"])
audit_checks = Counter("tiermem_audit_checks",
                       "Audits done, by verdict (memory: fresh|stale|inconclusive; llm: right|wrong)",
                       ["kind", "tier", "volatility", "task", "verdict"])
audit_evictions = Counter("tiermem_audit_evictions", "Evictions the auditor caused", ["target"])
audit_spend = Counter("tiermem_audit_spend_usd", "Upstream spend on re-asking audited LLM hits")
audit_skipped = Counter("tiermem_audit_skipped", "Audits not done, by reason", ["kind", "reason"])
audit_stale_rate = Gauge("tiermem_audit_stale_rate", "Stale share of audited memory reads",
                         ["tier"])
audit_false_hit_rate = Gauge("tiermem_audit_false_hit_rate",
                             "Wrong share of audited LLM cache hits", ["volatility", "task"])
dead_lettered = Counter("tiermem_log_dead_lettered",
                        "Log messages a consumer could not use, copied to the dead-letter stream",
                        ["consumer", "reason"])
served_dropped = Counter("tiermem_served_records_dropped",
                         "Served records shed because the publish queue was full", ["service"])
log_full = Counter("tiermem_log_full", "Appends refused (507) because the durable log is full")
log_bytes = Gauge("tiermem_log_bytes", "Bytes the MEMORY stream holds, as the l2-gateway last sampled")
log_max_bytes = Gauge("tiermem_log_max_bytes",
                      "The MEMORY stream's byte limit, LOG_MAX_BYTES (0: none of its own)")
retention_deleted = Counter("tiermem_retention_deleted",
                            "Stored messages deleted because retention dropped them from the log",
                            ["tier", "reason"])
