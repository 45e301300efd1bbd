"""The endpoint wrapper and `Runtime.request` (shared/service.py) against a real NATS.

A small service built here forwards to plain subscriptions, so each test can see
exactly what went over the wire: error mapping, outcome metrics, the trace
context passed on when this process keeps no spans, and the reply inbox's
timeouts and "no responders".
"""

from __future__ import annotations

import asyncio

import msgspec
import pytest
from nats.errors import NoRespondersError
from prometheus_client import REGISTRY

from shared import permissions, telemetry
from shared.contract import GetReply, GetRequest
from shared.errors import BadRequest
from shared.service import ERROR_CODE_HEADER, ERROR_HEADER, run_service
from shared.settings import Settings
from tests.helpers import call, client, identity_env, running

CALLER = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def build_for(raw_subject: str):
    async def build(rt) -> None:
        async def echo(req: GetRequest) -> GetReply:
            if req.user_id == "bad":
                raise BadRequest("no bad users")
            if req.user_id == "boom":
                raise RuntimeError("a bug")
            return GetReply(user_id=req.user_id, tier="t", seq=req.n, messages=[])

        async def forward(req: GetRequest) -> msgspec.Raw:
            return await rt.request(raw_subject, req, msgspec.Raw, timeout=0.3)

        rt.endpoint("echo", "svc.echo", GetRequest, echo)
        rt.endpoint("forward", "svc.forward", GetRequest, forward)

    return build


@pytest.fixture
async def svc(clean_nats):
    env = {"NATS_URL": clean_nats}
    async with running("svc-test", build_for("svc.raw"), env), client(clean_nats) as nc:
        yield nc


def outcomes(endpoint: str, code: int) -> float:
    return REGISTRY.get_sample_value(
        "tiermem_requests_total", {"service": "svc-test", "endpoint": endpoint, "code": str(code)}) or 0.0


async def test_replies_errors_and_outcome_metrics_are_as_before(svc):
    nc = svc
    before = {c: outcomes("echo", c) for c in (200, 400, 500)}
    assert await call(nc, "svc.echo", {"user_id": "a", "n": 3}) == (
        200, {"user_id": "a", "tier": "t", "seq": 3, "messages": []})
    assert await call(nc, "svc.echo", {"user_id": "bad"}) == (
        400, {"error": {"code": 400, "message": "no bad users"}})
    msg = await nc.request("svc.echo", b'{"user_id": "boom"}', timeout=5)
    assert msg.headers[ERROR_CODE_HEADER] == "500" and msg.headers[ERROR_HEADER] == "internal error"
    assert (await call(nc, "svc.echo", b"{oops"))[0] == 400
    after = {c: outcomes("echo", c) for c in (200, 400, 500)}
    assert {c: after[c] - before[c] for c in after} == {200: 1, 400: 2, 500: 1}


async def test_a_forwarded_reply_is_passed_on_byte_for_byte(svc):
    nc = svc
    raw = b'{"user_id":"a","tier":"below","seq":7,"messages":[{"seq":7,"text":"kept as is"}]}'

    async def below(m) -> None:
        await m.respond(raw)

    sub = await nc.subscribe("svc.raw", cb=below)
    try:
        msg = await nc.request("svc.forward", b'{"user_id": "a"}', timeout=5)
        assert msg.data == raw
    finally:
        await sub.unsubscribe()


async def test_no_responder_is_503_and_silence_is_504(svc):
    nc = svc
    code, body = await call(nc, "svc.forward", {"user_id": "a"})
    assert code == 503 and "no service is answering svc.raw" in body["error"]["message"]

    async def silent(m) -> None:
        pass

    sub = await nc.subscribe("svc.raw", cb=silent)
    try:
        await nc.flush()
        code, body = await call(nc, "svc.forward", {"user_id": "a"})
        assert code == 504 and "did not answer in time" in body["error"]["message"]
    finally:
        await sub.unsubscribe()


async def test_without_spans_the_callers_trace_context_is_passed_on(svc, monkeypatch):
    nc = svc
    monkeypatch.setattr(telemetry, "recording", lambda: False)
    seen: list[dict] = []

    async def below(m) -> None:
        seen.append(dict(m.headers or {}))
        await m.respond(b'{"user_id":"a","tier":"below","seq":0,"messages":[]}')

    sub = await nc.subscribe("svc.raw", cb=below)
    try:
        await nc.request("svc.forward", b'{"user_id": "a"}', timeout=5,
                         headers={"traceparent": CALLER})
        await nc.request("svc.forward", b'{"user_id": "a"}', timeout=5)
        await asyncio.sleep(0)
    finally:
        await sub.unsubscribe()
    assert seen[0]["traceparent"] == CALLER  # no span of ours in between
    assert not seen[1]  # nothing to pass on


def build_stuck(release: asyncio.Event):
    """A service whose background task ignores cancellation and whose close hook hangs."""
    async def build(rt) -> None:
        async def stubborn() -> None:
            while not release.is_set():
                try:
                    await asyncio.sleep(3600)
                except asyncio.CancelledError:
                    continue  # a bug: swallows the shutdown's cancel

        async def echo(req: GetRequest) -> GetReply:
            return GetReply(user_id=req.user_id, tier="t", seq=0, messages=[])

        rt.spawn(stubborn(), "stubborn")
        rt.on_close(lambda: asyncio.sleep(3600))
        rt.endpoint("echo", "svc.stuck", GetRequest, echo)

    return build


async def test_a_stuck_task_or_close_hook_delays_the_shutdown_only_by_its_bound(clean_nats, monkeypatch):
    from shared import service

    monkeypatch.setattr(service, "STEP_TIMEOUT_S", 0.3)
    release = asyncio.Event()
    started = asyncio.get_running_loop().time()
    async with running("svc-stuck", build_stuck(release), {"NATS_URL": clean_nats}):
        pass
    took = asyncio.get_running_loop().time() - started
    release.set()
    assert took < 10, took  # both steps gave up after their bound instead of hanging
    await assert_nobody_answers(clean_nats, "svc.stuck")


async def test_a_cancelled_shutdown_still_leaves_the_bus(clean_nats):
    """A supervisor that gives up on a stop (cancels it) must not leave a half-stopped
    service subscribed, taking a share of its queue group's requests."""
    release = asyncio.Event()
    settings = Settings.from_env({**identity_env(clean_nats, permissions.ADMIN), "NATS_URL": clean_nats})
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(run_service("svc-cancelled", "test", build_stuck(release),
                                           settings=settings, stop=stop, ready=ready))
    await asyncio.wait_for(ready.wait(), 30)
    stop.set()
    await asyncio.sleep(0.2)  # inside the stuck shutdown now
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    release.set()
    await assert_nobody_answers(clean_nats, "svc.stuck")


async def assert_nobody_answers(url: str, subject: str) -> None:
    async with client(url) as nc:
        with pytest.raises(NoRespondersError):
            await nc.request(subject, b'{"user_id": "u"}', timeout=1)
