"""Figures of the evaluation and comparison reports, as PNG bytes.

Why PNG bytes and not files: the report embeds every figure as a base64 data URI so the HTML
opens offline (and inside MLflow's artifact viewer) with nothing beside it; the stage modules
also write the same bytes next to the report for people who want the pictures alone.
Figures are built with matplotlib's object API on an Agg canvas (no pyplot state, no display,
nothing to close) with the constrained layout engine, so each figure is laid out and drawn once
when saved: `tight_layout` plus `bbox_inches="tight"` drew every figure three times, which was most
of `ecl evaluate`'s figure time (benchmarks/bench_evaluate.py).
"""
from __future__ import annotations

import io
from typing import TYPE_CHECKING, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = [
    "new_figure", "grid_figure", "figure_png", "reliability_diagram", "reliability_grid", "confusion_heatmap", "recall_bars",
    "comparison_plot", "roc_pr_grid", "risk_coverage_plot", "seed_groups_plot",
]

_BLUE = "#1f5fa8"
_GREY = "#9aa5b1"
_RED = "#c0392b"


def new_figure(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float], squeeze: bool = True,
               **subplot_kw) -> tuple[Figure, object]:
    """A figure with its axes, laid out by the constrained engine when drawn (see the module note)."""
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=squeeze, **subplot_kw)


def grid_figure(rows: int, cols: int, *, panel: tuple[float, float], left: float, right: float, bottom: float,
                top: float, wgap: float, hgap: float) -> tuple[Figure, np.ndarray]:
    """A regular grid of small multiples with fixed margins, in inches ([rows, cols] axes).

    Why not the layout engine here: every panel has the same decorations (three ticks, a short
    title), so the margins are known in advance, and the engine's extra layout pass was about a
    third of these grids' drawing time in `ecl evaluate` (benchmarks/bench_evaluate.py).
    """
    width = left + cols * panel[0] + (cols - 1) * wgap + right
    height = top + rows * panel[1] + (rows - 1) * hgap + bottom
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height,
                        wspace=wgap / panel[0], hspace=hgap / panel[1])
    return fig, fig.subplots(rows, cols, squeeze=False)


def figure_png(fig: Figure, dpi: int = 110) -> bytes:
    """Render a figure to PNG bytes (one draw).

    zlib level 1: a fifth of each figure's saving time at ~20 % more bytes (these are line art).
    """
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, pil_kwargs={"compress_level": 1})
    return buf.getvalue()


def _unit_ticks(ax: "Axes", labelsize: float = 7) -> None:
    """Ticks at 0, 0.5 and 1 on both axes of a [0, 1] panel.

    Why: tick labels are most of the drawing time of the small-multiple grids (each is a text
    laid out by FreeType), and three per axis are all a probability panel needs.
    """
    ax.set_xticks([0, 0.5, 1], ["0", "0.5", "1"])
    ax.set_yticks([0, 0.5, 1], ["0", "0.5", "1"])
    ax.tick_params(labelsize=labelsize)


def _draw_reliability(ax: "Axes", confidence: np.ndarray, accuracy: np.ndarray, counts: np.ndarray,
                      edges: np.ndarray, title: str) -> None:
    """Bars of observed accuracy per confidence bin, the diagonal, and each bin's sample count."""
    counts = np.asarray(counts, dtype=float)
    edges = np.asarray(edges, dtype=float)
    widths = np.diff(edges)
    filled = counts > 0
    acc = np.where(filled, np.nan_to_num(np.asarray(accuracy, dtype=float)), 0.0)
    conf = np.where(filled, np.nan_to_num(np.asarray(confidence, dtype=float)), 0.0)
    ax.bar(edges[:-1][filled], acc[filled], width=widths[filled], align="edge", color=_BLUE, alpha=0.8,
           edgecolor="white", label="observed")
    # the gap between confidence and accuracy, drawn where samples exist
    ax.bar(edges[:-1][filled], conf[filled] - acc[filled], bottom=acc[filled], width=widths[filled], align="edge",
           color=_RED, alpha=0.25, edgecolor=_RED, linewidth=0.5, label="gap to confidence")
    ax.plot([0, 1], [0, 1], ls="--", color="black", lw=1)
    for left, w, n, a in zip(edges[:-1][filled], widths[filled], counts[filled], acc[filled]):
        ax.text(left + w / 2, min(a, 0.92) + 0.02, f"{int(n)}", ha="center", va="bottom", fontsize=6, color="#333")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.05)
    ax.set_title(title, fontsize=9)
    _unit_ticks(ax)


