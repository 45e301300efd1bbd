"""l3-semantic-indexer as a service: real NATS (JetStream) and Postgres, the service in-process.

The test plays the gateway: it publishes log entries straight onto the
stream, as `memory.append` would, or, for the poison tests, what no gateway
would publish.
"""

from __future__ import annotations

import msgspec
import pytest
from prometheus_client import REGISTRY

from services.l3_semantic_indexer.service import build
from shared import stream, subjects
from shared.contract import LogEntry, encode
from tests.helpers import call, client, ok, running


@pytest.fixture
async def l3(clean_state):
    async with client(clean_state["NATS_URL"]) as nc:
        # min_seq reads wait long enough for a loaded machine to embed 20 texts of 64 KB
        async with running("l3-semantic-indexer", build, {**clean_state, "LOG_LEVEL": "warning",
                                                          "L3_MIN_SEQ_WAIT_S": "10"}):
            yield nc


def entry(user: str, i: int, text: str | None = None) -> LogEntry:
    return LogEntry(user_id=user, bot_id="sales-1", role="user", text=text or f"message {i}",
                    msg_id=f"{user}-{i}", ts="2026-11-26T07:00:00.000Z")


async def log(nc, subject: str, data: bytes) -> int:
    """Publish onto the log (as only the gateway may); the stream's seq."""
    return (await nc.jetstream().publish(subject, data)).seq


async def append(nc, user: str, i: int, text: str | None = None) -> int:
    return await log(nc, subjects.log_subject(user), encode(entry(user, i, text)))


def rejected(reason: str) -> float:
    return REGISTRY.get_sample_value("tiermem_rejected_messages_total",
                                     {"service": "l3-semantic-indexer", "reason": reason}) or 0.0


async def test_poison_on_the_log_is_dead_lettered_and_the_messages_after_it_are_indexed(l3):
    nc = l3
    before = {r: rejected(r) for r in ("undecodable", "subject_mismatch")}
    mine = subjects.log_subject("lead-p")
    poison = [
        b"not json",
        encode(entry("lead-q", 1)),  # another user's message on lead-p's subject
        encode({**msgspec.structs.asdict(entry("lead-p", 2)), "ts": "yesterday"}),
        b'{"user_id":"lead-p","bot_id":"b","role":"user","text":"\\ud800","msg_id":"s","ts":"2026-11-26T07:00:00Z"}',
    ]
    bad_seqs = [await log(nc, mine, data) for data in poison]
    good = [await append(nc, "lead-p", i) for i in range(3, 6)]

    reply = await ok(nc, subjects.MEMORY_L3_GET, {"user_id": "lead-p", "n": 10, "min_seq": good[-1]})
    assert [m["seq"] for m in reply["messages"]] == good
    assert [m["text"] for m in reply["messages"]] == ["message 3", "message 4", "message 5"]
    other = await ok(nc, subjects.MEMORY_L3_GET, {"user_id": "lead-q", "n": 10})
    assert other["messages"] == []

    js = nc.jetstream()
    dead = [await js.get_msg(subjects.DEAD_LETTER_STREAM, s)
            for s in range(1, (await js.stream_info(subjects.DEAD_LETTER_STREAM)).state.last_seq + 1)]
    assert [d.data for d in dead] == poison
    assert [d.headers["Tiermem-Seq"] for d in dead] == [str(s) for s in bad_seqs]
    assert [d.headers["Tiermem-Reason"] for d in dead] == [
        "undecodable", "subject_mismatch", "undecodable", "undecodable"]
    assert {d.headers["Tiermem-Subject"] for d in dead} == {mine}
    assert rejected("undecodable") == before["undecodable"] + 3
    assert rejected("subject_mismatch") == before["subject_mismatch"] + 1
    consumer = await js.consumer_info(subjects.STREAM, subjects.L3_CONSUMER)
    assert consumer.num_pending == 0 and consumer.num_ack_pending == 0  # nothing to redeliver
    # ... and the indexer keeps indexing
    later = await append(nc, "lead-p", 6)
    reply = await ok(nc, subjects.MEMORY_L3_GET, {"user_id": "lead-p", "n": 1, "min_seq": later})
    assert [m["seq"] for m in reply["messages"]] == [later]


async def test_forget_beyond_the_log_is_refused_and_deletes_nothing(l3):
    nc = l3
    seqs = [await append(nc, "lead-f", i) for i in range(2)]
    await ok(nc, subjects.MEMORY_L3_GET, {"user_id": "lead-f", "min_seq": seqs[-1]})
    last = await stream.last_seq(nc.jetstream())

    code, body = await call(nc, subjects.MEMORY_L3_FORGET, {"user_id": "lead-f", "upto_seq": last + 1})
    assert code == 400 and body["error"]["message"] == (
        f"upto_seq {last + 1} is beyond the log's last seq {last}; nothing was deleted")
    reply = await ok(nc, subjects.MEMORY_L3_GET, {"user_id": "lead-f", "n": 10})
    assert [m["seq"] for m in reply["messages"]] == seqs
    later = await append(nc, "lead-f", 2)  # a forged tombstone would have voided this one
    reply = await ok(nc, subjects.MEMORY_L3_GET, {"user_id": "lead-f", "n": 10, "min_seq": later})
    assert [m["seq"] for m in reply["messages"]] == [*seqs, later]

    done = await ok(nc, subjects.MEMORY_L3_FORGET, {"user_id": "lead-f", "upto_seq": later})
    assert done == {"user_id": "lead-f", "deleted": 3}


async def test_a_reply_too_big_for_nats_is_refused_with_413_and_how_many_fit(l3):
    nc = l3
    room = "the kitchen has a view of the garden "
    texts = [(f"house {i} " + room * 2000)[:65_000] for i in range(20)]  # near MAX_TEXT_BYTES
    seqs = [await append(nc, "lead-big", i, text) for i, text in enumerate(texts)]
    await ok(nc, subjects.MEMORY_L3_GET, {"user_id": "lead-big", "n": 1, "min_seq": seqs[-1]})

    code, body = await call(nc, subjects.MEMORY_L3_GET, {"user_id": "lead-big", "n": 20})
    assert code == 413 and body["error"]["message"].endswith(
        "exceeds max_payload 1048576; ask for fewer messages (n<=16)")
    reply = await ok(nc, subjects.MEMORY_L3_GET, {"user_id": "lead-big", "n": 16})
    assert [m["text"] for m in reply["messages"]] == texts[4:]

    search = {"user_id": "lead-big", "op": "search", "query": "a kitchen with a garden view"}
    code, body = await call(nc, subjects.MEMORY_L3_GET, {**search, "k": 20})
    assert code == 413 and body["error"]["message"].endswith("(k<=16)")
    assert len((await ok(nc, subjects.MEMORY_L3_GET, {**search, "k": 16}))["messages"]) == 16
