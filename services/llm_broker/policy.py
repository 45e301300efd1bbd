"""Cache policy of the llm-broker: pure functions, no I/O.

Keys have hard partitions. Everything that changes what the model would say
(model, system prompt, tools, sampling parameters, max_tokens, stop
sequences, task, the earlier turns) and who may see the answer (scope: the
user, or global) goes into the partition hash; semantic matching happens only
inside one partition, on the latest user message. The exact key is the
partition plus the latest user message verbatim.

TTLs are absolute: `expires_at` is fixed when the entry is stored.
"""

from __future__ import annotations

import hashlib
import tomllib
from pathlib import Path

import msgspec

from shared.contract import CompleteRequest, Usage
from shared.errors import BadRequest

DEFAULT_CONFIG = Path(__file__).with_name("config.toml")


class Volatility(msgspec.Struct, frozen=True):
    ttl_s: float
    invalidate_on_user_message: bool = False


class Price(msgspec.Struct, frozen=True):
    input: float
    output: float
    cache_write: float
    cache_read: float


class Config(msgspec.Struct, frozen=True):
    volatility: dict[str, Volatility]
    prices: dict[str, Price]
    # Tasks whose answer is a label: the auditor wants the same label, not similar text.
    label_tasks: list[str] = []

    @classmethod
    def load(cls, path: str | Path | None = None) -> "Config":
        raw = tomllib.loads(Path(path or DEFAULT_CONFIG).read_text())
        config = msgspec.convert(raw, cls)
        if "default" not in config.prices:
            raise ValueError("the price table needs a `default` row")
        return config

    def volatility_of(self, name: str) -> Volatility:
        try:
            return self.volatility[name]
        except KeyError:
            known = ", ".join(sorted(self.volatility))
            raise BadRequest(f"unknown volatility class {name!r}; known: {known}") from None

    def price_of(self, model: str) -> Price:
        return self.prices.get(model) or self.prices["default"]

    def invalidating(self) -> list[str]:
        return sorted(n for n, v in self.volatility.items() if v.invalidate_on_user_message)


def cost_usd(price: Price, usage: Usage) -> float:
    """What a call cost; cached prompt tokens at their discounted prices."""
    return (usage.input_tokens * price.input
            + usage.output_tokens * price.output
            + usage.cache_creation_input_tokens * price.cache_write
            + usage.cache_read_input_tokens * price.cache_read) / 1_000_000


_canon = msgspec.json.Encoder(order="sorted")


def _digest(value) -> str:
    return hashlib.sha256(_canon.encode(value)).hexdigest()[:32]


def partition_key(req: CompleteRequest) -> str:
    """Everything but the latest user message, and who may share the answer."""
    earlier = [(m.role, m.plain()) for m in req.messages[:-1]]
    return _digest({
        "model": req.model, "system": req.system_text(), "tools": req.tools,
        "temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k,
        "max_tokens": req.max_tokens, "stop": req.stop_sequences, "task": req.task,
        "volatility": req.cache.volatility,
        "scope": req.user_id if req.cache.scope == "user" else "*global*",
        "earlier": _digest(earlier),
    })


def latest_user_text(req: CompleteRequest) -> str:
    return req.messages[-1].plain()


def exact_key(partition: str, req: CompleteRequest) -> str:
    return f"{partition}:{_digest(latest_user_text(req))}"


class Entry(msgspec.Struct):
    """A cached response and what it takes to judge it later."""

    id: str  # the exact key
    partition: str
    user_id: str
    task: str
    model: str
    volatility: str
    query: str
    text: str
    stop_reason: str | None
    usage: Usage
    cost_usd: float
    created_at: float
    expires_at: float

    def fresh(self, now: float) -> bool:
        return now < self.expires_at

    def age(self, now: float) -> float:
        return max(0.0, now - self.created_at)


def new_entry(req: CompleteRequest, partition: str, text: str, stop_reason: str | None,
              usage: Usage, cost: float, volatility: Volatility, now: float) -> Entry:
    return Entry(id=exact_key(partition, req), partition=partition, user_id=req.user_id,
                 task=req.task, model=req.model, volatility=req.cache.volatility,
                 query=latest_user_text(req), text=text, stop_reason=stop_reason, usage=usage,
                 cost_usd=cost, created_at=now, expires_at=now + volatility.ttl_s)
