"""`ecl evaluate`: metrics, calibration, confidence intervals, subgroups, geometry, and a report.

What a clinician needs to trust (or distrust) a model, computed in one pass over a split:

1. Predict the split (and the validation split) with the deterministic eval view, raw logits.
2. Fit temperature scaling on validation logits (minimum NLL) and store T in calibration.json
   beside the checkpoint (never in it) and as the run's MLflow artifact, so `ecl predict` returns calibrated probabilities; calibration is reported before and after
   (accuracy cannot change: dividing a row's logits by T keeps its argmax).
3. Score the calibrated probabilities with `pipeline.metrics` (balanced accuracy, per-class
   recall/specificity/precision/F1/AUROC/AP, confusion, shot groups), stratified bootstrap CIs
   with `pipeline.stats`, calibration before/after, subgroups from the cohort's metadata (sex,
   age band, anatomical site), per-patient metrics for CT, and the learned representation
   geometry (`pipeline.geometry_stage.geometry_section`).
   Operating points: per class, thresholds for fixed specificity / sensitivity chosen on the
   validation predictions and held on this split, with ROC and PR curves and bootstrap bands;
   selective prediction (risk-coverage, balanced accuracy when the least confident are referred);
   a model card (intended use, cohort, performance by subgroup with CIs, calibration, limitations).
4. Write metrics.json, predictions.csv and ground_truth.csv (ISIC submission format: the official
   scorer can re-score them), PNG plots, model_card.md and a self-contained report.html, log all
   of it to the training run in MLflow (`<split>/balanced_accuracy`, `<split>/recall/MEL`, ...;
   the report under `report/report.html`, the card as `model_card.md`), and print a compact
   headline table in the terminal.

A class absent from the split has no recall, AUROC or CI: it is `null` in metrics.json, "n/a" in
the report, and is never logged to MLflow (no fake 0 or NaN).
"""
from __future__ import annotations

import datetime as _dt
import errno
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
from .report import fmt_number

__all__ = ["EvalResult", "SplitPredictions", "run_evaluate", "predict_split", "subgroup_analysis", "age_band",
           "patient_level", "code_version", "headline_text", "model_card", "main"]

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
#: selective prediction is reported at this coverage ("refer the 20 % least confident")
SELECTIVE_COVERAGE = 0.8
#: resamples for the ROC/PR bands (a figure needs far fewer than an interval in a table)
CURVE_BANDS_MAX_BOOT = 200


