"""HTTP Messages API <-> `llm.complete`: pure functions, no I/O.

The gateway adds no cache logic of its own: a request body of the Anthropic
Messages API becomes an `llm.complete` body (every API field kept, fields the
contract does not name in `extra`, which the broker passes upstream but never
caches), the `tiermem-*` request headers become its `cache` options, and the
broker's reply becomes the API's Message plus `tiermem-*` response headers.
An error becomes the API's own error body and status code, so the SDK raises
the exception it would raise against the real API.

Defaults without headers: exact match, scope global, class `static`, task
`messages` (a `request_tasks` task of the broker's config: global in exact
mode with any conversation, since the key covers every turn). The user for
invalidation and forget is `metadata.user_id`, unless `tiermem-user` names one.
"""

from __future__ import annotations

from typing import Any

from shared.contract import CompleteReply
from shared.errors import BadRequest, TierError

DEFAULT_TASK = "messages"
DEFAULT_VOLATILITY = "static"
# Top-level fields `llm.complete` names; any other goes to `extra` (uncached).
NAMED = ("model", "messages", "max_tokens", "system", "temperature", "top_p", "top_k",
         "stop_sequences", "tools", "tool_choice", "thinking", "metadata")
COUNT_NAMED = ("model", "messages", "system", "tools", "tool_choice", "thinking")
TRUE = frozenset({"1", "true", "yes", "on"})
FALSE = frozenset({"0", "false", "no", "off", ""})

# The API's error type for each status (https://docs.anthropic.com/en/api/errors).
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
               403: "permission_error", 404: "not_found_error", 413: "request_too_large",
               429: "rate_limit_error", 500: "api_error", 504: "timeout_error",
               529: "overloaded_error"}
# Our codes that the API spells otherwise: nothing can answer now is its "overloaded".
STATUS_OF = {503: 529, 507: 529}


class Translated:
    """What one HTTP request asks: the broker body, and whether to answer as a stream."""

    __slots__ = ("body", "stream")

    def __init__(self, body: dict, stream: bool) -> None:
        self.body, self.stream = body, stream


def complete_body(body: Any, headers: dict[str, str]) -> Translated:
    """The `llm.complete` body for an API request body and its (lower-case) headers."""
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    for name in ("model", "max_tokens", "messages"):
        if name not in body:
            raise BadRequest(f"{name}: Field required")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("stream: Input should be a valid boolean")
    out: dict[str, Any] = {k: body[k] for k in NAMED if body.get(k) is not None}
    extra = {k: v for k, v in body.items() if k not in NAMED and k != "stream"}
    if extra:
        out["extra"] = extra
    _versions(out, headers)
    out["task"] = headers.get("tiermem-task") or DEFAULT_TASK
    user = headers.get("tiermem-user") or _metadata_user(body)
    if user:
        out["user_id"] = user
    out["cache"] = cache_options(headers)
    if out["cache"]["scope"] == "user" and not user:
        raise BadRequest("tiermem-scope: user needs a user: metadata.user_id or tiermem-user")
    return Translated(out, stream)


def count_body(body: Any, headers: dict[str, str]) -> dict:
    """The `llm.count_tokens` body for a count_tokens request."""
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    for name in ("model", "messages"):
        if name not in body:
            raise BadRequest(f"{name}: Field required")
    out = {k: body[k] for k in COUNT_NAMED if body.get(k) is not None}
    extra = {k: v for k, v in body.items() if k not in COUNT_NAMED}
    if extra:
        out["extra"] = extra
    _versions(out, headers)
    return out


def _versions(out: dict, headers: dict[str, str]) -> None:
    """`anthropic-version` and `anthropic-beta` go upstream (and so into the key)."""
    if headers.get("anthropic-version"):
        out["anthropic_version"] = headers["anthropic-version"]
    betas = [b.strip() for b in headers.get("anthropic-beta", "").split(",") if b.strip()]
    if betas:
        out["betas"] = betas


