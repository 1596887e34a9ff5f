"""`ecl compare`: several evaluated runs side by side, with a paired bootstrap against the first.

Why paired: runs evaluated on the same split share their samples, so their errors are
correlated; resampling both with the same indices (`pipeline.stats.paired_bootstrap_difference`)
gives the interval of the *difference* in balanced accuracy, which is far narrower (and honest)
compared with eyeballing two overlapping single-run intervals.

Inputs are each run's evaluation predictions (`predictions.csv` + `ground_truth.csv` in the ISIC
format, written by `ecl evaluate`): from `<run folder>/eval-<split>/`, an eval folder given
directly, or the run's MLflow artifacts `eval-<split>/`; a run that has none is evaluated first.
Samples are matched by image id; every run must score the same labelled images of the same
classes. The comparison is written as compare.html (self-contained), comparison.json,
comparison.csv and comparison.png, and logged as its own MLflow run (tag `ecl.kind=compare`).
"""
from __future__ import annotations

import datetime as _dt
import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from data_prep import atomic_write_bytes, atomic_write_text

from . import metrics, plots, report, stats
from .errors import PipelineError

__all__ = ["RunPredictions", "load_run_predictions", "run_compare", "DEFAULT_EXPERIMENT"]

DEFAULT_EXPERIMENT = "ecl"
_RUN_ID = re.compile(r"^(?:runs:/)?([0-9a-f]{32})/?$")


@dataclass
class RunPredictions:
    """One run's scored predictions on a split (labelled rows only, in file order)."""

    name: str
    source: str
    method: str
    class_names: list[str]
    image_ids: list[str]
    probs: np.ndarray  # [N, C]
    labels: np.ndarray  # [N]
    info: dict[str, Any] = field(default_factory=dict)


def _read_eval_folder(folder: Path, name: str, source: str, method: str | None = None) -> RunPredictions:
    pred_path, gt_path = folder / "predictions.csv", folder / "ground_truth.csv"
    try:
        pred = pd.read_csv(pred_path, dtype={"image": str})
        truth = pd.read_csv(gt_path, dtype={"image": str})
    except (OSError, pd.errors.ParserError) as exc:
        raise PipelineError(f"{folder}: cannot read predictions.csv / ground_truth.csv ({exc}); re-run `ecl evaluate`") from None
    classes = [c for c in pred.columns if c != "image"]
    if list(truth.columns) != list(pred.columns) or pred.columns[0] != "image":
        raise PipelineError(f"{folder}: predictions.csv and ground_truth.csv must both be 'image' then the same class "
                            f"columns; got {list(pred.columns)} and {list(truth.columns)}")
    merged = truth.merge(pred, on="image", suffixes=("_gt", ""), how="inner", validate="one_to_one")
    if len(merged) != len(truth):
        raise PipelineError(f"{folder}: {len(truth) - len(merged)} ground-truth images have no prediction")
    onehot = merged[[f"{c}_gt" for c in classes]].to_numpy(dtype=np.float64)
    info: dict[str, Any] = {}
    mpath = folder / "metrics.json"
    if mpath.is_file():
        info = json.loads(mpath.read_text(encoding="utf-8"))
    return RunPredictions(
        name=name, source=source, method=method or str(info.get("method", "?")), class_names=classes,
        image_ids=merged["image"].tolist(), probs=merged[classes].to_numpy(dtype=np.float64),
        labels=onehot.argmax(axis=1).astype(np.int64), info=info,
    )


def _has_eval(folder: Path) -> bool:
    return (folder / "predictions.csv").is_file() and (folder / "ground_truth.csv").is_file()


def load_run_predictions(ref: str | Path, split: str = "test", tracking_uri: str | None = None) -> RunPredictions:
    """Find (or make, by evaluating) one run's predictions on `split`.

    Args:
        ref: an eval folder, a run folder, or an MLflow run id.
        split: 'val' or 'test'.
        tracking_uri: MLflow store for run ids.

    Raises:
        PipelineError: `ref` is none of those, or its predictions cannot be read.
    """
    from .evaluate import run_evaluate

    path = Path(str(ref)).expanduser()
    if path.is_dir():
        if _has_eval(path):
            return _read_eval_folder(path, path.parent.name if path.name.startswith("eval-") else path.name, str(path))
        folder = path / f"eval-{split}"
        if not _has_eval(folder):
            if not (path / "checkpoint-best.pt").is_file():
                raise PipelineError(f"{path} is neither an evaluation folder (predictions.csv + ground_truth.csv) nor "
                                    f"a run folder with checkpoint-best.pt or eval-{split}/")
            folder = run_evaluate(path, split=split, tracking_uri=tracking_uri).out_dir
        return _read_eval_folder(folder, path.name, str(path))
    match = _RUN_ID.match(str(ref))
    if match is None:
        raise PipelineError(f"run reference {ref!r} is not a folder or an MLflow run id (32 hex digits)")
    run_id = match.group(1)
    uri = _lookup_uri(tracking_uri)
    from . import tracking

    try:
        run = tracking.get_run(uri, run_id)
    except Exception as exc:  # noqa: BLE001 - mlflow raises its own types
        raise PipelineError(f"MLflow run {run_id} was not found in {uri} ({type(exc).__name__})") from None
    name = run.info.run_name or run_id[:8]
    method = run.data.tags.get("ecl.method")
    run_dir = run.data.tags.get("ecl.run_dir")
    if run_dir and _has_eval(Path(run_dir) / f"eval-{split}"):
        return _read_eval_folder(Path(run_dir) / f"eval-{split}", name, f"MLflow run {run_id} ({run_dir})", method)
    dst = Path(tempfile.mkdtemp(prefix=f"ecl-compare-{run_id[:8]}-"))
    try:
        got = tracking.download_artifacts(uri, run_id, f"eval-{split}", dst)
        if _has_eval(got):
            return _read_eval_folder(got, name, f"MLflow run {run_id} (artifacts)", method)
    except Exception:  # noqa: BLE001 - no artifacts yet: evaluate below
        pass
    folder = run_evaluate(run_id, split=split, tracking_uri=uri).out_dir
    return _read_eval_folder(folder, name, f"MLflow run {run_id}", method)


