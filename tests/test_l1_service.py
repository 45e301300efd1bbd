"""memory-l1 against a real NATS, with a fake L2 that answers from a dict and counts calls.

The sidecar runs in this process (`build` gets the test's `WindowStore`, so a
test can wait until an event has been applied instead of sleeping); the fake
L2 is a plain subscription on `memory.l2.get`. The sidecar believes a change
event only up to the stream's last seq, so the test, playing the gateway,
makes the stream reach an event's seq before broadcasting it.
"""

from __future__ import annotations

import asyncio
import functools
import uuid
from dataclasses import dataclass

import msgspec
import nats
import pytest
from prometheus_client import REGISTRY

from services.memory_l1 import service as l1_service
from services.memory_l1.service import build
from services.memory_l1.window import WindowStore
from shared import bus, permissions, stream, subjects, telemetry
from shared.contract import Changed, GetReply, GetRequest, LogEntry, Message, encode, fit_reply
from shared.errors import PayloadTooLarge
from shared.service import ERROR_CODE_HEADER, ERROR_HEADER
from devstack.servers import start_nats
from tests.helpers import auth, call, eventually, never_within, ok, running

_request = msgspec.json.Decoder(GetRequest)


def msg(seq: int) -> Message:
    return Message(seq=seq, msg_id=f"m{seq}", role="user", bot_id="bot", text=f"text {seq}",
                   ts="2026-11-26T07:00:00.000Z")


class FakeL2:
    """Answers `memory.l2.get` from `users` (tier "l2"), recording every request."""

    def __init__(self) -> None:
        self.users: dict[str, list[Message]] = {}
        self.calls: list[GetRequest] = []
        self.delay = 0.0
        self.error: tuple[int, str] | None = None
        self.nc = None

    def add(self, user: str, *seqs: int) -> int:
        self.users.setdefault(user, []).extend(msg(s) for s in seqs)
        return self.users[user][-1].seq

    def calls_for(self, user: str) -> list[GetRequest]:
        return [c for c in self.calls if c.user_id == user]

    async def handle(self, m) -> None:
        req = _request.decode(m.data)
        self.calls.append(req)
        if self.delay:
            await asyncio.sleep(self.delay)  # scenario: a slow L2
        if self.error:
            code, text = self.error
            await self.nc.publish(m.reply, encode({"error": {"code": code, "message": text}}),
                                  headers={ERROR_HEADER: text, ERROR_CODE_HEADER: str(code)})
            return
        msgs = self.users.get(req.user_id, [])
        seq = msgs[-1].seq if msgs else 0
        if req.op == "search":
            found = [Message(**{**msgspec.structs.asdict(x), "score": 0.5}) for x in msgs[:req.k]]
            reply = GetReply(req.user_id, "l3", seq, found)
        else:
            reply = GetReply(req.user_id, "l2", seq, msgs[-req.n:])
        try:  # as the real tiers do
            body = fit_reply(reply, req.op, self.nc.max_payload)
        except PayloadTooLarge as exc:
            await self.nc.publish(m.reply, encode({"error": {"code": 413, "message": exc.message}}),
                                  headers={ERROR_HEADER: exc.message, ERROR_CODE_HEADER: "413"})
            return
        await m.respond(bytes(body))


@dataclass
class L1:
    nc: object
    store: WindowStore
    l2: FakeL2
    direct: str

    async def get(self, user: str, *, subject: str | None = None, **body) -> dict:
        return await ok(self.nc, subject or self.direct, {"user_id": user, **body})

    async def publish(self, event: Changed) -> None:
        """Broadcast `event` as the gateway would: once the stream has reached its seq."""
        await log_reaches(self.nc.jetstream(), event.seq)
        await self.forge(event)

    async def forge(self, event: Changed) -> None:
        """Broadcast `event`, whatever the stream holds."""
        await self.nc.publish(subjects.changed_subject(event.user_id), encode(event))
        await self.nc.flush()



async def log_reaches(js, seq: int) -> None:
    """Append to the stream (for a user no test reads) until its last seq is at least `seq`."""
    filler = encode(LogEntry(user_id="filler", bot_id="bot", role="user", text="filler",
                             msg_id="", ts="2026-11-26T07:00:00.000Z"))
    while await stream.last_seq(js) < seq:
        await js.publish(subjects.log_subject("filler"), filler)