def _metadata_user(body: dict) -> str | None:
    metadata = body.get("metadata")
    user = metadata.get("user_id") if isinstance(metadata, dict) else None
    return user if isinstance(user, str) and user else None


def cache_options(headers: dict[str, str]) -> dict:
    """The `cache` options of `llm.complete` from the `tiermem-*` headers."""
    mode = headers.get("tiermem-cache-mode", "exact")
    if mode not in ("off", "exact", "semantic"):
        raise BadRequest(f"tiermem-cache-mode must be off, exact or semantic, not {mode!r}")
    scope = headers.get("tiermem-scope", "global")
    if scope not in ("user", "global"):
        raise BadRequest(f"tiermem-scope must be user or global, not {scope!r}")
    opts: dict[str, Any] = {"mode": mode, "scope": scope,
                            "volatility": headers.get("tiermem-volatility") or DEFAULT_VOLATILITY,
                            "refresh": _flag(headers, "tiermem-force-refresh"),
                            "store": not _flag(headers, "tiermem-no-store")}
    if headers.get("tiermem-namespace"):
        opts["namespace"] = headers["tiermem-namespace"]
    raw_age = headers.get("tiermem-max-age")
    if raw_age is not None:
        try:
            opts["max_age_s"] = float(raw_age)
        except ValueError:
            raise BadRequest(f"tiermem-max-age must be a number of seconds, not {raw_age!r}") from None
        if not opts["max_age_s"] >= 0:
            raise BadRequest("tiermem-max-age must be >= 0")
    return opts


def _flag(headers: dict[str, str], name: str) -> bool:
    raw = headers.get(name, "").strip().lower()
    if raw in TRUE:
        return True
    if raw in FALSE:
        return False
    raise BadRequest(f"{name} must be true or false, not {raw!r}")


def message_of(reply: CompleteReply) -> dict:
    """The API Message the reply carries (one rebuilt from its text for entries stored
    before the broker kept whole messages)."""
    if reply.message is not None:
        return reply.message
    u = reply.usage
    return {"id": f"msg_tm_{(reply.cache.entry_id or 'none')[-24:]}", "type": "message",
            "role": "assistant", "model": reply.model,
            "content": [{"type": "text", "text": reply.text}] if reply.text else [],
            "stop_reason": reply.stop_reason, "stop_sequence": None,
            "usage": {"input_tokens": u.input_tokens, "output_tokens": u.output_tokens,
                      "cache_creation_input_tokens": u.cache_creation_input_tokens,
                      "cache_read_input_tokens": u.cache_read_input_tokens}}


def cache_headers(reply: CompleteReply) -> dict[str, str]:
    """What the cache did, as response headers."""
    c = reply.cache
    status = {"hit": "hit", "miss": "miss"}.get(c.status, "bypass")
    out = {"tiermem-cache": status, "tiermem-cost-usd": f"{reply.cost_usd:.8f}",
           "tiermem-saved-usd": f"{reply.saved_usd:.8f}"}
    if c.match:
        out["tiermem-match"] = c.match
    if c.similarity is not None:
        out["tiermem-similarity"] = f"{c.similarity:.4f}"
    if c.age_s is not None:
        out["tiermem-age"] = f"{c.age_s:.3f}"
    if c.entry_id:
        out["tiermem-entry"] = c.entry_id
    if c.stored is not None:
        out["tiermem-stored"] = "true" if c.stored else "false"
    if c.reason:
        out["tiermem-bypass-reason"] = c.reason
    return out


def error_status(err: TierError) -> int:
    return STATUS_OF.get(err.code, err.code if 400 <= err.code <= 599 else 500)


def error_body(status: int, message: str, request_id: str) -> dict:
    """The API's error shape."""
    kind = ERROR_TYPES.get(status) or ("api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message},
            "request_id": request_id}
