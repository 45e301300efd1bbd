"""A circuit breaker for the upstream model API (pure; the clock is passed in).

Closed: calls go through; `threshold` consecutive failures open it. Open:
calls are refused at once for `cooldown_s` (the broker answers 503 unless a
cached answer is servable), so a failing upstream is not hammered and callers
don't each wait out their timeouts. Half-open after the cooldown: one trial
call; success closes, failure opens again.
"""

from __future__ import annotations


class Breaker:
    def __init__(self, threshold: int = 5, cooldown_s: float = 10.0) -> None:
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self.failures = 0
        self.opened_at: float | None = None
        self._trial = False

    def state(self, now: float) -> str:
        if self.opened_at is None:
            return "closed"
        return "half_open" if now - self.opened_at >= self.cooldown_s else "open"

    def allow(self, now: float) -> bool:
        state = self.state(now)
        if state == "closed":
            return True
        if state == "half_open" and not self._trial:
            self._trial = True
            return True
        return False

    def success(self) -> None:
        self.failures = 0
        self.opened_at = None
        self._trial = False

    def failure(self, now: float) -> None:
        self.failures += 1
        self._trial = False
        if self.opened_at is not None or self.failures >= self.threshold:
            self.opened_at = now
