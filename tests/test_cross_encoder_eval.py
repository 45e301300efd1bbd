"""The pieces bench/cross_encoder_eval.py adds to the guard's fitting: an
extra verifier feature under a sign constraint, fitted on the fit halves only."""

from __future__ import annotations

import numpy as np

from bench import cross_encoder_eval as xe
from bench import guard_calibration as gc


def _data(n: int, rng: np.random.Generator) -> gc.Data:
    """Synthetic pairs: the guard's features are noise, labels alternate,
    halves alternate in blocks of two so both labels land in both halves."""
    labels = np.arange(n) % 2
    fit = (np.arange(n) // 2) % 2 == 0
    pairs = [gc.Pair("s", int(y), str(i), f"a{i}", f"b{i}") for i, y in enumerate(labels)]
    vetoed = np.zeros(n, dtype=bool)
    vetoed[:8] = True
    return gc.Data(pairs=pairs, cos=rng.uniform(0.5, 1.0, n), x=rng.normal(size=(n, len(gc.guard.FEATURES))),
                   labels=labels, fit=fit, vetoed=vetoed, differs=np.zeros(n, dtype=bool),
                   same=np.zeros(n, dtype=bool), sets=np.array(["s"] * n))


def test_a_feature_fitted_against_its_sign_is_dropped():
    rng = np.random.default_rng(0)
    y = np.arange(400) % 2
    x = np.c_[y + rng.normal(0, 0.5, 400), y + rng.normal(0, 0.5, 400)]  # both rise with the label
    weights, _ = gc.fit_logistic(x, y, np.ones(400), signs=np.array([1, -1]))
    assert weights[0] > 0
    assert weights[1] == 0.0  # it may only push the score down, so it is dropped


def test_the_extra_feature_carries_the_verdict_and_the_rules_still_refuse():
    rng = np.random.default_rng(1)
    d = _data(400, rng)
    extra = d.labels + rng.normal(0, 0.1, len(d.labels))  # a pair score that separates the labels
    weights, threshold, score = xe.with_extra_feature(d, extra, floor=0.0)
    assert weights[-1] > 0
    assert np.isneginf(score[:8]).all()  # vetoed pairs never reach the verifier
    rep = ~d.fit & ~d.vetoed
    served = score[rep] >= threshold
    assert served[d.labels[rep] == 1].mean() > 0.9
    assert served[d.labels[rep] == 0].mean() <= 0.01


def test_every_candidate_says_why_it_fails():
    assert xe.CANDIDATES
    for c in xe.CANDIDATES:
        assert set(c) == {"package", "model", "wheel", "trained_on", "fails"}
        assert all(c[k].strip() for k in c)
