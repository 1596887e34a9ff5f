"""`ecl geometry`: the optimal class-mean geometry for a cohort, and how far a trained model is from it.

Three ways in (exactly one per call):

* ``class_counts``: solve the optimum G* for the cohort's class proportions (pipeline.geometry's
  formulation of the Nguyen et al. program), print it, print the predicted cosines among the rare
  classes and the minority-collapse threshold of the cohort's two-level reduction, save a heat map.
* ``majority`` / ``minority`` (/ ``ratio``): the two-level problem directly: b*(R) and R*.
* ``run_ref``: a trained run's learned geometry on one split (backbone features, and projections where
  the network has a projection head), with heat maps and plain-language sentences;
  `geometry_section` is the same computation for the evaluation report.

**The two-level reduction of a cohort.** Real cohorts have many levels of imbalance; the collapse
threshold is only known for two. Classes whose training count is below the median count are the
tail (K_B classes), the rest the head (K_A classes), and the ratio is
R = mean head proportion / mean tail proportion. Collapse of the rare classes is predicted when the
reduced problem with (K_A, K_B, R) puts the within-tail cosine at 1, i.e. R >= R*. It is a summary:
the full optimum G* (also reported) is exact for the actual proportions.

Usage::

    ecl geometry --counts 4522,12875,3323,867,2624,239,253,628 --negatives 1 --tau 0.1
    ecl geometry --majority 3 --minority 3 --tau 10 --negatives 1
    ecl geometry --run runs/isic-ecl --split test
"""
from __future__ import annotations

import io
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipeline import geometry
from pipeline.errors import ConfigError, PipelineError

__all__ = [
    "GeometrySection",
    "TwoLevelReduction",
    "two_level_reduction",
    "gram_heatmap_png",
    "geometry_section",
    "run_geometry",
    "main",
]

_RATIO_GRID = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0)
_RATIO_MAX = 1000.0


@dataclass(frozen=True)
class TwoLevelReduction:
    """A cohort summarised as head vs tail: see the module docstring for the rule."""

    k_major: int
    k_minor: int
    ratio: float                 # mean head proportion / mean tail proportion (nan without a tail)
    tail: tuple[int, ...]        # class positions below the median training count
    head: tuple[int, ...]


@dataclass
class GeometrySection:
    """Geometry of one trained model for the report: numbers, PNG heat maps, sentences."""

    metrics: dict[str, float] = field(default_factory=dict)
    figures: dict[str, bytes] = field(default_factory=dict)
    sentences: list[str] = field(default_factory=list)
    # what went wrong, for metrics.json "warnings" and the evaluation's terminal summary
    warnings: list[str] = field(default_factory=list)
    # what the solvers said on the way to a verified optimum: metrics.json only, never the terminal
    solver_notes: list[str] = field(default_factory=list)


def two_level_reduction(class_counts: Sequence[int] | np.ndarray) -> TwoLevelReduction:
    """Split classes at the median training count; ratio of mean head to mean tail proportion."""
    counts = np.asarray(class_counts, dtype=np.float64)
    tail_mask = counts < np.median(counts)
    tail = tuple(int(i) for i in np.flatnonzero(tail_mask))
    head = tuple(int(i) for i in np.flatnonzero(~tail_mask))
    ratio = float(counts[~tail_mask].mean() / counts[tail_mask].mean()) if tail else math.nan
    return TwoLevelReduction(k_major=len(head), k_minor=len(tail), ratio=ratio, tail=tail, head=head)


@dataclass(frozen=True)
class _Collapse:
    """Collapse prediction for a cohort (None fields: not applicable)."""

    reduction: TwoLevelReduction
    b_star: float | None
    threshold: float | None
    collapsed: bool | None


def _predict_collapse(counts: np.ndarray, negatives: int, temperature: float, mode: str) -> _Collapse:
    red = two_level_reduction(counts)
    if red.k_minor < 2 or not red.ratio > 0:
        return _Collapse(red, None, None, None)
    # The reduction's ratio can sit a hair below 1 only through rounding; the problem needs R >= 1.
    ratio = max(red.ratio, 1.0)
    opt = geometry.two_level_optimum(red.k_major, red.k_minor, ratio, negatives, temperature, mode)
    threshold = geometry.minority_collapse_threshold(
        red.k_major, red.k_minor, negatives, temperature, mode, ratio_max=max(_RATIO_MAX, 2.0 * ratio))
    return _Collapse(red, opt.b, threshold, opt.collapsed)


