"""`just demo` end to end, as processes: the table is what the workers' logs say.

The short run starts its own stack (servers included), runs a few leads
through one simulated day, and every figure of the table is recomputed here
from the workers' call logs and the broker's price table, with code of its
own (numpy's nearest-rank percentiles, not demo/results.py). The failure
tests break a server and a service and check the demo says so, exits non-zero
and leaves no process behind.
"""

from __future__ import annotations

import base64
import json
import math
import os
import subprocess
import sys
import tomllib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from demo.run import write_scaled_config
from demo.settings import DemoSettings

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[1]
PRICES = tomllib.loads((REPO / "shared" / "llm_config.toml").read_text())["prices"]
LEADS, DAYS = 24, 1


def demo_env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DEMO_", "NATS_URL", "REDIS_URL", "DATABASE_URL", "ANTHROPIC_", "TRACE_FILE"))}
    return {**env, "DEMO_DIR": str(tmp / "demo"), "PYTHONUNBUFFERED": "1", **extra}


def processes_of(demo_dir: Path) -> list[str]:
    """Every live process whose environment names this demo's state folder."""
    marker = f"TIERMEM_STATE_DIR={demo_dir / 'stack'}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if marker in (proc / "environ").read_bytes().split(b"\0"):
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                found.append(f"{proc.name} {cmdline}")
        except OSError:
            continue
    return found


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """24 leads for a day; rolling summaries every 8 messages past the newest 6 (the stack's
    default is 40 past 20, which a short day barely reaches) so some are made during the run."""
    tmp = tmp_path_factory.mktemp("demo")
    out = subprocess.run([sys.executable, "-m", "demo", "--leads", str(LEADS), "--days", str(DAYS),
                          "--speed", "8000", "--mix",
                          "trace=0.5,search=0.2,history_read=0.1,quality=0.3"],
                         cwd=REPO, env=demo_env(tmp, SUMMARY_BLOCK="8", SUMMARY_KEEP="6"),
                         capture_output=True, text=True, timeout=240)
    run_dir = tmp / "demo" / "run"
    yield {"out": out, "run": run_dir, "dir": tmp / "demo"}


def _records(run_dir: Path) -> list[dict]:
    lines = []
    for path in sorted(run_dir.glob("calls-*.jsonl")):
        lines += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return lines


def _pct(values, p):
    return float(np.percentile(np.array(values), p, method="inverted_cdf")) if values else None


def test_short_demo_runs_and_stops_everything(short_run):
    out = short_run["out"]
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert processes_of(short_run["dir"]) == []
    results = json.loads((short_run["run"] / "results.json").read_text())
    assert results["table"] in out.stdout
    assert results["errors"] == 0, results["errors_by_code"]


