from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from data_prep import CacheWriter, DataPrepError, open_cache


def _images(rng, n):
    return [rng.integers(0, 256, size=(8 + i % 3, 10 + i % 5, 3), dtype=np.uint8) for i in range(n)]


def _manifest(n):
    return pd.DataFrame({"image": [f"img{i}" for i in range(n)], "label": ["A", "B", "A", ""][: n] + ["B"] * max(0, n - 4),
                         "split": ["train", "val", "test", "train"][: n] + ["train"] * max(0, n - 4),
                         "group": [f"g{i}" for i in range(n)], "sex": ["male"] * n})


def _build(path, images, key="k1", shard=2):
    w = CacheWriter(path, key)
    w.start()
    n_shards = (len(images) + shard - 1) // shard
    for k in range(n_shards):
        if not w.has_shard(k):
            w.write_shard(k, images[k * shard:(k + 1) * shard])
    return w.finalize(_manifest(len(images)), n_shards, {"kind": "dermoscopy", "class_names": ["A", "B"]})


def test_cache_roundtrip_images_labels_splits(tmp_path):
    rng = np.random.default_rng(0)
    imgs = _images(rng, 5)
    _build(tmp_path / "c", imgs)
    cache = open_cache(tmp_path / "c")
    assert len(cache) == 5 and cache.class_names == ["A", "B"]
    for i, im in enumerate(imgs):
        np.testing.assert_array_equal(cache.image(i), im)
    assert cache.labels.tolist() == [0, 1, 0, -1, 1]
    assert cache.split_indices("train").tolist() == [0, 3, 4]
    assert cache.class_counts("train").tolist() == [1, 1]
    assert list(cache.manifest.columns[:4]) == ["image", "label", "split", "group"]
    assert len(cache.manifest_sha256) == 64


def test_cache_pickles_without_memmap(tmp_path):
    import pickle

    _build(tmp_path / "c", _images(np.random.default_rng(1), 3))
    cache = open_cache(tmp_path / "c")
    cache.image(0)
    clone = pickle.loads(pickle.dumps(cache))
    assert clone._pixels is None
    np.testing.assert_array_equal(clone.image(2), cache.image(2))


def test_open_cache_missing_folder(tmp_path):
    with pytest.raises(DataPrepError, match="does not exist. Run `ecl prepare"):
        open_cache(tmp_path / "nope")


def test_open_cache_incomplete_refused(tmp_path):
    _build(tmp_path / "c", _images(np.random.default_rng(2), 3))
    meta = json.loads((tmp_path / "c" / "cache.json").read_text())
    meta["complete"] = False
    (tmp_path / "c" / "cache.json").write_text(json.dumps(meta))
    with pytest.raises(DataPrepError, match="incomplete"):
        open_cache(tmp_path / "c")


def test_cache_writer_rebuild_with_other_key_marks_old_incomplete(tmp_path):
    _build(tmp_path / "c", _images(np.random.default_rng(3), 3), key="old")
    w = CacheWriter(tmp_path / "c", "new")
    assert not w.is_complete()
    w.start()
    with pytest.raises(DataPrepError, match="incomplete"):
        open_cache(tmp_path / "c")
    assert CacheWriter(tmp_path / "c", "old").is_complete() is False


def test_cache_writer_resume_keeps_written_shards(tmp_path):
    imgs = _images(np.random.default_rng(4), 6)
    w = CacheWriter(tmp_path / "c", "k")
    w.start()
    w.write_shard(0, imgs[:2])
    # a second writer (the resumed run) sees shard 0 and only needs the rest
    w2 = CacheWriter(tmp_path / "c", "k")
    w2.start()
    assert w2.has_shard(0) and not w2.has_shard(1)
    w2.write_shard(1, imgs[2:4])
    w2.write_shard(2, imgs[4:])
    w2.finalize(_manifest(6), 3, {"kind": "dermoscopy", "class_names": ["A", "B"]})
    assert w2.is_complete() and not w2.build_dir.exists()
    np.testing.assert_array_equal(open_cache(tmp_path / "c").image(5), imgs[5])


@pytest.mark.parametrize("damage,pattern", [
    ("truncate_pixels", r"pixels\.u8 is truncated \(\d+ bytes; the index needs \d+\)\. Re-run the `ecl prepare`"),
    ("no_manifest", r"manifest\.csv is missing: the cache is damaged\. Re-run"),
    ("bad_json", r"cache\.json is damaged \(JSONDecodeError"),
    ("object_index", r"index\.npy is damaged or not a plain integer array .*Re-run"),
    ("float_index", r"index\.npy is not an \[n, 4\] array of non-negative integers"),
    ("null_classes", r"cache\.json: class_names must be a list of distinct class names; got None\. Re-run"),
])
def test_open_cache_checks_every_file_and_says_to_re_prepare(tmp_path, damage, pattern):
    rng = np.random.default_rng(0)
    path = _build(tmp_path / "c", _images(rng, 5))
    if damage == "truncate_pixels":
        data = (path / "pixels.u8").read_bytes()
        (path / "pixels.u8").write_bytes(data[: len(data) - 10])
    elif damage == "no_manifest":
        (path / "manifest.csv").unlink()
    elif damage == "bad_json":
        (path / "cache.json").write_text('{"complete": true, "form')
    elif damage == "object_index":
        np.save(path / "index.npy", np.array([{"a": 1}] * 5, dtype=object), allow_pickle=True)
    elif damage == "null_classes":
        meta = json.loads((path / "cache.json").read_text())
        (path / "cache.json").write_text(json.dumps({**meta, "class_names": None}))
    else:
        np.save(path / "index.npy", np.zeros((5, 4), dtype=np.float32))
    with pytest.raises(DataPrepError, match=pattern):
        open_cache(path)
