"""Who texts when, and when the bots look at a lead: a deterministic plan of the simulated days.

A lead has an imported history (messages before the demo starts, some of
them hundreds long), then texts on some days and not on others (hot leads
most days, cold ones now and then), in one to three sessions a day at the
hours people text (lunch and evening peaks), a few messages per session a few
minutes apart. The lead's texts are answered by the fleet's qualifier bot.

Three bots work every lead, each with its own role (`ROLES`): the qualifier
answers the lead's texts and keeps the lead's qualification current, the
nurture bot keeps quiet leads warm, the scheduler turns keen leads into
showings. Most of a real fleet's interactions are theirs, not the lead's:
a *review* of a lead is handed to each bot, and each bot takes it off its
queue a few minutes later (`REACT_S`) and does its job on the conversation
as it stands (bot.py). Reviews come

- after a session, when the lead went quiet (`followup` of sessions, 4-25
  minutes after their last text): did they ask for a showing, should we
  check back, did the qualification change;
- every morning (`review` of the leads, between 08:00 and 10:30: the CRM's
  daily pass over the pipeline, leads in no particular order);
- in the afternoon for hot and warm leads (`review_pm` of them, 14:00 to
  16:30), the second pass of the day over the leads worth it.

A review never lands while the lead is texting (from 10 minutes before a
session to 30 minutes after it): those leads are the qualifier's. A lead who
asked us to stop gets no texts and no reviews after that.

Simulated time starts at 07:00 on day 1 and ends at 23:00 on the last day;
offsets are seconds from the start. The plan depends only on the settings and
the seed, so every worker (and the demo's progress bar) computes the same plan
and a worker takes its shard.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from services.agent_worker import conversations as conv

DAY_S = 86_400
# The default fleet (the design's) and its time compression: the worker's and the demo's.
LEADS, BOTS, DAYS, SPEED = 500, 3, 1, 240.0
START_HOUR = 7
END_HOUR = 23
# When people text, by hour of day (7..22): lunch and evening peaks.
HOUR_WEIGHTS = {7: 1, 8: 2, 9: 3, 10: 3, 11: 4, 12: 6, 13: 5, 14: 3, 15: 3, 16: 4, 17: 5, 18: 7,
                19: 8, 20: 7, 21: 4, 22: 2}
ACTIVE_BY_HEAT = {"hot": 1.4, "warm": 1.0, "cold": 0.55}  # times the mix's `active`
# The fleet's bots by role, in the order `bots` adds them (bots=1: a qualifier doing everything;
# bots=6: two of each role, a lead gets one bot of each role).
ROLES = ("qualifier", "nurture", "scheduler")
REACT_S = (30, 600)  # a bot takes a review off its queue this many seconds after it is due
REVIEW_AM = (8.0, 10.5)  # hours of the morning pass over the pipeline
REVIEW_PM = (14.0, 16.5)  # ... and of the afternoon pass over hot and warm leads
QUIET_BEFORE_S, QUIET_AFTER_S = 600, 1800  # no review this close to a lead's own texts


class Mix(dict):
    """The call mix: probabilities and sizes, from `DEMO_MIX` ("key=value,...") over the defaults."""

    DEFAULTS = {
        "active": 0.6,  # mean share of days a lead texts
        "long_read": 0.12,  # interactions that also read n=30..100 (L2's range)
        "history_read": 0.05,  # ... that read n=101..500 (older history: L3 when it is longer than L2's 100)
        "search": 0.08,  # ... that search the lead's history ("what did they say about financing?")
        "market": 0.5,  # inbound messages and nurture reviews that ask the market context (scope global)
        "followup": 0.8,  # sessions after which the bots review the lead once it went quiet
        "review": 1.0,  # leads the bots review in the morning pass, each day
        "review_pm": 0.8,  # hot and warm leads they review again in the afternoon
        "nudge": 0.3,  # reviews of a keen, quiet lead in which the bot sends a text (its role's)
        "history": 14,  # median messages of imported history per lead (lognormal, some > 100)
        "trace": 0.05,  # share of lookups traced end to end (traceparent sampled)
        "quality": 0.03,  # replies also asked with the whole transcript and judged (bot.check_quality)
        "quality_max": 40,  # ... at most this many per worker
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
    kind: str  # inbound (the lead texts; the qualifier answers) | review (a bot looks at the lead)
    text: str = ""
    bot: str = ""  # who acts: the qualifier for inbound, the reviewing bot for review
    role: str = ""  # that bot's role (ROLES)
    why: str = ""  # review: after_session | morning | afternoon


@dataclass
class LeadPlan:
    index: int
    user_id: str
    bot_id: str  # the lead's qualifier: it answers their texts and owns the imported history
    persona: conv.Persona
    history: list[tuple[str, str, float]]  # (role, text, offset < 0) before the start
    events: list[Event] = field(default_factory=list)
    bots: dict[str, str] = field(default_factory=dict)  # role -> this lead's bot of that role


def duration_s(days: int) -> float:
    return (days - 1) * DAY_S + (END_HOUR - START_HOUR) * 3600


def lead_id(run: str, index: int) -> str:
    return f"{run}-lead-{index:04d}"


def fleet_bots(bots: int) -> list[tuple[str, str]]:
    """(bot id, role) of every bot: roles in `ROLES` order, then a second of each, and so on."""
    return [(f"{ROLES[i % len(ROLES)]}-{i // len(ROLES) + 1}", ROLES[i % len(ROLES)]) for i in range(bots)]


def lead_bots(index: int, bots: int) -> dict[str, str]:
    """role -> the bot of that role that works lead `index` (leads spread evenly over a role's bots)."""
    by_role: dict[str, list[str]] = {}
    for bot, role in fleet_bots(bots):
        by_role.setdefault(role, []).append(bot)
    return {role: ids[index % len(ids)] for role, ids in by_role.items()}


def plan_lead(index: int, *, run: str, bots: int, days: int, mix: Mix, seed: int) -> LeadPlan:
    rng = random.Random(f"{seed}:{index}")
    p = conv.persona(rng)
    mine = lead_bots(index, bots)
    plan = LeadPlan(index, lead_id(run, index), mine["qualifier"], p, _history(p, rng, mix), bots=mine)
    said_hello = bool(plan.history)
    end = duration_s(days)
    opted_out = end  # they asked us to stop: nothing after this
    sessions: list[tuple[float, float]] = []  # (first text, last text) of each session
    active = min(1.0, mix["active"] * ACTIVE_BY_HEAT[p.heat])
    triggers: list[tuple[float, str]] = []  # (when a review is due, why)
    for day in range(days):
        if opted_out < end or rng.random() >= active:
            continue
        hours = sorted(set(rng.choices(list(HOUR_WEIGHTS), list(HOUR_WEIGHTS.values()),
                                       k=rng.choice((1, 1, 2, 2, 3)))))
        for hour in hours:
            t = first = last = day * DAY_S + (hour - START_HOUR) * 3600 + rng.uniform(0, 3000)
            for _ in range(rng.randint(1, 5)):
                stage = conv.next_stage(p, rng) if said_hello else "opener"
                said_hello = True
                if t < end:
                    plan.events.append(Event(t, "inbound", conv.lead_message(p, stage, rng),
                                             bot=plan.bot_id, role="qualifier"))
                    last = t
                if stage == "out":
                    opted_out = min(opted_out, t)
                    break
                t += rng.uniform(60, 600)  # the bot answers, the lead types the next one
            if first >= end:
                break
            sessions.append((first, last))
            if opted_out < end:
                break
            if rng.random() < mix["followup"]:
                triggers.append((last + rng.uniform(240, 1500), "after_session"))
    # The daily passes over the pipeline and the bots' reaction times, from a generator of their
    # own: `review`, `review_pm` and the bots do not change what the leads text.
    brng = random.Random(f"{seed}:{index}:reviews")
    for day in range(days):
        if brng.random() < mix["review"]:
            triggers.append((_at(day, REVIEW_AM, brng), "morning"))
        if p.heat != "cold" and brng.random() < mix["review_pm"]:
            triggers.append((_at(day, REVIEW_PM, brng), "afternoon"))
    for due, why in sorted(triggers):
        if why != "after_session" and any(a - QUIET_BEFORE_S < due < b + QUIET_AFTER_S for a, b in sessions):
            continue  # the lead is texting right now: the qualifier has it
        for role, bot in mine.items():
            at = due + brng.uniform(*REACT_S)
            if at < min(end, opted_out):
                plan.events.append(Event(at, "review", bot=bot, role=role, why=why))
    plan.events.sort(key=lambda e: e.at)
    return plan


def _at(day: int, hours: tuple[float, float], rng: random.Random) -> float:
    return day * DAY_S + (rng.uniform(*hours) - START_HOUR) * 3600


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
