"""Losses against the peers' reference vectors, a direct transcription of docs/method.md, and torch."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.utils.class_weight import compute_class_weight

from pipeline import losses

VECTORS = Path(__file__).resolve().parents[1] / "data" / "peer_loss_vectors.npz"  # copy of shared/testdata
RTOL = 1e-6

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")


def _cases() -> list[int]:
    # no silent skip: a missing file must fail collection rather than test nothing
    return list(range(int(np.load(VECTORS)["n_cases"])))


@pytest.fixture(scope="module")
def vec():
    if not VECTORS.is_file():
        pytest.skip(f"reference vectors not found at {VECTORS}")
    data = np.load(VECTORS)
    return {k: data[k] for k in data.files}


def _t(a: np.ndarray, grad: bool = False) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float64 if a.dtype.kind == "f" else torch.long, requires_grad=grad)


def _close(actual: torch.Tensor, expected: np.ndarray) -> None:
    np.testing.assert_allclose(actual.detach().numpy(), expected, rtol=RTOL, atol=1e-12)


# ------------------------------------------------------------------ reference vectors

def test_reference_vectors_present_four_cases(vec):
    assert int(vec["n_cases"]) == len(_cases()) >= 1


@pytest.mark.parametrize("k", _cases())
def test_supcon_loss_matches_reference_values_and_grads(vec, k):
    f = _t(vec[f"c{k}_features"], grad=True)
    loss = losses.supcon_loss(f, _t(vec[f"c{k}_labels"]), float(vec[f"c{k}_temperature"]))
    loss.backward()
    _close(loss, vec[f"c{k}_supcon_loss"])
    _close(f.grad, vec[f"c{k}_supcon_grad_features"])


@pytest.mark.parametrize("k", _cases())
def test_balanced_contrastive_bcl_matches_reference_values_and_grads(vec, k):
    f = _t(vec[f"c{k}_features"], grad=True)
    p = _t(vec[f"c{k}_prototypes"], grad=True)
    loss = losses.balanced_contrastive_loss(f, _t(vec[f"c{k}_labels"]), p, float(vec[f"c{k}_temperature"]), mix="bcl")
    loss.backward()
    _close(loss, vec[f"c{k}_bcl_loss"])
    _close(f.grad, vec[f"c{k}_bcl_grad_features"])
    _close(p.grad, vec[f"c{k}_bcl_grad_prototypes"])


@pytest.mark.parametrize("k", _cases())
def test_logit_adjusted_ce_matches_reference_tau1_and_tau05(vec, k):
    logits = _t(vec[f"c{k}_logits"], grad=True)
    labels, counts = _t(vec[f"c{k}_labels"]), vec[f"c{k}_class_counts"]
    loss = losses.logit_adjusted_cross_entropy(logits, labels, counts, tau=1.0)
    loss.backward()
    _close(loss, vec[f"c{k}_la_loss_tau1"])
    _close(logits.grad, vec[f"c{k}_la_grad_logits_tau1"])
    _close(losses.logit_adjusted_cross_entropy(logits, labels, counts, tau=0.5), vec[f"c{k}_la_loss_tau05"])


@pytest.mark.parametrize("k", _cases())
def test_alignment_duality_matches_reference_values_and_grads(vec, k):
    w = _t(vec[f"c{k}_classifier_weight"], grad=True)
    p = _t(vec[f"c{k}_prototypes"], grad=True)
    loss = losses.classifier_prototype_alignment(w, p, mode="duality")
    loss.backward()
    _close(loss, vec[f"c{k}_align_loss"])
    _close(w.grad, vec[f"c{k}_align_grad_weight"])
    _close(p.grad, vec[f"c{k}_align_grad_prototypes"])


# ------------------------------------------------------------------ the note's formula, transcribed


def _bc_naive(f: np.ndarray, y: np.ndarray, p: np.ndarray, tau: float, mix: str, lam: float) -> float:
    """docs/method.md's L_BC written as loops over anchors and classes (float64, no log tricks)."""
    z, yy = np.concatenate([f[:, 0], f[:, 1]]), np.concatenate([y, y])
    total = 0.0
    for a in range(len(z)):
        d = 0.0
        for c in range(p.shape[0]):
            others = [k for k in range(len(z)) if k != a and yy[k] == c]
            pi = math.exp(z[a] @ p[c] / tau)
            if others:
                lam_ac = len(others) / (len(others) + 1) if mix == "bcl" else lam
                sbar = np.mean([math.exp(z[a] @ z[k] / tau) for k in others])
                d += lam_ac * sbar + (1 - lam_ac) * pi
            else:
                d += pi
        own = [k for k in range(len(z)) if k != a and yy[k] == yy[a]]
        lam_a = len(own) / (len(own) + 1) if mix == "bcl" else lam
        num = lam_a * np.mean([z[a] @ z[k] / tau for k in own]) + (1 - lam_a) * (z[a] @ p[yy[a]] / tau)
        total += -num + math.log(d)
    return total / len(z)


