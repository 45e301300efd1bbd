"""The Message a stream of Messages API events adds up to. Pure.

The broker streams a miss through to the HTTP drop-in as the model writes it
(`CompleteRequest.stream_to`) and still has to cache, cost and reply with the
whole message: this folds the events, as the API sent them, into the Message
a non-streaming call would have returned (the SDK's own accumulator works on
its typed models, and would drop what its version does not know).
"""

from __future__ import annotations

import msgspec


class Accumulator:
    def __init__(self) -> None:
        self.message: dict | None = None
        self.usage: dict = {}
        self.blocks: dict[int, dict] = {}
        self.json: dict[int, str] = {}

    def add(self, event: dict) -> None:
        kind = event.get("type")
        if kind == "message_start":
            self.message = dict(event["message"])
            self.usage = dict(self.message.get("usage") or {})
        elif kind == "content_block_start":
            self.blocks[event["index"]] = dict(event["content_block"])
        elif kind == "content_block_delta":
            self._delta(self.blocks[event["index"]], event["index"], event["delta"])
        elif kind == "content_block_stop":
            raw = self.json.pop(event["index"], None)
            if raw is not None:
                self.blocks[event["index"]]["input"] = msgspec.json.decode(raw) if raw else {}
        elif kind == "message_delta":
            if self.message is None:
                raise ValueError("message_delta before message_start")
            self.message.update(event.get("delta") or {})
            self.usage.update({k: v for k, v in (event.get("usage") or {}).items() if v is not None})

    def _delta(self, block: dict, index: int, delta: dict) -> None:
        kind = delta.get("type")
        if kind == "text_delta":
            block["text"] = block.get("text", "") + delta["text"]
        elif kind == "input_json_delta":
            self.json[index] = self.json.get(index, "") + delta["partial_json"]
        elif kind == "thinking_delta":
            block["thinking"] = block.get("thinking", "") + delta["thinking"]
        elif kind == "signature_delta":
            block["signature"] = delta["signature"]
        elif kind == "citations_delta":
            block.setdefault("citations", []).append(delta["citation"])

    def result(self) -> dict:
        """The whole Message; ValueError if the stream never started one."""
        if self.message is None:
            raise ValueError("the stream had no message_start")
        return {**self.message, "content": [self.blocks[i] for i in sorted(self.blocks)],
                "usage": self.usage}
