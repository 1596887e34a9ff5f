"""pipeline.metrics against scikit-learn, torchmetrics and hand-computed numbers."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from sklearn import metrics as skm
from sklearn.preprocessing import label_binarize

from pipeline import metrics as M


def _random_probs(n: int, c: int, seed: int, signal: float = 1.5, weights=None):
    rng = np.random.default_rng(seed)
    y = rng.choice(c, size=n, p=weights)
    z = rng.normal(size=(n, c))
    z[np.arange(n), y] += signal
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    return p, y


# --- balanced accuracy -------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_balanced_accuracy_matches_sklearn_untied(seed):
    p, y = _random_probs(500, 6, seed, weights=[0.5, 0.2, 0.15, 0.1, 0.04, 0.01])
    expected = skm.balanced_accuracy_score(y, p.argmax(1))
    assert M.balanced_accuracy(p, y) == pytest.approx(expected, abs=1e-12)
    assert M.accuracy(p, y) == pytest.approx(skm.accuracy_score(y, p.argmax(1)), abs=1e-12)


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true:UserWarning")  # sklearn, on purpose
def test_balanced_accuracy_tied_rows_count_wrong():
    p = np.array([
        [0.5, 0.5, 0.0],   # class 0, tied with class 1 -> wrong (argmax alone would say right)
        [0.8, 0.1, 0.1],   # class 0, right
        [0.1, 0.8, 0.1],   # class 1, right
        [0.4, 0.2, 0.4],   # class 2, tied 0/2 -> wrong
        [0.1, 0.1, 0.8],   # class 2, right
    ])
    y = np.array([0, 0, 1, 2, 2])
    # hand: recalls 1/2, 1, 1/2 -> mean 2/3; plain argmax would give (1 + 1 + 1/2)/3
    assert M.balanced_accuracy(p, y) == pytest.approx(2 / 3, abs=1e-12)
    assert M.accuracy(p, y) == pytest.approx(3 / 5, abs=1e-12)
    assert M.predicted_labels(p).tolist() == [-1, 0, 1, -1, 2]
    # sklearn agrees once tied rows carry a label that is no class
    assert M.balanced_accuracy(p, y) == pytest.approx(skm.balanced_accuracy_score(y, M.predicted_labels(p)))


def test_balanced_accuracy_absent_class_excluded():
    p = np.array([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.3, 0.6]])
    y = np.array([0, 1, 1, 0])  # class 2 absent, but predicted once
    # recalls: class 0 1/2, class 1 1/2, class 2 n/a -> 0.5 (not 1/3)
    assert M.balanced_accuracy(p, y) == pytest.approx(0.5)
    recall = M.per_class_recall(p, y)
    assert recall[:2].tolist() == [0.5, 0.5] and np.isnan(recall[2])


def test_balanced_accuracy_bad_labels_clear_error():
    p = np.full((3, 2), 0.5)
    with pytest.raises(ValueError, match=r"labels must lie in 0\.\.1 .*found -1 at row 2"):
        M.balanced_accuracy(p, [0, 1, -1])
    with pytest.raises(ValueError, match=r"labels must be \[N\] with N = 3"):
        M.balanced_accuracy(p, [0, 1])


# --- calibration ------------------------------------------------------------------------------

def test_expected_calibration_error_hand_computed():
    # n_bins=10; conf .95 right, .95 wrong -> bin (.9, 1]: acc .5, conf .95, gap .45
    # conf .65 right twice -> bin (.6, .7]: acc 1, conf .65, gap .35; ECE = .5*.45 + .5*.35 = .4
    p = np.array([[0.95, 0.05], [0.95, 0.05], [0.35, 0.65], [0.65, 0.35]])
    y = np.array([0, 1, 1, 0])
    assert M.expected_calibration_error(p, y, n_bins=10) == pytest.approx(0.40, abs=1e-12)
    assert M.maximum_calibration_error(p, y, n_bins=10) == pytest.approx(0.45, abs=1e-12)


def test_binned_calibration_edges_are_left_open():
    # edges 0, .25, .5, .75, 1 are exact in binary; (lo, hi]: .75 -> bin 2, .5 -> bin 1, 0 -> bin 0
    bins = M.binned_calibration([0.75, 0.5, 0.0, 1.0, 0.76], [1, 0, 0, 1, 1], n_bins=4)
    assert bins["edges"].tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert bins["counts"].tolist() == [1, 1, 1, 2]
    assert bins["confidence"][3] == pytest.approx(0.88)
    assert bins["accuracy"].tolist() == [0.0, 0.0, 1.0, 1.0]


def _ece_reference(conf, hit, n_bins):
    """Guo et al. eq. 2 written as a plain loop over bins (lo, hi]."""
    total = 0.0
    for m in range(n_bins):
        lo, hi = m / n_bins, (m + 1) / n_bins
        in_bin = (conf > lo) & (conf <= hi) if m else (conf <= hi)
        if in_bin.any():
            total += in_bin.mean() * abs(hit[in_bin].mean() - conf[in_bin].mean())
    return total


@pytest.mark.parametrize("n_bins", [5, 15])
def test_expected_calibration_error_matches_loop_reference(n_bins):
    p, y = _random_probs(2000, 5, seed=3, signal=2.0)
    hit = (p.argmax(1) == y).astype(float)
    assert M.expected_calibration_error(p, y, n_bins) == pytest.approx(_ece_reference(p.max(1), hit, n_bins), abs=1e-12)
    per_class = [_ece_reference(p[:, c], (y == c).astype(float), n_bins) for c in range(5)]
    assert M.classwise_ece(p, y, n_bins) == pytest.approx(np.mean(per_class), abs=1e-12)


@pytest.mark.filterwarnings("ignore:torch.searchsorted.*non-contiguous:UserWarning")  # torchmetrics internals
@pytest.mark.parametrize("seed", [0, 1])
def test_calibration_errors_match_torchmetrics(seed):
    torch = pytest.importorskip("torch")
    tmf = pytest.importorskip("torchmetrics.functional.classification")
    p, y = _random_probs(3000, 7, seed=seed, signal=2.5)
    pt, yt = torch.tensor(p, dtype=torch.float64), torch.tensor(y)
    ece_tm = tmf.multiclass_calibration_error(pt, yt, num_classes=7, n_bins=15, norm="l1").item()
    mce_tm = tmf.multiclass_calibration_error(pt, yt, num_classes=7, n_bins=15, norm="max").item()
    assert M.expected_calibration_error(p, y) == pytest.approx(ece_tm, abs=1e-6)  # torchmetrics bins in float32
    assert M.maximum_calibration_error(p, y) == pytest.approx(mce_tm, abs=1e-6)
    per_class = [
        tmf.binary_calibration_error(pt[:, c], (yt == c).long(), n_bins=15, norm="l1").item() for c in range(7)
    ]
    assert M.classwise_ece(p, y) == pytest.approx(float(np.mean(per_class)), abs=1e-6)


def test_brier_score_is_twice_sklearn_binary():
    p, y = _random_probs(400, 2, seed=4)
    assert M.brier_score(p, y) == pytest.approx(2 * skm.brier_score_loss(y, p[:, 1]), abs=1e-12)


def test_brier_score_hand_values():
    assert M.brier_score(np.eye(4), np.arange(4)) == 0.0
    assert M.brier_score(np.full((3, 4), 0.25), [0, 1, 3]) == pytest.approx(1 - 1 / 4)
    # (0.3-1)^2 + 0.7^2 = 0.98 for a confident mistake
    assert M.brier_score([[0.3, 0.7]], [0]) == pytest.approx(0.98)


def test_nll_matches_sklearn_log_loss():
    p, y = _random_probs(300, 4, seed=5)
    assert M.nll(p, y) == pytest.approx(skm.log_loss(y, p, labels=range(4)), abs=1e-12)
    assert M.nll([[1.0, 0.0]], [1]) == pytest.approx(-np.log(1e-15))  # clipped, finite


# --- per-class table --------------------------------------------------------------------------

def test_per_class_auroc_ap_match_sklearn():
    p, y = _random_probs(600, 5, seed=6, weights=[0.4, 0.3, 0.15, 0.1, 0.05])
    names = ["MEL", "NV", "BCC", "AK", "DF"]
    rep = M.classification_report(p, y, names)
    auc = skm.roc_auc_score(y, p, multi_class="ovr", average=None)
    ap = skm.average_precision_score(label_binarize(y, classes=range(5)), p, average=None)
    prec, rec, f1, sup = skm.precision_recall_fscore_support(y, p.argmax(1), labels=range(5), zero_division=0)
    for c, name in enumerate(names):
        row = rep["per_class"][name]
        assert row["auroc"] == pytest.approx(auc[c], abs=1e-12)
        assert row["average_precision"] == pytest.approx(ap[c], abs=1e-12)
        assert row["recall"] == pytest.approx(rec[c], abs=1e-12)
        assert row["precision"] == pytest.approx(prec[c], abs=1e-12)
        assert row["f1"] == pytest.approx(f1[c], abs=1e-12)
        assert row["support"] == sup[c]
        spec = skm.recall_score(y != c, p.argmax(1) != c)
        assert row["specificity"] == pytest.approx(spec, abs=1e-12)
    assert rep["confusion"]["counts"] == skm.confusion_matrix(y, p.argmax(1), labels=range(5)).tolist()
    assert rep["overall"]["macro_auroc"] == pytest.approx(np.mean(auc))
    assert rep["overall"]["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, p.argmax(1)))


def test_classification_report_absent_class_is_none_and_json_safe():
    p, y = _random_probs(200, 4, seed=7)
    y[y == 3] = 0  # class 3 absent from this split
    rep = M.classification_report(p, y, ["a", "b", "c", "d"], train_counts=[300, 50, 10, 5])
    row = rep["per_class"]["d"]
    assert row["support"] == 0
    for key in ("recall", "f1", "auroc", "average_precision"):
        assert row[key] is None, key
    assert row["specificity"] is not None  # every sample is a true negative for d: defined
    assert rep["confusion"]["normalized"][3] is None
    assert rep["overall"]["n_classes_present"] == 3
    assert rep["overall"]["balanced_accuracy"] == pytest.approx(M.balanced_accuracy(p, y))
    json.dumps(rep, allow_nan=False)  # raises on any NaN / inf
    flat = M.flat_metrics(rep)
    assert "recall/d" not in flat and "recall/a" in flat and "specificity/d" in flat
    assert all(np.isfinite(v) for v in flat.values())


def test_classification_report_never_predicted_class_precision_none():
    p = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3]])
    y = np.array([0, 1, 1])
    row = M.classification_report(p, y, ["x", "y"])["per_class"]["y"]
    assert row["precision"] is None and row["recall"] == 0.0 and row["f1"] == 0.0


def test_confusion_normalized_diagonal_is_recall_with_ties():
    p = np.array([[0.5, 0.5], [0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    y = np.array([0, 0, 1, 1])
    rep = M.classification_report(p, y, ["a", "b"])
    assert rep["confusion"]["counts"] == [[1, 0], [1, 1]]
    assert rep["confusion"]["tied"] == [1, 0]
    assert rep["confusion"]["normalized"] == [[0.5, 0.0], [0.5, 0.5]]
    assert rep["overall"]["n_tied"] == 1
    assert rep["overall"]["accuracy"] == pytest.approx(0.5)


def test_shot_groups_thresholds_and_accuracy():
    # train counts: 101 many, 100 medium, 20 medium, 19 few; test recalls 1, 0.5, 0, 1
    p = np.array([
        [0.7, 0.1, 0.1, 0.1],
        [0.1, 0.7, 0.1, 0.1], [0.7, 0.1, 0.1, 0.1],
        [0.7, 0.1, 0.1, 0.1],
        [0.1, 0.1, 0.1, 0.7],
    ])
    y = np.array([0, 1, 1, 2, 3])
    rep = M.classification_report(p, y, list("ABCD"), train_counts=[101, 100, 20, 19])
    shots = rep["shots"]
    assert shots["many"] == {"classes": ["A"], "accuracy": 1.0}
    assert shots["medium"] == {"classes": ["B", "C"], "accuracy": 0.25}
    assert shots["few"] == {"classes": ["D"], "accuracy": 1.0}
    assert [rep["per_class"][n]["shot"] for n in "ABCD"] == ["many", "medium", "medium", "few"]
    custom = M.classification_report(p, y, list("ABCD"), train_counts=[101, 100, 20, 19], few_shot_max=21)
    assert custom["shots"]["few"]["classes"] == ["C", "D"]


def test_classification_report_rejects_wrong_names():
    p, y = _random_probs(10, 3, seed=8)
    with pytest.raises(ValueError, match="class_names has 2 names but probs has 3 columns"):
        M.classification_report(p, y, ["a", "b"])


# --- ISIC CSV ---------------------------------------------------------------------------------

def test_write_isic_csv_round_trips_exact_floats(tmp_path):
    pd = pytest.importorskip("pandas")
    p, y = _random_probs(50, 3, seed=9)
    p = p.astype(np.float32)  # what a network hands out
    p[0] = [0.25, 0.25, 0.5]
    ids = [f"ISIC_{i:07d}" for i in range(50)]
    M.write_isic_csv(tmp_path / "pred.csv", ids, p, ["MEL", "NV", "BCC"])
    M.write_isic_csv(tmp_path / "truth.csv", ids, y, ["MEL", "NV", "BCC"])
    pred = pd.read_csv(tmp_path / "pred.csv")
    truth = pd.read_csv(tmp_path / "truth.csv")
    assert list(pred.columns) == ["image", "MEL", "NV", "BCC"]
    assert pred["image"].tolist() == ids
    np.testing.assert_array_equal(pred[["MEL", "NV", "BCC"]].to_numpy(), p.astype(np.float64))
    np.testing.assert_array_equal(truth[["MEL", "NV", "BCC"]].to_numpy().argmax(1), y)
    assert truth[["MEL", "NV", "BCC"]].to_numpy().sum() == 50
    with open(tmp_path / "truth.csv", newline="") as fh:
        assert next(csv.reader(fh)) == ["image", "MEL", "NV", "BCC"]
    assert sorted(f.name for f in tmp_path.iterdir()) == ["pred.csv", "truth.csv"]  # no temp files left


def test_write_isic_csv_rejects_bad_values(tmp_path):
    with pytest.raises(ValueError, match=r"values must be \[2, 2\]"):
        M.write_isic_csv(tmp_path / "x.csv", ["a", "b"], np.ones((2, 3)) / 3, ["A", "B"])
    with pytest.raises(ValueError, match=r"lie in \[0, 1\]"):
        M.write_isic_csv(tmp_path / "x.csv", ["a", "b"], [[1.5, -0.5], [0.5, 0.5]], ["A", "B"])
    with pytest.raises(ValueError, match="unique"):
        M.write_isic_csv(tmp_path / "x.csv", ["a", "a"], [0, 1], ["A", "B"])
    assert not (tmp_path / "x.csv").exists()


# ---------------------------------------------------------------- operating points
def _brute_best(scores, pos, target, fix="specificity"):
    """Every threshold "score >= t" over the observed scores and +inf, by plain loops."""
    best = None
    for t in sorted(set(scores.tolist()) | {np.inf}):
        sens = sum(1 for s, q in zip(scores, pos) if q and s >= t) / pos.sum()
        spec = sum(1 for s, q in zip(scores, pos) if not q and s < t) / (~pos).sum()
        fixed, free = (spec, sens) if fix == "specificity" else (sens, spec)
        if fixed >= target and (best is None or free > best[1]):
            best = (t, free, fixed)
    return best


@pytest.mark.parametrize("target", [0.8, 0.9, 0.95])
def test_threshold_for_specificity_and_sensitivity_are_best_points_of_sklearn_roc(target):
    from sklearn.metrics import roc_curve

    rng = np.random.default_rng(int(target * 100))
    pos = rng.random(300) < 0.2
    scores = np.round(rng.normal(size=300) + 1.2 * pos, 2)  # rounded: tied scores too
    fpr, tpr, _ = roc_curve(pos, scores, drop_intermediate=False)
    roc_points = set(zip(np.round(fpr, 9), np.round(tpr, 9)))

    t = M.threshold_for_specificity(scores, pos, target)
    sens, spec = M.sensitivity_specificity(scores, pos, t)
    assert spec >= target and sens == pytest.approx(_brute_best(scores, pos, target, "specificity")[1])
    assert (round(1 - spec, 9), round(sens, 9)) in roc_points

    t = M.threshold_for_sensitivity(scores, pos, target)
    sens, spec = M.sensitivity_specificity(scores, pos, t)
    assert sens >= target and spec == pytest.approx(_brute_best(scores, pos, target, "sensitivity")[1])
    assert (round(1 - spec, 9), round(sens, 9)) in roc_points


def test_operating_points_chosen_on_val_applied_to_test():
    rng = np.random.default_rng(5)

    def split(n):
        y = rng.choice(3, size=n, p=[0.6, 0.3, 0.1])
        z = rng.normal(size=(n, 3))
        z[np.arange(n), y] += 1.5
        return np.exp(z) / np.exp(z).sum(1, keepdims=True), y

    pv, yv = split(400)
    pt, yt = split(300)
    ops = M.operating_points(pv, yv, pt, yt, ["A", "B", "C"])
    for c, name in enumerate("ABC"):
        for row in ops[name]["at_specificity"]:
            thr = M.threshold_for_specificity(pv[:, c], yv == c, row["target"])
            assert row["threshold"] == pytest.approx(thr) and row["val_specificity"] >= row["target"]
            called = pt[:, c] >= thr  # held on test, by hand
            assert row["sensitivity"] == pytest.approx(called[yt == c].mean())
            assert row["specificity"] == pytest.approx((~called[yt != c]).mean())
        for row in ops[name]["at_sensitivity"]:
            assert row["val_sensitivity"] >= row["target"]
    # a class absent from test has no operating point
    assert M.operating_points(pv, yv, pt[yt != 2], yt[yt != 2], ["A", "B", "C"])["C"] is None


# ---------------------------------------------------------------- selective prediction
def test_risk_coverage_and_selective_balanced_accuracy_by_hand():
    # confidences 0.5 .. 0.9 in scrambled order; labels make the pattern right/wrong by hand
    conf = np.array([0.7, 0.9, 0.5, 0.6, 0.8])
    pred = np.array([0, 1, 2, 1, 0])
    probs = np.zeros((5, 3))
    for i, (c, k) in enumerate(zip(conf, pred)):
        probs[i] = (1 - c) / 2
        probs[i, k] = c
    labels = np.array([0, 1, 0, 1, 2])  # correct: 0.7 yes, 0.9 yes, 0.5 no, 0.6 yes, 0.8 no
    rc = M.risk_coverage(probs, labels)
    # most confident first: 0.9 ok, 0.8 wrong, 0.7 ok, 0.6 ok, 0.5 wrong
    assert rc["risk"] == pytest.approx([0, 1 / 2, 1 / 3, 1 / 4, 2 / 5])
    assert rc["coverage"] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert rc["aurc"] == pytest.approx((0 + 1 / 2 + 1 / 3 + 1 / 4 + 2 / 5) / 5)
    sel = M.selective_metrics(probs, labels, coverage=0.8)
    # kept: rows 1 (cls 1 ok), 4 (cls 2 wrong), 0 (cls 0 ok), 3 (cls 1 ok); referred: row 2 (cls 0)
    assert sel["n_kept"] == 4 and sel["threshold"] == pytest.approx(0.6)
    assert sel["accuracy"] == pytest.approx(3 / 4)
    assert sel["balanced_accuracy"] == pytest.approx((1 + 1 + 0) / 3)
    assert sel["classes_referred"] == []
    sel = M.selective_metrics(probs, labels, coverage=0.4)  # keeps 0.9 (cls 1) and 0.8 (cls 2)
    assert sel["balanced_accuracy"] == pytest.approx(0.5) and sel["classes_referred"] == [0]
    with pytest.raises(ValueError, match="coverage"):
        M.selective_metrics(probs, labels, coverage=0)
