"""DICOM series: ordering, geometry checks, decoding across transfer syntaxes, clear errors."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.data import get_testdata_file

from data_prep.dicom import check_geometry, index_dicom_tree, load_series
from data_prep.errors import DataPrepError
from data_prep.synthetic.ct import generate_ct


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three small series; odd slices RLE, JPEG 2000 or big endian; localizer, SR and README beside them."""
    return generate_ct(tmp_path_factory.mktemp("dicom_ct"), n_patients=3, seed=5, slices=16, size=48,
                       compress=["rle", "j2k", "big_endian"])


def _series_dir(cohort: dict[str, Path], i: int) -> Path:
    return cohort["images"] / f"case_{i:03d}" / "study_1" / "series_2"


def _alone(tmp_path: Path, name: str) -> Path:
    folder = tmp_path / name.replace(".dcm", "")
    folder.mkdir()
    shutil.copy(get_testdata_file(name), folder / name)
    return folder


def _reference_hu(path: Path) -> np.ndarray:
    ds = pydicom.dcmread(path)
    return ds.pixel_array * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))


@pytest.mark.parametrize("name", ["CT_small.dcm", "693_J2KI.dcm"])
def test_load_series_pydicom_ct_files_match_pydicom_decoding(tmp_path, name):
    vol = load_series(_alone(tmp_path, name))
    ds = pydicom.dcmread(get_testdata_file(name))
    assert vol.array.dtype == np.float32 and vol.array.shape == (1, ds.Rows, ds.Columns)
    np.testing.assert_array_equal(vol.array[0], _reference_hu(Path(get_testdata_file(name))))
    assert vol.origin == pytest.approx([float(v) for v in ds.ImagePositionPatient])
    assert vol.spacing[1:] == pytest.approx([float(v) for v in ds.PixelSpacing])


@pytest.mark.parametrize("name", ["MR_small_bigendian.dcm", "MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm"])
def test_load_series_other_transfer_syntaxes_with_allow_non_ct(tmp_path, name):
    vol = load_series(_alone(tmp_path, name), allow_non_ct=True)
    np.testing.assert_array_equal(vol.array[0], _reference_hu(Path(get_testdata_file(name))).astype(np.float32))


def test_load_series_mr_refused_as_non_ct(tmp_path):
    with pytest.raises(DataPrepError, match=r"no CT image series found .*MR series .*MR_small\.dcm.*allow_non_ct"):
        load_series(_alone(tmp_path, "MR_small.dcm"))


def test_load_series_truncated_file_names_file(tmp_path):
    with pytest.raises(DataPrepError, match=r"MR_truncated\.dcm: the pixel data cannot be decoded .*less than expected"):
        load_series(_alone(tmp_path, "MR_truncated.dcm"), allow_non_ct=True)


def test_load_series_no_meta_names_file(tmp_path):
    with pytest.raises(DataPrepError, match=r"no_meta\.dcm: not a DICOM file: it has no DICOM file meta header"):
        load_series(_alone(tmp_path, "no_meta.dcm"))


def test_load_series_shuffled_compressed_series_in_position_order(cohort):
    folder = _series_dir(cohort, 0)
    files = sorted(folder.glob("*.dcm"))
    syntaxes = {pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID for f in files}
    assert {pydicom.uid.RLELossless, pydicom.uid.ExplicitVRLittleEndian} <= syntaxes
    by_name_z = [float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in files]
    assert by_name_z != sorted(by_name_z)  # file names are not in slice order
    truth = sorted(files, key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]))
    expected = np.stack([_reference_hu(f) for f in truth]).astype(np.float32)
    vol = load_series(folder)
    np.testing.assert_array_equal(vol.array, expected)
    first = pydicom.dcmread(truth[0])
    assert vol.origin == pytest.approx([float(v) for v in first.ImagePositionPatient])
    assert vol.spacing == pytest.approx((float(first.SliceThickness), *map(float, first.PixelSpacing)))


@pytest.mark.parametrize("i", [0, 1, 2])
def test_load_series_matches_simpleitk(cohort, i):
    folder = _series_dir(cohort, i)
    reader = sitk.ImageSeriesReader()
    (sid,) = reader.GetGDCMSeriesIDs(str(folder))
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder), sid))
    img = reader.Execute()
    vol = load_series(folder)
    np.testing.assert_array_equal(vol.array, sitk.GetArrayFromImage(img).astype(np.float32))
    assert vol.spacing == pytest.approx(img.GetSpacing()[::-1], abs=1e-5)
    assert vol.origin == pytest.approx(img.GetOrigin(), abs=1e-4)
    np.testing.assert_allclose(vol.direction.ravel(), img.GetDirection(), atol=1e-6)
    # world <-> index round trip agrees with SimpleITK
    assert vol.index_to_world((3, 5, 7)) == pytest.approx(img.TransformIndexToPhysicalPoint((7, 5, 3)), abs=1e-4)
    assert vol.world_to_index(img.TransformIndexToPhysicalPoint((7, 5, 3))) == pytest.approx((3, 5, 7), abs=1e-6)


