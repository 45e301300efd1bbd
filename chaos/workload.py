"""The memory and LLM workloads the faults run under, recording everything into a `Truth`.

Why these calls: they are the promises under test. Writers append (retrying
the same `msg_id` after an error, as a careful client does, so duplicates
would show) and read their own write back with `min_seq`; readers ask for
windows of 10 (L1) and 50 (L2) without `min_seq`; the LLM loop asks each
user's `lead_intent` (an invalidating class: a user message must drop it)
with a prompt that stays the same, so it hits until the user speaks. Every
loop is paced and every request has a timeout: the load is bounded.
"""

from __future__ import annotations

import asyncio
import random
import time

import msgspec

from chaos.truth import Ack, Call, Forget, LLMCall, Read, Truth
from shared import subjects
from shared.service import ERROR_CODE_HEADER

TIMEOUT_S = 2.0
APPEND_TRIES = 3
INTENT = "lead_intent"


async def call(nc, subject: str, body: dict, timeout: float = TIMEOUT_S) -> tuple[int, dict]:
    """(200 or the error code, body); (0, {}) on a timeout or no responder."""
    try:
        msg = await nc.request(subject, msgspec.json.encode(body), timeout=timeout)
    except Exception:  # timeout, no responders, connection down: all mean "no answer"
        return 0, {}
    return int((msg.headers or {}).get(ERROR_CODE_HEADER, 200)), msgspec.json.decode(msg.data)


class Workload:
    def __init__(self, nc, truth: Truth, users: list[str], *, writers: int = 3, readers: int = 2,
                 llm: int = 2, pace_s: float = 0.05, seed: int = 1) -> None:
        self.nc, self.truth, self.users = nc, truth, users
        self.writers, self.readers, self.llm, self.pace_s = writers, readers, llm, pace_s
        self.rng = random.Random(seed)
        self.counter = 0

    def _record(self, kind: str, t0: float, ok: bool) -> None:
        self.truth.calls.append(Call(kind, t0, time.time(), ok))

    async def append(self, user: str, role: str = "user", text: str | None = None) -> Ack | None:
        self.counter += 1
        msg_id = f"m{self.counter}"
        body = {"user_id": user, "bot_id": "chaos", "role": role, "msg_id": msg_id,
                "text": text or f"{user} says message {self.counter} about the house on Elm street"}
        for _ in range(APPEND_TRIES):
            t0 = time.time()
            code, reply = await call(self.nc, subjects.MEMORY_APPEND, body)
            self._record("append", t0, code == 200)
            if code == 200:
                ack = Ack(user, msg_id, reply["seq"], role, time.time(), t_sent=t0)
                self.truth.ack(ack)
                return ack
            await asyncio.sleep(0.1)
        return None

    async def read(self, user: str, n: int, min_seq: int | None = None, search: str | None = None) -> dict | None:
        body: dict = {"user_id": user, "op": "search", "query": search, "k": 5} if search else \
            {"user_id": user, "op": "recent", "n": n}
        if min_seq is not None:
            body["min_seq"] = min_seq
        t0 = time.time()
        code, reply = await call(self.nc, subjects.MEMORY_GET, body)
        self._record("get", t0, code == 200)
        if code != 200:
            return None
        msgs = reply["messages"]
        self.truth.reads.append(Read(user, n if not search else 5, min_seq, t0, time.time(), reply["tier"],
                                     tuple(m["seq"] for m in msgs), tuple(m["msg_id"] for m in msgs),
                                     search=bool(search)))
        return reply

    async def intent(self, user: str) -> dict | None:
        body = {"task": INTENT, "user_id": user, "model": "claude-haiku-4-5", "max_tokens": 64,
                "messages": [{"role": "user", "content": f"What does lead {user} want? Answer in one word."}],
                "cache": {"volatility": INTENT, "mode": "exact"}}
        t0 = time.time()
        code, reply = await call(self.nc, subjects.LLM_COMPLETE, body, timeout=TIMEOUT_S * 2)
        self._record("llm", t0, code == 200)
        if code != 200:
            return None
        cache = reply["cache"]
        self.truth.llm.append(LLMCall(user, INTENT, t0, time.time(), cache["status"], cache.get("age_s"),
                                      reply.get("stop_reason")))
        return reply

    async def forget(self, user: str, deadline: float) -> bool:
        """`memory.forget` until one succeeds (or `deadline`): a client retries a forget that failed."""
        while time.time() < deadline:
            t0 = time.time()
            code, _ = await call(self.nc, subjects.MEMORY_FORGET, {"user_id": user}, timeout=5)
            self._record("forget", t0, code == 200)
            if code == 200:
                self.truth.forgets[user] = Forget(user, t0, time.time())
                return True
            await asyncio.sleep(0.2)
        return False

    # ------------------------------------------------------------------ loops

    async def _writer(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            user = self.rng.choice(self.users)
            ack = await self.append(user, role=self.rng.choice(("user", "assistant")))
            if ack is not None:
                await self.read(user, 10, min_seq=ack.seq)
            await asyncio.sleep(self.pace_s)

    async def _reader(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.read(self.rng.choice(self.users), self.rng.choice((10, 10, 50)))
            await asyncio.sleep(self.pace_s)

    async def _llm(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.intent(self.rng.choice(self.users))
            await asyncio.sleep(self.pace_s)

    async def run(self, stop: asyncio.Event) -> None:
        loops = ([self._writer] * self.writers + [self._reader] * self.readers + [self._llm] * self.llm)
        await asyncio.gather(*(loop(stop) for loop in loops))


async def watch_forgotten(w: Workload, user: str, stop: asyncio.Event) -> None:
    """Keep asking for a forgotten user's memory (recent and search) and intent until `stop`."""
    while not stop.is_set():
        await w.read(user, 10)
        await w.read(user, 5, search="the house on Elm street")
        await w.intent(user)
        await asyncio.sleep(0.1)
