"""`ecl demo` end to end on a small cohort: every stage, real training, real MLflow runs."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from sklearn.metrics import balanced_accuracy_score

from pipeline.demo import run_demo


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One demo run for the module; its terminal output is kept as `demo.printed`."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("demo")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        result = run_demo(out=out, n_images=240, epochs=2, seed=0)
    result.printed = buf.getvalue()
    return result


def test_demo_writes_reports_and_headline(demo, capsys):
    for method in ("ecl", "ce"):
        report = Path(demo.evals[method].report_path)
        assert report.is_file() and report.stat().st_size > 10_000
        html = report.read_text(encoding="utf-8")
        assert "data:image/png;base64," in html
        # the headline number is sklearn's balanced accuracy of the predictions evaluate wrote
        out = Path(demo.evals[method].out_dir)
        truth, pred = pd.read_csv(out / "ground_truth.csv"), pd.read_csv(out / "predictions.csv")
        pred = pred.set_index("image").loc[truth["image"]]
        classes = list(truth.columns[1:])
        expected = balanced_accuracy_score(truth[classes].to_numpy().argmax(1), pred[classes].to_numpy().argmax(1))
        assert demo.evals[method].metrics["balanced_accuracy"] == pytest.approx(expected, abs=1e-9)
    assert Path(demo.comparison).is_file()
    for method in ("ecl", "ce"):  # the model card beside each report
        assert "## Known limitations" in (Path(demo.evals[method].out_dir) / "model_card.md").read_text()


def test_demo_logs_params_metrics_and_report_to_mlflow(demo):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=demo.tracking_uri)
    for method, run in demo.runs.items():
        r = client.get_run(run.run_id)
        assert r.data.params["method.name"] == method
        assert "test/balanced_accuracy" in r.data.metrics
        history = client.get_metric_history(run.run_id, "val/balanced_accuracy")
        assert len(history) == 2  # one point per epoch
        names = [a.path for a in client.list_artifacts(run.run_id, "report")]
        assert "report/report.html" in names


def test_demo_ends_with_seconds_per_stage(demo, capsys):
    stages = list(demo.seconds)
    assert stages == ["generate", "prepare", "train ECL", "train CE", "evaluate ECL", "evaluate CE", "compare"]
    assert all(v >= 0 for v in demo.seconds.values())


def test_stage_line_sums_the_stages():
    from pipeline.demo import stage_line

    line = stage_line({"generate": 1.25, "train ECL": 30.0, "compare": 2.0})
    assert line == "seconds per stage: generate 1.2, train ECL 30.0, compare 2.0, total 33.2"


def test_demo_prints_every_stage_table(demo):
    out = demo.printed
    assert set(demo.runs) == {"ecl", "ce"}
    assert "mlflow ui --backend-store-uri sqlite:///" in out
    # evaluate's and compare's own tables: headline with CI, operating points, ECE before/after, selective
    assert "sens@spec90" in out and "ECE before scaling" in out and "at 80% coverage" in out
    assert "Runs (test split; paired bootstrap vs" in out and "Model cards" in out
    assert out.rstrip().splitlines()[-1].startswith("seconds per stage: generate ")
    from pipeline.demo import ONE_SEED_CAVEAT

    assert ONE_SEED_CAVEAT in out  # the headline says what one seed can and cannot show


def test_demo_rerun_reuses_cohort_and_cache(demo, capsys):
    """A second `ecl demo` in the same folder regenerates and re-prepares nothing (its first two stages)."""
    from pipeline.config import load_config
    from pipeline.demo import _generate, _prepare, demo_config_path

    paths = _generate("dermoscopy", demo.out, 240, 0)
    cfg = load_config(demo_config_path("dermoscopy"), ["prepare.split_seed=0"])
    cache = _prepare("dermoscopy", cfg, paths, demo.out / "cache", 0)
    out = capsys.readouterr().out
    assert "cohort already generated" in out and "cache up to date" in out
    assert cache == (demo.out / "cache").resolve() or cache == demo.out / "cache"


def test_demo_headline_prints_na_for_missing_or_nan_values():
    from types import SimpleNamespace

    from pipeline.demo import DemoResult, _headline

    result = DemoResult(out=Path("x"), tracking_uri="u")
    result.evals = {"ecl": SimpleNamespace(metrics={"balanced_accuracy": 0.3851, "ece": float("nan"), "recall/A": None}),
                    "ce": SimpleNamespace(metrics={"balanced_accuracy": 0.2})}
    lines = _headline(result, ["A"]).splitlines()
    assert lines[1].split()[-2:] == ["0.385", "0.200"]
    assert lines[2].split()[-2:] == ["n/a", "n/a"]  # NaN and missing alike, never "nan"
    assert lines[4].split()[-2:] == ["n/a", "n/a"]
