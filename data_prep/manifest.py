"""Manifest construction and checks, and the user's own split file.

The manifest is the cache's readable half: one row per stored image with `image, label, split,
group` and then metadata columns. Labels are class names (empty for unlabelled rows), never
integer positions, so the file means the same thing to a person and to the code.

A user split file (`prepare.split_file`) is a CSV `image,split`; it is data under version
control (as FLamby commits its ISIC split), and it is checked strictly: every image exactly
once, splits only train/val/test, and no lesion or patient group across two splits.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from .cache import MANIFEST_COLUMNS, SPLITS
from .errors import DataPrepError
from .io import read_user_csv
from .isic import format_items

__all__ = ["build_manifest", "validate_manifest", "read_split_file", "check_groups_disjoint"]


def build_manifest(
    images: Sequence[str],
    labels: Sequence[str | None],
    splits: Sequence[str],
    groups: Sequence[str | None],
    metadata: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Assemble a manifest frame. A missing group becomes the image name (its own group)."""
    n = len(images)
    if not (len(labels) == len(splits) == len(groups) == n):
        raise ValueError("images, labels, splits and groups differ in length")
    df = pd.DataFrame({
        "image": list(images),
        "label": ["" if v is None else str(v) for v in labels],
        "split": list(splits),
        "group": [g if g not in (None, "") else img for g, img in zip(groups, images)],
    })
    if metadata is not None and len(metadata.columns):
        if len(metadata) != n:
            raise ValueError("metadata has another number of rows than images")
        extra = metadata.reset_index(drop=True).drop(columns=[c for c in metadata.columns if c in MANIFEST_COLUMNS])
        df = pd.concat([df, extra], axis=1)
    return df


def validate_manifest(df: pd.DataFrame, class_names: Sequence[str]) -> None:
    """Check a manifest against the cache contract (a programming fault raises ValueError)."""
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"manifest lacks columns {missing}")
    if df["image"].duplicated().any():
        raise ValueError(f"manifest has duplicated images: {format_items(sorted(set(df['image'][df['image'].duplicated()])))}")
    bad_split = sorted(set(df["split"]) - set(SPLITS))
    if bad_split:
        raise ValueError(f"manifest has unknown splits {bad_split}")
    bad_label = sorted(set(df["label"]) - set(class_names) - {""})
    if bad_label:
        raise ValueError(f"manifest has labels outside class_names: {bad_label}")


def check_groups_disjoint(splits: Sequence[str], groups: Sequence[str], images: Sequence[str], source: str) -> None:
    """Raise when a group (lesion, patient) has images in two splits, listing them."""
    seen: dict[str, set[str]] = {}
    for g, s in zip(groups, splits):
        seen.setdefault(g, set()).add(s)
    leaking = sorted(g for g, s in seen.items() if len(s) > 1)
    if leaking:
        details = []
        for g in leaking[:10]:
            rows = [f"{img}={s}" for img, gg, s in zip(images, groups, splits) if gg == g]
            details.append(f"{g} ({', '.join(rows)})")
        more = f" ... ({len(leaking)} groups in all)" if len(leaking) > 10 else ""
        raise DataPrepError(
            f"{source}: group(s) split across several splits, which leaks near-duplicate images into evaluation: "
            f"{'; '.join(details)}{more}. Put all images of a group in one split.",
            source,
        )


def read_split_file(path: str | os.PathLike, images: Sequence[str], groups: Sequence[str | None]) -> np.ndarray:
    """Read a user split CSV (`image,split`) and return the split of each of `images`.

    Raises:
        DataPrepError: the file or a column is missing; an image is listed twice, is unknown
            to the cohort, or is absent; a split is not train/val/test; a group spans splits.
    """
    path = Path(path)
    df = read_user_csv(path, f"Split file {path} does not exist. Check prepare.split_file.", "Write it as image,split.")
    for col in ("image", "split"):
        if col not in df.columns:
            raise DataPrepError(f"{path}: no '{col}' column (columns: {', '.join(df.columns)}). Write the header image,split.", str(path))
    names = df["image"].str.strip()
    split = df["split"].str.strip()
    dup = names[names.duplicated(keep=False)]
    if len(dup):
        raise DataPrepError(f"{path}: images listed more than once: {format_items(sorted(set(dup)))}. List each image exactly once.", str(path))
    bad = [f"row {i + 1}: {n}={s!r}" for i, (n, s) in enumerate(zip(names, split)) if s not in SPLITS]
    if bad:
        raise DataPrepError(f"{path}: splits must be train, val or test; offending rows: {format_items(bad)}.", str(path))
    known = set(images)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise DataPrepError(f"{path}: images not in the cohort: {format_items(unknown)}. Remove these rows.", str(path))
    lookup = dict(zip(names, split))
    absent = [n for n in images if n not in lookup]
    if absent:
        raise DataPrepError(f"{path}: {len(absent)} cohort image(s) have no split: {format_items(absent)}. List every image exactly once.", str(path))
    out = np.array([lookup[n] for n in images], dtype=str)
    gid = [g if g not in (None, "") else n for g, n in zip(groups, images)]
    check_groups_disjoint(list(out), gid, list(images), str(path))
    return out
