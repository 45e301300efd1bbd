"""`python -m bench.search_evidence`: does L3 search find the turn that answers a question?

Quality: the long-conversation QA set in bench/data/dialogue_qa (built by
bench/dialogue_qa.py from Synthetic-Persona-Chat; ~830 turns a history, 30
sessions): each history is stored as one user, each question is searched in
its user's history, and a hit is an evidence turn among the top k. Reported
per split: `dev` (where the defaults were chosen) and `report` (held out,
looked at once the defaults were fixed). Methods: vector only, full text
alone (ts_rank_cd, BM25), the old fusion (ts_rank_cd), the new one (BM25,
a few depths and weights), and a speaker-aware variant (only the lead's
turns), which the contract cannot ask for today, measured to see if it would
pay.

Latency: users of 100 .. 10,000 rows (turns of the set) in a table padded to
`--stored` rows with copies of the histories under other user ids, p50/p95
of vector-only and the default hybrid search, k = 10, one connection.

Postgres: DATABASE_URL or --dsn (a scratch database: the l3 schema is
dropped first), else a server is started in a temp folder and stopped.
Writes bench/results/search_evidence_<embedder>.json; the written summary is
bench/results/search_quality.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import asyncpg

from bench import baselines
from bench.search_quality import timed
from bench.stats import percentile
from services.l3_semantic_indexer import store
from shared.embeddings import make_embedder

DATA = Path(__file__).resolve().parent / "data" / "dialogue_qa"
OUT = Path(__file__).resolve().parent / "results"
T0 = datetime(2026, 1, 5, 9, 0, tzinfo=timezone.utc)
K = 10


def load() -> tuple[list[dict], list[dict]]:
    with open(DATA / "histories.jsonl", encoding="utf-8") as f:
        histories = [json.loads(line) for line in f]
    with open(DATA / "questions.jsonl", encoding="utf-8") as f:
        questions = [json.loads(line) for line in f]
    return histories, questions


def history_rows(h: dict, seq0: int, user: str | None = None) -> list[store.Row]:
    """A history as one user's log: a session a day, a turn a minute; User 1
    (the lead) is role `user`, User 2 (the bot) `assistant`."""
    user = user or h["user"]
    rows, seq = [], seq0
    for s, sess in enumerate(h["sessions"]):
        for i, (speaker, text) in enumerate(sess["turns"]):
            rows.append(store.Row(user_id=user, seq=seq, msg_id=f"{s}:{i}", bot_id="spc",
                                  role="user" if speaker == "User 1" else "assistant", text=text,
                                  ts=T0 + timedelta(days=s, minutes=i)))
            seq += 1
    return rows


async def put(pool, embedder, rows: list[store.Row], batch: int = 512) -> None:
    for i in range(0, len(rows), batch):
        chunk = rows[i : i + batch]
        vectors = await embedder.embed([r.text for r in chunk], input_type="document")
        await store.upsert_batch(pool, chunk, vectors, embedder.model_id)


def methods(model_id: str) -> dict:
    """name -> async (pool, user, question, vector) -> msg_ids, best first."""

    def searcher(**kw):
        async def run(pool, user, q, qv):
            msgs, _ = await store.search(pool, user, q, qv, K, model_id, **kw)
            return [m.msg_id for m in msgs]
        return run

    def text(lexical):
        async def run(pool, user, q, qv):
            return [m.msg_id for m in await store.fulltext(pool, user, q, K, lexical=lexical)]
        return run

    async def lead_only(pool, user, q, qv):
        msgs, _ = await store.search(pool, user, q, qv, 5 * K, model_id)
        return [m.msg_id for m in msgs if m.role == "user"][:K]

    out = {
        "vector only (before)": searcher(fusion_candidates=0, plan="exact"),
        "full text, ts_rank_cd": text("ts_rank_cd"),
        "full text, BM25": text("bm25"),
        "RRF vector + ts_rank_cd, 20 each (old option)": searcher(fusion_candidates=20, lexical="ts_rank_cd"),
    }
    for n in (20, 50, 100):
        for w in (1.0, 2.0, 3.0):
            out[f"RRF vector + BM25, {n} each, text weight {w:g}"] = searcher(
                fusion_candidates=n, lexical="bm25", text_weight=w)
    out["default search (hybrid)"] = searcher()
    out["default search, lead's turns only"] = lead_only
    return out


async def quality(pool, embedder, questions: list[dict]) -> dict:
    qvs = await embedder.embed([q["question"] for q in questions], input_type="query")
    report = {}
    for name, run in methods(embedder.model_id).items():
        per_split: dict[str, list] = {"dev": [], "report": []}
        for q, qv in zip(questions, qvs):
            found = await run(pool, q["user"], q["question"], qv)
            evidence = {f"{q['session']}:{i}" for i in q["evidence"]}
            rank = next((r + 1 for r, mid in enumerate(found) if mid in evidence), None)
            per_split[q["split"]].append(rank)
        report[name] = {split: summary(ranks) for split, ranks in per_split.items()}
        print(f"{name:55s} " + "  ".join(
            f"{s}: R@10 {v['recall@10']:.3f} MRR {v['mrr@10']:.3f}" for s, v in report[name].items()),
            flush=True)
    return report


def summary(ranks: list) -> dict:
    n = len(ranks)
    return {"recall@1": round(sum(1 for r in ranks if r == 1) / n, 3),
            "recall@5": round(sum(1 for r in ranks if r and r <= 5) / n, 3),
            "recall@10": round(sum(1 for r in ranks if r) / n, 3),
            "mrr@10": round(sum(1 / r for r in ranks if r) / n, 3), "questions": n}


async def pad(pool, target: int, model_id: str, dim: int) -> int:
    """Copy the stored histories (vectors included) under new user ids until
    the table holds `target` rows, user_state kept in step, like a fleet of
    many users. The model's HNSW index is dropped first and built again after
    (inserting 1M rows into it one by one would take far longer)."""
    have = await pool.fetchval("SELECT count(*) FROM l3.messages")
    base = await pool.fetchval("SELECT count(*) FROM l3.messages WHERE user_id LIKE 'spc-%'")
    copies = max(0, (target - have + base - 1) // base)
    index = await pool.fetchval("SELECT index_name FROM l3.embedding_models WHERE model_id = $1", model_id)
    async with pool.acquire() as conn:
        if index:
            await conn.execute(f"DROP INDEX l3.{index}")
        for g in range(1, copies + 1):
            await conn.execute(f"""
                INSERT INTO l3.messages (user_id, msg_id, seq, bot_id, role, text, ts, embedding,
                                         embedding_model)
                SELECT 'pad{g}-' || user_id, msg_id, seq + {g} * 100000000, bot_id, role, text, ts,
                       embedding, embedding_model
                FROM l3.messages WHERE user_id LIKE 'spc-%'""")
        await conn.execute("""
            INSERT INTO l3.user_state (user_id, n_rows, max_seq)
            SELECT user_id, count(*), max(seq) FROM l3.messages WHERE user_id LIKE 'pad%' GROUP BY user_id
            ON CONFLICT (user_id) DO UPDATE SET n_rows = excluded.n_rows, max_seq = excluded.max_seq""")
        await conn.execute("SET maintenance_work_mem = '2GB'")
        await store.ensure_model(conn, model_id, dim)
        await conn.execute("RESET maintenance_work_mem")
    return copies


#: the same-run baseline of the latency runs: a plain index read of the same user, so a
#: loaded box's slowdown shows in both and the ratio says what the search itself costs
BARE = "bare: newest 500 rows of the user by index (asyncpg, prepared)"
BARE_SQL = "SELECT msg_id, text FROM l3.messages WHERE user_id = $1 ORDER BY seq DESC LIMIT 500"


def _searcher(pool, user: str, qs: list[str], qvs, model_id: str, kw: dict):
    """One search of question i % len(qs) through the pool, as the service searches (the
    hybrid's two halves run at once on two of its connections)."""
    async def one(i: int):
        j = i % len(qs)
        return await store.search(pool, user, qs[j], qvs[j], K, model_id, **kw)
    return one


def _ms(seconds: list[float]) -> dict:
    ms = [s * 1e3 for s in seconds]
    return {"p50_ms": round(percentile(ms, 50), 3), "p95_ms": round(percentile(ms, 95), 3),
            "mean_ms": round(sum(ms) / len(ms), 3), "n": len(ms)}


async def latency(pool, embedder, histories, questions, samples: int) -> dict:
    turns = [r for h in histories for r in history_rows(h, 0)]
    rng = random.Random(3)
    sized = {}
    for size in (100, 1000, 5000, 10_000):
        start = rng.randrange(0, len(turns) - size)
        user = f"lat-{size}"
        await put(pool, embedder, [store.Row(user_id=user, seq=50_000_000 + size * 10 + i, msg_id=str(i),
                                             bot_id=r.bot_id, role=r.role, text=r.text, ts=r.ts)
                                   for i, r in enumerate(turns[start : start + size])])
        sized[size] = user
    await pool.execute("VACUUM ANALYZE l3.messages")
    qs = [q["question"] for q in rng.sample(questions, 200)]
    qvs = await embedder.embed(qs, input_type="query")
    out = {}
    for size, user in sized.items():
        async with pool.acquire() as conn:
            calls = {name: (_searcher(pool, user, qs, qvs, embedder.model_id, kw), None)
                     for name, kw in (("vector only", {"fusion_candidates": 0}), ("hybrid (default)", {}))}
            bare = await conn.prepare(BARE_SQL)
            calls[BARE] = (lambda i, bare=bare, user=user: bare.fetch(user), None)
            got = await baselines.interleaved(calls, samples, warmup=20)
        base = _ms(got[BARE])
        out[f"user of {size} rows, {BARE}"] = base
        for name in ("vector only", "hybrid (default)"):
            ms = _ms(got[name])
            ms["p50_ratio"] = round(ms["p50_ms"] / base["p50_ms"], 2)
            ms["p95_ratio"] = round(ms["p95_ms"] / base["p95_ms"], 2)
            out[f"user of {size} rows, {name}"] = ms
        print(size, {k: v for k, v in out.items() if f" {size} rows" in k}, flush=True)
    it = iter(range(10**9))

    async def embed_and_search(it=it):
        i = next(it) % len(qs)
        qv = (await embedder.embed([qs[i]], input_type="query"))[0]
        await store.search(pool, sized[1000], qs[i], qv, K, embedder.model_id)
    out["embed query + hybrid search, user of 1000 rows"] = await timed(embed_and_search, samples)
    return out


async def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.search_evidence", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dsn", default=os.environ.get("DATABASE_URL", ""))
    ap.add_argument("--embedder", default="wordllama")
    ap.add_argument("--stored", type=int, default=1_000_000, help="rows in the table for the latency runs")
    ap.add_argument("--samples", type=int, default=300)
    ap.add_argument("--quality-only", action="store_true")
    ap.add_argument("--latency-only", action="store_true",
                    help="reuse the database at --dsn as a full run left it (no drop, no load)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    from devstack import servers

    with servers.postgres_at(args.dsn) as dsn:
        return await run(args, dsn)


async def run(args, dsn: str) -> int:
    embedder = make_embedder(args.embedder)
    histories, questions = load()
    report: dict = {"embedder": embedder.model_id}
    if not args.latency_only:
        conn = await asyncpg.connect(dsn)
        await conn.execute("DROP SCHEMA IF EXISTS l3 CASCADE")
        await conn.close()
    pool = await store.create_pool(dsn, model_id=embedder.model_id, dim=embedder.dim, max_size=4)
    if not args.latency_only:
        t = time.perf_counter()
        for h in histories:
            await put(pool, embedder, history_rows(h, 1 + 10_000 * int(h["user"].split("-")[1])))
        await pool.execute("VACUUM ANALYZE l3.messages")
        report["load_s"] = round(time.perf_counter() - t, 1)
        report["set"] = {s: {"histories": sum(1 for h in histories if h["split"] == s),
                             "turns": sum(len(x["turns"]) for h in histories if h["split"] == s
                                          for x in h["sessions"]),
                             "questions": sum(1 for q in questions if q["split"] == s)}
                         for s in ("dev", "report")}
        print(report, flush=True)
        report["quality"] = await quality(pool, embedder, questions)
        if not args.quality_only:
            t = time.perf_counter()
            report["padding_copies"] = await pad(pool, args.stored, embedder.model_id, embedder.dim)
            report["padding_s"] = round(time.perf_counter() - t, 1)
    if not args.quality_only:
        report["table_rows"] = await pool.fetchval("SELECT count(*) FROM l3.messages")
        print("table rows", report["table_rows"], flush=True)
        report["load_average"] = os.getloadavg()
        report["latency"] = await latency(pool, embedder, histories, questions, args.samples)
    await pool.close()
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "_latency" if args.latency_only else ""
    path = args.out / f"search_evidence_{args.embedder}{suffix}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print("wrote", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
