"""build_cache: one builder for every format (shards, resume, quarantine, splits, finalize), tested on a hand-made Cohort."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from data_prep import DataPrepError, PrepareOptions, open_cache
from data_prep import build
from data_prep.build import build_cache, cache_key
from data_prep.cohort import Cohort


class Decode:
    """Item i -> i+1 images filled with (i, row-in-item); item ids in `bad` fail (module level: picklable)."""

    def __init__(self, bad=(), n=None):
        self.bad, self.n = set(bad), n

    def __call__(self, item):
        if item in self.bad:
            raise DataPrepError(f"item {item} is broken at /secret/path/{item}.png", f"/secret/path/{item}.png")
        n = self.n if self.n is not None else item % 3 + 1
        return [np.full((4 + r, 5, 3), 10 * item + r, np.uint8) for r in range(n)]


def _cohort(n_items=10, shard_size=3, **kw) -> Cohort:
    rows = [(i, r) for i in range(n_items) for r in range(i % 3 + 1)]
    return Cohort(kind="image", source="test", items=list(range(n_items)), item_rows=[i % 3 + 1 for i in range(n_items)],
                  images=[f"x{i}_{r}" for i, r in rows], labels=["AB"[i % 2] for i, _ in rows],
                  groups=[f"g{i}" for i, _ in rows], metadata=pd.DataFrame({"row": [r for _, r in rows]}),
                  class_names=["A", "B"], key={"test": n_items}, where="test.csv", shard_size=shard_size, **kw)


OPTS = PrepareOptions(workers=1, short_side=20)


def test_build_cache_stores_every_row_in_item_order(tmp_path):
    cohort = _cohort()
    cache = open_cache(build_cache(cohort, Decode(), tmp_path / "c", OPTS))
    assert len(cache) == 19 == sum(cohort.item_rows)  # 1+2+3+1+2+3+1+2+3+1
    for k, (name, (i, r)) in enumerate(zip(cache.manifest["image"], [(i, r) for i in range(10) for r in range(i % 3 + 1)])):
        assert name == f"x{i}_{r}"
        np.testing.assert_array_equal(cache.image(k), np.full((4 + r, 5, 3), 10 * i + r, np.uint8))
    assert list(cache.manifest.columns) == ["image", "label", "split", "group", "row"]
    assert (cache.manifest.groupby("group")["split"].nunique() == 1).all()  # an item's rows share a split
    assert cache.kind == "image" and cache.meta["source"] == "test"
    assert cache.meta["preprocessing"] == {"kind": "image", "short_side": 20, "color_constancy": False}
    assert cache.meta["build_key"] == cache_key({"test": 10}, OPTS)


def test_build_cache_kind_argument_and_ct_record(tmp_path):
    opts = PrepareOptions(workers=1, ct_image_size=32, channels="adjacent")
    cache = open_cache(build_cache(_cohort(), Decode(), tmp_path / "c", opts, kind="ct"))
    pre = cache.meta["preprocessing"]
    assert cache.kind == "ct" and pre["short_side"] == 32 and pre["channels"] == "adjacent" and not pre["color_constancy"]


def test_build_cache_parallel_equals_serial(tmp_path):
    a = open_cache(build_cache(_cohort(), Decode(), tmp_path / "a", OPTS))
    b = open_cache(build_cache(_cohort(), Decode(), tmp_path / "b", PrepareOptions(workers=2, short_side=20)))
    assert a.dataset_sha256 == b.dataset_sha256 and a.manifest_sha256 == b.manifest_sha256
    assert a.meta["build_key"] == b.meta["build_key"]  # workers never change a pixel, nor the key


def test_build_cache_stop_raises_the_renamed_error(tmp_path):
    def rename(item, err):
        return DataPrepError(str(err).replace(err.path, f"item {item + 1}"), f"item {item + 1}")

    with pytest.raises(DataPrepError, match=r"^item 4 is broken at item 5$"):
        build_cache(_cohort(rename=rename), Decode(bad={4}), tmp_path / "c", OPTS)


def test_build_cache_skip_quarantines_whole_items_and_resumes(tmp_path, monkeypatch, capsys):
    opts = PrepareOptions(workers=1, short_side=20, on_error="skip")
    real = build._decode_shard
    seen: list[int] = []

    def interrupted(job):
        seen.append(job[0])
        if job[0] == 2:
            raise KeyboardInterrupt
        return real(job)

    monkeypatch.setattr(build, "_decode_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_cache(_cohort(), Decode(bad={1, 7}), tmp_path / "c", opts)
    assert seen == [0, 1, 2]
    seen.clear()

    def counting(job):
        seen.append(job[0])
        return real(job)

    monkeypatch.setattr(build, "_decode_shard", counting)
    cache = open_cache(build_cache(_cohort(), Decode(bad={1, 7}), tmp_path / "c", opts))
    assert seen == [2, 3] and "resuming: 2 of 4 shards already built" in capsys.readouterr().out
    kept_items = sorted({int(n.split("_")[0][1:]) for n in cache.manifest["image"]})
    assert kept_items == [0, 2, 3, 4, 5, 6, 8, 9]
    assert len(cache) == 19 - 2 - 2  # items 1 and 7 had 2 rows each
    q = pd.read_csv(tmp_path / "c" / "quarantine.csv")
    assert list(q["file"]) == ["/secret/path/1.png", "/secret/path/7.png"]  # shard 0's failure survived the interruption
    assert any("2 input(s) quarantined" in n for n in cache.meta["notices"])
    # a clean rebuild with on_error=stop removes the stale quarantine list
    build_cache(_cohort(), Decode(), tmp_path / "c", OPTS)
    assert not (tmp_path / "c" / "quarantine.csv").exists()


def test_build_cache_up_to_date_does_not_decode(tmp_path, monkeypatch, capsys):
    build_cache(_cohort(), Decode(), tmp_path / "c", OPTS)
    monkeypatch.setattr(build, "_decode_shard", lambda job: pytest.fail("decoded on a re-run"))
    build_cache(_cohort(), Decode(), tmp_path / "c", PrepareOptions(workers=3, short_side=20))
    assert "cache up to date" in capsys.readouterr().out


def test_build_cache_item_with_wrong_image_count_is_a_bug(tmp_path):
    with pytest.raises(ValueError, match=r"item 0 decoded to 2 images; the cohort promised 1"):
        build_cache(_cohort(), Decode(n=2), tmp_path / "c", OPTS)


def test_build_cache_fixed_split_and_absent_classes(tmp_path):
    cohort = _cohort(splits=np.array(["train", "val", "test", "train"] * 4 + ["val", "test", "train"]), drop_absent_classes=True,
                     quarantined=[{"file": "", "reason": "header"}])
    cohort.class_names = ["A", "B", "C"]
    cache = open_cache(build_cache(cohort, Decode(), tmp_path / "c", PrepareOptions(workers=1, on_error="skip")))
    assert list(cache.manifest["split"]) == ["train", "val", "test", "train"] * 4 + ["val", "test", "train"]
    assert cache.class_names == ["A", "B"] and any("C lost every image" in n for n in cache.meta["notices"])
    assert pd.read_csv(tmp_path / "c" / "quarantine.csv")["reason"].tolist() == ["header"]


def test_build_cache_one_class_and_all_quarantined(tmp_path):
    one = _cohort()
    one.labels = ["A"] * len(one.labels)
    with pytest.raises(DataPrepError, match=r"^test\.csv: every image has the class 'A'"):
        build_cache(one, Decode(), tmp_path / "a", OPTS)
    with pytest.raises(DataPrepError, match=r"No readable image is left after quarantining 3 file\(s\)"):
        build_cache(_cohort(n_items=3), Decode(bad={0, 1, 2}), tmp_path / "b", PrepareOptions(workers=1, on_error="skip"))
    assert len(pd.read_csv(tmp_path / "b" / "quarantine.csv")) == 3
