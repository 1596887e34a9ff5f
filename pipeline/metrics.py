"""Classification and calibration metrics: pure functions, arrays in, plain floats out.

Why this module exists: every number in an evaluation report comes from here, so each one is
defined once, matches a reference (scikit-learn, the ISIC challenge scorer, torchmetrics) and is
tested against it. Nothing here knows about configs, runs or MLflow.

Conventions shared by every function:

* ``probs`` is ``[N, C]`` (class probabilities, rows summing to 1) and ``labels`` is ``[N]``
  integer class positions in ``0..C-1``. Inputs may be numpy arrays, lists or CPU tensors; they
  are converted to float64 / int64 first.
* **Ties count as wrong.** The predicted class is the argmax, but a row whose maximum probability
  is shared by two or more classes is "undecided" and is correct for no class. This is how the
  ISIC challenge scorer (``isic_challenge_scoring.metrics._to_labels``) scores submissions, and it
  stops a constant prediction from collecting credit. Calibration metrics use the plain argmax
  (as Guo et al. 2017 and torchmetrics do): a tie does not change the top-label confidence.
* **Absent classes are "n/a", never zero or NaN.** A class with no sample in the evaluated split
  has no recall; it is left out of balanced accuracy (again as the ISIC scorer does: its per-class
  ``TP / support`` is NaN and pandas' mean skips it) and gets ``None`` in the per-class table.
"""
from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from data_prep import atomic_open

__all__ = [
    "predicted_labels",
    "per_class_recall",
    "balanced_accuracy",
    "accuracy",
    "binned_calibration",
    "expected_calibration_error",
    "maximum_calibration_error",
    "classwise_ece",
    "brier_score",
    "nll",
    "confusion_matrix",
    "classification_report",
    "flat_metrics",
    "write_isic_csv",
    "roc_pr_curves",
    "threshold_for_specificity",
    "threshold_for_sensitivity",
    "sensitivity_specificity",
    "operating_points",
    "risk_coverage",
    "selective_metrics",
    "OPERATING_TARGETS",
    "MANY_SHOT_MIN",
    "FEW_SHOT_MAX",
]

#: A class with more than this many training images is "many-shot" (Liu et al. 2019, OLTR).
MANY_SHOT_MIN = 100
#: A class with fewer than this many training images is "few-shot".
FEW_SHOT_MAX = 20

#: Specificities (and sensitivities) at which operating points are reported.
OPERATING_TARGETS = (0.80, 0.90, 0.95)

_NLL_EPS = 1e-15  # probabilities are clipped here so one confident mistake gives a finite NLL


