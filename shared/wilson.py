"""The Wilson score interval of a proportion: the one copy every part uses.

The llm-broker keeps each partition's false-hit rate under its bound with the
one-sided upper end (`bound`), the freshness-auditor reports the same upper end
beside each observed rate (`audit.stats`), and the benches print two-sided
intervals of hit and false-hit rates. Wilson rather than the normal
approximation because the rates of interest sit near 0, where p ± z·se leaves
[0, 1] and claims certainty after a handful of clean checks.
"""

from __future__ import annotations

import math

Z95 = 1.96  # two-sided 95 %
Z95_ONE_SIDED = 1.6449  # one-sided 95 %: an upper bound that holds 95 % of the time


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """(lower, upper) of the proportion `k` of `n`; (0, 1) without observations."""
    if n < 0 or not 0 <= k <= max(n, 0):
        raise ValueError(f"need 0 <= k <= n, got {k}/{n}")
    if n == 0:
        return 0.0, 1.0
    p, zz = k / n, z * z
    centre = p + zz / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + zz / (4 * n * n))
    den = 1 + zz / n
    return max(0.0, (centre - spread) / den), min(1.0, (centre + spread) / den)


def wilson_upper(k: int, n: int, z: float = Z95_ONE_SIDED) -> float:
    """The one-sided upper bound of the proportion `k` of `n` (95 % by default); 1.0 without
    observations."""
    return wilson(k, n, z)[1]
