"""Representation geometry: what a trained model's class means look like, and what they should be.

Pure (numpy/scipy/cvxpy; no config, no mlflow, no torch required). Two halves:

* **Measured geometry** (this module) of features ``[N, D]`` with labels ``[N]`` (and optionally the classifier
  weight ``[C, D]``): feature collapse FC, mean spacing MS, angular spread SD (the ECL paper's
  representation metrics), equinorm, NC1 (Papyan et al.), self-duality NC3, a minority collapse
  index, and the learned Gram matrix of the normalised class means with its distance to a target.
  Everything is vectorised over samples; only the number of classes is looped over.

* **The optimum** against which the measured Gram is held lives in `pipeline.geometry_optimum`
  (the project's formulation of the Nguyen et al. program, its verified solve, and minority
  collapse under two-level imbalance); its public names are re-exported here, so
  ``from pipeline.geometry import optimal_gram`` keeps working.

**Compare like with like** (``docs/geometry.md``): the optimum G* and the simplex describe unit
vectors that a contrastive loss sees, so only L2-normalised *projection* class means are held
against them (`normalised_gram`). Backbone features of CNNs are post-ReLU, so their uncentred cosines
are all >= 0 by construction (not so for every ViT); for them use `centred_gram` (``measure_geometry(..., gram="centred")``), which is
compared with the simplex only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .geometry_optimum import (
    Mode,
    OptimumError,
    OptimumSolution,
    TwoLevelOptimum,
    _to_numpy,
    burer_monteiro_gram,
    expected_loss,
    minority_collapse,
    minority_collapse_threshold,
    negative_multisets,
    optimal_gram,
    optimality_gap,
    simplex_gram,
    solve_optimum,
    two_level_optimum,
)

__all__ = [
    # measured geometry (this module)
    "class_means",
    "feature_collapse",
    "mean_spacing",
    "angular_spread",
    "equinorm",
    "nc1",
    "self_duality",
    "classifier_prototype_alignment",
    "normalised_gram",
    "centred_gram",
    "minority_collapse_index",
    "gram_distance",
    "measure_geometry",
    # the optimum (pipeline.geometry_optimum, re-exported)
    "Mode",
    "OptimumError",
    "OptimumSolution",
    "TwoLevelOptimum",
    "simplex_gram",
    "negative_multisets",
    "expected_loss",
    "optimal_gram",
    "solve_optimum",
    "optimality_gap",
    "burer_monteiro_gram",
    "two_level_optimum",
    "minority_collapse",
    "minority_collapse_threshold",
]


# --------------------------------------------------------------------------------------------
# Measured geometry
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _ClassStats:
    """Per-class first and second moments, computed once and shared by every metric."""

    counts: np.ndarray          # [C] samples per class in the given features
    means: np.ndarray           # [C, D] float64 class means (rows of absent classes are 0)
    traces: np.ndarray          # [C] tr(Sigma_c) with the 1/n_c (population) normalisation
    present: np.ndarray         # [C] bool, class has at least one sample


def _sorted_blocks(labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sample order grouping each class together, with start/end offsets per class."""
    counts = np.bincount(labels, minlength=num_classes)
    order = np.argsort(labels, kind="stable")
    ends = np.cumsum(counts)
    return order, ends - counts, ends


def _class_stats(features: np.ndarray, labels: np.ndarray, num_classes: int) -> _ClassStats:
    """Class means and within-class traces in float64, one vectorised block per class.

    Why per-class centring instead of E||x||^2 - ||mu||^2: at feature collapse the two terms nearly
    cancel and float32 features would report noise; centring each block in float64 is exact enough
    and still costs one pass over the data.
    """
    order, starts, ends = _sorted_blocks(labels, num_classes)
    d = features.shape[1]
    means = np.zeros((num_classes, d), dtype=np.float64)
    traces = np.zeros(num_classes, dtype=np.float64)
    counts = ends - starts
    for c in range(num_classes):
        if counts[c] == 0:
            continue
        block = features[order[starts[c]:ends[c]]].astype(np.float64)
        mu = block.mean(axis=0)
        block -= mu
        means[c] = mu
        traces[c] = np.einsum("ij,ij->", block, block) / counts[c]
    return _ClassStats(counts=counts, means=means, traces=traces, present=counts > 0)