async def start_l1(nats_url: str, **settings):
    l1_id = f"t{uuid.uuid4().hex[:10]}"
    env = {"NATS_URL": nats_url, "L1_ID": l1_id, "LOG_LEVEL": "warning",
           **{k.upper(): str(v) for k, v in settings.items()}}
    store = WindowStore(int(env.get("L1_WINDOW", 10)), int(env.get("L1_MAX_USERS", 50_000)),
                        ttl_s=float(env.get("L1_TTL_S", 300)))
    l2 = FakeL2()
    nc = await bus.connect(nats_url, auth(nats_url, permissions.ADMIN), reconnect_time_wait=0.1,
                           max_reconnect_attempts=-1)
    try:
        l2.nc = nc
        await stream.ensure_stream(nc.jetstream())
        await nc.subscribe(subjects.MEMORY_L2_GET, cb=l2.handle)
        await nc.flush()
        async with running("memory-l1", functools.partial(build, store=store), env):
            yield L1(nc, store, l2, subjects.memory_get_direct(l1_id))
    finally:
        await nc.close()


@pytest.fixture
async def l1(nats_url):
    async for sidecar in start_l1(nats_url):
        yield sidecar


@pytest.fixture
async def small_l1(nats_url):
    async for sidecar in start_l1(nats_url, l1_max_users=3):
        yield sidecar


def user() -> str:
    return f"lead-{uuid.uuid4().hex[:8]}"


def seqs(reply: dict) -> list[int]:
    return [m["seq"] for m in reply["messages"]]


