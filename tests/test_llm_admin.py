"""Operators' LLM cache operations: `llm.admin.*` on NATS and `/admin/...` on the gateway.

Real NATS (locked: every connection presents its role's identity), Redis and
Postgres; the llm-broker and the llm-gateway in-process as their own
identities; the Claude simulator as its own process, whose /stats count the
upstream calls (so `explain` is seen not to call the model). Entries are made
the way callers make them, through `llm.complete` or `POST /v1/messages`.
"""

from __future__ import annotations

import httpx
import nats.errors
import pytest
from redis.asyncio import Redis

from devstack import servers
from services.llm_broker.service import build as build_broker
from services.llm_gateway.service import build as build_gateway
from shared import lastseq, permissions, subjects
from tests.helpers import IDENTITIES, call, client, ok, running

TOKEN = "admin-token-for-tests"
KEY = "sk-gateway-test"
MODEL = "claude-haiku-4-5"
ASKED = "Is the 3-bed house on Main Street still available?"
PARAPHRASE = "is the 3-bed house on main street still available ?"
OTHER_BEDS = "Is the 4-bed house on Main Street still available?"


class Stack:
    def __init__(self, nc, sim_url: str, url: str, env: dict[str, str]) -> None:
        self.nc, self.sim_url, self.url, self.env = nc, sim_url, url, env

    def calls(self) -> int:
        return httpx.get(f"{self.sim_url}/stats").json()["requests"]

    async def complete(self, text: str, **kw) -> dict:
        return await ok(self.nc, subjects.LLM_COMPLETE, req(text, **kw))

    async def admin(self, subject: str, body: dict) -> tuple[int, dict]:
        return await call(self.nc, subject, body)

    async def http(self, method: str, path: str, *, token: str | None = TOKEN, **kw):
        headers = {**({"tiermem-admin-token": token} if token else {}), **kw.pop("headers", {})}
        async with httpx.AsyncClient(timeout=30) as http:
            return await http.request(method, f"{self.url}{path}", headers=headers, **kw)


@pytest.fixture
async def stack(clean_state, simulator):
    httpx.post(f"{simulator}/reset")
    env = {**clean_state, "ANTHROPIC_BASE_URL": simulator}
    port = servers.free_port()
    async with running("llm-broker", build_broker, env, llm_max_retries=0, llm_timeout_s=5.0), \
            running("llm-gateway", build_gateway, env, gateway_port=port, gateway_api_keys=KEY,
                    gateway_admin_token=TOKEN), \
            client(env["NATS_URL"]) as nc:  # admin: the tests' own identity
        yield Stack(nc, simulator, f"http://127.0.0.1:{port}", env)


def req(text: str, *, user: str = "lead-42", mode: str = "semantic", namespace: str = "",
        volatility: str = "lead_intent", **extra) -> dict:
    return {"task": "intent", "user_id": user, "model": MODEL,
            "system": "Classify the lead's intent. Answer with one label.", "max_tokens": 200,
            "temperature": 0, "messages": [{"role": "user", "content": text}],
            "cache": {"volatility": volatility, "mode": mode, "scope": "user",
                      "namespace": namespace}, **extra}


# --------------------------------------------------------------------------- NATS


