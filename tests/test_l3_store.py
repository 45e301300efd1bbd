"""L3 store against a real Postgres 18 + pgvector (the `database_url` server).

Each test module run gets databases of its own on that server, so these tests
neither see nor disturb other modules' data.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import msgspec
import numpy as np
import pytest

from services.l3_semantic_indexer import store
from shared.embeddings import make_embedder
from tests.helpers import eventually

TS = "2026-11-26T07:00:00.000Z"


# ---------------------------------------------------------------- fixtures


async def _admin(url: str) -> asyncpg.Connection:
    return await asyncpg.connect(urlunsplit(urlsplit(url)._replace(path="/postgres")))


@pytest.fixture(scope="module")
async def new_database(database_url):
    """`await new_database()` -> URL of an empty database; all dropped at the end."""
    made = []

    async def make() -> str:
        name = f"l3test_{uuid.uuid4().hex[:12]}"
        conn = await _admin(database_url)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        made.append(name)
        return urlunsplit(urlsplit(database_url)._replace(path=f"/{name}"))

    yield make
    conn = await _admin(database_url)
    try:
        for name in made:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def embedder():
    return make_embedder("wordllama")


@pytest.fixture(scope="module")
async def pool(new_database, embedder):
    url = await new_database()
    p = await store.create_pool(url, model_id=embedder.model_id, dim=embedder.dim, max_size=8)
    yield p
    await p.close()


def rows(user: str, texts: list[str], seq0: int = 1, prefix: str = "m") -> list[store.Row]:
    return [store.Row(user_id=user, seq=seq0 + i, msg_id=f"{prefix}{seq0 + i}", bot_id="bot-1",
                      role="user" if i % 2 else "assistant", text=t, ts=TS)
            for i, t in enumerate(texts)]


async def put(pool, embedder, batch: list[store.Row], **kw) -> int:
    vectors = await embedder.embed([r.text for r in batch], input_type="document")
    return await store.upsert_batch(pool, batch, vectors, embedder.model_id, **kw)


def uid() -> str:
    return f"u-{uuid.uuid4().hex[:10]}"


# ---------------------------------------------------------------- migrations


async def test_migrations_twice_are_a_noop(new_database):
    url = await new_database()
    conn = await asyncpg.connect(url)
    try:
        first = await store.migrate(conn)
        assert first == sorted(first) and first[0].startswith("0001_")
        assert await store.migrate(conn) == []
        versions = await conn.fetch("SELECT version FROM l3.schema_migrations ORDER BY version")
        assert [r["version"] for r in versions] == [int(n.split("_")[0]) for n in first]
    finally:
        await conn.close()


async def test_concurrent_migrations_do_not_fail(new_database, embedder):
    url = await new_database()
    results = await asyncio.gather(*(store.create_pool(url, model_id=embedder.model_id,
                                                       dim=embedder.dim, max_size=1)
                                     for _ in range(6)))
    try:
        n = await results[0].fetchval("SELECT count(*) FROM l3.schema_migrations")
        assert n == len(list(store.MIGRATIONS_DIR.glob("*.sql")))
        models = await results[0].fetch("SELECT model_id FROM l3.embedding_models")
        assert [r["model_id"] for r in models] == [embedder.model_id]
    finally:
        for p in results:
            await p.close()


# ---------------------------------------------------------------- writes


async def test_upsert_is_idempotent_on_msg_id(pool, embedder):
    user = uid()
    batch = rows(user, ["hello there", "how are you"])
    assert await put(pool, embedder, batch) == 2
    assert await put(pool, embedder, batch) == 0  # re-delivery
    dup = store.Row(user_id=user, seq=99, msg_id="m1", bot_id="b", role="user", text="other", ts=TS)
    assert await put(pool, embedder, [dup, dup]) == 0  # same msg_id, even inside one batch
    msgs, seq = await store.recent(pool, user, 10)
    assert [m.text for m in msgs] == ["hello there", "how are you"]
    assert seq == 99  # processed, though not stored
    same_in_batch = rows(user, ["x", "y"], seq0=200)
    same_in_batch[1] = msgspec.structs.replace(same_in_batch[1], msg_id=same_in_batch[0].msg_id)
    assert await put(pool, embedder, same_in_batch) == 1


async def test_upsert_many_users_in_one_batch_and_watermark(pool, embedder):
    users = [uid() for _ in range(5)]
    batch = [r for i, u in enumerate(users) for r in rows(u, [f"line {j} of {u}" for j in range(3)],
                                                          seq0=1000 + 10 * i)]
    random.Random(1).shuffle(batch)
    assert await put(pool, embedder, batch, watermark=1042) == 15
    assert await store.applied_seq(pool) >= 1042
    for i, u in enumerate(users):
        msgs, seq = await store.recent(pool, u, 10)
        assert [m.seq for m in msgs] == [1000 + 10 * i + j for j in range(3)]
        assert seq == 1000 + 10 * i + 2
    assert await store.upsert_batch(pool, [], [], embedder.model_id, watermark=1043) == 0
    assert await store.applied_seq(pool) >= 1043


async def test_rejects_mismatched_vectors(pool, embedder):
    with pytest.raises(ValueError):
        await store.upsert_batch(pool, rows(uid(), ["a", "b"]), np.zeros((1, 256)), embedder.model_id)


# ---------------------------------------------------------------- recent


async def test_recent_newest_n_oldest_first(pool, embedder):
    user = uid()
    texts = [f"message {i}" for i in range(30)]
    batch = rows(user, texts, seq0=500)
    await put(pool, embedder, batch[15:])  # out of order delivery
    await put(pool, embedder, batch[:15])
    msgs, seq = await store.recent(pool, user, 10)
    assert [m.seq for m in msgs] == list(range(520, 530))
    assert [m.text for m in msgs] == texts[20:]
    assert seq == 529
    m = msgs[0]
    assert (m.msg_id, m.bot_id, m.role, m.ts, m.score) == ("m520", "bot-1", "assistant", TS, None)
    assert len((await store.recent(pool, user, 1000))[0]) == 30
    assert await store.recent(pool, uid(), 10) == ([], 0)


# ---------------------------------------------------------------- search

HISTORY = [
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
# Paraphrases the default embedder (wordllama) ranks first. It misses harder
# ones ("do they have pets" -> "...with two cats" ranks 3rd): a bag of
# static word vectors, see bench/results/search_quality.md.
PARAPHRASE_QUERIES = [
    ("what amount would they donate", "I could donate one dollar, I think."),
    ("where do they live", "I live in a small apartment in Chicago with two cats."),
    ("what is their job", "I work as a nurse at the city hospital on night shifts."),
    ("what do they do for work", "I work as a nurse at the city hospital on night shifts."),
    ("when should I phone them again", "Please call me back tomorrow morning after nine."),
    ("is it raining where they are", "The weather has been terrible all week, lots of rain."),
]


@pytest.mark.parametrize("plan", ["auto", "exact", "hnsw"])
async def test_search_finds_the_paraphrase_first(pool, embedder, plan):
    user = uid()
    await put(pool, embedder, rows(user, HISTORY))
    # another user with the same history must never show up
    await put(pool, embedder, rows(uid(), HISTORY))
    for query, target in PARAPHRASE_QUERIES:
        qv = (await embedder.embed([query], input_type="query"))[0]
        # the default fuses in full text, which may put a turn sharing the
        # query's word ("donate") ahead of the paraphrase: still in the top 3
        msgs, seq = await store.search(pool, user, query, qv, 3, embedder.model_id, plan=plan)
        assert target in [m.text for m in msgs], (query, [m.text for m in msgs])
        msgs, seq = await store.search(pool, user, query, qv, 3, embedder.model_id, plan=plan,
                                       fusion_candidates=0)
        assert msgs[0].text == target, (query, [m.text for m in msgs])
        assert seq == len(HISTORY)
        assert [m.score for m in msgs] == sorted((m.score for m in msgs), reverse=True)
        assert all(-1.0 <= m.score <= 1.0 for m in msgs)
        assert all(m.msg_id.startswith("m") for m in msgs)


async def test_search_scores_are_cosines(pool, embedder):
    """Vector only (fusion off): score is the cosine; the default hybrid's
    score is the fused rank score, still best first."""
    user = uid()
    await put(pool, embedder, rows(user, HISTORY))
    qv = (await embedder.embed([HISTORY[3]]))[0]
    msgs, _ = await store.search(pool, user, HISTORY[3], qv, 1, embedder.model_id, fusion_candidates=0)
    assert msgs[0].text == HISTORY[3] and msgs[0].score == pytest.approx(1.0, abs=1e-5)
    msgs, _ = await store.search(pool, user, HISTORY[3], qv, 3, embedder.model_id)
    assert msgs[0].text == HISTORY[3]
    assert [m.score for m in msgs] == sorted((m.score for m in msgs), reverse=True)


async def test_search_never_returns_another_users_rows(pool, embedder):
    """Property-style: many users sharing one vocabulary (even identical
    texts), random queries, every plan: results belong to the asked user, and
    a user gets min(k, own vectors) results."""
    rng = random.Random(42)
    vocabulary = HISTORY + [f"note {i} about the {w}" for i, w in
                            enumerate(["budget", "house", "donation", "children", "rent", "car"] * 5)]
    users = {uid(): rng.randint(1, 40) for _ in range(25)}
    batch = []
    seq = 10_000
    for user, n in users.items():
        texts = [rng.choice(vocabulary) for _ in range(n)]
        batch += rows(user, texts, seq0=seq, prefix=f"{user}/")
        seq += n
    rng.shuffle(batch)
    await put(pool, embedder, batch)
    queries = [rng.choice(vocabulary) for _ in range(8)] + ["money", "where do they live", "zzz qqq"]
    qvs = await embedder.embed(queries, input_type="query")
    for user, n in users.items():
        for q, qv in zip(rng.sample(queries, 3), rng.sample(list(qvs), 3)):
            k = rng.choice([1, 5, 10, 50])
            for kw in ({"plan": "auto"}, {"plan": "exact"}, {"plan": "hnsw"},
                       {"plan": "auto", "fusion_candidates": 0}, {"plan": "exact", "fusion_candidates": 0},
                       {"plan": "hnsw", "fusion_candidates": 0},
                       {"plan": "auto", "fusion_candidates": 20, "lexical": "ts_rank_cd"}):
                msgs, useq = await store.search(pool, user, q, qv, k, embedder.model_id, **kw)
                assert all(m.msg_id.startswith(f"{user}/") for m in msgs), (user, kw)
                if kw["plan"] != "hnsw":  # exact plans are complete
                    assert len(msgs) == min(k, n), (user, n, k, kw)
                assert len({m.msg_id for m in msgs}) == len(msgs)


async def test_hnsw_plan_uses_the_partial_index_and_exact_does_not(new_database, embedder):
    url = await new_database()
    p = await store.create_pool(url, model_id=embedder.model_id, dim=embedder.dim, max_size=2)
    try:
        rng = random.Random(5)
        big = rows("big-user", [f"{rng.choice(HISTORY)} #{i}" for i in range(3000)])
        small = [r for u in range(40) for r in rows(f"small-{u}", HISTORY[:5], prefix=f"s{u}-")]
        await put(p, embedder, big + small)
        await p.execute("ANALYZE l3.messages")
        sql = store._statements(embedder.model_id, embedder.dim)
        qv = store.encode_vector((await embedder.embed(["donate money"]))[0])
        plans = {}
        async with p.acquire() as conn:
            # a table this small may be cheaper to scan whole; what matters
            # here is that the partial index matches the statement at all
            await conn.execute("SET enable_seqscan = off")
            for plan in ("exact", "hnsw"):
                lines = await conn.fetch("EXPLAIN (COSTS OFF) " + sql["search_" + plan], "big-user", qv, 10, 5000,
                                        store.ALL)
                plans[plan] = "\n".join(r[0] for r in lines)
            await conn.execute("RESET enable_seqscan")
        assert "messages_hnsw_" in plans["hnsw"]
        assert "messages_hnsw_" not in plans["exact"]
        # the auto plan gates to HNSW above the threshold, exact below
        donate = (await embedder.embed(["donate"]))[0]
        for user, lim in (("big-user", 100), ("small-1", 100)):
            msgs, _ = await store.search(p, user, "", donate, 5, embedder.model_id, exact_max_rows=lim)
            assert len(msgs) == 5
    finally:
        await p.close()
    # An HNSW scan that stops early (max_scan_tuples) returns too few rows;
    # auto then answers exactly.
    one = await asyncpg.create_pool(url, min_size=1, max_size=1, init=store._init_connection,
                                    reset=store._no_reset)
    try:
        await one.execute("SET enable_seqscan = off; SET hnsw.max_scan_tuples = 1")
        short, _ = await store.search(one, "small-1", "", donate, 5, embedder.model_id, plan="hnsw")
        assert len(short) < 5
        full, _ = await store.search(one, "small-1", "", donate, 5, embedder.model_id, exact_max_rows=2)
        assert len(full) == 5 and all(m.msg_id.startswith("s1-") for m in full)
    finally:
        await one.close()


async def test_blank_text_has_no_vector_but_is_recent(pool, embedder):
    user = uid()
    await put(pool, embedder, rows(user, ["", "real words here"]))
    assert [m.text for m in (await store.recent(pool, user, 5))[0]] == ["", "real words here"]
    qv = (await embedder.embed(["words"]))[0]
    msgs, _ = await store.search(pool, user, "words", qv, 5, embedder.model_id)
    assert [m.text for m in msgs] == ["real words here"]
    assert await store.search(pool, user, "", np.zeros(embedder.dim), 5, embedder.model_id) == ([], 2)


async def test_nul_characters_do_not_poison_a_batch(pool, embedder):
    user = uid()
    batch = rows(user, ["before", "has a \x00 NUL", "after"])
    assert await put(pool, embedder, batch) == 3
    assert [m.text for m in (await store.recent(pool, user, 5))[0]] == ["before", "has a \ufffd NUL", "after"]


async def test_search_unknown_user_is_empty(pool, embedder):
    qv = (await embedder.embed(["anything"]))[0]
    for plan in ("auto", "exact", "hnsw"):
        assert await store.search(pool, uid(), "anything", qv, 5, embedder.model_id, plan=plan) == ([], 0)


async def test_fulltext_matches_any_word(pool, embedder):
    user = uid()
    await put(pool, embedder, rows(user, HISTORY))
    msgs = await store.fulltext(pool, user, "Chicago cats budget", 5)
    assert {m.text for m in msgs} == {HISTORY[6], HISTORY[7]}
    assert msgs[0].text == HISTORY[7]  # two words match


async def test_fulltext_bm25_weighs_rare_words_above_repeated_common_ones(pool, embedder):
    user = uid()
    texts = [f"the budget came up again, call {i}" for i in range(20)]
    texts += ["budget budget budget, always the budget", "we fly to Zanzibar in May"]
    await put(pool, embedder, rows(user, texts))
    msgs = await store.fulltext(pool, user, "budget for Zanzibar", 3)
    assert msgs[0].text == "we fly to Zanzibar in May"
    # cover density has no idf: the repeated common word wins there
    msgs = await store.fulltext(pool, user, "budget for Zanzibar", 3, lexical="ts_rank_cd")
    assert msgs[0].text == "budget budget budget, always the budget"


def _unit(dim: int, i: int) -> np.ndarray:
    v = np.zeros(dim, dtype=np.float32)
    v[i] = 1.0
    return v


@pytest.mark.parametrize("plan", ["auto", "exact", "hnsw"])
async def test_hybrid_finds_a_turn_only_full_text_can_see(pool, embedder, plan):
    """The answer shares a rare word with the question but its vector points
    elsewhere; 40 turns have vectors right next to the query's. Vector only
    misses it; the default (fused) search has it at the top."""
    user = uid()
    dim = embedder.dim
    rng = np.random.default_rng(1)
    texts = [f"we talked about the weather again, day {i}" for i in range(40)]
    near = [_unit(dim, 0) + 0.05 * rng.standard_normal(dim).astype(np.float32) for _ in texts]
    batch = rows(user, texts + ["My favourite skater is Rob Dryden."])
    await store.upsert_batch(pool, batch, near + [_unit(dim, 1)], embedder.model_id)
    query, qv = "which skater does Dryden like", _unit(dim, 0)
    vector_only, _ = await store.search(pool, user, query, qv, 10, embedder.model_id,
                                        plan=plan, fusion_candidates=0)
    assert "My favourite skater is Rob Dryden." not in [m.text for m in vector_only]
    fused, _ = await store.search(pool, user, query, qv, 10, embedder.model_id, plan=plan)
    assert "My favourite skater is Rob Dryden." in [m.text for m in fused[:2]], [m.text for m in fused]
    assert len(fused) == 10


async def test_fusion_keeps_users_apart_even_with_the_same_msg_ids(pool, embedder):
    """Full text is per user and the fused ids are joined back by (user, msg_id):
    another user's rows with the query's words and the very same msg_ids never
    leak in."""
    a, b = uid(), uid()
    await put(pool, embedder, rows(a, [f"our Zanzibar trip, part {i}" for i in range(30)]))
    await put(pool, embedder, rows(b, ["the kitchen needs new tiles", "we sold the old car",
                                       "the kids start school in May"]))
    for kw in ({}, {"lexical": "ts_rank_cd"}, {"plan": "hnsw"}):
        qv = (await embedder.embed(["Zanzibar trip"], input_type="query"))[0]
        msgs, seq = await store.search(pool, b, "Zanzibar trip", qv, 10, embedder.model_id, **kw)
        assert seq == 3 and len(msgs) <= 3
        assert all("Zanzibar" not in m.text for m in msgs), kw
        assert await store.fulltext(pool, b, "Zanzibar trip", 10) == []
        msgs, _ = await store.search(pool, a, "Zanzibar trip", qv, 10, embedder.model_id, **kw)
        assert len(msgs) == 10 and all("Zanzibar" in m.text for m in msgs), kw


async def test_full_text_reads_only_the_users_rows(pool, embedder):
    """The full-text candidates are found by an index whose condition is the
    user (the (user_id, tsv) GIN or the (user_id, seq) btree, as the planner
    prefers), never by a scan of every user's matches filtered afterwards."""
    sql = store._statements(embedder.model_id, embedder.dim)
    qv = store.encode_vector((await embedder.embed(["budget"]))[0])
    statements = ((store._fused_sql(embedder.model_id, embedder.dim, "auto", "bm25", 50),
                   ("u", qv, 10, 5000, store.ALL, "budget", 60, 1.0)),
                  (store._COMMON["fulltext_bm25"], ("u", "budget", 10)))
    async with pool.acquire() as conn:
        for statement, args in statements:
            plan = "\n".join(r[0] for r in await conn.fetch("EXPLAIN (COSTS OFF) " + statement, *args))
            tm = plan[plan.index("CTE tm"):plan.index("CTE tt")]
            assert any("Index Cond" in line and "'u'::text" in line for line in tm.splitlines()), tm
            assert "Seq Scan" not in tm, tm
        # and the full-text index does not lure plain per-user reads away
        # from the (user_id, seq) btree (a GIN bitmap of all the user's rows)
        plan = "\n".join(r[0] for r in await conn.fetch(
            "EXPLAIN (COSTS OFF) " + sql["search_exact"], "u", qv, 10, 5000, store.ALL))
        assert "messages_user_tsv" not in plan and "messages_user_seq" in plan, plan


