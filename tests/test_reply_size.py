"""`fit_reply`, the one check every memory tier makes before replying, without I/O."""

from __future__ import annotations

import msgspec
import pytest

from shared.contract import GetReply, Message, fit_reply
from shared.errors import PayloadTooLarge


def reply(*sizes: int) -> GetReply:
    return GetReply("u", "l3", len(sizes), [
        Message(seq=i + 1, msg_id=f"m{i}", role="user", bot_id="b", text="x" * size, ts="t")
        for i, size in enumerate(sizes)])


def refusal(r: GetReply, op: str, max_payload: int) -> str:
    with pytest.raises(PayloadTooLarge) as err:
        fit_reply(r, op, max_payload)
    return err.value.message


def test_a_reply_that_fits_is_sent_as_encoded():
    r = reply(100, 200)
    assert fit_reply(r, "recent", 10_000) == msgspec.Raw(msgspec.json.encode(r))


def test_the_limit_is_inclusive_and_one_byte_over_is_refused():
    size = len(msgspec.json.encode(reply(100, 200)))
    fit_reply(reply(100, 200), "recent", size)
    assert refusal(reply(100, 200), "recent", size - 1).startswith(
        f"reply of {size} bytes exceeds max_payload {size - 1}; ask for fewer messages (n<=1)")


def test_recent_counts_the_newest_and_search_the_best():
    r = reply(5000, 100, 100)  # oldest (recent) / best (search) first
    assert refusal(r, "recent", 2000).endswith("(n<=2)")  # the two newest are small
    assert refusal(r, "search", 2000).endswith("even one message does not fit")
    assert refusal(reply(100, 100, 5000), "search", 2000).endswith("(k<=2)")


def test_the_count_it_names_does_fit():
    r = reply(*[300 + 37 * i for i in range(40)])
    k = int(refusal(r, "recent", 5000).rpartition("<=")[2].rstrip(")"))
    fit_reply(GetReply(r.user_id, r.tier, r.seq, r.messages[-k:]), "recent", 5000)
    with pytest.raises(PayloadTooLarge):
        fit_reply(GetReply(r.user_id, r.tier, r.seq, r.messages[-k - 1:]), "recent", 5000)