async def test_lookup_shows_the_stored_entry_and_delete_drops_it_from_both_tiers(stack):
    stored = await stack.complete(ASKED)
    entry_id = stored["cache"]["entry_id"]
    code, entry = await stack.admin(subjects.LLM_ADMIN_LOOKUP, {"entry_id": entry_id})
    assert code == 200, entry
    assert entry["entry_id"] == entry_id and entry["user_id"] == "lead-42"
    assert entry["partition"] and entry_id.startswith(entry["partition"] + ":")
    assert entry["volatility"] == "lead_intent" and entry["query"] == ASKED
    assert entry["text"] == stored["text"] and entry["stop_reason"] == stored["stop_reason"]
    assert entry["usage"] == stored["usage"] and entry["cost_usd"] == pytest.approx(stored["cost_usd"])
    assert entry["tiers"] == ["exact", "semantic"] and entry["fresh"] is True
    assert 290 < entry["ttl_left_s"] <= 300 and 0 <= entry["age_s"] < 10  # lead_intent: 300 s

    code, gone = await stack.admin(subjects.LLM_ADMIN_DELETE, {"entry_id": entry_id})
    assert (code, gone) == (200, {"entry_id": entry_id, "deleted": True})
    code, missing = await stack.admin(subjects.LLM_ADMIN_LOOKUP, {"entry_id": entry_id})
    assert code == 404, missing
    # the same question again: in semantic mode a surviving Postgres row would be a
    # similarity-1.0 hit, a surviving Redis key an exact one; both gone, it is a miss
    again = await stack.complete(ASKED)
    assert again["cache"]["status"] == "miss" and stack.calls() == 2
    code, twice = await stack.admin(subjects.LLM_ADMIN_DELETE, {"entry_id": "no-such-entry"})
    assert (code, twice["deleted"]) == (200, False)


async def test_explain_predicts_what_a_request_gets_without_calling_the_model(stack):
    stored = await stack.complete(ASKED)
    entry_id = stored["cache"]["entry_id"]
    calls = stack.calls()

    code, same = await stack.admin(subjects.LLM_ADMIN_EXPLAIN, req(ASKED))
    assert code == 200, same
    assert same["decision"] == "hit_exact" and same["entry_id"] == entry_id
    assert same["exact_key"] == entry_id and same["exact"]["entry_id"] == entry_id

    _, para = await stack.admin(subjects.LLM_ADMIN_EXPLAIN, req(PARAPHRASE))
    assert para["decision"] == "hit_semantic" and para["entry_id"] == entry_id, para
    assert para["exact"] is None and para["semantic"] is True and para["threshold"] is not None
    best = para["candidates"][0]
    assert best["entry_id"] == entry_id and best["guard"]["serve"] is True
    assert best["refused"] is None and 0 < best["similarity"] <= 1

    _, other = await stack.admin(subjects.LLM_ADMIN_EXPLAIN, req(OTHER_BEDS))
    assert other["decision"] == "miss" and other["entry_id"] is None, other
    refused = other["candidates"][0]
    assert refused["entry_id"] == entry_id and refused["guard"]["serve"] is False
    assert refused["guard"]["reason"]  # why: the guard's own words (e.g. a number differs)

    _, off = await stack.admin(subjects.LLM_ADMIN_EXPLAIN, req(ASKED, mode="off"))
    assert off == {**off, "decision": "bypass", "reason": "mode_off"}
    code, bad = await stack.admin(subjects.LLM_ADMIN_EXPLAIN, req(ASKED, model="gpt-4"))
    assert code == 400, bad  # what the broker refuses, explain refuses alike

    assert stack.calls() == calls  # no model call, and nothing stored under the explained keys
    code, _ = await stack.admin(subjects.LLM_ADMIN_LOOKUP, {"entry_id": other["exact_key"]})
    assert code == 404
    # and the predictions hold
    got_para = await stack.complete(PARAPHRASE)
    assert (got_para["cache"]["status"], got_para["cache"]["match"]) == ("hit", "semantic")
    assert got_para["cache"]["entry_id"] == entry_id
    assert (await stack.complete(OTHER_BEDS))["cache"]["status"] == "miss"


async def test_explain_names_the_staleness_that_refuses_a_hit(stack):
    """A lead_intent entry is refused once the user spoke after it was made (`policy.stale`):
    the user's newest message seq, which the l2-gateway records, is set here as it would."""
    await stack.complete(ASKED)
    redis = Redis.from_url(stack.env["REDIS_URL"])
    try:
        await redis.set(lastseq.key("lead-42"), 99)
    finally:
        await redis.aclose()
    _, out = await stack.admin(subjects.LLM_ADMIN_EXPLAIN, req(ASKED))
    assert out["decision"] == "miss" and out["exact"] is not None, out
    assert out["exact_refused"] == "user_spoke"
    assert [c["refused"] for c in out["candidates"]] == ["user_spoke"]  # the same row, semantically
    assert (await stack.complete(ASKED))["cache"]["status"] == "miss"


