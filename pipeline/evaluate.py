"""`ecl evaluate`: metrics, calibration, confidence intervals, subgroups, geometry, and a report.

What a clinician needs to trust (or distrust) a model, computed in one pass over a split. This
module is the stage: it loads the model, predicts, fits the temperature, assembles the report's
sections and writes and logs them. What each section says is `pipeline.eval_sections`.

1. Predict the split (and the validation split) with the deterministic eval view, raw logits
   (`pipeline.inference.predict_split`, the one prediction loop).
2. Fit temperature scaling on validation logits (minimum NLL) and store T in calibration.json
   beside the checkpoint (never in it) and as the run's MLflow artifact, so `ecl predict` returns
   calibrated probabilities; calibration is reported before and after (accuracy cannot change:
   dividing a row's logits by T keeps its argmax).
3. Build the sections over one `EvalInputs` (`pipeline.eval_sections`): headline (balanced
   accuracy, per-class recall/specificity/precision/F1/AUROC/AP, confusion, shot groups, stratified
   bootstrap CIs), calibration before/after, subgroups (sex, age band, anatomical site),
   per-patient metrics for CT, operating points (thresholds for fixed specificity / sensitivity
   chosen on validation and held on this split, ROC and PR curves with bootstrap bands), selective
   prediction (risk-coverage), the learned representation geometry, the cohort, a model card.
4. Write metrics.json, predictions.csv and ground_truth.csv (ISIC submission format: the official
   scorer can re-score them), PNG plots, model_card.md and a self-contained report.html, log all
   of it to the training run in MLflow (`<split>/balanced_accuracy`, `<split>/recall/MEL`, ...;
   the report under `report/report.html`, the card as `model_card.md`), and print a compact
   headline table in the terminal.

A class absent from the split has no recall, AUROC or CI: it is `null` in metrics.json, "n/a" in
the report, and is never logged to MLflow (no fake 0 or NaN).
"""
from __future__ import annotations

import sys

import datetime as _dt
import errno
import json
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from data_prep import atomic_write_bytes, atomic_write_text, bytes_sha256, open_cache

from . import calibration, metrics, report
from . import eval_sections as sections
from .errors import PipelineError
from .eval_sections import age_band, headline_text, model_card, patient_level, subgroup_analysis
from .inference import default_device, predict_split

__all__ = ["EvalResult", "run_evaluate", "subgroup_analysis", "age_band", "patient_level", "code_version",
           "headline_text", "model_card"]


@dataclass
class EvalResult:
    """Where the evaluation went and its flat metrics (None = undefined on this split)."""

    out_dir: Path
    report_path: Path
    metrics: dict[str, float | None]
    run_id: str | None
    summary: str = ""  # the headline table printed in the terminal


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


# ---------------------------------------------------------------- the stage
def _fit_temperature(tm: Any, cfg: Any, split: str, val_logits: np.ndarray, val_labels: np.ndarray,
                     warn: list[str]) -> tuple[float, str]:
    """T on the labelled validation logits, written beside the checkpoint; (T, what it was fitted on)."""
    from .checkpoint import write_calibration

    temperature, t_source = 1.0, "nothing (temperature scaling is off: eval.temperature_scaling=false)"
    if not cfg.eval.temperature_scaling:
        return temperature, t_source
    if len(val_labels):
        temperature = calibration.fit_temperature(val_logits, val_labels)
        t_source = f"the validation split ({len(val_labels)} images)"
        if split == "val":
            warn.append("Temperature was fitted on this same validation split: calibration after scaling is optimistic.")
    else:
        t_source = "nothing (the validation split has no labelled images; T = 1)"
        warn.append("No labelled validation images: temperature scaling was skipped (T = 1).")
    # beside the checkpoint, never inside it: evaluation does not rewrite a trained model
    try:
        write_calibration(tm.checkpoint_path.parent, temperature, fitted_on=t_source, checkpoint=tm.checkpoint_path)
    except OSError as exc:  # a read-only model store (EROFS too); a full disk stops with one line, as elsewhere
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        warn.append(f"{tm.checkpoint_path.parent} is read-only: the fitted temperature (T = {temperature:.3f}) was not "
                    f"stored beside the model, so `ecl predict` there uses T = 1 unless the run's MLflow artifact has it.")
    return temperature, t_source