def reliability_diagram(confidence: Sequence[float], accuracy: Sequence[float], counts: Sequence[int],
                        edges: Sequence[float], title: str = "Reliability") -> bytes:
    """One reliability diagram: mean confidence vs accuracy per bin, with the number in each bin.

    Args:
        confidence: mean predicted confidence per bin [n_bins] (NaN or anything for empty bins).
        accuracy: observed accuracy (or frequency) per bin [n_bins].
        counts: samples per bin [n_bins]; the numbers are printed on the bars because a bar
            standing on three samples means little, and a reader must see that.
        edges: bin edges [n_bins + 1] in [0, 1].
        title: figure title.
    """
    fig, ax = new_figure(figsize=(3.6, 3.4))
    _draw_reliability(ax, np.asarray(confidence), np.asarray(accuracy), np.asarray(counts), np.asarray(edges), title)
    ax.set_xlabel("confidence", fontsize=8)
    ax.set_ylabel("accuracy", fontsize=8)
    ax.legend(fontsize=6, loc="upper left")
    return figure_png(fig)


def reliability_grid(panels: dict[str, tuple[Sequence[float], Sequence[float], Sequence[int], Sequence[float]]],
                     title: str = "Per-class reliability (one-vs-rest)") -> bytes:
    """Small multiples of per-class reliability diagrams.

    Args:
        panels: class name -> (confidence, frequency, counts, edges) as for `reliability_diagram`.
        title: figure title.
    """
    n = max(len(panels), 1)
    cols = min(4, n)
    rows = int(np.ceil(n / cols))
    fig, axes = grid_figure(rows, cols, panel=(2.1, 1.9), left=0.35, right=0.15, bottom=0.3, top=0.6,
                            wgap=0.4, hgap=0.5)
    for ax in axes.ravel()[len(panels):]:
        ax.axis("off")
    for ax, (name, (conf, freq, counts, edges)) in zip(axes.ravel(), panels.items()):
        _draw_reliability(ax, np.asarray(conf), np.asarray(freq), np.asarray(counts), np.asarray(edges), name)
    fig.suptitle(title, fontsize=10)
    return figure_png(fig)


def confusion_heatmap(counts: np.ndarray, class_names: Sequence[str], normalised: np.ndarray | None = None,
                      title: str = "Confusion matrix (rows: true class)") -> bytes:
    """Heat map of the row-normalised confusion matrix, annotated with counts.

    Why row-normalised colour: on an imbalanced cohort raw counts make the majority class's cell
    the only visible one; per-row fractions show each class's errors at the same scale.
    """
    counts = np.asarray(counts)
    if normalised is None:
        rows = counts.sum(axis=1, keepdims=True)
        normalised = np.divide(counts, rows, out=np.zeros_like(counts, dtype=float), where=rows > 0)
    normalised = np.nan_to_num(np.asarray(normalised, dtype=float))
    k = len(class_names)
    size = max(3.5, 0.55 * k + 1.5)
    fig, ax = new_figure(figsize=(size + 0.8, size))
    im = ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{int(counts[i, j])}\n{normalised[i, j]:.2f}", ha="center", va="center", fontsize=6.5,
                    color="white" if normalised[i, j] > 0.55 else "black")
    ax.set_xticks(range(k), class_names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), class_names, fontsize=8)
    ax.set_xlabel("predicted", fontsize=9)
    ax.set_ylabel("true", fontsize=9)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return figure_png(fig)


