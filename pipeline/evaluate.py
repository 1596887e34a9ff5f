"""`ecl evaluate`: metrics, calibration, confidence intervals, subgroups, geometry, and a report.

What a clinician needs to trust (or distrust) a model, computed in one pass over a split:

1. Predict the split (and the validation split) with the deterministic eval view, raw logits.
2. Fit temperature scaling on validation logits (minimum NLL) and store T in the checkpoint, so
   `ecl predict` returns calibrated probabilities; calibration is reported before and after
   (accuracy cannot change: dividing a row's logits by T keeps its argmax).
3. Score the calibrated probabilities with `pipeline.metrics` (balanced accuracy, per-class
   recall/specificity/precision/F1/AUROC/AP, confusion, shot groups), stratified bootstrap CIs
   with `pipeline.stats`, calibration before/after, subgroups from the cohort's metadata (sex,
   age band, anatomical site), per-patient metrics for CT, and the learned representation
   geometry (`pipeline.geometry_stage.geometry_section`).
4. Write metrics.json, predictions.csv and ground_truth.csv (ISIC submission format: the official
   scorer can re-score them), PNG plots and a self-contained report.html, and log all of it to
   the training run in MLflow (`<split>/balanced_accuracy`, `<split>/recall/MEL`, ...; the report
   under `report/report.html`).

A class absent from the split has no recall, AUROC or CI: it is `null` in metrics.json, "n/a" in
the report, and is never logged to MLflow (no fake 0 or NaN).
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from data_prep import atomic_write_bytes, atomic_write_text, bytes_sha256, open_cache

from . import calibration, metrics, plots, report, stats
from .errors import PipelineError

__all__ = ["EvalResult", "SplitPredictions", "run_evaluate", "predict_split", "subgroup_analysis", "age_band",
           "patient_level", "code_version", "main"]

# A stratified bootstrap keeps each class's images fixed, so a class with a handful of images gets
# an interval far too narrow (zero width with one image); the report flags such intervals.
SMALL_CLASS_CI_N = 5

#: manifest columns read as subgroup attributes (first present alias wins), in report order
SUBGROUP_COLUMNS: dict[str, tuple[str, ...]] = {
    "sex": ("sex",),
    "age": ("age_approx", "age"),
    "anatomical site": ("anatom_site_general", "anatom_site_general_challenge", "anatom_site"),
}
_AGE_BANDS = ((30, "<30"), (50, "30-49"), (70, "50-69"), (math.inf, "70+"))
_CALIBRATION_KEYS = ("ece", "mce", "classwise_ece", "brier", "nll")


@dataclass
class EvalResult:
    """Where the evaluation went and its flat metrics (None = undefined on this split)."""

    out_dir: Path
    report_path: Path
    metrics: dict[str, float | None]
    run_id: str | None


@dataclass
class SplitPredictions:
    """Raw network outputs on one split, in cache row order of the eval loader."""

    logits: np.ndarray  # [N, C] float64
    labels: np.ndarray  # [N] int64, -1 unlabelled
    index: np.ndarray  # [N] cache rows
    h: np.ndarray | None = None  # [N, d]
    z: np.ndarray | None = None  # [N, d_z]
    weight: np.ndarray | None = None  # [C, d]
    prototypes: np.ndarray | None = None  # [C, d_z]


# ---------------------------------------------------------------- prediction
def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def predict_split(network: Any, cache: Any, split: str, data_cfg: Any, batch_size: int, device: str = "cpu",
                  features: bool = False) -> SplitPredictions:
    """Run the network over one split of a cache with the deterministic eval view.

    Args:
        network: an `EclNetwork` in eval mode on `device`.
        cache: an opened `data_prep.Cache`.
        split: 'train', 'val' or 'test'.
        data_cfg: the run's `data` config section.
        batch_size: images per forward pass.
        device: torch device string.
        features: also collect backbone features h, projections z and the heads (for geometry).

    Returns:
        SplitPredictions (empty arrays when the split has no rows).
    """
    import torch
    from tqdm.auto import tqdm

    from .data import create_eval_loader
    from .models import model_data_config

    loader = create_eval_loader(cache, split, data_cfg, model_data_config(network), batch_size)
    logits, labels, index, hs, zs = [], [], [], [], []
    weight = protos = None
    with torch.inference_mode():
        for x, y, idx in tqdm(loader, desc=f"predict {split}", unit="batch", leave=False):
            x = x.to(device, non_blocking=True)
            if features:
                out = network(x, return_all=True)
                hs.append(out["h"].float().cpu().numpy())
                if out.get("z") is not None:
                    zs.append(out["z"].float().cpu().numpy())
                weight, protos = out.get("weight"), out.get("prototypes")
                logit = out["logits"]
            else:
                logit = network(x)
            logits.append(logit.float().cpu().numpy().astype(np.float64))
            labels.append(np.asarray(y, dtype=np.int64))
            index.append(np.asarray(idx, dtype=np.int64))
    n_classes = len(cache.class_names)
    result = SplitPredictions(
        logits=np.concatenate(logits) if logits else np.zeros((0, n_classes)),
        labels=np.concatenate(labels) if labels else np.zeros(0, np.int64),
        index=np.concatenate(index) if index else np.zeros(0, np.int64),
    )
    if features and hs:
        result.h = np.concatenate(hs)
        result.z = np.concatenate(zs) if zs else None
        result.weight = None if weight is None else weight.detach().float().cpu().numpy()
        result.prototypes = None if protos is None else protos.detach().float().cpu().numpy()
    return result


# ---------------------------------------------------------------- analyses
def age_band(age: Any) -> str:
    """'<30', '30-49', '50-69', '70+', or 'unknown' for a missing/unreadable age."""
    try:
        a = float(age)
    except (TypeError, ValueError):
        return "unknown"
    if not math.isfinite(a):
        return "unknown"
    for upper, name in _AGE_BANDS:
        if a < upper:
            return name
    return "unknown"  # pragma: no cover - the last band is unbounded


def _nullable(values: np.ndarray) -> list[float | None]:
    return [None if not np.isfinite(v) else float(v) for v in np.asarray(values, dtype=float)]


def subgroup_analysis(manifest_rows: Any, probs: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
                      min_size: int) -> list[dict[str, Any]]:
    """Balanced accuracy and per-class recall per value of sex, age band and anatomical site.

    Args:
        manifest_rows: the manifest rows (DataFrame) of the labelled samples, aligned with `probs`.
        probs: [N, C] probabilities.
        labels: [N] class positions.
        class_names: C names.
        min_size: subgroups with fewer samples are flagged `too_small`.

    Returns:
        One dict per attribute present: ``{"attribute", "column", "rows": [{"value", "n",
        "balanced_accuracy", "recall": {class: value|None}, "too_small"}]}``.
    """
    out: list[dict[str, Any]] = []
    for attribute, aliases in SUBGROUP_COLUMNS.items():
        column = next((c for c in aliases if c in manifest_rows.columns), None)
        if column is None:
            continue
        raw = manifest_rows[column].to_numpy()
        if attribute == "age":
            values = np.array([age_band(v) for v in raw], dtype=object)
            order = [name for _, name in _AGE_BANDS] + ["unknown"]
        else:
            values = np.array(["unknown" if (v is None or (isinstance(v, float) and math.isnan(v)) or str(v).strip() == "")
                               else str(v) for v in raw], dtype=object)
            order = sorted(set(values) - {"unknown"}) + ["unknown"]
        if all(v == "unknown" for v in values):
            continue
        rows = []
        for value in order:
            mask = values == value
            n = int(mask.sum())
            if n == 0:
                continue
            recall = metrics.per_class_recall(probs[mask], labels[mask])
            rows.append({
                "value": value,
                "n": n,
                "balanced_accuracy": float(np.nanmean(recall)),
                "recall": dict(zip(class_names, _nullable(recall))),
                "too_small": n < min_size,
            })
        out.append({"attribute": attribute, "column": column, "rows": rows})
    return out


def patient_level(manifest_rows: Any, probs: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
                  n_bins: int) -> dict[str, Any] | None:
    """Per-patient metrics: a patient's probability is the mean of its samples' probabilities.

    Samples are grouped by the manifest's `patient` column (else `group`). A patient whose samples
    carry different labels (lesion-level labels) contributes one entry per label.

    Returns:
        ``{"column", "ids", "labels", "probs", "report"}`` or None when no grouping column exists.
    """
    column = "patient" if "patient" in manifest_rows.columns else ("group" if "group" in manifest_rows.columns else None)
    if column is None:
        return None
    groups = manifest_rows[column].astype(str).to_numpy()
    keys = [f"{g}" for g in groups]
    by_key: dict[tuple[str, int], list[int]] = {}
    for i, (g, y) in enumerate(zip(keys, labels)):
        by_key.setdefault((g, int(y)), []).append(i)
    patients = {g for g, _ in by_key}
    multi = {g for g in patients if sum(1 for k in by_key if k[0] == g) > 1}
    ids, ys, ps = [], [], []
    for (g, y), rows in sorted(by_key.items()):
        ids.append(f"{g}_{class_names[y]}" if g in multi else g)
        ys.append(y)
        ps.append(probs[rows].mean(axis=0))
    p = np.stack(ps)
    y = np.asarray(ys, dtype=np.int64)
    return {"column": column, "ids": ids, "labels": y, "probs": p,
            "report": metrics.classification_report(p, y, class_names, n_bins=n_bins)}


# ---------------------------------------------------------------- provenance
def code_version() -> dict[str, str]:
    """Package version and, when the code runs from a git checkout, the commit (+dirty flag)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("ecl-pipeline")
    except PackageNotFoundError:
        ver = "unknown"
    info = {"package_version": ver, "git_commit": "unavailable"}
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        info["git_commit"] = commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def _split_sha256(cache: Any, split: str) -> str:
    """Hash of the split's image ids (sorted): two evaluations on the same split agree on it."""
    ids = sorted(str(v) for v in cache.manifest["image"].to_numpy()[cache.split_indices(split)])
    return bytes_sha256("\n".join(ids))


