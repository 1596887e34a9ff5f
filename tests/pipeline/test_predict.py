"""Tests of `ecl predict` (pipeline/predict.py): calibrated probabilities, ISIC CSV, unreadable files."""
from __future__ import annotations

from pathlib import Path

import dataclasses
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import _evalkit as evalkit  # noqa: E402  registered by conftest.py


@pytest.fixture(scope="module")
def model_and_images(tmp_path_factory):
    from data_prep import open_cache

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    work = tmp_path_factory.mktemp("predict")
    cache = evalkit.build_cache(work / "cache", seed=4)
    run_dir = evalkit.make_run(cache, work / "runs", None, steps=4, mlflow_run=False)
    images = work / "images"
    (images / "sub").mkdir(parents=True)
    c = open_cache(cache)
    rows = c.split_indices("test")[:3]
    Image.fromarray(c.image(int(rows[0]))).save(images / "ISIC_0000001.png")
    Image.fromarray(c.image(int(rows[1]))).save(images / "ISIC_0000002.jpg", quality=95)
    Image.fromarray(c.image(int(rows[2]))).save(images / "sub" / "ISIC_0000003.PNG")
    (images / "notes.txt").write_text("not an image")
    yield run_dir, images
    torch.set_num_threads(before)


def _reference_logits(run_dir: Path, files: list[Path]) -> np.ndarray:
    """The logits the training cache's preprocessing gives (short side 24, as evalkit's cache.json records),
    computed independently of run_predict."""
    from data_prep import load_image_file
    from pipeline.checkpoint import load_trained_model
    from pipeline.data import eval_transform
    from pipeline.models import model_data_config

    tm = load_trained_model(run_dir)
    cfg = tm.config
    assert cfg.prepare.short_side != 24  # the run's prepare config says otherwise: predict must not read it
    t = eval_transform(cfg.data, model_data_config(tm.network))
    x = torch.stack([t(load_image_file(f, short_side=24)) for f in files])
    with torch.no_grad():
        return tm.network(x).double().numpy()


def test_predict_uses_stored_temperature(model_and_images, tmp_path):
    from scipy.special import softmax

    from pipeline.checkpoint import BEST, write_calibration
    from pipeline.predict import run_predict

    run_dir, images = model_and_images
    write_calibration(run_dir, 2.5, fitted_on="val", checkpoint=run_dir / BEST)
    out = run_predict(str(run_dir), images, out_csv=tmp_path / "pred.csv")
    df = pd.read_csv(out, dtype={"image": str})
    assert list(df.columns) == ["image", *evalkit.CLASSES]
    assert df["image"].tolist() == ["ISIC_0000001", "ISIC_0000002", "ISIC_0000003"]
    files = [images / "ISIC_0000001.png", images / "ISIC_0000002.jpg", images / "sub" / "ISIC_0000003.PNG"]
    logits = _reference_logits(run_dir, files)
    probs = df[evalkit.CLASSES].to_numpy()
    np.testing.assert_allclose(probs, softmax(logits / 2.5, axis=1), atol=1e-6)
    assert np.abs(probs - softmax(logits, axis=1)).max() > 1e-3  # T = 1 would give other numbers
    assert not (tmp_path / "pred.errors.csv").exists()


def test_predict_lists_unreadable_file_without_failing(model_and_images, tmp_path, capsys):
    from pipeline.predict import run_predict

    run_dir, images = model_and_images
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "good.png").write_bytes((images / "ISIC_0000001.png").read_bytes())
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (folder / "truncated.png").write_bytes((images / "ISIC_0000001.png").read_bytes()[:60])
    out = run_predict(str(run_dir), folder, out_csv=tmp_path / "p.csv")
    assert pd.read_csv(out)["image"].tolist() == ["good"]
    errors = pd.read_csv(tmp_path / "p.errors.csv")
    assert sorted(Path(f).name for f in errors["file"]) == ["broken.jpg", "truncated.png"]
    assert errors["error"].str.len().min() > 0
    err = capsys.readouterr().err
    assert "broken.jpg" in err and "2 of 3 files could not be read" in err


def test_predict_single_file_and_all_unreadable_raises(model_and_images, tmp_path):
    from pipeline.errors import PipelineError
    from pipeline.predict import run_predict

    run_dir, images = model_and_images
    out = run_predict(str(run_dir), images / "ISIC_0000002.jpg", out_csv=tmp_path / "one.csv")
    assert pd.read_csv(out)["image"].tolist() == ["ISIC_0000002"]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    with pytest.raises(PipelineError, match="none of the 1 files"):
        run_predict(str(run_dir), bad, out_csv=tmp_path / "none.csv")
    assert (tmp_path / "none.errors.csv").is_file()


def test_find_images_empty_folder_names_it(tmp_path):
    from pipeline.errors import PipelineError
    from pipeline.predict import find_images

    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(PipelineError, match=str(tmp_path)):
        find_images(tmp_path)


def test_image_ids_disambiguate_duplicate_stems(tmp_path):
    from pipeline.predict import _image_ids

    files = [tmp_path / "a" / "x.png", tmp_path / "b" / "x.jpg", tmp_path / "y.png"]
    assert _image_ids(files, tmp_path) == ["a/x", "b/x", "y"]


def test_errors_path_beside_output():
    from pipeline.predict import errors_path

    assert errors_path("out/predictions.csv") == Path("out/predictions.errors.csv")


