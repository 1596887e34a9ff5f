"""Torch data layer over a prepared cache: multi-view augmentation, loaders, eval transform.

Why it looks like this:
- Images come from `data_prep.Cache` (a memory map; each worker maps it itself), so a worker does
  no decoding, only augmentation.
- Views follow docs/method.md ("Model", views): view 0 is strong (random resized crop, flips and a
  RandAugment-like choice of `strong_ops` ops at `strong_magnitude`) and feeds the classifier;
  views 1 and 2 are SimCLR-like (random resized crop, flips, colour jitter with probability
  `color_jitter_p`, grayscale with probability `grayscale_p`) and feed the projection head.
- Augmentation randomness is a pure function of (seed, epoch, cache row, view): every sample seeds
  its own generators, so the views are identical whatever the number of workers, the rank layout
  or a resume in the middle of a run. The epoch travels with each index from the sampler (the
  loader's sampler yields (epoch, position) pairs), which keeps it right inside persistent workers.
- CT caches (`cache.kind == "ct"`) get MONAI views instead (`ct_train_transform`): one spatial
  transform for the three planes of the 2.5D stack, window/noise jitter instead of colour ops.
- Evaluation has one deterministic view: resize the shorter side to `image_size` (aspect kept),
  then centre-crop `image_size` x `image_size`. The whole lesion stays in frame, and a cache built
  with `prepare.short_side` close to `image_size` is barely resampled.
- Normalisation uses the backbone's own mean/std (`pipeline.models.model_data_config`), passed in
  as `norm`, so it cannot drift from the weights.
- Speed (one core, 224 px, 3 views; benchmarks/bench_datapath.py): the crop comes first so all
  colour work touches only the output pixels; colour jitter is one affine colour map in uint8
  (`FastColorJitter`); training views stay uint8 until `normalize_on_device` turns them into
  normalised float32 on the device (4x fewer bytes to collate, pin and copy).
"""
from __future__ import annotations

import os
import random
from typing import Any, Callable, Iterator, Sequence

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations would otherwise query PyPI on import

import albumentations as A
import cv2
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .config import AugmentConfig, DataConfig, TrainConfig
from .errors import ConfigError, PipelineError
from .samplers import EpochSampler, create_sampler

__all__ = [
    "CacheDataset", "ViewTransform", "create_train_loader", "create_eval_loader", "eval_transform",
    "train_transform", "ct_train_transform", "CtViewTransform", "sample_seeds", "EpochTaggedSampler", "normalize_on_device", "FastColorJitter",
]

_REFLECT = cv2.BORDER_REFLECT_101


def sample_seeds(seed: int, epoch: int, index: int, n: int) -> np.ndarray:
    """n independent 32-bit seeds for one sample, from (seed, epoch, cache row) alone."""
    return np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), int(index)]).generate_state(n)


def _mean_std(norm: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    try:
        mean = np.asarray(norm["mean"], dtype=np.float32).reshape(-1)
        std = np.asarray(norm["std"], dtype=np.float32).reshape(-1)
    except (KeyError, TypeError):
        raise ValueError("norm must be a dict with 'mean' and 'std' (use pipeline.models.model_data_config(network))") from None
    if mean.size not in (1, 3) or std.size not in (1, 3) or np.any(std <= 0):
        raise ValueError(f"norm mean/std must have 1 or 3 entries and std > 0; got mean={mean}, std={std}")
    return np.broadcast_to(mean, (3,)).copy(), np.broadcast_to(std, (3,)).copy()


def normalize_on_device(x: Tensor, norm: dict[str, Any]) -> Tensor:
    """uint8 images [..., 3, H, W] -> float32 `(x / 255 - mean) / std`, on x's device; float passes through.

    Why: the training loader ships uint8 views (4x fewer bytes to collate, pin and copy) and the
    device, where it is nearly free, does the float conversion and normalisation.
    """
    if x.dtype != torch.uint8:
        return x
    mean, std = _mean_std(norm)
    scale = torch.as_tensor(1.0 / (255.0 * std), dtype=torch.float32, device=x.device).view(3, 1, 1)
    shift = torch.as_tensor(mean / std, dtype=torch.float32, device=x.device).view(3, 1, 1)
    return x.float().mul_(scale).sub_(shift)


def _flips(aug: AugmentConfig) -> list[A.BasicTransform]:
    out: list[A.BasicTransform] = []
    if aug.hflip:
        out.append(A.HorizontalFlip(p=0.5))
    if aug.vflip:
        out.append(A.VerticalFlip(p=0.5))
    return out


# RGB -> YIQ (NTSC); the hue turn is a rotation of the (I, Q) chroma plane about the gray axis
_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=np.float64)
_YIQ_INV = np.linalg.inv(_YIQ)
_GRAY = np.array([0.299, 0.587, 0.114], dtype=np.float64)