def counted(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(f"tiermem_memory_{name}_total", labels) or 0.0


async def test_a_first_read_is_passed_to_l2_and_fills_the_window_for_the_next(l1):
    u = user()
    l1.l2.add(u, *range(1, 31))
    misses, hits = counted("passed_down", tier="l1", reason="miss"), counted(
        "answers", tier="l1", op="recent")

    first = await l1.get(u, n=3)
    assert first["tier"] == "l2" and first["seq"] == 30 and seqs(first) == [28, 29, 30]
    assert [(c.op, c.n) for c in l1.l2.calls_for(u)] == [("recent", 10)]  # asked for a window

    second = await l1.get(u, n=10)
    assert second["tier"] == "l1" and second["seq"] == 30 and seqs(second) == list(range(21, 31))
    assert len(l1.l2.calls_for(u)) == 1
    assert counted("passed_down", tier="l1", reason="miss") == misses + 1
    assert counted("answers", tier="l1", op="recent") == hits + 1


async def test_a_user_with_few_messages_is_served_whole_from_l1(l1):
    u = user()
    l1.l2.add(u, 4, 7)
    await l1.get(u, n=1)
    reply = await l1.get(u, n=10)
    assert reply["tier"] == "l1" and seqs(reply) == [4, 7]


async def test_a_change_event_keeps_the_window_fresh_for_read_your_writes(l1):
    u = user()
    l1.l2.add(u, *range(1, 13))
    await l1.get(u, n=5)
    await l1.publish(Changed(op="append", user_id=u, seq=40, prev_seq=12, count=13, message=msg(40)))
    await eventually(lambda: l1.store.window(u).seq == 40)

    reply = await l1.get(u, n=2, min_seq=40)
    assert reply["tier"] == "l1" and reply["seq"] == 40 and seqs(reply) == [12, 40]
    assert len(l1.l2.calls_for(u)) == 1


async def test_a_read_behind_min_seq_is_passed_down_and_refills(l1):
    u = user()
    l1.l2.add(u, 1, 2, 3)
    await l1.get(u, n=3)
    l1.l2.add(u, 5)  # appended, but this sidecar has not seen the event yet
    reply = await l1.get(u, n=3, min_seq=5)
    assert reply["tier"] == "l2" and seqs(reply) == [2, 3, 5]
    assert l1.l2.calls_for(u)[-1].min_seq == 5
    again = await l1.get(u, n=4, min_seq=5)
    assert again["tier"] == "l1" and seqs(again) == [1, 2, 3, 5]


async def test_a_gap_in_the_events_sends_the_next_read_to_l2(l1):
    u = user()
    l1.l2.add(u, *range(1, 11))
    await l1.get(u, n=5)
    l1.l2.add(u, 11, 12)
    await l1.publish(Changed(op="append", user_id=u, seq=12, prev_seq=11, count=12, message=msg(12)))
    await eventually(lambda: l1.store.window(u) is None)

    reply = await l1.get(u, n=5)
    assert reply["tier"] == "l2" and seqs(reply) == [8, 9, 10, 11, 12]
    assert len(l1.l2.calls_for(u)) == 2


async def test_forget_drops_the_window(l1):
    u = user()
    l1.l2.add(u, 1, 2, 3)
    await l1.get(u, n=3)
    l1.l2.users[u] = []
    await l1.publish(Changed(op="forget", user_id=u, seq=9, prev_seq=0, count=0))
    await eventually(lambda: l1.store.window(u) is None)

    reply = await l1.get(u, n=3)
    assert reply["tier"] == "l2" and reply["messages"] == []


TTL_S = 0.3


@pytest.fixture
async def short_ttl_l1(nats_url):
    async for sidecar in start_l1(nats_url, l1_ttl_s=TTL_S):
        yield sidecar


async def test_a_window_past_its_ttl_is_refilled_from_l2(short_ttl_l1):
    l1 = short_ttl_l1
    u = user()
    l1.l2.add(u, 1, 2)
    await l1.get(u, n=2)
    assert (await l1.get(u, n=2))["tier"] == "l1"
    await asyncio.sleep(TTL_S + 0.1)  # scenario: the window's TTL runs out
    l1.l2.add(u, 3)  # an append whose event this sidecar missed
    reply = await l1.get(u, n=3)
    assert reply["tier"] == "l2" and seqs(reply) == [1, 2, 3]
    assert len(l1.l2.calls_for(u)) == 2
    again = await l1.get(u, n=3)
    assert again["tier"] == "l1" and seqs(again) == [1, 2, 3]


async def test_a_forget_event_the_sidecar_missed_is_covered_by_the_ttl(short_ttl_l1):
    """Core NATS lost the forget (the sidecar never heard it): the window serves the
    forgotten messages for at most the TTL, then the refill reads the forgotten L2."""
    l1 = short_ttl_l1
    u = user()
    l1.l2.add(u, 1, 2, 3)
    await l1.get(u, n=3)
    l1.l2.users[u] = []  # forgotten in L2; no event is published
    deadline = asyncio.get_running_loop().time() + TTL_S + 0.05
    while (reply := await l1.get(u, n=3))["tier"] == "l1":
        assert seqs(reply) == [1, 2, 3]
        assert asyncio.get_running_loop().time() < deadline, "served past the TTL"
        await asyncio.sleep(0.02)  # up to the TTL: that deadline is the claim
    assert reply["tier"] == "l2" and reply["messages"] == []


async def test_the_queue_group_subject_and_this_sidecars_subject_both_answer(l1):
    u = user()
    l1.l2.add(u, 1, 2)
    assert (await l1.get(u, n=2, subject=subjects.MEMORY_GET))["tier"] == "l2"
    assert (await l1.get(u, n=2, subject=l1.direct))["tier"] == "l1"


async def test_search_and_more_than_the_window_are_forwarded_as_they_are(l1):
    u = user()
    l1.l2.add(u, *range(1, 31))
    found = await l1.get(u, op="search", query="house", k=2)
    assert found["tier"] == "l3" and [m["score"] for m in found["messages"]] == [0.5, 0.5]
    many = await l1.get(u, n=25)
    assert many["tier"] == "l2" and seqs(many) == list(range(6, 31))
    assert [(c.op, c.n) for c in l1.l2.calls_for(u)] == [("search", 10), ("recent", 25)]
    assert l1.store.window(u) is None  # neither fills a window
    assert (await l1.get(u, n=1))["tier"] == "l2"


async def test_concurrent_misses_for_one_user_share_one_l2_read(l1):
    u = user()
    l1.l2.add(u, *range(1, 21))
    l1.l2.delay = 0.1
    replies = await asyncio.gather(*(l1.get(u, n=n) for n in (1, 3, 5, 10, 2)))
    assert [len(r["messages"]) for r in replies] == [1, 3, 5, 10, 2]
    assert all(r["tier"] == "l2" and r["seq"] == 20 for r in replies)
    assert len(l1.l2.calls_for(u)) == 1


async def test_an_l2_error_reaches_the_caller_with_its_code_and_fills_nothing(l1):
    u = user()
    l1.l2.error = (503, "no tier can answer")
    code, body = await call(l1.nc, l1.direct, {"user_id": u, "n": 3})
    assert code == 503 and body["error"]["code"] == 503
    assert l1.store.window(u) is None
    l1.l2.error = None
    l1.l2.add(u, 1)
    assert (await l1.get(u, n=1))["tier"] == "l2"


@pytest.mark.parametrize("body", [
    b'{"user_id": "lead-1", "n": ',  # malformed JSON
    b'{"user_id": "lead-1", "n": 0}',
    b'{"user_id": "lead-1", "n": 1001}',
    b'{"n": 5}',  # no user_id
    b'{"user_id": "lead-1", "op": "summarize"}',
    b'{"user_id": "lead-\xff"}',  # not UTF-8
    b'{"user_id": "lead 1"}',  # not a valid id
    b'{"user_id": "lead-1", "op": "search"}',  # search without a query
    b'[]',
], ids=["malformed", "n=0", "n=1001", "no-user", "unknown-op", "bad-utf8", "bad-id",
        "search-no-query", "not-an-object"])
async def test_bad_input_gets_400_and_the_sidecar_keeps_answering(l1, body):
    msg = await l1.nc.request(l1.direct, body, timeout=5)
    assert msg.headers[ERROR_CODE_HEADER] == "400"
    assert msg.headers[ERROR_HEADER]
    error = msgspec.json.decode(msg.data)["error"]
    assert error["code"] == 400 and error["message"]
    assert not l1.l2.calls

    u = user()
    l1.l2.add(u, 1)
    assert (await l1.get(u, n=1))["tier"] == "l2"


async def test_the_lru_bound_is_respected(small_l1):
    l1 = small_l1
    users = [user() for _ in range(5)]
    for i, u in enumerate(users):
        l1.l2.add(u, i + 1)
        await l1.get(u, n=1)
    assert len(l1.store) == 3
    for u in reversed(users[2:]):  # the three most recent are still here
        assert (await l1.get(u, n=1))["tier"] == "l1"
    for u in users[:2]:
        assert (await l1.get(u, n=1))["tier"] == "l2"
    assert len(l1.store) == 3


async def test_a_reconnect_drops_every_window_since_events_may_be_lost(tmp_path):
    server = start_nats(tmp_path / "nats", die_with_parent=True)
    try:
        async for l1 in start_l1(server.url):
            u = user()
            l1.l2.add(u, 1, 2)
            await l1.get(u, n=2)
            assert (await l1.get(u, n=2))["tier"] == "l1"

            server.stop()  # a forget published now would never reach the sidecar
            server = start_nats(tmp_path / "nats", port=server.port, die_with_parent=True)

            async def answered():  # once both the client and the sidecar reconnected
                try:
                    msg = await l1.nc.request(l1.direct, encode({"user_id": u, "n": 2}), timeout=0.5)
                except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                    return None
                return msgspec.json.decode(msg.data)

            reply = await eventually(answered, every=0.05, what="an answer after the reconnect")
            assert reply["tier"] == "l2"
            assert len(l1.l2.calls_for(u)) == 2
    finally:
        server.stop()


async def test_a_hit_is_in_the_callers_trace_and_skips_the_span_when_not_sampled(l1, spans):
    u = user()
    l1.l2.add(u, 1, 2)
    body = encode({"user_id": u, "n": 2})
    process = f"{l1.direct} process"

    def served(parent=None) -> list:
        return [s for s in spans.get_finished_spans() if s.name == process
                and (parent is None or (s.parent and s.parent.span_id == parent))]

    await l1.get(u, n=2)  # a miss: the full path, with its span
    await eventually(lambda: served())
    with telemetry.tracer.start_as_current_span("caller") as caller:
        msg = await l1.nc.request(l1.direct, body, headers=telemetry.inject(), timeout=5)
    assert b'"tier":"l1"' in msg.data
    await eventually(lambda: served(caller.get_span_context().span_id))

    spans.clear()
    unsampled = {"traceparent": f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-00"}
    msg = await l1.nc.request(l1.direct, body, headers=unsampled, timeout=5)
    assert b'"tier":"l1"' in msg.data
    await never_within(0.2, served, what="a span of the unsampled hit")


# --- forged events -------------------------------------------------------------


async def test_a_forged_event_beyond_the_log_is_ignored_and_the_true_window_still_answers(l1):
    u = user()
    l1.l2.add(u, 1, 2, 3)
    await l1.get(u, n=3)
    refused = REGISTRY.get_sample_value(
        "tiermem_rejected_messages_total", {"service": "memory-l1", "reason": "seq_beyond_log"}) or 0
    last = await stream.last_seq(l1.nc.jetstream())
    fake = Message(seq=last + 1000, msg_id="forged", role="user", bot_id="bot", text="wire money",
                   ts="2026-11-26T07:00:00.000Z")
    await l1.forge(Changed(op="append", user_id=u, seq=last + 1000, prev_seq=3, count=4, message=fake))
    await eventually(lambda: (REGISTRY.get_sample_value(
        "tiermem_rejected_messages_total",
        {"service": "memory-l1", "reason": "seq_beyond_log"}) or 0) == refused + 1)

    reply = await l1.get(u, n=10)
    assert reply["tier"] == "l1" and reply["seq"] == 3 and seqs(reply) == [1, 2, 3]
    # ... and the next real event still applies: the forged seq did not stick
    real = last + 1
    l1.l2.add(u, real)
    await l1.publish(Changed(op="append", user_id=u, seq=real, prev_seq=3, count=4, message=msg(real)))
    reply = await l1.get(u, n=10, min_seq=real)
    assert reply["tier"] == "l1" and seqs(reply) == [1, 2, 3, real]
    assert len(l1.l2.calls_for(u)) == 1


async def test_a_real_event_is_applied_in_time_for_the_read_that_follows_it(l1):
    """The event is checked against the stream (its seq is past what the sidecar last
    read), and the read with its min_seq waits for that check instead of going to L2."""
    u = user()
    first = await stream.last_seq(l1.nc.jetstream()) + 1
    l1.l2.add(u, first)
    await l1.publish(Changed(op="append", user_id=u, seq=first, prev_seq=0, count=1,
                             message=msg(first)))  # a brand-new user: the event makes the window
    reply = await l1.get(u, n=1, min_seq=first)
    assert reply["tier"] == "l1" and seqs(reply) == [first]
    for _ in range(5):
        seq = await stream.last_seq(l1.nc.jetstream()) + 1
        prev = l1.store.window(u).seq
        l1.l2.add(u, seq)
        await l1.publish(Changed(op="append", user_id=u, seq=seq, prev_seq=prev,
                                 count=len(l1.l2.users[u]), message=msg(seq)))
        reply = await l1.get(u, n=1, min_seq=seq)
        assert reply["tier"] == "l1" and seqs(reply) == [seq]
    assert not l1.l2.calls_for(u)


async def test_a_read_waiting_for_its_users_event_is_woken_by_the_check_already_in_flight(l1, monkeypatch):
    """The read waits for its user's held event, not for a later check: when the check in
    flight settles the event, no other check runs, and waiting for one cost every such read
    the whole wait (the demo's L1 p95 was 98 ms, the wait's 100 ms). With a 30 s wait, any
    read that is not woken by the check fails the time bound below."""
    monkeypatch.setattr(l1_service, "CHECK_WAIT_S", 30.0)
    u = user()
    first = await stream.last_seq(l1.nc.jetstream()) + 1
    l1.l2.add(u, first)
    await l1.publish(Changed(op="append", user_id=u, seq=first, prev_seq=0, count=1, message=msg(first)))
    assert (await l1.get(u, n=1, min_seq=first))["tier"] == "l1"
    started = asyncio.get_running_loop().time()
    for _ in range(50):
        seq = await stream.last_seq(l1.nc.jetstream()) + 1
        prev = l1.store.window(u).seq
        l1.l2.add(u, seq)
        await l1.publish(Changed(op="append", user_id=u, seq=seq, prev_seq=prev,
                                 count=len(l1.l2.users[u]), message=msg(seq)))
        reply = await l1.get(u, n=1, min_seq=seq)
        assert reply["tier"] == "l1" and seqs(reply) == [seq]
    assert asyncio.get_running_loop().time() - started < 20


# --- replies too big for NATS ----------------------------------------------------

NEAR_MAX_TEXT = 65_000  # MAX_TEXT_BYTES is 65,536: the biggest messages an append takes


def big(seq: int) -> Message:
    return Message(seq=seq, msg_id=f"m{seq}", role="user", bot_id="bot",
                   text=f"{seq} " + "x" * NEAR_MAX_TEXT, ts="2026-11-26T07:00:00.000Z")


@pytest.fixture
async def wide_l1(nats_url):
    async for sidecar in start_l1(nats_url, l1_window=20):
        yield sidecar


async def test_an_l1_hit_too_big_for_nats_is_refused_with_413_and_how_many_fit(wide_l1):
    l1 = wide_l1
    u = user()
    first = await stream.last_seq(l1.nc.jetstream()) + 1
    for i in range(20):  # a brand-new user's events build a complete window of 20
        seq = first + i
        await l1.publish(Changed(op="append", user_id=u, seq=seq, prev_seq=seq - 1 if i else 0,
                                 count=i + 1, message=big(seq)))
    await eventually(lambda: l1.store.window(u) is not None and len(l1.store.window(u).messages) == 20)

    code, body = await call(l1.nc, l1.direct, {"user_id": u, "n": 20})
    assert code == 413 and body["error"]["code"] == 413
    assert "exceeds max_payload 1048576; ask for fewer messages (n<=16)" in body["error"]["message"]
    reply = await l1.get(u, n=16)
    assert reply["tier"] == "l1" and seqs(reply) == list(range(first + 4, first + 20))
    assert not l1.l2.calls_for(u)


async def test_a_fill_too_big_to_send_falls_back_to_what_the_caller_asked(wide_l1):
    l1 = wide_l1
    u = user()
    l1.l2.users[u] = [big(s) for s in range(1, 21)]  # a window of 20 is 1.3 MB

    reply = await l1.get(u, n=3)
    assert reply["tier"] == "l2" and seqs(reply) == [18, 19, 20]
    assert [c.n for c in l1.l2.calls_for(u)] == [20, 3]
    code, body = await call(l1.nc, l1.direct, {"user_id": u, "n": 20})
    assert code == 413 and "(n<=16)" in body["error"]["message"]
    assert l1.store.window(u) is None


# --- a read never overtakes an event that arrived before it -----------------------


async def test_a_read_is_answered_only_after_the_events_received_before_it(nats_url, monkeypatch):
    """nats-py runs the events subscription's callbacks in a task of its own, so a read
    that arrived after a forget (both in the socket together, e.g. after a SIGSTOP) could
    be answered from the window before the forget is applied. Here the forget sits in the
    events queue (received, not yet handled) when the read comes in."""
    made: list[l1_service.Sidecar] = []

    class Recorded(l1_service.Sidecar):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(l1_service, "Sidecar", Recorded)
    async for l1 in start_l1(nats_url):
        u = user()
        l1.l2.add(u, 1, 2, 3)
        await l1.get(u, n=3)
        assert (await l1.get(u, n=3))["tier"] == "l1"
        sidecar = made[0]
        queue = type("Queued", (), {"pending_msgs": 1, "pending_bytes": 0})()
        sidecar._events = queue  # one event received, its callback not run yet
        l1.l2.users[u] = []
        read = asyncio.create_task(l1.get(u, n=3))
        # the read is in: it waits for the queued event (at most CHECK_WAIT_S, then passes down)
        await eventually(lambda: sidecar._events_waiters, what="the read waiting for the event")
        assert not read.done()
        forget = Changed(op="forget", user_id=u, seq=0, prev_seq=0, count=0)
        queue.pending_msgs = 0  # taken off the queue, and handled
        await sidecar.on_changed(type("Msg", (), {"subject": subjects.changed_subject(u),
                                                 "data": encode(forget)})())
        reply = await read
        assert reply["tier"] == "l2" and reply["messages"] == []


async def test_a_read_waits_for_its_users_held_forget_even_with_a_window_to_answer(l1, monkeypatch):
    """A forget whose seq is past the log position the sidecar knows is held until a check
    of the stream; meanwhile the user's window must not answer."""
    u = user()
    l1.l2.add(u, 1, 2, 3)
    await l1.get(u, n=3)
    assert (await l1.get(u, n=3))["tier"] == "l1"
    last_seq = l1_service.stream.last_seq

    async def slow_last_seq(js):  # the check takes a while: the read arrives during it
        await asyncio.sleep(0.05)  # scenario: how long the stream check takes
        return await last_seq(js)

    monkeypatch.setattr(l1_service.stream, "last_seq", slow_last_seq)
    js = l1.nc.jetstream()
    beyond = await stream.last_seq(js) + 3
    await log_reaches(js, beyond)  # in the log, but past what the sidecar has seen of it
    l1.l2.users[u] = []
    await l1.publish(Changed(op="forget", user_id=u, seq=beyond, prev_seq=0, count=0))
    reply = await l1.get(u, n=3)
    assert reply["tier"] == "l2" and reply["messages"] == []
