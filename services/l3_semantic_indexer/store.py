"""L3 storage: every message of every user (within retention) in Postgres + pgvector.

All SQL of the L3 tier is in this module and in migrations/*.sql. The
indexer's consumer calls `upsert_batch`; the `memory.l3.get` handler calls
`recent` and `search`; the forget path calls `forget`; the retention sweeper
`retire_older` and `retire_beyond`. Every call is one round trip (a hybrid search: two, side by side); the
functions take the pool so the service owns its lifetime.

    pool = await create_pool(dsn, model_id=embedder.model_id, dim=embedder.dim)
    vectors = await embedder.embed([r.text for r in rows], input_type="document")
    inserted = await upsert_batch(pool, rows, vectors, embedder.model_id)
    messages, seq = await recent(pool, "lead-42", 10)
    qv = (await embedder.embed([query], input_type="query"))[0]
    messages, seq = await search(pool, "lead-42", query, qv, 5, embedder.model_id)  # hybrid
    deleted = await forget(pool, "lead-42", upto_seq)
    deleted = await retire_older(pool, below_seq, 1000)  # retention, in batches

Why it is built this way:

* **Idempotent writes.** The log is at-least-once. Rows are keyed by
  (user_id, msg_id) and inserted with ON CONFLICT DO NOTHING, so a
  re-delivered batch inserts nothing and reports 0.
* **Forget wins races.** `upsert_batch` and `forget` are plpgsql functions
  (migrations/0002) that take a per-user transaction advisory lock before
  touching rows (a batch takes its users' locks in sorted order); forget
  records a tombstone (user, upto_seq) that later batches honour. An
  in-flight batch cannot resurrect a forgotten user, and a message
  re-delivered after the forget stays gone.
* **One round trip per call.** A batch of any size is one function call with
  array parameters (unnest); recent is one statement, and so is search on
  one connection. Given a pool, a hybrid search sends its two halves on two
  connections at once (one round trip of wall time each, side by side).
* **One vector space per model.** Vectors carry `embedding_model`; search
  compares the query only with rows of the query's model. Each model gets a
  partial HNSW index over `embedding::vector(dim)` WHERE embedding_model =
  '<model>' (`ensure_model`), so switching EMBEDDER needs no table rewrite:
  `reembed(pool, embedder)` re-embeds old rows in batches, and until it is
  done those rows are found by `recent` (and full text), not by vector.
* **Per-user search that is exact when it can be.** Filtering an HNSW scan
  by user drops rows after the index scan, so a user with few rows would get
  fewer than k results. Users with at most `EXACT_MAX_ROWS` rows are
  searched exactly (all their vectors via the (user_id, seq) index: recall
  1.0 and fast); bigger histories use the HNSW index with pgvector 0.8's
  iterative scan (hnsw.iterative_scan = relaxed_order) so the user filter
  still yields k rows. The choice is made inside the one statement from
  l3.user_state.n_rows, which the write functions keep current.
* **Hybrid ranking, per user.** `search` fuses the vector candidates with
  full-text candidates ranked by BM25 (reciprocal rank fusion): questions
  about a chat history share rare words with the turn that answers them
  (names, numbers, nouns) that a static embedding blurs. Full text reads
  only the asking user's rows through a (hashtext(user_id), tsv) GIN
  index, so its cost follows the user's size, not the table's. The two
  halves run at once on two of the pool's connections: one after the other
  a 10,000-row user's p95 was their sum (bench/results/search_quality.md).
* **Cheap pool.** Connections set jit=off and the hnsw settings at connect
  time; the pool's per-release reset (RESET ALL etc., one extra round trip)
  is replaced by a no-op, which is safe because nothing here leaves session
  state behind: locks are transaction-scoped, there are no LISTENs or
  cursors, and asyncpg still rolls back a transaction left open.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import re
import struct
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import asyncpg
import msgspec
import numpy as np
import structlog

from shared.contract import Message, format_ts
from shared.pg import MIGRATE_LOCK, Pool, connection
from shared.pg import migrate as _migrate

log = structlog.get_logger()


MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
SCHEMA = "l3"

#: namespace of the per-user locks taken in migrations/0002 ('l3mu')
USER_LOCK_NS = 1815309685

#: users with at most this many rows are searched exactly (measured
#: crossover: bench/results/search_quality.md; 5,000 at 127k stored rows,
#: but at 1M an HNSW scan filtered to a user of 5,000-10,000 rows is slower
#: than the exact scan and often stops short)
EXACT_MAX_ROWS = 10_000
#: HNSW candidate list per connection (pgvector default 40); k above it is
#: still served in full thanks to the iterative scan
HNSW_EF_SEARCH = 64
#: vector and full-text candidates fused by `search` (0: vector only);
#: chosen on the dev half of bench/data/dialogue_qa (bench/results/search_quality.md)
FUSION_CANDIDATES = 50
RRF_K = 60
#: weight of the full-text list in the fusion (the vector list weighs 1)
TEXT_WEIGHT = 2.0
#: full-text ranking of the fusion: Okapi BM25 or Postgres' ts_rank_cd
LEXICAL = ("bm25", "ts_rank_cd")
BM25_K1 = 1.2
BM25_B = 0.75

#: a `floor` that excludes nothing (the largest bigint)
ALL = 2**63 - 1

_MODEL_ID_RE = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,200}$")
_VEC_HEADER = struct.Struct(">HH")


class Row(msgspec.Struct, frozen=True, kw_only=True):
    """One message to index: a log entry and its stream sequence.

    `ts` is the log entry's RFC 3339 string (or a datetime; naive = UTC).
    """

    user_id: str
    seq: int
    msg_id: str
    bot_id: str
    role: str
    text: str
    ts: datetime | str


class TransientError(Exception):
    """Postgres is unreachable, restarting, out of connections, or the
    statement hit a deadlock/serialization failure or a timeout: retrying
    the same call later may succeed. Any other exception is a bug or bad
    input and will fail again."""


_TRANSIENT = (
    asyncpg.PostgresConnectionError,  # class 08
    asyncpg.exceptions.OperatorInterventionError,  # 57: admin shutdown, cannot connect now
    asyncpg.exceptions.InsufficientResourcesError,  # 53: too many connections, disk full
    asyncpg.exceptions.TransactionRollbackError,  # 40: deadlock, serialization failure
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.ConnectionFailureError,
    ConnectionError,
    TimeoutError,
)


# --------------------------------------------------------------------------
# connections


def encode_vector(value: Any) -> bytes:
    """pgvector binary format; accepts bytes (already encoded), ndarrays, lists."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return value
    arr = np.asarray(value, dtype=">f4")
    if arr.ndim != 1:
        raise ValueError(f"a vector must be 1-d, got shape {arr.shape}")
    return _VEC_HEADER.pack(arr.shape[0], 0) + arr.tobytes()


