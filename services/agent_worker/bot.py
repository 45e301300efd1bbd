"""What a sales bot does for one lead message, and what it measures.

For each inbound SMS: append it; read the lead's recent messages (n=10,
with `min_seq` = the append's seq, so the read includes it); sometimes a
longer read (n=30..100) or the older history (n=101..500), sometimes a search
of the history; then the LLM calls, each with the cache options its data
deserves:

| task           | volatility     | mode     | scope  | why                                           |
|----------------|----------------|----------|--------|-----------------------------------------------|
| lead_score     | lead_score     | exact    | user   | a function of what this lead said             |
| intent         | lead_intent    | semantic | user   | of the latest message; changes with the next  |
| market_context | market_context | semantic | global | many leads ask about the same area            |
| reply          | lead_intent    | exact    | user   | depends on the conversation, rarely repeats   |

then it appends its reply. A follow-up (the lead went quiet) re-reads the
window, re-scores and re-classifies the unchanged conversation, and may send
a nudge. Every call is written to the call log (`CallLog`) as it returns.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from datetime import datetime, timedelta, timezone

import msgspec

from services.agent_worker import conversations as conv
from services.agent_worker.client import Call, Tiermem
from services.agent_worker.scenario import LeadPlan, Mix

HAIKU = "claude-haiku-4-5"
SONNET = "claude-sonnet-4-5"
SCORE_SYSTEM = ("You score real-estate leads for a sales team. Read the lead's messages and "
                "give a score from 0 (not buying) to 100 (ready to buy now). Answer with the number only.")
INTENT_SYSTEM = ("Classify the lead's intent from their latest text. Answer with one label: "
                 "availability, pricing, schedule_viewing, financing, not_interested, other.")
MARKET_SYSTEM = ("You are a real-estate market analyst. In two sentences, give the current market "
                 "context an agent needs: median list price, days on market, inventory trend.")
MARKET_ASKS = ("Market update for {ptype} homes in {area}",
               "Market update for {ptype} homes in {area}",
               "Current market conditions for {ptype} homes in {area}")
NUDGE = "(The lead has not answered yet. Write one short, friendly follow-up text.)"


def reply_system() -> str:
    """The reply bot's prompt: a stable playbook and listing sheet (long, so prompt-cached)."""
    return ("You are a friendly, concise real-estate sales assistant texting leads by SMS for "
            "Sunrise Realty. Keep replies under 300 characters, answer the question asked, never "
            "invent facts that are not in the listing sheet, propose a concrete next step (a showing, "
            "a call with a lender, sending details), and stop texting anyone who asks you to. "
            "Quote prices from the sheet. Suggest showings on weekday evenings or weekends.\n\n"
            "Listing sheet:\n" + conv.listings_text())


_REPLY_SYSTEM = reply_system()
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


