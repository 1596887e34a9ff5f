"""The CT decode as MONAI dictionary transforms: orientation, isotropic spacing, lesion crops, HU windows.

Why MONAI: it is the field's standard for medical-image geometry; `Orientationd` and `Spacingd`
carry the voxel-to-world affine with the pixels (a `MetaTensor`), so the crop centre is found
from the same affine that resampled the volume, and readers and transforms agree on world space.

Pipeline for one volume (`decode_ct`):

1. `to_monai`: our `Volume` (float32 [z, y, x], LPS origin/direction, as read by `dicom` or
   `nifti`) becomes {"image": MetaTensor [1, i, j, k]} with MONAI's RAS affine (the first two
   world axes negated, as ITK and MONAI's own readers do).
2. `resample_transforms`: `Orientationd(axcodes="LPS")` flips/permutes the axes so that i runs
   to the patient's left, j posterior and k superior (the usual axial DICOM layout, a no-op for
   it), then `Spacingd` to cubic `spacing_mm` voxels, trilinear, border values outside.
   Orienting first means a NIfTI volume stored RAS and the DICOM series it came from give the
   same crops; before, planes were taken along whatever index axes the file had.
3. `crop_transforms`: `SpatialCropd` of the n^3 cube around the rounded centre index, clipped to
   the volume, then `BorderPadd` with air (-1000 HU) on exactly the sides that were clipped, so
   the centre voxel stays at n // 2 (no whole-volume padding copy).
4. `planes` (`ct.planes_2d`'s plane choice and PIL bilinear resize, in HU) then
   `window_transforms`: one `ScaleIntensityRanged` per window (lung, mediastinal, wide) mapping
   [lo, hi] HU to 0..255 with clipping, rounded to uint8.

Measured against the former SimpleITK path (tests/data_prep/test_ct_transforms.py; numbers in
docs/architecture.md, "CT decode (MONAI)"): the same grid (`IsotropicSpacingd`) and the same
voxels within float32 rounding (< 0.01 HU), uint8 images within 1 grey level (a rounding tie).

DICOM stays read by `dicom.read_series_volume` (pydicom): MONAI's PydicomReader stacks slices
without our geometry checks (gaps, tilt, mixed sizes), per-slice rescale and identifier-free
errors. NIfTI is read by MONAI's `LoadImaged(reader="NibabelReader")` (`nifti.load_nifti`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .ct import AIR_HU, WINDOWS, cube_size, lung_sample_points, plane_stack, slice_offsets
from .dicom import Volume
from .errors import DataPrepError

__all__ = ["CT_DECODE_VERSION", "AXCODES", "LesionSpec", "to_monai", "from_monai", "resample_transforms",
           "resample", "crop_transforms", "crop", "lesion_crop", "window_transforms", "window", "decode_ct"]

# Part of the CT cache build key: bump when the decode's pixels change, so old caches are rebuilt.
# 1: SimpleITK resample + numpy crop (up to this module); 2: MONAI Orientationd/Spacingd/SpatialCropd.
CT_DECODE_VERSION = 2
AXCODES = "LPS"
_LPS_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class LesionSpec:
    """What to cut around one lesion: its world centre (LPS mm) or None (sample lung), its diameter."""

    centre_world: tuple[float, float, float] | None
    diameter_mm: float | None = None


def to_monai(volume: Volume) -> dict[str, Any]:
    """{"image": MetaTensor [1, i, j, k]} with the RAS affine of `volume` (LPS in our Volume)."""
    import torch
    from monai.data import MetaTensor

    sz, sy, sx = (float(v) for v in volume.spacing)
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(volume.direction, float) @ np.diag([sx, sy, sz])
    lps[:3, 3] = np.asarray(volume.origin, float)
    arr = np.ascontiguousarray(np.asarray(volume.array, np.float32).transpose(2, 1, 0))[None]
    return {"image": MetaTensor(torch.from_numpy(arr), affine=torch.as_tensor(_LPS_RAS @ lps, dtype=torch.float64),
                                meta={"space": "RAS"})}


def from_monai(data: dict[str, Any]) -> Volume:
    """The inverse of `to_monai`: float32 [z, y, x] with LPS origin and direction."""
    img = data["image"]
    lps = _LPS_RAS @ np.asarray(img.affine, float)
    spacing_ijk = np.linalg.norm(lps[:3, :3], axis=0)
    arr = np.asarray(img.array if hasattr(img, "array") else img, np.float32)[0].transpose(2, 1, 0)
    return Volume(array=arr, spacing=tuple(float(v) for v in spacing_ijk[::-1]),  # type: ignore[arg-type]
                  origin=tuple(float(v) for v in lps[:3, 3]),  # type: ignore[arg-type]
                  direction=lps[:3, :3] / spacing_ijk)


class IsotropicSpacingd:
    """Spacingd to cubic `spacing_mm` voxels on the grid the former SimpleITK path used.

    Why not plain `Spacingd`: it rounds the extent, so an axis can gain a voxel beyond the last
    input voxel centre, filled with border values; the former grid floored it (size =
    floor((n - 1) * old / new) + 1 per axis) and crops past it were air. MONAI's `Spacing` is
    called with that `output_spatial_shape`, so the voxels and the crops' air padding match.
    """

    def __init__(self, keys: str, spacing_mm: float):
        from monai.transforms import Spacing

        self.keys = keys
        self.spacing_mm = float(spacing_mm)
        self.spacing = Spacing(pixdim=(self.spacing_mm,) * 3, mode="bilinear", padding_mode="border", dtype=np.float32)

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        d = dict(data)
        img = d[self.keys]
        old = np.linalg.norm(np.asarray(img.affine, float)[:3, :3], axis=0)
        shape = [int(np.floor((n - 1) * s / self.spacing_mm + 1e-6)) + 1 for n, s in zip(img.shape[1:], old)]
        d[self.keys] = self.spacing(img, output_spatial_shape=shape)
        return d


def resample_transforms(spacing_mm: float, axcodes: str = AXCODES):
    """Orientationd to `axcodes` (RAS labels), then isotropic `spacing_mm` voxels (trilinear)."""
    from monai.transforms import Compose, Orientationd

    if not spacing_mm > 0:
        raise ValueError(f"spacing_mm must be positive, got {spacing_mm}")
    return Compose([Orientationd(keys="image", axcodes=axcodes, labels=(("L", "R"), ("P", "A"), ("I", "S"))),
                    IsotropicSpacingd("image", spacing_mm)])


def resample(volume: Volume, spacing_mm: float) -> Volume:
    """`volume` oriented to LPS axes and resampled to cubic `spacing_mm` voxels."""
    return from_monai(resample_transforms(spacing_mm)(to_monai(volume)))


def crop_transforms(centre_ijk: Sequence[int], n: int, shape_ijk: Sequence[int]):
    """SpatialCropd of the n^3 cube centred on an integer (i, j, k) index, padded with air where it leaves the volume."""
    from monai.transforms import BorderPadd, Compose, SpatialCropd

    half = n // 2
    start, end, border = [], [], []
    for c, size in zip(centre_ijk, shape_ijk):
        lo, hi = int(c) - half, int(c) - half + n
        s0, s1 = max(lo, 0), min(hi, size)
        if s1 <= s0:
            raise ValueError(f"the cube around index {tuple(centre_ijk)} misses the volume {tuple(shape_ijk)}")
        start.append(s0)
        end.append(s1)
        border.extend([s0 - lo, hi - s1])
    return Compose([SpatialCropd(keys="image", roi_start=start, roi_end=end),
                    BorderPadd(keys="image", spatial_border=border, mode="constant", value=AIR_HU)])


def crop(iso: dict[str, Any], centre_kji: Sequence[int], n: int) -> np.ndarray:
    """The n^3 cube float32 [z, y, x] (HU) of a resampled volume around an integer (k, j, i) index."""
    img = iso["image"]
    shape_ijk = tuple(int(v) for v in img.shape[1:])
    centre_ijk = tuple(int(v) for v in centre_kji[::-1])
    half = n // 2
    if any(c - half + n <= 0 or c - half >= size for c, size in zip(centre_ijk, shape_ijk)):
        return np.full((n, n, n), AIR_HU, np.float32)  # nothing of the volume inside: all air
    out = crop_transforms(centre_ijk, n, shape_ijk)({"image": img})["image"]
    cube = np.asarray(out.array if hasattr(out, "array") else out, np.float32)[0].transpose(2, 1, 0)
    assert cube.shape == (n, n, n), cube.shape
    return np.ascontiguousarray(cube)


def lesion_crop(iso: dict[str, Any], centre_xyz: Sequence[float], crop_mm: float, spacing_mm: float,
                name: str) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Cube of crop_mm around a world (LPS mm) point, and its rounded (k, j, i) centre index.

    Raises:
        DataPrepError: the centre lies outside the volume (named by `name`).
    """
    img = iso["image"]
    ras = _LPS_RAS[:3, :3] @ np.asarray(centre_xyz, float)
    ijk = np.linalg.solve(np.asarray(img.affine, float), np.append(ras, 1.0))[:3]
    shape_ijk = np.asarray(img.shape[1:])
    kji = ijk[::-1]
    shape_kji = shape_ijk[::-1]
    # one voxel of slack: the isotropic grid may end up to one voxel short of the original extent
    if np.any(kji < -1.0) or np.any(kji > shape_kji - 1 + 1.0):
        raise DataPrepError(
            f"{name}: lesion centre ({', '.join(f'{v:.1f}' for v in centre_xyz)}) mm lies outside the volume "
            f"(voxel index k,j,i = {', '.join(f'{v:.1f}' for v in kji)}; shape {tuple(int(v) for v in shape_kji)}). "
            f"Check the centre columns of the labels CSV: world coordinates in mm (DICOM patient/LPS) or center_i/j/k "
            f"voxel indices.")
    centre = tuple(int(v) for v in np.clip(np.rint(kji), 0, shape_kji - 1))
    n = cube_size(crop_mm, spacing_mm)
    return crop(iso, centre, n), centre  # type: ignore[return-value]


