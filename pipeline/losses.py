"""Pure functional losses of ECL and its peers (names and shapes fixed in docs/method.md, "Functional API").

Why pure functions: the method layer (`pipeline.methods`) composes them with weights, views and
cross-rank gathering; tests and external checks call them directly on hand-made tensors and
compare against the peers' reference implementations (`shared/testdata/peer_loss_vectors.npz`).
This module imports neither `pipeline.config` nor mlflow.

Conventions: features and prototypes arrive L2-normalised; a features tensor `[B, V, D]` is
flattened view-major (rows `[0:B]` are view 0, `[B:2B]` view 1, ...), as SupContrast and BCL do.
Similarities are computed in the input dtype (so bf16 matmuls stay fast under autocast) and then
promoted to at least float32 for every exp/log, which are done as log-sum-exp so a small
temperature (tau = 0.05 with D = 2048) never overflows.
"""
from __future__ import annotations

from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "cross_entropy",
    "class_weighted_cross_entropy",
    "balanced_class_weights",
    "focal_loss",
    "logit_adjusted_cross_entropy",
    "supcon_loss",
    "balanced_contrastive_loss",
    "classifier_prototype_alignment",
]

CountsLike = Sequence[float] | np.ndarray | Tensor


def _acc_dtype(t: Tensor) -> torch.dtype:
    """float64 stays float64 (reference checks); anything narrower is promoted to float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


_ON_DEVICE: dict[tuple, Tensor] = {}


def _device_constant(key: tuple, make) -> Tensor:
    """A small constant tensor built once per (value, device, dtype) and reused every step.

    Why: `tensor.to(cuda)` from host memory is a blocking copy that waits for the GPU's queue, so
    building the class prior on the host each step synchronised the GPU once per step.
    """
    value = _ON_DEVICE.get(key)
    if value is None:
        if len(_ON_DEVICE) > 256:
            _ON_DEVICE.clear()
        value = _ON_DEVICE[key] = make()
    return value


def _host_counts(class_counts: CountsLike) -> np.ndarray:
    if isinstance(class_counts, Tensor):
        return class_counts.detach().cpu().double().numpy()
    return np.asarray(class_counts, dtype=np.float64)


def _counts_tensor(class_counts: CountsLike, like: Tensor) -> Tensor:
    counts = _host_counts(class_counts)
    if counts.ndim != 1:
        raise ValueError(f"class_counts must be one-dimensional [C]; got shape {tuple(counts.shape)}")
    if counts.size != like.shape[-1]:
        raise ValueError(f"class_counts has {counts.size} entries but the logits have {like.shape[-1]} classes")
    if not bool(np.all(counts > 0)):
        missing = np.flatnonzero(counts <= 0).tolist()
        raise ValueError(f"class_counts must be positive for every class; class index(es) {missing} have none")
    dtype = _acc_dtype(like)
    return _device_constant(("counts", counts.tobytes(), str(like.device), dtype),
                            lambda: torch.as_tensor(counts).to(device=like.device, dtype=dtype))


def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Plain softmax cross-entropy, mean over the batch.

    Args:
        logits: [B, C] raw scores.
        labels: [B] class indices.
    """
    return F.cross_entropy(logits.to(_acc_dtype(logits)), labels)


def balanced_class_weights(class_counts: CountsLike) -> Tensor:
    """Inverse-frequency class weights, normalised as scikit-learn's ``class_weight="balanced"``.

    w_c = N / (C * n_c), so the expected weight of a training sample is exactly 1 and the loss keeps
    the scale of unweighted CE. Why this normalisation: with torch's weighted mean (divided by the
    batch's weight sum) any global scale cancels in the loss value, so the choice only matters for
    what is reported; sklearn's convention is the one users already know.

    Returns:
        [C] float64 weights.
    """
    counts = torch.as_tensor(np.asarray(class_counts, dtype=np.float64) if not isinstance(class_counts, Tensor)
                             else class_counts.detach().cpu().double())
    if not bool(torch.all(counts > 0)):
        missing = torch.nonzero(counts <= 0).flatten().tolist()
        raise ValueError(f"class_counts must be positive for every class; class index(es) {missing} have none")
    return counts.sum() / (counts.numel() * counts)


