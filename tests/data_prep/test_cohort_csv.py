"""Generic cohort CSVs and the ISIC Archive export."""
from __future__ import annotations

from pathlib import Path

import pytest

from data_prep import DataPrepError
from data_prep.cohort_csv import is_archive_export, read_cohort_csv


def _images(root: Path, names):
    root.mkdir(parents=True, exist_ok=True)
    for n in names:
        (root / n).write_bytes(b"placeholder")  # existence is all the reader checks
    return root


def test_read_cohort_csv_custom_columns_and_metadata(tmp_path):
    root = _images(tmp_path / "img", ["a.png", "b.jpg", "c.jpg"])
    csv = tmp_path / "c.csv"
    csv.write_text("file,dx,patient,site\na.png,nevus,p1,back\nb,melanoma,p1,arm\nc.jpg,nevus,,leg\n")
    cohort = read_cohort_csv(csv, root, image_column="file", label_column="dx", group_column="patient")
    assert cohort.images == ["a.png", "b", "c.jpg"]
    assert [p.name for p in cohort.paths] == ["a.png", "b.jpg", "c.jpg"]
    assert cohort.labels == ["nevus", "melanoma", "nevus"]
    assert cohort.class_names == ["melanoma", "nevus"]
    assert cohort.groups == ["p1", "p1", None]
    assert list(cohort.metadata.columns) == ["site"] and list(cohort.metadata["site"]) == ["back", "arm", "leg"]


def test_read_cohort_csv_unknown_label_with_class_list(tmp_path):
    root = _images(tmp_path / "img", ["a.jpg", "b.jpg"])
    csv = tmp_path / "c.csv"
    csv.write_text("image,label\na,MEL\nb,melanoma\n")
    with pytest.raises(DataPrepError, match=r"c\.csv: unknown label\(s\) in 'label' \(row 2: 'melanoma'\)\. Known classes: MEL, NV\.$"):
        read_cohort_csv(csv, root, class_names=["MEL", "NV"])


def test_read_cohort_csv_missing_label_column(tmp_path):
    root = _images(tmp_path / "img", ["a.jpg"])
    csv = tmp_path / "c.csv"
    csv.write_text("image,diag\na,MEL\n")
    with pytest.raises(DataPrepError, match=r"c\.csv: no label column 'label' \(columns: image, diag\)\. Name the column with --label-column\.$"):
        read_cohort_csv(csv, root)


def test_read_cohort_csv_empty_label(tmp_path):
    root = _images(tmp_path / "img", ["a.jpg", "b.jpg"])
    csv = tmp_path / "c.csv"
    csv.write_text("image,label\na,MEL\nb,\n")
    with pytest.raises(DataPrepError, match=r"c\.csv: empty or missing 'label' \(row 2: ''\)\. Give every image a class"):
        read_cohort_csv(csv, root)


def test_read_cohort_csv_na_spellings_are_not_classes(tmp_path):
    root = _images(tmp_path / "img", ["a.jpg", "b.jpg", "c.jpg", "d.jpg"])
    csv = tmp_path / "c.csv"
    csv.write_text("image,label\na,MEL\nb,NA\nc,nan\nd,N/A\n")
    with pytest.raises(DataPrepError, match=r"empty or missing 'label' \(row 2: 'NA', row 3: 'nan', row 4: 'N/A'\)"):
        read_cohort_csv(csv, root)


@pytest.mark.parametrize("name", ["../outside/x.jpg", "sub/../../outside/x.jpg", "ABS"])
def test_read_cohort_csv_refuses_paths_outside_the_image_root(tmp_path, name):
    root = _images(tmp_path / "img", ["a.jpg", "b.jpg"])
    _images(tmp_path / "outside", ["x.jpg"])
    (root / "sub").mkdir()
    name = str(tmp_path / "outside" / "x.jpg") if name == "ABS" else name
    csv = tmp_path / "c.csv"
    csv.write_text(f"image,label\na,MEL\nb,NV\n{name},NV\n")
    with pytest.raises(DataPrepError, match=r"c\.csv: image path\(s\) outside --image-root .*row 3: "):
        read_cohort_csv(csv, root)
    # an absolute path inside the root is fine
    csv.write_text(f"image,label\na,MEL\n{root / 'b.jpg'},NV\n")
    assert [p.name for p in read_cohort_csv(csv, root).paths] == ["a.jpg", "b.jpg"]


def test_read_user_csv_detects_semicolons(tmp_path):
    root = _images(tmp_path / "img", ["a.jpg"])
    csv = tmp_path / "c.csv"
    csv.write_text("image;label\na;MEL\n")
    with pytest.raises(DataPrepError, match=r"c\.csv: the columns are separated by semicolons, not commas"):
        read_cohort_csv(csv, root)


def test_read_cohort_csv_duplicated_image(tmp_path):
    root = _images(tmp_path / "img", ["a.jpg"])
    csv = tmp_path / "c.csv"
    csv.write_text("image,label\na,MEL\na,NV\n")
    with pytest.raises(DataPrepError, match=r"duplicated images in 'image': a\."):
        read_cohort_csv(csv, root)


def test_read_cohort_csv_absent_image(tmp_path):
    root = _images(tmp_path / "img", ["a.jpg"])
    csv = tmp_path / "c.csv"
    csv.write_text("image,label\na,MEL\nzz,NV\n")
    with pytest.raises(DataPrepError, match=r"c\.csv: 1 listed image\(s\) are absent from .*img: zz\. Add the files or remove their rows\.$"):
        read_cohort_csv(csv, root)


def test_read_cohort_csv_archive_export_detected(tmp_path):
    root = _images(tmp_path / "img", ["ISIC_0000001.jpg", "ISIC_0000002.jpg"])
    csv = tmp_path / "metadata.csv"
    csv.write_text(
        "isic_id,attribution,copyright_license,age_approx,anatom_site_general,diagnosis,lesion_id,sex\n"
        "ISIC_0000001,Anonymous,CC-0,55,anterior torso,melanoma,IL_0000001,male\n"
        "ISIC_0000002,Anonymous,CC-0,,,nevus,,female\n"
    )
    assert is_archive_export(["isic_id", "diagnosis"])
    cohort = read_cohort_csv(csv, root)
    assert cohort.images == ["ISIC_0000001", "ISIC_0000002"]
    assert cohort.labels == ["melanoma", "nevus"]
    assert cohort.groups == ["IL_0000001", None]
    assert list(cohort.metadata.columns) == ["age_approx", "anatom_site_general", "sex"]
    assert "ISIC Archive export" in cohort.notices[0]


def test_read_cohort_csv_missing_file(tmp_path):
    with pytest.raises(DataPrepError, match=r"^Cohort CSV .*x\.csv does not exist\."):
        read_cohort_csv(tmp_path / "x.csv", tmp_path)
