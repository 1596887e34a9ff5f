"""prepare_isic2019: checks first, grouped splits, reuse, resume, quarantine."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from data_prep import DataPrepError, PrepareOptions, load_image_file, open_cache, prepare_isic2019
from data_prep import build
from data_prep import images as images_mod
from data_prep import prepare_dermoscopy as prep
from data_prep.isic import ISIC2019_CLASSES

OPTS = PrepareOptions(short_side=32, workers=1)


def _isic(cohort, out, options=OPTS):
    return prepare_isic2019(cohort["images"], cohort["ground_truth"], cohort["metadata"], out, options)


def _copy(cohort, dest: Path) -> dict[str, Path]:
    shutil.copytree(cohort["images"].parent, dest)
    return {k: dest / v.relative_to(cohort["images"].parent) for k, v in cohort.items()}


@pytest.fixture(scope="module")
def isic_cache(isic_cohort, tmp_path_factory):
    return _isic(isic_cohort, tmp_path_factory.mktemp("cache") / "isic")


def test_prepare_isic2019_manifest_and_pixels(isic_cache, isic_cohort):
    cache = open_cache(isic_cache)
    assert len(cache) == 120
    assert cache.kind == "dermoscopy"
    assert cache.class_names == list(ISIC2019_CLASSES)  # UNK dropped: no images
    m = cache.manifest
    assert list(m.columns) == ["image", "label", "split", "group", "age_approx", "anatom_site_general", "sex"]
    gt = pd.read_csv(isic_cohort["ground_truth"])
    assert list(m["image"]) == list(gt["image"])
    assert list(m["label"]) == list(gt[list(ISIC2019_CLASSES)].idxmax(axis=1))  # names, not positions
    assert set(m["split"]) == {"train", "val", "test"}
    meta = cache.meta
    assert meta["options"]["short_side"] == 32 and "salt" not in meta["options"]
    assert any("UNK" in n for n in meta["notices"])
    i = int(np.flatnonzero(m["image"].str.endswith("_downsampled"))[0])
    expected = load_image_file(isic_cohort["images"] / f"{m['image'][i]}.jpg", short_side=32)
    np.testing.assert_array_equal(cache.image(i), expected)
    assert min(cache.image(0).shape[:2]) == 32


def test_prepare_isic2019_groups_never_cross_splits(isic_cache, isic_cohort):
    m = open_cache(isic_cache).manifest
    md = pd.read_csv(isic_cohort["metadata"], keep_default_na=False)
    lesion = dict(zip(md["image"], md["lesion_id"]))
    assert [lesion[i] or i for i in m["image"]] == list(m["group"])  # no lesion id: own group
    assert (m.groupby("group")["split"].nunique() == 1).all()


def test_prepare_isic2019_rerun_does_nothing(isic_cache, isic_cohort, capsys, monkeypatch):
    before = (isic_cache / "cache.json").stat().st_mtime_ns
    monkeypatch.setattr(build, "_decode_shard", lambda task: pytest.fail("decoded on a re-run"))
    _isic(isic_cohort, isic_cache, PrepareOptions(short_side=32, workers=3))  # workers do not change pixels
    assert "cache up to date" in capsys.readouterr().out
    assert (isic_cache / "cache.json").stat().st_mtime_ns == before


def test_prepare_isic2019_option_change_rebuilds(tiny_cohort, tmp_path):
    out = tmp_path / "c"
    prepare_isic2019(tiny_cohort["images"], tiny_cohort["ground_truth"], None, out, OPTS)
    first = json.loads((out / "cache.json").read_text())["build_key"]
    prepare_isic2019(tiny_cohort["images"], tiny_cohort["ground_truth"], None, out, PrepareOptions(short_side=24, workers=1))
    cache = open_cache(out)
    assert cache.meta["build_key"] != first and min(cache.image(0).shape[:2]) == 24
    assert not list(out.glob(".build-*"))


def test_prepare_isic2019_decoder_change_rebuilds(tiny_cohort, tmp_path, monkeypatch):
    """A cache decoded by an older `load_image_file` (other pixels for the same file) is not reused."""
    out = tmp_path / "c"
    prepare_isic2019(tiny_cohort["images"], tiny_cohort["ground_truth"], None, out, OPTS)
    first = json.loads((out / "cache.json").read_text())["build_key"]
    monkeypatch.setattr(images_mod, "DECODE_VERSION", images_mod.DECODE_VERSION + 1)
    prepare_isic2019(tiny_cohort["images"], tiny_cohort["ground_truth"], None, out, OPTS)
    assert json.loads((out / "cache.json").read_text())["build_key"] != first


def test_prepare_isic2019_interrupted_build_resumes(isic_cohort, tmp_path, monkeypatch):
    out = tmp_path / "c"
    real = build._decode_shard

    def interrupted(task):
        if task[0] == 1:
            raise KeyboardInterrupt
        return real(task)

    monkeypatch.setattr(build, "_decode_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _isic(isic_cohort, out)
    assert not (out / "cache.json").exists()
    with pytest.raises(DataPrepError, match="is not a prepared cache"):
        open_cache(out)

    decoded: list[int] = []

    def counting(task):
        decoded.append(task[0])
        return real(task)

    monkeypatch.setattr(build, "_decode_shard", counting)
    _isic(isic_cohort, out)
    assert decoded == [1]  # 120 images = shards 0 and 1; shard 0 survived the interruption
    resumed, fresh = open_cache(out), open_cache(_isic(isic_cohort, tmp_path / "fresh"))
    assert resumed.dataset_sha256 == fresh.dataset_sha256 and resumed.manifest_sha256 == fresh.manifest_sha256


def test_prepare_isic2019_parallel_equals_serial(tiny_cohort, tmp_path):
    a = prepare_isic2019(tiny_cohort["images"], tiny_cohort["ground_truth"], tiny_cohort["metadata"], tmp_path / "a", OPTS)
    small_shards = PrepareOptions(short_side=32, workers=2)
    original = prep.SHARD_SIZE
    try:
        prep.SHARD_SIZE = 8  # three shards so both workers get some
        b = prepare_isic2019(tiny_cohort["images"], tiny_cohort["ground_truth"], tiny_cohort["metadata"], tmp_path / "b", small_shards)
    finally:
        prep.SHARD_SIZE = original
    assert open_cache(a).dataset_sha256 == open_cache(b).dataset_sha256


def test_prepare_isic2019_bad_image_stops_naming_file(tiny_cohort, tmp_path):
    cohort = _copy(tiny_cohort, tmp_path / "in")
    victim = sorted(cohort["images"].glob("*.jpg"))[5]
    victim.write_bytes(victim.read_bytes()[:300])
    with pytest.raises(DataPrepError, match=rf"^Cannot decode image .*{victim.name}: "):
        _isic(cohort, tmp_path / "c")


def test_prepare_isic2019_on_error_skip_quarantines(tiny_cohort, tmp_path):
    cohort = _copy(tiny_cohort, tmp_path / "in")
    victim = sorted(cohort["images"].glob("*.jpg"))[5]
    victim.write_bytes(victim.read_bytes()[:300])
    out = _isic(cohort, tmp_path / "c", PrepareOptions(short_side=32, workers=1, on_error="skip"))
    q = pd.read_csv(out / "quarantine.csv")
    assert list(q.columns) == ["file", "reason"]
    assert list(q["file"]) == [str(victim)] and q["reason"][0] == "Truncated File Read"
    cache = open_cache(out)
    assert len(cache) == 23 and victim.stem not in set(cache.manifest["image"])
    assert any("quarantined" in n for n in cache.meta["notices"])


def test_prepare_isic2019_absent_image_fails_before_decoding(tiny_cohort, tmp_path, monkeypatch):
    cohort = _copy(tiny_cohort, tmp_path / "in")
    victim = sorted(cohort["images"].glob("*.jpg"))[3]
    victim.unlink()
    monkeypatch.setattr(build, "_decode_shard", lambda task: pytest.fail("decoded before checking"))
    with pytest.raises(DataPrepError, match=rf"ISIC_2019_Training_GroundTruth\.csv: 1 listed image\(s\) are absent from .*: {victim.stem}\. "):
        _isic(cohort, tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_prepare_isic2019_unlisted_image_warns(tiny_cohort, tmp_path):
    cohort = _copy(tiny_cohort, tmp_path / "in")
    shutil.copy(next(cohort["images"].glob("*.jpg")), cohort["images"] / "ISIC_9999999.jpg")
    with pytest.warns(UserWarning, match=r"1 image file\(s\) .* ignored: ISIC_9999999"):
        out = _isic(cohort, tmp_path / "c")
    assert len(open_cache(out)) == 24


def test_prepare_isic2019_test_layout_prediction_only(tiny_cohort, tmp_path):
    md = pd.read_csv(tiny_cohort["metadata"], dtype=str, keep_default_na=False).drop(columns=["lesion_id"])
    md_path = tmp_path / "ISIC_2019_Test_Metadata.csv"
    md.to_csv(md_path, index=False)
    out = prepare_isic2019(tiny_cohort["images"], None, md_path, tmp_path / "c", OPTS)
    cache = open_cache(out)
    assert cache.class_names == list(ISIC2019_CLASSES)
    assert set(cache.manifest["split"]) == {"test"}
    assert cache.manifest["label"].isna().all() and (cache.labels == -1).all()
    assert list(cache.manifest["image"]) == list(md["image"])


def test_prepare_isic2019_user_split_file(tiny_cohort, tmp_path):
    gt = pd.read_csv(tiny_cohort["ground_truth"])
    split = pd.DataFrame({"image": gt["image"], "split": (["train", "val", "test"] * 8)})
    split.to_csv(tmp_path / "split.csv", index=False)
    opts = PrepareOptions(short_side=32, workers=1, split_file=str(tmp_path / "split.csv"))
    cache = open_cache(prepare_isic2019(tiny_cohort["images"], tiny_cohort["ground_truth"], None, tmp_path / "c", opts))
    assert list(cache.manifest["split"]) == list(split["split"])


def test_prepare_isic2019_bad_on_error_option(tiny_cohort, tmp_path):
    with pytest.raises(DataPrepError, match=r"prepare\.on_error is 'ignore'; use 'stop' or 'skip'\.$"):
        _isic(tiny_cohort, tmp_path / "c", PrepareOptions(on_error="ignore"))


def test_prepare_skip_keeps_a_training_image_for_every_class(tiny_cohort, tmp_path):
    """The split is drawn over the images left after quarantine: the class whose training images
    are broken keeps its surviving image in train (a split drawn before decoding lost it)."""
    import shutil

    from data_prep.splits import make_split

    images = shutil.copytree(tiny_cohort["images"], tmp_path / "img")
    gt = pd.read_csv(tiny_cohort["ground_truth"])
    md = pd.read_csv(tiny_cohort["metadata"], dtype=str, keep_default_na=False)
    labels = list(gt.iloc[:, 1:].idxmax(axis=1))
    groups = [g or None for g in md["lesion_id"]]
    before, _ = make_split(labels, groups, (0.6, 0.2, 0.2), 0)
    victims = [img for img, lab, s in zip(gt["image"], labels, before) if lab == "DF" and s == "train"]
    assert victims and sum(lab == "DF" for lab in labels) > len(victims)
    for img in victims:
        (images / f"{img}.jpg").write_bytes(b"broken")
    out = prepare_isic2019(images, tiny_cohort["ground_truth"], tiny_cohort["metadata"], tmp_path / "c",
                           PrepareOptions(short_side=32, workers=1, on_error="skip"))
    m = open_cache(out).manifest
    assert set(victims).isdisjoint(m["image"])
    assert set(m.loc[m["split"] == "train", "label"]) == set(m["label"])
