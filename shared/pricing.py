"""What a model call costs, from a row of the price table (USD per million tokens).

One copy for every service that pays for calls: the llm-broker (what a miss
cost, what a hit saved) and the freshness-auditor (what a re-ask or its judge
spends against the audit budget).
"""

from __future__ import annotations

import msgspec

from shared.contract import Usage


class Price(msgspec.Struct, frozen=True):
    input: float
    output: float
    cache_write: float
    cache_read: float


def cost_usd(price: Price, usage: Usage) -> float:
    """What a call cost; cached prompt tokens at their discounted prices."""
    return (usage.input_tokens * price.input
            + usage.output_tokens * price.output
            + usage.cache_creation_input_tokens * price.cache_write
            + usage.cache_read_input_tokens * price.cache_read) / 1_000_000
