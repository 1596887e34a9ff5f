"""The folder-per-class layout (`root/<class>/<image>`, as torchvision's ImageFolder) read into a `Cohort`.

Each folder directly under the root is a class, named by the folder (its name is the label, so
it must not carry an identifier); images are every JPEG/PNG/BMP/TIFF file below it, searched
recursively, hidden files and folders left out. Files lying directly under the root belong to
no class and are ignored with a notice.

Why positions and not file names: photo exports are often named after the patient or the
visit (`SMITH_J_2021-03-04.jpg`, `MRN12345/lesion2.png`). No file or sub-folder name reaches the
manifest, cache.json, quarantine.csv or a message: image k (1-based, in sorted path order) of
class C is named `C-00000k`, and errors name that. A split file (`prepare.split_file`) for such
a cohort lists these names; adding files to a class renumbers the later ones of that class.
Every image is its own group (the layout has no lesion or patient column).
"""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from .build import fixed_splits
from .cohort import Cohort
from .errors import DataPrepError
from .images import IMAGE_SUFFIXES, image_key
from .options import PrepareOptions, check_options

__all__ = ["read_folder", "folder_image_name"]


def folder_image_name(label: str, position: int) -> str:
    """The manifest name of the `position`-th (1-based) image of class `label`."""
    return f"{label}-{position:06d}"


def _visible(path: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def read_folder(root: str | os.PathLike, options: PrepareOptions) -> Cohort:
    """Read and check a folder-per-class cohort; nothing is decoded.

    Raises:
        DataPrepError: the root is not a folder, holds fewer than two class folders, or a class
            folder holds no image; or a split file does not match the image names.
    """
    check_options(options)
    root = Path(root)
    if not root.is_dir():
        raise DataPrepError(f"{root} is not a folder. Pass --root, the folder holding one sub-folder per class.", str(root))
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    loose = [p for p in root.iterdir() if p.is_file() and not p.name.startswith(".")]
    notices: list[str] = []
    if loose:
        notices.append(f"{len(loose)} file(s) directly under --root belong to no class folder and are ignored")
    if len(classes) < 2:
        raise DataPrepError(f"{root}: {len(classes)} class folder(s) found; a classifier needs at least two. Put the images "
                            f"of each class in its own sub-folder: <root>/<class>/<image>.", str(root))
    paths: list[Path] = []
    names: list[str] = []
    labels: list[str | None] = []
    ignored = 0
    for folder in classes:
        label = folder.name
        found = sorted(p for p in folder.rglob("*") if p.is_file() and _visible(p, root))
        images = [p for p in found if p.suffix.lower() in IMAGE_SUFFIXES]
        ignored += len(found) - len(images)
        if not images:
            raise DataPrepError(f"{root}: class folder '{label}' holds no image ({', '.join(IMAGE_SUFFIXES)}). Add its "
                                f"images or remove the folder.", str(root))
        for k, p in enumerate(images, start=1):
            paths.append(p)
            names.append(folder_image_name(label, k))
            labels.append(label)
    if ignored:
        notices.append(f"{ignored} file(s) in class folders are not images ({', '.join(IMAGE_SUFFIXES)}) and are ignored")
    groups: list[str | None] = [None] * len(names)
    splits = fixed_splits(names, groups, labels, options, notices)
    shown = {str(p): n for p, n in zip(paths, names)}
    return Cohort(kind="image", source="folder", items=[str(p) for p in paths], item_rows=[1] * len(paths), images=names,
                  labels=labels, groups=groups, metadata=pd.DataFrame(index=range(len(names))),
                  class_names=[p.name for p in classes], key=image_key("folder", names, paths), splits=splits,
                  notices=notices, where=str(root), rename=_Rename(shown))


class _Rename:
    """Replaces an image's path by its manifest name in a decode error (picklable, unlike a closure)."""

    def __init__(self, shown: dict[str, str]):
        self.shown = shown

    def __call__(self, item: int, err: DataPrepError) -> DataPrepError:
        path = err.path or ""
        name = self.shown.get(path, f"image {item + 1}")
        return _renamed(err, path, f"image {name}")


def _renamed(err: DataPrepError, path: str, shown: str) -> DataPrepError:
    text = str(err).replace(path, shown) if path else str(err)
    out = DataPrepError(text, shown)
    out.reason = str(getattr(err, "reason", err)).replace(path, shown) if path else str(getattr(err, "reason", err))  # type: ignore[attr-defined]
    return out
