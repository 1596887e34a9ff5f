"""Lesion-grouped stratified splits on the ISIC-like cohort, and user split files."""
from __future__ import annotations

from collections import Counter

import pytest

from data_prep import DataPrepError, make_split
from data_prep.isic import read_ground_truth, read_metadata
from data_prep.manifest import read_split_file


@pytest.fixture(scope="module")
def labelled(isic_cohort):
    gt = read_ground_truth(isic_cohort["ground_truth"])
    md = read_metadata(isic_cohort["metadata"])
    groups = [md.loc[i, "lesion_id"] or None for i in gt.images]
    return gt.images, gt.labels, groups


def test_make_split_no_lesion_in_two_splits(labelled):
    images, labels, groups = labelled
    splits, _ = make_split(labels, groups, (0.6, 0.2, 0.2), seed=0)
    seen: dict[str, set] = {}
    for g, s in zip(groups, splits):
        if g is not None:
            seen.setdefault(g, set()).add(s)
    assert any(Counter(groups)[g] > 1 for g in seen)  # the cohort really has multi-image lesions
    assert all(len(s) == 1 for s in seen.values())


def test_make_split_every_class_in_every_split_or_notice(labelled):
    images, labels, groups = labelled
    splits, notices = make_split(labels, groups, (0.6, 0.2, 0.2), seed=0)
    n_groups = Counter()
    for label in set(labels):
        n_groups[label] = len({g if g is not None else f"own{i}" for i, (g, lab) in enumerate(zip(groups, labels)) if lab == label})
    for label in set(labels):
        present = {s for s, lab in zip(splits, labels) if lab == label}
        if n_groups[label] >= 3:
            assert present == {"train", "val", "test"}, label
        else:
            assert any(f"class '{label}'" in n for n in notices)
    fractions = Counter(splits)
    assert fractions["train"] / len(labels) == pytest.approx(0.6, abs=0.08)


def test_make_split_notice_when_class_has_too_few_groups():
    labels = ["A"] * 30 + ["B"] * 2
    groups = [f"a{i}" for i in range(30)] + ["b", "b"]
    splits, notices = make_split(labels, groups, (0.6, 0.2, 0.2), seed=1)
    assert notices == ["class 'B' has only 1 group(s), so it cannot appear in every split (absent from: val, test)"]
    assert set(splits[-2:]) == {"train"}


def _split_csv(tmp_path, rows):
    p = tmp_path / "splits.csv"
    p.write_text("image,split\n" + "".join(f"{a},{b}\n" for a, b in rows))
    return p


def test_read_split_file_ok(tmp_path):
    p = _split_csv(tmp_path, [("x1", "train"), ("x2", "val"), ("x3", "test"), ("x4", "train")])
    out = read_split_file(p, ["x1", "x2", "x3", "x4"], ["L1", None, "", "L1"])
    assert list(out) == ["train", "val", "test", "train"]


def test_read_split_file_image_twice(tmp_path):
    p = _split_csv(tmp_path, [("x1", "train"), ("x1", "val"), ("x2", "test")])
    with pytest.raises(DataPrepError, match=r"splits\.csv: images listed more than once: x1\. List each image exactly once\.$"):
        read_split_file(p, ["x1", "x2"], [None, None])


def test_read_split_file_bad_split_name(tmp_path):
    p = _split_csv(tmp_path, [("x1", "train"), ("x2", "validation")])
    with pytest.raises(DataPrepError, match=r"splits must be train, val or test; offending rows: row 2: x2='validation'\.$"):
        read_split_file(p, ["x1", "x2"], [None, None])


def test_read_split_file_image_missing(tmp_path):
    p = _split_csv(tmp_path, [("x1", "train")])
    with pytest.raises(DataPrepError, match=r"1 cohort image\(s\) have no split: x2\. List every image exactly once\.$"):
        read_split_file(p, ["x1", "x2"], [None, None])


def test_read_split_file_unknown_image(tmp_path):
    p = _split_csv(tmp_path, [("x1", "train"), ("x9", "test")])
    with pytest.raises(DataPrepError, match=r"images not in the cohort: x9\. Remove these rows\.$"):
        read_split_file(p, ["x1"], [None])


def test_read_split_file_group_in_two_splits(tmp_path):
    p = _split_csv(tmp_path, [("x1", "train"), ("x2", "test"), ("x3", "val")])
    with pytest.raises(DataPrepError, match=r"group\(s\) split across several splits.*: HAM_0000001 \(x1=train, x2=test\)\. Put all images of a group in one split\.$"):
        read_split_file(p, ["x1", "x2", "x3"], ["HAM_0000001", "HAM_0000001", None])


def test_read_split_file_missing_column(tmp_path):
    p = tmp_path / "s.csv"
    p.write_text("image,fold\nx1,1\n")
    with pytest.raises(DataPrepError, match=r"s\.csv: no 'split' column \(columns: image, fold\)\. Write the header image,split\.$"):
        read_split_file(p, ["x1"], [None])
