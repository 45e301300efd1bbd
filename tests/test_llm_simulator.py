"""The LLM simulator, driven through the real `anthropic` SDK like the broker will drive it.

One simulator process serves the module (started with `--port 0`, its URL read
from its log); each test resets its counters, faults and prompt cache first.
Latency is set to a few milliseconds so the file runs in seconds.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import anthropic
import httpx
import pytest

from services.llm_simulator import responder, rules
from devstack import servers
from tests.helpers import eventually

pytestmark = pytest.mark.filterwarnings("error")  # the SDK must parse every reply without warnings

REPO = Path(__file__).resolve().parents[1]
MODEL = "claude-haiku-4-5"
INTENT_SYSTEM = "Classify the lead's intent. Answer with one label."
REPLY_SYSTEM = "You are a friendly real-estate SMS assistant. Reply briefly."
FAST = {"SIMULATOR_LATENCY_MEDIAN_S": "0.002", "SIMULATOR_LATENCY_P95_S": "0.005", "SIMULATOR_SEED": "7"}


def start_simulator(folder: Path, *args: str, env: dict[str, str] | None = None):
    """Spawn `python -m services.llm_simulator`; returns (process, url) once it listens."""
    log_path = folder / "llm-simulator.log"
    proc = servers.spawn("llm-simulator", [sys.executable, "-m", "services.llm_simulator", *args],
                         log_path=log_path, die_with_parent=True, cwd=REPO,
                         env={**os.environ, **FAST, **(env or {})})
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        for line in log_path.read_text().splitlines():
            if '"simulator_listening"' in line:
                return proc, json.loads(line)["url"]
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    proc.kill()
    raise RuntimeError(f"simulator did not start:\n{servers.log_tail(log_path)}")


@pytest.fixture(scope="module")
def sim_url(tmp_path_factory):
    proc, url = start_simulator(tmp_path_factory.mktemp("sim"), "--port", "0")
    yield url
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0


@pytest.fixture(scope="module", autouse=True)
async def _close_shared_clients():
    yield
    for api in _shared.values():
        await api.close()
    _shared.clear()


@pytest.fixture
async def sim(sim_url):
    """The simulator's URL, reset: no faults, empty prompt cache, zero counters, reseeded."""
    async with httpx.AsyncClient() as http:
        (await http.post(f"{sim_url}/reset")).raise_for_status()
    return sim_url


def client(url: str, **kwargs) -> anthropic.AsyncAnthropic:
    kwargs.setdefault("max_retries", 0)
    return anthropic.AsyncAnthropic(base_url=url, api_key="sim", **kwargs)


_shared: dict[str, anthropic.AsyncAnthropic] = {}  # building a client costs ~25 ms (TLS context)


async def ask(url: str, text: str, system: str | None = REPLY_SYSTEM, **kwargs) -> anthropic.types.Message:
    params = {"model": MODEL, "max_tokens": 200, "messages": [{"role": "user", "content": text}], **kwargs}
    if system is not None:
        params["system"] = system
    api = _shared.get(url) or _shared.setdefault(url, client(url))
    return await api.messages.create(**params)


async def post(url: str, path: str, body: dict) -> dict:
    async with httpx.AsyncClient() as http:
        resp = await http.post(f"{url}{path}", json=body)
        resp.raise_for_status()
        return resp.json()


async def stats(url: str) -> dict:
    async with httpx.AsyncClient() as http:
        return (await http.get(f"{url}/stats")).json()


def text_of(message: anthropic.types.Message) -> str:
    return "".join(block.text for block in message.content)


# --------------------------------------------------------------------------- shape


async def test_a_text_reply_has_the_real_api_shape_and_usage(sim):
    question = "Is the Main St house still available?"
    async with client(sim) as c:
        raw = await c.messages.with_raw_response.create(
            model=MODEL, max_tokens=200, system=REPLY_SYSTEM,
            messages=[{"role": "user", "content": question}])
    assert raw.headers["x-simulator"] == "tiermem"
    assert raw.headers["request-id"].startswith("req_sim_")
    msg = await raw.parse()
    assert isinstance(msg, anthropic.types.Message)
    assert msg.id.startswith("msg_sim_")
    assert (msg.type, msg.role, msg.model) == ("message", "assistant", MODEL)
    assert [b.type for b in msg.content] == ["text"]
    assert msg.stop_reason == "end_turn" and msg.stop_sequence is None
    text = text_of(msg)
    assert "Main" in text and "available" in text
    expected_input = responder.count_tokens(REPLY_SYSTEM) + responder.count_tokens(question)
    assert msg.usage.input_tokens == expected_input
    assert msg.usage.output_tokens == responder.count_tokens(text)
    assert msg.usage.cache_creation_input_tokens == 0 and msg.usage.cache_read_input_tokens == 0


