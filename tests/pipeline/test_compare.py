"""Tests of `ecl compare` (pipeline/compare.py): CIs, paired bootstrap, HTML and MLflow run."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import metrics, stats

import _evalkit as evalkit  # noqa: E402  registered by conftest.py

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
    (tmp_path / "empty").mkdir()  # (a folder *of* run folders stands for them: see the seed tests)
    with pytest.raises(PipelineError, match="neither an evaluation folder"):
        run_compare([str(run_a), str(tmp_path / "empty")], tracking_uri=f"sqlite:///{tmp_path}/m.db",
                    out_dir=tmp_path / "x")


def test_compare_asks_to_evaluate_a_run_without_predictions(tmp_path):
    """compare never evaluates (one stage does not run another): an unevaluated run, given as a folder
    or as an MLflow run id, is a one-line error naming the `ecl evaluate` to run; once evaluated, its
    labels match the cache's test split."""
    from data_prep import open_cache
    from pipeline.compare import run_compare
    from pipeline.errors import PipelineError
    from pipeline.evaluate import run_evaluate

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
        with pytest.raises(PipelineError) as err:
            run_compare([str(prior_dir), str(run_dir)], tracking_uri=uri, out_dir=tmp_path / "cmp", n_bootstrap=200)
        assert str(err.value) == (f"run {run_dir} has no predictions on the test split; run `ecl evaluate --run "
                                  f"{run_dir} --split test` first, then compare")
        assert not (run_dir / "eval-test").exists()  # nothing was evaluated behind the user's back
        from pipeline.checkpoint import load_checkpoint

        run_id = load_checkpoint(run_dir / "checkpoint-best.pt").mlflow_run_id
        with pytest.raises(PipelineError, match=f"run {run_id} has no predictions on the val split; run "
                                                f"`ecl evaluate --run {run_id} --split val` first"):
            run_compare([str(prior_dir), run_id], tracking_uri=uri, split="val", out_dir=tmp_path / "cmp")
        run_evaluate(str(run_dir), split="test", echo=False)
        html = run_compare([str(prior_dir), str(run_dir)], tracking_uri=uri, out_dir=tmp_path / "cmp",
                           n_bootstrap=200)
    finally:
        torch.set_num_threads(before)
    payload = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    # the constant prior predicts the majority class only: balanced accuracy = 1 / classes present
    assert payload["runs"][0]["balanced_accuracy"] == pytest.approx(1 / 3)
    assert payload["runs"][1]["name"] == "trained"
    assert "Comparison of 2 runs" in html.read_text()


# ---------------------------------------------------------------- seeds
def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _seed_sweep(root: Path, labels: np.ndarray, ids: list[str], skills: dict[str, list[float]], temperature: float = 2.0):
    """Run folders as `ecl train` + `ecl evaluate` leave them: config.yaml, eval-test/ with calibrated
    predictions and metrics.json (method, temperature, MLflow info). Returns {(method, seed): raw logits}."""
    from pipeline.config import load_config, save_config

    logits = {}
    for method, per_seed in skills.items():
        for seed, skill in enumerate(per_seed):
            rng = np.random.default_rng(1000 * seed + len(method))
            z = rng.normal(size=(len(labels), len(NAMES))) * 2.0
            z[np.arange(len(labels)), labels] += skill
            run = root / f"{method}-s{seed}"
            folder = run / "eval-test"
            folder.mkdir(parents=True)
            save_config(load_config(base={"method": {"name": method}, "train": {"seed": seed}}), run / "config.yaml")
            probs = _softmax(z / temperature)
            metrics.write_isic_csv(folder / "predictions.csv", ids, probs, NAMES)
            metrics.write_isic_csv(folder / "ground_truth.csv", ids, labels, NAMES)
            (folder / "metrics.json").write_text(json.dumps({"method": "stale", "temperature": temperature}))
            logits[(method, seed)] = z
    return logits


