"""`ecl compare`: several evaluated runs side by side, with a paired bootstrap against the first.

Why paired: runs evaluated on the same split share their samples, so their errors are
correlated; resampling both with the same indices (`pipeline.stats.paired_bootstrap_difference`)
gives the interval of the *difference* in balanced accuracy, which is far narrower (and honest)
compared with eyeballing two overlapping single-run intervals.

Inputs are each run's evaluation predictions (`predictions.csv` + `ground_truth.csv` in the ISIC
format, written by `ecl evaluate`): from `<run folder>/eval-<split>/`, an eval folder given
directly, or the run's MLflow artifacts `eval-<split>/`. A run that has none is not evaluated here
(one stage does not run another, and an evaluation fits and writes the run's temperature): the
error says which `ecl evaluate` to run first; `ecl demo` and benchmarks/longtail evaluate before
comparing.
Samples are matched by image id; every run must score the same labelled images of the same
classes. A folder holding many run folders (the `train.output_dir` of a seed sweep) stands for
all of them.

Seeds: one run is one draw of the training randomness, so a method is judged on its runs across
seeds. Runs are grouped (`group_by`: the method from each run's resolved config, a config key, or
an MLflow tag); per group the mean +- sd over runs of test balanced accuracy and of ECE, and for
each group against the reference group (the first run's) the difference of means with an
interval and p-value from `pipeline.stats.hierarchical_bootstrap` (seeds and test images
resampled). The per-seed paired tests of runs with the same seed stay in the table.

The comparison is printed as a plain-text table and written as compare.html (self-contained),
comparison.json, comparison.csv (one row per run), comparison_groups.csv (one row per group),
comparison.md, comparison.png and comparison_groups.png, and logged as its own MLflow run (tag
`ecl.kind=compare`).
ECE columns are named for what they hold: `ece` before and `ece_calibrated` after temperature
scaling (the predictions are the calibrated ones; the raw ones are recovered with the run's T).
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
from .store import DEFAULT_OUTPUT_DIR, resolve_run_ref, resolve_store

__all__ = ["RunPredictions", "load_run_predictions", "run_compare", "expand_run_folders", "group_key",
           "uncalibrated_probs", "DEFAULT_EXPERIMENT"]

DEFAULT_EXPERIMENT = "ecl"
_BEST = "checkpoint-best.pt"
#: below this many runs a group's seed spread (and so its hierarchical interval) is a rough guess
MIN_SEEDS = 3


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
    config: dict[str, Any] = field(default_factory=dict)  # flattened resolved config ('train.seed': 0)
    tags: dict[str, str] | None = None  # MLflow tags; None = not looked up yet

    @property
    def seed(self) -> int | None:
        """`train.seed` of the run's resolved config, None if unknown."""
        value = self.config.get("train.seed")
        try:
            return None if value is None else int(value)
        except (TypeError, ValueError):
            return None


def _read_config(folder: Path) -> dict[str, Any]:
    """The flattened config.yaml of a run folder ({} when there is none or it cannot be read)."""
    import yaml

    from .config import flatten_config

    path = folder / "config.yaml"
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return flatten_config(data) if isinstance(data, dict) else {}


def _read_eval_folder(folder: Path, name: str, source: str, method: str | None = None,
                      config: dict[str, Any] | None = None, tags: dict[str, str] | None = None) -> RunPredictions:
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
    if config is None:  # an eval folder inside a run folder: the run's config is one level up
        config = _read_config(folder.parent) if folder.name.startswith("eval-") else {}
    return RunPredictions(
        name=name, source=source, method=str(config.get("method.name") or method or info.get("method", "?")),
        class_names=classes, image_ids=merged["image"].tolist(), probs=merged[classes].to_numpy(dtype=np.float64),
        labels=onehot.argmax(axis=1).astype(np.int64), info=info, config=config, tags=tags,
    )


def _has_eval(folder: Path) -> bool:
    return (folder / "predictions.csv").is_file() and (folder / "ground_truth.csv").is_file()


