"""Tests for pipeline.geometry: measured geometry against hand-made sets and a naive loop; the optimum
against the simplex, projected gradient descent, and the reduced two-level problem."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from pipeline import geometry as g


# ------------------------------------------------------------------------------------------
# helpers (independent re-implementations, deliberately naive)
# ------------------------------------------------------------------------------------------
def _naive_geometry(x: np.ndarray, y: np.ndarray, w: np.ndarray, counts: np.ndarray) -> dict[str, float]:
    """Per-class loop with explicit D x D covariances and numpy's pinv."""
    x = x.astype(np.float64)
    classes = sorted(set(y.tolist()))
    c = len(classes)
    mus = np.stack([x[y == k].mean(axis=0) for k in classes])
    covs = [np.cov(x[y == k], rowvar=False, bias=True) for k in classes]
    mu_g = mus.mean(axis=0)
    ms = mus - mu_g
    sigma_b = sum(np.outer(m, m) for m in ms) / c
    sigma_w = sum(covs) / c
    cos = [[float(ms[i] @ ms[j] / np.linalg.norm(ms[i]) / np.linalg.norm(ms[j])) for j in range(c)] for i in range(c)]
    pairs = [cos[i][j] for i in range(c) for j in range(c) if i != j]
    norms = np.array([np.linalg.norm(m) for m in ms])
    wn = np.array([np.linalg.norm(r) for r in w])
    ucos = np.array([[mus[i] @ mus[j] / np.linalg.norm(mus[i]) / np.linalg.norm(mus[j]) for j in range(c)]
                     for i in range(c)])
    tail = [i for i in range(c) if counts[i] < np.median(counts)]
    head = [i for i in range(c) if i not in tail]
    return {
        "FC": np.trace(sigma_w) / np.trace(sigma_b),
        "NC1": np.trace(sigma_w @ np.linalg.pinv(sigma_b, rcond=1e-10)) / c,
        "MS": float(np.mean([abs(v + 1 / (c - 1)) for v in pairs])),
        "SD": float(np.std(pairs)),
        "equinorm_means": norms.std() / norms.mean(),
        "equinorm_classifier": wn.std() / wn.mean(),
        "self_duality": np.linalg.norm(w / np.linalg.norm(w) - ms / np.linalg.norm(ms)),
        "minority_collapse_tail": float(np.mean([ucos[i, j] for i in tail for j in tail if i < j])),
        "minority_collapse_head": float(np.mean([ucos[i, j] for i in head for j in head if i < j])),
        "gram_dist_simplex": np.linalg.norm(ucos - g.simplex_gram(c)),
    }


def _ordered_tuple_loss_terms(p: np.ndarray, k: int, mode: str):
    """Expected loss as a sum over ORDERED k-tuples of negatives (K^k of them), not multisets."""
    kk = p.size
    ys, cs, ws = [], [], []
    for y in range(kk):
        q = p.copy() if mode == "ucl" else np.where(np.arange(kk) == y, 0.0, p / (1 - p[y]))
        for tup in itertools.product(range(kk), repeat=k):
            w = p[y] * np.prod([q[c] for c in tup])
            if w > 0:
                ys.append(y)
                cs.append(tup)
                ws.append(w)
    return torch.tensor(ys), torch.tensor(cs), torch.tensor(ws, dtype=torch.float64)


def _brute_loss(gram: np.ndarray, p: np.ndarray, k: int, tau: float, mode: str) -> float:
    ys, cs, ws = _ordered_tuple_loss_terms(p, k, mode)
    gm = torch.as_tensor(gram, dtype=torch.float64)
    return float((ws * torch.log1p(torch.exp((gm[ys[:, None], cs] - 1) / tau).sum(1))).sum())


def _random_unit_gram(k: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(k, k))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v @ v.T


def _clustered(n_per: list[int], d: int, spread: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(len(n_per), d)) * 3
    y = np.repeat(np.arange(len(n_per)), n_per)
    return means[y] + spread * rng.normal(size=(y.size, d)), y


