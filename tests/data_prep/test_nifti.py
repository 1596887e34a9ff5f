"""NIfTI reading: NIfTI-2 files (which this SimpleITK build cannot read) give the same Volume as NIfTI-1."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from data_prep import DataPrepError
from data_prep.nifti import is_nifti2, load_nifti


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti2_reads_like_nifti1(tmp_path, suffix):
    a = np.random.default_rng(0).normal(size=(20, 30, 25)).astype(np.float32)
    img = sitk.GetImageFromArray(a)
    img.SetSpacing((0.8, 0.7, 1.5))
    img.SetOrigin((-10.0, -20.0, -30.0))
    img.SetDirection(np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1.0]]).ravel().tolist())  # a rotation about z
    sitk.WriteImage(img, str(tmp_path / f"one{suffix}"))
    one = nib.load(str(tmp_path / f"one{suffix}"))
    nib.save(nib.Nifti2Image(np.asarray(one.dataobj), one.affine), str(tmp_path / f"two{suffix}"))
    assert is_nifti2(tmp_path / f"two{suffix}") and not is_nifti2(tmp_path / f"one{suffix}")
    with pytest.raises(RuntimeError):  # why the fallback exists
        sitk.ReadImage(str(tmp_path / f"two{suffix}"))
    v1, v2 = load_nifti(tmp_path / f"one{suffix}"), load_nifti(tmp_path / f"two{suffix}")
    np.testing.assert_array_equal(v1.array, a)
    np.testing.assert_array_equal(v2.array, a)
    np.testing.assert_allclose(v2.spacing, v1.spacing, rtol=1e-6)
    np.testing.assert_allclose(v2.origin, v1.origin, atol=1e-5)
    np.testing.assert_allclose(v2.direction, v1.direction, atol=1e-6)


def test_truncated_nifti2_is_an_error(tmp_path):
    a = np.zeros((10, 12, 14), np.int16)
    nib.save(nib.Nifti2Image(a, np.eye(4)), str(tmp_path / "t.nii"))
    data = (tmp_path / "t.nii").read_bytes()
    (tmp_path / "t.nii").write_bytes(data[:700])
    with pytest.raises(DataPrepError, match=r"t\.nii: the file is truncated"):
        load_nifti(tmp_path / "t.nii")