# ---------------------------------------------------------------- forget


async def test_forget_deletes_only_that_user_and_blocks_resurrection(pool, embedder):
    a, b = uid(), uid()
    old_a = rows(a, ["a1", "a2", "a3"], seq0=10)
    await put(pool, embedder, old_a + rows(b, ["b1", "b2"], seq0=20))
    assert await store.forget(pool, a, 12) == 3
    assert (await store.recent(pool, a, 10))[0] == []
    assert [m.text for m in (await store.recent(pool, b, 10))[0]] == ["b1", "b2"]
    # the log re-delivers the old messages after the forget: they stay gone
    assert await put(pool, embedder, old_a) == 0
    assert (await store.recent(pool, a, 10))[0] == []
    # a message appended after the forget is stored
    assert await put(pool, embedder, rows(a, ["a new start"], seq0=13)) == 1
    assert [m.text for m in (await store.recent(pool, a, 10))[0]] == ["a new start"]
    # a later forget with a lower upto_seq does not lower the tombstone
    assert await store.forget(pool, a, 5) == 0
    assert await put(pool, embedder, old_a) == 0
    # forgetting up to the new message removes it too
    assert await store.forget(pool, a, 13) == 1
    assert await store.forget(pool, uid(), 100) == 0  # unknown user: fine


