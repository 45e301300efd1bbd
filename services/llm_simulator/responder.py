"""What the simulator answers: request JSON in, Anthropic Message JSON out. No I/O.

The reply text comes from `rules` (labels by rules over the content, free
text derived from the request; an entailment judge's request, "A: ... B: ...",
is answered by `judging`); this module validates, counts tokens, keeps
the prompt cache and shapes the Message.

Validation follows the real API: 400 `invalid_request_error` with the
field's path in the message; consecutive same-role turns are combined (the
API documents that), the first turn must be a user turn, `max_tokens` 0 is
allowed (it only warms the prompt cache), a model not named `claude-*` gets
404 `not_found_error`. Metadata is accepted and ignored.

Extended thinking (`thinking`: `enabled` with `budget_tokens` >= 1024 and below
`max_tokens`, or `adaptive`; `disabled` is off), checked as the API checks it
(no forced tool use, no temperature but 1, no top_k): the reply opens with a
`thinking` block (text derived from the request, at most `budget_tokens`, and
an opaque `signature` that is a hash of it; with `display: "omitted"` the text
is empty and only the signature comes), then the text or tool call. The
API's test string for redacted thinking (`REDACTED_TRIGGER`) in the latest
user turn adds a `redacted_thinking` block after it, as the API documents.
Thinking tokens are output tokens and count against `max_tokens`.

Tools (`tool_call`): with `tool_choice` `tool` or `any` the reply is a
`tool_use` block (stop_reason "tool_use"), as the API forces it; with `auto`
(the default) it is one when the latest user turn shares a word of four
letters or more with a tool's name or description and does not carry a tool
result, else text; `none` never. The call's input fills the tool's
`input_schema` from the latest user text: strings get the text, numbers the
first number in it, enums the value it names (else the first), booleans
false, arrays empty, objects recursively. The block's id is a hash of the
request, so a repeated request gets the same call.

Tokens: ceil(chars / 4) per text block (non-text blocks: their JSON; an image
counts 1,600). `max_tokens` cuts the text at 4 chars a token (stop_reason
"max_tokens"); a stop sequence in the text cuts it there ("stop_sequence").
Prompt caching follows the real API: a `cache_control` breakpoint caches the
prefix tools -> system -> messages up to and including its block when that
prefix has at least `min_tokens`; the first request reports those tokens as
`cache_creation_input_tokens`, a later request with the same prefix (same
model) within the TTL (5 min, or 1 h with `ttl: "1h"`; refreshed on each
hit) reports them as `cache_read_input_tokens`, and `input_tokens` counts
only the rest.
"""

from __future__ import annotations

import base64
import hashlib
import math
import re
from dataclasses import dataclass, field
from typing import Any

import msgspec

from services.llm_simulator import judging
from services.llm_simulator.answers import compose
from services.llm_simulator.rules import bucket, classify_intent, detect_task, score_lead

CHARS_PER_TOKEN = 4
MIN_THINKING_BUDGET = 1024
REDACTED_TRIGGER = ("ANTHROPIC_MAGIC_STRING_TRIGGER_REDACTED_THINKING_"
                    "46C9A13E193C177646C7398A98432ECCCE4C1253")
IMAGE_TOKENS = 1600
MAX_BREAKPOINTS = 4
TTL_S = {"5m": 300.0, "1h": 3600.0}


class ApiError(Exception):
    """An error the real API would return: HTTP status, Anthropic error type, message."""

    def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.kind = kind

    def body(self, request_id: str) -> dict:
        return {"type": "error", "error": {"type": self.kind, "message": self.message},
                "request_id": request_id}


# --------------------------------------------------------------------------- request


@dataclass
class Block:
    """One cacheable unit of the prompt: a tool, a system block or a message block."""

    text: str  # what the rules read ("" for non-text blocks)
    tokens: int
    canonical: bytes  # what the prompt-cache prefix hash covers
    ttl: str | None = None  # cache_control breakpoint on this block
    kind: str = "text"  # the content block's type ("tool" for a tool definition)


@dataclass
class Turn:
    role: str
    blocks: list[Block]

    @property
    def text(self) -> str:
        return "\n".join(b.text for b in self.blocks if b.text)


