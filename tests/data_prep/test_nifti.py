"""NIfTI reading through MONAI's NibabelReader: NIfTI-2 gives the same Volume as NIfTI-1 and as SimpleITK's reader."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from data_prep import DataPrepError
from data_prep.nifti import load_nifti


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
    assert nib.load(str(tmp_path / f"two{suffix}")).header.sizeof_hdr == 540 and one.header.sizeof_hdr == 348
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


def test_nifti_scaling_gives_hu(tmp_path):
    # scl_slope / scl_inter (how CT is usually stored in NIfTI) are applied: HU = 2 * stored - 1024
    a = np.arange(60, dtype=np.int16).reshape(3, 4, 5)
    img = nib.Nifti1Image(a, np.eye(4))
    img.header.set_slope_inter(2.0, -1024.0)
    nib.save(img, str(tmp_path / "s.nii"))
    v = load_nifti(tmp_path / "s.nii")
    assert v.array.dtype == np.float32 and v.shape == (5, 4, 3)
    np.testing.assert_array_equal(v.array, (2.0 * a - 1024.0).transpose(2, 1, 0))