class FastColorJitter(A.ColorJitter):
    """albumentations' ColorJitter (same parameters, same random draws and order), applied as one
    affine colour map in uint8.

    Why: brightness, contrast, saturation and hue are each an affine map of the RGB vector
    (contrast about the image's mean gray, saturation towards the pixel's gray, hue a rotation of
    the YIQ chroma plane), so the four compose, in the drawn order, into one 3x4 matrix that
    `cv2.transform` applies in a single saturating pass over the (already cropped) view: no HSV
    round trip, no float image. Measured 3-5x faster than the parent per view at 224 px.
    Differences from the parent: hue turns in YIQ instead of OpenCV's HSV (the usual fast
    approximation, as in NVIDIA DALI's colour twist) and clipping happens once at the end, not
    after each of the four steps.
    """

    def apply(self, img: np.ndarray, brightness: float, contrast: float, saturation: float, hue: float,
              order: list[int], **params: Any) -> np.ndarray:
        if brightness == 1 and contrast == 1 and saturation == 1 and hue == 0:
            return img
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            return super().apply(img, brightness=brightness, contrast=contrast, saturation=saturation, hue=hue,
                                 order=order, **params)
        m, t = np.eye(3), np.zeros(3)
        mean_rgb = np.asarray(cv2.mean(img)[:3], dtype=np.float64)
        for i in order:
            if i == 0 and brightness != 1:
                m, t = brightness * m, brightness * t
            elif i == 1 and contrast != 1:
                gray_mean = float(_GRAY @ (m @ mean_rgb + t))
                m, t = contrast * m, contrast * t + (1 - contrast) * gray_mean
            elif i == 2 and saturation != 1:
                s = saturation * np.eye(3) + (1 - saturation) * np.outer(np.ones(3), _GRAY)
                m, t = s @ m, s @ t
            elif i == 3 and hue != 0:
                # the minus sign turns hue the way HSV's hue channel does (red -> yellow -> green)
                c, sn = np.cos(-2 * np.pi * hue), np.sin(-2 * np.pi * hue)
                rot = np.array([[1, 0, 0], [0, c, -sn], [0, sn, c]])
                h = _YIQ_INV @ rot @ _YIQ
                m, t = h @ m, h @ t
        return cv2.transform(img, np.hstack([m, t[:, None]]).astype(np.float32))


