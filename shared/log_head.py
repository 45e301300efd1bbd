"""How far the durable log has got, as this process knows it (pure, but for `watch`).

A tier can fall behind the log without anyone being told: the gateway's
applier is making its consumer again after NATS restarted, Redis or Postgres
is slow, an indexer is stuck. Appends still succeed meanwhile (the stream
acknowledges them; an append's wait for the apply is bounded), so a window
answered as it is would lack messages the clients were told are stored.
`LogHead` keeps samples (when this process learned it, the log's last seq),
from the process's own acks and from a poll of the stream every `POLL_S`,
and says which position has been in the log for longer than its `lag_s`
(`due`). L2 passes a read down when its applied position is below that
(reason `behind_log`); L3 waits for its indexed floor to reach it, as for
a `min_seq`, and says 503 if it does not.

`lag_s` is half the auditor's grace (`AUDIT_GRACE_S`: a message acknowledged
this long before a read must be in it): a message is learned at most
`POLL_S` after its ack, so such a read is refused before the auditor would
count its reply stale.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

import structlog
from nats.errors import Error as NatsError, TimeoutError as NatsTimeout

from shared import stream

log = structlog.get_logger()
POLL_S = 0.25


class LogHead:
    def __init__(self, lag_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.lag_s = lag_s
        self.clock = clock
        # (learned at, seq), both increasing: the newest sample older than `lag_s`
        # and every later one (what `overdue` needs), nothing else.
        self._samples: deque[tuple[float, int]] = deque()

    def saw(self, seq: int) -> None:
        """The log holds messages up to `seq` (an ack, or the stream's state)."""
        samples = self._samples
        if not samples or seq > samples[-1][1]:
            samples.append((self.clock(), seq))
            self._prune(self.clock() - self.lag_s)

    def due(self) -> int:
        """The highest seq the log has held for more than `lag_s` (0: none known)."""
        cutoff = self.clock() - self.lag_s
        self._prune(cutoff)
        samples = self._samples
        return samples[0][1] if samples and samples[0][0] <= cutoff else 0

    def _prune(self, cutoff: float) -> None:
        samples = self._samples
        while len(samples) > 1 and samples[1][0] <= cutoff:
            samples.popleft()

    async def watch(self, js) -> None:
        """Learn the other gateways' appends: the stream's last seq, every `POLL_S`."""
        while True:
            try:
                self.saw(await stream.last_seq(js))
            except (NatsError, NatsTimeout, asyncio.TimeoutError) as exc:
                log.debug("log_head_poll_failed", error=str(exc) or repr(exc))
            await asyncio.sleep(POLL_S)
