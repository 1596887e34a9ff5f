"""Training engine: run folder, MLflow logging, exact resume, NaN stop, init_from, DDP launch."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import _evalkit as evalkit  # registered by conftest.py
from pipeline import tracking
from pipeline.checkpoint import BEST, CHECKPOINT_FORMAT, LAST, load_checkpoint
from pipeline.config import load_config
from pipeline.errors import PipelineError
from pipeline.train import (
    _heads_used, _init_from, _resume_config, cosine_with_warmup, rng_state, run_train, set_rng_state,
)

REPO = Path(__file__).resolve().parents[2]
EPOCHS, STEPS = 3, 2


def make_cache(out: Path, counts=(12, 8, 8), size: int = 36, seed: int = 0, names=None) -> Path:
    """A tiny dermoscopy-like cache: class k brightens colour channel k; every 4th image is val/test."""
    rng = np.random.default_rng(seed)
    names = names or [f"C{k}" for k in range(len(counts))]
    images, rows = [], []
    for k, n in enumerate(counts):
        for i in range(n):
            im = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
            im[..., k % 3] += 150
            images.append(im)
            split = "train" if n < 4 else ["train", "train", "val", "test"][i % 4]
            rows.append(dict(image=f"img{k}_{i}", label=names[k], split=split, group=f"g{k}_{i}"))
    return evalkit.write_cache(out, images, pd.DataFrame(rows), list(names), build_key=f"{seed:032d}")


def tiny_cfg(cache: Path, out: Path, run_name: str, *extra: str):
    return load_config(None, [
        f"data.cache={cache}", "data.image_size=32", "data.num_workers=0", "data.pin_memory=false",
        "model.backbone=test_resnet", "method.name=ecl", f"train.epochs={EPOCHS}", "train.batch_size=6",
        f"train.max_steps_per_epoch={STEPS}", "train.warmup_epochs=1", "train.lr=0.05", "train.device=cpu",
        f"train.output_dir={out}", f"train.run_name={run_name}", f"tracking.uri=sqlite:///{out / 'mlflow.db'}",
        "tracking.experiment=test-train", "eval.batch_size=16", *extra,
    ])


class _Faulty:
    """Wraps a Method; on its `at`-th training call runs `action(result)` (interrupt or poison)."""

    def __init__(self, inner, at: int, action):
        self.inner, self.at, self.action, self.calls = inner, at, action, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, out, labels):
        result = self.inner(out, labels)
        if torch.is_grad_enabled():
            self.calls += 1
            if self.calls == self.at:
                return self.action(result)
        return result


def _inject(monkeypatch, at: int, action) -> None:
    import pipeline.registry as registry

    real = registry.create_method
    monkeypatch.setattr(registry, "create_method", lambda *a, **k: _Faulty(real(*a, **k), at, action))


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train")


@pytest.fixture(scope="module")
def cache(work) -> Path:
    return make_cache(work / "cache")


@pytest.fixture(scope="module")
def full_run(work, cache):
    """One uninterrupted ECL run with real MLflow logging (model included); shared by several tests."""
    return run_train(tiny_cfg(cache, work / "runs", "full"), register="ecl-test-model")


# ------------------------------------------------------------------------------------ run folder
def test_run_folder_holds_config_metrics_and_checkpoints(full_run):
    run_dir = full_run.run_dir
    assert (run_dir / "config.yaml").is_file()
    assert load_config(run_dir / "config.yaml").train.epochs == EPOCHS  # the saved config reloads
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert list(metrics["epoch"]) == list(range(EPOCHS))
    for col in ["train/loss", "train/loss/lc", "train/loss/bc", "train/loss/cc", "train/weight/lc", "train/lr",
                "train/balanced_accuracy", "val/balanced_accuracy", "train/throughput"]:
        assert col in metrics.columns, col
    # ECL's anchored normalisation: L_LC keeps weight 1; epoch 0 trains the others at base/alpha, later
    # epochs at (base/alpha) * mean(L_LC) / mean(term) over epoch 0
    lc, bc, cc = (metrics[f"train/loss/{t}"][0] for t in ("lc", "bc", "cc"))
    assert list(metrics["train/weight/lc"]) == [1.0] * EPOCHS
    assert metrics["train/weight/bc"][0] == pytest.approx(0.3 / 0.7, rel=1e-12)
    assert metrics["train/weight/bc"][1] == pytest.approx((0.3 / 0.7) * lc / bc, rel=1e-5)
    assert metrics["train/weight/cc"][1] == pytest.approx((0.5 / 0.7) * lc / cc, rel=1e-5)
    # the total is the weighted sum of the logged terms
    assert metrics["train/loss"][0] == pytest.approx(lc + (0.3 / 0.7) * bc + (0.5 / 0.7) * cc, rel=1e-5)
    # cosine schedule with one warm-up epoch: after the last step the factor is 0
    assert metrics["train/lr"].iloc[-1] == pytest.approx(0.0, abs=1e-12)
    assert metrics["train/lr"][0] == pytest.approx(0.05)
    last = load_checkpoint(run_dir / LAST)
    best = load_checkpoint(run_dir / BEST)
    assert last.epoch == EPOCHS - 1
    assert best.best_val_bacc == pytest.approx(max(metrics["val/balanced_accuracy"]))
    assert best.epoch == int(np.argmax(metrics["val/balanced_accuracy"].to_numpy()))  # first best kept
    assert last.class_names == ["C0", "C1", "C2"] and last.class_counts == [6, 4, 4]
    assert last.legacy_temperature is None and last.mlflow_run_id == full_run.run_id
    for key in ["optimizer", "scheduler", "scaler", "method_state", "rng", "config",
                "dataset_sha256", "manifest_sha256", "tracking_uri"]:
        assert getattr(last, key) is not None, key
    assert last.format_version == CHECKPOINT_FORMAT


def test_mlflow_run_has_params_metrics_tags_artifacts_and_model(full_run, cache):
    from data_prep import open_cache

    run = tracking.get_run(full_run.tracking_uri, full_run.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["method.name"] == "ecl" and run.data.params["train.epochs"] == str(EPOCHS)
    metrics = pd.read_csv(full_run.run_dir / "metrics.csv")
    assert run.data.metrics["train/loss"] == pytest.approx(metrics["train/loss"].iloc[-1])
    for key in ["train/loss/bc", "train/weight/cc", "train/lr", "train/balanced_accuracy", "val/balanced_accuracy",
                "train/throughput"]:
        assert key in run.data.metrics, key
    c = open_cache(cache)
    tags = run.data.tags
    assert tags["ecl.method"] == "ecl" and tags["seed"] == "0" and tags["device"] == "cpu"
    assert tags["ecl.dataset_sha256"] == c.dataset_sha256 and tags["ecl.manifest_sha256"] == c.manifest_sha256
    assert Path(tags["ecl.run_dir"]) == full_run.run_dir.resolve()
    assert tags["torch_version"] == torch.__version__
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=full_run.tracking_uri)
    assert [a.path for a in client.list_artifacts(full_run.run_id, "checkpoints")] == ["checkpoints/checkpoint-best.pt"]
    versions = client.search_model_versions("name='ecl-test-model'")
    assert len(versions) == 1 and versions[0].run_id == full_run.run_id
    # the logged model gives the raw logits of the best checkpoint
    from pipeline.checkpoint import load_trained_model

    model = mlflow.pytorch.load_model(f"models:/ecl-test-model/{versions[0].version}")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = load_trained_model(full_run.run_dir).network(x)
        assert torch.allclose(model(x), expected, atol=1e-5)


# ------------------------------------------------------------------------------------ resume
def test_resume_after_interrupt_ends_with_identical_weights(full_run, work, cache, monkeypatch):
    import pipeline.train as train_mod

    monkeypatch.setattr(train_mod, "_log_final_model", lambda *a, **k: None)  # 9 s each; tested above

    def interrupt(result):
        raise KeyboardInterrupt

    _inject(monkeypatch, STEPS + 2, interrupt)  # epoch 2, step 2: one optimizer step past the checkpoint
    cfg = tiny_cfg(cache, work / "runs", "killed")
    with pytest.raises(KeyboardInterrupt):
        run_train(cfg)
    run_dir = work / "runs" / "killed"
    assert load_checkpoint(run_dir / LAST).epoch == 0
    assert len(pd.read_csv(run_dir / "metrics.csv")) == 1
    monkeypatch.undo()
    monkeypatch.setattr(train_mod, "_log_final_model", lambda *a, **k: None)

    resumed = run_train(load_config(), resume=str(run_dir))  # no config given: the run's own is used
    a = load_checkpoint(full_run.run_dir / LAST)
    b = load_checkpoint(resumed.run_dir / LAST)
    assert b.epoch == EPOCHS - 1
    assert a.model.keys() == b.model.keys()
    for k in a.model:
        assert torch.equal(a.model[k], b.model[k]), k
    for k, sa in a.optimizer["state"].items():
        assert torch.equal(sa["momentum_buffer"], b.optimizer["state"][k]["momentum_buffer"])
    assert a.method_state == b.method_state
    ma, mb = pd.read_csv(full_run.run_dir / "metrics.csv"), pd.read_csv(resumed.run_dir / "metrics.csv")
    cols = [c for c in ma.columns if not c.endswith(("throughput", "seconds"))]
    pd.testing.assert_frame_equal(ma[cols], mb[cols])
    # the same MLflow run was re-opened and finished
    assert resumed.run_id == b.mlflow_run_id == load_checkpoint(run_dir / LAST).mlflow_run_id
    assert tracking.get_run(resumed.tracking_uri, resumed.run_id).info.status == "FINISHED"


def test_resume_of_a_finished_run_does_not_log_the_model_again(full_run, capsys):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=full_run.tracking_uri)
    before = client.search_logged_models(experiment_ids=[client.get_run(full_run.run_id).info.experiment_id])
    again = run_train(load_config(full_run.run_dir / "config.yaml"), resume=str(full_run.run_dir))
    assert again.run_id == full_run.run_id
    assert "already logged; not logging it again" in capsys.readouterr().out
    after = client.search_logged_models(experiment_ids=[client.get_run(full_run.run_id).info.experiment_id])
    assert len(after) == len(before)


def test_resume_config_honours_epochs_and_ignores_other_keys():
    saved = load_config(None, ["train.epochs=3", "train.lr=0.05", "data.cache=/c"])
    cfg, notices = _resume_config(load_config(None, ["train.epochs=5", "train.lr=0.2"]), saved)
    assert cfg.train.epochs == 5 and cfg.train.lr == 0.05 and cfg.data.cache == "/c"
    assert any("train.lr" in n for n in notices) and any("3 -> 5" in n for n in notices)
    same, quiet = _resume_config(load_config(), saved)  # nothing asked: the saved config, no notices
    assert same == saved and quiet == []


def test_resume_without_checkpoint_is_pipeline_error(tmp_path):
    with pytest.raises(PipelineError, match=str(tmp_path)):
        run_train(load_config(), resume=str(tmp_path))


def test_new_run_refuses_an_existing_run_folder(full_run, work, cache):
    with pytest.raises(PipelineError, match="--resume"):
        run_train(tiny_cfg(cache, work / "runs", "full"))


def test_a_run_killed_before_its_first_checkpoint_can_be_run_again(work, cache):
    """config.yaml written, no checkpoint (killed in epoch 0): the same command starts it afresh."""
    from pipeline.config import save_config

    cfg = tiny_cfg(cache, work / "runs", "killed-early", "train.epochs=1")
    run_dir = work / "runs" / "killed-early"
    run_dir.mkdir(parents=True)
    save_config(cfg, run_dir / "config.yaml")
    with pytest.raises(PipelineError, match="never finished an epoch"):
        run_train(cfg, resume=str(run_dir))
    result = run_train(cfg)
    assert result.run_dir == run_dir and (run_dir / LAST).is_file()


# ------------------------------------------------------------------------------------ failures
def test_nonfinite_loss_stops_naming_epoch_step_and_term(work, cache, monkeypatch):
    import pipeline.train as train_mod

    monkeypatch.setattr(train_mod, "_log_final_model", lambda *a, **k: None)

    def poison(result):
        terms = dict(result.terms, bc=result.terms["bc"] * float("nan"))
        return type(result)(total=result.total + terms["bc"], terms=terms)

    _inject(monkeypatch, STEPS + 1, poison)  # epoch 2, step 1
    with pytest.raises(PipelineError) as err:
        run_train(tiny_cfg(cache, work / "runs", "nan"))
    msg = str(err.value)
    assert "epoch 2" in msg and "step 1" in msg and "non-finite: total, bc" in msg
    last = load_checkpoint(work / "runs" / "nan" / LAST)  # the last good checkpoint survives
    assert last.epoch == 0
    assert all(torch.isfinite(v).all() for v in last.model.values() if v.is_floating_point())


def test_nonfinite_loss_is_checked_every_n_steps_and_names_the_first_bad_step(work, cache, monkeypatch):
    """No per-step host sync: the poisoned step 3 is found at the check after step 5, and named."""
    import pipeline.train as train_mod

    monkeypatch.setattr(train_mod, "_log_final_model", lambda *a, **k: None)
    calls = []

    def poison(result):
        calls.append(1)
        terms = dict(result.terms, lc=result.terms["lc"] * float("inf"))
        return type(result)(total=result.total + terms["lc"], terms=terms)

    import pipeline.registry as registry

    real = registry.create_method
    faulty = []
    monkeypatch.setattr(registry, "create_method", lambda *a, **k: faulty.append(_Faulty(real(*a, **k), 3, poison)) or faulty[-1])
    with pytest.raises(PipelineError) as err:
        run_train(tiny_cfg(cache, work / "runs", "nan-deferred", "train.batch_size=2", "train.max_steps_per_epoch=7",
                           "train.finite_check_every=5", "train.epochs=1"))
    msg = str(err.value)
    assert "epoch 1, step 3 " in msg and "non-finite: total, lc" in msg, msg
    assert calls == [1] and faulty[-1].calls == 5  # training went on to step 5, where the block was checked
    assert not (work / "runs" / "nan-deferred" / LAST).exists()  # no epoch finished: nothing written


def test_fixed_seed_and_thread_count_give_identical_weights(work, cache, monkeypatch):
    """Two runs with the same seed and train.threads end with bit-identical weights (and use those threads)."""
    import pipeline.train as train_mod

    monkeypatch.setattr(train_mod, "_log_final_model", lambda *a, **k: None)
    before = torch.get_num_threads()
    try:
        runs = [run_train(tiny_cfg(cache, work / "runs", f"threads-{i}", "train.epochs=2", "train.threads=2"))
                for i in range(2)]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    a, b = (load_checkpoint(r.run_dir / LAST).model for r in runs)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    tags = tracking.get_run(runs[0].tracking_uri, runs[0].run_id).data.tags
    assert tags["ecl.torch_threads"] == "2" and tags["ecl.num_workers"] == "0"


def test_missing_cache_is_one_line_error(tmp_path):
    with pytest.raises(PipelineError, match="does not exist"):
        run_train(tiny_cfg(tmp_path / "nope", tmp_path / "runs", "x"))


def test_class_without_training_images_is_named(tmp_path):
    cache = make_cache(tmp_path / "cache", counts=(12, 8, 2))  # class C2: 2 images, both "train"...
    df = pd.read_csv(cache / "manifest.csv")
    df.loc[df["label"] == "C2", "split"] = "test"  # ...moved to test: no C2 training image
    df.to_csv(cache / "manifest.csv", index=False)
    with pytest.raises(PipelineError, match=r"\['C2'\]"):
        run_train(tiny_cfg(cache, tmp_path / "runs", "x"))


# ------------------------------------------------------------------------------------ init_from
def test_init_from_loads_backbone_and_resets_classifier_for_new_classes(full_run, tmp_path):
    from pipeline.models import create_network

    cfg = tiny_cfg(tmp_path, tmp_path, "child")
    net = create_network(cfg.model, 4, proj_head=True)
    parent, notices = _init_from(net, str(full_run.run_dir), ["A", "B", "C", "D"], cfg, full_run.tracking_uri)
    best = load_checkpoint(full_run.run_dir / BEST).model
    own = net.state_dict()
    assert parent == full_run.run_id
    assert own["weight"].shape[0] == 4
    backbone = [k for k in best if k.startswith("backbone.")]
    assert backbone and all(torch.equal(own[k], best[k]) for k in backbone)
    assert all(torch.equal(own[k], best[k]) for k in best if k.startswith("projection."))
    assert any("re-initialised" in n for n in notices)
    # same number of classes, other names: classifier and prototype head are still fresh
    same_shape = create_network(cfg.model, 3, proj_head=True)
    _init_from(same_shape, str(full_run.run_dir), ["A", "B", "C"], cfg, full_run.tracking_uri)
    fresh = same_shape.state_dict()
    assert not torch.equal(fresh["weight"], best["weight"])
    assert all(not torch.equal(fresh[k], best[k]) for k in best if k.startswith("prototype_head.") and k.endswith("weight"))
    assert all(torch.equal(fresh[k], best[k]) for k in backbone)


def test_init_from_other_backbone_is_pipeline_error(full_run, tmp_path):
    from pipeline.models import create_network

    cfg = tiny_cfg(tmp_path, tmp_path, "child", "model.backbone=resnet10t")
    with pytest.raises(PipelineError, match="init_from"):
        _init_from(create_network(cfg.model, 3), str(full_run.run_dir), ["C0", "C1", "C2"], cfg, None)


def test_init_from_run_id_trains_and_tags_parent(full_run, work, cache, monkeypatch):
    import pipeline.train as train_mod

    monkeypatch.setattr(train_mod, "_log_final_model", lambda *a, **k: None)
    child = run_train(tiny_cfg(cache, work / "runs", "child", "train.epochs=1", f"train.init_from={full_run.run_id}"))
    assert tracking.get_run(child.tracking_uri, child.run_id).data.tags["ecl.parent_run"] == full_run.run_id


def test_init_from_registered_model_resolves_to_its_run(full_run, work, cache, monkeypatch):
    import pipeline.train as train_mod

    monkeypatch.setattr(train_mod, "_log_final_model", lambda *a, **k: None)
    child = run_train(tiny_cfg(cache, work / "runs", "child-registry", "train.epochs=1",
                               "train.init_from=models:/ecl-test-model/latest"))
    assert tracking.get_run(child.tracking_uri, child.run_id).data.tags["ecl.parent_run"] == full_run.run_id


def test_unknown_registered_model_is_pipeline_error(full_run):
    from pipeline.checkpoint import resolve_checkpoint

    with pytest.raises(PipelineError, match="registered model 'models:/no-such-model/1' was not found"):
        resolve_checkpoint("models:/no-such-model/1", full_run.tracking_uri)


def test_bf16_autocast_and_channels_last_train_on_cpu(work, cache, monkeypatch):
    """The GPU recipe's precision and memory-format paths, exercised on CPU (CUDA is not in CI)."""
    import pipeline.train as train_mod

    monkeypatch.setattr(train_mod, "_log_final_model", lambda *a, **k: None)
    run = run_train(tiny_cfg(cache, work / "runs", "bf16", "train.epochs=1", "train.amp=bf16",
                             "train.channels_last=true"))
    metrics = pd.read_csv(run.run_dir / "metrics.csv")
    assert np.isfinite(metrics[["train/loss", "train/loss/lc", "train/loss/bc", "train/loss/cc"]].to_numpy()).all()
    state = load_checkpoint(run.run_dir / LAST)
    assert all(torch.isfinite(v).all() for v in state.model.values() if v.is_floating_point())
    assert state.config["train"]["amp"] == "bf16"