def test_calibration_json_beside_the_checkpoint_wins(model_and_images, tmp_path):
    from scipy.special import softmax

    from pipeline.checkpoint import CALIBRATION, load_trained_model, write_calibration
    from pipeline.predict import run_predict

    run_dir, images = model_and_images
    write_calibration(run_dir, 0.6, fitted_on="test")
    try:
        assert load_trained_model(run_dir).temperature == pytest.approx(0.6)
        out = run_predict(str(run_dir), images / "ISIC_0000001.png", out_csv=tmp_path / "p.csv")
        logits = _reference_logits(run_dir, [images / "ISIC_0000001.png"])
        np.testing.assert_allclose(pd.read_csv(out)[evalkit.CLASSES].to_numpy(), softmax(logits / 0.6, axis=1), atol=1e-6)
        (run_dir / CALIBRATION).write_text("{broken")
        from pipeline.errors import PipelineError

        with pytest.raises(PipelineError, match=r"calibration\.json is damaged .*re-run `ecl evaluate`"):
            load_trained_model(run_dir)
    finally:
        (run_dir / CALIBRATION).unlink()


def test_predict_names_dicom_inputs_by_position_only(model_and_images, tmp_path, capsys):
    from pipeline.predict import run_predict

    run_dir, images = model_and_images
    folder = tmp_path / "LAST^FIRST001_MRN001"
    (folder / "CT THORAX").mkdir(parents=True)
    (folder / "a_good.png").write_bytes((images / "ISIC_0000001.png").read_bytes())
    (folder / "CT THORAX" / "IM_MRN001_0003.dcm").write_bytes(b"\0" * 128 + b"DICM")
    run_predict(str(run_dir), folder, out_csv=tmp_path / "p.csv")
    errors = (tmp_path / "p.errors.csv").read_text()
    printed = "".join(capsys.readouterr())
    assert "input 1 of 2 under --images" in errors and "DICOM input is not supported" in errors  # sorted: "CT THORAX/" first
    for text in (errors, printed):
        assert "MRN001" not in text and "LAST" not in text and "THORAX" not in text


def test_predict_ct_model_uses_the_recorded_cache_preprocessing_and_positions(tmp_path, capsys):
    """A CT run predicts where its cache is absent: the crop size recorded from cache.json at training is
    used (not the dermoscopy short_side), and unreadable inputs are named by position, not file name."""
    import json

    from data_prep import load_image_file, open_cache
    from pipeline.checkpoint import load_trained_model
    from pipeline.data import eval_transform
    from pipeline.models import model_data_config
    from pipeline.predict import run_predict

    cache = evalkit.build_cache(tmp_path / "ct-cache", seed=2, kind="ct", size=20)
    meta = json.loads((cache / "cache.json").read_text())
    meta["options"] = {"ct_image_size": 20, "channels": "windows"}
    (cache / "cache.json").write_text(json.dumps(meta))
    run_dir = evalkit.make_run(cache, tmp_path / "runs", None, steps=2, mlflow_run=False)
    c = open_cache(cache)
    images = tmp_path / "crops"
    images.mkdir()
    Image.fromarray(c.image(int(c.split_indices("test")[0]))).resize((37, 53)).save(images / "P-1_l0_s0.png")
    (images / "MRN777_broken.png").write_bytes(b"nope")
    cache.rename(tmp_path / "elsewhere")  # another machine: no cache
    tm = load_trained_model(run_dir)
    assert tm.preprocessing["kind"] == "ct" and tm.preprocessing["short_side"] == 20
    assert tm.config.prepare.short_side != 20 and tm.config.prepare.ct_image_size != 20
    out = run_predict(str(run_dir), images, out_csv=tmp_path / "p.csv")
    t = eval_transform(tm.config.data, model_data_config(tm.network))
    with torch.no_grad():
        logits = tm.network(torch.stack([t(load_image_file(images / "P-1_l0_s0.png", short_side=20))])).double().numpy()
    from scipy.special import softmax

    np.testing.assert_allclose(pd.read_csv(out)[evalkit.CLASSES].to_numpy(), softmax(logits, axis=1), atol=1e-6)
    errors = (tmp_path / "p.errors.csv").read_text()
    printed = "".join(capsys.readouterr())
    assert "input 1 of 2 under --images" in errors
    assert "MRN777" not in errors and "MRN777" not in printed and "--on-error" not in errors + printed


def test_predict_refuses_a_model_without_recorded_preprocessing(tmp_path):
    """No record in the checkpoint and no cache here: predict says so instead of guessing from the prepare config."""
    from pipeline.checkpoint import load_checkpoint, save_checkpoint
    from pipeline.errors import PipelineError
    from pipeline.predict import run_predict

    cache = evalkit.build_cache(tmp_path / "cache", seed=5)
    run_dir = evalkit.make_run(cache, tmp_path / "runs", None, steps=1, mlflow_run=False)
    cache.rename(tmp_path / "elsewhere")
    for ckpt in run_dir.glob("*.pt"):
        save_checkpoint(ckpt, dataclasses.replace(load_checkpoint(ckpt), preprocessing=None))  # nothing to record again
        assert load_checkpoint(ckpt).preprocessing is None
    Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(PipelineError, match=r"does not record how its training cache decoded images"):
        run_predict(str(run_dir), tmp_path / "a.png", out_csv=tmp_path / "p.csv")