def _resolve_uri(tracking_uri: str | None, state: dict[str, Any], cfg: Any) -> str:
    from .tracking import resolve_tracking_uri

    if tracking_uri:
        return tracking_uri
    if state.get("tracking_uri"):
        return str(state["tracking_uri"])
    return resolve_tracking_uri(cfg.tracking.uri, cfg.train.output_dir)


# ---------------------------------------------------------------- the stage
def _flat(rep_cal: dict[str, Any], rep_raw: dict[str, Any], ci: dict[str, Any], class_names: Sequence[str],
          temperature: float) -> dict[str, float | None]:
    """Stable metric names; per-class values are None (not absent) for a class absent from the split."""
    flat: dict[str, float | None] = dict(metrics.flat_metrics(rep_cal))
    for name, row in rep_cal["per_class"].items():
        for key in ("recall", "specificity", "precision", "f1", "auroc", "average_precision"):
            flat.setdefault(f"{key}/{name}", row.get(key))
    for key in _CALIBRATION_KEYS:
        flat[key] = rep_raw["overall"][key]
        flat[f"{key}_calibrated"] = rep_cal["overall"][key]
    flat["temperature"] = float(temperature)
    for key in ("balanced_accuracy", "accuracy"):
        flat[f"{key}_ci_low"] = ci[key]["lo"]
        flat[f"{key}_ci_high"] = ci[key]["hi"]
    for name in class_names:
        r = ci["recall"].get(name)
        flat[f"recall_ci_low/{name}"] = None if r is None else r["lo"]
        flat[f"recall_ci_high/{name}"] = None if r is None else r["hi"]
    return flat


