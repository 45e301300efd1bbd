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
lead's assembled context (memory.get op "context": the recent window of 10
with `min_seq` = the append's seq, so it includes the text, the rolling
summary, the older messages matching the text); sometimes a longer read
(n=30..100) or the older history (n=101..500), sometimes a search of the
history; then score, intent, and for half the messages the market context
of the lead's area, then the reply, which it appends.

**Every text is written from the assembled context** (`context_reply_request`;
a review that sends a check-in reads the context first, with the lead's last
text as the query): the role's system prompt and the summary are system
blocks with prompt-cache breakpoints, the CRM record, the relevant older
messages and the window follow. For a sample of texts (`quality` of the mix,
at most `quality_max` per worker) `check_quality` asks the same text with
the whole transcript, uncached, and has the freshness-auditor's LLM judge
say whether the two agree.

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
assembled context in the messages; they are never shared. Prompt sizes: about 5.5k
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
from services.agent_worker.measured import Call, Measured
from services.agent_worker.scenario import LeadPlan, Mix
from shared.contract import ContextReply
from shared.errors import TierError
from shared.llm_judge import LLMJudge, answers_agree, normalise_label
from tiermem import AsyncClient

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
# The context a text is written from (memory.get op "context"): its token budget, the recent
# window it starts from and how many older messages matching the question it may add.
CONTEXT_BUDGET, CONTEXT_N, CONTEXT_K = 2000, 10, 5
EPHEMERAL = {"type": "ephemeral"}  # a provider prompt-cache breakpoint
QUALITY_TASK = "quality_full"  # the quality check's full-transcript reply (not the fleet's cost)


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
            record["error"] = call.error
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
    def __init__(self, client: AsyncClient, measure: Measured, log: CallLog, clock: SimClock, mix: Mix,
                 baseline: Baseline | None = None) -> None:
        self.client, self.measure, self.log, self.clock, self.mix = client, measure, log, clock, mix
        self.baseline = baseline
        self.quality_left = int(mix["quality_max"])  # this worker's bound on quality checks
        self.judge = LLMJudge(client)  # the freshness-auditor's judge (shared/llm_judge.py), via llm.complete
        self.checks: set[asyncio.Task] = set()  # quality checks running beside the interactions

    async def run_lead(self, plan: LeadPlan) -> None:
        rng = random.Random(plan.user_id)  # the lead's own draws: same run, same calls
        # Which replies get a quality check: draws of their own, so the check changes no other call.
        quality = random.Random(f"quality:{plan.user_id}")
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
                await self.inbound(plan, bot, ev.text, i, ctx, rng, quality, state)
            else:
                await self.review(plan, bot, ev.role or "qualifier", ev.at, i, ctx, rng, quality, state)
            self.log.write({"kind": "interaction", **ctx, "sim": round(ev.at, 1),
                            "late_ms": round(late_ms, 1),
                            "ms": round((time.perf_counter() - t0) * 1000, 3)})

    async def inbound(self, plan: LeadPlan, bot: str, text: str, i: int, ctx: dict,
                      rng: random.Random, quality: random.Random, state: LeadState) -> None:
        """Append the lead's text, read the assembled context with it as the query (read-your-writes:
        `min_seq`), score, classify, maybe the market, then the reply built from that context."""
        user = plan.user_id
        self.remember(ctx, state)
        a = await self.append(user, bot, "user", text, f"{user}:{i}:in", ctx)
        if not a.ok:
            return
        context = await self.context(user, ctx, query=text, min_seq=a.reply.seq)
        await self.more_reads(user, a.reply.seq, ctx, rng)
        window = messages_of(context) if context is not None else []
        history = window or [{"role": "user", "text": text}]
        full = state.transcript
        asks = [self.llm(score_request(plan, history, bot), ctx, score_request(plan, full, bot)),
                self.llm(intent_request(plan, text, bot), ctx)]
        if rng.random() < self.mix["market"]:
            asks.append(self.llm(market_request(plan, rng, bot), ctx))
        await asyncio.gather(*asks)
        answer = await self.write_reply(plan, bot, "qualifier", None, context, history, ctx, quality, state)
        if answer is not None:
            r = await self.append(user, bot, "assistant", answer, f"{user}:{i}:out", ctx)
            if r.ok:
                state.transcript.append({"role": "assistant", "text": answer})

    async def review(self, plan: LeadPlan, bot: str, role: str, at: float, i: int, ctx: dict,
                     rng: random.Random, quality: random.Random, state: LeadState) -> None:
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
        # The text is written from the assembled context; the lead's last text is what it answers.
        context = await self.context(user, ctx, query=last_lead)
        answer = await self.write_reply(plan, bot, role, INSTRUCTIONS[role], context, window, ctx, quality,
                                        state)
        if answer is not None:
            r = await self.append(user, bot, "assistant", answer, f"{user}:{i}:{role}", ctx)
            if r.ok:
                state.checkin_at = at
                state.unanswered += 1
                state.transcript.append({"role": "assistant", "text": answer})

    async def write_reply(self, plan: LeadPlan, bot: str, role: str, instruction: str | None,
                          context: ContextReply | None, window: list[dict], ctx: dict,
                          quality: random.Random, state: LeadState) -> str | None:
        """The text, from the assembled context (the plain window when the context read failed);
        for a sampled few, the same text asked with the whole transcript and the two compared."""
        if context is not None:
            request = context_reply_request(plan, context, bot=bot, role=role, instruction=instruction)
        else:
            request = reply_request(plan, window, bot=bot, role=role, instruction=instruction)
        full = reply_request(plan, state.transcript, bot=bot, role=role, instruction=instruction)
        answer = await self.llm(request, ctx, full)
        if (answer is not None and context is not None and self.quality_left > 0
                and quality.random() < self.mix["quality"]):
            self.quality_left -= 1
            # beside the interaction, not in it: the check must not slow the fleet it measures
            task = asyncio.create_task(self.check_quality(answer, full, context, dict(ctx)))
            self.checks.add(task)
            task.add_done_callback(self.checks.discard)
        return answer

    async def drain_checks(self) -> None:
        """Wait for the quality checks still running (at the end of the plan)."""
        while self.checks:
            await asyncio.gather(*self.checks)

    async def check_quality(self, answer: str, full: dict, context: ContextReply, ctx: dict) -> None:
        """Ask the reply again with the whole transcript, uncached (a real call, so a cached
        answer cannot agree with itself), and let the auditor's judge say whether the two
        answers entail each other. Logged as a `quality` record; not part of the fleet's cost."""
        body = {**full, "task": QUALITY_TASK, "cache": {**full["cache"], "mode": "off"}}
        call = await self.measure(self.client.complete(body), name="llm.complete")
        record: dict = {"task": "reply", "model": body["model"], "context_tokens": context.tokens,
                        "summary": context.summary is not None, "relevant": len(context.relevant),
                        "full": _usage(call)}
        if call.ok and normalise_label(answer) == normalise_label(call.reply.text):
            record.update(agree=True, reason="same")  # as the auditor does: nothing to judge
        elif call.ok:
            t0 = time.perf_counter()
            try:
                support, usage = await self.judge.ask(answer, call.reply.text, model=body["model"])
            except TierError as exc:
                record["judge_error"] = exc.message
            else:
                record["judge"] = {"model": body["model"], "ms": round((time.perf_counter() - t0) * 1000, 3),
                                   **{k: getattr(usage, k) for k in TOKEN_KINDS}}
                if support is not None:
                    agree, reason = answers_agree(answer, call.reply.text, label=False, support=support,
                                                  threshold=self.judge.threshold)
                    record.update(support=list(support), agree=agree, reason=reason)
        self.log.call(call, "quality", ctx, **record)

    async def append(self, user: str, bot: str, role: str, text: str, msg_id: str, ctx: dict) -> Call:
        call = await self.measure(self.client.append(user, bot, role, text, msg_id=msg_id, ts=self.clock.iso()),
                                  name="memory.append")
        fields = {"role": role, "seq": call.reply.seq if call.ok else None}
        if role == "user":
            fields["dup"] = call.reply.duplicate if call.ok else None
        self.log.call(call, "append", ctx, **fields)
        return call

    async def context(self, user: str, ctx: dict, *, query: str | None,
                      min_seq: int | None = None) -> ContextReply | None:
        """memory.get op "context": the recent window, the summary and what matches `query`."""
        call = await self.measure(self.client.context(user, CONTEXT_BUDGET, query=query, n=CONTEXT_N,
                                                      k=CONTEXT_K, min_seq=min_seq),
                                  name="memory.get", lookup=True)
        c: ContextReply | None = call.reply
        fields = {} if c is None else {
            "tier": c.tier, "count": len(c.messages), "relevant": len(c.relevant),
            "summary": c.summary is not None, "tokens": c.tokens, "budget": c.budget_tokens,
            "missing": c.missing}
        self.log.call(call, "context", ctx, n=CONTEXT_N, **fields)
        return c

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
            s = await self.measure(c.search(user, q, k=5), name="memory.get", lookup=True)
            self.log.call(s, "search", ctx, tier=s.reply.tier if s.ok else None,
                          count=len(s.reply.messages) if s.ok else 0)

    async def read(self, pending, ctx: dict, *, n: int) -> list[dict]:
        call = await self.measure(pending, name="memory.get", lookup=True)
        messages = [{"role": m.role, "text": m.text} for m in call.reply.messages] if call.ok else []
        self.log.call(call, "get", ctx, n=n, tier=call.reply.tier if call.ok else None, count=len(messages))
        return messages

    def remember(self, ctx: dict, state: LeadState) -> None:
        """The baseline fleet's memory-retrieval call of this interaction (priced, not sent)."""
        if self.baseline is not None:
            self.baseline.add(ctx, "memory_retrieval", memory_request(HAIKU, state.transcript), None)

    async def llm(self, body: dict, ctx: dict, twin: dict | None = None) -> str | None:
        """One llm.complete; `twin` is the same call as a fleet without tiermem builds it (the
        whole transcript for the window; None: the same request), priced for the baseline."""
        call = await self.measure(self.client.complete(body), name="llm.complete")
        r = call.reply
        if self.baseline is not None and call.ok:
            self.baseline.add(ctx, body["task"], messages_body(twin or body), r.usage.output_tokens)
        cache = {} if r is None else {"status": r.cache.status, "match": r.cache.match,
                                      "sim_score": r.cache.similarity, "age_s": r.cache.age_s}
        self.log.call(call, "llm", ctx, task=body["task"], model=body["model"],
                      volatility=body["cache"]["volatility"], mode=body["cache"]["mode"],
                      scope=body["cache"]["scope"], **cache, **_usage(call))
        return r.text if call.ok else None


