"""A complete Message as the Messages API's stream of server-sent events. Pure.

The sequence is the API's: `message_start` (the message with no content yet),
`ping`, then per content block `content_block_start`, its deltas and
`content_block_stop`, then `message_delta` (stop reason, output tokens) and
`message_stop`. Text goes as `text_delta`s, a tool call's input as
`input_json_delta`s of its JSON, thinking as `thinking_delta`s and a
`signature_delta`; any other block (redacted thinking, server tool results)
arrives whole in its `content_block_start`.

Used for a streamed hit of an entry whose miss was not streamed (a streamed
miss's own events are kept and replayed instead). The events are a function
of the message alone, cut into fixed-size pieces: every replay of an entry is
the same, and the SDK's stream accumulator rebuilds the very message a
non-streaming call returns.
"""

from __future__ import annotations

import msgspec

PIECE = 48  # characters per delta

_encode = msgspec.json.encode


def events(message: dict) -> list[tuple[str, dict]]:
    """(event name, data) of the whole stream of `message`."""
    usage = dict(message.get("usage") or {})
    start = {**message, "content": [], "stop_reason": None, "stop_sequence": None,
             "usage": {**usage, "output_tokens": min(1, usage.get("output_tokens") or 0)}}
    out: list[tuple[str, dict]] = [("message_start", {"type": "message_start", "message": start}),
                                   ("ping", {"type": "ping"})]
    for index, block in enumerate(message.get("content") or ()):
        out.extend(_block(index, block))
    delta_usage = {"output_tokens": usage.get("output_tokens") or 0}
    out.append(("message_delta", {"type": "message_delta",
                                  "delta": {"stop_reason": message.get("stop_reason"),
                                            "stop_sequence": message.get("stop_sequence")},
                                  "usage": delta_usage}))
    out.append(("message_stop", {"type": "message_stop"}))
    return out


def _block(index: int, block: dict) -> list[tuple[str, dict]]:
    kind = block.get("type")
    if kind == "text":
        head = {**block, "text": ""}
        deltas = [{"type": "text_delta", "text": p} for p in _pieces(block.get("text") or "")]
    elif kind in ("tool_use", "server_tool_use"):
        head = {**block, "input": {}}
        raw = _encode(block.get("input", {})).decode()
        deltas = [{"type": "input_json_delta", "partial_json": p} for p in _pieces(raw)]
    elif kind == "thinking":
        head = {**block, "thinking": "", "signature": ""}
        deltas = [{"type": "thinking_delta", "thinking": p}
                  for p in _pieces(block.get("thinking") or "")]
        if block.get("signature"):
            deltas.append({"type": "signature_delta", "signature": block["signature"]})
    else:
        head, deltas = block, []
    return [("content_block_start", {"type": "content_block_start", "index": index,
                                     "content_block": head}),
            *(("content_block_delta", {"type": "content_block_delta", "index": index,
                                       "delta": d}) for d in deltas),
            ("content_block_stop", {"type": "content_block_stop", "index": index})]


def _pieces(text: str) -> list[str]:
    return [text[i:i + PIECE] for i in range(0, len(text), PIECE)]


def frame(data: bytes) -> bytes:
    """One event (its JSON) as the API frames it: `event:` (its `type`) and `data:`
    lines, then a blank line."""
    name = msgspec.json.decode(data, type=_Typed).type
    return b"event: " + name.encode() + b"\ndata: " + data + b"\n\n"


class _Typed(msgspec.Struct):
    type: str
