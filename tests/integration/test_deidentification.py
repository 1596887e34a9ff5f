"""No patient identifier leaves data_prep: sentinels planted in every identifying DICOM tag of a
generated cohort must not appear in any file that prepare, train and evaluate write (caches,
manifests, logs, run folders, the MLflow store and its artifacts), nor in what they print."""
from __future__ import annotations

from pathlib import Path

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
    "SeriesInstanceUID": "1.2.826.0.1.3680043.9.999222",
    "SOPInstanceUID": "1.2.826.0.1.3680043.9.999333",
    "StudyDate": "18990909",
}


def _needles(prefix_index: int) -> list[bytes]:
    out = []
    for tag, value in SENTINELS.items():
        out.append(value.encode())
        if "^" in value:  # the name parts on their own, too
            out += [part.encode() for part in value.split("^")]
    return out


def test_no_identifier_in_any_output(tmp_path, capfd):
    import data_prep
    from pipeline.config import load_config
    from pipeline.demo import demo_config_path
    from pipeline.evaluate import run_evaluate
    from pipeline.train import run_train

    paths = data_prep.generate_ct(tmp_path / "input", n_patients=16, seed=3, sentinels=SENTINELS)
    planted = b"".join(p.read_bytes() for p in Path(paths["images"]).rglob("*") if p.is_file())
    assert all(needle in planted for needle in _needles(0))  # the search below can fail
    out = tmp_path / "out"
    options = data_prep.PrepareOptions(salt="test-salt-not-secret", ct_image_size=32, workers=1)
    cache = data_prep.prepare_ct(paths["images"], paths["labels"], out / "cache", options)
    cfg = load_config(demo_config_path("ct"), [
        f"data.cache={cache}", f"train.output_dir={out / 'runs'}", "train.epochs=1", "data.image_size=32",
        "data.num_workers=0", "train.batch_size=8", f"tracking.uri=sqlite:///{out / 'mlflow.db'}", "eval.n_bootstrap=100",
    ])
    run = run_train(cfg)
    run_evaluate(str(run.run_dir), split="test", tracking_uri=cfg.tracking.uri)

    printed = "".join(capfd.readouterr()).encode()
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "mlflow.db" for p in files) and any(p.suffix == ".html" for p in files)
    found = []
    for needle in _needles(0):
        if needle in printed:
            found.append(f"stdout/stderr: {needle!r}")
        for p in files:
            if needle in p.read_bytes():
                found.append(f"{p.relative_to(out)}: {needle!r}")
    assert found == []
