"""Tests for pipeline.geometry_stage: the `ecl geometry` paths (the section itself: test_geometry_report.py)."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest

from pipeline import geometry
from pipeline.errors import ConfigError
from pipeline.cli import main as ecl_main
from pipeline.geometry_stage import run_geometry

import _evalkit as evalkit  # noqa: E402  registered by conftest.py

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_synthetic = evalkit.synthetic_features


def test_run_geometry_counts_prints_and_writes_png(tmp_path, capsys) -> None:
    out = run_geometry(class_counts=[1000, 1000, 10, 10], temperature=10.0, out_dir=tmp_path,
                       class_names=["nevus", "mel", "df", "vasc"])
    printed = capsys.readouterr().out
    want = geometry.minority_collapse_threshold(2, 2, negatives=1, temperature=10.0)
    assert out["threshold"] == pytest.approx(want)
    assert 1 < out["threshold"] < 100 and out["ratio"] == pytest.approx(100.0)
    assert out["collapse_predicted"] is True and out["b_star"] == 1.0
    assert out["rare_cosines"]["df~vasc"] == pytest.approx(1.0, abs=1e-3)
    assert f"R* = {want:.4g}" in printed and "df~vasc: 1.000" in printed
    assert "predicts collapse of its rarest classes (df, vasc)" in printed
    png = (tmp_path / "geometry-optimal-gram.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and out["figure"] == str(tmp_path / "geometry-optimal-gram.png")
    gram = np.array(out["optimal_gram"])
    np.testing.assert_allclose(np.diag(gram), 1.0)


def test_run_geometry_counts_no_collapse_sentence(tmp_path, capsys) -> None:
    out = run_geometry(class_counts=[300, 200, 100, 50], temperature=0.1, out_dir=tmp_path)
    assert out["threshold"] == math.inf and out["collapse_predicted"] is False
    assert "No minority collapse is predicted" in capsys.readouterr().out


def test_run_geometry_two_level_prints_bstar_and_threshold(capsys) -> None:
    out = run_geometry(majority=3, minority=3, ratio=50.0, temperature=10.0)
    printed = capsys.readouterr().out
    want = geometry.minority_collapse_threshold(3, 3, negatives=1, temperature=10.0)
    assert out["threshold"] == pytest.approx(want) and out["b_star"] == 1.0
    assert f"R* (minority collapse threshold): {want:.4g}" in printed
    grid = run_geometry(majority=3, minority=3, temperature=10.0)["b_star_by_ratio"]
    assert grid[1.0] == pytest.approx(-0.2, abs=1e-6) and grid[1000.0] == 1.0


def test_run_geometry_conflicting_arguments_config_error() -> None:
    with pytest.raises(ConfigError, match=r"give exactly one of --counts.*; got --counts and --majority/--minority"):
        run_geometry(class_counts=[3, 1], majority=2, minority=2)
    with pytest.raises(ConfigError, match="give exactly one of"):
        run_geometry()
    with pytest.raises(ConfigError, match=r"classes \['b'\] have no training samples"):
        run_geometry(class_counts=[3, 0, 1], class_names=["a", "b", "c"])
    with pytest.raises(ConfigError, match="at least two minority classes"):
        run_geometry(majority=3, minority=1)
    with pytest.raises(ConfigError, match="--tau must be > 0"):
        run_geometry(majority=3, minority=2, temperature=0.0)


def test_main_bad_arguments_exit_status_2(capsys) -> None:
    assert ecl_main(["geometry", "--counts", "5,0,2"]) == 2
    assert "have no training samples" in capsys.readouterr().err


def test_run_geometry_run_ref_uses_contracts_and_writes_pngs(monkeypatch, tmp_path, capsys) -> None:
    """The --run path with the model loader and the split prediction replaced by stand-ins."""
    import types

    import data_prep
    import pipeline.checkpoint as checkpoint_mod
    import pipeline.inference as inference_mod

    h, z, y, weight, protos = _synthetic([30, 20, 10, 10], d=6, spread=0.2, seed=2)
    y_run = y.copy()
    y_run[::7] = -1  # unlabelled images must be dropped

    cfg = types.SimpleNamespace(data=types.SimpleNamespace(cache="cache-dir"),
                                eval=types.SimpleNamespace(batch_size=16))
    trained = types.SimpleNamespace(network="net", config=cfg, class_names=["a", "b", "c", "d"],
                                    class_counts=[300, 200, 20, 10], run_id="abc123")
    seen = {}

    def load_trained_model(ref, device="cpu", tracking_uri=None):
        seen["ref"] = ref
        return trained

    def predict_split(network, cache, split, data_cfg, batch_size, device="cpu", features=False):
        seen["split"], seen["cache"] = split, cache
        assert network == "net" and features
        return inference_mod.Predictions(
            logits=h[:, :4], labels=y_run, rows=np.arange(len(y_run)), h=h, z=h[:, :3] / np.linalg.norm(
                h[:, :3], axis=1, keepdims=True), weight=weight, prototypes=protos[:, :3])

    monkeypatch.setattr(checkpoint_mod, "load_trained_model", load_trained_model)
    monkeypatch.setattr(inference_mod, "predict_split", predict_split)
    monkeypatch.setattr(data_prep, "open_cache", lambda path: f"opened:{path}", raising=False)

    out = run_geometry(run_ref="runs/x", split="val", out_dir=tmp_path)
    assert seen == {"ref": "runs/x", "split": "val", "cache": "opened:cache-dir"}
    keep = y_run >= 0
    direct = geometry.measure_geometry(h[keep], y_run[keep], weight, [300, 200, 20, 10],
                                       geometry.optimal_gram(np.array([300, 200, 20, 10.0]), 1, 0.1)[0])
    assert out["metrics"]["backbone/FC"] == pytest.approx(direct["FC"], rel=1e-6)
    assert out["metrics"]["backbone/self_duality"] == pytest.approx(direct["self_duality"], rel=1e-6)
    for path in out["figures"].values():
        assert Path(path).read_bytes().startswith(PNG_SIGNATURE)
    assert (tmp_path / "geometry-val-gram-projection.png").exists()
    assert "Learned geometry of runs/x on the val split" in capsys.readouterr().out


def test_run_geometry_of_a_trained_run_matches_measure_geometry(tmp_path):
    """`ecl geometry --run` on a real checkpoint (not stand-ins): learned metrics and heat maps."""
    from pathlib import Path

    import torch

    from data_prep import open_cache
    from pipeline.checkpoint import load_trained_model
    from pipeline.data import create_eval_loader
    from pipeline.geometry import measure_geometry
    from pipeline.models import model_data_config
    from pipeline.geometry_stage import run_geometry

    cache_dir = evalkit.build_cache(tmp_path / "cache")
    run_dir = evalkit.make_run(cache_dir, tmp_path / "runs", None, steps=4, mlflow_run=False)

    result = run_geometry(run_ref=str(run_dir), split="val", out_dir=tmp_path / "geo")
    pngs = sorted(p.name for p in (tmp_path / "geo").glob("*.png"))
    assert pngs and all((tmp_path / "geo" / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in pngs)

    model = load_trained_model(run_dir)
    cache = open_cache(cache_dir)
    feats, labels = [], []
    with torch.no_grad():
        for x, y, _ in create_eval_loader(cache, "val", model.config.data, model_data_config(model.network), 64):
            feats.append(model.network(x, return_all=True)["h"])
            labels.append(y)
    h = torch.cat(feats).numpy()
    y = torch.cat(labels).numpy()
    direct = measure_geometry(h, y, classifier_weight=model.network(torch.zeros(1, 3, 32, 32), return_all=True)["weight"].detach().numpy())
    metrics = result["metrics"] if "metrics" in result else result
    flat = {k.split("/", 1)[-1]: v for k, v in metrics.items() if isinstance(v, float) and k.startswith("backbone/")}
    assert flat, metrics.keys()
    for key in ("FC", "MS", "SD", "NC1"):
        assert flat[key] == pytest.approx(direct[key], rel=1e-4)


def test_run_geometry_of_a_run_without_projection_head(tmp_path):
    """ce/la runs have no projection head: only backbone geometry, and no projection claims."""
    from pathlib import Path

    import torch

    from pipeline.checkpoint import BEST, load_checkpoint, save_checkpoint
    from pipeline.config import RunConfig
    from pipeline.models import create_network

    cache_dir = evalkit.build_cache(tmp_path / "cache")
    run_dir = evalkit.make_run(cache_dir, tmp_path / "runs", None, steps=2, mlflow_run=False)
    ckpt = load_checkpoint(run_dir / BEST)
    net = create_network(RunConfig.model_validate(ckpt.config).model, len(ckpt.class_names), proj_head=False)
    net.load_state_dict({k: v for k, v in ckpt.model.items() if k in net.state_dict()})
    save_checkpoint(run_dir / BEST, dataclasses.replace(ckpt, model=net.state_dict(), proj_head=False))
    assert torch.load(run_dir / BEST, weights_only=True)["proj_head"] is False

    result = run_geometry(run_ref=str(run_dir), split="test", out_dir=tmp_path / "geo")
    assert "backbone/FC" in result["metrics"]
    assert not any(k.startswith(("projection/", "optimum/")) for k in result["metrics"])
    assert result["sentences"][-1].startswith("This network has no projection head")
    assert sorted(p.name for p in (tmp_path / "geo").glob("*.png")) == ["geometry-test-gram-backbone.png"]


def test_cli_accepts_both_count_spellings_and_class_names(tmp_path, capsys) -> None:
    from pipeline.cli import main as ecl_main

    for flag in ("--counts", "--class-counts"):
        out = tmp_path / flag.strip("-")
        assert ecl_main(["geometry", flag, "900,90,10", "--class-names", "NV,MEL,DF", "--tau", "0.07",
                         "--out", str(out)]) == 0
        printed = capsys.readouterr().out
        assert "NV" in printed and "DF" in printed and "verified:" in printed
        assert (out / "geometry-optimal-gram.png").read_bytes().startswith(PNG_SIGNATURE)
        assert ecl_main(["geometry", flag, "900,90,10", "--class-names", "NV,MEL,DF", "--out", str(out)]) == 0
        assert "NV" in capsys.readouterr().out
    assert ecl_main(["geometry", "--counts", "900,90", "--class-names", "NV,MEL,DF"]) == 2
    assert "got 3 class names for 2 classes" in capsys.readouterr().err