def load_run_predictions(ref: str | Path, split: str = "test", tracking_uri: str | None = None) -> RunPredictions:
    """Find one run's evaluated predictions on `split`.

    Args:
        ref: an eval folder, a run folder, or an MLflow reference (run id, runs:/ID, models:/NAME/VERSION).
        split: 'val' or 'test'.
        tracking_uri: MLflow store for run ids (`pipeline.store.resolve_store`'s rule).

    Raises:
        PipelineError: `ref` is none of those, it has not been evaluated on `split`, or its
            predictions cannot be read.
    """
    path = Path(str(ref)).expanduser()
    if path.is_dir():
        if _has_eval(path):
            return _read_eval_folder(path, path.parent.name if path.name.startswith("eval-") else path.name, str(path))
        folder = path / f"eval-{split}"
        if not _has_eval(folder):
            if not (path / _BEST).is_file():
                raise PipelineError(f"{path} is neither an evaluation folder (predictions.csv + ground_truth.csv) nor "
                                    f"a run folder with checkpoint-best.pt or eval-{split}/")
            raise _not_evaluated(str(path), split)
        return _read_eval_folder(folder, path.name, str(path), config=_read_config(path))
    found = resolve_run_ref(str(ref), tracking_uri)
    if found is None:
        raise PipelineError(f"run reference {ref!r} is not a folder or an MLflow run id (32 hex digits)")
    run_id, uri = found.run_id, found.tracking_uri
    from . import tracking

    try:
        run = tracking.get_run(uri, run_id)
    except Exception as exc:  # noqa: BLE001 - mlflow raises its own types
        raise PipelineError(f"MLflow run {run_id} was not found in {uri} ({type(exc).__name__})") from None
    name = run.info.run_name or run_id[:8]
    tags = dict(run.data.tags)
    method = tags.get("ecl.method")
    run_dir = tags.get("ecl.run_dir")
    config = _read_config(Path(run_dir)) if run_dir else {}
    config = config or dict(run.data.params)  # params are the flattened config, as strings
    if run_dir and _has_eval(Path(run_dir) / f"eval-{split}"):
        return _read_eval_folder(Path(run_dir) / f"eval-{split}", name, f"MLflow run {run_id} ({run_dir})", method,
                                 config=config, tags=tags)
    dst = Path(tempfile.mkdtemp(prefix=f"ecl-compare-{run_id[:8]}-"))
    try:
        got = tracking.download_artifacts(uri, run_id, f"eval-{split}", dst)
        if _has_eval(got):
            return _read_eval_folder(got, name, f"MLflow run {run_id} (artifacts)", method, config=config, tags=tags)
    except Exception:  # noqa: BLE001 - no artifacts: not evaluated, said below
        pass
    raise _not_evaluated(run_id, split)


def _not_evaluated(ref: str, split: str) -> PipelineError:
    command = f"ecl evaluate --run {ref} --split {split}"
    return PipelineError(f"run {ref} has no predictions on the {split} split; run `{command}` first, then compare")


def expand_run_folders(refs: Sequence[str | Path], split: str = "test") -> list[str]:
    """Replace a folder of run folders (e.g. a seed sweep's `runs/`) by its run folders, by name.

    A folder that is itself an eval folder or a run folder is kept as it is; so is anything that is
    not a folder (a run id). A child counts as a run folder when it has `eval-<split>/` predictions
    or a best checkpoint.
    """
    out: list[str] = []
    for ref in refs:
        path = Path(str(ref)).expanduser()
        if path.is_dir() and not _has_eval(path) and not _has_eval(path / f"eval-{split}") \
                and not (path / _BEST).is_file():
            children = sorted(c for c in path.iterdir() if c.is_dir()
                              and (_has_eval(c / f"eval-{split}") or (c / _BEST).is_file()))
            if children:
                out.extend(str(c) for c in children)
                continue
        out.append(str(ref))
    return out


def _check_group_by(group_by: str) -> None:
    if group_by in ("method", "none") or re.fullmatch(r"(tag|config):\S+", group_by):
        return
    raise PipelineError(f"--group-by {group_by!r} is not one of: method, none, config:KEY (e.g. "
                        f"config:method.loss_weight_normalisation), tag:NAME (an MLflow tag of the runs)")


def _run_tags(run: RunPredictions, tracking_uri: str | None) -> dict[str, str]:
    """The run's MLflow tags (looked up once through metrics.json's run id for a run folder)."""
    if run.tags is None:
        run.tags = {}
        ml = run.info.get("mlflow") or {}
        if ml.get("run_id"):
            from . import tracking

            try:
                uri = resolve_store(tracking_uri, stored=ml.get("tracking_uri"))
                run.tags = dict(tracking.get_run(uri, str(ml["run_id"])).data.tags)
            except Exception:  # noqa: BLE001 - store gone or run deleted: no tags
                run.tags = {}
    return run.tags