# ------------------------------------------------------------------------------------------
# measured geometry
# ------------------------------------------------------------------------------------------
def test_measure_geometry_exact_simplex_means_ms_sd_zero() -> None:
    c = 5
    vertices = g.simplex_gram(c) * (c - 1) / c  # centred identity: rows are a regular simplex in R^C
    # Symmetric +/- perturbations keep each class mean exactly at its vertex.
    offsets = np.concatenate([0.1 * np.eye(c), -0.1 * np.eye(c)])
    x = np.concatenate([v + offsets for v in vertices])
    y = np.repeat(np.arange(c), 2 * c)
    m = g.measure_geometry(x, y)
    assert m["MS"] == pytest.approx(0.0, abs=1e-12)
    assert m["SD"] == pytest.approx(0.0, abs=1e-12)
    assert m["equinorm_means"] == pytest.approx(0.0, abs=1e-12)
    # tr(Sigma_c) = 2 * c * 0.01 / (2c) = 0.01 ; tr(Sigma_B) = mean ||vertex||^2 = (c-1)/c
    assert m["FC"] == pytest.approx(0.01 / ((c - 1) / c), rel=1e-12)


def test_measure_geometry_collapsed_features_fc_nc1_zero() -> None:
    rng = np.random.default_rng(1)
    means = rng.normal(size=(4, 7))
    y = rng.integers(0, 4, 300)
    m = g.measure_geometry(means[y], y)
    assert m["FC"] == pytest.approx(0.0, abs=1e-12)
    assert m["NC1"] == pytest.approx(0.0, abs=1e-12)
    assert m["MS"] > 0.01  # random means are not a simplex


def test_measure_geometry_matches_naive_loop_small_random() -> None:
    x, y = _clustered([60, 30, 12, 8, 25], d=9, spread=1.5, seed=2)
    x = x.astype(np.float32)
    rng = np.random.default_rng(3)
    w = rng.normal(size=(5, 9))
    counts = np.array([600, 300, 120, 80, 250])
    got = g.measure_geometry(x, y, w, counts)
    want = _naive_geometry(x, y, w, counts)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    assert set(got) == set(want)


def test_measure_geometry_torch_inputs_equal_numpy() -> None:
    x, y = _clustered([20, 20, 10], d=4, spread=0.5, seed=4)
    w = np.random.default_rng(5).normal(size=(3, 4))
    from_numpy = g.measure_geometry(x, y, w, [200, 150, 20])
    from_torch = g.measure_geometry(torch.tensor(x), torch.tensor(y), torch.tensor(w), torch.tensor([200, 150, 20]))
    assert from_torch == pytest.approx(from_numpy, rel=1e-12)


def test_measure_geometry_gram_distance_to_given_optimum() -> None:
    x, y = _clustered([30, 30, 30], d=5, spread=0.2, seed=6)
    target = _random_unit_gram(3, 7)
    m = g.measure_geometry(x, y, optimal_gram=target)
    learned = g.normalised_gram(g.class_means(x, y))
    assert m["gram_dist_optimal"] == pytest.approx(np.linalg.norm(learned - target), rel=1e-12)


def test_measure_geometry_absent_class_uses_present_submatrix() -> None:
    x, y = _clustered([30, 30, 30, 30], d=6, spread=0.2, seed=8)
    keep = y != 2
    m = g.measure_geometry(x[keep], y[keep], num_classes=4)
    full = g.simplex_gram(4)[np.ix_([0, 1, 3], [0, 1, 3])]
    learned = g.normalised_gram(g.class_means(x[keep], y[keep], 4)[[0, 1, 3]])
    assert m["gram_dist_simplex"] == pytest.approx(np.linalg.norm(learned - full), rel=1e-12)


def test_classifier_prototype_alignment_duality_and_gram() -> None:
    rng = np.random.default_rng(9)
    w, p = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
    assert g.classifier_prototype_alignment(w, 3 * w) == pytest.approx(0.0, abs=1e-12)
    want = np.linalg.norm(w / np.linalg.norm(w) - p / np.linalg.norm(p))
    assert g.classifier_prototype_alignment(w, p) == pytest.approx(want)
    p3 = rng.normal(size=(4, 3))
    wn = w / np.linalg.norm(w, axis=1, keepdims=True)
    pn = p3 / np.linalg.norm(p3, axis=1, keepdims=True)
    assert g.classifier_prototype_alignment(w, p3) == pytest.approx(np.linalg.norm(wn @ wn.T - pn @ pn.T) / 4)


