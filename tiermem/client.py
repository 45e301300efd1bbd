"""tiermem's Python client: the public NATS contract as typed calls.

    async with await tiermem.AsyncClient.connect() as tm:
        ack = await tm.append("lead-42", "sales-1", "user", "Is Main St still available?", msg_id="m-1")
        window = await tm.recent("lead-42", n=10, min_seq=ack.seq)   # read-your-writes
        reply = await tm.complete({"task": "reply", "user_id": "lead-42", ...})

Replies are the contract's msgspec structs (`shared.contract`), so a field
the service renames breaks here, in one place, not in every caller. An error
reply raises the exception of its code (`shared.errors`: 400 `BadRequest`,
413 `PayloadTooLarge`, 503 `Unavailable`, 504 `UpstreamTimeout`, 507
`StorageFull`); no service answering raises `Unavailable`, a request that
outlives `timeout` raises `UpstreamTimeout`, one larger than the bus carries
raises `PayloadTooLarge` without being sent.

Each request carries the caller's OpenTelemetry context (`traceparent`), so
a span the application has open becomes the parent of every tier's spans.
Without an open span nothing is sent and each tier starts its own trace.

Credentials come from the environment the way every tiermem tool reads them:
`NATS_URL`, and `NATS_WORKER_USER` / `NATS_WORKER_PASSWORD` (or `NATS_USER`,
`NATS_CREDS`, `NATS_NKEY_SEED`; TLS from `NATS_TLS_*`); `just up` writes them
to `.tiermem/stack.env`.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Mapping
from typing import Any, TypeVar

import msgspec
from nats.aio.client import Client as NATS
from nats.errors import MaxPayloadError, NoRespondersError, TimeoutError as NatsTimeout
from opentelemetry import context as otel_context

from shared import subjects, telemetry
from shared.bus import BusAuth, connect
from shared.contract import AppendReply, CompleteReply, CompleteRequest, ForgetReply, GetReply, decoder
from shared.errors import PayloadTooLarge, TierError, Unavailable, UpstreamTimeout, from_code
from shared.permissions import WORKER

T = TypeVar("T")
_encode = msgspec.json.Encoder().encode
_DECODERS = {kind: decoder(kind) for kind in (AppendReply, GetReply, ForgetReply, CompleteReply)}


class AsyncClient:
    """One method per public request; use one client per process (it shares one connection)."""

    def __init__(self, nc: NATS, *, sidecar: str = "", timeout: float = 10.0,
                 llm_timeout: float = 60.0, owns_connection: bool = False) -> None:
        self.nc = nc
        # memory.get goes to any sidecar, or to this worker's own (`memory.get.<l1-id>`).
        self.get_subject = f"{subjects.MEMORY_GET}.{sidecar}" if sidecar else subjects.MEMORY_GET
        self.timeout = timeout
        self.llm_timeout = llm_timeout
        self._owns = owns_connection

    @classmethod
    async def connect(cls, url: str | None = None, *, env: Mapping[str, str] | None = None,
                      role: str = WORKER, **options: Any) -> AsyncClient:
        """Connect with the credentials in `env` (default: the process environment)."""
        env = os.environ if env is None else env
        url = url or env.get("NATS_URL")
        if not url:
            raise TierError("NATS_URL is not set: run `just up` and source .tiermem/stack.env, "
                            "or pass url=", 503)
        nc = await connect(url, BusAuth.from_env(env, role), name="tiermem-client")
        return cls(nc, owns_connection=True, **options)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        if self._owns and not self.nc.is_closed:
            await self.nc.drain()

    # -- memory

    async def append(self, user_id: str, bot_id: str, role: str, text: str, *, msg_id: str,
                     ts: str | None = None) -> AppendReply:
        """Store one message durably; the reply's `seq` is its place in the log.

        `msg_id` is the caller's idempotency key (unique per user): sending the
        same message again returns the first seq with `duplicate: true`.
        """
        body = {"user_id": user_id, "bot_id": bot_id, "role": role, "text": text, "msg_id": msg_id}
        if ts is not None:
            body["ts"] = ts
        return await self._request(subjects.MEMORY_APPEND, body, AppendReply)

    async def recent(self, user_id: str, n: int = 10, *, min_seq: int | None = None) -> GetReply:
        """The last `n` messages, oldest first; with `min_seq`, at least as new as that seq."""
        body: dict[str, Any] = {"user_id": user_id, "op": "recent", "n": n}
        if min_seq is not None:
            body["min_seq"] = min_seq
        return await self._request(self.get_subject, body, GetReply)

    async def search(self, user_id: str, query: str, k: int = 5) -> GetReply:
        """The `k` stored messages of this user closest to `query` (each with its `score`)."""
        return await self._request(self.get_subject, {"user_id": user_id, "op": "search", "query": query,
                                                      "k": k}, GetReply)

    async def forget(self, user_id: str) -> ForgetReply:
        """Remove everything stored for this user, in every tier and in the LLM cache."""
        return await self._request(subjects.MEMORY_FORGET, {"user_id": user_id}, ForgetReply)

    # -- llm

    async def complete(self, request: CompleteRequest | Mapping[str, Any]) -> CompleteReply:
        """`llm.complete`: a cached answer when one is valid, else Claude's (see the README)."""
        return await self._request(subjects.LLM_COMPLETE, request, CompleteReply, self.llm_timeout)

    # -- the one request path

    async def _request(self, subject: str, body, kind: type[T], timeout: float | None = None) -> T:
        headers = telemetry.inject() or None
        data = _encode(body)
        try:
            msg = await self.nc.request(subject, data, timeout=timeout or self.timeout, headers=headers)
        except MaxPayloadError:
            raise PayloadTooLarge(f"the request is {len(data):,} bytes; the bus carries at most "
                                  f"{self.nc.max_payload:,}") from None
        except NoRespondersError:
            raise Unavailable(f"no service answers {subject}") from None
        except NatsTimeout:
            raise UpstreamTimeout(f"{subject} did not answer within {timeout or self.timeout:g} s") from None
        if msg.headers and (code := msg.headers.get("Nats-Service-Error-Code")):
            raise from_code(int(code), msg.headers.get("Nats-Service-Error", ""))
        return _DECODERS[kind].decode(msg.data)


