"""`python -m bench.search_quality`: L3 search quality and latency on real text.

Quality: does search find the paraphrase of a query in a user's history?
Each "quality user" holds MRPC sentence #1 of some true paraphrase pairs (the
targets), other MRPC sentences (same news domain, many near-misses) and chat
lines from PersuasionForGood; the query is sentence #2 of a pair. We report
recall@1/5/10 and MRR for: vector search (exact and HNSW), full-text alone,
and reciprocal-rank fusion of both (the question: does hybrid help?).

Latency: a table of ~100k chat rows (PersuasionForGood dialogues replicated
over users), plus users with 100 .. 10,000 rows; p50/p95 of `search` with the
exact plan, the HNSW plan and auto, of `recent`, and of one batch upsert.

Needs the development data in ../shared/data (not the tests). Postgres: the
DATABASE_URL environment variable or --dsn (a scratch database: the l3 schema
is dropped first), else a server is started in a temp folder and stopped.
Writes bench/results/search_quality.json (search_quality_<embedder>.json for
another embedder); bench/results/search_quality.md is the written summary.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import asyncpg

from bench.report import write_files
from bench.stats import percentile
from services.l3_semantic_indexer import store
from shared.embeddings import make_embedder

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
OUT = Path(__file__).resolve().parent / "results"
TS = "2026-11-26T07:00:00Z"


def load_chat() -> list[tuple[str, str]]:
    """(dialogue id, sentence) rows of PersuasionForGood, in order."""
    with open(DATA / "persuasionforgood" / "full_dialog.csv", newline="", encoding="utf-8") as f:
        return [(r["B2"], r["Unit"].strip()) for r in csv.DictReader(f) if r["Unit"].strip()]


def load_mrpc() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(positive pairs, negative pairs) of the MRPC training split."""
    pos, neg = [], []
    with open(DATA / "mrpc" / "msr_paraphrase_train.txt", encoding="utf-8-sig") as f:
        next(f)
        for line in f:
            q, _id1, _id2, s1, s2 = line.rstrip("\n").split("\t")
            (pos if q == "1" else neg).append((s1, s2))
    return pos, neg


async def timed(fn, n: int) -> dict:
    for _ in range(min(20, n)):
        await fn()
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        await fn()
        samples.append((time.perf_counter() - t) * 1e3)
    return {"p50_ms": round(percentile(samples, 50), 3), "p95_ms": round(percentile(samples, 95), 3),
            "mean_ms": round(statistics.fmean(samples), 3), "n": n}


class Corpus:
    def __init__(self, seed: int = 7) -> None:
        self.rng = random.Random(seed)
        self.chat = load_chat()
        self.pos, self.neg = load_mrpc()
        self.rng.shuffle(self.pos)
        self.rng.shuffle(self.neg)
        self.news = [s for pair in self.neg for s in pair] + [p[0] for p in self.pos[2000:]]


async def load(pool, embedder, rows: list[store.Row], batch: int = 512) -> float:
    t = time.perf_counter()
    for i in range(0, len(rows), batch):
        chunk = rows[i : i + batch]
        vectors = await embedder.embed([r.text for r in chunk], input_type="document")
        await store.upsert_batch(pool, chunk, vectors, embedder.model_id)
    return time.perf_counter() - t


def rows_for(user: str, texts: list[str], start_seq: int) -> list[store.Row]:
    return [store.Row(user_id=user, seq=start_seq + i, msg_id=f"{user}:{i}", bot_id="bench",
                      role="user" if i % 2 else "assistant", text=t, ts=TS)
            for i, t in enumerate(texts)]


async def quality(pool, embedder, corpus: Corpus, *, users: int, size: int, targets: int,
                  seq0: int, tag: str) -> dict:
    """Build `users` histories of `size` rows with `targets` paraphrase targets
    each; return recall of each method."""
    rng = random.Random(size)
    pos = corpus.pos[:2000]
    cases = []  # (user, query, target text)
    all_rows = []
    seq = seq0
    for u in range(users):
        user = f"q{tag}-{size}-{u}"
        pairs = rng.sample(pos, targets)
        n_news = (size - targets) // 3
        texts = [p[0] for p in pairs] + rng.sample(corpus.news, n_news) + \
            [t for _, t in rng.sample(corpus.chat, size - targets - n_news)]
        order = list(range(len(texts)))
        rng.shuffle(order)
        texts = [texts[i] for i in order]
        rows = rows_for(user, texts, seq)
        seq += len(rows)
        all_rows += rows
        for j, (s1, s2) in enumerate(pairs):
            cases.append((user, s2, s1))
    await load(pool, embedder, all_rows)
    await pool.execute("ANALYZE l3.messages")

    return await evaluate(pool, embedder, cases)