def test_measure_geometry_mismatched_sizes_error() -> None:
    x, y = _clustered([5, 5], d=3, spread=0.1, seed=0)
    with pytest.raises(ValueError, match=r"disagree on C: \[3, 2\]"):
        g.measure_geometry(x, y, classifier_weight=np.ones((3, 3)), train_counts=[1, 2])
    with pytest.raises(ValueError, match="features have 10 rows but labels have 9"):
        g.measure_geometry(x, y[:9])
    with pytest.raises(ValueError, match="at least two classes"):
        g.measure_geometry(x[y == 0], y[y == 0])


def test_measure_geometry_large_input() -> None:
    n, d, c, sigma = 25_000, 2_048, 8, 2.0
    rng = np.random.default_rng(10)
    true_means = rng.normal(size=(c, d)).astype(np.float32)
    y = rng.integers(0, c, n)
    x = true_means[y] + sigma * rng.standard_normal((n, d), dtype=np.float32)
    m = g.measure_geometry(x, y, rng.normal(size=(c, d)), np.arange(c) + 1, g.simplex_gram(c))
    centred = true_means - true_means.mean(axis=0)
    expected_fc = sigma ** 2 * d / np.mean(np.sum(centred.astype(np.float64) ** 2, axis=1))
    assert m["FC"] == pytest.approx(expected_fc, rel=0.02)
    assert all(math.isfinite(v) for v in m.values())


# ------------------------------------------------------------------------------------------
# the optimum
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k_classes,negatives,mode", [(3, 1, "scl"), (4, 2, "scl"), (5, 3, "scl"), (4, 2, "ucl"),
                                                      (6, 1, "ucl")])
def test_optimal_gram_equal_proportions_simplex(k_classes: int, negatives: int, mode: str) -> None:
    gram, objective = g.optimal_gram(np.ones(k_classes), negatives, temperature=0.5, mode=mode)
    np.testing.assert_allclose(gram, g.simplex_gram(k_classes), atol=1e-5)
    assert objective == pytest.approx(_brute_loss(g.simplex_gram(k_classes), np.ones(k_classes) / k_classes,
                                                  negatives, 0.5, mode), rel=1e-6)


def test_optimal_gram_equal_proportions_simplex_small_temperature() -> None:
    gram, _ = g.optimal_gram(np.ones(4), 1, temperature=0.1)
    np.testing.assert_allclose(gram, g.simplex_gram(4), atol=1e-5)


def test_optimal_gram_psd_unit_diagonal_imbalanced() -> None:
    p = np.array([50.0, 20, 10, 5, 2, 1])
    gram, _ = g.optimal_gram(p, 2, temperature=0.2)
    np.testing.assert_allclose(np.diag(gram), 1.0)
    np.testing.assert_allclose(gram, gram.T)
    assert np.linalg.eigvalsh(gram).min() > -1e-6


def test_expected_loss_matches_ordered_tuple_enumeration() -> None:
    p = np.array([0.5, 0.25, 0.15, 0.1])
    gram = _random_unit_gram(4, 11)
    for mode in ("scl", "ucl"):
        for k in (1, 2, 3):
            want = _brute_loss(gram, p, k, 0.3, mode)
            assert g.expected_loss(gram, p, k, 0.3, mode) == pytest.approx(want, rel=1e-12)


def test_negative_multisets_eight_classes_three_negatives_size() -> None:
    q = np.full(8, 1 / 7)
    q[0] = 0.0
    sets = g.negative_multisets(q, 3)
    assert len(sets) == math.comb(7 + 2, 3) == 84
    assert sum(w for w, _ in sets) == pytest.approx(1.0, rel=1e-12)