async def test_flush_drops_a_partition_a_namespace_or_a_user_and_nothing_else(stack):
    a1 = await stack.complete("Do you allow pets?", user="lead-a")
    a2 = await stack.complete("What is the HOA fee?", user="lead-a")
    b = await stack.complete("Do you allow pets?", user="lead-b")
    _, entry = await stack.admin(subjects.LLM_ADMIN_LOOKUP, {"entry_id": a1["cache"]["entry_id"]})
    code, flushed = await stack.admin(subjects.LLM_ADMIN_FLUSH, {"partition": entry["partition"]})
    assert (code, flushed["deleted"]) == (200, 2), flushed
    for gone in (a1, a2):
        code, _ = await stack.admin(subjects.LLM_ADMIN_LOOKUP, {"entry_id": gone["cache"]["entry_id"]})
        assert code == 404
    assert (await stack.complete("Do you allow pets?", user="lead-b"))["cache"]["status"] == "hit"
    assert b["cache"]["entry_id"] != a1["cache"]["entry_id"]

    # namespaces: exact-mode entries too (Redis only), found by what they record
    t1 = await stack.complete("Any parking?", mode="exact", namespace="tenant-1")
    t1s = await stack.complete("Any garden?", namespace="tenant-1")
    t2 = await stack.complete("Any parking?", mode="exact", namespace="tenant-2")
    code, flushed = await stack.admin(subjects.LLM_ADMIN_FLUSH, {"namespace": "tenant-1"})
    assert (code, flushed["deleted"]) == (200, 2), flushed
    for gone in (t1, t1s):
        code, _ = await stack.admin(subjects.LLM_ADMIN_LOOKUP, {"entry_id": gone["cache"]["entry_id"]})
        assert code == 404
    code, kept = await stack.admin(subjects.LLM_ADMIN_LOOKUP, {"entry_id": t2["cache"]["entry_id"]})
    assert code == 200 and kept["namespace"] == "tenant-2" and kept["tiers"] == ["exact"]

    code, flushed = await stack.admin(subjects.LLM_ADMIN_FLUSH, {"user_id": "lead-b"})
    assert (code, flushed["deleted"]) == (200, 1)
    assert (await stack.complete("Do you allow pets?", user="lead-b"))["cache"]["status"] == "miss"

    for bad in ({}, {"partition": entry["partition"], "user_id": "lead-a"}, {"partition": "x"}):
        code, _ = await stack.admin(subjects.LLM_ADMIN_FLUSH, bad)
        assert code == 400, bad


async def test_only_admin_may_ask_the_admin_subjects(stack, nats_url):
    if nats_url not in IDENTITIES:
        pytest.skip("NATS given by NATS_URL: its users are the operator's")
    stored = await stack.complete(ASKED)
    entry_id = stored["cache"]["entry_id"]
    async with client(nats_url, permissions.WORKER) as worker:
        for subject, body in ((subjects.LLM_ADMIN_DELETE, {"entry_id": entry_id}),
                              (subjects.LLM_ADMIN_FLUSH, {"user_id": "lead-42"}),
                              (subjects.LLM_ADMIN_LOOKUP, {"entry_id": entry_id}),
                              (subjects.LLM_ADMIN_EXPLAIN, req(ASKED))):
            with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
                await call(worker, subject, body, timeout=1.0)
    code, entry = await stack.admin(subjects.LLM_ADMIN_LOOKUP, {"entry_id": entry_id})
    assert code == 200 and entry["entry_id"] == entry_id  # the worker's delete did nothing
    # the table: admin (everything) and the gateway (its /admin routes) publish them, the broker
    # alone serves them, and no other role may touch them
    for name, role in permissions.ROLES.items():
        if name == permissions.ADMIN:
            continue
        for subject in subjects.LLM_ADMIN:
            assert (subject in role.publish) == (name == permissions.LLM_GATEWAY), (name, subject)
            assert (subject in role.subscribe) == (name == permissions.LLM_BROKER), (name, subject)
        assert not any(p.startswith("llm.admin") or p in (">", "llm.>") for p in role.publish
                       if p not in subjects.LLM_ADMIN), name