async def test_the_same_request_gets_the_same_text_streamed_or_not(sim):
    first = await ask(sim, "Can I see the 3-bed on Oak Ave Saturday at 2pm?")
    second = await ask(sim, "Can I see the 3-bed on Oak Ave Saturday at 2pm?")
    assert text_of(first) == text_of(second)
    assert first.id != second.id
    async with client(sim) as c:
        async with c.messages.stream(
                model=MODEL, max_tokens=200, system=REPLY_SYSTEM,
                messages=[{"role": "user", "content": "Can I see the 3-bed on Oak Ave Saturday at 2pm?"}]) as s:
            streamed = await s.get_final_message()
    assert text_of(streamed) == text_of(first)
    assert streamed.usage.output_tokens == first.usage.output_tokens
    assert "Saturday" in text_of(first) and "2pm" in text_of(first)


# --------------------------------------------------------------------------- labels


PARAPHRASES = {
    "availability": ["Is the 3-bed still available?", "Is the house still on the market?",
                     "Has the Main St property sold yet?", "is it still for sale"],
    "pricing": ["How much is it?", "What's the asking price?", "What does the condo cost?",
                "Is the price negotiable?"],
    "schedule_viewing": ["Can I come see it this weekend?", "I'd love to tour the place",
                         "When could I view the property?", "Can we schedule a showing?"],
    "financing": ["Do you work with any lenders?", "Can I get a mortgage for this?",
                  "What are current interest rates?", "What would the monthly payment be?"],
    "not_interested": ["Not interested, thanks", "Please stop texting me", "STOP", "unsubscribe"],
    "other": ["Who is this?", "What's the school district like?"],
}


def test_the_intent_rules_label_every_paraphrase_without_a_server():
    for label, texts in PARAPHRASES.items():
        assert {rules.classify_intent(t) for t in texts} == {label}, label
    assert rules.detect_task("Score the lead's purchase intent 0-100") == "lead_score"
    assert rules.detect_task("Classify the lead's intent") == "intent"
    assert rules.detect_task("You are a helpful assistant") == "free_text"


@pytest.mark.parametrize("label", list(PARAPHRASES))
async def test_paraphrases_of_an_intent_get_the_same_label(sim, label):
    for text in PARAPHRASES[label]:
        assert text_of(await ask(sim, text, system=INTENT_SYSTEM)) == label, text


async def test_different_intents_get_different_labels_and_json_when_asked(sim):
    labels = {text_of(await ask(sim, texts[0], system=INTENT_SYSTEM)) for texts in PARAPHRASES.values()}
    assert labels == set(PARAPHRASES)
    as_json = await ask(sim, "How much is it?", system=INTENT_SYSTEM + " Reply as JSON.")
    assert json.loads(text_of(as_json)) == {"intent": "pricing"}


async def test_3_bed_and_4_bed_share_an_intent_but_not_a_reply(sim):
    three, four = "Is the 3-bed still available?", "Is the 4-bed still available?"
    assert text_of(await ask(sim, three, system=INTENT_SYSTEM)) == \
        text_of(await ask(sim, four, system=INTENT_SYSTEM)) == "availability"
    reply3, reply4 = text_of(await ask(sim, three)), text_of(await ask(sim, four))
    assert reply3 != reply4
    assert "3-bed" in reply3 and "4-bed" in reply4