def decode_vector(data: bytes) -> np.ndarray:
    dim, _ = _VEC_HEADER.unpack_from(data)
    return np.frombuffer(data, dtype=">f4", count=dim, offset=4).astype(np.float32)


async def register_vector(conn: asyncpg.Connection) -> None:
    """The `vector` codec (binary): encode ndarrays/lists/pre-encoded bytes,
    decode to float32 ndarrays. Like `pgvector.asyncpg.register_vector`, but
    lists of pre-encoded vectors can be sent as `vector[]` (the batch insert),
    which pgvector's codec cannot (asyncpg descends into the ndarrays)."""
    await conn.set_type_codec(
        "vector", schema="public", encoder=encode_vector, decoder=decode_vector, format="binary"
    )


async def _init_connection(conn: asyncpg.Connection) -> None:
    await register_vector(conn)
    # jit: an exact scan of a big user is costed high enough to trigger JIT
    # compilation (tens of ms) for a query that runs in a few ms.
    await conn.execute(
        "SET jit = off; SET hnsw.iterative_scan = relaxed_order; "
        f"SET hnsw.ef_search = {HNSW_EF_SEARCH}"
    )


async def _no_reset(conn: asyncpg.Connection) -> None:
    """Pool release hook: nothing to undo (see module doc)."""


async def migrate(target: Pool) -> list[str]:
    """Apply L3's migrations (see `shared.pg.migrate`)."""
    return await _migrate(target, schema=SCHEMA, directory=MIGRATIONS_DIR)


async def create_pool(dsn: str, *, model_id: str | None = None, dim: int | None = None,
                      min_size: int = 1, max_size: int = 10, **kwargs: Any) -> asyncpg.Pool:
    """Migrate the database, register `model_id` (if given) and its HNSW
    index, then open an asyncpg pool: vector codec, jit off, hnsw settings,
    no-op reset.

    Migrations run first, on a connection of their own, because the pool's
    connections need the `vector` type to exist to register its codec. Both
    steps are idempotent and take the migration lock, so many replicas may
    start at once; when there is nothing to do they cost a few ms.
    """
    conn = await asyncpg.connect(dsn, **{k: v for k, v in kwargs.items() if k in _CONNECT_KW})
    try:
        await migrate(conn)
        if model_id is not None:
            if dim is None:
                raise ValueError("create_pool: model_id needs dim")
            await ensure_model(conn, model_id, dim)
    finally:
        await conn.close()
    return await asyncpg.create_pool(
        dsn, min_size=min_size, max_size=max_size, init=_init_connection, reset=_no_reset, **kwargs
    )


_CONNECT_KW = frozenset({"ssl", "timeout", "command_timeout", "server_settings", "user",
                         "password", "database", "host", "port"})


# --------------------------------------------------------------------------
# migrations





def _index_expression(dim: int) -> tuple[str, str] | None:
    """(cast, opclass) of the HNSW index for vectors of `dim`, or None when
    pgvector cannot index that size (then search is always exact)."""
    if dim <= 2000:
        return f"vector({dim})", "vector_cosine_ops"
    if dim <= 4000:  # e.g. text-embedding-3-large: index as half precision
        return f"halfvec({dim})", "halfvec_cosine_ops"
    return None


def _sql_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