def test_optimal_gram_agrees_with_projected_gradient_descent() -> None:
    p, k, tau = np.array([0.4, 0.3, 0.2, 0.1]), 2, 0.5
    gram, objective = g.optimal_gram(p, k, tau)
    ys, cs, ws = _ordered_tuple_loss_terms(p, k, "scl")
    torch.manual_seed(0)
    v = torch.nn.functional.normalize(torch.randn(4, 4, dtype=torch.float64), dim=1)
    for _ in range(4000):  # gradient step on the unit vectors, then project back onto the sphere
        v.requires_grad_(True)
        gm = v @ v.T
        loss = (ws * torch.log1p(torch.exp((gm[ys[:, None], cs] - 1) / tau).sum(1))).sum()
        (grad,) = torch.autograd.grad(loss, v)
        with torch.no_grad():
            v = torch.nn.functional.normalize(v - 2.0 * grad, dim=1)
    pgd = (v @ v.T).numpy()
    np.testing.assert_allclose(gram, pgd, atol=1e-4)
    assert objective == pytest.approx(float(loss.detach()), rel=1e-7)
    assert not np.allclose(gram, g.simplex_gram(4), atol=0.05)  # imbalance moves it off the simplex


def test_optimal_gram_bad_arguments_error() -> None:
    with pytest.raises(ValueError, match="must be finite and > 0"):
        g.optimal_gram([3, 0, 1])
    with pytest.raises(ValueError, match="mode must be 'scl'"):
        g.optimal_gram([1, 1], mode="simclr")
    with pytest.raises(ValueError, match="use fewer negatives"):
        g.optimal_gram(np.ones(30), negatives=6)


# ------------------------------------------------------------------------------------------
# two-level imbalance and minority collapse
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k_major,k_minor,ratio,k,tau,mode", [(2, 2, 5.0, 2, 1.0, "scl"), (2, 3, 8.0, 2, 0.5, "ucl"),
                                                              (3, 2, 3.0, 1, 0.3, "scl")])
def test_two_level_optimum_matches_sdp(k_major, k_minor, ratio, k, tau, mode) -> None:
    p = np.array([ratio] * k_major + [1.0] * k_minor)
    gram, objective = g.optimal_gram(p, k, tau, mode)
    opt = g.two_level_optimum(k_major, k_minor, ratio, k, tau, mode)
    assert opt.a == pytest.approx(gram[0, 1], abs=2e-4)
    assert opt.b == pytest.approx(gram[k_major, k_major + 1], abs=2e-4)
    assert opt.c == pytest.approx(gram[0, k_major], abs=2e-4)
    assert opt.objective == pytest.approx(objective, rel=1e-7)
    assert not opt.collapsed


def test_minority_collapse_balanced_is_simplex() -> None:
    assert g.minority_collapse(3, 3, 1.0, 1, 10.0) == pytest.approx(-1 / 5, abs=1e-6)
    assert g.minority_collapse(2, 4, 1.0, 2, 0.5, "ucl") == pytest.approx(-1 / 5, abs=1e-6)


@pytest.mark.parametrize("tau,mode", [(10.0, "scl"), (1.0, "scl"), (0.5, "ucl")])
def test_minority_collapse_nondecreasing_in_ratio(tau: float, mode: str) -> None:
    ratios = np.geomspace(1, 1000, 25)
    b = np.array([g.minority_collapse(3, 3, r, 1, tau, mode) for r in ratios])
    assert np.all(np.diff(b) >= -1e-7)
    assert b[-1] > b[0] + 0.3


def test_minority_collapse_threshold_brackets_collapse() -> None:
    r_star = g.minority_collapse_threshold(3, 3, negatives=1, temperature=10.0)
    assert 1.0 < r_star < 1000.0
    assert g.minority_collapse(3, 3, r_star * 1.001, 1, 10.0) == 1.0
    assert g.minority_collapse(3, 3, r_star / 1.001, 1, 10.0) < 1.0


def test_minority_collapse_threshold_agrees_with_sdp() -> None:
    r_star = g.minority_collapse_threshold(2, 2, negatives=1, temperature=10.0)
    above, _ = g.optimal_gram(np.array([2 * r_star, 2 * r_star, 1, 1]), 1, 10.0)
    below, _ = g.optimal_gram(np.array([r_star / 2, r_star / 2, 1, 1]), 1, 10.0)
    assert above[2, 3] == pytest.approx(1.0, abs=1e-3)
    assert below[2, 3] < 0.99


