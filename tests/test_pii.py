"""No user id or text in logs and spans: a keyed hash (ref) names the user instead.

The services run in-process against the real servers, with stdout captured
(every JSON log line) and spans kept in memory; a recognisable user (a phone
number in an email-like id, with dots, so its subject token differs from it)
and recognisable words are sent through every public operation. Neither may
appear anywhere; the ref must, so one user's lines stay correlatable.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import subprocess
import sys

import asyncpg
import msgspec
import pytest

from services.freshness_auditor.service import build as build_auditor
from services.l2_gateway.service import build as build_l2
from services.l3_semantic_indexer.service import build as build_l3
from services.llm_broker.service import build as build_broker
from services.memory_l1.service import build as build_l1
from shared import pii, subjects, telemetry
from shared.ids import to_token
from tests.conftest import REPO
from tests.helpers import client, eventually, ok, running, stand_in_for_llm_forget

KEY = "test-pii-key-0123456789abcdef"
USER = "lead.4155550123@pii-test.io"
PHONE = "4155550123"
SECRET = "zanzibar"  # in every text, query and prompt
FORBIDDEN = (USER, to_token(USER), PHONE, SECRET)


def ref(user_id: str, key: str = KEY) -> str:
    """The ref as an operator computes it from the key with any HMAC tool."""
    return hmac.new(key.encode(), user_id.encode(), hashlib.sha256).hexdigest()[:16]


@pytest.fixture
def configured():
    """`pii.configure` for a unit test; the process's defaults again afterwards."""
    yield pii.configure
    pii.configure("", False)


# --- the processor and the scrubber (no I/O) ----------------------------------

def test_log_events_name_users_by_ref_and_lose_their_texts(configured):
    configured(KEY)
    event = pii.redact(None, "info", {
        "event": "x", "user_id": USER, "text": f"my {SECRET} budget", "query": SECRET,
        "messages": 3, "subject": subjects.changed_subject(USER),
        "error": f"PublishError('no stream listens on {subjects.log_subject(USER)}')",
        "exception": f"Traceback ...\nRuntimeError: {subjects.forgotten_subject(USER)}"})
    assert event == {
        "event": "x", "user_id": ref(USER), "messages": 3,  # a count under a text key stays
        "subject": f"memory.changed.{ref(USER)}",
        "error": f"PublishError('no stream listens on memory.log.{ref(USER)}')",
        "exception": f"Traceback ...\nRuntimeError: memory.forgotten.{ref(USER)}"}


def test_subjects_without_a_user_are_left_alone(configured):
    configured(KEY)
    for text in (subjects.LOG_ALL, subjects.CHANGED_ALL, subjects.MEMORY_L2_GET, "memory.get.l1-a"):
        assert pii.scrub(text) == text


def test_refs_depend_on_the_key(configured):
    configured(KEY)
    first = pii.user_ref(USER)
    configured("another-key-0123456789")
    assert first == ref(USER) != pii.user_ref(USER) == ref(USER, "another-key-0123456789")


def test_raw_ids_show_the_id_but_never_the_text(configured):
    configured(KEY, raw_ids=True)
    event = pii.redact(None, "info", {"event": "x", "user_id": USER, "text": SECRET,
                                      "subject": subjects.changed_subject(USER)})
    assert event == {"event": "x", "user_id": USER, "subject": subjects.changed_subject(USER)}


def test_a_short_key_is_refused_at_start_up():
    with pytest.raises(SystemExit, match="PII_HASH_KEY"):
        pii.configure("short")