@dataclass
class EvalResult:
    """Where the evaluation went and its flat metrics (None = undefined on this split)."""

    out_dir: Path
    report_path: Path
    metrics: dict[str, float | None]
    run_id: str | None
    summary: str = ""  # the headline table printed in the terminal


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
                      min_size: int, n_boot: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """Balanced accuracy and per-class recall per value of sex, age band and anatomical site.

    Args:
        manifest_rows: the manifest rows (DataFrame) of the labelled samples, aligned with `probs`.
        probs: [N, C] probabilities.
        labels: [N] class positions.
        class_names: C names.
        min_size: subgroups with fewer samples are flagged `too_small`.
        n_boot: with a number, each row also gets ``"ci"``: the stratified-bootstrap 95 % interval
            of its balanced accuracy (`pipeline.stats.bootstrap_ci`, `seed`).

    Returns:
        One dict per attribute present: ``{"attribute", "column", "rows": [{"value", "n",
        "balanced_accuracy", "recall": {class: value|None}, "too_small"[, "ci"]}]}``.
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
            row = {
                "value": value,
                "n": n,
                "balanced_accuracy": float(np.nanmean(recall)),
                "recall": dict(zip(class_names, _nullable(recall))),
                "too_small": n < min_size,
            }
            if n_boot:
                b = stats.bootstrap_ci(probs[mask], labels[mask], n_boot=n_boot, seed=seed)["balanced_accuracy"]
                row["ci"] = (b["lo"], b["hi"])
            rows.append(row)
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



# ---------------------------------------------------------------- terminal and model card
def _op_at(ops: dict[str, Any] | None, name: str, kind: str, target: float = 0.9) -> dict[str, Any] | None:
    entry = (ops or {}).get(name)
    if not entry:
        return None
    return next((r for r in entry[kind] if abs(r["target"] - target) < 1e-9), None)


def headline_text(title: str, split: str, flat: dict[str, float | None], class_names: Sequence[str],
                  n_labelled: int, temperature: float, ops: dict[str, Any] | None,
                  selective: dict[str, Any]) -> str:
    """The compact headline table `ecl evaluate` prints: overall numbers with CIs, then one row per class.

    Operating points shown are the 90 % ones (thresholds chosen on validation, held on `split`);
    the report and metrics.json have 80 / 90 / 95 %.
    """
    from .report import fmt_ci, text_table

    def ci(key: str) -> str:
        return fmt_ci((flat.get(f"{key}_ci_low"), flat.get(f"{key}_ci_high")))

    overall = text_table(["metric", "value", "95% CI"], [
        ["balanced accuracy", flat.get("balanced_accuracy"), ci("balanced_accuracy")],
        ["accuracy", flat.get("accuracy"), ci("accuracy")],
        ["macro AUROC", flat.get("macro_auroc"), ""],
        ["ECE before scaling", fmt_number(flat.get("ece"), 4), ""],
        [f"ECE after scaling (T={fmt_number(temperature, 2)})", fmt_number(flat.get("ece_calibrated"), 4), ""],
        [f"bal. acc. at {round(100 * selective['coverage'])}% coverage", selective["balanced_accuracy"],
         f"{selective['n_kept']}/{n_labelled} kept"],
    ], title=f"{title} ({split} split, {n_labelled} labelled images)")
    rows = []
    for name in class_names:
        at_spec, at_sens = _op_at(ops, name, "at_specificity"), _op_at(ops, name, "at_sensitivity")
        rows.append([name, flat.get(f"recall/{name}"),
                     fmt_ci((flat.get(f"recall_ci_low/{name}"), flat.get(f"recall_ci_high/{name}"))),
                     flat.get(f"auroc/{name}"),
                     None if at_spec is None else at_spec["sensitivity"],
                     None if at_spec is None else at_spec["specificity"],
                     None if at_sens is None else at_sens["specificity"],
                     None if at_sens is None else at_sens["sensitivity"]])
    per_class = text_table(["class", "recall", "95% CI", "AUROC", "sens@spec90", "(spec)", "spec@sens90", "(sens)"],
                           rows, title="Per class; operating points: threshold for 90% specificity (or sensitivity) "
                                       "chosen on val, sens/spec measured here")
    return overall + "\n\n" + per_class


_INTENDED_USE = (
    "A {method} classifier ({backbone}) of {kind} images into {k} classes ({classes}), trained with the ecl-pipeline "
    "to study and audit classification on an imbalanced cohort. It is a research model, not a medical device: it must "
    "not be used to diagnose or to decide on treatment. Any clinical use needs prospective validation on the target "
    "population, devices and prevalence, and a clinician who remains responsible for every decision. Outputs are "
    "class probabilities calibrated by temperature scaling (T = {t}); where a decision rule is needed, use an "
    "operating point chosen on validation data (below) rather than the argmax."
)


def model_card(*, title: str, method: str, backbone: str, kind: str, split: str, class_names: Sequence[str],
               cohort: dict[str, Any], flat: dict[str, float | None], subgroups: list[dict[str, Any]],
               min_subgroup_size: int, temperature: float, t_source: str, ops: dict[str, Any] | None,
               selective: dict[str, Any], small_class_n: int = SMALL_CLASS_CI_N) -> dict[str, Any]:
    """The model card (Mitchell et al. 2019), as markdown and as the report section's context.

    Every number comes from this evaluation (no hand-typed figure); the limitations are derived
    from what the evaluation can and cannot show (small classes and subgroups, one seed, one
    cohort), followed by the ones every model trained here shares.

    Returns:
        ``{"markdown", "intended_use", "limitations": [str], "subgroups": [rows with ci]}``.
    """
    from .report import fmt_ci, markdown_table

    names = list(class_names)
    counts = cohort["counts"]
    # a generic cache ("image": a CSV or folder cohort) names no modality
    intended = _INTENDED_USE.format(method=method, backbone=backbone, kind="generic" if kind == "image" else kind, k=len(names),
                                    classes=", ".join(names), t=fmt_number(temperature, 2))
    lim: list[str] = []
    absent = [c for c, n in zip(names, counts[split]) if n == 0]
    small = [f"{c} ({n})" for c, n in zip(names, counts[split]) if 0 < n < small_class_n]
    if absent:
        lim.append(f"No {split} image of {', '.join(absent)}: performance on these classes is unknown.")
    if small:
        lim.append(f"Fewer than {small_class_n} {split} images of {', '.join(small)}: their recall is an anecdote, "
                   f"and its interval cannot show it.")
    small_groups = [f"{s['attribute']} = {r['value']} ({r['n']})" for s in subgroups for r in s["rows"] if r["too_small"]]
    if small_groups:
        lim.append(f"Subgroups below {min_subgroup_size} images ({'; '.join(small_groups)}): too few to show whether "
                   f"the model works for them.")
    if not subgroups:
        lim.append("The cohort has no sex, age or site metadata: performance across subgroups could not be checked.")
    n_val = int(sum(counts["val"]))
    lim.append(f"Temperature and operating-point thresholds were fitted on {n_val} validation images; "
               f"with few validation images per class the thresholds are noisy.")
    if cohort.get("imbalance_ratio"):
        lim.append(f"Training was imbalanced (largest/smallest class {fmt_number(cohort['imbalance_ratio'], 1)}x): "
                   f"rare classes are learned from few examples.")
    lim.append("One training run: the intervals reflect the finite test set, not the spread between training seeds "
               "(`ecl compare` over several seeds shows it).")
    lim.append("Train, validation and test come from one cohort: there is no external validation, so performance "
               "under another site, device or population is unknown.")

    sub_rows = [{"attribute": s["attribute"], "value": r["value"], "n": r["n"], "balanced_accuracy": r["balanced_accuracy"],
                 "ci": r.get("ci"), "too_small": r["too_small"]} for s in subgroups for r in s["rows"]]
    cov = round(100 * selective["coverage"])
    md = [f"# Model card: {title}", "", "## Intended use", "", intended, "",
          "## Cohort", "", f"{kind} cache, {len(names)} classes; images per class and split:", "",
          markdown_table(["class", "train", "val", "test"],
                         [[c, str(counts["train"][k]), str(counts["val"][k]), str(counts["test"][k])] for k, c in enumerate(names)]),
          ""]
    if sub_rows:
        md += [f"Subgroup sizes in the {split} split: " + "; ".join(
            f"{s['attribute']}: " + ", ".join(f"{r['value']} {r['n']}" for r in s["rows"]) for s in subgroups) + ".", ""]
    md += [f"## Performance ({split} split, {cohort['n_labelled']} labelled images, 95 % bootstrap CIs)", "",
           markdown_table(["metric", "value", "95% CI"], [
               ["balanced accuracy", flat.get("balanced_accuracy"),
                fmt_ci((flat.get("balanced_accuracy_ci_low"), flat.get("balanced_accuracy_ci_high")))],
               ["accuracy", flat.get("accuracy"), fmt_ci((flat.get("accuracy_ci_low"), flat.get("accuracy_ci_high")))],
               ["macro AUROC", flat.get("macro_auroc"), "n/a"],
               [f"balanced accuracy at {cov}% coverage (least confident referred)", selective["balanced_accuracy"], "n/a"],
           ]), "",
           markdown_table(["class", "recall", "95% CI", "AUROC", "sensitivity at 90% specificity", "threshold (val)"],
                          [[c, flat.get(f"recall/{c}"), fmt_ci((flat.get(f"recall_ci_low/{c}"), flat.get(f"recall_ci_high/{c}"))),
                            flat.get(f"auroc/{c}"),
                            (_op_at(ops, c, "at_specificity") or {}).get("sensitivity"),
                            fmt_number((_op_at(ops, c, "at_specificity") or {}).get("threshold"), 4)] for c in names]), ""]
    if sub_rows:
        md += ["### By subgroup", "", markdown_table(
            ["attribute", "value", "n", "balanced accuracy", "95% CI", ""],
            [[r["attribute"], r["value"], str(r["n"]), r["balanced_accuracy"], fmt_ci(r["ci"]),
              "too small" if r["too_small"] else ""] for r in sub_rows]), ""]
    md += ["## Calibration", "", f"Temperature T = {fmt_number(temperature)} fitted on {t_source}.", "",
           markdown_table(["metric", "before scaling", "after scaling"], [
               ["ECE (top-label)", fmt_number(flat.get("ece"), 4), fmt_number(flat.get("ece_calibrated"), 4)],
               ["class-wise ECE", fmt_number(flat.get("classwise_ece"), 4), fmt_number(flat.get("classwise_ece_calibrated"), 4)],
               ["Brier score", fmt_number(flat.get("brier"), 4), fmt_number(flat.get("brier_calibrated"), 4)],
           ]), "", "## Known limitations", ""] + [f"- {x}" for x in lim] + [""]
    return {"markdown": "\n".join(md), "intended_use": intended, "limitations": lim, "subgroups": sub_rows}


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

    from . import tracking
    from .checkpoint import load_checkpoint, load_trained_model, write_calibration
    from .config import flatten_config, public_config
    from .store import resolve_store

    if split not in ("train", "val", "test"):
        raise PipelineError(f"split {split!r} is not one of train, val, test")
    device = _device()
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
    labelled = pred.labels >= 0
    if not labelled.any():
        raise PipelineError(f"split {split!r} of cache {cfg.data.cache} has no labelled images; "
                            f"use `ecl predict` for unlabelled images or pick another --split")
    logits, y = pred.logits[labelled], pred.labels[labelled]

    # 2. temperature scaling on validation logits (val also sets the operating-point thresholds)
    val = pred if split == "val" else predict_split(tm.network, cache, "val", cfg.data, cfg.eval.batch_size, device)
    vmask = val.labels >= 0
    temperature, t_source = 1.0, "nothing (temperature scaling is off: eval.temperature_scaling=false)"
    if cfg.eval.temperature_scaling:
        if vmask.any():
            temperature = calibration.fit_temperature(val.logits[vmask], val.labels[vmask])
            t_source = f"the validation split ({int(vmask.sum())} images)"
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
    subgroups = subgroup_analysis(rows, probs, y, names, cfg.eval.min_subgroup_size, n_boot=n_boot,
                                  seed=cfg.eval.bootstrap_seed)
    for s in subgroups:
        for r in s["rows"]:
            value = r["value"].replace("<", "lt").replace("+", "plus")
            flat[f"subgroup/{s['attribute']}/{value}/balanced_accuracy"] = r["balanced_accuracy"]
            flat[f"subgroup/{s['attribute']}/{value}/n"] = float(r["n"])
    patient = patient_level(rows, probs, y, names, n_bins) if cache.kind == "ct" else None
    if patient is not None:
        pci = stats.bootstrap_ci(patient["probs"], patient["labels"], n_boot=n_boot, seed=cfg.eval.bootstrap_seed,
                                 class_names=names)
        for key, value in metrics.flat_metrics(patient["report"]).items():  # calibrated probabilities
            flat[f"patient/{key}_calibrated" if key in _CALIBRATION_KEYS else f"patient/{key}"] = value
        flat["patient/balanced_accuracy_ci_low"] = pci["balanced_accuracy"]["lo"]
        flat["patient/balanced_accuracy_ci_high"] = pci["balanced_accuracy"]["hi"]
        patient["ci"] = pci

    # operating points (thresholds from val, held here) and selective prediction
    ops, ops_note = None, None
    if vmask.any():
        val_probs = calibration.apply_temperature(val.logits[vmask], temperature)
        ops = metrics.operating_points(val_probs, val.labels[vmask], probs, y, names)
        if split == "val":
            warn.append("Operating-point thresholds were chosen on this same validation split: their sensitivity "
                        "and specificity here are optimistic.")
        for name, entry in ops.items():
            for row in (entry or {}).get("at_specificity", []):
                tag = f"{round(100 * row['target'])}"
                flat[f"sensitivity_at_specificity_{tag}/{name}"] = row["sensitivity"]
                flat[f"specificity_at_specificity_{tag}/{name}"] = row["specificity"]
                flat[f"threshold_at_specificity_{tag}/{name}"] = row["threshold"]
            for row in (entry or {}).get("at_sensitivity", []):
                tag = f"{round(100 * row['target'])}"
                flat[f"specificity_at_sensitivity_{tag}/{name}"] = row["specificity"]
                flat[f"sensitivity_at_sensitivity_{tag}/{name}"] = row["sensitivity"]
                flat[f"threshold_at_sensitivity_{tag}/{name}"] = row["threshold"]
    else:
        ops_note = "No labelled validation images: thresholds for operating points cannot be chosen."
    bands = stats.curve_bands(probs, y, n_boot=min(n_boot, CURVE_BANDS_MAX_BOOT), seed=cfg.eval.bootstrap_seed)
    selective = metrics.selective_metrics(probs, y, SELECTIVE_COVERAGE)
    selective["classes_referred"] = [names[c] for c in selective["classes_referred"]]
    rc = metrics.risk_coverage(probs, y)
    cov_grid = np.linspace(0.05, 1.0, 20)
    bacc_cov = [metrics.selective_metrics(probs, y, float(c))["balanced_accuracy"] for c in cov_grid]
    cov_tag = round(100 * SELECTIVE_COVERAGE)
    flat["selective/aurc"] = selective["aurc"]
    flat[f"selective/balanced_accuracy_at_coverage_{cov_tag}"] = selective["balanced_accuracy"]
    flat[f"selective/accuracy_at_coverage_{cov_tag}"] = selective["accuracy"]
    flat[f"selective/confidence_threshold_at_coverage_{cov_tag}"] = selective["threshold"]

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
        except (ValueError, RuntimeError) as exc:  # e.g. fewer than two classes in this split; never abort
            geometry_note = f"The geometry section could not be computed on this split: {exc}"
            warn.append(geometry_note)
        if geometry is not None:
            warn.extend(geometry.warnings)  # e.g. the optimum G* could not be computed
            for key, value in geometry.metrics.items():
                flat[f"geometry/{key}"] = None if value is None or not math.isfinite(float(value)) else float(value)

    # where the model looked: Grad-CAM of a few correct and wrong images per class
    from .saliency import saliency_section
    saliency = saliency_section(tm.network, cache, pred.index[labelled], probs, y, names, cfg.data,
                                cfg.eval.saliency_per_class, device=device, batch_size=cfg.eval.batch_size)

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
    op_marks = {}
    for name, entry in (ops or {}).items():
        if entry:
            op_marks[name] = [(1 - r["specificity"], r["sensitivity"]) for r in entry["at_specificity"]
                              if r["specificity"] is not None and r["sensitivity"] is not None]
    figures["roc_pr"] = plots.roc_pr_grid(dict(zip(names, bands)), op_marks)
    figures["risk_coverage"] = plots.risk_coverage_plot(rc["coverage"], rc["risk"], cov_grid, bacc_cov,
                                                        mark=SELECTIVE_COVERAGE)
    for key, png in figures.items():
        atomic_write_bytes(out / f"{key}.png", png)
    if geometry is not None:
        for key, png in geometry.figures.items():
            atomic_write_bytes(out / f"geometry_{key}.png", png)
    for key, png in saliency["figures"].items():
        atomic_write_bytes(out / f"saliency_{key}.png", png)

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
    cohort = {
        "class_names": names,
        "counts": {s: [int(v) for v in cache.class_counts(s)] for s in ("train", "val", "test")},
        "train_counts_model": [int(v) for v in train_counts],
        "imbalance_ratio": float(train_counts.max() / train_counts[train_counts > 0].min()) if (train_counts > 0).any() else None,
        "n_labelled": int(labelled.sum()),
        "n_unlabelled": int((~labelled).sum()),
    }
    # the run folder's parent holds the local store train wrote to (pipeline.store.resolve_store's rule)
    uri = resolve_store(tracking_uri, stored=ckpt.tracking_uri or cfg.tracking.uri,
                        beside=tm.run_dir.parent if tm.run_dir else cfg.train.output_dir, create=True)
    run_title = cfg.train.run_name or Path(str(tm.run_dir or tm.checkpoint_path)).name
    card = model_card(title=run_title, method=cfg.method.name, backbone=cfg.model.backbone, kind=cache.kind,
                      split=split, class_names=names, cohort=cohort, flat=flat, subgroups=subgroups,
                      min_subgroup_size=cfg.eval.min_subgroup_size, temperature=temperature, t_source=t_source,
                      ops=ops, selective=selective)
    atomic_write_text(out / "model_card.md", card["markdown"])
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
        "operating_points": ops,
        "operating_points_note": ops_note,
        "selective": selective,
        "model_card": {k: v for k, v in card.items() if k != "markdown"},
        "provenance": provenance,
        "warnings": warn + ([] if geometry is None else geometry.solver_notes),
    }
    atomic_write_text(out / "metrics.json", json.dumps(payload, indent=2, allow_nan=False))

    report_path = out / "report.html"
    context = _report_context(split, tm, cfg, rep_cal, rep_raw, ci, flat, temperature, t_source, figures, subgroups,
                              patient, geometry, geometry_note, cohort, provenance, warn, n_boot, public_config(cfg))
    context.update(_extra_context(names, ops, ops_note, selective, card, min(n_boot, CURVE_BANDS_MAX_BOOT)))
    context["saliency"] = saliency
    report.write_html(report_path, "report.html", **context)

    # 5. MLflow
    run_id = _log_to_mlflow(tracking, uri, cfg, tm, split, flat, out, report_path, flatten_config(cfg),
                            card["markdown"])
    if run_id != tm.run_id:  # a new evaluation run: record it beside the files (the logged copy predates it)
        payload["mlflow"]["run_id"] = run_id
        atomic_write_text(out / "metrics.json", json.dumps(payload, indent=2, allow_nan=False))
    summary = headline_text(f"Evaluation of {run_title}", split, flat, names, int(labelled.sum()), temperature, ops,
                            selective)
    if warn:
        summary += "\n\n" + "\n".join(f"Warning: {w}" for w in warn)
    if echo:
        print(summary, flush=True)
    return EvalResult(out_dir=out, report_path=report_path, metrics=flat, run_id=run_id, summary=summary)


def _extra_context(names: list[str], ops: dict[str, Any] | None, ops_note: str | None, selective: dict[str, Any],
                   card: dict[str, Any], n_curve_boot: int) -> dict[str, Any]:
    """Report context of the operating-point, selective-prediction and model-card sections."""
    op_rows = []  # one row per class: its operating points at each target, fixed specificity then sensitivity
    for name in names:
        entry = (ops or {}).get(name)
        if entry:
            op_rows.append({"name": name, "at_specificity": entry["at_specificity"],
                            "at_sensitivity": entry["at_sensitivity"]})
    targets = [r["target"] for r in op_rows[0]["at_specificity"]] if op_rows else []
    missing = [n for n in names if ops is not None and ops.get(n) is None]
    return {"operating_points": op_rows, "operating_targets": targets, "operating_points_note": ops_note,
            "operating_points_missing": missing,
            "n_curve_boot": n_curve_boot, "selective": selective, "model_card": card}


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
        {"name": "ECE before temperature scaling", "value": flat["ece"], "ci": None},
        {"name": "ECE after temperature scaling", "value": flat["ece_calibrated"], "ci": None},
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
        {"value": r["value"], "n": r["n"], "balanced_accuracy": r["balanced_accuracy"], "ci": r.get("ci"),
         "recalls": [r["recall"][c] for c in names], "too_small": r["too_small"]} for r in s["rows"]]}
        for s in subgroups]
    patient_ctx = None
    if patient is not None:
        prep = patient["report"]["overall"]
        patient_ctx = {"n_groups": len(patient["ids"]), "n_samples": int(cohort["n_labelled"]), "rows": [
            {"name": "balanced accuracy", "sample": rep_cal["overall"]["balanced_accuracy"], "patient": prep["balanced_accuracy"]},
            {"name": "accuracy", "sample": rep_cal["overall"]["accuracy"], "patient": prep["accuracy"]},
            {"name": "macro AUROC", "sample": rep_cal["overall"].get("macro_auroc"), "patient": prep.get("macro_auroc")},
            {"name": "ECE (calibrated)", "sample": rep_cal["overall"]["ece"], "patient": prep["ece"]},
            {"name": "Brier score (calibrated)", "sample": rep_cal["overall"]["brier"], "patient": prep["brier"]},
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


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m pipeline.evaluate ARGS` is `ecl evaluate ARGS` (one parser: pipeline.cli)."""
    import sys

    from .cli import main as ecl_main

    return ecl_main(["evaluate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
