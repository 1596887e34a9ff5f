"""prepare_csv and prepare_folder (generic 2D image cohorts): kind "image", names, quarantine, and no file names leaking."""
from __future__ import annotations


import numpy as np
import pandas as pd
import pytest
from PIL import Image

from data_prep import DataPrepError, PrepareOptions, load_image_file, open_cache, prepare_csv, prepare_folder

OPTS = PrepareOptions(short_side=32, workers=1)


def test_prepare_csv_generic_cohort(tiny_cohort, tmp_path):
    gt = pd.read_csv(tiny_cohort["ground_truth"])
    md = pd.read_csv(tiny_cohort["metadata"], dtype=str, keep_default_na=False)
    csv = tmp_path / "cohort.csv"
    pd.DataFrame({
        "file": gt["image"] + ".jpg",
        "dx": gt.iloc[:, 1:].idxmax(axis=1).str.lower(),
        "lesion": md["lesion_id"],
        "sex": md["sex"],
    }).to_csv(csv, index=False)
    out = prepare_csv(csv, tiny_cohort["images"], tmp_path / "c", OPTS, image_column="file", label_column="dx", group_column="lesion")
    cache = open_cache(out)
    assert cache.class_names == ["ak", "bcc", "bkl", "df", "mel", "nv", "scc", "vasc"]
    assert list(cache.manifest.columns) == ["image", "label", "split", "group", "sex"]
    assert list(cache.manifest["label"]) == list(gt.iloc[:, 1:].idxmax(axis=1).str.lower())
    assert cache.meta["source"] == "csv" and cache.kind == "image"  # a generic CSV is not assumed to be dermoscopy
    assert cache.meta["preprocessing"] == {"kind": "image", "short_side": 32, "color_constancy": False}
    np.testing.assert_array_equal(cache.class_counts("all"), [3] * 8)


def test_prepare_csv_every_image_quarantined_is_an_error(tmp_path):
    from data_prep import DataPrepError, PrepareOptions, prepare_csv

    (tmp_path / "img").mkdir()
    for name in ("a.jpg", "b.jpg"):
        (tmp_path / "img" / name).write_bytes(b"not a jpeg")
    (tmp_path / "m.csv").write_text("image,label\na.jpg,X\nb.jpg,Y\n")
    with pytest.raises(DataPrepError, match=r"No readable image is left after quarantining 2 file\(s\)"):
        prepare_csv(tmp_path / "m.csv", tmp_path / "img", tmp_path / "cache", PrepareOptions(on_error="skip", workers=1))
    assert (tmp_path / "cache" / "quarantine.csv").is_file()


def test_prepare_csv_one_class_cohort_is_refused(tmp_path):
    (tmp_path / "img").mkdir()
    for name in ("a.jpg", "b.jpg"):
        (tmp_path / "img" / name).write_bytes(b"not decoded: the check comes first")
    (tmp_path / "m.csv").write_text("image,label\na.jpg,MEL\nb.jpg,MEL\n")
    with pytest.raises(DataPrepError, match=r"m\.csv: every image has the class 'MEL'; a classifier needs at least two classes"):
        prepare_csv(tmp_path / "m.csv", tmp_path / "img", tmp_path / "cache", PrepareOptions(workers=1))


def test_prepare_csv_isic_archive_export_stays_dermoscopy(tiny_cohort, tmp_path):
    gt = pd.read_csv(tiny_cohort["ground_truth"])
    md = pd.read_csv(tiny_cohort["metadata"], dtype=str, keep_default_na=False)
    csv = tmp_path / "metadata.csv"
    pd.DataFrame({"isic_id": gt["image"], "diagnosis": gt.iloc[:, 1:].idxmax(axis=1), "lesion_id": md["lesion_id"],
                  "sex": md["sex"], "attribution": "someone"}).to_csv(csv, index=False)
    cache = open_cache(prepare_csv(csv, tiny_cohort["images"], tmp_path / "c", OPTS))
    assert cache.kind == "dermoscopy" and cache.meta["source"] == "isic_archive"
    assert list(cache.manifest["image"]) == list(gt["image"]) and "attribution" not in cache.manifest.columns


