"""Retention (issue 11): one policy in settings, applied to the log, L2, L3 and the LLM cache.

Pure policy first, then real NATS, Redis and Postgres: the stream takes the
limits (and an existing stream is updated, keeping the incarnation the
gateway's guard knows it by), a per-user count limit holds in every tier,
a full log refuses an append clearly and changes nothing, and the L3 sweeper
deletes in bounded batches.
"""

from __future__ import annotations


import pytest
from nats.js.api import StreamConfig

from services.l2_gateway.service import build as gateway
from services.l3_semantic_indexer import store
from services.l3_semantic_indexer.service import build as indexer
from services.l3_semantic_indexer.sweeper import Sweeper
from shared import metrics, stream, subjects
from shared.llm_config import Config
from shared.retention import Retention
from tests.helpers import call, client, eventually, ok, running
from tests.test_l2_gateway import FakeL3, append_body
from tests.test_l3_store import TS, embedder, new_database, put  # noqa: F401 - fixtures

# ---------------------------------------------------------------- the policy, pure


def test_no_limits_by_default_keep_everything_as_before():
    policy = Retention()
    assert not policy.drops_anything()
    assert policy.window(100) == 100 and policy.held(10_000) == 10_000
    assert policy.cache_ttl(86400) == 86400
    assert stream.limits(policy) == {"max_age": 0, "max_msgs_per_subject": -1, "max_bytes": -1,
                                     "duplicate_window": stream.DUPLICATE_WINDOW_S}


def test_a_count_limit_bounds_every_window_and_what_a_user_holds():
    policy = Retention(max_per_user=5)
    assert policy.drops_anything()
    assert policy.window(100) == 5 and policy.window(3) == 3
    assert policy.held(8) == 5 and policy.held(2) == 2
    assert stream.limits(policy)["max_msgs_per_subject"] == 5


def test_an_age_limit_caps_cache_ttls_and_the_duplicate_window():
    policy = Retention(max_age_s=600, log_max_bytes=1 << 30)
    assert policy.cache_ttl(86400) == 600 and policy.cache_ttl(300) == 300
    assert stream.limits(policy) == {"max_age": 600, "max_msgs_per_subject": -1,
                                     "max_bytes": 1 << 30, "duplicate_window": 600}
    # a long age limit leaves the duplicate window as it was
    assert stream.limits(Retention(max_age_s=30 * 86400))["duplicate_window"] == stream.DUPLICATE_WINDOW_S


def test_limit_changes_name_only_the_limits_that_differ():
    config = StreamConfig(name="MEMORY", max_age=0, max_msgs_per_subject=-1, max_bytes=-1,
                          duplicate_window=stream.DUPLICATE_WINDOW_S)
    assert stream.limit_changes(config, stream.limits(Retention())) == {}
    assert stream.limit_changes(config, stream.limits(Retention(max_per_user=5))) == {
        "max_msgs_per_subject": (-1, 5)}


def test_the_llm_cache_keeps_no_entry_longer_than_the_age_limit():
    config = Config.load()
    capped = config.with_retention(Retention(max_age_s=600))
    assert {n: v.ttl_s for n, v in capped.volatility.items()} == {
        n: min(v.ttl_s, 600) for n, v in config.volatility.items()}
    assert capped.volatility["lead_intent"].invalidate_on_user_message  # only the TTL changes
    assert config.with_retention(Retention()) == config


# ---------------------------------------------------------------- the stream


async def test_the_stream_takes_the_retention_settings_and_an_existing_stream_is_updated(clean_state):
    async with client(clean_state["NATS_URL"]) as nc:
        await FakeL3().start(nc)
        js = nc.jetstream()
        async with running("l2-gateway", gateway, clean_state):
            before = await js.stream_info(subjects.STREAM)
            await ok(nc, subjects.MEMORY_APPEND, append_body("lead-r", 0))
        assert (before.config.max_age, before.config.max_msgs_per_subject,
                before.config.max_bytes) == (0, -1, -1)

        async with running("l2-gateway", gateway, clean_state, retain_max_age_s=3600,
                           retain_max_per_user=50, log_max_bytes=1 << 20):
            after = await js.stream_info(subjects.STREAM)
            assert (after.config.max_age, after.config.max_msgs_per_subject,
                    after.config.max_bytes, after.config.duplicate_window) == (3600, 50, 1 << 20, 3600)
            assert after.config.discard == "new"
            # the same stream, still known to the guard by its incarnation: appends go on
            assert stream.incarnation(after) == stream.incarnation(before)
            assert after.state.messages == 1
            assert (await ok(nc, subjects.MEMORY_APPEND, append_body("lead-r", 1)))["seq"] == 2


