"""Rolling summaries of each user's older history, for context assembly.

Why in L3: it holds the full history and sees every message as it is
indexed, and a summary is derived history (forget deletes it with the
messages: migrations/0010_summaries.sql).

A summary stands for a user's messages `from_seq`..`upto_seq`. The next one
is made from its text plus the next `block` messages, and only once at least
`keep` newer messages exist: the newest messages are served verbatim as the
recent window, so summarising them would spend tokens twice. The request to
the model is a pure function of the previous summary and the block, so
indexer replicas racing on one user send the same `llm.complete` (the
broker's exact cache answers the second) and store the same row (one wins).

Summaries are never made on the read path: the indexer `note`s the users it
just indexed and a background loop works through them, a few at a time; a
context read serves the newest summary there is and says what it covers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence

import structlog

from shared import metrics, subjects, tokens
from shared.contract import CompleteReply, Message, Summary
from shared.errors import TierError

from . import store

log = structlog.get_logger()

SYSTEM = (
    "You keep a running summary of one customer's text conversation with a company's assistants. "
    "Rewrite the summary so far to include what the new messages add. Keep what an assistant needs "
    "later: names, places, budgets, dates, preferences, decisions, promises made and open questions. "
    "Drop greetings and small talk. At most 150 words, plain sentences. Reply with the summary only."
)
TASK = "summary"
MAX_TOKENS = 400
FINISHED = ("end_turn", "stop_sequence")
RETRY_S = 5.0

_SQL = {
    "latest": f"""
        SELECT text, from_seq, upto_seq, tokens FROM {store.SCHEMA}.summaries
        WHERE user_id = $1 AND upto_seq <= $2 ORDER BY upto_seq DESC LIMIT 1""",
    "after": f"""
        SELECT {store.COLUMNS} FROM {store.SCHEMA}.messages m
        WHERE m.user_id = $1 AND m.seq > $2 AND m.seq <= $3 ORDER BY m.seq LIMIT $4""",
    "put": f"SELECT {store.SCHEMA}.put_summary($1, $2, $3, $4, $5)",
    # a summary that starts below its user's oldest row stands for swept messages
    "retire": f"""
        DELETE FROM {store.SCHEMA}.summaries s
        WHERE s.from_seq < coalesce((SELECT min(m.seq) FROM {store.SCHEMA}.messages m
                                     WHERE m.user_id = s.user_id), s.upto_seq + 1)""",
}


async def latest(pool, user_id: str, upto: int) -> Summary | None:
    """The user's newest summary that ends at or below seq `upto`."""
    row = await store.run(pool.fetchrow, _SQL["latest"], user_id, upto)
    return None if row is None else Summary(row["text"], row["from_seq"], row["upto_seq"], row["tokens"])


async def retire(pool) -> int:
    """Delete the summaries that stand for messages retention deleted; returns how many."""
    status = await store.run(pool.execute, _SQL["retire"])
    return int(status.rsplit(" ", 1)[-1])


def next_block(after: Sequence[Message], block: int, keep: int) -> Sequence[Message]:
    """The messages the next summary adds: the oldest `block` of `after` (the messages
    past the last summary, oldest first), if `keep` newer ones remain unsummarised."""
    return after[:block] if len(after) >= block + keep else ()


def request(user_id: str, model: str, previous: Summary | None, block: Sequence[Message]) -> dict:
    """The `llm.complete` body extending `previous` by `block` (deterministic, see above)."""
    lines = "\n".join(f"{m.role}: {m.text}" for m in block)
    prompt = (f"Summary so far:\n{previous.text if previous else '(nothing yet)'}\n\n"
              f"New messages:\n{lines}")
    return {"task": TASK, "user_id": user_id, "model": model, "system": SYSTEM,
            "max_tokens": MAX_TOKENS, "temperature": 0,
            "messages": [{"role": "user", "content": prompt}],
            "cache": {"volatility": "static", "mode": "exact", "scope": "user"}}


class Summarizer:
    """Extends the users' summaries in the background, `concurrency` users at a time."""

    def __init__(self, rt, pool, floor, *, block: int, keep: int, model: str, concurrency: int = 4) -> None:
        self.rt = rt
        self.pool = pool
        self.floor = floor
        self.block = block
        self.keep = keep
        self.model = model
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(concurrency)
        self._made = metrics.summaries.labels("made")
        self._failed = metrics.summaries.labels("failed")

    def note(self, users: Iterable[str]) -> None:
        """These users have new messages indexed: look at them soon."""
        self._dirty.update(users)
        self._wake.set()

    async def run(self) -> None:
        running: set[asyncio.Task] = set()
        while True:
            await self._wake.wait()
            self._wake.clear()
            users, self._dirty = self._dirty, set()
            for user in users:
                await self._slots.acquire()
                task = asyncio.create_task(self._user(user))
                running.add(task)
                task.add_done_callback(running.discard)
                task.add_done_callback(lambda _t: self._slots.release())

    async def _user(self, user_id: str) -> None:
        try:
            while await self.extend(user_id):
                pass
        except (TierError, store.TransientError, OSError) as exc:
            self._failed.inc()
            log.warning("summary_not_made", error=str(exc) or type(exc).__name__, retry_in=RETRY_S)
            asyncio.get_running_loop().call_later(RETRY_S, self.note, (user_id,))

    async def extend(self, user_id: str) -> bool:
        """Add one block to the user's summary if one is due; True when this call stored one."""
        upto = await self.floor.fresh()  # rows above it may still miss an older seq (floor.py)
        previous = await latest(self.pool, user_id, upto)
        start = previous.upto_seq if previous else 0
        rows = await store.run(self.pool.fetch, _SQL["after"], user_id, start, upto, self.block + self.keep)
        block = next_block([store.to_message(r) for r in rows], self.block, self.keep)
        if not block:
            return False
        reply = await self.rt.request(subjects.LLM_COMPLETE, request(user_id, self.model, previous, block),
                                      CompleteReply, timeout=self.rt.settings.llm_timeout_s)
        if reply.stop_reason not in FINISHED:
            raise TierError(f"the summary was cut off ({reply.stop_reason}); not stored")
        text = reply.text.strip()
        stored = await store.run(self.pool.fetchval, _SQL["put"], user_id,
                                  previous.from_seq if previous else block[0].seq, block[-1].seq,
                                  text, tokens.estimate(text))
        if stored:  # else another replica stored it first (it goes on), or a forget voided it
            self._made.inc()
            log.info("summary_made", upto_seq=block[-1].seq, cost_usd=reply.cost_usd,
                     cache=reply.cache.status)
        return bool(stored)