def recall_bars(class_names: Sequence[str], point: Sequence[float | None], low: Sequence[float | None],
                high: Sequence[float | None], train_counts: Sequence[int] | None = None,
                title: str = "Per-class recall with 95% bootstrap CI") -> bytes:
    """Horizontal bars of per-class recall with CI whiskers; classes absent from the split say n/a."""
    k = len(class_names)
    order = np.argsort(-np.asarray(train_counts)) if train_counts is not None else np.arange(k)
    fig, ax = new_figure(figsize=(5.5, 0.38 * k + 1.2))
    for row, c in enumerate(order):
        p, lo, hi = point[c], low[c], high[c]
        label = class_names[c] + (f" (n_train={int(train_counts[c])})" if train_counts is not None else "")
        if p is None or not np.isfinite(p):
            ax.text(0.01, row, "n/a (class absent)", va="center", fontsize=7, color=_GREY)
        else:
            ax.barh(row, p, color=_BLUE, alpha=0.85)
            if lo is not None and hi is not None:
                ax.errorbar(p, row, xerr=[[p - lo], [hi - p]], fmt="none", ecolor="black", capsize=3, lw=1)
        ax.text(-0.01, row, label, ha="right", va="center", fontsize=7)
    ax.set_yticks([])
    ax.set_xlim(0, 1)
    ax.set_ylim(k - 0.5, -0.5)
    ax.set_xlabel("recall (sensitivity)", fontsize=8)
    ax.set_title(title, fontsize=9)
    return figure_png(fig)


def comparison_plot(run_names: Sequence[str], bacc: Sequence[float], low: Sequence[float], high: Sequence[float],
                    class_names: Sequence[str], recalls: Sequence[Sequence[float | None]],
                    title: str = "Balanced accuracy (95% CI) and per-class recall") -> bytes:
    """Two panels: balanced accuracy with CIs per run, and grouped per-class recall bars."""
    n = len(run_names)
    k = len(class_names)
    fig, (ax1, ax2) = new_figure(1, 2, figsize=(4 + 0.6 * k, 0.5 * n + 2.8),
                                   gridspec_kw={"width_ratios": [1, 1.6]})
    ys = np.arange(n)
    b = np.asarray(bacc, dtype=float)
    ax1.errorbar(b, ys, xerr=[b - np.asarray(low, float), np.asarray(high, float) - b], fmt="o", color=_BLUE,
                 capsize=4)
    ax1.set_yticks(ys, run_names, fontsize=7)
    ax1.set_ylim(n - 0.5, -0.5)
    ax1.set_xlim(0, 1)
    ax1.set_xlabel("balanced accuracy", fontsize=8)
    width = 0.8 / max(n, 1)
    xs = np.arange(k)
    cmap = colormaps["tab10"]
    for r, (name, rec) in enumerate(zip(run_names, recalls)):
        vals = np.array([np.nan if v is None else v for v in rec], dtype=float)
        ax2.bar(xs + (r - (n - 1) / 2) * width, np.nan_to_num(vals), width=width, color=cmap(r % 10), label=name)
    ax2.set_xticks(xs, class_names, rotation=45, ha="right", fontsize=7)
    ax2.set_ylim(0, 1)
    ax2.set_ylabel("recall", fontsize=8)
    ax2.legend(fontsize=6)
    fig.suptitle(title, fontsize=10)
    return figure_png(fig)