async def ensure_model(target: Pool, model_id: str, dim: int) -> str | None:
    """Register `model_id` and create its partial HNSW index if missing
    (under the migration lock). Returns the index name (None: not indexable).
    New models have no rows yet, so the build is quick."""
    if not _MODEL_ID_RE.match(model_id):
        raise ValueError(f"model id {model_id!r} has characters other than [A-Za-z0-9._:@/+=-]")
    index_name = "messages_hnsw_" + hashlib.sha256(model_id.encode()).hexdigest()[:16]
    expr = _index_expression(dim)
    async with connection(target) as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1, $2)", *MIGRATE_LOCK)
        known = await conn.fetchval(f"SELECT dim FROM {SCHEMA}.embedding_models WHERE model_id = $1", model_id)
        if known is not None and known != dim:
            raise ValueError(f"model {model_id!r} is stored with dim {known}, not {dim}")
        if known is None:
            await conn.execute(
                f"INSERT INTO {SCHEMA}.embedding_models (model_id, dim, index_name) VALUES ($1, $2, $3)",
                model_id, dim, index_name if expr else "",
            )
        if expr is None:
            return None
        cast, opclass = expr
        await conn.execute(
            f"CREATE INDEX IF NOT EXISTS {index_name} ON {SCHEMA}.messages "
            f"USING hnsw ((embedding::{cast}) {opclass}) "
            f"WHERE embedding_model = {_sql_literal(model_id)}"
        )
    return index_name


# --------------------------------------------------------------------------
# writes


@functools.lru_cache(maxsize=16)
def _statements(model_id: str, dim: int) -> dict[str, str]:
    if not _MODEL_ID_RE.match(model_id):
        raise ValueError(f"model id {model_id!r} has characters other than [A-Za-z0-9._:@/+=-]")
    return _build_sql(model_id, int(dim))


async def upsert_batch(pool: Pool, rows: Sequence[Row], vectors: Any, model_id: str,
                       *, watermark: int | None = None) -> int:
    """Insert `rows` with their `vectors` (an (n, dim) array from
    `Embedder.embed`, or a sequence of 1-d arrays / None) as vectors of
    `model_id`, in one round trip; returns how many rows were new.

    Rows already stored (same user_id, msg_id) and rows of a forgotten user
    at or below the tombstone are skipped. NUL characters, which Postgres
    text cannot hold, are stored as U+FFFD. Each user's processed max_seq
    advances for every row seen, inserted or not. All-zero vectors (text with
    nothing to embed) are stored as NULL. `watermark`, when given, raises the
    global progress mark (`applied_seq`) in the same transaction: pass the
    highest stream seq of a batch only if every lower seq is processed.
    """
    if not rows:
        if watermark is not None:
            await run(pool.execute, _COMMON["watermark"], watermark)
        return 0
    if len(vectors) != len(rows):
        raise ValueError(f"{len(rows)} rows but {len(vectors)} vectors")
    if not _MODEL_ID_RE.match(model_id):
        raise ValueError(f"model id {model_id!r} has characters other than [A-Za-z0-9._:@/+=-]")
    return await run(
        pool.fetchval,
        _COMMON["upsert"],
        [_pg_text(r.user_id) for r in rows],
        [r.seq for r in rows],
        [_pg_text(r.msg_id) for r in rows],
        [_pg_text(r.bot_id) for r in rows],
        [_pg_text(r.role) for r in rows],
        [_pg_text(r.text) for r in rows],
        [_to_datetime(r.ts) for r in rows],
        encode_vectors(vectors),
        model_id,
        watermark,
    )


def encode_vectors(vectors: Any) -> list[bytes | None]:
    """Rows of `vectors` in pgvector's binary format, for a `vector[]`
    parameter (one numpy conversion for the whole batch). Zero, non-finite
    and None rows become None (no vector)."""
    if isinstance(vectors, np.ndarray) and vectors.ndim == 2:
        matrix = vectors.astype(np.float32, copy=False)
        usable = np.isfinite(matrix).all(axis=1) & matrix.any(axis=1)
        big_endian = matrix.astype(">f4")
        header = _VEC_HEADER.pack(matrix.shape[1], 0)
        return [header + big_endian[i].tobytes() if ok else None for i, ok in enumerate(usable)]
    out: list[bytes | None] = []
    for v in vectors:
        if v is None:
            out.append(None)
            continue
        arr = np.asarray(v, dtype=np.float32).reshape(-1)
        out.append(encode_vector(arr) if np.isfinite(arr).all() and arr.any() else None)
    return out


async def forget(pool: Pool, user_id: str, upto_seq: int) -> int:
    """Delete the user's rows with seq <= upto_seq and leave a tombstone so
    that re-deliveries at or below it are never stored again; returns the
    number of rows deleted. Rows above upto_seq (appended after the purge
    point) stay. Waits for an in-flight batch holding the user's lock."""
    return await run(pool.fetchval, _COMMON["forget"], user_id, upto_seq)


async def retire_older(pool: Pool, below_seq: int, batch: int) -> int:
    """Delete up to `batch` rows (any users') with seq < `below_seq`; returns how many."""
    return await run(pool.fetchval, _COMMON["retire_older"], below_seq, batch)


async def retire_beyond(pool: Pool, keep: int, batch: int) -> int:
    """Delete up to `batch` rows that are not among their user's newest `keep`; returns how
    many. Users are found by `user_state.n_rows` (a scan of one row per user)."""
    return await run(pool.fetchval, _COMMON["retire_beyond"], keep, batch)


# --------------------------------------------------------------------------
# reads


async def recent(pool: Pool, user_id: str, n: int, *,
                 floor: int = ALL) -> tuple[list[Message], int]:
    """The user's newest `n` messages at or below seq `floor`, oldest first,
    and the newest seq of the user this tier has processed (0: none; it can be
    above the last message's when newer ones were forgotten or skipped, or
    above `floor`). One index range scan."""
    rows = await run(pool.fetch, _COMMON["recent"], user_id, n, floor)
    return [to_message(r) for r in rows if r["seq"] is not None], rows[0]["max_seq"] or 0


