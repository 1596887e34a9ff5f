"""`ecl geometry`: the optimal class-mean geometry for a cohort, and how far a trained model is from it.

Three ways in (exactly one per call):

* ``class_counts``: solve the optimum G* for the cohort's class proportions (pipeline.geometry's
  formulation of the Nguyen et al. program), print it, print the predicted cosines among the rare
  classes and the minority-collapse threshold of the cohort's two-level reduction, save a heat map.
* ``majority`` / ``minority`` (/ ``ratio``): the two-level problem directly: b*(R) and R*.
* ``run_ref``: a trained run's learned geometry on one split (backbone features, and projections where
  the network has a projection head), with heat maps and plain-language sentences;
  the computation is `pipeline.geometry_report.geometry_section`, the same one the evaluation
  report shows; the features come from `pipeline.inference.predict_split`.

The two-level reduction of a cohort (head vs tail at the median training count) is explained in
`pipeline.geometry_report`.

Usage::

    ecl geometry --counts 4522,12875,3323,867,2624,239,253,628 --negatives 1 --tau 0.1
    ecl geometry --majority 3 --minority 3 --tau 10 --negatives 1
    ecl geometry --run runs/isic-ecl --split test
"""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipeline import geometry
from pipeline.errors import ConfigError, PipelineError
from pipeline.geometry_report import (
    RATIO_MAX,
    GeometrySection,
    TwoLevelReduction,
    _evidence,
    _names,
    _predict_collapse,
    _collapse_sentence,
    geometry_section,
    gram_heatmap_png,
    two_level_reduction,
)

__all__ = [
    "GeometrySection",
    "TwoLevelReduction",
    "two_level_reduction",
    "gram_heatmap_png",
    "geometry_section",
    "run_geometry",
]

_RATIO_GRID = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0)


def _format_matrix(matrix: np.ndarray, names: Sequence[str]) -> str:
    width = max(7, max(len(n) for n in names) + 1)
    lines = [" " * width + "".join(f"{n:>{width}}" for n in names)]
    for name, row in zip(names, matrix):
        lines.append(f"{name:<{width}}" + "".join(f"{v:>{width}.3f}" for v in row))
    return "\n".join(lines)


def _check_counts_positive(counts: np.ndarray, names: Sequence[str]) -> None:
    empty = [names[i] for i in np.flatnonzero(counts <= 0)]
    if empty:
        raise ConfigError(f"class counts: classes {empty} have no training samples; the optimum needs every "
                          "class to occur (drop them from the class list)")


def _solve_for_counts(counts: np.ndarray, names: Sequence[str], negatives: int, temperature: float,
                      mode: str) -> geometry.OptimumSolution:
    """The verified optimum for training counts (`pipeline.geometry_optimum.solve_optimum`).

    Raises:
        ConfigError: a class without training samples.
        PipelineError: no solver produced a verified optimum (the message says what each did).
    """
    _check_counts_positive(counts, names)
    try:
        return geometry.solve_optimum(counts / counts.sum(), negatives, temperature, mode)
    except geometry.OptimumError as err:
        raise PipelineError(f"optimal Gram: {err}") from err


