"""What the fleet's three bots do in one interaction with a lead, and what they measure.

An interaction is one bot acting on one lead (scenario.py plans when). Every
call is one such a bot really makes, with the cache options its data
deserves:

| task           | volatility     | mode     | scope  | why                                           |
|----------------|----------------|----------|--------|-----------------------------------------------|
| lead_score     | lead_score     | exact    | user   | a function of what this lead said             |
| intent         | lead_intent    | semantic | user   | of the latest message; changes with the next  |
| market_context | market_context | semantic | global | many leads ask about the same area            |
| reply          | lead_intent    | exact    | user   | depends on the conversation, rarely repeats   |

**The lead texts** (inbound, the qualifier answers): append it; read the
lead's recent messages (n=10, with `min_seq` = the append's seq, so the read
includes it); sometimes a longer read (n=30..100) or the older history
(n=101..500), sometimes a search of the history; then score, intent, and for
half the messages the market context of the lead's area, then the reply,
which it appends.

**A bot reviews a quiet lead** (after a session, and in the morning and
afternoon passes): it re-reads the lead's memory (n=10, and the longer reads
and searches in the same shares), re-scores the conversation and
re-classifies the lead's last text, because its decision depends on both and
it cannot know whether another bot or the lead changed anything since it last
looked; then it does its role's job:

- qualifier: keeps the qualification current (the score is what the CRM
  shows the sales team); a lead in the middle band (40-69) who went quiet may
  get one qualifying question (budget, financing or timeline);
- nurture: checks the market of the lead's area (for half its reviews: the
  check-in's reason to write, "prices in Oak Park dipped") and may send a
  keen lead (40+) a check-in;
- scheduler: when the lead is keen (70+) or asked for a showing, may propose
  two showing times.

Only some reviews send a text (`nudge` of those that qualify), and the
playbook's limits hold: no check-in while the lead texted in the last two
hours (the scheduler excepted: a showing asked for is answered), none within
four hours of another bot's check-in, at most two unanswered in a row.

The score and intent prompts are the team's guides, the same for every bot
(one score per lead, whoever asks), so the three bots reading an unchanged
conversation a few minutes apart ask the same question: the first pays, the
others may be answered from the cache while the answer is fresh (15 min for
scores, 5 for intents, simulated). The texts each bot writes have its own
system prompt (its role, the playbook and the listing sheet, long and stable,
so the model's prompt cache serves it) and carry the lead's CRM record and
conversation in the messages; they are never shared. Prompt sizes: about 5.5k
tokens for a bot's text, 2-3k for the guides, a few hundred for market
questions; ~7.5k tokens an interaction on average. Every call is written to
the call log (`CallLog`) as it returns.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from datetime import datetime, timedelta, timezone

import msgspec

from services.agent_worker import conversations as conv
from services.agent_worker.baseline import Baseline, memory_request, messages_body
from services.agent_worker.client import Call, Tiermem
from services.agent_worker.scenario import LeadPlan, Mix

HAIKU = "claude-haiku-4-5"
SONNET = "claude-sonnet-4-5"
SCORE_SYSTEM = conv.score_guide()
INTENT_SYSTEM = conv.intent_guide()
MARKET_SYSTEM = conv.market_brief()
MARKET_ASKS = ("Market update for {ptype} homes in {area}",
               "Market update for {ptype} homes in {area}",
               "Current market conditions for {ptype} homes in {area}")
REPLY_SYSTEMS = {role: conv.reply_system(role) for role in conv.ROLE_PROMPTS}
# What a bot asks the model to write when it texts first (the lead said nothing new).
INSTRUCTIONS = {
    "qualifier": "(The lead has gone quiet. Write one short text that asks about one thing we still "
                 "do not know: their budget, how they will finance it, or their timeline.)",
    "nurture": "(The lead has not answered yet. Write one short, friendly follow-up text.)",
    "scheduler": "(The lead may be ready to see a home. Write one short text proposing two showing "
                 "times that fit the listing's showing instructions.)",
}
NUDGE = INSTRUCTIONS["nurture"]
LEAD_QUIET_S = 2 * 3600  # no check-in while the lead texted this recently (the scheduler excepted)
CHECKIN_GAP_S = 4 * 3600  # ... nor this soon after another bot's check-in
MAX_UNANSWERED = 2


def reply_system(role: str = "qualifier") -> str:
    return REPLY_SYSTEMS[role]


_encode = msgspec.json.Encoder().encode


class CallLog:
    """JSON lines, one per call: what the demo's table and its tests are computed from."""

    def __init__(self, path: str, worker: str) -> None:
        self.worker = worker
        self._out = open(path, "ab") if path else None  # noqa: SIM115 - closed in close()
        self._buf: list[bytes] = []
        self.calls = 0
        self.errors = 0

    def write(self, record: dict) -> None:
        record["w"] = self.worker
        line = _encode(record) + b"\n"
        if self._out is None:
            import sys
            sys.stdout.buffer.write(line)
        else:
            self._buf.append(line)
            if len(self._buf) >= 256:
                self.flush()

    def call(self, call: Call, kind: str, ctx: dict, **fields) -> None:
        self.calls += 1
        self.errors += not call.ok
        record = {"kind": kind, **ctx, "t": round(call.started, 6), "ms": round(call.ms, 3),
                  "code": call.code, **fields}
        if call.sampled:
            record["trace"] = call.trace_id
        if not call.ok:
            record["error"] = call.reply.get("error", "")
        self.write(record)

    def flush(self) -> None:
        if self._out is not None and self._buf:
            self._out.write(b"".join(self._buf))
            self._out.flush()
            self._buf.clear()

    def close(self) -> None:
        self.flush()
        if self._out is not None:
            self._out.close()