def roc_pr_grid(curves: dict[str, dict[str, np.ndarray] | None],
                points: dict[str, list[tuple[float, float]]] | None = None,
                title: str = "Per-class ROC (top) and precision-recall (bottom), 95% bootstrap bands") -> bytes:
    """Two rows of small multiples: ROC curve and PR curve per class, each with its band.

    Args:
        curves: class name -> `pipeline.stats.curve_bands` entry (None: class lacks positives or
            negatives, drawn as an empty panel saying so).
        points: class name -> (false-positive rate, sensitivity) of the test operating points,
            marked on the ROC panel (thresholds chosen on validation).
    """
    names = list(curves)
    n = max(len(names), 1)
    fig, axes = grid_figure(2, n, panel=(1.95, 1.7), left=0.55, right=0.15, bottom=0.42, top=0.6,
                            wgap=0.15, hgap=0.5)
    for k, name in enumerate(names):
        roc, pr = axes[0, k], axes[1, k]
        c = curves[name]
        for ax in (roc, pr):
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1.02)
            _unit_ticks(ax, labelsize=6)
            if k > 0:
                ax.tick_params(labelleft=False)  # the first column's labels serve the row
        roc.set_title(name, fontsize=8)
        if c is None:
            roc.text(0.5, 0.5, "n/a", ha="center", va="center", color=_GREY)
            pr.text(0.5, 0.5, "n/a", ha="center", va="center", color=_GREY)
            continue
        g = c["grid"]
        roc.fill_between(g, c["tpr_lo"], c["tpr_hi"], step="post", color=_BLUE, alpha=0.2, lw=0)
        roc.step(g, c["tpr"], where="post", color=_BLUE, lw=1.2)
        roc.plot([0, 1], [0, 1], color=_GREY, lw=0.6, ls="--")
        for fpr, tpr in (points or {}).get(name, []):
            roc.plot([fpr], [tpr], "o", color=_RED, ms=3)
        pr.fill_between(g, c["precision_lo"], c["precision_hi"], step="pre", color=_BLUE, alpha=0.2, lw=0)
        pr.step(g, c["precision"], where="pre", color=_BLUE, lw=1.2)
        if k == 0:
            roc.set_ylabel("sensitivity", fontsize=7)
            pr.set_ylabel("precision", fontsize=7)
        roc.set_xlabel("1 - specificity", fontsize=7)
        pr.set_xlabel("recall", fontsize=7)
    fig.suptitle(title, fontsize=9)
    return figure_png(fig)


def risk_coverage_plot(coverage: Sequence[float], risk: Sequence[float], bacc_coverage: Sequence[float],
                       bacc: Sequence[float], mark: float | None = None,
                       title: str = "Selective prediction: refer the least confident") -> bytes:
    """Risk (error rate of the kept cases) and balanced accuracy of the kept cases against coverage."""
    fig, ax = new_figure(figsize=(5.2, 3.2))
    ax.plot(coverage, risk, color=_RED, lw=1.3, label="risk (error rate of kept)")
    ax.plot(bacc_coverage, bacc, color=_BLUE, lw=1.3, label="balanced accuracy of kept")
    if mark is not None:
        ax.axvline(mark, color=_GREY, ls="--", lw=0.8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("coverage (fraction of cases the model decides)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title(title, fontsize=9)
    return figure_png(fig)


def seed_groups_plot(groups: Sequence[str], per_run: Sequence[Sequence[float]], means: Sequence[float],
                     low: Sequence[float], high: Sequence[float],
                     title: str = "Balanced accuracy per seed (dots), group mean with 95% CI (seeds x images)") -> bytes:
    """One row per group: each run (seed) as a dot, the mean as a bar with the hierarchical interval.

    Why the dots: with 2-5 seeds the reader should see the seeds themselves, not only a summary.
    """
    n = len(groups)
    fig, ax = new_figure(figsize=(6, 0.55 * n + 1.3))
    for row, (vals, m, lo, hi) in enumerate(zip(per_run, means, low, high)):
        ax.errorbar([m], [row], xerr=[[m - lo], [hi - m]], fmt="|", color=_BLUE, capsize=5, ms=14, mew=2, lw=1.5)
        ax.plot(vals, [row] * len(vals), "o", color=_RED, ms=4, alpha=0.8)
    ax.set_yticks(range(n), list(groups), fontsize=8)
    ax.set_ylim(n - 0.5, -0.5)
    ax.set_xlabel("balanced accuracy", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ax.grid(axis="x", color="#e5e5e5", lw=0.6)
    ax.set_title(title, fontsize=9)
    return figure_png(fig)
