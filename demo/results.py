"""The results table, computed from the workers' call logs and the price table.

Nothing the workers did is taken from a service's own counters: the share of
each tier is what the `tier` field of each `memory.get` reply said, latency
is what the worker measured, and every dollar is recomputed from the tokens
each reply reported and the broker's price table (`cost_usd` of the replies
is kept only as a cross-check). The one exception is what no worker sees:
the l3-semantic-indexer's rolling-summary calls, whose tokens come from the
broker's per-task counters (demo/broker_tasks.py) and are priced with the
same table into tiermem's cost. Cost per month = the fleet's cost per
simulated day x 30.

The quality check (bot.check_quality) is reported on its own: how many of
the sampled replies written from the assembled context the auditor's judge
found to agree with the same reply written from the whole transcript. Its
calls are not part of the fleet's cost.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from pathlib import Path

import msgspec

TIERS = ("l1", "l2", "l3")
TOKEN_KINDS = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
PRICE_FIELDS = {"input_tokens": "input", "output_tokens": "output",
                "cache_creation_input_tokens": "cache_write", "cache_read_input_tokens": "cache_read"}


def read_logs(paths: list[Path]) -> list[dict]:
    records = []
    for path in paths:
        with open(path, "rb") as f:
            records.extend(msgspec.json.decode(line) for line in f if line.strip())
    return records


def percentile(values: list[float], p: float) -> float | None:
    """Nearest rank: the smallest value with at least p % of the values at or below it."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def cost_usd(record: dict, prices: dict) -> float:
    price = prices.get(record["model"]) or prices["default"]
    return sum(record.get(kind, 0) * price[PRICE_FIELDS[kind]] for kind in TOKEN_KINDS) / 1_000_000


def tokens(record: dict) -> int:
    return sum(record.get(kind, 0) for kind in TOKEN_KINDS)


def full_price_usd(record: dict, prices: dict, output_tokens: float) -> float:
    """Every input token at the plain input price (no provider prompt caching), plus the output."""
    price = prices.get(record["model"]) or prices["default"]
    inputs = sum(record.get(kind, 0) for kind in ("input_tokens", "cache_creation_input_tokens",
                                                  "cache_read_input_tokens"))
    return (inputs * price["input"] + output_tokens * price["output"]) / 1_000_000


WATERFALL = ("without tiermem", "with tiered context", "+ provider prompt caching", "+ response cache")


def summary_records(summaries: dict | None) -> list[dict]:
    """The rolling summaries' paid tokens (the broker's count, `broker_tasks.parse` of task
    `summary`) as one priceable record per model."""
    return [{"model": model, **kinds} for model, kinds in ((summaries or {}).get("tokens") or {}).items()]


def waterfall(records: list[dict], llm: list[dict], prices: dict, summaries: dict | None = None) -> dict | None:
    """The cost of one run, step by step from the fleet without tiermem (services/agent_worker/
    baseline.py) to tiermem's: our prompts at full price, then with the provider's prompt
    cache as billed, then without the calls the response cache answered. The rolling
    summaries' calls (`summaries`, counted by the broker) are part of each tiermem step, at
    the tokens the broker paid for. None: no baseline."""
    base = [r for r in records if r.get("kind") == "baseline" and "error" not in r]
    if not base:
        return None
    sent = [r["output_tokens"] for r in base if r["task"] == "memory_retrieval" and r.get("sent")]
    mean_out = sum(sent) / len(sent) if sent else float(MEMORY_OUTPUT_FALLBACK)
    baseline_usd = sum(full_price_usd(r, prices, mean_out if r["output_tokens"] is None else r["output_tokens"])
                       for r in base)
    summary = summary_records(summaries)
    summary_full = sum(full_price_usd(r, prices, r["output_tokens"]) for r in summary)
    summary_billed = sum(cost_usd(r, prices) for r in summary)
    steps = [baseline_usd,
             sum(full_price_usd(r, prices, r.get("output_tokens", 0)) for r in llm) + summary_full,
             sum(cost_usd(r, prices) for r in llm) + summary_billed,
             sum(cost_usd(r, prices) for r in llm if r["status"] != "hit") + summary_billed]
    memory = [r for r in base if r["task"] == "memory_retrieval"]
    return {
        "steps": dict(zip(WATERFALL, steps)),
        "baseline_calls": len(base),
        "baseline_unpriced": sum(1 for r in records if r.get("kind") == "baseline" and "error" in r),
        "memory_retrieval": {"calls": len(memory), "sent": len(sent),
                             "mean_output_tokens": mean_out if sent else None},
        "baseline_input_tokens": sum(r["input_tokens"] for r in base),
        "summaries": None if summaries is None else {
            "requests": summaries["requests"], "by_status": summaries["by_status"],
            "cost_usd": summary_billed, "broker_cost_usd": summaries["cost_usd"]},
    }