def group_key(run: RunPredictions, group_by: str, tracking_uri: str | None = None) -> str:
    """The group of a run: its method, a config value (`config:KEY`) or an MLflow tag (`tag:NAME`).

    Raises:
        PipelineError: the run has no such config key or tag.
    """
    _check_group_by(group_by)
    if group_by == "none":
        return run.name
    if group_by == "method":
        return run.method
    kind, key = group_by.split(":", 1)
    if kind == "config":
        if key not in run.config:
            where = "its config.yaml" if run.config else "no config.yaml or MLflow params"
            raise PipelineError(f"run {run.name} ({run.source}) has no config key {key!r} ({where}); "
                                f"pick a key such as method.name or train.lr")
        return str(run.config[key])
    tags = _run_tags(run, tracking_uri)
    if key not in tags:
        raise PipelineError(f"run {run.name} ({run.source}) has no MLflow tag {key!r}; set it on every run "
                            f"(mlflow.set_tag or the MLflow UI) or group by method / config:KEY")
    return str(tags[key])


def uncalibrated_probs(probs: np.ndarray, temperature: float | None) -> np.ndarray | None:
    """Undo temperature scaling: ``softmax(T * log p)`` equals ``softmax(logits)`` for p = softmax(logits / T).

    Exact up to rounding (the row's log-sum-exp is a constant shift); None when T is unknown.
    """
    from scipy.special import softmax

    if temperature is None or not np.isfinite(float(temperature)) or float(temperature) <= 0:
        return None
    with np.errstate(divide="ignore"):
        logp = np.log(np.asarray(probs, dtype=np.float64))
    return softmax(float(temperature) * logp, axis=1)


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


def _seed_groups(runs: list[RunPredictions], keys: list[str]) -> list[tuple[str, list[int]]]:
    """(group name, run positions) in order of first appearance; the reference run's group first."""
    order: dict[str, list[int]] = {}
    for k, key in enumerate(keys):
        order.setdefault(key, []).append(k)
    return list(order.items())


def _group_analysis(runs: list[RunPredictions], rows: list[dict[str, Any]], groups: list[tuple[str, list[int]]],
                    labels: np.ndarray, n_bootstrap: int, seed: int) -> list[dict[str, Any]]:
    """Mean +- sd per group and the hierarchical-bootstrap difference to the first group."""
    h = stats.hierarchical_bootstrap([[runs[k].probs for k in members] for _, members in groups], labels,
                                     n_boot=n_bootstrap, seed=seed, reference=0)
    out = []
    for g, ((name, members), res, diff) in enumerate(zip(groups, h["groups"], h["differences"])):
        seeds = [runs[k].seed for k in members]
        per_seed = []
        if g > 0:  # paired tests of runs that share a seed with a run of the reference group
            ref_by_seed = {runs[k].seed: k for k in groups[0][1] if runs[k].seed is not None}
            for k in members:
                if runs[k].seed in ref_by_seed:
                    d, lo, hi, pv = stats.paired_bootstrap_difference(
                        runs[k].probs, runs[ref_by_seed[runs[k].seed]].probs, labels, n_boot=n_bootstrap, seed=seed)
                    per_seed.append({"seed": runs[k].seed, "run": runs[k].name, "diff": d, "ci": (lo, hi), "p_value": pv})
        out.append({
            "group": name, "n_runs": len(members), "runs": [runs[k].name for k in members],
            "seeds": [s for s in seeds if s is not None],
            "balanced_accuracy": res["balanced_accuracy"], "ci": (res["lo"], res["hi"]),
            "ece": stats.seed_summary([rows[k]["ece"] for k in members]),
            "ece_calibrated": stats.seed_summary([rows[k]["ece_calibrated"] for k in members]),
            "diff": None if diff is None else diff["diff"],
            "diff_ci": None if diff is None else (diff["lo"], diff["hi"]),
            "p_value": None if diff is None else diff["p_value"],
            "per_seed": per_seed,
        })
    return out


def _pm(summary: dict[str, Any], digits: int = 3) -> str:
    """'0.712 +- 0.015 (n=3)' for a seed_summary; sd shown as n/a for a single run."""
    if summary["mean"] is None:
        return "n/a"
    return f"{report.fmt_number(summary['mean'], digits)} ± {report.fmt_number(summary['sd'], digits)}"


