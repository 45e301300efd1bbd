"""l2-gateway against real NATS (JetStream) and a real Redis-compatible server.

L3 is played by a small responder that records what reached it, so these tests
prove which requests L2 answers itself and which it passes down.
"""

from __future__ import annotations

import asyncio
import itertools

import msgspec
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from redis.asyncio import Redis

from devstack import servers
from shared import lastseq, stream, subjects
from shared.contract import ForgetReply, GetReply, GetRequest, L3ForgetRequest, Message
from services.l2_gateway.fence import Fence
from services.l2_gateway.redis_window import RedisWindow
from services.l2_gateway.service import build
from tests.helpers import call, client, eventually, ok, running, stand_in_for_llm_forget


class FakeL3:
    """Answers memory.l3.get with tier 'l3' and memory.l3.forget with a count; plays the
    llm-broker's `llm.forget` too (a forget completes only once every tier confirmed)."""

    def __init__(self) -> None:
        self.gets: list[GetRequest] = []
        self.forgets: list[L3ForgetRequest] = []
        self.llm_forgets: list[str] = []  # users llm.forget was asked for

    async def start(self, nc, *, llm_forget: bool = True) -> None:
        async def get(msg):
            req = msgspec.json.decode(msg.data, type=GetRequest)
            self.gets.append(req)
            await msg.respond(msgspec.json.encode(GetReply(req.user_id, "l3", 0, [])))

        async def forget(msg):
            req = msgspec.json.decode(msg.data, type=L3ForgetRequest)
            self.forgets.append(req)
            await msg.respond(msgspec.json.encode(ForgetReply(req.user_id, 0)))

        await nc.subscribe(subjects.MEMORY_L3_GET, cb=get)
        await nc.subscribe(subjects.MEMORY_L3_FORGET, cb=forget)
        if llm_forget:
            self.llm_forgets = await stand_in_for_llm_forget(nc)


def append_body(user: str, i: int, **extra) -> dict:
    return {"user_id": user, "bot_id": "sales-1", "role": "user",
            "text": f"message {i} from {user}", "msg_id": f"{user}-{i}", **extra}


@pytest.fixture
async def gateway(clean_state):
    async with client(clean_state["NATS_URL"]) as nc:
        l3 = FakeL3()
        await l3.start(nc)
        async with running("l2-gateway", build, clean_state):
            yield nc, l3


async def test_append_is_acknowledged_with_seq_and_read_back_from_redis(gateway):
    nc, l3 = gateway
    seqs = [(await ok(nc, subjects.MEMORY_APPEND, append_body("lead-1", i)))["seq"] for i in range(5)]
    assert seqs == sorted(seqs) and len(set(seqs)) == 5
    reply = await ok(nc, subjects.MEMORY_L2_GET, {"user_id": "lead-1", "op": "recent", "n": 3,
                                                 "min_seq": seqs[-1]})
    assert reply["tier"] == "l2" and reply["seq"] == seqs[-1]
    assert [m["text"] for m in reply["messages"]] == [f"message {i} from lead-1" for i in (2, 3, 4)]
    assert [m["seq"] for m in reply["messages"]] == seqs[2:]
    assert reply["messages"][0]["score"] is None and reply["messages"][0]["ts"].endswith("Z")
    assert l3.gets == []


async def test_resent_msg_id_is_stored_once_and_reported_duplicate(gateway):
    nc, _ = gateway
    first = await ok(nc, subjects.MEMORY_APPEND, append_body("lead-2", 1))
    again = await ok(nc, subjects.MEMORY_APPEND, append_body("lead-2", 1))
    assert first["duplicate"] is False
    assert again == {"user_id": "lead-2", "seq": first["seq"], "duplicate": True}
    reply = await ok(nc, subjects.MEMORY_L2_GET, {"user_id": "lead-2", "n": 10})
    assert len(reply["messages"]) == 1