# ---------------------------------------------------------------- a count limit in every tier


async def test_with_5_kept_per_user_the_log_l2_and_l3_hold_the_newest_5(clean_state):
    env = {**clean_state, "RETAIN_MAX_PER_USER": "5", "RETAIN_SWEEP_S": "3600", "LOG_LEVEL": "warning"}
    async with client(clean_state["NATS_URL"]) as nc, running("l2-gateway", gateway, env), \
            running("l3-semantic-indexer", indexer, env):
        seqs = [(await ok(nc, subjects.MEMORY_APPEND, append_body("lead-5", i)))["seq"]
                for i in range(8)]
        await ok(nc, subjects.MEMORY_APPEND, append_body("lead-6", 0))  # another user keeps his one
        newest = [f"lead-5-{i}" for i in range(3, 8)]

        assert [m.entry.msg_id for m in await stream.user_log(nc, "lead-5")] == newest
        l2 = await ok(nc, subjects.MEMORY_L2_GET, {"user_id": "lead-5", "n": 10, "min_seq": seqs[-1]})
        assert l2["tier"] == "l2" and [m["msg_id"] for m in l2["messages"]] == newest
        assert l2["seq"] == seqs[-1]

        l3_read = {"user_id": "lead-5", "n": 10, "min_seq": seqs[-1]}
        before = await ok(nc, subjects.MEMORY_L3_GET, l3_read)
        assert len(before["messages"]) > 5  # (those the indexer read before the stream dropped them)
        pool = await store.create_pool(clean_state["DATABASE_URL"])
        try:
            swept = await Sweeper(nc.jetstream(), pool, Retention(max_per_user=5), 3600).sweep()
        finally:
            await pool.close()
        assert swept == {"count": len(before["messages"]) - 5, "summaries": 0}
        l3 = await ok(nc, subjects.MEMORY_L3_GET, l3_read)
        assert [m["msg_id"] for m in l3["messages"]] == newest and l3["seq"] == seqs[-1]
        other = await ok(nc, subjects.MEMORY_L3_GET, {"user_id": "lead-6", "n": 10})
        assert [m["msg_id"] for m in other["messages"]] == ["lead-6-0"]

        # min_seq of a dropped message, and of the newest, still answered completely
        for subject in (subjects.MEMORY_L2_GET, subjects.MEMORY_L3_GET):
            for min_seq in (seqs[0], seqs[-1]):
                reply = await ok(nc, subject, {"user_id": "lead-5", "n": 3, "min_seq": min_seq})
                assert [m["msg_id"] for m in reply["messages"]] == newest[-3:]
                assert reply["seq"] == seqs[-1]
        # and the next append pushes the oldest kept out of the log and L2
        last = (await ok(nc, subjects.MEMORY_APPEND, append_body("lead-5", 8)))["seq"]
        l2 = await ok(nc, subjects.MEMORY_L2_GET, {"user_id": "lead-5", "n": 10, "min_seq": last})
        assert [m["msg_id"] for m in l2["messages"]] == newest[1:] + ["lead-5-8"]


# ---------------------------------------------------------------- a full log


async def test_an_append_to_a_full_log_gets_507_stores_nothing_and_is_counted(clean_state):
    full = metrics.log_full._value.get()
    async with client(clean_state["NATS_URL"]) as nc:
        await FakeL3().start(nc)
        js = nc.jetstream()
        async with running("l2-gateway", gateway, clean_state, log_max_bytes=1000):
            codes = []
            for i in range(20):
                status, reply = await call(nc, subjects.MEMORY_APPEND, append_body("lead-f", i))
                codes.append(status)
                if status != 200:
                    break
            assert codes[:-1] == [200] * (len(codes) - 1) and codes[-1] == 507, codes
            message = reply["error"]["message"]
            assert "the durable log MEMORY is full" in message and "LOG_MAX_BYTES" in message
            assert "RETAIN_MAX_AGE_S" in message and "nothing was stored" in message

            state = (await js.stream_info(subjects.STREAM)).state
            stored = len(codes) - 1
            assert state.messages == stored
            status, _ = await call(nc, subjects.MEMORY_APPEND, append_body("lead-f", stored))
            assert status == 507  # a retry: still refused, still nothing stored
            assert (await js.stream_info(subjects.STREAM)).state.last_seq == state.last_seq
            window = await ok(nc, subjects.MEMORY_L2_GET, {"user_id": "lead-f", "n": 50})
            assert len(window["messages"]) == stored
            assert metrics.log_full._value.get() == full + 2

            # the gateway samples the stream's usage for the alert
            async def sampled():
                return (metrics.log_max_bytes._value.get(), metrics.log_bytes._value.get()) == (
                    1000, state.bytes)

            await eventually(sampled, timeout=12)