@dataclass
class MessagesRequest:
    model: str
    max_tokens: int
    tools: list[Block]
    system: list[Block]
    turns: list[Turn]  # consecutive same-role messages merged, like the real API
    stop_sequences: list[str] = field(default_factory=list)
    stream: bool = False
    tool_defs: list[dict] = field(default_factory=list)  # the tools as sent
    tool_choice: dict | None = None
    thinking_budget: int | None = None  # extended thinking's token budget (None: off)
    thinking_shown: bool = True  # False: `display: "omitted"` (only the signature)

    @property
    def system_text(self) -> str:
        return "\n".join(b.text for b in self.system)

    @property
    def instructions(self) -> str:
        """The first system block: what the caller asks for. Later blocks are context
        (a rolling summary, a CRM record): their words ("credit score") ask for nothing."""
        return self.system[0].text if self.system else ""

    def blocks(self) -> list[Block]:
        return [*self.tools, *self.system, *(b for t in self.turns for b in t.blocks)]

    @property
    def input_tokens(self) -> int:
        return sum(b.tokens for b in self.blocks())

    @property
    def prefill(self) -> str:
        return self.turns[-1].text if self.turns[-1].role == "assistant" else ""

    def latest_user_text(self) -> str:
        return next((t.text for t in reversed(self.turns) if t.role == "user"), "")