class Client:
    """The same calls, blocking: for scripts and sync frameworks.

    It runs an `AsyncClient` on an event loop in a background thread, so it
    works from any thread, including one that already runs a loop elsewhere.
    """

    def __init__(self, url: str | None = None, *, env: Mapping[str, str] | None = None,
                 role: str = WORKER, **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tiermem-client", daemon=True)
        self._thread.start()
        try:
            self._async = self._run(AsyncClient.connect(url, env=env, role=role, **options))
        except BaseException:
            self._stop()
            raise

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _call(self, method, *args, **kwargs):
        """Run an AsyncClient method under the caller's trace context (it lives in this thread)."""
        ctx = otel_context.get_current()

        async def in_context():
            token = otel_context.attach(ctx)
            try:
                return await method(*args, **kwargs)
            finally:
                otel_context.detach(token)

        return self._run(in_context())

    def _stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._run(self._async.close())
        finally:
            self._stop()

    def append(self, user_id: str, bot_id: str, role: str, text: str, *, msg_id: str,
               ts: str | None = None) -> AppendReply:
        return self._call(self._async.append, user_id, bot_id, role, text, msg_id=msg_id, ts=ts)

    def recent(self, user_id: str, n: int = 10, *, min_seq: int | None = None) -> GetReply:
        return self._call(self._async.recent, user_id, n, min_seq=min_seq)

    def search(self, user_id: str, query: str, k: int = 5) -> GetReply:
        return self._call(self._async.search, user_id, query, k)

    def forget(self, user_id: str) -> ForgetReply:
        return self._call(self._async.forget, user_id)

    def complete(self, request: CompleteRequest | Mapping[str, Any]) -> CompleteReply:
        return self._call(self._async.complete, request)