_runs = itertools.count()


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@example(sends=[(0, "1"), (1, "1"), (2, "1"), (1, "2"), (0, "2"), (1, "1")])
@given(sends=st.lists(st.tuples(st.integers(0, 2), st.sampled_from(["1", "2", "3", "m-1"])),
                      min_size=1, max_size=16))
async def test_users_with_colliding_msg_ids_keep_all_their_messages(gateway, sends):
    """Per-user id spaces: whatever ids users share, each (user, msg_id) is stored once."""
    nc, _ = gateway
    run = next(_runs)  # fresh users per example: the stream is not reset between them
    users = [f"u{run}-{i}" for i in range(3)]
    first: dict[tuple[str, str], int] = {}
    for who, msg_id in sends:
        user = users[who]
        reply = await ok(nc, subjects.MEMORY_APPEND, {"user_id": user, "bot_id": "b", "role": "user",
                                                      "text": f"{msg_id} from {user}", "msg_id": msg_id})
        key = (user, msg_id)
        assert reply["duplicate"] is (key in first)
        assert reply["seq"] == first.setdefault(key, reply["seq"])
    for user in users:
        stored = [(m.entry.msg_id, m.entry.text) for m in await stream.user_log(nc, user)]
        expected = [(m, f"{m} from {u}") for (u, m) in first if u == user]
        assert stored == expected


async def test_reappend_after_forget_stores_again_and_its_resend_is_a_duplicate(gateway):
    nc, _ = gateway
    body = append_body("lead-f", 1)
    before = await ok(nc, subjects.MEMORY_APPEND, body)
    for _ in range(2):  # the second forget makes the salted id chain one hop longer
        await ok(nc, subjects.MEMORY_FORGET, {"user_id": "lead-f"})
        again = await ok(nc, subjects.MEMORY_APPEND, body)
        assert again["duplicate"] is False and again["seq"] > before["seq"]
        resent = await ok(nc, subjects.MEMORY_APPEND, body)
        assert resent == {"user_id": "lead-f", "seq": again["seq"], "duplicate": True}
        assert [m.seq for m in await stream.user_log(nc, "lead-f")] == [again["seq"]]
        window = await ok(nc, subjects.MEMORY_L2_GET, {"user_id": "lead-f", "min_seq": again["seq"]})
        assert window["tier"] == "l2" and [m["msg_id"] for m in window["messages"]] == ["lead-f-1"]
        before = again


async def test_window_is_capped_and_longer_reads_go_to_l3(gateway):
    nc, l3 = gateway
    await asyncio.gather(*(ok(nc, subjects.MEMORY_APPEND, append_body("lead-3", i)) for i in range(130)))
    reply = await ok(nc, subjects.MEMORY_L2_GET, {"user_id": "lead-3", "n": 100})
    assert reply["tier"] == "l2" and len(reply["messages"]) == 100
    seqs = [m["seq"] for m in reply["messages"]]
    assert seqs == sorted(seqs)
    assert (await ok(nc, subjects.MEMORY_L2_GET, {"user_id": "lead-3", "n": 101}))["tier"] == "l3"
    assert (await ok(nc, subjects.MEMORY_L2_GET,
                     {"user_id": "lead-3", "op": "search", "query": "hi"}))["tier"] == "l3"
    assert [(g.op, g.n) for g in l3.gets] == [("recent", 101), ("search", 10)]


async def test_user_with_few_messages_is_answered_completely(gateway):
    nc, l3 = gateway
    await ok(nc, subjects.MEMORY_APPEND, append_body("lead-4", 0))
    reply = await ok(nc, subjects.MEMORY_L2_GET, {"user_id": "lead-4", "n": 50})
    assert reply["tier"] == "l2" and len(reply["messages"]) == 1
    assert l3.gets == []