def run_evaluate(ref: str | Path, split: str = "test", tracking_uri: str | None = None,
                 out_dir: str | Path | None = None, n_bootstrap: int | None = None, echo: bool = True) -> EvalResult:
    """Evaluate a trained model on one split of its cache; see the module docstring.

    Args:
        ref: checkpoint file, run folder or MLflow run id.
        split: 'train', 'val' or 'test'.
        tracking_uri: MLflow store; default the one the run was trained with.
        out_dir: output folder; default `<run folder>/eval-<split>`.
        n_bootstrap: bootstrap resamples; default `eval.n_bootstrap` of the run's config.
        echo: print the headline table (also in `EvalResult.summary`).

    Returns:
        EvalResult(out_dir, report_path, metrics, run_id, summary).

    Raises:
        PipelineError: the cache is missing or does not match the model, or the split has no
            labelled images.
    """
    import torch
    import yaml

    from . import tracking
    from .checkpoint import load_checkpoint, load_trained_model
    from .store import resolve_store
    from .config import flatten_config, public_config

    if split not in ("train", "val", "test"):
        raise PipelineError(f"split {split!r} is not one of train, val, test")
    device = default_device()
    tm = load_trained_model(ref, device=device, tracking_uri=tracking_uri)
    cfg = tm.config
    from .threads import apply_threads, plan_threads

    apply_threads(plan_threads(cfg.train.threads, cfg.data.num_workers, device))  # threads + workers <= cores
    ckpt = load_checkpoint(tm.checkpoint_path)
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
    if ckpt.dataset_sha256 and ckpt.dataset_sha256 != cache.dataset_sha256:
        warn.append(f"The cache {cfg.data.cache} differs from the one the model was trained on "
                    f"(dataset hash {cache.dataset_sha256[:12]} vs {ckpt.dataset_sha256[:12]}).")

    # 1. predictions
    torch.manual_seed(cfg.train.seed)
    pred = predict_split(tm.network, cache, split, cfg.data, cfg.eval.batch_size, device, features=True)
    labelled = pred.labelled
    if not labelled.any():
        raise PipelineError(f"split {split!r} of cache {cfg.data.cache} has no labelled images; "
                            f"use `ecl predict` for unlabelled images or pick another --split")
    val = pred if split == "val" else predict_split(tm.network, cache, "val", cfg.data, cfg.eval.batch_size, device)
    vmask = val.labelled

    # 2. temperature scaling on validation logits (val also sets the operating-point thresholds)
    temperature, t_source = _fit_temperature(tm, cfg, split, val.logits[vmask], val.labels[vmask], warn)

    # 3. sections, over one typed input
    train_counts = np.asarray(tm.class_counts if tm.class_counts else cache.class_counts("train"), dtype=np.int64)
    has_features = pred.h is not None and pred.weight is not None
    ev = sections.EvalInputs(
        split=split, class_names=names, kind=cache.kind, logits=pred.logits[labelled], labels=pred.labels[labelled],
        manifest_rows=cache.manifest.iloc[pred.rows[labelled]].reset_index(drop=True),
        temperature=temperature, t_source=t_source, train_counts=train_counts,
        split_counts={s: [int(v) for v in cache.class_counts(s)] for s in ("train", "val", "test")},
        n_unlabelled=int((~labelled).sum()), n_bins=cfg.eval.n_bins, n_boot=n_boot, seed=cfg.eval.bootstrap_seed,
        min_subgroup_size=cfg.eval.min_subgroup_size,
        val_logits=val.logits[vmask] if vmask.any() else None, val_labels=val.labels[vmask] if vmask.any() else None,
        h=pred.h[labelled] if has_features else None,
        z=pred.z[labelled] if has_features and pred.z is not None else None,  # None: no projection head
        weight=pred.weight, prototypes=pred.prototypes, loss_temperature=cfg.method.temperature,
    )
    scores = sections.score(ev)
    headline = sections.headline_section(ev, scores)
    calib = sections.calibration_section(ev, scores)
    subgroups = sections.subgroup_section(ev)
    patient = sections.patient_section(ev, scores)
    ops = sections.operating_points_section(ev)
    selective = sections.selective_section(ev)
    geometry = sections.geometry_section(ev)
    cohort = sections.cohort_section(ev)
    saliency = _saliency_part(tm.network, cache, pred.rows[labelled], ev, cfg, device)
    parts = (headline, calib, subgroups, patient, ops, selective, geometry, cohort, saliency)
    flat: dict[str, float | None] = {}
    for part in parts:
        flat.update(part.flat)
        warn.extend(part.warnings)
    run_title = cfg.train.run_name or Path(str(tm.run_dir or tm.checkpoint_path)).name
    card = sections.model_card_section(ev, title=run_title, method=cfg.method.name, backbone=cfg.model.backbone,
                                       flat=flat, cohort=cohort.data, subgroups=subgroups.data, ops=ops.data,
                                       selective=selective.data)

    # 4. files
    probs_all = calibration.apply_temperature(pred.logits, temperature)
    image_ids = [str(v) for v in cache.manifest["image"].to_numpy()[pred.rows]]
    metrics.write_isic_csv(out / "predictions.csv", image_ids, probs_all, names)
    metrics.write_isic_csv(out / "ground_truth.csv", [image_ids[i] for i in np.flatnonzero(labelled)], ev.labels, names)
    if patient.data is not None:
        metrics.write_isic_csv(out / "predictions_patient.csv", patient.data["ids"], patient.data["probs"], names)
        metrics.write_isic_csv(out / "ground_truth_patient.csv", patient.data["ids"], patient.data["labels"], names)
    figures: dict[str, bytes] = {}
    for part in parts:
        figures.update(part.figures)
    for key, png in figures.items():
        atomic_write_bytes(out / f"{key}.png", png)

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
        "trained on dataset sha256": ckpt.dataset_sha256 or "unknown",
        "torch": torch.__version__,
        "device": device,
        "bootstrap": f"{n_boot} stratified resamples, seed {cfg.eval.bootstrap_seed}",
        "evaluated at (UTC)": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
    }
    # the run folder's parent holds the local store train wrote to (pipeline.store.resolve_store's rule)
    uri = resolve_store(tracking_uri, stored=ckpt.tracking_uri or cfg.tracking.uri,
                        beside=tm.run_dir.parent if tm.run_dir else cfg.train.output_dir, create=True)
    atomic_write_text(out / "model_card.md", card.data)
    solver_notes = [] if geometry.data is None else geometry.data.solver_notes
    payload = {
        "split": split,
        "method": cfg.method.name,
        "run_name": cfg.train.run_name or Path(str(run_folder)).name,
        "mlflow": {"tracking_uri": uri, "experiment": cfg.tracking.experiment, "run_id": tm.run_id},
        "class_names": names,
        **calib.payload,  # temperature, temperature_source
        "metrics": flat,
        **headline.payload,  # report, uncalibrated, bootstrap
        **subgroups.payload,  # subgroups, min_subgroup_size
        **patient.payload,  # patient_level
        **geometry.payload,  # geometry
        **cohort.payload,  # cohort
        **ops.payload,  # operating_points, operating_points_note
        **selective.payload,  # selective
        **card.payload,  # model_card
        "provenance": provenance,
        "warnings": warn + solver_notes,
    }
    atomic_write_text(out / "metrics.json", json.dumps(payload, indent=2, allow_nan=False))

    report_path = out / "report.html"
    context: dict[str, Any] = {
        "title": f"Evaluation of {run_title}",
        "split": split,
        "generated": provenance["evaluated at (UTC)"] + " UTC",
        "run": {"method": cfg.method.name, "backbone": cfg.model.backbone},
        "warnings": warn,
        "n_bootstrap": n_boot,
        "figures": {k: report.data_uri(v) for k, v in figures.items()},
        "provenance": list(provenance.items()),
        "config_yaml": yaml.safe_dump(public_config(cfg), sort_keys=False),
    }
    for part in (*parts, card):
        context.update(part.context)
    report.write_html(report_path, "report.html", **context)

    # 5. MLflow
    run_id = _log_to_mlflow(tracking, uri, cfg, tm, split, flat, out, report_path, flatten_config(cfg), card.data)
    if run_id != tm.run_id:  # a new evaluation run: record it beside the files (the logged copy predates it)
        payload["mlflow"]["run_id"] = run_id
        atomic_write_text(out / "metrics.json", json.dumps(payload, indent=2, allow_nan=False))
    summary = headline_text(f"Evaluation of {run_title}", split, flat, names, len(ev.labels), temperature, ops.data,
                            selective.data)
    if warn:
        summary += "\n\n" + "\n".join(f"Warning: {w}" for w in warn)
    if echo:
        print(summary, flush=True)
    return EvalResult(out_dir=out, report_path=report_path, metrics=flat, run_id=run_id, summary=summary)


