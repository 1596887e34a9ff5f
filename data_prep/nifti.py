"""NIfTI volumes (.nii, .nii.gz) read into the same `Volume` as a DICOM series.

Reader: MONAI's `LoadImaged(reader="NibabelReader")` for NIfTI-1 and NIfTI-2 alike (nibabel
through MONAI, the field's usual route; SimpleITK's reader here had no NIfTI-2 support).

Axis and orientation conventions: NIfTI stores an affine from voxel (i, j, k) to RAS+ world
millimetres (nibabel: the sform when set, else the qform); DICOM uses LPS+. `load_nifti`
converts the affine to LPS by negating the first two world axes, as ITK does, and returns the
array as [k, j, i] = [z, y, x]. So after
`load_nifti`, `origin`/`direction` are in the same LPS world as `load_series`, the array index
order is the same [z, y, x], and `center_x/y/z_mm` in a labels CSV mean LPS millimetres for both
inputs (convert RAS coordinates from other tools by negating x and y). Voxel centres
`center_i/j/k` are the NIfTI file's own i, j, k.

Values are taken as HU as stored (scl_slope/scl_inter applied by the reader).
"""
from __future__ import annotations

import functools
import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from .dicom import Volume
from .errors import DataPrepError

__all__ = ["load_nifti", "nifti_stem", "nifti_grid", "NIFTI_SUFFIXES"]

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

    Why: a reader may accept a truncated file (ITK warned on stderr, naming the file, and filled
    the missing voxels with zeros), so a cut download could silently become a volume of air; and
    this check's one-line error names the byte counts. The header gives the data offset, the
    dimensions and the bits per voxel; the file (the decompressed stream for .nii.gz) must hold at
    least that many bytes. A header this function cannot parse is left to the reader's own error.
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


def nifti_grid(path: str | Path) -> Volume:
    """The voxel grid of a NIfTI-1 or NIfTI-2 file from its header alone (nibabel), in our LPS conventions.

    The array is a zero-strided stand-in of the right shape [k, j, i]. Same header, same affine
    (sform if set, else qform) as `load_nifti`'s reader, so centres checked here land where the
    pixels are read.
    """
    import nibabel as nib

    path = Path(path)
    try:
        img = nib.load(str(path))
        shape = tuple(int(v) for v in img.shape)
        affine = np.asarray(img.affine, float)
    except Exception as exc:  # nibabel raises many types for a damaged file
        raise DataPrepError(f"{path}: the NIfTI header cannot be read ({type(exc).__name__}: {exc}). The file is damaged "
                            f"or not NIfTI; re-export it.", str(path)) from None
    if len(shape) != 3:
        raise DataPrepError(f"{path}: expected a 3D single-channel volume, got shape {shape}.", str(path))
    lps = np.diag([-1.0, -1.0, 1.0]) @ affine[:3, :4]
    spacing_ijk = np.linalg.norm(lps[:, :3], axis=0)
    if np.any(spacing_ijk <= 0):
        raise DataPrepError(f"{path}: the NIfTI affine has a zero-length axis; the voxel grid is undefined.", str(path))
    return Volume(array=np.broadcast_to(np.float32(0), shape[::-1]), spacing=tuple(float(v) for v in spacing_ijk[::-1]),  # type: ignore[arg-type]
                  origin=tuple(float(v) for v in lps[:, 3]),  # type: ignore[arg-type]
                  direction=lps[:, :3] / spacing_ijk)


@functools.lru_cache(maxsize=1)
def _loader():
    """MONAI's LoadImaged with the NibabelReader, built once per process.

    Why once and quietly: LoadImage instantiates every default reader as a fallback, and the
    GPU DICOM reader among them logs and warns "nvImageCodec is not available" on each
    construction, on every machine without it, although no DICOM is read through MONAI here.
    """
    import logging
    import warnings

    from monai.transforms import LoadImaged

    plugin_log = logging.getLogger("monai.data.nvimgcodec_pydicom_plugin")
    level = plugin_log.level
    plugin_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*nvImageCodec.*")
            return LoadImaged(keys="image", reader="NibabelReader", image_only=True, ensure_channel_first=True,
                              dtype=np.float32)
    finally:
        plugin_log.setLevel(level)


def load_nifti(path: str | Path) -> Volume:
    """Read a 3D NIfTI-1 or NIfTI-2 file as a Volume (float32 [z, y, x], LPS origin/direction).

    Read by MONAI's `LoadImaged(reader="NibabelReader")`: the MetaTensor's RAS affine is turned
    into our LPS origin/direction by `ct_transforms.from_monai`.

    Raises:
        DataPrepError: unreadable or truncated file, or not a 3D scalar image.
    """
    from .ct_transforms import from_monai

    path = Path(path)
    _check_complete(path)
    try:
        data = _loader()({"image": str(path)})
    except Exception as exc:  # noqa: BLE001 - MONAI wraps nibabel's many error types
        text = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise DataPrepError(f"{path}: cannot be read as NIfTI ({text}). The file is damaged or truncated; re-export it.",
                            str(path)) from None
    img = data["image"]
    if img.ndim != 4 or img.shape[0] != 1:
        raise DataPrepError(f"{path}: expected a 3D single-channel volume, got shape {tuple(img.shape[1:])} with "
                            f"{img.shape[0]} channel(s).", str(path))
    return from_monai({"image": img})