_STOP = set("a an the of to in on for and or but is are was were be been it its this that with as at by "
             "from he she they we you i his her their our not no has have had will would said says".split())


def words(text: str) -> frozenset[str]:
    return frozenset(w for w in "".join(c.lower() if c.isalnum() else " " for c in text).split()
                     if w not in _STOP)


def jaccard(a: frozenset, b: frozenset) -> float:
    return len(a & b) / len(a | b) if a and b else 0.0


async def quality_hard(pool, embedder, corpus: Corpus, *, users: int, targets: int, lookalikes: int,
                       size: int, seq0: int) -> dict:
    """Harder: the paraphrase pairs with the least word overlap, and each
    query's `lookalikes` most word-similar other MRPC sentences stored next
    to its target (lexical near-misses that full-text will love)."""
    pos = sorted(corpus.pos, key=lambda p: jaccard(words(p[0]), words(p[1])))[: users * targets]
    pool_sents = list({s for pair in corpus.pos + corpus.neg for s in pair})
    pool_words = [words(s) for s in pool_sents]
    rng = random.Random(11)
    rng.shuffle(pos)
    cases, all_rows, seq = [], [], seq0
    overlap = []
    for u in range(users):
        user = f"hard-{size}-{u}"
        pairs = pos[u * targets : (u + 1) * targets]
        texts: list[str] = []
        banned = {s for p in pairs for s in p}
        for s1, s2 in pairs:
            overlap.append(jaccard(words(s1), words(s2)))
            qw = words(s2)
            scored = sorted(((jaccard(qw, w), s) for w, s in zip(pool_words, pool_sents)
                             if s not in banned), reverse=True)[:lookalikes]
            texts.append(s1)
            texts += [s for _, s in scored]
        texts += [t for _, t in rng.sample(corpus.chat, max(0, size - len(texts)))]
        order = list(range(len(texts)))
        rng.shuffle(order)
        texts = [texts[i] for i in order]
        rows = rows_for(user, texts, seq)
        seq += len(rows)
        all_rows += rows
        for s1, s2 in pairs:
            cases.append((user, s2, s1))
    await load(pool, embedder, all_rows)
    await pool.execute("ANALYZE l3.messages")
    out = await evaluate(pool, embedder, cases)
    out["_setup"] = {"mean word-Jaccard of the pairs": round(statistics.fmean(overlap), 3),
                     "rows per user": len(all_rows) // users}
    return out


# Hand-made: a lead's history and the questions an agent asks about it, with
# the line that answers each (few shared words on purpose).
CHAT_HISTORY = [
    "Hi! Have you ever heard of the charity Save the Children?",
    "No, I have not. What do they do?",
    "They help children in developing countries with health care and education.",
    "That sounds nice. I usually give to my local animal shelter.",
    "Would you be willing to donate part of your task payment to them today?",
    "I could donate one dollar, I think.",
    "My budget is tight this month because my rent went up.",
    "I live in a small apartment in Chicago with two cats.",
    "My daughter starts college next fall, so we are saving money.",
    "Please call me back tomorrow morning after nine.",
    "The weather has been terrible all week, lots of rain.",
    "I work as a nurse at the city hospital on night shifts.",
]
CHAT_QUERIES = [
    ("how much will they give", 5), ("how much could they donate", 5),
    ("what amount would they donate", 5), ("what city do they live in", 7), ("where do they live", 7),
    ("what is their job", 11), ("what do they do for work", 11), ("when should I phone them again", 9),
    ("when can I call them back", 9), ("is money short for them", 6), ("are they short on money", 6),
    ("did they mention their budget", 6), ("what does the charity do", 2),
    ("what does the organization work on", 2), ("do they have pets", 7),
    ("do they have any animals at home", 7), ("how is the weather there", 10),
    ("is it raining where they are", 10), ("do they have kids", 8), ("where do they usually donate", 3),
]


async def quality_chat(pool, embedder, corpus: Corpus, *, users: int, background: int, seq0: int) -> dict:
    rng = random.Random(21)
    all_rows, cases = [], []
    for u in range(users):
        user = f"chat-{u}"
        texts = CHAT_HISTORY + [t for _, t in rng.sample(corpus.chat, background)]
        rng.shuffle(texts)
        all_rows += rows_for(user, texts, seq0 + u * 10_000)
        cases += [(user, q, CHAT_HISTORY[i]) for q, i in CHAT_QUERIES]
    await load(pool, embedder, all_rows)
    await pool.execute("ANALYZE l3.messages")
    return await evaluate(pool, embedder, cases)


#: fusion weights tried on these sets too (bench/search_evidence.py picks the default)
TEXT_WEIGHTS = (1.0, 2.0, 3.0, 4.0)


async def evaluate(pool, embedder, cases) -> dict:
    queries = await embedder.embed([q for _, q, _ in cases], input_type="query")
    methods = {
        "vector exact": dict(plan="exact", fusion_candidates=0),
        "vector hnsw": dict(plan="hnsw", fusion_candidates=0),
        "full-text (OR of words)": None,
        "RRF vector+full-text, 20 each": dict(plan="exact", fusion_candidates=20, lexical="ts_rank_cd"),
        "RRF vector+full-text, 50 each": dict(plan="exact", fusion_candidates=50, lexical="ts_rank_cd"),
    }
    for w in TEXT_WEIGHTS:
        methods[f"RRF vector+BM25, 50 each, text weight {w:g}"] = dict(
            plan="exact", fusion_candidates=50, text_weight=w)
    results = {}
    for name, kw in methods.items():
        ranks = []
        for (user, q, target), qv in zip(cases, queries):
            if kw is None:
                msgs = await store.fulltext(pool, user, q, 10, lexical="ts_rank_cd")
            else:
                msgs, _ = await store.search(pool, user, q, qv, 10, embedder.model_id, **kw)
            # by text: MRPC repeats sentences, so a copy of the target
            # stored under another msg_id is as good a hit
            found = [m.text for m in msgs]
            ranks.append(found.index(target) + 1 if target in found else None)
        n = len(ranks)
        results[name] = {
            "recall@1": round(sum(1 for r in ranks if r == 1) / n, 3),
            "recall@5": round(sum(1 for r in ranks if r and r <= 5) / n, 3),
            "recall@10": round(sum(1 for r in ranks if r) / n, 3),
            "mrr@10": round(sum(1 / r for r in ranks if r) / n, 3),
            "queries": n,
        }
    return results


async def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.search_quality", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dsn", default=os.environ.get("DATABASE_URL", ""))
    ap.add_argument("--embedder", default="wordllama")
    ap.add_argument("--background", type=int, default=100_000, help="rows of background chat")
    ap.add_argument("--samples", type=int, default=300)
    ap.add_argument("--quality-only", action="store_true")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)

    from devstack import servers

    with servers.postgres_at(args.dsn) as dsn:
        return await run(args, dsn)