async def test_in_flight_batch_cannot_resurrect_a_forgotten_user(pool, embedder):
    """Order the two writes explicitly with the user's advisory lock held by a
    third connection: whichever goes first, nothing at or below upto_seq
    survives."""
    for batch_first in (True, False):
        user = uid()
        batch = rows(user, [f"line {i}" for i in range(20)], seq0=1)
        vectors = await embedder.embed([r.text for r in batch])
        async with pool.acquire() as blocker:
            tx = blocker.transaction()
            await tx.start()
            await blocker.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", store.USER_LOCK_NS, user)
            first = (store.upsert_batch(pool, batch, vectors, embedder.model_id) if batch_first
                     else store.forget(pool, user, 20))
            t1 = asyncio.create_task(first)
            await _wait_for_lock_waiters(pool, 1)
            second = (store.forget(pool, user, 20) if batch_first
                      else store.upsert_batch(pool, batch, vectors, embedder.model_id))
            t2 = asyncio.create_task(second)
            await _wait_for_lock_waiters(pool, 2)
            assert not t1.done() and not t2.done()
            await tx.rollback()
        r1, r2 = await t1, await t2
        if batch_first:
            assert (r1, r2) == (20, 20)  # inserted, then deleted
        else:
            assert (r1, r2) == (0, 0)  # nothing to delete, then all skipped
        assert (await store.recent(pool, user, 50))[0] == []


