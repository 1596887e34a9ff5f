"""The synthetic DICOM cohort: real, readable, imbalanced, reproducible, with plantable identifiers."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pandas as pd
import pydicom
import pytest
import SimpleITK as sitk

from data_prep.deid import IDENTIFYING_TAGS
from data_prep.synthetic.ct import CT_CLASSES, _class_counts, generate_ct

SENTINELS = {tag: f"ZQX{n:02d}SENT" for n, tag in enumerate(IDENTIFYING_TAGS)}
SENTINELS.update({"StudyInstanceUID": "1.2.826.0.1.99001", "SeriesInstanceUID": "1.2.826.0.1.99002",
                  "SOPInstanceUID": "1.2.826.0.1.99003", "FrameOfReferenceUID": "1.2.826.0.1.99004",
                  "PatientBirthDate": "19010203", "StudyDate": "19020304", "SeriesDate": "19030405",
                  "AcquisitionDate": "19040506", "ContentDate": "19050607", "StudyTime": "235959"})


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return generate_ct(tmp_path_factory.mktemp("synth_ct"), n_patients=8, seed=2, slices=12, size=48, compress=["rle", "jpegls"])


def test_class_counts_imbalanced_with_two_per_class():
    assert _class_counts(24) == [12, 6, 4, 2]
    assert _class_counts(8) == [2, 2, 2, 2]
    counts = _class_counts(50)
    assert sum(counts) == 50 and counts == sorted(counts, reverse=True) and min(counts) >= 2


def test_generate_ct_labels_csv_layout(cohort):
    labels = pd.read_csv(cohort["labels"], dtype={"patient_id": str})
    assert list(labels.columns) == ["patient_id", "label", "center_x_mm", "center_y_mm", "center_z_mm", "diameter_mm"]
    assert Counter(labels["label"]) == dict(zip(CT_CLASSES, [2, 2, 2, 2]))
    assert labels["patient_id"].is_unique


def test_generate_ct_series_read_with_pydicom_and_simpleitk(cohort):
    labels = pd.read_csv(cohort["labels"], dtype={"patient_id": str})
    for i, row in labels.iterrows():
        folder = cohort["images"] / f"case_{i:03d}" / "study_1" / "series_2"
        files = sorted(folder.glob("*.dcm"))
        assert len(files) == 12
        heads = [pydicom.dcmread(f) for f in files]
        assert {h.SOPClassUID for h in heads} == {pydicom.uid.CTImageStorage}
        assert len({h.SOPInstanceUID for h in heads}) == 12 and {h.PatientID for h in heads} == {row.patient_id}
        assert all(h.pixel_array.shape == (48, 48) for h in heads)
        reader = sitk.ImageSeriesReader()
        (sid,) = reader.GetGDCMSeriesIDs(str(folder))
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder), sid))
        img = reader.Execute()
        hu = sitk.GetArrayFromImage(img)
        assert hu.shape == (12, 48, 48)
        assert hu[:, 0, 0].max() <= -900  # air in the corners
        assert (hu > 500).mean() > 0.01 and (hu < -700).mean() > 0.05  # bone ring, lungs
        # the labelled centre lies inside the volume and on the nodule
        x, y, z = img.TransformPhysicalPointToIndex((row.center_x_mm, row.center_y_mm, row.center_z_mm))
        assert 0 <= x < 48 and 0 <= y < 48 and 0 <= z < 12
        assert hu[z, y, x] > -760  # every nodule class is denser than aerated lung (-850)


def test_generate_ct_uses_requested_syntaxes_skipping_unavailable(cohort):
    syntaxes = Counter(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID
                       for f in cohort["images"].glob("case_000/study_1/series_2/*.dcm"))
    assert syntaxes[pydicom.uid.RLELossless] == 6 and syntaxes[pydicom.uid.ExplicitVRLittleEndian] == 6


def test_generate_ct_extras_present(cohort):
    assert (cohort["images"] / "README.txt").is_file()
    (loc,) = list(cohort["images"].glob("case_003/study_1/series_1/*.dcm"))
    assert "LOCALIZER" in pydicom.dcmread(loc).ImageType
    assert pydicom.dcmread(cohort["images"] / "case_000/study_1/series_9/REPORT.dcm").Modality == "SR"


def test_generate_ct_same_seed_same_cohort(tmp_path):
    a = generate_ct(tmp_path / "a", n_patients=2, seed=4, slices=4, size=16, extras=False)
    b = generate_ct(tmp_path / "b", n_patients=2, seed=4, slices=4, size=16, extras=False)
    c = generate_ct(tmp_path / "c", n_patients=2, seed=5, slices=4, size=16, extras=False)
    assert a["labels"].read_bytes() == b["labels"].read_bytes() != c["labels"].read_bytes()
    names = lambda r: sorted(p.relative_to(r["images"]).as_posix() for p in r["images"].rglob("*.dcm"))  # noqa: E731
    assert names(a) == names(b)
    for rel in names(a):
        assert (a["images"] / rel).read_bytes() == (b["images"] / rel).read_bytes()


def test_generate_ct_sentinels_fill_every_identifying_tag(tmp_path):
    out = generate_ct(tmp_path, n_patients=2, seed=1, slices=3, size=16, sentinels=SENTINELS)
    labels = pd.read_csv(out["labels"], dtype={"patient_id": str})
    for f in out["images"].rglob("*.dcm"):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        for tag, value in SENTINELS.items():
            if tag in ("SeriesInstanceUID", "SOPInstanceUID") and ds.Modality == "SR":
                continue
            assert str(ds.data_element(tag).value).startswith(value), (f, tag)
    assert all(pid.startswith(SENTINELS["PatientID"]) for pid in labels["patient_id"])


def test_generate_ct_unknown_sentinel_tag_refused(tmp_path):
    with pytest.raises(ValueError, match="not in IDENTIFYING_TAGS"):
        generate_ct(tmp_path, n_patients=1, slices=2, size=16, sentinels={"Modality": "X"})