def test_table_equals_counts_recomputed_from_the_workers_logs(short_run):
    results = json.loads((short_run["run"] / "results.json").read_text())
    records = _records(short_run["run"])
    starts = [r for r in records if r["kind"] == "start"]
    assert sum(s["events"] for s in starts) == results["interactions"] > 0
    lookups = [r for r in records if r["kind"] in ("get", "search") and r["code"] == 200]
    tiers = Counter(r["tier"] for r in lookups)
    assert results["lookups"]["count"] == len(lookups)
    assert set(tiers) <= {"l1", "l2", "l3"} and len(tiers) == 3, tiers  # every tier earned a share
    for tier in ("l1", "l2", "l3"):
        assert results["lookups"]["share"][tier] == pytest.approx(tiers[tier] / len(lookups))
        lat = [r["ms"] for r in lookups if r["tier"] == tier]
        for p in (50, 95, 99):
            assert results["lookups"]["latency"][tier][f"p{p}"] == pytest.approx(_pct(lat, p))
    for p in (50, 95, 99):
        assert results["lookups"]["latency"]["all"][f"p{p}"] == pytest.approx(_pct([r["ms"] for r in lookups], p))

    llm = [r for r in records if r["kind"] == "llm" and r["code"] == 200]
    hits = [r for r in llm if r["status"] == "hit"]
    assert (results["llm"]["calls"], results["llm"]["hits"]) == (len(llm), len(hits))
    assert results["llm"]["tokens_avoided"] == sum(
        r["input_tokens"] + r["output_tokens"] + r["cache_creation_input_tokens"] + r["cache_read_input_tokens"]
        for r in hits)
    # The stack's own count agrees: the broker saw the bots' calls, the quality check's (the
    # full-transcript reply and the judge, both uncached), and L3's rolling summaries, which no
    # worker logs: those are counted by the broker per task, and L3 says how many it stored.
    quality = [r for r in records if r["kind"] == "quality" and r["code"] == 200]
    judged = [r for r in quality if "judge" in r or "judge_error" in r]
    per_task = results["broker_tasks"]["total"]
    summaries = per_task.get("summary", {"requests": 0, "by_status": {}})
    summary_paid = sum(n for status, n in summaries["by_status"].items() if status != "hit")
    assert results["broker"]["requests"] == len(llm) + len(quality) + len(judged) + summaries["requests"]
    assert results["broker"]["upstream_calls"] == len(llm) - len(hits) + len(quality) + len(judged) + summary_paid
    for task, count in Counter(r["task"] for r in llm).items():
        assert per_task[task]["requests"] == count, task
    assert summaries["requests"] >= results["broker_tasks"]["l3_summaries"].get("made", 0) > 0
    # Prompts the size of the design's (~7.5k tokens an interaction on average).
    assert 5_000 < results["llm"]["tokens"] / results["interactions"] < 11_000
    # The printed table carries these numbers.
    assert f"{len(llm):,}: {len(hits):,} answered from cache" in results["table"]
    assert f"{tiers['l1']:,}" in results["table"]


def test_cost_recomputes_from_the_price_table_and_tokens(short_run):
    results = json.loads((short_run["run"] / "results.json").read_text())
    llm = [r for r in _records(short_run["run"]) if r["kind"] == "llm" and r["code"] == 200]

    def cost(r):
        price = PRICES.get(r["model"], PRICES["default"])
        return (r["input_tokens"] * price["input"] + r["output_tokens"] * price["output"]
                + r["cache_creation_input_tokens"] * price["cache_write"]
                + r["cache_read_input_tokens"] * price["cache_read"]) / 1e6

    without = sum(cost(r) for r in llm)
    with_cache = sum(cost(r) for r in llm if r["status"] != "hit")
    month = results["month"]
    assert month["without_usd"] == pytest.approx(without / DAYS * 30)
    assert month["with_usd"] == pytest.approx(with_cache / DAYS * 30)
    assert month["per_lead_with_usd"] == pytest.approx(with_cache / DAYS * 30 / LEADS)
    # What the broker billed each miss agrees with the price table (to its 8-decimal rounding).
    billed = sum(r["cost_usd"] for r in llm if r["status"] != "hit")
    assert billed == pytest.approx(with_cache, abs=1e-8 * len(llm))
    assert f"${month['with_usd']:,.2f}" in results["table"]


