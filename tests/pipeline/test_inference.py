"""Tests of pipeline/inference.py: the one prediction loop, held against plain forward passes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score

from pipeline.config import ModelConfig
from pipeline.inference import Predictions, predict_loader, predict_split, predict_tensors
from pipeline.models import create_network

import _evalkit as evalkit  # noqa: E402  registered by conftest.py

C = 4


@pytest.fixture(scope="module")
def net():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    network = create_network(ModelConfig(backbone="test_resnet"), num_classes=C)
    network.eval()
    yield network
    torch.set_num_threads(before)


def _direct(network, x: torch.Tensor) -> dict:
    """One forward pass over everything at once, outside the loop under test."""
    with torch.no_grad():
        return network(x, return_all=True)


def test_predict_tensors_equals_one_forward_pass_for_any_batch_size(net):
    x = torch.randn(7, 3, 32, 32)
    ref = _direct(net, x)["logits"].double().numpy()
    for batch_size in (1, 3, 7, 50):
        pred = predict_tensors(net, iter(list(x)), "cpu", batch_size, C)  # a generator is enough
        assert isinstance(pred, Predictions)
        np.testing.assert_allclose(pred.logits, ref, rtol=1e-5, atol=1e-6)
        assert pred.logits.dtype == np.float64
        assert pred.rows.tolist() == list(range(7)) and (pred.labels == -1).all()
        assert not pred.labelled.any() and pred.h is None


def test_predict_tensors_decodes_lazily(net):
    """Images are pulled as batches fill: after the first batch of 2, at most 4 have been made."""
    made = []

    def images():
        for i in range(6):
            made.append(i)
            yield torch.randn(3, 32, 32)

    seen = []
    real_forward = net.forward

    def spy(x, return_all=False):
        seen.append(len(made))
        return real_forward(x, return_all=return_all)

    net.forward = spy
    try:
        predict_tensors(net, images(), "cpu", 2, C)
    finally:
        del net.forward
    assert seen == [2, 4, 6]
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        predict_tensors(net, images(), "cpu", 0, C)


def test_predict_loader_features_labels_rows_and_mode(net):
    x = torch.randn(5, 3, 32, 32)
    batches = [(x[:3], torch.tensor([0, 1, -1]), torch.tensor([10, 11, 12])), (x[3:], [3, 2], [13, 14])]
    net.train()
    pred = predict_loader(net, batches, torch.device("cpu"), C, features=True)
    assert net.training  # given back in the mode it came in
    net.eval()
    ref = _direct(net, x)
    np.testing.assert_allclose(pred.logits, ref["logits"].double().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pred.h, ref["h"].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pred.z, ref["z"].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pred.weight, ref["weight"].detach().numpy())
    np.testing.assert_allclose(pred.prototypes, ref["prototypes"].detach().numpy())
    assert pred.labels.tolist() == [0, 1, -1, 3, 2] and pred.rows.tolist() == [10, 11, 12, 13, 14]
    assert pred.labelled.tolist() == [True, True, False, True, True]


def test_predict_loader_autocast_and_channels_last_stay_close(net):
    x = torch.randn(4, 3, 32, 32)
    ref = _direct(net, x)["logits"].double().numpy()
    pred = predict_loader(net, [(x, [0, 1, 2, 3], [0, 1, 2, 3])], "cpu", C, amp=torch.bfloat16, channels_last=True)
    assert pred.logits.dtype == np.float64
    # bfloat16 keeps ~3 significant digits of these cosine logits (scale ~5): close, and visibly not fp32
    assert np.abs(pred.logits - ref).max() < 0.1
    assert not np.allclose(pred.logits, ref, rtol=1e-5, atol=1e-6)


def test_predict_loader_without_batches_is_empty(net):
    pred = predict_loader(net, [], "cpu", C, features=True)
    assert pred.logits.shape == (0, C) and pred.labels.shape == (0,) and pred.rows.shape == (0,)
    assert pred.h is None and pred.z is None


def test_predict_split_follows_the_cache_split(net, tmp_path):
    from data_prep import open_cache
    from pipeline.data import create_eval_loader
    from pipeline.models import model_data_config

    cache_dir = evalkit.build_cache(tmp_path / "cache")
    cache = open_cache(cache_dir)
    cfg = evalkit.tiny_config(cache_dir, tmp_path / "runs", "")
    pred = predict_split(net, cache, "test", cfg.data, 5, features=True)
    rows = cache.split_indices("test")
    assert sorted(pred.rows.tolist()) == sorted(rows.tolist())
    np.testing.assert_array_equal(pred.labels, cache.labels[pred.rows])
    assert (~pred.labelled).sum() == 2  # the two unlabelled test images are predicted, not dropped
    x = torch.cat([b[0] for b in create_eval_loader(cache, "test", cfg.data, model_data_config(net), 64)])
    np.testing.assert_allclose(pred.logits, _direct(net, x)["logits"].double().numpy(), rtol=1e-5, atol=1e-6)
    assert pred.h.shape[0] == len(rows)


def test_train_validation_is_sklearn_balanced_accuracy_of_the_loop(net):
    from pipeline.train import _validate

    torch.manual_seed(1)
    x = torch.randn(12, 3, 32, 32)
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0, 1, -1, -1])
    loader = [(x[:6], y[:6], torch.arange(6)), (x[6:], y[6:], torch.arange(6, 12))]
    got = _validate(net, loader, torch.device("cpu"), None, False, C)
    keep = y.numpy() >= 0
    expected = balanced_accuracy_score(y.numpy()[keep], _direct(net, x)["logits"].argmax(1).numpy()[keep])
    assert got == pytest.approx(expected)
    assert _validate(net, None, torch.device("cpu"), None, False, C) is None
    assert _validate(net, [(x[:2], torch.tensor([-1, -1]), torch.arange(2))], torch.device("cpu"), None, False, C) is None
