"""The services that take a Redis Cluster of three masters (`REDIS_CLUSTER=1`): the
l2-gateway and the freshness-auditor's tally; the llm-broker refuses one.

Every script the tier sends touches one hash tag's keys (a user's `{u}` or the
state's `{g}`); Redis Cluster refuses any other with CROSSSLOT, so running
each path (append, get with and without `min_seq`, evict, forget, a lost
state and its replay) over users spread across the masters proves it.
"""

from __future__ import annotations

import pytest
from redis.asyncio import RedisCluster

from shared import lastseq, subjects
from shared.contract import PartitionBound
from shared.settings import Settings
from services.freshness_auditor.tally import Tally
from services.l2_gateway.service import build
from services.llm_broker.service import refuse_cluster
from tests.helpers import client, eventually, ok, running
from tests.test_l2_gateway import FakeL3, append_body

USERS = [f"lead-{i}" for i in range(12)]


@pytest.fixture
async def cluster_gateway(clean_nats, clean_redis_cluster):
    env = {"NATS_URL": clean_nats, "REDIS_URL": clean_redis_cluster, "REDIS_CLUSTER": "1"}
    redis = await RedisCluster.from_url(clean_redis_cluster).initialize()
    async with client(clean_nats) as nc:
        l3 = FakeL3()
        await l3.start(nc)
        async with running("l2-gateway", build, env):
            yield nc, l3, redis
    await redis.aclose()


def _masters_holding(redis: RedisCluster, users: list[str]) -> set[str]:
    return {redis.get_node_from_key(lastseq.key(u)).name for u in users}


async def recent(nc, user: str, **extra) -> dict:
    return await ok(nc, subjects.MEMORY_L2_GET, {"user_id": user, "op": "recent", "n": 10, **extra})


async def test_every_l2_path_runs_on_a_three_master_cluster(cluster_gateway):
    nc, l3, redis = cluster_gateway
    assert len(_masters_holding(redis, USERS)) == 3  # the users' windows are on every master
    seqs: dict[str, list[int]] = {u: [] for u in USERS}
    for i in range(3):
        for user in USERS:
            seqs[user].append((await ok(nc, subjects.MEMORY_APPEND, append_body(user, i)))["seq"])
    newest = max(s for user in USERS for s in seqs[user])
    for user in USERS:
        # the user's own newest message, then a later one of another user (proved by the position)
        for min_seq in (seqs[user][-1], newest):
            reply = await recent(nc, user, min_seq=min_seq)
            assert reply["tier"] == "l2", (user, min_seq)
            assert [m["seq"] for m in reply["messages"]] == seqs[user]
            assert [m["text"] for m in reply["messages"]] == [f"message {i} from {user}" for i in range(3)]
    assert l3.gets == []

    evicted = await ok(nc, subjects.MEMORY_L2_EVICT, {"user_id": USERS[0], "reason": "test"})
    assert evicted == {"user_id": USERS[0], "evicted": True}
    assert [m["seq"] for m in (await recent(nc, USERS[0]))["messages"]] == seqs[USERS[0]]

    assert await ok(nc, subjects.MEMORY_FORGET, {"user_id": USERS[1]}) == {"user_id": USERS[1], "deleted": 3}
    assert (await recent(nc, USERS[1]))["messages"] == []
    assert [m["seq"] for m in (await recent(nc, USERS[2]))["messages"]] == seqs[USERS[2]]
    assert int(await redis.get(lastseq.key(USERS[3]))) == seqs[USERS[3]][-1]  # for the llm-broker

    await redis.script_flush()  # every master forgets the scripts: the gateway loads them again
    for user in USERS[2:]:
        seqs[user].append((await ok(nc, subjects.MEMORY_APPEND, append_body(user, 3)))["seq"])
        reply = await recent(nc, user, min_seq=seqs[user][-1])
        assert reply["tier"] == "l2" and [m["seq"] for m in reply["messages"]] == seqs[user]


async def test_a_lost_state_passes_reads_down_until_the_log_is_replayed_into_a_new_epoch(cluster_gateway):
    """The state (slot `{g}`) and the windows (each user's slot) live on different
    masters: losing the state must still fence every window, and the replay must
    bring each user back whole."""
    nc, l3, redis = cluster_gateway
    seqs = {u: [(await ok(nc, subjects.MEMORY_APPEND, append_body(u, 0)))["seq"]] for u in USERS[:6]}
    for user in seqs:
        assert (await recent(nc, user, min_seq=seqs[user][0]))["tier"] == "l2"
    await redis.delete(lastseq.STATE)
    assert (await recent(nc, USERS[0]))["tier"] == "l3"  # nothing proves what Redis holds now
    seqs[USERS[0]].append((await ok(nc, subjects.MEMORY_APPEND, append_body(USERS[0], 1)))["seq"])

    async def replayed() -> bool:
        return (await recent(nc, USERS[0], min_seq=seqs[USERS[0]][-1]))["tier"] == "l2"

    await eventually(replayed, what="the replay into a new epoch")
    for user, mine in seqs.items():
        reply = await recent(nc, user, min_seq=mine[-1])
        assert reply["tier"] == "l2" and [m["seq"] for m in reply["messages"]] == mine


async def test_the_auditors_counts_add_up_across_replicas_on_the_cluster(clean_redis_cluster):
    """Its hashes are on different slots; only pipelines of one-key commands touch them."""
    redis = RedisCluster.from_url(clean_redis_cluster)
    try:
        replicas = [Tally(redis, 0.05), Tally(redis, 0.05)]
        for tally in replicas:
            tally.memory("l2", "checked", 3)
            tally.memory("l2", "stale")
            tally.partition("p1", PartitionBound(threshold=0.9, max_false_hit_rate=0.01))
            await tally.flush()
        stats = await replicas[0].read()
        assert (stats.memory["l2"].checked, stats.memory["l2"].stale) == (6, 2)
        assert stats.partitions_audited == 1 and stats.max_false_hit_rate == 0.01
    finally:
        await redis.aclose()


def test_the_llm_broker_refuses_a_cluster_at_start_up_rather_than_on_its_first_hit():
    single = Settings.from_env({"NATS_URL": "nats://x", "REDIS_URL": "redis://x"})
    refuse_cluster(single)
    with pytest.raises(SystemExit, match="REDIS_CLUSTER=1 is not supported"):
        refuse_cluster(Settings.from_env({"NATS_URL": "nats://x", "REDIS_URL": "redis://x",
                                          "REDIS_CLUSTER": "1"}))