class Bot:
    def __init__(self, client: Tiermem, log: CallLog, clock: SimClock, mix: Mix) -> None:
        self.client, self.log, self.clock, self.mix = client, log, clock, mix

    async def run_lead(self, plan: LeadPlan) -> None:
        rng = random.Random(plan.user_id)  # the lead's own draws: same run, same calls
        for i, ev in enumerate(plan.events):
            await self.clock.sleep_until(ev.at)
            ctx = {"lead": plan.user_id, "bot": plan.bot_id, "ix": f"{plan.index}:{i}", "step": ev.kind}
            late_ms = (time.time() - self.clock.wall(ev.at)) * 1000
            t0 = time.perf_counter()
            if ev.kind == "inbound":
                await self.inbound(plan, ev.text, i, ctx, rng)
            else:
                await self.followup(plan, i, ctx, rng)
            self.log.write({"kind": "interaction", **ctx, "sim": round(ev.at, 1),
                            "late_ms": round(late_ms, 1),
                            "ms": round((time.perf_counter() - t0) * 1000, 3)})

    async def inbound(self, plan: LeadPlan, text: str, i: int, ctx: dict, rng: random.Random) -> None:
        user, c = plan.user_id, self.client
        a = await c.append(user, plan.bot_id, "user", text, f"{user}:{i}:in", self.clock.iso())
        self.log.call(a, "append", ctx, role="user", seq=a.reply.get("seq"), dup=a.reply.get("duplicate"))
        if not a.ok:
            return
        seq = a.reply["seq"]
        window = await self.read(c.recent(user, 10, min_seq=seq), ctx, n=10)
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
        history = window or [{"role": "user", "text": text}]
        asks = [self.llm(score_request(plan, history), ctx), self.llm(intent_request(plan, text), ctx)]
        if rng.random() < self.mix["market"]:
            asks.append(self.llm(market_request(plan, rng), ctx))
        await asyncio.gather(*asks)
        answer = await self.llm(reply_request(plan, history), ctx)
        if answer is not None:
            r = await c.append(user, plan.bot_id, "assistant", answer, f"{user}:{i}:out", self.clock.iso())
            self.log.call(r, "append", ctx, role="assistant", seq=r.reply.get("seq"))

    async def followup(self, plan: LeadPlan, i: int, ctx: dict, rng: random.Random) -> None:
        """The lead went quiet: re-read, re-score, re-classify; maybe nudge."""
        window = await self.read(self.client.recent(plan.user_id, 10), ctx, n=10)
        if not window:
            return
        last_lead = next((m["text"] for m in reversed(window) if m["role"] == "user"), None)
        asks = [self.llm(score_request(plan, window), ctx)]
        if last_lead:
            asks.append(self.llm(intent_request(plan, last_lead), ctx))
        score, *_ = await asyncio.gather(*asks)
        keen = bool(score and re.match(r"\d+", score) and int(re.match(r"\d+", score).group()) >= 40)
        if keen and rng.random() < self.mix["nudge"]:
            answer = await self.llm(reply_request(plan, window, nudge=True), ctx)
            if answer is not None:
                r = await self.client.append(plan.user_id, plan.bot_id, "assistant", answer,
                                             f"{plan.user_id}:{i}:nudge", self.clock.iso())
                self.log.call(r, "append", ctx, role="assistant", seq=r.reply.get("seq"))

    async def read(self, pending, ctx: dict, *, n: int) -> list[dict]:
        call: Call = await pending
        messages = call.reply.get("messages", []) if call.ok else []
        self.log.call(call, "get", ctx, n=n, tier=call.reply.get("tier"), count=len(messages))
        return messages

    async def llm(self, body: dict, ctx: dict) -> str | None:
        call = await self.client.complete(body)
        r = call.reply
        usage, cache = r.get("usage") or {}, r.get("cache") or {}
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


def _llm(plan: LeadPlan, task: str, model: str, system: str, messages: list[dict], max_tokens: int,
         volatility: str, mode: str, scope: str) -> dict:
    return {"task": task, "user_id": plan.user_id, "bot_id": plan.bot_id, "model": model,
            "system": system, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "cache": {"volatility": volatility, "mode": mode, "scope": scope}}


def score_request(plan: LeadPlan, window: list[dict]) -> dict:
    # The lead's own words only: the score should not change because the bot said something.
    transcript = "\n".join(f"lead: {m['text']}" for m in window if m["role"] == "user") or "(no texts yet)"
    return _llm(plan, "lead_score", HAIKU, SCORE_SYSTEM, [{"role": "user", "content": transcript}], 8,
                "lead_score", "exact", "user")


def intent_request(plan: LeadPlan, text: str) -> dict:
    return _llm(plan, "intent", HAIKU, INTENT_SYSTEM, [{"role": "user", "content": text}], 8,
                "lead_intent", "semantic", "user")


def market_request(plan: LeadPlan, rng: random.Random) -> dict:
    p = plan.persona
    ask = rng.choice(MARKET_ASKS).format(ptype=p.property_type, area=p.area)
    return _llm(plan, "market_context", HAIKU, MARKET_SYSTEM, [{"role": "user", "content": ask}], 150,
                "market_context", "semantic", "global")


def reply_request(plan: LeadPlan, window: list[dict], *, nudge: bool = False) -> dict:
    turns: list[dict] = []
    for m in window:
        role = "user" if m["role"] == "user" else "assistant"
        if not turns and role == "assistant":
            continue  # the Messages API starts with the user
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] += "\n" + m["text"]
        else:
            turns.append({"role": role, "content": m["text"]})
    if not turns or turns[-1]["role"] == "assistant" or nudge:
        if turns and turns[-1]["role"] == "user":
            turns[-1]["content"] += "\n" + NUDGE
        else:
            turns.append({"role": "user", "content": NUDGE})
    return _llm(plan, "reply", SONNET, _REPLY_SYSTEM, turns, 300, "lead_intent", "exact", "user")


def sim_start(date: str) -> datetime:
    day = datetime.fromisoformat(date).replace(tzinfo=timezone.utc)
    return day.replace(hour=7, minute=0, second=0, microsecond=0)