async def test_a_user_redis_does_not_hold_is_a_miss_not_an_empty_answer(gateway):
    """Never seen, expired while idle, or lost: L2 cannot tell, so it never answers "none"."""
    nc, l3 = gateway
    later = (await ok(nc, subjects.MEMORY_APPEND, append_body("lead-7", 0)))["seq"]
    for body in ({"user_id": "nobody-yet", "n": 5}, {"user_id": "nobody-yet", "min_seq": later}):
        assert (await ok(nc, subjects.MEMORY_L2_GET, body))["tier"] == "l3"
    assert [g.user_id for g in l3.gets] == ["nobody-yet", "nobody-yet"]


async def test_min_seq_past_the_users_newest_message_is_proved_by_the_log_position(gateway):
    nc, l3 = gateway
    mine = (await ok(nc, subjects.MEMORY_APPEND, append_body("lead-6", 0)))["seq"]
    later = (await ok(nc, subjects.MEMORY_APPEND, append_body("lead-7", 0)))["seq"]
    for min_seq in (mine, later):  # the window alone, then the window and the position
        reply = await ok(nc, subjects.MEMORY_L2_GET, {"user_id": "lead-6", "min_seq": min_seq})
        assert reply["tier"] == "l2" and [m["seq"] for m in reply["messages"]] == [mine]
    assert not l3.gets


async def test_min_seq_beyond_what_redis_applied_goes_to_l3(gateway):
    nc, l3 = gateway
    seq = (await ok(nc, subjects.MEMORY_APPEND, append_body("lead-5", 0)))["seq"]
    reply = await ok(nc, subjects.MEMORY_L2_GET, {"user_id": "lead-5", "min_seq": seq + 1000})
    assert reply["tier"] == "l3"


async def test_a_reply_too_big_for_nats_is_refused_with_413_and_how_many_fit(gateway):
    nc, l3 = gateway
    texts = [f"{i} " + "x" * 65_000 for i in range(20)]  # near MAX_TEXT_BYTES (65,536)
    for i, text in enumerate(texts):
        await ok(nc, subjects.MEMORY_APPEND, {**append_body("lead-big", i), "text": text})
    before = await ok(nc, subjects.MEMORY_L2_GET, {"user_id": "lead-big", "n": 16})
    assert before["tier"] == "l2" and [m["text"] for m in before["messages"]] == texts[4:]

    status, reply = await call(nc, subjects.MEMORY_L2_GET, {"user_id": "lead-big", "n": 20})
    assert status == 413 and reply["error"]["code"] == 413
    assert reply["error"]["message"].endswith(
        "exceeds max_payload 1048576; ask for fewer messages (n<=16)")
    assert await ok(nc, subjects.MEMORY_L2_GET, {"user_id": "lead-big", "n": 16}) == before
    assert l3.gets == []


@pytest.mark.parametrize("body,code", [
    (b"{not json", 400),
    (b"\xff\xfe", 400),
    (b'{"user_id": "a", "bot_id": "b", "role": "user", "text": "\xff", "msg_id": "m"}', 400),
    ({"bot_id": "b", "role": "user", "text": "t", "msg_id": "m"}, 400),
    ({"user_id": "x" * 129, "bot_id": "b", "role": "user", "text": "t", "msg_id": "m"}, 400),
    ({"user_id": "bad id", "bot_id": "b", "role": "user", "text": "t", "msg_id": "m"}, 400),
    ({"user_id": "a", "bot_id": "b", "role": "robot", "text": "t", "msg_id": "m"}, 400),
    ({"user_id": "a", "bot_id": "b", "role": "user", "text": 5, "msg_id": "m"}, 400),
    ({"user_id": "a", "bot_id": "b", "role": "user", "text": "t", "msg_id": "m", "ts": "yesterday"}, 400),
    ({"user_id": "a", "bot_id": "b", "role": "user", "text": "x" * 65537, "msg_id": "m"}, 413),
    ({"user_id": "a", "bot_id": "b", "role": "user", "text": "é" * 40000, "msg_id": "m"}, 413),
])
async def test_bad_append_is_rejected_with_code_and_stores_nothing(gateway, body, code):
    nc, _ = gateway
    status, reply = await call(nc, subjects.MEMORY_APPEND, body)
    assert status == code
    assert reply["error"]["code"] == code and reply["error"]["message"]
    msg = await nc.request(subjects.MEMORY_APPEND, body if isinstance(body, bytes)
                           else msgspec.json.encode(body), timeout=5)
    assert msg.headers["Nats-Service-Error-Code"] == str(code)
    assert msg.headers["Nats-Service-Error"]
    js = nc.jetstream()
    assert (await js.stream_info(subjects.STREAM)).state.messages == 0
    assert (await ok(nc, subjects.MEMORY_APPEND, append_body("still-up", 0)))["seq"] >= 1