def _reliability_png(probs: np.ndarray, labels: np.ndarray, n_bins: int, title: str) -> bytes:
    b = calibration.reliability_bins(probs, labels, n_bins)
    return plots.reliability_diagram(b["confidence"], b["accuracy"], b["counts"], b["edges"],
                                     title=f"{title} (ECE {b['ece']:.3f})")


def run_evaluate(ref: str | Path, split: str = "test", tracking_uri: str | None = None,
                 out_dir: str | Path | None = None, n_bootstrap: int | None = None) -> EvalResult:
    """Evaluate a trained model on one split of its cache; see the module docstring.

    Args:
        ref: checkpoint file, run folder or MLflow run id.
        split: 'train', 'val' or 'test'.
        tracking_uri: MLflow store; default the one the run was trained with.
        out_dir: output folder; default `<run folder>/eval-<split>`.
        n_bootstrap: bootstrap resamples; default `eval.n_bootstrap` of the run's config.

    Returns:
        EvalResult(out_dir, report_path, metrics, run_id).

    Raises:
        PipelineError: the cache is missing or does not match the model, or the split has no
            labelled images.
    """
    import torch

    from . import tracking
    from .checkpoint import load_checkpoint, load_trained_model, set_temperature
    from .config import flatten_config, public_config

    if split not in ("train", "val", "test"):
        raise PipelineError(f"split {split!r} is not one of train, val, test")
    device = _device()
    tm = load_trained_model(ref, device=device, tracking_uri=tracking_uri)
    cfg = tm.config
    from .threads import apply_threads, plan_threads

    apply_threads(plan_threads(cfg.train.threads, cfg.data.num_workers, device))  # threads + workers <= cores
    state = load_checkpoint(tm.checkpoint_path)
    names = list(tm.class_names)
    n_boot = int(n_bootstrap if n_bootstrap is not None else cfg.eval.n_bootstrap)
    if n_boot < 1:
        raise PipelineError(f"--n-bootstrap must be a positive number of resamples; got {n_boot}")
    if not cfg.data.cache:
        raise PipelineError(f"{tm.checkpoint_path}: the run's config has no data.cache, so there is nothing to evaluate on")
    cache = open_cache(cfg.data.cache)
    if list(cache.class_names) != names:
        raise PipelineError(f"cache {cfg.data.cache} has classes {cache.class_names} but the model "
                            f"{tm.checkpoint_path} was trained on {names}; evaluate on the cache it was trained on")
    run_folder = tm.run_dir or tm.checkpoint_path.parent
    out = Path(out_dir) if out_dir is not None else Path(run_folder) / f"eval-{split}"
    out.mkdir(parents=True, exist_ok=True)
    warn: list[str] = []
    if state.get("dataset_sha256") and state["dataset_sha256"] != cache.dataset_sha256:
        warn.append(f"The cache {cfg.data.cache} differs from the one the model was trained on "
                    f"(dataset hash {cache.dataset_sha256[:12]} vs {str(state['dataset_sha256'])[:12]}).")

    # 1. predictions
    torch.manual_seed(cfg.train.seed)
    pred = predict_split(tm.network, cache, split, cfg.data, cfg.eval.batch_size, device, features=True)
    labelled = pred.labels >= 0
    if not labelled.any():
        raise PipelineError(f"split {split!r} of cache {cfg.data.cache} has no labelled images; "
                            f"use `ecl predict` for unlabelled images or pick another --split")
    logits, y = pred.logits[labelled], pred.labels[labelled]

    # 2. temperature scaling on validation logits
    temperature, t_source = 1.0, "nothing (temperature scaling is off: eval.temperature_scaling=false)"
    if cfg.eval.temperature_scaling:
        val = pred if split == "val" else predict_split(tm.network, cache, "val", cfg.data, cfg.eval.batch_size, device)
        vmask = val.labels >= 0
        if vmask.any():
            temperature = calibration.fit_temperature(val.logits[vmask], val.labels[vmask])
            t_source = f"the validation split ({int(vmask.sum())} images)"
            if split == "val":
                warn.append("Temperature was fitted on this same validation split: calibration after scaling is optimistic.")
        else:
            t_source = "nothing (the validation split has no labelled images; T = 1)"
            warn.append("No labelled validation images: temperature scaling was skipped (T = 1).")
        set_temperature(tm.checkpoint_path, temperature)
    probs_raw = calibration.apply_temperature(logits, 1.0)
    probs = calibration.apply_temperature(logits, temperature)
    probs_all = calibration.apply_temperature(pred.logits, temperature)

    # 3. metrics
    train_counts = np.asarray(tm.class_counts if tm.class_counts else cache.class_counts("train"), dtype=np.int64)
    n_bins = cfg.eval.n_bins
    rep_cal = metrics.classification_report(probs, y, names, train_counts, n_bins=n_bins)
    rep_raw = metrics.classification_report(probs_raw, y, names, train_counts, n_bins=n_bins)
    ci = stats.bootstrap_ci(probs, y, n_boot=n_boot, seed=cfg.eval.bootstrap_seed, class_names=names)
    flat = _flat(rep_cal, rep_raw, ci, names, temperature)
    rows = cache.manifest.iloc[pred.index[labelled]].reset_index(drop=True)
    subgroups = subgroup_analysis(rows, probs, y, names, cfg.eval.min_subgroup_size)
    for s in subgroups:
        for r in s["rows"]:
            value = r["value"].replace("<", "lt").replace("+", "plus")
            flat[f"subgroup/{s['attribute']}/{value}/balanced_accuracy"] = r["balanced_accuracy"]
            flat[f"subgroup/{s['attribute']}/{value}/n"] = float(r["n"])
    patient = patient_level(rows, probs, y, names, n_bins) if cache.kind == "ct" else None
    if patient is not None:
        pci = stats.bootstrap_ci(patient["probs"], patient["labels"], n_boot=n_boot, seed=cfg.eval.bootstrap_seed,
                                 class_names=names)
        for key, value in metrics.flat_metrics(patient["report"]).items():
            flat[f"patient/{key}"] = value
        flat["patient/balanced_accuracy_ci_low"] = pci["balanced_accuracy"]["lo"]
        flat["patient/balanced_accuracy_ci_high"] = pci["balanced_accuracy"]["hi"]
        patient["ci"] = pci

    # geometry of the learned representation
    geometry, geometry_note = None, "The geometry section is not available in this installation."
    try:
        from .geometry_stage import geometry_section
    except ImportError as exc:
        geometry_section = None
        geometry_note = f"The geometry section is not available ({exc})."
    if geometry_section is not None and pred.h is not None and pred.weight is not None:
        z = pred.z[labelled] if pred.z is not None else None  # None: no projection head
        try:
            geometry = geometry_section(pred.h[labelled], z, y, pred.weight, train_counts, names,
                                        prototypes=pred.prototypes, temperature=cfg.method.temperature)
        except ValueError as exc:  # e.g. a class with too few samples in this split for a covariance
            geometry_note = f"The geometry section could not be computed on this split: {exc}"
        if geometry is not None:
            for key, value in geometry.metrics.items():
                flat[f"geometry/{key}"] = None if value is None or not math.isfinite(float(value)) else float(value)

    # 4. files
    image_ids = [str(v) for v in cache.manifest["image"].to_numpy()[pred.index]]
    metrics.write_isic_csv(out / "predictions.csv", image_ids, probs_all, names)
    metrics.write_isic_csv(out / "ground_truth.csv", [image_ids[i] for i in np.flatnonzero(labelled)], y, names)
    if patient is not None:
        metrics.write_isic_csv(out / "predictions_patient.csv", patient["ids"], patient["probs"], names)
        metrics.write_isic_csv(out / "ground_truth_patient.csv", patient["ids"], patient["labels"], names)
    figures: dict[str, bytes] = {
        "confusion": plots.confusion_heatmap(np.asarray(rep_cal["confusion"]["counts"]), names),
        "recall": plots.recall_bars(names, [rep_cal["per_class"][c]["recall"] for c in names],
                                    [None if ci["recall"][c] is None else ci["recall"][c]["lo"] for c in names],
                                    [None if ci["recall"][c] is None else ci["recall"][c]["hi"] for c in names],
                                    train_counts),
        "reliability": _reliability_png(probs_raw, y, n_bins, "Before scaling"),
        "reliability_calibrated": _reliability_png(probs, y, n_bins, f"After scaling, T={temperature:.2f}"),
    }
    panels = {}
    for c, name in enumerate(names):
        b = calibration.reliability_bins(probs, y, n_bins, class_index=c)
        panels[f"{name} (n={int((y == c).sum())})"] = (b["confidence"], b["accuracy"], b["counts"], b["edges"])
    figures["reliability_classes"] = plots.reliability_grid(panels)
    for key, png in figures.items():
        atomic_write_bytes(out / f"{key}.png", png)
    if geometry is not None:
        for key, png in geometry.figures.items():
            atomic_write_bytes(out / f"geometry_{key}.png", png)

    version = code_version()
    provenance = {
        "package version": version["package_version"],
        "git commit": version["git_commit"],
        "checkpoint": str(tm.checkpoint_path),
        "MLflow run": tm.run_id or "none",
        "cache": str(cfg.data.cache),
        "cache kind": cache.kind,
        "dataset sha256": cache.dataset_sha256,
        "manifest sha256": cache.manifest_sha256,
        f"{split} split sha256 (image ids)": _split_sha256(cache, split),
        "trained on dataset sha256": str(state.get("dataset_sha256", "unknown")),
        "torch": torch.__version__,
        "device": device,
        "bootstrap": f"{n_boot} stratified resamples, seed {cfg.eval.bootstrap_seed}",
        "evaluated at (UTC)": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
    }
    cohort = {
        "class_names": names,
        "counts": {s: [int(v) for v in cache.class_counts(s)] for s in ("train", "val", "test")},
        "train_counts_model": [int(v) for v in train_counts],
        "imbalance_ratio": float(train_counts.max() / train_counts[train_counts > 0].min()) if (train_counts > 0).any() else None,
        "n_labelled": int(labelled.sum()),
        "n_unlabelled": int((~labelled).sum()),
    }
    uri = _resolve_uri(tracking_uri, state, cfg)
    payload = {
        "split": split,
        "method": cfg.method.name,
        "run_name": cfg.train.run_name or Path(str(run_folder)).name,
        "mlflow": {"tracking_uri": uri, "experiment": cfg.tracking.experiment, "run_id": tm.run_id},
        "class_names": names,
        "temperature": float(temperature),
        "temperature_source": t_source,
        "metrics": flat,
        "report": rep_cal,
        "uncalibrated": rep_raw["overall"],
        "bootstrap": ci,
        "subgroups": subgroups,
        "min_subgroup_size": cfg.eval.min_subgroup_size,
        "patient_level": None if patient is None else {"column": patient["column"], "n_patients": len(patient["ids"]),
                                                       "report": patient["report"], "bootstrap": patient["ci"]},
        "geometry": None if geometry is None else {"metrics": flat_geometry(geometry.metrics), "sentences": geometry.sentences},
        "cohort": cohort,
        "provenance": provenance,
        "warnings": warn,
    }
    atomic_write_text(out / "metrics.json", json.dumps(payload, indent=2, allow_nan=False))

    report_path = out / "report.html"
    context = _report_context(split, tm, cfg, rep_cal, rep_raw, ci, flat, temperature, t_source, figures, subgroups,
                              patient, geometry, geometry_note, cohort, provenance, warn, n_boot, public_config(cfg))
    report.write_html(report_path, "report.html", **context)

    # 5. MLflow
    run_id = _log_to_mlflow(tracking, uri, cfg, tm, split, flat, out, report_path, flatten_config(cfg))
    if run_id != tm.run_id:  # a new evaluation run: record it beside the files (the logged copy predates it)
        payload["mlflow"]["run_id"] = run_id
        atomic_write_text(out / "metrics.json", json.dumps(payload, indent=2, allow_nan=False))
    return EvalResult(out_dir=out, report_path=report_path, metrics=flat, run_id=run_id)


