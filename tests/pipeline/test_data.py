"""Tests of pipeline.data: loader shapes and dtypes, normalisation, determinism across workers."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import AugmentConfig, DataConfig, TrainConfig
from pipeline.data import (
    CacheDataset, FastColorJitter, create_eval_loader, create_train_loader, eval_transform, normalize_on_device,
    train_transform,
)
from pipeline.errors import ConfigError, PipelineError

NORM = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
SIZE = 32


def _data_cfg(workers: int = 0, **aug) -> DataConfig:
    return DataConfig(image_size=SIZE, num_workers=workers, pin_memory=False, augment=AugmentConfig(**aug))


def _train_cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"batch_size": 8, "seed": 11, **kw})


def _epoch(loader) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    return list(loader)


def test_train_loader_shapes_and_dtypes(tiny_cache):
    loader = create_train_loader(tiny_cache, _data_cfg(), _train_cfg(), n_views=3, norm=NORM, epoch=0)
    batches = _epoch(loader)
    assert len(batches) == len(loader) == 48 // 8
    x, y, idx = batches[0]
    assert x.shape == (8, 3, 3, SIZE, SIZE) and x.dtype == torch.uint8  # normalised on the device
    assert y.dtype == torch.int64 and idx.dtype == torch.int64 and y.shape == idx.shape == (8,)
    # labels and rows agree with the cache; rows come from the train split
    train_rows = set(tiny_cache.split_indices("train").tolist())
    for _, y, idx in batches:
        assert set(idx.tolist()) <= train_rows
        assert torch.equal(y, torch.as_tensor(tiny_cache.labels[idx.numpy()]))
    # views of one image differ (independent augmentations)
    assert not torch.equal(x[0, 0], x[0, 1]) and not torch.equal(x[0, 1], x[0, 2])


def test_train_views_deterministic_across_worker_counts(tiny_cache):
    seq = _epoch(create_train_loader(tiny_cache, _data_cfg(0), _train_cfg(), 3, NORM, epoch=2))
    par = _epoch(create_train_loader(tiny_cache, _data_cfg(2), _train_cfg(), 3, NORM, epoch=2))
    assert len(seq) == len(par)
    for (xa, ya, ia), (xb, yb, ib) in zip(seq, par):
        assert torch.equal(ia, ib) and torch.equal(ya, yb)
        assert torch.equal(xa, xb)


def test_set_epoch_changes_views_and_replays_with_persistent_workers(tiny_cache):
    loader = create_train_loader(tiny_cache, _data_cfg(2), _train_cfg(), 3, NORM, epoch=0)
    first = _epoch(loader)
    loader.sampler.set_epoch(1)
    second = _epoch(loader)
    assert not torch.equal(first[0][2], second[0][2])  # a new order
    # a fresh loader built for epoch 1 (a resumed run) yields exactly epoch 1's batches
    resumed = _epoch(create_train_loader(tiny_cache, _data_cfg(0), _train_cfg(), 3, NORM, epoch=1))
    for (xa, _, ia), (xb, _, ib) in zip(second, resumed):
        assert torch.equal(ia, ib) and torch.equal(xa, xb)


def test_same_sample_gets_new_views_in_new_epoch(tiny_cache):
    rows = tiny_cache.split_indices("train")[:4]
    ds = CacheDataset(tiny_cache, rows, train_transform(_data_cfg(), NORM, 3), seed=5)
    a, b, c = ds[(0, 1)][0], ds[(0, 1)][0], ds[(1, 1)][0]
    assert torch.equal(a, b) and not torch.equal(a, c)
    other_seed = CacheDataset(tiny_cache, rows, train_transform(_data_cfg(), NORM, 3), seed=6)
    assert not torch.equal(a, other_seed[(0, 1)][0])


def test_eval_loader_in_order_and_deterministic(tiny_cache):
    loader = create_eval_loader(tiny_cache, "val", _data_cfg(), NORM, batch_size=5)
    a, b = _epoch(loader), _epoch(create_eval_loader(tiny_cache, "val", _data_cfg(2), NORM, batch_size=5))
    rows = torch.cat([i for _, _, i in a])
    assert rows.tolist() == tiny_cache.split_indices("val").tolist()  # cache order, nothing dropped
    assert a[0][0].shape == (5, 3, SIZE, SIZE) and a[-1][0].shape[0] == 12 - 10
    for (xa, ya, _), (xb, yb, _) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_constant_image_normalised_with_backbone_mean_std(make_cache):
    values = (10, 128, 250)
    img = np.empty((50, 70, 3), np.uint8)
    img[:] = values
    cache = make_cache([img, img], ["A", "B"], ["test", "test"], ["A", "B"])
    x, y, _ = next(iter(create_eval_loader(cache, "test", _data_cfg(), NORM, batch_size=2)))
    expected = (np.array(values) / 255.0 - np.array(NORM["mean"])) / np.array(NORM["std"])
    assert x.shape == (2, 3, SIZE, SIZE)
    for c in range(3):
        torch.testing.assert_close(x[:, c], torch.full((2, SIZE, SIZE), float(expected[c])), rtol=0, atol=1e-5)
    assert y.tolist() == [0, 1]


def test_eval_transform_resizes_short_side_and_center_crops():
    # left third 0, middle third 100, right third 200 along a wide image: the centre crop keeps the middle
    img = np.zeros((SIZE, 3 * SIZE, 3), np.uint8)
    img[:, SIZE : 2 * SIZE] = 100
    img[:, 2 * SIZE :] = 200
    x = eval_transform(_data_cfg(), dict(mean=(0.0,), std=(1.0,)))(img)
    assert x.shape == (3, SIZE, SIZE)
    torch.testing.assert_close(x, torch.full((3, SIZE, SIZE), 100 / 255.0))
    # a larger image is first shrunk so its shorter side is image_size
    big = np.repeat(np.repeat(img, 3, axis=0), 3, axis=1)
    torch.testing.assert_close(eval_transform(_data_cfg(), dict(mean=(0.0,), std=(1.0,)))(big), x)


def test_grayscale_and_flip_settings_respected(tiny_cache):
    """With grayscale_p=1 the contrastive views have equal channels; view 0 keeps colour."""
    rows = tiny_cache.split_indices("train")[:2]
    cfg = _data_cfg(grayscale_p=1.0, color_jitter_p=0.0, strong_ops=0)
    x = CacheDataset(tiny_cache, rows, train_transform(cfg, dict(mean=(0.0,), std=(1.0,)), 3), seed=0)[0][0]
    x = x.float()
    for v in (1, 2):
        assert torch.allclose(x[v, 0], x[v, 1], atol=1) and torch.allclose(x[v, 1], x[v, 2], atol=1)
    assert not torch.allclose(x[0, 0], x[0, 2], atol=1)


def test_sampler_in_loader_is_config_kind(tiny_cache):
    loader = create_train_loader(tiny_cache, _data_cfg(), _train_cfg(sampler="class_balanced", batch_size=4), 1, NORM, epoch=0)
    labels = torch.cat([y for _, y, _ in loader])
    assert loader.sampler.sampler.kind == "class_balanced" and len(labels) == 48
    x = next(iter(loader))[0]
    assert x.shape == (4, 1, 3, SIZE, SIZE)


def test_distributed_ranks_get_disjoint_batches(tiny_cache):
    loaders = [create_train_loader(tiny_cache, _data_cfg(), _train_cfg(), 1, NORM, epoch=0, rank=r, world_size=2) for r in (0, 1)]
    rows = [torch.cat([i for _, _, i in ld]).tolist() for ld in loaders]
    assert len(rows[0]) == len(rows[1]) == 24
    assert not set(rows[0]) & set(rows[1])


def test_batch_larger_than_train_split_raises(tiny_cache):
    with pytest.raises(PipelineError, match=r"has 48 labelled images, fewer than one batch \(train.batch_size=64"):
        create_train_loader(tiny_cache, _data_cfg(), _train_cfg(batch_size=64), 3, NORM)


def test_unknown_eval_split_raises(tiny_cache):
    with pytest.raises(ConfigError, match="split 'valid' is not allowed; choose one of train, val, test, all"):
        create_eval_loader(tiny_cache, "valid", _data_cfg(), NORM, batch_size=4)


def test_uint8_train_views_normalised_on_device_equal_the_float_path(tiny_cache):
    """uint8 views + normalize_on_device == the same views normalised on the CPU (same seed)."""
    rows = tiny_cache.split_indices("train")[:3]
    u8 = CacheDataset(tiny_cache, rows, train_transform(_data_cfg(), NORM, 3), seed=4)
    f32 = CacheDataset(tiny_cache, rows, train_transform(_data_cfg(), NORM, 3, normalize=True), seed=4)
    for i in range(len(rows)):
        a, b = u8[(1, i)][0], f32[(1, i)][0]
        assert a.dtype == torch.uint8 and b.dtype == torch.float32
        expected = (a.double() / 255 - torch.tensor(NORM["mean"]).view(3, 1, 1)) / torch.tensor(NORM["std"]).view(3, 1, 1)
        torch.testing.assert_close(normalize_on_device(a, NORM), expected.float(), rtol=0, atol=1e-5)
        torch.testing.assert_close(normalize_on_device(a, NORM), b, rtol=0, atol=1e-5)
    float_in = torch.randn(2, 3, 4, 4)
    assert normalize_on_device(float_in, NORM) is float_in  # already normalised: passed through


def _jitter_params(**kw):
    p = dict(brightness=1.0, contrast=1.0, saturation=1.0, hue=0.0, order=[0, 1, 2, 3])
    p.update(kw)
    return p


def test_fast_color_jitter_matches_albumentations_for_brightness_contrast_saturation():
    """Each of brightness, contrast and saturation equals the reference ColorJitter within rounding;
    the composed map in a drawn order equals applying the reference ops in that order (no clipping)."""
    import albumentations as A

    rng = np.random.default_rng(0)
    img = rng.integers(70, 180, (40, 50, 3), dtype=np.uint8)  # mid-range: no clipping in either path
    ref, fast = A.ColorJitter(p=1.0), FastColorJitter(p=1.0)
    for kw in (dict(brightness=1.2), dict(contrast=0.7), dict(saturation=1.3),
               dict(brightness=0.9, contrast=1.1, saturation=0.8, order=[2, 1, 0, 3])):
        a = ref.apply(img, **_jitter_params(**kw)).astype(int)
        b = fast.apply(img, **_jitter_params(**kw)).astype(int)
        assert np.abs(a - b).max() <= 2, kw
    # by hand: contrast c about the mean gray m (ITU-R 601 weights)
    gray = img.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    by_hand = np.clip(np.round(0.5 * img + 0.5 * gray.mean()), 0, 255)
    assert np.abs(fast.apply(img, **_jitter_params(contrast=0.5)).astype(int) - by_hand).max() <= 1


def test_fast_color_jitter_hue_turns_like_hsv_and_keeps_gray():
    """Hue turns red towards yellow for positive shifts (HSV convention) and leaves gray pixels alone."""
    import cv2

    fast = FastColorJitter(p=1.0)
    img = np.zeros((4, 4, 3), np.uint8)
    img[:2] = (200, 40, 40)  # red
    img[2:] = (120, 120, 120)  # gray
    out = fast.apply(img, **_jitter_params(hue=0.08)).astype(int)
    assert np.abs(out[2:] - 120).max() <= 1
    h_in = cv2.cvtColor(img[:1, :1], cv2.COLOR_RGB2HSV_FULL)[0, 0, 0]
    h_out = cv2.cvtColor(out[:1, :1].astype(np.uint8), cv2.COLOR_RGB2HSV_FULL)[0, 0, 0]
    assert 0 < int(h_out) - int(h_in) < 40  # turned towards yellow by roughly 0.08 * 256 = 20


# ---- CT caches: MONAI views over the 2.5D stack ----

def _ct_stack(rng: np.random.Generator, size: int = 40) -> np.ndarray:
    """Three different smooth textures (adjacent-slice-like) as one uint8 HWC image."""
    import cv2

    planes = [cv2.GaussianBlur(rng.uniform(0, 255, (size, size)).astype(np.float32), (0, 0), 2.0) for _ in range(3)]
    return np.clip((np.stack(planes, -1) - 128) * 4 + 128, 0, 255).astype(np.uint8)


def test_ct_views_are_seeded_per_sample_and_view():
    from pipeline.data import CtViewTransform, ct_train_transform

    t = ct_train_transform(_data_cfg(), NORM, 3)
    assert isinstance(t, CtViewTransform) and t.n_views == 3
    img = _ct_stack(np.random.default_rng(0))
    a = t(img, seed=5, epoch=1, index=7)
    assert a.shape == (3, 3, SIZE, SIZE) and a.dtype == torch.uint8
    assert torch.equal(a, ct_train_transform(_data_cfg(), NORM, 3)(img, seed=5, epoch=1, index=7))  # a fresh transform too
    for other in (dict(seed=6, epoch=1, index=7), dict(seed=5, epoch=2, index=7), dict(seed=5, epoch=1, index=8)):
        assert not torch.equal(a, t(img, **other)), other
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[1], a[2])  # views differ


def test_ct_views_move_the_three_slices_together():
    # channel k of the augmented stack (P0, P1, P2) equals channel k of the augmented (Pk, Pk, Pk) under the
    # same seed: one spatial transform (and one intensity change) for all three, no mixing of channels
    from pipeline.data import ct_train_transform

    t = ct_train_transform(_data_cfg(), NORM, 2)
    img = _ct_stack(np.random.default_rng(1))
    for index in range(6):
        got = t(img, seed=3, epoch=0, index=index)
        for k in range(3):
            alone = t(np.repeat(img[..., k:k + 1], 3, axis=2), seed=3, epoch=0, index=index)
            assert torch.equal(got[:, k], alone[:, k]), (index, k)
        # and the transform is not the identity: the view moved away from the resized input
        resized = torch.nn.functional.interpolate(torch.from_numpy(img).permute(2, 0, 1)[None].float(), size=(SIZE, SIZE),
                                                  mode="bilinear")[0]
        assert (got[0].float() - resized).abs().mean() > 10


def test_ct_cache_trains_on_monai_views(make_cache):
    from pipeline.data import CtViewTransform

    rng = np.random.default_rng(2)
    images = [_ct_stack(rng, 48) for _ in range(16)]
    cache = make_cache(images, ["a", "b"] * 8, ["train"] * 16, ["a", "b"], kind="ct")
    loader = create_train_loader(cache, _data_cfg(), _train_cfg(), n_views=3, norm=NORM, epoch=0)
    assert isinstance(loader.dataset.transform_views, CtViewTransform)
    x, y, rows = next(iter(loader))
    assert x.shape == (8, 3, 3, SIZE, SIZE) and x.dtype == torch.uint8
    # the same views from two worker processes (MONAI in forked workers, seeds per sample)
    again, _, rows2 = next(iter(create_train_loader(cache, _data_cfg(2), _train_cfg(), n_views=3, norm=NORM, epoch=0)))
    assert torch.equal(rows, rows2) and torch.equal(x, again)
