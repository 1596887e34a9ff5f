"""Tests for pipeline.geometry: measured geometry against hand-made sets and a naive loop; the optimum
against the simplex, projected gradient descent, and the reduced two-level problem."""
from __future__ import annotations

import itertools
import math
import time

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


def test_measure_geometry_large_input_seconds() -> None:
    n, d, c, sigma = 25_000, 2_048, 8, 2.0
    rng = np.random.default_rng(10)
    true_means = rng.normal(size=(c, d)).astype(np.float32)
    y = rng.integers(0, c, n)
    x = true_means[y] + sigma * rng.standard_normal((n, d), dtype=np.float32)
    start = time.perf_counter()
    m = g.measure_geometry(x, y, rng.normal(size=(c, d)), np.arange(c) + 1, g.simplex_gram(c))
    elapsed = time.perf_counter() - start
    assert elapsed < 15.0
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
    assert objective == pytest.approx(float(loss), rel=1e-7)
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
