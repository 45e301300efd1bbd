"""The LLM cache's configuration (`LLM_CONFIG`, default `llm_config.toml` beside this file).

Read by the llm-broker, which applies all of it, and by the freshness-auditor,
which needs the same price table (what a re-ask costs), the same label tasks
(compared by equality) and the same bounded metric labels; one struct, so the
two cannot read the file differently.
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import msgspec

from shared import metrics
from shared.errors import BadRequest
from shared.pricing import Price
from shared.retention import Retention

DEFAULT_CONFIG = Path(__file__).with_name("llm_config.toml")
DEFAULT_MAX_FALSE_HIT_RATE = 0.01


class Volatility(msgspec.Struct, frozen=True):
    ttl_s: float
    invalidate_on_user_message: bool = False


class Config(msgspec.Struct, frozen=True):
    volatility: dict[str, Volatility]
    prices: dict[str, Price]
    models: list[str]  # the allow-list: any other model is refused
    max_tokens: int = 8192
    max_messages: int = 1000
    # Tasks whose answer is a label: the auditor wants the same label, not similar text.
    label_tasks: list[str] = []
    # Tasks whose answers depend on nothing about the user: only these may use scope global.
    global_tasks: list[str] = []
    # Tasks of whole API requests (the HTTP drop-in's): scope global in exact mode is
    # accepted with any conversation, since the exact key covers every turn.
    request_tasks: list[str] = []
    # Further task and bot names that metrics label by name (any other is `other`).
    tasks: list[str] = []
    bots: list[str] = []
    # The false-hit bound each partition's semantic threshold keeps (the broker's `bound`).
    max_false_hit_rate: float = DEFAULT_MAX_FALSE_HIT_RATE

    @classmethod
    def load(cls, path: str | Path | None = None) -> "Config":
        raw = tomllib.loads(Path(path or DEFAULT_CONFIG).read_text())
        config = msgspec.convert(raw, cls)
        if "default" not in config.prices:
            raise ValueError("the price table needs a `default` row")
        check_rate(config.max_false_hit_rate)
        return config

    def with_retention(self, retention: Retention) -> "Config":
        """This config with each class's TTL capped at the retention's max age: no cached
        answer outlives the messages it was made from (`shared.retention`)."""
        return msgspec.structs.replace(self, volatility={
            name: msgspec.structs.replace(v, ttl_s=retention.cache_ttl(v.ttl_s))
            for name, v in self.volatility.items()})

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

    # Metric label values: a client picks the task and the bot id, the config bounds them.

    def task_label(self, task: str) -> str:
        return metrics.bounded(task, {*self.tasks, *self.label_tasks, *self.global_tasks,
                                      *self.request_tasks})

    def bot_label(self, bot_id: str | None) -> str:
        return metrics.bounded(bot_id or "", {"", *self.bots})

    def volatility_label(self, name: str) -> str:
        return metrics.bounded(name, self.volatility)


def check_rate(value: float) -> float:
    """A valid `max_false_hit_rate`, or a ValueError that says what is wrong."""
    try:
        rate = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"max_false_hit_rate must be a number in (0, 1), got {value!r}") from None
    if not 0.0 < rate < 1.0 or math.isnan(rate):
        raise ValueError(
            f"max_false_hit_rate must be in (0, 1) (a share of semantic hits, e.g. 0.01 for 1 %), "
            f"got {value!r}")
    return rate
