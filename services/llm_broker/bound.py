"""The false-hit bound a partition keeps: pure math and the decision, no I/O.

Users set `max_false_hit_rate` (`shared.llm_config`, default 1 %): of the
semantic hits a partition serves, at most that share may be wrong. The
freshness auditor checks a sample of hits; each verdict is evidence about the
partition's current threshold on the guard's score, and the threshold moves
on a grid of levels (`grid`): level 0 is the guard's fitted threshold, each
level up halves the margin 1 - threshold, up to `guard.MAX_THRESHOLD`.

In the manner of vCache (per-prompt thresholds kept with a confidence bound),
the threshold is held where the evidence supports the bound:

- **tighten** (one level up) on a wrong hit that would still be served at the
  current threshold, when the Wilson upper bound (one-sided 95 %) of the
  wrong rate at this level is above the bound. Before a level has earned
  hundreds of clean checks any wrong hit moves it; a level that has proven
  itself tolerates the odd one its bound allows.
- **loosen** (one level down, never below level 0) only when that upper
  bound is at or below the bound: with no wrong hit at 1 % that takes
  `checks_to_loosen(0)` = 268 clean checks, with one wrong 446.
- every move starts the new level's counts from zero: evidence gathered at
  one threshold says nothing certain about another.

Which verdicts count as evidence about the current threshold `t` (`counts`):
a hit whose guard score is below `t` would not be served any more, so it
says nothing about `t`. A wrong hit with score >= `t` counts (whatever the
threshold in force when it was served: a wrong answer that would still be
served is evidence, the safe direction). A right one counts only if it was
served at a threshold no tighter than `t`: right hits from a tighter past
are a sample of only the top of what `t` serves and would flatter it. A
verdict without a score (a record from an older broker) counts only if it is
wrong. Exact hits never move the threshold (a wrong exact hit is stale data,
not loose matching).

`decide` is mirrored line for line by the Lua script in `thresholds.py`,
which applies it atomically in Redis for every replica; the tests check the
two agree.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.llm_config import DEFAULT_MAX_FALSE_HIT_RATE
from shared.wilson import Z95_ONE_SIDED as Z  # the Wilson bound is one-sided 95 %
from shared.wilson import wilson_upper

STEP = 0.5  # each level up multiplies the margin 1 - threshold by this
EPS = 1e-9  # thresholds are compared with this slack (they travel as decimal text)


def checks_to_loosen(wrong: int, max_rate: float = DEFAULT_MAX_FALSE_HIT_RATE, z: float = Z) -> int:
    """The fewest checks with `wrong` wrong ones whose upper bound is within `max_rate`."""
    n = max(wrong, 1)
    while wilson_upper(wrong, n, z) > max_rate:
        n *= 2
    lo = n // 2
    while lo + 1 < n:  # the bound falls with n for a fixed `wrong`: bisect
        mid = (lo + n) // 2
        lo, n = (lo, mid) if wilson_upper(wrong, mid, z) <= max_rate else (mid, n)
    return n


def grid(default: float, max_threshold: float) -> list[float]:
    """The thresholds of levels 0, 1, ...: the margin above `default` halves each level,
    and the last level is `max_threshold` (so the grid is finite)."""
    t = min(max(float(default), 0.0), max_threshold)
    levels = [t]
    while levels[-1] < max_threshold:
        nxt = 1.0 - (1.0 - levels[-1]) * STEP
        levels.append(max_threshold if nxt >= max_threshold - EPS else nxt)
    return levels


@dataclass(frozen=True, slots=True)
class State:
    """A partition's standing: its level on the grid and the evidence gathered there."""

    level: int = 0
    checks: int = 0  # verdicts counted at this level
    wrong: int = 0

    def upper(self, z: float = Z) -> float:
        return wilson_upper(self.wrong, self.checks, z)


def counts(wrong: bool, current: float, score: float | None, served_at: float | None) -> bool:
    """Is a semantic verdict evidence about threshold `current`? (see the module docstring)"""
    if score is None:
        return wrong
    if score < current - EPS:
        return False
    return wrong or (served_at is not None and served_at <= current + EPS)


def decide(state: State, wrong: bool, evidence: bool, top: int, max_rate: float,
           z: float = Z) -> tuple[State, str]:
    """The state after one semantic verdict and the move made: "tightened",
    "loosened" or "" (none). `top`: the highest level (len(grid) - 1)."""
    if not evidence:
        return state, ""
    checks, wrongs = state.checks + 1, state.wrong + int(wrong)
    upper = wilson_upper(wrongs, checks, z)
    if wrong and upper > max_rate and state.level < top:
        return State(state.level + 1), "tightened"
    if not wrong and upper <= max_rate and state.level > 0:
        return State(state.level - 1), "loosened"
    return State(state.level, checks, wrongs), ""
