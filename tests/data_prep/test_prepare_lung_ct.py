"""prepare_ct end to end: cache contract, splits by patient, de-identification, faults, quarantine."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from data_prep.cache import open_cache
from data_prep.deid import IDENTIFYING_TAGS, pseudonym
from data_prep.errors import DataPrepError
from data_prep.options import PrepareOptions
from data_prep.prepare_lung_ct import prepare_ct
from data_prep.synthetic.ct import generate_ct

SALT = "test-salt-not-secret"
OPTS = dict(salt=SALT, workers=1, ct_image_size=32, crop_mm=24.0, slices_per_lesion=2, spacing_mm=1.0)
SENTINELS = {tag: f"ZQX{n:02d}SENT" for n, tag in enumerate(IDENTIFYING_TAGS)}
SENTINELS.update({"StudyInstanceUID": "1.2.826.0.1.99001", "SeriesInstanceUID": "1.2.826.0.1.99002",
                  "SOPInstanceUID": "1.2.826.0.1.99003", "FrameOfReferenceUID": "1.2.826.0.1.99004",
                  "PatientBirthDate": "19010203", "StudyDate": "19020304", "SeriesDate": "19030405",
                  "AcquisitionDate": "19040506", "ContentDate": "19050607", "StudyTime": "235959"})


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Eight patients (two per class) with every identifying tag planted with a sentinel."""
    return generate_ct(tmp_path_factory.mktemp("prep_ct"), n_patients=8, seed=3, slices=20, size=48,
                       sentinels=SENTINELS, compress=["rle"])


@pytest.fixture(scope="module")
def prepared(cohort, tmp_path_factory) -> Path:
    return prepare_ct(cohort["images"], cohort["labels"], tmp_path_factory.mktemp("prep_out") / "cache", PrepareOptions(**OPTS))


def _copy(cohort: dict[str, Path], tmp_path: Path) -> dict[str, Path]:
    images = shutil.copytree(cohort["images"], tmp_path / "images")
    labels = tmp_path / "labels.csv"
    shutil.copy(cohort["labels"], labels)
    return {"images": images, "labels": labels}


def test_prepare_ct_builds_cache_grouped_by_patient_pseudonym(cohort, prepared):
    cache = open_cache(prepared)
    labels = pd.read_csv(cohort["labels"], dtype={"patient_id": str})
    assert cache.kind == "ct" and len(cache) == 8 * 2
    assert sorted(cache.class_names) == sorted(set(labels["label"]))
    assert cache.image(0).shape == (32, 32, 3) and cache.image(0).dtype == np.uint8
    m = cache.manifest
    expected = {pseudonym(pid, SALT, "P") for pid in labels["patient_id"]}
    assert set(m["group"]) == expected and (m["group"] == m["patient"]).all()
    assert (m["image"] == m["patient"] + "_l" + m["lesion"].astype(str) + "_s" + m["slice"].astype(str)).all()
    assert m.groupby("patient")["split"].nunique().max() == 1  # no patient in two splits
    assert {"train", "test"} <= set(m["split"])
    truth = dict(zip(labels["patient_id"].map(lambda p: pseudonym(p, SALT, "P")), labels["label"]))
    assert (m["label"] == m["patient"].map(truth)).all()
    meta = json.loads((prepared / "cache.json").read_text())
    assert meta["options"]["crop_mm"] == 24.0 and "salt" not in meta["options"]
    assert cache.class_counts("all").sum() == 16


def test_prepare_ct_rerun_does_nothing(cohort, prepared, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in prepared.iterdir()}
    prepare_ct(cohort["images"], cohort["labels"], prepared, PrepareOptions(**OPTS))
    assert "cache up to date" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in prepared.iterdir()} == before


def test_prepare_ct_outputs_hold_no_identifier_nor_salt(cohort, prepared, capsys):
    # rebuild into a fresh folder with on_error=skip (so quarantine.csv exists) and capture what is printed
    out = prepare_ct(cohort["images"], cohort["labels"], prepared.parent / "deid", PrepareOptions(**OPTS, on_error="skip"))
    printed = capsys.readouterr()
    files = [p for p in out.rglob("*") if p.is_file()] + [p for p in prepared.rglob("*") if p.is_file()]
    assert any(p.name == "quarantine.csv" for p in files) and any(p.name == "pixels.u8" for p in files)
    needles = list(SENTINELS.values()) + [SALT]
    for p in files:
        data = p.read_bytes()
        for needle in needles:
            assert needle.encode() not in data, (p.name, needle)
    for needle in needles:
        assert needle not in printed.out and needle not in printed.err