# Output tokens a memory-retrieval call is assumed to write when no sample was sent (a tiny run).
MEMORY_OUTPUT_FALLBACK = 200


def _latency(values: list[float]) -> dict:
    return {"count": len(values), "p50": percentile(values, 50), "p95": percentile(values, 95),
            "p99": percentile(values, 99)}


def context_reads(records: list[dict]) -> dict:
    """memory.get op "context" (the reads the bots write their texts from): latency as the
    worker saw it, and how often each part came with it."""
    ok = [r for r in records if r.get("kind") == "context" and r["code"] == 200]
    n = len(ok)
    return {"count": n, "latency": _latency([r["ms"] for r in ok]),
            "with_summary": sum(bool(r["summary"]) for r in ok) / n if n else 0.0,
            "with_relevant": sum(r["relevant"] > 0 for r in ok) / n if n else 0.0,
            "mean_tokens": sum(r["tokens"] for r in ok) / n if n else None,
            "by_tier": dict(Counter(r["tier"] for r in ok))}


def quality(records: list[dict], prices: dict) -> dict:
    """Agreement of replies written from the assembled context with the same replies written
    from the whole transcript, as the auditor's LLM judge saw it (`quality` records)."""
    checks = [r for r in records if r.get("kind") == "quality"]
    judged = [r for r in checks if "agree" in r]
    agree = sum(r["agree"] for r in judged)
    spent = 0.0
    for r in checks:
        for part in ("full", "judge"):
            if part in r:
                spent += cost_usd({"model": r["model"], **r[part]}, prices)
    return {"sampled": len(checks), "judged": len(judged), "agree": agree,
            "rate": agree / len(judged) if judged else None,
            "unjudged": len(checks) - len(judged),
            "reasons": dict(Counter(r["reason"] for r in judged)),
            "cost_usd": spent}


def summarize(records: list[dict], *, prices: dict, days: int, leads: int, summaries: dict | None = None) -> dict:
    calls = [r for r in records if r.get("kind") in ("append", "get", "search", "context", "llm", "quality")]
    lookups = [r for r in calls if r["kind"] in ("get", "search") and r["code"] == 200]
    by_tier: dict[str, list[float]] = defaultdict(list)
    for r in lookups:
        by_tier[r["tier"]].append(r["ms"])
    shares = {t: len(by_tier[t]) / len(lookups) if lookups else 0.0 for t in TIERS}

    llm = [r for r in calls if r["kind"] == "llm" and r["code"] == 200]
    hits = [r for r in llm if r["status"] == "hit"]
    paid = [r for r in llm if r["status"] != "hit"]
    without = sum(cost_usd(r, prices) for r in llm)
    with_cache = sum(cost_usd(r, prices) for r in paid)
    interactions = [r for r in records if r.get("kind") == "interaction"]
    by_task: dict[str, Counter] = defaultdict(Counter)
    for r in llm:
        by_task[r["task"]][r["status"]] += 1
    return {
        "calls": len(calls),
        "errors": sum(r["code"] != 200 for r in calls),
        "errors_by_code": dict(Counter(str(r["code"]) for r in calls if r["code"] != 200)),
        "interactions": len(interactions),
        "interactions_per_day": len(interactions) / days,
        "lateness_ms": _latency([r["late_ms"] for r in interactions]),
        "lookups": {"count": len(lookups), "share": shares,
                    "by_op": dict(Counter(r["kind"] for r in lookups)),
                    "latency": {**{t: _latency(by_tier[t]) for t in TIERS},
                                "all": _latency([r["ms"] for r in lookups])}},
        "appends": _latency([r["ms"] for r in calls if r["kind"] == "append" and r["code"] == 200]),
        "llm": {
            "calls": len(llm),
            "hits": len(hits),
            "hits_exact": sum(r["match"] == "exact" for r in hits),
            "hits_semantic": sum(r["match"] == "semantic" for r in hits),
            "misses": len(paid),
            "hit_rate": len(hits) / len(llm) if llm else 0.0,
            "by_task": {t: dict(c) for t, c in sorted(by_task.items())},
            "tokens": sum(tokens(r) for r in llm),
            "tokens_avoided": sum(tokens(r) for r in hits),
            "hit_latency": _latency([r["ms"] for r in hits]),
            "cost_without_usd": without,
            "cost_with_usd": with_cache,
            "reported_cost_usd": sum(r["cost_usd"] for r in paid),
            "reported_saved_usd": sum(r["saved_usd"] for r in hits),
        },
        "month": {
            "days": days,
            "without_usd": without / days * 30,
            "with_usd": with_cache / days * 30,
            "per_lead_without_usd": without / days * 30 / leads,
            "per_lead_with_usd": with_cache / days * 30 / leads,
        },
        "context": context_reads(records),
        "quality": quality(records, prices),
        "cost": _cost(waterfall(records, llm, prices, summaries), days, leads),
    }