def _as_probs_labels(probs: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Convert and check `probs` [N, C] and `labels` [N]; raise ValueError naming the mismatch."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels)
    if p.ndim != 2:
        raise ValueError(f"probs must be [N, C]; got shape {p.shape}")
    if y.ndim != 1 or y.shape[0] != p.shape[0]:
        raise ValueError(f"labels must be [N] with N = {p.shape[0]} (rows of probs); got shape {y.shape}")
    if p.shape[0] == 0:
        raise ValueError("no samples: probs has 0 rows")
    if y.dtype.kind not in "iu":
        if y.dtype.kind == "f" and np.all(np.equal(np.mod(y, 1), 0)):
            y = y.astype(np.int64)
        else:
            raise ValueError(f"labels must be integer class positions; got dtype {y.dtype}")
    y = y.astype(np.int64, copy=False)
    n_classes = p.shape[1]
    bad = (y < 0) | (y >= n_classes)
    if bad.any():
        raise ValueError(
            f"labels must lie in 0..{n_classes - 1} (columns of probs); found {int(y[bad][0])} "
            f"at row {int(np.flatnonzero(bad)[0])} (unlabelled rows, label -1, must be dropped first)"
        )
    if not np.isfinite(p).all():
        raise ValueError("probs contains NaN or infinite values")
    return p, y


def _opt(x: float) -> float | None:
    """A float for JSON, or None where the value is undefined (NaN)."""
    return None if x is None or not math.isfinite(x) else float(x)


def predicted_labels(probs: Any) -> np.ndarray:
    """Argmax class per row, or -1 where the row's maximum is tied ("undecided").

    Args:
        probs: [N, C] scores (probabilities or logits: only the order matters).

    Returns:
        int64 [N]: predicted class position, -1 for a tied row.
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"probs must be [N, C]; got shape {p.shape}")
    top = p.max(axis=1, keepdims=True)
    tied = (p == top).sum(axis=1) > 1
    pred = p.argmax(axis=1).astype(np.int64)
    pred[tied] = -1
    return pred


def _correct(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    return predicted_labels(p) == y


def per_class_recall(probs: Any, labels: Any) -> np.ndarray:
    """Recall (sensitivity) of each class, NaN for a class absent from `labels`.

    Returns a float array rather than a dict because the bootstrap and the report both index it
    by class position; `classification_report` turns the NaNs into None.

    Args:
        probs: [N, C] probabilities.
        labels: [N] class positions.

    Returns:
        float64 [C]; ties count as wrong.
    """
    p, y = _as_probs_labels(probs, labels)
    n_classes = p.shape[1]
    support = np.bincount(y, minlength=n_classes)
    hits = np.bincount(y, weights=_correct(p, y), minlength=n_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, hits / np.maximum(support, 1), np.nan)


def balanced_accuracy(probs: Any, labels: Any) -> float:
    """Mean per-class recall over the classes present in `labels`, ISIC challenge style.

    Equals ``sklearn.metrics.balanced_accuracy_score(labels, probs.argmax(1))`` when no row is
    tied; a tied row is wrong (see the module docstring). Matches ``isic-challenge-scoring``'s
    ``balanced_multiclass_accuracy`` with unit weights.

    Args:
        probs: [N, C] probabilities.
        labels: [N] class positions.

    Returns:
        Balanced accuracy in [0, 1].
    """
    recall = per_class_recall(probs, labels)
    return float(np.nanmean(recall))


def accuracy(probs: Any, labels: Any) -> float:
    """Fraction of rows whose untied argmax equals the label."""
    p, y = _as_probs_labels(probs, labels)
    return float(_correct(p, y).mean())


def binned_calibration(confidence: Any, outcome: Any, n_bins: int = 15) -> dict[str, np.ndarray]:
    """Equal-width calibration bins ``(lo, hi]`` over [0, 1] (Guo et al. 2017, eq. 2).

    A confidence of exactly 0 goes to the first bin. torchmetrics uses ``[lo, hi)`` bins instead;
    the two agree unless a confidence falls exactly on a bin edge.

    Args:
        confidence: [N] predicted probabilities of the event.
        outcome: [N] 1.0 where the event happened (prediction correct / sample is class c).
        n_bins: number of bins.

    Returns:
        dict with ``edges`` [n_bins+1], ``counts`` [n_bins] (int64), ``confidence`` and
        ``accuracy`` [n_bins] (bin means; NaN for an empty bin).
    """
    if not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer; got {n_bins!r}")
    conf = np.asarray(confidence, dtype=np.float64).ravel()
    out = np.asarray(outcome, dtype=np.float64).ravel()
    if conf.shape != out.shape:
        raise ValueError(f"confidence {conf.shape} and outcome {out.shape} differ in length")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # side="left": index i with edges[i-1] < c <= edges[i], so the bin is i-1 -> (lo, hi].
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    counts = np.bincount(idx, minlength=n_bins)
    sum_conf = np.bincount(idx, weights=conf, minlength=n_bins)
    sum_out = np.bincount(idx, weights=out, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(counts > 0, sum_conf / np.maximum(counts, 1), np.nan)
        mean_out = np.where(counts > 0, sum_out / np.maximum(counts, 1), np.nan)
    return {"edges": edges, "counts": counts.astype(np.int64), "confidence": mean_conf, "accuracy": mean_out}


def _ece_from_bins(bins: dict[str, np.ndarray]) -> float:
    counts = bins["counts"]
    full = counts > 0
    gap = np.abs(bins["accuracy"][full] - bins["confidence"][full])
    return float(np.sum(gap * counts[full]) / counts.sum())


def _top_label(p: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return p.max(axis=1), (p.argmax(axis=1) == y).astype(np.float64)


def expected_calibration_error(probs: Any, labels: Any, n_bins: int = 15) -> float:
    """Top-label expected calibration error (L1), equal-width bins ``(lo, hi]``.

    ``sum_b (n_b / N) |acc_b - conf_b|`` with confidence the maximum probability and accuracy of
    the argmax (Guo et al. 2017; torchmetrics ``MulticlassCalibrationError(norm="l1")``).

    Args:
        probs: [N, C] probabilities.
        labels: [N] class positions.
        n_bins: number of bins (15 as in Guo et al.).
    """
    p, y = _as_probs_labels(probs, labels)
    return _ece_from_bins(binned_calibration(*_top_label(p, y), n_bins=n_bins))


def maximum_calibration_error(probs: Any, labels: Any, n_bins: int = 15) -> float:
    """Largest ``|acc_b - conf_b|`` over the non-empty top-label bins (Guo et al. 2017)."""
    p, y = _as_probs_labels(probs, labels)
    bins = binned_calibration(*_top_label(p, y), n_bins=n_bins)
    full = bins["counts"] > 0
    return float(np.max(np.abs(bins["accuracy"][full] - bins["confidence"][full])))


def classwise_ece(probs: Any, labels: Any, n_bins: int = 15) -> float:
    """Class-wise ECE: mean over all C classes of the one-vs-rest ECE of ``p_c`` (Kull et al. 2019).

    For class c the bins hold ``p_c`` of every sample and the observed frequency of ``label == c``.
    Unlike top-label ECE this sees the calibration of minority-class probabilities, which is what
    matters on an imbalanced cohort. A class absent from `labels` still counts: its ECE is the
    mean probability mass the model puts on it, a real miscalibration.
    """
    p, y = _as_probs_labels(probs, labels)
    eces = [
        _ece_from_bins(binned_calibration(p[:, c], (y == c).astype(np.float64), n_bins=n_bins))
        for c in range(p.shape[1])
    ]
    return float(np.mean(eces))


def brier_score(probs: Any, labels: Any) -> float:
    """Multi-class Brier score: ``mean_i sum_c (p_ic - onehot_ic)^2``, in [0, 2].

    For two classes this is twice ``sklearn.metrics.brier_score_loss`` (which scores only the
    positive column).
    """
    p, y = _as_probs_labels(probs, labels)
    onehot = np.zeros_like(p)
    onehot[np.arange(len(y)), y] = 1.0
    return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))


def nll(probs: Any, labels: Any) -> float:
    """Mean negative log-likelihood of the true class, probabilities clipped at 1e-15.

    Written out rather than calling ``sklearn.metrics.log_loss`` because that refuses float32
    softmax rows whose sums differ from 1 by rounding; the value is the same (tested).
    """
    p, y = _as_probs_labels(probs, labels)
    return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], _NLL_EPS, 1.0))))


def confusion_matrix(probs: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Counts [C, C] (row = true class, column = predicted) and tied rows per true class [C].

    Tied rows predict no class, so they appear only in the second array; the diagonal divided by
    the class support is then exactly the recall used by `balanced_accuracy`.
    """
    p, y = _as_probs_labels(probs, labels)
    n_classes = p.shape[1]
    pred = predicted_labels(p)
    decided = pred >= 0
    counts = np.bincount(y[decided] * n_classes + pred[decided], minlength=n_classes * n_classes)
    tied = np.bincount(y[~decided], minlength=n_classes)
    return counts.reshape(n_classes, n_classes).astype(np.int64), tied.astype(np.int64)


def _ratio(num: float, den: float) -> float | None:
    return None if den == 0 else float(num / den)


def _shot_group(train_count: int, many_min: int, few_max: int) -> str:
    if train_count > many_min:
        return "many"
    if train_count < few_max:
        return "few"
    return "medium"


def classification_report(
    probs: Any,
    labels: Any,
    class_names: Sequence[str],
    train_counts: Sequence[int] | np.ndarray | None = None,
    n_bins: int = 15,
    many_shot_min: int = MANY_SHOT_MIN,
    few_shot_max: int = FEW_SHOT_MAX,
) -> dict[str, Any]:
    """Everything the evaluate stage reports, as a JSON-able nested dict (no NaN anywhere).

    Per-class rows are one-vs-rest: recall (sensitivity), specificity, precision and F1 from the
    untied argmax prediction; AUROC and average precision from ``p_c`` with scikit-learn. Any value
    that is undefined on this split (class absent: no recall, AUROC or AP; class never predicted:
    no precision) is ``None``.

    Shot groups (when `train_counts` is given) follow the long-tail literature: "many" has more
    than `many_shot_min` training images, "few" fewer than `few_shot_max`, "medium" the rest. A
    group's accuracy is the mean recall of its classes present here (the group's balanced
    accuracy), so an imbalanced test split cannot tilt it; None if none of its classes is present.

    Args:
        probs: [N, C] probabilities.
        labels: [N] class positions.
        class_names: C names, in column order.
        train_counts: [C] training images per class, or None to skip the shot groups.
        n_bins: bins for ECE / MCE / class-wise ECE.
        many_shot_min: many-shot threshold (exclusive).
        few_shot_max: few-shot threshold (exclusive).

    Returns:
        ``{"n_samples", "n_classes", "class_names", "overall": {...}, "per_class": {name: {...}},
        "confusion": {"counts", "normalized", "tied"}, "shots": {...} | None}``.
    """
    p, y = _as_probs_labels(probs, labels)
    n, n_classes = p.shape
    names = [str(c) for c in class_names]
    if len(names) != n_classes:
        raise ValueError(f"class_names has {len(names)} names but probs has {n_classes} columns")
    if len(set(names)) != len(names):
        raise ValueError(f"class_names must be unique; got {names}")
    counts_train: np.ndarray | None = None
    if train_counts is not None:
        counts_train = np.asarray(train_counts, dtype=np.int64)
        if counts_train.shape != (n_classes,):
            raise ValueError(f"train_counts must have {n_classes} entries; got shape {counts_train.shape}")

    cm, tied = confusion_matrix(p, y)
    support = cm.sum(axis=1) + tied
    tp = np.diag(cm).astype(np.float64)
    predicted = cm.sum(axis=0)
    recall = per_class_recall(p, y)

    per_class: dict[str, dict[str, Any]] = {}
    aurocs: list[float] = []
    aps: list[float] = []
    for c, name in enumerate(names):
        pos = y == c
        n_pos = int(pos.sum())
        fp = float(predicted[c] - tp[c])
        fn = float(support[c] - tp[c])
        tn = float(n - n_pos - fp)
        both = 0 < n_pos < n
        auroc = float(roc_auc_score(pos, p[:, c])) if both else None
        ap = float(average_precision_score(pos, p[:, c])) if n_pos > 0 else None
        if auroc is not None:
            aurocs.append(auroc)
        if ap is not None:
            aps.append(ap)
        row: dict[str, Any] = {
            "support": n_pos,
            "recall": _opt(recall[c]),
            "specificity": _ratio(tn, tn + fp),
            "precision": _ratio(tp[c], tp[c] + fp),
            "f1": _ratio(2 * tp[c], 2 * tp[c] + fp + fn) if n_pos > 0 else None,
            "auroc": auroc,
            "average_precision": ap,
        }
        if counts_train is not None:
            row["train_count"] = int(counts_train[c])
            row["shot"] = _shot_group(int(counts_train[c]), many_shot_min, few_shot_max)
        per_class[name] = row

    with np.errstate(invalid="ignore", divide="ignore"):
        normalized = cm / support[:, None]
    normalized_rows = [
        [float(v) for v in normalized[c]] if support[c] > 0 else None for c in range(n_classes)
    ]

    shots: dict[str, Any] | None = None
    if counts_train is not None:
        shots = {"many_shot_min": int(many_shot_min), "few_shot_max": int(few_shot_max)}
        for group in ("many", "medium", "few"):
            members = [c for c in range(n_classes) if per_class[names[c]]["shot"] == group]
            present = [recall[c] for c in members if support[c] > 0]
            shots[group] = {
                "classes": [names[c] for c in members],
                "accuracy": float(np.mean(present)) if present else None,
            }

    overall = {
        "balanced_accuracy": float(np.nanmean(recall)),
        "accuracy": float((tp.sum()) / n),
        "ece": expected_calibration_error(p, y, n_bins),
        "mce": maximum_calibration_error(p, y, n_bins),
        "classwise_ece": classwise_ece(p, y, n_bins),
        "brier": brier_score(p, y),
        "nll": nll(p, y),
        "macro_auroc": float(np.mean(aurocs)) if aurocs else None,
        "macro_average_precision": float(np.mean(aps)) if aps else None,
        "n_tied": int(tied.sum()),
        "n_classes_present": int((support > 0).sum()),
    }
    return {
        "n_samples": int(n),
        "n_classes": int(n_classes),
        "class_names": names,
        "overall": overall,
        "per_class": per_class,
        "confusion": {
            "counts": cm.tolist(),
            "normalized": normalized_rows,
            "tied": tied.tolist(),
        },
        "shots": shots,
    }


def flat_metrics(report: dict[str, Any]) -> dict[str, float]:
    """Flatten a `classification_report` into metric names for logging, dropping None values.

    Keys: the overall names (``balanced_accuracy``, ``accuracy``, ``ece``, ``classwise_ece``,
    ``brier``, ``nll``, ...), ``<metric>/<CLASS>`` for per-class values (``recall/MEL``), and
    ``<group>_shot_accuracy``. The caller adds the split prefix (``test/balanced_accuracy``).
    """
    out: dict[str, float] = {}
    for key, value in report["overall"].items():
        if value is not None:
            out[key] = float(value)
    for name, row in report["per_class"].items():
        for key in ("recall", "specificity", "precision", "f1", "auroc", "average_precision"):
            if row.get(key) is not None:
                out[f"{key}/{name}"] = float(row[key])
    shots = report.get("shots")
    if shots:
        for group in ("many", "medium", "few"):
            if shots[group]["accuracy"] is not None:
                out[f"{group}_shot_accuracy"] = float(shots[group]["accuracy"])
    return out


def write_isic_csv(
    path: Any,
    image_ids: Sequence[str],
    probs_or_onehot: Any,
    class_names: Sequence[str],
) -> None:
    """Write an ISIC-challenge classification CSV (``image`` then one column per class), atomically.

    The same layout serves as predictions (probabilities) and ground truth (one-hot), so the
    official ``isic-challenge-scoring classification TRUTH PRED`` can re-score any evaluation.
    Values are written with Python's shortest round-trip repr, so the scorer reads back the exact
    float64 numbers we scored (ties stay ties) and always sees a float column.

    Args:
        path: destination file.
        image_ids: N image identifiers (unique, non-empty).
        probs_or_onehot: [N, C] values in [0, 1], or [N] integer class positions (written as
            one-hot rows, the ground-truth form).
        class_names: C column names, in column order.
    """
    names = [str(c) for c in class_names]
    ids = [str(i) for i in image_ids]
    values = np.asarray(probs_or_onehot)
    if values.ndim == 1:
        if values.dtype.kind not in "iu":
            raise ValueError(f"1-D values must be integer class positions; got dtype {values.dtype}")
        if values.size and (values.min() < 0 or values.max() >= len(names)):
            raise ValueError(f"class positions must lie in 0..{len(names) - 1}")
        onehot = np.zeros((values.shape[0], len(names)), dtype=np.float64)
        onehot[np.arange(values.shape[0]), values] = 1.0
        values = onehot
    values = values.astype(np.float64)
    if values.ndim != 2 or values.shape != (len(ids), len(names)):
        raise ValueError(
            f"values must be [{len(ids)}, {len(names)}] (images x classes); got shape {values.shape}"
        )
    if not np.isfinite(values).all() or values.min(initial=0.0) < 0.0 or values.max(initial=0.0) > 1.0:
        raise ValueError("values must be finite and lie in [0, 1]")
    if len(set(ids)) != len(ids) or any(not i for i in ids):
        raise ValueError("image_ids must be unique and non-empty")
    if "image" in names or len(set(names)) != len(names):
        raise ValueError(f"class_names must be unique and must not include 'image'; got {names}")
    with atomic_open(path, "w") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["image", *names])
        for image, row in zip(ids, values.tolist()):
            writer.writerow([image, *map(repr, row)])