TOKEN_KINDS = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")


def _usage(call: Call) -> dict:
    """The tokens, cost and saving an llm.complete reply reported (zeros for an error)."""
    r = call.reply
    if r is None:
        return {**dict.fromkeys(TOKEN_KINDS, 0), "cost_usd": 0.0, "saved_usd": 0.0}
    return {**{k: getattr(r.usage, k) for k in TOKEN_KINDS}, "cost_usd": r.cost_usd, "saved_usd": r.saved_usd}


def messages_of(context: ContextReply) -> list[dict]:
    return [{"role": m.role, "text": m.text} for m in context.messages]


# --------------------------------------------------------------------------- requests


def _llm(plan: LeadPlan, bot: str, task: str, model: str, system: str | list[dict], messages: list[dict],
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
                  instruction: str | None = None) -> dict:
    """A text as a bot without context assembly writes it: its role's stable system prompt; the
    lead's CRM record, then the messages of `window` (the whole transcript, for the baseline
    and the quality check), then what to write when it texts first."""
    turns = _turns(profile(plan), window, instruction)
    return _llm(plan, bot, "reply", SONNET, REPLY_SYSTEMS[role], turns, 300, "lead_intent", "exact", "user")


def context_reply_request(plan: LeadPlan, context: ContextReply, *, bot: str = "", role: str = "qualifier",
                          instruction: str | None = None) -> dict:
    """A text built from the assembled context (memory.get op "context").

    Most stable first, so the provider's prompt cache serves the longest
    prefix: the role's system prompt (the same for every lead: a breakpoint),
    the rolling summary of the lead's older history (the same until the next
    summary: a breakpoint), then the CRM record with the older messages that
    match the question, and the recent window. Those change with every
    question and message, so no breakpoint is spent on them.
    """
    system = [{"type": "text", "text": REPLY_SYSTEMS[role], "cache_control": EPHEMERAL}]
    if context.summary is not None:
        s = context.summary
        system.append({"type": "text", "cache_control": EPHEMERAL,
                       "text": f"Summary of this lead's earlier conversation (messages {s.from_seq}-"
                               f"{s.upto_seq}):\n{s.text}"})
    first = profile(plan)
    if context.relevant:
        older = "\n".join(f"{'lead' if m.role == 'user' else 'us'}: {m.text}"
                          for m in sorted(context.relevant, key=lambda m: m.seq))
        first += f"\n\nEarlier messages that may matter:\n{older}"
    turns = _turns(first, messages_of(context), instruction)
    return _llm(plan, bot, "reply", SONNET, system, turns, 300, "lead_intent", "exact", "user")


def _turns(first: str, window: list[dict], instruction: str | None) -> list[dict]:
    """`first` as the opening user turn, then the conversation (consecutive same-role messages
    joined), then `instruction` (or a nudge when the conversation ends with our text)."""
    turns: list[dict] = [{"role": "user", "content": first}]
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
    return turns


def sim_start(date: str) -> datetime:
    day = datetime.fromisoformat(date).replace(tzinfo=timezone.utc)
    return day.replace(hour=7, minute=0, second=0, microsecond=0)