def _lookup_uri(tracking_uri: str | None) -> str:
    import os

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise PipelineError("MLflow run ids were given but no tracking store is known: pass --tracking-uri or set "
                            "MLFLOW_TRACKING_URI, or give run folders instead")
    return uri


def _experiment_refs(uri: str, experiment: str, split: str) -> list[str]:
    from . import tracking

    runs = tracking.search_runs(uri, experiment)
    keep = [r for r in runs if r.info.status == "FINISHED" and f"{split}/balanced_accuracy" in r.data.metrics
            and r.data.tags.get("ecl.kind") != "compare"]
    keep.sort(key=lambda r: r.info.start_time or 0)
    return [r.info.run_id for r in keep]


def _align(runs: list[RunPredictions]) -> tuple[list[str], list[str]]:
    """Restrict every run to the images all of them scored; returns (image ids, warnings)."""
    ref = runs[0]
    warn: list[str] = []
    for r in runs[1:]:
        if r.class_names != ref.class_names:
            raise PipelineError(f"runs {ref.name} and {r.name} have different classes ({ref.class_names} vs "
                                f"{r.class_names}); only runs on the same cohort can be compared")
    common = set(ref.image_ids)
    for r in runs[1:]:
        common &= set(r.image_ids)
    ids = [i for i in ref.image_ids if i in common]
    if not ids:
        raise PipelineError("the runs share no evaluated image: they were evaluated on different cohorts or splits")
    for r in runs:
        if len(r.image_ids) != len(ids):
            warn.append(f"{r.name}: {len(r.image_ids) - len(ids)} images not scored by every run were left out.")
        pos = {image: k for k, image in enumerate(r.image_ids)}
        rows = np.array([pos[i] for i in ids])
        r.image_ids, r.probs, r.labels = ids, r.probs[rows], r.labels[rows]
    for r in runs[1:]:
        if not np.array_equal(r.labels, ref.labels):
            bad = ids[int(np.flatnonzero(r.labels != ref.labels)[0])]
            raise PipelineError(f"runs {ref.name} and {r.name} disagree on the true label of image {bad}: "
                                f"their caches differ; compare runs evaluated on the same cache")
    return ids, warn