async def run(args, dsn: str) -> int:
    embedder = make_embedder(args.embedder)
    conn = await asyncpg.connect(dsn)
    await conn.execute("DROP SCHEMA IF EXISTS l3 CASCADE")
    await conn.close()
    pool = await store.create_pool(dsn, model_id=embedder.model_id, dim=embedder.dim, max_size=4)
    corpus = Corpus()
    report: dict = {"embedder": embedder.model_id, "dim": embedder.dim}

    # -- embedding time --------------------------------------------------------
    sentences = [t for _, t in corpus.chat[:5000]]
    emb = {}
    for bs in (1, 64):
        async def one(bs=bs, it=iter(range(10**9))):
            i = next(it) * bs % 4000
            await embedder.embed(sentences[i : i + bs])
        r = await timed(one, 300 if bs == 1 else 60)
        r["per_sentence_ms"] = round(r["mean_ms"] / bs, 4)
        emb[f"batch {bs}"] = r
    report["embed"] = emb
    print("embed", emb, flush=True)

    # -- quality ---------------------------------------------------------------
    report["quality"] = {}
    seq = 10_000_000
    for size, targets, users in ((100, 20, 10), (1000, 100, 2)):
        q = await quality(pool, embedder, corpus, users=users, size=size, targets=targets, seq0=seq, tag="a")
        seq += size * users
        report["quality"][f"easy: {users} users x {size} rows, {targets} targets each"] = q
        print(size, json.dumps(q, indent=1), flush=True)
    for users, targets, lookalikes, size in ((20, 10, 5, 100), (4, 50, 10, 1000)):
        q = await quality_hard(pool, embedder, corpus, users=users, targets=targets,
                               lookalikes=lookalikes, size=size, seq0=seq)
        seq += 100_000
        report["quality"][f"hard: {users} users x {size} rows, {targets} low-overlap targets "
                          f"+ {lookalikes} look-alikes each"] = q
        print("hard", size, json.dumps(q, indent=1), flush=True)
    q = await quality_chat(pool, embedder, corpus, users=5, background=88, seq0=seq)
    seq += 100_000
    report["quality"]["chat: 5 users x 100 rows (12 hand-made + 88 PersuasionForGood lines), "
                      "20 hand-made questions each"] = q

    if not args.quality_only:
        # -- latency -----------------------------------------------------------
        chat = corpus.chat
        by_dialog: dict[str, list[str]] = {}
        for d, t in chat:
            by_dialog.setdefault(d, []).append(t)
        dialogs = list(by_dialog.items())
        rows: list[store.Row] = []
        rep = 0
        while len(rows) < args.background:
            for d, texts in dialogs:
                rows += rows_for(f"bg-{rep}-{d}", texts, 1_000_000 + len(rows))
                if len(rows) >= args.background:
                    break
            rep += 1
        secs = await load(pool, embedder, rows)
        report["load"] = {"rows": len(rows), "seconds": round(secs, 1),
                          "rows_per_s": round(len(rows) / secs)}
        print("background", report["load"], flush=True)
        rng = random.Random(3)
        sized = {}
        for size in (100, 1000, 2000, 5000, 10_000):
            texts = [rng.choice(chat)[1] for _ in range(size)]
            user = f"big-{size}"
            await load(pool, embedder, rows_for(user, texts, 20_000_000 + size * 10))
            sized[size] = user
        await pool.execute("VACUUM ANALYZE l3.messages")
        total = await pool.fetchval("SELECT count(*) FROM l3.messages")
        report["table_rows"] = total
        qtexts = [t for _, t in rng.sample(chat, 200)]
        qvecs = await embedder.embed(qtexts, input_type="query")
        lat = {}
        for size, user in sized.items():
            for plan in ("exact", "hnsw", "auto"):
                it = iter(range(10**9))

                async def one(user=user, plan=plan, it=it):
                    i = next(it) % len(qtexts)
                    await store.search(pool, user, qtexts[i], qvecs[i], 10, embedder.model_id, plan=plan,
                                       fusion_candidates=0)
                lat[f"search k=10, user of {size} rows, {plan}"] = await timed(one, args.samples)
            # HNSW recall against exact for this user; by score, since texts
            # repeat (ties make id sets ambiguous); and how often the
            # iterative scan stopped (max_scan_tuples) before 10 rows
            hits = short = 0
            for i in range(200):
                ex, _ = await store.search(pool, user, "", qvecs[i], 10, embedder.model_id, plan="exact",
                                           fusion_candidates=0)
                hn, _ = await store.search(pool, user, "", qvecs[i], 10, embedder.model_id, plan="hnsw",
                                           fusion_candidates=0)
                hits += sum(1 for m in hn if m.score >= ex[-1].score - 1e-6)
                short += len(hn) < 10
            lat[f"search k=10, user of {size} rows, hnsw recall@10 vs exact"] = round(hits / 2000, 3)
            lat[f"search k=10, user of {size} rows, hnsw short answers (of 200)"] = short
            it = iter(range(10**9))

            async def fused(user=user, it=it):
                i = next(it) % len(qtexts)
                await store.search(pool, user, qtexts[i], qvecs[i], 10, embedder.model_id,
                                   fusion_candidates=20)
            lat[f"search k=10, user of {size} rows, auto + RRF fusion"] = await timed(fused, args.samples)
            for n in (10, 100):
                async def rec(user=user, n=n):
                    await store.recent(pool, user, n)
                lat[f"recent n={n}, user of {size} rows"] = await timed(rec, args.samples)
            print(size, {k: v for k, v in lat.items() if f" {size} rows" in k}, flush=True)

        async def embed_and_search(user=sized[100], it=iter(range(10**9))):
            i = next(it) % len(qtexts)
            qv = (await embedder.embed([qtexts[i]], input_type="query"))[0]
            await store.search(pool, user, qtexts[i], qv, 10, embedder.model_id)
        lat["embed query + search k=10, user of 100 rows"] = await timed(embed_and_search, args.samples)

        batch_rows = rows_for("upsert-bench", [t for _, t in chat[:256]], 30_000_000)
        vecs = await embedder.embed([r.text for r in batch_rows])
        counter = iter(range(10**9))

        async def upsert():
            j = next(counter)
            fresh = [store.Row(user_id=f"ub-{j % 50}", seq=r.seq + j * 1000, msg_id=f"{j}:{r.msg_id}",
                               bot_id=r.bot_id, role=r.role, text=r.text, ts=r.ts) for r in batch_rows]
            await store.upsert_batch(pool, fresh, vecs, embedder.model_id)
        lat["upsert batch of 256 (embedded beforehand)"] = await timed(upsert, 40)
        report["latency"] = lat

    await pool.close()
    name = "search_quality" if args.embedder == "wordllama" else f"search_quality_{args.embedder}"
    write_files(args.out, name, data=report)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