def test_compare_groups_seeds_of_a_run_folder(tmp_path, capsys):
    from sklearn.metrics import balanced_accuracy_score

    from pipeline.compare import run_compare

    rng = np.random.default_rng(3)
    labels = rng.choice(3, size=150, p=[0.5, 0.3, 0.2])
    ids = [f"IMG_{i:04d}" for i in range(150)]
    logits = _seed_sweep(tmp_path / "runs", labels, ids, {"ce": [0.5, 1.5, 1.0], "ecl": [2.0, 2.6, 1.4]})
    html = run_compare([str(tmp_path / "runs")], tracking_uri=f"sqlite:///{tmp_path}/m.db", out_dir=tmp_path / "cmp",
                       n_bootstrap=300)
    payload = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert [r["name"] for r in payload["runs"]] == ["ce-s0", "ce-s1", "ce-s2", "ecl-s0", "ecl-s1", "ecl-s2"]
    assert [r["method"] for r in payload["runs"]] == ["ce"] * 3 + ["ecl"] * 3  # from config.yaml, not metrics.json
    assert [r["seed"] for r in payload["runs"]] == [0, 1, 2] * 2

    # by hand: sklearn's balanced accuracy per run, then mean and sd (n - 1) per method
    bacc = {k: balanced_accuracy_score(labels, z.argmax(1)) for k, z in logits.items()}
    ce, ecl = payload["groups"]
    assert ce["group"] == "ce" and ecl["group"] == "ecl" and ecl["seeds"] == [0, 1, 2]
    for g in (ce, ecl):
        values = [bacc[(g["group"], s)] for s in range(3)]
        assert g["balanced_accuracy"]["mean"] == pytest.approx(np.mean(values))
        assert g["balanced_accuracy"]["sd"] == pytest.approx(np.std(values, ddof=1))
    assert ecl["diff"] == pytest.approx(np.mean([bacc[("ecl", s)] - bacc[("ce", s)] for s in range(3)]))
    probs = {k: _softmax(z / 2.0) for k, z in logits.items()}
    h = stats.hierarchical_bootstrap([[probs[("ce", s)] for s in range(3)], [probs[("ecl", s)] for s in range(3)]],
                                     labels, n_boot=300, seed=0)
    assert ecl["diff_ci"] == pytest.approx([h["differences"][1]["lo"], h["differences"][1]["hi"]])
    assert ecl["p_value"] == pytest.approx(h["differences"][1]["p_value"])
    # the per-seed paired tests stay: ecl seed s against ce seed s
    for t in ecl["per_seed"]:
        d, lo, hi, p = stats.paired_bootstrap_difference(probs[("ecl", t["seed"])], probs[("ce", t["seed"])], labels,
                                                         n_boot=300, seed=0)
        assert (t["diff"], t["ci"][0], t["ci"][1], t["p_value"]) == pytest.approx((d, lo, hi, p))
    assert len(ecl["per_seed"]) == 3 and ce["per_seed"] == []
    # ECE before scaling is recovered from the calibrated predictions and T; after scaling is as given
    run0 = payload["runs"][0]
    assert run0["ece"] == pytest.approx(metrics.expected_calibration_error(_softmax(logits[("ce", 0)]), labels))
    assert run0["ece_calibrated"] == pytest.approx(metrics.expected_calibration_error(probs[("ce", 0)], labels))
    ece_cal = [metrics.expected_calibration_error(probs[("ecl", s)], labels) for s in range(3)]
    assert ecl["ece_calibrated"]["mean"] == pytest.approx(np.mean(ece_cal))
    assert ecl["ece_calibrated"]["sd"] == pytest.approx(np.std(ece_cal, ddof=1))

    # the terminal, the CSVs, markdown and HTML carry the same numbers
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("ecl "))
    m, sd = ecl["balanced_accuracy"]["mean"], ecl["balanced_accuracy"]["sd"]
    assert f"{m:.3f} ± {sd:.3f}" in line and f"{ecl['diff']:.3f}" in line
    assert "Per-seed paired tests" in out and "Runs (test split" in out
    import pandas as pd

    groups_csv = pd.read_csv(tmp_path / "cmp" / "comparison_groups.csv")
    assert list(groups_csv["group"]) == ["ce", "ecl"]
    assert groups_csv["balanced_accuracy_sd"][1] == pytest.approx(sd)
    runs_csv = pd.read_csv(tmp_path / "cmp" / "comparison.csv")
    assert {"ece", "ece_calibrated", "seed", "group"} <= set(runs_csv.columns)
    assert runs_csv["ece_calibrated"][0] == pytest.approx(run0["ece_calibrated"])
    assert f"| ecl | 3 | 0,1,2 | {m:.3f} ± {sd:.3f} |" in (tmp_path / "cmp" / "comparison.md").read_text()
    page = html.read_text()
    assert "Across seeds: groups by method" in page and f"{m:.3f} &plusmn; {sd:.3f}" in page
    assert (tmp_path / "cmp" / "comparison_groups.png").read_bytes()[:4] == b"\x89PNG"
    assert page.count('src="data:image/png;base64,') == 2  # runs figure and seed-groups figure


