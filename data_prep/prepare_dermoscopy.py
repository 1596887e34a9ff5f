"""`ecl prepare isic2019`: the ISIC 2019 challenge layout read into a `Cohort` and built into a cache.

Reading (`read_isic2019`) checks every CSV and that every listed image file exists (`isic.py`)
before anything is decoded; `build.build_cache` then decodes, quarantines, splits and finalizes
exactly as for every other format. Image names are the ISIC ids as the CSVs write them (they
are the cohort's public ids); groups are lesion ids (an image without one is its own group).

Cache: kind "dermoscopy" (pipeline-side dermoscopy preprocessing, colour constancy among it,
follows this kind), manifest columns image, label, split, group, age_approx,
anatom_site_general, sex. Unlabelled cohorts (the ISIC 2019 test release) go entirely to split
"test", the split `ecl predict` and `ecl evaluate` read by default.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import pandas as pd

from .build import build_cache, fixed_splits
from .cohort import Cohort
from .images import ImageDecode, image_key
from .io import file_sha256
from .isic import ISIC2019_CLASSES, METADATA_COLUMNS, list_image_files, match_images, read_ground_truth, read_metadata
from .options import PrepareOptions, check_options

__all__ = ["read_isic2019", "prepare_isic2019", "SHARD_SIZE"]

#: images per shard of every 2D image cohort
SHARD_SIZE = 64


def _metadata_frame(images: Sequence[str], meta: pd.DataFrame | None, source: str, notices: list[str]) -> tuple[pd.DataFrame, list[str | None]]:
    """Metadata columns and lesion groups aligned with `images` (empty where unknown)."""
    if meta is None:
        frame = pd.DataFrame({c: [""] * len(images) for c in METADATA_COLUMNS})
        return frame, [None] * len(images)
    absent = [img for img in images if img not in meta.index]
    if absent:
        notices.append(f"{len(absent)} image(s) have no row in {Path(source).name}; their metadata is left empty")
    aligned = meta.reindex(list(images)).fillna("")
    groups = [g or None for g in aligned["lesion_id"]]
    return aligned[list(METADATA_COLUMNS)].reset_index(drop=True), groups


def read_isic2019(
    images_dir: str | os.PathLike,
    ground_truth_csv: str | os.PathLike | None,
    metadata_csv: str | os.PathLike | None,
    options: PrepareOptions,
) -> Cohort:
    """Read and check an ISIC 2019 cohort (training release, or the test release without ground truth).

    Raises:
        DataPrepError: any fault in the CSVs, a split file, or a missing image; nothing is decoded.
    """
    check_options(options)
    files = list_image_files(images_dir)
    notices: list[str] = []
    meta = read_metadata(metadata_csv) if metadata_csv is not None else None
    key_files: dict[str, str | None] = {"metadata": file_sha256(metadata_csv) if metadata_csv is not None else None}
    if ground_truth_csv is not None:
        gt = read_ground_truth(ground_truth_csv)
        key_files["ground_truth"] = file_sha256(ground_truth_csv)
        notices.extend(gt.notices)
        images, labels, class_names = gt.images, list(gt.labels), gt.class_names
        listing_source = ground_truth_csv
    else:
        if meta is not None:
            images = list(meta.index)
            listing_source = metadata_csv
        else:
            images = sorted(files)
            listing_source = images_dir
        labels = [None] * len(images)
        class_names = list(ISIC2019_CLASSES)
    paths, match_notices = match_images(images, files, images_dir, listing_source)
    notices.extend(match_notices)
    metadata, groups = _metadata_frame(images, meta, str(metadata_csv), notices)
    splits = fixed_splits(images, groups, labels, options, notices)
    return Cohort(kind="dermoscopy", source="isic2019", items=[str(p) for p in paths], item_rows=[1] * len(paths),
                  images=list(images), labels=labels, groups=groups, metadata=metadata, class_names=list(class_names),
                  key=image_key("isic2019", images, paths, **key_files), splits=splits, notices=notices,
                  where=str(ground_truth_csv) if ground_truth_csv is not None else "isic2019", shard_size=SHARD_SIZE)


def prepare_isic2019(
    images_dir: str | os.PathLike,
    ground_truth_csv: str | os.PathLike | None,
    metadata_csv: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    options: PrepareOptions | None = None,
) -> Path:
    """Prepare an ISIC 2019 cohort into a cache.

    Args:
        images_dir: `ISIC_2019_Training_Input` (or `..._Test_Input`).
        ground_truth_csv: the one-hot ground truth; None for the test release (prediction only:
            labels empty, split "test", class_names the eight ISIC 2019 diagnoses).
        metadata_csv: the metadata CSV, or None (no groups, empty metadata).
        out_dir: the cache folder.
        options: short_side, color_constancy, fractions, split_seed, split_file, on_error, workers.

    Returns:
        `out_dir`, holding a complete cache.

    Raises:
        DataPrepError: any fault in the inputs, before decoding starts; or an undecodable image
            with `on_error="stop"`.
    """
    options = options or PrepareOptions()
    cohort = read_isic2019(images_dir, ground_truth_csv, metadata_csv, options)
    return build_cache(cohort, ImageDecode(options.short_side, options.color_constancy), Path(out_dir), options, "dermoscopy")
