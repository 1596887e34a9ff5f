"""HU windows, lung sampling, slice offsets and 2D channel modes (resampling and crops: test_ct_transforms.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from data_prep.ct import WINDOWS, apply_window, lung_mask, lung_sample_points, plane_stack, planes_2d, slice_offsets
from data_prep.ct_transforms import lesion_crop, resample, resample_transforms, to_monai
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
        out.append((row, vol, resample(vol, 1.0)))
    return out


def test_world_to_index_inverts_index_to_world():
    vol = Volume(array=np.zeros((4, 5, 6), np.float32), spacing=(2.0, 0.5, 0.25), origin=(1.0, 2.0, 3.0),
                 direction=np.array([[0, 1.0, 0], [1.0, 0, 0], [0, 0, 1]]))
    assert vol.index_to_world((1, 2, 4)) == pytest.approx([1.0 + 1.0, 2.0 + 1.0, 3.0 + 2.0])
    assert vol.world_to_index([2.0, 3.0, 5.0]) == pytest.approx([1, 2, 4])


def test_apply_window_maps_bounds():
    lo, hi = WINDOWS["lung"]
    out = apply_window(np.array([lo - 100, lo, (lo + hi) / 2, hi, hi + 5]), (lo, hi))
    assert out.dtype == np.uint8 and out.tolist() == [0, 0, 128, 255, 255]


@pytest.mark.parametrize("mode", ["windows", "adjacent", "orthogonal"])
def test_planes_2d_shape_and_dtype(volumes, mode):
    row, vol, _ = volumes[0]
    cube, _ = lesion_crop(resample_transforms(1.0)(to_monai(vol)), (row.center_x_mm, row.center_y_mm, row.center_z_mm), 48.0, 1.0, "case")
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
    assert plane_stack(cube, 1, "windows", 9).shape == (1, 9, 9) and plane_stack(cube, 0, "orthogonal", 9).shape == (3, 9, 9)


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