def test_compare_group_by_config_key_tag_and_none(tmp_path, capsys):
    from mlflow import MlflowClient

    from pipeline.compare import run_compare
    from pipeline.errors import PipelineError

    rng = np.random.default_rng(4)
    labels = rng.choice(3, size=60)
    ids = [f"IMG_{i:04d}" for i in range(60)]
    _seed_sweep(tmp_path / "runs", labels, ids, {"ce": [1.0, 1.2], "la": [1.1, 1.3]})
    uri = f"sqlite:///{tmp_path}/m.db"
    # config:KEY groups by the seed here (ce-s0 with la-s0): any key of the resolved config works
    run_compare([str(tmp_path / "runs")], tracking_uri=uri, out_dir=tmp_path / "a", n_bootstrap=50,
                group_by="config:train.seed")
    groups = json.loads((tmp_path / "a" / "comparison.json").read_text())["groups"]
    assert [(g["group"], g["runs"]) for g in groups] == [("0", ["ce-s0", "la-s0"]), ("1", ["ce-s1", "la-s1"])]
    with pytest.raises(PipelineError, match="has no config key 'train.nope'"):
        run_compare([str(tmp_path / "runs")], tracking_uri=uri, out_dir=tmp_path / "b", group_by="config:train.nope")
    with pytest.raises(PipelineError, match="--group-by 'seed' is not one of"):
        run_compare([str(tmp_path / "runs")], tracking_uri=uri, out_dir=tmp_path / "b", group_by="seed")
    # tag:NAME reads the MLflow run recorded in each run's metrics.json
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("sweep")
    for k, run in enumerate(sorted((tmp_path / "runs").iterdir())):
        r = client.create_run(exp, tags={"arm": "A" if k % 3 == 0 else "B"})
        mpath = run / "eval-test" / "metrics.json"
        mpath.write_text(json.dumps({**json.loads(mpath.read_text()), "mlflow": {"tracking_uri": uri, "run_id": r.info.run_id}}))
    run_compare([str(tmp_path / "runs")], tracking_uri=uri, out_dir=tmp_path / "c", n_bootstrap=50, group_by="tag:arm")
    groups = json.loads((tmp_path / "c" / "comparison.json").read_text())["groups"]
    assert [(g["group"], g["runs"]) for g in groups] == [("A", ["ce-s0", "la-s1"]), ("B", ["ce-s1", "la-s0"])]
    with pytest.raises(PipelineError, match="has no MLflow tag 'other'"):
        run_compare([str(tmp_path / "runs")], tracking_uri=uri, out_dir=tmp_path / "d", group_by="tag:other")
    capsys.readouterr()
    run_compare([str(tmp_path / "runs")], tracking_uri=uri, out_dir=tmp_path / "e", n_bootstrap=50, group_by="none")
    assert json.loads((tmp_path / "e" / "comparison.json").read_text())["groups"] is None
    assert "Groups by" not in capsys.readouterr().out