# ---------------------------------------------------------------- operating points
def roc_pr_curves(scores: Any, positive: Any) -> dict[str, np.ndarray] | None:
    """One-vs-rest ROC and precision-recall curves of one class (scikit-learn), None if undefined.

    Args:
        scores: [N] the class's probability p_c.
        positive: [N] True where the sample is of the class.

    Returns:
        ``{"fpr", "tpr", "roc_thresholds", "precision", "recall", "pr_thresholds"}`` or None when
        the class has no positive or no negative sample (no ROC curve exists).
    """
    s = np.asarray(scores, dtype=np.float64)
    pos = np.asarray(positive, dtype=bool)
    if pos.all() or not pos.any():
        return None
    fpr, tpr, thr = roc_curve(pos, s, drop_intermediate=False)
    precision, recall, pthr = precision_recall_curve(pos, s)
    return {"fpr": fpr, "tpr": tpr, "roc_thresholds": thr, "precision": precision, "recall": recall,
            "pr_thresholds": pthr}


def sensitivity_specificity(scores: Any, positive: Any, threshold: float) -> tuple[float | None, float | None]:
    """Sensitivity and specificity of the rule "positive when score >= threshold" (None if undefined)."""
    s = np.asarray(scores, dtype=np.float64)
    pos = np.asarray(positive, dtype=bool)
    called = s >= threshold
    sens = float(called[pos].mean()) if pos.any() else None
    spec = float((~called[~pos]).mean()) if (~pos).any() else None
    return sens, spec


