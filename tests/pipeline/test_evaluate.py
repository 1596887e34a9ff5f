"""Tests of `ecl evaluate` (pipeline/evaluate.py) on a tiny trained model and generated caches."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score

from data_prep import file_sha256

from pipeline import calibration, metrics, stats

import _evalkit as evalkit  # noqa: E402  registered by conftest.py



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
    from pipeline.inference import predict_split
    from data_prep import open_cache

    m = evaluated["result"].metrics
    tm = load_trained_model(evaluated["run_dir"])
    assert tm.temperature == pytest.approx(m["temperature"])
    # beside the checkpoint, never in it: evaluation does not rewrite a trained model
    assert json.loads((evaluated["run_dir"] / "calibration.json").read_text())["temperature"] == pytest.approx(m["temperature"])
    assert file_sha256(tm.checkpoint_path) == evaluated["checkpoint_sha"]
    assert load_checkpoint(tm.checkpoint_path).legacy_temperature is None
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
    # the servable model (tests/pipeline/test_serving.py serves it) carries the temperature just fitted
    assert run.data.tags["ecl.servable"] == f"runs:/{result.run_id}/servable"
    import mlflow

    mlflow.set_tracking_uri(evaluated["uri"])
    folder = Path(mlflow.artifacts.download_artifacts(f"runs:/{result.run_id}/servable"))
    meta = json.loads((folder / "data" / "classifier" / "servable.json").read_text())
    assert meta["temperature"] == pytest.approx(result.metrics["temperature"])
    assert meta["class_names"] == evalkit.CLASSES


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
    from mlflow import MlflowClient

    tags = MlflowClient(tracking_uri=uri).get_run(result.run_id).data.tags
    assert tags["ecl.servable"].startswith("not logged: CT models are not served")
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["mlflow"]["run_id"] == result.run_id


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true:UserWarning")  # sklearn, on purpose
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
    ckpt = load_checkpoint(run / BEST)
    ckpt.config["data"]["cache"] = str(tmp_path / "nowhere")
    save_checkpoint(run / BEST, ckpt)
    with pytest.raises(DataPrepError, match="nowhere"):
        run_evaluate(str(run))


# ---------------------------------------------------------------- headline, operating points, selective, card
def _val_probs(evaluated):
    from data_prep import open_cache
    from pipeline.checkpoint import load_trained_model
    from pipeline.inference import predict_split

    tm = load_trained_model(evaluated["run_dir"])
    val = predict_split(tm.network, open_cache(evaluated["cache"]), "val", tm.config.data, 8)
    keep = val.labels >= 0
    return calibration.apply_temperature(val.logits[keep], tm.temperature), val.labels[keep]


def test_evaluate_operating_points_from_val_held_on_test(evaluated, one_thread):
    from sklearn.metrics import roc_curve

    out = evaluated["result"].out_dir
    payload = json.loads((out / "metrics.json").read_text())
    _, probs, labels, names = _saved(out)
    pv, yv = _val_probs(evaluated)
    m = payload["metrics"]
    for c, name in enumerate(names[:3]):  # DF has no test image: no operating point
        fpr, tpr, thr = roc_curve(yv == c, pv[:, c], drop_intermediate=False)
        for row in payload["operating_points"][name]["at_specificity"]:
            # on val: the sklearn ROC point with the highest sensitivity at specificity >= target
            ok = 1 - fpr >= row["target"]
            assert row["val_sensitivity"] == pytest.approx(tpr[ok].max())
            assert row["threshold"] == pytest.approx(thr[ok][-1])
            called = probs[:, c] >= row["threshold"]  # held on test, by hand
            assert row["sensitivity"] == pytest.approx(called[labels == c].mean())
            assert row["specificity"] == pytest.approx((~called[labels != c]).mean())
            tag = round(100 * row["target"])
            assert m[f"sensitivity_at_specificity_{tag}/{name}"] == pytest.approx(row["sensitivity"])
    assert payload["operating_points"]["DF"] is None
    assert "Operating points" in (out / "report.html").read_text()


def test_evaluate_selective_prediction_by_hand(evaluated):
    out = evaluated["result"].out_dir
    payload = json.loads((out / "metrics.json").read_text())
    _, probs, labels, _ = _saved(out)
    # ground_truth.csv order = metrics order; keep the ceil(0.8 N) most confident (stable order)
    order = np.argsort(-probs.max(1), kind="stable")
    kept = order[: int(np.ceil(0.8 * len(labels)))]
    expected = balanced_accuracy_score(labels[kept], probs[kept].argmax(1))
    assert payload["selective"]["balanced_accuracy"] == pytest.approx(expected)
    assert payload["metrics"]["selective/balanced_accuracy_at_coverage_80"] == pytest.approx(expected)
    errors = (probs.argmax(1) != labels)[order]
    aurc = np.mean(np.cumsum(errors) / np.arange(1, len(labels) + 1))
    assert payload["metrics"]["selective/aurc"] == pytest.approx(aurc)
    html = (out / "report.html").read_text()
    assert f"balanced accuracy\n<b>{expected:.3f}</b>" in html


def test_evaluate_prints_headline_and_writes_model_card(evaluated):
    result = evaluated["result"]
    out = result.out_dir
    m = result.metrics
    text = result.summary
    line = next(ln for ln in text.splitlines() if ln.startswith("balanced accuracy "))
    assert line.split()[2:] == [f"{m['balanced_accuracy']:.3f}", f"[{m['balanced_accuracy_ci_low']:.3f},",
                                f"{m['balanced_accuracy_ci_high']:.3f}]"]
    assert f"{m['ece']:.4f}" in text and f"{m['ece_calibrated']:.4f}" in text
    for name in ("MEL", "NV", "BCC"):
        assert any(line.startswith(name) and f"{m[f'recall/{name}']:.3f}" in line for line in text.splitlines())

    card = (out / "model_card.md").read_text()
    assert "## Intended use" in card and "## Known limitations" in card and "No test image of DF" in card
    # subgroup row: balanced accuracy and CI recomputed from the saved predictions and the manifest
    _, probs, labels, _ = _saved(out)
    truth = pd.read_csv(out / "ground_truth.csv", dtype={"image": str})
    manifest = pd.read_csv(evaluated["cache"] / "manifest.csv", dtype=str, keep_default_na=False)
    sex = truth["image"].map(dict(zip(manifest["image"], manifest["sex"]))).to_numpy()
    mask = sex == "female"
    bacc = balanced_accuracy_score(labels[mask], probs[mask].argmax(1))
    ci = stats.bootstrap_ci(probs[mask], labels[mask], n_boot=200, seed=0)["balanced_accuracy"]
    assert f"| sex | female | {mask.sum()} | {bacc:.3f} | [{ci['lo']:.3f}, {ci['hi']:.3f}] |" in card
    html = result.report_path.read_text()
    assert "Model card" in html
    assert f'<td class="name">female</td><td>{mask.sum()}</td><td>{bacc:.3f}</td><td>[{ci["lo"]:.3f}, {ci["hi"]:.3f}]</td>' in html

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=evaluated["uri"])
    assert "model_card.md" in {a.path for a in client.list_artifacts(result.run_id)}
    logged = client.get_run(result.run_id).data.metrics
    assert logged["test/selective/aurc"] == pytest.approx(m["selective/aurc"])
    assert logged["test/sensitivity_at_specificity_90/MEL"] == pytest.approx(m["sensitivity_at_specificity_90/MEL"])


def test_evaluate_finishes_when_the_optimum_fails(tmp_path, one_thread, monkeypatch, capfd):
    """Issue 11: a geometry solver failure is a sentence and a warning, never an aborted evaluation."""
    from pipeline import geometry
    from pipeline.evaluate import run_evaluate

    def fail(*args, **kwargs):
        raise geometry.OptimumError("no solver produced a verified optimum (stand-in: every solver failed)")

    monkeypatch.setattr(geometry, "solve_optimum", fail)
    cache = evalkit.build_cache(tmp_path / "cache")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_dir = evalkit.make_run(cache, tmp_path / "runs", uri, steps=4)
    capfd.readouterr()
    result = run_evaluate(str(run_dir), split="val", out_dir=tmp_path / "eval")
    payload = json.loads((result.out_dir / "metrics.json").read_text())
    reason = "no solver produced a verified optimum (stand-in: every solver failed)"
    assert f"Geometry: the optimum G* could not be computed ({reason})." in payload["warnings"]
    geo = payload["geometry"]
    assert geo["metrics"]["backbone/FC"] is not None and "projection/gram_dist_simplex" in geo["metrics"]
    assert "projection/gram_dist_optimal" not in geo["metrics"]
    [sentence] = [s for s in geo["sentences"] if "could not be computed" in s]
    html = (result.out_dir / "report.html").read_text(encoding="utf-8")
    assert "could not be computed, so the projection is compared with the regular simplex only" in html
    assert sentence.endswith(reason)
    out, err = capfd.readouterr()
    # no solver chatter in the terminal; the reason appears once, as the headline's own warning line
    assert "complementary slackness" not in out + err
    assert [ln for ln in (out + err).splitlines() if reason in ln] == [
        f"Warning: Geometry: the optimum G* could not be computed ({reason})."]


@pytest.mark.parametrize("method", ["ce", "supcon", "ecl"])
def test_evaluate_geometry_sentences_are_true_for_the_method(tmp_path, one_thread, method, capfd):
    """Real training runs: heads follow the method, and every geometry sentence matches its numbers."""
    from pipeline.checkpoint import load_trained_model
    from pipeline.evaluate import run_evaluate
    from pipeline.geometry import measure_geometry

    cache = evalkit.build_cache(tmp_path / "cache")
    trained = evalkit.train_tiny(cache, tmp_path / "runs", f"sqlite:///{tmp_path}/mlflow.db", method=method)
    network = load_trained_model(trained.run_dir).network
    assert (network.projection is not None) == (method != "ce")
    assert network.has_prototypes == (method == "ecl")  # supcon never uses prototypes: no head
    capfd.readouterr()
    result = run_evaluate(str(trained.run_dir), split="val", out_dir=tmp_path / "eval")
    out, err = capfd.readouterr()
    assert "complementary slackness" not in out + err and "CLARABEL" not in out + err  # no solver chatter
    payload = json.loads((result.out_dir / "metrics.json").read_text())
    m, sentences = payload["geometry"]["metrics"], payload["geometry"]["sentences"]
    text = " ".join(sentences)
    assert not any("could not be computed" in w for w in payload["warnings"])
    # backbone: centred Gram against the simplex, stated with its own number, never against G*
    assert f"distance {m['backbone/centred_gram_dist_simplex']:.3f} from a regular simplex" in text
    assert "its features are non-negative (post-ReLU)" in text  # test_resnet ends in a ReLU and pooling
    assert not any(k.startswith("backbone/") and "optimal" in k for k in m)
    assert ("backbone/alignment" in m) == (method == "ecl")
    fc = [s for s in sentences if s.startswith("Within-class spread")][0]
    assert f"is {m['backbone/FC']:.3g} in the backbone" in fc
    if method == "ce":
        assert not any(k.startswith(("projection/", "optimum/")) for k in m)
        assert "projection" not in fc and "G* (" not in text and "closer to" not in text
        assert sentences[-1].startswith("This network has no projection head")
        return
    assert f"and {m['projection/FC']:.3g} in the projection" in fc
    assert m["optimum/objective_ratio_to_simplex"] <= 1 and m["optimum/certified_gap"] <= 1e-4
    [closer] = [s for s in sentences if s.startswith("The normalised projection class means are closer")]
    nearest = "imbalance-aware optimum" if m["projection/gram_dist_optimal"] < m["projection/gram_dist_simplex"] \
        else "regular simplex"
    assert f"closer to the {nearest} " in closer
    assert f"{m['projection/gram_dist_simplex']:.3f} to the simplex" in closer
    # the projection numbers are those of the normalised z means, recomputed here
    pred_z, pred_y = [], []
    with torch.no_grad():
        from pipeline.data import create_eval_loader
        from pipeline.models import model_data_config
        from data_prep import open_cache

        c = open_cache(cache)
        cfg = load_trained_model(trained.run_dir).config
        for x, y, _ in create_eval_loader(c, "val", cfg.data, model_data_config(network), 64):
            pred_z.append(network(x, return_all=True)["z"])
            pred_y.append(y)
    direct = measure_geometry(torch.cat(pred_z).numpy(), torch.cat(pred_y).numpy(), num_classes=4)
    assert m["projection/gram_dist_simplex"] == pytest.approx(direct["gram_dist_simplex"], rel=1e-4, abs=1e-6)


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


def test_evaluate_report_shows_where_the_model_looked(evaluated):
    out = evaluated["result"].out_dir
    html = (out / "report.html").read_text()
    section = html[html.index("<h2>Where the model looked</h2>"):]
    section = section[: section.index("<h2>", 5)]
    # one Grad-CAM figure per class present in the test split (DF has none), also written beside the report
    assert section.count('<img src="data:image/png;base64,') == 3
    assert sorted(p.name for p in out.glob("saliency_*.png")) == ["saliency_0.png", "saliency_1.png", "saliency_2.png"]
    from data_prep import open_cache

    names = [str(v) for v in open_cache(evaluated["cache"]).manifest["image"]]
    assert names and not [v for v in names if v in section]  # captions name cache positions, never images
