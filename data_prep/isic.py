"""The ISIC 2019 challenge files, read exactly and checked before any heavy work.

Ground truth (`ISIC_2019_Training_GroundTruth.csv`): `image` then one column per class with
one-hot floats (`1.0`/`0.0`). The class order is the CSV's column order. `UNK` is accepted; a
class without any image (UNK in the training release) is dropped with a notice.

Metadata (`ISIC_2019_Training_Metadata.csv`, `ISIC_2019_Test_Metadata.csv`): `image,
age_approx, anatom_site_general, lesion_id, sex`, with empty fields where unknown. The test
release has no `lesion_id` column and no ground truth; it prepares for prediction only.

Image names are kept exactly as the CSV writes them, `_downsampled` suffix included, because
that is also the file name (`ISIC_0000123_downsampled.jpg`). A lookup without or with the
suffix is tried as a fallback for hand-assembled folders.

Every fault is a `DataPrepError` naming the file and the offending rows or images.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import DataPrepError
from .io import read_user_csv
from .images import IMAGE_SUFFIXES

__all__ = [
    "ISIC2019_CLASSES",
    "METADATA_COLUMNS",
    "GroundTruth",
    "read_ground_truth",
    "read_metadata",
    "list_image_files",
    "match_images",
    "format_items",
]

#: The eight diagnostic classes of the ISIC 2019 training release, in its column order.
#: Stored as `class_names` of prediction-only caches (the test release has no ground truth).
ISIC2019_CLASSES = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC")
#: Metadata columns carried into the manifest (lesion_id becomes the `group`).
METADATA_COLUMNS = ("age_approx", "anatom_site_general", "sex")
_DOWNSAMPLED = "_downsampled"


def format_items(items: list, limit: int = 10) -> str:
    """'a, b, c' for short lists; the first `limit` and '... (N in all)' for long ones."""
    items = [str(v) for v in items]
    if len(items) <= limit:
        return ", ".join(items)
    return ", ".join(items[:limit]) + f", ... ({len(items)} in all)"


def _read_csv(path: str | os.PathLike, what: str) -> pd.DataFrame:
    return read_user_csv(path, f"{what} {Path(path)} does not exist. Check the path.")


@dataclass
class GroundTruth:
    """Parsed ground truth: image names in file order, one class name per image."""

    images: list[str]
    labels: list[str]
    class_names: list[str]
    notices: list[str] = field(default_factory=list)


def read_ground_truth(path: str | os.PathLike) -> GroundTruth:
    """Parse and check an ISIC-style one-hot ground-truth CSV.

    Raises:
        DataPrepError: missing `image` column, fewer than two class columns, duplicated image
            IDs, empty or non-numeric values, values other than 0/1, rows with zero or several
            labels. Each message lists the offending rows (1-based data rows) or images.
    """
    path = Path(path)
    df = _read_csv(path, "Ground-truth file")
    cols = list(df.columns)
    if not cols or cols[0] != "image":
        raise DataPrepError(f"{path}: the first column must be 'image', found {cols[:1] or 'no columns'}. Use the ISIC 2019 header image,MEL,NV,....", str(path))
    classes = cols[1:]
    if not len(df):
        raise DataPrepError(f"{path}: no data rows, only the header. Give one row per image (image,{','.join(classes[:3]) or 'MEL,NV'},...).", str(path))
    looks_meta = [c for c in classes if c in ("age_approx", "anatom_site_general", "sex", "lesion_id")]
    if looks_meta:
        raise DataPrepError(f"{path}: this looks like the metadata CSV (columns {', '.join(looks_meta)}), not the one-hot ground truth. "
                            f"Pass it as --metadata and the ISIC_2019_Training_GroundTruth.csv as --ground-truth.", str(path))
    unnamed = [c for c in classes if str(c).startswith("Unnamed:") or not str(c).strip()]
    if unnamed:
        where = ", ".join(str(cols.index(c) + 1) for c in unnamed)
        raise DataPrepError(f"{path}: column(s) {where} have no header (often a trailing comma left by Excel). Remove the empty "
                            f"column(s) or the trailing commas.", str(path))
    if len(classes) < 2:
        raise DataPrepError(f"{path}: needs at least two class columns after 'image', found {classes}.", str(path))
    if len(set(classes)) != len(classes):
        dup = sorted({c for c in classes if classes.count(c) > 1})
        raise DataPrepError(f"{path}: duplicated class columns: {format_items(dup)}.", str(path))
    images = df["image"].str.strip()
    if (images == "").any():
        rows = list(np.flatnonzero(images == "") + 1)
        raise DataPrepError(f"{path}: empty image ID in rows {format_items(rows)}.", str(path))
    dup = images[images.duplicated(keep=False)]
    if len(dup):
        raise DataPrepError(f"{path}: duplicated image IDs: {format_items(sorted(set(dup)))}. Each image must appear once.", str(path))
    values = df[classes].apply(lambda c: pd.to_numeric(c.str.strip(), errors="coerce"))
    text_cols = [c for c in classes if values[c].isna().all()]
    if text_cols:
        raise DataPrepError(f"{path}: column(s) {format_items([repr(c) for c in text_cols])} hold no numbers (e.g. "
                            f"{str(df[text_cols[0]].iloc[0])[:40]!r}); every column after 'image' must be a 0/1 class column. "
                            f"Remove the column(s).", str(path))
    bad = values.isna().any(axis=1).to_numpy()
    if bad.any():
        bad_cols = [c for c in classes if values[c].isna().any()]
        names = list(images[bad])
        raise DataPrepError(f"{path}: empty or non-numeric values in column(s) {format_items([repr(c) for c in bad_cols])} "
                            f"for images {format_items(names)}. Write 1.0 or 0.0 in every class column.", str(path))
    arr = values.to_numpy(dtype=float)
    not_binary = ~np.isin(arr, (0.0, 1.0)).all(axis=1)
    if not_binary.any():
        names = list(images[not_binary])
        raise DataPrepError(f"{path}: class values other than 0 and 1 for images {format_items(names)}. The ground truth must be one-hot.", str(path))
    n_labels = arr.sum(axis=1)
    if (n_labels == 0).any():
        names = list(images[n_labels == 0])
        raise DataPrepError(f"{path}: rows with no label (every class 0) for images {format_items(names)}. Give each image exactly one class.", str(path))
    if (n_labels > 1).any():
        names = list(images[n_labels > 1])
        raise DataPrepError(f"{path}: rows with several labels for images {format_items(names)}. Give each image exactly one class.", str(path))
    suffixed = images.str.lower().str.endswith((".jpg", ".jpeg", ".png"))
    notices_ids: list[str] = []
    if suffixed.any():
        images = images.where(~suffixed, images.str.replace(r"\.(jpe?g|png)$", "", case=False, regex=True))
        notices_ids.append(f"{int(suffixed.sum())} image id(s) in {path.name} end in a file suffix (e.g. {df['image'][suffixed].iloc[0].strip()!r}); "
                           f"the suffix was dropped to match the files")
        dup = images[images.duplicated(keep=False)]
        if len(dup):
            raise DataPrepError(f"{path}: duplicated image IDs once the file suffix is dropped: {format_items(sorted(set(dup)))}.", str(path))
    label_pos = arr.argmax(axis=1)
    counts = np.bincount(label_pos, minlength=len(classes))
    notices = notices_ids
    empty = [c for c, n in zip(classes, counts) if n == 0]
    if empty:
        notices.append(f"class(es) {', '.join(empty)} in {path.name} have no images and are dropped")
    kept = [c for c, n in zip(classes, counts) if n > 0]
    labels = [classes[k] for k in label_pos]
    return GroundTruth(images=list(images), labels=labels, class_names=kept, notices=notices)


def read_metadata(path: str | os.PathLike) -> pd.DataFrame:
    """Parse an ISIC metadata CSV into a frame indexed by image.

    Columns returned: `lesion_id` (empty when absent, as in the test release) and
    `METADATA_COLUMNS`; empty fields stay empty strings. `age_approx` must be numeric where set.

    Raises:
        DataPrepError: no `image` column, duplicated images, or a non-numeric age.
    """
    path = Path(path)
    df = _read_csv(path, "Metadata file")
    if "image" not in df.columns:
        raise DataPrepError(f"{path}: no 'image' column (columns: {list(df.columns)}). Use the ISIC 2019 metadata header image,age_approx,anatom_site_general,lesion_id,sex.", str(path))
    df["image"] = df["image"].str.strip()
    dup = df["image"][df["image"].duplicated(keep=False)]
    if len(dup):
        raise DataPrepError(f"{path}: duplicated image IDs: {format_items(sorted(set(dup)))}. Each image must appear once.", str(path))
    for col in ("lesion_id", *METADATA_COLUMNS):
        if col not in df.columns:
            df[col] = ""
        df[col] = df[col].str.strip()
    age = df["age_approx"]
    bad = (age != "") & pd.to_numeric(age, errors="coerce").isna()
    if bad.any():
        rows = [f"{img} ({val!r})" for img, val in zip(df["image"][bad], age[bad])]
        raise DataPrepError(f"{path}: non-numeric age_approx for images {format_items(rows)}. Leave the field empty when unknown.", str(path))
    return df.set_index("image")[["lesion_id", *METADATA_COLUMNS]]


def list_image_files(images_dir: str | os.PathLike) -> dict[str, Path]:
    """Image files of a folder by stem (LICENSE.txt, ATTRIBUTION.txt and the like are ignored)."""
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise DataPrepError(f"Image folder {images_dir} does not exist. Check the path.", str(images_dir))
    found: dict[str, Path] = {}
    for entry in os.scandir(images_dir):
        p = Path(entry.path)
        if entry.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."):
            if p.stem in found:
                raise DataPrepError(f"{images_dir}: two files for image {p.stem}: {found[p.stem].name} and {p.name}. Keep one.", str(images_dir))
            found[p.stem] = p
    return found


def match_images(names: list[str], files: dict[str, Path], images_dir: str | os.PathLike, source: str | os.PathLike) -> tuple[list[Path], list[str]]:
    """Find each listed image's file; report absent ones as an error and unlisted files as a warning.

    Returns:
        (paths in the order of `names`, notices).

    Raises:
        DataPrepError: some listed images have no file; the message lists them.
    """
    paths: list[Path] = []
    missing: list[str] = []
    used: set[str] = set()
    for name in names:
        alt = name[: -len(_DOWNSAMPLED)] if name.endswith(_DOWNSAMPLED) else name + _DOWNSAMPLED
        key = name if name in files else alt if alt in files else None
        if key is None:
            missing.append(name)
            continue
        used.add(key)
        paths.append(files[key])
    if missing:
        raise DataPrepError(
            f"{source}: {len(missing)} listed image(s) are absent from {images_dir}: {format_items(missing)}. "
            f"Add the files or remove their rows.",
            str(source),
        )
    notices = []
    unlisted = sorted(set(files) - used)
    if unlisted:
        msg = f"{len(unlisted)} image file(s) in {images_dir} are not listed in {Path(source).name} and are ignored: {format_items(unlisted)}"
        warnings.warn(msg, stacklevel=2)
        notices.append(msg)
    return paths, notices
