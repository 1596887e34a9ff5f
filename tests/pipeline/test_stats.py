"""Stratified, vectorised bootstrap intervals and paired differences."""
from __future__ import annotations


import numpy as np
import pytest

from pipeline import metrics as M
from pipeline import stats as S


def _random_probs(n: int, c: int, seed: int, signal: float = 1.5, weights=None):
    rng = np.random.default_rng(seed)
    y = rng.choice(c, size=n, p=weights)
    z = rng.normal(size=(n, c))
    z[np.arange(n), y] += signal
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    return p, y


W5 = [0.5, 0.25, 0.15, 0.07, 0.03]


def test_bootstrap_ci_covers_point_and_is_deterministic():
    p, y = _random_probs(1500, 5, seed=0, weights=W5)
    a = S.bootstrap_ci(p, y, n_boot=1000, seed=7, class_names=list("ABCDE"))
    b = S.bootstrap_ci(p, y, n_boot=1000, seed=7, class_names=list("ABCDE"))
    assert a == b
    bacc = a["balanced_accuracy"]
    assert bacc["point"] == pytest.approx(M.balanced_accuracy(p, y))
    assert bacc["lo"] < bacc["point"] < bacc["hi"]
    assert a["accuracy"]["lo"] < M.accuracy(p, y) < a["accuracy"]["hi"]
    recall = M.per_class_recall(p, y)
    for c, name in enumerate("ABCDE"):
        r = a["recall"][name]
        assert r["point"] == pytest.approx(recall[c])
        assert r["lo"] <= r["point"] <= r["hi"]
    other = S.bootstrap_ci(p, y, n_boot=1000, seed=8)
    assert other["balanced_accuracy"] != bacc
    assert set(other["recall"]) == {"0", "1", "2", "3", "4"}


def test_bootstrap_ci_width_matches_binomial_theory():
    # stratified resampling: var(bacc) = sum_c r_c (1 - r_c) / n_c / K^2 (within-class binomial)
    p, y = _random_probs(4000, 4, seed=1, signal=1.0, weights=[0.55, 0.25, 0.15, 0.05])
    (rec,), present = S.stratified_bootstrap_recalls([M.predicted_labels(p) == y], y, 4, 4000, seed=0)
    r = M.per_class_recall(p, y)
    n_c = np.bincount(y, minlength=4)
    expected_sd = np.sqrt(np.sum(r * (1 - r) / n_c)) / 4
    assert rec.mean(axis=1).std() == pytest.approx(expected_sd, rel=0.06)
    np.testing.assert_allclose(rec.std(axis=0), np.sqrt(r * (1 - r) / n_c), rtol=0.06)
    assert np.all(np.abs(rec.mean(axis=0) - r) <= 4 * np.sqrt(r * (1 - r) / n_c / 4000))  # unbiased


def test_bootstrap_keeps_class_sizes_fixed():
    # a class with one (correct) sample is in every resample: its recall is always exactly 1,
    # and a class of 4 only takes recalls in quarters
    p = np.array([[0.9, 0.1, 0.0]] * 3 + [[0.1, 0.9, 0.0]] + [[0.2, 0.7, 0.1]] * 4 + [[0.1, 0.1, 0.8]])
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2])
    p[3] = [0.1, 0.9, 0.0]  # a class-0 sample predicted as 1
    p[4:8] = [[0.1, 0.9, 0.0], [0.1, 0.9, 0.0], [0.6, 0.4, 0.0], [0.1, 0.9, 0.0]]
    (rec,), present = S.stratified_bootstrap_recalls([M.predicted_labels(p) == y], y, 3, 500, seed=3)
    assert present.tolist() == [0, 1, 2]
    assert np.all(rec[:, 2] == 1.0)
    assert np.all(np.isin(rec[:, 0] * 4, np.arange(5)))
    ci = S.bootstrap_ci(p, y, n_boot=500, seed=3)
    assert ci["recall"]["2"] == {"point": 1.0, "lo": 1.0, "hi": 1.0}