def test_prepare_ct_refuses_a_non_positive_lesion_diameter(cohort, tmp_path):
    src = _copy(cohort, tmp_path)
    labels = pd.read_csv(src["labels"], dtype=str, keep_default_na=False)
    labels["diameter_mm"] = "12"
    labels.loc[2, "diameter_mm"] = "-5"
    labels.to_csv(src["labels"], index=False)
    with pytest.raises(DataPrepError, match=r"labels\.csv: row 3, column diameter_mm: -5 is not a size"):
        prepare_ct(src["images"], src["labels"], tmp_path / "out", PrepareOptions(**OPTS))


def test_prepare_ct_labels_row_without_series(cohort, tmp_path):
    src = _copy(cohort, tmp_path)
    shutil.rmtree(src["images"] / "case_005")
    with pytest.raises(DataPrepError, match=r"labels\.csv: row\(s\) 6 \(patient_id K-[0-9a-f]{10} after pseudonymisation\) match no CT series"):
        prepare_ct(src["images"], src["labels"], tmp_path / "out", PrepareOptions(**OPTS))


def test_prepare_ct_series_without_labels_row(cohort, tmp_path):
    src = _copy(cohort, tmp_path)
    df = pd.read_csv(src["labels"], dtype=str)
    df.drop(index=2).to_csv(src["labels"], index=False)
    with pytest.raises(DataPrepError, match=r"^series S-[0-9a-f]{10} \(patient P-[0-9a-f]{10}\): no row of .*labels\.csv has its patient_id"):
        prepare_ct(src["images"], src["labels"], tmp_path / "out", PrepareOptions(**OPTS))


def test_prepare_ct_centre_outside_volume(cohort, tmp_path):
    src = _copy(cohort, tmp_path)
    df = pd.read_csv(src["labels"], dtype=str)
    df.loc[4, "center_z_mm"] = "900.0"
    df.to_csv(src["labels"], index=False)
    with pytest.raises(DataPrepError, match=r"^series S-[0-9a-f]{10} \(patient P-[0-9a-f]{10}\): the lesion centre of labels row 5 lies outside the volume"):
        prepare_ct(src["images"], src["labels"], tmp_path / "out", PrepareOptions(**OPTS))


def test_prepare_ct_quarantines_with_skip(cohort, tmp_path):
    src = _copy(cohort, tmp_path)
    victim = sorted((src["images"] / "case_001/study_1/series_2").glob("*.dcm"))[0]
    victim.write_bytes(victim.read_bytes()[:-300])  # truncated: only found when decoding
    files = sorted((src["images"] / "case_006/study_1/series_2").glob("*.dcm"))
    files[5].unlink()  # a gap: found from the headers
    (src["images"] / "stray.dcm").write_bytes(b"not dicom at all")
    listing = [p for p in sorted(src["images"].rglob("*")) if p.is_file() and not p.name.startswith(".")]
    stray_pos = f"input file {listing.index(src['images'] / 'stray.dcm') + 1} of {len(listing)}"
    with pytest.raises(DataPrepError, match=rf"^{stray_pos}: not a DICOM file"):
        prepare_ct(src["images"], src["labels"], tmp_path / "stop", PrepareOptions(**OPTS))
    out = prepare_ct(src["images"], src["labels"], tmp_path / "skip", PrepareOptions(**OPTS, on_error="skip"))
    q = pd.read_csv(out / "quarantine.csv", keep_default_na=False)
    assert len(q) == 3
    # files are named by series pseudonym and position along the slice normal, never by their path
    text = (out / "quarantine.csv").read_text()
    assert "case_" not in text and victim.name not in text and "stray" not in text
    by_file = dict(zip(q["file"], q["reason"]))
    assert "not a DICOM file" in by_file.pop(stray_pos)
    import pydicom

    from data_prep.dicom import index_dicom_tree
    (info,) = [s for s in index_dicom_tree(src["images"] / "case_001/study_1/series_2")]
    normal = np.cross(*np.reshape(info.slices[0].orientation, (2, 3)))
    along = sorted(float(np.dot(s.position, normal)) for s in info.slices)
    k = along.index(float(np.dot(pydicom.dcmread(victim, stop_before_pixels=True).ImagePositionPatient, normal))) + 1
    series_1 = pseudonym(info.series_uid, SALT, "S")
    (victim_name,) = [f for f in by_file if f.startswith(f"series {series_1}")]
    assert victim_name == f"series {series_1} (patient {pseudonym(info.patient_id, SALT, 'P')}), slice {k} of {len(along)}"
    assert "no complete Pixel Data element" in by_file.pop(victim_name)
    ((gap_file, gap_reason),) = by_file.items()  # the file beside the gap, in the series with the gap
    assert gap_file.startswith("series S-") and ", slice " in gap_file and "slice spacing is not uniform" in gap_reason
    assert set(q["series"]) - {""} == set(q["series"][q["file"] != stray_pos]) and q["series"].str.startswith("S-").sum() == 2
    cache = open_cache(out)
    assert cache.manifest["patient"].nunique() == 6 and len(cache) == 12
    # the split is drawn over the kept series: every class that is left has training images
    m = cache.manifest
    assert set(m.loc[m["split"] == "train", "label"]) == set(m["label"]) == set(cache.class_names)