class SimClock:
    """Simulated time runs `speed` times faster than the wall clock from `t0` (unix time)."""

    def __init__(self, t0: float, speed: float, start: datetime) -> None:
        self.t0, self.speed, self.start = t0, speed, start

    def offset(self) -> float:
        return (time.time() - self.t0) * self.speed

    def wall(self, offset: float) -> float:
        return self.t0 + offset / self.speed

    def iso(self, offset: float | None = None) -> str:
        at = self.start + timedelta(seconds=self.offset() if offset is None else offset)
        return at.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")

    async def sleep_until(self, offset: float) -> None:
        delay = self.wall(offset) - time.time()
        if delay > 0:
            await asyncio.sleep(delay)


class LeadState:
    """What the bots of one lead know about each other's texts (one worker runs all of a lead's events)."""

    def __init__(self, plan: LeadPlan) -> None:
        self.lead_at = max((at for role, _, at in plan.history if role == "user"), default=-1e12)
        # the whole conversation so far: what a fleet without tiermem puts in every prompt (baseline.py)
        self.transcript = [{"role": role, "text": text} for role, text, _ in plan.history]
        self.checkin_at = -1e12
        self.unanswered = 0

    def may_check_in(self, role: str, at: float) -> bool:
        quiet = role == "scheduler" or at - self.lead_at >= LEAD_QUIET_S
        return quiet and at - self.checkin_at >= CHECKIN_GAP_S and self.unanswered < MAX_UNANSWERED


