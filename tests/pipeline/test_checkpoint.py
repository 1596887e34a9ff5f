"""Checkpoints: the typed format and its older layout, atomic weights-only files, the model references."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
import torch

from pipeline import tracking
from pipeline.checkpoint import (
    BEST, CHECKPOINT_FORMAT, Checkpoint, load_checkpoint, load_trained_model, resolve_checkpoint, save_checkpoint,
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
    ckpt = Checkpoint(model=net.state_dict(), config=public_config(cfg), class_names=CLASSES, class_counts=[5, 30, 3],
                      proj_head=True, rng={"torch": torch.get_rng_state()}, epoch=4)
    save_checkpoint(run_dir / BEST, ckpt)
    return net, run_dir / BEST


def _same_outputs(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        return torch.equal(a(x), b(x))


def test_save_is_atomic_and_load_is_weights_only(tmp_path):
    net, path = _write_run(tmp_path / "run")
    ckpt = load_checkpoint(path)
    assert ckpt.class_names == CLASSES and ckpt.epoch == 4 and ckpt.format_version == CHECKPOINT_FORMAT
    assert ckpt.config["prepare"]["salt"] == "<redacted>"  # the salt never reaches a checkpoint
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
        save_checkpoint(path, Checkpoint(model={"x": Boom()}, config={}, class_names=[], class_counts=[]))
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


def _format1_dict(net: torch.nn.Module, temperature: float) -> dict:
    """A checkpoint exactly as train.py wrote it before the format was typed (no format_version)."""
    cfg = load_config(None, ["model.backbone=test_resnet", "method.name=ecl"])
    return {"model": net.state_dict(), "optimizer": {"state": {}, "param_groups": []}, "scheduler": {}, "scaler": {},
            "method_state": {"name": "ecl"}, "epoch": 2, "rng": {"torch": torch.get_rng_state()}, "sampler_epoch": 3,
            "config": public_config(cfg), "class_names": CLASSES, "class_counts": [5, 30, 3], "best_val_bacc": 0.5,
            "temperature": temperature, "mlflow_run_id": "a" * 32, "tracking_uri": "sqlite:///x.db",
            "dataset_sha256": "d" * 64, "manifest_sha256": "m" * 64, "proj_head": True, "parent_run": None}


def test_format1_dict_checkpoint_still_loads(tmp_path):
    """A checkpoint of today's dict layout (torch.save of a plain dict) reads into the typed Checkpoint."""
    net, path = _write_run(tmp_path / "run")
    torch.save(_format1_dict(net, 1.0), path)
    ckpt = load_checkpoint(path)
    assert ckpt.format_version == CHECKPOINT_FORMAT and ckpt.epoch == 2 and ckpt.best_val_bacc == 0.5
    assert ckpt.class_names == CLASSES and ckpt.class_counts == [5, 30, 3]
    assert ckpt.mlflow_run_id == "a" * 32 and ckpt.tracking_uri == "sqlite:///x.db" and ckpt.parent_run is None
    assert ckpt.legacy_temperature is None  # T = 1 is no calibration
    assert "sampler_epoch" not in ckpt.to_dict() and "temperature" not in ckpt.to_dict()
    tm = load_trained_model(path)
    assert tm.run_id == "a" * 32 and tm.temperature == 1.0 and _same_outputs(net, tm.network)
    # a T stored by the retired set_temperature still calibrates, and survives a round trip
    torch.save(_format1_dict(net, 1.7), path)
    assert load_trained_model(path).temperature == pytest.approx(1.7)
    save_checkpoint(tmp_path / "again.pt", load_checkpoint(path))
    assert torch.load(tmp_path / "again.pt", weights_only=True)["temperature"] == pytest.approx(1.7)


def test_defaults_are_filled_in_one_place_and_to_dict_round_trips(tmp_path):
    net, path = _write_run(tmp_path / "run")
    minimal = Checkpoint.from_dict({"model": {}, "config": {}})
    assert (minimal.class_names, minimal.class_counts, minimal.epoch, minimal.best_val_bacc, minimal.proj_head,
            minimal.optimizer, minimal.mlflow_run_id) == ([], [], 0, -1.0, True, None, None)
    ckpt = load_checkpoint(path)
    again = Checkpoint.from_dict(ckpt.to_dict())
    assert {f.name for f in dataclasses.fields(Checkpoint)} - {"legacy_temperature"} == set(ckpt.to_dict())
    assert again.model.keys() == ckpt.model.keys() and again.epoch == ckpt.epoch
    with pytest.raises(dataclasses.FrozenInstanceError):
        ckpt.epoch = 9  # type: ignore[misc]


def test_newer_or_foreign_checkpoint_is_refused_naming_the_file(tmp_path):
    torch.save({"model": {}, "config": {}, "format_version": CHECKPOINT_FORMAT + 1}, tmp_path / "future.pt")
    with pytest.raises(PipelineError, match=rf"future\.pt has checkpoint format {CHECKPOINT_FORMAT + 1}.*Upgrade"):
        load_checkpoint(tmp_path / "future.pt")
    torch.save({"weights": {}}, tmp_path / "other.pt")
    with pytest.raises(PipelineError, match=r"other\.pt is not a checkpoint written by `ecl train`"):
        load_checkpoint(tmp_path / "other.pt")


def test_calibration_fitted_for_older_weights_is_not_applied(tmp_path, capsys):
    """calibration.json records the checkpoint it was fitted for; new weights since -> T = 1, with a warning."""
    from pipeline.checkpoint import CALIBRATION, write_calibration

    _, path = _write_run(tmp_path / "run")
    write_calibration(path.parent, 0.6, fitted_on="val", checkpoint=path)
    assert load_trained_model(path).temperature == pytest.approx(0.6)
    record = json.loads((path.parent / CALIBRATION).read_text())
    assert record["checkpoint_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    # `train --resume` wrote a new best checkpoint after evaluation
    save_checkpoint(path, dataclasses.replace(load_checkpoint(path), epoch=5))
    capsys.readouterr()
    assert load_trained_model(path).temperature == 1.0
    assert "fitted for an earlier" in capsys.readouterr().err
