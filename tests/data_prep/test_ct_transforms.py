"""The MONAI CT decode, checked against the former SimpleITK path and against hand computations.

Tolerances (why these numbers):
- HU: both paths interpolate trilinearly between the same voxel centres on the same grid, in
  float32; what differs is the order of float operations (SimpleITK's index arithmetic vs
  MONAI's affine grid and torch's grid_sample). Measured max 0.008 HU on the synthetic cohort;
  0.05 HU leaves room for other volumes and is far below the 1 HU / grey-level that matters
  (the lung window maps 1400 HU onto 256 levels: 5.5 HU per level).
- uint8: a float difference of 0.008 HU can move a value across a .5 rounding tie, so one grey
  level; never more.
"""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from data_prep.ct import AIR_HU, CHANNEL_MODES, WINDOWS, apply_window, cube_size, lung_sample_points, planes_2d, slice_offsets
from data_prep.ct_transforms import (CT_DECODE_VERSION, LesionSpec, crop, decode_ct, lesion_crop, resample,
                                     resample_transforms, to_monai, window)
from data_prep.dicom import Volume, load_series
from data_prep.errors import DataPrepError
from data_prep.nifti import load_nifti, nifti_grid
from data_prep.synthetic.ct import generate_ct

HU_TOL = 0.05
U8_TOL = 1


# ---- the former path (SimpleITK resample + numpy crop), kept here as the reference ----

def _former_resample(volume: Volume, spacing_mm: float) -> Volume:
    img = sitk.GetImageFromArray(np.ascontiguousarray(volume.array, dtype=np.float32))
    img.SetSpacing(tuple(float(s) for s in volume.spacing[::-1]))
    img.SetOrigin(tuple(float(v) for v in volume.origin))
    img.SetDirection(tuple(float(v) for v in np.asarray(volume.direction, float).ravel()))
    size = [int(np.floor((n - 1) * s / spacing_mm + 1e-6)) + 1 for n, s in zip(volume.array.shape[::-1], volume.spacing[::-1])]
    out = sitk.Resample(img, size, sitk.Transform(), sitk.sitkLinear, img.GetOrigin(), (spacing_mm,) * 3,
                        img.GetDirection(), AIR_HU, sitk.sitkFloat32)
    return Volume(array=sitk.GetArrayFromImage(out), spacing=(spacing_mm,) * 3, origin=volume.origin,
                  direction=np.asarray(volume.direction, float))


def _former_crop(array: np.ndarray, centre_kji, n: int) -> np.ndarray:
    half = n // 2
    out = np.full((n, n, n), AIR_HU, dtype=np.float32)
    src, dst = [], []
    for c, size in zip(centre_kji, array.shape):
        lo, hi = int(c) - half, int(c) - half + n
        s0, s1 = max(lo, 0), min(hi, size)
        if s1 <= s0:
            return out
        src.append(slice(s0, s1))
        dst.append(slice(s0 - lo, s1 - lo))
    out[tuple(dst)] = array[tuple(src)]
    return out