class Bot:
    def __init__(self, client: Tiermem, log: CallLog, clock: SimClock, mix: Mix,
                 baseline: Baseline | None = None) -> None:
        self.client, self.log, self.clock, self.mix = client, log, clock, mix
        self.baseline = baseline

    async def run_lead(self, plan: LeadPlan) -> None:
        rng = random.Random(plan.user_id)  # the lead's own draws: same run, same calls
        state = LeadState(plan)
        for i, ev in enumerate(plan.events):
            await self.clock.sleep_until(ev.at)
            bot = ev.bot or plan.bot_id
            ctx = {"lead": plan.user_id, "bot": bot, "ix": f"{plan.index}:{i}", "step": ev.kind,
                   "role": ev.role or "qualifier"}
            if ev.why:
                ctx["why"] = ev.why
            late_ms = (time.time() - self.clock.wall(ev.at)) * 1000
            t0 = time.perf_counter()
            if ev.kind == "inbound":
                state.lead_at, state.unanswered = ev.at, 0
                state.transcript.append({"role": "user", "text": ev.text})
                await self.inbound(plan, bot, ev.text, i, ctx, rng, state)
            else:
                await self.review(plan, bot, ev.role or "qualifier", ev.at, i, ctx, rng, state)
            self.log.write({"kind": "interaction", **ctx, "sim": round(ev.at, 1),
                            "late_ms": round(late_ms, 1),
                            "ms": round((time.perf_counter() - t0) * 1000, 3)})

    async def inbound(self, plan: LeadPlan, bot: str, text: str, i: int, ctx: dict,
                      rng: random.Random, state: LeadState) -> None:
        user, c = plan.user_id, self.client
        self.remember(ctx, state)
        a = await c.append(user, bot, "user", text, f"{user}:{i}:in", self.clock.iso())
        self.log.call(a, "append", ctx, role="user", seq=a.reply.get("seq"), dup=a.reply.get("duplicate"))
        if not a.ok:
            return
        seq = a.reply["seq"]
        window = await self.read(c.recent(user, 10, min_seq=seq), ctx, n=10)
        await self.more_reads(user, seq, ctx, rng)
        history = window or [{"role": "user", "text": text}]
        full = state.transcript
        asks = [self.llm(score_request(plan, history, bot), ctx, score_request(plan, full, bot)),
                self.llm(intent_request(plan, text, bot), ctx)]
        if rng.random() < self.mix["market"]:
            asks.append(self.llm(market_request(plan, rng, bot), ctx))
        await asyncio.gather(*asks)
        answer = await self.llm(reply_request(plan, history, bot=bot, role="qualifier"), ctx,
                                reply_request(plan, full, bot=bot, role="qualifier"))
        if answer is not None:
            r = await c.append(user, bot, "assistant", answer, f"{user}:{i}:out", self.clock.iso())
            self.log.call(r, "append", ctx, role="assistant", seq=r.reply.get("seq"))
            if r.ok:
                state.transcript.append({"role": "assistant", "text": answer})

    async def review(self, plan: LeadPlan, bot: str, role: str, at: float, i: int, ctx: dict,
                     rng: random.Random, state: LeadState) -> None:
        """A bot looks at a quiet lead: re-read, re-score, re-classify, its role's job, maybe a text."""
        user = plan.user_id
        self.remember(ctx, state)
        window = await self.read(self.client.recent(user, 10), ctx, n=10)
        if not window:
            return
        await self.more_reads(user, None, ctx, rng)
        last_lead = next((m["text"] for m in reversed(window) if m["role"] == "user"), None)
        asks = [self.llm(score_request(plan, window, bot), ctx, score_request(plan, state.transcript, bot))]
        if last_lead:
            asks.append(self.llm(intent_request(plan, last_lead, bot), ctx))
        if role == "nurture" and rng.random() < self.mix["market"]:
            asks.append(self.llm(market_request(plan, rng, bot), ctx))
        score, *rest = await asyncio.gather(*asks)
        intent = rest[0] if last_lead else None
        points = int(m.group()) if score and (m := re.match(r"\d+", score)) else None
        if points is None:
            return
        wants = {"qualifier": 40 <= points < 70, "nurture": points >= 40,
                 "scheduler": points >= 70 or (intent or "").strip() == "schedule_viewing"}[role]
        if not (wants and state.may_check_in(role, at) and rng.random() < self.mix["nudge"]):
            return
        request = reply_request(plan, window, bot=bot, role=role, instruction=INSTRUCTIONS[role])
        answer = await self.llm(request, ctx, reply_request(plan, state.transcript, bot=bot, role=role,
                                                            instruction=INSTRUCTIONS[role]))
        if answer is not None:
            r = await self.client.append(user, bot, "assistant", answer, f"{user}:{i}:{role}",
                                         self.clock.iso())
            self.log.call(r, "append", ctx, role="assistant", seq=r.reply.get("seq"))
            if r.ok:
                state.checkin_at = at
                state.unanswered += 1
                state.transcript.append({"role": "assistant", "text": answer})

    async def more_reads(self, user: str, seq: int | None, ctx: dict, rng: random.Random) -> None:
        """Sometimes more than the last 10: a longer read, the older history, a search."""
        c = self.client
        if rng.random() < self.mix["long_read"]:
            n = rng.randint(30, 100)
            await self.read(c.recent(user, n, min_seq=seq), ctx, n=n)
        if rng.random() < self.mix["history_read"]:
            n = rng.randint(101, 500)
            await self.read(c.recent(user, n, min_seq=seq), ctx, n=n)
        if rng.random() < self.mix["search"]:
            q = rng.choice(conv.SEARCH_QUERIES)
            s = await c.search(user, q, k=5)
            self.log.call(s, "search", ctx, tier=s.reply.get("tier"), count=len(s.reply.get("messages", [])))

    async def read(self, pending, ctx: dict, *, n: int) -> list[dict]:
        call: Call = await pending
        messages = call.reply.get("messages", []) if call.ok else []
        self.log.call(call, "get", ctx, n=n, tier=call.reply.get("tier"), count=len(messages))
        return messages

    def remember(self, ctx: dict, state: LeadState) -> None:
        """The baseline fleet's memory-retrieval call of this interaction (priced, not sent)."""
        if self.baseline is not None:
            self.baseline.add(ctx, "memory_retrieval", memory_request(HAIKU, state.transcript), None)

    async def llm(self, body: dict, ctx: dict, twin: dict | None = None) -> str | None:
        """One llm.complete; `twin` is the same call as a fleet without tiermem builds it (the
        whole transcript for the window; None: the same request), priced for the baseline."""
        call = await self.client.complete(body)
        r = call.reply
        usage, cache = r.get("usage") or {}, r.get("cache") or {}
        if self.baseline is not None and call.ok:
            self.baseline.add(ctx, body["task"], messages_body(twin or body), usage.get("output_tokens", 0))
        self.log.call(call, "llm", ctx, task=body["task"], model=body["model"],
                      volatility=body["cache"]["volatility"], mode=body["cache"]["mode"],
                      scope=body["cache"]["scope"], status=cache.get("status"), match=cache.get("match"),
                      sim_score=cache.get("similarity"), age_s=cache.get("age_s"),
                      input_tokens=usage.get("input_tokens", 0), output_tokens=usage.get("output_tokens", 0),
                      cache_creation_input_tokens=usage.get("cache_creation_input_tokens", 0),
                      cache_read_input_tokens=usage.get("cache_read_input_tokens", 0),
                      cost_usd=r.get("cost_usd", 0.0), saved_usd=r.get("saved_usd", 0.0))
        return r.get("text") if call.ok else None