def test_minority_collapse_threshold_none_returns_inf() -> None:
    assert g.minority_collapse_threshold(3, 3, negatives=1, temperature=0.1, ratio_max=1000) == math.inf


def test_minority_collapse_bad_arguments_error() -> None:
    with pytest.raises(ValueError, match="at least two minority classes"):
        g.minority_collapse(3, 1, 10.0)
    with pytest.raises(ValueError, match="must be finite and >= 1"):
        g.minority_collapse(3, 3, 0.5)


# ------------------------------------------------------------------------------------------
# the optimum at the temperatures reports use (issue 11): never worse than the simplex, and in
# agreement with an independent solve written here (ordered-tuple loss, torch autograd, scipy L-BFGS)
# ------------------------------------------------------------------------------------------
ISIC_COUNTS = np.array([12875, 4522, 3323, 2624, 867, 628, 253, 239], dtype=np.float64)
PROJECT_ORDER = np.array([4522, 12875, 3323, 867, 2624, 239, 253, 628], dtype=np.float64)  # MEL, NV, BCC, ...
REPORT_TAUS = (1.0, 0.5, 0.1, 0.07, 0.05)


def _independent_optimum(p: np.ndarray, k: int, tau: float, mode: str, seeds=(101, 202, 303)) -> float:
    """Best objective over random starts of L-BFGS on unit vectors, gradient by autograd.

    Independent of pipeline.geometry_optimum: the loss is the ordered-tuple enumeration above, the
    gradient comes from torch, and the starts are different random seeds. Scaled by the simplex loss.
    """
    from scipy.optimize import minimize

    kk = p.size
    ys, cs, ws = _ordered_tuple_loss_terms(p, k, mode)
    unit = _brute_loss(g.simplex_gram(kk), p, k, tau, mode)

    def fun(x: np.ndarray) -> tuple[float, np.ndarray]:
        v = torch.tensor(x.reshape(kk, kk), dtype=torch.float64, requires_grad=True)
        u = torch.nn.functional.normalize(v, dim=1)
        gm = u @ u.T
        loss = (ws * torch.log1p(torch.exp((gm[ys[:, None], cs] - 1) / tau).sum(1))).sum() / unit
        (grad,) = torch.autograd.grad(loss, v)
        return float(loss.detach()), grad.numpy().ravel()

    best = math.inf
    for seed in seeds:
        x0 = np.random.default_rng(seed).normal(size=kk * kk)
        res = minimize(fun, x0, jac=True, method="L-BFGS-B",
                       options={"maxiter": 5000, "maxcor": 30, "gtol": 1e-12, "ftol": 1e-15})
        best = min(best, float(res.fun))
    return best * unit


def _optimum_cases() -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(7)
    return [
        ("isic-sorted", ISIC_COUNTS),
        ("isic-project-order", PROJECT_ORDER),
        ("isic-permuted-a", rng.permutation(ISIC_COUNTS)),
        ("isic-permuted-b", rng.permutation(ISIC_COUNTS)),
        ("balanced-8", np.full(8, 500.0)),
        ("two-level-extreme", np.array([1e4, 1, 1e4, 1, 1e4, 1])),  # R = 1e4, interleaved
    ]


@pytest.mark.parametrize("tau", REPORT_TAUS)
@pytest.mark.parametrize("name,counts", _optimum_cases(), ids=[c[0] for c in _optimum_cases()])
def test_optimum_no_worse_than_simplex_and_agrees_with_independent_solve(name: str, counts: np.ndarray,
                                                                        tau: float) -> None:
    p = counts / counts.sum()
    gram, objective = g.optimal_gram(p, 1, tau)
    np.testing.assert_allclose(np.diag(gram), 1.0, atol=1e-12)
    np.testing.assert_allclose(gram, gram.T, atol=1e-12)
    assert np.linalg.eigvalsh(gram).min() > -1e-9
    simplex = _brute_loss(g.simplex_gram(p.size), p, 1, tau, "scl")
    assert objective == pytest.approx(_brute_loss(gram, p, 1, tau, "scl"), rel=1e-10)
    assert objective <= simplex * (1 + 1e-9)
    independent = _independent_optimum(p, 1, tau, "scl")
    assert abs(objective - independent) <= 1e-4 * independent, (objective / simplex, independent / simplex)
    if name == "balanced-8":
        np.testing.assert_allclose(gram, g.simplex_gram(8), atol=1e-4)
    else:
        assert objective < 0.9 * simplex  # the imbalance-aware optimum really beats the simplex


