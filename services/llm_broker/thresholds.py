"""Per-partition guard thresholds that keep the false-hit bound, shared by every replica.

A partition starts at the guard's fitted threshold (level 0 of `bound.grid`).
Each audited hit (`llm.verdict`) runs one Lua script (`RECORD`) that counts
it in `llm:audit:<partition>` and applies `bound.decide`: tighten or loosen
one level, or stay. The script is the only writer of the partition's level,
of its threshold in the hash `llm:thresholds` (a partition at level 0 is not
stored) and of its move counter in `llm:threshold_versions`, so replicas
racing on verdicts of one partition are applied one after the other: no
replica can overwrite another's tighter threshold with a value it computed
from an older read.

Every replica reloads the two hashes every few seconds (`follow`); serving
reads only the in-process copy (a dict lookup, no Redis call on the hit
path). A replica keeps a partition's copy that is newer (higher version)
than a reload that was read before it, so a slow reload cannot bring back a
looser threshold either.

If a partition's counts expire (`AUDIT_TTL_S` without a verdict) while its
threshold is stored, the script starts again from the stored threshold's
level (rounded up to the grid: never looser), not from level 0.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared.llm_config import check_rate

from . import bound, guard

log = structlog.get_logger()
KEY = "llm:thresholds"
VERSIONS = "llm:threshold_versions"
AUDIT_PREFIX = "llm:audit:"
AUDIT_TTL_S = 7 * 86400
RELOAD_S = 5.0

# KEYS: audit counts, thresholds, versions. ARGV: partition, wrong (0/1), semantic (0/1),
# score ("" if none), threshold served at ("" if none), max rate, z, ttl, grid (level 0..top).
# Mirrors bound.counts and bound.decide; returns level, threshold, version, checks and wrong at
# the level, total checks and wrong of the partition, and the move ("tightened", "loosened", "").
RECORD = """
local audit, thresholds, versions = KEYS[1], KEYS[2], KEYS[3]
local partition = ARGV[1]
local wrong = ARGV[2] == '1'
local semantic = ARGV[3] == '1'
local score, served_at = tonumber(ARGV[4]), tonumber(ARGV[5])
local max_rate, z, ttl = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local top = #ARGV - 9
local EPS = 1e-9
local total = redis.call('HINCRBY', audit, 'checks', 1)
local total_wrong = redis.call('HINCRBY', audit, 'wrong', wrong and 1 or 0)
local s = redis.call('HMGET', audit, 'level', 'n', 'w')
local level, n, w = tonumber(s[1]), tonumber(s[2]) or 0, tonumber(s[3]) or 0
if level == nil then
  level = 0
  local stored = tonumber(redis.call('HGET', thresholds, partition))
  if stored then
    while level < top and tonumber(ARGV[9 + level]) < stored - EPS do level = level + 1 end
  end
end
if level > top then level = top end
local version = tonumber(redis.call('HGET', versions, partition)) or 0
local current = tonumber(ARGV[9 + level])
local evidence = false
if semantic then
  if score == nil then evidence = wrong
  elseif score < current - EPS then evidence = false
  else evidence = wrong or (served_at ~= nil and served_at <= current + EPS) end
end
local move = ''
if evidence then
  local checks, wrongs = n + 1, w + (wrong and 1 or 0)
  local p, zz = wrongs / checks, z * z
  local upper = (p + zz / (2 * checks) + z * math.sqrt(p * (1 - p) / checks + zz / (4 * checks * checks)))
                / (1 + zz / checks)
  if upper > 1 then upper = 1 end
  if wrong and upper > max_rate and level < top then
    level, n, w, move = level + 1, 0, 0, 'tightened'
  elseif (not wrong) and upper <= max_rate and level > 0 then
    level, n, w, move = level - 1, 0, 0, 'loosened'
  else
    n, w = checks, wrongs
  end
end
if move ~= '' then
  version = version + 1
  if level == 0 then redis.call('HDEL', thresholds, partition)
  else redis.call('HSET', thresholds, partition, ARGV[9 + level]) end
  redis.call('HSET', versions, partition, version)