def _run_counts(class_counts: Sequence[int], class_names: Sequence[str] | None, negatives: int,
                temperature: float, mode: str, out_dir: Path) -> dict[str, Any]:
    counts = np.asarray(class_counts, dtype=np.float64)
    if counts.ndim != 1 or counts.size < 2 or np.any(counts < 0) or not np.all(np.isfinite(counts)):
        raise ConfigError("--counts: give at least two non-negative class counts, e.g. --counts 900,90,10")
    names = _names(class_names, counts.size, "--class-names")
    sol = _solve_for_counts(counts, names, negatives, temperature, mode)
    gram, objective = sol.gram, sol.objective
    col = _predict_collapse(counts, negatives, temperature, mode)
    red = col.reduction
    rare = {f"{names[i]}~{names[j]}": float(gram[i, j]) for k, i in enumerate(red.tail) for j in red.tail[k + 1:]}

    order = np.argsort(-counts, kind="stable")
    ordered = [names[i] for i in order]
    png = gram_heatmap_png(
        [(f"optimum G* ({mode}, k={negatives}, tau={temperature:g})", gram[np.ix_(order, order)]),
         ("regular simplex", geometry.simplex_gram(counts.size))], ordered)
    figure = Path(out_dir) / "geometry-optimal-gram.png"
    import data_prep  # deferred: data_prep's public io helpers

    data_prep.atomic_write_bytes(figure, png)

    print(f"Optimal Gram G* of unit class means ({mode}, {negatives} negative(s), tau = {temperature:g}), "
          f"expected loss {objective:.6g}:")
    print(_format_matrix(gram, names))
    print(_evidence(sol))
    if rare:
        print(f"\nPredicted cosines among the rare classes (training count below the median, "
              f"simplex would give {-1.0 / (counts.size - 1):.3f}):")
        for pair, value in rare.items():
            print(f"  {pair}: {value:.3f}")
    print("\nTwo-level reduction: " + (
        f"{red.k_major} head, {red.k_minor} tail classes, R = {red.ratio:.4g}; b*(R) = {col.b_star:.4f}; "
        + ("R* = none up to {:g}".format(max(RATIO_MAX, 2 * red.ratio)) if math.isinf(col.threshold)
           else f"R* = {col.threshold:.4g}") if col.collapsed is not None else "not applicable"))
    print(_collapse_sentence(col, names))
    print(f"Heat map: {figure}")
    return {
        "class_names": names, "class_counts": counts.tolist(), "mode": mode, "negatives": negatives,
        "temperature": temperature, "optimal_gram": gram.tolist(), "objective": objective,
        "simplex_objective": sol.simplex_objective, "solver": sol.solver, "certified_gap": sol.gap,
        "solver_agreement": sol.agreement, "solver_notes": list(sol.notes),
        "tail_classes": [names[i] for i in red.tail], "rare_cosines": rare,
        "k_major": red.k_major, "k_minor": red.k_minor, "ratio": red.ratio, "b_star": col.b_star,
        "threshold": col.threshold, "collapse_predicted": col.collapsed, "figure": str(figure),
    }


def _run_two_level(majority: int, minority: int, ratio: float | None, negatives: int, temperature: float,
                   mode: str) -> dict[str, Any]:
    ratios = (float(ratio),) if ratio is not None else _RATIO_GRID
    ratio_max = max(RATIO_MAX, 2.0 * max(ratios))
    by_ratio = {r: geometry.minority_collapse(majority, minority, r, negatives, temperature, mode) for r in ratios}
    threshold = geometry.minority_collapse_threshold(majority, minority, negatives, temperature, mode,
                                                     ratio_max=ratio_max)
    print(f"Two-level imbalance: {majority} majority, {minority} minority classes ({mode}, "
          f"{negatives} negative(s), tau = {temperature:g})")
    print(f"{'R = p_major/p_minor':>22}  {'b* (minority cosine)':>22}")
    for r, b in by_ratio.items():
        print(f"{r:>22.4g}  {b:>22.4f}" + ("  collapsed" if b == 1.0 else ""))
    print("R* (minority collapse threshold): " + (
        f"none up to {ratio_max:g}" if math.isinf(threshold) else f"{threshold:.4g}"))
    return {"k_major": majority, "k_minor": minority, "ratio": ratio, "mode": mode, "negatives": negatives,
            "temperature": temperature, "b_star": by_ratio[ratios[0]] if ratio is not None else None,
            "b_star_by_ratio": by_ratio, "threshold": threshold}


def _extract_features(run_ref: str, split: str, tracking_uri: str | None) -> dict[str, Any]:
    """Backbone features, projections, labels and heads of a trained run on one split.

    Prediction is `pipeline.inference.predict_split` (the same eval view and batching as the report);
    z is None for a model without a projection head (`geometry_section` then reports the backbone only).
    """
    import data_prep

    from .checkpoint import load_trained_model
    from .inference import predict_split

    trained = load_trained_model(run_ref, device="cpu", tracking_uri=tracking_uri)
    cfg = trained.config
    cache = data_prep.open_cache(cfg.data.cache)
    pred = predict_split(trained.network, cache, split, cfg.data, cfg.eval.batch_size, device="cpu", features=True)
    labelled = pred.labels >= 0
    if pred.h is None or not labelled.any():
        raise PipelineError(f"split {split!r} of cache {cfg.data.cache} has no labelled images; pick another --split")
    return {"h": pred.h[labelled], "z": None if pred.z is None else pred.z[labelled], "y": pred.labels[labelled],
            "weight": pred.weight,
            "prototypes": pred.prototypes, "class_names": list(trained.class_names),
            "class_counts": list(trained.class_counts), "run_id": trained.run_id}


