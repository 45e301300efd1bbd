"""l2-gateway's defences (issue 10), against real NATS and a real Redis-compatible server.

A lost durable log is never silently replaced, a poison log message cannot
stop the applier, the applier's backlog stays in the stream, and a user's
stored bytes are capped.
"""

from __future__ import annotations

import asyncio

import pytest
from nats.js.api import StreamConfig
from nats.js.errors import NotFoundError

from services.l2_gateway.applier import MAX_ACK_PENDING
from services.l2_gateway.log_guard import MARKER_KEY, Verdict, judge
from services.l2_gateway.service import build
from devstack import servers
from shared import metrics, stream, subjects
from shared.contract import LogEntry, encode
from tests.helpers import call, client, eventually, never_within, ok, running
from tests.test_health import get
from tests.test_l2_gateway import FakeL3, append_body, gateway  # noqa: F401 - a fixture


@pytest.mark.parametrize("marker,found,reinit,verdict", [
    (None, None, "", Verdict.CREATE),
    (None, "a", "", Verdict.ADOPT),
    ("a", "a", "", Verdict.OK),
    ("a", "a", "a", Verdict.OK),
    ("a", None, "", Verdict.LOST),
    ("a", "b", "", Verdict.LOST),
    ("a", None, "b", Verdict.LOST),  # re-initialising accepts one named loss, not any
    ("a", None, "a", Verdict.REINIT),
    ("a", "b", "a", Verdict.REINIT),
])
def test_guard_creates_only_on_first_start_and_replaces_only_the_named_loss(marker, found, reinit,
                                                                           verdict):
    assert judge(marker, found, reinit) is verdict


async def marker(js) -> str:
    return (await (await js.key_value(subjects.STATE_BUCKET)).get(MARKER_KEY)).value.decode()


async def test_first_start_creates_the_stream_and_records_its_incarnation(clean_state):
    async with client(clean_state["NATS_URL"]) as nc, running("l2-gateway", build, clean_state):
        js = nc.jetstream()
        assert await marker(js) == stream.incarnation(await js.stream_info(subjects.STREAM))


async def test_a_deleted_stream_is_not_recreated_until_an_operator_reinitialises(clean_state):
    port = servers.free_port()
    async with client(clean_state["NATS_URL"]) as nc:
        await FakeL3().start(nc)
        js = nc.jetstream()
        async with running("l2-gateway", build, clean_state):
            await ok(nc, subjects.MEMORY_APPEND, append_body("lead-a", 0))
        lost = stream.incarnation(await js.stream_info(subjects.STREAM))
        await js.delete_stream(subjects.STREAM)

        async with running("l2-gateway", build, clean_state, metrics_port=port):
            status, reply = await call(nc, subjects.MEMORY_APPEND, append_body("lead-a", 1))
            assert status == 503
            assert "is gone" in reply["error"]["message"]
            assert f"MEMORY_STREAM_REINIT={lost}" in reply["error"]["message"]
            ready = await get(port, "/readyz")
            assert ready.status_code == 503 and ready.json()["failing"] == ["memory-stream"]
            with pytest.raises(NotFoundError):
                await js.stream_info(subjects.STREAM)

        async with running("l2-gateway", build, clean_state, memory_stream_reinit=lost):
            assert (await ok(nc, subjects.MEMORY_APPEND, append_body("lead-b", 0)))["seq"] == 1
            # Redis was wiped with the old log: its windows are not served as if still true
            assert (await ok(nc, subjects.MEMORY_L2_GET, {"user_id": "lead-a"}))["messages"] == []
            now = stream.incarnation(await js.stream_info(subjects.STREAM))
            assert now != lost and await marker(js) == now


