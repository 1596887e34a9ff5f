"""Temperature scaling and reliability bins."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.special import softmax

from pipeline import calibration as cal
from pipeline import metrics as M


def _well_specified(n: int, c: int, seed: int, true_t: float):
    """Labels drawn from softmax(z); the model reports logits true_t * z, so the best T is true_t."""
    rng = np.random.default_rng(seed)
    z = rng.normal(scale=1.5, size=(n, c))
    cum = softmax(z, axis=1).cumsum(axis=1)
    y = (rng.random((n, 1)) > cum).sum(axis=1)
    return true_t * z, np.minimum(y, c - 1)


@pytest.mark.parametrize("true_t", [0.5, 2.5])
def test_fit_temperature_recovers_true_temperature(true_t):
    logits, y = _well_specified(20000, 5, seed=0, true_t=true_t)
    t = cal.fit_temperature(logits, y)
    assert t == pytest.approx(true_t, rel=0.05)


def test_fit_temperature_minimises_nll_and_is_deterministic():
    logits, y = _well_specified(3000, 4, seed=1, true_t=3.0)
    t = cal.fit_temperature(logits, y)
    assert cal.fit_temperature(logits, y) == t
    best = cal.temperature_nll(logits, y, t)
    for other in (t * 0.99, t * 1.01, 1.0, 0.5 * t, 2 * t):
        assert best <= cal.temperature_nll(logits, y, other) + 1e-12
    grid = np.exp(np.linspace(np.log(0.1), np.log(20), 400))
    assert best <= min(cal.temperature_nll(logits, y, g) for g in grid) + 1e-9


def test_temperature_nll_matches_metrics_nll():
    logits, y = _well_specified(500, 3, seed=2, true_t=1.0)
    assert cal.temperature_nll(logits, y, 1.7) == pytest.approx(M.nll(cal.apply_temperature(logits, 1.7), y), abs=1e-10)


def test_apply_temperature_keeps_argmax_and_accuracy():
    logits, y = _well_specified(2000, 6, seed=3, true_t=4.0)
    before = softmax(logits, axis=1)
    t = cal.fit_temperature(logits, y)
    after = cal.apply_temperature(logits, t)
    np.testing.assert_array_equal(after.argmax(1), before.argmax(1))
    np.testing.assert_allclose(after.sum(1), 1.0, atol=1e-12)
    assert M.accuracy(after, y) == M.accuracy(before, y)
    assert M.balanced_accuracy(after, y) == M.balanced_accuracy(before, y)
    # an over-confident model (T = 4) becomes better calibrated
    assert M.expected_calibration_error(after, y) < 0.5 * M.expected_calibration_error(before, y)
    assert M.nll(after, y) < M.nll(before, y)


def test_apply_temperature_rejects_non_positive():
    with pytest.raises(ValueError, match="positive finite"):
        cal.apply_temperature(np.zeros((2, 2)), 0.0)
    with pytest.raises(ValueError, match=r"labels must lie in 0\.\.1"):
        cal.fit_temperature(np.zeros((2, 2)), [0, 2])


def test_reliability_bins_agree_with_ece():
    logits, y = _well_specified(1500, 4, seed=4, true_t=2.0)
    p = softmax(logits, axis=1)
    overall = cal.reliability_bins(p, y, n_bins=15)
    assert overall["counts"].sum() == 1500 and overall["edges"].shape == (16,)
    assert overall["ece"] == pytest.approx(M.expected_calibration_error(p, y, 15), abs=1e-12)
    full = overall["counts"] > 0
    assert np.isnan(overall["confidence"][~full]).all()
    assert np.all(overall["confidence"][full] > overall["edges"][:-1][full])
    assert np.all(overall["confidence"][full] <= overall["edges"][1:][full])
    per_class = [cal.reliability_bins(p, y, n_bins=15, class_index=c)["ece"] for c in range(4)]
    assert np.mean(per_class) == pytest.approx(M.classwise_ece(p, y, 15), abs=1e-12)
    # class 0's "accuracy" is the frequency of class 0 in the bin, weighted back to its prevalence
    b0 = cal.reliability_bins(p, y, n_bins=15, class_index=0)
    f0 = b0["counts"] > 0
    assert np.sum(b0["accuracy"][f0] * b0["counts"][f0]) == pytest.approx(np.sum(y == 0))
    with pytest.raises(ValueError, match=r"class_index must lie in 0\.\.3"):
        cal.reliability_bins(p, y, class_index=4)
