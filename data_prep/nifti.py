"""NIfTI volumes (.nii, .nii.gz) read into the same `Volume` as a DICOM series.

Axis and orientation conventions: NIfTI stores an affine from voxel (i, j, k) to RAS+ world
millimetres; DICOM uses LPS+. SimpleITK (ITK's NIfTI reader) converts the affine to LPS on read
by negating the first two world axes, and returns the array as [k, j, i] = [z, y, x]. So after
`load_nifti`, `origin`/`direction` are in the same LPS world as `load_series`, the array index
order is the same [z, y, x], and `center_x/y/z_mm` in a labels CSV mean LPS millimetres for both
inputs (convert RAS coordinates from other tools by negating x and y). Voxel centres
`center_i/j/k` are the NIfTI file's own i, j, k.

Values are taken as HU as stored (scl_slope/scl_inter applied by the reader).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .dicom import Volume
from .errors import DataPrepError

__all__ = ["load_nifti", "nifti_stem", "NIFTI_SUFFIXES"]

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def nifti_stem(path: str | Path) -> str:
    """File name without .nii or .nii.gz: the key that labels CSV rows use for NIfTI inputs."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def load_nifti(path: str | Path) -> Volume:
    """Read a 3D NIfTI file as a Volume (float32 [z, y, x], LPS origin/direction).

    Raises:
        DataPrepError: unreadable or truncated file, or not a 3D scalar image.
    """
    import SimpleITK as sitk

    path = Path(path)
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise DataPrepError(f"{path}: cannot be read as NIfTI ({str(exc).strip().splitlines()[-1] if str(exc).strip() else exc}). "
                            f"The file is damaged or truncated; re-export it.", str(path)) from exc
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        raise DataPrepError(f"{path}: expected a 3D single-channel volume, got {img.GetDimension()}D with "
                            f"{img.GetNumberOfComponentsPerPixel()} component(s).", str(path))
    arr = sitk.GetArrayFromImage(img).astype(np.float32)
    return Volume(array=arr, spacing=tuple(float(s) for s in img.GetSpacing()[::-1]),  # type: ignore[arg-type]
                  origin=tuple(float(v) for v in img.GetOrigin()),  # type: ignore[arg-type]
                  direction=np.asarray(img.GetDirection(), float).reshape(3, 3))