def _strong_ops(magnitude: int) -> list[A.BasicTransform]:
    """RandAugment-like op pool (Cubuk et al.), scaled as timm's rand-m<M>: level = M / 10.

    Albumentations has no RandAugment; these are its equivalents of the usual ops, each applied
    with p=1 once chosen. Colour-free ops (equalize, autocontrast) ignore the magnitude.
    """
    level = magnitude / 10.0
    lo = lambda v: max(0.0, 1.0 - v)  # noqa: E731 - enhancement factor range [1 - v, 1 + v]
    enh = min(0.9 * level, 0.95)
    return [
        A.Affine(rotate=(-30 * level, 30 * level), border_mode=_REFLECT, p=1.0),
        A.Affine(shear={"x": (-17 * level, 17 * level), "y": (0, 0)}, border_mode=_REFLECT, p=1.0),
        A.Affine(shear={"x": (0, 0), "y": (-17 * level, 17 * level)}, border_mode=_REFLECT, p=1.0),
        A.Affine(translate_percent={"x": (-0.3 * min(level, 1.5), 0.3 * min(level, 1.5)), "y": (0, 0)}, border_mode=_REFLECT, p=1.0),
        A.Affine(translate_percent={"x": (0, 0), "y": (-0.3 * min(level, 1.5), 0.3 * min(level, 1.5))}, border_mode=_REFLECT, p=1.0),
        FastColorJitter(brightness=(lo(enh), 1 + enh), contrast=(1, 1), saturation=(1, 1), hue=(0, 0), p=1.0),
        FastColorJitter(brightness=(1, 1), contrast=(lo(enh), 1 + enh), saturation=(1, 1), hue=(0, 0), p=1.0),
        FastColorJitter(brightness=(1, 1), contrast=(1, 1), saturation=(lo(enh), 1 + enh), hue=(0, 0), p=1.0),
        A.Sharpen(alpha=(0.0, min(1.0, enh)), lightness=(1.0, 1.0), p=1.0),
        A.Posterize(num_bits=(max(1, 8 - int(round(4 * min(level, 1.75)))), 8), p=1.0),
        A.Solarize(threshold_range=(max(0.05, 1.0 - level), 1.0), p=1.0),
        A.Equalize(p=1.0),
        A.AutoContrast(p=1.0),
    ]


def _crop(size: int, aug: AugmentConfig) -> A.RandomResizedCrop:
    return A.RandomResizedCrop(size=(size, size), scale=(aug.crop_scale_min, 1.0), interpolation=cv2.INTER_LINEAR)


def strong_view(data_cfg: DataConfig) -> A.Compose:
    """View 0: crop, flips, `strong_ops` random ops at `strong_magnitude`."""
    aug = data_cfg.augment
    ops: list[Any] = [_crop(data_cfg.image_size, aug), *_flips(aug)]
    if aug.strong_ops > 0:
        pool = _strong_ops(aug.strong_magnitude)
        ops.append(A.SomeOf(pool, n=min(aug.strong_ops, len(pool)), replace=False, p=1.0))
    return A.Compose(ops)


def contrastive_view(data_cfg: DataConfig) -> A.Compose:
    """Views 1, 2: SimCLR-like crop, flips, colour jitter and grayscale."""
    aug = data_cfg.augment
    cj = aug.color_jitter
    ops: list[Any] = [_crop(data_cfg.image_size, aug), *_flips(aug)]
    if cj > 0 and aug.color_jitter_p > 0:
        ops.append(FastColorJitter(brightness=(1 - cj, 1 + cj), contrast=(1 - cj, 1 + cj), saturation=(1 - cj, 1 + cj),
                                 hue=(-cj / 4, cj / 4), p=aug.color_jitter_p))
    if aug.grayscale_p > 0:
        ops.append(A.ToGray(num_output_channels=3, p=aug.grayscale_p))
    return A.Compose(ops)


def deterministic_view(data_cfg: DataConfig) -> A.Compose:
    """Evaluation view: shorter side to `image_size`, centre crop `image_size` square."""
    s = data_cfg.image_size
    return A.Compose([A.SmallestMaxSize(max_size=s, interpolation=cv2.INTER_AREA), A.CenterCrop(height=s, width=s)])


