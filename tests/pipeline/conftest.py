"""Fixtures for pipeline tests: tiny dermoscopy-like caches (written by `_evalkit.write_cache`).

Built directly from seeded numpy images (a skin-toned background with a darker, class-coloured
blob), independent of the synthetic cohort generator, so data-layer tests only depend on the cache
contract. Images have different sizes and aspect ratios, as real prepared caches do.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import pytest

from data_prep import open_cache

def _register_evalkit() -> None:
    """Make tests/pipeline/_evalkit.py (tiny trained runs) importable as `_evalkit` by the test modules here.

    Why here: the tests folder is not a package (pytest's importlib mode), and every module loading
    the kit by path gave each its own copy; conftest runs first, so one module object serves all.
    """
    if "_evalkit" not in sys.modules:
        spec = importlib.util.spec_from_file_location("_evalkit", Path(__file__).with_name("_evalkit.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules["_evalkit"] = module
        spec.loader.exec_module(module)


_register_evalkit()


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tiny runs: on 2 shared cores, two threads contend and run much slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


CLASS_NAMES = ["MEL", "NV", "BCC"]
# Imbalanced like ISIC: per split, images per class
SPLIT_COUNTS = {"train": (12, 30, 6), "val": (4, 6, 2), "test": (3, 5, 2)}
_BLOB_RGB = np.array([[90, 40, 30], [150, 100, 70], [200, 120, 160]], dtype=np.float64)


def lesion_image(rng: np.random.Generator, label: int, h: int, w: int) -> np.ndarray:
    """A skin-toned uint8 [h, w, 3] image with a class-coloured elliptical blob and noise."""
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx = h / 2 + rng.uniform(-h / 8, h / 8), w / 2 + rng.uniform(-w / 8, w / 8)
    ry, rx = rng.uniform(0.2, 0.35) * h, rng.uniform(0.2, 0.35) * w
    inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    img = np.empty((h, w, 3), dtype=np.float64)
    img[:] = np.array([225, 180, 160]) + rng.normal(0, 6, 3)
    img[inside] = _BLOB_RGB[label] + rng.normal(0, 6, 3)
    img += rng.normal(0, 8, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_cache(out_dir: Path, images: Sequence[np.ndarray], labels: Sequence[str], splits: Sequence[str],
                class_names: Sequence[str], kind: str = "dermoscopy", shard_size: int = 16) -> Path:
    """A finished cache (several shards) of these images, through `_evalkit.write_cache`; returns its folder."""
    import _evalkit

    manifest = pd.DataFrame({
        "image": [f"IMG_{i:05d}" for i in range(len(images))],
        "label": list(labels),
        "split": list(splits),
        "group": [f"g{i // 2}" for i in range(len(images))],
    })
    return _evalkit.write_cache(out_dir, list(images), manifest, list(class_names), kind, shard_size=shard_size)


@pytest.fixture(scope="session")
def tiny_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a 3-class imbalanced cache: 48 train, 12 val, 10 test images of 40-72 px sides."""
    rng = np.random.default_rng(1234)
    images, labels, splits = [], [], []
    for split, counts in SPLIT_COUNTS.items():
        for c, n in enumerate(counts):
            for _ in range(n):
                h, w = int(rng.integers(40, 73)), int(rng.integers(40, 73))
                images.append(lesion_image(rng, c, h, w))
                labels.append(CLASS_NAMES[c])
                splits.append(split)
    # shuffle rows so splits and classes interleave like a real manifest
    perm = rng.permutation(len(images))
    return write_cache(tmp_path_factory.mktemp("tiny_cache"), [images[i] for i in perm], [labels[i] for i in perm],
                       [splits[i] for i in perm], CLASS_NAMES)


@pytest.fixture()
def tiny_cache(tiny_cache_dir: Path):
    """The tiny cache, opened (a fresh Cache object per test)."""
    return open_cache(tiny_cache_dir)


@pytest.fixture()
def make_cache(tmp_path: Path) -> Callable[..., object]:
    """Builder for ad-hoc caches: make_cache(images, labels, splits, class_names) -> opened Cache."""
    def _make(images, labels, splits, class_names, kind="dermoscopy"):
        return open_cache(write_cache(tmp_path / "cache", images, labels, splits, class_names, kind=kind))
    return _make
