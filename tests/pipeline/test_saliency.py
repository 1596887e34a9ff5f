"""Tests of the Grad-CAM section (pipeline/saliency.py): the package's maps against a hand computation,
deterministic choice of images, and captions free of image names."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.config import ModelConfig
from pipeline.models import create_network
from pipeline.saliency import find_target_layer, grad_cam_maps, saliency_section, select_examples

import _evalkit as evalkit  # noqa: E402  registered by conftest.py


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _hand_grad_cam(network, x: torch.Tensor, cls: int, module: torch.nn.Module) -> np.ndarray:
    """Grad-CAM from its definition (Selvaraju et al. 2017), with plain torch hooks and autograd.

    alpha_k = mean over positions of d y_c / d A_k; map = ReLU(sum_k alpha_k A_k), upsampled
    bilinearly (half-pixel centres) to the input and min-max scaled to [0, 1].
    """
    store = {}
    handle = module.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    try:
        with torch.enable_grad():
            logits = network(x)
            a = store["a"]
            (g,) = torch.autograd.grad(logits[0, cls], a)
    finally:
        handle.remove()
    alpha = g.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((alpha * a).sum(dim=1, keepdim=True)).detach()
    up = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    up = (up - up.min()) / (up.max() - up.min())
    return up.numpy()


def test_grad_cam_matches_hand_computation_test_resnet():
    torch.manual_seed(0)
    net = create_network(ModelConfig(backbone="test_resnet"), num_classes=4).eval()
    x = torch.randn(1, 3, 64, 64)
    layer = find_target_layer(net.backbone)
    assert layer.name == "layer4" and layer.module is net.backbone.layer4
    for cls in (0, 2):
        got = grad_cam_maps(net, x, [cls], layer)[0]
        want = _hand_grad_cam(net, x, cls, net.backbone.layer4)
        assert got.shape == want.shape == (64, 64)
        # Both are float32; the package min-max scales before and after its cv2 bilinear resize (the
        # same half-pixel sampling as torch's align_corners=False) and adds 1e-7 to each denominator:
        # the two agree to ~1e-6. 1e-4 leaves room for float32 summation order and is still far below
        # what a wrong layer, class or pooling gives (differences of 0.1 and more, checked below).
        np.testing.assert_allclose(got, want, atol=1e-4)
        assert want.std() > 0.05  # a real map, not a constant one
    other = _hand_grad_cam(net, x, 1, net.backbone.layer4)
    assert np.abs(grad_cam_maps(net, x, [0], layer)[0] - other).max() > 0.1


def test_target_layer_resnet50_and_vit_fallback():
    import timm

    r50 = timm.create_model("resnet50", pretrained=False, num_classes=0)
    assert find_target_layer(r50).name == "layer4"
    vit = create_network(ModelConfig(backbone="test_vit"), num_classes=3, img_size=32).eval()
    layer = find_target_layer(vit.backbone)
    assert layer.name.endswith(".norm1")  # the last block's input norm: patch tokens still carry gradient
    maps = grad_cam_maps(vit, torch.randn(2, 3, 32, 32), [0, 1], layer)
    assert maps.shape == (2, 32, 32) and np.isfinite(maps).all() and maps.max() == pytest.approx(1.0, abs=1e-5)


def test_select_examples_most_confident_correct_and_wrong_per_class():
    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.ones(3), size=40)
    labels = rng.integers(0, 3, size=40)
    rows = rng.permutation(1000)[:40]
    got = select_examples(probs, labels, rows, 2)
    pred, conf = probs.argmax(1), probs.max(1)
    want = []
    for c in range(3):
        for correct in (True, False):
            cand = [i for i in range(40) if labels[i] == c and (pred[i] == c) == correct]
            cand.sort(key=lambda i: (-conf[i], rows[i]))
            want += [int(rows[i]) for i in cand[:2]]
    assert [e["row"] for e in got] == want
    assert all(e["correct"] == (e["pred"] == e["label"]) for e in got)
    assert select_examples(probs, labels, rows, 0) == []


@pytest.mark.parametrize("kind", ["dermoscopy", "ct"])
def test_section_captions_carry_no_image_names(tmp_path, kind):
    from data_prep import open_cache
    from pipeline.config import DataConfig

    cache = open_cache(evalkit.build_cache(tmp_path / "cache", kind=kind))
    torch.manual_seed(0)
    net = create_network(ModelConfig(backbone="test_resnet"), num_classes=len(cache.class_names)).eval()
    rows = cache.split_indices("test")
    labels = cache.labels[rows]
    rows, labels = rows[labels >= 0], labels[labels >= 0]
    probs = torch.softmax(torch.randn(len(rows), len(cache.class_names)), 1).numpy()
    sec = saliency_section(net, cache, rows, probs, labels, cache.class_names, DataConfig(image_size=32), 2)
    assert sec["enabled"] and sec["layer"] == "layer4"
    # DF has no test image: no figure for it, and the note says so
    assert [c["name"] for c in sec["classes"]] == ["MEL", "NV", "BCC"] and "DF" in sec["note"]
    assert sorted(sec["figures"]) == ["0", "1", "2"]
    assert all(png[:8] == b"\x89PNG\r\n\x1a\n" for png in sec["figures"].values())
    assert [e["row"] for e in sec["examples"]] == [e["row"] for e in select_examples(probs, labels, rows, 2)]
    manifest = cache.manifest
    identifiers = [str(v) for col in ("image", "group", "patient") if col in manifest.columns
                   for v in manifest[col].to_numpy()]
    text = " ".join([c["caption"] for c in sec["classes"]] + [e["text"] for e in sec["examples"]]
                    + [sec["note"] or ""])
    assert identifiers and not [v for v in identifiers if v in text]
    off = saliency_section(net, cache, rows, probs, labels, cache.class_names, DataConfig(image_size=32), 0)
    assert not off["enabled"] and off["figures"] == {} and "saliency_per_class" in off["note"]


def test_section_without_a_readable_layer_says_why(tmp_path):
    from torch import nn

    from data_prep import open_cache
    from pipeline.config import DataConfig
    from pipeline.models import EclNetwork

    cache = open_cache(evalkit.build_cache(tmp_path / "cache"))
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 8))  # no stage, no convolution
    net = EclNetwork(backbone, feature_dim=8, num_classes=4, proj_dim=8).eval()
    rows = cache.split_indices("test")[:6]
    probs = np.full((6, 4), 0.25)
    sec = saliency_section(net, cache, rows, probs, cache.labels[rows], cache.class_names, DataConfig(image_size=32), 1,
                           norm={"mean": (0.5,) * 3, "std": (0.25,) * 3})
    assert not sec["enabled"] and "Sequential" in sec["note"] and "saliency_per_class=0" in sec["note"]