def _saliency_part(network: Any, cache: Any, rows: np.ndarray, ev: Any, cfg: Any, device: str) -> Any:
    """Grad-CAM overlays ("Where the model looked"): the one section that needs the network and the pixels."""
    from .saliency import saliency_section

    sal = saliency_section(network, cache, rows, ev.probs, ev.labels,
                           ev.class_names, cfg.data, cfg.eval.saliency_per_class, device=device,
                           batch_size=cfg.eval.batch_size)
    return sections.Section(context={"saliency": sal}, figures={f"saliency_{k}": v for k, v in sal["figures"].items()},
                            data=sal)


def _log_to_mlflow(tracking: Any, uri: str, cfg: Any, tm: Any, split: str, flat: dict[str, float | None], out: Path,
                   report_path: Path, params: dict[str, Any], card_markdown: str | None = None) -> str:
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
        calibration_file = tm.checkpoint_path.parent / "calibration.json"
        if calibration_file.is_file():  # read by `ecl predict` given a run id or models:/... on any machine
            tracking.log_artifact(calibration_file, artifact_path="calibration")
            from .serving import log_servable

            log_servable(tm, uri, active)  # image files in, calibrated probabilities out: runs:/<id>/servable
        html_name = "report.html" if split == "test" else f"report-{split}.html"
        tracking.log_text(report_path.read_text(encoding="utf-8"), f"report/{html_name}")
        if card_markdown is not None:
            tracking.log_text(card_markdown, "model_card.md" if split == "test" else f"model_card-{split}.md")
        return active


if __name__ == "__main__":  # `python -m pipeline.evaluate ARGS` is `ecl evaluate ARGS` (one parser: pipeline.cli)
    from pipeline.cli import main as _ecl_main

    sys.exit(_ecl_main(["evaluate", *sys.argv[1:]]))
