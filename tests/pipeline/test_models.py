"""Tests of pipeline.models: shapes, unit norms, cosine bounds, gradients, weights files, errors."""
from __future__ import annotations

import os

import pytest
import timm
import torch
import torch.nn.functional as F

from pipeline.config import ModelConfig
from pipeline.errors import ConfigError, PipelineError
from pipeline.models import EclNetwork, create_network, model_data_config

C = 5


def _net(**kw) -> EclNetwork:
    torch.manual_seed(0)
    return create_network(ModelConfig(backbone="test_resnet", **kw), num_classes=C)


def test_return_all_shapes_and_unit_norms():
    net = _net()
    out = net(torch.randn(6, 3, 32, 32), return_all=True)
    d = net.feature_dim
    assert d == 96 and net.proj_dim == 96 and net.num_classes == C
    assert out["h"].shape == (6, d) and out["logits"].shape == (6, C) and out["z"].shape == (6, d)
    assert out["prototypes"].shape == (C, d) and out["weight"].shape == (C, d)
    torch.testing.assert_close(out["z"].norm(dim=1), torch.ones(6))
    torch.testing.assert_close(out["prototypes"].norm(dim=1), torch.ones(C))
    assert out["weight"] is net.weight


def test_logits_are_scaled_cosines():
    net = _net(classifier_scale=12.5)
    net.eval()
    x = torch.randn(4, 3, 32, 32)
    out = net(x, return_all=True)
    expected = 12.5 * F.cosine_similarity(out["h"][:, None, :], net.weight[None, :, :], dim=2)
    torch.testing.assert_close(out["logits"], expected, rtol=1e-5, atol=1e-5)
    assert out["logits"].abs().max() <= 12.5 + 1e-4
    torch.testing.assert_close(net(x), out["logits"])  # eval path = raw cosine logits


def test_proj_dim_and_mlp_prototype_head():
    net = _net(proj_dim=16, prototype_head="mlp")
    out = net(torch.randn(4, 3, 32, 32), return_all=True)
    assert out["z"].shape == (4, 16) and out["prototypes"].shape == (C, 16)
    assert isinstance(net.prototype_head, torch.nn.Sequential) and len(net.prototype_head) == 4
    assert isinstance(_net(proj_dim=16).prototype_head, torch.nn.Linear)


def test_gradient_reaches_classifier_weight_through_prototypes():
    net = _net()
    out = net(torch.randn(4, 3, 32, 32), return_all=True)
    loss = (out["prototypes"] * torch.randn_like(out["prototypes"])).sum()  # prototypes only, no logits
    loss.backward()
    assert net.weight.grad is not None and net.weight.grad.abs().sum() > 0
    assert net.prototype_head.weight.grad.abs().sum() > 0


def test_every_parameter_used_in_return_all_forward():
    """DDP without find_unused_parameters needs a gradient for every parameter."""
    net = _net()
    out = net(torch.randn(4, 3, 32, 32), return_all=True)
    (out["logits"].sum() + out["z"].sum() + out["prototypes"].sum()).backward()
    unused = [n for n, p in net.named_parameters() if p.grad is None]
    assert unused == []


def test_without_proj_head_z_and_prototypes_are_none():
    torch.manual_seed(0)
    net = create_network(ModelConfig(backbone="test_resnet"), num_classes=C, proj_head=False)
    out = net(torch.randn(2, 3, 32, 32), return_all=True)
    assert out["z"] is None and out["prototypes"] is None and net.projection is None
    supcon = create_network(ModelConfig(backbone="test_resnet"), num_classes=C, proj_head=True, prototypes=False)
    out = supcon(torch.randn(2, 3, 32, 32), return_all=True)
    assert out["z"].shape == (2, 96) and out["prototypes"] is None


def test_strict_load_lets_the_checkpoint_decide_the_prototype_head():
    """SupCon checkpoints have no prototype head; loaders build networks from `proj_head` alone."""
    torch.manual_seed(0)
    supcon = create_network(ModelConfig(backbone="test_resnet"), num_classes=C, proj_head=True, prototypes=False)
    ecl = _net()
    assert ecl.has_prototypes and not supcon.has_prototypes
    default = _net()
    default.load_state_dict(supcon.state_dict())  # strict: the head goes
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(default.eval()(x), supcon.eval()(x))
    assert not default.has_prototypes and default(x, return_all=True)["prototypes"] is None
    rebuilt = create_network(ModelConfig(backbone="test_resnet"), num_classes=C, proj_head=True, prototypes=False)
    rebuilt.load_state_dict(ecl.state_dict())  # strict: the head comes back, with the stored weights
    assert torch.equal(rebuilt.class_prototypes(), ecl.class_prototypes())
    fine_tune = _net()
    missing, unexpected = fine_tune.load_state_dict(supcon.state_dict(), strict=False)  # keeps its own heads
    assert fine_tune.has_prototypes and all(k.startswith("prototype_head.") for k in missing) and not unexpected


