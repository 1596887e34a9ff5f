"""Tests of `ecl evaluate` (pipeline/evaluate.py) on a tiny trained model and generated caches."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score

from data_prep import file_sha256

from pipeline import calibration, metrics, stats

_spec = importlib.util.spec_from_file_location("_evalkit", Path(__file__).with_name("_evalkit.py"))
evalkit = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(evalkit)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread: on 2 shared cores, two threads contend and run ~30x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, one_thread):
    from pipeline.evaluate import run_evaluate

    work = tmp_path_factory.mktemp("evaluate")
    cache = evalkit.build_cache(work / "cache")
    uri = f"sqlite:///{work}/mlflow.db"
    run_dir = evalkit.make_run(cache, work / "runs", uri, steps=12)
    checkpoint_sha = file_sha256(run_dir / "checkpoint-best.pt")
    result = run_evaluate(str(run_dir), split="test")
    return {"result": result, "run_dir": run_dir, "uri": uri, "cache": cache, "checkpoint_sha": checkpoint_sha}


def _saved(out: Path) -> tuple[pd.DataFrame, np.ndarray, np.ndarray, list[str]]:
    pred = pd.read_csv(out / "predictions.csv", dtype={"image": str})
    truth = pd.read_csv(out / "ground_truth.csv", dtype={"image": str})
    names = list(pred.columns[1:])
    merged = truth.merge(pred, on="image", suffixes=("_gt", ""))
    return pred, merged[names].to_numpy(), merged[[f"{c}_gt" for c in names]].to_numpy().argmax(1), names


def test_evaluate_writes_every_output_tiny_model(evaluated):
    out = evaluated["result"].out_dir
    assert out == evaluated["run_dir"] / "eval-test"
    for name in ("metrics.json", "predictions.csv", "ground_truth.csv", "report.html", "confusion.png",
                 "recall.png", "reliability.png", "reliability_calibrated.png", "reliability_classes.png"):
        assert (out / name).is_file(), name
        assert (out / name).stat().st_size > 0
    assert (out / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pred, _, _, names = _saved(out)
    assert names == evalkit.CLASSES
    assert len(pred) == 26 + 2  # every test image, the two unlabelled ones included
    assert np.allclose(pred[names].to_numpy().sum(axis=1), 1.0)
    assert len(pd.read_csv(out / "ground_truth.csv")) == 26  # labelled only


def test_evaluate_metrics_equal_pipeline_metrics_on_saved_predictions(evaluated):
    out = evaluated["result"].out_dir
    payload = json.loads((out / "metrics.json").read_text())
    m = payload["metrics"]
    _, probs, labels, names = _saved(out)
    assert m["balanced_accuracy"] == pytest.approx(metrics.balanced_accuracy(probs, labels), abs=1e-12)
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, probs.argmax(1)), abs=1e-12)
    assert m["accuracy"] == pytest.approx(metrics.accuracy(probs, labels), abs=1e-12)
    assert m["ece_calibrated"] == pytest.approx(metrics.expected_calibration_error(probs, labels, 15), abs=1e-9)
    assert m["brier_calibrated"] == pytest.approx(metrics.brier_score(probs, labels), abs=1e-9)
    assert m["nll_calibrated"] == pytest.approx(metrics.nll(probs, labels), abs=1e-9)
    recall = metrics.per_class_recall(probs, labels)
    for c, name in enumerate(names[:3]):
        assert m[f"recall/{name}"] == pytest.approx(recall[c], abs=1e-12)
    ci = stats.bootstrap_ci(probs, labels, n_boot=200, seed=0, class_names=names)
    assert m["balanced_accuracy_ci_low"] == pytest.approx(ci["balanced_accuracy"]["lo"], abs=1e-12)
    assert m["balanced_accuracy_ci_high"] == pytest.approx(ci["balanced_accuracy"]["hi"], abs=1e-12)
    assert m["recall_ci_low/MEL"] == pytest.approx(ci["recall"]["MEL"]["lo"], abs=1e-12)
    # temperature scaling changes confidence, never the predicted class
    assert m["accuracy"] == pytest.approx(payload["report"]["overall"]["accuracy"])
    assert payload["uncalibrated"]["accuracy"] == pytest.approx(m["accuracy"])
    assert evaluated["result"].metrics["balanced_accuracy"] == m["balanced_accuracy"]


def test_evaluate_absent_class_is_null_not_zero(evaluated):
    out = evaluated["result"].out_dir
    m = json.loads((out / "metrics.json").read_text())["metrics"]
    for key in ("recall/DF", "auroc/DF", "recall_ci_low/DF", "recall_ci_high/DF"):
        assert key in m and m[key] is None, key
    html = (out / "report.html").read_text()
    row = html[html.index('<td class="name">DF</td><td>0</td>'):]
    row = row[: row.index("</tr>")]
    assert 'class="na">n/a' in row
    assert "nan" not in row.lower().replace("n/a", "")


def test_evaluate_stores_temperature_fitted_on_val(evaluated, one_thread):
    from pipeline.checkpoint import load_checkpoint, load_trained_model
    from pipeline.evaluate import predict_split
    from data_prep import open_cache

    m = evaluated["result"].metrics
    tm = load_trained_model(evaluated["run_dir"])
    assert tm.temperature == pytest.approx(m["temperature"])
    # beside the checkpoint, never in it: evaluation does not rewrite a trained model
    assert json.loads((evaluated["run_dir"] / "calibration.json").read_text())["temperature"] == pytest.approx(m["temperature"])
    assert file_sha256(tm.checkpoint_path) == evaluated["checkpoint_sha"]
    assert load_checkpoint(tm.checkpoint_path)["temperature"] == 1.0
    assert abs(m["temperature"] - 1.0) > 1e-3
    val = predict_split(tm.network, open_cache(evaluated["cache"]), "val", tm.config.data, 8)
    assert m["temperature"] == pytest.approx(calibration.fit_temperature(val.logits, val.labels), rel=1e-5)
    # scaling on val lowers val NLL (it minimises it)
    assert calibration.temperature_nll(val.logits, val.labels, m["temperature"]) <= \
        calibration.temperature_nll(val.logits, val.labels, 1.0) + 1e-12


def test_evaluate_logs_metrics_and_report_to_training_run(evaluated):
    from mlflow import MlflowClient

    result = evaluated["result"]
    client = MlflowClient(tracking_uri=evaluated["uri"])
    run = client.get_run(result.run_id)
    assert run.data.tags["ecl.run_dir"] == str(evaluated["run_dir"].resolve())  # the training run, re-opened
    logged = run.data.metrics
    assert logged["test/balanced_accuracy"] == pytest.approx(result.metrics["balanced_accuracy"])
    assert logged["test/recall/MEL"] == pytest.approx(result.metrics["recall/MEL"])
    assert logged["test/ece_calibrated"] == pytest.approx(result.metrics["ece_calibrated"])
    assert "test/recall/DF" not in logged  # n/a is not logged as a number
    assert any(k.startswith("test/geometry/") for k in logged)
    artifacts = {a.path for a in client.list_artifacts(result.run_id, "report")}
    assert "report/report.html" in artifacts
    assert {a.path for a in client.list_artifacts(result.run_id, "eval-test")} >= {
        "eval-test/metrics.json", "eval-test/predictions.csv", "eval-test/ground_truth.csv"}


def test_calibration_travels_with_the_mlflow_run(evaluated, tmp_path, monkeypatch):
    """Another machine: no run folder, only the MLflow store; the model comes with its fitted T."""
    import tempfile

    from mlflow import MlflowClient

    from pipeline import tracking
    from pipeline.checkpoint import BEST, load_trained_model

    result, run_dir, uri = evaluated["result"], evaluated["run_dir"], evaluated["uri"]
    client = MlflowClient(tracking_uri=uri)
    assert "calibration/calibration.json" in {a.path for a in client.list_artifacts(result.run_id, "calibration")}
    experiment = client.get_experiment(client.get_run(result.run_id).info.experiment_id).name
    with tracking.start_run(uri, experiment, run_id=result.run_id):
        tracking.log_artifact(run_dir / BEST, artifact_path="checkpoints")  # as training logs it
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    away = run_dir.with_name("moved-away")
    run_dir.rename(away)
    try:
        tm = load_trained_model(result.run_id, tracking_uri=uri)
    finally:
        away.rename(run_dir)
    assert tm.checkpoint_path.is_relative_to(tmp_path)
    assert tm.temperature == pytest.approx(result.metrics["temperature"]) and abs(tm.temperature - 1.0) > 1e-3


def test_evaluate_ct_cache_reports_patient_level(tmp_path, one_thread):
    from pipeline.evaluate import run_evaluate

    cache = evalkit.build_cache(tmp_path / "ct-cache", seed=1, kind="ct")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_dir = evalkit.make_run(cache, tmp_path / "runs", uri, steps=4, mlflow_run=False)
    result = run_evaluate(str(run_dir), split="test", out_dir=tmp_path / "eval", n_bootstrap=100)
    m = result.metrics
    # recompute the per-patient balanced accuracy from the saved per-sample predictions
    manifest = pd.read_csv(cache / "manifest.csv", dtype=str, keep_default_na=False)
    _, probs, labels, names = _saved(tmp_path / "eval")
    truth = pd.read_csv(tmp_path / "eval" / "ground_truth.csv", dtype={"image": str})
    patient = truth["image"].map(dict(zip(manifest["image"], manifest["patient"]))).to_numpy()
    keys = sorted(set(zip(patient, labels)))
    p = np.stack([probs[(patient == k) & (labels == y)].mean(0) for k, y in keys])
    y = np.array([y for _, y in keys])
    assert m["patient/balanced_accuracy"] == pytest.approx(metrics.balanced_accuracy(p, y), abs=1e-12)
    assert (tmp_path / "eval" / "predictions_patient.csv").is_file()
    assert "Per-patient results" in result.report_path.read_text()
    assert result.run_id is not None  # no training run: a new evaluation run was started
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["mlflow"]["run_id"] == result.run_id


def test_subgroup_analysis_counts_and_flags_small_groups():
    from pipeline.evaluate import subgroup_analysis

    rng = np.random.default_rng(3)
    n = 60
    labels = rng.integers(0, 3, n)
    probs = rng.dirichlet(np.ones(3), n)
    rows = pd.DataFrame({"sex": rng.choice(["female", "male", ""], n, p=[0.5, 0.45, 0.05]),
                         "age_approx": rng.choice([10.0, 35.0, 60.0, 85.0, np.nan], n)})
    groups = subgroup_analysis(rows, probs, labels, ["A", "B", "C"], min_size=15)
    assert [g["attribute"] for g in groups] == ["sex", "age"]
    sex = {r["value"]: r for r in groups[0]["rows"]}
    for value, r in sex.items():
        mask = (rows["sex"].replace("", "unknown") == value).to_numpy()
        assert r["n"] == mask.sum()
        assert r["too_small"] == (mask.sum() < 15)
        present = np.unique(labels[mask])
        assert r["balanced_accuracy"] == pytest.approx(
            balanced_accuracy_score(labels[mask], probs[mask].argmax(1)) if len(present) else np.nan)
    assert sum(r["n"] for r in groups[1]["rows"]) == n
    assert [r["value"] for r in groups[1]["rows"]][:4] == ["<30", "30-49", "50-69", "70+"]


@pytest.mark.parametrize("age,band", [(29.9, "<30"), (30, "30-49"), (49, "30-49"), (50, "50-69"), (70, "70+"),
                                      (None, "unknown"), ("n/a", "unknown"), (float("nan"), "unknown")])
def test_age_band_edges(age, band):
    from pipeline.evaluate import age_band

    assert age_band(age) == band


def test_evaluate_missing_cache_names_the_folder(tmp_path, evaluated):
    import shutil

    from data_prep import DataPrepError
    from pipeline.checkpoint import BEST, load_checkpoint, save_checkpoint
    from pipeline.evaluate import run_evaluate

    run = tmp_path / "moved"
    shutil.copytree(evaluated["run_dir"], run, ignore=shutil.ignore_patterns("eval-*"))
    state = load_checkpoint(run / BEST)
    state["config"]["data"]["cache"] = str(tmp_path / "nowhere")
    save_checkpoint(run / BEST, state)
    with pytest.raises(DataPrepError, match="nowhere"):
        run_evaluate(str(run))


def test_evaluate_read_only_run_folder_and_full_disk_are_handled(evaluated, tmp_path, monkeypatch, capsys):
    """A shared, read-only model store: evaluation still runs (output elsewhere) and says T was not stored
    beside the model; a full disk gives one line naming the file."""
    import errno

    import data_prep.io as dio
    from pipeline.cli import main

    run_dir = evaluated["run_dir"]
    real = dio._create_temp

    def read_only(path):
        if path.parent == run_dir:
            raise PermissionError(errno.EROFS, "Read-only file system", str(path))
        return real(path)

    monkeypatch.setattr(dio, "_create_temp", read_only)
    before = (run_dir / "calibration.json").read_text()
    assert main(["evaluate", "--run", str(run_dir), "--out", str(tmp_path / "ev"), "--n-bootstrap", "100"]) == 0
    assert (run_dir / "calibration.json").read_text() == before
    assert "is read-only: the fitted temperature" in (tmp_path / "ev" / "report.html").read_text()

    def full(path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(dio, "_create_temp", full)
    capsys.readouterr()
    assert main(["evaluate", "--run", str(run_dir), "--out", str(tmp_path / "ev2"), "--n-bootstrap", "100"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [x for x in err.splitlines() if "error" in x.lower()]  # tqdm bars aside, one line
    assert line.startswith("ecl evaluate: error: cannot write ") and "no space left on the device" in line
