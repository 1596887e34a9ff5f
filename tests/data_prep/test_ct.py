"""Resampling, world/voxel conversion, lesion cubes, lung sampling and 2D channel modes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from data_prep.ct import (WINDOWS, apply_window, crop_cube, cube_size, lesion_cube, lung_mask, lung_sample_points,
                          planes_2d, resample_isotropic, slice_offsets)
from data_prep.dicom import Volume, load_series
from data_prep.errors import DataPrepError
from data_prep.synthetic.ct import generate_ct


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return generate_ct(tmp_path_factory.mktemp("ct_ops"), n_patients=8, seed=11, slices=24, size=64, extras=False)


@pytest.fixture(scope="module")
def volumes(cohort):
    labels = pd.read_csv(cohort["labels"])
    out = []
    for i, row in labels.iterrows():
        vol = load_series(cohort["images"] / f"case_{i:03d}")
        out.append((row, vol, resample_isotropic(vol, 1.0)))
    return out


def test_resample_isotropic_keeps_world_coordinates():
    # a field linear in world coordinates is reproduced exactly by linear interpolation
    direction = np.array([[-1.0, 0, 0], [0, 1, 0], [0, 0, -1]])  # flipped x and z axes
    vol = Volume(array=np.zeros((10, 12, 14), np.float32), spacing=(2.5, 0.7, 0.8), origin=(30.0, -20.0, 100.0), direction=direction)
    kk, jj, ii = np.meshgrid(*[np.arange(n) for n in vol.shape], indexing="ij")
    world = np.asarray(vol.origin)[:, None] + direction @ np.stack([ii.ravel() * 0.8, jj.ravel() * 0.7, kk.ravel() * 2.5])
    vol.array[...] = (world[0] + 2 * world[1] + 3 * world[2]).reshape(vol.shape)
    iso = resample_isotropic(vol, 1.0)
    assert iso.spacing == (1.0, 1.0, 1.0) and iso.origin == vol.origin
    assert iso.shape == (23, 8, 11)  # floor((n - 1) * old / new) + 1
    for kji in [(0, 0, 0), (5, 3, 7), (22, 7, 10)]:
        x, y, z = iso.index_to_world(kji)
        assert iso.array[kji] == pytest.approx(x + 2 * y + 3 * z, abs=1e-3)


def test_world_to_index_inverts_index_to_world():
    vol = Volume(array=np.zeros((4, 5, 6), np.float32), spacing=(2.0, 0.5, 0.25), origin=(1.0, 2.0, 3.0),
                 direction=np.array([[0, 1.0, 0], [1.0, 0, 0], [0, 0, 1]]))
    assert vol.index_to_world((1, 2, 4)) == pytest.approx([1.0 + 1.0, 2.0 + 1.0, 3.0 + 2.0])
    assert vol.world_to_index([2.0, 3.0, 5.0]) == pytest.approx([1, 2, 4])


def test_lesion_cube_centre_voxel_is_the_nodule(volumes):
    for row, vol, iso in volumes:
        cube, centre = lesion_cube(iso, (row.center_x_mm, row.center_y_mm, row.center_z_mm), 32.0, "case")
        n = cube_size(32.0, 1.0)
        assert cube.shape == (n, n, n) == (33, 33, 33)
        c = n // 2
        assert cube[c, c, c] == iso.array[centre]
        expected = iso.world_to_index((row.center_x_mm, row.center_y_mm, row.center_z_mm))
        assert np.abs(np.asarray(centre) - expected).max() <= 0.5 + 1e-9
        hu = float(cube[c - 1:c + 2, c - 1:c + 2, c - 1:c + 2].mean())  # 3 mm neighbourhood, beats the noise
        lo, hi = {"solid": (-150, 150), "part_solid": (-250, 150), "ground_glass": (-750, -420), "calcified_benign": (250, 1000)}[row.label]
        assert lo < hu < hi, (row.label, hu)


def test_lesion_cube_outside_volume_names_series(volumes):
    row, vol, iso = volumes[0]
    with pytest.raises(DataPrepError, match=r"series S-123: lesion centre \(.*\) mm lies outside the volume"):
        lesion_cube(iso, (row.center_x_mm, row.center_y_mm, row.center_z_mm + 500.0), 32.0, "series S-123")


def test_crop_cube_pads_with_air_outside():
    arr = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    cube = crop_cube(arr, (0, 0, 0), 5)
    assert cube[2, 2, 2] == arr[0, 0, 0]
    np.testing.assert_array_equal(cube[2:, 2:, 2:], arr[:3, :3, :3])
    assert (cube[:2] == -1000).all() and (cube[:, :2] == -1000).all()
    assert (crop_cube(arr, (50, 50, 50), 3) == -1000).all()


def test_apply_window_maps_bounds():
    lo, hi = WINDOWS["lung"]
    out = apply_window(np.array([lo - 100, lo, (lo + hi) / 2, hi, hi + 5]), (lo, hi))
    assert out.dtype == np.uint8 and out.tolist() == [0, 0, 128, 255, 255]


@pytest.mark.parametrize("mode", ["windows", "adjacent", "orthogonal"])
def test_planes_2d_shape_and_dtype(volumes, mode):
    row, _, iso = volumes[0]
    cube, _ = lesion_cube(iso, (row.center_x_mm, row.center_y_mm, row.center_z_mm), 48.0, "case")
    img = planes_2d(cube, 0, mode, 40)
    assert img.shape == (40, 40, 3) and img.dtype == np.uint8
    assert img.std() > 5  # not blank


def test_planes_2d_channels_are_the_documented_planes():
    rng = np.random.default_rng(0)
    cube = rng.uniform(-1100, 1100, size=(9, 9, 9)).astype(np.float32)
    win = planes_2d(cube, 1, "windows", 9)
    for ch, name in enumerate(("lung", "mediastinal", "wide")):
        np.testing.assert_array_equal(win[..., ch], apply_window(cube[5], WINDOWS[name]))
    adj = planes_2d(cube, 0, "adjacent", 9)
    for ch, k in enumerate((3, 4, 5)):
        np.testing.assert_array_equal(adj[..., ch], apply_window(cube[k], WINDOWS["lung"]))
    ortho = planes_2d(cube, 0, "orthogonal", 9)
    np.testing.assert_array_equal(ortho[..., 0], apply_window(cube[4], WINDOWS["lung"]))
    np.testing.assert_array_equal(ortho[..., 1], apply_window(cube[::-1, 4, :], WINDOWS["lung"]))
    np.testing.assert_array_equal(ortho[..., 2], apply_window(cube[::-1, :, 4], WINDOWS["lung"]))
    with pytest.raises(ValueError, match="channels must be one of"):
        planes_2d(cube, 0, "rgb", 9)


def test_lung_mask_and_samples_inside_lungs(volumes):
    _, _, iso = volumes[1]
    mask = lung_mask(iso.array)
    assert mask.any()
    assert not mask[:, 0, :].any() and not mask[:, :, 0].any()  # outside air excluded
    assert float(np.median(iso.array[mask])) < -700
    points = lung_sample_points(iso, 3)
    assert len(points) == 3 and len({p[0] for p in points}) == 3
    assert all(mask[p] for p in points)


def test_lung_sample_points_without_lung_raise():
    vol = Volume(array=np.full((5, 20, 20), 40.0, np.float32), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0))
    with pytest.raises(DataPrepError, match="no lung found"):
        lung_sample_points(vol, 2)


def test_slice_offsets_spread_over_lesion():
    assert slice_offsets(1, 10.0, 1.0, 20) == [0]
    assert slice_offsets(3, None, 1.0, 20) == [-1, 0, 1]
    assert slice_offsets(3, 12.0, 1.0, 20) == [-3, 0, 3]
    assert slice_offsets(5, 40.0, 1.0, 4) == [-4, -4, 0, 4, 4]