async def search(pool: Pool, user_id: str, query_text: str, query_vec: Any, k: int,
                 model_id: str, *, floor: int = ALL, plan: str = "auto",
                 exact_max_rows: int = EXACT_MAX_ROWS,
                 fusion_candidates: int = FUSION_CANDIDATES, lexical: str = "bm25",
                 text_weight: float = TEXT_WEIGHT) -> tuple[list[Message], int]:
    """Up to `k` of the user's messages at or below seq `floor` that best
    answer the query, best first, and the user's newest processed seq (which
    may be above `floor`).

    Hybrid by default: the top `fusion_candidates` by vector (cosine with
    `query_vec`) and the top as many by full text (`query_text`'s words,
    any of them, ranked by `lexical`: BM25 over the user's rows, or
    ts_rank_cd) are fused by weighted reciprocal rank fusion, and `score` is
    the fused score (higher is better, not a cosine). Chat questions share
    words with the turn that answers them that a static embedding blurs
    (names, numbers, rare nouns); BM25 finds those, the vector finds
    paraphrases: on long-conversation QA the fusion beats either alone
    (bench/results/search_quality.md). `fusion_candidates=0`: vector only,
    `score` = cosine similarity.

    Only this user's rows, and only vectors of `model_id` (the query's
    space), are ever considered. `plan`: "auto" = exact scan of the user's
    vectors when the user has at most `exact_max_rows` rows (recall 1.0),
    else the model's HNSW index with iterative scan (and, should that scan
    stop short of the rows asked of it, exact after all); "exact" / "hnsw"
    force one (tests, benchmarks). A zero query vector (nothing to embed)
    matches nothing.
    """
    if plan not in ("auto", "exact", "hnsw"):
        raise ValueError(f"plan must be auto, exact or hnsw, not {plan!r}")
    if lexical not in LEXICAL:
        raise ValueError(f"lexical must be one of {LEXICAL}, not {lexical!r}")
    vec = np.asarray(query_vec, dtype=np.float32).reshape(-1)
    sql = _statements(model_id, vec.shape[0])
    if not np.isfinite(vec).all() or not vec.any():
        return [], await user_seq(pool, user_id)
    encoded = encode_vector(vec)
    if fusion_candidates > 0 and isinstance(pool, asyncpg.Pool):
        return await _search_halves(pool, user_id, query_text or "", encoded, vec.shape[0], k, model_id,
                                    floor, plan, exact_max_rows, max(fusion_candidates, k), text_weight)
    if fusion_candidates > 0:
        def statement(p: str) -> str:
            return _fused_sql(model_id, vec.shape[0], p, lexical, max(fusion_candidates, k))
        args: tuple = (query_text or "", RRF_K, float(text_weight))
    else:
        def statement(p: str) -> str:
            return sql["search_" + p]
        args = ()
    rows = await run(pool.fetch, statement(plan), user_id, encoded, k, exact_max_rows, floor, *args)
    found, wanted = sum(1 for r in rows if r["seq"] is not None), k
    if fusion_candidates > 0:  # the vector half, which full-text hits must not hide
        found, wanted = rows[0]["n_vec"], max(fusion_candidates, k)
    if plan == "auto" and found < wanted and (rows[0]["n_rows"] or 0) > exact_max_rows:
        # the HNSW scan stopped (hnsw.max_scan_tuples) before enough rows of
        # this user passed the filter: answer completely, exactly
        rows = await run(pool.fetch, statement("exact"), user_id, encoded, k, exact_max_rows,
                          floor, *args)
    return ([to_message(r, r["score"]) for r in rows if r["seq"] is not None],
            rows[0]["max_seq"] or 0)


async def _search_halves(pool: asyncpg.Pool, user_id: str, query_text: str, encoded: bytes, dim: int,
                         k: int, model_id: str, floor: int, plan: str, exact_max_rows: int,
                         candidates: int, text_weight: float) -> tuple[list[Message], int]:
    """`search`'s fusion with its two halves on two connections at once: one
    after the other in one statement, a 10,000-row user's hybrid p95 was about
    the sum of the halves' (vector ~10 ms, BM25 up to ~9 ms for a question with
    a common word; bench/results/search_quality.md). The halves read rows at
    or below `floor` only, so their two snapshots agree on what they may see."""
    text_sql = _halves_sql(model_id, dim, plan, candidates)[1]

    async def vector(p: str):
        return await run(pool.fetch, _halves_sql(model_id, dim, p, candidates)[0], user_id, encoded, k,
                         exact_max_rows, floor)

    vec_rows, text_rows = await asyncio.gather(vector(plan), run(pool.fetch, text_sql, user_id, query_text, floor))
    hits = [r for r in vec_rows if r["msg_id"] is not None]
    if plan == "auto" and len(hits) < candidates and (vec_rows[0]["n_rows"] or 0) > exact_max_rows:
        vec_rows = await vector("exact")  # the HNSW scan stopped short: exactly, as in `search`
        hits = [r for r in vec_rows if r["msg_id"] is not None]
    by_id = {r["msg_id"]: r for r in text_rows}
    by_id.update((r["msg_id"], r) for r in hits)
    fused = fuse([r["msg_id"] for r in hits], [r["msg_id"] for r in text_rows], k,
                 text_weight=text_weight)
    return [to_message(by_id[mid], score) for mid, score in fused], vec_rows[0]["max_seq"] or 0


