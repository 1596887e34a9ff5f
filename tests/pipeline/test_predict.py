"""Tests of `ecl predict` (pipeline/predict.py): calibrated probabilities, ISIC CSV, unreadable files."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

_spec = importlib.util.spec_from_file_location("_evalkit", Path(__file__).with_name("_evalkit.py"))
evalkit = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(evalkit)


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
    """The logits the training preprocessing gives, computed independently of run_predict."""
    from data_prep import load_image_file
    from pipeline.checkpoint import load_trained_model
    from pipeline.data import eval_transform
    from pipeline.models import model_data_config

    tm = load_trained_model(run_dir)
    cfg = tm.config
    t = eval_transform(cfg.data, model_data_config(tm.network))
    x = torch.stack([t(load_image_file(f, short_side=cfg.prepare.short_side,
                                       color_constancy=cfg.prepare.color_constancy)) for f in files])
    with torch.no_grad():
        return tm.network(x).double().numpy()


def test_predict_uses_stored_temperature(model_and_images, tmp_path):
    from scipy.special import softmax

    from pipeline.checkpoint import BEST, set_temperature
    from pipeline.predict import run_predict

    run_dir, images = model_and_images
    set_temperature(run_dir / BEST, 2.5)
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