async def _wait_for_lock_waiters(pool, n: int) -> None:
    async def waiting():
        return await pool.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted") >= n

    await eventually(waiting, every=0.01, what=f"{n} lock waiters")


async def test_concurrent_batches_and_forget_stress(pool, embedder):
    user = uid()
    other = uid()
    batches = [rows(user, [f"t{b}-{i}" for i in range(10)], seq0=1 + b * 10) +
               rows(other, [f"o{b}-{i}" for i in range(3)], seq0=1000 + b * 3, prefix="o")
               for b in range(12)]
    vecs = [await embedder.embed([r.text for r in b]) for b in batches]

    async def write(i):
        await asyncio.sleep(random.random() * 0.02)  # scenario: the writers' order is shuffled
        return await store.upsert_batch(pool, batches[i], vecs[i], embedder.model_id)

    async def forget():
        await asyncio.sleep(0.01)  # scenario: the forget lands among the writes
        return await store.forget(pool, user, 120)

    await asyncio.gather(*(write(i) for i in range(12)), forget())
    assert (await store.recent(pool, user, 500))[0] == []
    assert len((await store.recent(pool, other, 500))[0]) == 36


# ---------------------------------------------------------------- models


async def test_model_switch_keeps_spaces_apart_and_reembed(new_database):
    url = await new_database()
    small = make_embedder("wordllama", dim=64)
    full = make_embedder("wordllama", dim=256)
    p = await store.create_pool(url, model_id=small.model_id, dim=small.dim, max_size=2)
    try:
        await put(p, small, rows("u", HISTORY))
        await store.ensure_model(p, full.model_id, full.dim)
        await put(p, full, rows("u", ["I could give five dollars to the charity."], seq0=100))
        qv = (await full.embed(["how much will they give"]))[0]
        msgs, _ = await store.search(p, "u", "", qv, 5, full.model_id)
        assert [m.seq for m in msgs] == [100]  # only rows of the query's model
        assert await store.stale_rows(p, full.model_id) == len(HISTORY)
        assert await store.reembed(p, full, batch=5) == len(HISTORY)
        assert await store.stale_rows(p, full.model_id) == 0
        msgs, _ = await store.search(p, "u", "", qv, 3, full.model_id)
        assert msgs[0].text in ("I could donate one dollar, I think.",
                                "I could give five dollars to the charity.")
        assert len((await store.search(p, "u", "", qv, 50, full.model_id))[0]) == len(HISTORY) + 1
        left = await p.fetch("SELECT model_id FROM l3.embedding_models")
        assert [r["model_id"] for r in left] == [full.model_id]  # the old index was dropped
        indexes = await p.fetchval("SELECT count(*) FROM pg_indexes WHERE indexname LIKE 'messages_hnsw_%'")
        assert indexes == 1
        with pytest.raises(ValueError, match="dim"):
            await store.ensure_model(p, full.model_id, 128)
    finally:
        await p.close()


