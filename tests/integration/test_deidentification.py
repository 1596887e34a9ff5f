"""No patient identifier leaves data_prep by any route.

Sentinels are planted in every identifying DICOM tag of a generated cohort, in a description, a
comment, a private tag and an other-IDs sequence, in non-conformant UIDs (a leading-zero component,
which makes pydicom warn with the value), and in the folder and file names, which are renamed the
way PACS exports name them (`LAST^FIRST001_MRN001/CT THORAX/IM_MRN001_0003.dcm`). Broken files sit
among them. Then `prepare` (stop, then skip), `train`, `evaluate` and `predict` on the DICOM tree
run, and no sentinel may appear in any file they write (caches, quarantine.csv, manifests, logs,
run folders, the MLflow store and its artifacts), in what they print, or in their error messages."""
from __future__ import annotations

from pathlib import Path

import pytest

SENTINELS = {
    "PatientName": "Zzsentinel^Patientname",
    "PatientID": "SENTINELPID4242",
    "PatientBirthDate": "18880808",
    "AccessionNumber": "SNTLACC77",
    "InstitutionName": "Sentinel Institution Xq",
    "ReferringPhysicianName": "Zzsentinel^Referrer",
    "PerformingPhysicianName": "Zzsentinel^Performer",
    "OperatorsName": "Zzsentinel^Operator",
    "StudyInstanceUID": "1.2.826.0.1.3680043.9.999111",
    # a leading-zero component: not conformant, and pydicom's warning would print the value
    "SeriesInstanceUID": "1.2.826.0.1.3680043.10.054321",
    "SOPInstanceUID": "1.2.826.0.1.3680043.9.999333",
    "FrameOfReferenceUID": "1.2.826.0.1.3680043.10.0777",
    "StudyDate": "18990909",
}
#: planted by this test after generation (tags outside IDENTIFYING_TAGS, free text, a private tag)
EXTRA = {"SeriesDescription": "SNTLDESC Qz chest", "ImageComments": "SNTLCOMMENT Qz", "private": "SNTLPRIVATE Qz",
         "other_id": "SNTLOTHERID77"}
#: what the renamed folders and files carry
NAME_NEEDLES = ["LAST^FIRST0", "_MRN0", "CT THORAX", "IM_MRN", "SMITH^JOHN", "MRN999"]


def _needles() -> list[bytes]:
    out = []
    for value in [*SENTINELS.values(), *EXTRA.values()]:
        out.append(value.encode())
        if "^" in value:  # the name parts on their own, too
            out += [part.encode() for part in value.split("^")]
    return out + [n.encode() for n in NAME_NEEDLES]


def _plant_and_rename(images: Path) -> None:
    """Extra sentinels in every file, then PACS-style names for folders and files."""
    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    from data_prep.dicom import quiet_pydicom

    with quiet_pydicom():
        for p in sorted(images.rglob("*.dcm")):
            ds = pydicom.dcmread(p)
            ds.SeriesDescription = EXTRA["SeriesDescription"]
            ds.ImageComments = EXTRA["ImageComments"]
            block = ds.private_block(0x0011, "SNTL CREATOR", create=True)
            block.add_new(0x01, "LO", EXTRA["private"])
            item = Dataset()
            item.PatientID = EXTRA["other_id"]
            ds.OtherPatientIDsSequence = Sequence([item])
            ds.save_as(p, enforce_file_format=True)
    for case in sorted(images.glob("case_*")):
        i = int(case.name.split("_")[1])
        for k, f in enumerate(sorted(case.rglob("*.dcm"))):
            f.rename(f.with_name(f"IM_MRN{i:03d}_{k:04d}.dcm"))
        for series in sorted(case.rglob("series_*")):
            series.rename(series.with_name("CT THORAX" if series.name == "series_2" else f"OTHER {series.name[-1]}"))
        case.rename(case.with_name(f"LAST^FIRST{i:03d}_MRN{i:03d}"))


# the planted UIDs are deliberately non-conformant; pydicom warns about them while the test reads its input
@pytest.mark.filterwarnings("ignore:Invalid value for VR UI:UserWarning")
def test_no_identifier_in_any_output(tmp_path, capfd, caplog):
    import data_prep
    from pipeline.config import load_config
    from pipeline.demo import demo_config_path
    from pipeline.errors import PipelineError
    from pipeline.evaluate import run_evaluate
    from pipeline.predict import run_predict
    from pipeline.train import run_train

    paths = data_prep.generate_ct(tmp_path / "input", n_patients=16, seed=3, sentinels=SENTINELS)
    images = Path(paths["images"])
    _plant_and_rename(images)
    # broken files among them: a slice cut inside its pixel data, and a file that only claims to be DICOM
    victim = sorted((images / "LAST^FIRST001_MRN001" / "study_1" / "CT THORAX").glob("*.dcm"))[7]
    victim.write_bytes(victim.read_bytes()[:-500])
    (images / "SMITH^JOHN_MRN999.dcm").write_bytes(b"not a DICOM file at all")
    planted = b"".join(p.read_bytes() + str(p).encode() for p in images.rglob("*") if p.is_file())
    assert all(needle in planted for needle in _needles())  # the search below can fail
    capfd.readouterr()  # what generating and planting printed or logged is not under test
    caplog.clear()

    out = tmp_path / "out"
    messages: list[str] = []
    options = data_prep.PrepareOptions(salt="test-salt-not-secret", ct_image_size=32, workers=1)
    with pytest.raises(data_prep.DataPrepError) as stop:
        data_prep.prepare_ct(images, paths["labels"], out / "stopped", options)
    messages.append(str(stop.value))
    assert "input file" in str(stop.value) and "not a DICOM file" in str(stop.value)
    skip = data_prep.PrepareOptions(salt="test-salt-not-secret", ct_image_size=32, workers=1, on_error="skip")
    cache = data_prep.prepare_ct(images, paths["labels"], out / "cache", skip)
    quarantine = (cache / "quarantine.csv").read_text()
    assert "not a DICOM file" in quarantine and "pixel data cannot be decoded" in quarantine
    assert ", slice " in quarantine  # the broken slice is named by its series pseudonym and position

    cfg = load_config(demo_config_path("ct"), [
        f"data.cache={cache}", f"train.output_dir={out / 'runs'}", "train.epochs=1", "data.image_size=32",
        "data.num_workers=0", "train.batch_size=8", f"tracking.uri=sqlite:///{out / 'mlflow.db'}", "eval.n_bootstrap=100",
    ])
    run = run_train(cfg)
    run_evaluate(str(run.run_dir), split="test", tracking_uri=cfg.tracking.uri)
    with pytest.raises(PipelineError) as none_read:  # every input is DICOM: listed by position, none predicted
        run_predict(str(run.run_dir), images, out_csv=out / "predictions.csv")
    messages.append(str(none_read.value))
    errors_csv = (out / "predictions.errors.csv").read_text()
    assert "input 1 of" in errors_csv and "DICOM input is not supported" in errors_csv

    printed = "".join([*capfd.readouterr(), caplog.text, *messages]).encode()
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "mlflow.db" for p in files) and any(p.suffix == ".html" for p in files)
    found = []
    for needle in _needles():
        if needle in printed:
            found.append(f"stdout/stderr/messages: {needle!r}")
        for p in files:
            if needle in p.read_bytes() or needle in str(p.relative_to(out)).encode():
                found.append(f"{p.relative_to(out)}: {needle!r}")
    assert found == []
