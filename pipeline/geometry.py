"""Representation geometry: what a trained model's class means look like, and what they should be.

Two halves, both pure (numpy/scipy/cvxpy; no config, no mlflow, no torch required):

* **Measured geometry** of features ``[N, D]`` with labels ``[N]`` (and optionally the classifier
  weight ``[C, D]``): feature collapse FC, mean spacing MS, angular spread SD (the ECL paper's
  representation metrics), equinorm, NC1 (Papyan et al.), self-duality NC3, a minority collapse
  index, and the learned Gram matrix of the normalised class means with its distance to a target.
  Everything is vectorised over samples; only the number of classes is looped over.

* **The optimum** against which the measured Gram is held. Following "Optimal Representations for
  Generalized Contrastive Learning with Imbalanced Datasets" (Nguyen, Aeron, Brown, Ishwar,
  arXiv 2605.11291), the best class-mean geometry under imbalance is not a regular simplex but the
  solution of a convex program in the Gram matrix ``G`` of unit class means. The paper's body was
  not available offline: the program solved here is **this project's precise formulation** of it
  (see ``docs`` and ``shared/design/geometry.md``)::

      minimise over symmetric G   sum_y p_y * E_{c_1..c_k ~ q_y} log(1 + sum_i exp((G[y, c_i] - 1) / tau))
      subject to                  G >= 0 (PSD),  diag(G) = 1

  with ``q_y(c) = p_c / (1 - p_y)`` for ``c != y`` (supervised, "scl") or ``q(c) = p_c``
  (unsupervised, "ucl"). The expectation is expanded exactly over multisets of negative classes with
  multinomial weights and handed to cvxpy (log_sum_exp + PSD cone, solved by Clarabel).

  Under two-level imbalance (K_A majority classes of proportion p_A, K_B minority classes of
  proportion p_B, R = p_A / p_B) symmetry reduces the program to three cosines a (within majority),
  b (within minority), c (across). Beyond a threshold R* the optimum puts b = 1: the minority classes
  share one direction ("minority collapse"). Generic conic solvers lose the O(p_B^2) minority terms at
  large R, so the reduced problem is solved directly in float64 with nested bounded 1-D searches.
"""
from __future__ import annotations

import itertools
import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

__all__ = [
    "Mode",
    "TwoLevelOptimum",
    "class_means",
    "feature_collapse",
    "mean_spacing",
    "angular_spread",
    "equinorm",
    "nc1",
    "self_duality",
    "classifier_prototype_alignment",
    "normalised_gram",
    "minority_collapse_index",
    "simplex_gram",
    "gram_distance",
    "measure_geometry",
    "negative_multisets",
    "expected_loss",
    "optimal_gram",
    "two_level_optimum",
    "minority_collapse",
    "minority_collapse_threshold",
]

Mode = Literal["scl", "ucl"]

# Tighter than Clarabel's defaults: the loss is flat around its minimum, so G's error goes like the square
# root of the objective's. Gaps of 1e-10 plus a smaller static regularisation (the default 1e-8 stalls
# some symmetric cases near 1e-5) give G to about 1e-9 on the simplex checks, in milliseconds for K <= 10.
_SOLVER_OPTIONS: dict[str, dict[str, float]] = {
    "CLARABEL": {"tol_gap_abs": 1e-10, "tol_gap_rel": 1e-10, "tol_feas": 1e-10,
                 "static_regularization_constant": 1e-10, "max_iter": 500},
}

# Above this many (anchor, multiset) terms the conic program gets slow and memory-hungry; K = 8
# classes with k = 3 negatives needs 672 (scl) or 960 (ucl), far below it.
_MAX_TERMS = 50_000


