"""The one Wilson interval (shared/wilson.py) the broker, the auditor and the benches use."""

from __future__ import annotations

import pytest

from shared.wilson import wilson, wilson_upper


def test_wilson_upper_matches_known_values():
    # 0 of n: (z^2 / n) / (1 + z^2 / n); 1 of 100, worked by hand from the Wilson formula:
    # (0.01 + 0.013529 + 1.6449 * sqrt(0.000099 + 0.0000676)) / 1.027057 = 0.04358
    assert wilson_upper(0, 0) == 1.0
    assert wilson_upper(0, 100) == pytest.approx(2.7057 / 102.7057, rel=1e-4)
    assert wilson_upper(1, 100) == pytest.approx(0.04358, abs=1e-4)
    assert wilson_upper(5, 5) == 1.0
    with pytest.raises(ValueError):
        wilson_upper(3, 2)


def test_wilson_interval_contains_the_rate_and_is_honest_at_the_edges():
    lo, hi = wilson(3, 304)
    assert lo < 3 / 304 < hi and hi > 0.01  # 3 of 304 does not prove "<= 1 %"
    assert wilson(0, 100)[0] == 0.0 and 0 < wilson(0, 100)[1] < 0.05
    assert wilson(100, 100)[1] == pytest.approx(1.0) and wilson(100, 100)[0] > 0.95
    assert wilson(0, 0) == (0.0, 1.0)
    for bad in ((5, 4), (-1, 3), (0, -1)):
        with pytest.raises(ValueError):
            wilson(*bad)


def test_the_one_sided_bound_is_the_upper_end_of_a_narrower_interval():
    # one-sided 95 % uses z = 1.6449, the two-sided 90 % interval's z: a lower upper end
    assert wilson_upper(3, 304) == pytest.approx(wilson(3, 304, z=1.6449)[1])
    assert wilson_upper(3, 304) < wilson(3, 304)[1]