def _random_batch(b: int, c: int, d: int, seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    f = F.normalize(torch.randn(b, 2, d, generator=g, dtype=torch.float64), dim=2).to(dtype)
    p = F.normalize(torch.randn(c, d, generator=g, dtype=torch.float64), dim=1).to(dtype)
    y = torch.randint(0, c - 2, (b,), generator=g)  # the last two classes are absent from the batch
    y[0] = y[1]  # at least one class with two images
    return f, y, p


@pytest.mark.parametrize("mix,lam", [("ecl", 0.5), ("ecl", 0.2), ("ecl", 1.0), ("ecl", 0.0), ("bcl", 0.5)])
def test_balanced_contrastive_matches_naive_formula_with_absent_classes(mix, lam):
    f, y, p = _random_batch(12, 6, 10, seed=3)
    got = losses.balanced_contrastive_loss(f, y, p, 0.1, mix=mix, lam=lam).item()
    want = _bc_naive(f.numpy(), y.numpy(), p.numpy(), 0.1, mix, lam)
    assert got == pytest.approx(want, rel=1e-10)


def test_balanced_contrastive_grads_match_finite_differences_ecl():
    f, y, p = _random_batch(6, 4, 5, seed=4)
    f.requires_grad_(True)
    p.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b: losses.balanced_contrastive_loss(a, y, b, 0.2, mix="ecl", lam=0.3), (f, p))


# ------------------------------------------------------------------ batch invariance (ECL) vs BCL


def _duplicate_batch(m: int):
    """One class-0 image (two views) and m class-1 images whose views all equal u; p_1 != u."""
    g = torch.Generator().manual_seed(11)
    vecs = F.normalize(torch.randn(5, 8, generator=g, dtype=torch.float64), dim=1)
    a0, a1, u, p0, p1 = vecs
    f = torch.stack([torch.stack([a0, a1])] + [torch.stack([u, u])] * m)
    y = torch.tensor([0] + [1] * m)
    return f, y, torch.stack([p0, p1]), (a0, a1, u, p0, p1)


def _anchor0_closed_form(parts, tau: float, lam0: float, lam1: float) -> float:
    a0, a1, u, p0, p1 = (v.numpy() for v in parts)
    s_pos, q0, s_u, q1 = a0 @ a1 / tau, a0 @ p0 / tau, a0 @ u / tau, a0 @ p1 / tau
    t0 = lam0 * math.exp(s_pos) + (1 - lam0) * math.exp(q0)
    t1 = lam1 * math.exp(s_u) + (1 - lam1) * math.exp(q1)
    return -(lam0 * s_pos + (1 - lam0) * q0) + math.log(t0 + t1)