# ---------------------------------------------------------------- the L3 sweeper


@pytest.fixture
async def l3_pool(new_database, embedder):  # noqa: F811 - fixtures imported above
    p = await store.create_pool(await new_database(), model_id=embedder.model_id, dim=embedder.dim)
    yield p
    await p.close()


def rows(user: str, seqs) -> list[store.Row]:
    return [store.Row(user_id=user, seq=s, msg_id=f"{user}-{s}", bot_id="b", role="user",
                      text=f"message {s}", ts=TS) for s in seqs]


async def seqs_of(pool, user: str) -> list[int]:
    return [m.seq for m in (await store.recent(pool, user, 100))[0]]


async def n_rows(pool, user: str) -> int:
    return await pool.fetchval("SELECT n_rows FROM l3.user_state WHERE user_id = $1", user)


async def test_the_sweeper_deletes_rows_below_the_logs_first_seq_in_batches(l3_pool, embedder,  # noqa: F811
                                                                               clean_nats, monkeypatch):
    await put(l3_pool, embedder, rows("a", range(1, 8)) + rows("b", range(8, 12)))
    async with client(clean_nats) as nc:
        js = nc.jetstream()
        await stream.ensure_stream(js)
        for i in range(9):  # the log's first seq is 10 once the oldest 9 are gone
            await js.publish(subjects.log_subject("c"), b"{}")
        await nc.request(f"$JS.API.STREAM.PURGE.{subjects.STREAM}", b'{"seq": 10}')
        await js.publish(subjects.log_subject("c"), b"{}")
        assert (await js.stream_info(subjects.STREAM)).state.first_seq == 10

        counted = metrics.retention_deleted.labels("l3", "age")
        before = counted._value.get()
        calls = []
        retire_older = store.retire_older

        async def spy(pool, below, batch):
            calls.append((below, n := await retire_older(pool, below, batch)))
            return n

        monkeypatch.setattr(store, "retire_older", spy)
        for user, first, last in (("a", 1, 5), ("b", 8, 9), ("b", 10, 11)):  # rolling summaries
            assert await l3_pool.fetchval("SELECT l3.put_summary($1, $2, $3, 'summary', 1)", user, first, last)
        sweeper = Sweeper(js, l3_pool, Retention(max_age_s=3600), 3600, batch=3)
        assert await sweeper.sweep() == {"age": 9, "summaries": 2}  # those standing for swept rows
        assert await l3_pool.fetch("SELECT user_id, from_seq FROM l3.summaries") == [("b", 10)]
        assert calls == [(10, 3), (10, 3), (10, 3), (10, 0)]  # bounded, until one comes back short
        assert await seqs_of(l3_pool, "a") == [] and await seqs_of(l3_pool, "b") == [10, 11]
        assert await n_rows(l3_pool, "a") == 0 and await n_rows(l3_pool, "b") == 2
        assert counted._value.get() == before + 9
        assert await sweeper.sweep() == {"age": 0}


async def test_the_count_sweep_keeps_each_users_newest_n_in_bounded_batches(l3_pool, embedder):  # noqa: F811
    await put(l3_pool, embedder, rows("a", range(1, 11)) + rows("b", range(11, 14))
              + rows("c", range(14, 21)))
    assert await store.retire_beyond(l3_pool, 3, 4) == 4  # at most the batch
    assert await store.retire_beyond(l3_pool, 3, 100) == 7
    assert await store.retire_beyond(l3_pool, 3, 100) == 0
    assert await seqs_of(l3_pool, "a") == [8, 9, 10]
    assert await seqs_of(l3_pool, "b") == [11, 12, 13]
    assert await seqs_of(l3_pool, "c") == [18, 19, 20]
    assert [await n_rows(l3_pool, u) for u in "abc"] == [3, 3, 3]
    # a new message is stored and the next sweep trims again
    await put(l3_pool, embedder, rows("a", [21]))
    assert await store.retire_beyond(l3_pool, 3, 100) == 1
    assert await seqs_of(l3_pool, "a") == [9, 10, 21]
