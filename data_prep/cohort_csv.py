"""Generic cohorts described by one CSV: `image,label[,group][,any metadata]`.

Column names are configurable. The ISIC Archive's metadata export (an `isic_id` column and a
`diagnosis` column) is recognised by its header and mapped: image = isic_id, label = diagnosis,
group = lesion_id, with images at `<image_root>/<isic_id>.jpg`; of its many columns only the
usual clinical metadata (age, site, sex) are kept, since the rest (attribution, licence, ...)
says nothing about the patient's skin.

Image values may carry a file suffix (`img/001.png`, relative to the image root) or not
(`001`, then `.jpg`, `.jpeg` and `.png` are tried). The image column's values are the cohort's
own ids and become the manifest's image names as written (the user chose them for the CSV);
they are never replaced by the resolved file path.

`read_csv_cohort` turns the checked table into a `cohort.Cohort`: kind "image" for a generic
CSV (no dermoscopy-specific assumption), "dermoscopy" for an ISIC Archive export.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import pandas as pd

from .cohort import Cohort
from .errors import DataPrepError
from .io import read_user_csv
from .isic import format_items, METADATA_COLUMNS
from .options import PrepareOptions

__all__ = ["CohortTable", "read_cohort_csv", "read_csv_cohort", "is_archive_export"]

_ARCHIVE_IMAGE, _ARCHIVE_LABEL, _ARCHIVE_GROUP = "isic_id", "diagnosis", "lesion_id"
_TRY_SUFFIXES = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")


@dataclass
class CohortTable:
    """A checked cohort CSV: one entry per image, in CSV order."""

    images: list[str]
    paths: list[Path]
    labels: list[str]
    groups: list[str | None]
    metadata: pd.DataFrame
    class_names: list[str]
    notices: list[str] = field(default_factory=list)
    archive: bool = False  # an ISIC Archive export (dermoscopy)


def is_archive_export(columns: Sequence[str]) -> bool:
    """True for an ISIC Archive metadata export (isic_id and diagnosis columns)."""
    return _ARCHIVE_IMAGE in columns and _ARCHIVE_LABEL in columns


#: label spellings that mean "no value" in spreadsheets and pandas exports; never a class
MISSING_LABELS = frozenset({"", "na", "n/a", "nan", "null", "none", "?", "-", "#n/a"})


def _inside(root: Path, path: Path) -> bool:
    """True when `path` (symlinks resolved) lies inside `root`."""
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


def _resolve(image_root: Path, name: str) -> Path | None:
    candidate = image_root / name
    if Path(name).suffix and candidate.is_file():
        return candidate
    for suffix in _TRY_SUFFIXES:
        p = image_root / f"{name}{suffix}"
        if p.is_file():
            return p
    return None


def read_cohort_csv(
    csv_path: str | os.PathLike,
    image_root: str | os.PathLike,
    image_column: str = "image",
    label_column: str = "label",
    group_column: str = "group",
    class_names: Sequence[str] | None = None,
) -> CohortTable:
    """Read and check a cohort CSV; every listed image must exist under `image_root`.

    Args:
        csv_path: the CSV.
        image_root: folder the image column is relative to.
        image_column, label_column, group_column: column names (the group column is optional;
            without it every image is its own group).
        class_names: the allowed classes in order; default: the labels present, sorted.

    Raises:
        DataPrepError: missing columns, empty or duplicated images, empty labels, labels not in
            `class_names`, or absent image files; each lists the rows (1-based data rows).
    """
    csv_path, image_root = Path(csv_path), Path(image_root)
    df = read_user_csv(csv_path, f"Cohort CSV {csv_path} does not exist. Check the path.")
    if not image_root.is_dir():
        raise DataPrepError(f"Image folder {image_root} does not exist. Check --image-root.", str(image_root))
    notices: list[str] = []
    archive = is_archive_export(df.columns) and image_column not in df.columns
    if archive:
        image_column, label_column, group_column = _ARCHIVE_IMAGE, _ARCHIVE_LABEL, _ARCHIVE_GROUP
        notices.append(f"{csv_path.name} is an ISIC Archive export: image=isic_id, label=diagnosis, group=lesion_id")
    for col, what in ((image_column, "image"), (label_column, "label")):
        if col not in df.columns:
            raise DataPrepError(
                f"{csv_path}: no {what} column '{col}' (columns: {', '.join(df.columns)}). "
                f"Name the column with --{what}-column.",
                str(csv_path),
            )
    images = df[image_column].str.strip()
    labels = df[label_column].str.strip()
    rows = pd.Series(range(1, len(df) + 1))
    if (images == "").any():
        raise DataPrepError(f"{csv_path}: empty '{image_column}' in rows {format_items(list(rows[images == '']))}.", str(csv_path))
    dup = images[images.duplicated(keep=False)]
    if len(dup):
        raise DataPrepError(f"{csv_path}: duplicated images in '{image_column}': {format_items(sorted(set(dup)))}. Each image must appear once.", str(csv_path))
    missing_label = labels.str.lower().isin(MISSING_LABELS)
    if missing_label.any():
        items = [f"row {r}: {v!r}" for r, v in zip(rows[missing_label], labels[missing_label])]
        raise DataPrepError(f"{csv_path}: empty or missing '{label_column}' ({format_items(items)}). Give every image a class "
                            f"or remove its row; NA, nan and the like are not class names.", str(csv_path))
    if class_names is None:
        class_names = sorted(set(labels))
    else:
        class_names = list(class_names)
        unknown = labels[~labels.isin(class_names)]
        if len(unknown):
            items = [f"row {r}: {v!r}" for r, v in zip(rows[unknown.index], unknown)]
            raise DataPrepError(
                f"{csv_path}: unknown label(s) in '{label_column}' ({format_items(items)}). Known classes: {', '.join(class_names)}.",
                str(csv_path),
            )
    if group_column in df.columns:
        groups: list[str | None] = [g.strip() or None for g in df[group_column]]
    else:
        groups = [None] * len(df)

    escaping = [f"row {r}: {name!r}" for r, name in zip(rows, images)
                if not _inside(image_root, image_root / name)]
    if escaping:
        raise DataPrepError(f"{csv_path}: image path(s) outside --image-root {image_root} ({format_items(escaping)}). "
                            f"Write paths relative to the image root, without '..', or pass the folder that holds them "
                            f"as --image-root.", str(csv_path))
    paths: list[Path] = []
    missing: list[str] = []
    for name in images:
        p = _resolve(image_root, name)
        if p is None:
            missing.append(name)
        else:
            paths.append(p)
    if missing:
        raise DataPrepError(
            f"{csv_path}: {len(missing)} listed image(s) are absent from {image_root}: {format_items(missing)}. "
            f"Add the files or remove their rows.",
            str(csv_path),
        )
    if archive:
        keep = [c for c in METADATA_COLUMNS if c in df.columns]
    else:
        keep = [c for c in df.columns if c not in (image_column, label_column, group_column)]
    metadata = df[keep].reset_index(drop=True)
    return CohortTable(images=list(images), paths=paths, labels=list(labels), groups=groups, metadata=metadata,
                       class_names=class_names, notices=notices, archive=archive)


def read_csv_cohort(
    manifest_csv: str | os.PathLike,
    image_root: str | os.PathLike,
    options: PrepareOptions,
    image_column: str = "image",
    label_column: str = "label",
    group_column: str = "group",
) -> Cohort:
    """A generic `image,label[,group][,metadata...]` CSV (or an ISIC Archive export) as a `Cohort`.

    Class names are the labels present, sorted alphabetically. Metadata columns named `split`
    are dropped (the split comes from `make_split` or `options.split_file`).

    Raises:
        DataPrepError: any fault in the CSV, a split file, or a missing image; nothing is decoded.
    """
    from .build import fixed_splits
    from .images import image_key
    from .io import file_sha256
    from .options import check_options

    check_options(options)
    table = read_cohort_csv(manifest_csv, image_root, image_column, label_column, group_column)
    metadata = table.metadata.drop(columns=[c for c in table.metadata.columns if c in ("image", "label", "split", "group")])
    notices = list(table.notices)
    labels: list[str | None] = list(table.labels)
    kind = "dermoscopy" if table.archive else "image"
    splits = fixed_splits(table.images, table.groups, labels, options, notices)
    key = image_key("csv", table.images, table.paths, manifest=file_sha256(manifest_csv),
                    columns=f"{image_column},{label_column},{group_column}")
    key["kind"] = kind  # caches of generic CSVs built before kind "image" existed are rebuilt, not reused
    return Cohort(kind=kind, source="isic_archive" if table.archive else "csv", items=[str(p) for p in table.paths],
                  item_rows=[1] * len(table.paths), images=list(table.images), labels=labels, groups=list(table.groups),
                  metadata=metadata.reset_index(drop=True), class_names=list(table.class_names), key=key, splits=splits,
                  notices=notices, where=str(manifest_csv))