async def test_a_stream_replaced_while_running_stops_appends_until_it_is_restored(clean_state):
    async with client(clean_state["NATS_URL"]) as nc:
        await FakeL3().start(nc)
        js = nc.jetstream()
        async with running("l2-gateway", build, clean_state):
            await ok(nc, subjects.MEMORY_APPEND, append_body("lead-c", 0))
            config = (await js.stream_info(subjects.STREAM)).config
            await js.delete_stream(subjects.STREAM)
            await stream.ensure_stream(js)  # what the indexer does on start-up: a new, empty stream

            async def refused():
                status, reply = await call(nc, subjects.MEMORY_APPEND, append_body("lead-c", 1))
                return status == 503 and "was replaced" in reply["error"]["message"]

            await eventually(refused)
            # A restore from backup brings the stream back with its config, incarnation included.
            await js.delete_stream(subjects.STREAM)
            await js.add_stream(StreamConfig.from_response(config.as_dict()))

            async def accepted():
                return (await call(nc, subjects.MEMORY_APPEND, append_body("lead-c", 2)))[0] == 200

            await eventually(accepted)


async def test_poison_log_messages_are_dead_lettered_and_later_ones_still_applied(gateway):  # noqa: F811
    nc, _ = gateway
    counters = [metrics.dead_lettered.labels("l2-gateway", r) for r in ("undecodable", "subject_mismatch")]
    before = [c._value.get() for c in counters]
    js = nc.jetstream()
    await js.publish(subjects.log_subject("victim"), b"{not json")
    forged = LogEntry(user_id="other", bot_id="b", role="user", text="forged", msg_id="x",
                      ts="2026-01-01T00:00:00.000Z")
    await js.publish(subjects.log_subject("victim"), encode(forged))

    seq = (await ok(nc, subjects.MEMORY_APPEND, append_body("victim", 0)))["seq"]
    reply = await ok(nc, subjects.MEMORY_L2_GET, {"user_id": "victim", "min_seq": seq})
    assert reply["tier"] == "l2" and [m["msg_id"] for m in reply["messages"]] == ["victim-0"]
    assert (await ok(nc, subjects.MEMORY_L2_GET, {"user_id": "other"}))["messages"] == []
    # readers of the log skip the poison too: a repair rebuilds the window without it
    evicted = await ok(nc, subjects.MEMORY_L2_EVICT, {"user_id": "victim", "reason": "stale"})
    assert evicted == {"user_id": "victim", "evicted": True}
    assert [m.entry.msg_id for m in await stream.user_log(nc, "victim")] == ["victim-0"]

    assert (await js.stream_info(subjects.DEAD_LETTER_STREAM)).state.messages == 2
    dead = [await js.get_msg(subjects.DEAD_LETTER_STREAM, s) for s in (1, 2)]
    assert [d.headers["Tiermem-Reason"].split(":")[0] for d in dead] == ["undecodable",
                                                                         "subject_mismatch"]
    assert {d.headers["Tiermem-Subject"] for d in dead} == {subjects.log_subject("victim")}
    assert dead[0].data == b"{not json" and [d.headers["Tiermem-Seq"] for d in dead] == ["1", "2"]
    assert [c._value.get() - b for c, b in zip(counters, before)] == [1, 1]


async def applied(nc, user: str, seq: int) -> dict | None:
    """L2's window of `user` if it holds everything up to `seq`."""
    reply = await ok(nc, subjects.MEMORY_L2_GET, {"user_id": user, "min_seq": seq})
    return reply if reply["tier"] == "l2" else None


