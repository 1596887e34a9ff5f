"""From an isotropic CT cube to 2D network inputs: HU windows, lung sampling, plane choice.

Orientation, isotropic resampling and lesion crops are MONAI dictionary transforms
(`ct_transforms`, which calls into this module for the planes). Why isotropic first: crops are
specified in millimetres and planes are taken along three axes (`orthogonal`), so one voxel must
mean the same distance everywhere.

Channel modes (each image is uint8 [S, S, 3], S = ct_image_size):

* ``windows``: one axial slice under three windows: lung [-1000, 400], mediastinal [-160, 240]
  and wide [-1000, 1000] HU. Gives the network density bands a radiologist switches between.
* ``adjacent``: the slice and its two neighbours (one isotropic voxel apart) under the lung window,
  a cheap 2.5D input.
* ``orthogonal``: axial, coronal and sagittal planes through the point, lung window. Coronal and
  sagittal planes are flipped so that the +k axis (superior: the decode orients every volume to
  L, P, S axes first) is up.

Offsets: `slices_per_lesion` planes are taken at offsets (voxels) through the lesion; for
`orthogonal`, offset o moves the point along k, j and i at once, so each of the three planes moves.
"""
from __future__ import annotations

import numpy as np

from .dicom import Volume
from .errors import DataPrepError

__all__ = ["WINDOWS", "CHANNEL_MODES", "AIR_HU", "apply_window", "lung_mask", "lung_sample_points", "slice_offsets", "plane_stack", "planes_2d", "cube_size"]

AIR_HU = -1000.0
WINDOWS: dict[str, tuple[float, float]] = {"lung": (-1000.0, 400.0), "mediastinal": (-160.0, 240.0), "wide": (-1000.0, 1000.0)}
CHANNEL_MODES = ("windows", "adjacent", "orthogonal")


def apply_window(hu: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Map HU in [lo, hi] linearly to 0..255 (clipped), as uint8."""
    lo, hi = window
    return np.rint(np.clip((np.asarray(hu, np.float32) - lo) / (hi - lo), 0.0, 1.0) * 255.0).astype(np.uint8)


def cube_size(crop_mm: float, spacing_mm: float) -> int:
    """Odd number of voxels spanning about crop_mm, so the centre voxel sits on the centre point."""
    return 2 * max(1, int(round(crop_mm / spacing_mm / 2))) + 1


def lung_mask(hu: np.ndarray, threshold: float = -400.0) -> np.ndarray:
    """Threshold-based lung mask [z, y, x]: low-density regions not connected to the air outside.

    Air around the patient touches the in-plane border of every slice; lungs do not. Components
    smaller than 0.1 % of the volume (bowel gas, noise) are dropped.
    """
    from scipy import ndimage

    low = hu < threshold
    labels, n = ndimage.label(low)
    if n == 0:
        return low
    border = np.zeros_like(low)
    border[:, 0, :] = border[:, -1, :] = border[:, :, 0] = border[:, :, -1] = True
    outside = np.unique(labels[border & low])
    sizes = ndimage.sum_labels(np.ones_like(labels), labels, index=np.arange(n + 1))
    keep = (sizes >= 0.001 * low.size)
    keep[0] = False
    keep[outside] = False
    return keep[labels]


def lung_sample_points(volume: Volume, n: int) -> list[tuple[int, int, int]]:
    """n (k, j, i) points inside the lungs, on evenly spaced axial slices of the well-aerated range.

    Slices whose lung area is at least half the largest are eligible; on each chosen slice the
    point deepest inside the lung (largest distance to its edge) is taken, so the crop shows lung.

    Raises:
        DataPrepError: no lung found by the threshold (not a chest CT, or a wrong rescale).
    """
    from scipy import ndimage

    mask = lung_mask(volume.array)
    area = mask.sum(axis=(1, 2))
    if area.max() == 0:
        raise DataPrepError("no lung found (no region below -400 HU enclosed by the body); is this a chest CT in HU?")
    eligible = np.flatnonzero(area >= 0.5 * area.max())
    ks = eligible[np.rint(np.linspace(0, len(eligible) - 1, n)).astype(int)] if n > 1 else eligible[[len(eligible) // 2]]
    points = []
    for k in ks:
        dist = ndimage.distance_transform_edt(mask[k])
        j, i = np.unravel_index(int(np.argmax(dist)), dist.shape)
        points.append((int(k), int(j), int(i)))
    return points


def slice_offsets(n: int, diameter_mm: float | None, spacing_mm: float, max_offset: int) -> list[int]:
    """n plane offsets (voxels) spread over the middle half of a lesion, at least one voxel apart."""
    if n <= 1:
        return [0]
    step = 1.0
    if diameter_mm and diameter_mm > 0:
        step = max(1.0, (diameter_mm / 2) / spacing_mm / max(n - 1, 1))
    offsets = [int(round((k - (n - 1) / 2) * step)) for k in range(n)]
    return [int(np.clip(o, -max_offset, max_offset)) for o in offsets]


def _resize(plane: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    if plane.shape == (size, size):
        return plane.astype(np.float32)
    img = Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32), mode="F")
    return np.asarray(img.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)


def plane_stack(cube: np.ndarray, offset: int, channels: str, size: int) -> np.ndarray:
    """The HU planes behind one network input, resized to `size`: float32 [C, S, S].

    C = 1 for "windows" (one axial plane, windowed three ways later), 3 otherwise (see the
    module docstring for which planes). `planes_2d` windows them; the MONAI decode
    (`ct_transforms.window`) does the same with ScaleIntensityRanged.
    """
    n = cube.shape[0]
    c = n // 2
    o = int(np.clip(c + offset, 0, n - 1))
    if channels == "windows":
        planes = [cube[o]]
    elif channels == "adjacent":
        planes = [cube[int(np.clip(o + d, 0, n - 1))] for d in (-1, 0, 1)]
    elif channels == "orthogonal":
        planes = [cube[o], cube[:, o, :][::-1], cube[:, :, o][::-1]]
    else:
        raise ValueError(f"channels must be one of {CHANNEL_MODES}, got {channels!r}")
    return np.stack([_resize(p, size) for p in planes])


def planes_2d(cube: np.ndarray, offset: int, channels: str, size: int) -> np.ndarray:
    """One network input from an HU cube [n, n, n] centred on the point of interest.

    Args:
        cube: float32 HU, odd n, centre voxel at n // 2.
        offset: plane offset in voxels from the centre (see module docstring).
        channels: "windows", "adjacent" or "orthogonal".
        size: output side S.

    Returns:
        uint8 [S, S, 3].
    """
    planes = plane_stack(cube, offset, channels, size)
    if channels == "windows":
        chans = [apply_window(planes[0], WINDOWS[w]) for w in ("lung", "mediastinal", "wide")]
    else:
        chans = [apply_window(p, WINDOWS["lung"]) for p in planes]
    return np.stack(chans, axis=-1)