def _former_images(vol: Volume, centre, diameter, spacing, crop_mm, channels, k, size) -> list[np.ndarray]:
    iso = _former_resample(vol, spacing)
    kji = tuple(int(v) for v in np.clip(np.rint(iso.world_to_index(centre)), 0, np.asarray(iso.shape) - 1))
    n = cube_size(crop_mm, spacing)
    cube = _former_crop(iso.array, kji, n)
    return [planes_2d(cube, o, channels, size) for o in slice_offsets(k, diameter, spacing, n // 2)]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return generate_ct(tmp_path_factory.mktemp("ct_monai"), n_patients=6, seed=11, slices=24, size=64, extras=False)


@pytest.fixture(scope="module")
def cases(cohort):
    labels = pd.read_csv(cohort["labels"])
    return [(row, load_series(cohort["images"] / f"case_{i:03d}")) for i, row in labels.iterrows()]


def _centre(row) -> tuple[float, float, float]:
    return float(row.center_x_mm), float(row.center_y_mm), float(row.center_z_mm)


@pytest.mark.parametrize("spacing", [1.0, 0.7])
def test_resample_matches_former_sitk_path(cases, spacing):
    worst = 0.0
    for _, vol in cases:
        old, new = _former_resample(vol, spacing), resample(vol, spacing)
        assert new.shape == old.shape and new.spacing == pytest.approx((spacing,) * 3)
        np.testing.assert_allclose(new.origin, old.origin, atol=1e-4)
        np.testing.assert_allclose(new.direction, old.direction, atol=1e-9)
        worst = max(worst, float(np.abs(new.array - old.array).max()))
    assert worst < HU_TOL, worst
    assert len({vol.spacing for _, vol in cases}) > 1  # the cohort really has several slice spacings


@pytest.mark.parametrize("channels", CHANNEL_MODES)
def test_decode_matches_former_path_on_synthetic_cohort(cases, channels):
    diffs = []
    for row, vol in cases:
        old = _former_images(vol, _centre(row), 12.0, 1.0, 48.0, channels, 3, 64)
        new = decode_ct(vol, [LesionSpec(_centre(row), 12.0)], 1.0, 48.0, channels, 3, 64, "case")
        assert len(new) == len(old) == 3
        for a, b in zip(old, new):
            assert b.shape == (64, 64, 3) and b.dtype == np.uint8
            diffs.append(int(np.abs(a.astype(int) - b.astype(int)).max()))
    assert max(diffs) <= U8_TOL, diffs


def test_lesion_crop_matches_former_crop_and_centre_voxel_is_the_nodule(cases):
    for row, vol in cases:
        old_iso = _former_resample(vol, 1.0)
        iso = resample_transforms(1.0)(to_monai(vol))
        cube, centre = lesion_crop(iso, _centre(row), 32.0, 1.0, "case")
        kji = old_iso.world_to_index(_centre(row))
        assert np.abs(np.asarray(centre) - kji).max() <= 0.5 + 1e-9
        assert cube.shape == (33, 33, 33)
        assert np.abs(cube - _former_crop(old_iso.array, centre, 33)).max() < HU_TOL
        hu = float(cube[15:18, 15:18, 15:18].mean())  # 3 mm around the centre, beats the noise
        lo, hi = {"solid": (-150, 150), "part_solid": (-250, 150), "ground_glass": (-750, -420), "calcified_benign": (250, 1000)}[row.label]
        assert lo < hu < hi, (row.label, hu)


def test_resample_keeps_world_coordinates_and_orients_to_lps():
    # a field linear in world coordinates is reproduced exactly by trilinear interpolation; the
    # flipped x and z axes are turned to L, P, S (i to the left, k up), the origin moves to that corner
    direction = np.array([[-1.0, 0, 0], [0, 1, 0], [0, 0, -1]])
    vol = Volume(array=np.zeros((10, 12, 14), np.float32), spacing=(2.5, 0.7, 0.8), origin=(30.0, -20.0, 100.0), direction=direction)
    kk, jj, ii = np.meshgrid(*[np.arange(n) for n in vol.shape], indexing="ij")
    world = np.asarray(vol.origin)[:, None] + direction @ np.stack([ii.ravel() * 0.8, jj.ravel() * 0.7, kk.ravel() * 2.5])
    vol.array[...] = (world[0] + 2 * world[1] + 3 * world[2]).reshape(vol.shape)
    iso = resample(vol, 1.0)
    np.testing.assert_allclose(iso.direction, np.eye(3), atol=1e-9)
    np.testing.assert_allclose(iso.origin, (30.0 - 13 * 0.8, -20.0, 100.0 - 9 * 2.5), atol=1e-4)
    assert iso.shape == (23, 8, 11)  # floor((n - 1) * old / new) + 1, as the former grid
    for kji in [(0, 0, 0), (5, 3, 7), (22, 7, 10)]:
        x, y, z = iso.index_to_world(kji)
        assert iso.array[kji] == pytest.approx(x + 2 * y + 3 * z, abs=1e-3)


def test_flipped_storage_gives_the_same_crops(cases):
    # the same world data stored with i and k reversed (direction diag(-1, 1, -1)): the former path
    # cut planes along the stored axes (mirrored images); the oriented decode gives the same pixels
    row, vol = cases[0]
    far = vol.index_to_world((vol.shape[0] - 1, 0, vol.shape[2] - 1))
    flipped = Volume(array=vol.array[::-1, :, ::-1].copy(), spacing=vol.spacing, origin=tuple(float(v) for v in far),
                     direction=vol.direction @ np.diag([-1.0, 1.0, -1.0]))
    a = decode_ct(vol, [LesionSpec(_centre(row))], 1.0, 48.0, "orthogonal", 1, 64, "case")[0]
    b = decode_ct(flipped, [LesionSpec(_centre(row))], 1.0, 48.0, "orthogonal", 1, 64, "case")[0]
    assert np.abs(a.astype(int) - b.astype(int)).max() <= U8_TOL
    old = _former_images(flipped, _centre(row), None, 1.0, 48.0, "orthogonal", 1, 64)[0]
    assert np.abs(old.astype(int) - a.astype(int)).max() > 50  # what the orientation step changed


def test_crop_pads_with_air_exactly_where_it_leaves_the_volume():
    arr = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    iso = to_monai(Volume(array=arr, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)))
    for centre, n in [((0, 0, 0), 5), ((3, 4, 5), 7), ((2, 2, 3), 3), ((1, 9, 2), 5), ((50, 50, 50), 3)]:
        np.testing.assert_array_equal(crop(iso, centre, n), _former_crop(arr, centre, n))
    cube = crop(iso, (0, 0, 0), 5)
    assert cube[2, 2, 2] == arr[0, 0, 0] and (cube[:2] == AIR_HU).all() and (cube[:, :2] == AIR_HU).all()


def test_lesion_outside_volume_names_series(cases):
    row, vol = cases[0]
    iso = resample_transforms(1.0)(to_monai(vol))
    c = _centre(row)
    with pytest.raises(DataPrepError, match=r"series S-123: lesion centre \(.*\) mm lies outside the volume"):
        lesion_crop(iso, (c[0], c[1], c[2] + 500.0), 32.0, 1.0, "series S-123")


def test_window_is_apply_window():
    rng = np.random.default_rng(0)
    planes = rng.uniform(-1300, 1300, size=(3, 16, 16)).astype(np.float32)
    planes[0, 0, :5] = [-1000, 400, -300, -160, 240]  # window bounds and the lung window's midpoint
    win = window(planes[:1], "windows")
    for ch, name in enumerate(("lung", "mediastinal", "wide")):
        assert np.abs(win[..., ch].astype(int) - apply_window(planes[0], WINDOWS[name])).max() <= U8_TOL
    assert win[0, 0, 0] == 0 and win[0, 1, 0] == 255 and win[0, 2, 0] == 128  # (-300 + 1000) / 1400 * 255 = 127.5
    lung = window(planes, "adjacent")
    assert lung.shape == (16, 16, 3) and lung.dtype == np.uint8
    for ch in range(3):
        assert np.abs(lung[..., ch].astype(int) - apply_window(planes[ch], WINDOWS["lung"])).max() <= U8_TOL


def _as_nibabel(vol: Volume, path: Path) -> None:
    """vol written by nibabel with its own (RAS) affine: the LPS geometry with x and y negated."""
    sz, sy, sx = vol.spacing
    lps = np.eye(4)
    lps[:3, :3] = vol.direction @ np.diag([sx, sy, sz])
    lps[:3, 3] = vol.origin
    nib.save(nib.Nifti1Image(vol.array.transpose(2, 1, 0).astype(np.int16), np.diag([-1.0, -1, 1, 1]) @ lps), str(path))


def test_nifti_through_monai_reads_like_dicom_and_sitk(cases, tmp_path):
    row, vol = cases[1]
    _as_nibabel(vol, tmp_path / "nib.nii.gz")
    got = load_nifti(tmp_path / "nib.nii.gz")
    np.testing.assert_array_equal(got.array, np.rint(vol.array).astype(np.int16))
    np.testing.assert_allclose(got.spacing, vol.spacing, rtol=1e-6)
    np.testing.assert_allclose(got.origin, vol.origin, atol=1e-4)
    np.testing.assert_allclose(got.direction, vol.direction, atol=1e-6)
    grid = nifti_grid(tmp_path / "nib.nii.gz")
    assert grid.shape == got.shape and np.allclose(grid.origin, got.origin) and np.allclose(grid.direction, got.direction)
    # SimpleITK's reader (the former NIfTI path) agrees on pixels and geometry
    ref = sitk.ReadImage(str(tmp_path / "nib.nii.gz"))
    np.testing.assert_array_equal(got.array, sitk.GetArrayFromImage(ref).astype(np.float32))
    np.testing.assert_allclose(got.origin, ref.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(got.direction.ravel(), ref.GetDirection(), atol=1e-6)
    # a SimpleITK-written file (RAS-stored: direction diag(-1, -1, 1) in LPS) decodes like the DICOM series
    flipped = Volume(array=vol.array[:, ::-1, ::-1].copy(), spacing=vol.spacing,
                     origin=tuple(float(v) for v in vol.index_to_world((0, vol.shape[1] - 1, vol.shape[2] - 1))),
                     direction=vol.direction @ np.diag([-1.0, -1.0, 1.0]))
    img = sitk.GetImageFromArray(flipped.array)
    img.SetSpacing(flipped.spacing[::-1])
    img.SetOrigin(flipped.origin)
    img.SetDirection(flipped.direction.ravel().tolist())
    sitk.WriteImage(img, str(tmp_path / "itk.nii"))
    les = [LesionSpec(_centre(row), 10.0)]
    a = decode_ct(vol, les, 1.0, 48.0, "orthogonal", 3, 48, "case")
    b = decode_ct(load_nifti(tmp_path / "itk.nii"), les, 1.0, 48.0, "orthogonal", 3, 48, "case")
    assert max(int(np.abs(x.astype(int) - y.astype(int)).max()) for x, y in zip(a, b)) <= U8_TOL


def test_nifti_4d_is_an_error(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((6, 7, 8, 2), np.int16), np.eye(4)), str(tmp_path / "t.nii"))
    with pytest.raises(DataPrepError, match=r"t\.nii: expected a 3D single-channel volume"):
        load_nifti(tmp_path / "t.nii")


def test_decode_samples_lung_when_no_centre(cases):
    _, vol = cases[2]
    out = decode_ct(vol, [LesionSpec(None)], 1.0, 32.0, "windows", 3, 32, "case")
    assert len(out) == 3 and len({img.tobytes() for img in out}) == 3
    assert all(img[16, 16, 0] < 60 for img in out)  # the centre is lung: below -700 HU in the lung window
    old_iso = _former_resample(vol, 1.0)
    old = [planes_2d(_former_crop(old_iso.array, p, 33), 0, "windows", 32) for p in lung_sample_points(old_iso, 3)]
    assert max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(old, out)) <= U8_TOL
    assert CT_DECODE_VERSION >= 2