async def fulltext(pool: Pool, user_id: str, query_text: str, k: int, *,
                   lexical: str = "bm25") -> list[Message]:
    """The user's full-text matches of any of the query's words, best first
    by `lexical` (BM25 or ts_rank_cd; score = that rank's score). Full text
    alone, for benchmarks and diagnostics; `search` fuses it with vectors."""
    if lexical not in LEXICAL:
        raise ValueError(f"lexical must be one of {LEXICAL}, not {lexical!r}")
    rows = await run(pool.fetch, _COMMON["fulltext_" + lexical], user_id, query_text, k)
    return [to_message(r, r["score"]) for r in rows]


async def user_seq(pool: Pool, user_id: str) -> int:
    """Newest seq of the user this tier has processed (0: none)."""
    return await run(pool.fetchval, _COMMON["user_seq"], user_id) or 0


async def newest_upto(pool: Pool, user_id: str, floor: int) -> int:
    """Seq of the user's newest message at or below `floor` (0: none)."""
    return await run(pool.fetchval, _COMMON["newest_upto"], user_id, floor) or 0


async def applied_seq(pool: Pool) -> int:
    """Global progress: the highest `watermark` given to `upsert_batch` (0: none)."""
    return await run(pool.fetchval, _COMMON["applied_seq"]) or 0


async def max_seq(pool: Pool) -> int:
    """Highest seq processed for any user, or the watermark if higher (0: empty)."""
    return await run(pool.fetchval, _COMMON["max_seq"]) or 0


# --------------------------------------------------------------------------
# model changes


async def stale_rows(pool: Pool, model_id: str) -> int:
    """Rows whose vector is of another model than `model_id` (invisible to
    vector search with that model until `reembed` has run)."""
    return await run(pool.fetchval, _COMMON["stale_count"], model_id)


async def reembed(pool: Pool, embedder: Any, *, batch: int = 256) -> int:
    """Re-embed with `embedder`, in batches, every row whose `embedding_model`
    differs from `embedder.model_id`; returns the number of rows updated.

    Registers the model (and its index) first. Safe while the indexer writes
    (a row is updated only if it still has the old model) and safe to
    interrupt and re-run. Afterwards drops the HNSW index of every model
    that no row uses any more.
    """
    await ensure_model(pool, embedder.model_id, embedder.dim)
    total = 0
    after = ("", "")
    while True:
        rows = await run(pool.fetch, _COMMON["stale_batch"], after[0], after[1], batch,
                          embedder.model_id)
        if not rows:
            break
        after = (rows[-1]["user_id"], rows[-1]["msg_id"])
        vectors = await embedder.embed([r["text"] for r in rows], input_type="document")
        status = await run(
            pool.execute,
            _COMMON["reembed_update"],
            [r["user_id"] for r in rows],
            [r["msg_id"] for r in rows],
            [r["embedding_model"] for r in rows],
            encode_vectors(vectors),
            embedder.model_id,
        )
        total += int(status.split()[-1])  # "UPDATE <n>"
    await drop_unused_models(pool, embedder.model_id)
    return total


async def drop_unused_models(pool: Pool, keep_model_id: str) -> list[str]:
    """Drop the HNSW index and registration of every model other than
    `keep_model_id` that no row uses any more; returns the ids dropped."""
    dropped = []
    async with connection(pool) as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1, $2)", *MIGRATE_LOCK)
        for r in await conn.fetch(_COMMON["unused_models"], keep_model_id):
            if r["index_name"]:
                await conn.execute(f"DROP INDEX IF EXISTS {SCHEMA}.{r['index_name']}")
            await conn.execute(f"DELETE FROM {SCHEMA}.embedding_models WHERE model_id = $1",
                               r["model_id"])
            dropped.append(r["model_id"])
    return dropped


# --------------------------------------------------------------------------
# helpers


async def run(call, *args):
    """Run one pool call, turning "try again later" failures into TransientError."""
    try:
        return await call(*args)
    except _TRANSIENT as exc:
        raise TransientError(f"{type(exc).__name__}: {exc}") from exc


def _pg_text(value: str) -> str:
    """Postgres text cannot hold NUL ("\\u0000" is valid JSON): store U+FFFD
    instead, so one such message cannot fail its whole batch forever."""
    return value.replace("\x00", "\ufffd") if "\x00" in value else value


def _to_datetime(ts: datetime | str) -> datetime:
    if isinstance(ts, datetime):
        return ts if ts.tzinfo else ts.replace(tzinfo=timezone.utc)
    parsed = datetime.fromisoformat(ts)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def to_message(r: asyncpg.Record, score: float | None = None) -> Message:
    return Message(seq=r["seq"], msg_id=r["msg_id"], role=r["role"], bot_id=r["bot_id"],
                   text=r["text"], ts=format_ts(r["ts"]),
                   score=None if score is None else float(score))


COLUMNS = "m.seq, m.msg_id, m.role, m.bot_id, m.text, m.ts"
# full-text query of the text's words, any of them (websearch_to_tsquery and
# plainto_tsquery AND every word, which a paraphrase rarely satisfies)
_TSQUERY = "(SELECT replace(plainto_tsquery('english', {p})::text, ' & ', ' | ')::tsquery AS q) qq"


