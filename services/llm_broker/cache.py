"""The two tiers of the response cache, and invalidation.

Exact tier, Redis: `llm:x:<exact key>` -> the entry (msgpack); Redis's own
expiry only collects garbage, freshness is always judged against the entry's
absolute `expires_at` by the caller's clock. Semantic tier, Postgres:
`llm.entries`, nearest neighbours inside one partition; `sweep` deletes the
expired rows (nothing else would: a hit never reads them, and no TTL applies).

Per user, Redis keeps `llm:{u}:keys` (every exact key the user's requests
created) and `llm:{u}:inv` (when the user last spoke). Storing an answer that
was computed before the user's latest message is refused, so an in-flight
miss cannot re-insert what an invalidation just removed; for the invalidating
classes, likewise one computed before `llm:distrust_before` (when a broker
last found that change events may have been lost, `policy.stale`).

What the stores raise when they are down, slow or refuse is `STORE_ERRORS`:
the broker turns it into a miss, or a 503 where nothing else can answer.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import asyncpg
import msgspec
import numpy as np
from pgvector.asyncpg import register_vector
from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared import lastseq, pg

from .policy import Entry

MIGRATIONS = Path(__file__).with_name("migrations")
GC_GRACE_S = 60
INV_TTL_S = 86400 * 2  # longer than any entry lives
DISTRUST = "llm:distrust_before"

# Redis down or refusing; Postgres down, refusing, or past `command_timeout`
# (asyncpg raises TimeoutError, and InterfaceError for a connection it lost).
STORE_ERRORS = (RedisError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)

_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(Entry)

# Store only if the entry was computed after the user's last invalidation
# (and, for an invalidating class, ARGV[4] = 1, after the last distrust).
PUT = """
local inv = tonumber(redis.call('GET', KEYS[2]) or '0')
if ARGV[4] == '1' then
  local distrust = tonumber(redis.call('GET', KEYS[4]) or '0')
  if distrust > inv then inv = distrust end