@pytest.mark.parametrize("m", [1, 3])
def test_prototype_share_depends_on_batch_count_under_bcl_only(m):
    """Duplicating class 1's images: BCL's prototype share 1/(2m+1) moves, ECL's stays 1 - lam."""
    tau = 0.1
    f, y, p, parts = _duplicate_batch(m)
    ecl = losses.balanced_contrastive_loss(f, y, p, tau, mix="ecl", lam=0.5, reduction="none")[0].item()
    bcl = losses.balanced_contrastive_loss(f, y, p, tau, mix="bcl", reduction="none")[0].item()
    # the anchor's own class has 1 other view (lam 1/2 under BCL); class 1 has 2m views
    assert ecl == pytest.approx(_anchor0_closed_form(parts, tau, 0.5, 0.5), rel=1e-12)
    assert bcl == pytest.approx(_anchor0_closed_form(parts, tau, 0.5, 2 * m / (2 * m + 1)), rel=1e-12)


def test_duplicating_a_class_changes_bcl_anchor_loss_but_not_ecl():
    tau = 0.1
    per = {}
    for m in (1, 2, 4):
        f, y, p, _ = _duplicate_batch(m)
        per[m] = {mix: losses.balanced_contrastive_loss(f, y, p, tau, mix=mix, reduction="none")[0].item()
                  for mix in ("ecl", "bcl")}
    assert per[1]["ecl"] == pytest.approx(per[2]["ecl"], rel=1e-12) == pytest.approx(per[4]["ecl"], rel=1e-12)
    assert abs(per[1]["bcl"] - per[2]["bcl"]) > 1e-3 and abs(per[2]["bcl"] - per[4]["bcl"]) > 1e-4


# ------------------------------------------------------------------ numerical range


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_balanced_contrastive_finite_small_tau_wide_features(dtype):
    f, y, p = _random_batch(32, 8, 2048, seed=5)
    # make several pairs nearly identical, so logits sit at about 1 / tau = 20
    f[2:6, 1] = f[2:6, 0]
    f64 = losses.balanced_contrastive_loss(f, y, p, 0.05).item()
    fx = f.to(dtype).requires_grad_(True)
    px = p.to(dtype).requires_grad_(True)
    for mix in ("ecl", "bcl"):
        loss = losses.balanced_contrastive_loss(fx, y, px, 0.05, mix=mix)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(fx.grad).all() and torch.isfinite(px.grad).all()
    ecl = losses.balanced_contrastive_loss(fx, y, px, 0.05).item()
    assert ecl == pytest.approx(f64, rel=1e-5 if dtype == torch.float32 else 1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_supcon_finite_small_tau_wide_features(dtype):
    f, y, _ = _random_batch(32, 8, 2048, seed=6)
    fx = f.to(dtype).requires_grad_(True)
    loss = losses.supcon_loss(fx, y, 0.05)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(fx.grad).all()
    assert loss.item() == pytest.approx(losses.supcon_loss(f, y, 0.05).item(), rel=1e-5 if dtype == torch.float32 else 1e-3)


def test_balanced_contrastive_finite_where_naive_exp_overflows_fp32():
    """tau = 0.005 puts logits near 200: exp overflows float32, the log-space form does not."""
    f, y, p = _random_batch(8, 4, 16, seed=7)
    f[:, 1] = f[:, 0]
    assert not torch.isfinite(torch.exp(torch.tensor(1 / 0.005, dtype=torch.float32)))
    got = losses.balanced_contrastive_loss(f.float(), y, p.float(), 0.005).item()
    assert math.isfinite(got)
    assert got == pytest.approx(losses.balanced_contrastive_loss(f, y, p, 0.005).item(), rel=1e-4)


# ------------------------------------------------------------------ alignment (gram), CE family


def test_alignment_gram_zero_when_weight_rows_scale_prototypes():
    g = torch.Generator().manual_seed(0)
    p = F.normalize(torch.randn(6, 9, generator=g, dtype=torch.float64), dim=1)
    scales = torch.rand(6, 1, generator=g, dtype=torch.float64) * 5 + 0.1
    assert losses.classifier_prototype_alignment(p * scales, p, mode="gram").item() == pytest.approx(0, abs=1e-12)


def test_alignment_gram_positive_and_independent_of_widths_otherwise():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 12, generator=g, dtype=torch.float64)  # d = 12, d_z = 4: duality cannot run
    p = F.normalize(torch.randn(6, 4, generator=g, dtype=torch.float64), dim=1)
    value = losses.classifier_prototype_alignment(w, p, mode="gram").item()
    wn = F.normalize(w, dim=1)
    want = np.linalg.norm((wn @ wn.T - p @ p.T).numpy()) / 6
    assert value > 0.05 and value == pytest.approx(want, rel=1e-12)
    with pytest.raises(ValueError, match="same shape"):
        losses.classifier_prototype_alignment(w, p, mode="duality")


