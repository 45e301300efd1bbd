"""A small client of tiermem's public contract: JSON over NATS request/reply.

This is all an agent worker in any language needs (see the design's "Public
contract"):

    memory.append  {"user_id", "bot_id", "role", "text", "msg_id", "ts"?}
                   -> {"user_id", "seq", "duplicate"}
    memory.get     {"user_id", "op": "recent", "n", "min_seq"?}
                   {"user_id", "op": "search", "query", "k"}
                   -> {"user_id", "tier", "seq", "messages": [...]}
    llm.complete   {"task", "user_id", "model", "system", "messages", "max_tokens",
                    "cache": {"volatility", "mode", "scope"}}
                   -> {"text", "usage", "cost_usd", "saved_usd", "cache": {"status", "match", ...}}

`memory.get` goes to the queue group of sidecars, or to one sidecar with
`memory.get.<l1-id>` (in Kubernetes: the sidecar in the worker's own pod).
Pass the `seq` of your own append as `min_seq` and the reply is guaranteed to
include it (read-your-writes). `tier` says who answered.

Errors come back as headers `Nats-Service-Error-Code` (400 bad input, 413 too
large, 503 nothing can answer, 504 a tier below timed out) and
`Nats-Service-Error`. Every request here carries a `traceparent` header: a
sampled one asks each tier to record its spans, so one lookup can be followed
across L1, L2 and L3; an unsampled one costs nothing.

Every call returns a `Call`: the decoded reply (or the error), and what the
caller measured (wall-clock latency, trace id).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import msgspec
from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError, TimeoutError as NatsTimeout

_encode = msgspec.json.encode
_decode = msgspec.json.decode


@dataclass
class Call:
    subject: str
    code: int  # 200, or the contract's error code (504 for a client-side timeout, 503 no responders)
    reply: dict  # the body; for errors {"error": "..."}
    ms: float  # round trip as the caller saw it
    started: float  # unix time the request left
    trace_id: str
    sampled: bool

    @property
    def ok(self) -> bool:
        return self.code == 200


class Tiermem:
    """`append`, `recent`, `search`, `complete`: one method per public request."""

    def __init__(self, nc: NATS, *, sidecar: str = "", timeout: float = 10.0,
                 trace_share: float = 0.0, rng: random.Random | None = None) -> None:
        self.nc = nc
        self.get_subject = f"memory.get.{sidecar}" if sidecar else "memory.get"
        self.timeout = timeout
        self.trace_share = trace_share
        self.rng = rng or random.Random()

    async def append(self, user_id: str, bot_id: str, role: str, text: str, msg_id: str,
                     ts: str | None = None) -> Call:
        body = {"user_id": user_id, "bot_id": bot_id, "role": role, "text": text, "msg_id": msg_id}
        if ts:
            body["ts"] = ts
        return await self.request("memory.append", body)

    async def recent(self, user_id: str, n: int = 10, min_seq: int | None = None) -> Call:
        body = {"user_id": user_id, "op": "recent", "n": n}
        if min_seq is not None:
            body["min_seq"] = min_seq
        return await self.request(self.get_subject, body, trace=True)

    async def search(self, user_id: str, query: str, k: int = 5) -> Call:
        body = {"user_id": user_id, "op": "search", "query": query, "k": k}
        return await self.request(self.get_subject, body, trace=True)

    async def complete(self, body: dict) -> Call:
        return await self.request("llm.complete", body, timeout=max(self.timeout, 60.0))

    async def request(self, subject: str, body: dict, *, trace: bool = False,
                      timeout: float | None = None) -> Call:
        sampled = trace and self.rng.random() < self.trace_share
        trace_id = f"{self.rng.getrandbits(128):032x}"
        headers = {"traceparent": f"00-{trace_id}-{self.rng.getrandbits(64):016x}-{'01' if sampled else '00'}"}
        started = time.time()
        t0 = time.perf_counter()
        try:
            msg = await self.nc.request(subject, _encode(body), timeout=timeout or self.timeout,
                                        headers=headers)
        except NoRespondersError:
            return Call(subject, 503, {"error": f"no service answers {subject}"},
                        (time.perf_counter() - t0) * 1000, started, trace_id, sampled)
        except NatsTimeout:
            return Call(subject, 504, {"error": f"{subject} timed out"},
                        (time.perf_counter() - t0) * 1000, started, trace_id, sampled)
        ms = (time.perf_counter() - t0) * 1000
        code = int((msg.headers or {}).get("Nats-Service-Error-Code", 200))
        if code != 200:
            return Call(subject, code, {"error": (msg.headers or {}).get("Nats-Service-Error", "")},
                        ms, started, trace_id, sampled)
        return Call(subject, 200, _decode(msg.data), ms, started, trace_id, sampled)