end
if tonumber(ARGV[3]) < inv then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('SADD', KEYS[3], KEYS[1])
return 1
"""

# Users spoke: KEYS are their `inv` marks, then their key indexes; set the marks
# to ARGV[1] (expiring after ARGV[2] s) and return the indexes. One script call:
# a pipeline of a command per user costs ~10x more client time.
MARK_SPOKE = """
local n = #KEYS / 2
for i = 1, n do redis.call('SET', KEYS[i], ARGV[1], 'EX', ARGV[2]) end
local indexes = {}
for i = n + 1, #KEYS do indexes[#indexes + 1] = redis.call('SMEMBERS', KEYS[i]) end
return indexes
"""

# Move the distrust time forward, never back (brokers' clocks differ a little).
DISTRUST_SINCE = """
local was = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) > was then redis.call('SET', KEYS[1], ARGV[1]) end
return 1
"""


def _user_keys(user_id: str) -> tuple[str, str]:
    return f"llm:{{{user_id}}}:inv", f"llm:{{{user_id}}}:keys"


def _int(raw: bytes | None) -> int | None:
    return None if raw is None else int(raw)


class Candidate(msgspec.Struct):
    entry: Entry
    similarity: float


class Fence(msgspec.Struct):
    """What a hit of an invalidating class is checked against (`policy.stale`), read with
    the exact lookup: the newest user-message seq of the users read so far, and the distrust time."""

    user_seqs: dict[str, int | None]
    distrust_before: float


class ResponseCache:
    def __init__(self, redis: Redis, pool: asyncpg.Pool, model_id: str) -> None:
        self.redis = redis
        self.pool = pool
        self.model_id = model_id
        self._put = redis.register_script(PUT)
        self._distrust = redis.register_script(DISTRUST_SINCE)
        self._mark_spoke = redis.register_script(MARK_SPOKE)

    @classmethod
    async def open(cls, redis: Redis, dsn: str, model_id: str,
                   command_timeout: float) -> "ResponseCache":
        """Migrate, then a pool whose every statement gives up after `command_timeout`
        seconds: a stuck Postgres costs a request a miss, not its whole deadline."""
        conn = await asyncpg.connect(dsn)
        try:
            await pg.migrate(conn, schema="llm", directory=MIGRATIONS)
        finally:
            await conn.close()
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=10, init=register_vector,
                                         command_timeout=command_timeout)
        return cls(redis, pool, model_id)

    async def close(self) -> None:
        await self.pool.close()

    # --- exact ---------------------------------------------------------------

    async def get_exact(self, key: str) -> Entry | None:
        raw = await self.redis.get(f"llm:x:{key}")
        return None if raw is None else _dec.decode(raw)

    async def get_exact_fenced(self, key: str, user_id: str | None) -> tuple[Entry | None, Fence]:
        """`get_exact` and, in the same round trip, the `Fence` for `user_id`'s hits."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(f"llm:x:{key}")
        pipe.get(DISTRUST)
        if user_id is not None:
            pipe.get(lastseq.key(user_id))
        raw, distrust, *seq = await pipe.execute()
        fence = Fence({user_id: _int(seq[0])} if seq else {}, float(distrust or 0))
        return (None if raw is None else _dec.decode(raw)), fence

    async def user_seq(self, user_id: str) -> int | None:
        """The seq of the user's newest own message, as the l2-gateway recorded it."""
        return _int(await self.redis.get(lastseq.key(user_id)))

    # --- semantic ------------------------------------------------------------

    async def nearest(self, partition: str, vector: np.ndarray, now: float,
                      limit: int = 3) -> list[Candidate]:
        rows = await self.pool.fetch(
            "SELECT entry, 1 - (embedding <=> $2) AS similarity FROM llm.entries "
            "WHERE partition = $1 AND expires_at > $3 AND embedding_model = $4 "
            "ORDER BY embedding <=> $2 LIMIT $5",
            partition, vector, now, self.model_id, limit)
        return [Candidate(_dec.decode(r["entry"]), float(r["similarity"])) for r in rows]

    # --- writes --------------------------------------------------------------

    async def put(self, entry: Entry, vector: np.ndarray | None, computed_at: float,
                  invalidating: bool) -> bool:
        """Store in both tiers unless the user spoke after `computed_at` (or, for an
        `invalidating` class, change events may have been lost since)."""
        inv, index = _user_keys(entry.user_id)
        ttl = int(entry.expires_at - entry.created_at) + GC_GRACE_S
        stored = await self._put(keys=[f"llm:x:{entry.id}", inv, index, DISTRUST],
                                 args=[_enc.encode(entry), ttl, computed_at, int(invalidating)])
        if stored and vector is not None:
            await self.pool.execute(
                "INSERT INTO llm.entries (id, partition, user_id, volatility, embedding_model,"
                " embedding, entry, expires_at) VALUES ($1,$2,$3,$4,$5,$6,$7,$8) "
                "ON CONFLICT (id) DO UPDATE SET embedding = EXCLUDED.embedding,"
                " entry = EXCLUDED.entry, expires_at = EXCLUDED.expires_at",
                entry.id, entry.partition, entry.user_id, entry.volatility, self.model_id,
                vector, _enc.encode(entry), entry.expires_at)
        return bool(stored)

    async def evict_id(self, entry_id: str) -> bool:
        """Drop one entry from both tiers; True if either held it."""
        in_redis = await self.redis.delete(f"llm:x:{entry_id}")
        in_pg = await self.pool.execute("DELETE FROM llm.entries WHERE id = $1", entry_id)
        return bool(in_redis) or in_pg != "DELETE 0"

    async def invalidate(self, user_ids: Collection[str], classes: list[str], now: float) -> int:
        """These users spoke: drop their entries of the invalidating classes.

        Four round trips however many users: their `inv` marks (so that an
        answer computed before them is not stored after the drop) and their
        key indexes; one DELETE in Postgres; the indexed entries; the deletes.
        Returns the entries dropped (the larger tier's count). Safe to repeat.
        """
        users = list(user_ids)
        marks = [_user_keys(u) for u in users]
        indexes = await self._mark_spoke(keys=[m[0] for m in marks] + [m[1] for m in marks],
                                         args=[repr(now), INV_TTL_S])
        in_pg = await self.pool.fetchval(
            "WITH gone AS (DELETE FROM llm.entries WHERE user_id = ANY($1) AND volatility = ANY($2)"
            " RETURNING 1) SELECT count(*) FROM gone", users, classes)
        keys = [k for index in indexes for k in index]
        values = dict(zip(keys, await self.redis.mget(keys))) if keys else {}
        pipe = self.redis.pipeline(transaction=False)
        dropped = 0
        for (_, index_key), index in zip(marks, indexes):
            doomed = [k for k in index
                      if values[k] is not None and _dec.decode(values[k]).volatility in classes]
            gone = [k for k in index if values[k] is None]  # expired: prune the index
            if doomed:
                pipe.delete(*doomed)
                dropped += len(doomed)
            if doomed or gone:
                pipe.srem(index_key, *doomed, *gone)
        if len(pipe):
            await pipe.execute()
        return max(dropped, in_pg)

    async def distrust(self, since: float) -> None:
        """Every broker refuses invalidating-class entries created before `since`."""
        await self._distrust(keys=[DISTRUST], args=[repr(since)])

    async def forget(self, user_id: str, now: float) -> int:
        """Drop every entry the user's requests created, in both tiers; an answer in
        flight (computed from the user's text before `now`) is not stored after it."""
        inv, index = _user_keys(user_id)
        await self.redis.set(inv, repr(now), ex=86400 * 2)
        keys = list(await self.redis.smembers(index))
        if keys:
            await self.redis.delete(*keys)
        await self.redis.delete(index)
        deleted = await self.pool.execute("DELETE FROM llm.entries WHERE user_id = $1", user_id)
        return max(len(keys), int(deleted.split()[-1]))

    async def sweep(self, now: float, batch: int) -> int:
        """Delete up to `batch` semantic rows that expired (with `GC_GRACE_S` for clock
        skew between replicas); rows another replica is deleting are skipped."""
        return await self.pool.fetchval(
            "WITH gone AS (DELETE FROM llm.entries WHERE id IN (SELECT id FROM llm.entries"
            " WHERE expires_at < $1 ORDER BY expires_at LIMIT $2 FOR UPDATE SKIP LOCKED)"
            " RETURNING 1) SELECT count(*) FROM gone", now - GC_GRACE_S, batch)