def test_prepare_ct_refuses_one_class_cohort(cohort, tmp_path):
    src = _copy(cohort, tmp_path)
    df = pd.read_csv(src["labels"], dtype=str)
    df["label"] = "solid"
    df.to_csv(src["labels"], index=False)
    with pytest.raises(DataPrepError, match=r"labels\.csv: every row has the label 'solid'; a classifier needs at least two classes"):
        prepare_ct(src["images"], src["labels"], tmp_path / "out", PrepareOptions(**OPTS))


def _series_as_nifti(cohort: dict[str, Path], i: int, path: Path) -> "sitk.Image":
    """Case i of the generated DICOM cohort written as a NIfTI volume with the same geometry."""
    from data_prep.dicom import load_series

    vol = load_series(cohort["images"] / f"case_{i:03d}")
    img = sitk.GetImageFromArray(vol.array)
    img.SetSpacing(vol.spacing[::-1])
    img.SetOrigin(vol.origin)
    img.SetDirection(vol.direction.ravel().tolist())
    sitk.WriteImage(img, str(path))
    return img


def test_prepare_ct_nifti_input_with_voxel_centres(cohort, tmp_path):
    labels = pd.read_csv(cohort["labels"], dtype={"patient_id": str})
    rows = []
    for i in range(4):
        img = _series_as_nifti(cohort, i, tmp_path / f"vol{i}.nii.gz")
        x, y, z = img.TransformPhysicalPointToIndex(tuple(labels.loc[i, ["center_x_mm", "center_y_mm", "center_z_mm"]]))
        rows.append({"patient_id": f"vol{i}", "label": labels.loc[i, "label"], "center_i": x, "center_j": y, "center_k": z})
    rows.append({"patient_id": "vol0", "label": "lung", "center_i": "", "center_j": "", "center_k": ""})
    pd.DataFrame(rows).to_csv(tmp_path / "labels.csv", index=False)
    with pytest.raises(DataPrepError, match=r"share one patient_id but some have no lesion centre"):
        prepare_ct(tmp_path, tmp_path / "labels.csv", tmp_path / "out", PrepareOptions(**OPTS))
    pd.DataFrame(rows[:4]).to_csv(tmp_path / "labels.csv", index=False)
    cache = open_cache(prepare_ct(tmp_path, tmp_path / "labels.csv", tmp_path / "out", PrepareOptions(**OPTS, channels="orthogonal")))
    assert len(cache) == 8 and set(cache.manifest["patient"]) == {pseudonym(f"vol{i}", SALT) for i in range(4)}


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_prepare_ct_truncated_nifti_is_an_error_naming_the_volume_by_pseudonym(cohort, tmp_path, suffix, capfd):
    labels = pd.read_csv(cohort["labels"], dtype={"patient_id": str})
    rows = []
    for i in range(4):
        _series_as_nifti(cohort, i, tmp_path / f"MRN00{i}{suffix}")
        rows.append({"patient_id": f"MRN00{i}", "label": labels.loc[i, "label"]})
    pd.DataFrame(rows).to_csv(tmp_path / "labels.csv", index=False)
    victim = tmp_path / f"MRN002{suffix}"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) * 2 // 3])  # ITK alone would read this with zero-filled voxels
    with pytest.raises(DataPrepError, match=rf"^volume {pseudonym('MRN002', SALT, 'S')} \(patient {pseudonym('MRN002', SALT)}\).*truncated") as info:
        prepare_ct(tmp_path, tmp_path / "labels.csv", tmp_path / "out", PrepareOptions(**OPTS))
    assert "MRN00" not in str(info.value) and "MRN00" not in "".join(capfd.readouterr())


