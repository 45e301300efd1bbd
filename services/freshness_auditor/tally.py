"""The auditor's counts, in Redis so that every replica adds to one set.

Counted in memory and added to the hash `audit:stats` by `flush` (one
pipeline per interval, as the llm-broker's totals are); `read` turns the hash
into `audit.stats` and sets the rate gauges. Field names:
`mem|<tier>|<count>`, `vol|<class>|<count>`, `task|<task>|<count>`, and
plain totals (`spend_usd`, `saved_usd`, `skipped_over_budget`,
`records_dropped`); `since` is when counting started.
"""

from __future__ import annotations

import time
from collections import defaultdict
from datetime import datetime, timezone

from redis.asyncio import Redis

from shared import metrics
from shared.contract import Accuracy, AuditStatsReply, Freshness

KEY = "audit:stats"


class Tally:
    def __init__(self, redis: Redis, budget_fraction: float) -> None:
        self.redis = redis
        self.budget_fraction = budget_fraction
        self._pending: dict[str, float] = defaultdict(float)

    def add(self, field: str, amount: float = 1) -> None:
        self._pending[field] += amount

    def memory(self, tier: str, count: str, amount: int = 1) -> None:
        self.add(f"mem|{tier}|{count}", amount)

    def llm(self, volatility: str, task: str, count: str) -> None:
        self.add(f"vol|{volatility}|{count}")
        self.add(f"task|{task}|{count}")

    async def flush(self) -> None:
        """Add what was counted since the last flush; kept for the next one if Redis fails."""
        pending, self._pending = self._pending, defaultdict(float)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hsetnx(KEY, "since", repr(time.time()))
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
            raise

    async def read(self) -> AuditStatsReply:
        raw = {k.decode(): v.decode() for k, v in (await self.redis.hgetall(KEY)).items()}
        since = float(raw.pop("since", time.time()))
        memory: dict[str, Freshness] = {}
        by_vol: dict[str, Accuracy] = {}
        by_task: dict[str, Accuracy] = {}
        totals: dict[str, float] = {}
        for field, value in raw.items():
            parts = field.split("|")
            if len(parts) != 3:
                totals[field] = float(value)
                continue
            kind, name, count = parts
            table, cls = {"mem": (memory, Freshness), "vol": (by_vol, Accuracy),
                          "task": (by_task, Accuracy)}[kind]
            row = table.setdefault(name, cls())
            setattr(row, count, int(float(value)))
        for tier, row in memory.items():
            row.stale_rate = round(row.stale / row.checked, 6) if row.checked else 0.0
            metrics.audit_stale_rate.labels(tier).set(row.stale_rate)
        for table in (by_vol, by_task):
            for row in table.values():
                row.false_hit_rate = round(row.wrong / row.checked, 6) if row.checked else 0.0
        return AuditStatsReply(
            since=datetime.fromtimestamp(since, timezone.utc).isoformat(timespec="seconds"),
            window_s=round(time.time() - since, 3), memory=memory, llm_by_volatility=by_vol,
            llm_by_task=by_task, audit_spend_usd=round(totals.get("spend_usd", 0.0), 8),
            saved_usd=round(totals.get("saved_usd", 0.0), 8),
            budget_fraction=self.budget_fraction,
            skipped_over_budget=int(totals.get("skipped_over_budget", 0)),
            records_dropped=int(totals.get("records_dropped", 0)))
