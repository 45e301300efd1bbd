"""Who texts when: a deterministic plan of every lead's simulated days.

A lead has an imported history (messages before the demo starts, some of
them hundreds long), then texts on some days and not on others (hot leads
most days, cold ones now and then), in one to three sessions a day at the
hours people text (lunch and evening peaks), a few messages per session a few
minutes apart. After a session the bot may check back on a lead that went
quiet (a follow-up). Simulated time starts at 07:00 on day 1 and ends at
23:00 on the last day; offsets are seconds from the start.

The plan depends only on the settings and the seed, so every worker (and the
demo's progress bar) computes the same plan and a worker takes its shard.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from services.agent_worker import conversations as conv

DAY_S = 86_400
START_HOUR = 7
END_HOUR = 23
# When people text, by hour of day (7..22): lunch and evening peaks.
HOUR_WEIGHTS = {7: 1, 8: 2, 9: 3, 10: 3, 11: 4, 12: 6, 13: 5, 14: 3, 15: 3, 16: 4, 17: 5, 18: 7,
                19: 8, 20: 7, 21: 4, 22: 2}
ACTIVE_BY_HEAT = {"hot": 1.4, "warm": 1.0, "cold": 0.55}  # times the mix's `active`


class Mix(dict):
    """The call mix: probabilities and sizes, from `DEMO_MIX` ("key=value,...") over the defaults."""

    DEFAULTS = {
        "active": 0.6,  # mean share of days a lead texts
        "long_read": 0.12,  # inbound messages that also read n=30..100 (L2's range)
        "history_read": 0.05,  # ... that read n=101..500 (older history: L3 when it is longer than L2's 100)
        "search": 0.08,  # ... that search the lead's history ("what did they say about financing?")
        "market": 0.5,  # ... that ask the market context of the lead's area (scope global)
        "followup": 0.6,  # sessions the bot checks back on after the lead went quiet
        "nudge": 0.4,  # follow-ups of hot or warm leads that send a nudge
        "history": 14,  # median messages of imported history per lead (lognormal, some > 100)
        "trace": 0.05,  # share of lookups traced end to end (traceparent sampled)
    }

    @classmethod
    def parse(cls, text: str = "") -> "Mix":
        mix = cls(cls.DEFAULTS)
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = part.partition("=")
            key = key.strip()
            if not sep or key not in cls.DEFAULTS:
                raise ValueError(f"bad DEMO_MIX entry {part!r}; keys: {', '.join(cls.DEFAULTS)}")
            mix[key] = float(value)
        return mix


@dataclass
class Event:
    at: float  # seconds from the start of simulated time
    kind: str  # inbound | followup
    text: str = ""


@dataclass
class LeadPlan:
    index: int
    user_id: str
    bot_id: str
    persona: conv.Persona
    history: list[tuple[str, str, float]]  # (role, text, offset < 0) before the start
    events: list[Event] = field(default_factory=list)


def duration_s(days: int) -> float:
    return (days - 1) * DAY_S + (END_HOUR - START_HOUR) * 3600


def lead_id(run: str, index: int) -> str:
    return f"{run}-lead-{index:04d}"


def plan_lead(index: int, *, run: str, bots: int, days: int, mix: Mix, seed: int) -> LeadPlan:
    rng = random.Random(f"{seed}:{index}")
    p = conv.persona(rng)
    plan = LeadPlan(index, lead_id(run, index), f"sales-{index % bots + 1}", p, _history(p, rng, mix))
    said_hello = bool(plan.history)
    end = duration_s(days)
    active = min(1.0, mix["active"] * ACTIVE_BY_HEAT[p.heat])
    for day in range(days):
        if rng.random() >= active:
            continue
        hours = sorted(set(rng.choices(list(HOUR_WEIGHTS), list(HOUR_WEIGHTS.values()),
                                       k=rng.choice((1, 1, 2, 2, 3)))))
        for hour in hours:
            t = day * DAY_S + (hour - START_HOUR) * 3600 + rng.uniform(0, 3000)
            for _ in range(rng.randint(1, 5)):
                stage = conv.next_stage(p, rng) if said_hello else "opener"
                said_hello = True
                if t < end:
                    plan.events.append(Event(t, "inbound", conv.lead_message(p, stage, rng)))
                if stage == "out":
                    plan.events.sort(key=lambda e: e.at)
                    return plan  # they asked us to stop: no more texts, no follow-ups
                t += rng.uniform(60, 600)  # the bot answers, the lead types the next one
            if rng.random() < mix["followup"] and t + 240 < end:
                plan.events.append(Event(t + rng.uniform(240, 1500), "followup"))
    plan.events.sort(key=lambda e: e.at)
    return plan


def _history(p: conv.Persona, rng: random.Random, mix: Mix) -> list[tuple[str, str, float]]:
    """Imported CRM history: alternating lead and bot messages over the last 60 days."""
    if mix["history"] <= 0:
        return []
    count = min(400, int(rng.lognormvariate(math.log(mix["history"]), 1.1)))
    out = []
    t = -60 * DAY_S
    step = 60 * DAY_S / max(count, 1)
    stage = "opener"
    for i in range(count):
        t += rng.uniform(0.2, 1.0) * step
        if i % 2 == 0:
            out.append(("user", conv.lead_message(p, stage, rng), t))
            stage = conv.next_stage(p, rng)
            if stage == "out":
                stage = "smalltalk"  # an imported lead that opted out would not be in the demo
        else:
            out.append(("assistant", conv.bot_message(p, rng), t))
    return out


def plan_fleet(leads: int, *, run: str, bots: int, days: int, mix: Mix, seed: int,
               shard: int = 0, shards: int = 1) -> list[LeadPlan]:
    return [plan_lead(i, run=run, bots=bots, days=days, mix=mix, seed=seed)
            for i in range(leads) if i % shards == shard]