async def test_lead_score_follows_the_whole_conversation(sim):
    system = "Score this lead from 0 to 100. Answer with the number only."

    async def score(*turns: str) -> int:
        messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
        async with client(sim) as c:
            msg = await c.messages.create(model=MODEL, max_tokens=20, system=system, messages=messages)
        return int(text_of(msg))

    hot = await score("Is the Main St house available?", "Yes! What's your budget?",
                      "Around $450k, and I'm pre-approved. Can I tour it this weekend?")
    cold = await score("Just browsing for now, maybe next year.")
    gone = await score("Is it available?", "Yes, want to see it?", "No thanks, not interested.")
    assert hot >= 70 > 40 > cold and gone < 40
    # The agent's turns do not count: its "budget" question scores nothing.
    assert await score("Hi", "What's your budget? Are you pre-approved?", "ok") == rules.SCORE_BASE
    bucket_msg = await ask(sim, "pre-approved, want to see it tomorrow",
                           system="Rate the lead as hot, warm or cold by its score.")
    assert text_of(bucket_msg) == "hot"


# --------------------------------------------------------------------------- limits


async def test_max_tokens_truncates_and_says_so(sim):
    full = await ask(sim, "What's the asking price for the 3-bed on Elm St?")
    cut = await ask(sim, "What's the asking price for the 3-bed on Elm St?", max_tokens=5)
    assert cut.stop_reason == "max_tokens"
    assert cut.usage.output_tokens == 5
    assert text_of(full).startswith(text_of(cut)) and len(text_of(cut)) == 5 * responder.CHARS_PER_TOKEN
    label = await ask(sim, "What's the asking price?", system=INTENT_SYSTEM, max_tokens=1)
    assert (text_of(label), label.stop_reason) == ("pric", "max_tokens")


async def test_a_stop_sequence_ends_the_reply(sim):
    full = text_of(await ask(sim, "Is the 3-bed still available?"))
    stop = full.split()[-1]  # the wording varies with the request; take the stop from the reply itself
    msg = await ask(sim, "Is the 3-bed still available?", stop_sequences=[stop])
    assert msg.stop_reason == "stop_sequence" and msg.stop_sequence == stop
    assert text_of(msg) == full[:full.find(stop)] and "3-bed" in text_of(msg)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"messages": []}, "at least one message"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"extra_body": {"temperature": 1.5}}, "temperature"),
    ({"extra_body": {"top_p": -0.1}}, "top_p"),
    ({"messages": [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "Hi"}]}, "first message"),
    ({"messages": [{"role": "system", "content": "Hi"}]}, "role"),
    ({"messages": [{"role": "user", "content": ""}]}, "non-empty content"),
    ({"system": [{"type": "image", "text": "x"}]}, "system.0.type"),
    ({"system": [{"type": "text", "text": "x", "cache_control": {"type": "forever"}}]}, "cache_control"),
    ({"stop_sequences": ["  "]}, "stop sequence"),
])
async def test_invalid_requests_are_rejected_like_the_real_api(sim, kwargs, fragment):
    params = {"model": MODEL, "max_tokens": 50, "messages": [{"role": "user", "content": "Hi"}], **kwargs}
    async with client(sim) as c:
        with pytest.raises(anthropic.BadRequestError) as caught:
            await c.messages.create(**params)
    err = caught.value
    assert err.status_code == 400
    assert err.body["type"] == "error" and err.body["error"]["type"] == "invalid_request_error"
    assert fragment in err.body["error"]["message"]
    assert err.response.headers["x-simulator"] == "tiermem"


