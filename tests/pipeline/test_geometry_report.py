"""Tests for pipeline.geometry_report: the learned geometry as a report section, the two-level reduction."""
from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline import geometry
from pipeline.geometry_report import flat_geometry, geometry_section, two_level_reduction

import _evalkit as evalkit  # noqa: E402  registered by conftest.py

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_synthetic = evalkit.synthetic_features


def test_two_level_reduction_splits_at_median() -> None:
    red = two_level_reduction([1000, 500, 20, 10, 400, 30])
    assert red.tail == (2, 3, 5) and red.head == (0, 1, 4)
    assert red.ratio == pytest.approx((1900 / 3) / (60 / 3))
    assert (red.k_major, red.k_minor) == (3, 3)


def test_geometry_section_synthetic_clusters_finite_metrics_png() -> None:
    counts = [400, 200, 40, 20]
    h, z, y, weight, protos = _synthetic([40, 30, 20, 10], d=16, spread=0.3, seed=0)
    section = geometry_section(h, z, y, weight, counts, ["a", "b", "c", "d"], protos, temperature=0.1)
    for key in ("FC", "MS", "SD", "NC1", "equinorm_means", "gram_dist_optimal", "gram_dist_simplex",
                "minority_collapse_tail", "minority_collapse_head"):
        assert math.isfinite(section.metrics[f"projection/{key}"]), key
    for key in ("FC", "MS", "SD", "NC1", "equinorm_means", "centred_gram_dist_simplex",
                "centred_minority_collapse_tail", "centred_minority_collapse_head",
                "equinorm_classifier", "self_duality", "alignment"):
        assert math.isfinite(section.metrics[f"backbone/{key}"]), key
    # like with like: the backbone's (post-ReLU) Gram is centred and never held against G*
    assert not any(k.startswith("backbone/") and ("optimal" in k or k.endswith("/gram_dist_simplex"))
                   for k in section.metrics)
    assert "projection/self_duality" not in section.metrics
    sol = geometry.solve_optimum(np.array(counts, float), 1, 0.1)
    direct = geometry.measure_geometry(z, y, train_counts=counts, optimal_gram=sol.gram)
    assert section.metrics["projection/gram_dist_optimal"] == pytest.approx(direct["gram_dist_optimal"], rel=1e-6)
    centred = geometry.measure_geometry(h, y, weight, counts, gram="centred")
    assert section.metrics["backbone/centred_gram_dist_simplex"] == pytest.approx(
        centred["centred_gram_dist_simplex"], rel=1e-9)
    assert section.metrics["optimum/objective"] == pytest.approx(sol.objective, rel=1e-4)
    assert section.metrics["optimum/objective_ratio_to_simplex"] < 1
    assert section.metrics["optimum/certified_gap"] <= 1e-4
    assert set(section.figures) == {"gram_projection", "gram_backbone"}
    assert all(png.startswith(PNG_SIGNATURE) and len(png) > 1000 for png in section.figures.values())
    assert any("No minority collapse is predicted" in s for s in section.sentences)
    assert any("centred first (a common offset would otherwise dominate" in s for s in section.sentences)  # h < 0


def _closer_sentence_is_true(section) -> None:
    m = section.metrics
    [sentence] = [s for s in section.sentences if s.startswith("The normalised projection class means are closer")]
    closer = "imbalance-aware optimum" if m["projection/gram_dist_optimal"] < m["projection/gram_dist_simplex"] \
        else "regular simplex"
    assert f"closer to the {closer} " in sentence
    assert f"{m['projection/gram_dist_optimal']:.3f} to the optimum G*" in sentence


