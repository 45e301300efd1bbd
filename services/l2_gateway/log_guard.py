"""Fail closed when the durable log vanished or was replaced.

Why: the gateway used to create `MEMORY` whenever it found none, so a deleted
stream came back empty and every user's history was gone without a word
(and the indexer, which also creates the stream on start-up, could do the
same). Now the gateway keeps a durable marker, in the JetStream KV bucket
`tiermem_state` (Redis is a cache and may forget), naming the incarnation of
the stream it owns (`shared.stream.incarnation`: an id kept in the stream's
metadata, which backup and restore preserve). A missing marker and a missing
stream: a first start, the stream is created. A missing marker next to a
stream: it is adopted. A marker naming another stream than the one there (or
none there): the log is lost, and the gateway refuses appends with 503, fails
`/readyz` and logs `memory_stream_lost` until an operator either

- restores the stream from a backup (`nats stream restore`): the gateway sees
  its own incarnation again within `CHECK_EVERY_S` and carries on; or
- re-initialises on purpose: sets `MEMORY_STREAM_REINIT` to the incarnation
  the error names (the lost one) and restarts the gateways. Redis is wiped,
  a new stream is created (or the one found is adopted) and recorded. The
  setting matches only that one lost stream, so leaving it set cannot
  silently accept a later loss.

Detection: at start-up, when an append's publish fails, when the applier's
consumer is lost, and every `CHECK_EVERY_S` (one stream info and one KV get).
Between two checks a stream recreated by someone else could take appends;
the window is at most `CHECK_EVERY_S`.
"""

from __future__ import annotations

import asyncio
import enum

import structlog
from nats.errors import Error as NatsError, TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from shared import stream, subjects

log = structlog.get_logger()
MARKER_KEY = "memory-stream"
CHECK_EVERY_S = 2.0


class Verdict(enum.Enum):
    CREATE = "create"  # first start: no marker, no stream
    ADOPT = "adopt"  # a stream and no marker (made before markers, or by the indexer first)
    OK = "ok"  # the stream the marker names
    REINIT = "reinit"  # lost, and the operator asked to start over from exactly this loss
    LOST = "lost"


def judge(marker: str | None, found: str | None, reinit: str) -> Verdict:
    """What to do, given the marker's incarnation, the stream's (None: absent) and the setting."""
    if marker is None:
        return Verdict.CREATE if found is None else Verdict.ADOPT
    if found == marker:
        return Verdict.OK
    return Verdict.REINIT if reinit and reinit == marker else Verdict.LOST


def lost_message(marker: str, found: str | None) -> str:
    what = "is gone" if found is None else f"was replaced by another stream (incarnation {found})"
    return (f"the durable log {subjects.STREAM} (incarnation {marker}) {what}; appends are refused "
            f"so that no history is silently lost. An operator must restore the stream from a "
            f"backup, or re-initialise with an empty history: set MEMORY_STREAM_REINIT={marker} "
            f"and restart the l2-gateway")


class LogGuard:
    """Knows whether the stream is the one the gateway owns; `lost` says why not."""

    def __init__(self, js: JetStreamContext, replicas: int, reinit: str) -> None:
        self.js = js
        self.replicas = replicas
        self.reinit = reinit
        self.lost = ""  # the error appends get, while the log is lost
        self._kv: KeyValue | None = None

    async def open(self) -> bool:
        """At start-up: create, adopt or re-initialise the stream, or find it lost.

        Returns True if Redis must be wiped (re-initialised: its windows describe
        the lost stream).
        """
        marker, found = await self._marker(), await self._found()
        verdict = judge(marker, found and stream.incarnation(found), self.reinit)
        if verdict in (Verdict.CREATE, Verdict.REINIT) and found is None:
            found = await stream.create_stream(self.js, self.replicas)
        if verdict is Verdict.LOST:
            self._set_lost(marker, found and stream.incarnation(found))
            return False
        if verdict is not Verdict.OK:
            await self._record(marker, stream.incarnation(found))
            log.warning("memory_stream_initialised", verdict=verdict.value,
                        incarnation=stream.incarnation(found), replaced=marker)
        return verdict is Verdict.REINIT

    async def check(self) -> str:
        """Look again (the stream may have been deleted, replaced or restored); returns `lost`."""
        try:
            marker, found = await self._marker(), await self._found()
        except (NatsError, NatsTimeout, asyncio.TimeoutError) as exc:
            log.warning("memory_stream_check_failed", error=str(exc))
            return self.lost
        incarnation = found and stream.incarnation(found)
        if marker is not None and incarnation != marker:
            self._set_lost(marker, incarnation)
        elif self.lost:
            log.warning("memory_stream_recovered", incarnation=incarnation)
            self.lost = ""
        return self.lost

    async def ready(self) -> None:
        """`/readyz`: fails, with the reason, while the log is lost."""
        if await self.check():
            raise RuntimeError(self.lost)

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(CHECK_EVERY_S)
            await self.check()

    def _set_lost(self, marker: str, found: str | None) -> None:
        message = lost_message(marker, found)
        if message != self.lost:
            log.error("memory_stream_lost", incarnation=marker, found=found, error=message)
        self.lost = message

    async def _found(self):
        try:
            return await self.js.stream_info(subjects.STREAM)
        except NotFoundError:
            return None

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            try:
                self._kv = await self.js.key_value(subjects.STATE_BUCKET)
            except BucketNotFoundError:
                # History: every incarnation ever recorded stays visible (`nats kv history`).
                self._kv = await self.js.create_key_value(KeyValueConfig(
                    bucket=subjects.STATE_BUCKET, history=16, storage=StorageType.FILE,
                    replicas=self.replicas, direct=True))
        return self._kv

    async def _marker(self) -> str | None:
        try:
            return (await (await self._bucket()).get(MARKER_KEY)).value.decode()
        except KeyNotFoundError:
            return None

    async def _record(self, marker: str | None, incarnation: str) -> None:
        kv = await self._bucket()
        if marker is None:
            try:
                await kv.create(MARKER_KEY, incarnation.encode())
            except KeyWrongLastSequenceError:  # another replica recorded it first
                pass
        else:
            await kv.put(MARKER_KEY, incarnation.encode())