def run_compare(run_refs: Sequence[str] | None, experiment: str | None = None, tracking_uri: str | None = None,
                out_dir: str | Path = "comparison", split: str = "test", n_bootstrap: int = 1000,
                seed: int = 0) -> Path:
    """Compare runs and write compare.html; returns its path.

    Args:
        run_refs: run ids, run folders or eval folders; the first is the reference of the paired
            differences. Empty/None with `experiment`: every finished run of the experiment that
            has `<split>` metrics, oldest first.
        experiment: MLflow experiment to take the runs from, and to log the comparison in.
        tracking_uri: MLflow store (default $MLFLOW_TRACKING_URI, else a store in `out_dir`).
        out_dir: output folder.
        split: 'val' or 'test'.
        n_bootstrap: resamples for the CIs and the paired test (same indices for every run).
        seed: bootstrap seed.

    Raises:
        PipelineError: fewer than two runs, or runs that do not share classes and samples.
    """
    from . import tracking

    out = Path(out_dir)
    refs = list(run_refs or [])
    if not refs:
        if not experiment:
            raise PipelineError("give run ids / run folders to compare, or --experiment NAME")
        refs = _experiment_refs(_lookup_uri(tracking_uri), experiment, split)
        if not refs:
            raise PipelineError(f"experiment {experiment!r} has no finished run with {split} predictions; "
                                f"run `ecl evaluate --run RUN_ID --split {split}` first")
    runs = [load_run_predictions(r, split=split, tracking_uri=tracking_uri) for r in refs]
    if len(runs) < 2:
        raise PipelineError(f"comparison needs at least two runs; got {len(runs)} ({refs})")
    seen: dict[str, int] = {}
    for r in runs:  # unique display names
        seen[r.name] = seen.get(r.name, 0) + 1
        if seen[r.name] > 1:
            r.name = f"{r.name} #{seen[r.name]}"
    ids, warn = _align(runs)
    names = runs[0].class_names
    labels = runs[0].labels
    ref = runs[0]

    rows: list[dict[str, Any]] = []
    for r in runs:
        ci = stats.bootstrap_ci(r.probs, labels, n_boot=n_bootstrap, seed=seed, class_names=names)
        recall = metrics.per_class_recall(r.probs, labels)
        row: dict[str, Any] = {
            "name": r.name, "method": r.method, "source": r.source,
            "balanced_accuracy": ci["balanced_accuracy"]["point"],
            "ci": (ci["balanced_accuracy"]["lo"], ci["balanced_accuracy"]["hi"]),
            "ece": metrics.expected_calibration_error(r.probs, labels),
            "recalls": [None if not np.isfinite(v) else float(v) for v in recall],
            "diff": None, "diff_ci": None, "p_value": None,
        }
        if r is not ref:
            d, lo, hi, p = stats.paired_bootstrap_difference(r.probs, ref.probs, labels, n_boot=n_bootstrap, seed=seed)
            row.update(diff=d, diff_ci=(lo, hi), p_value=p)
        rows.append(row)

    out.mkdir(parents=True, exist_ok=True)
    png = plots.comparison_plot([r["name"] for r in rows], [r["balanced_accuracy"] for r in rows],
                                [r["ci"][0] for r in rows], [r["ci"][1] for r in rows], names,
                                [r["recalls"] for r in rows])
    atomic_write_bytes(out / "comparison.png", png)
    table = pd.DataFrame([{
        "run": r["name"], "method": r["method"], "balanced_accuracy": r["balanced_accuracy"],
        "ci_low": r["ci"][0], "ci_high": r["ci"][1], "ece": r["ece"],
        "diff_vs_reference": r["diff"], "diff_ci_low": None if r["diff_ci"] is None else r["diff_ci"][0],
        "diff_ci_high": None if r["diff_ci"] is None else r["diff_ci"][1], "p_value": r["p_value"],
        **{f"recall/{c}": v for c, v in zip(names, r["recalls"])}, "source": r["source"],
    } for r in rows])
    atomic_write_text(out / "comparison.csv", table.to_csv(index=False, lineterminator="\n"))
    payload = {"split": split, "reference": ref.name, "n_samples": len(ids), "class_names": names,
               "n_bootstrap": n_bootstrap, "seed": seed, "warnings": warn,
               "runs": [{**r, "ci": list(r["ci"]), "diff_ci": None if r["diff_ci"] is None else list(r["diff_ci"])}
                        for r in rows]}
    atomic_write_text(out / "comparison.json", json.dumps(payload, indent=2, allow_nan=False))
    html_path = report.write_html(
        out / "compare.html", "compare.html", title=f"Comparison of {len(rows)} runs ({split} split)", split=split,
        n_samples=len(ids), generated=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        warnings=warn, n_bootstrap=n_bootstrap, reference=ref.name, rows=rows, class_names=names,
        figure=report.data_uri(png),
    )

    uri = tracking_uri or _first_known_uri(runs) or tracking.resolve_tracking_uri(None, out)
    exp = experiment or str(ref.info.get("experiment") or DEFAULT_EXPERIMENT)
    with tracking.start_run(uri, exp, run_name=f"compare-{split}",
                            tags={"ecl.kind": "compare", "ecl.compare.runs": ", ".join(r.source for r in runs)[:5000]}):
        logged: dict[str, float | None] = {}
        for r in rows:
            key = tracking.sanitize_metric_name(r["name"])
            logged[f"compare/{key}/balanced_accuracy"] = r["balanced_accuracy"]
            logged[f"compare/{key}/balanced_accuracy_ci_low"] = r["ci"][0]
            logged[f"compare/{key}/balanced_accuracy_ci_high"] = r["ci"][1]
            logged[f"compare/{key}/ece"] = r["ece"]
            logged[f"compare/{key}/diff_vs_reference"] = r["diff"]
            logged[f"compare/{key}/p_value"] = r["p_value"]
        tracking.log_metrics(logged)
        tracking.log_artifacts(out, artifact_path="comparison")
        tracking.log_text(html_path.read_text(encoding="utf-8"), "report/compare.html")
    return html_path


def _first_known_uri(runs: list[RunPredictions]) -> str | None:
    import os

    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    for r in runs:
        uri = (r.info.get("mlflow") or {}).get("tracking_uri")
        if uri:
            return str(uri)
    return None