# ---- real files shipped with pydicom and nibabel ----

def _nibabel_file(name: str) -> Path:
    import nibabel.tests

    return Path(nibabel.tests.__file__).parent / "data" / name


def _to_lps_axes(vol: Volume) -> Volume:
    """By hand: reverse every stored axis whose direction points against L, P or S (axis-aligned volumes)."""
    arr, origin, direction = vol.array, np.asarray(vol.origin, float), np.asarray(vol.direction, float).copy()
    for a in range(3):  # a = i, j, k; array axis 2 - a
        world = int(np.argmax(np.abs(direction[:, a])))
        assert world == a, "test volumes are stored without axis permutation"
        if direction[world, a] < 0:
            n = vol.shape[2 - a]
            origin = origin + direction[:, a] * vol.spacing[2 - a] * (n - 1)
            direction[:, a] *= -1
            arr = np.flip(arr, axis=2 - a)
    return Volume(array=np.ascontiguousarray(arr), spacing=vol.spacing, origin=tuple(origin), direction=direction)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["anatomical.nii", "reoriented_anat_moved.nii"])  # stored LAS (int16), RAS (float32)
def test_real_nifti_files_match_sitk_and_the_former_path(name):
    path = _nibabel_file(name)
    vol = load_nifti(path)
    ref = sitk.ReadImage(str(path))
    np.testing.assert_array_equal(vol.array, sitk.GetArrayFromImage(ref).astype(np.float32))
    np.testing.assert_allclose(vol.spacing, ref.GetSpacing()[::-1], rtol=1e-6)
    np.testing.assert_allclose(vol.origin, ref.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(vol.direction.ravel(), ref.GetDirection(), atol=1e-6)
    # MR intensities rescaled onto the lung window's HU range, so the uint8 comparison sees contrast
    vol = Volume(array=vol.array / vol.array.max() * 1400.0 - 1000.0, spacing=vol.spacing, origin=vol.origin,
                 direction=vol.direction)
    lps = _to_lps_axes(vol)
    centre = tuple(float(v) for v in vol.index_to_world(np.asarray(vol.shape) / 2 - 0.3))
    cube, kji = lesion_crop(resample_transforms(1.5)(to_monai(vol)), centre, 30.0, 1.5, "case")
    former_iso = _former_resample(lps, 1.5)
    assert np.abs(np.asarray(kji) - former_iso.world_to_index(centre)).max() <= 0.5 + 1e-9
    assert np.abs(cube - _former_crop(former_iso.array, kji, cube.shape[0])).max() < HU_TOL
    for channels in CHANNEL_MODES:
        old = _former_images(lps, centre, 8.0, 1.5, 30.0, channels, 3, 32)
        new = decode_ct(vol, [LesionSpec(centre, 8.0)], 1.5, 30.0, channels, 3, 32, "case")
        assert max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(old, new)) <= U8_TOL, channels
        assert min(float(img.std()) for img in new) > 5
    if name == "anatomical.nii":  # stored L, A, S: the former path cut its planes upside down relative to these
        stored = _former_images(vol, centre, None, 1.5, 30.0, "windows", 1, 32)[0]
        ours = decode_ct(vol, [LesionSpec(centre)], 1.5, 30.0, "windows", 1, 32, "case")[0]
        assert np.abs(stored.astype(int) - ours.astype(int)).max() > 50


def test_real_nifti_4d_is_an_error():
    with pytest.raises(DataPrepError, match=r"functional\.nii: expected a 3D single-channel volume"):
        load_nifti(_nibabel_file("functional.nii"))


def test_real_dicom_slice_matches_the_former_path(tmp_path):
    # pydicom's CT_small.dcm: one real 128 x 128 CT slice (0.66 mm pixels)
    import shutil

    from pydicom.data import get_testdata_file

    (tmp_path / "s").mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "s" / "CT_small.dcm")
    vol = load_series(tmp_path / "s")
    assert vol.shape[0] == 1
    centre = tuple(float(v) for v in vol.index_to_world((0, 60.2, 70.7)))
    for channels in ("windows", "adjacent"):
        old = _former_images(vol, centre, None, 0.5, 24.0, channels, 1, 40)
        new = decode_ct(vol, [LesionSpec(centre)], 0.5, 24.0, channels, 1, 40, "case")
        assert np.abs(old[0].astype(int) - new[0].astype(int)).max() <= U8_TOL, channels
        assert new[0].std() > 5
