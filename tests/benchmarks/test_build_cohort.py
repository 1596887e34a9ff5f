"""The long-tailed cohort builder, on small IDX files generated here (the real ones are 30 MB)."""
from __future__ import annotations

import csv
import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.longtail.build_cohort import (CLASS_NAMES, CohortError, CohortOptions, build_cohort, class_order,
                                              longtail_counts, main, read_idx)


def _write_idx(path: Path, array: np.ndarray, gz: bool = False) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", n) for n in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as fh:
            fh.write(data)
    else:
        path.write_bytes(data)


@pytest.fixture()
def source(tmp_path: Path) -> Path:
    """Ten classes: 60 training and 20 test images each; pixel (0, 0) encodes the label, (0, 1) the index."""
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    for name, per_class, gz in (("train", 60, True), ("t10k", 20, False)):
        labels = rng.permutation(np.repeat(np.arange(10), per_class)).astype(np.uint8)
        images = rng.integers(0, 256, size=(labels.size, 28, 28), dtype=np.uint8)
        images[:, 0, 0] = labels * 20
        images[:, 0, 1] = np.arange(labels.size) % 256
        _write_idx(src / f"{name}-images-idx3-ubyte", images, gz)
        _write_idx(src / f"{name}-labels-idx1-ubyte", labels, gz)
    return src


def test_read_idx_round_trips_plain_and_gzip(tmp_path: Path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a", arr)
    _write_idx(tmp_path / "b", arr, gz=True)
    np.testing.assert_array_equal(read_idx(tmp_path / "a"), arr)
    np.testing.assert_array_equal(read_idx(tmp_path / "b"), arr)  # finds b.gz


def test_read_idx_rejects_truncated_and_wrong_magic(tmp_path: Path):
    arr = np.zeros((4, 5), dtype=np.uint8)
    _write_idx(tmp_path / "a", arr)
    (tmp_path / "t").write_bytes((tmp_path / "a").read_bytes()[:-3])
    with pytest.raises(CohortError, match=r"t: IDX header promises 20 bytes .* found 17"):
        read_idx(tmp_path / "t")
    (tmp_path / "m").write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x01\x00")
    with pytest.raises(CohortError, match="bad magic"):
        read_idx(tmp_path / "m")
    with pytest.raises(CohortError, match="apt-get install dataset-fashion-mnist"):
        read_idx(tmp_path / "missing")


def test_longtail_counts_follow_the_cifar_lt_profile():
    counts = longtail_counts(1000, 100, 10)
    expected = [int(np.floor(1000 * 100 ** (-i / 9) + 1e-9)) for i in range(10)]
    assert counts == expected
    assert counts[0] == 1000 and counts[-1] == 10 and sum(counts) == 2478  # the 2,478 images
    assert longtail_counts(50, 1, 3) == [50, 50, 50]
    with pytest.raises(CohortError, match="rarest class empty"):
        longtail_counts(10, 100, 10)
    with pytest.raises(CohortError, match=">= 1"):
        longtail_counts(10, 0.5, 10)


def test_class_order_options():
    assert class_order("default", 4) == [0, 1, 2, 3]
    assert class_order("reverse", 4) == [3, 2, 1, 0]
    shuffled = class_order("shuffle:3", 10)
    assert sorted(shuffled) == list(range(10)) and shuffled == class_order("shuffle:3", 10)
    assert class_order("2,0,1", 3) == [2, 0, 1]
    with pytest.raises(CohortError, match="exactly once"):
        class_order("0,0,1", 3)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_build_cohort_counts_splits_and_pixels(tmp_path: Path, source: Path):
    opts = CohortOptions(imbalance=10, n_max=40, order="reverse", val_per_class=5, test_per_class=20, seed=1)
    record = build_cohort(tmp_path / "out", opts, source)
    counts = longtail_counts(40, 10, 10)
    # reverse order: label 9 is the head class, label 0 the tail
    assert [record["counts"]["train"][CLASS_NAMES[c]] for c in range(9, -1, -1)] == counts
    assert set(record["counts"]["val"].values()) == {5} and set(record["counts"]["test"].values()) == {20}
    manifest = _rows(tmp_path / "out" / "manifest.csv")
    splits = {r["image"]: r["split"] for r in _rows(tmp_path / "out" / "splits.csv")}
    assert len(manifest) == sum(counts) + 50 + 200 == len(splits)
    train_imgs = read_idx(source / "train-images-idx3-ubyte")
    test_imgs = read_idx(source / "t10k-images-idx3-ubyte")
    seen_train = set()
    for row in manifest:
        split = splits[row["image"]]
        with Image.open(tmp_path / "out" / row["image"]) as im:
            pixels = np.asarray(im)
        assert pixels.shape == (28, 28) and pixels.dtype == np.uint8
        assert CLASS_NAMES[pixels[0, 0] // 20] == row["label"]  # the label written is the image's own
        index = int(Path(row["image"]).stem[2:])
        np.testing.assert_array_equal(pixels, (test_imgs if split == "test" else train_imgs)[index])
        if split != "test":
            assert index not in seen_train  # val never reuses a training image
            seen_train.add(index)


def test_build_is_deterministic_and_skips_when_unchanged(tmp_path: Path, source: Path):
    opts = CohortOptions(imbalance=5, n_max=30, val_per_class=3, test_per_class=4)
    build_cohort(tmp_path / "a", opts, source)
    build_cohort(tmp_path / "b", opts, source)
    assert (tmp_path / "a" / "manifest.csv").read_text() == (tmp_path / "b" / "manifest.csv").read_text()
    stamp = (tmp_path / "a" / "manifest.csv").stat().st_mtime_ns
    build_cohort(tmp_path / "a", opts, source)
    assert (tmp_path / "a" / "manifest.csv").stat().st_mtime_ns == stamp
    record = json.loads((tmp_path / "a" / "cohort.json").read_text())
    assert record["options"]["n_max"] == 30


def test_too_large_draw_is_a_clear_error(tmp_path: Path, source: Path, capsys):
    rc = main(["--out", str(tmp_path / "x"), "--source", str(source), "--n-max", "200"])
    assert rc == 2
    assert "has only 60 images left for a draw of 200" in capsys.readouterr().err