class ViewTransform:
    """uint8 HWC image -> views as a tensor: [V, 3, H, W] (stacked views) or [3, H, W].

    Args:
        views: one albumentations pipeline per view.
        norm: dict with backbone `mean` and `std` (model_data_config).
        stack: return [V, 3, H, W] even for one view (training); False returns [3, H, W] (one view).
        normalize: True returns float32 `(x / 255 - mean) / std`; False returns the uint8 pixels
            (the training loader: `normalize_on_device` finishes the job on the device, where it is
            nearly free, and collating, pinning and copying move 4x fewer bytes).

    Calling with `seed=` makes the result a function of the seed; without it the pipelines draw
    from fresh entropy (only sensible for deterministic eval views).
    """

    def __init__(self, views: Sequence[A.Compose], norm: dict[str, Any], stack: bool = True, normalize: bool = True):
        if not views:
            raise ValueError("at least one view is needed")
        if not stack and len(views) != 1:
            raise ValueError("stack=False needs exactly one view")
        self.views = list(views)
        self.mean, self.std = _mean_std(norm)
        self.norm = {"mean": tuple(float(v) for v in self.mean), "std": tuple(float(v) for v in self.std)}
        self.stack = stack
        self.normalize = normalize
        self._scale = (1.0 / (255.0 * self.std)).astype(np.float32)
        self._shift = (self.mean / self.std).astype(np.float32)

    @property
    def n_views(self) -> int:
        return len(self.views)

    def _to_tensor(self, img: np.ndarray) -> Tensor:
        # (x / 255 - mean) / std, in one fused multiply-subtract per pixel
        out = img.astype(np.float32) * self._scale - self._shift
        return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1)))

    def __call__(self, image: np.ndarray, seed: int | None = None, epoch: int = 0, index: int = 0) -> Tensor:
        image = _as_rgb(image)
        seeds = sample_seeds(seed, epoch, index, 2 * len(self.views)) if seed is not None else None
        images = []
        for v, compose in enumerate(self.views):
            if seeds is not None:
                # One shared generator pair per view: set_random_seed would hand every op the same
                # stream, coupling e.g. the horizontal and vertical flip decisions.
                compose.set_random_state(np.random.default_rng(int(seeds[2 * v])), random.Random(int(seeds[2 * v + 1])))
            images.append(compose(image=image)["image"])
        if self.normalize:
            tensors = [self._to_tensor(img) for img in images]
            return torch.stack(tensors) if self.stack else tensors[0]
        # uint8: one copy from the views' HWC into a contiguous [V, 3, H, W]
        out = torch.from_numpy(np.stack(images).transpose(0, 3, 1, 2).copy())
        return out if self.stack else out[0]