@pytest.mark.parametrize("body", [
    {"user_id": "a", "op": "fetch"}, {"user_id": "a", "n": 0}, {"user_id": "a", "n": 1001},
    {"user_id": "a", "n": "5"}, {"n": 5}, {"user_id": "a", "op": "search"},
    {"user_id": "a", "op": "search", "query": "  "}, [1, 2],
])
async def test_bad_get_is_rejected(gateway, body):
    nc, l3 = gateway
    status, reply = await call(nc, subjects.MEMORY_L2_GET, body)
    assert status == 400 and reply["error"]["code"] == 400
    assert l3.gets == []


async def test_forget_removes_user_from_log_and_redis_and_tells_l3_and_listeners(gateway):
    nc, l3 = gateway
    for i in range(3):
        await ok(nc, subjects.MEMORY_APPEND, append_body("gone", i))
        await ok(nc, subjects.MEMORY_APPEND, append_body("kept", i))
    events = []

    async def collect(msg):
        events.append(msg)

    sub = await nc.subscribe(subjects.changed_subject("gone"), cb=collect)
    reply = await ok(nc, subjects.MEMORY_FORGET, {"user_id": "gone"})
    assert reply == {"user_id": "gone", "deleted": 3}
    assert l3.forgets and l3.forgets[0].user_id == "gone"
    assert l3.llm_forgets == ["gone"]
    assert (await ok(nc, subjects.MEMORY_FORGET_STATUS, {"user_id": "gone"}))["pending"] is False
    await eventually(lambda: any(b'"forget"' in e.data for e in events), what="the forget event")
    await sub.unsubscribe()
    assert (await ok(nc, subjects.MEMORY_L2_GET, {"user_id": "gone"}))["messages"] == []
    kept = await ok(nc, subjects.MEMORY_L2_GET, {"user_id": "kept"})
    assert len(kept["messages"]) == 3
    js = nc.jetstream()
    assert (await js.stream_info(subjects.STREAM)).state.messages == 3
    # the user can start over; the new history holds only new messages
    await ok(nc, subjects.MEMORY_APPEND, append_body("gone", 99))
    again = await ok(nc, subjects.MEMORY_L2_GET, {"user_id": "gone"})
    assert [m["msg_id"] for m in again["messages"]] == ["gone-99"]


async def test_append_survives_redis_outage_and_l2_catches_up_from_the_log(clean_nats, tmp_path):
    redis = servers.start_redis(tmp_path / "redis", die_with_parent=True)
    env = {"NATS_URL": clean_nats, "REDIS_URL": redis.url}
    try:
        async with client(clean_nats) as nc:
            await FakeL3().start(nc)
            async with running("l2-gateway", build, env, append_apply_wait_s=0.2):
                await ok(nc, subjects.MEMORY_APPEND, append_body("lead-r", 0))
                redis.stop()
                during = [(await ok(nc, subjects.MEMORY_APPEND, append_body("lead-r", i)))["seq"]
                          for i in range(1, 4)]
                # Redis down: reads pass to L3 rather than failing
                assert (await ok(nc, subjects.MEMORY_L2_GET, {"user_id": "lead-r"}))["tier"] == "l3"
                redis = servers.start_redis(tmp_path / "redis", port=redis.port, die_with_parent=True)
                for _ in range(100):
                    reply = await ok(nc, subjects.MEMORY_L2_GET,
                                     {"user_id": "lead-r", "min_seq": during[-1]})
                    if reply["tier"] == "l2":
                        break
                    await asyncio.sleep(0.1)
                assert reply["tier"] == "l2"
                assert [m["msg_id"] for m in reply["messages"]] == [f"lead-r-{i}" for i in range(4)]
    finally:
        redis.stop()


