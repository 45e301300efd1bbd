"""The Grafana dashboard and the alert rules query only what the services really export.

The whole stack runs as processes (`python -m devstack up`, as in
production), gets a little of every kind of traffic (appends, reads answered by
L1, L2 and L3, a search, LLM misses and hits, an audit.stats), and then every
service's live `/metrics` is scraped. Each query of deploy/grafana/tiermem.json
and of deploy/alerts/*.rules.yaml must name metrics found in those scrapes
(prometheus_client's `_total`, `_bucket`, ... included), and the labels it
selects or groups by must exist on them (values too, where a healthy run must
have produced them: `tier="l1"`, `status="hit"`, ...).
"""

from __future__ import annotations

import asyncio
import json
import os
import re

import httpx
import pytest
import yaml
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

import shared.metrics  # noqa: F401 - declares every tiermem metric (labels of sample-less ones)
from shared import subjects
from shared.settings import load_stack_env
from tests.conftest import REPO, reset_servers, stack_processes
from tests.helpers import call, client, eventually, ok

pytestmark = pytest.mark.e2e
DASHBOARD = REPO / "deploy" / "grafana" / "tiermem.json"
RULES = sorted((REPO / "deploy" / "alerts").glob("*.rules.yaml"))

# Labels Prometheus adds to every series it scrapes (ServiceMonitor target labels).
TARGET_LABELS = {"namespace", "pod", "job", "instance", "container", "endpoint"}
# Labels whose values appear only when the event happens (an error, a stale read):
# a healthy run cannot show them, so only the label's existence is checked.
EVENT_LABELS = {"code", "reason", "verdict", "match", "target"}
# Metrics every healthy run feeds: their labels are checked against real samples.
MUST_HAVE_SAMPLES = {
    "tiermem_memory_answers_total", "tiermem_memory_passed_down_total", "tiermem_requests_total",
    "tiermem_request_seconds_bucket", "tiermem_requests_in_flight", "tiermem_llm_requests_total",
    "tiermem_llm_cost_usd_total", "tiermem_llm_saved_usd_total", "tiermem_llm_tokens_total",
    "tiermem_audit_checks_total", "tiermem_audit_stale_rate", "tiermem_audit_spend_usd_total",
}
METRIC = re.compile(r"\btiermem_[a-z0-9_]+\b")
SELECTOR = re.compile(r"\b(tiermem_[a-z0-9_]+)\s*\{([^}]*)\}")
MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"')
GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
            "gauge": ("",), "summary": ("_sum", "_count", "_created"), "untyped": ("",)}


@pytest.fixture(scope="module")
async def scraped(nats_url, redis_url, database_url, tmp_path_factory):
    """{sample or exposed name: [label dicts of its samples]} from every service's /metrics."""
    await reset_servers(nats_url, redis_url, database_url)
    state = tmp_path_factory.mktemp("dash-stack")
    env = {**os.environ, "NATS_URL": nats_url, "REDIS_URL": redis_url, "DATABASE_URL": database_url,
           "AUDIT_SAMPLE_RATE": "1.0",
           "AUDIT_LLM_BUDGET": "10"}  # audit every memory read, and re-ask LLM hits at once
    with stack_processes(env, state):
        urls = {k: v for k, v in load_stack_env(state).items() if k.endswith("_METRICS_URL")}
        assert len(urls) >= 4, urls
        async with client(nats_url) as nc:
            await _traffic(nc)
            deadline = asyncio.get_running_loop().time() + 20
            while True:  # audits and the broker's counters land shortly after the replies
                await call(nc, subjects.AUDIT_STATS, {})  # sets the stale-rate gauges
                exposed = await _scrape(urls.values())
                missing = {m for m in MUST_HAVE_SAMPLES if not exposed.get(m)}
                if not missing or asyncio.get_running_loop().time() > deadline:
                    break
                await asyncio.sleep(0.5)
        yield exposed


async def _traffic(nc) -> None:
    user = "dash-lead-1"
    seq = 0
    for i in range(30):
        reply = await ok(nc, subjects.MEMORY_APPEND, {
            "user_id": user, "bot_id": "sales-1", "role": "user" if i % 2 == 0 else "assistant",
            "text": f"Message {i}: asking about the three-bed house on Main St and its price.",
            "msg_id": f"{user}:{i}"})
        seq = reply["seq"]
    for body in ({"user_id": user, "op": "recent", "n": 5, "min_seq": seq},   # L1 fills
                 {"user_id": user, "op": "recent", "n": 5},                   # L1 hit
                 {"user_id": user, "op": "recent", "n": 25},                  # too many for L1: L2
                 {"user_id": user, "op": "recent", "n": 200, "min_seq": seq},  # too many for L2: L3
                 {"user_id": user, "op": "search", "query": "what did they ask about the price", "k": 3}):
        async def answered():  # L3 answers once the indexer caught up with min_seq
            code, reply = await call(nc, subjects.MEMORY_GET, body)
            assert code == 200, (body, reply)
            return True

        await eventually(answered, every=0.2)
    assert (await call(nc, subjects.MEMORY_GET, {"user_id": ""}))[0] == 400
    for text, mode in (("Is the Main St house still available?", "semantic"),
                       ("Is the Main St house still available?", "semantic"),
                       ("is the Main St house still available", "semantic"),
                       ("What is the market like in Springfield?", "exact")):
        await ok(nc, subjects.LLM_COMPLETE, {
            "task": "intent", "user_id": user, "model": "claude-haiku-4-5",
            "system": "Classify the lead's intent. Answer with one label.", "max_tokens": 50,
            "temperature": 0, "messages": [{"role": "user", "content": text}],
            "cache": {"volatility": "lead_intent", "mode": mode, "scope": "user"}})