@pytest.mark.parametrize("tau", (0.1, 0.05))
def test_optimum_follows_the_class_order(tau: float) -> None:
    """Permuting the classes permutes G* and leaves the objective unchanged."""
    perm = np.array([3, 0, 7, 5, 1, 6, 2, 4])
    gram, objective = g.optimal_gram(ISIC_COUNTS, 1, tau)
    gram_p, objective_p = g.optimal_gram(ISIC_COUNTS[perm], 1, tau)
    assert objective_p == pytest.approx(objective, rel=1e-6)
    # the rare-class block is barely determined at small tau (its terms weigh ~1e-6), the rest is
    head = [0, 1, 2, 3]
    inv = np.argsort(perm)
    np.testing.assert_allclose(gram_p[np.ix_(inv, inv)][np.ix_(head, head)], gram[np.ix_(head, head)], atol=2e-3)


@pytest.mark.parametrize("k,mode,tau", [(2, "scl", 0.05), (3, "scl", 0.1), (2, "ucl", 0.07)])
def test_optimum_more_negatives_verified(k: int, mode: str, tau: float) -> None:
    p = np.array([900.0, 300, 120, 40, 10])
    sol = g.solve_optimum(p, k, tau, mode)
    assert sol.gap <= 1e-4 and sol.ratio <= 1 + 1e-9
    assert sol.objective == pytest.approx(_brute_loss(sol.gram, p / p.sum(), k, tau, mode), rel=1e-10)
    independent = _independent_optimum(p / p.sum(), k, tau, mode, seeds=(5, 6))
    assert abs(sol.objective - independent) <= 1e-4 * independent


def test_extreme_two_level_matches_reduced_problem_objective() -> None:
    """R = 1e4 at tau 0.05: objective of the full solve equals the reduced three-cosine problem's."""
    opt = g.two_level_optimum(3, 3, 1e4, 1, 0.05)
    _, objective = g.optimal_gram(np.array([1e4, 1e4, 1e4, 1, 1, 1]), 1, 0.05)
    assert objective == pytest.approx(opt.objective, rel=1e-4)


def test_solution_reports_its_evidence() -> None:
    sol = g.solve_optimum(PROJECT_ORDER, 1, 0.07)
    assert sol.simplex_objective == pytest.approx(g.expected_loss(g.simplex_gram(8), PROJECT_ORDER, 1, 0.07),
                                                  rel=1e-10)
    assert sol.ratio == pytest.approx(sol.objective / sol.simplex_objective, rel=1e-8)
    assert 0.0 <= sol.gap <= 1e-4
    assert "burer-monteiro" in sol.candidates
    assert g.optimality_gap(sol.gram, PROJECT_ORDER, 1, 0.07) == pytest.approx(sol.gap, abs=1e-12)
    # the gap certificate is not vacuous: the simplex itself is far from optimal here
    assert g.optimality_gap(g.simplex_gram(8), PROJECT_ORDER, 1, 0.07) > 0.5


def test_burer_monteiro_alone_matches_conic_where_clarabel_is_reliable() -> None:
    p = np.array([0.4, 0.3, 0.2, 0.1])
    bm, bm_obj = g.burer_monteiro_gram(p, 2, 0.5)
    sol = g.solve_optimum(p, 2, 0.5, solver="CLARABEL")
    assert sol.agreement is not None and sol.agreement <= 1e-6
    assert bm_obj == pytest.approx(sol.objective, rel=1e-6)
    np.testing.assert_allclose(bm, sol.gram, atol=1e-4)