def count_tokens(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def _canonical(obj: Any) -> bytes:
    return msgspec.json.encode(obj, order="sorted")


def _cache_ttl(where: str, raw: dict) -> str | None:
    cc = raw.get("cache_control")
    if cc is None:
        return None
    if not isinstance(cc, dict) or cc.get("type") != "ephemeral":
        raise ApiError(f"{where}.cache_control.type: Input should be 'ephemeral'")
    ttl = cc.get("ttl", "5m")
    if ttl not in TTL_S:
        raise ApiError(f"{where}.cache_control.ttl: Input should be '5m' or '1h'")
    return ttl


def _text_block(where: str, raw: Any) -> Block:
    if not isinstance(raw, dict):
        raise ApiError(f"{where}: Input should be a valid dictionary")
    if raw.get("type") != "text":
        raise ApiError(f"{where}.type: Input should be 'text'")
    text = raw.get("text")
    if not isinstance(text, str):
        raise ApiError(f"{where}.text: Field required" if text is None
                       else f"{where}.text: Input should be a valid string")
    if not text:
        raise ApiError(f"{where}: text content blocks must be non-empty")
    return Block(text, count_tokens(text), _canonical(["text", text]), _cache_ttl(where, raw))


_OTHER_BLOCKS = {"image", "document", "tool_use", "tool_result", "thinking", "redacted_thinking",
                 "search_result", "server_tool_use", "web_search_tool_result"}


def _content_block(where: str, raw: Any) -> Block:
    if not isinstance(raw, dict):
        raise ApiError(f"{where}: Input should be a valid dictionary")
    kind = raw.get("type")
    if kind == "text":
        return _text_block(where, raw)
    if kind not in _OTHER_BLOCKS:
        raise ApiError(f"{where}: Input tag '{kind}' found using 'type' does not match any of "
                       f"the expected tags")
    body = {k: v for k, v in raw.items() if k != "cache_control"}
    text = ""
    if kind == "tool_result":  # its text content is part of the conversation
        content = raw.get("content")
        text = content if isinstance(content, str) else " ".join(
            c.get("text", "") for c in content or [] if isinstance(c, dict))
    tokens = IMAGE_TOKENS if kind == "image" else count_tokens(_canonical(body).decode())
    return Block(text, tokens, _canonical(body), _cache_ttl(where, raw), kind)


def _number(body: dict, name: str, lo: float, hi: float | None) -> None:
    value = body.get(name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(f"{name}: Input should be a valid number")
    if value < lo:
        raise ApiError(f"{name}: Input should be greater than or equal to {lo:g}")
    if hi is not None and value > hi:
        raise ApiError(f"{name}: Input should be less than or equal to {hi:g}")


def parse_request(body: Any, *, max_output_tokens: int = 128_000) -> MessagesRequest:
    """Validate a Messages API request body like the real API does (400 on bad input)."""
    if not isinstance(body, dict):
        raise ApiError("request body must be a JSON object")
    for name in ("model", "max_tokens", "messages"):
        if name not in body:
            raise ApiError(f"{name}: Field required")

    model = body["model"]
    if not isinstance(model, str):
        raise ApiError("model: Input should be a valid string")
    if not model.startswith("claude-"):
        raise ApiError(f"model: {model}", status=404, kind="not_found_error")

    max_tokens = body["max_tokens"]
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise ApiError("max_tokens: Input should be a valid integer")
    if max_tokens < 0:  # 0 is allowed: it pre-warms the prompt cache without generating
        raise ApiError("max_tokens: Input should be greater than or equal to 0")
    if max_tokens > max_output_tokens:
        raise ApiError(f"max_tokens: {max_tokens} > {max_output_tokens}, which is the maximum "
                       f"allowed number of output tokens for {model}")

    _number(body, "temperature", 0, 1)
    _number(body, "top_p", 0, 1)
    top_k = body.get("top_k")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise ApiError("top_k: Input should be a non-negative integer")

    stops = body.get("stop_sequences")
    if stops is None:
        stops = []
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ApiError("stop_sequences: Input should be a valid list of strings")
    if any(not s.strip() for s in stops):
        raise ApiError("stop_sequences: each stop sequence must contain non-whitespace")

    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError("stream: Input should be a valid boolean")

    tools_raw = body.get("tools") or []
    if not isinstance(tools_raw, list):
        raise ApiError("tools: Input should be a valid list")
    tools = []
    for i, tool in enumerate(tools_raw):  # accepted and ignored, but they cost tokens
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
            raise ApiError(f"tools.{i}.name: Field required")
        plain = {k: v for k, v in tool.items() if k != "cache_control"}
        blob = _canonical(plain)
        tools.append(Block("", count_tokens(blob.decode()), blob, _cache_ttl(f"tools.{i}", tool),
                           "tool"))
    tool_choice = body.get("tool_choice")
    if tool_choice is not None:
        if not isinstance(tool_choice, dict) or tool_choice.get("type") not in (
                "auto", "any", "tool", "none"):
            raise ApiError("tool_choice: Input tag found using 'type' does not match any of the "
                           "expected tags: 'auto', 'any', 'tool', 'none'")
        if tool_choice["type"] == "tool" and not any(
                t.get("name") == tool_choice.get("name") for t in tools_raw):
            raise ApiError(f"tool_choice: tool {tool_choice.get('name')!r} not found in tools")

    system_raw = body.get("system")
    if system_raw is None or system_raw == "":
        system = []
    elif isinstance(system_raw, str):
        system = [Block(system_raw, count_tokens(system_raw), _canonical(["text", system_raw]))]
    elif isinstance(system_raw, list):
        system = [_text_block(f"system.{i}", b) for i, b in enumerate(system_raw)]
    else:
        raise ApiError("system: Input should be a valid string or a list of text blocks")

    turns = _parse_messages(body["messages"])
    request = MessagesRequest(model, max_tokens, tools, system, turns, stops, stream,
                              [t for t in tools_raw if "input_schema" in t], tool_choice)
    _thinking(request, body)

    top_cc = body.get("cache_control")
    if top_cc is not None:  # marks the last cacheable block
        request.blocks()[-1].ttl = _cache_ttl("request", {"cache_control": top_cc})
    marked = sum(1 for b in request.blocks() if b.ttl)
    if marked > MAX_BREAKPOINTS:
        raise ApiError(f"A maximum of {MAX_BREAKPOINTS} blocks with cache_control may be "
                       f"provided. Found {marked}.")
    if request.prefill and request.prefill != request.prefill.rstrip():
        raise ApiError("messages: final assistant content cannot end with trailing whitespace")
    return request


def _thinking(request: MessagesRequest, body: dict) -> None:
    """Extended thinking's settings, validated as the API does (see the module docstring)."""
    raw = body.get("thinking")
    if raw is None:
        return
    kind = raw.get("type") if isinstance(raw, dict) else None
    if kind not in ("enabled", "disabled", "adaptive"):
        raise ApiError("thinking: Input tag found using 'type' does not match any of the "
                       "expected tags: 'enabled', 'disabled', 'adaptive'")
    if kind == "disabled":
        return
    if raw.get("display") not in (None, "summarized", "omitted"):
        raise ApiError(f"thinking.{kind}.display: Input should be 'summarized' or 'omitted'")
    budget = raw.get("budget_tokens")
    if kind == "enabled":
        if isinstance(budget, bool) or not isinstance(budget, int):
            raise ApiError("thinking.enabled.budget_tokens: Field required" if budget is None
                           else "thinking.enabled.budget_tokens: Input should be a valid integer")
        if budget < MIN_THINKING_BUDGET:
            raise ApiError(f"thinking.enabled.budget_tokens: Input should be greater than or "
                           f"equal to {MIN_THINKING_BUDGET}")
        if budget >= request.max_tokens:
            raise ApiError("`max_tokens` must be greater than `thinking.budget_tokens`")
    else:  # adaptive: the model picks its budget within max_tokens
        budget = max(request.max_tokens // 2, 1)
    if (request.tool_choice or {}).get("type") in ("any", "tool"):
        raise ApiError("Thinking may not be enabled when tool_choice forces tool use.")
    temperature = body.get("temperature")
    if temperature is not None and temperature != 1:
        raise ApiError("`temperature` may only be set to 1 when thinking is enabled.")
    if body.get("top_k") is not None:
        raise ApiError("`top_k` may not be set when thinking is enabled.")
    request.thinking_budget = budget
    request.thinking_shown = raw.get("display") != "omitted"


def _parse_messages(raw: Any) -> list[Turn]:
    if not isinstance(raw, list):
        raise ApiError("messages: Input should be a valid list")
    if not raw:
        raise ApiError("messages: at least one message is required")
    turns: list[Turn] = []
    for i, msg in enumerate(raw):
        where = f"messages.{i}"
        if not isinstance(msg, dict):
            raise ApiError(f"{where}: Input should be a valid dictionary")
        role = msg.get("role")
        if role not in ("user", "assistant"):
            raise ApiError(f"{where}.role: Input should be 'user' or 'assistant'")
        content = msg.get("content")
        last = i == len(raw) - 1
        if isinstance(content, str):
            blocks = [Block(content, count_tokens(content), _canonical(["text", content]))] if content else []
        elif isinstance(content, list):
            blocks = [_content_block(f"{where}.content.{j}", b) for j, b in enumerate(content)]
        elif content is None:
            raise ApiError(f"{where}.content: Field required")
        else:
            raise ApiError(f"{where}.content: Input should be a valid string or list")
        if not blocks and not (last and role == "assistant"):
            raise ApiError(f"{where}: all messages must have non-empty content except for the "
                           f"optional final assistant message")
        if turns and turns[-1].role == role:
            turns[-1].blocks.extend(blocks)  # consecutive same-role turns are combined
        else:
            turns.append(Turn(role, blocks))
    if turns[0].role != "user":
        raise ApiError('messages: first message must use the "user" role')
    return turns


# --------------------------------------------------------------------------- generation


def _digest(request: MessagesRequest) -> int:
    canon = _canonical([request.model, request.system_text,
                        [[t.role, t.text] for t in request.turns]])
    return int.from_bytes(hashlib.blake2b(canon, digest_size=8).digest(), "big")


def free_text(request: MessagesRequest) -> str:
    """The reply to the latest user turn: facts from the whole request, wording from its exact bytes."""
    question = request.latest_user_text()
    last_user = max(i for i, t in enumerate(request.turns) if t.role == "user")
    earlier_user = [t.text for t in request.turns[:last_user] if t.role == "user"]
    others = [t.text for i, t in enumerate(request.turns) if i != last_user]
    return compose(question, request.system_text, earlier_user, others, classify_intent(question),
                   _digest(request))


def generate(request: MessagesRequest) -> tuple[str, str]:
    """(task, full reply text before max_tokens and stop sequences)."""
    pair = judging.statements(request.system_text, request.latest_user_text())
    if pair is not None:  # an auditor asking whether two answers entail each other
        return "entailment", judging.judge(*pair)
    task = detect_task(request.instructions)
    wants_json = "json" in request.instructions.lower()
    if task == "intent":
        label = classify_intent(request.latest_user_text())
        text = msgspec.json.encode({"intent": label}).decode() if wants_json else label
    elif task == "lead_score":
        score = score_lead([t.text for t in request.turns if t.role == "user"])
        if wants_json:
            text = msgspec.json.encode({"score": score, "bucket": bucket(score)}).decode()
        elif re.search(r"\b(?:hot|warm|cold)\b", request.instructions.lower()):
            text = bucket(score)
        else:
            text = str(score)
    else:
        text = free_text(request)
    prefill = request.prefill
    if prefill and text.startswith(prefill):  # the reply continues the prefilled turn
        text = text[len(prefill):]
    return task, text


_WORD = re.compile(r"[a-z]{4,}")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _words(text: str) -> set[str]:
    return set(_WORD.findall(text.lower().replace("_", " ").replace("-", " ")))


def tool_call(request: MessagesRequest) -> dict | None:
    """The tool_use block the reply is, or None for a text reply (see the module docstring)."""
    choice = (request.tool_choice or {}).get("type", "auto")
    if not request.tool_defs or choice == "none":
        return None
    question = request.latest_user_text()
    if choice == "tool":
        tool = next(t for t in request.tool_defs if t["name"] == request.tool_choice["name"])
    else:
        asked = _words(question)
        scored = [(len(asked & _words(f"{t['name']} {t.get('description', '')}")), -i, t)
                  for i, t in enumerate(request.tool_defs)]
        score, _, tool = max(scored, key=lambda x: x[:2])
        last = request.turns[-1]
        answered = last.role == "user" and any(b.kind == "tool_result" for b in last.blocks)
        if choice == "auto" and (score == 0 or answered):
            return None
    digest = hashlib.blake2b(_canonical([request.model, tool["name"], question,
                                         len(request.turns)]), digest_size=12).hexdigest()
    return {"type": "tool_use", "id": f"toolu_sim_{digest}", "name": tool["name"],
            "input": _fill(tool.get("input_schema") or {}, question)}


def _fill(schema: dict, text: str) -> dict:
    props = schema.get("properties") or {}
    names = schema.get("required") or list(props)
    return {name: _value(props.get(name) or {}, text) for name in names}


def _value(spec: dict, text: str) -> Any:
    if spec.get("enum"):
        named = [v for v in spec["enum"] if isinstance(v, str) and v.lower() in text.lower()]
        return named[0] if named else spec["enum"][0]
    kind = spec.get("type")
    if kind in ("number", "integer"):
        found = _NUMBER.search(text)
        if not found:
            return 0
        return int(float(found.group())) if kind == "integer" else float(found.group())
    if kind == "boolean":
        return False
    if kind == "array":
        return []
    if kind == "object":
        return _fill(spec, text)
    return text.strip()[:200]


# --------------------------------------------------------------------------- prompt cache


@dataclass(frozen=True)
class CacheUsage:
    input_tokens: int
    creation_tokens: int = 0
    read_tokens: int = 0
    creation_5m: int = 0
    creation_1h: int = 0


class PromptCache:
    """Prefix hash -> expiry, like the API's ephemeral prompt cache. `now` is passed in."""

    def __init__(self, min_tokens: int = 1024, max_entries: int = 100_000) -> None:
        self.min_tokens = min_tokens
        self.max_entries = max_entries
        self._expiry: dict[bytes, float] = {}

    def clear(self) -> None:
        self._expiry.clear()

    def __len__(self) -> int:
        return len(self._expiry)

    def account(self, request: MessagesRequest, now: float) -> CacheUsage:
        total = request.input_tokens
        points: list[tuple[bytes, int, str]] = []  # (prefix hash, prefix tokens, ttl) per breakpoint
        digest = hashlib.blake2b(request.model.encode(), digest_size=16)
        tokens = 0
        for block in request.blocks():
            digest.update(hashlib.blake2b(block.canonical, digest_size=16).digest())
            tokens += block.tokens
            if block.ttl:
                points.append((digest.copy().digest(), tokens, block.ttl))
        if not points:
            return CacheUsage(total)

        hit = -1
        for i in range(len(points) - 1, -1, -1):  # longest cached prefix wins
            key, _, ttl = points[i]
            if self._expiry.get(key, -math.inf) > now:
                self._expiry[key] = now + TTL_S[ttl]  # a hit refreshes the TTL
                hit = i
                break
        read = points[hit][1] if hit >= 0 else 0

        created = {"5m": 0, "1h": 0}
        covered = read
        for key, prefix_tokens, ttl in points[hit + 1:]:
            if prefix_tokens < self.min_tokens:
                continue  # too short to cache, like the real API (no error)
            self._store(key, now + TTL_S[ttl], now)
            created[ttl] += prefix_tokens - covered
            covered = prefix_tokens
        creation = created["5m"] + created["1h"]
        return CacheUsage(total - read - creation, creation, read, created["5m"], created["1h"])

    def _store(self, key: bytes, expiry: float, now: float) -> None:
        if len(self._expiry) >= self.max_entries:
            for k in [k for k, e in self._expiry.items() if e <= now]:
                del self._expiry[k]
            while len(self._expiry) >= self.max_entries:  # still full: drop the oldest inserted
                del self._expiry[next(iter(self._expiry))]
        self._expiry[key] = expiry


# --------------------------------------------------------------------------- response


@dataclass(frozen=True)
class Reply:
    task: str
    text: str
    stop_reason: str
    stop_sequence: str | None
    output_tokens: int
    usage: CacheUsage
    tool_use: dict | None = None  # a tool call (stop_reason "tool_use")
    thinking: tuple[dict, ...] = ()  # thinking and redacted_thinking blocks, before the answer

    def message(self, msg_id: str, model: str) -> dict:
        content = [*self.thinking]
        if self.text:
            content.append({"type": "text", "text": self.text})
        if self.tool_use is not None:
            content.append(self.tool_use)
        return {
            "id": msg_id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": content,
            "stop_reason": self.stop_reason,
            "stop_sequence": self.stop_sequence,
            "usage": self.usage_json(),
        }

    def usage_json(self) -> dict:
        return {
            "input_tokens": self.usage.input_tokens,
            "cache_creation_input_tokens": self.usage.creation_tokens,
            "cache_read_input_tokens": self.usage.read_tokens,
            "cache_creation": {"ephemeral_5m_input_tokens": self.usage.creation_5m,
                               "ephemeral_1h_input_tokens": self.usage.creation_1h},
            "output_tokens": self.output_tokens,
            "service_tier": "standard",
        }


def finish(text: str, max_tokens: int, stop_sequences: list[str]) -> tuple[str, str, str | None]:
    """Apply stop sequences and max_tokens: (text, stop_reason, stop_sequence)."""
    limit = max_tokens * CHARS_PER_TOKEN
    first = min(((text.find(s), s) for s in stop_sequences if s in text), default=None)
    if first is not None and first[0] < limit:
        return text[:first[0]], "stop_sequence", first[1]
    if len(text) > limit:
        return text[:limit], "max_tokens", None
    return text, "end_turn", None


def thinking_blocks(request: MessagesRequest) -> tuple[tuple[dict, ...], int]:
    """The reply's thinking blocks and the output tokens they took (none when thinking is off)."""
    if request.thinking_budget is None:
        return (), 0
    question = request.latest_user_text()
    full = (f"The user asks: {question.strip()[:400]!r}. I should answer from what the "
            f"conversation says ({len(request.turns)} turns), plainly and briefly.")
    text = full[:request.thinking_budget * CHARS_PER_TOKEN]
    tokens = count_tokens(text)
    signature = _opaque(["signature", request.model, text])
    blocks = [{"type": "thinking", "thinking": text if request.thinking_shown else "",
               "signature": signature}]
    if REDACTED_TRIGGER in question:
        blocks.append({"type": "redacted_thinking", "data": _opaque(["redacted", text])})
    return tuple(blocks), tokens


def _opaque(parts: list) -> str:
    """An opaque, deterministic token (a signature, redacted data): base64 of a hash."""
    digest = hashlib.blake2b(_canonical(parts), digest_size=64).digest()
    return base64.b64encode(b"sim" + digest).decode()


def respond(request: MessagesRequest, cache: PromptCache, now: float) -> Reply:
    thinking, thought = thinking_blocks(request)
    call = tool_call(request)
    if call is not None:
        tokens = max(1, count_tokens(call["name"] + _canonical(call["input"]).decode()))
        if thought + tokens <= request.max_tokens:  # else it runs out of tokens writing text, below
            return Reply("tool_use", "", "tool_use", None, thought + tokens,
                         cache.account(request, now), call, thinking)
    task, full = generate(request)
    text, stop_reason, stop_sequence = finish(full, request.max_tokens - thought,
                                              request.stop_sequences)
    output_tokens = 0 if request.max_tokens == 0 else max(1, thought + count_tokens(text))
    return Reply(task, text, stop_reason, stop_sequence, output_tokens, cache.account(request, now),
                 thinking=thinking)