def test_reset_classes_keeps_backbone_and_projection():
    net = _net()
    before = {k: v.clone() for k, v in net.backbone.state_dict().items()}
    proj_before = net.projection[0].weight.clone()
    old_weight = net.weight
    net.reset_classes(3)
    assert net.num_classes == 3 and net.weight is not old_weight and net.weight.shape == (3, 96)
    assert all(torch.equal(before[k], v) for k, v in net.backbone.state_dict().items())
    assert torch.equal(net.projection[0].weight, proj_before)
    out = net(torch.randn(2, 3, 32, 32), return_all=True)
    assert out["logits"].shape == (2, 3) and out["prototypes"].shape == (3, 96)


def test_channels_last_forward_matches():
    net = _net().eval()
    x = torch.randn(2, 3, 32, 32)
    ref = net(x)
    net = net.to(memory_format=torch.channels_last)
    torch.testing.assert_close(net(x.contiguous(memory_format=torch.channels_last)), ref, rtol=1e-4, atol=1e-4)


def test_pretrained_file_gives_identical_backbone_weights(tmp_path, monkeypatch):
    import timm.models._builder as builder

    def no_network(*args, **kwargs):
        raise AssertionError("a download was attempted")

    for name in ("load_state_dict_from_hf", "load_state_dict_from_url", "download_cached_file"):
        monkeypatch.setattr(builder, name, no_network)
    torch.manual_seed(7)
    source = timm.create_model("test_resnet", pretrained=False)  # with its 1000-class head, as published weights are
    path = tmp_path / "test_resnet.pth"
    torch.save(source.state_dict(), path)
    torch.manual_seed(99)  # a different random init, which loading must overwrite
    net = create_network(ModelConfig(backbone="test_resnet", pretrained_file=str(path)), num_classes=C)
    ref = source.state_dict()
    loaded = net.backbone.state_dict()
    assert set(loaded) == set(ref) - {"fc.weight", "fc.bias"}
    for k, v in loaded.items():
        assert torch.equal(v, ref[k]), k
    assert os.environ.get("HF_HUB_OFFLINE") == "1"


def test_pretrained_file_missing_raises_pipeline_error(tmp_path):
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(PipelineError, match=rf"model.pretrained_file: {missing} does not exist. Weights are never downloaded"):
        create_network(ModelConfig(backbone="test_resnet", pretrained_file=str(missing)), num_classes=C)


def test_pretrained_file_of_other_architecture_raises(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"encoder.layer.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(PipelineError, match=r"holds weights for only 0 of the \d+ tensors"):
        create_network(ModelConfig(backbone="test_resnet", pretrained_file=str(path)), num_classes=C)
    path.write_text("not a weights file")
    with pytest.raises(PipelineError, match=r"could not load .*other.pth into backbone 'test_resnet'"):
        create_network(ModelConfig(backbone="test_resnet", pretrained_file=str(path)), num_classes=C)
    torch.save(timm.create_model("resnet18").state_dict(), path)  # same keys, other shapes
    with pytest.raises(PipelineError, match=r"could not load .*other.pth into backbone 'test_resnet'"):
        create_network(ModelConfig(backbone="test_resnet", pretrained_file=str(path)), num_classes=C)


def test_unknown_backbone_suggests_close_matches():
    with pytest.raises(ConfigError, match=r"model.backbone: 'resnet5O' is not a timm model. Did you mean .*'resnet50'"):
        create_network(ModelConfig(backbone="resnet5O"), num_classes=C)


def test_hub_backbone_name_rejected():
    with pytest.raises(ConfigError, match="would download weights"):
        create_network(ModelConfig(backbone="hf-hub:timm/resnet18.a1_in1k"), num_classes=C)


def test_fewer_than_two_classes_rejected():
    with pytest.raises(ConfigError, match="at least 2 classes"):
        create_network(ModelConfig(backbone="test_resnet"), num_classes=1)


@pytest.mark.parametrize("name,kwargs,d", [
    ("resnet18", {}, 512),
    ("efficientnet_b0", {}, 1280),
    ("vit_small_patch16_224", {"img_size": 32}, 384),
])
def test_common_backbones_construct_and_run(name, kwargs, d):
    net = create_network(ModelConfig(backbone=name, proj_dim=32), num_classes=C, **kwargs)
    out = net(torch.randn(2, 3, 32, 32), return_all=True)
    assert net.feature_dim == d
    assert out["h"].shape == (2, d) and out["z"].shape == (2, 32) and out["prototypes"].shape == (C, 32)


def test_model_data_config_follows_backbone():
    cfg = model_data_config(_net())
    ref = timm.data.resolve_model_data_config(timm.create_model("test_resnet", num_classes=0))
    assert cfg["mean"] == tuple(ref["mean"]) and cfg["std"] == tuple(ref["std"])
    assert cfg["input_size"] == tuple(ref["input_size"]) and cfg["interpolation"] == ref["interpolation"]
    r18 = model_data_config(create_network(ModelConfig(backbone="resnet18"), num_classes=C))
    assert r18["mean"] == pytest.approx((0.485, 0.456, 0.406)) and r18["std"] == pytest.approx((0.229, 0.224, 0.225))
