"""The evaluation report's sections, each built from one typed evaluation input.

Why apart from `pipeline.evaluate`: the stage loads a model, predicts, fits the temperature,
writes files and logs to MLflow; what each section *says* is computed here, from arrays only
(`EvalInputs` and its `Scores`), so every section can be built and tested without a run or a
cache. Each builder returns a `Section`: its flat metrics (metrics.json "metrics" and MLflow, one
name each), its metrics.json entries, its report-template variables, its PNG figures and its
warnings. `pipeline.evaluate` assembles them in report order.

Metric names are defined once, in `METRICS` (key -> how the key is said in the terminal, the
model card and the report) and `PER_CLASS_METRICS`; the flat keys, the MLflow names
(``<split>/<key>``) and the report rows all follow from them.

A class absent from the split has no recall, AUROC or CI: it is `None` (null in metrics.json,
"n/a" in the report) and is never logged to MLflow (no fake 0 or NaN).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from . import calibration, metrics, plots, report, stats
from .geometry_report import flat_geometry
from .report import fmt_number

__all__ = ["MetricSpec", "METRICS", "PER_CLASS_METRICS", "CALIBRATION_KEYS", "EvalInputs", "Scores", "Section",
           "score", "headline_section", "calibration_section", "subgroup_section", "patient_section",
           "operating_points_section", "selective_section", "geometry_section", "cohort_section",
           "model_card_section", "subgroup_analysis", "age_band", "patient_level", "headline_text", "model_card",
           "SMALL_CLASS_CI_N", "SELECTIVE_COVERAGE", "CURVE_BANDS_MAX_BOOT", "SUBGROUP_COLUMNS"]

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
#: selective prediction is reported at this coverage ("refer the 20 % least confident")
SELECTIVE_COVERAGE = 0.8
#: resamples for the ROC/PR bands (a figure needs far fewer than an interval in a table)
CURVE_BANDS_MAX_BOOT = 200


@dataclass(frozen=True)
class MetricSpec:
    """How one overall metric is named where people read it (its key is the flat/JSON/MLflow name)."""

    short: str  # in running text and terminal rows: "ECE before scaling"
    name: str  # in lower-case table rows (terminal, model card)
    title: str  # in the HTML report's tables
    calibration: bool = False  # reported before and after temperature scaling (`<key>` and `<key>_calibrated`)


#: the overall metrics, in report order; keys are those of `metrics.classification_report`'s "overall"
METRICS: dict[str, MetricSpec] = {
    "balanced_accuracy": MetricSpec("balanced accuracy", "balanced accuracy", "Balanced accuracy (mean recall)"),
    "accuracy": MetricSpec("accuracy", "accuracy", "Accuracy"),
    "macro_auroc": MetricSpec("macro AUROC", "macro AUROC", "Macro AUROC"),
    "ece": MetricSpec("ECE", "ECE (top-label)", "ECE (top-label)", calibration=True),
    "mce": MetricSpec("MCE", "MCE", "MCE", calibration=True),
    "classwise_ece": MetricSpec("class-wise ECE", "class-wise ECE", "Class-wise ECE", calibration=True),
    "brier": MetricSpec("Brier score", "Brier score", "Brier score", calibration=True),
    "nll": MetricSpec("NLL", "NLL", "NLL", calibration=True),
}
#: per-class metrics: flat keys ``<metric>/<class>``, None for a class absent from the split
PER_CLASS_METRICS = ("recall", "specificity", "precision", "f1", "auroc", "average_precision")
CALIBRATION_KEYS = tuple(k for k, spec in METRICS.items() if spec.calibration)


@dataclass
class EvalInputs:
    """Everything the sections are computed from: the labelled images of one split, and the cohort.

    Built by `pipeline.evaluate` from the one prediction pass (`pipeline.inference`); arrays are
    aligned (row i of `logits`, `labels`, `manifest_rows` and the feature arrays is one image).
    """

    split: str
    class_names: list[str]
    kind: str  # cache kind: "dermoscopy", "ct", ...
    logits: np.ndarray  # [N, C] raw logits of the labelled images
    labels: np.ndarray  # [N]
    manifest_rows: Any  # DataFrame: the manifest rows of those images (subgroup and patient columns)
    temperature: float
    t_source: str  # what T was fitted on, in words
    train_counts: np.ndarray  # [C] training images per class (head/tail, shot groups, optimum)
    split_counts: dict[str, list[int]]  # images per class in train/val/test
    n_unlabelled: int
    n_bins: int
    n_boot: int
    seed: int
    min_subgroup_size: int
    val_logits: np.ndarray | None = None  # labelled validation logits (operating-point thresholds)
    val_labels: np.ndarray | None = None
    h: np.ndarray | None = None  # [N, d] backbone features of the labelled images
    z: np.ndarray | None = None  # [N, d_z] projections; None without a projection head
    weight: np.ndarray | None = None  # [C, d] classifier weight
    prototypes: np.ndarray | None = None
    loss_temperature: float = 0.1  # the supervised loss's tau, whose optimum G* geometry compares with
    probs: np.ndarray = field(init=False)  # calibrated probabilities
    probs_raw: np.ndarray = field(init=False)  # T = 1

    def __post_init__(self) -> None:
        self.probs_raw = calibration.apply_temperature(self.logits, 1.0)
        self.probs = calibration.apply_temperature(self.logits, self.temperature)


@dataclass
class Scores:
    """The split scored once: calibrated and raw classification reports, bootstrap CIs."""

    calibrated: dict[str, Any]
    raw: dict[str, Any]
    ci: dict[str, Any]


@dataclass
class Section:
    """One part of the evaluation, in every form it is written in."""

    flat: dict[str, float | None] = field(default_factory=dict)  # metrics.json "metrics", MLflow `<split>/<key>`
    payload: dict[str, Any] = field(default_factory=dict)  # top-level metrics.json entries
    context: dict[str, Any] = field(default_factory=dict)  # report template variables
    figures: dict[str, bytes] = field(default_factory=dict)  # `<key>.png` files and report figures
    warnings: list[str] = field(default_factory=list)
    data: Any = None  # the section's own result, for the sections and files built from it


def score(ev: EvalInputs) -> Scores:
    """Classification reports (calibrated and raw) and stratified-bootstrap CIs of the split."""
    names = ev.class_names
    rep_cal = metrics.classification_report(ev.probs, ev.labels, names, ev.train_counts, n_bins=ev.n_bins)
    rep_raw = metrics.classification_report(ev.probs_raw, ev.labels, names, ev.train_counts, n_bins=ev.n_bins)
    ci = stats.bootstrap_ci(ev.probs, ev.labels, n_boot=ev.n_boot, seed=ev.seed, class_names=names)
    return Scores(calibrated=rep_cal, raw=rep_raw, ci=ci)


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

    ece = METRICS["ece"].short
    overall = text_table(["metric", "value", "95% CI"], [
        [METRICS["balanced_accuracy"].name, flat.get("balanced_accuracy"), ci("balanced_accuracy")],
        [METRICS["accuracy"].name, flat.get("accuracy"), ci("accuracy")],
        [METRICS["macro_auroc"].name, flat.get("macro_auroc"), ""],
        [f"{ece} before scaling", fmt_number(flat.get("ece"), 4), ""],
        [f"{ece} after scaling (T={fmt_number(temperature, 2)})", fmt_number(flat.get("ece_calibrated"), 4), ""],
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
               [METRICS["balanced_accuracy"].name, flat.get("balanced_accuracy"),
                fmt_ci((flat.get("balanced_accuracy_ci_low"), flat.get("balanced_accuracy_ci_high")))],
               [METRICS["accuracy"].name, flat.get("accuracy"), fmt_ci((flat.get("accuracy_ci_low"), flat.get("accuracy_ci_high")))],
               [METRICS["macro_auroc"].name, flat.get("macro_auroc"), "n/a"],
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
               [METRICS[k].name, fmt_number(flat.get(k), 4), fmt_number(flat.get(f"{k}_calibrated"), 4)]
               for k in ("ece", "classwise_ece", "brier")
           ]), "", "## Known limitations", ""] + [f"- {x}" for x in lim] + [""]
    return {"markdown": "\n".join(md), "intended_use": intended, "limitations": lim, "subgroups": sub_rows}


# ---------------------------------------------------------------- sections
def _flat(ev: EvalInputs, sc: Scores) -> dict[str, float | None]:
    """Stable metric names; per-class values are None (not absent) for a class absent from the split."""
    rep_cal, rep_raw, ci = sc.calibrated, sc.raw, sc.ci
    flat: dict[str, float | None] = dict(metrics.flat_metrics(rep_cal))
    for name, row in rep_cal["per_class"].items():
        for key in PER_CLASS_METRICS:
            flat.setdefault(f"{key}/{name}", row.get(key))
    for key in CALIBRATION_KEYS:
        flat[key] = rep_raw["overall"][key]
        flat[f"{key}_calibrated"] = rep_cal["overall"][key]
    flat["temperature"] = float(ev.temperature)
    for key in ("balanced_accuracy", "accuracy"):
        flat[f"{key}_ci_low"] = ci[key]["lo"]
        flat[f"{key}_ci_high"] = ci[key]["hi"]
    for name in ev.class_names:
        r = ci["recall"].get(name)
        flat[f"recall_ci_low/{name}"] = None if r is None else r["lo"]
        flat[f"recall_ci_high/{name}"] = None if r is None else r["hi"]
    return flat


def headline_section(ev: EvalInputs, sc: Scores) -> Section:
    """Overall and per-class performance with CIs, shot groups, confusion and recall figures."""
    names, rep_cal, ci = ev.class_names, sc.calibrated, sc.ci
    flat = _flat(ev, sc)
    ece = METRICS["ece"].short
    headline = [
        {"name": METRICS["balanced_accuracy"].title, "value": flat["balanced_accuracy"],
         "ci": (ci["balanced_accuracy"]["lo"], ci["balanced_accuracy"]["hi"])},
        {"name": METRICS["accuracy"].title, "value": flat["accuracy"], "ci": (ci["accuracy"]["lo"], ci["accuracy"]["hi"])},
        {"name": METRICS["macro_auroc"].title, "value": rep_cal["overall"].get("macro_auroc"), "ci": None},
        {"name": f"{ece} before temperature scaling", "value": flat["ece"], "ci": None},
        {"name": f"{ece} after temperature scaling", "value": flat["ece_calibrated"], "ci": None},
    ]
    per_class = []
    for c, name in enumerate(names):
        row = rep_cal["per_class"][name]
        r_ci = ci["recall"].get(name)
        per_class.append({
            "name": name, "n": row["support"], "train_n": int(ev.train_counts[c]),
            "recall": row["recall"], "recall_ci": None if r_ci is None else (r_ci["lo"], r_ci["hi"]),
            "specificity": row["specificity"], "precision": row["precision"], "f1": row["f1"],
            "auroc": row["auroc"], "ap": row["average_precision"],
        })
    shots = rep_cal.get("shots") or {}
    shot_groups = [{"group": f"{g}-shot", "classes": shots[g]["classes"], "accuracy": shots[g]["accuracy"]}
                   for g in ("many", "medium", "few") if g in shots and shots[g]["classes"]]
    figures = {
        "confusion": plots.confusion_heatmap(np.asarray(rep_cal["confusion"]["counts"]), names),
        "recall": plots.recall_bars(names, [rep_cal["per_class"][c]["recall"] for c in names],
                                    [None if ci["recall"][c] is None else ci["recall"][c]["lo"] for c in names],
                                    [None if ci["recall"][c] is None else ci["recall"][c]["hi"] for c in names],
                                    ev.train_counts),
    }
    context = {
        "headline": headline,
        "shot_groups": shot_groups,
        # below this many evaluated images a class's stratified-bootstrap interval is flagged
        "small_class_n": SMALL_CLASS_CI_N,
        "shot_thresholds": (shots.get("many_shot_min", metrics.MANY_SHOT_MIN),
                            shots.get("few_shot_max", metrics.FEW_SHOT_MAX)),
        "per_class": per_class,
    }
    payload = {"report": rep_cal, "uncalibrated": sc.raw["overall"], "bootstrap": ci}
    return Section(flat=flat, payload=payload, context=context, figures=figures)


def _reliability_png(probs: np.ndarray, labels: np.ndarray, n_bins: int, title: str) -> bytes:
    b = calibration.reliability_bins(probs, labels, n_bins)
    return plots.reliability_diagram(b["confidence"], b["accuracy"], b["counts"], b["edges"],
                                     title=f"{title} (ECE {b['ece']:.3f})")


def calibration_section(ev: EvalInputs, sc: Scores) -> Section:
    """Calibration before and after temperature scaling: table rows and reliability diagrams.

    Its numbers are in the headline's flat metrics (``<key>`` and ``<key>_calibrated``).
    """
    names, y = ev.class_names, ev.labels
    rows = [{"name": METRICS[k].title, "before": sc.raw["overall"][k], "after": sc.calibrated["overall"][k]}
            for k in CALIBRATION_KEYS]
    figures = {
        "reliability": _reliability_png(ev.probs_raw, y, ev.n_bins, "Before scaling"),
        "reliability_calibrated": _reliability_png(ev.probs, y, ev.n_bins, f"After scaling, T={ev.temperature:.2f}"),
    }
    panels = {}
    for c, name in enumerate(names):
        b = calibration.reliability_bins(ev.probs, y, ev.n_bins, class_index=c)
        panels[f"{name} (n={int((y == c).sum())})"] = (b["confidence"], b["accuracy"], b["counts"], b["edges"])
    figures["reliability_classes"] = plots.reliability_grid(panels)
    return Section(payload={"temperature": float(ev.temperature), "temperature_source": ev.t_source},
                   context={"temperature": ev.temperature, "temperature_source": ev.t_source,
                            "calibration_rows": rows},
                   figures=figures)


def subgroup_section(ev: EvalInputs) -> Section:
    """Balanced accuracy (with CI) and recall per sex, age band and site; `data` is the subgroup list."""
    names = ev.class_names
    subgroups = subgroup_analysis(ev.manifest_rows, ev.probs, ev.labels, names, ev.min_subgroup_size,
                                  n_boot=ev.n_boot, seed=ev.seed)
    flat: dict[str, float | None] = {}
    for s in subgroups:
        for r in s["rows"]:
            value = r["value"].replace("<", "lt").replace("+", "plus")
            flat[f"subgroup/{s['attribute']}/{value}/balanced_accuracy"] = r["balanced_accuracy"]
            flat[f"subgroup/{s['attribute']}/{value}/n"] = float(r["n"])
    context = [{"attribute": s["attribute"], "rows": [
        {"value": r["value"], "n": r["n"], "balanced_accuracy": r["balanced_accuracy"], "ci": r.get("ci"),
         "recalls": [r["recall"][c] for c in names], "too_small": r["too_small"]} for r in s["rows"]]}
        for s in subgroups]
    section = Section(flat=flat, payload={"subgroups": subgroups, "min_subgroup_size": ev.min_subgroup_size},
                      context={"subgroups": context, "min_subgroup_size": ev.min_subgroup_size})
    section.data = subgroups
    return section


def patient_section(ev: EvalInputs, sc: Scores) -> Section:
    """Per-patient metrics for a CT cohort (`data`: `patient_level`'s dict with "ci"; None otherwise)."""
    patient = patient_level(ev.manifest_rows, ev.probs, ev.labels, ev.class_names, ev.n_bins) \
        if ev.kind == "ct" else None
    section = Section(payload={"patient_level": None}, context={"patient": None})
    section.data = patient
    if patient is None:
        return section
    pci = stats.bootstrap_ci(patient["probs"], patient["labels"], n_boot=ev.n_boot, seed=ev.seed,
                             class_names=ev.class_names)
    for key, value in metrics.flat_metrics(patient["report"]).items():  # calibrated probabilities
        section.flat[f"patient/{key}_calibrated" if key in CALIBRATION_KEYS else f"patient/{key}"] = value
    section.flat["patient/balanced_accuracy_ci_low"] = pci["balanced_accuracy"]["lo"]
    section.flat["patient/balanced_accuracy_ci_high"] = pci["balanced_accuracy"]["hi"]
    patient["ci"] = pci
    sample, prep = sc.calibrated["overall"], patient["report"]["overall"]
    section.payload["patient_level"] = {"column": patient["column"], "n_patients": len(patient["ids"]),
                                        "report": patient["report"], "bootstrap": pci}
    section.context["patient"] = {"n_groups": len(patient["ids"]), "n_samples": int(len(ev.labels)), "rows": [
        {"name": METRICS["balanced_accuracy"].name, "sample": sample["balanced_accuracy"],
         "patient": prep["balanced_accuracy"]},
        {"name": METRICS["accuracy"].name, "sample": sample["accuracy"], "patient": prep["accuracy"]},
        {"name": METRICS["macro_auroc"].name, "sample": sample.get("macro_auroc"), "patient": prep.get("macro_auroc")},
        {"name": f"{METRICS['ece'].short} (calibrated)", "sample": sample["ece"], "patient": prep["ece"]},
        {"name": f"{METRICS['brier'].short} (calibrated)", "sample": sample["brier"], "patient": prep["brier"]},
    ]}
    return section


def operating_points_section(ev: EvalInputs) -> Section:
    """Per class, thresholds for fixed specificity/sensitivity chosen on validation and held on this split.

    `data` is the operating points (None without labelled validation images); the ROC/PR figure
    with bootstrap bands marks them.
    """
    names, probs, y = ev.class_names, ev.probs, ev.labels
    section = Section()
    ops, ops_note = None, None
    if ev.val_logits is not None and len(ev.val_logits):
        val_probs = calibration.apply_temperature(ev.val_logits, ev.temperature)
        ops = metrics.operating_points(val_probs, ev.val_labels, probs, y, names)
        if ev.split == "val":
            section.warnings.append("Operating-point thresholds were chosen on this same validation split: their "
                                    "sensitivity and specificity here are optimistic.")
        for name, entry in ops.items():
            for row in (entry or {}).get("at_specificity", []):
                tag = f"{round(100 * row['target'])}"
                section.flat[f"sensitivity_at_specificity_{tag}/{name}"] = row["sensitivity"]
                section.flat[f"specificity_at_specificity_{tag}/{name}"] = row["specificity"]
                section.flat[f"threshold_at_specificity_{tag}/{name}"] = row["threshold"]
            for row in (entry or {}).get("at_sensitivity", []):
                tag = f"{round(100 * row['target'])}"
                section.flat[f"specificity_at_sensitivity_{tag}/{name}"] = row["specificity"]
                section.flat[f"sensitivity_at_sensitivity_{tag}/{name}"] = row["sensitivity"]
                section.flat[f"threshold_at_sensitivity_{tag}/{name}"] = row["threshold"]
    else:
        ops_note = "No labelled validation images: thresholds for operating points cannot be chosen."
    n_curve_boot = min(ev.n_boot, CURVE_BANDS_MAX_BOOT)
    bands = stats.curve_bands(probs, y, n_boot=n_curve_boot, seed=ev.seed)
    op_marks = {}
    for name, entry in (ops or {}).items():
        if entry:
            op_marks[name] = [(1 - r["specificity"], r["sensitivity"]) for r in entry["at_specificity"]
                              if r["specificity"] is not None and r["sensitivity"] is not None]
    section.figures["roc_pr"] = plots.roc_pr_grid(dict(zip(names, bands)), op_marks)
    op_rows = []  # one row per class: its operating points at each target, fixed specificity then sensitivity
    for name in names:
        entry = (ops or {}).get(name)
        if entry:
            op_rows.append({"name": name, "at_specificity": entry["at_specificity"],
                            "at_sensitivity": entry["at_sensitivity"]})
    targets = [r["target"] for r in op_rows[0]["at_specificity"]] if op_rows else []
    missing = [n for n in names if ops is not None and ops.get(n) is None]
    section.payload = {"operating_points": ops, "operating_points_note": ops_note}
    section.context = {"operating_points": op_rows, "operating_targets": targets, "operating_points_note": ops_note,
                       "operating_points_missing": missing, "n_curve_boot": n_curve_boot}
    section.data = ops
    return section


def selective_section(ev: EvalInputs) -> Section:
    """Selective prediction: the least confident cases referred; risk-coverage curve (`data`: the summary)."""
    names, probs, y = ev.class_names, ev.probs, ev.labels
    selective = metrics.selective_metrics(probs, y, SELECTIVE_COVERAGE)
    selective["classes_referred"] = [names[c] for c in selective["classes_referred"]]
    rc = metrics.risk_coverage(probs, y)
    cov_grid = np.linspace(0.05, 1.0, 20)
    bacc_cov = [metrics.selective_metrics(probs, y, float(c))["balanced_accuracy"] for c in cov_grid]
    cov_tag = round(100 * SELECTIVE_COVERAGE)
    flat = {
        "selective/aurc": selective["aurc"],
        f"selective/balanced_accuracy_at_coverage_{cov_tag}": selective["balanced_accuracy"],
        f"selective/accuracy_at_coverage_{cov_tag}": selective["accuracy"],
        f"selective/confidence_threshold_at_coverage_{cov_tag}": selective["threshold"],
    }
    figure = plots.risk_coverage_plot(rc["coverage"], rc["risk"], cov_grid, bacc_cov, mark=SELECTIVE_COVERAGE)
    section = Section(flat=flat, payload={"selective": selective}, context={"selective": selective},
                      figures={"risk_coverage": figure})
    section.data = selective
    return section


def geometry_section(ev: EvalInputs) -> Section:
    """The learned representation's geometry (`pipeline.geometry_report`); never aborts the evaluation.

    Flat keys ``geometry/<key>``; figures ``geometry_<key>``; `data` is the `GeometrySection`
    (None when it could not be computed), whose solver notes go to metrics.json only.
    """
    from .geometry_report import geometry_section as learned_geometry

    section = Section()
    geometry, note = None, "The geometry section is not available in this installation."
    if ev.h is not None and ev.weight is not None:
        try:
            geometry = learned_geometry(ev.h, ev.z, ev.labels, ev.weight, ev.train_counts, ev.class_names,
                                        prototypes=ev.prototypes, temperature=ev.loss_temperature)
        except (ValueError, RuntimeError) as exc:  # e.g. fewer than two classes in this split; never abort
            note = f"The geometry section could not be computed on this split: {exc}"
            section.warnings.append(note)
    section.data = geometry
    section.context = {"geometry": None, "geometry_note": note}
    section.payload = {"geometry": None}
    if geometry is None:
        return section
    section.warnings.extend(geometry.warnings)  # e.g. the optimum G* could not be computed
    section.flat = {f"geometry/{k}": v for k, v in flat_geometry(geometry.metrics).items()}
    section.figures = {f"geometry_{k}": png for k, png in geometry.figures.items()}
    section.payload["geometry"] = {"metrics": flat_geometry(geometry.metrics), "sentences": geometry.sentences}
    section.context["geometry"] = {
        "sentences": list(geometry.sentences),
        "rows": [{"name": k, "value": v} for k, v in geometry.metrics.items()],
        "figures": [{"name": k.replace("_", " "), "uri": report.data_uri(v)} for k, v in geometry.figures.items()]}
    return section


def cohort_section(ev: EvalInputs) -> Section:
    """Images per class and split, the training imbalance, labelled and unlabelled counts (`data`: the dict)."""
    names, counts, train_counts = ev.class_names, ev.split_counts, ev.train_counts
    cohort = {
        "class_names": names,
        "counts": counts,
        "train_counts_model": [int(v) for v in train_counts],
        "imbalance_ratio": float(train_counts.max() / train_counts[train_counts > 0].min())
        if (train_counts > 0).any() else None,
        "n_labelled": int(len(ev.labels)),
        "n_unlabelled": int(ev.n_unlabelled),
    }
    context = {"rows": [{"name": n, "train": counts["train"][c], "val": counts["val"][c], "test": counts["test"][c]}
                        for c, n in enumerate(names)],
               "totals": {s: int(sum(counts[s])) for s in counts},
               "imbalance_ratio": cohort["imbalance_ratio"], "n_labelled": cohort["n_labelled"],
               "n_unlabelled": cohort["n_unlabelled"]}
    section = Section(payload={"cohort": cohort}, context={"cohort": context, "class_names": names})
    section.data = cohort
    return section


def model_card_section(ev: EvalInputs, *, title: str, method: str, backbone: str, flat: dict[str, float | None],
                       cohort: dict[str, Any], subgroups: list[dict[str, Any]], ops: dict[str, Any] | None,
                       selective: dict[str, Any]) -> Section:
    """The model card from the other sections' results (`data`: its markdown)."""
    card = model_card(title=title, method=method, backbone=backbone, kind=ev.kind, split=ev.split,
                      class_names=ev.class_names, cohort=cohort, flat=flat, subgroups=subgroups,
                      min_subgroup_size=ev.min_subgroup_size, temperature=ev.temperature, t_source=ev.t_source,
                      ops=ops, selective=selective)
    section = Section(payload={"model_card": {k: v for k, v in card.items() if k != "markdown"}},
                      context={"model_card": card})
    section.data = card["markdown"]
    return section
