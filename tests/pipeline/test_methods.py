"""Methods: totals against hand compositions of the pure losses, weights, normalisation state.

The contract tests run over `list_methods()`, so a newly registered method is checked without new test code.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import pipeline.registry as registry
from pipeline import losses
from pipeline.config import MethodConfig, load_config
from pipeline.errors import ConfigError, PipelineError
from pipeline.methods import TERM_CE, Method
from pipeline.registry import HEADS, Term, create_method, heads_used, list_methods, method_spec, register_method

B, C, D = 6, 4, 8
COUNTS = np.array([300, 90, 25, 7])
ALL = ["bcl", "ce", "ecl", "focal", "la", "supcon", "weighted_ce"]


def _cfg(name: str, **method) -> MethodConfig:
    return load_config(base={"method": {"name": name, **method}}).method


def _out(n_views: int, seed: int = 0, dz: int = D, requires_grad: bool = False) -> tuple[dict, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {
        "logits": torch.randn(n_views * B, C, generator=g, dtype=torch.float64) * 3,
        "z": F.normalize(torch.randn(n_views * B, dz, generator=g, dtype=torch.float64), dim=1),
        "prototypes": F.normalize(torch.randn(C, dz, generator=g, dtype=torch.float64), dim=1),
        "weight": torch.randn(C, D, generator=g, dtype=torch.float64),
    }
    if requires_grad:
        out = {k: v.requires_grad_(True) for k, v in out.items()}
    labels = torch.tensor([0, 0, 1, 2, 0, 3])
    return out, labels


def _views12(out: dict) -> torch.Tensor:
    z = out["z"]
    return torch.stack([z[B:2 * B], z[2 * B:]], dim=1)


def _hand(name: str, cfg: MethodConfig, out: dict, y: torch.Tensor) -> torch.Tensor:
    v0 = out["logits"][:B]
    lc = losses.logit_adjusted_cross_entropy(v0, y, COUNTS, tau=cfg.la_tau)
    if name == "ce":
        return cfg.alpha * losses.cross_entropy(v0, y)
    if name == "weighted_ce":
        return cfg.alpha * losses.class_weighted_cross_entropy(v0, y, COUNTS)
    if name == "focal":
        return cfg.alpha * losses.focal_loss(v0, y, gamma=cfg.focal_gamma)
    if name == "la":
        return cfg.alpha * lc
    if name == "supcon":
        return cfg.alpha * lc + cfg.beta * losses.supcon_loss(_views12(out), y, cfg.temperature)
    bc = losses.balanced_contrastive_loss(_views12(out), y, out["prototypes"], cfg.temperature, mix=cfg.mix, lam=cfg.lam)
    total = cfg.alpha * lc + cfg.beta * bc
    if name == "ecl":
        total = total + cfg.gamma * losses.classifier_prototype_alignment(out["weight"], out["prototypes"], "duality")
    return total


@pytest.mark.parametrize("name", ALL)
def test_method_total_matches_hand_composition(name):
    # normalisation off so the configured weights apply from the first step
    cfg = _cfg(name, loss_weight_normalisation="none", temperature=0.1)
    method = create_method(cfg, COUNTS)
    out, y = _out(method.n_views, seed=1)
    got = method(out, y)
    want = _hand(name, cfg, out, y)
    assert got.total.item() == pytest.approx(want.item(), rel=1e-12)
    assert got.total.item() == pytest.approx(sum(method.weights()[k] * v.item() for k, v in got.terms.items()), rel=1e-12)


@pytest.mark.parametrize("name,views,terms", [
    ("ce", 1, {"ce"}), ("weighted_ce", 1, {"ce"}), ("focal", 1, {"ce"}), ("la", 1, {"lc"}),
    ("supcon", 3, {"lc", "supcon"}), ("bcl", 3, {"lc", "bc"}), ("ecl", 3, {"lc", "bc", "cc"}),
])
def test_method_views_and_term_names_defaults(name, views, terms):
    method = create_method(_cfg(name), COUNTS)
    assert method.name == name and method.n_views == views
    out, y = _out(views)
    assert set(method(out, y).terms) == terms == set(method.weights())


def test_bcl_defaults_use_bcl_mix_and_weights():
    cfg = _cfg("bcl")
    method = create_method(cfg, COUNTS)
    assert method.weights() == {"lc": 1.0, "bc": 0.35}
    out, y = _out(3, seed=2)
    bc = losses.balanced_contrastive_loss(_views12(out), y, out["prototypes"], 0.07, mix="bcl")
    assert method(out, y).terms["bc"].item() == pytest.approx(bc.item(), rel=1e-12)


def test_ecl_gamma_zero_drops_alignment_term():
    method = create_method(_cfg("ecl", gamma=0.0), COUNTS)
    out, y = _out(3)
    assert set(method(out, y).terms) == {"lc", "bc"}


def test_ecl_first_epoch_normalisation_sets_base_over_mean():
    method = create_method(_cfg("ecl", loss_weight_normalisation="first_epoch"), COUNTS)
    assert method.weights() == {"lc": 1.0, "bc": 1.0, "cc": 1.0}
    seen = {"lc": [], "bc": [], "cc": []}
    for seed in range(3):
        out, y = _out(3, seed=seed, requires_grad=True)
        res = method(out, y)
        assert res.total.item() == pytest.approx(sum(v.item() for v in res.terms.values()), rel=1e-12)
        res.total.backward()
        for k in seen:
            seen[k].append(res.terms[k].item())
    with torch.no_grad():  # a validation pass must not count
        method(*_out(3, seed=9))
    method.end_epoch(0)
    want = {"lc": 0.7 / np.mean(seen["lc"]), "bc": 0.3 / np.mean(seen["bc"]), "cc": 0.5 / np.mean(seen["cc"])}
    for k, v in want.items():
        assert method.weights()[k] == pytest.approx(v, rel=1e-6)
    settled = method.weights()
    method.end_epoch(1)  # later epochs keep the weights
    assert method.weights() == settled
    out, y = _out(3, seed=5)
    res = method(out, y)
    assert res.total.item() == pytest.approx(sum(want[k] * res.terms[k].item() for k in want), rel=1e-6)


def test_first_epoch_lc_keeps_the_classifier_weight_at_one():
    """`first_epoch_lc`: L_LC keeps weight 1 (as in la/bcl); the others get base shares relative to it."""
    method = create_method(_cfg("ecl", loss_weight_normalisation="first_epoch_lc"), COUNTS)
    assert method.weights() == pytest.approx({"lc": 1.0, "bc": 0.3 / 0.7, "cc": 0.5 / 0.7}, rel=1e-12)
    seen = {"lc": [], "bc": [], "cc": []}
    for seed in range(3):
        res = method(*_out(3, seed=seed, requires_grad=True))
        want_total = res.terms["lc"] + (0.3 / 0.7) * res.terms["bc"] + (0.5 / 0.7) * res.terms["cc"]
        assert res.total.item() == pytest.approx(want_total.item(), rel=1e-12)
        for k in seen:
            seen[k].append(res.terms[k].item())
    method.end_epoch(0)
    m = {k: np.mean(v) for k, v in seen.items()}
    # weight_k * mean_k : weight_lc * mean_lc = base_k : base_lc, with weight_lc = 1
    want = {"lc": 1.0, "bc": (0.3 / 0.7) * m["lc"] / m["bc"], "cc": (0.5 / 0.7) * m["lc"] / m["cc"]}
    assert method.weights() == pytest.approx(want, rel=1e-9)


def test_first_epoch_lc_needs_an_lc_term():
    with pytest.raises(ConfigError, match="anchors the weights on the logit-compensation term"):
        create_method(_cfg("ecl", alpha=0.0, loss_weight_normalisation="first_epoch_lc"), COUNTS)


def test_method_state_round_trip_through_weights_only_load():
    cfg = _cfg("ecl", loss_weight_normalisation="first_epoch")
    first = create_method(cfg, COUNTS)
    first(*_out(3, seed=0))
    mid_epoch = first.state_dict()  # a checkpoint taken inside epoch 0
    first(*_out(3, seed=1))
    first.end_epoch(0)

    buf = io.BytesIO()
    torch.save(mid_epoch, buf)
    buf.seek(0)
    resumed = create_method(cfg, COUNTS)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert resumed.weights() == {"lc": 1.0, "bc": 1.0, "cc": 1.0}
    resumed(*_out(3, seed=1))
    resumed.end_epoch(0)
    for k, v in first.weights().items():
        assert resumed.weights()[k] == pytest.approx(v, rel=1e-6)

    after = create_method(cfg, COUNTS)
    after.load_state_dict(first.state_dict())
    assert after.weights() == first.weights()
    out, y = _out(3, seed=7)
    assert after(out, y).total.item() == pytest.approx(first(out, y).total.item(), rel=1e-12)


def test_method_load_state_from_other_method_raises():
    state = create_method(_cfg("bcl"), COUNTS).state_dict()
    with pytest.raises(PipelineError, match="for method 'bcl'.*this run uses 'ecl'"):
        create_method(_cfg("ecl"), COUNTS).load_state_dict(state)


def test_create_method_unknown_name_suggests_close_match():
    with pytest.raises(ConfigError) as err:
        create_method(MethodConfig.model_construct(name="ecll"), COUNTS)
    assert str(err.value) == ("method.name: unknown method 'ecll'. Did you mean 'ecl'? Registered methods: "
                              "bcl, ce, ecl, focal, la, supcon, weighted_ce.")


def test_list_methods_all_and_pattern():
    assert list_methods() == ALL
    assert list_methods("*ce") == ["ce", "weighted_ce"]


def test_register_method_duplicate_name_raises():
    with pytest.raises(ValueError, match="'ecl' is already registered"):
        register_method("ecl", n_views=1, terms=(TERM_CE,))(lambda cfg, counts: None)


# -------------------------------------------------------------------------------------------- contract
# which outputs of `return_all` carry a head's parameters: the classifier is reached through the logits,
# its raw weight, or the prototypes phi(w)
_HEAD_OUTPUTS = {"classifier": ("logits", "weight", "prototypes"), "projection": ("z",), "prototypes": ("prototypes",)}


def _check_contract(name: str) -> Method:
    """What every registered method must do under its registered defaults; returns the method built."""
    spec = method_spec(name)
    cfg = load_config(base={"method": {"name": name}}).method
    method = create_method(cfg, COUNTS)
    assert method.name == name and method.n_views == spec.n_views
    want = {t.name: spec.defaults[t.weight] for t in spec.terms if spec.defaults[t.weight] > 0}
    assert method.base_weights == want
    out, y = _out(method.n_views, seed=3, requires_grad=True)
    res = method(out, y)
    assert set(res.terms) == set(want) and all(torch.isfinite(v) for v in res.terms.values())
    assert res.total.item() == pytest.approx(sum(method.weights()[k] * v.item() for k, v in res.terms.items()), rel=1e-12)
    res.total.backward()
    reached = {k: v.grad is not None and bool(v.grad.abs().sum() > 0) for k, v in out.items()}
    # the heads the registry says the active terms train are exactly those the gradient reaches
    declared = heads_used(name, method.base_weights)
    assert set(declared) == set(HEADS)
    for head, outputs in _HEAD_OUTPUTS.items():
        assert any(reached[o] for o in outputs) == declared[head], (name, head)
    buf = io.BytesIO()
    torch.save(method.state_dict(), buf)
    buf.seek(0)
    again = create_method(cfg, COUNTS)
    again.load_state_dict(torch.load(buf, weights_only=True))
    assert again.weights() == method.weights()
    return method


@pytest.mark.parametrize("name", list_methods())
def test_every_registered_method_keeps_the_contract(name):
    _check_contract(name)


@pytest.fixture
def scratch_registry(monkeypatch):
    """The registry as a copy the test may grow; the built-ins are loaded first, and the real table returns after."""
    list_methods()
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))


def test_method_registered_in_a_test_loads_from_config_and_trains(scratch_registry):
    smooth = Term("smooth", "alpha", frozenset({"classifier"}))

    @register_method("toy_smooth", n_views=1, terms=(smooth,), defaults={"alpha": 0.5})
    def _create(cfg: MethodConfig, class_counts: np.ndarray, **_) -> Method:
        def terms(out: dict, labels: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"smooth": F.cross_entropy(out["logits"][:labels.shape[0]], labels, label_smoothing=0.1)}

        return Method(cfg.name, 1, terms, {"smooth": cfg.alpha}, cfg.loss_weight_normalisation)

    assert "toy_smooth" in list_methods()
    cfg = load_config(overrides=["method.name=toy_smooth"])
    assert (cfg.method.alpha, cfg.method.loss_weight_normalisation, cfg.model.prototype_head) == (0.5, "none", "linear")
    method = _check_contract("toy_smooth")
    out, y = _out(1, seed=4)
    # label smoothing 0.1 by hand: (1 - 0.1) * NLL + 0.1 * mean over classes of -log p
    logp = torch.log_softmax(out["logits"], dim=1)
    hand = (0.9 * -logp[torch.arange(B), y] + 0.1 * -logp.mean(dim=1)).mean()
    assert method(out, y).total.item() == pytest.approx(0.5 * hand.item(), rel=1e-12)
    assert heads_used("toy_smooth", method.base_weights) == {"classifier": True, "projection": False, "prototypes": False}
    assert "toy_smooth" in str(registry.unknown_method_message("toy_smoth"))


def test_factory_that_disagrees_with_its_registration_is_refused(scratch_registry):
    @register_method("toy_views", n_views=1, terms=(TERM_CE,))
    def _create(cfg: MethodConfig, class_counts: np.ndarray, **_) -> Method:
        return Method(cfg.name, 3, lambda out, labels: {}, {"ce": 1.0})

    with pytest.raises(ValueError, match=r"'toy_views'.*built 3 view\(s\).*registered with n_views=1"):
        create_method(load_config(overrides=["method.name=toy_views"]).method, COUNTS)


def test_duality_proj_dim_mismatch_raises_config_error():
    with pytest.raises(ConfigError, match=r"model\.proj_dim is 128.*method\.alignment: gram"):
        create_method(_cfg("ecl"), COUNTS, feature_dim=512, proj_dim=128)
    method = create_method(_cfg("ecl"), COUNTS)  # dims unknown at creation: caught at the first step
    out, y = _out(3, dz=5)
    with pytest.raises(ConfigError, match=r"model\.proj_dim is 5"):
        method(out, y)
    gram = create_method(_cfg("ecl", alignment="gram"), COUNTS, feature_dim=512, proj_dim=128)
    assert torch.isfinite(gram(out, y).total)


def test_method_missing_training_class_raises_pipeline_error():
    with pytest.raises(PipelineError, match=r"no samples of class index\(es\) \[2\]"):
        create_method(_cfg("la"), np.array([10, 4, 0, 3]))


def test_method_wrong_view_count_raises():
    method = create_method(_cfg("ecl"), COUNTS)
    out, y = _out(1)
    with pytest.raises(ValueError, match="3 view"):
        method(out, y)


def test_method_gradients_reach_all_inputs_ecl():
    method = create_method(_cfg("ecl", loss_weight_normalisation="none"), COUNTS)
    out, y = _out(3, requires_grad=True)
    method(out, y).total.backward()
    for k in ("logits", "z", "prototypes", "weight"):
        assert out[k].grad is not None and out[k].grad.abs().sum() > 0, k
    assert out["logits"].grad[B:].abs().sum() == 0  # only view 0 feeds the classifier loss
    assert out["z"].grad[:B].abs().sum() == 0  # view 0 never enters the contrastive term