def _collapse_sentence(col: _Collapse, names: Sequence[str]) -> str:
    red = col.reduction
    if col.collapsed is None:
        return ("Minority collapse does not apply: fewer than two classes have a training count below the "
                "median, so there is no group of rare classes that could merge.")
    tail_names = ", ".join(names[i] for i in red.tail)
    thr = "none up to R = {:g}".format(max(_RATIO_MAX, 2.0 * red.ratio)) if math.isinf(col.threshold) \
        else f"R* = {col.threshold:.3g}"
    if col.collapsed:
        return (f"The cohort's imbalance predicts collapse of its rarest classes ({tail_names}): the head-to-tail "
                f"ratio R = {red.ratio:.3g} is at or above the threshold {thr} for {red.k_major} head and "
                f"{red.k_minor} tail classes, so the optimal representation puts these classes on one "
                f"direction (cosine 1) and a contrastive loss alone cannot keep them apart.")
    return (f"No minority collapse is predicted: the head-to-tail ratio R = {red.ratio:.3g} is below the "
            f"threshold ({thr}) for {red.k_major} head and {red.k_minor} tail classes; the optimal cosine "
            f"between rare classes ({tail_names}) is {col.b_star:.3f}, not 1.")


def gram_heatmap_png(panels: Sequence[tuple[str, np.ndarray]], class_names: Sequence[str]) -> bytes:
    """Side-by-side heat maps of Gram matrices (cosines on a fixed -1..1 scale), as PNG bytes.

    Uses matplotlib's object API with the Agg canvas (no pyplot global state), imported lazily so the
    module stays cheap to import and safe on headless machines and in threads.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(class_names)
    size = max(3.0, 0.45 * n + 1.5)
    fig = Figure(figsize=(size * len(panels) + 1.0, size), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    image = None
    for ax, (title, matrix) in zip(axes, panels):
        image = ax.imshow(np.asarray(matrix, dtype=np.float64), cmap="RdBu_r", vmin=-1.0, vmax=1.0)
        ax.set_title(title, fontsize=10)
        ax.set_xticks(range(n), labels=list(class_names), rotation=90, fontsize=8)
        ax.set_yticks(range(n), labels=list(class_names), fontsize=8)
        if n <= 10:
            for i in range(n):
                for j in range(n):
                    value = float(matrix[i][j])
                    ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if abs(value) > 0.6 else "black")
    if image is not None:
        fig.colorbar(image, ax=list(axes), shrink=0.8, label="cosine")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")  # one draw: the constrained layout fits the labels
    return buf.getvalue()


def _format_matrix(matrix: np.ndarray, names: Sequence[str]) -> str:
    width = max(7, max(len(n) for n in names) + 1)
    lines = [" " * width + "".join(f"{n:>{width}}" for n in names)]
    for name, row in zip(names, matrix):
        lines.append(f"{name:<{width}}" + "".join(f"{v:>{width}.3f}" for v in row))
    return "\n".join(lines)


def _names(class_names: Sequence[str] | None, n: int, what: str) -> list[str]:
    if class_names is None:
        return [f"class{i}" for i in range(n)]
    if len(class_names) != n:
        raise ConfigError(f"{what}: got {len(class_names)} class names for {n} classes; give one name per class")
    return [str(c) for c in class_names]


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


def _evidence(sol: geometry.OptimumSolution) -> str:
    """One line saying why G* can be trusted."""
    agree = "" if sol.agreement is None else f"; conic and Burer-Monteiro solves agree to {sol.agreement:.1e}"
    return (f"verified: {sol.ratio:.4g} x the simplex's loss, certified optimality gap {sol.gap:.1e} "
            f"({sol.solver}{agree})")


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
        + ("R* = none up to {:g}".format(max(_RATIO_MAX, 2 * red.ratio)) if math.isinf(col.threshold)
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
    ratio_max = max(_RATIO_MAX, 2.0 * max(ratios))
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


def geometry_section(features_h: Any, features_z: Any, labels: Any, classifier_weight: Any,
                     train_class_counts: Sequence[int] | np.ndarray, class_names: Sequence[str],
                     prototypes: Any = None, temperature: float = 0.1, negatives: int = 1) -> GeometrySection:
    """The report's geometry section for one split of a trained model.

    Compares like with like (``docs/geometry.md``): only the L2-normalised *projection* class means
    are held against the optimum G* and the simplex. Backbone features are post-ReLU (all uncentred
    cosines >= 0), so the backbone's Gram is taken of *centred* class means and compared with the
    simplex only (keys ``backbone/centred_*``). A network without a projection head gets no
    projection metrics, no G* and no sentence about either.

    The section never fails because of the optimum: when no solver yields a verified G*, the
    measured geometry is still reported, one sentence says why G* is missing, and the reason is in
    ``warnings`` (which the evaluation copies into metrics.json). Solver messages go there too.

    Args:
        features_h: ``[N, d]`` backbone features.
        features_z: ``[N, d_z]`` projections (L2-normalised or not; cosines do not care), or None
            for a network without a projection head (ce, la, ...).
        labels: ``[N]`` class positions (no -1).
        classifier_weight: ``[C, d]`` raw classifier weight.
        train_class_counts: ``[C]`` training counts, which define the optimum and head/tail.
        class_names: C names in the cohort's order.
        prototypes: ``[C, d_z]`` class prototypes, for the classifier-prototype alignment; None for a
            network without a prototype head (then no alignment is reported).
        temperature, negatives: of the supervised loss whose optimum G* the projection is held against.

    Returns:
        GeometrySection with metrics ``backbone/<name>`` (``FC``, ``MS``, ``SD``, ``NC1``, equinorms,
        ``self_duality``, ``alignment`` with prototypes, ``centred_gram_dist_simplex``,
        ``centred_minority_collapse_*``), ``projection/<name>`` (with a projection head:
        ``gram_dist_simplex``, ``gram_dist_optimal``, ``minority_collapse_*``, ...), ``optimum/*``
        (objective, simplex objective, certified gap, two-level numbers), PNG heat maps
        ``gram_projection`` (learned, G*, simplex) and ``gram_backbone`` (centred learned, simplex),
        plain-language sentences and warnings.
    """
    counts = np.asarray(train_class_counts, dtype=np.float64)
    names = _names(class_names, counts.size, "geometry section")
    section = GeometrySection()
    has_projection = features_z is not None
    m = section.metrics

    # the optimum (projection space only) and the cohort's collapse prediction
    gram_opt: np.ndarray | None = None
    col: _Collapse | None = None
    if not has_projection:
        pass
    elif not np.all(counts > 0):
        section.sentences.append("The optimal geometry is not computed: some classes have no training samples.")
    else:
        try:
            sol = geometry.solve_optimum(counts / counts.sum(), negatives, temperature, "scl")
        except Exception as err:  # noqa: BLE001 - a report section must not abort the evaluation
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            section.sentences.append(
                f"The imbalance-aware optimum G* (tau = {temperature:g}, {negatives} negative(s)) could not be "
                f"computed, so the projection is compared with the regular simplex only: {reason}")
            section.warnings.append(f"Geometry: the optimum G* could not be computed ({reason}).")
        else:
            gram_opt = sol.gram
            m["optimum/objective"] = sol.objective
            m["optimum/simplex_objective"] = sol.simplex_objective
            m["optimum/objective_ratio_to_simplex"] = sol.ratio
            m["optimum/certified_gap"] = sol.gap
            if sol.notes:
                section.solver_notes.append(f"Geometry: G* {_evidence(sol)}; solver messages: " + "; ".join(sol.notes))
        try:
            col = _predict_collapse(counts, negatives, temperature, "scl")
        except Exception as err:  # noqa: BLE001 - as above
            section.warnings.append(f"Geometry: the minority-collapse prediction could not be computed ({err}).")

    # measured geometry
    spaces: dict[str, np.ndarray] = {}
    values = geometry.measure_geometry(features_h, labels, classifier_weight, counts, None, prototypes,
                                       num_classes=counts.size, gram="centred")
    m.update({f"backbone/{k}": v for k, v in values.items()})
    spaces["backbone"] = geometry.centred_gram(geometry.class_means(features_h, labels, counts.size))
    if has_projection:
        values = geometry.measure_geometry(features_z, labels, None, counts, gram_opt, None, num_classes=counts.size)
        m.update({f"projection/{k}": v for k, v in values.items()})
        spaces["projection"] = geometry.normalised_gram(geometry.class_means(features_z, labels, counts.size))

    if col is not None and col.collapsed is not None:
        m["optimum/imbalance_ratio"] = col.reduction.ratio
        m["optimum/tail_cosine_two_level"] = float(col.b_star)
        if math.isfinite(col.threshold):
            m["optimum/collapse_threshold"] = float(col.threshold)
    if col is not None:
        section.sentences.insert(0, _collapse_sentence(col, names))

    # heat maps, classes ordered by training count
    order = np.argsort(-counts, kind="stable")
    ordered = [names[i] for i in order]
    simplex = geometry.simplex_gram(counts.size)
    if has_projection:
        panels = [("learned (projection, normalised means)", spaces["projection"][np.ix_(order, order)])]
        if gram_opt is not None:
            panels.append((f"optimum G* (tau={temperature:g}, k={negatives})", gram_opt[np.ix_(order, order)]))
        panels.append(("regular simplex", simplex))
        section.figures["gram_projection"] = gram_heatmap_png(panels, ordered)
    section.figures["gram_backbone"] = gram_heatmap_png(
        [("learned (backbone, centred means)", spaces["backbone"][np.ix_(order, order)]),
         ("regular simplex", simplex)], ordered)

    # sentences: each one states only what the numbers above show
    if "projection/gram_dist_optimal" in m:
        closer = "imbalance-aware optimum" if m["projection/gram_dist_optimal"] < m["projection/gram_dist_simplex"] \
            else "regular simplex"
        section.sentences.append(
            f"The normalised projection class means are closer to the {closer} (Frobenius distance "
            f"{m['projection/gram_dist_optimal']:.3f} to the optimum G*, {m['projection/gram_dist_simplex']:.3f} "
            f"to the simplex).")
    if gram_opt is not None and "projection/minority_collapse_tail" in m and col is not None \
            and col.collapsed is not None:
        tail = [int(i) for i in col.reduction.tail]
        predicted = float(np.mean(gram_opt[np.ix_(tail, tail)][np.triu_indices(len(tail), 1)]))
        section.sentences.append(
            f"Among the rare classes the learned projection means have mean cosine "
            f"{m['projection/minority_collapse_tail']:.3f} (head classes: "
            f"{m.get('projection/minority_collapse_head', math.nan):.3f}); the optimum predicts "
            f"{predicted:.3f}, and 1 would mean they have merged.")
    why = ("its features are non-negative (post-ReLU), so raw cosines cannot be negative"
           if float(np.min(features_h.detach().cpu().numpy() if hasattr(features_h, "detach")
                           else np.asarray(features_h))) >= 0
           else "a common offset would otherwise dominate the cosines")
    section.sentences.append(
        f"In the backbone the class means are centred first ({why}); centred, they are at Frobenius distance "
        f"{m['backbone/centred_gram_dist_simplex']:.3f} from a regular simplex (mean spacing "
        f"MS = {m['backbone/MS']:.3g}; 0 would be a simplex), and they are not compared with the optimum G*, "
        f"which describes normalised projections.")
    fc = f"Within-class spread relative to between-class spread (FC) is {m['backbone/FC']:.3g} in the backbone"
    if has_projection:
        fc += f" and {m['projection/FC']:.3g} in the projection"
    section.sentences.append(fc + "; 0 means every class has collapsed to its mean.")
    if not has_projection:
        section.sentences.append(
            "This network has no projection head (its method has no contrastive branch), so there are no "
            "projection-space numbers and nothing is held against the optimum G*.")
    return section


def _extract_features(run_ref: str, split: str, tracking_uri: str | None) -> dict[str, Any]:
    """Backbone features, projections, labels and heads of a trained run on one split.

    Prediction is `pipeline.evaluate.predict_split` (the same eval view and batching as the report);
    z is None for a model without a projection head (`geometry_section` then reports the backbone only).
    """
    import data_prep

    from .checkpoint import load_trained_model
    from .evaluate import predict_split

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


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m pipeline.geometry_stage ARGS` is `ecl geometry ARGS` (one parser: pipeline.cli)."""
    from pipeline.cli import main as ecl_main

    return ecl_main(["geometry", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