def _run_trained(run_ref: str, split: str, tracking_uri: str | None, negatives: int, temperature: float,
                 out_dir: Path) -> dict[str, Any]:
    data = _extract_features(run_ref, split, tracking_uri)
    section = geometry_section(data["h"], data["z"], data["y"], data["weight"], data["class_counts"],
                               data["class_names"], data["prototypes"], temperature, negatives)
    import data_prep

    figures = {}
    for name, png in section.figures.items():
        path = Path(out_dir) / f"geometry-{split}-{name.replace('_', '-')}.png"
        data_prep.atomic_write_bytes(path, png)
        figures[name] = str(path)
    print(f"Learned geometry of {run_ref} on the {split} split:")
    for key, value in section.metrics.items():
        print(f"  {key:<42} {value:.4g}")
    for sentence in section.sentences:
        print(sentence)
    for warning in section.warnings:
        print(f"note: {warning}")
    return {"metrics": section.metrics, "sentences": section.sentences, "warnings": section.warnings,
            "figures": figures, "run_id": data["run_id"], "split": split}


def run_geometry(class_counts: list[int] | None = None, majority: int | None = None, minority: int | None = None,
                 ratio: float | None = None, negatives: int = 1, temperature: float = 0.1, mode: str = "scl",
                 out_dir: str | Path = ".", run_ref: str | None = None, split: str = "test",
                 tracking_uri: str | None = None, class_names: list[str] | None = None) -> dict[str, Any]:
    """Entry of `ecl geometry`: prints its findings and returns them as plain numbers.

    Exactly one of ``class_counts``, ``majority``+``minority`` or ``run_ref`` must be given.

    Raises:
        ConfigError: conflicting or invalid arguments (bad counts, negatives, temperature, mode).
        PipelineError: the solver failed, or the run cannot be loaded.
    """
    given = [name for name, v in (("--counts", class_counts), ("--majority/--minority", majority if majority
                                  is not None else minority), ("--run", run_ref)) if v is not None]
    if len(given) != 1:
        raise ConfigError("ecl geometry: give exactly one of --counts, --majority with --minority, or --run"
                          + (f"; got {' and '.join(given)}" if given else ""))
    if ratio is not None and class_counts is not None:
        raise ConfigError("ecl geometry: --ratio goes with --majority/--minority; --counts implies its own ratio")
    if int(negatives) != negatives or negatives < 1:
        raise ConfigError(f"--negatives must be a whole number >= 1; got {negatives!r}")
    if not temperature > 0:
        raise ConfigError(f"--tau must be > 0; got {temperature!r}")
    if mode not in ("scl", "ucl"):
        raise ConfigError(f"--mode must be 'scl' (supervised) or 'ucl' (unsupervised); got {mode!r}")
    try:
        if class_counts is not None:
            return _run_counts(class_counts, class_names, int(negatives), float(temperature), mode, Path(out_dir))
        if run_ref is not None:
            return _run_trained(run_ref, split, tracking_uri, int(negatives), float(temperature), Path(out_dir))
        if majority is None or minority is None:
            raise ConfigError("ecl geometry: --majority and --minority go together (numbers of classes)")
        return _run_two_level(majority, minority, ratio, int(negatives), float(temperature), mode)
    except (ConfigError, PipelineError):
        raise
    except ValueError as err:  # geometry's argument checks: user input, reported as such
        raise ConfigError(f"ecl geometry: {err}") from err


if __name__ == "__main__":  # `python -m pipeline.geometry_stage ARGS` is `ecl geometry ARGS` (one parser: pipeline.cli)
    from pipeline.cli import main as _ecl_main

    sys.exit(_ecl_main(["geometry", *sys.argv[1:]]))
