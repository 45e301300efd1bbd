"""The auditor's counts, in Redis so that every replica adds to one set.

Counted in memory and added to the hash `audit:stats` by `flush` (one
pipeline per interval, as the llm-broker's totals are); `read` turns the hash
into `audit.stats` and sets the rate gauges. Field names:
`mem|<tier>|<count>`, `vol|<class>|<count>`, `task|<task>|<count>`, and
plain totals (`spend_usd`, `saved_usd`, `skipped_over_budget`,
`records_dropped`); `since` is when counting started. LLM counts are also
kept by match (`match|<exact or semantic>|<count>`): the false-hit bound is
on semantic hits.

The broker's false-hit bound: each semantic verdict's reply carries its
partition's standing (`PartitionBound`), kept per partition in the hash
`audit:partitions` (the latest one flushed wins; two auditor replicas may
briefly disagree on which was latest, the next verdict settles it) and the
bound itself as `max_false_hit_rate` in `audit:stats`. `read` reports the
partitions tightened most (`PARTITIONS_REPORTED`) and counts the rest.
"""

from __future__ import annotations

import time
from collections import defaultdict
from datetime import datetime, timezone

from redis.asyncio import Redis

from shared import metrics
from shared.contract import Accuracy, AuditStatsReply, Freshness, PartitionBound, decoder, encode
from shared.wilson import wilson_upper

KEY = "audit:stats"
PARTITIONS = "audit:partitions"
PARTITIONS_TTL_S = 7 * 86400  # as the broker's counts behind them
PARTITIONS_REPORTED = 20
_bound = decoder(PartitionBound)


class Tally:
    def __init__(self, redis: Redis, budget_fraction: float) -> None:
        self.redis = redis
        self.budget_fraction = budget_fraction
        self._pending: dict[str, float] = defaultdict(float)
        self._partitions: dict[str, PartitionBound] = {}

    def add(self, field: str, amount: float = 1) -> None:
        self._pending[field] += amount

    def memory(self, tier: str, count: str, amount: int = 1) -> None:
        self.add(f"mem|{tier}|{count}", amount)

    def llm(self, volatility: str, task: str, count: str, match: str | None = None) -> None:
        self.add(f"vol|{volatility}|{count}")
        self.add(f"task|{task}|{count}")
        if match is not None:
            self.add(f"match|{match}|{count}")

    def partition(self, partition: str, standing: PartitionBound) -> None:
        """The broker's standing of a partition after a semantic verdict (the newest wins)."""
        old = self._partitions.get(partition)
        if old is None or standing.moves >= old.moves:
            self._partitions[partition] = standing

    async def flush(self) -> None:
        """Add what was counted since the last flush; kept for the next one if Redis fails."""
        pending, self._pending = self._pending, defaultdict(float)
        partitions, self._partitions = self._partitions, {}
        pipe = self.redis.pipeline(transaction=False)
        pipe.hsetnx(KEY, "since", repr(time.time()))
        if partitions:
            pipe.hset(PARTITIONS, mapping={p: encode(b) for p, b in partitions.items()})
            pipe.expire(PARTITIONS, PARTITIONS_TTL_S)
            bound = max(b.max_false_hit_rate for b in partitions.values())
            pipe.hset(KEY, "max_false_hit_rate", repr(bound))
        for field, value in pending.items():
            if float(value).is_integer():
                pipe.hincrby(KEY, field, int(value))
            else:
                pipe.hincrbyfloat(KEY, field, value)
        try:
            await pipe.execute()
        except BaseException:
            for field, value in pending.items():
                self._pending[field] += value
            for partition, standing in partitions.items():
                self.partition(partition, standing)
            raise

    async def read(self) -> AuditStatsReply:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(KEY)
        pipe.hgetall(PARTITIONS)
        raw, by_partition = await pipe.execute()
        raw = {k.decode(): v.decode() for k, v in raw.items()}
        since = float(raw.pop("since", time.time()))
        bound = raw.pop("max_false_hit_rate", None)
        memory: dict[str, Freshness] = {}
        by_vol: dict[str, Accuracy] = {}
        by_task: dict[str, Accuracy] = {}
        by_match: dict[str, Accuracy] = {}
        totals: dict[str, float] = {}
        for field, value in raw.items():
            parts = field.split("|")
            if len(parts) != 3:
                totals[field] = float(value)
                continue
            kind, name, count = parts
            table, cls = {"mem": (memory, Freshness), "vol": (by_vol, Accuracy),
                          "task": (by_task, Accuracy),
                          "match": (by_match, Accuracy)}[kind]
            row = table.setdefault(name, cls())
            setattr(row, count, int(float(value)))
        for tier, row in memory.items():
            row.stale_rate = round(row.stale / row.checked, 6) if row.checked else 0.0
            metrics.audit_stale_rate.labels(tier).set(row.stale_rate)
        for table in (by_vol, by_task, by_match):
            for row in table.values():
                row.false_hit_rate = round(row.wrong / row.checked, 6) if row.checked else 0.0
                row.upper_bound = round(wilson_upper(min(row.wrong, row.checked), row.checked), 6)
        partitions = [(p.decode(), _bound.decode(b)) for p, b in by_partition.items()]
        tightest = sorted(partitions, key=lambda pb: (-pb[1].level, -pb[1].wrong, -pb[1].checks,
                                                      pb[0]))[:PARTITIONS_REPORTED]
        return AuditStatsReply(
            since=datetime.fromtimestamp(since, timezone.utc).isoformat(timespec="seconds"),
            window_s=round(time.time() - since, 3), memory=memory, llm_by_volatility=by_vol,
            llm_by_task=by_task, audit_spend_usd=round(totals.get("spend_usd", 0.0), 8),
            saved_usd=round(totals.get("saved_usd", 0.0), 8),
            budget_fraction=self.budget_fraction,
            skipped_over_budget=int(totals.get("skipped_over_budget", 0)),
            records_dropped=int(totals.get("records_dropped", 0)),
            max_false_hit_rate=None if bound is None else float(bound), llm_by_match=by_match,
            partitions=dict(tightest), partitions_audited=len(partitions),
            partitions_tightened=sum(b.level > 0 for _, b in partitions))