def flat_geometry(values: dict[str, Any]) -> dict[str, float | None]:
    """Geometry metrics with non-finite values as None (JSON has no NaN)."""
    return {k: (None if v is None or not math.isfinite(float(v)) else float(v)) for k, v in values.items()}


def _report_context(split, tm, cfg, rep_cal, rep_raw, ci, flat, temperature, t_source, figures, subgroups, patient,
                    geometry, geometry_note, cohort, provenance, warn, n_boot, config_dict) -> dict[str, Any]:
    import yaml

    names = cohort["class_names"]
    counts = cohort["counts"]
    headline = [
        {"name": "Balanced accuracy (mean recall)", "value": flat["balanced_accuracy"],
         "ci": (ci["balanced_accuracy"]["lo"], ci["balanced_accuracy"]["hi"])},
        {"name": "Accuracy", "value": flat["accuracy"], "ci": (ci["accuracy"]["lo"], ci["accuracy"]["hi"])},
        {"name": "Macro AUROC", "value": rep_cal["overall"].get("macro_auroc"), "ci": None},
        {"name": "ECE (calibrated)", "value": flat["ece_calibrated"], "ci": None},
    ]
    per_class = []
    for c, name in enumerate(names):
        row = rep_cal["per_class"][name]
        r_ci = ci["recall"].get(name)
        per_class.append({
            "name": name, "n": row["support"], "train_n": int(cohort["train_counts_model"][c]),
            "recall": row["recall"], "recall_ci": None if r_ci is None else (r_ci["lo"], r_ci["hi"]),
            "specificity": row["specificity"], "precision": row["precision"], "f1": row["f1"],
            "auroc": row["auroc"], "ap": row["average_precision"],
        })
    shots = rep_cal.get("shots") or {}
    shot_groups = [{"group": f"{g}-shot", "classes": shots[g]["classes"], "accuracy": shots[g]["accuracy"]}
                   for g in ("many", "medium", "few") if g in shots and shots[g]["classes"]]
    labels_cal = {"ece": "ECE (top-label)", "mce": "MCE", "classwise_ece": "Class-wise ECE", "brier": "Brier score",
                  "nll": "NLL"}
    calibration_rows = [{"name": labels_cal[k], "before": rep_raw["overall"][k], "after": rep_cal["overall"][k]}
                        for k in _CALIBRATION_KEYS]
    sub_ctx = [{"attribute": s["attribute"], "rows": [
        {"value": r["value"], "n": r["n"], "balanced_accuracy": r["balanced_accuracy"],
         "recalls": [r["recall"][c] for c in names], "too_small": r["too_small"]} for r in s["rows"]]}
        for s in subgroups]
    patient_ctx = None
    if patient is not None:
        prep = patient["report"]["overall"]
        patient_ctx = {"n_groups": len(patient["ids"]), "n_samples": int(cohort["n_labelled"]), "rows": [
            {"name": "balanced accuracy", "sample": rep_cal["overall"]["balanced_accuracy"], "patient": prep["balanced_accuracy"]},
            {"name": "accuracy", "sample": rep_cal["overall"]["accuracy"], "patient": prep["accuracy"]},
            {"name": "macro AUROC", "sample": rep_cal["overall"].get("macro_auroc"), "patient": prep.get("macro_auroc")},
            {"name": "ECE", "sample": rep_cal["overall"]["ece"], "patient": prep["ece"]},
            {"name": "Brier score", "sample": rep_cal["overall"]["brier"], "patient": prep["brier"]},
        ]}
    geo_ctx = None
    if geometry is not None:
        geo_ctx = {"sentences": list(geometry.sentences),
                   "rows": [{"name": k, "value": v} for k, v in geometry.metrics.items()],
                   "figures": [{"name": k.replace("_", " "), "uri": report.data_uri(v)} for k, v in geometry.figures.items()]}
    return {
        "title": f"Evaluation of {cfg.train.run_name or Path(str(tm.run_dir or tm.checkpoint_path)).name}",
        "split": split,
        "generated": provenance["evaluated at (UTC)"] + " UTC",
        "run": {"method": cfg.method.name, "backbone": cfg.model.backbone},
        "warnings": warn,
        "n_bootstrap": n_boot,
        "cohort": {"rows": [{"name": n, "train": counts["train"][c], "val": counts["val"][c], "test": counts["test"][c]}
                            for c, n in enumerate(names)],
                   "totals": {s: int(sum(counts[s])) for s in counts},
                   "imbalance_ratio": cohort["imbalance_ratio"], "n_labelled": cohort["n_labelled"],
                   "n_unlabelled": cohort["n_unlabelled"]},
        "headline": headline,
        "shot_groups": shot_groups,
        # below this many evaluated images a class's stratified-bootstrap interval is flagged
        "small_class_n": SMALL_CLASS_CI_N,
        "shot_thresholds": (shots.get("many_shot_min", metrics.MANY_SHOT_MIN), shots.get("few_shot_max", metrics.FEW_SHOT_MAX)),
        "per_class": per_class,
        "figures": {k: report.data_uri(v) for k, v in figures.items()},
        "temperature": temperature,
        "temperature_source": t_source,
        "calibration_rows": calibration_rows,
        "subgroups": sub_ctx,
        "min_subgroup_size": cfg.eval.min_subgroup_size,
        "class_names": names,
        "patient": patient_ctx,
        "geometry": geo_ctx,
        "geometry_note": geometry_note,
        "provenance": list(provenance.items()),
        "config_yaml": yaml.safe_dump(config_dict, sort_keys=False),
    }