def test_the_baseline_recounts_from_the_logs_and_its_waterfall_from_the_price_table(short_run):
    """A fleet without tiermem, priced in the same run (services/agent_worker/baseline.py).

    Its tokens are recounted here from the character count of every block the
    log holds, with the simulator's tokenizer rule (a token per 4 characters of
    each text block), not with the code that counted them.
    """
    results = json.loads((short_run["run"] / "results.json").read_text())
    records = _records(short_run["run"])
    base = [r for r in records if r["kind"] == "baseline"]
    llm = [r for r in records if r["kind"] == "llm" and r["code"] == 200]
    assert base and not [r for r in base if "error" in r]
    for r in base:
        assert r["input_tokens"] == sum(math.ceil(chars / 4) for chars in r["blocks"]), r
    interactions = [r for r in records if r["kind"] == "interaction"]
    memory = [r for r in base if r["task"] == "memory_retrieval"]
    assert len(memory) == len(interactions)  # one memory-retrieval call an interaction
    assert len(base) - len(memory) == len(llm)  # and a twin of every call the bots made
    # The whole transcript is never smaller than the window our bots sent.
    twins = {(r["ix"], r["task"]): r for r in base if r["task"] != "memory_retrieval"}
    assert sum(r["input_tokens"] for r in twins.values()) >= sum(
        r["input_tokens"] + r["cache_creation_input_tokens"] + r["cache_read_input_tokens"] for r in llm) * 0.99

    def price(r, out):
        p = PRICES.get(r["model"], PRICES["default"])
        return (r["input_tokens"] * p["input"] + out * p["output"]) / 1e6

    sent = [r["output_tokens"] for r in memory if r["sent"]]
    mean_out = sum(sent) / len(sent) if sent else 200
    baseline = sum(price(r, mean_out if r["output_tokens"] is None else r["output_tokens"]) for r in base)
    cost = results["cost"]
    assert cost["baseline_per_month_usd"] == pytest.approx(baseline / DAYS * 30)
    # tiermem's figure: the bots' paid calls plus the rolling summaries made during the fleet's
    # run, at the tokens the broker counted for task `summary`, priced here
    run = results["broker_tasks"]["run"].get("summary", {"tokens": {}, "requests": 0})
    summary_usd = sum(price({"model": m, "input_tokens": k["input_tokens"]}, k["output_tokens"])
                      + (k["cache_creation_input_tokens"] * PRICES.get(m, PRICES["default"])["cache_write"]
                         + k["cache_read_input_tokens"] * PRICES.get(m, PRICES["default"])["cache_read"]) / 1e6
                      for m, k in run["tokens"].items())
    assert cost["summaries"]["requests"] == run["requests"] > 0 and summary_usd > 0
    assert cost["tiermem_per_month_usd"] == pytest.approx(results["month"]["with_usd"] + summary_usd / DAYS * 30)
    steps = [st["per_month_usd"] for st in cost["waterfall"]]
    assert steps[0] >= steps[1] >= steps[2] >= steps[3] > 0, steps  # each layer saves, none costs
    assert f"${cost['baseline_per_month_usd']:,.2f}" in results["table"]


def test_quality_is_the_share_of_logged_judgements_that_agree(short_run):
    """A sample of replies written from the assembled context, asked again with the whole
    transcript (uncached) and judged by the auditor's LLM judge: the figure is recounted here
    from the `quality` records, and printed."""
    results = json.loads((short_run["run"] / "results.json").read_text())
    records = _records(short_run["run"])
    checks = [r for r in records if r["kind"] == "quality"]
    judged = [r for r in checks if "agree" in r]
    assert judged, "the short run's quality share samples some replies"
    for r in judged:
        if r["reason"] != "same":  # the same text needs no judge, as in the auditor
            assert r["support"] in ([0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0])
            assert r["agree"] == (r["support"] == [1.0, 1.0])
        assert r["full"]["input_tokens"] + r["full"]["cache_read_input_tokens"] > 0  # a real call
    agree = sum(r["agree"] for r in judged)
    q = results["quality"]
    assert (q["agree"], q["judged"], q["sampled"]) == (agree, len(judged), len(checks))
    assert f"quality: {agree}/{len(judged)} agree ({100 * agree / len(judged):.1f} %)" in short_run["out"].stdout
    # Every text was written from a context read (memory.get op=context), and its prompt put
    # breakpoints on the system prompt (and the summary): the broker billed cache reads.
    contexts = [r for r in records if r["kind"] == "context"]
    replies = [r for r in records if r["kind"] == "llm" and r["task"] == "reply"]
    assert len(contexts) >= len(replies) > 0 and results["context"]["count"] == len(contexts)
    assert any(r["summary"] for r in contexts) and any(r["relevant"] for r in contexts)
    assert sum(r["cache_read_input_tokens"] for r in replies if r["status"] != "hit") > 0