def test_a_conic_answer_worse_than_the_simplex_is_rejected(monkeypatch) -> None:
    """The issue's failure: SCS's 'optimal_inaccurate' Gram with every cosine about +0.63."""
    import pipeline.geometry_optimum as go

    bad = np.full((8, 8), 0.63)
    np.fill_diagonal(bad, 1.0)
    monkeypatch.setattr(go, "_conic_attempt", lambda *a, **k: bad.copy())
    sol = go.solve_optimum(PROJECT_ORDER, 1, 0.07)
    assert sol.solver == "burer-monteiro" and sol.ratio < 1
    assert any("rejected" in n and "worse than the simplex" in n for n in sol.notes)
    assert sol.candidates["clarabel-tight"][0] > 1e3  # the bad answer, scored: thousands of times the simplex

    def broken_bm(loss, starts=4, seed=0):
        raise FloatingPointError("diverged")

    monkeypatch.setattr(go, "_burer_monteiro", broken_bm)
    with pytest.raises(go.OptimumError, match=r"no solver produced a verified optimum.*worse than the simplex"):
        go.optimal_gram(PROJECT_ORDER, 1, 0.07)
    with pytest.raises(RuntimeError):  # callers that catch RuntimeError keep working
        go.optimal_gram(PROJECT_ORDER, 1, 0.07)


def test_conic_failure_falls_back_to_burer_monteiro(monkeypatch) -> None:
    import pipeline.geometry_optimum as go

    def failing(problem, g_var, name, solver, options, notes):
        notes.append(f"{name}: solver error (stand-in)")
        return None

    monkeypatch.setattr(go, "_conic_attempt", failing)
    sol = go.solve_optimum(ISIC_COUNTS, 1, 0.05)
    assert sol.solver == "burer-monteiro" and sol.gap <= 1e-4 and sol.agreement is None
    assert [n.split(":")[0] for n in sol.notes] == ["clarabel-tight", "clarabel-default"]  # SCS skipped: verified


def test_solver_output_never_reaches_the_terminal(capfd) -> None:
    """At tau 0.05 Clarabel fails on these counts and cvxpy logs warnings: all of it ends up in notes."""
    import logging

    import cvxpy  # noqa: F401 - creates cvxpy's logger with its own stderr handler

    logger = logging.getLogger("__cvxpy__")
    before = (logger.propagate, list(logger.handlers), logger.level)
    sol = g.solve_optimum(PROJECT_ORDER, 1, 0.05)
    sol2 = g.solve_optimum(np.array([100.0, 100, 100]), 1, 0.05)
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert sol.gap <= 1e-4 and sol2.gap <= 1e-4
    np.testing.assert_allclose(sol2.gram, g.simplex_gram(3), atol=1e-4)
    assert (logger.propagate, list(logger.handlers), logger.level) == before  # cvxpy's logging is restored
    assert any("clarabel" in n for n in sol.notes)  # what the solver said was kept, not dropped


def test_centred_gram_sees_a_shifted_simplex_as_a_simplex() -> None:
    """Post-ReLU-like means: a simplex shifted by a constant. Uncentred cosines are all >= 0."""
    c = 8
    verts = np.eye(c) - 1.0 / c
    means = verts + 0.5  # every coordinate > 0, as after a ReLU
    x = np.repeat(means, 5, axis=0)
    y = np.repeat(np.arange(c), 5)
    raw = g.measure_geometry(x, y)
    cen = g.measure_geometry(x, y, gram="centred", train_counts=np.arange(c, 0, -1))
    assert raw["MS"] == pytest.approx(0.0, abs=1e-12) and raw["SD"] == pytest.approx(0.0, abs=1e-12)
    assert g.normalised_gram(means).min() >= 0
    assert raw["gram_dist_simplex"] > 1.0  # the uncentred comparison mostly measures the offset
    assert cen["centred_gram_dist_simplex"] == pytest.approx(0.0, abs=1e-9)
    assert "gram_dist_simplex" not in cen and "minority_collapse_tail" not in cen
    assert cen["centred_minority_collapse_tail"] == pytest.approx(-1 / 7, abs=1e-9)
    with pytest.raises(ValueError, match="not compared with a centred Gram"):
        g.measure_geometry(x, y, gram="centred", optimal_gram=g.simplex_gram(c))