def window_transforms(names: Sequence[str]):
    """One ScaleIntensityRanged per window name (key = name): [lo, hi] HU -> 0..255, clipped."""
    from monai.transforms import Compose, ScaleIntensityRanged

    return Compose([ScaleIntensityRanged(keys=name, a_min=WINDOWS[name][0], a_max=WINDOWS[name][1], b_min=0.0,
                                         b_max=255.0, clip=True, dtype=np.float32) for name in names])


def window(planes_hu: np.ndarray, channels: str) -> np.ndarray:
    """uint8 [S, S, 3] from HU planes [C, S, S]: three windows of one plane ("windows") or the lung window of three."""
    names = ("lung", "mediastinal", "wide") if channels == "windows" else ("lung",)
    data = {name: planes_hu for name in names}
    out = window_transforms(names)(data)
    chans = [np.asarray(out[name], np.float32) for name in names]
    stack = np.concatenate(chans, axis=0) if channels == "windows" else chans[0]
    return np.rint(stack).astype(np.uint8).transpose(1, 2, 0).copy()


def decode_ct(volume: Volume, lesions: Sequence[LesionSpec], spacing_mm: float, crop_mm: float, channels: str,
              slices_per_lesion: int, size: int, name: str, path: str | None = None) -> list[np.ndarray]:
    """Every uint8 [size, size, 3] image of one volume: `slices_per_lesion` per lesion, in lesion order.

    A lesion without centre samples lung slices (`ct.lung_sample_points`) instead.

    Raises:
        DataPrepError: a centre outside the volume, or no lung found (with `path`); named by `name`.
    """
    iso = resample_transforms(spacing_mm)(to_monai(volume))
    n = cube_size(crop_mm, spacing_mm)
    out: list[np.ndarray] = []
    lung_points: list[tuple[int, int, int]] | None = None
    for les in lesions:
        if les.centre_world is not None:
            cube, _ = lesion_crop(iso, les.centre_world, crop_mm, spacing_mm, name)
            offsets = slice_offsets(slices_per_lesion, les.diameter_mm, spacing_mm, n // 2)
            out.extend(window(plane_stack(cube, o, channels, size), channels) for o in offsets)
        else:
            if lung_points is None:
                try:
                    lung_points = lung_sample_points(from_monai(iso), slices_per_lesion)
                except DataPrepError as err:
                    raise DataPrepError(f"{name}: {err}", path) from None
            out.extend(window(plane_stack(crop(iso, p, n), 0, channels, size), channels) for p in lung_points)
    return out
