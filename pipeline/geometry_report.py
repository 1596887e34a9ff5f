"""The learned geometry of a trained model as a report section, and the cohort's predicted optimum.

Why its own module: `ecl evaluate` (its geometry section) and `ecl geometry --run RUN` both need this
computation, and one stage must not import another. It takes arrays (features, labels, heads),
never a run or a cache: getting the features is `pipeline.inference`'s job.

**The two-level reduction of a cohort.** Real cohorts have many levels of imbalance; the collapse
threshold is only known for two. Classes whose training count is below the median count are the
tail (K_B classes), the rest the head (K_A classes), and the ratio is
R = mean head proportion / mean tail proportion. Collapse of the rare classes is predicted when the
reduced problem with (K_A, K_B, R) puts the within-tail cosine at 1, i.e. R >= R*. It is a summary:
the full optimum G* (also reported) is exact for the actual proportions.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from pipeline import geometry
from pipeline.errors import ConfigError

__all__ = ["GeometrySection", "TwoLevelReduction", "two_level_reduction", "gram_heatmap_png", "geometry_section",
           "flat_geometry"]

#: the ratio up to which a collapse threshold is searched (further when the cohort's own ratio is larger)
RATIO_MAX = 1000.0


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
        red.k_major, red.k_minor, negatives, temperature, mode, ratio_max=max(RATIO_MAX, 2.0 * ratio))
    return _Collapse(red, opt.b, threshold, opt.collapsed)


def _collapse_sentence(col: _Collapse, names: Sequence[str]) -> str:
    red = col.reduction
    if col.collapsed is None:
        return ("Minority collapse does not apply: fewer than two classes have a training count below the "
                "median, so there is no group of rare classes that could merge.")
    tail_names = ", ".join(names[i] for i in red.tail)
    thr = "none up to R = {:g}".format(max(RATIO_MAX, 2.0 * red.ratio)) if math.isinf(col.threshold) \
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

    The panels sit on a regular grid, so their margins are set from the longest class name instead
    of a layout engine (whose extra layout pass was a third of this figure's time in `ecl evaluate`).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .plots import figure_png

    n = len(class_names)
    cell = max(2.2, 0.45 * n + 0.5)  # inches of one heat map
    label = 0.25 + 0.075 * max((len(str(c)) for c in class_names), default=1)  # 8 pt tick labels
    gap, bar, top = label + 0.25, 0.9, 0.45
    width = label + len(panels) * cell + (len(panels) - 1) * gap + 0.3 + bar
    height = top + cell + label + 0.15
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=label / width, right=(width - 0.3 - bar) / width, bottom=(label + 0.15) / height,
                        top=1 - top / height, wspace=gap / cell)
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
        cax = fig.add_axes(((width - bar + 0.05) / width, (label + 0.15 + 0.1 * cell) / height,
                            0.15 / width, 0.8 * cell / height))
        fig.colorbar(image, cax=cax, label="cosine")
    return figure_png(fig, dpi=100)


def _names(class_names: Sequence[str] | None, n: int, what: str) -> list[str]:
    if class_names is None:
        return [f"class{i}" for i in range(n)]
    if len(class_names) != n:
        raise ConfigError(f"{what}: got {len(class_names)} class names for {n} classes; give one name per class")
    return [str(c) for c in class_names]


def _evidence(sol: geometry.OptimumSolution) -> str:
    """One line saying why G* can be trusted."""
    agree = "" if sol.agreement is None else f"; conic and Burer-Monteiro solves agree to {sol.agreement:.1e}"
    return (f"verified: {sol.ratio:.4g} x the simplex's loss, certified optimality gap {sol.gap:.1e} "
            f"({sol.solver}{agree})")


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




def flat_geometry(values: dict[str, Any]) -> dict[str, float | None]:
    """Geometry metrics with non-finite values as None (JSON has no NaN)."""
    return {k: (None if v is None or not math.isfinite(float(v)) else float(v)) for k, v in values.items()}
