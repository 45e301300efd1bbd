"""The HTML report: one self-contained file, plots embedded as PNG data URIs.

Plots: the cost waterfall against a fleet without tiermem (same run),
latency distribution per tier, LLM cache hit rate and cost over
simulated time, the tiers' shares, and the waterfall of one slow lookup's
trace (the spans the services wrote to `TRACE_FILE`, under the call as the
worker measured it).
"""

from __future__ import annotations

import base64
import html
import io
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import msgspec  # noqa: E402

from demo.results import TIERS, cost_usd  # noqa: E402
from services.agent_worker.scenario import DAY_S, START_HOUR  # noqa: E402

COLORS = {"l1": "#2b8a3e", "l2": "#1971c2", "l3": "#e8590c"}


def write(path: Path, records: list[dict], summary: dict, *, spans_path: Path, prices: dict) -> Path:
    plots = [
        ("Lookup latency per tier", _latency_plot(records)),
        ("LLM cache hit rate and cost over simulated time", _time_plot(records, prices)),
        ("Share of lookups per tier", _share_plot(summary)),
    ]
    if summary.get("cost"):
        plots.insert(0, ("Cost per month: a fleet without tiermem, then each layer of tiermem (same run)",
                         _cost_plot(summary["cost"])))
    waterfall, caption = _waterfall(records, spans_path)
    if waterfall:
        plots.append((f"Trace of one slow lookup: {caption}", waterfall))
    body = [f"<h1>tiermem demo</h1><pre>{html.escape(summary['table'])}</pre>"]
    for title, png in plots:
        body.append(f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' "
                    f"src='data:image/png;base64,{png}'>")
    if not waterfall:
        body.append(f"<h2>Trace of one slow lookup</h2><p>{html.escape(caption)}</p>")
    body.append("<h2>How these numbers were made</h2><p>Every figure comes from the agent workers' own "
                "call logs: the tier is the one named in each reply, latency is what the worker measured, "
                "cost is recomputed from each reply's token counts and the llm-broker's price table. "
                "Simulated time runs faster than the wall clock; the broker's TTLs and the model "
                "simulator's latency are scaled by the same factor, so compression cannot inflate "
                "cache hits.</p>")
    body.append(f"<h2>Settings</h2><pre>{html.escape(msgspec.json.format(msgspec.json.encode(summary['settings'])).decode())}</pre>")
    path.write_text("<!doctype html><html><head><meta charset='utf-8'><title>tiermem demo</title>"
                    "<style>body{font-family:sans-serif;max-width:1000px;margin:2em auto}"
                    "img{max-width:100%}pre{background:#f4f4f4;padding:1em;overflow-x:auto}</style>"
                    "</head><body>" + "\n".join(body) + "</body></html>")
    return path


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _lookups(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("kind") in ("get", "search") and r.get("code") == 200]


def _latency_plot(records: list[dict]) -> str:
    fig, ax = plt.subplots(figsize=(9, 4))
    by_tier = defaultdict(list)
    for r in _lookups(records):
        by_tier[r["tier"]].append(r["ms"])
    for tier in TIERS:
        values = sorted(by_tier[tier])
        if values:
            ax.plot(values, [(i + 1) / len(values) for i in range(len(values))], label=f"{tier.upper()} "
                    f"({len(values):,})", color=COLORS[tier])
    ax.set_xscale("log")
    ax.set_xlabel("latency as the worker measured it (ms, log scale)")
    ax.set_ylabel("share of lookups at or below")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return _png(fig)


def _sim_hours(records: list[dict]):
    """Simulated hour (from 07:00 on day 1) of every record, from its worker's clock."""
    clocks = {r["w"]: (r["t0"], r["speed"]) for r in records if r.get("kind") == "start"}
    for r in records:
        if "t" in r and r.get("w") in clocks:
            t0, speed = clocks[r["w"]]
            yield r, max(0.0, (r["t"] - t0) * speed) / 3600


def _time_plot(records: list[dict], prices: dict) -> str:
    hits, calls = defaultdict(int), defaultdict(int)
    spent, would = defaultdict(float), defaultdict(float)
    for r, hour in _sim_hours(records):
        if r["kind"] != "llm" or r["code"] != 200:
            continue
        h = int(hour)
        calls[h] += 1
        hits[h] += r["status"] == "hit"
        c = cost_usd(r, prices)
        would[h] += c
        spent[h] += 0.0 if r["status"] == "hit" else c
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    if calls:
        hours = list(range(max(calls) + 1))
        a1.bar(hours, [hits[h] / calls[h] if calls[h] else 0 for h in hours], color="#1971c2", width=0.9)
        cw, cs, tw, ts = [], [], 0.0, 0.0
        for h in hours:
            tw += would[h]
            ts += spent[h]
            cw.append(tw)
            cs.append(ts)
        a2.plot(hours, cw, label="without the cache", color="#c92a2a")
        a2.plot(hours, cs, label="with the cache", color="#2b8a3e")
        a2.legend()
        ticks = [h for h in hours if (h + START_HOUR) % 6 == 0]
        a2.set_xticks(ticks, [f"d{(h + START_HOUR) * 3600 // DAY_S + 1} {(h + START_HOUR) % 24:02d}h" for h in ticks])
    a1.set_ylabel("LLM cache hit rate")
    a1.set_ylim(0, 1)
    a2.set_ylabel("cumulative LLM cost (USD)")
    a2.set_xlabel("simulated time")
    for a in (a1, a2):
        a.grid(True, alpha=0.3)
    return _png(fig)