def _cost(w: dict | None, days: int, leads: int) -> dict | None:
    """The waterfall per month (x 30 / days) and per lead, with each step's share of the baseline."""
    if w is None:
        return None
    month = {k: v / days * 30 for k, v in w["steps"].items()}
    base = month[WATERFALL[0]]
    return {
        "baseline_per_month_usd": base,
        "tiermem_per_month_usd": month[WATERFALL[-1]],
        "waterfall": [{"step": k, "per_month_usd": v, "per_lead_usd": v / leads,
                       "share_of_baseline": v / base if base else None} for k, v in month.items()],
        **{k: v for k, v in w.items() if k != "steps"},
    }


# --------------------------------------------------------------------------- text table


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f} ms"


def _pct(v: float) -> str:
    return f"{100 * v:.1f} %"


def _usd(v: float) -> str:
    return f"${v:,.2f}"


def format_table(s: dict, *, header: str, audit: dict | None) -> str:
    lk, llm, month = s["lookups"], s["llm"], s["month"]
    lines = [header, ""]
    rows = [("memory lookups", "share", "count", "p50", "p95", "p99")]
    for tier in (*TIERS, "all"):
        lat = lk["latency"][tier]
        share = "100.0 %" if tier == "all" else _pct(lk["share"][tier])
        rows.append((f"  {tier.upper() if tier != 'all' else 'all tiers'}", share, f"{lat['count']:,}",
                     _ms(lat["p50"]), _ms(lat["p95"]), _ms(lat["p99"])))
    ap = s["appends"]
    rows.append(("  (design)", "74/14/12", "", "", "4.8 ms", ""))
    rows.append(("  (appends)", "", f"{ap['count']:,}", _ms(ap["p50"]), _ms(ap["p95"]), _ms(ap["p99"])))
    widths = [max(len(r[c]) for r in rows) for c in range(6)]
    for r in rows:
        lines.append("  ".join(v.ljust(w) if c == 0 else v.rjust(w) for c, (v, w) in enumerate(zip(r, widths))))
    lines.append("")
    saved = 1 - month["with_usd"] / month["without_usd"] if month["without_usd"] else 0.0
    lines += [
        f"LLM calls           {llm['calls']:,}: {llm['hits']:,} answered from cache ({_pct(llm['hit_rate'])}; "
        f"exact {llm['hits_exact']:,}, semantic {llm['hits_semantic']:,}), {llm['misses']:,} sent to the model",
        f"LLM calls avoided   {llm['hits']:,}   tokens avoided {llm['tokens_avoided']:,} of {llm['tokens']:,} "
        f"({_pct(llm['tokens_avoided'] / llm['tokens'] if llm['tokens'] else 0)})",
        f"cache hit latency   p50 {_ms(llm['hit_latency']['p50'])}  p95 {_ms(llm['hit_latency']['p95'])}",
        f"cost per month      without cache {_usd(month['without_usd'])}   with cache {_usd(month['with_usd'])}"
        f"   (-{_pct(saved)})",
        f"cost per lead/month without cache {_usd(month['per_lead_without_usd'])}   "
        f"with cache {_usd(month['per_lead_with_usd'])}",
        f"                    (at {s['interactions_per_day']:,.0f} interactions a day x 30, "
        f"price table of the llm-broker)",
        "",
    ]
    lines += _context_lines(s.get("context"), s.get("quality"))
    lines += _waterfall_lines(s.get("cost"))
    lines += _audit_lines(audit)
    return "\n".join(lines)


