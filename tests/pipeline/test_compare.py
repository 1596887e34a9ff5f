"""Tests of `ecl compare` (pipeline/compare.py): CIs, paired bootstrap, HTML and MLflow run."""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import metrics, stats

_spec = importlib.util.spec_from_file_location("_evalkit", Path(__file__).with_name("_evalkit.py"))
evalkit = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(evalkit)

NAMES = ["A", "B", "C"]


def _eval_folder(folder: Path, ids: list[str], labels: np.ndarray, probs: np.ndarray, method: str) -> Path:
    folder.mkdir(parents=True)
    metrics.write_isic_csv(folder / "predictions.csv", ids, probs, NAMES)
    metrics.write_isic_csv(folder / "ground_truth.csv", ids, labels, NAMES)
    (folder / "metrics.json").write_text(json.dumps({"method": method}))
    return folder


def _noisy(labels: np.ndarray, skill: float, rng: np.random.Generator) -> np.ndarray:
    logits = rng.normal(size=(len(labels), len(NAMES)))
    logits[np.arange(len(labels)), labels] += skill
    e = np.exp(logits)
    return e / e.sum(1, keepdims=True)


@pytest.fixture()
def two_runs(tmp_path):
    rng = np.random.default_rng(7)
    labels = rng.choice(3, size=120, p=[0.6, 0.3, 0.1])
    ids = [f"IMG_{i:04d}" for i in range(120)]
    pa, pb = _noisy(labels, 1.0, rng), _noisy(labels, 2.0, rng)
    a = _eval_folder(tmp_path / "run-ce" / "eval-test", ids, labels, pa, "ce")
    # run B lists its images in another order and has one extra image the others lack
    order = rng.permutation(120)
    extra_ids = [ids[i] for i in order] + ["IMG_9999"]
    extra_probs = np.vstack([pb[order], [[0.2, 0.3, 0.5]]])
    extra_labels = np.append(labels[order], 0)
    b = _eval_folder(tmp_path / "run-ecl" / "eval-test", extra_ids, extra_labels, extra_probs, "ecl")
    return a.parent, b.parent, labels, pa, pb


def test_compare_two_runs_writes_html_and_paired_difference(two_runs, tmp_path):
    from mlflow import MlflowClient

    from pipeline.compare import run_compare

    run_a, run_b, labels, pa, pb = two_runs
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    html_path = run_compare([str(run_a), str(run_b)], tracking_uri=uri, out_dir=tmp_path / "cmp", n_bootstrap=500)
    assert html_path == tmp_path / "cmp" / "compare.html"
    payload = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert payload["n_samples"] == 120 and payload["reference"] == "run-ce"
    ref, other = payload["runs"]
    assert ref["diff"] is None and ref["method"] == "ce" and other["method"] == "ecl"
    d, lo, hi, p = stats.paired_bootstrap_difference(pb, pa, labels, n_boot=500, seed=0)
    assert other["diff"] == pytest.approx(d) and other["diff_ci"] == pytest.approx([lo, hi])
    assert other["p_value"] == pytest.approx(p)
    assert d == pytest.approx(metrics.balanced_accuracy(pb, labels) - metrics.balanced_accuracy(pa, labels))
    ci = stats.bootstrap_ci(pb, labels, n_boot=500, seed=0)
    assert other["ci"] == pytest.approx([ci["balanced_accuracy"]["lo"], ci["balanced_accuracy"]["hi"]])
    assert other["recalls"] == pytest.approx(list(metrics.per_class_recall(pb, labels)))
    assert any("1 images not scored by every run" in w for w in payload["warnings"])

    html = html_path.read_text()
    assert f"{d:.3f}" in html and f"[{lo:.3f}, {hi:.3f}]" in html
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html)
    assert re.search(r'<img[^>]*src="data:image/png;base64,', html)
    assert (tmp_path / "cmp" / "comparison.png").is_file() and (tmp_path / "cmp" / "comparison.csv").is_file()

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("ecl")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.tags["ecl.kind"] == "compare"
    assert run.data.metrics["compare/run-ecl/diff_vs_reference"] == pytest.approx(d)
    assert "report/compare.html" in {a.path for a in client.list_artifacts(run.info.run_id, "report")}


def test_compare_rejects_label_disagreement(two_runs, tmp_path):
    from pipeline.compare import run_compare
    from pipeline.errors import PipelineError

    run_a, _, labels, pa, _ = two_runs
    flipped = labels.copy()
    flipped[5] = (flipped[5] + 1) % 3
    ids = [f"IMG_{i:04d}" for i in range(120)]
    c = _eval_folder(tmp_path / "run-c" / "eval-test", ids, flipped, pa, "la")
    with pytest.raises(PipelineError, match="disagree on the true label of image IMG_0005"):
        run_compare([str(run_a), str(c.parent)], tracking_uri=f"sqlite:///{tmp_path}/m.db", out_dir=tmp_path / "x")


def test_compare_needs_two_runs_and_known_refs(two_runs, tmp_path):
    from pipeline.compare import run_compare
    from pipeline.errors import PipelineError

    run_a = two_runs[0]
    with pytest.raises(PipelineError, match="at least two runs"):
        run_compare([str(run_a)], tracking_uri=f"sqlite:///{tmp_path}/m.db", out_dir=tmp_path / "x")
    with pytest.raises(PipelineError, match="neither an evaluation folder"):
        run_compare([str(run_a), str(tmp_path)], tracking_uri=f"sqlite:///{tmp_path}/m.db", out_dir=tmp_path / "x")


def test_compare_evaluates_run_without_predictions(tmp_path):
    """A run folder with no eval-test/ is evaluated first; its labels match the cache's test split."""
    from data_prep import open_cache
    from pipeline.compare import run_compare

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cache = evalkit.build_cache(tmp_path / "cache", seed=5)
        uri = f"sqlite:///{tmp_path}/mlflow.db"
        run_dir = evalkit.make_run(cache, tmp_path / "runs", uri, steps=3, run_name="trained")
        c = open_cache(cache)
        rows = c.split_indices("test")
        rows = rows[c.labels[rows] >= 0]
        ids = [str(v) for v in c.manifest["image"].to_numpy()[rows]]
        labels = c.labels[rows]
        prior = np.tile(c.class_counts("train") / c.class_counts("train").sum(), (len(rows), 1))
        prior_dir = tmp_path / "prior"
        prior_dir.mkdir()
        metrics.write_isic_csv(prior_dir / "predictions.csv", ids, prior, c.class_names)
        metrics.write_isic_csv(prior_dir / "ground_truth.csv", ids, labels, c.class_names)
        html = run_compare([str(prior_dir), str(run_dir)], tracking_uri=uri, out_dir=tmp_path / "cmp",
                           n_bootstrap=200)
    finally:
        torch.set_num_threads(before)
    assert (run_dir / "eval-test" / "predictions.csv").is_file()
    payload = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    # the constant prior predicts the majority class only: balanced accuracy = 1 / classes present
    assert payload["runs"][0]["balanced_accuracy"] == pytest.approx(1 / 3)
    assert payload["runs"][1]["name"] == "trained"
    assert "Comparison of 2 runs" in html.read_text()
