"""Training methods: which loss terms, on which views, with which weights (docs/method.md).

A `Method` turns the network's `return_all` output into a weighted total loss:

| method        | views | terms (weight)                                   |
|---------------|-------|--------------------------------------------------|
| `ce`          | 1     | `ce` (alpha)                                     |
| `weighted_ce` | 1     | `ce` = class-weighted CE (alpha)                 |
| `focal`       | 1     | `ce` = focal loss, `method.focal_gamma` (alpha)  |
| `la`          | 1     | `lc` = logit-adjusted CE (alpha)                 |
| `supcon`      | 3     | `lc` (alpha), `supcon` on views 1, 2 (beta)      |
| `bcl`         | 3     | `lc` (alpha), `bc` with BCL's mix (beta) [, `cc` (gamma) if gamma > 0] |
| `ecl`         | 3     | `lc` (alpha), `bc` (beta), `cc` (gamma)          |

Each method's views, terms (with the weight and heads of each) and defaults are declared where it
is registered, at its factory (`register_method(...)`, pipeline/registry.py); the table above is
what those declarations say.

`lc` uses view 0 only; the contrastive terms use views 1 and 2, gathered across DDP ranks
(`pipeline.distributed.all_gather_with_grad`) so they see the global batch. A term whose base
weight is 0 is not computed at all (so `bcl` has no `cc`, and `ecl` with `gamma: 0` is an ablation).

First-epoch normalisation (ProConDual; `loss_weight_normalisation: first_epoch`): epoch 0 trains
with every weight 1 and records each term's mean over the training steps (averaged across ranks);
`end_epoch(0)` then sets weight = base / mean, so each term enters with a share set by its base
weight rather than by its raw scale.

Anchored normalisation (`first_epoch_lc`, ECL's default since the long-tailed benchmark; evidence in
docs/method.md): the same shares, but measured against L_LC, whose weight stays 1 throughout:
weight_k = (base_k / base_lc) * mean_lc / mean_k (epoch 0 trains with base_k / base_lc). Plain
`first_epoch` divides L_LC by its own first-epoch mean too (about 1.9 on a 10-class cohort), which
trains ECL's classifier at about 0.4x the effective learning rate of `la` and `bcl`; anchoring keeps
that rate equal across methods while the contrastive and alignment terms keep their 0.3 : 0.5 : 0.7
shares. Only calls made with autograd enabled count, so a validation
pass under `torch.no_grad()` does not disturb the means. The state round-trips through
`state_dict()` for resume.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
from torch import Tensor

from . import losses
from .distributed import all_gather, all_gather_with_grad, all_reduce_mean
from .errors import ConfigError, PipelineError
from .registry import Term, method_spec, register_method

if TYPE_CHECKING:  # config imports this module (to register the built-ins); annotations only here
    from .config import MethodConfig

__all__ = ["LossOutput", "Method", "NORMALISATIONS", "TERM_CE", "TERM_LC", "TERM_SUPCON", "TERM_BC", "TERM_CC"]

# How the base weights become the weights used from epoch 1 on (see the module docstring).
NORMALISATIONS = ("first_epoch", "first_epoch_lc", "none")

# The loss terms of the built-in methods: the `method.*` weight that scales each and the heads it
# trains (bc reaches the classifier through phi(w)). A new method reuses these or declares its own.
TERM_CE = Term("ce", "alpha", frozenset({"classifier"}))
TERM_LC = Term("lc", "alpha", frozenset({"classifier"}))
TERM_SUPCON = Term("supcon", "beta", frozenset({"projection"}))
TERM_BC = Term("bc", "beta", frozenset({"projection", "prototypes", "classifier"}))
TERM_CC = Term("cc", "gamma", frozenset({"prototypes", "classifier"}))

TermFn = Callable[[dict, Tensor], dict[str, Tensor]]


@dataclass
class LossOutput:
    """The weighted total (what backward runs on) and the unweighted terms (what is logged)."""

    total: Tensor
    terms: dict[str, Tensor]


class Method:
    """One configured training method: terms, base weights and first-epoch normalisation state.

    Args:
        name: registry name.
        n_views: views per image the data loader must produce (1 or 3).
        term_fn: `(out, labels) -> {term: unweighted scalar}`.
        base_weights: {term: weight} of the active terms.
        normalisation: "first_epoch", "first_epoch_lc" (anchored on L_LC) or "none".
    """

    def __init__(self, name: str, n_views: int, term_fn: TermFn, base_weights: dict[str, float],
                 normalisation: str = "none") -> None:
        if normalisation not in NORMALISATIONS:
            raise ConfigError(f"method.loss_weight_normalisation: {normalisation!r} is not allowed; "
                              f"choose one of {', '.join(NORMALISATIONS)}")
        if normalisation == "first_epoch_lc" and "lc" not in base_weights:
            raise ConfigError(f"method.loss_weight_normalisation: 'first_epoch_lc' anchors the weights on the "
                              f"logit-compensation term, but method {name!r} has no active 'lc' term (alpha is 0); "
                              f"use 'first_epoch' or 'none'")
        self.name = name
        self.n_views = n_views
        self._term_fn = term_fn
        self.base_weights = dict(base_weights)
        self.normalisation = normalisation
        self._normalised = normalisation == "none"
        if normalisation == "first_epoch":
            self._weights = {k: 1.0 for k in self.base_weights}
        elif normalisation == "first_epoch_lc":
            self._weights = {k: v / self.base_weights["lc"] for k, v in self.base_weights.items()}
        else:
            self._weights = dict(self.base_weights)
        self._sums: dict[str, Tensor] = {}
        self._steps = 0
        self.term_means: dict[str, float] | None = None

    def __repr__(self) -> str:
        return f"Method(name={self.name!r}, n_views={self.n_views}, weights={self._weights})"

    def weights(self) -> dict[str, float]:
        """Current weight of each active term (in epoch 0: all 1.0 under `first_epoch`, base/alpha under `first_epoch_lc`)."""
        return dict(self._weights)

    def __call__(self, out: dict, labels: Tensor) -> LossOutput:
        """Compute the terms on the network's `return_all` dict and their weighted sum.

        Args:
            out: `logits` [V*B, C] view-major, `z` [V*B, d_z], `prototypes` [C, d_z], `weight` [C, d].
            labels: [B] class indices of this rank's images.
        """
        terms = self._term_fn(out, labels)
        total = sum(self._weights[k] * terms[k] for k in self.base_weights)
        assert isinstance(total, Tensor)
        if not self._normalised and torch.is_grad_enabled():
            for k, v in terms.items():
                v = v.detach().double()
                self._sums[k] = self._sums[k] + v if k in self._sums else v
            self._steps += 1
        return LossOutput(total=total, terms=terms)

    def end_epoch(self, epoch: int) -> None:
        """Close an epoch; after the first one, turn the recorded term means into weights.

        Collective under DDP (every rank must call it): the per-term sums and step counts are
        averaged over ranks, so all ranks get identical weights.
        """
        if self._normalised:
            return
        keys = list(self.base_weights)
        device = next(iter(self._sums.values())).device if self._sums else torch.device("cpu")
        local = torch.zeros(len(keys) + 1, dtype=torch.float64, device=device)
        for i, k in enumerate(keys):
            if k in self._sums:
                local[i] = self._sums[k].double()
        local[-1] = float(self._steps)
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_backend() == "nccl" and device.type != "cuda":
            local = local.cuda()
        glob = all_reduce_mean(local).cpu().tolist()
        steps = glob[-1]
        means: dict[str, float] = {}
        weights: dict[str, float] = {}
        for i, k in enumerate(keys):
            means[k] = glob[i] / steps if steps > 0 else float("nan")
        usable = {k: math.isfinite(m) and m > 1e-12 for k, m in means.items()}
        anchored = self.normalisation == "first_epoch_lc"
        if anchored and not usable["lc"]:
            warnings.warn(f"first-epoch loss normalisation: the anchor term 'lc' had mean {means['lc']!r} in epoch "
                          f"{epoch}; keeping the epoch-0 weights", RuntimeWarning, stacklevel=2)
            usable = {k: False for k in usable}
        for k in keys:
            if not usable[k]:
                if not anchored or k != "lc":
                    warnings.warn(f"first-epoch loss normalisation: term {k!r} had mean {means[k]!r} in epoch "
                                  f"{epoch}; keeping its weight {self._weights[k]}", RuntimeWarning, stacklevel=2)
                weights[k] = self._weights[k]
            elif anchored:
                # Shares relative to L_LC, with L_LC's own weight fixed at 1: the classifier trains at the
                # same effective learning rate as in `la` and `bcl`, whatever the other terms' scales.
                weights[k] = (self.base_weights[k] / self.base_weights["lc"]) * (means["lc"] / means[k])
            else:
                weights[k] = self.base_weights[k] / means[k]
        self.term_means = means
        self._weights = weights
        self._normalised = True
        self._sums, self._steps = {}, 0

    def state_dict(self) -> dict[str, Any]:
        """Plain-Python state (floats, no tensors): safe for `torch.load(weights_only=True)`."""
        return {
            "name": self.name,
            "normalisation": self.normalisation,
            "normalised": self._normalised,
            "weights": dict(self._weights),
            "base_weights": dict(self.base_weights),
            "term_means": None if self.term_means is None else dict(self.term_means),
            "sums": {k: float(v) for k, v in self._sums.items()},
            "steps": self._steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` output.

        Raises:
            PipelineError: the state belongs to another method or another set of terms.
        """
        if state.get("name") != self.name or set(state.get("weights", {})) != set(self.base_weights):
            raise PipelineError(f"checkpoint method state is for method {state.get('name')!r} with terms "
                                f"{sorted(state.get('weights', {}))}, but this run uses {self.name!r} with terms "
                                f"{sorted(self.base_weights)}; resume with the same method.* settings")
        self._normalised = bool(state["normalised"])
        self._weights = {k: float(v) for k, v in state["weights"].items()}
        self.term_means = None if state.get("term_means") is None else {k: float(v) for k, v in state["term_means"].items()}
        self._sums = {k: torch.tensor(float(v)) for k, v in state.get("sums", {}).items()}
        self._steps = int(state.get("steps", 0))