# --------------------------------------------------------------------------------------------
# Measured geometry
# --------------------------------------------------------------------------------------------
def _to_numpy(x: Any) -> np.ndarray:
    """Accept numpy arrays, torch tensors (any device) and nested lists."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


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


def normalised_gram(means: Any) -> np.ndarray:
    """G_hat[c, c'] = cos(mu_c, mu_c') of the UNcentred class means ``[C, D]``.

    Uncentred on purpose: the optimum G* describes unit vectors mu_y themselves (after within-class
    collapse), not their deviations from a global mean.
    """
    return _cosines(np.asarray(_to_numpy(means), dtype=np.float64))


def minority_collapse_index(means: Any, train_counts: Any) -> tuple[float, float]:
    """Mean pairwise cosine of the normalised (uncentred) class means among tail and head classes.

    Tail classes have a training count below the median count, head classes the rest. The tail value
    is comparable to the optimum's within-minority cosine b*: 1 means the rare classes have merged
    into one direction. Returns ``(tail, head)``; NaN for a group with fewer than two classes.
    """
    counts = np.asarray(_to_numpy(train_counts), dtype=np.float64)
    g = normalised_gram(means)
    tail = counts < np.median(counts)

    def pairmean(mask: np.ndarray) -> float:
        idx = np.flatnonzero(mask)
        return float(np.mean(_offdiag(g[np.ix_(idx, idx)]))) if idx.size >= 2 else math.nan

    return pairmean(tail), pairmean(~tail)


def simplex_gram(num_classes: int) -> np.ndarray:
    """Gram of the regular simplex ETF: 1 on the diagonal, -1/(C-1) off it."""
    if num_classes < 2:
        return np.ones((num_classes, num_classes))
    g = np.full((num_classes, num_classes), -1.0 / (num_classes - 1))
    np.fill_diagonal(g, 1.0)
    return g


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

    Returns:
        Floats keyed ``FC``, ``MS``, ``SD``, ``NC1``, ``equinorm_means``, ``gram_dist_simplex`` and,
        when their inputs are given, ``equinorm_classifier``, ``self_duality``, ``alignment``,
        ``minority_collapse_tail``, ``minority_collapse_head``, ``gram_dist_optimal``. Between-class
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
    gram = normalised_gram(means)
    out["gram_dist_simplex"] = gram_distance(gram, simplex_gram(c)[np.ix_(present, present)])
    if optimal_gram is not None:
        out["gram_dist_optimal"] = gram_distance(gram, _to_numpy(optimal_gram)[np.ix_(present, present)])
    if classifier_weight is not None:
        w = np.asarray(_to_numpy(classifier_weight), dtype=np.float64)
        out["equinorm_classifier"] = equinorm(w)
        if w.shape[1] == x.shape[1]:
            out["self_duality"] = self_duality(w[present], means)
        if prototypes is not None:
            out["alignment"] = classifier_prototype_alignment(w, prototypes)
    if train_counts is not None:
        tail, head = minority_collapse_index(means, _to_numpy(train_counts)[present])
        if math.isfinite(tail):
            out["minority_collapse_tail"] = tail
        if math.isfinite(head):
            out["minority_collapse_head"] = head
    return out


# --------------------------------------------------------------------------------------------
# The optimum G*
# --------------------------------------------------------------------------------------------
def _check_loss_args(negatives: int, temperature: float, mode: str) -> None:
    if int(negatives) != negatives or negatives < 1:
        raise ValueError(f"negatives must be a whole number >= 1; got {negatives!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature!r}")
    if mode not in ("scl", "ucl"):
        raise ValueError(f"mode must be 'scl' (supervised) or 'ucl' (unsupervised); got {mode!r}")


def _check_proportions(proportions: Any) -> np.ndarray:
    p = np.asarray(_to_numpy(proportions), dtype=np.float64).reshape(-1)
    if p.size < 2:
        raise ValueError(f"the optimum needs at least two classes; got {p.size}")
    if not np.all(np.isfinite(p)) or np.any(p <= 0):
        raise ValueError("class proportions must be finite and > 0 (every class needs training samples)")
    return p / p.sum()


def _negative_distribution(p: np.ndarray, y: int, mode: str) -> np.ndarray:
    """q_y over classes: p_c / (1 - p_y) off y for scl; p itself for ucl."""
    if mode == "ucl":
        return p.copy()
    q = p / (1.0 - p[y])
    q[y] = 0.0
    return q


def negative_multisets(q: np.ndarray, negatives: int) -> list[tuple[float, dict[int, int]]]:
    """All multisets of ``negatives`` classes drawn i.i.d. from ``q``, with their probabilities.

    The probability of a multiset with multiplicities m_c is k! / prod(m_c!) * prod(q_c^m_c).
    Returns a list of ``(probability, {class: multiplicity})``; probabilities sum to 1.
    """
    support = [c for c in range(q.size) if q[c] > 0]
    out: list[tuple[float, dict[int, int]]] = []
    for combo in itertools.combinations_with_replacement(support, negatives):
        mult: dict[int, int] = {}
        for c in combo:
            mult[c] = mult.get(c, 0) + 1
        weight = math.factorial(negatives)
        for c, m in mult.items():
            weight = weight / math.factorial(m) * q[c] ** m
        out.append((float(weight), mult))
    return out


def _n_terms(k_classes: int, negatives: int, mode: str) -> int:
    support = k_classes if mode == "ucl" else k_classes - 1
    return k_classes * math.comb(support + negatives - 1, negatives)


def expected_loss(gram: Any, proportions: Any, negatives: int = 1, temperature: float = 0.1,
                  mode: Mode = "scl") -> float:
    """The program's objective evaluated at a given Gram ``[K, K]`` (numpy, float64).

    Use it to score a learned Gram against the optimum's objective value.
    """
    _check_loss_args(negatives, temperature, mode)
    p = _check_proportions(proportions)
    g = np.asarray(_to_numpy(gram), dtype=np.float64)
    total = 0.0
    for y in range(p.size):
        for w, mult in negative_multisets(_negative_distribution(p, y, mode), negatives):
            inner = sum(m * math.exp((g[y, c] - 1.0) / temperature) for c, m in mult.items())
            total += p[y] * w * math.log1p(inner)
    return total


def optimal_gram(proportions: Any, negatives: int = 1, temperature: float = 0.1,
                 mode: Mode = "scl", solver: str | None = None) -> tuple[np.ndarray, float]:
    """Solve the project's formulation of the Nguyen et al. program for the optimal Gram G*.

    Args:
        proportions: ``[K]`` class proportions (or counts; they are normalised), all > 0.
        negatives: k, the number of negatives per anchor.
        temperature: tau of the InfoNCE-type loss psi.
        mode: ``"scl"`` (negatives from the other classes) or ``"ucl"`` (from all classes).
        solver: a cvxpy solver name; default Clarabel, falling back to SCS.

    Returns:
        ``(G, objective)``: G ``[K, K]`` symmetric PSD with unit diagonal, and the minimal expected loss.

    Raises:
        ValueError: bad arguments, or an expansion too large to solve (lower ``negatives``).
        RuntimeError: the solver did not reach an optimal solution.

    The expectation is expanded over multisets of negatives: per anchor class y and multiset
    {c: m_c}, the term is log_sum_exp([0] + [log m_c + (G[y, c] - 1)/tau]). Terms with the same number
    of distinct negatives are stacked, so cvxpy sees a handful of vectorised log_sum_exp atoms.
    """
    import cvxpy as cp  # the only cvxpy import in the project; deferred so `import pipeline.geometry` is cheap

    _check_loss_args(negatives, temperature, mode)
    p = _check_proportions(proportions)
    k_classes = p.size
    n_terms = _n_terms(k_classes, negatives, mode)
    if n_terms > _MAX_TERMS:
        raise ValueError(
            f"{k_classes} classes with {negatives} negatives expand to {n_terms} loss terms "
            f"(limit {_MAX_TERMS}); use fewer negatives")
    # Group terms by the number of distinct negative classes d: rows (anchor, classes, log-mults, weight).
    groups: dict[int, tuple[list[int], list[list[int]], list[list[float]], list[float]]] = {}
    for y in range(k_classes):
        for w, mult in negative_multisets(_negative_distribution(p, y, mode), negatives):
            ys, cs, logm, ws = groups.setdefault(len(mult), ([], [], [], []))
            ys.append(y)
            cs.append(list(mult.keys()))
            logm.append([math.log(m) for m in mult.values()])
            ws.append(p[y] * w)
    # The loss can be tiny (about exp(-1.5/tau) at tau = 0.1), which the solver's absolute tolerances
    # would swamp; dividing by its value at the simplex makes the program well scaled, same argmin.
    scale = 1.0 / max(expected_loss(simplex_gram(k_classes), p, negatives, temperature, mode), 1e-300)
    g = cp.Variable((k_classes, k_classes), PSD=True)
    objective = 0
    for d, (ys, cs, logm, ws) in groups.items():
        ys_arr, cs_arr, logm_arr = np.asarray(ys), np.asarray(cs), np.asarray(logm)
        rows = [np.zeros(len(ys))]
        for j in range(d):
            rows.append(g[ys_arr, cs_arr[:, j]] / temperature + (logm_arr[:, j] - 1.0 / temperature))
        objective = objective + (scale * np.asarray(ws)) @ cp.log_sum_exp(cp.vstack(rows), axis=0)
    problem = cp.Problem(cp.Minimize(objective), [cp.diag(g) == 1])
    installed = cp.installed_solvers()
    candidates = [solver] if solver else [s for s in ("CLARABEL", "SCS") if s in installed]
    if not candidates:
        raise RuntimeError(f"no conic solver for the optimum; cvxpy has {installed}, needs CLARABEL or SCS")
    last: Exception | None = None
    for name in candidates:
        try:
            with warnings.catch_warnings():
                # OPTIMAL_INACCURATE is accepted below (at tau = 0.1 Clarabel sometimes stops a hair
                # short of its 1e-8 gaps; G is then still right to about 1e-5), so its warning is noise.
                warnings.simplefilter("ignore", UserWarning)
                cvx_logger = logging.getLogger("__cvxpy__")  # cvxpy logs the same residual notice
                level = cvx_logger.level
                cvx_logger.setLevel(logging.ERROR)
                try:
                    problem.solve(solver=name, **_SOLVER_OPTIONS.get(name, {}))
                finally:
                    cvx_logger.setLevel(level)
        except cp.error.SolverError as err:  # try the next solver
            last = err
            continue
        if problem.status in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE) and g.value is not None:
            value = np.asarray(g.value, dtype=np.float64)
            value = (value + value.T) / 2.0
            np.fill_diagonal(value, 1.0)
            return value, expected_loss(value, p, negatives, temperature, mode)
        last = RuntimeError(f"{name} ended with status {problem.status}")
    raise RuntimeError(f"the optimal-Gram program was not solved: {last}")


# --------------------------------------------------------------------------------------------
# Two-level imbalance: the reduced three-cosine problem and minority collapse
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TwoLevelOptimum:
    """Optimum of the reduced problem: within-majority a, within-minority b, cross c, loss value."""

    a: float
    b: float
    c: float
    objective: float
    collapsed: bool


@dataclass(frozen=True)
class _Reduced:
    """Exact type-count expansion of the loss for two-level proportions at one ratio R."""

    weight: tuple[float, float]                       # total anchor mass of majority, minority
    terms: tuple[np.ndarray, np.ndarray]              # per group: [T, 4] rows (prob, n_same, n_cross, n_self)
    k_major: int
    k_minor: int
    temperature: float


def _reduced(k_major: int, k_minor: int, ratio: float, negatives: int, temperature: float, mode: str) -> _Reduced:
    """Expand the expectation by how many negatives fall in each cosine type.

    Only cosines enter psi, so for an anchor of group g a draw of k negatives matters only through
    (n_same, n_cross, n_self) = negatives in its own group (other classes), in the other group, and
    (ucl only) in its own class: a multinomial over three cells, which is exact.
    """
    p_minor = 1.0 / (k_major * ratio + k_minor)
    p_major = ratio * p_minor
    groups = ((k_major, p_major, k_minor, p_minor), (k_minor, p_minor, k_major, p_major))
    terms = []
    for k_own, p_own, k_other, p_other in groups:
        if mode == "scl":
            cells = ((k_own - 1) * p_own / (1 - p_own), k_other * p_other / (1 - p_own), 0.0)
        else:
            cells = ((k_own - 1) * p_own, k_other * p_other, p_own)
        rows = []
        for n_same in range(negatives + 1):
            for n_cross in range(negatives + 1 - n_same):
                n_self = negatives - n_same - n_cross
                prob = (math.factorial(negatives) / (math.factorial(n_same) * math.factorial(n_cross)
                                                     * math.factorial(n_self))
                        * cells[0] ** n_same * cells[1] ** n_cross * cells[2] ** n_self)
                if prob > 0:
                    rows.append((prob, n_same, n_cross, n_self))
        terms.append(np.asarray(rows, dtype=np.float64))
    return _Reduced((k_major * p_major, k_minor * p_minor), (terms[0], terms[1]), k_major, k_minor, temperature)


def _cross(r: _Reduced, a: float, b: float) -> float:
    """The optimal cross cosine c*(a, b) = -sqrt((1+(K_A-1)a)(1+(K_B-1)b) / (K_A K_B)).

    The loss increases with c and PSD-ness of the block Gram needs
    (1+(K_A-1)a)(1+(K_B-1)b) >= K_A K_B c^2, so c sits on that boundary, on the negative side.
    """
    u = max(1.0 + (r.k_major - 1) * a, 0.0)
    v = max(1.0 + (r.k_minor - 1) * b, 0.0)
    return -math.sqrt(u * v / (r.k_major * r.k_minor))


def _objective(r: _Reduced, a: float, b: float) -> float:
    c = _cross(r, a, b)
    total = 0.0
    for weight, rows, own in zip(r.weight, r.terms, (a, b)):
        inner = (1.0 + rows[:, 1] * math.exp((own - 1.0) / r.temperature)
                 + rows[:, 2] * math.exp((c - 1.0) / r.temperature) + rows[:, 3])
        total += weight * float(rows[:, 0] @ np.log(inner))
    return total


def _d_objective_db(r: _Reduced, a: float, b: float) -> float:
    """d/db of the objective with c = c*(a, b): F_b + F_c * dc*/db (closed form)."""
    c = _cross(r, a, b)
    tau = r.temperature
    e_a, e_b, e_c = (math.exp((t - 1.0) / tau) for t in (a, b, c))
    f_b = 0.0
    f_c = 0.0
    for weight, rows, e_own, is_minor in zip(r.weight, r.terms, (e_a, e_b), (False, True)):
        denom = 1.0 + rows[:, 1] * e_own + rows[:, 2] * e_c + rows[:, 3]
        f_c += weight * float(rows[:, 0] @ (rows[:, 2] * e_c / tau / denom))
        if is_minor:
            f_b += weight * float(rows[:, 0] @ (rows[:, 1] * e_b / tau / denom))
    v = 1.0 + (r.k_minor - 1) * b
    dc_db = c * (r.k_minor - 1) / (2.0 * v) if v > 0 else -math.inf
    return f_b + f_c * dc_db


def _bounded_min(fun: Any, lo: float, hi: float) -> tuple[float, float]:
    """Minimise a convex 1-D function on [lo, hi], endpoints included (Brent never evaluates them)."""
    from scipy.optimize import minimize_scalar

    if hi - lo <= 0:
        return lo, fun(lo)
    res = minimize_scalar(fun, bounds=(lo, hi), method="bounded", options={"xatol": 1e-12, "maxiter": 500})
    best = (float(res.x), float(res.fun))
    for x in (lo, hi):
        fx = fun(x)
        if fx <= best[1]:
            best = (x, fx)
    return best


def _best_a(r: _Reduced, b: float) -> tuple[float, float]:
    lo = -1.0 / (r.k_major - 1) if r.k_major > 1 else 1.0
    return _bounded_min(lambda a: _objective(r, a, b), lo, 1.0)


def _check_two_level(k_major: int, k_minor: int, ratio: float | None = None) -> None:
    if int(k_major) != k_major or k_major < 1:
        raise ValueError(f"the number of majority classes must be a whole number >= 1; got {k_major!r}")
    if int(k_minor) != k_minor or k_minor < 2:
        raise ValueError(f"minority collapse needs at least two minority classes; got {k_minor!r}")
    if ratio is not None and not (math.isfinite(ratio) and ratio >= 1):
        raise ValueError(f"the imbalance ratio p_major / p_minor must be finite and >= 1; got {ratio!r}")


def _collapsed(r: _Reduced) -> tuple[bool, float]:
    """Is b = 1 optimal? The reduced problem is convex, so yes iff its left slope at b = 1 is <= 0.

    By Danskin's theorem that slope is d/db of the objective at (a*(1), 1).
    """
    a_at_1, _ = _best_a(r, 1.0)
    return _d_objective_db(r, a_at_1, 1.0) <= 0.0, a_at_1


def two_level_optimum(k_major: int, k_minor: int, ratio: float, negatives: int = 1,
                      temperature: float = 0.1, mode: Mode = "scl") -> TwoLevelOptimum:
    """Solve the reduced three-cosine problem for two-level imbalance in float64.

    Proportions: K_A p_A + K_B p_B = 1 with R = p_A / p_B. The cross cosine is eliminated in closed
    form (`_cross`); b is found by a bounded 1-D search whose objective is itself a bounded 1-D search
    over a (partial minimisation keeps convexity, so both searches are unimodal). Collapse (b = 1) is
    decided exactly from the sign of the slope at b = 1 rather than from where the search stops.
    """
    _check_loss_args(negatives, temperature, mode)
    _check_two_level(k_major, k_minor, ratio)
    r = _reduced(int(k_major), int(k_minor), float(ratio), int(negatives), float(temperature), mode)
    collapsed, a_at_1 = _collapsed(r)
    if collapsed:
        b = 1.0
        a = a_at_1
    else:
        b, _ = _bounded_min(lambda bb: _best_a(r, bb)[1], -1.0 / (r.k_minor - 1), 1.0)
        a, _ = _best_a(r, b)
    return TwoLevelOptimum(a=a, b=b, c=_cross(r, a, b), objective=_objective(r, a, b), collapsed=collapsed)


def minority_collapse(k_major: int, k_minor: int, ratio: float, negatives: int = 1,
                      temperature: float = 0.1, mode: Mode = "scl") -> float:
    """b*(R): the optimal cosine between two minority class means (1.0 = minority collapse)."""
    return two_level_optimum(k_major, k_minor, ratio, negatives, temperature, mode).b


def minority_collapse_threshold(k_major: int, k_minor: int, negatives: int = 1, temperature: float = 0.1,
                                mode: Mode = "scl", ratio_max: float = 1000.0, rtol: float = 1e-6) -> float:
    """R*: the smallest ratio p_A / p_B at which the minority classes collapse (b* = 1).

    Bisection in log R between 1 (balanced: a simplex, never collapsed for K_B >= 2) and
    ``ratio_max``; returns ``math.inf`` when there is no collapse up to ``ratio_max``. Collapse is
    monotone in R (more imbalance never un-collapses), which the bisection relies on.
    """
    _check_loss_args(negatives, temperature, mode)
    _check_two_level(k_major, k_minor)
    if not ratio_max >= 1:
        raise ValueError(f"ratio_max must be >= 1; got {ratio_max!r}")

    def collapsed(ratio: float) -> bool:
        return _collapsed(_reduced(int(k_major), int(k_minor), ratio, int(negatives), float(temperature), mode))[0]

    if collapsed(1.0):
        return 1.0
    if not collapsed(float(ratio_max)):
        return math.inf
    lo, hi = 0.0, math.log(ratio_max)
    while hi - lo > rtol:
        mid = 0.5 * (lo + hi)
        if collapsed(math.exp(mid)):
            hi = mid
        else:
            lo = mid
    return math.exp(hi)