end
redis.call('HSET', audit, 'level', level, 'n', n, 'w', w)
redis.call('EXPIRE', audit, ttl)
return {level, ARGV[9 + level], version, n, w, total, total_wrong, move}
"""

# One snapshot of both hashes (the broker's Redis user may run scripts, not MULTI).
SNAPSHOT = "return {redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[2])}"


@dataclass(frozen=True, slots=True)
class Standing:
    """A partition after a verdict: its threshold and the evidence behind it."""

    threshold: float
    level: int
    checks: int  # verdicts counted as evidence at this level (since the last move)
    wrong: int
    upper: float  # Wilson upper bound of the wrong rate at this level
    version: int  # moves so far: a copy with a lower version is older
    move: str  # "tightened", "loosened" or ""
    total_checks: int  # every audited hit of the partition, exact ones included
    total_wrong: int


class Thresholds:
    def __init__(self, redis: Redis, default: float,
                 max_false_hit_rate: float = bound.DEFAULT_MAX_FALSE_HIT_RATE) -> None:
        self.redis = redis
        self.default = default
        self.max_false_hit_rate = check_rate(max_false_hit_rate)
        self.grid = bound.grid(default, guard.MAX_THRESHOLD)
        self._grid_args = [repr(t) for t in self.grid]
        self._by_partition: dict[str, float] = {}
        self._versions: dict[str, int] = {}
        self._record = redis.register_script(RECORD)
        self._snapshot = redis.register_script(SNAPSHOT)

    def get(self, partition: str) -> float:
        return self._by_partition.get(partition, self.default)

    async def load(self) -> None:
        raw, versions = await self._snapshot(keys=[KEY, VERSIONS])
        loaded = {k.decode(): float(v) for k, v in zip(raw[::2], raw[1::2])}
        seen = {k.decode(): int(v) for k, v in zip(versions[::2], versions[1::2])}
        for partition, version in self._versions.items():  # newer than this snapshot: keep ours
            if version > seen.get(partition, 0):
                seen[partition] = version
                if partition in self._by_partition:
                    loaded[partition] = self._by_partition[partition]
                else:
                    loaded.pop(partition, None)
        self._by_partition, self._versions = loaded, seen

    async def follow(self, every_s: float = RELOAD_S) -> None:
        """Background loop: pick up what other replicas' verdicts changed."""
        while True:
            await asyncio.sleep(every_s)
            try:
                await self.load()
            except (RedisError, OSError, ValueError) as exc:
                log.warning("thresholds_not_reloaded", error=str(exc))

    async def record(self, partition: str, wrong: bool, *, tighten: bool,
                     score: float | None = None, served_at: float | None = None) -> Standing:
        """Count one audited hit and apply the bound (atomically, for every replica).
        `tighten`: a semantic hit, whose verdict may move the threshold; `score`: the
        guard's score of the hit; `served_at`: the threshold in force when it was served."""
        keys = [AUDIT_PREFIX + partition, KEY, VERSIONS]
        args = [partition, int(wrong), int(tighten), "" if score is None else repr(float(score)),
                "" if served_at is None else repr(float(served_at)), repr(self.max_false_hit_rate),
                repr(bound.Z), AUDIT_TTL_S, *self._grid_args]
        level, threshold, version, checks, wrongs, total, total_wrong, move = \
            await self._record(keys=keys, args=args)
        threshold, version = float(threshold), int(version)
        move = move.decode() if isinstance(move, bytes) else move
        if version >= self._versions.get(partition, 0):
            self._versions[partition] = version
            if level:
                self._by_partition[partition] = threshold
            else:
                self._by_partition.pop(partition, None)
        standing = Standing(threshold=threshold, level=int(level), checks=int(checks),
                            wrong=int(wrongs), upper=bound.wilson_upper(int(wrongs), int(checks)),
                            version=version, move=move, total_checks=int(total),
                            total_wrong=int(total_wrong))
        if move:
            log.warning(f"partition_threshold_{move}", partition=partition, threshold=threshold,
                        level=standing.level, version=version,
                        max_false_hit_rate=self.max_false_hit_rate)
        return standing