def _check_inputs(features: Any, labels: Any, num_classes: int | None) -> tuple[np.ndarray, np.ndarray, int]:
    x = _to_numpy(features)
    y = _to_numpy(labels).astype(np.int64).reshape(-1)
    if x.ndim != 2:
        raise ValueError(f"features must be [N, D]; got shape {tuple(x.shape)}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"features have {x.shape[0]} rows but labels have {y.shape[0]} entries")
    if y.size and y.min() < 0:
        raise ValueError("labels must be class positions >= 0; drop unlabelled (-1) samples first")
    inferred = int(y.max()) + 1 if y.size else 0
    c = inferred if num_classes is None else int(num_classes)
    if inferred > c:
        raise ValueError(f"labels reach class {inferred - 1} but only {c} classes were declared")
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
    return x, y, c


def class_means(features: Any, labels: Any, num_classes: int | None = None) -> np.ndarray:
    """Class means ``[C, D]`` (float64) of features ``[N, D]``; rows of absent classes are zero."""
    x, y, c = _check_inputs(features, labels, num_classes)
    return _class_stats(x, y, c).means


def _centred(means: np.ndarray) -> np.ndarray:
    """m_c = mu_c - mu_G with the class-balanced global mean mu_G = mean_c mu_c."""
    return means - means.mean(axis=0, keepdims=True)


def _offdiag(matrix: np.ndarray) -> np.ndarray:
    """Upper-triangle entries (each unordered pair once)."""
    i, j = np.triu_indices(matrix.shape[0], k=1)
    return matrix[i, j]


def _cosines(rows: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=1)
    unit = rows / np.where(norms > 0, norms, 1.0)[:, None]
    return np.clip(unit @ unit.T, -1.0, 1.0)


def _feature_collapse(stats: _ClassStats) -> float:
    m = _centred(stats.means[stats.present])
    tr_b = float(np.mean(np.sum(m * m, axis=1)))
    return float(np.mean(stats.traces[stats.present]) / tr_b) if tr_b > 0 else math.inf


def feature_collapse(features: Any, labels: Any, num_classes: int | None = None) -> float:
    """FC = (1/C) sum_c tr(Sigma_c) / tr(Sigma_B); every class weighs the same. 0 at collapse.

    Sigma_c is the population covariance of class c, Sigma_B = (1/C) sum_c m_c m_c^T with
    m_c = mu_c - mu_G and mu_G the unweighted mean of the class means. Absent classes are skipped.
    """
    x, y, c = _check_inputs(features, labels, num_classes)
    return _feature_collapse(_class_stats(x, y, c))


def mean_spacing(means: Any) -> float:
    """MS: mean over class pairs of |cos(m_c, m_c') + 1/(C-1)|, m_c centred; 0 at a regular simplex."""
    m = _centred(np.asarray(_to_numpy(means), dtype=np.float64))
    k = m.shape[0]
    if k < 2:
        return math.nan
    return float(np.mean(np.abs(_offdiag(_cosines(m)) + 1.0 / (k - 1))))


def angular_spread(means: Any) -> float:
    """SD: standard deviation (ddof 0) over class pairs of cos(m_c, m_c'); 0 when equiangular."""
    m = _centred(np.asarray(_to_numpy(means), dtype=np.float64))
    if m.shape[0] < 2:
        return math.nan
    return float(np.std(_offdiag(_cosines(m))))


def equinorm(vectors: Any) -> float:
    """Coefficient of variation (std / mean, ddof 0) of the row norms of ``[C, D]``; 0 when equal."""
    norms = np.linalg.norm(np.asarray(_to_numpy(vectors), dtype=np.float64), axis=1)
    mean = norms.mean()
    return float(norms.std() / mean) if mean > 0 else math.nan


def _nc1(x: np.ndarray, y: np.ndarray, stats: _ClassStats, rtol: float) -> float:
    """tr(Sigma_W pinv(Sigma_B)) / C through the SVD of the centred mean matrix.

    Sigma_B = (1/C) M^T M has rank <= C - 1, so with M = U S V^T (thin, rank r):
    pinv(Sigma_B) = C V_r S_r^-2 V_r^T and NC1 = sum_j (v_j^T Sigma_W v_j) / s_j^2.
    Only the projections of the centred features onto the r directions v_j are needed: no D x D
    matrix is ever formed, which keeps D = 2048 cheap.
    """
    present = np.flatnonzero(stats.present)
    k = present.size
    m = _centred(stats.means[present])
    _, s, vt = np.linalg.svd(m, full_matrices=False)
    keep = s > rtol * (s[0] if s.size else 0.0)
    if not keep.any():
        return math.inf
    v = vt[keep].T                      # [D, r]
    order, starts, ends = _sorted_blocks(y, stats.means.shape[0])
    quad = np.zeros(v.shape[1])         # sum_c (1/n_c) sum_i ((x_i - mu_c) . v_j)^2
    for c in present:
        block = x[order[starts[c]:ends[c]]].astype(np.float64)
        proj = block @ v - stats.means[c] @ v
        quad += np.einsum("ij,ij->j", proj, proj) / (ends[c] - starts[c])
    return float(np.sum((quad / k) / s[keep] ** 2))


def nc1(features: Any, labels: Any, num_classes: int | None = None, rtol: float = 1e-6) -> float:
    """NC1 = tr(Sigma_W pinv(Sigma_B)) / C (Papyan, Han, Donoho 2020), class-balanced.

    Sigma_W = (1/C) sum_c Sigma_c and Sigma_B as in `feature_collapse`: like FC, every class weighs
    the same; on balanced data this is exactly Papyan's definition.

    Args:
        features: ``[N, D]`` features.
        labels: ``[N]`` class positions.
        num_classes: total number of classes (inferred from labels when None).
        rtol: singular values of the centred mean matrix below ``rtol * s_max`` count as zero. The
            centred means always have one null direction (they sum to zero); in float32 features it
            shows up around 1e-7 relative, so the default keeps it out.
    """
    x, y, c = _check_inputs(features, labels, num_classes)
    stats = _class_stats(x, y, c)
    return _nc1(x, y, stats, rtol) if stats.present.sum() >= 2 else math.nan


def self_duality(classifier_weight: Any, means: Any) -> float:
    """NC3: || W/||W||_F - M/||M||_F ||_F with M the centred class means (same space as W)."""
    w = np.asarray(_to_numpy(classifier_weight), dtype=np.float64)
    m = _centred(np.asarray(_to_numpy(means), dtype=np.float64))
    if w.shape != m.shape:
        raise ValueError(f"classifier weight {w.shape} and class means {m.shape} must have the same shape")
    return float(np.linalg.norm(w / np.linalg.norm(w) - m / np.linalg.norm(m)))


def classifier_prototype_alignment(classifier_weight: Any, prototypes: Any, mode: str = "auto") -> float:
    """The L_CC value: how well the classifier agrees with the class prototypes.

    ``duality``: || W/||W||_F - P/||P||_F ||_F (needs equal widths); ``gram``:
    (1/C) || What What^T - Phat Phat^T ||_F with row-normalised What, Phat (any widths). ``auto``
    picks duality when the widths match, as the ECL loss does by default.
    """
    w = np.asarray(_to_numpy(classifier_weight), dtype=np.float64)
    p = np.asarray(_to_numpy(prototypes), dtype=np.float64)
    if w.shape[0] != p.shape[0]:
        raise ValueError(f"classifier has {w.shape[0]} rows but prototypes have {p.shape[0]}")
    if mode == "auto":
        mode = "duality" if w.shape == p.shape else "gram"
    if mode == "duality":
        if w.shape != p.shape:
            raise ValueError(f"duality alignment needs equal shapes; got {w.shape} and {p.shape}")
        return float(np.linalg.norm(w / np.linalg.norm(w) - p / np.linalg.norm(p)))
    if mode == "gram":
        wn = w / np.linalg.norm(w, axis=1, keepdims=True)
        pn = p / np.linalg.norm(p, axis=1, keepdims=True)
        return float(np.linalg.norm(wn @ wn.T - pn @ pn.T) / w.shape[0])
    raise ValueError(f"alignment mode must be 'auto', 'duality' or 'gram'; got {mode!r}")


def centred_gram(means: Any) -> np.ndarray:
    """Cosines of the centred class means m_c = mu_c - mean_c mu_c ``[C, C]``.

    The comparison for backbone features: they are post-ReLU, so every uncentred cosine is >= 0 by
    construction and an uncentred Gram mostly measures that common offset. Centring removes it; a
    regular simplex of centred means has off-diagonal -1/(C-1), like `simplex_gram`.
    """
    return _cosines(_centred(np.asarray(_to_numpy(means), dtype=np.float64)))


def normalised_gram(means: Any) -> np.ndarray:
    """G_hat[c, c'] = cos(mu_c, mu_c') of the UNcentred class means ``[C, D]``.

    Uncentred on purpose: the optimum G* describes unit vectors mu_y themselves (after within-class
    collapse), not their deviations from a global mean.
    """
    return _cosines(np.asarray(_to_numpy(means), dtype=np.float64))


def minority_collapse_index(means: Any, train_counts: Any, centred: bool = False) -> tuple[float, float]:
    """Mean pairwise cosine of the normalised (uncentred) class means among tail and head classes.

    Tail classes have a training count below the median count, head classes the rest. The tail value
    is comparable to the optimum's within-minority cosine b*: 1 means the rare classes have merged
    into one direction. ``centred=True`` uses `centred_gram` instead (backbone features).
    Returns ``(tail, head)``; NaN for a group with fewer than two classes.
    """
    counts = np.asarray(_to_numpy(train_counts), dtype=np.float64)
    g = centred_gram(means) if centred else normalised_gram(means)
    tail = counts < np.median(counts)

    def pairmean(mask: np.ndarray) -> float:
        idx = np.flatnonzero(mask)
        return float(np.mean(_offdiag(g[np.ix_(idx, idx)]))) if idx.size >= 2 else math.nan

    return pairmean(tail), pairmean(~tail)


def gram_distance(gram: Any, target: Any) -> float:
    """Frobenius distance || G - G_target ||_F."""
    return float(np.linalg.norm(np.asarray(gram, dtype=np.float64) - np.asarray(target, dtype=np.float64)))


def measure_geometry(
    features: Any,
    labels: Any,
    classifier_weight: Any = None,
    train_counts: Any = None,
    optimal_gram: Any = None,
    prototypes: Any = None,
    num_classes: int | None = None,
    gram: str = "normalised",
) -> dict[str, float]:
    """Every measured-geometry number for one feature space, in one pass over the data.

    Args:
        features: ``[N, D]`` features (numpy or torch, float32 is fine; moments are taken in float64).
        labels: ``[N]`` class positions in ``[0, C)``.
        classifier_weight: ``[C, D_w]`` classifier weight; equinorm of its rows is always reported,
            self-duality only when ``D_w == D`` (the backbone space).
        train_counts: ``[C]`` training counts; enable the minority collapse indices.
        optimal_gram: ``[C, C]`` optimum G* to measure the learned Gram against.
        prototypes: ``[C, D_p]`` class prototypes; with a classifier, enables ``alignment``.
        num_classes: C, when it cannot be read from the other arguments.
        gram: ``"normalised"`` (the default; L2-normalised uncentred means, as the contrastive loss
            sees them: projections) or ``"centred"`` (cosines of the centred means: backbone
            features, which are post-ReLU). The centred Gram is compared with the simplex only, and
            its keys carry a ``centred_`` prefix so nobody mistakes them for the projection's.

    Returns:
        Floats keyed ``FC``, ``MS``, ``SD``, ``NC1``, ``equinorm_means``, ``gram_dist_simplex`` and,
        when their inputs are given, ``equinorm_classifier``, ``self_duality``, ``alignment``,
        ``minority_collapse_tail``, ``minority_collapse_head``, ``gram_dist_optimal`` (with
        ``gram="centred"``: ``centred_gram_dist_simplex``, ``centred_minority_collapse_tail/head``
        and no ``gram_dist_optimal``). Between-class
        numbers use the classes present in ``labels``; a key whose value is undefined (a group with
        fewer than two classes) is left out rather than set to NaN.

    Example:
        >>> x = np.repeat(np.eye(3), 10, axis=0); y = np.repeat(np.arange(3), 10)
        >>> round(measure_geometry(x, y)["FC"], 6), round(measure_geometry(x, y)["MS"], 6)
        (0.0, 0.0)
    """
    sizes = [n for n in (
        None if classifier_weight is None else _to_numpy(classifier_weight).shape[0],
        None if train_counts is None else len(_to_numpy(train_counts)),
        None if optimal_gram is None else _to_numpy(optimal_gram).shape[0],
        num_classes,
    ) if n is not None]
    if len(set(sizes)) > 1:
        raise ValueError(f"classifier, train counts, optimal Gram and num_classes disagree on C: {sizes}")
    x, y, c = _check_inputs(features, labels, sizes[0] if sizes else None)
    stats = _class_stats(x, y, c)
    present = np.flatnonzero(stats.present)
    if present.size < 2:
        raise ValueError(f"geometry needs samples of at least two classes; got {present.size}")
    means = stats.means[present]
    out: dict[str, float] = {
        "FC": _feature_collapse(stats),
        "MS": mean_spacing(means),
        "SD": angular_spread(means),
        "NC1": _nc1(x, y, stats, 1e-6),
        "equinorm_means": equinorm(_centred(means)),
    }
    if gram not in ("normalised", "centred"):
        raise ValueError(f"gram must be 'normalised' or 'centred'; got {gram!r}")
    centred = gram == "centred"
    if centred and optimal_gram is not None:
        raise ValueError("the optimum G* describes normalised (projection) means; it is not compared with a "
                         "centred Gram (pass optimal_gram=None with gram='centred')")
    prefix = "centred_" if centred else ""
    learned = centred_gram(means) if centred else normalised_gram(means)
    # the simplex of the classes present (for centred means: of the present classes themselves)
    target = simplex_gram(present.size) if centred else simplex_gram(c)[np.ix_(present, present)]
    out[f"{prefix}gram_dist_simplex"] = gram_distance(learned, target)
    if optimal_gram is not None:
        out["gram_dist_optimal"] = gram_distance(learned, _to_numpy(optimal_gram)[np.ix_(present, present)])
    if classifier_weight is not None:
        w = np.asarray(_to_numpy(classifier_weight), dtype=np.float64)
        out["equinorm_classifier"] = equinorm(w)
        if w.shape[1] == x.shape[1]:
            out["self_duality"] = self_duality(w[present], means)
        if prototypes is not None:
            out["alignment"] = classifier_prototype_alignment(w, prototypes)
    if train_counts is not None:
        tail, head = minority_collapse_index(means, _to_numpy(train_counts)[present], centred=centred)
        if math.isfinite(tail):
            out[f"{prefix}minority_collapse_tail"] = tail
        if math.isfinite(head):
            out[f"{prefix}minority_collapse_head"] = head
    return out