def test_report_holds_its_plots(short_run):
    html = (short_run["run"] / "report.html").read_text()
    images = [part.split("'", 1)[0] for part in html.split("data:image/png;base64,")[1:]]
    assert len(images) >= 4, "latency, time, shares and a trace waterfall"
    for img in images:
        assert base64.b64decode(img)[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Trace of one slow lookup: " in html and "answered by" in html


def test_default_plan_is_the_design_fleet():
    """500 leads, 3 bots with roles, 4-6k interactions a simulated day (DESIGN.md's fleet)."""
    from services.agent_worker import scenario

    d = DemoSettings()
    plans = scenario.plan_fleet(d.leads, run="r", bots=d.bots, days=d.days, mix=scenario.Mix.parse(""),
                                seed=d.seed)
    events = [(p, e) for p in plans for e in p.events]
    assert 4_000 <= len(events) / d.days <= 6_000
    roles = Counter(e.role for _, e in events)
    assert set(roles) == set(scenario.ROLES) and roles["qualifier"] > roles["nurture"] > 0
    for p, e in events:
        assert e.bot == p.bots[e.role] and (e.kind == "inbound") == (e.why == "")
    # Most interactions are the bots' own, as in a production fleet.
    assert sum(e.kind == "review" for _, e in events) > 2 * sum(e.kind == "inbound" for _, e in events)


def test_prompts_are_what_the_simulator_reads_them_as():
    """Long, stable prompts; the simulator picks its task (score, intent, free text) from the system
    prompt's words. Which free-text answer it gives follows the question, not the system prompt."""
    import re

    from services.agent_worker import bot
    from services.llm_simulator.rules import detect_task

    assert detect_task(bot.SCORE_SYSTEM) == "lead_score"
    assert not re.search(r"\b(?:hot|warm|cold|json)\b", bot.SCORE_SYSTEM.lower())  # answers a number
    assert detect_task(bot.INTENT_SYSTEM) == "intent"
    assert detect_task(bot.MARKET_SYSTEM) == "free_text"
    for role, system in bot.REPLY_SYSTEMS.items():
        assert detect_task(system) == "free_text", role
        assert len(system) / 4 > 4_000  # role + playbook + listing sheet, marked for prompt caching
    assert len(bot.SCORE_SYSTEM) / 4 > 2_000 and len(bot.INTENT_SYSTEM) / 4 > 2_000


def test_scaled_config_divides_ttls_and_keeps_prices(tmp_path):
    scaled = tomllib.loads(write_scaled_config(REPO / "shared/llm_config.toml",
                                               tmp_path / "c.toml", 1440).read_text())
    original = tomllib.loads((REPO / "shared/llm_config.toml").read_text())
    for name, v in original["volatility"].items():
        assert scaled["volatility"][name]["ttl_s"] == pytest.approx(v["ttl_s"] / 1440)
        assert scaled["volatility"][name]["invalidate_on_user_message"] == v.get("invalidate_on_user_message", False)
    assert {k: v for k, v in scaled.items() if k != "volatility"} == \
        {k: v for k, v in original.items() if k != "volatility"}


BROKEN_POSTGRES = """
import dataclasses, sys
from devstack import servers
def broken(*a, **k):
    raise servers.ServerStartError("postgres exited with code 1 during start-up (injected by the test)")
servers.SERVERS = tuple(dataclasses.replace(s, start=broken) if s.name == "postgres" else s for s in servers.SERVERS)
from demo.run import main
sys.exit(main(["--leads", "3"]))
"""


@pytest.mark.parametrize("case", ["server", "service"])
def test_demo_fails_clearly_and_leaves_nothing_behind(tmp_path, case):
    if case == "server":  # NATS and Redis start, then Postgres cannot
        cmd, env = [sys.executable, "-c", BROKEN_POSTGRES], demo_env(tmp_path)
    else:  # every server starts; the services exit on a bad setting
        cmd, env = [sys.executable, "-m", "demo", "--leads", "3"], demo_env(tmp_path, L2_WINDOW="lots")
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "demo failed: the stack did not come up" in out.stderr
    assert ("postgres" if case == "server" else "bad setting") in out.stderr
    assert processes_of(tmp_path / "demo") == []
    state = tmp_path / "demo" / "stack" / "stack.json"
    assert not state.exists() or json.loads(state.read_text())["processes"] == []
