"""`ecl prepare csv` and `ecl prepare folder`: generic 2D image cohorts into a prepared cache.

Readers: `cohort_csv.read_csv_cohort` (a CSV `image,label[,group][,metadata...]`, or an ISIC
Archive export) and `folder.read_folder` (`root/<class>/<image>`). Both decode with
`images.ImageDecode` (the same `load_image_file` as ISIC 2019 and `ecl predict`) and build with
`build.build_cache`. Cache kind: "image", or "dermoscopy" for an ISIC Archive export.
"""
from __future__ import annotations

import os
from pathlib import Path

from .build import build_cache
from .cohort_csv import read_csv_cohort
from .folder import read_folder
from .images import ImageDecode
from .options import PrepareOptions

__all__ = ["prepare_csv", "prepare_folder"]


def prepare_csv(
    manifest_csv: str | os.PathLike,
    image_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    options: PrepareOptions | None = None,
    image_column: str = "image",
    label_column: str = "label",
    group_column: str = "group",
) -> Path:
    """Prepare a generic `image,label[,group][,metadata...]` cohort (or an ISIC Archive export).

    Raises:
        DataPrepError: any fault in the CSV or a missing image, before decoding starts; an
            undecodable image with on_error="stop".
    """
    options = options or PrepareOptions()
    cohort = read_csv_cohort(manifest_csv, image_root, options, image_column, label_column, group_column)
    return build_cache(cohort, ImageDecode(options.short_side, options.color_constancy), Path(out_dir), options)


def prepare_folder(root: str | os.PathLike, out_dir: str | os.PathLike, options: PrepareOptions | None = None) -> Path:
    """Prepare a folder-per-class cohort (`root/<class>/<image>`); images are named by position, never by file name.

    Raises:
        DataPrepError: fewer than two class folders, an empty class folder, a bad split file,
            or an undecodable image with on_error="stop".
    """
    options = options or PrepareOptions()
    cohort = read_folder(root, options)
    return build_cache(cohort, ImageDecode(options.short_side, options.color_constancy), Path(out_dir), options)