def class_weighted_cross_entropy(logits: Tensor, labels: Tensor, class_counts: CountsLike) -> Tensor:
    """Cross-entropy with inverse-frequency class weights (see `balanced_class_weights`).

    The reduction is torch's weighted mean: sum_i w_{y_i} l_i / sum_i w_{y_i}.

    Args:
        logits: [B, C]. labels: [B]. class_counts: [C] training counts (all > 0).
    """
    counts = _counts_tensor(class_counts, logits)  # shape/positivity check with a clear message; cached on device
    weight = _device_constant(("balanced", _host_counts(class_counts).tobytes(), str(logits.device), counts.dtype),
                              lambda: balanced_class_weights(class_counts).to(device=logits.device, dtype=counts.dtype))
    return F.cross_entropy(logits.to(weight.dtype), labels, weight=weight)


def focal_loss(logits: Tensor, labels: Tensor, gamma: float = 2.0) -> Tensor:
    """Focal loss (Lin et al. 2017): mean of -(1 - p_t)^gamma * log p_t; gamma = 0 is plain CE.

    Args:
        logits: [B, C]. labels: [B]. gamma: focusing exponent (>= 0).
    """
    if gamma < 0:
        raise ValueError(f"focal gamma must be >= 0; got {gamma}")
    logp = F.log_softmax(logits.to(_acc_dtype(logits)), dim=1).gather(1, labels.view(-1, 1)).squeeze(1)
    if gamma == 0:
        return -logp.mean()
    # (1 - p)^gamma written with expm1 so it stays accurate when p_t is close to 1
    modulator = (-torch.expm1(logp)).clamp_min(0).pow(gamma)
    return -(modulator * logp).mean()


def logit_adjusted_cross_entropy(logits: Tensor, labels: Tensor, class_counts: CountsLike, tau: float = 1.0) -> Tensor:
    """Logit-adjusted CE (Menon et al. 2021): CE(logits + tau * log(pi), y), pi = counts / sum.

    Matches BCL's ``LogitAdjust``. Used for training only; inference takes the raw logits.

    Args:
        logits: [B, C]. labels: [B]. class_counts: [C] training counts (all > 0). tau: scale.
    Raises:
        ValueError: a class has no training samples (log 0 would make its logit -inf).
    """
    counts = _counts_tensor(class_counts, logits)
    adjust = tau * torch.log(counts / counts.sum())
    return F.cross_entropy(logits.to(counts.dtype) + adjust.view(1, -1), labels)