async def test_unknown_models_and_missing_keys_fail_like_the_real_api(sim):
    with pytest.raises(anthropic.NotFoundError):
        await ask(sim, "Hi", model="gpt-4o")
    async with httpx.AsyncClient() as http:
        resp = await http.post(f"{sim}/v1/messages", headers={"anthropic-version": "2023-06-01"},
                               json={"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "Hi"}]})
    assert resp.status_code == 401 and resp.json()["error"]["type"] == "authentication_error"


async def test_consecutive_user_turns_are_combined_like_the_real_api(sim):
    async with client(sim) as c:
        msg = await c.messages.create(model=MODEL, max_tokens=20, system=INTENT_SYSTEM, messages=[
            {"role": "user", "content": "Hi there"}, {"role": "user", "content": "how much is it?"}])
    assert text_of(msg) == "pricing"


# --------------------------------------------------------------------------- faults


@pytest.mark.parametrize("status, error, kind", [
    (429, anthropic.RateLimitError, "rate_limit_error"),
    (529, anthropic.OverloadedError, "overloaded_error"),
    (500, anthropic.InternalServerError, "api_error"),
])
async def test_injected_errors_surface_as_sdk_errors_and_sdk_retries_get_through(sim, status, error, kind):
    await post(sim, "/faults", {"status": status, "count": 2, "retry_after_s": 0.01})
    with pytest.raises(error) as caught:
        await ask(sim, "Is it available?")
    assert caught.value.status_code == status and caught.value.body["error"]["type"] == kind
    if status == 429:
        assert caught.value.response.headers["retry-after"] == "1"
    # One failure left: the SDK's own retries (max_retries=2) get past it.
    async with client(sim, max_retries=2) as c:
        msg = await c.messages.create(model=MODEL, max_tokens=50,
                                      messages=[{"role": "user", "content": "Is it available?"}])
    assert msg.stop_reason == "end_turn"
    counts = await stats(sim)
    assert counts["requests"] == 3 and counts["by_status"] == {str(status): 2, "200": 1}
    assert counts["faults_injected"] == 2 and counts["faults_active"] == 0


async def test_529_is_an_internal_server_error_subclass(sim):
    assert issubclass(anthropic.OverloadedError, anthropic.InternalServerError)


async def test_a_random_share_of_requests_fails_until_cleared(sim):
    await post(sim, "/faults", {"status": 529, "rate": 0.5})
    outcomes = []
    for _ in range(20):
        try:
            await ask(sim, "Hi")
            outcomes.append("ok")
        except anthropic.OverloadedError:
            outcomes.append("529")
    assert 3 <= outcomes.count("529") <= 17
    assert (await post(sim, "/faults", {"clear": True})) == {"faults": []}
    await ask(sim, "Hi")  # no fault left


async def test_a_delay_fault_provokes_a_client_timeout(sim):
    await post(sim, "/faults", {"delay_s": 2, "count": 1})
    async with client(sim, timeout=0.3) as c:
        with pytest.raises(anthropic.APITimeoutError):
            await c.messages.create(model=MODEL, max_tokens=20, messages=[{"role": "user", "content": "Hi"}])
    await ask(sim, "Hi")  # the next request is not delayed

    async def delayed_one_done():  # or it would be counted in a later test's stats
        return (await stats(sim))["requests"] == 2

    await eventually(delayed_one_done, timeout=10, what="the delayed request answered")


async def test_a_truncate_fault_cuts_answers_short_with_stop_reason_max_tokens(sim):
    await post(sim, "/faults", {"truncate_tokens": 2, "count": 1})
    async with client(sim) as c:
        cut = await c.messages.create(model=MODEL, max_tokens=200,
                                      messages=[{"role": "user", "content": "Is it available?"}])
        whole = await c.messages.create(model=MODEL, max_tokens=200,
                                        messages=[{"role": "user", "content": "Is it available?"}])
    assert cut.stop_reason == "max_tokens" and cut.usage.output_tokens <= 2
    assert whole.stop_reason == "end_turn" and len(whole.content[0].text) > len(cut.content[0].text)


# --------------------------------------------------------------------------- prompt caching


LONG_POLICY = "Follow the brokerage's messaging policy: " + " ".join(
    f"rule {i}: answer politely, never promise a price, mention the listing id." for i in range(80))


async def test_prompt_caching_reports_creation_then_reads(sim):
    system = [{"type": "text", "text": LONG_POLICY, "cache_control": {"type": "ephemeral"}}]
    prefix = responder.count_tokens(LONG_POLICY)
    assert prefix >= 1024

    first = await ask(sim, "Is the 3-bed still available?", system=system)
    assert first.usage.cache_creation_input_tokens == prefix
    assert first.usage.cache_read_input_tokens == 0
    assert first.usage.cache_creation.ephemeral_5m_input_tokens == prefix
    assert first.usage.input_tokens == responder.count_tokens("Is the 3-bed still available?")

    second = await ask(sim, "Is the 3-bed still available?", system=system)
    assert second.usage.cache_read_input_tokens == prefix
    assert second.usage.cache_creation_input_tokens == 0
    assert second.usage.input_tokens == first.usage.input_tokens
    assert text_of(second) == text_of(first)

    other_question = await ask(sim, "How much is it?", system=system)  # same prefix, other tail
    assert other_question.usage.cache_read_input_tokens == prefix
    other_model = await ask(sim, "How much is it?", system=system, model="claude-sonnet-4-6")
    assert other_model.usage.cache_creation_input_tokens == prefix  # the cache is per model

    short = [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}]
    for _ in range(2):  # below the minimum: never cached, no error
        msg = await ask(sim, "Hi", system=short)
        assert msg.usage.cache_creation_input_tokens == msg.usage.cache_read_input_tokens == 0

    tokens = (await stats(sim))["tokens"]
    assert tokens["cache_read_input"] == 2 * prefix and tokens["cache_creation_input"] == 2 * prefix


def test_the_prompt_cache_expires_after_its_ttl_and_a_hit_refreshes_it():
    def request(ttl: str | None = None) -> responder.MessagesRequest:
        cc = {"type": "ephemeral", **({"ttl": ttl} if ttl else {})}
        return responder.parse_request({
            "model": MODEL, "max_tokens": 10,
            "system": [{"type": "text", "text": LONG_POLICY, "cache_control": cc}],
            "messages": [{"role": "user", "content": "Hi"}]})

    cache = responder.PromptCache(min_tokens=1024)
    assert cache.account(request(), now=0).creation_tokens > 0
    assert cache.account(request(), now=299).read_tokens > 0  # a hit at 299 s renews for 5 min
    assert cache.account(request(), now=598).read_tokens > 0
    assert cache.account(request(), now=899).creation_tokens > 0  # expired: written again
    assert cache.account(request("1h"), now=2000).creation_5m == 0
    assert cache.account(request("1h"), now=5000).read_tokens > 0


async def test_count_tokens_matches_the_usage_of_create(sim):
    async with client(sim) as c:
        counted = await c.messages.count_tokens(model=MODEL, system=REPLY_SYSTEM,
                                                messages=[{"role": "user", "content": "Is it available?"}])
    msg = await ask(sim, "Is it available?")
    assert counted.input_tokens == msg.usage.input_tokens


# --------------------------------------------------------------------------- stats and process


async def test_stats_count_upstream_calls_by_status_model_and_task(sim):
    await ask(sim, "Is it available?")
    await ask(sim, "How much?", system=INTENT_SYSTEM, model="claude-sonnet-4-6")
    with pytest.raises(anthropic.BadRequestError):
        await ask(sim, "Hi", max_tokens=-5)
    counts = await stats(sim)
    assert counts["requests"] == 3
    assert counts["by_status"] == {"200": 2, "400": 1}
    assert counts["by_model"] == {MODEL: 2, "claude-sonnet-4-6": 1}
    assert counts["by_task"] == {"free_text": 1, "intent": 1}
    assert counts["tokens"]["output"] > 0
    reset = await post(sim, "/stats/reset", {})
    assert reset["requests"] == 0 and reset["by_status"] == {}


def test_the_port_comes_from_the_environment_and_sigterm_stops_it_cleanly(tmp_path):
    port = servers.free_port()
    proc, url = start_simulator(tmp_path, env={"SIMULATOR_PORT": str(port)})
    assert url == f"http://127.0.0.1:{port}"
    assert httpx.get(f"{url}/health").json() == {"status": "ok", "simulator": "tiermem"}
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0


def test_a_body_over_the_limit_gets_the_apis_413_and_the_connection_closes(tmp_path):
    proc, url = start_simulator(tmp_path, env={"SIMULATOR_MAX_BODY_BYTES": "1000"})
    try:
        headers = {"x-api-key": "sim", "anthropic-version": "2023-06-01"}
        with httpx.Client(base_url=url) as http:
            small = http.post("/v1/messages", headers=headers, json={
                "model": MODEL, "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]})
            assert small.status_code == 200, small.text
            big = http.post("/v1/messages", headers=headers, json={
                "model": MODEL, "max_tokens": 20, "messages": [{"role": "user", "content": "x" * 2000}]})
            assert big.status_code == 413
            assert big.headers["x-simulator"] == "tiermem" and big.headers["connection"] == "close"
            assert big.json()["error"]["type"] == "request_too_large"
            # chunked, with no length announced: the limit holds while reading
            chunked = http.post("/v1/messages", headers=headers, content=iter([b"{" + b" " * 600] * 3))
            assert chunked.status_code == 413
            assert http.get("/nope").status_code == 404  # a new connection; routes are the simulator's
            assert http.get("/nope").headers["x-simulator"] == "tiermem"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