# ------------------------------------------------------------------------------------ pieces
def test_cosine_with_warmup_factors():
    f = cosine_with_warmup(10, 2)
    assert [f(0), f(1)] == [0.5, 1.0]
    assert f(2) == pytest.approx(1.0)
    assert f(6) == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert f(10) == pytest.approx(0.0)


def test_rng_state_round_trips_through_weights_only_checkpoint(tmp_path):
    import random

    from pipeline.checkpoint import Checkpoint, save_checkpoint

    state = rng_state()
    save_checkpoint(tmp_path / "c.pt", Checkpoint(model={}, config={}, class_names=[], class_counts=[], rng=state))
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    set_rng_state(load_checkpoint(tmp_path / "c.pt").rng)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


# ------------------------------------------------------------------------------------ DDP
@pytest.mark.slow
@pytest.mark.parametrize("method", ["ecl", "supcon"])
def test_torchrun_two_processes_on_cpu(work, cache, tmp_path, method):
    """DDP without the unused-parameter search: every parameter of these methods' heads gets a gradient."""
    out = tmp_path / "runs"
    args = [f"method.name={method}", f"data.cache={cache}", "data.image_size=32", "data.num_workers=0", "model.backbone=test_resnet",
            "train.epochs=1", "train.batch_size=4", "train.max_steps_per_epoch=2", "train.device=cpu",
            f"train.output_dir={out}", "train.run_name=ddp", f"tracking.uri=sqlite:///{out / 'mlflow.db'}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
           "-m", "pipeline.train"] + [a for s in args for a in ("--set", s)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = load_checkpoint(out / "ddp" / LAST)
    assert ckpt.epoch == 0 and (out / "ddp" / BEST).is_file()
    assert tracking.get_run(ckpt.tracking_uri, ckpt.mlflow_run_id).data.tags["world_size"] == "2"
    assert any(k.startswith("prototype_head.") for k in ckpt.model) == (method == "ecl")


def test_heads_follow_the_methods_active_terms():
    from pipeline.registry import create_method

    counts = np.array([10, 5, 2])

    def heads(name, **kw):
        return _heads_used(create_method(load_config(base={"method": {"name": name, **kw}}).method, counts))

    assert heads("ecl") == {"classifier": True, "projection": True, "prototypes": True}
    assert heads("supcon") == {"classifier": True, "projection": True, "prototypes": False}
    assert heads("ce") == {"classifier": True, "projection": False, "prototypes": False}
    assert heads("supcon", beta=0.0)["projection"] is False  # a switched-off term leaves its head idle

    class Unknown:
        base_weights = {"mystery": 1.0}

    assert all(_heads_used(Unknown()).values())  # unknown terms: keep every head (safe)


def test_disk_full_while_training_is_one_line_and_the_mlflow_run_is_failed(cache, tmp_path, monkeypatch, capsys):
    """ENOSPC at the first checkpoint: `ecl train` prints one line (exit 2), the MLflow run ends FAILED."""
    import errno

    import data_prep.io as dio
    from mlflow import MlflowClient

    from pipeline.cli import main
    from pipeline.config import save_config

    cfg = tiny_cfg(cache, tmp_path / "runs", "full-disk", "train.epochs=1")
    save_config(cfg, tmp_path / "c.yaml")
    real = dio._create_temp

    def full(path):
        if path.name.startswith("checkpoint-"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path)

    monkeypatch.setattr(dio, "_create_temp", full)
    assert main(["train", "--config", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [x for x in err.splitlines() if "error" in x.lower()]  # progress bars aside, one line
    assert line.startswith("ecl train: error: cannot write ") and "checkpoint-" in line and "no space left on the device" in line
    runs = MlflowClient(tracking_uri=cfg.tracking.uri).search_runs(
        [MlflowClient(tracking_uri=cfg.tracking.uri).get_experiment_by_name("test-train").experiment_id],
        filter_string="attributes.run_name = 'full-disk'")
    assert [r.info.status for r in runs] == ["FAILED"]
    assert not [p for p in (tmp_path / "runs" / "full-disk").iterdir() if p.name.endswith(".ecl-tmp")]


# ------------------------------------------------------------------------------------ GPU (benchmarks/gpu_check.sh)
_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@_CUDA
def test_cuda_training_with_bf16_channels_last_and_compile(work, cache, monkeypatch):
    """The GPU recipe end to end on a tiny run: bf16 autocast, channels_last, torch.compile."""
    import pipeline.train as train_mod

    monkeypatch.setattr(train_mod, "_log_final_model", lambda *a, **k: None)
    run = run_train(tiny_cfg(cache, work / "runs", "cuda", "train.device=cuda", "train.epochs=1", "train.amp=bf16",
                             "train.channels_last=true", "train.compile=true"))
    metrics = pd.read_csv(run.run_dir / "metrics.csv")
    assert np.isfinite(metrics[["train/loss", "train/loss/lc", "train/loss/bc", "train/loss/cc"]].to_numpy()).all()
    state = load_checkpoint(run.run_dir / LAST)
    assert all(torch.isfinite(v).all() for v in state.model.values() if v.is_floating_point())


@pytest.mark.gpu
@_CUDA
def test_ecl_training_steps_never_synchronise_the_gpu(cache):
    """Forward, ECL loss, backward, clipping, SGD and the deferred finite check queue work without a
    host sync between checks (torch's sync debug mode turns any sync into an error)."""
    from data_prep import open_cache
    from pipeline.data import normalize_on_device
    from pipeline.models import create_network, model_data_config
    from pipeline.registry import create_method
    from pipeline.train import _LossLog, _stack_views

    cfg = tiny_cfg(cache, Path("unused"), "sync")
    c = open_cache(cache)
    counts = c.class_counts("train")
    net = create_network(cfg.model, len(c.class_names), proj_head=True).cuda().to(memory_format=torch.channels_last)
    method = create_method(cfg.method, counts, feature_dim=net.feature_dim, proj_dim=net.proj_dim)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    norm = model_data_config(net)
    x = torch.randint(0, 256, (6, 3, 3, 32, 32), dtype=torch.uint8).pin_memory()
    y = torch.as_tensor(np.resize(np.arange(len(c.class_names)), 6)).pin_memory()
    log = _LossLog(every=1000, epoch=0, on_error=lambda: None)

    def step(i: int) -> None:
        xb = _stack_views(normalize_on_device(x.to("cuda", non_blocking=True), norm), 3)
        xb = xb.contiguous(memory_format=torch.channels_last)
        yb = y.to("cuda", non_blocking=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = method(net(xb, return_all=True), yb)
        log.add(i, loss)
        opt.zero_grad(set_to_none=True)
        loss.total.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
        opt.step()

    step(0)  # first call: cuDNN/cuBLAS set-up and the cached class prior may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(1, 4):
            step(i)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    log.flush()
    assert set(log.sums) >= {"loss", "lc", "bc", "cc"} and all(math.isfinite(v) for v in log.sums.values())