def _as_rgb(image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    elif image.shape[2] == 4:
        image = image[:, :, :3]
    elif image.shape[2] != 3:
        raise ValueError(f"expected an image with 1, 3 or 4 channels, got shape {image.shape}")
    return image


def train_transform(data_cfg: DataConfig, norm: dict[str, Any], n_views: int, normalize: bool = False) -> ViewTransform:
    """Training views: [strong] for 1 view, [strong, contrastive, contrastive, ...] for more.

    uint8 [V, 3, H, W] by default (normalise with `normalize_on_device`); `normalize=True` gives
    float32 normalised views.
    """
    if n_views < 1:
        raise ValueError(f"n_views must be >= 1, got {n_views}")
    views = [strong_view(data_cfg)] + [contrastive_view(data_cfg) for _ in range(n_views - 1)]
    return ViewTransform(views, norm, stack=True, normalize=normalize)


def _ct_view(data_cfg: DataConfig, strong: bool, source: int) -> Any:
    """One CT training view as a MONAI Compose over {"image": float32 [3, source, source] in 0..255}.

    The three channels are planes of one lesion (adjacent slices, orthogonal planes, or one
    slice under three HU windows), so every spatial op acts on [3, H, W] as one image: one
    rotation, zoom, shift and flip for all three, which for adjacent slices is a rigid in-plane
    motion of the 3-D lesion neighbourhood (no op mixes or reorders channels: no hue, saturation
    or grayscale, which mean nothing on HU windows). Intensity ops are the CT analogue of colour
    jitter: a window width (scale) and level (shift) change, and Gaussian noise at the cache's
    pixel size (resized with the image afterwards, so it is correlated like scanner noise).
    Padding is 0 = below every window = air, what lies around a lesion crop's edge anyway.
    Spatial work happens at the cache's size, then one `Resized` to `image_size`.
    """
    from monai.transforms import (Compose, RandAffined, RandFlipd, RandGaussianNoised, RandScaleIntensityd,
                                  RandShiftIntensityd, Resized)

    aug = data_cfg.augment
    level = min(aug.strong_magnitude / 10.0, 1.5) if strong else 0.5
    zoom_in = float(np.sqrt(aug.crop_scale_min)) - 1.0  # grid scale < 1 zooms in: RandomResizedCrop's area range
    cj = max(aug.color_jitter, 0.1 * level) if strong else aug.color_jitter
    jitter_p = 0.8 if strong else aug.color_jitter_p
    ops: list[Any] = [RandGaussianNoised(keys="image", prob=0.5, std=4.0 if strong else 2.0)]
    if cj > 0 and jitter_p > 0:
        ops += [RandScaleIntensityd(keys="image", factors=cj / 2, prob=jitter_p),
                RandShiftIntensityd(keys="image", offsets=cj * 64.0, prob=jitter_p)]
    ops.append(RandAffined(keys="image", prob=1.0, rotate_range=np.pi / 6 * level,
                           scale_range=((zoom_in, 0.1), (zoom_in, 0.1)), translate_range=(0.1 * source, 0.1 * source),
                           mode="bilinear", padding_mode="zeros"))
    if aug.hflip:
        ops.append(RandFlipd(keys="image", prob=0.5, spatial_axis=1))
    if aug.vflip:
        ops.append(RandFlipd(keys="image", prob=0.5, spatial_axis=0))
    ops.append(Resized(keys="image", spatial_size=(data_cfg.image_size,) * 2, mode="bilinear"))
    return Compose(ops)


class CtViewTransform:
    """CT training views with MONAI dictionary transforms: uint8 HWC -> [V, 3, H, W] (see `_ct_view`).

    Same contract as `ViewTransform` (uint8 out unless `normalize`, `norm`, `n_views`) and the same
    determinism: view v of cache row r at epoch e is a pure function of (seed, e, r, v): the view's
    seed from `sample_seeds` starts one RandomState that every random op of the view draws from in
    turn (one generator, not MONAI's one-per-op `Compose.set_random_state`: 12 generator
    constructions cost more than the view). MONAI's metadata tracking is off while a view is made
    (plain tensors; 3x less overhead) and restored after.
    """

    def __init__(self, data_cfg: DataConfig, norm: dict[str, Any], n_views: int, normalize: bool = False):
        if n_views < 1:
            raise ValueError(f"n_views must be >= 1, got {n_views}")
        self.data_cfg = data_cfg
        self._n_views = int(n_views)
        mean, std = _mean_std(norm)
        self.norm = {"mean": tuple(float(v) for v in mean), "std": tuple(float(v) for v in std)}
        self.normalize = normalize
        self.stack = True
        self._views: dict[int, list[Any]] = {}  # by the cache's image side (built on first use)

    @property
    def n_views(self) -> int:
        return self._n_views

    def views_for(self, source: int) -> list[Any]:
        """The view pipelines for images of side `source`: [strong, contrastive, ...]."""
        if source not in self._views:
            self._views[source] = [_ct_view(self.data_cfg, v == 0, source) for v in range(self._n_views)]
        return self._views[source]

    def __call__(self, image: np.ndarray, seed: int | None = None, epoch: int = 0, index: int = 0) -> Tensor:
        from monai.data import get_track_meta, set_track_meta
        from monai.transforms import Randomizable

        image = _as_rgb(image)
        x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float()
        seeds = sample_seeds(seed, epoch, index, self._n_views) if seed is not None else [None] * self._n_views
        out = []
        tracking = get_track_meta()
        set_track_meta(False)
        try:
            for compose, view_seed in zip(self.views_for(max(image.shape[:2])), seeds):
                state = np.random.RandomState(None if view_seed is None else int(view_seed))
                for op in compose.transforms:
                    if isinstance(op, Randomizable):
                        op.set_random_state(state=state)
                y = torch.as_tensor(compose({"image": x})["image"])
                out.append(y.clamp_(0, 255).round_().to(torch.uint8))
        finally:
            set_track_meta(tracking)
        views = torch.stack(out)
        return normalize_on_device(views, self.norm) if self.normalize else views


def ct_train_transform(data_cfg: DataConfig, norm: dict[str, Any], n_views: int, normalize: bool = False) -> CtViewTransform:
    """Training views for a CT cache (`cache.kind == "ct"`): [strong] or [strong, contrastive, ...]."""
    return CtViewTransform(data_cfg, norm, n_views, normalize=normalize)


def eval_transform(data_cfg: DataConfig, norm: dict[str, Any]) -> ViewTransform:
    """Deterministic evaluation transform: uint8 HWC -> float32 [3, image_size, image_size].

    Used by the eval loader and by `ecl predict` on single images.
    """
    return ViewTransform([deterministic_view(data_cfg)], norm, stack=False)


class CacheDataset(Dataset):
    """Images of a cache's rows, transformed into views.

    Args:
        cache: an opened `data_prep.Cache`.
        indices: cache rows this dataset covers; position i of the dataset is row indices[i].
        transform_views: a ViewTransform (or any callable `(image, seed=, epoch=, index=) -> Tensor`).
        seed: augmentation seed (train.seed).
        epoch: default epoch for integer keys; the train loader passes (epoch, position) keys instead.

    Items are `(x, label, row)`: x from the transform, label int (-1 unlabelled), row the cache row.
    """

    def __init__(self, cache: Any, indices: Sequence[int] | np.ndarray,
                 transform_views: Callable[..., Tensor], seed: int = 0, epoch: int = 0):
        self.cache = cache
        self.indices = np.asarray(indices, dtype=np.int64)
        self.transform_views = transform_views
        self.seed = int(seed)
        self.epoch = int(epoch)
        self._labels = cache.labels[self.indices] if len(self.indices) else np.zeros(0, np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def labels(self) -> np.ndarray:
        """Labels of the dataset's positions (int64, -1 unlabelled)."""
        return self._labels

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, int, int]:
        epoch, pos = key if isinstance(key, tuple) else (self.epoch, key)
        row = int(self.indices[pos])
        x = self.transform_views(self.cache.image(row), seed=self.seed, epoch=epoch, index=row)
        return x, int(self._labels[pos]), row


class EpochTaggedSampler:
    """Wraps an EpochSampler to yield (epoch, position) keys for CacheDataset.

    Why: with persistent workers the dataset copies inside the workers never see a change made in
    the main process; the key carries the epoch instead. `set_epoch` re-seeds the order as well.
    """

    def __init__(self, sampler: EpochSampler, epoch: int = 0):
        self.sampler = sampler
        self.set_epoch(epoch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return ((epoch, pos) for pos in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


def _worker_init(worker_id: int) -> None:
    """Seed the global RNGs of a worker (our augmentations do not use them; third-party code might).

    Never call cv2.setNumThreads here: in a forked child it waits forever on the parent's thread
    pool (seen with OpenCV 4.x/5.x pthreads builds). `_loader_kwargs` sets it in the parent instead.
    """
    s = torch.initial_seed() % 2**32  # distinct per worker, derived from the loader's base seed
    np.random.seed(s)
    random.seed(s)


def _loader_kwargs(data_cfg: DataConfig) -> dict[str, Any]:
    workers = data_cfg.num_workers
    if workers is None:  # auto; run_train resolves it with the run's device first (pipeline.threads)
        from .threads import plan_threads

        workers = plan_threads(None, None, "cuda" if torch.cuda.is_available() else "cpu").num_workers
    workers = int(workers)
    kw: dict[str, Any] = dict(num_workers=workers, pin_memory=bool(data_cfg.pin_memory and torch.cuda.is_available()))
    if workers > 0:
        # The workers are the parallelism: OpenCV's own pool would only oversubscribe the cores.
        # Set in the parent before the fork (workers inherit it); torch already runs workers with
        # one intra-op thread.
        cv2.setNumThreads(0)
        kw.update(persistent_workers=bool(data_cfg.persistent_workers), worker_init_fn=_worker_init)
    return kw


def create_train_loader(cache: Any, data_cfg: DataConfig, train_cfg: TrainConfig, n_views: int,
                        norm: dict[str, Any], seed: int | None = None, epoch: int = 0, dist: Any = None,
                        *, rank: int | None = None, world_size: int | None = None) -> DataLoader:
    """Loader over the labelled training split yielding (x [B, V, 3, H, W] uint8, labels [B] int64,
    rows [B] int64), B = train.batch_size per process, last partial batch dropped. Normalise x on
    the device with `normalize_on_device(x, norm)` (or `loader.dataset.transform_views.norm`).

    Args:
        cache: opened Cache.
        data_cfg, train_cfg: config sections (image size, augmentation, workers; batch size, sampler).
        n_views: views per image (Method.n_views: 1 or 3).
        norm: model_data_config(network).
        seed: sampling and augmentation seed; None = train_cfg.seed.
        epoch: first epoch to yield; later epochs: `loader.sampler.set_epoch(e)` (works with
            persistent workers) or build a new loader.
        dist: a DistInfo (rank, world_size) or None for one process; `rank`/`world_size` override it.

    Raises:
        PipelineError: the training split has fewer labelled images than one global batch.
    """
    seed = train_cfg.seed if seed is None else int(seed)
    rank = int(rank if rank is not None else getattr(dist, "rank", 0))
    world_size = int(world_size if world_size is not None else getattr(dist, "world_size", 1))
    rows = cache.split_indices("train")
    labels = cache.labels[rows]
    rows = rows[labels >= 0]
    labels = labels[labels >= 0]
    if len(rows) < train_cfg.batch_size * world_size:
        raise PipelineError(
            f"The training split of {cache.path} has {len(rows)} labelled images, fewer than one batch "
            f"(train.batch_size={train_cfg.batch_size} x {world_size} process(es)). Lower train.batch_size."
        )
    sampler = EpochTaggedSampler(create_sampler(train_cfg.sampler, labels, seed, rank=rank, world_size=world_size), epoch)
    if getattr(cache, "kind", "") == "ct":
        views: Any = ct_train_transform(data_cfg, norm, n_views)
        # built here, before the workers fork: each worker building its own MONAI transforms allocated
        # enough to run the garbage collector there, which then finalised a previous loader's iterator
        # inherited from the parent ("can only test a child process" noise between two trainings, seen in
        # `ecl demo --modality ct`)
        views.views_for(max(cache.image(int(rows[0])).shape[:2]))
    else:
        views = train_transform(data_cfg, norm, n_views)
    dataset = CacheDataset(cache, rows, views, seed=seed, epoch=epoch)
    return DataLoader(dataset, batch_size=train_cfg.batch_size, sampler=sampler, drop_last=True, **_loader_kwargs(data_cfg))


def create_eval_loader(cache: Any, split: str, data_cfg: DataConfig, norm: dict[str, Any], batch_size: int) -> DataLoader:
    """Loader over one split in cache order yielding (x [B, 3, H, W], labels [B] (-1 unlabelled), rows [B]).

    Raises:
        ConfigError: unknown split name.
        PipelineError: the split is empty.
    """
    if split not in ("train", "val", "test", "all"):
        raise ConfigError(f"split {split!r} is not allowed; choose one of train, val, test, all.")
    rows = cache.split_indices(split)
    if len(rows) == 0:
        raise PipelineError(f"The cache {cache.path} has no images in split {split!r}; choose another split "
                            f"or re-prepare with a non-zero prepare.{split}_fraction.")
    dataset = CacheDataset(cache, rows, eval_transform(data_cfg, norm))
    return DataLoader(dataset, batch_size=int(batch_size), shuffle=False, drop_last=False, **_loader_kwargs(data_cfg))
