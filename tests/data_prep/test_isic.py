"""ISIC 2019 ground truth and metadata parsing: real headers, quirks and every input fault."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from data_prep import DataPrepError
from data_prep.isic import list_image_files, match_images, read_ground_truth, read_metadata

HEADER = "image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK\n"


def _write(tmp_path: Path, text: str, name: str = "gt.csv") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def _row(image: str, label: str) -> str:
    cols = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
    return image + "," + ",".join("1.0" if c == label else "0.0" for c in cols) + "\n"


def test_read_ground_truth_generated_cohort(isic_cohort):
    gt = read_ground_truth(isic_cohort["ground_truth"])
    assert len(gt.images) == 120
    assert gt.class_names == ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"]
    assert gt.notices == ["class(es) UNK in ISIC_2019_Training_GroundTruth.csv have no images and are dropped"]
    assert any(name.endswith("_downsampled") for name in gt.images)
    assert set(gt.labels) == set(gt.class_names)


def test_read_ground_truth_class_order_is_column_order(tmp_path):
    p = _write(tmp_path, "image,b_class,a_class\nx1,1.0,0.0\nx2,0,1\n")
    gt = read_ground_truth(p)
    assert gt.class_names == ["b_class", "a_class"] and gt.labels == ["b_class", "a_class"]


def test_read_ground_truth_unk_with_samples_is_kept(tmp_path):
    p = _write(tmp_path, HEADER + _row("ISIC_0000001", "UNK") + _row("ISIC_0000002", "MEL"))
    gt = read_ground_truth(p)
    assert gt.class_names == ["MEL", "UNK"]
    assert "NV, BCC, AK, BKL, DF, VASC, SCC" in gt.notices[0]


def test_read_ground_truth_duplicated_ids(tmp_path):
    p = _write(tmp_path, HEADER + _row("ISIC_0000001", "MEL") + _row("ISIC_0000002", "NV") + _row("ISIC_0000001", "NV"))
    with pytest.raises(DataPrepError, match=r"gt\.csv: duplicated image IDs: ISIC_0000001\. Each image must appear once\.$"):
        read_ground_truth(p)


def test_read_ground_truth_row_without_label(tmp_path):
    p = _write(tmp_path, HEADER + _row("ISIC_0000001", "MEL") + _row("ISIC_0000002", "none"))
    with pytest.raises(DataPrepError, match=r"rows with no label \(every class 0\) for images ISIC_0000002\. Give each image exactly one class\.$"):
        read_ground_truth(p)


def test_read_ground_truth_row_with_several_labels(tmp_path):
    p = _write(tmp_path, HEADER + _row("ISIC_0000001", "MEL") + "ISIC_0000002,1.0,1.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0\n")
    with pytest.raises(DataPrepError, match=r"rows with several labels for images ISIC_0000002\. "):
        read_ground_truth(p)


def test_read_ground_truth_non_numeric_value(tmp_path):
    p = _write(tmp_path, HEADER + _row("ISIC_0000001", "MEL") + "ISIC_0000002,0.0,yes,0.0,0.0,0.0,0.0,0.0,0.0,0.0\n")
    with pytest.raises(DataPrepError, match=r"empty or non-numeric values in column\(s\) 'NV' for images ISIC_0000002\. Write 1\.0 or 0\.0"):
        read_ground_truth(p)


def test_read_ground_truth_soft_label_rejected(tmp_path):
    p = _write(tmp_path, HEADER + "ISIC_0000002,0.5,0.5,0.0,0.0,0.0,0.0,0.0,0.0,0.0\n")
    with pytest.raises(DataPrepError, match=r"class values other than 0 and 1 for images ISIC_0000002\. The ground truth must be one-hot\.$"):
        read_ground_truth(p)


def test_read_ground_truth_wrong_first_column(tmp_path):
    p = _write(tmp_path, "name,MEL,NV\nx,1,0\n")
    with pytest.raises(DataPrepError, match=r"the first column must be 'image', found \['name'\]"):
        read_ground_truth(p)


def test_read_ground_truth_missing_file(tmp_path):
    with pytest.raises(DataPrepError, match=r"^Ground-truth file .*nope\.csv does not exist\."):
        read_ground_truth(tmp_path / "nope.csv")


def test_read_ground_truth_lists_many_offenders_briefly(tmp_path):
    rows = "".join(_row(f"ISIC_{i:07d}", "none") for i in range(15))
    p = _write(tmp_path, HEADER + rows)
    with pytest.raises(DataPrepError, match=r"ISIC_0000009, \.\.\. \(15 in all\)\. "):
        read_ground_truth(p)


def test_read_metadata_missing_values_stay_empty(isic_cohort):
    md = read_metadata(isic_cohort["metadata"])
    assert list(md.columns) == ["lesion_id", "age_approx", "anatom_site_general", "sex"]
    assert len(md) == 120
    assert (md["lesion_id"] == "").any() and (md["anatom_site_general"] == "").any()
    assert md["lesion_id"][md["lesion_id"] != ""].str.match(r"^(HAM|BCN)_").all()


def test_read_metadata_test_release_without_lesion_id(tmp_path):
    p = _write(tmp_path, "image,age_approx,anatom_site_general,sex\nISIC_0034321,60.0,,male\n", "md.csv")
    md = read_metadata(p)
    assert md.loc["ISIC_0034321", "lesion_id"] == "" and md.loc["ISIC_0034321", "sex"] == "male"


def test_read_metadata_non_numeric_age(tmp_path):
    p = _write(tmp_path, "image,age_approx,anatom_site_general,lesion_id,sex\nISIC_1,sixty,,,\n", "md.csv")
    with pytest.raises(DataPrepError, match=r"md\.csv: non-numeric age_approx for images ISIC_1 \('sixty'\)\."):
        read_metadata(p)


def test_read_metadata_duplicated_ids(tmp_path):
    p = _write(tmp_path, "image,age_approx\nISIC_1,5\nISIC_1,10\n", "md.csv")
    with pytest.raises(DataPrepError, match=r"md\.csv: duplicated image IDs: ISIC_1\."):
        read_metadata(p)


def test_match_images_absent_listed_image(isic_cohort):
    files = list_image_files(isic_cohort["images"])
    with pytest.raises(DataPrepError, match=r"gt\.csv: 1 listed image\(s\) are absent from .*: ISIC_9999999\. Add the files or remove their rows\.$"):
        match_images([next(iter(files)), "ISIC_9999999"], files, isic_cohort["images"], "gt.csv")


def test_match_images_unlisted_file_warns(isic_cohort):
    files = list_image_files(isic_cohort["images"])
    names = sorted(files)[1:]
    with pytest.warns(UserWarning, match=r"1 image file\(s\) in .* are not listed in gt\.csv and are ignored"):
        paths, notices = match_images(names, files, isic_cohort["images"], "gt.csv")
    assert len(paths) == 119 and len(notices) == 1


def test_match_images_downsampled_fallback(isic_cohort):
    files = list_image_files(isic_cohort["images"])
    assert "LICENSE" not in files and "ATTRIBUTION" not in files
    down = next(n for n in files if n.endswith("_downsampled"))
    plain = down[: -len("_downsampled")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        paths, _ = match_images([plain], files, isic_cohort["images"], "gt.csv")
    assert paths == [files[down]]


def test_read_ground_truth_names_a_text_column(tmp_path):
    text = "image,MEL,NV,note\nISIC_0000001,1.0,0.0,dark\nISIC_0000002,0.0,1.0,light\n"
    with pytest.raises(DataPrepError, match=r"gt\.csv: column\(s\) 'note' hold no numbers \(e\.g\. 'dark'\)"):
        read_ground_truth(_write(tmp_path, text))


def test_read_ground_truth_trailing_comma_names_the_column(tmp_path):
    text = "image,MEL,NV,\nISIC_0000001,1.0,0.0,\nISIC_0000002,0.0,1.0,\n"
    with pytest.raises(DataPrepError, match=r"gt\.csv: column\(s\) 4 have no header \(often a trailing comma"):
        read_ground_truth(_write(tmp_path, text))


def test_read_ground_truth_metadata_csv_is_called_out(tmp_path):
    text = "image,age_approx,anatom_site_general,lesion_id,sex\nISIC_0000001,55,back,L1,male\n"
    with pytest.raises(DataPrepError, match=r"this looks like the metadata CSV .*Pass it as --metadata"):
        read_ground_truth(_write(tmp_path, text))


def test_read_ground_truth_header_only_says_so(tmp_path):
    with pytest.raises(DataPrepError, match=r"gt\.csv: no data rows, only the header") as info:
        read_ground_truth(_write(tmp_path, HEADER))
    assert "quarantine" not in str(info.value)


def test_read_ground_truth_ids_with_jpg_suffix_are_accepted_with_a_notice(tmp_path):
    gt = read_ground_truth(_write(tmp_path, HEADER + _row("ISIC_0000001.jpg", "MEL") + _row("ISIC_0000002.JPG", "NV")))
    assert gt.images == ["ISIC_0000001", "ISIC_0000002"] and gt.labels == ["MEL", "NV"]
    assert any("end in a file suffix" in n for n in gt.notices)
