"""What the llm-broker counted per task, from its Prometheus metrics (not from the workers' logs).

The workers log every call they make, but not the calls other services make
through the same broker: the l3-semantic-indexer's rolling summaries
(task `summary`). Their number and tokens come from the broker's own
counters (`tiermem_llm_requests_total`, `tiermem_llm_tokens_total`,
`tiermem_llm_cost_usd_total`, labelled by task; `shared/llm_config.toml`
names the tasks that get a label of their own), so the demo can reconcile
the broker's total with the workers' calls plus those, and price them.
"""

from __future__ import annotations

import urllib.request
from collections import defaultdict

from prometheus_client.parser import text_string_to_metric_families

TOKEN_KINDS = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
NONE = {"requests": 0, "by_status": {}, "tokens": {}, "cost_usd": 0.0}  # a task the broker never saw


def parse(text: str) -> dict[str, dict]:
    """{task: {"requests", "by_status": {status: n}, "tokens": {model: {kind: n}}, "cost_usd"}}."""
    tasks: dict[str, dict] = defaultdict(lambda: {"requests": 0, "by_status": defaultdict(int),
                                                  "tokens": defaultdict(lambda: dict.fromkeys(TOKEN_KINDS, 0)),
                                                  "cost_usd": 0.0})
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "tiermem_llm_requests_total":
                t = tasks[s.labels["task"]]
                t["requests"] += int(s.value)
                t["by_status"][s.labels["status"]] += int(s.value)
            elif s.name == "tiermem_llm_tokens_total":
                tasks[s.labels["task"]]["tokens"][s.labels["model"]][s.labels["kind"]] += int(s.value)
            elif s.name == "tiermem_llm_cost_usd_total":
                tasks[s.labels["task"]]["cost_usd"] += s.value
    return {k: {"requests": v["requests"], "by_status": dict(v["by_status"]),
                "tokens": {m: dict(kinds) for m, kinds in v["tokens"].items()}, "cost_usd": v["cost_usd"]}
            for k, v in tasks.items()}


def delta(after: dict[str, dict], before: dict[str, dict]) -> dict[str, dict]:
    """What was counted between two `parse` snapshots (a task absent before started at zero)."""
    out = {}
    for task, a in after.items():
        b = before.get(task, {})
        tokens = {m: {k: n - b.get("tokens", {}).get(m, {}).get(k, 0) for k, n in kinds.items()}
                  for m, kinds in a["tokens"].items()}
        out[task] = {"requests": a["requests"] - b.get("requests", 0),
                     "by_status": {s: n - b.get("by_status", {}).get(s, 0) for s, n in a["by_status"].items()},
                     "tokens": tokens, "cost_usd": a["cost_usd"] - b.get("cost_usd", 0.0)}
    return out


def scrape(url: str, timeout: float = 5.0) -> dict[str, dict] | None:
    """The broker's per-task counts now; None when its metrics endpoint does not answer."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - our own loopback URL
            return parse(r.read().decode())
    except OSError:
        return None


def l3_summaries(url: str, timeout: float = 5.0) -> dict[str, int] | None:
    """The l3-semantic-indexer's `tiermem_summaries_total` by outcome (made, failed)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - our own loopback URL
            text = r.read().decode()
    except OSError:
        return None
    return {s.labels["outcome"]: int(s.value) for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == "tiermem_summaries_total"}