# --------------------------------------------------------------------------- HTTP


async def test_http_admin_routes_look_up_explain_delete_and_flush_with_the_token(stack):
    async with httpx.AsyncClient(timeout=30) as http:
        sent = await http.post(f"{stack.url}/v1/messages", headers={
            "x-api-key": KEY, "anthropic-version": "2023-06-01", "tiermem-cache-mode": "semantic",
            "tiermem-scope": "user", "tiermem-user": "lead-9", "tiermem-namespace": "web"},
            json={"model": MODEL, "max_tokens": 100,
                  "messages": [{"role": "user", "content": ASKED}]})
    assert sent.status_code == 200, sent.text
    entry_id = sent.headers["tiermem-entry"]

    got = await stack.http("GET", f"/admin/entries/{entry_id}")
    assert got.status_code == 200, got.text
    entry = got.json()
    assert entry["entry_id"] == entry_id and entry["user_id"] == "lead-9"
    assert entry["namespace"] == "web" and entry["text"] == sent.json()["content"][0]["text"]

    explained = await stack.http(
        "POST", "/admin/explain",
        headers={"tiermem-cache-mode": "semantic", "tiermem-scope": "user",  # as it was sent:
                 "tiermem-user": "lead-9", "tiermem-namespace": "web",  # each is in the key
                 "anthropic-version": "2023-06-01"},
        json={"model": MODEL, "max_tokens": 100,
              "messages": [{"role": "user", "content": OTHER_BEDS}]})
    assert explained.status_code == 200, explained.text
    why = explained.json()
    assert why["decision"] == "miss" and why["partition"] == entry["partition"]
    assert why["candidates"][0]["guard"]["serve"] is False

    deleted = await stack.http("DELETE", f"/admin/entries/{entry_id}")
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True
    assert (await stack.http("GET", f"/admin/entries/{entry_id}")).status_code == 404

    await stack.complete("Any parking?", namespace="web")
    flushed = await stack.http("POST", "/admin/flush", json={"namespace": "web"})
    assert flushed.status_code == 200 and flushed.json()["deleted"] == 1, flushed.text
    bad = await stack.http("POST", "/admin/flush", json={})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"


async def test_http_admin_routes_refuse_without_the_token_and_vanish_without_one_set(stack,
                                                                                    clean_state):
    stored = await stack.complete(ASKED)
    path = f"/admin/entries/{stored['cache']['entry_id']}"
    assert (await stack.http("GET", path, token=None)).status_code == 401
    assert (await stack.http("GET", path, token="guess")).status_code == 403
    assert (await stack.http("DELETE", path, token="guess")).status_code == 403
    assert (await stack.http("POST", "/admin/flush", token=None,
                             json={"user_id": "lead-42"})).status_code == 401
    # an API key for /v1/messages is no admin token
    assert (await stack.http("GET", path, token=None, headers={"x-api-key": KEY})).status_code == 401
    assert (await stack.http("GET", path)).status_code == 200  # still there

    port = servers.free_port()
    async with running("llm-gateway", build_gateway, clean_state, gateway_port=port,
                       gateway_api_keys=KEY):  # no GATEWAY_ADMIN_TOKEN
        async with httpx.AsyncClient(timeout=30) as http:
            for method in ("GET", "DELETE"):
                r = await http.request(method, f"http://127.0.0.1:{port}{path}",
                                       headers={"tiermem-admin-token": TOKEN})
                assert r.status_code in (404, 405), (method, r.status_code)
            r = await http.post(f"http://127.0.0.1:{port}/admin/flush", json={"user_id": "lead-42"},
                                headers={"tiermem-admin-token": TOKEN})
            assert r.status_code == 404
    assert (await stack.http("GET", path)).status_code == 200