def _tables(rows: list[dict[str, Any]], group_rows: list[dict[str, Any]] | None, names: list[str],
            reference: str) -> dict[str, tuple[list[str], list[list[Any]]]]:
    """The comparison's tables as (headers, cells): one for the terminal, markdown and tests alike."""
    run_headers = ["run", "method", "seed", "bal. acc.", "95% CI", *[f"rec. {c}" for c in names], "ECE",
                   "ECE cal.", f"Δ vs {reference}", "95% CI of Δ", "p"]
    run_cells = [[r["name"], r["method"], "n/a" if r["seed"] is None else str(r["seed"]), r["balanced_accuracy"],
                  report.fmt_ci(r["ci"]), *r["recalls"], r["ece"], r["ece_calibrated"], r["diff"],
                  report.fmt_ci(r["diff_ci"]), r["p_value"]] for r in rows]
    out = {"runs": (run_headers, run_cells)}
    if group_rows:
        ref = group_rows[0]["group"]
        g_headers = ["group", "runs", "seeds", "bal. acc. mean ± sd", "95% CI (seeds x images)", "ECE mean ± sd",
                     "ECE cal. mean ± sd", f"Δ vs {ref}", "95% CI of Δ", "p"]
        g_cells = [[g["group"], str(g["n_runs"]), ",".join(map(str, g["seeds"])) or "n/a", _pm(g["balanced_accuracy"]),
                    report.fmt_ci(g["ci"]), _pm(g["ece"], 4), _pm(g["ece_calibrated"], 4), g["diff"],
                    report.fmt_ci(g["diff_ci"]), g["p_value"]] for g in group_rows]
        out["groups"] = (g_headers, g_cells)
        seed_cells = [[g["group"], str(t["seed"]), t["run"], t["diff"], report.fmt_ci(t["ci"]), t["p_value"]]
                      for g in group_rows for t in g["per_seed"]]
        if seed_cells:
            out["per_seed"] = (["group", "seed", "run", f"Δ vs {ref} (same seed)", "95% CI of Δ", "p"], seed_cells)
    return out