def test_bootstrap_ci_absent_class_is_none():
    p, y = _random_probs(300, 4, seed=2)
    y[y == 1] = 0
    ci = S.bootstrap_ci(p, y, n_boot=200, seed=0, class_names=["a", "b", "c", "d"])
    assert ci["recall"]["b"] is None
    assert all(ci["recall"][k] is not None for k in "acd")
    assert ci["balanced_accuracy"]["point"] == pytest.approx(M.balanced_accuracy(p, y))


def test_bootstrap_10k_samples_1k_resamples_is_narrow():
    # its time is measured by benchmarks/bench_evaluate.py, not asserted here
    p, y = _random_probs(10_000, 8, seed=4, weights=[0.4, 0.2, 0.12, 0.1, 0.08, 0.05, 0.03, 0.02])
    ci = S.bootstrap_ci(p, y, n_boot=1000, seed=0)
    assert ci["balanced_accuracy"]["hi"] - ci["balanced_accuracy"]["lo"] < 0.05


def test_paired_difference_uses_same_resamples():
    p, y = _random_probs(800, 3, seed=5)
    q, _ = _random_probs(800, 3, seed=6)
    ca, cb = M.predicted_labels(p) == y, M.predicted_labels(q) == y
    (ra, rb), _ = S.stratified_bootstrap_recalls([ca, cb], y, 3, 300, seed=11)
    (ra_alone,), _ = S.stratified_bootstrap_recalls([ca], y, 3, 300, seed=11)
    (rb_alone,), _ = S.stratified_bootstrap_recalls([cb], y, 3, 300, seed=11)
    np.testing.assert_array_equal(ra, ra_alone)
    np.testing.assert_array_equal(rb, rb_alone)
    diff, lo, hi, _ = S.paired_bootstrap_difference(p, q, y, n_boot=300, seed=11)
    d_boot = ra.mean(1) - rb.mean(1)
    assert (lo, hi) == tuple(np.quantile(d_boot, [0.025, 0.975]))
    assert diff == pytest.approx(M.balanced_accuracy(p, y) - M.balanced_accuracy(q, y))


def test_paired_difference_identical_models_p_one():
    p, y = _random_probs(500, 4, seed=7)
    assert S.paired_bootstrap_difference(p, p.copy(), y, n_boot=200) == (0.0, 0.0, 0.0, 1.0)


def test_paired_difference_clear_winner_small_p_and_antisymmetric():
    p_good, y = _random_probs(2000, 4, seed=8, signal=2.5)
    rng = np.random.default_rng(9)
    z = rng.normal(size=p_good.shape)
    z[np.arange(len(y)), y] += 0.8
    p_bad = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    diff, lo, hi, pval = S.paired_bootstrap_difference(p_good, p_bad, y, n_boot=1000, seed=0)
    assert 0 < lo < diff < hi
    assert pval == pytest.approx(1 / 1001)
    rdiff, rlo, rhi, rp = S.paired_bootstrap_difference(p_bad, p_good, y, n_boot=1000, seed=0)
    assert rdiff == pytest.approx(-diff) and rlo == pytest.approx(-hi) and rhi == pytest.approx(-lo)
    assert rp == pval


def test_paired_difference_small_difference_not_significant():
    p, y = _random_probs(1000, 3, seed=10)
    q = p.copy()
    wrong = np.flatnonzero(M.predicted_labels(p) != y)[:1]  # fix one mistake in model B
    q[wrong] = np.eye(3)[y[wrong]]
    diff, lo, hi, pval = S.paired_bootstrap_difference(p, q, y, n_boot=1000, seed=0)
    assert diff < 0 and lo < 0 <= hi
    assert pval > 0.2


def test_bootstrap_rejects_bad_parameters():
    p, y = _random_probs(20, 2, seed=11)
    with pytest.raises(ValueError, match="n_boot must be a positive integer"):
        S.bootstrap_ci(p, y, n_boot=0)
    with pytest.raises(ValueError, match=r"alpha must lie in \(0, 1\)"):
        S.bootstrap_ci(p, y, alpha=1.5)
    with pytest.raises(ValueError, match="same shape"):
        S.paired_bootstrap_difference(p, p[:, :1], y)


