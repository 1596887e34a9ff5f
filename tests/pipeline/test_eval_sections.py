"""Tests of pipeline/eval_sections.py: each report section from arrays, held against sklearn / numpy."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import balanced_accuracy_score, log_loss

from pipeline import eval_sections as sections
from pipeline import metrics

NAMES = ["MEL", "NV", "BCC", "DF"]
# DF has no test image here on purpose (the "n/a" paths); sklearn warns when one is predicted
pytestmark = pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true:UserWarning")


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _inputs(with_val: bool = True, with_features: bool = False, split: str = "test", kind: str = "dermoscopy",
            temperature: float = 1.7) -> sections.EvalInputs:
    """90 test images of classes 0-2 (DF absent), noisy logits; 60 validation images of all four classes."""
    rng = np.random.default_rng(3)
    y = np.repeat([0, 1, 2], [30, 40, 20])
    logits = rng.normal(size=(len(y), 4)) * 1.5
    logits[np.arange(len(y)), y] += 1.2
    rows = pd.DataFrame({"sex": rng.choice(["female", "male"], size=len(y)),
                         "age_approx": rng.choice([20.0, 45.0, 60.0, 80.0, np.nan], size=len(y)),
                         "patient": [f"P{i // 2}" for i in range(len(y))]})
    vy = np.repeat([0, 1, 2, 3], 15)
    vlogits = rng.normal(size=(len(vy), 4)) * 1.5
    vlogits[np.arange(len(vy)), vy] += 1.2
    feats = {}
    if with_features:
        means = rng.normal(size=(4, 8)) * 3
        h = np.maximum(means[y] + rng.normal(size=(len(y), 8)), 0)
        z = means[y][:, :6] + 0.3 * rng.normal(size=(len(y), 6))
        feats = {"h": h, "z": z / np.linalg.norm(z, axis=1, keepdims=True), "weight": means + 0.1,
                 "prototypes": rng.normal(size=(4, 6))}
    return sections.EvalInputs(
        split=split, class_names=NAMES, kind=kind, logits=logits, labels=y, manifest_rows=rows,
        temperature=temperature, t_source="the validation split (60 images)",
        train_counts=np.array([300, 900, 150, 40]),
        split_counts={"train": [300, 900, 150, 40], "val": [15, 15, 15, 15], "test": [30, 40, 20, 0]},
        n_unlabelled=2, n_bins=10, n_boot=50, seed=0, min_subgroup_size=25,
        val_logits=vlogits if with_val else None, val_labels=vy if with_val else None, **feats)


@pytest.fixture(scope="module")
def ev():
    return _inputs()


@pytest.fixture(scope="module")
def scores(ev):
    return sections.score(ev)


def test_metric_table_names_real_report_keys():
    """Every named metric is one `classification_report` computes; calibration keys are its own subset."""
    y = np.array([0, 1, 2, 0, 1, 2])
    overall = metrics.classification_report(np.eye(3)[[0, 1, 2, 1, 1, 2]], y, ["a", "b", "c"])["overall"]
    assert set(sections.METRICS) <= set(overall)
    assert sections.CALIBRATION_KEYS == ("ece", "mce", "classwise_ece", "brier", "nll")


def test_inputs_apply_the_temperature(ev):
    np.testing.assert_allclose(ev.probs, _softmax(ev.logits / 1.7))
    np.testing.assert_allclose(ev.probs_raw, _softmax(ev.logits))


def test_headline_section_matches_sklearn(ev, scores):
    s = sections.headline_section(ev, scores)
    pred = ev.logits.argmax(1)
    assert s.flat["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(ev.labels, pred))
    assert s.flat["accuracy"] == pytest.approx((pred == ev.labels).mean())
    for c, name in enumerate(NAMES[:3]):
        assert s.flat[f"recall/{name}"] == pytest.approx((pred[ev.labels == c] == c).mean())
    # DF is absent: every per-class key is there; its recall, AUROC, AP and CI bounds are None
    assert all(f"{k}/{n}" in s.flat for k in sections.PER_CLASS_METRICS for n in NAMES)
    assert s.flat["recall/DF"] is None and s.flat["auroc/DF"] is None and s.flat["average_precision/DF"] is None
    assert s.flat["recall_ci_low/DF"] is None and s.flat["temperature"] == 1.7
    assert s.flat["ece_calibrated"] == scores.calibrated["overall"]["ece"]
    assert [r["name"] for r in s.context["headline"]][:3] == [sections.METRICS[k].title for k in
                                                              ("balanced_accuracy", "accuracy", "macro_auroc")]
    assert [r["train_n"] for r in s.context["per_class"]] == [300, 900, 150, 40]
    assert set(s.figures) == {"confusion", "recall"} and s.figures["confusion"][:4] == b"\x89PNG"
    assert set(s.payload) == {"report", "uncalibrated", "bootstrap"}


def test_calibration_section_rows_before_and_after(ev, scores):
    s = sections.calibration_section(ev, scores)
    rows = {r["name"]: r for r in s.context["calibration_rows"]}
    assert list(rows) == [sections.METRICS[k].title for k in sections.CALIBRATION_KEYS]
    assert rows["NLL"]["before"] == pytest.approx(log_loss(ev.labels, _softmax(ev.logits), labels=range(4)))
    assert rows["NLL"]["after"] == pytest.approx(log_loss(ev.labels, _softmax(ev.logits / 1.7), labels=range(4)))
    assert s.payload == {"temperature": 1.7, "temperature_source": ev.t_source}
    assert set(s.figures) == {"reliability", "reliability_calibrated", "reliability_classes"}


def test_subgroup_section_balanced_accuracy_per_sex(ev):
    s = sections.subgroup_section(ev)
    pred = ev.probs.argmax(1)
    for sex in ("female", "male"):
        mask = (ev.manifest_rows["sex"] == sex).to_numpy()
        assert s.flat[f"subgroup/sex/{sex}/balanced_accuracy"] == pytest.approx(
            balanced_accuracy_score(ev.labels[mask], pred[mask]))
        assert s.flat[f"subgroup/sex/{sex}/n"] == mask.sum()
    assert "subgroup/age/lt30/n" in s.flat and "subgroup/age/70plus/n" in s.flat  # '<' and '+' spelled out
    assert [g["attribute"] for g in s.data] == ["sex", "age"]
    assert s.context["min_subgroup_size"] == 25


def test_patient_section_only_for_ct(ev, scores):
    assert sections.patient_section(ev, scores).data is None
    ct = _inputs(kind="ct")
    s = sections.patient_section(ct, sections.score(ct))
    # two images per patient, one label each: a patient's probability is the mean of its two
    p = ct.probs.reshape(45, 2, 4).mean(1)
    yp = ct.labels[::2]
    assert s.flat["patient/balanced_accuracy"] == pytest.approx(balanced_accuracy_score(yp, p.argmax(1)))
    assert s.payload["patient_level"]["n_patients"] == 45 and s.context["patient"]["n_samples"] == 90


def test_operating_points_section_thresholds_from_val_held_here(ev):
    s = sections.operating_points_section(ev)
    vprobs = _softmax(ev.val_logits / 1.7)
    entry = s.data["MEL"]["at_specificity"]
    row = next(r for r in entry if abs(r["target"] - 0.9) < 1e-9)
    t = row["threshold"]
    # chosen on val: at least 90 % of validation negatives fall below it
    assert (vprobs[ev.val_labels != 0, 0] < t).mean() >= 0.9
    # held on this split: sensitivity / specificity of "MEL when p >= t", computed by hand
    assert row["sensitivity"] == pytest.approx((ev.probs[ev.labels == 0, 0] >= t).mean())
    assert row["specificity"] == pytest.approx((ev.probs[ev.labels != 0, 0] < t).mean())
    assert s.flat["threshold_at_specificity_90/MEL"] == t
    assert s.data["DF"] is None and s.context["operating_points_missing"] == ["DF"]
    assert s.warnings == [] and "roc_pr" in s.figures
    assert sections.operating_points_section(_inputs(split="val")).warnings[0].startswith("Operating-point thresholds")
    none = sections.operating_points_section(_inputs(with_val=False))
    assert none.data is None and none.flat == {} and none.payload["operating_points_note"].startswith("No labelled")


def test_selective_section_keeps_the_most_confident(ev):
    s = sections.selective_section(ev)
    n_kept = math.ceil(0.8 * len(ev.labels))
    conf = ev.probs.max(1)
    kept = np.argsort(-conf, kind="stable")[:n_kept]
    assert s.data["n_kept"] == n_kept
    assert s.flat["selective/balanced_accuracy_at_coverage_80"] == pytest.approx(
        balanced_accuracy_score(ev.labels[kept], ev.probs[kept].argmax(1)))
    assert s.flat["selective/confidence_threshold_at_coverage_80"] == pytest.approx(conf[kept].min())


def test_geometry_section_with_and_without_features():
    from pipeline.geometry_report import geometry_section

    plain = sections.geometry_section(_inputs())
    assert plain.data is None and plain.flat == {} and plain.context["geometry_note"].startswith("The geometry")
    ev = _inputs(with_features=True)
    s = sections.geometry_section(ev)
    direct = geometry_section(ev.h, ev.z, ev.labels, ev.weight, ev.train_counts, NAMES, prototypes=ev.prototypes,
                              temperature=0.1)
    assert s.flat["geometry/backbone/FC"] == pytest.approx(direct.metrics["backbone/FC"])
    assert set(s.flat) == {f"geometry/{k}" for k in direct.metrics}
    assert set(s.figures) == {f"geometry_{k}" for k in direct.figures}


def test_cohort_and_model_card_sections(ev, scores):
    cohort = sections.cohort_section(ev)
    assert cohort.data["imbalance_ratio"] == pytest.approx(900 / 40)
    assert cohort.data["n_labelled"] == 90 and cohort.context["cohort"]["totals"]["test"] == 90
    head = sections.headline_section(ev, scores)
    card = sections.model_card_section(ev, title="tiny", method="ecl", backbone="test_resnet", flat=head.flat,
                                       cohort=cohort.data, subgroups=sections.subgroup_section(ev).data,
                                       ops=sections.operating_points_section(ev).data,
                                       selective=sections.selective_section(ev).data)
    assert card.data.startswith("# Model card: tiny")
    assert f"| balanced accuracy | {head.flat['balanced_accuracy']:.3f}" in card.data
    assert "No test image of DF" in card.data
    assert "markdown" not in card.payload["model_card"]