def _flatten_views(features: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    if features.ndim != 3:
        raise ValueError(f"features must be [B, V, D]; got shape {tuple(features.shape)}")
    b, v, _ = features.shape
    if labels.shape != (b,):
        raise ValueError(f"labels must be [B] = [{b}]; got shape {tuple(labels.shape)}")
    z = torch.cat(torch.unbind(features, dim=1), dim=0)  # [V*B, D], view-major
    return z, labels.repeat(v)


def supcon_loss(features: Tensor, labels: Tensor, temperature: float) -> Tensor:
    """Supervised contrastive loss (Khosla et al. 2020), contrast mode "all".

    Equals SupContrast's ``SupConLoss(temperature, base_temperature=temperature)``: every one of the
    V*B views is an anchor; its positives are the other views of its class; the denominator runs
    over all views but the anchor itself; the loss is the mean over anchors of
    -(mean over positives of log softmax).

    Args:
        features: [B, V, D] L2-normalised, V >= 2 (so every anchor has a positive).
        labels: [B] class indices.
        temperature: tau > 0.
    Returns:
        Scalar loss in float32 (float64 for float64 input).
    """
    z, y = _flatten_views(features, labels)
    if features.shape[1] < 2:
        raise ValueError("supcon_loss needs at least 2 views per sample")
    n = z.shape[0]
    sim = (z @ z.T).to(_acc_dtype(z)) / temperature
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    log_prob = sim - torch.logsumexp(sim.masked_fill(self_mask, float("-inf")), dim=1, keepdim=True)
    pos = (y.view(-1, 1) == y.view(1, -1)) & ~self_mask
    pos_f = pos.to(log_prob.dtype)
    mean_log_prob_pos = (log_prob * pos_f).sum(1) / pos_f.sum(1)
    return -mean_log_prob_pos.mean()


def balanced_contrastive_loss(
    features: Tensor,
    labels: Tensor,
    prototypes: Tensor,
    temperature: float,
    mix: Literal["ecl", "bcl"] = "ecl",
    lam: float = 0.5,
    reduction: Literal["mean", "none"] = "mean",
) -> Tensor:
    """Balanced contrastive loss with class prototypes (docs/method.md, "L_BC").

    For anchor a (one of the N = 2B views) and class c, with S_ac the other anchors of class c
    (n_ac of them), s_ak = z_a.z_k / tau and q_ac = z_a.p_c / tau::

        T_ac = lam_ac * mean_{k in S_ac} exp(s_ak) + (1 - lam_ac) * exp(q_ac)   (n_ac > 0)
        T_ac = exp(q_ac)                                                          (n_ac = 0)
        L_a  = -[lam_a * mean_{k in S_a,y_a} s_ak + (1 - lam_a) * q_a,y_a] + log sum_c T_ac

    mix="bcl": lam_ac = n_ac / (n_ac + 1), i.e. the prototype counts as one more member of its
    class. This is BCL's ``BalSCL`` (Zhu et al. 2022) exactly, including its edge cases, which the
    reference vectors confirm: every one of the C prototypes enters the denominator (classes absent
    from the batch contribute exp(q_ac) alone); the anchor's own class is averaged over its
    2*n_y - 1 other views plus its prototype; the numerator averages the log-probabilities of the
    same positives (other views of the class and the class prototype); prototypes are never anchors.
    mix="ecl": lam_ac = lam for every class present, so each class's prototype share is fixed
    whatever the batch composition (batch-invariant equilibrium).

    Computed in log space: per (anchor, class) log-sum-exp with the class's own maximum, then a
    two-term log-sum-exp of sample and prototype parts, so tau = 0.05 with D = 2048 is finite in
    fp32 and bf16, and empty classes never produce 0 * inf.

    Args:
        features: [B, 2, D] L2-normalised views 1 and 2.
        labels: [B] class indices in [0, C).
        prototypes: [C, D] L2-normalised class prototypes (differentiable).
        temperature: tau > 0.
        mix: "ecl" (constant lam) or "bcl" (BCL's count-dependent lam).
        lam: the constant share of the sample average under mix="ecl"; ignored for "bcl".
        reduction: "mean" (the loss) or "none" (the [2B] per-anchor losses, view-major), for analysis.
    Returns:
        Scalar loss (mean over the 2B anchors), or [2B] with reduction="none".
    """
    if mix not in ("ecl", "bcl"):
        raise ValueError(f"mix must be 'ecl' or 'bcl'; got {mix!r}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must lie in [0, 1]; got {lam}")
    if features.ndim != 3 or features.shape[1] != 2:
        raise ValueError(f"features must be [B, 2, D]; got shape {tuple(features.shape)}")
    if prototypes.ndim != 2 or prototypes.shape[1] != features.shape[2]:
        raise ValueError(f"prototypes must be [C, D] with D = {features.shape[2]}; got {tuple(prototypes.shape)}")
    z, y = _flatten_views(features, labels)
    n, n_cls = z.shape[0], prototypes.shape[0]
    acc = _acc_dtype(z)
    sim = (z @ z.T).to(acc) / temperature                      # [N, N]
    proto = (z @ prototypes.to(z.dtype).T).to(acc) / temperature  # [N, C]

    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    onehot = F.one_hot(y, n_cls).to(acc)                       # [N, C]
    pos = (y.view(-1, 1) == y.view(1, -1)) & ~self_mask    # S_a,y_a
    n_ac = onehot.sum(0).view(1, -1) - onehot                  # [N, C] other anchors of class c
    present = n_ac > 0

    # per (anchor, class) maximum over the class's other anchors (constant shift, no gradient)
    sim_noself = sim.masked_fill(self_mask, float("-inf"))
    with torch.no_grad():
        cls_max = torch.full((n, n_cls), float("-inf"), dtype=acc, device=z.device)
        cls_max = cls_max.scatter_reduce(1, y.view(1, -1).expand(n, n), sim_noself, reduce="amax")
        cls_max = torch.where(present, cls_max, torch.zeros_like(cls_max))
    shifted = torch.exp(sim_noself - cls_max.gather(1, y.view(1, -1).expand(n, n)))  # <= 1, self -> 0
    cls_sum = shifted @ onehot                                 # [N, C], >= 1 where present
    cls_sum = torch.where(present, cls_sum, torch.ones_like(cls_sum))
    log_sbar = torch.log(cls_sum) + cls_max - torch.log(n_ac.clamp_min(1))

    if mix == "bcl":
        lam_ac = n_ac / (n_ac + 1)
    else:
        lam_ac = torch.where(present, torch.full_like(n_ac, lam), torch.zeros_like(n_ac))
    neg_inf = torch.full_like(lam_ac, float("-inf"))
    log_lam = torch.where(lam_ac > 0, torch.log(lam_ac.clamp_min(1e-300)), neg_inf)
    log_one_minus = torch.where(lam_ac < 1, torch.log1p(-lam_ac.clamp_max(1 - 1e-16)), neg_inf)
    sample_part = torch.where(present, log_lam + log_sbar, neg_inf)
    log_t = torch.logsumexp(torch.stack([sample_part, log_one_minus + proto], dim=-1), dim=-1)  # [N, C]
    log_d = torch.logsumexp(log_t, dim=1)                      # [N]

    lam_a = lam_ac.gather(1, y.view(-1, 1)).squeeze(1)
    pos_f = pos.to(acc)
    mean_pos = (sim * pos_f).sum(1) / pos_f.sum(1)
    own_proto = proto.gather(1, y.view(-1, 1)).squeeze(1)
    loss = -(lam_a * mean_pos + (1 - lam_a) * own_proto) + log_d
    if reduction == "none":
        return loss
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' or 'none'; got {reduction!r}")
    return loss.mean()


def classifier_prototype_alignment(
    weight: Tensor, prototypes: Tensor, mode: Literal["duality", "gram"] = "duality"
) -> Tensor:
    """Classifier-prototype geometric equilibrium term L_CC (docs/method.md, "L_CC").

    - "duality" (ProConDual's ProDual): || W/||W||_F - P/||P||_F ||_F, Frobenius norm, not squared.
      Needs W and P of the same shape [C, D] (projection size equal to the feature size).
    - "gram": (1/C) * || Wn Wn^T - Pn Pn^T ||_F with Wn, Pn row-normalised; compares only the angles
      between classes, so any projection size works and per-class scaling of W is ignored. P is
      row-normalised again (a no-op for the network's already normalised prototypes) so the term is
      also exactly scale-free in P.

    Args:
        weight: [C, d] raw classifier weights.
        prototypes: [C, d_z] class prototypes.
        mode: "duality" or "gram".
    Raises:
        ValueError: unknown mode, different class counts, or (duality) different widths.
    """
    if weight.ndim != 2 or prototypes.ndim != 2 or weight.shape[0] != prototypes.shape[0]:
        raise ValueError(f"weight [C, d] and prototypes [C, d_z] must share C; got {tuple(weight.shape)} "
                         f"and {tuple(prototypes.shape)}")
    acc = _acc_dtype(weight)
    w, p = weight.to(acc), prototypes.to(acc)
    if mode == "duality":
        if w.shape != p.shape:
            raise ValueError(f"duality alignment needs weight and prototypes of the same shape; got {tuple(w.shape)} "
                             f"and {tuple(p.shape)}")
        return torch.linalg.matrix_norm(w / torch.linalg.matrix_norm(w) - p / torch.linalg.matrix_norm(p))
    if mode == "gram":
        wn, pn = F.normalize(w, dim=1), F.normalize(p, dim=1)
        return torch.linalg.matrix_norm(wn @ wn.T - pn @ pn.T) / w.shape[0]
    raise ValueError(f"alignment mode must be 'duality' or 'gram'; got {mode!r}")