def test_model_ids_are_validated():
    with pytest.raises(ValueError):
        store._statements("bad'; DROP TABLE x; --", 8)


async def test_reads_below_a_floor_leave_out_every_row_above_it(pool, embedder):
    """What the service does while an older message is still in another replica's batch."""
    user = uid()
    await put(pool, embedder, rows(user, ["the budget is tight", "we like the garden"], seq0=1)
              + rows(user, ["budget doubled", "garden too small"], seq0=5))
    msgs, newest = await store.recent(pool, user, 10, floor=4)
    assert ([m.seq for m in msgs], newest) == ([1, 2], 6)
    qv = (await embedder.embed(["budget garden"], input_type="query"))[0]
    for kw in ({"plan": "auto"}, {"plan": "exact"}, {"plan": "hnsw"}, {"fusion_candidates": 0},
               {"fusion_candidates": 20, "lexical": "ts_rank_cd"}):
        msgs, newest = await store.search(pool, user, "budget garden", qv, 10, embedder.model_id,
                                          floor=4, **kw)
        assert (sorted(m.seq for m in msgs), newest) == ([1, 2], 6), kw
    assert [await store.newest_upto(pool, user, f) for f in (0, 1, 4, 5, 99)] == [0, 1, 2, 5, 6]


async def test_the_halves_run_at_once_on_a_pool_fuse_exactly_as_the_one_statement_does(pool, embedder):
    """Given a pool, search runs its vector and BM25 halves on two connections and fuses
    them in Python; given one connection, it runs the single fused statement. Both give
    the same messages in the same order with the same scores, for every plan."""
    user = uid()
    texts = [f"we looked at the {w} house on {s} street, budget {b}k" for w, s, b in
             zip(["blue", "red", "old", "big", "small", "corner", "quiet", "new"] * 5,
                 ["Main", "Oak", "Pine", "Elm", "Lake"] * 8, range(300, 700, 10))]
    texts += ["my dog Rex loves the park", "we need a garage for two cars", "financing is pre-approved"]
    await put(pool, embedder, rows(user, texts))
    questions = ["what budget for the Oak street house?", "does the lead have a dog?",
                 "garage", "pre-approved financing", "nothing matches zzz"]
    assert isinstance(pool, asyncpg.Pool)
    for q in questions:
        qv = (await embedder.embed([q], input_type="query"))[0]
        for kw in ({}, {"plan": "hnsw"}, {"plan": "exact"}, {"fusion_candidates": 5, "text_weight": 3.0}):
            together, seq_a = await store.search(pool, user, q, qv, 7, embedder.model_id, **kw)
            async with pool.acquire() as conn:
                alone, seq_b = await store.search(conn, user, q, qv, 7, embedder.model_id, **kw)
            assert seq_a == seq_b
            assert [(m.msg_id, m.text) for m in together] == [(m.msg_id, m.text) for m in alone], (q, kw)
            assert [m.score for m in together] == pytest.approx([m.score for m in alone]), (q, kw)
    other = uid()
    msgs, _ = await store.search(pool, other, "budget", qv, 7, embedder.model_id)
    assert msgs == []


def test_fuse_weights_the_text_list_and_breaks_ties_by_id():
    assert store.fuse(["a", "b"], ["b", "c"], 3, rrf_k=60, text_weight=2.0) == [
        ("b", pytest.approx(1 / 62 + 2 / 61)), ("c", pytest.approx(2 / 62)), ("a", pytest.approx(1 / 61))]
    assert [m for m, _ in store.fuse(["y", "x"], [], 2, rrf_k=0, text_weight=1.0)] == ["y", "x"]
    assert store.fuse(["b"], ["a"], 2, rrf_k=0, text_weight=1.0) == [("a", 1.0), ("b", 1.0)]
