"""Checkpoints: atomic weights-only files, the three model references, temperature storage."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from pipeline import tracking
from pipeline.checkpoint import (
    BEST, load_checkpoint, load_trained_model, resolve_checkpoint, save_checkpoint, set_temperature,
)
from pipeline.config import load_config, public_config
from pipeline.errors import PipelineError
from pipeline.models import create_network

CLASSES = ["MEL", "NV", "BCC"]


def _write_run(run_dir: Path, seed: int = 0) -> tuple[torch.nn.Module, Path]:
    """A run folder as `ecl train` leaves it: config.yaml and checkpoint-best.pt of a random network."""
    cfg = load_config(None, ["model.backbone=test_resnet", "method.name=ecl", "prepare.salt=secret"])
    torch.manual_seed(seed)
    net = create_network(cfg.model, len(CLASSES), proj_head=True).eval()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text("placeholder: written by save_config in real runs\n")
    state = {"model": net.state_dict(), "config": public_config(cfg), "class_names": CLASSES,
             "class_counts": [5, 30, 3], "temperature": 1.0, "mlflow_run_id": None, "proj_head": True,
             "rng": {"torch": torch.get_rng_state()}, "epoch": 4}
    save_checkpoint(run_dir / BEST, state)
    return net, run_dir / BEST


def _same_outputs(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        return torch.equal(a(x), b(x))


def test_save_is_atomic_and_load_is_weights_only(tmp_path):
    net, path = _write_run(tmp_path / "run")
    state = load_checkpoint(path)
    assert state["class_names"] == CLASSES and state["epoch"] == 4
    assert state["config"]["prepare"]["salt"] == "<redacted>"  # the salt never reaches a checkpoint
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []  # no temp files left
    # an object that needs code to unpickle is refused by weights_only loading
    torch.save({"model": {}, "config": {}, "evil": Path("x")}, tmp_path / "evil.pt")
    with pytest.raises(PipelineError, match="evil.pt"):
        load_checkpoint(tmp_path / "evil.pt")


def test_failed_save_keeps_previous_checkpoint(tmp_path):
    _, path = _write_run(tmp_path / "run")
    before = path.read_bytes()

    class Boom:
        def __reduce__(self):
            raise KeyboardInterrupt  # a kill in the middle of torch.save

    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"model": {}, "config": {}, "x": Boom()})
    assert path.read_bytes() == before


def test_truncated_checkpoint_is_pipeline_error(tmp_path):
    _, path = _write_run(tmp_path / "run")
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(PipelineError, match="not a readable checkpoint"):
        load_checkpoint(path)


def test_load_trained_model_from_file_and_run_folder(tmp_path):
    net, path = _write_run(tmp_path / "run")
    for ref in (path, tmp_path / "run", str(tmp_path / "run")):
        tm = load_trained_model(ref)
        assert not tm.network.training
        assert tm.class_names == CLASSES and tm.class_counts == [5, 30, 3] and tm.temperature == 1.0
        assert tm.checkpoint_path == path and tm.run_dir == tmp_path / "run"
        assert tm.config.model.backbone == "test_resnet"
        assert _same_outputs(net, tm.network)


def test_load_trained_model_from_mlflow_run_id_downloads_when_folder_absent(tmp_path):
    net, path = _write_run(tmp_path / "run")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with tracking.start_run(uri, "ckpt-test", tags={"ecl.run_dir": str(tmp_path / "run")}) as run_id:
        tracking.log_artifact(path, artifact_path="checkpoints")
    local = load_trained_model(run_id, tracking_uri=uri)
    assert local.checkpoint_path == path and local.run_id == run_id  # the folder exists: used directly
    moved = tmp_path / "elsewhere"
    (tmp_path / "run").rename(moved)
    remote = load_trained_model(f"runs:/{run_id}", tracking_uri=uri)
    assert remote.checkpoint_path != path and remote.checkpoint_path.name == BEST
    assert remote.run_id == run_id and _same_outputs(net, remote.network)


def test_missing_reference_is_pipeline_error_naming_it(tmp_path):
    with pytest.raises(PipelineError, match="no-such-model"):
        load_trained_model(tmp_path / "no-such-model")
    (tmp_path / "empty-run").mkdir()
    with pytest.raises(PipelineError, match="empty-run"):
        resolve_checkpoint(tmp_path / "empty-run")
    with pytest.raises(PipelineError, match="0123456789abcdef0123456789abcdef"):
        load_trained_model("0123456789abcdef0123456789abcdef", tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")


def test_set_temperature_rewrites_checkpoint(tmp_path):
    _, path = _write_run(tmp_path / "run")
    set_temperature(path, 1.7)
    assert load_trained_model(path).temperature == pytest.approx(1.7)
    assert load_checkpoint(path)["epoch"] == 4  # everything else kept
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(PipelineError, match="temperature"):
            set_temperature(path, bad)
    assert load_trained_model(path).temperature == pytest.approx(1.7)


def test_calibration_fitted_for_older_weights_is_not_applied(tmp_path, capsys):
    """calibration.json records the checkpoint it was fitted for; new weights since -> T = 1, with a warning."""
    from pipeline.checkpoint import CALIBRATION, write_calibration

    _, path = _write_run(tmp_path / "run")
    write_calibration(path.parent, 0.6, fitted_on="val", checkpoint=path)
    assert load_trained_model(path).temperature == pytest.approx(0.6)
    record = json.loads((path.parent / CALIBRATION).read_text())
    assert record["checkpoint_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    state = load_checkpoint(path)
    state["epoch"] = 5  # `train --resume` wrote a new best checkpoint after evaluation
    save_checkpoint(path, state)
    capsys.readouterr()
    assert load_trained_model(path).temperature == pytest.approx(state.get("temperature", 1.0))
    assert "fitted for an earlier" in capsys.readouterr().err
