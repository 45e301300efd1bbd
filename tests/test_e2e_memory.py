"""The whole memory path as production runs it: every service its own process.

`python -m devstack up` starts memory-l1, l2-gateway and the
l3-semantic-indexer against the test servers; the tests talk to them only over
NATS, as an agent worker would, and check the stores behind them directly.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys

import asyncpg
import msgspec
import pytest
import redis.asyncio as aioredis
from nats.js.errors import NotFoundError

from services.l2_gateway.redis_window import STATE, keys as l2_keys
from shared import permissions, subjects
from tests.conftest import REPO, reset_servers, stack_processes
from tests.helpers import call, client, eventually, identity_env, ok

pytestmark = pytest.mark.e2e
USERS, PER_USER = 50, 40

TOPICS = ["the weather this weekend", "my kids' school schedule", "the car that broke down",
          "a vacation we are planning", "the dog needing a walk", "work being busy lately",
          "a birthday party on Saturday", "the traffic downtown", "a new phone I bought",
          "dinner plans with friends"]


def filler(user: str, i: int) -> str:
    return f"Message {i} from {user}: just chatting about {TOPICS[(i * 7 + len(user)) % len(TOPICS)]}."


def body(user: str, i: int, text: str | None = None) -> dict:
    return {"user_id": user, "bot_id": "sales-1", "role": "user" if i % 2 == 0 else "assistant",
            "text": text or filler(user, i), "msg_id": f"{user}:{i}"}


@pytest.fixture(scope="module")
async def stack(nats_url, redis_url, database_url, tmp_path_factory):
    await reset_servers(nats_url, redis_url, database_url)
    state = tmp_path_factory.mktemp("stack")
    with stack_processes({**os.environ, "NATS_URL": nats_url, "REDIS_URL": redis_url,
                          "DATABASE_URL": database_url}, state) as env:
        yield {"env": env, "state": state}


@pytest.fixture(scope="module")
async def loaded(stack):
    """50 users x 40 messages, appended concurrently; returns {user: [seq...]}."""
    async with client(stack["env"]["NATS_URL"]) as nc:
        async def one(user, i):
            return user, i, (await ok(nc, subjects.MEMORY_APPEND, body(user, i)))["seq"]

        results = await asyncio.gather(*(one(f"lead-{u}", i)
                                         for i in range(PER_USER) for u in range(USERS)))
    seqs: dict[str, list[int]] = {}
    for user, i, seq in sorted(results, key=lambda r: (r[0], r[1])):
        seqs.setdefault(user, []).append(seq)
    return seqs


async def wait_l3(nc, user: str, seq: int) -> None:
    """Until L3 indexed `user` up to `seq`."""
    async def indexed():
        code, _reply = await call(nc, subjects.MEMORY_L3_GET, {"user_id": user, "n": 1, "min_seq": seq})
        return code == 200

    await eventually(indexed, timeout=20, every=0.1, what=f"L3 indexed {user} up to {seq}")


async def test_concurrent_appends_get_distinct_increasing_seqs_per_user(loaded):
    all_seqs = [s for seqs in loaded.values() for s in seqs]
    assert len(loaded) == USERS and len(all_seqs) == USERS * PER_USER == len(set(all_seqs))


async def test_recent_5_50_500_are_answered_by_l1_l2_l3_correctly(stack, loaded):
    async with client(stack["env"]["NATS_URL"]) as nc:
        user = "lead-7"
        expected = [filler(user, i) for i in range(PER_USER)]
        await wait_l3(nc, user, loaded[user][-1])
        first = await ok(nc, subjects.MEMORY_GET, {"user_id": user, "op": "recent", "n": 5})
        # new users' windows grow from the change events; a miss would fill from L2
        assert first["tier"] in ("l1", "l2")
        for n, tier in ((5, "l1"), (50, "l2"), (500, "l3")):
            reply = await ok(nc, subjects.MEMORY_GET, {"user_id": user, "op": "recent", "n": n})
            assert reply["tier"] == tier, (n, reply["tier"])
            assert [m["text"] for m in reply["messages"]] == expected[-n:]
            assert [m["seq"] for m in reply["messages"]] == loaded[user][-n:]
            assert reply["seq"] == loaded[user][-1]


async def test_search_finds_a_message_by_a_paraphrase(stack, loaded):
    async with client(stack["env"]["NATS_URL"]) as nc:
        user = "lead-3"
        target = "Our budget for the new house is about four hundred thousand dollars."
        seq = (await ok(nc, subjects.MEMORY_APPEND, body(user, 1000, target)))["seq"]
        await wait_l3(nc, user, seq)
        reply = await ok(nc, subjects.MEMORY_GET, {"user_id": user, "op": "search",
                                                    "query": "how much money can they spend on a home",
                                                    "k": 3})
        assert reply["tier"] == "l3"
        assert reply["messages"][0]["text"] == target
        scores = [m["score"] for m in reply["messages"]]
        assert scores == sorted(scores, reverse=True) and all(s is not None for s in scores)


async def test_read_your_writes_1000_of_1000(stack, loaded):
    async with client(stack["env"]["NATS_URL"]) as nc:
        misses = 0
        for i in range(1000):
            user = f"lead-{i % USERS}"
            ack = await ok(nc, subjects.MEMORY_APPEND, body(user, 2000 + i, f"ryw probe {i}"))
            reply = await ok(nc, subjects.MEMORY_GET, {"user_id": user, "op": "recent", "n": 3,
                                                        "min_seq": ack["seq"]})
            if reply["messages"][-1]["seq"] != ack["seq"] or reply["seq"] < ack["seq"]:
                misses += 1
        assert misses == 0


async def test_resent_msg_id_is_stored_once(stack, loaded):
    async with client(stack["env"]["NATS_URL"]) as nc:
        first = await ok(nc, subjects.MEMORY_APPEND, body("dup-user", 1, "only once"))
        again = await ok(nc, subjects.MEMORY_APPEND, body("dup-user", 1, "only once"))
        assert again == {"user_id": "dup-user", "seq": first["seq"], "duplicate": True}
        await wait_l3(nc, "dup-user", first["seq"])
        for subject in (subjects.MEMORY_GET, subjects.MEMORY_L3_GET):
            reply = await ok(nc, subject, {"user_id": "dup-user", "n": 10})
            assert [m["text"] for m in reply["messages"]] == ["only once"]


@pytest.mark.parametrize("subject,raw,code", [
    (subjects.MEMORY_GET, b"{oops", 400),
    (subjects.MEMORY_GET, b'{"n": 5}', 400),
    (subjects.MEMORY_GET, json.dumps({"user_id": "u" * 129}).encode(), 400),
    (subjects.MEMORY_GET, b'{"user_id": "a", "op": "drop"}', 400),
    (subjects.MEMORY_GET, b'{"user_id": "a", "n": 0}', 400),
    (subjects.MEMORY_GET, b'{"user_id": "a", "n": 1001}', 400),
    (subjects.MEMORY_GET, b'{"user_id": "a\xff"}', 400),
    (subjects.MEMORY_APPEND, json.dumps(body("big", 0, "x" * 70000)).encode(), 413),
    (subjects.MEMORY_APPEND, b'{"user_id": "a", "bot_id": "b", "role": "user", "text": "\xc3", "msg_id": "m"}', 400),
    (subjects.MEMORY_FORGET, b'{"user_id": ""}', 400),
])
async def test_bad_input_gets_error_code_and_headers_and_changes_nothing(stack, loaded, subject, raw, code):
    async with client(stack["env"]["NATS_URL"]) as nc:
        before = (await nc.jetstream().stream_info(subjects.STREAM)).state.messages
        msg = await nc.request(subject, raw, timeout=10)
        assert msg.headers["Nats-Service-Error-Code"] == str(code)
        assert msg.headers["Nats-Service-Error"]
        assert msgspec.json.decode(msg.data)["error"]["code"] == code
        assert (await nc.jetstream().stream_info(subjects.STREAM)).state.messages == before
        assert (await ok(nc, subjects.MEMORY_GET, {"user_id": "lead-1", "n": 1}))["messages"]


async def test_forget_removes_one_user_everywhere_and_keeps_the_others(stack, loaded):
    env = stack["env"]
    gone, kept = "lead-11", "lead-12"
    async with client(env["NATS_URL"]) as nc:
        await wait_l3(nc, gone, loaded[gone][-1])
        await ok(nc, subjects.MEMORY_GET, {"user_id": gone, "n": 5})  # into L1 first
        reply = await ok(nc, subjects.MEMORY_FORGET, {"user_id": gone})
        assert reply["user_id"] == gone and reply["deleted"] >= PER_USER

        async def nothing_left():  # every L1 is told by a broadcast, which the reply does not wait for
            for subject in (subjects.MEMORY_GET, subjects.MEMORY_L2_GET, subjects.MEMORY_L3_GET):
                assert (await ok(nc, subject, {"user_id": gone, "n": 5}))["messages"] == [], subject
            return True

        await eventually(nothing_left)
        assert (await ok(nc, subjects.MEMORY_GET, {"user_id": gone, "op": "search",
                                                    "query": "weather", "k": 5}))["messages"] == []
        with pytest.raises(NotFoundError):
            await nc.jetstream().get_last_msg(subjects.STREAM, subjects.log_subject(gone))
        kept_reply = await ok(nc, subjects.MEMORY_GET, {"user_id": kept, "n": 500})
        assert len(kept_reply["messages"]) >= PER_USER
    pg = await asyncpg.connect(env["DATABASE_URL"])
    try:
        assert await pg.fetchval("SELECT count(*) FROM l3.messages WHERE user_id=$1", gone) == 0
        assert await pg.fetchval("SELECT count(*) FROM l3.messages WHERE user_id=$1", kept) >= PER_USER
    finally:
        await pg.close()
    r = aioredis.from_url(env["REDIS_URL"])
    try:
        epoch = (await r.hget(STATE, "epoch")).decode()
        assert await r.zcard(l2_keys(gone, epoch)[0]) == 0
        assert await r.zcard(l2_keys(kept, epoch)[0]) >= PER_USER
    finally:
        await r.aclose()


async def test_services_survive_a_quiet_log(stack, loaded):
    """Idle consumers time out their fetches; that must not end the service."""
    await asyncio.sleep(3)  # scenario: a quiet log, longer than the consumers' fetch timeouts (1 s)
    async with client(stack["env"]["NATS_URL"]) as nc:
        for name in ("memory-l1", "l2-gateway", "l3-semantic-indexer"):
            msg = await nc.request(f"$SRV.PING.{name}", b"", timeout=5)
            assert json.loads(msg.data)["name"] == name
    records = json.loads((stack["state"] / "stack.json").read_text())["processes"]
    for record in records:
        os.kill(record["pid"], 0)  # raises if the process is gone


async def test_every_service_serves_prometheus_metrics(stack, loaded):
    import httpx

    from shared.settings import load_stack_env

    env = load_stack_env(stack["state"])
    urls = {k: v for k, v in env.items() if k.endswith("_METRICS_URL")}
    assert len(urls) >= 4
    async with httpx.AsyncClient() as http:
        for name, url in urls.items():
            text = (await http.get(url, timeout=5)).text
            assert "tiermem_requests_total" in text or "tiermem_llm" in text, name
        l2 = (await http.get(env["L2_GATEWAY_METRICS_URL"], timeout=5)).text
        assert 'tiermem_requests_total{code="200",endpoint="append",service="l2-gateway"}' in l2
        assert 'tiermem_memory_answers_total{op="recent",tier="l2"}' in l2


async def test_indexer_killed_mid_stream_leaves_every_message_exactly_once(stack, loaded):
    """Runs last: it replaces the stack's indexer with one of its own."""
    env = stack["env"]
    records = json.loads((stack["state"] / "stack.json").read_text())["processes"]
    indexer = next(p for p in records if p["name"] == "l3-semantic-indexer")
    users = [f"crash-{u}" for u in range(20)]
    total = 100 * len(users)
    replacement = None
    async with client(env["NATS_URL"]) as nc:
        acks = 0

        async def one(user, i):
            nonlocal acks
            await ok(nc, subjects.MEMORY_APPEND, body(user, i))
            acks += 1

        writer = asyncio.gather(*(one(u, i) for i in range(100) for u in users))
        await eventually(lambda: acks >= total // 4, timeout=60, every=0.005)
        os.kill(indexer["pid"], signal.SIGKILL)
        await writer
        replacement = subprocess.Popen(
            [sys.executable, "-m", "services.l3_semantic_indexer"], cwd=REPO,
            env={**{k: v for k, v in env.items() if k != "METRICS_PORT"},
                 **identity_env(env["NATS_URL"], permissions.L3_INDEXER)},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            pg = await asyncpg.connect(env["DATABASE_URL"])
            try:
                async def all_indexed():
                    return await pg.fetchval(
                        "SELECT count(*) FROM l3.messages WHERE user_id = ANY($1)", users) >= total

                await eventually(all_indexed, timeout=60, every=0.1, what="every message indexed")
                rows = await pg.fetch("SELECT user_id, msg_id, seq FROM l3.messages WHERE user_id = ANY($1)",
                                      users)
            finally:
                await pg.close()
            assert len(rows) == total
            assert len({(r["user_id"], r["msg_id"]) for r in rows}) == total
            assert len({r["seq"] for r in rows}) == total
            assert {r["msg_id"] for r in rows} == {f"{u}:{i}" for u in users for i in range(100)}
        finally:
            replacement.terminate()
            replacement.wait(timeout=20)
