"""How far the durable log has got, as this gateway knows it (pure, but for `watch`).

The applier can fall behind the log without anyone being told: its consumer
is being made again after NATS restarted, Redis is slow, another gateway is
the one receiving the appends. Appends still succeed meanwhile (the stream
acknowledges them; an append's wait for the apply is bounded), so a window
answered from Redis as it is would lack messages the clients were told are
stored. `LogHead` keeps samples (when this process learned it, the log's
last seq), from this gateway's own acks and from a poll of the stream every
`POLL_S`, and says whether a position lags a seq known for longer than its
`lag_s`. L2 passes such reads down (reason `behind_log`) rather than answer.

The gateway's `lag_s` is half the auditor's grace (`AUDIT_GRACE_S`, a
message acknowledged this long before a read must be in it): a message is
learned at most `POLL_S` after its ack, so a read that would miss it passes
down before the auditor would count the reply stale.
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

    def overdue(self, position: int) -> bool:
        """True if the log held a message above `position` more than `lag_s` ago."""
        cutoff = self.clock() - self.lag_s
        self._prune(cutoff)
        samples = self._samples
        return bool(samples) and samples[0][0] <= cutoff and samples[0][1] > position

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
