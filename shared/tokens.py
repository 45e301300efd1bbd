"""Token estimates for context budgets, without a round trip.

Claude's tokenizer is not published; the exact count is the Messages API's
`count_tokens` call, a network round trip too slow for a memory read. A
budget is an upper limit, so the estimate errs high: one token per 3 UTF-8
bytes (English prose runs nearer 4 characters a token, so real counts come
out about a quarter lower; non-Latin scripts take more bytes per character
and are over-counted more), plus a few tokens of framing per message. Tests
hold it to never under-count the simulator's `count_tokens` on the same
text.
"""

from __future__ import annotations

BYTES_PER_TOKEN = 3
MESSAGE_OVERHEAD = 4  # role and separators around each message in a prompt


def estimate(text: str) -> int:
    return -(-len(text.encode("utf-8", "surrogatepass")) // BYTES_PER_TOKEN)


def message_tokens(text: str) -> int:
    return estimate(text) + MESSAGE_OVERHEAD