def run_compare(run_refs: Sequence[str] | None, experiment: str | None = None, tracking_uri: str | None = None,
                out_dir: str | Path = "comparison", split: str = "test", n_bootstrap: int = 1000,
                seed: int = 0, group_by: str = "method", echo: bool = True) -> Path:
    """Compare runs and write compare.html; returns its path.

    Args:
        run_refs: run ids, run folders, eval folders, or folders of run folders; the first run is
            the reference of the paired differences and its group the reference group.
            Empty/None with `experiment`: every finished run of the experiment that has `<split>`
            metrics, oldest first.
        experiment: MLflow experiment to take the runs from, and to log the comparison in.
        tracking_uri: MLflow store (`pipeline.store.resolve_store`: this, else $MLFLOW_TRACKING_URI, else the
            store the runs were evaluated with, else a store in `out_dir`).
        out_dir: output folder.
        split: 'val' or 'test'.
        n_bootstrap: resamples for the CIs, the paired tests and the hierarchical bootstrap.
        seed: bootstrap seed.
        group_by: 'method' (`method.name` of each run's config), 'config:KEY', 'tag:NAME' (an
            MLflow tag) or 'none'. The seed table is made when some group has two or more runs.
        echo: print the tables to stdout.

    Raises:
        PipelineError: fewer than two runs, runs that do not share classes and samples, or a
            `group_by` a run cannot answer.
    """
    from . import tracking

    _check_group_by(group_by)
    if not isinstance(n_bootstrap, int) or n_bootstrap < 1:
        raise PipelineError(f"--n-bootstrap must be a positive number of resamples; got {n_bootstrap}")
    out = Path(out_dir)
    refs = expand_run_folders(list(run_refs or []), split)
    if not refs:
        if not experiment:
            raise PipelineError("give run ids / run folders to compare, or --experiment NAME")
        refs = _experiment_refs(resolve_store(tracking_uri, beside=DEFAULT_OUTPUT_DIR), experiment, split)
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
        raw = uncalibrated_probs(r.probs, r.info.get("temperature"))
        row: dict[str, Any] = {
            "name": r.name, "method": r.method, "seed": r.seed, "source": r.source,
            "balanced_accuracy": ci["balanced_accuracy"]["point"],
            "ci": (ci["balanced_accuracy"]["lo"], ci["balanced_accuracy"]["hi"]),
            "ece": None if raw is None else metrics.expected_calibration_error(raw, labels),
            "ece_calibrated": metrics.expected_calibration_error(r.probs, labels),
            "temperature": r.info.get("temperature"),
            "recalls": [None if not np.isfinite(v) else float(v) for v in recall],
            "diff": None, "diff_ci": None, "p_value": None,
        }
        if r is not ref:
            d, lo, hi, p = stats.paired_bootstrap_difference(r.probs, ref.probs, labels, n_boot=n_bootstrap, seed=seed)
            row.update(diff=d, diff_ci=(lo, hi), p_value=p)
        rows.append(row)
    if any(r["ece"] is None for r in rows):
        warn.append("Runs without a recorded temperature (no metrics.json beside their predictions) have no "
                    "ECE before scaling (n/a); ECE cal. is computed from their predictions as given.")

    group_rows: list[dict[str, Any]] | None = None
    if group_by != "none":
        keys = [group_key(r, group_by, tracking_uri) for r in runs]
        for row, key in zip(rows, keys):
            row["group"] = key
        groups = _seed_groups(runs, keys)
        if any(len(m) > 1 for _, m in groups):
            group_rows = _group_analysis(runs, rows, groups, labels, n_bootstrap, seed)
            few = [g["group"] for g in group_rows if g["n_runs"] < MIN_SEEDS]
            if few:
                warn.append(f"Groups with fewer than {MIN_SEEDS} runs ({', '.join(few)}): their sd and the seed "
                            f"level of the hierarchical interval rest on too few seeds to be more than a rough guess.")

    tables = _tables(rows, group_rows, names, ref.name)
    text_parts = []
    if group_rows:
        text_parts.append(report.text_table(*tables["groups"], title=f"Groups by {group_by} ({split} split, "
                                            f"{len(ids)} images, {n_bootstrap} resamples of seeds and images)"))
        if "per_seed" in tables:
            text_parts.append(report.text_table(*tables["per_seed"], title="Per-seed paired tests"))
    text_parts.append(report.text_table(*tables["runs"], title=f"Runs ({split} split; paired bootstrap vs {ref.name})"))
    text = "\n\n".join(text_parts + [f"Warning: {w}" for w in warn])
    if echo:
        print(text, flush=True)

    out.mkdir(parents=True, exist_ok=True)
    png = plots.comparison_plot([r["name"] for r in rows], [r["balanced_accuracy"] for r in rows],
                                [r["ci"][0] for r in rows], [r["ci"][1] for r in rows], names,
                                [r["recalls"] for r in rows])
    atomic_write_bytes(out / "comparison.png", png)
    group_png = None
    if group_rows:
        bacc_of = {r["name"]: r["balanced_accuracy"] for r in rows}
        group_png = plots.seed_groups_plot([g["group"] for g in group_rows],
                                           [[bacc_of[name] for name in g["runs"]] for g in group_rows],
                                           [g["balanced_accuracy"]["mean"] for g in group_rows],
                                           [g["ci"][0] for g in group_rows], [g["ci"][1] for g in group_rows])
        atomic_write_bytes(out / "comparison_groups.png", group_png)
    table = pd.DataFrame([{
        "run": r["name"], "method": r["method"], "group": r.get("group"), "seed": r["seed"],
        "balanced_accuracy": r["balanced_accuracy"], "ci_low": r["ci"][0], "ci_high": r["ci"][1],
        "ece": r["ece"], "ece_calibrated": r["ece_calibrated"],
        "diff_vs_reference": r["diff"], "diff_ci_low": None if r["diff_ci"] is None else r["diff_ci"][0],
        "diff_ci_high": None if r["diff_ci"] is None else r["diff_ci"][1], "p_value": r["p_value"],
        **{f"recall/{c}": v for c, v in zip(names, r["recalls"])}, "source": r["source"],
    } for r in rows])
    atomic_write_text(out / "comparison.csv", table.to_csv(index=False, lineterminator="\n"))
    if group_rows:
        gtable = pd.DataFrame([{
            "group": g["group"], "n_runs": g["n_runs"], "seeds": " ".join(map(str, g["seeds"])),
            "balanced_accuracy_mean": g["balanced_accuracy"]["mean"], "balanced_accuracy_sd": g["balanced_accuracy"]["sd"],
            "ci_low": g["ci"][0], "ci_high": g["ci"][1],
            "ece_mean": g["ece"]["mean"], "ece_sd": g["ece"]["sd"],
            "ece_calibrated_mean": g["ece_calibrated"]["mean"], "ece_calibrated_sd": g["ece_calibrated"]["sd"],
            "diff_vs_reference": g["diff"], "diff_ci_low": None if g["diff_ci"] is None else g["diff_ci"][0],
            "diff_ci_high": None if g["diff_ci"] is None else g["diff_ci"][1], "p_value": g["p_value"],
            "runs": " ".join(g["runs"]),
        } for g in group_rows])
        atomic_write_text(out / "comparison_groups.csv", gtable.to_csv(index=False, lineterminator="\n"))
    md = [f"# Comparison ({split} split, {len(ids)} images)", ""]
    if group_rows:
        md += [f"## Groups by {group_by}", "", report.markdown_table(*tables["groups"]), ""]
        if "per_seed" in tables:
            md += ["## Per-seed paired tests", "", report.markdown_table(*tables["per_seed"]), ""]
    md += ["## Runs", "", report.markdown_table(*tables["runs"]), ""]
    atomic_write_text(out / "comparison.md", "\n".join(md))

    def _jsonable(g: dict[str, Any]) -> dict[str, Any]:
        return {**g, "ci": list(g["ci"]), "diff_ci": None if g["diff_ci"] is None else list(g["diff_ci"]),
                **({"per_seed": [{**t, "ci": list(t["ci"])} for t in g["per_seed"]]} if "per_seed" in g else {})}

    payload = {"split": split, "reference": ref.name, "n_samples": len(ids), "class_names": names,
               "n_bootstrap": n_bootstrap, "seed": seed, "group_by": group_by, "warnings": warn,
               "runs": [_jsonable(r) for r in rows],
               "groups": None if group_rows is None else [_jsonable(g) for g in group_rows]}
    atomic_write_text(out / "comparison.json", json.dumps(payload, indent=2, allow_nan=False))
    html_path = report.write_html(
        out / "compare.html", "compare.html", title=f"Comparison of {len(rows)} runs ({split} split)", split=split,
        n_samples=len(ids), generated=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        warnings=warn, n_bootstrap=n_bootstrap, reference=ref.name, rows=rows, class_names=names,
        figure=report.data_uri(png), group_figure=None if group_png is None else report.data_uri(group_png),
        groups=group_rows, group_by=group_by, min_seeds=MIN_SEEDS,
    )

    stored = next((str(u) for r in runs if (u := (r.info.get("mlflow") or {}).get("tracking_uri"))), None)
    uri = resolve_store(tracking_uri, stored=stored, beside=out, create=True)
    exp = experiment or str(ref.info.get("experiment") or DEFAULT_EXPERIMENT)
    with tracking.start_run(uri, exp, run_name=f"compare-{split}",
                            tags={"ecl.kind": "compare", "ecl.compare.group_by": group_by,
                                  "ecl.compare.runs": ", ".join(r.source for r in runs)[:5000]}):
        logged: dict[str, float | None] = {}
        for r in rows:
            key = tracking.sanitize_metric_name(r["name"])
            logged[f"compare/{key}/balanced_accuracy"] = r["balanced_accuracy"]
            logged[f"compare/{key}/balanced_accuracy_ci_low"] = r["ci"][0]
            logged[f"compare/{key}/balanced_accuracy_ci_high"] = r["ci"][1]
            logged[f"compare/{key}/ece"] = r["ece"]
            logged[f"compare/{key}/ece_calibrated"] = r["ece_calibrated"]
            logged[f"compare/{key}/diff_vs_reference"] = r["diff"]
            logged[f"compare/{key}/p_value"] = r["p_value"]
        for g in group_rows or []:
            key = "compare/group/" + tracking.sanitize_metric_name(g["group"])
            logged[f"{key}/balanced_accuracy_mean"] = g["balanced_accuracy"]["mean"]
            logged[f"{key}/balanced_accuracy_sd"] = g["balanced_accuracy"]["sd"]
            logged[f"{key}/balanced_accuracy_ci_low"] = g["ci"][0]
            logged[f"{key}/balanced_accuracy_ci_high"] = g["ci"][1]
            logged[f"{key}/ece_calibrated_mean"] = g["ece_calibrated"]["mean"]
            logged[f"{key}/diff_vs_reference"] = g["diff"]
            logged[f"{key}/diff_ci_low"] = None if g["diff_ci"] is None else g["diff_ci"][0]
            logged[f"{key}/diff_ci_high"] = None if g["diff_ci"] is None else g["diff_ci"][1]
            logged[f"{key}/p_value"] = g["p_value"]
            logged[f"{key}/n_runs"] = float(g["n_runs"])
        tracking.log_metrics(logged)
        tracking.log_artifacts(out, artifact_path="comparison")
        tracking.log_text(html_path.read_text(encoding="utf-8"), "report/compare.html")
    return html_path

