"""The synthetic ISIC 2019 cohort: exact layout, quirks, class frequencies, determinism."""
from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from data_prep.synthetic.dermoscopy import ISIC2019_COLUMNS, ISIC2019_FREQUENCIES, class_counts, generate_dermoscopy


@pytest.mark.parametrize("n", [600, 2_000, 25_331])
def test_class_counts_largest_remainder_within_one_of_quota(n):
    counts = class_counts(n)
    assert sum(counts.values()) == n
    total = sum(ISIC2019_FREQUENCIES.values())
    for name, c in counts.items():
        quota = n * ISIC2019_FREQUENCIES[name] / total
        assert abs(c - quota) < 1.0 or c == 3, (name, c, quota)
    if n == 25_331:
        assert counts["NV"] / n == pytest.approx(0.508, abs=0.001)
        assert counts["DF"] / n == pytest.approx(0.009, abs=0.001)


@pytest.mark.parametrize("n", [24, 50, 120])
def test_class_counts_every_class_at_least_three_small_cohort(n):
    counts = class_counts(n)
    assert sum(counts.values()) == n
    assert min(counts.values()) >= 3
    if n == 24:
        assert set(counts.values()) == {3}
    else:
        assert max(counts, key=counts.get) == "NV"


def test_class_counts_too_small_cohort_raises():
    with pytest.raises(ValueError, match=r"n_images=20 is too small: 8 classes need at least 3 images each"):
        class_counts(20)


def test_generate_ground_truth_real_header_and_one_hot(isic_cohort):
    lines = isic_cohort["ground_truth"].read_text().splitlines()
    assert lines[0] == "image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK"
    assert all(re.fullmatch(r"ISIC_\d{7}(_downsampled)?(,(1\.0|0\.0)){9}", line) for line in lines[1:])
    gt = pd.read_csv(isic_cohort["ground_truth"])
    assert len(gt) == 120 and list(gt.columns) == ["image", *ISIC2019_COLUMNS]
    assert (gt["UNK"] == 0.0).all()
    assert (gt[list(ISIC2019_COLUMNS)].sum(axis=1) == 1.0).all()
    assert gt["image"].is_monotonic_increasing and gt["image"].is_unique
    counts = gt[list(ISIC2019_COLUMNS[:-1])].sum().astype(int).to_dict()
    assert counts == class_counts(120)


def test_generate_downsampled_names_match_files(isic_cohort):
    gt = pd.read_csv(isic_cohort["ground_truth"])
    down = gt["image"][gt["image"].str.endswith("_downsampled")]
    assert 3 <= len(down) <= 25  # about 10 %
    files = {p.name for p in isic_cohort["images"].iterdir()}
    assert {f"{n}.jpg" for n in gt["image"]} <= files
    assert {"LICENSE.txt", "ATTRIBUTION.txt"} <= files  # as in the real release


def test_generate_metadata_missing_fields_and_lesions(isic_cohort):
    assert isic_cohort["metadata"].read_text().splitlines()[0] == "image,age_approx,anatom_site_general,lesion_id,sex"
    md = pd.read_csv(isic_cohort["metadata"])
    gt = pd.read_csv(isic_cohort["ground_truth"])
    assert list(md["image"]) == list(gt["image"])
    lesions = md["lesion_id"].dropna()
    assert lesions.str.fullmatch(r"(HAM|BCN)_\d{7}").all()
    assert md["lesion_id"].isna().any()  # MSK-like images without a lesion id
    assert lesions.duplicated().any()  # several images per lesion
    assert md[["age_approx", "anatom_site_general", "sex"]].isna().any().any()
    ages = md["age_approx"].dropna()
    assert ((ages % 5) == 0).all() and ages.between(0, 85).all()
    # a lesion never carries two diagnoses
    gt["label"] = gt[list(ISIC2019_COLUMNS)].idxmax(axis=1)
    merged = md.merge(gt[["image", "label"]], on="image").dropna(subset=["lesion_id"])
    assert (merged.groupby("lesion_id")["label"].nunique() == 1).all()


def test_generate_images_decode_with_requested_sizes(isic_cohort):
    sizes = set()
    for p in sorted(isic_cohort["images"].glob("*.jpg")):
        with Image.open(p) as im:
            im.load()
            assert im.format == "JPEG" and im.mode == "RGB"
            sizes.add(im.size)
    assert sizes == {(600, 450), (1024, 768)}


def test_generate_classes_differ_in_colour(isic_cohort):
    gt = pd.read_csv(isic_cohort["ground_truth"])
    gt["label"] = gt[list(ISIC2019_COLUMNS)].idxmax(axis=1)
    centre = {}
    for label in ("NV", "VASC"):
        crops = []
        for name in gt["image"][gt["label"] == label][:3]:
            with Image.open(isic_cohort["images"] / f"{name}.jpg") as im:
                a = np.asarray(im.convert("RGB").resize((60, 45)), dtype=float)
            crops.append(a[18:27, 25:35].reshape(-1, 3).mean(0))
        centre[label] = np.mean(crops, axis=0)
    # vascular lesions are red (R well above G); naevi are brown (R/G ratio lower)
    assert centre["VASC"][0] / centre["VASC"][1] > centre["NV"][0] / centre["NV"][1]


def test_generate_same_seed_byte_identical_any_workers(tmp_path, tiny_cohort):
    again = generate_dermoscopy(tmp_path / "b", n_images=24, seed=3, sizes=[(96, 72)], workers=2)
    for key in ("ground_truth", "metadata"):
        assert again[key].read_bytes() == tiny_cohort[key].read_bytes()
    a = sorted(tiny_cohort["images"].iterdir())
    b = sorted(again["images"].iterdir())
    assert [p.name for p in a] == [p.name for p in b]
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b))


def test_generate_other_seed_differs(tmp_path, tiny_cohort):
    other = generate_dermoscopy(tmp_path / "c", n_images=24, seed=4, sizes=[(96, 72)], workers=1)
    assert other["ground_truth"].read_bytes() != tiny_cohort["ground_truth"].read_bytes()