async def test_an_append_answered_before_its_apply_records_the_users_message_seq(
        clean_state, monkeypatch):
    """The applier is stuck (reconnecting, say): the append's wait for it runs out and the
    reply goes out anyway. The llm-broker must still know the user spoke (`shared.lastseq`)."""
    held = asyncio.Event()
    apply_batch = RedisWindow.apply_batch

    async def stuck(self, *args, **kwargs):
        await held.wait()
        return await apply_batch(self, *args, **kwargs)

    redis = Redis.from_url(clean_state["REDIS_URL"])
    try:
        async with client(clean_state["NATS_URL"]) as nc:
            await FakeL3().start(nc)
            async with running("l2-gateway", build, clean_state, append_apply_wait_s=0.2):
                monkeypatch.setattr(RedisWindow, "apply_batch", stuck)
                seqs = [(await ok(nc, subjects.MEMORY_APPEND, append_body("lead-s", i)))["seq"]
                        for i in range(2)]
                bot = await ok(nc, subjects.MEMORY_APPEND, append_body("lead-s", 2, role="assistant"))
                assert await redis.get(lastseq.key("lead-s")) == str(seqs[-1]).encode()
                assert 0 < await redis.pttl(lastseq.key("lead-s"))  # it expires like the window
                held.set()  # the applier goes on: its own record keeps the newest
                for _ in range(100):
                    reply = await ok(nc, subjects.MEMORY_L2_GET,
                                     {"user_id": "lead-s", "min_seq": bot["seq"]})
                    if reply["tier"] == "l2":
                        break
                    await asyncio.sleep(0.05)
                assert reply["tier"] == "l2" and len(reply["messages"]) == 3
                assert await redis.get(lastseq.key("lead-s")) == str(seqs[-1]).encode()
    finally:
        await redis.aclose()


async def test_the_applier_never_lowers_a_users_message_seq_recorded_ahead_of_it(clean_redis):
    redis = Redis.from_url(clean_redis)
    try:
        window = RedisWindow(redis, 10, 60.0, Fence())
        assert await window.take_lock("t")
        window.fence.adopt(await window.new_epoch(1, 0))
        await redis.set(lastseq.key("u1"), 5)  # an append of seq 5 replied before its apply
        msg = Message(seq=3, msg_id="m3", role="user", bot_id="b", text="hi",
                      ts="2026-01-01T00:00:00Z")
        at = window.fence.seen
        assert (await window.apply_batch([("u1", msg, 10)], 3, at, "t", fresh=True))[1] == 0
        assert await redis.get(lastseq.key("u1")) == b"5"
        newer = Message(seq=7, msg_id="m7", role="user", bot_id="b", text="hi",
                        ts="2026-01-01T00:00:00Z")
        await window.apply_batch([("u1", newer, 10)], 7, window.fence.seen, "t", fresh=True)
        assert await redis.get(lastseq.key("u1")) == b"7"
        # ... and the append's own record goes only upwards as well
        assert not await window.note_user_seq("u1", 6)
        assert await window.note_user_seq("u1", 9)
        assert await redis.get(lastseq.key("u1")) == b"9"
    finally:
        await redis.aclose()