def _folder_cohort(root, per_class=(5, 4, 3)):
    """Class folders whose file and sub-folder names carry made-up identifiers (MRN...)."""
    rng = np.random.default_rng(0)
    files = {}
    for c, (name, n) in enumerate(zip(("benign", "malignant", "other"), per_class)):
        for k in range(n):
            sub = root / name / (f"MRN{c}{k:03d}_SMITH" if k % 2 else "")
            sub.mkdir(parents=True, exist_ok=True)
            path = sub / f"DOE_JANE_{c}{k}.{'png' if k % 2 else 'jpg'}"
            Image.fromarray(rng.integers(0, 255, (40 + k, 50, 3), dtype=np.uint8)).save(path)
            files.setdefault(name, []).append(path)
    (root / "benign" / "notes.txt").write_text("not an image")
    (root / "README_MRN999.txt").write_text("loose file")
    return {name: sorted(paths) for name, paths in files.items()}


def _all_text(folder):
    return "".join(p.read_text(errors="replace") for p in folder.rglob("*") if p.is_file() and p.suffix in (".csv", ".json"))


def test_prepare_folder_names_images_by_position(tmp_path):
    files = _folder_cohort(tmp_path / "in")
    cache = open_cache(prepare_folder(tmp_path / "in", tmp_path / "c", OPTS))
    assert cache.kind == "image" and cache.meta["source"] == "folder"
    assert cache.class_names == ["benign", "malignant", "other"]
    m = cache.manifest
    expected = [f"{name}-{k:06d}" for name in ("benign", "malignant", "other") for k in range(1, len(files[name]) + 1)]
    assert list(m["image"]) == expected and list(m["group"]) == expected  # every image its own group
    assert list(m["label"]) == [e.rsplit("-", 1)[0] for e in expected]
    # image k of a class is the k-th file of that class in sorted path order, decoded like every 2D cache
    for i, (name, k) in enumerate((n, k) for n in ("benign", "malignant", "other") for k in range(len(files[n]))):
        np.testing.assert_array_equal(cache.image(i), load_image_file(files[name][k], short_side=32))
    assert any("1 file(s) in class folders are not images" in n for n in cache.meta["notices"])
    assert any("1 file(s) directly under --root" in n for n in cache.meta["notices"])
    text = _all_text(tmp_path / "c")
    assert "MRN" not in text and "DOE" not in text and "SMITH" not in text and str(tmp_path / "in") not in text


def test_prepare_folder_quarantine_and_stop_name_positions_not_files(tmp_path, capsys):
    files = _folder_cohort(tmp_path / "in")
    victim = files["malignant"][2]
    victim.write_bytes(victim.read_bytes()[:100])
    with pytest.raises(DataPrepError, match=r"^Cannot decode image image malignant-000003: ") as info:
        prepare_folder(tmp_path / "in", tmp_path / "stop", OPTS)
    assert "DOE" not in str(info.value) and "MRN" not in str(info.value) and "DOE" not in str(info.value.path)
    out = prepare_folder(tmp_path / "in", tmp_path / "c", PrepareOptions(short_side=32, workers=1, on_error="skip"))
    q = pd.read_csv(out / "quarantine.csv")
    assert list(q["file"]) == ["image malignant-000003"] and "DOE" not in q["reason"][0]
    assert "malignant-000003" not in set(open_cache(out).manifest["image"]) and len(open_cache(out)) == 11
    printed = "".join(capsys.readouterr())
    assert "DOE" not in printed and "MRN" not in printed


def test_prepare_folder_split_file_uses_position_names(tmp_path):
    _folder_cohort(tmp_path / "in", per_class=(3, 3, 3))
    names = [f"{c}-{k:06d}" for c in ("benign", "malignant", "other") for k in (1, 2, 3)]
    pd.DataFrame({"image": names, "split": ["train", "val", "test"] * 3}).to_csv(tmp_path / "s.csv", index=False)
    cache = open_cache(prepare_folder(tmp_path / "in", tmp_path / "c",
                                      PrepareOptions(short_side=32, workers=1, split_file=str(tmp_path / "s.csv"))))
    assert list(cache.manifest["split"]) == ["train", "val", "test"] * 3


def test_prepare_folder_refuses_one_class_and_empty_class(tmp_path):
    (tmp_path / "one" / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "one" / "a" / "x.png")
    with pytest.raises(DataPrepError, match=r"1 class folder\(s\) found; a classifier needs at least two"):
        prepare_folder(tmp_path / "one", tmp_path / "c", OPTS)
    (tmp_path / "one" / "b").mkdir()
    with pytest.raises(DataPrepError, match=r"class folder 'b' holds no image"):
        prepare_folder(tmp_path / "one", tmp_path / "c", OPTS)
    with pytest.raises(DataPrepError, match=r"is not a folder"):
        prepare_folder(tmp_path / "nope", tmp_path / "c", OPTS)