# ---------------------------------------------------------------- seeds: summary and hierarchical bootstrap
def _fixed_probs(labels: np.ndarray, right: np.ndarray, n_classes: int) -> np.ndarray:
    """Probabilities whose argmax is the label where `right`, the next class elsewhere."""
    pred = np.where(right, labels, (labels + 1) % n_classes)
    p = np.full((len(labels), n_classes), 0.1 / (n_classes - 1))
    p[np.arange(len(labels)), pred] = 0.9
    return p


def test_seed_summary_by_hand():
    s = S.seed_summary([0.70, 0.72, 0.74])
    assert s["mean"] == pytest.approx(0.72) and s["n"] == 3 and s["n_missing"] == 0
    assert s["sd"] == pytest.approx(np.sqrt((0.02 ** 2 + 0.0 + 0.02 ** 2) / 2))  # ddof=1
    assert (s["min"], s["max"]) == (pytest.approx(0.70), pytest.approx(0.74))
    one = S.seed_summary([0.5, None, float("nan")])
    assert one["mean"] == 0.5 and one["sd"] is None and one["n"] == 1 and one["n_missing"] == 2
    assert S.seed_summary([])["mean"] is None


def test_hierarchical_one_run_per_group_is_the_paired_bootstrap():
    pa, y = _random_probs(400, 4, seed=3, signal=1.0)
    pb, _ = _random_probs(400, 4, seed=3, signal=1.0)
    rng = np.random.default_rng(9)
    pb = pb + rng.uniform(0, 0.3, size=pb.shape) * (np.arange(4) == y[:, None])
    h = S.hierarchical_bootstrap([[pa], [pb]], y, n_boot=600, seed=4)
    d, lo, hi, p = S.paired_bootstrap_difference(pb, pa, y, n_boot=600, seed=4)
    diff = h["differences"][1]
    assert h["differences"][0] is None
    assert diff["diff"] == pytest.approx(d) and (diff["lo"], diff["hi"]) == (pytest.approx(lo), pytest.approx(hi))
    assert diff["p_value"] == pytest.approx(p)
    ci = S.bootstrap_ci(pb, y, n_boot=600, seed=4)["balanced_accuracy"]
    assert (h["groups"][1]["lo"], h["groups"][1]["hi"]) == (pytest.approx(ci["lo"]), pytest.approx(ci["hi"]))
    assert h["groups"][1]["balanced_accuracy"]["sd"] is None


def test_hierarchical_construction_by_hand():
    """Three replicates rebuilt with explicit loops from the documented draws."""
    y = np.array([0, 0, 0, 1, 1, 0, 1, 0])
    rng = np.random.default_rng(11)
    correct_a = rng.random((2, 8)) < 0.6
    correct_b = rng.random((3, 8)) < 0.7
    group_a = [_fixed_probs(y, c, 2) for c in correct_a]
    group_b = [_fixed_probs(y, c, 2) for c in correct_b]
    n_boot, seed = 3, 5
    got = S.hierarchical_bootstrap_means([correct_a, correct_b], y, 2, n_boot, seed)

    img_rng = np.random.default_rng(seed)
    members = [np.flatnonzero(y == c) for c in (0, 1)]
    draws = [m[img_rng.integers(0, len(m), size=(n_boot, len(m)), dtype=np.int32)] for m in members]
    run_rng = np.random.default_rng(np.random.SeedSequence([seed, 1]))
    picks = [run_rng.integers(0, 2, size=(n_boot, 2)), run_rng.integers(0, 3, size=(n_boot, 3))]
    for b in range(n_boot):
        for g, correct in enumerate((correct_a, correct_b)):
            values = []
            for r in picks[g][b]:
                recalls = [sum(correct[r][i] for i in draws[c][b]) / len(members[c]) for c in (0, 1)]
                values.append(sum(recalls) / 2)
            assert got[g][b] == pytest.approx(sum(values) / len(values))

    h = S.hierarchical_bootstrap([group_a, group_b], y, n_boot=n_boot, seed=seed)
    baccs_a = [np.mean([c[y == k].mean() for k in (0, 1)]) for c in correct_a]
    baccs_b = [np.mean([c[y == k].mean() for k in (0, 1)]) for c in correct_b]
    assert h["groups"][0]["per_run"] == pytest.approx(baccs_a)
    assert h["groups"][1]["balanced_accuracy"]["mean"] == pytest.approx(np.mean(baccs_b))
    assert h["groups"][1]["balanced_accuracy"]["sd"] == pytest.approx(np.std(baccs_b, ddof=1))
    assert h["differences"][1]["diff"] == pytest.approx(np.mean(baccs_b) - np.mean(baccs_a))
    d_boot = got[1] - got[0]
    assert (h["differences"][1]["lo"], h["differences"][1]["hi"]) == (
        pytest.approx(np.quantile(d_boot, 0.025)), pytest.approx(np.quantile(d_boot, 0.975)))