def test_focal_gamma_zero_equals_cross_entropy():
    g = torch.Generator().manual_seed(2)
    logits, y = torch.randn(20, 5, generator=g, dtype=torch.float64), torch.randint(0, 5, (20,), generator=g)
    assert losses.focal_loss(logits, y, gamma=0.0).item() == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-12)
    assert losses.cross_entropy(logits, y).item() == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-12)


def test_focal_gamma_two_matches_definition():
    g = torch.Generator().manual_seed(3)
    logits, y = torch.randn(20, 5, generator=g, dtype=torch.float64), torch.randint(0, 5, (20,), generator=g)
    pt = torch.softmax(logits, 1).numpy()[np.arange(20), y.numpy()]
    want = np.mean(-((1 - pt) ** 2) * np.log(pt))
    assert losses.focal_loss(logits, y, gamma=2.0).item() == pytest.approx(want, rel=1e-12)


def test_class_weighted_ce_matches_torch_weighted_ce_with_sklearn_balanced_weights():
    counts = np.array([500, 120, 40, 9])
    train_labels = np.repeat(np.arange(4), counts)
    sk = compute_class_weight("balanced", classes=np.arange(4), y=train_labels)
    np.testing.assert_allclose(losses.balanced_class_weights(counts).numpy(), sk, rtol=1e-12)
    g = torch.Generator().manual_seed(4)
    logits, y = torch.randn(30, 4, generator=g, dtype=torch.float64), torch.randint(0, 4, (30,), generator=g)
    want = F.cross_entropy(logits, y, weight=torch.tensor(sk)).item()
    assert losses.class_weighted_cross_entropy(logits, y, counts).item() == pytest.approx(want, rel=1e-12)


def test_logit_adjusted_ce_zero_count_class_raises():
    with pytest.raises(ValueError, match=r"class index\(es\) \[2\] have none"):
        losses.logit_adjusted_cross_entropy(torch.zeros(2, 3), torch.tensor([0, 1]), [5, 3, 0])


def test_logit_adjusted_ce_tau_zero_equals_cross_entropy():
    g = torch.Generator().manual_seed(5)
    logits, y = torch.randn(10, 3, generator=g), torch.randint(0, 3, (10,), generator=g)
    assert losses.logit_adjusted_cross_entropy(logits, y, [100, 10, 1], tau=0.0).item() == pytest.approx(
        F.cross_entropy(logits, y).item(), rel=1e-6)


def test_class_prior_is_built_once_per_device_not_every_step():
    """The counts tensor is cached per (counts, device, dtype): no host-to-device copy (a GPU sync) per step."""
    from pipeline.losses import _counts_tensor

    logits = torch.zeros(2, 3)
    a = _counts_tensor(np.array([5.0, 3.0, 2.0]), logits)
    assert _counts_tensor(np.array([5, 3, 2]), logits) is a
    assert _counts_tensor(np.array([5.0, 3.0, 1.0]), logits) is not a
    assert _counts_tensor(np.array([5.0, 3.0, 2.0]), logits.double()).dtype == torch.float64
    with pytest.raises(ValueError, match=r"class index\(es\) \[2\] have none"):
        _counts_tensor(np.array([5.0, 3.0, 0.0]), logits)