def threshold_for_specificity(scores: Any, positive: Any, target: float) -> float | None:
    """The lowest threshold whose specificity is still >= `target` (so sensitivity is the highest
    such a rule allows), from scikit-learn's ROC points; None if the class lacks positives or negatives.

    Thresholds are the observed scores (``inf`` when no threshold reaches the target other than
    "call nobody positive").
    """
    curves = roc_pr_curves(scores, positive)
    if curves is None:
        return None
    ok = np.flatnonzero(1.0 - curves["fpr"] >= target - 1e-12)
    return float(curves["roc_thresholds"][ok[-1]])  # fpr grows as the threshold falls: last ok = lowest


def threshold_for_sensitivity(scores: Any, positive: Any, target: float) -> float | None:
    """The highest threshold whose sensitivity is >= `target` (so specificity is the highest such
    a rule allows); None if the class lacks positives or negatives."""
    curves = roc_pr_curves(scores, positive)
    if curves is None:
        return None
    ok = np.flatnonzero(curves["tpr"] >= target - 1e-12)
    return float(curves["roc_thresholds"][ok[0]])


def operating_points(
    val_probs: Any, val_labels: Any, test_probs: Any, test_labels: Any, class_names: Sequence[str],
    targets: Sequence[float] = OPERATING_TARGETS,
) -> dict[str, dict[str, list[dict[str, Any]]] | None]:
    """Per class, thresholds chosen on validation for fixed specificity / sensitivity, applied to test.

    Why val then test: a threshold read off the test ROC curve is fitted to the test set and
    overstates what a clinic would see; choosing it on validation and holding it on test is the
    honest protocol. Scores are the class's probability p_c (one-vs-rest).

    Returns:
        ``{class: {"at_specificity": [row, ...], "at_sensitivity": [row, ...]} | None}`` with row
        ``{"target", "threshold", "val_sensitivity", "val_specificity", "sensitivity",
        "specificity"}`` (the last two on test; None where undefined). A class without positives or
        negatives in validation or test is None.
    """
    pv, yv = _as_probs_labels(val_probs, val_labels)
    pt, yt = _as_probs_labels(test_probs, test_labels)
    out: dict[str, dict[str, list[dict[str, Any]]] | None] = {}
    for c, name in enumerate(class_names):
        sv, posv, st, post = pv[:, c], yv == c, pt[:, c], yt == c
        if posv.all() or not posv.any() or post.all() or not post.any():
            out[str(name)] = None
            continue
        entry: dict[str, list[dict[str, Any]]] = {"at_specificity": [], "at_sensitivity": []}
        for kind, choose in (("at_specificity", threshold_for_specificity), ("at_sensitivity", threshold_for_sensitivity)):
            for target in targets:
                thr = choose(sv, posv, target)
                vs, vp = sensitivity_specificity(sv, posv, thr)
                ts, tp = sensitivity_specificity(st, post, thr)
                entry[kind].append({"target": float(target), "threshold": _opt(thr), "val_sensitivity": vs,
                                    "val_specificity": vp, "sensitivity": ts, "specificity": tp})
        out[str(name)] = entry
    return out


