"""Temperature scaling and reliability-diagram bins.

Why temperature scaling: one scalar T fitted on validation logits fixes most of the
over-confidence of deep networks (Guo et al. 2017) without changing any prediction, because
dividing every logit of a row by the same positive T keeps its argmax. The evaluate stage fits T
on the validation split, stores it in the checkpoint, and reports test metrics before and after.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax

from pipeline.metrics import binned_calibration

__all__ = ["fit_temperature", "apply_temperature", "temperature_nll", "reliability_bins"]

#: Search range of T. Beyond it the fit is degenerate (a near-constant or near-one-hot model).
T_BOUNDS = (0.01, 100.0)


def _as_logits_labels(logits: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64)
    if z.ndim != 2 or z.shape[0] == 0:
        raise ValueError(f"logits must be [N, C] with N > 0; got shape {z.shape}")
    if y.shape != (z.shape[0],):
        raise ValueError(f"labels must be [N] with N = {z.shape[0]}; got shape {y.shape}")
    if y.min() < 0 or y.max() >= z.shape[1]:
        raise ValueError(f"labels must lie in 0..{z.shape[1] - 1}; drop unlabelled rows (-1) first")
    if not np.isfinite(z).all():
        raise ValueError("logits contain NaN or infinite values")
    return z, y


def temperature_nll(logits: Any, labels: Any, temperature: float) -> float:
    """Mean NLL of ``softmax(logits / T)`` at the true labels (computed with log-softmax)."""
    z, y = _as_logits_labels(logits, labels)
    logp = log_softmax(z / float(temperature), axis=1)
    return float(-np.mean(logp[np.arange(len(y)), y]))


def fit_temperature(logits: Any, labels: Any, bounds: tuple[float, float] = T_BOUNDS) -> float:
    """The temperature T > 0 that minimises validation NLL of ``softmax(logits / T)``.

    A bounded 1-D Brent search over ``log T`` (scipy ``minimize_scalar``): NLL is smooth and
    unimodal in ``log T`` in practice, the search has no random start, so the same logits always
    give the same T.

    Args:
        logits: [N, C] raw validation logits (not probabilities).
        labels: [N] class positions.
        bounds: search range of T.

    Returns:
        The fitted temperature, a float within `bounds`.
    """
    z, y = _as_logits_labels(logits, labels)
    lo, hi = bounds
    if not (0 < lo < hi and math.isfinite(hi)):
        raise ValueError(f"bounds must satisfy 0 < lo < hi < inf; got {bounds}")
    rows = np.arange(len(y))

    def objective(log_t: float) -> float:
        logp = log_softmax(z * math.exp(-log_t), axis=1)
        return float(-np.mean(logp[rows, y]))

    result = minimize_scalar(
        objective, bounds=(math.log(lo), math.log(hi)), method="bounded", options={"xatol": 1e-7}
    )
    return float(math.exp(result.x))


def apply_temperature(logits: Any, temperature: float) -> np.ndarray:
    """``softmax(logits / T)`` as float64 [N, C]; the argmax of every row is unchanged."""
    t = float(temperature)
    if not (t > 0 and math.isfinite(t)):
        raise ValueError(f"temperature must be a positive finite number; got {temperature!r}")
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2:
        raise ValueError(f"logits must be [N, C]; got shape {z.shape}")
    return softmax(z / t, axis=1)


def reliability_bins(
    probs: Any, labels: Any, n_bins: int = 15, class_index: int | None = None
) -> dict[str, Any]:
    """Bins for a reliability diagram: overall (top-label) or one class (one-vs-rest).

    Overall (`class_index` None): confidence is the maximum probability and accuracy is whether
    the argmax is right. Per class: confidence is ``p_c`` for every sample and "accuracy" is the
    observed frequency of ``label == c`` in the bin. Bins are the ``(lo, hi]`` bins of
    `pipeline.metrics.expected_calibration_error`, so the diagram and the ECE in the report agree.

    Returns:
        dict with ``edges`` [n_bins+1], ``counts`` [n_bins], ``confidence`` and ``accuracy``
        [n_bins] (NaN for an empty bin; plot only bins with counts > 0), ``ece`` (float, the
        weighted gap of these bins) and ``class_index``.
    """
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64)
    if p.ndim != 2 or y.shape != (p.shape[0],):
        raise ValueError(f"probs must be [N, C] and labels [N]; got {p.shape} and {y.shape}")
    if class_index is None:
        conf, outcome = p.max(axis=1), (p.argmax(axis=1) == y)
    else:
        if not 0 <= class_index < p.shape[1]:
            raise ValueError(f"class_index must lie in 0..{p.shape[1] - 1}; got {class_index}")
        conf, outcome = p[:, class_index], (y == class_index)
    bins = binned_calibration(conf, outcome.astype(np.float64), n_bins=n_bins)
    full = bins["counts"] > 0
    gap = np.abs(bins["accuracy"][full] - bins["confidence"][full])
    bins["ece"] = float(np.sum(gap * bins["counts"][full]) / max(int(bins["counts"].sum()), 1))
    bins["class_index"] = class_index
    return bins