def test_prepare_ct_without_centres_samples_lung_slices(cohort, tmp_path):
    labels = pd.read_csv(cohort["labels"], dtype={"patient_id": str})[["patient_id", "label"]]
    labels.to_csv(tmp_path / "labels.csv", index=False)
    cache = open_cache(prepare_ct(cohort["images"], tmp_path / "labels.csv", tmp_path / "out",
                                  PrepareOptions(**{**OPTS, "slices_per_lesion": 3, "channels": "adjacent", "workers": 2})))
    assert len(cache) == 24 and cache.manifest.groupby("patient").size().eq(3).all()
    assert all(cache.image(i)[..., 1].mean() < 128 for i in range(len(cache)))  # mostly aerated lung under the lung window


def test_prepare_ct_bad_options_and_missing_salt(cohort, tmp_path, monkeypatch):
    with pytest.raises(DataPrepError, match=r"prepare\.channels is 'rgb'"):
        prepare_ct(cohort["images"], cohort["labels"], tmp_path / "o", PrepareOptions(**{**OPTS, "channels": "rgb"}))
    monkeypatch.delenv("ECL_PSEUDONYM_SALT", raising=False)
    with pytest.raises(DataPrepError, match="No pseudonym salt"):
        prepare_ct(cohort["images"], cohort["labels"], tmp_path / "o", PrepareOptions(**{**OPTS, "salt": None}))


def test_prepare_ct_sentinels_really_planted_in_input(cohort):
    blobs = b"".join(p.read_bytes() for p in cohort["images"].glob("case_000/study_1/series_2/*.dcm"))
    for needle in SENTINELS.values():
        assert needle.encode() in blobs, needle  # so the grep above could fail


def test_prepare_ct_resumes_after_interruption(cohort, tmp_path, monkeypatch, capsys):
    import data_prep.prepare_lung_ct as mod

    real_cut, calls = mod._cut, []

    def flaky(task, options):
        calls.append(task.series)
        if len(calls) == 5:  # first series of the second shard
            raise KeyboardInterrupt
        return real_cut(task, options)

    monkeypatch.setattr(mod, "_cut", flaky)
    with pytest.raises(KeyboardInterrupt):
        prepare_ct(cohort["images"], cohort["labels"], tmp_path / "out", PrepareOptions(**OPTS))
    assert not (tmp_path / "out" / "cache.json").exists()
    monkeypatch.setattr(mod, "_cut", real_cut)
    out = prepare_ct(cohort["images"], cohort["labels"], tmp_path / "out", PrepareOptions(**OPTS))
    assert "resuming: 1 of 2 shards already built" in capsys.readouterr().out
    assert len(open_cache(out)) == 16