# ---------------------------------------------------------------- selective prediction
def risk_coverage(probs: Any, labels: Any) -> dict[str, Any]:
    """Risk-coverage curve of "refer the least confident cases" (Geifman & El-Yaniv 2017).

    Samples are ordered by confidence (maximum probability), most confident first; ties keep
    the input order (stable sort). At coverage k/N the k most confident are kept and the risk is
    their error rate (a tied argmax counts as an error, as everywhere here). The area under the
    curve (AURC) is the mean risk over k = 1..N: lower is better, and a model whose confidence
    ranks its errors last has the smallest AURC its accuracy allows.

    Returns:
        ``{"coverage" [N], "risk" [N], "confidence" [N] (the k-th confidence, the threshold that
        keeps k), "aurc", "order" [N]}``.
    """
    p, y = _as_probs_labels(probs, labels)
    conf = p.max(axis=1)
    order = np.argsort(-conf, kind="stable")
    errors = (~_correct(p, y))[order].astype(np.float64)
    k = np.arange(1, len(y) + 1)
    risk = np.cumsum(errors) / k
    return {"coverage": k / len(y), "risk": risk, "confidence": conf[order], "aurc": float(risk.mean()),
            "order": order}


def selective_metrics(probs: Any, labels: Any, coverage: float = 0.8) -> dict[str, Any]:
    """Balanced accuracy and accuracy on the `coverage` fraction of most confident samples.

    The kept set is the ``ceil(coverage * N)`` most confident samples (ties in input order, as in
    `risk_coverage`); balanced accuracy averages the recall of the classes present in it, so a
    class whose samples were all referred drops out (reported in ``classes_referred``).

    Returns:
        ``{"coverage", "n_kept", "threshold" (lowest kept confidence), "balanced_accuracy",
        "accuracy", "aurc", "classes_referred"}``.
    """
    if not 0 < coverage <= 1:
        raise ValueError(f"coverage must lie in (0, 1]; got {coverage!r}")
    p, y = _as_probs_labels(probs, labels)
    rc = risk_coverage(p, y)
    n_kept = int(math.ceil(coverage * len(y) - 1e-9))
    kept = rc["order"][:n_kept]
    recall = per_class_recall(p[kept], y[kept])
    present_all = set(np.unique(y).tolist())
    present_kept = set(np.unique(y[kept]).tolist())
    return {
        "coverage": float(coverage), "n_kept": n_kept, "threshold": float(rc["confidence"][n_kept - 1]),
        "balanced_accuracy": float(np.nanmean(recall)), "accuracy": float(_correct(p[kept], y[kept]).mean()),
        "aurc": rc["aurc"], "classes_referred": sorted(int(c) for c in present_all - present_kept),
    }
