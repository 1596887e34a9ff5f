"""Bootstrap confidence intervals and paired model comparisons for balanced accuracy.

Why stratified: balanced accuracy is a mean of per-class recalls, so a resample must keep every
class's sample count (otherwise a rare class can vanish from a resample and the metric changes
meaning). Each resample draws, within each class of the evaluated split, as many samples as the
class has, with replacement. Why vectorised: an evaluation draws >= 1000 resamples of up to tens of
thousands of samples; all draws are one integer matrix and one gather per block of resamples, so
10,000 samples x 1,000 resamples take well under a second.

Intervals are percentile intervals of the resampled statistic. The paired comparison reuses the
same resample indices for both models (the samples are shared, so their errors are correlated,
and pairing removes that variance from the difference).

Seeds: one training run is one draw of the training randomness (initialisation, batch order,
augmentation). A difference between two *methods* has to hold across seeds, so
`hierarchical_bootstrap` resamples at two levels: the runs (seeds) of each group, with
replacement, and the test images, stratified as above. Every run scored the same test images
(seeds and images are crossed, not nested), so one image resample is drawn per replicate and
applied to every run of it: the two-level "pigeonhole" bootstrap of a crossed design (Owen 2007,
Ann. Appl. Stat. 1(2)), which keeps the pairing of the per-seed test and adds the seed spread.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from pipeline.metrics import per_class_recall, predicted_labels

__all__ = ["bootstrap_ci", "paired_bootstrap_difference", "stratified_bootstrap_recalls", "seed_summary",
           "hierarchical_bootstrap", "hierarchical_bootstrap_means", "roc_pr_on_grid", "curve_bands"]

_BLOCK_CELLS = 8_000_000  # index-matrix cells per block of resamples (~32 MB of int32)


def _check(probs: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64)
    if p.ndim != 2 or y.shape != (p.shape[0],) or p.shape[0] == 0:
        raise ValueError(f"probs must be [N, C] and labels [N] with N > 0; got {p.shape} and {y.shape}")
    if y.min() < 0 or y.max() >= p.shape[1]:
        raise ValueError(f"labels must lie in 0..{p.shape[1] - 1}; drop unlabelled rows (-1) first")
    return p, y


def _check_params(n_boot: int, alpha: float) -> None:
    if not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer; got {n_boot!r}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1); got {alpha!r}")


def _resample_blocks(
    labels: np.ndarray, n_classes: int, n_boot: int, seed: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yield (index matrix [b, N] int32, block starts [K], class positions [K]) per block of resamples.

    Columns are grouped by class (present classes in ascending order): the block of class c holds
    ``n_c`` draws with replacement from the rows of class c. The only Python loops are over blocks
    of resamples and over classes, never over samples.
    """
    present = np.flatnonzero(np.bincount(labels, minlength=n_classes))
    members = [np.flatnonzero(labels == c).astype(np.int32) for c in present]
    sizes = np.array([len(m) for m in members])
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    n = int(sizes.sum())
    rng = np.random.default_rng(seed)
    per_block = max(1, _BLOCK_CELLS // n)
    done = 0
    while done < n_boot:
        b = min(per_block, n_boot - done)
        idx = np.empty((b, n), dtype=np.int32)
        for m, start, size in zip(members, starts, sizes):
            idx[:, start:start + size] = m[rng.integers(0, size, size=(b, size), dtype=np.int32)]
        yield idx, starts, present
        done += b


def stratified_bootstrap_recalls(
    correct: Sequence[np.ndarray], labels: np.ndarray, n_classes: int, n_boot: int, seed: int
) -> tuple[list[np.ndarray], np.ndarray]:
    """Per-class recall of each resample for one or more correctness vectors on the same samples.

    Args:
        correct: boolean [N] vectors (one per model), True where that model is right.
        labels: [N] class positions.
        n_classes: C.
        n_boot: number of resamples.
        seed: seed of numpy's default generator; same seed, same resamples.

    Returns:
        (list of [n_boot, K] recall matrices, one per vector, and the K present class positions).
    """
    sizes = np.bincount(labels, minlength=n_classes)
    present = np.flatnonzero(sizes)
    outs: list[list[np.ndarray]] = [[] for _ in correct]
    as_u8 = [np.asarray(c, dtype=np.uint8) for c in correct]
    for idx, starts, _ in _resample_blocks(labels, n_classes, n_boot, seed):
        for k, c in enumerate(as_u8):
            hits = np.add.reduceat(c[idx], starts, axis=1, dtype=np.int64)
            outs[k].append(hits / sizes[present])
    return [np.concatenate(o, axis=0) for o in outs], present


def _interval(samples: np.ndarray, alpha: float) -> tuple[float, float]:
    lo, hi = np.quantile(samples, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def bootstrap_ci(
    probs: Any,
    labels: Any,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Stratified-bootstrap percentile intervals for balanced accuracy, accuracy and each recall.

    Args:
        probs: [N, C] probabilities (ties count as wrong, as in `pipeline.metrics`).
        labels: [N] class positions.
        n_boot: resamples (use >= 1000 for a reported interval).
        seed: generator seed; the result is a pure function of the inputs and the seed.
        alpha: 1 - coverage (0.05 gives a 95 % interval).
        class_names: C names for the ``recall`` keys; class positions as strings if None.

    Returns:
        ``{"balanced_accuracy": {"point", "lo", "hi"}, "accuracy": {...},
        "recall": {name: {"point", "lo", "hi"} | None}, "n_boot", "seed", "alpha"}``; a class
        absent from `labels` gets None.
    """
    p, y = _check(probs, labels)
    _check_params(n_boot, alpha)
    n_classes = p.shape[1]
    names = [str(c) for c in (class_names if class_names is not None else range(n_classes))]
    if len(names) != n_classes:
        raise ValueError(f"class_names has {len(names)} names but probs has {n_classes} columns")
    correct = predicted_labels(p) == y
    (recalls,), present = stratified_bootstrap_recalls([correct], y, n_classes, n_boot, seed)
    point_recall = per_class_recall(p, y)
    sizes = np.bincount(y, minlength=n_classes)[present]

    bacc_boot = recalls.mean(axis=1)
    acc_boot = (recalls * sizes).sum(axis=1) / sizes.sum()
    recall_out: dict[str, dict[str, float] | None] = {name: None for name in names}
    for k, c in enumerate(present):
        lo, hi = _interval(recalls[:, k], alpha)
        recall_out[names[c]] = {"point": float(point_recall[c]), "lo": lo, "hi": hi}
    bacc_lo, bacc_hi = _interval(bacc_boot, alpha)
    acc_lo, acc_hi = _interval(acc_boot, alpha)
    return {
        "balanced_accuracy": {"point": float(np.nanmean(point_recall)), "lo": bacc_lo, "hi": bacc_hi},
        "accuracy": {"point": float(correct.mean()), "lo": acc_lo, "hi": acc_hi},
        "recall": recall_out,
        "n_boot": int(n_boot),
        "seed": int(seed),
        "alpha": float(alpha),
    }


def paired_bootstrap_difference(
    probs_a: Any,
    probs_b: Any,
    labels: Any,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float, float, float]:
    """Balanced accuracy of model A minus model B on the same samples, with a paired bootstrap.

    Both models are scored on the same stratified resamples. The two-sided p-value tests "no
    difference" by centring the bootstrap distribution on zero (Efron & Tibshirani 1993, 16.4):
    ``p = (1 + #{b : |d_b - d| >= |d|}) / (n_boot + 1)``, where d is the observed difference; the
    +1 keeps p above zero, as a finite resample cannot show it is smaller than ``1 / (n_boot + 1)``.

    Args:
        probs_a: [N, C] probabilities of model A.
        probs_b: [N, C] probabilities of model B, rows for the same samples in the same order.
        labels: [N] class positions.
        n_boot, seed, alpha: as in `bootstrap_ci`.

    Returns:
        (difference, lo, hi, p_value) with (lo, hi) the percentile interval of the difference.
    """
    shape_a, shape_b = np.shape(probs_a), np.shape(probs_b)
    if shape_a != shape_b:
        raise ValueError(f"probs_a {shape_a} and probs_b {shape_b} must have the same shape (same samples, same classes)")
    pa, y = _check(probs_a, labels)
    pb, _ = _check(probs_b, labels)
    _check_params(n_boot, alpha)
    n_classes = pa.shape[1]
    correct_a = predicted_labels(pa) == y
    correct_b = predicted_labels(pb) == y
    (rec_a, rec_b), _ = stratified_bootstrap_recalls([correct_a, correct_b], y, n_classes, n_boot, seed)
    diff = float(np.nanmean(per_class_recall(pa, y)) - np.nanmean(per_class_recall(pb, y)))
    boot = rec_a.mean(axis=1) - rec_b.mean(axis=1)
    lo, hi = _interval(boot, alpha)
    extreme = np.count_nonzero(np.abs(boot - diff) >= abs(diff) - 1e-12)
    p_value = float((1 + extreme) / (n_boot + 1))
    return diff, lo, hi, min(p_value, 1.0)


def seed_summary(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean and sample standard deviation (ddof=1) of one group's per-seed values.

    None/NaN entries (a metric a run could not compute) are left out and counted in ``n_missing``.
    The sd of a single value is undefined and is None, not 0: one seed shows no spread.

    Returns:
        ``{"mean", "sd", "n", "n_missing", "min", "max"}`` (None where undefined).
    """
    v = np.array([np.nan if x is None else float(x) for x in values], dtype=np.float64)
    ok = v[np.isfinite(v)]
    n = int(ok.size)
    return {
        "mean": float(ok.mean()) if n else None,
        "sd": float(ok.std(ddof=1)) if n >= 2 else None,
        "n": n,
        "n_missing": int(v.size - n),
        "min": float(ok.min()) if n else None,
        "max": float(ok.max()) if n else None,
    }


def _run_rng(seed: int) -> np.random.Generator:
    """The generator of the seed level: independent of the image level's `default_rng(seed)`."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), 1]))


def hierarchical_bootstrap_means(
    correct_groups: Sequence[np.ndarray], labels: Any, n_classes: int, n_boot: int, seed: int
) -> list[np.ndarray]:
    """Each group's mean balanced accuracy over its runs, per two-level resample.

    Replicate b: (1) the test images are resampled once, stratified by class, with the same draws
    as `bootstrap_ci` / `paired_bootstrap_difference` for this `seed` (generator
    ``default_rng(seed)``); (2) in every group of R runs, R runs are drawn with replacement
    (generator ``default_rng(SeedSequence([seed, 1]))``, R draws per group per replicate, groups in
    order); (3) the group's value is the mean, over the drawn runs, of each drawn run's balanced
    accuracy on the resampled images. A group of one run therefore reduces exactly to the
    single-run stratified bootstrap.

    Args:
        correct_groups: per group a boolean [R_g, N] matrix, True where run r is right on image i
            (same images, same order in every group).
        labels: [N] class positions.
        n_classes: C.
        n_boot: replicates.
        seed: seed of both levels.

    Returns:
        One float64 [n_boot] array per group.
    """
    y = np.asarray(labels).astype(np.int64)
    mats = [np.atleast_2d(np.asarray(g, dtype=np.uint8)) for g in correct_groups]
    for g, m in enumerate(mats):
        if m.shape[0] < 1 or m.shape[1] != y.shape[0]:
            raise ValueError(f"group {g}: correctness must be [runs >= 1, {y.shape[0]}]; got {m.shape}")
    if not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer; got {n_boot!r}")
    sizes = np.bincount(y, minlength=n_classes)
    present = np.flatnonzero(sizes)
    run_rng = _run_rng(seed)
    outs: list[list[np.ndarray]] = [[] for _ in mats]
    for idx, starts, _ in _resample_blocks(y, n_classes, n_boot, seed):
        b = idx.shape[0]
        for g, m in enumerate(mats):
            n_runs = m.shape[0]
            bacc = np.empty((b, n_runs))
            for r in range(n_runs):
                hits = np.add.reduceat(m[r][idx], starts, axis=1, dtype=np.int64)
                bacc[:, r] = (hits / sizes[present]).mean(axis=1)
            pick = run_rng.integers(0, n_runs, size=(b, n_runs))
            outs[g].append(np.take_along_axis(bacc, pick, axis=1).mean(axis=1))
    return [np.concatenate(o) for o in outs]


def hierarchical_bootstrap(
    probs_groups: Sequence[Sequence[Any]],
    labels: Any,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    reference: int = 0,
) -> dict[str, Any]:
    """Seed-aware comparison of groups of runs (one group per method, runs = seeds).

    Point values are plain means over a group's runs of each run's balanced accuracy; the
    intervals come from `hierarchical_bootstrap_means` (runs and test images resampled). The
    difference of group g to the reference group is ``mean_g - mean_ref``; its p-value is the
    centred-bootstrap two-sided p of `paired_bootstrap_difference`, computed on the same replicates.
    With 2-3 seeds the seed level has very few distinct resamples (3 for 2 seeds), so the interval
    is coarse; it is still the honest one, since the per-seed tests ignore the seed spread.

    Args:
        probs_groups: per group, a list of [N, C] probability matrices (one per run), every run
            on the same N images in the same order.
        labels: [N] class positions.
        n_boot, seed, alpha: as in `bootstrap_ci`.
        reference: index of the group the differences are taken against.

    Returns:
        ``{"groups": [{"balanced_accuracy": seed_summary(...), "per_run": [...], "lo", "hi"}],
        "differences": [{"group", "diff", "lo", "hi", "p_value"} | None (the reference)],
        "n_boot", "seed", "alpha", "reference"}``.
    """
    _check_params(n_boot, alpha)
    if not probs_groups or any(len(g) == 0 for g in probs_groups):
        raise ValueError("every group needs at least one run")
    if not 0 <= reference < len(probs_groups):
        raise ValueError(f"reference must index a group (0..{len(probs_groups) - 1}); got {reference}")
    first, y = _check(probs_groups[0][0], labels)
    n_classes = first.shape[1]
    correct_groups, per_run = [], []
    for g in probs_groups:
        rows, baccs = [], []
        for probs in g:
            if np.shape(probs) != first.shape:
                raise ValueError(f"every run must score the same {first.shape} images x classes; got {np.shape(probs)}")
            p, _ = _check(probs, y)
            rows.append(predicted_labels(p) == y)
            baccs.append(float(np.nanmean(per_class_recall(p, y))))
        correct_groups.append(np.stack(rows))
        per_run.append(baccs)
    boots = hierarchical_bootstrap_means(correct_groups, y, n_classes, n_boot, seed)
    groups = []
    for baccs, boot in zip(per_run, boots):
        lo, hi = _interval(boot, alpha)
        groups.append({"balanced_accuracy": seed_summary(baccs), "per_run": baccs, "lo": lo, "hi": hi})
    ref_mean = groups[reference]["balanced_accuracy"]["mean"]
    differences: list[dict[str, Any] | None] = []
    for g, (grp, boot) in enumerate(zip(groups, boots)):
        if g == reference:
            differences.append(None)
            continue
        diff = grp["balanced_accuracy"]["mean"] - ref_mean
        d_boot = boot - boots[reference]
        lo, hi = _interval(d_boot, alpha)
        extreme = np.count_nonzero(np.abs(d_boot - diff) >= abs(diff) - 1e-12)
        differences.append({"group": g, "diff": float(diff), "lo": lo, "hi": hi,
                            "p_value": float(min((1 + extreme) / (n_boot + 1), 1.0))})
    return {"groups": groups, "differences": differences, "n_boot": int(n_boot), "seed": int(seed),
            "alpha": float(alpha), "reference": int(reference)}


# ---------------------------------------------------------------- curves with bands
def roc_pr_on_grid(scores: np.ndarray, positive: np.ndarray, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ROC sensitivity and interpolated precision of one class, read on a common [0, 1] grid.

    Sensitivity at false-positive rate g is the best sensitivity of a threshold whose FPR is <= g
    (the ROC step function); precision at recall r is the best precision of a threshold whose
    recall is >= r (the usual interpolated precision). The points are scikit-learn's
    `roc_curve` / `precision_recall_curve` points (thresholds at the distinct scores). Needs
    positives and negatives.

    Returns:
        (tpr [G], precision [G]).
    """
    tpr, prec = _weighted_roc_pr_on_grid(scores, positive, np.ones((1, len(scores))), grid)
    return tpr[0], prec[0]


def _cumsum0(w: np.ndarray) -> np.ndarray:
    """Row-wise cumulative sums with a leading 0 column ([B, M] -> [B, M + 1])."""
    out = np.zeros((w.shape[0], w.shape[1] + 1), dtype=np.int64)
    np.cumsum(w, axis=1, out=out[:, 1:])
    return out


def _weighted_roc_pr_on_grid(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray,
                             grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`roc_pr_on_grid` for B resamples at once, each given as row multiplicities [B, N].

    Why weights: a bootstrap resample is the original rows taken w times each, so one sort of the
    original scores serves every resample; the cumulative counts at each distinct score are those
    of the resample's own sort. A score drawn zero times repeats the previous point, which
    changes neither the ROC step function nor the interpolated precision (the result equals
    sorting each resample; tests/pipeline/test_stats.py checks it against the per-resample form).
    """
    order = np.argsort(-scores, kind="stable")
    s, pos = scores[order], np.asarray(positive, dtype=bool)[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each distinct score
    # cumulative weight of positives (negatives) up to each distinct score: one cumsum over each
    # kind's own columns in score order, read at how many rows of that kind reach the score's last row
    k_pos = np.cumsum(pos)[last]
    k_neg = (last + 1) - k_pos
    tps = _cumsum0(weights[:, order[pos]])[:, k_pos].astype(np.float64)
    fps = _cumsum0(weights[:, order[~pos]])[:, k_neg].astype(np.float64)
    n_pos, n_neg = tps[:, -1:], fps[:, -1:]
    zeros = np.zeros((len(weights), 1))
    tpr, fpr = np.hstack([zeros, tps / n_pos]), np.hstack([zeros, fps / n_neg])
    drawn = tps + fps
    precision = np.divide(tps, drawn, out=np.zeros_like(tps), where=drawn > 0)  # 0: nothing drawn yet
    recall = tps / n_pos
    best_after = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]  # max precision at recall >= r
    tpr_grid = np.empty((len(weights), len(grid)))
    prec_grid = np.empty((len(weights), len(grid)))
    for b in range(len(weights)):  # one searchsorted per resample: the curves differ in their x values
        tpr_grid[b] = tpr[b, np.searchsorted(fpr[b], grid, side="right") - 1]
        at = np.minimum(np.searchsorted(recall[b], grid, side="left"), recall.shape[1] - 1)
        prec_grid[b] = best_after[b, at]
    return tpr_grid, prec_grid


def curve_bands(probs: Any, labels: Any, n_boot: int = 200, seed: int = 0, alpha: float = 0.05,
                n_grid: int = 101) -> list[dict[str, np.ndarray] | None]:
    """Per class (one-vs-rest on p_c): ROC and PR curves on a grid with pointwise bootstrap bands.

    Resamples are the stratified ones of `bootstrap_ci` (same seed, same draws), so each class
    keeps its positives and negatives in every resample. Bands are pointwise percentile
    intervals: they show where the curve could lie at each FPR / recall, not a simultaneous band.

    Returns:
        One entry per class: ``{"grid", "tpr", "tpr_lo", "tpr_hi", "precision", "precision_lo",
        "precision_hi"}``, or None for a class without positives or negatives.
    """
    p, y = _check(probs, labels)
    _check_params(n_boot, alpha)
    n_classes = p.shape[1]
    grid = np.linspace(0.0, 1.0, n_grid)
    valid = [0 < int((y == c).sum()) < len(y) for c in range(n_classes)]
    boot_tpr = [np.empty((n_boot, n_grid)) for _ in range(n_classes)]
    boot_prec = [np.empty((n_boot, n_grid)) for _ in range(n_classes)]
    n = len(y)
    b0 = 0
    for idx, _, _ in _resample_blocks(y, n_classes, n_boot, seed):
        b = len(idx)
        flat = (idx + (np.arange(b, dtype=np.int64) * n)[:, None]).ravel()
        weights = np.bincount(flat, minlength=b * n).reshape(b, n)  # row multiplicities per resample
        for c in range(n_classes):
            if valid[c]:
                boot_tpr[c][b0:b0 + b], boot_prec[c][b0:b0 + b] = _weighted_roc_pr_on_grid(p[:, c], y == c, weights, grid)
        b0 += b
    out: list[dict[str, np.ndarray] | None] = []
    q = [alpha / 2, 1 - alpha / 2]
    for c in range(n_classes):
        if not valid[c]:
            out.append(None)
            continue
        tpr, prec = roc_pr_on_grid(p[:, c], y == c, grid)
        (tlo, thi), (plo, phi) = np.quantile(boot_tpr[c], q, axis=0), np.quantile(boot_prec[c], q, axis=0)
        out.append({"grid": grid, "tpr": tpr, "tpr_lo": tlo, "tpr_hi": thi,
                    "precision": prec, "precision_lo": plo, "precision_hi": phi})
    return out