async def test_the_applier_backlog_stays_in_the_stream_while_redis_is_down(clean_nats, tmp_path):
    redis = servers.start_redis(tmp_path / "redis", die_with_parent=True)
    env = {"NATS_URL": clean_nats, "REDIS_URL": redis.url}
    try:
        async with client(clean_nats) as nc:
            await FakeL3().start(nc)
            async with running("l2-gateway", build, env, append_apply_wait_s=0.05):
                await ok(nc, subjects.MEMORY_APPEND, append_body("lead-b", 0))
                redis.stop()
                js = nc.jetstream()
                backlog = 3 * MAX_ACK_PENDING
                for start in range(0, backlog, 256):
                    acks = await asyncio.gather(*(
                        js.publish(subjects.log_subject("lead-b"), encode(LogEntry(
                            user_id="lead-b", bot_id="b", role="user", text=f"m{i}",
                            msg_id=f"m{i}", ts="2026-01-01T00:00:00.000Z")))
                        for i in range(start, start + 256)))
                last = acks[-1].seq

                async def held():
                    (info,) = await nc.jsm().consumers_info(subjects.STREAM)
                    return info if info.num_pending > 0 else None

                info = await eventually(held)

                async def over_the_bound():  # the applier takes all it may, and no more
                    (info,) = await nc.jsm().consumers_info(subjects.STREAM)
                    return info.num_ack_pending > MAX_ACK_PENDING and info

                await never_within(0.5, over_the_bound, every=0.05,
                                   what="more than the bound in flight")
                (info,) = await nc.jsm().consumers_info(subjects.STREAM)
                assert 0 < info.num_ack_pending <= MAX_ACK_PENDING
                assert info.num_pending >= backlog - MAX_ACK_PENDING

                redis = servers.start_redis(tmp_path / "redis", port=redis.port, die_with_parent=True)

                reply = await eventually(lambda: applied(nc, "lead-b", last), timeout=30)
                assert reply["messages"][-1]["msg_id"] == f"m{backlog - 1}"
                # Redis came back empty, so the applier replayed the log with a new consumer;
                # from then on it keeps it: a completed pull is not mistaken for a lost consumer
                (consumer,) = await nc.jsm().consumers_info(subjects.STREAM)
                for i in range(2 * MAX_ACK_PENDING):
                    await js.publish(subjects.log_subject("lead-b"), encode(LogEntry(
                        user_id="lead-b", bot_id="b", role="user", text="more", msg_id=f"n{i}",
                        ts="2026-01-01T00:00:00.000Z")))
                await eventually(lambda: applied(nc, "lead-b", last + 2 * MAX_ACK_PENDING))
                assert [c.name for c in await nc.jsm().consumers_info(subjects.STREAM)] == [consumer.name]
    finally:
        redis.stop()


async def test_an_append_past_the_users_byte_quota_gets_413_and_stores_nothing(clean_state):
    limit = 2000
    async with client(clean_state["NATS_URL"]) as nc:
        await FakeL3().start(nc)
        async with running("l2-gateway", build, clean_state, max_user_bytes=limit):
            # concurrent appends through one replica cannot overshoot together
            replies = await asyncio.gather(*(call(nc, subjects.MEMORY_APPEND, append_body("lead-q", i))
                                             for i in range(40)))
            codes = [code for code, _ in replies]
            assert 200 in codes and 413 in codes and set(codes) == {200, 413}
            refused = next(r for code, r in replies if code == 413)["error"]["message"]
            assert f"the limit is {limit} bytes" in refused and "MAX_USER_BYTES" in refused
            stored = await stream.user_log(nc, "lead-q")
            assert len(stored) == codes.count(200)
            assert sum(len(encode(m.entry)) for m in stored) <= limit
            assert (await call(nc, subjects.MEMORY_APPEND, append_body("lead-q", 99)))[0] == 413
            assert len(await stream.user_log(nc, "lead-q")) == len(stored)
            # other users are not affected, and a forget gives the user room again
            await ok(nc, subjects.MEMORY_APPEND, append_body("lead-other", 0))
            await ok(nc, subjects.MEMORY_FORGET, {"user_id": "lead-q"})
            await ok(nc, subjects.MEMORY_APPEND, append_body("lead-q", 100))


async def test_with_retention_the_quota_counts_what_the_log_still_holds(clean_state):
    """Retention drops a user's old messages from the log: the quota must not keep
    counting them, or an active user hits the limit for good."""
    limit = 800  # room for about four messages
    async with client(clean_state["NATS_URL"]) as nc:
        await FakeL3().start(nc)
        async with running("l2-gateway", build, clean_state, max_user_bytes=limit,
                           retain_max_per_user=2):
            for i in range(12):
                await ok(nc, subjects.MEMORY_APPEND, append_body("lead-kept", i))
            stored = await stream.user_log(nc, "lead-kept")
            assert [m.entry.msg_id for m in stored] == ["lead-kept-10", "lead-kept-11"]