def _cost_plot(cost: dict) -> str:
    steps = cost["waterfall"]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    values = [st["per_month_usd"] for st in steps]
    bars = ax.bar([st["step"].replace(" ", "\n", 1) for st in steps], values,
                  color=["#c92a2a", "#e8590c", "#1971c2", "#2b8a3e"])
    for bar, st in zip(bars, steps):
        ax.annotate(f"${st['per_month_usd']:,.0f}\n{100 * (st['share_of_baseline'] or 0):.0f} %",
                    (bar.get_x() + bar.get_width() / 2, st["per_month_usd"]), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("USD per month")
    ax.set_ylim(0, max(values) * 1.25 if values and max(values) > 0 else 1)
    ax.grid(True, axis="y", alpha=0.3)
    return _png(fig)


def _share_plot(summary: dict) -> str:
    fig, ax = plt.subplots(figsize=(6, 3))
    shares = [summary["lookups"]["share"][t] * 100 for t in TIERS]
    bars = ax.bar([t.upper() for t in TIERS], shares, color=[COLORS[t] for t in TIERS])
    for bar, v in zip(bars, shares):
        ax.annotate(f"{v:.1f} %", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom")
    ax.set_ylabel("share of lookups (%)")
    ax.set_ylim(0, 100)
    return _png(fig)


def _read_spans(path: Path, wanted: set[str]) -> dict[str, list[dict]]:
    by_trace: dict[str, list[dict]] = defaultdict(list)
    if not path.exists():
        return by_trace
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                span = msgspec.json.decode(line)
                if span["trace_id"] in wanted:
                    by_trace[span["trace_id"]].append(span)
    return by_trace


def _waterfall(records: list[dict], spans_path: Path) -> tuple[str | None, str]:
    traced = [r for r in _lookups(records) if r.get("trace")]
    spans = _read_spans(spans_path, {r["trace"] for r in traced})
    candidates = [r for r in traced if spans.get(r["trace"])]
    if not candidates:
        return None, (f"no traced lookup left spans in {spans_path.name} "
                      f"({len(traced)} lookups were sampled)")
    # The slowest lookup among those that went deepest.
    deepest = max(len({s["service"] for s in spans[r["trace"]]}) for r in candidates)
    call = max((r for r in candidates if len({s["service"] for s in spans[r["trace"]]}) == deepest),
               key=lambda r: r["ms"])
    tree = spans[call["trace"]]
    ids = {s["span_id"] for s in tree}
    children = defaultdict(list)
    for s in tree:
        children[s["parent_id"] if s["parent_id"] in ids else None].append(s)
    rows = [(f"agent worker: {call['kind']} {'n=' + str(call.get('n')) if call['kind'] == 'get' else ''}",
             0.0, call["ms"], "#868e96")]
    t0 = call["t"]

    def walk(parent, depth):
        for s in sorted(children[parent], key=lambda s: s["start_ns"]):
            start = (s["start_ns"] / 1e9 - t0) * 1000
            rows.append(("  " * depth + f"{s['service']}: {s['name']}", start,
                         (s["end_ns"] - s["start_ns"]) / 1e6, _service_color(s["service"])))
            walk(s["span_id"], depth + 1)

    walk(None, 1)
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(rows) + 1))
    for i, (label, start, width, color) in enumerate(rows):
        ax.barh(i, max(width, 0.01), left=start, color=color)
        ax.text(start + max(width, 0.01), i, f" {width:.2f} ms", va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=8, family="monospace")
    ax.invert_yaxis()
    ax.set_xlabel("ms since the worker sent the request")
    ax.grid(True, axis="x", alpha=0.3)
    caption = (f"{call['kind']} of {call['lead']} answered by {call['tier'].upper()} in {call['ms']:.2f} ms "
               f"(trace {call['trace']})")
    return _png(fig), caption


def _service_color(service: str) -> str:
    return {"memory-l1": COLORS["l1"], "l2-gateway": COLORS["l2"],
            "l3-semantic-indexer": COLORS["l3"]}.get(service, "#5f3dc4")