async def _scrape(urls) -> dict[str, list[dict]]:
    exposed: dict[str, list[dict]] = {}
    async with httpx.AsyncClient(timeout=10) as http:
        for url in urls:
            text = (await http.get(url)).text
            for family in text_string_to_metric_families(text):
                if not family.name.startswith("tiermem_"):
                    continue
                for suffix in SUFFIXES[family.type]:
                    exposed.setdefault(family.name + suffix, [])
                for sample in family.samples:
                    exposed.setdefault(sample.name, []).append(dict(sample.labels))
    return exposed


def dashboard_queries() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    for var in dash["templating"]["list"]:
        query = var.get("query")
        if isinstance(query, dict):
            out.append((f"variable {var['name']}", query["query"]))
    return out


def rule_queries() -> list[tuple[str, str]]:
    return [(f"{path.name}: {rule['alert']}", rule["expr"])
            for path in RULES for group in yaml.safe_load(path.read_text())["groups"]
            for rule in group["rules"]]


def declared_labels(name: str) -> set[str]:
    """Label names of a metric as shared/metrics.py declares it, for the few that a
    healthy run leaves without samples (evictions, guard refusals): the scrape
    shows their names but cannot show their labels. (The registry maps every
    exposed name, suffixes included, to its metric.)"""
    return set(getattr(REGISTRY._names_to_collectors.get(name), "_labelnames", ()))


def problems(where: str, expr: str, exposed: dict[str, list[dict]]) -> list[str]:
    found = []
    names = set(METRIC.findall(expr))
    if not names:
        found.append(f"{where}: names no tiermem metric")
    for name in sorted(names - set(exposed)):
        found.append(f"{where}: {name} is not exported by any service")
    label_names = {k for n in names for s in exposed.get(n, []) for k in s} | TARGET_LABELS | {"le"}
    label_names |= {k for n in names if not exposed.get(n) for k in declared_labels(n)}
    for name, body in SELECTOR.findall(expr):
        samples = exposed.get(name, [])
        for label, op, value in MATCHER.findall(body):
            if label in TARGET_LABELS:
                continue
            if not (any(label in s for s in samples) if samples else label in declared_labels(name)):
                found.append(f"{where}: {name} has no label {label!r}")
            if op == "=" and samples and label not in EVENT_LABELS and "$" not in value \
                    and not any(s.get(label) == value for s in samples):
                found.append(f"{where}: {name}{{{label}={value!r}}} matches no series")
    for group in GROUPING.findall(expr):
        for label in filter(None, (part.strip() for part in group.split(","))):
            if label not in label_names:
                found.append(f"{where}: groups by {label!r}, which none of {sorted(names)} has")
    match = re.search(r"label_values\(\s*(tiermem_[a-z0-9_]+)\s*,\s*(\w+)\s*\)", expr)
    if match and match[2] not in TARGET_LABELS | label_names:
        found.append(f"{where}: {match[1]} has no label {match[2]!r}")
    return found


def test_the_run_fed_the_metrics_whose_labels_are_checked(scraped):
    assert {m for m in MUST_HAVE_SAMPLES if not scraped.get(m)} == set()
    tiers = {s["tier"] for s in scraped["tiermem_memory_answers_total"]}
    assert {"l1", "l2", "l3"} <= tiers  # the traffic reached every tier


def test_dashboard_queries_name_only_exported_metrics_and_labels(scraped):
    queries = dashboard_queries()
    assert len(queries) >= 30
    found = [p for where, expr in queries for p in problems(where, expr, scraped)]
    assert not found, "\n".join(found)


def test_dashboard_covers_tiers_latency_cost_and_freshness():
    named = {m for _, expr in dashboard_queries() for m in METRIC.findall(expr)}
    assert {"tiermem_memory_answers_total", "tiermem_request_seconds_bucket",
            "tiermem_llm_cost_usd_total", "tiermem_llm_saved_usd_total",
            "tiermem_audit_checks_total", "tiermem_audit_stale_rate",
            "tiermem_audit_false_hit_rate", "tiermem_llm_false_hit_bound"} <= named


def test_alert_rules_name_only_exported_metrics_and_labels(scraped):
    queries = rule_queries()
    assert len(queries) >= 10
    found = [p for where, expr in queries for p in problems(where, expr, scraped)]
    assert not found, "\n".join(found)


def test_the_checker_catches_a_misnamed_metric_and_label(scraped):
    assert problems("x", 'sum(rate(tiermem_request_total[5m]))', scraped)  # _requests_
    assert problems("x", 'sum by (teir) (rate(tiermem_memory_answers_total[5m]))', scraped)
    assert problems("x", 'rate(tiermem_llm_requests_total{status="hits"}[5m])', scraped)
    assert not problems("x", 'sum by (tier) (rate(tiermem_memory_answers_total{tier="l1"}[5m]))',
                        scraped)


def test_dashboard_panels_fit_the_grid_without_overlapping():
    dash = json.loads(DASHBOARD.read_text())
    taken: set[tuple[int, int]] = set()
    ids = set()
    for panel in dash["panels"]:
        g = panel["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, panel["title"]
        cells = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells
        assert panel["id"] not in ids
        ids.add(panel["id"])
        refs = [t["refId"] for t in panel.get("targets", [])]
        assert len(refs) == len(set(refs)), panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
