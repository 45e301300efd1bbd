"""The two tiers of the response cache, and invalidation.

Exact tier, Redis: `llm:x:<exact key>` -> the entry (msgpack); Redis's own
expiry only collects garbage, freshness is always judged against the entry's
absolute `expires_at` by the caller's clock. Semantic tier, Postgres:
`llm.entries`, nearest neighbours inside one partition.

Per user, Redis keeps `llm:{u}:keys` (every exact key the user's requests
created) and `llm:{u}:inv` (when the user last spoke). Storing an answer that
was computed before the user's latest message is refused, so an in-flight
miss cannot re-insert what an invalidation just removed.
"""

from __future__ import annotations

from pathlib import Path

import asyncpg
import msgspec
import numpy as np
from pgvector.asyncpg import register_vector
from redis.asyncio import Redis

from shared import pg

from .policy import Entry

MIGRATIONS = Path(__file__).with_name("migrations")
GC_GRACE_S = 60

_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(Entry)

# Store only if the entry was computed after the user's last invalidation.
PUT = """
local inv = tonumber(redis.call('GET', KEYS[2]) or '0')
if tonumber(ARGV[3]) < inv then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('SADD', KEYS[3], KEYS[1])
return 1
"""


def _user_keys(user_id: str) -> tuple[str, str]:
    return f"llm:{{{user_id}}}:inv", f"llm:{{{user_id}}}:keys"


class Candidate(msgspec.Struct):
    entry: Entry
    similarity: float


class ResponseCache:
    def __init__(self, redis: Redis, pool: asyncpg.Pool, model_id: str) -> None:
        self.redis = redis
        self.pool = pool
        self.model_id = model_id
        self._put = redis.register_script(PUT)

    @classmethod
    async def open(cls, redis: Redis, dsn: str, model_id: str) -> "ResponseCache":
        conn = await asyncpg.connect(dsn)
        try:
            await pg.migrate(conn, schema="llm", directory=MIGRATIONS)
        finally:
            await conn.close()
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=10, init=register_vector)
        return cls(redis, pool, model_id)

    async def close(self) -> None:
        await self.pool.close()

    # --- exact ---------------------------------------------------------------

    async def get_exact(self, key: str) -> Entry | None:
        raw = await self.redis.get(f"llm:x:{key}")
        return None if raw is None else _dec.decode(raw)

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

    async def put(self, entry: Entry, vector: np.ndarray | None, computed_at: float) -> bool:
        """Store in both tiers unless the user spoke after `computed_at`."""
        inv, index = _user_keys(entry.user_id)
        ttl = int(entry.expires_at - entry.created_at) + GC_GRACE_S
        stored = await self._put(keys=[f"llm:x:{entry.id}", inv, index],
                                 args=[_enc.encode(entry), ttl, computed_at])
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

    async def invalidate(self, user_id: str, classes: list[str], now: float) -> int:
        """The user spoke: drop their entries of the invalidating classes."""
        inv, index = _user_keys(user_id)
        await self.redis.set(inv, repr(now), ex=86400 * 2)
        deleted = await self.pool.fetch(
            "DELETE FROM llm.entries WHERE user_id = $1 AND volatility = ANY($2) RETURNING id",
            user_id, classes)
        keys = list(await self.redis.smembers(index))
        values = await self.redis.mget(keys) if keys else []
        doomed = [k for k, raw in zip(keys, values)
                  if raw is not None and _dec.decode(raw).volatility in classes]
        gone = [k for k, raw in zip(keys, values) if raw is None]  # expired: prune the index
        if doomed:
            await self.redis.delete(*doomed)
        if doomed or gone:
            await self.redis.srem(index, *doomed, *gone)
        return max(len(doomed), len(deleted))

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
