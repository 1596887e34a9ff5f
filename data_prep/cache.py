"""The prepared-cohort cache: THE contract between preparation and training.

On disk, one folder::

    cache.json     format version, kind, class names in order, build key, hashes, complete flag
    pixels.u8      every image's uint8 pixels (H, W, C, row-major) back to back: one flat file
    index.npy      int64 [N, 4]: byte offset, height, width, channels of image i in pixels.u8
    manifest.csv   row i describes image i: image, label, split, group, then metadata columns

Why this shape: a DataLoader worker slices a memory map instead of decoding a JPEG, images keep
their own aspect ratio (no padding), and the manifest stays a plain CSV that a person can read.
Labels are class *names* in the manifest; positions come only from `class_names` in cache.json.

Building is resumable: `CacheWriter` writes shards atomically into a build folder keyed by the
hash of the inputs and options; an interrupted build skips the shards already written, and a
finished cache with the same key is left alone. `cache.json` is written last, so a cache without
`"complete": true` is never opened for training.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from .errors import DataPrepError
from .io import atomic_open, atomic_write_text, bytes_sha256, file_sha256

__all__ = ["Cache", "CacheWriter", "open_cache", "FORMAT_VERSION", "MANIFEST_COLUMNS", "SPLITS"]

FORMAT_VERSION = 1
MANIFEST_COLUMNS = ("image", "label", "split", "group")
SPLITS = ("train", "val", "test")


@dataclass
class Cache:
    """A prepared cohort opened for reading. Cheap to pickle into DataLoader workers."""

    path: Path
    meta: dict[str, Any]
    manifest: pd.DataFrame
    index: np.ndarray
    _pixels: np.memmap | None = field(default=None, repr=False)

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    @property
    def kind(self) -> str:
        return str(self.meta.get("kind", "dermoscopy"))

    @property
    def manifest_sha256(self) -> str:
        return str(self.meta["manifest_sha256"])

    @property
    def dataset_sha256(self) -> str:
        return str(self.meta["dataset_sha256"])

    def __len__(self) -> int:
        return len(self.index)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_pixels"] = None  # each worker maps the file itself
        return state

    @property
    def pixels(self) -> np.memmap:
        if self._pixels is None:
            self._pixels = np.memmap(self.path / "pixels.u8", dtype=np.uint8, mode="r")
        return self._pixels

    def image(self, i: int) -> np.ndarray:
        """Image i as a writable uint8 array [H, W, C]."""
        off, h, w, c = (int(v) for v in self.index[i])
        return np.array(self.pixels[off : off + h * w * c]).reshape(h, w, c)

    @property
    def labels(self) -> np.ndarray:
        """Class positions (int64) in `class_names` order; -1 where a row has no label."""
        lookup = {name: k for k, name in enumerate(self.class_names)}
        return np.array([lookup.get(v, -1) if isinstance(v, str) else -1 for v in self.manifest["label"]], dtype=np.int64)

    def split_indices(self, split: str) -> np.ndarray:
        """Row positions of one split ('train', 'val', 'test' or 'all')."""
        if split == "all":
            return np.arange(len(self))
        return np.flatnonzero(self.manifest["split"].to_numpy() == split)

    def class_counts(self, split: str = "train") -> np.ndarray:
        """Number of labelled images per class in a split, in `class_names` order."""
        labels = self.labels[self.split_indices(split)]
        labels = labels[labels >= 0]
        return np.bincount(labels, minlength=len(self.class_names)).astype(np.int64)


def open_cache(path: str | Path) -> Cache:
    """Open a finished cache for reading.

    Raises:
        DataPrepError: the folder is missing, is not a cache, or its build did not finish.
    """
    path = Path(path)
    meta_path = path / "cache.json"
    if not path.is_dir():
        raise DataPrepError(f"Cache folder {path} does not exist. Run `ecl prepare ...` first.", str(path))
    if not meta_path.is_file():
        raise DataPrepError(f"{path} is not a prepared cache (no cache.json). Run `ecl prepare ...` with --out {path}.", str(path))
    rebuild = "Re-run the `ecl prepare` command that built it to rebuild the cache."
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataPrepError(f"{meta_path} is damaged ({type(exc).__name__}: {exc}). {rebuild}", str(meta_path)) from None
    if not meta.get("complete"):
        raise DataPrepError(f"The cache in {path} is incomplete (its build was interrupted). Re-run the same `ecl prepare` command to resume it.", str(path))
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataPrepError(f"{meta_path}: format_version {meta.get('format_version')} is not {FORMAT_VERSION}. Re-run `ecl prepare` to rebuild the cache.", str(meta_path))
    names = meta.get("class_names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names) \
            or len(set(names)) != len(names):
        raise DataPrepError(f"{meta_path}: class_names must be a list of distinct class names; got {names!r}. {rebuild}",
                            str(meta_path))
    for name in ("manifest.csv", "index.npy", "pixels.u8"):
        if not (path / name).is_file():
            raise DataPrepError(f"{path / name} is missing: the cache is damaged. {rebuild}", str(path / name))
    try:
        manifest = pd.read_csv(path / "manifest.csv", dtype={"image": str, "label": str, "split": str, "group": str}, keep_default_na=False, na_values=[""])
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise DataPrepError(f"{path / 'manifest.csv'} is damaged ({type(exc).__name__}). {rebuild}", str(path / "manifest.csv")) from None
    lacking = [c for c in MANIFEST_COLUMNS if c not in manifest.columns]
    if lacking:
        raise DataPrepError(f"{path / 'manifest.csv'} lacks columns {', '.join(lacking)}: the cache is damaged. {rebuild}", str(path / "manifest.csv"))
    try:
        index = np.load(path / "index.npy")  # allow_pickle stays False: an object array is refused, never run
    except (ValueError, OSError, EOFError) as exc:
        raise DataPrepError(f"{path / 'index.npy'} is damaged or not a plain integer array ({exc}). {rebuild}", str(path / "index.npy")) from None
    if index.ndim != 2 or index.shape[1] != 4 or not np.issubdtype(index.dtype, np.integer) or (index.size and index.min() < 0):
        raise DataPrepError(f"{path / 'index.npy'} is not an [n, 4] array of non-negative integers (dtype {index.dtype}, shape "
                            f"{index.shape}). {rebuild}", str(path / "index.npy"))
    if len(index) != len(manifest):
        raise DataPrepError(f"{path}: index.npy has {len(index)} rows but manifest.csv has {len(manifest)}. Re-run `ecl prepare` to rebuild the cache.", str(path))
    need = int((index[:, 0] + index[:, 1] * index[:, 2] * index[:, 3]).max()) if len(index) else 0
    have = (path / "pixels.u8").stat().st_size
    if have < need:
        raise DataPrepError(f"{path / 'pixels.u8'} is truncated ({have} bytes; the index needs {need}). {rebuild}", str(path / "pixels.u8"))
    return Cache(path=path, meta=meta, manifest=manifest, index=index)


class CacheWriter:
    """Builds a cache in resumable shards; `finalize` assembles it and marks it complete.

    Args:
        out_dir: the cache folder.
        build_key: hash of everything the pixels depend on (input file hashes, options). A finished
            cache with the same key is reused; shards of another key are discarded.
    """

    def __init__(self, out_dir: str | Path, build_key: str):
        self.out_dir = Path(out_dir)
        self.build_key = build_key
        self.build_dir = self.out_dir / f".build-{build_key[:16]}"

    def is_complete(self) -> bool:
        """True when the folder already holds a finished cache built from the same inputs."""
        meta_path = self.out_dir / "cache.json"
        if not meta_path.is_file():
            return False
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            return False
        return bool(meta.get("complete")) and meta.get("build_key") == self.build_key

    def start(self) -> None:
        """Create the build folder, removing stale builds of other inputs."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        meta_path = self.out_dir / "cache.json"
        if meta_path.is_file() and not self.is_complete():
            # An older cache of other inputs is about to be overwritten: mark it unusable first.
            try:
                old = json.loads(meta_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                old = {}
            old["complete"] = False
            atomic_write_text(meta_path, json.dumps(old, indent=2, sort_keys=True))
        for stale in self.out_dir.glob(".build-*"):
            if stale != self.build_dir:
                shutil.rmtree(stale, ignore_errors=True)
        self.build_dir.mkdir(exist_ok=True)

    def _shard_path(self, k: int) -> Path:
        return self.build_dir / f"shard-{k:06d}.npz"

    def has_shard(self, k: int) -> bool:
        return self._shard_path(k).is_file()

    def write_shard(self, k: int, images: Sequence[np.ndarray]) -> None:
        """Atomically store shard k (a list of uint8 [H, W, C] arrays)."""
        shapes = np.array([im.shape for im in images], dtype=np.int64).reshape(-1, 3)
        flat = np.concatenate([np.ascontiguousarray(im, dtype=np.uint8).ravel() for im in images]) if images else np.zeros(0, np.uint8)
        with atomic_open(self._shard_path(k), "wb") as fh:
            np.savez(fh, shapes=shapes, flat=flat)

    def finalize(self, manifest: pd.DataFrame, n_shards: int, meta: dict[str, Any]) -> Path:
        """Concatenate shards 0..n_shards-1 into pixels.u8, write index, manifest and cache.json.

        `manifest` must have one row per stored image, in shard order, with MANIFEST_COLUMNS first.
        """
        missing = [c for c in MANIFEST_COLUMNS if c not in manifest.columns]
        if missing:
            raise ValueError(f"manifest lacks columns {missing}")
        rows: list[tuple[int, int, int, int]] = []
        offset = 0
        with atomic_open(self.out_dir / "pixels.u8", "wb") as fh:
            for k in range(n_shards):
                with np.load(self._shard_path(k)) as shard:
                    shapes, flat = shard["shapes"], shard["flat"]
                fh.write(flat.tobytes())
                for h, w, c in shapes:
                    rows.append((offset, int(h), int(w), int(c)))
                    offset += int(h) * int(w) * int(c)
        if len(rows) != len(manifest):
            raise ValueError(f"{len(rows)} images in shards but {len(manifest)} manifest rows")
        index = np.array(rows, dtype=np.int64).reshape(-1, 4)
        with atomic_open(self.out_dir / "index.npy", "wb") as fh:
            np.save(fh, index)
        cols = list(MANIFEST_COLUMNS) + [c for c in manifest.columns if c not in MANIFEST_COLUMNS]
        csv_text = manifest[cols].to_csv(index=False, lineterminator="\n")
        atomic_write_text(self.out_dir / "manifest.csv", csv_text)
        full_meta = {
            "format_version": FORMAT_VERSION,
            **meta,
            "n_images": len(manifest),
            "build_key": self.build_key,
            "manifest_sha256": bytes_sha256(csv_text),
            "dataset_sha256": file_sha256(self.out_dir / "pixels.u8"),
            "complete": True,
        }
        atomic_write_text(self.out_dir / "cache.json", json.dumps(full_meta, indent=2, sort_keys=True))
        shutil.rmtree(self.build_dir, ignore_errors=True)
        return self.out_dir