# --------------------------------------------------------------------------- requests


def _llm(plan: LeadPlan, bot: str, task: str, model: str, system: str, messages: list[dict],
         max_tokens: int, volatility: str, mode: str, scope: str) -> dict:
    return {"task": task, "user_id": plan.user_id, "bot_id": bot or plan.bot_id, "model": model,
            "system": system, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "cache": {"volatility": volatility, "mode": mode, "scope": scope}}


def score_request(plan: LeadPlan, window: list[dict], bot: str = "") -> dict:
    # The lead's own words only: the score should not change because a bot said something.
    transcript = "\n".join(f"lead: {m['text']}" for m in window if m["role"] == "user") or "(no texts yet)"
    return _llm(plan, bot, "lead_score", HAIKU, SCORE_SYSTEM, [{"role": "user", "content": transcript}], 8,
                "lead_score", "exact", "user")


def intent_request(plan: LeadPlan, text: str, bot: str = "") -> dict:
    return _llm(plan, bot, "intent", HAIKU, INTENT_SYSTEM, [{"role": "user", "content": text}], 8,
                "lead_intent", "semantic", "user")


def market_request(plan: LeadPlan, rng: random.Random, bot: str = "") -> dict:
    p = plan.persona
    ask = rng.choice(MARKET_ASKS).format(ptype=p.property_type, area=p.area)
    return _llm(plan, bot, "market_context", HAIKU, MARKET_SYSTEM, [{"role": "user", "content": ask}], 150,
                "market_context", "semantic", "global")


_PROFILES: dict[str, str] = {}


def profile(plan: LeadPlan) -> str:
    text = _PROFILES.get(plan.user_id)
    if text is None:
        text = _PROFILES[plan.user_id] = conv.profile_text(plan.persona, plan.user_id, plan.index)
    return text


def reply_request(plan: LeadPlan, window: list[dict], *, bot: str = "", role: str = "qualifier",
                  instruction: str | None = None, nudge: bool = False) -> dict:
    """A text the bot writes: its role's stable system prompt; the lead's CRM record, then the
    conversation (consecutive same-role messages joined), then what to write when it texts first."""
    if nudge and instruction is None:
        instruction = INSTRUCTIONS[role]
    turns: list[dict] = [{"role": "user", "content": profile(plan)}]
    for m in window:
        role_ = "user" if m["role"] == "user" else "assistant"
        if turns[-1]["role"] == role_:
            turns[-1]["content"] += "\n" + m["text"]
        else:
            turns.append({"role": role_, "content": m["text"]})
    if turns[-1]["role"] == "assistant" or instruction:
        text = instruction or NUDGE
        if turns[-1]["role"] == "user":
            turns[-1]["content"] += "\n" + text
        else:
            turns.append({"role": "user", "content": text})
    return _llm(plan, bot, "reply", SONNET, REPLY_SYSTEMS[role], turns, 300, "lead_intent", "exact", "user")


def sim_start(date: str) -> datetime:
    day = datetime.fromisoformat(date).replace(tzinfo=timezone.utc)
    return day.replace(hour=7, minute=0, second=0, microsecond=0)