def _bm25_ctes(user: str, query: str, floor: str, limit: str, n_rows: str) -> str:
    """CTEs ending in `tr(msg_id, s, r)`: the user's top `limit` rows by Okapi
    BM25 for the words of `query` (SQL expressions: `user`, `query`, the seq
    `floor`, `limit`, and `n_rows` = the user's row count, N of the idf).

    Candidates are the user's rows at or below `floor` holding any query
    word, found through the (hashtext(user_id), tsv) index: every such row
    is read, so each word's document frequency is exact. Term frequency is taken as 1
    (a chat turn rarely repeats a word; it saves unpacking every candidate's
    tsvector: each row is tested against the few query words instead), a
    row's length is its count of distinct words and avgdl the candidates'
    mean. Scores: bench/results/search_quality.md."""
    k1, b = BM25_K1, BM25_B
    return f"""
        qt AS MATERIALIZED (
            SELECT replace(plainto_tsquery('english', {query})::text, ' & ', ' | ')::tsquery AS q,
                   array(SELECT quote_literal(w)::tsquery
                         FROM unnest(tsvector_to_array(to_tsvector('english', {query}))) w) AS words),
        tm AS MATERIALIZED (
            SELECT m.msg_id, m.tsv, length(m.tsv) AS dl FROM {SCHEMA}.messages m
            WHERE hashtext(m.user_id) = hashtext({user}) AND m.user_id = {user}
              AND m.seq <= {floor} AND m.tsv @@ (SELECT q FROM qt)),
        tt AS MATERIALIZED (
            SELECT tm.msg_id, tm.dl, w.i FROM tm, qt, generate_subscripts(qt.words, 1) AS w(i)
            WHERE tm.tsv @@ qt.words[w.i]),
        cs AS (SELECT greatest(({n_rows}), (SELECT count(*) FROM tm), 1)::float8 AS n,
                      greatest((SELECT avg(dl) FROM tm), 1)::float8 AS avgdl),
        idf AS (SELECT i, ln(1 + (cs.n - count(*) + 0.5) / (count(*) + 0.5)) AS idf
                FROM tt, cs GROUP BY i, cs.n),
        tr AS (SELECT msg_id, s, row_number() OVER (ORDER BY s DESC, msg_id) AS r FROM (
                   SELECT tt.msg_id,
                          sum(idf.idf * {k1 + 1} / (1 + {k1} * (1 - {b} + {b} * tt.dl / cs.avgdl))) AS s
                   FROM tt JOIN idf USING (i), cs
                   GROUP BY tt.msg_id ORDER BY s DESC, tt.msg_id LIMIT {limit}) x)"""


def _build_common_sql() -> dict[str, str]:
    """The statements that do not depend on the embedding model."""
    cols = COLUMNS
    return {
        "upsert": f"SELECT {SCHEMA}.upsert_messages($1, $2, $3, $4, $5, $6, $7, $8::vector[], $9, $10)",
        "forget": f"SELECT {SCHEMA}.forget($1, $2)",
        # retention: pick a batch, then retire it (migrations/0003) under the users' locks
        "retire_older": f"""
            SELECT {SCHEMA}.retire(array_agg(user_id), array_agg(msg_id))
            FROM (SELECT user_id, msg_id FROM {SCHEMA}.messages WHERE seq < $1 LIMIT $2) old""",
        "retire_beyond": f"""
            SELECT {SCHEMA}.retire(array_agg(x.user_id), array_agg(x.msg_id))
            FROM (SELECT m.user_id, m.msg_id
                  FROM (SELECT user_id FROM {SCHEMA}.user_state WHERE n_rows > $1 LIMIT $2) o
                  CROSS JOIN LATERAL (
                      SELECT user_id, msg_id FROM {SCHEMA}.messages
                      WHERE user_id = o.user_id ORDER BY seq DESC OFFSET $1 LIMIT $2) m
                  LIMIT $2) x""",
        "watermark": f"""
            INSERT INTO {SCHEMA}.progress AS p (name, applied_seq) VALUES ('log', $1)
            ON CONFLICT (name) DO UPDATE SET applied_seq = greatest(p.applied_seq, excluded.applied_seq)""",
        # LEFT JOINs from a one-row relation: max_seq comes back even when
        # the user has no message (then one row of NULL message columns)
        "recent": f"""
            SELECT s.max_seq, r.*
            FROM (SELECT 1) one
            LEFT JOIN {SCHEMA}.user_state s ON s.user_id = $1
            LEFT JOIN LATERAL (
                SELECT {cols} FROM {SCHEMA}.messages m
                WHERE m.user_id = $1 AND m.seq <= $3 ORDER BY m.seq DESC LIMIT $2
            ) r ON true
            ORDER BY r.seq""",
        "fulltext_ts_rank_cd": f"""
            SELECT {cols}, ts_rank_cd(m.tsv, qq.q) AS score
            FROM {SCHEMA}.messages m, {_TSQUERY.format(p='$2')}
            WHERE hashtext(m.user_id) = hashtext($1) AND m.user_id = $1 AND m.tsv @@ qq.q
            ORDER BY score DESC, m.msg_id
            LIMIT $3""",
        # the same BM25 as search's fusion (_bm25_ctes)
        "fulltext_bm25": f"""
            WITH {_bm25_ctes("$1", "$2", str(ALL), "$3",
                             f"SELECT n_rows FROM {SCHEMA}.user_state WHERE user_id = $1")}
            SELECT {cols}, tr.s AS score
            FROM tr JOIN {SCHEMA}.messages m ON m.user_id = $1 AND m.msg_id = tr.msg_id
            ORDER BY tr.r""",
        "user_seq": f"SELECT max_seq FROM {SCHEMA}.user_state WHERE user_id = $1",
        "newest_upto": f"SELECT max(seq) FROM {SCHEMA}.messages WHERE user_id = $1 AND seq <= $2",
        "applied_seq": f"SELECT applied_seq FROM {SCHEMA}.progress WHERE name = 'log'",
        "max_seq": f"""SELECT greatest((SELECT max(max_seq) FROM {SCHEMA}.user_state),
                                       (SELECT applied_seq FROM {SCHEMA}.progress WHERE name = 'log'))""",
        "stale_count": f"SELECT count(*) FROM {SCHEMA}.messages WHERE embedding_model <> $1",
        # keyset pagination over the primary key: each batch is an index range
        "stale_batch": f"""
            SELECT user_id, msg_id, text, embedding_model FROM {SCHEMA}.messages
            WHERE (user_id, msg_id) > ($1, $2) AND embedding_model <> $4
            ORDER BY user_id, msg_id LIMIT $3""",
        # only rows still of their old model: a concurrent write is not undone
        "reembed_update": f"""
            UPDATE {SCHEMA}.messages m SET embedding = u.embedding, embedding_model = $5
            FROM unnest($1::text[], $2::text[], $3::text[], $4::vector[])
                 AS u(user_id, msg_id, old_model, embedding)
            WHERE m.user_id = u.user_id AND m.msg_id = u.msg_id
              AND m.embedding_model = u.old_model""",
        "unused_models": f"""
            SELECT model_id, index_name FROM {SCHEMA}.embedding_models e
            WHERE model_id <> $1
              AND NOT EXISTS (SELECT 1 FROM {SCHEMA}.messages WHERE embedding_model = e.model_id)""",
    }


