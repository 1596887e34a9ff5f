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

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from .dicom import Volume
from .errors import DataPrepError

__all__ = ["load_nifti", "nifti_stem", "nifti2_volume", "is_nifti2", "NIFTI_SUFFIXES"]

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def nifti_stem(path: str | Path) -> str:
    """File name without .nii or .nii.gz: the key that labels CSV rows use for NIfTI inputs."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def _check_complete(path: Path) -> None:
    """Refuse a NIfTI file shorter than its header promises.

    Why: ITK reads a truncated file without an error (it warns on stderr, naming the file, and
    fills the missing voxels with zeros), so a cut download would silently become a volume of
    air. The header gives the data offset, the dimensions and the bits per voxel; the file (the
    decompressed stream for .nii.gz) must hold at least that many bytes. A header this function
    cannot parse is left to the reader's own error.
    """
    gz = path.name.lower().endswith(".gz")
    try:
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as fh:
            head = fh.read(540)
            have = len(head)
            if gz:
                while block := fh.read(1 << 20):
                    have += len(block)
    except (EOFError, OSError, zlib.error) as exc:
        raise DataPrepError(f"{path}: the file is truncated or damaged ({type(exc).__name__}: {exc}). Re-export or re-copy it.",
                            str(path)) from None
    if not gz:
        have = os.path.getsize(path)
    for endian in ("<", ">"):
        if len(head) >= 4 and struct.unpack(endian + "i", head[:4])[0] in (348, 540):
            break
    else:
        return
    try:
        if struct.unpack(endian + "i", head[:4])[0] == 348:
            dims = struct.unpack(endian + "8h", head[40:56])
            bitpix = struct.unpack(endian + "h", head[72:74])[0]
            offset = int(struct.unpack(endian + "f", head[108:112])[0])
        else:  # NIfTI-2
            bitpix = struct.unpack(endian + "h", head[14:16])[0]
            dims = struct.unpack(endian + "8q", head[16:80])
            offset = int(struct.unpack(endian + "q", head[168:176])[0])
    except struct.error:
        return
    if not 1 <= dims[0] <= 7 or bitpix <= 0:
        return
    n = int(np.prod([max(1, int(d)) for d in dims[1:dims[0] + 1]], dtype=np.int64))
    need = max(offset, 348) + n * bitpix // 8
    if have < need:
        raise DataPrepError(f"{path}: the file is truncated: its header promises {need} bytes of image data and header, "
                            f"{'the decompressed file has' if gz else 'the file has'} {have}. Re-export or re-copy it.", str(path))


def is_nifti2(path: str | Path) -> bool:
    """True for a NIfTI-2 file (sizeof_hdr 540), plain or gzipped."""
    path = Path(path)
    try:
        with (gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")) as fh:
            head = fh.read(4)
    except (OSError, EOFError, zlib.error):
        return False
    return len(head) == 4 and 540 in (struct.unpack("<i", head)[0], struct.unpack(">i", head)[0])


def nifti2_volume(path: str | Path, pixels: bool = True) -> Volume:
    """A NIfTI-2 file read with nibabel (this SimpleITK build has no NIfTI-2 reader), in ITK's conventions.

    nibabel's affine maps (i, j, k) to RAS+ mm; ITK's LPS origin and direction negate its first two
    rows, spacing is the length of each column, and the array is transposed to [k, j, i].
    With `pixels=False` the array is a zero-strided stand-in of the right shape (headers only).
    """
    import nibabel as nib

    path = Path(path)
    try:
        img = nib.load(str(path))
        shape = tuple(int(v) for v in img.shape)
        if len(shape) != 3:
            raise DataPrepError(f"{path}: expected a 3D single-channel volume, got shape {shape}.", str(path))
        affine = np.asarray(img.affine, float)
        arr = (np.asarray(img.get_fdata(dtype=np.float32)).transpose(2, 1, 0).copy() if pixels
               else np.broadcast_to(np.float32(0), shape[::-1]))
    except DataPrepError:
        raise
    except Exception as exc:  # nibabel raises many types for a damaged file
        raise DataPrepError(f"{path}: cannot be read as NIfTI-2 ({type(exc).__name__}: {exc}). The file is damaged or "
                            f"truncated; re-export it.", str(path)) from None
    lps = np.diag([-1.0, -1.0, 1.0]) @ affine[:3, :4]
    spacing_ijk = np.linalg.norm(lps[:, :3], axis=0)
    if np.any(spacing_ijk <= 0):
        raise DataPrepError(f"{path}: the NIfTI-2 affine has a zero-length axis; the voxel grid is undefined.", str(path))
    return Volume(array=arr, spacing=tuple(float(v) for v in spacing_ijk[::-1]),  # type: ignore[arg-type]
                  origin=tuple(float(v) for v in lps[:, 3]),  # type: ignore[arg-type]
                  direction=lps[:, :3] / spacing_ijk)


def load_nifti(path: str | Path) -> Volume:
    """Read a 3D NIfTI file as a Volume (float32 [z, y, x], LPS origin/direction).

    Raises:
        DataPrepError: unreadable or truncated file, or not a 3D scalar image.
    """
    import SimpleITK as sitk

    path = Path(path)
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # ITK's warnings quote the file path; faults raise here instead
    _check_complete(path)
    if is_nifti2(path):
        return nifti2_volume(path)
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