@pytest.mark.parametrize("tau", [0.07, 0.05])
def test_geometry_section_isic_counts_default_temperatures(tau: float) -> None:
    """The report's own setting: ISIC 2019 counts in the project's class order at tau 0.07 / 0.05."""
    counts = [4522, 12875, 3323, 867, 2624, 239, 253, 628]
    names = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"]
    h, z, y, weight, protos = _synthetic([20] * 8, d=24, spread=0.4, seed=3)
    # the learned projection means sit exactly at G*: the sentence must say "optimum"
    sol = geometry.solve_optimum(np.array(counts, float), 1, tau)
    vals, vecs = np.linalg.eigh(sol.gram)
    units = vecs * np.sqrt(np.clip(vals, 0, None))
    z_opt = np.repeat(units, 20, axis=0) + 1e-6 * np.random.default_rng(0).normal(size=(160, 8))
    section = geometry_section(np.abs(h), z_opt, y, weight, counts, names, protos, temperature=tau)
    m = section.metrics
    assert m["optimum/objective_ratio_to_simplex"] < 0.5  # issue 11: was 3.8e4 at 0.07
    assert m["projection/gram_dist_optimal"] < 1e-4 < m["projection/gram_dist_simplex"]
    _closer_sentence_is_true(section)
    assert "closer to the imbalance-aware optimum" in " ".join(section.sentences)
    assert not any("could not be computed" in w for w in section.warnings)
    predicted = np.mean([sol.gram[i, j] for i, j in ((3, 5), (3, 6), (3, 7), (5, 6), (5, 7), (6, 7))])
    assert any(f"the optimum predicts {predicted:.3f}" in s for s in section.sentences)


def test_geometry_section_without_projection_head_makes_no_projection_claims() -> None:
    counts = [400, 200, 40, 20]
    h, _, y, weight, _ = _synthetic([40, 30, 20, 10], d=16, spread=0.3, seed=0)
    section = geometry_section(np.maximum(h, 0), None, y, weight, counts, ["a", "b", "c", "d"], None,
                               temperature=0.1)
    assert section.metrics and all(k.startswith("backbone/") for k in section.metrics)
    assert "backbone/alignment" not in section.metrics  # no prototypes, no alignment
    assert set(section.figures) == {"gram_backbone"}
    text = " ".join(section.sentences)
    assert "projection class means" not in text and "projection means" not in text
    assert "in the projection" not in text and "G* (" not in text
    assert "no projection head" in section.sentences[-1]
    direct = geometry.measure_geometry(np.maximum(h, 0), y, weight, counts, gram="centred")
    assert f"distance {direct['centred_gram_dist_simplex']:.3f} from a regular simplex" in text
    assert "its features are non-negative (post-ReLU)" in text  # np.maximum(h, 0) above
    assert section.warnings == []


def test_geometry_section_survives_a_failed_optimum(monkeypatch) -> None:
    counts = [400, 200, 40, 20]
    h, z, y, weight, protos = _synthetic([40, 30, 20, 10], d=16, spread=0.3, seed=0)

    def fail(*args, **kwargs):
        raise geometry.OptimumError("no solver produced a verified optimum (stand-in)")

    monkeypatch.setattr(geometry, "solve_optimum", fail)
    section = geometry_section(h, z, y, weight, counts, ["a", "b", "c", "d"], protos, temperature=0.05)
    assert "projection/gram_dist_simplex" in section.metrics and "backbone/FC" in section.metrics
    assert "projection/gram_dist_optimal" not in section.metrics and "optimum/objective" not in section.metrics
    [sentence] = [s for s in section.sentences if "could not be" in s]
    assert sentence.startswith("The imbalance-aware optimum G* (tau = 0.05, 1 negative(s)) could not be computed")
    assert "stand-in" in sentence
    assert section.warnings == ["Geometry: the optimum G* could not be computed (no solver produced a verified "
                                "optimum (stand-in))."]
    assert section.figures["gram_projection"].startswith(PNG_SIGNATURE)


def test_geometry_section_collapse_predicted_sentence() -> None:
    counts = [5000, 5000, 10, 10]
    h, z, y, weight, _ = _synthetic([30, 30, 10, 10], d=8, spread=0.2, seed=1)
    section = geometry_section(h, z, y, weight, counts, ["a", "b", "c", "d"], temperature=10.0)
    assert section.sentences[0].startswith("The cohort's imbalance predicts collapse of its rarest classes (c, d)")
    assert section.metrics["optimum/collapse_threshold"] == pytest.approx(
        geometry.minority_collapse_threshold(2, 2, 1, 10.0))
    assert section.metrics["optimum/tail_cosine_two_level"] == 1.0


def test_flat_geometry_turns_non_finite_into_none() -> None:
    assert flat_geometry({"a": 1, "b": float("nan"), "c": float("inf"), "d": None, "e": np.float32(0.5)}) == \
        {"a": 1.0, "b": None, "c": None, "d": None, "e": 0.5}