# --------------------------------------------------------------------------------------------
# helpers shared by the factories


def _checked_counts(class_counts: np.ndarray, method: str) -> np.ndarray:
    counts = np.asarray(class_counts, dtype=np.float64)
    if counts.ndim != 1 or counts.size < 2:
        raise PipelineError(f"method {method!r}: class_counts must list the training count of each of >= 2 "
                            f"classes; got shape {counts.shape}")
    missing = np.flatnonzero(counts <= 0).tolist()
    if missing:
        raise PipelineError(f"method {method!r}: the training split has no samples of class index(es) {missing}; "
                            f"every class needs training samples (its log-frequency or weight is undefined). "
                            f"Rebuild the split or drop the class from the cohort.")
    return counts


def _batch_size(out: dict, labels: Tensor, n_views: int) -> int:
    b = labels.shape[0]
    n = out["logits"].shape[0]
    if n != n_views * b:
        raise ValueError(f"logits have {n} rows but {n_views} view(s) x {b} labels = {n_views * b} were expected "
                         f"(views stacked view-major)")
    return b


def _contrastive_views(out: dict, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Views 1 and 2 as [B_global, 2, d_z] and labels [B_global], gathered over ranks."""
    b = labels.shape[0]
    z = out["z"]
    feats = torch.stack([z[b:2 * b], z[2 * b:3 * b]], dim=1)
    return all_gather_with_grad(feats), all_gather(labels)


def _duality_check(feature_dim: int | None, proj_dim: int | None) -> None:
    if feature_dim is not None and proj_dim is not None and feature_dim != proj_dim:
        raise ConfigError(f"method.alignment: 'duality' needs model.proj_dim equal to the backbone feature width "
                          f"({feature_dim}), but model.proj_dim is {proj_dim}. Set model.proj_dim: null (or "
                          f"{feature_dim}), or method.alignment: gram.")


def _weights(cfg: MethodConfig) -> dict[str, float]:
    """{term: base weight} for the registered terms of `cfg.name` whose weight is positive.

    `cfg` is resolved (`registry.create_method` fills unset keys from the registered defaults).
    """
    names = method_spec(cfg.name).term_weights()
    return {term: float(getattr(cfg, key)) for term, key in names.items() if float(getattr(cfg, key)) > 0}


def _build(cfg: MethodConfig, term_fn: TermFn) -> Method:
    """The Method of `cfg.name`: its registered views and terms, the weights and normalisation of `cfg`."""
    spec = method_spec(cfg.name)
    base = _weights(cfg)
    if not base:
        keys = sorted(set(spec.term_weights().values()))
        raise ConfigError(f"method {cfg.name!r}: every loss weight ({', '.join(keys)}) is 0; set at least one positive")
    return Method(cfg.name, spec.n_views, term_fn, base, str(cfg.loss_weight_normalisation))


# --------------------------------------------------------------------------------------------
# one-view methods


@register_method("ce", n_views=1, terms=(TERM_CE,))
def _create_ce(cfg: MethodConfig, class_counts: np.ndarray, **_: Any) -> Method:
    def terms(out: dict, labels: Tensor) -> dict[str, Tensor]:
        b = _batch_size(out, labels, 1)
        return {"ce": losses.cross_entropy(out["logits"][:b], labels)}

    return _build(cfg, terms)


@register_method("weighted_ce", n_views=1, terms=(TERM_CE,))
def _create_weighted_ce(cfg: MethodConfig, class_counts: np.ndarray, **_: Any) -> Method:
    counts = _checked_counts(class_counts, cfg.name)

    def terms(out: dict, labels: Tensor) -> dict[str, Tensor]:
        b = _batch_size(out, labels, 1)
        return {"ce": losses.class_weighted_cross_entropy(out["logits"][:b], labels, counts)}

    return _build(cfg, terms)


@register_method("focal", n_views=1, terms=(TERM_CE,))
def _create_focal(cfg: MethodConfig, class_counts: np.ndarray, **_: Any) -> Method:
    gamma = float(cfg.focal_gamma)

    def terms(out: dict, labels: Tensor) -> dict[str, Tensor]:
        b = _batch_size(out, labels, 1)
        return {"ce": losses.focal_loss(out["logits"][:b], labels, gamma=gamma)}

    return _build(cfg, terms)


@register_method("la", n_views=1, terms=(TERM_LC,))
def _create_la(cfg: MethodConfig, class_counts: np.ndarray, **_: Any) -> Method:
    counts = _checked_counts(class_counts, cfg.name)
    tau = float(cfg.la_tau)

    def terms(out: dict, labels: Tensor) -> dict[str, Tensor]:
        b = _batch_size(out, labels, 1)
        return {"lc": losses.logit_adjusted_cross_entropy(out["logits"][:b], labels, counts, tau=tau)}

    return _build(cfg, terms)


# --------------------------------------------------------------------------------------------
# three-view methods


@register_method("supcon", n_views=3, terms=(TERM_LC, TERM_SUPCON), defaults=dict(beta=0.35))
def _create_supcon(cfg: MethodConfig, class_counts: np.ndarray, **_: Any) -> Method:
    counts = _checked_counts(class_counts, cfg.name)
    tau_la, temperature = float(cfg.la_tau), float(cfg.temperature)
    active = _weights(cfg)

    def terms(out: dict, labels: Tensor) -> dict[str, Tensor]:
        b = _batch_size(out, labels, 3)
        result: dict[str, Tensor] = {}
        if "lc" in active:
            result["lc"] = losses.logit_adjusted_cross_entropy(out["logits"][:b], labels, counts, tau=tau_la)
        if "supcon" in active:
            feats, y = _contrastive_views(out, labels)
            result["supcon"] = losses.supcon_loss(feats, y, temperature)
        return result

    return _build(cfg, terms)


def _create_balanced(cfg: MethodConfig, class_counts: np.ndarray, feature_dim: int | None = None,
                     proj_dim: int | None = None, **_: Any) -> Method:
    """Shared factory of `bcl` and `ecl`: lc + bc [+ cc], differing only in resolved settings."""
    counts = _checked_counts(class_counts, cfg.name)
    tau_la, temperature = float(cfg.la_tau), float(cfg.temperature)
    mix, lam, alignment = str(cfg.mix), float(cfg.lam), str(cfg.alignment)
    active = _weights(cfg)
    if "cc" in active and alignment == "duality":
        _duality_check(feature_dim, proj_dim)

    def terms(out: dict, labels: Tensor) -> dict[str, Tensor]:
        b = _batch_size(out, labels, 3)
        result: dict[str, Tensor] = {}
        if "lc" in active:
            result["lc"] = losses.logit_adjusted_cross_entropy(out["logits"][:b], labels, counts, tau=tau_la)
        if "bc" in active:
            feats, y = _contrastive_views(out, labels)
            result["bc"] = losses.balanced_contrastive_loss(feats, y, out["prototypes"], temperature, mix=mix, lam=lam)
        if "cc" in active:
            if alignment == "duality":
                _duality_check(out["weight"].shape[1], out["prototypes"].shape[1])
            result["cc"] = losses.classifier_prototype_alignment(out["weight"], out["prototypes"], mode=alignment)
        return result

    return _build(cfg, terms)


# BCL's defaults: its own mix and weight (docs/method.md, "Peers"), no alignment term, BCL's MLP prototype head.
register_method("bcl", n_views=3, terms=(TERM_LC, TERM_BC, TERM_CC), defaults=dict(mix="bcl", beta=0.35),
                prototype_head="mlp")(_create_balanced)
# ECL's defaults: normalisation anchored on L_LC and BCL's MLP prototype head were chosen on the validation
# split of the long-tailed benchmark over 3 seeds (docs/method.md "Defaults: evidence and decision").
register_method("ecl", n_views=3, terms=(TERM_LC, TERM_BC, TERM_CC),
                defaults=dict(mix="ecl", lam=0.5, alignment="duality", alpha=0.7, beta=0.3, gamma=0.5,
                              loss_weight_normalisation="first_epoch_lc"),
                prototype_head="mlp")(_create_balanced)
