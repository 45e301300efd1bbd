"""Running totals for `llm.stats`, kept in Redis so every replica adds to one set."""

from __future__ import annotations

import msgspec
from redis.asyncio import Redis

from shared.contract import Usage

KEY = "llm:stats"

class StatsRequest(msgspec.Struct):
    pass


class StatsReply(msgspec.Struct):
    requests: int = 0
    hits_exact: int = 0
    hits_semantic: int = 0
    misses: int = 0
    uncached: int = 0
    upstream_calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    cost_usd: float = 0.0
    saved_usd: float = 0.0
    hit_rate: float = 0.0


async def record(redis: Redis, outcome: str, usage: Usage | None, cost: float, saved: float) -> None:
    pipe = redis.pipeline(transaction=False)
    pipe.hincrby(KEY, "requests", 1)
    pipe.hincrby(KEY, outcome, 1)
    if usage is not None:
        pipe.hincrby(KEY, "upstream_calls", 1)
        for field in Usage.__struct_fields__:
            pipe.hincrby(KEY, field, getattr(usage, field))
    pipe.hincrbyfloat(KEY, "cost_usd", cost)
    pipe.hincrbyfloat(KEY, "saved_usd", saved)
    await pipe.execute()


async def read(redis: Redis) -> StatsReply:
    raw = {k.decode(): v.decode() for k, v in (await redis.hgetall(KEY)).items()}
    reply = msgspec.convert(raw, StatsReply, strict=False)
    hits = reply.hits_exact + reply.hits_semantic
    reply.hit_rate = round(hits / reply.requests, 4) if reply.requests else 0.0
    return reply