def test_load_series_skips_localizer_sr_and_readme(cohort):
    vol = load_series(cohort["images"] / "case_000")  # holds the CT series, a localizer and an SR document
    assert vol.array.shape == (16, 48, 48)


def test_load_series_duplicate_position_reported(cohort, tmp_path):
    folder = shutil.copytree(_series_dir(cohort, 1), tmp_path / "dup")
    victim = sorted(folder.glob("*.dcm"))[3]
    shutil.copy(victim, folder / "COPY_OF_ONE.dcm")
    with pytest.raises(DataPrepError, match=r"1 duplicate slice position\(s\), e\.g\. .*(COPY_OF_ONE|" + victim.name + ")"):
        load_series(folder)


def test_load_series_gap_reported(cohort, tmp_path):
    folder = shutil.copytree(_series_dir(cohort, 1), tmp_path / "gap")
    files = sorted(folder.glob("*.dcm"), key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]))
    files[7].unlink()
    with pytest.raises(DataPrepError, match=rf"slice spacing is not uniform \(1 gap.*between .*{files[6].name} and .*{files[8].name}"):
        load_series(folder)


def test_load_series_two_ct_series_listed_without_uids(cohort, tmp_path):
    folder = tmp_path / "two"
    for i in (0, 1):
        shutil.copytree(_series_dir(cohort, i), folder / f"s{i}")
    with pytest.raises(DataPrepError) as info:
        load_series(folder)
    msg = str(info.value)
    assert "2 CT series in one folder" in msg and msg.count("CT series #2 'CHEST 1.0 B45f' (16 file(s)") == 2
    for s in index_dicom_tree(folder):
        assert s.series_uid not in msg and s.patient_id not in msg and s.study_uid not in msg


def test_load_series_truncated_generated_slice_names_file(cohort, tmp_path):
    folder = shutil.copytree(_series_dir(cohort, 2), tmp_path / "trunc")
    victim = next(f for f in sorted(folder.glob("*.dcm"))
                  if pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian)
    victim.write_bytes(victim.read_bytes()[:-500])
    with pytest.raises(DataPrepError, match=rf"{victim.name}: the pixel data cannot be decoded"):
        load_series(folder)


def test_load_series_undecodable_compression_names_file(cohort, tmp_path):
    folder = shutil.copytree(_series_dir(cohort, 0), tmp_path / "bad_codec")
    victim = next(f for f in sorted(folder.glob("*.dcm"))
                  if pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID == pydicom.uid.RLELossless)
    ds = pydicom.dcmread(victim)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.JPEG2000Lossless  # RLE bytes labelled as JPEG 2000
    ds.save_as(victim)
    with pytest.raises(DataPrepError, match=rf"{victim.name}: the pixel data cannot be decoded \(transfer syntax JPEG 2000"):
        load_series(folder)


def test_load_series_missing_pixel_data_names_file(cohort, tmp_path):
    folder = shutil.copytree(_series_dir(cohort, 0), tmp_path / "nopix")
    victim = sorted(folder.glob("*.dcm"))[0]
    ds = pydicom.dcmread(victim)
    del ds.PixelData
    ds.save_as(victim)
    with pytest.raises(DataPrepError, match=rf"{victim.name}: no complete Pixel Data element"):
        load_series(folder)


def test_index_dicom_tree_finds_every_series_and_skips_non_dicom(cohort):
    series = index_dicom_tree(cohort["images"])
    kinds = sorted((s.modality, s.is_localizer, s.is_image) for s in series)
    assert kinds.count(("CT", False, True)) == 3 and kinds.count(("CT", True, True)) == 3 and ("SR", False, False) in kinds
    assert all("README" not in str(sl.path) for s in series for sl in s.slices)
    ct = [s for s in series if s.is_image and not s.is_localizer]
    assert all("patient_id" not in repr(s) and s.patient_id not in repr(s) for s in ct)
    geometry = check_geometry(ct[0])
    assert geometry.shape == (16, 48, 48)