def test_hierarchical_seed_level_matches_the_multinomial():
    """Runs that are right or wrong on whole classes: image resampling cannot move them, so the
    replicates of a 2-seed group with balanced accuracies 0.5 and 1.0 are 0.5, 0.75 and 1.0 with
    probabilities 1/4, 1/2, 1/4 (two draws with replacement)."""
    y = np.repeat([0, 1], 20)
    half = _fixed_probs(y, y == 0, 2)  # class 0 right, class 1 wrong: 0.5
    full = _fixed_probs(y, np.ones(40, bool), 2)  # 1.0
    boots = S.hierarchical_bootstrap_means([np.stack([y == 0, np.ones(40, bool)]), (y == 0)[None]], y, 2, 4000, 0)
    values, counts = np.unique(boots[0], return_counts=True)
    assert values == pytest.approx([0.5, 0.75, 1.0])
    assert counts / 4000 == pytest.approx([0.25, 0.5, 0.25], abs=0.03)
    assert np.all(boots[1] == 0.5)
    h = S.hierarchical_bootstrap([[half], [half, full]], y, n_boot=4000, seed=0)
    d = h["differences"][1]
    assert d["diff"] == pytest.approx(0.25)
    assert (d["lo"], d["hi"]) == (pytest.approx(0.0), pytest.approx(0.5))
    # |d_b - 0.25| >= 0.25 holds for d_b in {0, 0.5}: about half the replicates
    assert d["p_value"] == pytest.approx(0.5, abs=0.03)


def test_hierarchical_interval_includes_the_seed_spread():
    """Seeds that disagree: the per-seed paired intervals are narrow and contradict each other,
    the hierarchical interval spans them."""
    p0, y = _random_probs(2000, 3, seed=21, signal=1.2)
    groups = []
    for shift in (0.0, 0.6):
        runs = []
        for seed_skill in (-0.5, 0.5):
            rng = np.random.default_rng(int(100 * (shift + seed_skill + 1)))
            z = rng.normal(size=p0.shape)
            z[np.arange(len(y)), y] += 1.2 + shift + seed_skill
            e = np.exp(z)
            runs.append(e / e.sum(1, keepdims=True))
        groups.append(runs)
    h = S.hierarchical_bootstrap(groups, y, n_boot=800, seed=1)
    d = h["differences"][1]
    per_seed = [S.paired_bootstrap_difference(groups[1][s], groups[0][s], y, n_boot=800, seed=1) for s in (0, 1)]
    width = d["hi"] - d["lo"]
    assert all(width > 1.5 * (hi - lo) for _, lo, hi, _ in per_seed)
    assert d["lo"] <= d["diff"] <= d["hi"]


def test_hierarchical_rejects_bad_input():
    p, y = _random_probs(30, 3, seed=0)
    with pytest.raises(ValueError, match="at least one run"):
        S.hierarchical_bootstrap([[p], []], y)
    with pytest.raises(ValueError, match="same"):
        S.hierarchical_bootstrap([[p], [p[:, :2]]], y)
    with pytest.raises(ValueError, match="reference"):
        S.hierarchical_bootstrap([[p], [p]], y, reference=2)


