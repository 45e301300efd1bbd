"""The llm-broker's request rules (services/llm_broker/policy.py, shared/contract.py), pure:
scopes, the configured bounds, and metric label values from a fixed set."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.llm_broker.policy import (
    Entry, _digest, cacheable, check_request, exact_key, partition_key, stale, uncacheable,
    upstream_key_id,
)
from shared import metrics
from shared.contract import CacheOptions, ChatMessage, CompleteRequest, Usage, check_complete
from shared.errors import BadRequest, PayloadTooLarge
from shared.llm_config import Config

CONFIG = Config.load()
MAX_PROMPT = 10_000


def request(text: str = "How is the market in Oak Park?", *, user: str = "lead-1",
            task: str = "market_context", scope: str = "global", history: list | None = None,
            **extra) -> CompleteRequest:
    body = {"task": task, "user_id": user, "model": "claude-haiku-4-5",
            "system": "Summarise the local market.", "max_tokens": 150,
            "messages": [*(history or []), {"role": "user", "content": text}],
            "cache": {"volatility": "market_context", "mode": "semantic", "scope": scope}, **extra}
    return msgspec.convert(body, CompleteRequest)


HISTORY = [{"role": "user", "content": "I'm Ann, my budget is $400k and I'm divorcing."},
           {"role": "assistant", "content": "Thanks Ann, noted."}]


# --- scopes -------------------------------------------------------------------


def test_global_scope_is_refused_for_a_task_not_listed_as_global():
    with pytest.raises(BadRequest) as err:
        check_request(CONFIG, request(task="intent"))
    message = err.value.message
    assert "'intent'" in message and "global_tasks" in message and "market_context" in message
    assert "scope 'user'" in message  # says how to go on


def test_global_scope_for_a_listed_task_is_accepted():
    assert "market_context" in CONFIG.global_tasks
    assert check_request(CONFIG, request()) == CONFIG.volatility["market_context"]


def test_global_request_carrying_a_conversation_is_refused():
    with pytest.raises(BadRequest, match="one message.*conversation"):
        check_request(CONFIG, request(history=HISTORY))
    check_request(CONFIG, request(history=HISTORY, scope="user"))  # the user's own cache may


def test_no_task_may_be_global_unless_the_config_says_so():
    bare = msgspec.structs.replace(CONFIG, global_tasks=[])
    with pytest.raises(BadRequest, match=r"now: none"):
        check_request(bare, request())


@given(a=st.from_regex(r"[a-z0-9-]{1,20}", fullmatch=True),
       b=st.from_regex(r"[a-z0-9-]{1,20}", fullmatch=True),
       question=st.text(min_size=1, max_size=40).filter(str.strip))
def test_global_keys_depend_on_the_shared_question_never_on_the_user(a, b, question):
    first, second = request(question, user=a), request(question, user=b)
    check_request(CONFIG, first)
    assert partition_key(first) == partition_key(second)
    assert exact_key(partition_key(first), first) == exact_key(partition_key(second), second)
    if a != b:  # the same question in scope user: one partition per user
        assert partition_key(request(question, user=a, scope="user")) != \
            partition_key(request(question, user=b, scope="user"))


def test_scope_user_still_requires_a_user_id():
    body = msgspec.to_builtins(request(scope="user"))
    del body["user_id"]
    with pytest.raises(msgspec.ValidationError, match="user_id"):
        msgspec.convert(body, CompleteRequest)


# --- bounds -------------------------------------------------------------------


def test_a_model_outside_the_allow_list_is_refused_naming_the_allowed_ones():
    with pytest.raises(BadRequest) as err:
        check_request(CONFIG, request(model="claude-mythical-9"))
    assert "'claude-mythical-9'" in err.value.message
    assert all(m in err.value.message for m in CONFIG.models)


def test_max_tokens_over_the_cap_is_refused():
    check_request(CONFIG, request(max_tokens=CONFIG.max_tokens))
    with pytest.raises(BadRequest, match=f"limit is {CONFIG.max_tokens}"):
        check_request(CONFIG, request(max_tokens=CONFIG.max_tokens + 1))


def test_more_messages_than_the_cap_are_too_large():
    turn = {"role": "user", "content": "ok"}  # the count is checked before the turns' order
    check_request(CONFIG, request(history=[turn] * (CONFIG.max_messages - 1), scope="user"))
    with pytest.raises(PayloadTooLarge, match=f"limit is {CONFIG.max_messages}"):
        check_request(CONFIG, request(history=[turn] * CONFIG.max_messages, scope="user"))


@pytest.mark.parametrize("extra", [
    {"tools": [{"name": "lookup", "description": "d" * MAX_PROMPT,
                "input_schema": {"type": "object"}}]},
    {"stop_sequences": ["s" * 2000] * 5},
])
def test_tools_and_stop_sequences_count_in_the_prompt_limit(extra):
    req = request(**extra)
    with pytest.raises(PayloadTooLarge, match="tools and stop_sequences"):
        check_complete(req, MAX_PROMPT)
    check_complete(req, MAX_PROMPT * 2)


def test_lone_surrogates_in_tools_or_stop_sequences_are_bad_requests():
    for extra in ({"tools": [{"name": "\ud800"}]}, {"stop_sequences": ["\udfff"]}):
        with pytest.raises(BadRequest, match="lone surrogate"):
            check_complete(request(**extra), MAX_PROMPT)


def test_a_config_without_a_model_allow_list_does_not_load(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[volatility.static]\nttl_s = 1\n[prices.default]\n"
                    "input = 1\noutput = 1\ncache_write = 1\ncache_read = 1\n")
    with pytest.raises(msgspec.ValidationError, match="models"):
        Config.load(path)


# --- metric labels --------------------------------------------------------------


def test_bounded_keeps_known_values_and_calls_the_rest_other():
    assert metrics.bounded("l2", metrics.TIERS) == "l2"
    assert metrics.bounded("l9", metrics.TIERS) == metrics.OTHER
    assert metrics.bounded("", ()) == metrics.OTHER


def test_task_bot_and_volatility_labels_come_from_the_config():
    assert {CONFIG.task_label(t) for t in (*CONFIG.label_tasks, *CONFIG.global_tasks,
                                           *CONFIG.tasks)} == {*CONFIG.label_tasks,
                                                               *CONFIG.global_tasks, *CONFIG.tasks}
    assert CONFIG.task_label("exfiltrate-0001") == "other"
    assert CONFIG.bot_label(None) == "" and CONFIG.bot_label(CONFIG.bots[0]) == CONFIG.bots[0]
    assert CONFIG.bot_label("bot-from-nowhere") == "other"
    assert CONFIG.volatility_label("lead_intent") == "lead_intent"
    assert CONFIG.volatility_label("weather") == "other"


# --- what may be stored and served ---------------------------------------------


@pytest.mark.parametrize("stop_reason,stored", [
    ("end_turn", True), ("stop_sequence", True),
    ("max_tokens", False), ("tool_use", False), ("pause_turn", False), ("refusal", False),
    (None, False),
])
def test_only_answers_the_model_finished_are_cacheable(stop_reason, stored):
    assert cacheable(stop_reason) is stored


def entry(created_at: float = 100.0, user_seq: int = 7) -> Entry:
    return Entry(id="k", partition="p", user_id="lead-1", task="intent", model="m",
                 volatility="lead_intent", query="q", text="t", stop_reason="end_turn",
                 usage=Usage(input_tokens=1, output_tokens=1), cost_usd=0.0,
                 created_at=created_at, expires_at=created_at + 300, user_seq=user_seq)


@pytest.mark.parametrize("user_seq,distrust_before,reason", [
    (7, 0.0, None),  # the user has said nothing since
    (6, 0.0, None),  # an older record (a replica behind, a replay): nothing newer is known
    (8, 0.0, "user_spoke"),  # the event that should have dropped it was lost
    (None, 0.0, "user_seq_lost"),  # built knowing seq 7, and now Redis has no record
    (7, 100.5, "events_lost"),  # created before this broker found events lost
    (7, 100.0, None),  # ... but not at the same instant
])
def test_an_entry_is_stale_when_the_user_spoke_after_it_or_events_were_lost(
        user_seq, distrust_before, reason):
    assert stale(entry(), user_seq, distrust_before) == reason


def test_an_entry_built_before_the_user_ever_spoke_is_fresh_until_they_do():
    assert stale(entry(user_seq=0), None, 0.0) is None
    assert stale(entry(user_seq=0), 1, 0.0) == "user_spoke"


def test_entries_stored_before_user_seq_existed_decode_as_built_from_seq_0():
    old = msgspec.msgpack.encode({k: v for k, v in msgspec.structs.asdict(entry()).items()
                                  if k != "user_seq"})
    assert msgspec.msgpack.decode(old, type=Entry).user_seq == 0


# --- the full Messages shape (the HTTP drop-in's) -------------------------------


def _old_partition_key(req: CompleteRequest) -> str:
    """The partition key as it was before the full request shape: entries stored then must
    still hit, so a request of the original shape keys exactly so."""
    earlier = [(m.role, m.plain()) for m in req.messages[:-1]]
    return _digest({
        "model": req.model, "system": req.system_text(), "tools": req.tools,
        "temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k,
        "max_tokens": req.max_tokens, "stop": req.stop_sequences, "task": req.task,
        "volatility": req.cache.volatility,
        "scope": req.user_id if req.cache.scope == "user" else "*global*",
        "earlier": _digest(earlier)})


def test_a_request_of_the_original_shape_keys_as_it_always_did():
    for req in (request(), request(scope="user", history=HISTORY),
                request(system=[{"type": "text", "text": "Summarise"}], scope="user",
                        tools=[{"name": "t", "input_schema": {}}], stop_sequences=["X"])):
        assert partition_key(req) == _old_partition_key(req)
        old_exact = f"{_old_partition_key(req)}:{_digest(req.messages[-1].plain())}"
        assert exact_key(partition_key(req), req) == old_exact


def _blocks(*blocks, **extra) -> CompleteRequest:
    return msgspec.convert({"task": "messages", "model": "claude-haiku-4-5", "max_tokens": 100,
                            "messages": [{"role": "user", "content": list(blocks)}],
                            "cache": {"mode": "exact", "scope": "global"}, **extra},
                           CompleteRequest)


def _key(req: CompleteRequest) -> str:
    return exact_key(partition_key(req), req)


TEXT = {"type": "text", "text": "What is in this image?"}


def _image(data: str, kind: str = "base64") -> dict:
    source = {"type": kind, "media_type": "image/png", "data": data} if kind == "base64" else \
        {"type": "url", "url": data}
    return {"type": "image", "source": source}


def test_every_block_and_field_that_changes_the_answer_is_in_the_exact_key():
    base = _blocks(_image("AAAA"), TEXT)
    variants = [
        _blocks(_image("AAAB"), TEXT),  # other image bytes
        _blocks(TEXT),  # no image
        _blocks(_image("AAAA"), TEXT, tool_choice={"type": "any"},
                tools=[{"name": "t", "input_schema": {}}]),
        _blocks(_image("AAAA"), TEXT, thinking={"type": "enabled", "budget_tokens": 1024}),
        _blocks(_image("AAAA"), TEXT, betas=["files-api-2025-04-14"]),
        _blocks(_image("AAAA"), TEXT, anthropic_version="2024-01-01"),
        _blocks(_image("AAAA"), TEXT, cache={"mode": "exact", "scope": "global",
                                             "namespace": "tenant-b"}),
        _blocks(_image("AAAA"), TEXT, system=[{"type": "text", "text": "Be brief."}]),
    ]
    keys = {_key(base), *map(_key, variants)}
    assert len(keys) == len(variants) + 1
    # what changes only billing or bookkeeping does not split it
    marked = {**TEXT, "cache_control": {"type": "ephemeral"}}
    assert _key(_blocks(_image("AAAA"), marked)) == _key(base)
    assert _key(_blocks(_image("AAAA"), TEXT, metadata={"user_id": "lead-1"})) == _key(base)


def test_tool_calls_and_results_are_keyed_whole():
    call = {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}}

    def turn(result: str) -> CompleteRequest:
        return msgspec.convert({
            "task": "messages", "model": "claude-haiku-4-5", "max_tokens": 100,
            "tools": [{"name": "weather", "input_schema": {}}],
            "messages": [{"role": "user", "content": "Weather in Paris?"},
                         {"role": "assistant", "content": [call]},
                         {"role": "user", "content": [{"type": "tool_result",
                                                       "tool_use_id": "toolu_1",
                                                       "content": result}]}],
            "cache": {"mode": "exact", "scope": "global"}}, CompleteRequest)

    sunny, rainy = turn("Sunny"), turn("Rain")
    check_request(CONFIG, sunny)  # global with turns: the key covers them (request_tasks)
    check_complete(sunny, MAX_PROMPT)  # a tool_result turn carries no text, and that is fine
    assert _key(sunny) != _key(rainy)
    assert not sunny.plain_text()  # no semantic matching for it


def test_what_the_cache_cannot_key_is_named_and_the_rest_is_not():
    assert uncacheable(_blocks(_image("AAAA"), TEXT)) is None
    assert uncacheable(_blocks(_image("https://x.test/a.png", "url"), TEXT)) == "url_source"
    assert uncacheable(_blocks(TEXT, extra={"service_tier": "auto"})) == "unknown_field"
    assert uncacheable(_blocks(TEXT, tools=[{"type": "web_search_20250305",
                                             "name": "web_search"}])) == "server_tool"
    assert uncacheable(_blocks({"type": "container_upload", "file_id": "f"})) == "unknown_block"
    nested = {"type": "tool_result", "tool_use_id": "t",
              "content": [_image("https://x.test/b.png", "url")]}
    assert uncacheable(_blocks(nested)) == "url_source"


def test_tool_use_is_a_complete_answer_only_when_the_tools_are_keyed():
    assert not cacheable("tool_use") and cacheable("tool_use", with_tools=True)
    assert not cacheable("max_tokens", with_tools=True)


def test_user_id_may_be_left_out_only_in_scope_global_of_a_class_that_no_message_invalidates():
    body = {"task": "market_context", "model": "claude-haiku-4-5",
            "messages": [{"role": "user", "content": "Market?"}],
            "cache": {"volatility": "market_context", "mode": "exact", "scope": "global"}}
    check_request(CONFIG, msgspec.convert(body, CompleteRequest))
    invalidating = {**body, "cache": {**body["cache"], "volatility": "lead_intent"}}
    with pytest.raises(BadRequest, match="needs a user_id"):
        check_request(CONFIG, msgspec.convert(invalidating, CompleteRequest))


def test_global_with_a_conversation_is_only_for_whole_requests_in_exact_mode():
    convo = [*HISTORY, {"role": "user", "content": "And the market?"}]
    whole = request(task="messages", history=None)
    whole = msgspec.structs.replace(whole, messages=msgspec.convert(convo, list[ChatMessage]),
                                    cache=CacheOptions(volatility="market_context", mode="exact",
                                                       scope="global"))
    check_request(CONFIG, whole)
    semantic = msgspec.structs.replace(whole, cache=CacheOptions(
        volatility="market_context", mode="semantic", scope="global"))
    with pytest.raises(BadRequest):
        check_request(CONFIG, semantic)


# --- the caller's API key (GATEWAY_UPSTREAM_KEY=caller) ---------------------------


def test_each_callers_key_has_partitions_of_its_own_and_no_key_keys_as_before():
    req = request()  # scope global: still split by key
    a, b = upstream_key_id("sk-ant-a"), upstream_key_id("sk-ant-b")
    parts = {partition_key(req), partition_key(req, a), partition_key(req, b)}
    assert len(parts) == 3
    assert partition_key(req, a) == partition_key(request(), upstream_key_id("sk-ant-a"))
    assert partition_key(req, None) == partition_key(req)
    assert "sk-ant-a" not in a and len(a) == 32  # a digest, not the key