def _context_lines(ctx: dict | None, q: dict | None) -> list[str]:
    lines = []
    if ctx and ctx["count"]:
        lat = ctx["latency"]
        lines.append(f"context reads       {ctx['count']:,} (memory.get op=context, the texts' prompts): "
                     f"p50 {_ms(lat['p50'])}  p95 {_ms(lat['p95'])}; with a summary {_pct(ctx['with_summary'])}, "
                     f"with relevant older messages {_pct(ctx['with_relevant'])}, "
                     f"{ctx['mean_tokens']:,.0f} tokens on average")
    if q is not None:
        rate = "n/a" if q["rate"] is None else _pct(q["rate"])
        lines.append(f"quality: {q['agree']}/{q['judged']} agree ({rate})   (replies from the assembled context "
                     f"vs from the whole transcript, judged by the auditor's LLM judge; {q['sampled']} sampled, "
                     f"{q['unjudged']} without a verdict; {_usd(q['cost_usd'])} not in the fleet's cost)")
    return [*lines, ""] if lines else []


def _waterfall_lines(cost: dict | None) -> list[str]:
    if cost is None:
        return ["cost vs a fleet without tiermem  n/a (no baseline priced: DEMO_BASELINE=0 or no endpoint)", ""]
    lines = ["cost vs a fleet without tiermem (same run; per month, per lead, share of the baseline):"]
    for step in cost["waterfall"]:
        lines.append(f"  {step['step']:<28} {_usd(step['per_month_usd']):>12}  {_usd(step['per_lead_usd']):>8}"
                     f"  {_pct(step['share_of_baseline'] or 0):>8}")
    m = cost["memory_retrieval"]
    out = "n/a" if m["mean_output_tokens"] is None else f"{m['mean_output_tokens']:.0f}"
    lines += [f"  (baseline: every call with the whole transcript plus {m['calls']:,} memory-retrieval calls, "
              f"tokens by count_tokens, not sent; their output {out} tokens, the mean of {m['sent']} sent)"]
    sm = cost.get("summaries")
    if sm is None:
        lines.append("  (tiermem: the rolling summaries' calls could not be counted: no llm-broker metrics)")
    else:
        once = sm.get("import")
        lines.append(f"  (tiermem includes {sm['requests']:,} rolling-summary calls of L3, "
                     f"{_usd(sm['cost_usd'])} in this run, counted by the llm-broker"
                     + ("" if once is None else f"; not included: {once['requests']:,} made once for the "
                        f"imported history, {_usd(once['cost_usd'])}") + ")")
    lines.append("")
    return lines


def _audit_lines(audit: dict | None) -> list[str]:
    if audit is None:
        return ["stale / false-hit rates  n/a (the freshness-auditor is not running)"]
    mem = audit.get("memory") or {}
    parts = []
    for tier in TIERS:
        f = mem.get(tier)
        if f:
            parts.append(f"{tier.upper()} {_pct(f.get('stale_rate', 0.0))} ({f.get('stale', 0)}/{f.get('checked', 0)})")
        else:
            parts.append(f"{tier.upper()} n/a")
    lines = ["stale rate (audited)     " + "   ".join(parts)]
    llm = audit.get("llm_by_volatility") or {}
    if llm:
        lines.append("false-hit rate (audited) " + "   ".join(
            f"{k} {_pct(v.get('false_hit_rate', 0.0))} ({v.get('wrong', 0)}/{v.get('checked', 0)})"
            for k, v in sorted(llm.items())))
    else:
        lines.append("false-hit rate (audited) n/a (no LLM hits audited yet)")
    lines.append(_bound_line(audit))
    lines.append(f"                         (freshness-auditor, window {audit.get('window_s', 0):.0f} s)")
    return lines


def _bound_line(audit: dict) -> str:
    """Semantic hits against the false-hit bound the broker keeps (its `max_false_hit_rate`)."""
    sem = (audit.get("llm_by_match") or {}).get("semantic")
    bound = audit.get("max_false_hit_rate")
    if not sem or not sem.get("checked"):
        return "semantic false hits      n/a (no semantic hit audited yet)"
    return (f"semantic false hits      {_pct(sem.get('false_hit_rate', 0.0))} "
            f"({sem.get('wrong', 0)}/{sem.get('checked', 0)}), 95 % upper bound "
            f"{_pct(sem.get('upper_bound', 1.0))}; bound "
            f"{'n/a' if bound is None else _pct(bound)}; partitions tightened "
            f"{audit.get('partitions_tightened', 0)}/{audit.get('partitions_audited', 0)}")