def test_prepare_ct_slice_cut_inside_its_header_is_named_not_dropped(cohort, tmp_path):
    """pydicom reads a file cut inside its header without an error; the slice must not vanish silently."""
    import pydicom

    src = _copy(cohort, tmp_path)
    folder = src["images"] / "case_003/study_1/series_2"
    files = sorted(folder.glob("*.dcm"), key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]))
    top = files[-1]  # the top slice: no gap would betray its absence
    top.write_bytes(top.read_bytes()[:300])
    from data_prep.dicom import index_dicom_tree

    (info,) = [s for s in index_dicom_tree(folder, []) if s.is_image]
    label = f"series {pseudonym(info.series_uid, SALT, 'S')} (patient {pseudonym(info.patient_id, SALT)})"
    with pytest.raises(DataPrepError, match=rf"^input file \d+ of \d+ \(in the folder of {re.escape(label)}\): the DICOM header is "
                                            rf"incomplete .* truncated or damaged"):
        prepare_ct(src["images"], src["labels"], tmp_path / "stop", PrepareOptions(**OPTS))
    out = prepare_ct(src["images"], src["labels"], tmp_path / "skip", PrepareOptions(**OPTS, on_error="skip"))
    q = pd.read_csv(out / "quarantine.csv", keep_default_na=False)
    assert len(q) == 1 and q["file"][0].endswith(f"(in the folder of {label})") and top.name not in q["reason"][0]


def test_prepare_ct_refuses_nifti_and_dicom_in_one_folder(cohort, tmp_path):
    from data_prep.dicom import load_series

    vol = load_series(cohort["images"] / "case_000")
    sitk.WriteImage(sitk.GetImageFromArray(vol.array), str(tmp_path / "vol0.nii.gz"))
    shutil.copytree(cohort["images"] / "case_001", tmp_path / "case_001")
    pd.DataFrame([{"patient_id": "vol0", "label": "solid"}, {"patient_id": "x", "label": "part_solid"}]).to_csv(tmp_path / "labels.csv", index=False)
    with pytest.raises(DataPrepError, match=r"holds both NIfTI volumes \(1\) and DICOM files \(\d+, e\.g\. input file \d+ of \d+\)"):
        prepare_ct(tmp_path, tmp_path / "labels.csv", tmp_path / "out", PrepareOptions(**OPTS))


def test_namer_renames_patient_folders_but_not_the_root(tmp_path):
    """A PACS export's patient folder (name + MRN) is renamed; the --images root itself stays readable."""
    from data_prep.prepare_lung_ct import _Namer

    root = tmp_path / "export"
    f = root / "LAST^FIRST001_MRN001" / "CT THORAX" / "IM_MRN001_0003.dcm"
    flat = root / "IM_0001.dcm"
    namer = _Namer(root, [f, flat])
    text = namer(f"cannot open {root / 'LAST^FIRST001_MRN001'} under {root}; see {f} and {flat}")
    assert "MRN001" not in text and "LAST^FIRST" not in text and "CT THORAX" not in text
    assert f"under {root};" in text  # the folder the user named is not an identifier
    assert "a folder under --images" in text and "input file 1 of 2" in text and "input file 2 of 2" in text


def test_unexpected_errors_leave_prepare_through_the_namer(cohort, tmp_path, monkeypatch):
    """A third-party error quoting an input path (no DataPrepError) leaves prepare_ct renamed, as one line."""
    import data_prep.prepare_lung_ct as plc

    src = _copy(cohort, tmp_path)
    slice_file = next(p for p in sorted(src["images"].rglob("*")) if p.is_file())

    def reader_fault(*args, **kwargs):
        raise RuntimeError(f"ITK ERROR: could not read {slice_file}")

    monkeypatch.setattr(plc, "_prepare", reader_fault)
    with pytest.raises(DataPrepError) as info:
        prepare_ct(src["images"], src["labels"], tmp_path / "out", PrepareOptions(**OPTS))
    message = str(info.value)
    assert str(slice_file) not in message and slice_file.name not in message
    assert "RuntimeError" in message and "input file" in message


def test_read_ct_is_the_cohort_the_cache_was_built_from(cohort, prepared):
    """The reader alone (headers only) lists exactly the manifest's rows, one item per series."""
    from data_prep.prepare_lung_ct import read_ct

    c = read_ct(cohort["images"], cohort["labels"], PrepareOptions(**OPTS))
    m = open_cache(prepared).manifest
    assert c.kind == "ct" and c.what == "series" and len(c.items) == m["series"].nunique()
    assert c.images == list(m["image"]) and c.groups == list(m["group"]) and c.labels == list(m["label"])
    assert list(c.metadata["series"]) == list(m["series"]) and sum(c.item_rows) == len(m)
    assert open_cache(prepared).meta["preprocessing"]["windows"]["lung"] == [-1000.0, 400.0]