def _build_sql(model_id: str, dim: int, limit: str = "$3", *, columns: bool = True) -> dict[str, str]:
    """The vector search statements of one model, returning `limit` rows ($3
    = k; _fused_sql passes a literal). The model id and dim are literals
    (validated by _MODEL_ID_RE, never user input) so that the planner can
    prove the partial HNSW index applies even to a generic prepared plan.

    The scans carry only (msg_id, distance), with the distance computed once
    a row (ORDER BY the selected column): an exact scan of a 10,000-row user
    spent about a third of its time computing the cosine twice a row (score
    and sort key) and carrying every row's text into the top-N sort
    (bench/results/search_quality.md). The message columns are read for the
    winners only (`columns`; the fusion reads them after fusing)."""
    m = _sql_literal(model_id)
    expr = _index_expression(dim)
    cast = expr[0] if expr else f"vector({dim})"
    state = f"(SELECT n_rows, max_seq FROM {SCHEMA}.user_state WHERE user_id = $1)"
    # exact: all of the user's vectors of this model, via (user_id, seq); the
    # ORDER BY uses the uncast column, which no HNSW index can serve.
    exact = f"""
        SELECT msg_id, 1 - d AS score FROM (
            SELECT m.msg_id, m.embedding <=> $2 AS d
            FROM {SCHEMA}.messages m
            WHERE m.user_id = $1 AND m.seq <= $5 AND m.embedding_model = {m}
              AND m.embedding IS NOT NULL
            ORDER BY d
            LIMIT {limit}) x"""
    # hnsw: the partial index of this model; the iterative scan goes on until
    # k rows pass the user filter; relaxed order, so re-sorted outside. The
    # user and floor filters are written so that no btree index can serve
    # them: otherwise a generic prepared plan (asyncpg prepares every
    # statement) may pick the (user_id, seq) index + sort here too (Postgres
    # 18 skip-scans it for the seq bound alone), and big users never get HNSW.
    # (Here the ORDER BY must be the indexed expression itself for the index
    # to serve it, so the distance is written twice; the index computes it.)
    hnsw = f"""
        SELECT m.msg_id, 1 - (m.embedding::{cast} <=> $2::vector::{cast}) AS score
        FROM {SCHEMA}.messages m
        WHERE (m.user_id || '') = $1 AND (m.seq + 0) <= $5 AND m.embedding_model = {m}
        ORDER BY m.embedding::{cast} <=> $2::vector::{cast}
        LIMIT {limit}"""
    if expr is None:
        hnsw = exact

    def gated(body_exact: str, body_hnsw: str, plan: str) -> str:
        # ($4 appears in every variant so its type is always known)
        if plan == "exact":
            cond_e, cond_h = "$4::bigint IS NOT NULL OR true", "false"
        elif plan == "hnsw":
            cond_e, cond_h = "false", "$4::bigint IS NOT NULL OR true"
        else:
            cond_e = "coalesce((SELECT n_rows FROM st), 0) <= $4"
            cond_h = "coalesce((SELECT n_rows FROM st), 0) > $4"
        # Both branches are planned; their one-time filters (InitPlans on
        # st) let only the chosen one run. The LEFT JOIN from a one-row
        # relation returns max_seq even when nothing matches.
        found = (f"(hits JOIN {SCHEMA}.messages m ON m.user_id = $1 AND m.msg_id = hits.msg_id)"
                 if columns else "hits")
        return f"""
        WITH st AS MATERIALIZED {state},
        hits AS MATERIALIZED (
            (SELECT * FROM ({body_exact}) e WHERE {cond_e})
            UNION ALL
            (SELECT * FROM ({body_hnsw}) h WHERE {cond_h})
        )
        SELECT (SELECT max_seq FROM st) AS max_seq, (SELECT n_rows FROM st) AS n_rows,
               {COLUMNS if columns else "hits.msg_id"}, hits.score, $3::int AS k
        FROM (SELECT 1) one LEFT JOIN {found} ON true
        ORDER BY hits.score DESC NULLS LAST, hits.msg_id"""

    sql = {}
    for plan in ("auto", "exact", "hnsw"):
        sql["search_" + plan] = gated(exact, hnsw, plan)
    return sql


