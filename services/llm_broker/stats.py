"""Running totals for `llm.stats`, kept in Redis so every replica adds to one set."""

from __future__ import annotations

import msgspec
from redis.asyncio import Redis

from shared.contract import LLMStatsReply, Usage

KEY = "llm:stats"


class Totals:
    """Counts in memory, added to the shared Redis hash by `flush` every so often.

    Writing to Redis on every reply cost a hit ~150 µs; a flush per interval
    costs one pipeline whatever the request rate.
    """

    def __init__(self) -> None:
        self._ints: dict[str, int] = {}
        self._floats: dict[str, float] = {}

    def add(self, outcome: str, usage: Usage | None, cost: float, saved: float) -> None:
        ints = self._ints
        ints["requests"] = ints.get("requests", 0) + 1
        ints[outcome] = ints.get(outcome, 0) + 1
        if usage is not None:
            ints["upstream_calls"] = ints.get("upstream_calls", 0) + 1
            for name in Usage.__struct_fields__:
                ints[name] = ints.get(name, 0) + getattr(usage, name)
        self._floats["cost_usd"] = self._floats.get("cost_usd", 0.0) + cost
        self._floats["saved_usd"] = self._floats.get("saved_usd", 0.0) + saved

    async def flush(self, redis: Redis) -> None:
        """Add what was counted since the last flush; kept for the next one if Redis fails."""
        if not self._ints:
            return
        ints, floats = self._ints, self._floats
        self._ints, self._floats = {}, {}
        pipe = redis.pipeline(transaction=False)
        for name, value in ints.items():
            pipe.hincrby(KEY, name, value)
        for name, value in floats.items():
            pipe.hincrbyfloat(KEY, name, value)
        try:
            await pipe.execute()
        except BaseException:
            for name, value in ints.items():
                self._ints[name] = self._ints.get(name, 0) + value
            for name, value in floats.items():
                self._floats[name] = self._floats.get(name, 0.0) + value
            raise


async def read(redis: Redis) -> LLMStatsReply:
    raw = {k.decode(): v.decode() for k, v in (await redis.hgetall(KEY)).items()}
    reply = msgspec.convert(raw, LLMStatsReply, strict=False)
    hits = reply.hits_exact + reply.hits_semantic
    reply.hit_rate = round(hits / reply.requests, 4) if reply.requests else 0.0
    return reply
