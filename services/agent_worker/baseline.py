"""The fleet without tiermem, priced in the same run: what the demo's saving is measured against.

For every interaction the bots run, a fleet without tiermem would have sent:

- each of the same model calls with the **whole conversation** in it (the
  lead's full transcript where our bots put the recent window), and
- one **memory-retrieval call** that asks the model to pull out of the
  transcript what matters for the next reply (teams without a memory layer
  do this in place of a lookup),

every one of them sent (no response cache) and billed at the full input
price (no provider prompt caching). Nothing of it is sent during the run:
the requests are kept and priced when the plan is done (`drain`). Its
input tokens are counted with the Messages API's `count_tokens` (the
simulator implements it), its output tokens are those of our own answer to
the same call, except the memory-retrieval call's, which has no twin: a
`SAMPLE` share of those is sent for real and their mean output stands for
the rest.

Each counterfactual call becomes a `baseline` record in the call log, with
the character count of every text block it holds, so the demo's tests can
recount its tokens without this code.
"""

from __future__ import annotations

import asyncio
import random

import anthropic
import structlog

log = structlog.get_logger()

SAMPLE = 0.01  # share of memory-retrieval calls sent for real, for their output tokens
CONCURRENCY = 8  # count_tokens requests in flight
MEMORY_SYSTEM = (
    "You are the memory of a sales assistant. From the full conversation below, extract what the "
    "assistant must know to write its next text to this lead: who they are, what they want, budget, "
    "financing, timeline, homes discussed, promises made and open questions. Bullet points, no more "
    "than needed."
)
MEMORY_MAX_TOKENS = 400


def memory_request(model: str, transcript: list[dict]) -> dict:
    """The memory-retrieval call over the whole transcript (what a fleet without tiermem sends)."""
    lines = "\n".join(f"{m['role']}: {m['text']}" for m in transcript) or "(no messages yet)"
    return {"model": model, "max_tokens": MEMORY_MAX_TOKENS, "system": MEMORY_SYSTEM,
            "messages": [{"role": "user", "content": lines}]}


def blocks(request: dict) -> list[int]:
    """The characters of each text block of a request (system first), as a tokenizer sees them."""
    system = request.get("system") or ""
    out = [len(system)] if isinstance(system, str) else [len(b["text"]) for b in system]
    for m in request["messages"]:
        content = m["content"]
        out.extend([len(content)] if isinstance(content, str) else [len(b["text"]) for b in content])
    return out


def messages_body(body: dict) -> dict:
    """The Messages API part of an `llm.complete` body (what would go to the provider)."""
    return {"model": body["model"], "max_tokens": body["max_tokens"], "system": body.get("system") or "",
            "messages": body["messages"]}


class Baseline:
    """Collects counterfactual calls during the run and prices them after it (`drain`), so
    counting their tokens takes no CPU from the interactions being measured."""

    def __init__(self, client: anthropic.AsyncAnthropic, write, *, seed: str, sample: float = SAMPLE) -> None:
        self.client = client
        self.write = write
        self.sample = sample
        self.rng = random.Random(seed)
        self._slots = asyncio.Semaphore(CONCURRENCY)
        self._pending: list[tuple] = []

    def add(self, ctx: dict, task: str, request: dict, output_tokens: int | None) -> None:
        """Keep `request` (a Messages API body) for pricing; `output_tokens` None: the
        memory-retrieval call, sent for real for a `sample` share."""
        send = output_tokens is None and self.rng.random() < self.sample
        self._pending.append((dict(ctx), task, request, output_tokens, send))

    async def _price(self, ctx: dict, task: str, request: dict, output_tokens: int | None, send: bool) -> None:
        async with self._slots:
            try:
                counted = await self.client.messages.count_tokens(
                    model=request["model"], system=request["system"], messages=request["messages"])
                if send:
                    reply = await self.client.messages.create(**request)
                    output_tokens = reply.usage.output_tokens
            except anthropic.APIError as exc:
                log.warning("baseline_not_priced", task=task, error=str(exc))
                self.write({"kind": "baseline", **ctx, "task": task, "error": str(exc)[:200]})
                return
        self.write({"kind": "baseline", **ctx, "task": task, "model": request["model"],
                    "input_tokens": counted.input_tokens, "output_tokens": output_tokens, "sent": send,
                    "blocks": blocks(request)})

    async def drain(self) -> None:
        """Price everything collected (at the end of a run), CONCURRENCY requests at a time."""
        pending, self._pending = self._pending, []
        await asyncio.gather(*(self._price(*p) for p in pending))