# ---------------------------------------------------------------- ROC / PR bands
def test_roc_pr_on_grid_reads_sklearn_curves():
    from sklearn.metrics import precision_recall_curve, roc_curve

    rng = np.random.default_rng(2)
    pos = rng.random(200) < 0.3
    scores = np.round(rng.normal(size=200) + pos, 1)  # many ties
    grid = np.linspace(0, 1, 51)
    tpr, prec = S.roc_pr_on_grid(scores, pos, grid)
    fpr_s, tpr_s, _ = roc_curve(pos, scores, drop_intermediate=False)
    prec_s, rec_s, _ = precision_recall_curve(pos, scores)
    prec_s, rec_s = prec_s[:-1], rec_s[:-1]  # sklearn's appended (recall 0, precision 1) is no threshold
    for g, t, pr in zip(grid, tpr, prec):
        assert t == pytest.approx(tpr_s[fpr_s <= g + 1e-12].max())
        assert pr == pytest.approx(prec_s[rec_s >= g - 1e-12].max())


def test_curve_bands_cover_the_curve_and_shrink_with_data():
    p, y = _random_probs(300, 3, seed=4, signal=1.5)
    bands = S.curve_bands(p, y, n_boot=100, seed=0)
    big_p, big_y = _random_probs(3000, 3, seed=4, signal=1.5)
    big = S.curve_bands(big_p, big_y, n_boot=100, seed=0)
    for small, large in zip(bands, big):
        inner = slice(10, 90)  # away from the ends where every curve is pinned
        assert np.all(small["tpr_lo"] <= small["tpr"] + 1e-12) and np.all(small["tpr"] <= small["tpr_hi"] + 1e-12)
        assert np.mean(small["tpr_hi"][inner] - small["tpr_lo"][inner]) > \
            2 * np.mean(large["tpr_hi"][inner] - large["tpr_lo"][inner])  # ~ sqrt(10) narrower
    assert S.curve_bands(p[y != 2], y[y != 2], n_boot=10)[2] is None


def test_weighted_curves_equal_sorting_each_resample():
    """The one-sort weighted form must give each resample's own curve (ties, rows drawn 0 times)."""
    rng = np.random.default_rng(7)
    pos = rng.random(150) < 0.25
    scores = np.round(rng.normal(size=150) + pos, 1)
    scores[np.argmax(scores)] += 1.0  # a top score ...
    grid = np.linspace(0, 1, 41)
    rows = [rng.integers(0, 150, 150) for _ in range(20)]
    rows[0] = rows[0][rows[0] != np.argmax(scores)]  # ... that resample 0 never draws
    rows[0] = np.r_[rows[0], rows[0][: 150 - len(rows[0])]]
    weights = np.stack([np.bincount(r, minlength=150) for r in rows])
    tpr_w, prec_w = S._weighted_roc_pr_on_grid(scores, pos, weights, grid)
    for b, r in enumerate(rows):
        tpr, prec = S.roc_pr_on_grid(scores[r], pos[r], grid)
        np.testing.assert_array_equal(tpr_w[b], tpr)
        np.testing.assert_array_equal(prec_w[b], prec)


def test_curve_bands_are_the_quantiles_of_per_resample_curves():
    p, y = _random_probs(400, 3, seed=5, signal=1.0)
    n_boot, grid = 30, np.linspace(0, 1, 101)
    per = {c: [] for c in range(3)}
    for idx, _, _ in S._resample_blocks(y, 3, n_boot, 0):
        for row in idx:
            for c in range(3):
                per[c].append(S.roc_pr_on_grid(p[row, c], y[row] == c, grid))
    bands = S.curve_bands(p, y, n_boot=n_boot, seed=0)
    for c in range(3):
        tprs, precs = np.array([t for t, _ in per[c]]), np.array([q for _, q in per[c]])
        np.testing.assert_allclose(bands[c]["tpr_lo"], np.quantile(tprs, 0.025, axis=0))
        np.testing.assert_allclose(bands[c]["precision_hi"], np.quantile(precs, 0.975, axis=0))