def _log_to_mlflow(tracking: Any, uri: str, cfg: Any, tm: Any, split: str, flat: dict[str, float | None], out: Path,
                   report_path: Path, params: dict[str, Any]) -> str:
    """Re-open the training run (or start an evaluation run) and log metrics, files and the report."""
    run_id = tm.run_id
    if run_id:
        try:
            tracking.get_run(uri, run_id)
        except Exception:  # noqa: BLE001 - mlflow raises its own types for a run missing from this store
            warnings.warn(f"MLflow run {run_id} is not in {uri}; logging the evaluation as a new run", stacklevel=2)
            run_id = None
    name = None if run_id else f"eval-{split}-{Path(str(tm.run_dir or tm.checkpoint_path.parent)).name}"
    tags = {"ecl.eval.checkpoint": str(tm.checkpoint_path)}
    with tracking.start_run(uri, cfg.tracking.experiment, run_name=name, run_id=run_id, tags=tags) as active:
        if not run_id:
            tracking.set_tags({"ecl.kind": "evaluation", "ecl.method": cfg.method.name})
            tracking.log_params(params)
        tracking.log_metrics({f"{split}/{k}": v for k, v in flat.items()})
        tracking.log_artifacts(out, artifact_path=f"eval-{split}")
        html_name = "report.html" if split == "test" else f"report-{split}.html"
        tracking.log_text(report_path.read_text(encoding="utf-8"), f"report/{html_name}")
        return active


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m pipeline.evaluate REF [--split test]`: same as `ecl evaluate`."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m pipeline.evaluate")
    p.add_argument("ref")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--out", default=None)
    p.add_argument("--n-bootstrap", type=int, default=None)
    p.add_argument("--tracking-uri", default=None)
    a = p.parse_args(argv)
    result = run_evaluate(a.ref, split=a.split, tracking_uri=a.tracking_uri, out_dir=a.out, n_bootstrap=a.n_bootstrap)
    print(f"report: {result.report_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