def test_an_operator_finds_a_users_ref_from_the_command_line():
    out = subprocess.run([sys.executable, "-m", "shared.pii", USER], cwd=REPO, check=True,
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PII_HASH_KEY": KEY})
    assert out.stdout.strip() == ref(USER)


def test_an_exception_a_span_records_carries_refs_not_user_subjects(configured, spans):
    configured(KEY)
    with pytest.raises(RuntimeError):
        with telemetry.tracer.start_as_current_span("failing"):
            raise RuntimeError(f"no stream listens on {subjects.log_subject(USER)}")
    (span,) = [s for s in spans.get_finished_spans() if s.name == "failing"]
    (event,) = span.events
    assert event.name == "exception"
    assert f"memory.log.{ref(USER)}" in event.attributes["exception.message"]
    assert f"memory.log.{ref(USER)}" in event.attributes["exception.stacktrace"]
    assert span.status.description == f"RuntimeError: no stream listens on memory.log.{ref(USER)}"
    assert not leaks(span_texts(span))


# --- the services ------------------------------------------------------------

def log_lines(captured: str) -> list[str]:
    lines = [line for line in captured.splitlines() if line.startswith("{")]
    for line in lines:
        msgspec.json.decode(line)  # every line is JSON: nothing hid in a non-JSON one
    return lines


def span_texts(span) -> list[str]:
    """Everything a span exports that could carry a user id or a text."""
    texts = [span.name, span.status.description or ""]
    texts += [str(v) for v in (span.attributes or {}).values()]
    for event in span.events:
        texts += [event.name, *map(str, (event.attributes or {}).values())]
    for link in span.links:
        texts += [str(v) for v in (link.attributes or {}).values()]
    return texts


def leaks(texts: list[str], forbidden=FORBIDDEN) -> list[str]:
    return [t for t in texts if any(f in t for f in forbidden)]


def complete(text: str) -> dict:
    return {"task": "intent", "user_id": USER, "model": "claude-haiku-4-5",
            "system": "Classify the lead's intent. Answer with one label.", "max_tokens": 50,
            "temperature": 0, "messages": [{"role": "user", "content": text}],
            "cache": {"volatility": "lead_intent", "mode": "exact", "scope": "user"}}


async def append(nc, text: str, msg_id: str) -> int:
    return (await ok(nc, subjects.MEMORY_APPEND, {"user_id": USER, "bot_id": "b", "role": "user",
                                                  "text": text, "msg_id": msg_id}))["seq"]


async def test_no_user_id_or_text_in_any_log_line_or_span(clean_state, simulator, spans, capsys):
    env = {**clean_state, "ANTHROPIC_BASE_URL": simulator}
    settings = {"pii_hash_key": KEY, "served_flush_s": 0.02, "audit_sample_rate": 1.0,
                "trace_db_spans": True}
    async with running("l2-gateway", build_l2, env, **settings), \
            running("l3-semantic-indexer", build_l3, env, **settings), \
            running("memory-l1", build_l1, env, **settings), \
            running("llm-broker", build_broker, env, **settings), \
            running("freshness-auditor", build_auditor, env, **settings):
        async with client(env["NATS_URL"]) as nc:
            seq = 0
            for i in range(3):
                seq = await append(nc, f"my {SECRET} budget is {i}00k", f"m{i}")
            await ok(nc, subjects.MEMORY_GET, {"user_id": USER, "n": 5, "min_seq": seq})
            await ok(nc, subjects.MEMORY_GET, {"user_id": USER, "n": 5})  # an L1 hit
            await ok(nc, subjects.MEMORY_GET, {"user_id": USER, "n": 500, "min_seq": seq})
            await ok(nc, subjects.MEMORY_GET, {"user_id": USER, "op": "search",
                                               "query": f"{SECRET} budget", "k": 2})
            first = await ok(nc, subjects.LLM_COMPLETE, complete(f"is the {SECRET} house free?"))
            again = await ok(nc, subjects.LLM_COMPLETE, complete(f"is the {SECRET} house free?"))
            assert (first["cache"]["status"], again["cache"]["status"]) == ("miss", "hit")
            await append(nc, f"and the {SECRET} flat?", "m3")  # drops the broker's entry
            await ok(nc, subjects.MEMORY_FORGET, {"user_id": USER})
            await eventually(lambda: any(s.name == "audit memory" for s in spans.get_finished_spans()),
                             what="an audit")
    lines = log_lines(capsys.readouterr().out)
    assert not leaks(lines)
    mine = [msgspec.json.decode(line) for line in lines if ref(USER) in line]
    assert {"forget_completed", "llm_cache_forgot_user"} <= {
        e["event"] for e in mine}
    finished = spans.get_finished_spans()
    assert not leaks([t for s in finished for t in span_texts(s)])
    assert {s.attributes["tiermem.user_id"] for s in finished if s.name == "audit memory"} \
        == {ref(USER)}
    # the Redis and Postgres client spans were among those checked
    assert {"redis", "postgresql"} <= {(s.attributes or {}).get("db.system") for s in finished
                                       if s.kind.name == "CLIENT"}


async def test_a_failed_database_call_names_the_error_type_not_its_message(clean_state, spans):
    """Postgres quotes the offending value in its message; the span keeps the type only."""
    telemetry.configure_tracing("test", db_spans=True)
    pg = await asyncpg.connect(clean_state["DATABASE_URL"])
    try:
        with pytest.raises(asyncpg.DataError, match=PHONE):
            with telemetry.tracer.start_as_current_span("kept"):
                await pg.fetchval("SELECT $1::text::int", USER)
    finally:
        await pg.close()
    (failed,) = [s for s in spans.get_finished_spans()
                 if s.kind.name == "CLIENT" and s.attributes.get("db.system") == "postgresql"]
    assert failed.status.status_code.name == "ERROR"
    assert failed.attributes["error.type"] == "InvalidTextRepresentationError"
    assert not leaks(span_texts(failed))


async def test_a_malformed_change_events_log_line_names_its_user_by_ref(clean_state, capsys):
    async with running("memory-l1", build_l1, clean_state, pii_hash_key=KEY):
        async with client(clean_state["NATS_URL"]) as nc:
            await nc.publish(subjects.changed_subject(USER), b"not json")
            await nc.flush()
            out = []

            def logged():
                out.append(capsys.readouterr().out)
                return '"bad_change_event"' in "".join(out)

            await eventually(logged, what="the bad event logged")
    lines = log_lines("".join(out) + capsys.readouterr().out)
    assert not leaks(lines)
    bad = [msgspec.json.decode(line) for line in lines if '"bad_change_event"' in line]
    assert [e["subject"] for e in bad] == [f"memory.changed.{ref(USER)}"]


async def test_raw_ids_for_local_debugging_show_the_id_but_never_the_text(clean_state, capsys):
    async with running("l2-gateway", build_l2, clean_state, pii_raw_ids=True), \
            running("l3-semantic-indexer", build_l3, clean_state, pii_raw_ids=True):
        async with client(clean_state["NATS_URL"]) as nc:
            await stand_in_for_llm_forget(nc)  # no llm-broker here: a forget waits for its answer
            await append(nc, f"my {SECRET} budget", "m0")
            await ok(nc, subjects.MEMORY_FORGET, {"user_id": USER})
    lines = log_lines(capsys.readouterr().out)
    assert not leaks(lines, forbidden=(SECRET,))
    forgotten = [msgspec.json.decode(line) for line in lines if '"forget_completed"' in line]
    assert [e["user_id"] for e in forgotten] == [USER]
