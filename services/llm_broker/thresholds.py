"""Per-partition guard thresholds, raised by the freshness-auditor's verdicts.

A partition starts at the guard's fitted threshold. Every audited hit is
counted per partition in Redis (`llm:audit:<partition>`: checks, wrong); a
wrong semantic hit moves the partition's threshold to
`guard.tightened(current, wrong, checks)`, stored in the hash
`llm:thresholds` that every broker replica reloads every few seconds. Serving
reads only the in-process copy (a dict lookup): no Redis call on the hit path.
Partitions nobody has found wrong are not stored at all.

In vCache's spirit, a partition earns a loose threshold by passing checks and
loses it by failing them; this never loosens on its own (see `tightened`).
"""

from __future__ import annotations

import asyncio

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from . import guard

log = structlog.get_logger()
KEY = "llm:thresholds"
AUDIT_PREFIX = "llm:audit:"
AUDIT_TTL_S = 7 * 86400
RELOAD_S = 5.0


class Thresholds:
    def __init__(self, redis: Redis, default: float) -> None:
        self.redis = redis
        self.default = default
        self._by_partition: dict[str, float] = {}

    def get(self, partition: str) -> float:
        return self._by_partition.get(partition, self.default)

    async def load(self) -> None:
        raw = await self.redis.hgetall(KEY)
        self._by_partition = {k.decode(): float(v) for k, v in raw.items()}

    async def follow(self, every_s: float = RELOAD_S) -> None:
        """Background loop: pick up what other replicas' verdicts changed."""
        while True:
            await asyncio.sleep(every_s)
            try:
                await self.load()
            except (RedisError, OSError, ValueError) as exc:
                log.warning("thresholds_not_reloaded", error=str(exc))

    async def record(self, partition: str, wrong: bool, *, tighten: bool) -> float:
        """Count one audited hit; returns the partition's threshold after it."""
        key = AUDIT_PREFIX + partition
        pipe = self.redis.pipeline(transaction=False)
        pipe.hincrby(key, "checks", 1)
        pipe.hincrby(key, "wrong", int(wrong))
        pipe.expire(key, AUDIT_TTL_S)
        checks, wrongs, _ = await pipe.execute()
        current = self.get(partition)
        if not (wrong and tighten):
            return current
        raised = guard.tightened(current, int(wrongs), int(checks))
        if raised > current:
            await self.redis.hset(KEY, partition, repr(raised))
            self._by_partition[partition] = raised
            log.warning("partition_threshold_raised", partition=partition, threshold=raised,
                        wrong=int(wrongs), checks=int(checks))
        return raised