@functools.lru_cache(maxsize=64)
def _halves_sql(model_id: str, dim: int, plan: str, candidates: int) -> tuple[str, str]:
    """The fusion's two halves as statements of their own, for `search` to run
    at once on two connections: the top `candidates` by vector ($1 user, $2
    vector, $3 k, $4 exact_max_rows, $5 floor) and by BM25 ($1 user, $2 query
    text, $3 floor), each with the message columns, best first."""
    n = int(candidates)
    vec = _build_sql(model_id, dim, str(n))["search_" + plan]
    text = f"""
        WITH {_bm25_ctes("$1", "$2", "$3", str(n),
                         f"SELECT n_rows FROM {SCHEMA}.user_state WHERE user_id = $1")}
        SELECT {COLUMNS}, tr.r FROM tr JOIN {SCHEMA}.messages m ON m.user_id = $1 AND m.msg_id = tr.msg_id
        ORDER BY tr.r"""
    return vec, text


def fuse(vector_ids: Sequence[str], text_ids: Sequence[str], k: int, *, rrf_k: int = RRF_K,
         text_weight: float = TEXT_WEIGHT) -> list[tuple[str, float]]:
    """Weighted reciprocal rank fusion of two ranked id lists (best first): the top
    `k` (id, score), by score, ties by id. The same arithmetic as _fused_sql's."""
    scores: dict[str, float] = {}
    for r, mid in enumerate(vector_ids, 1):
        scores[mid] = scores.get(mid, 0.0) + 1.0 / (rrf_k + r)
    for r, mid in enumerate(text_ids, 1):
        scores[mid] = scores.get(mid, 0.0) + text_weight / (rrf_k + r)
    return sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:k]


@functools.lru_cache(maxsize=64)
def _fused_sql(model_id: str, dim: int, plan: str, lexical: str, candidates: int) -> str:
    """Weighted reciprocal rank fusion of the top `candidates` vector hits and
    the top `candidates` full-text hits. Parameters: $1 user, $2 vector, $3 k,
    $4 exact_max_rows, $5 floor, $6 query text, $7 RRF k, $8 the text list's
    weight. `candidates` is a literal: with a LIMIT parameter the generic
    plan of the HNSW branch is a sort of every row (measured: 240 ms at 1M
    rows), with a literal it is the index scan.

    Full text reads only this user's rows: the (hashtext(user_id), tsv) GIN
    index (migrations/0004) finds the rows holding any query word, so other
    users' matches are never touched. bm25: see _bm25_ctes; ts_rank_cd: Postgres'
    cover density (no idf)."""
    n = int(candidates)
    vec = _build_sql(model_id, dim, str(n), columns=False)["search_" + plan]
    if lexical == "bm25":
        text = _bm25_ctes("$1", "$6", "$5", str(n), "SELECT max(n_rows) FROM v") + ","
    else:
        text = f"""
        tr AS (SELECT m.msg_id, row_number() OVER (ORDER BY ts_rank_cd(m.tsv, qq.q) DESC, m.msg_id) AS r
               FROM {SCHEMA}.messages m, {_TSQUERY.format(p='$6')}
               WHERE hashtext(m.user_id) = hashtext($1) AND m.user_id = $1
                 AND m.seq <= $5 AND m.tsv @@ qq.q
               ORDER BY ts_rank_cd(m.tsv, qq.q) DESC, m.msg_id LIMIT {n}),"""
    return f"""
        WITH v AS ({vec}),
        vr AS (SELECT msg_id, row_number() OVER (ORDER BY score DESC, msg_id) AS r
               FROM v WHERE msg_id IS NOT NULL),{text}
        f AS (SELECT msg_id, sum(w / ($7 + r)) AS rrf FROM
              (SELECT msg_id, r, 1.0 AS w FROM vr UNION ALL SELECT msg_id, r, $8::float8 FROM tr) c
              GROUP BY msg_id ORDER BY rrf DESC, msg_id LIMIT $3)
        SELECT (SELECT max(max_seq) FROM v) AS max_seq, (SELECT max(n_rows) FROM v) AS n_rows,
               (SELECT count(*) FROM vr) AS n_vec, {COLUMNS}, f.rrf AS score
        FROM (SELECT 1) one
        LEFT JOIN (f JOIN {SCHEMA}.messages m ON m.user_id = $1 AND m.msg_id = f.msg_id) ON true
        ORDER BY f.rrf DESC NULLS LAST, m.msg_id"""


_COMMON = _build_common_sql()
