"""Tests of the HTML reports (pipeline/report.py, reports/templates/) and the figures (pipeline/plots.py)."""
from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import plots, report

import _evalkit as evalkit  # noqa: E402  registered by conftest.py

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory):
    from pipeline.evaluate import run_evaluate

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        work = tmp_path_factory.mktemp("report")
        cache = evalkit.build_cache(work / "cache", seed=2)
        run_dir = evalkit.make_run(cache, work / "runs", f"sqlite:///{work}/mlflow.db", steps=6)
        result = run_evaluate(str(run_dir), n_bootstrap=100)
    finally:
        torch.set_num_threads(before)
    return result


def test_report_is_self_contained_offline(evaluation):
    html = evaluation.report_path.read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html, re.I)
    assert "<script" not in html.lower()
    assert "<link" not in html.lower()  # CSS is inlined
    srcs = re.findall(r'<img[^>]*\ssrc="([^"]*)"', html)
    assert len(srcs) >= 9  # recall, confusion, 3 reliability, ROC/PR, risk-coverage, 2 geometry Gram maps
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == PNG_MAGIC
    assert report.external_references(html) == []


def test_report_contains_headline_numbers_and_sections(evaluation):
    html = evaluation.report_path.read_text(encoding="utf-8")
    payload = json.loads((evaluation.out_dir / "metrics.json").read_text())
    m = payload["metrics"]
    headline = html[html.index("Headline results"):html.index("Per-class results")]
    assert f"<td>{m['balanced_accuracy']:.3f}</td>" in headline
    assert f"[{m['balanced_accuracy_ci_low']:.3f}, {m['balanced_accuracy_ci_high']:.3f}]" in headline
    assert f"<b>{payload['temperature']:.3f}</b>" in html
    for section in ("Cohort", "Per-class results", "Confusion matrix", "Calibration", "Operating points",
                    "Selective prediction", "Subgroups", "Representation geometry", "Model card", "Provenance"):
        assert f"<h2>{section}</h2>" in html, section
    assert "<h3>Configuration</h3>" in html and "backbone: test_resnet" in html
    assert payload["provenance"]["dataset sha256"] in html
    assert "too small" in html  # min_subgroup_size 5 flags the sparse age bands


def test_write_html_refuses_external_resources(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "render_html", lambda template, **ctx: '<img src="https://cdn.example/x.png">')
    with pytest.raises(ValueError, match="external resources"):
        report.write_html(tmp_path / "r.html", "report.html")
    assert not (tmp_path / "r.html").exists()


@pytest.mark.parametrize("html,bad", [
    ('<img src="data:image/png;base64,AAAA">', 0),
    ('<script src="//cdn.example/x.js"></script>', 1),
    ("<link href='http://example.org/a.css'>", 1),
    ("<style>body{background:url( https://x/y.png)}</style>", 1),
    ("<p>tracking uri http://127.0.0.1:5000 as text</p>", 0),
])
def test_external_references_detects_network_loads(html, bad):
    assert len(report.external_references(html)) == bad


@pytest.mark.parametrize("value,text", [(None, "n/a"), (float("nan"), "n/a"), (float("inf"), "n/a"), (0.0, "0.000"),
                                        (-1e-9, "0.000"), (0.12345, "0.123"), (7, "7"), (np.float32(0.5), "0.500")])
def test_fmt_number_absent_is_na_never_nan(value, text):
    assert report.fmt_number(value) == text


def test_plots_return_png_bytes_with_absent_class():
    rng = np.random.default_rng(0)
    counts = np.array([[5, 1, 0], [2, 7, 1], [0, 0, 0]])
    assert plots.confusion_heatmap(counts, ["A", "B", "C"])[:8] == PNG_MAGIC
    assert plots.recall_bars(["A", "B", "C"], [0.8, 0.7, None], [0.6, 0.5, None], [0.9, 0.9, None], [10, 5, 1])[:8] \
        == PNG_MAGIC
    edges = np.linspace(0, 1, 11)
    conf = np.where(np.arange(10) % 2 == 0, np.linspace(0.05, 0.95, 10), np.nan)
    png = plots.reliability_diagram(conf, rng.uniform(size=10), np.where(np.isnan(conf), 0, 3), edges)
    assert png[:8] == PNG_MAGIC
    assert plots.comparison_plot(["a", "b"], [0.6, 0.7], [0.5, 0.6], [0.7, 0.8], ["A", "B", "C"],
                                 [[0.5, 0.6, None], [0.7, 0.8, None]])[:8] == PNG_MAGIC


def test_templates_ship_as_package_data():
    from importlib import resources

    files = {p.name for p in resources.files(report.TEMPLATE_PACKAGE).iterdir()}
    assert {"report.html", "compare.html", "report.css"} <= files


def test_report_flags_intervals_of_classes_with_few_images(evaluation, monkeypatch):
    """Stratified resampling cannot show the uncertainty of a 1-image class: its CI is flagged."""
    import pipeline.eval_sections as sections_mod
    import pipeline.evaluate as evaluate_mod

    html = evaluation.report_path.read_text(encoding="utf-8")
    per_class = html[html.index("Per-class results"):html.index("Confusion matrix")]
    assert sections_mod.SMALL_CLASS_CI_N == 5
    # the tiny cohort's test classes have 6-12 images: nothing flagged at the default threshold
    assert "(n&lt;" not in per_class.split("</table>")[0]
    # at a threshold above every class size, every class with an interval is flagged
    monkeypatch.setattr(sections_mod, "SMALL_CLASS_CI_N", 100)
    out = evaluate_mod.run_evaluate(str(evaluation.out_dir.parent), n_bootstrap=100,
                                    out_dir=evaluation.out_dir.parent / "eval-flag")
    flagged = out.report_path.read_text(encoding="utf-8")
    table = flagged[flagged.index("Per-class results"):flagged.index("Confusion matrix")].split("</table>")[0]
    n_with_ci = sum(1 for r in out.metrics if r.startswith("recall_ci_low/") and out.metrics[r] is not None)
    assert table.count("(n&lt;100)") == n_with_ci > 0
