"""`ecl train`: the training engine (single process or DDP under torchrun).

One epoch = build that epoch's loader (`create_train_loader(..., epoch=e)`, so shuffling and
augmentation depend only on (seed, epoch, rank)), train, validate on the `val` split, write
`metrics.csv` and `checkpoint-last.pt`, and `checkpoint-best.pt` when validation balanced accuracy
(ISIC definition: mean per-class recall) improves.

Why checkpoints carry RNG states, the scheduler and the method state: `--resume RUN_DIR` must end
with exactly the weights an uninterrupted run would have (tested on CPU with `torch.equal`). A
resumed run reads its own saved config; of the config given on the command line only
`train.epochs` is honoured (to extend a run), and any other key that differs from the saved run
is ignored with a notice, because changing data, model or method half way would make the run a
different experiment under the same name.

A NaN or infinite loss stops training with a `PipelineError` naming the epoch, the first bad step
and the loss terms; the last good `checkpoint-last.pt` is left untouched. Why not at once: reading
the loss on the host every step would stall a GPU's queue once per step, so the per-step loss
values stay on the device and are read (and checked) every `train.finite_check_every` steps and at
the epoch's end; the bad step is still named exactly.

Threads: `train.threads` and `data.num_workers` (None = auto, `pipeline.threads`) keep torch's
threads plus the loader processes within the cores, which decides CPU speed more than anything.

Only rank 0 writes files, prints and talks to MLflow (through `pipeline.tracking`).
"""
from __future__ import annotations

import contextlib
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

import data_prep
from data_prep import atomic_write_text, file_sha256

from . import tracking
from .checkpoint import BEST, LAST, Checkpoint, load_checkpoint, resolve_checkpoint, save_checkpoint
from .config import RunConfig, flatten_config, load_config, public_config, save_config
from .distributed import DistInfo, all_gather, all_reduce_mean, barrier, cleanup, init_distributed
from .errors import ConfigError, PipelineError
from .store import resolve_store
from .threads import ThreadPlan, apply_threads, available_cores, plan_threads

__all__ = ["TrainResult", "run_train", "cosine_with_warmup", "rng_state", "set_rng_state", "is_rank_zero"]


@dataclass(frozen=True)
class TrainResult:
    """Where a finished run lives."""

    run_dir: Path
    run_id: str | None
    best_checkpoint: Path
    tracking_uri: str | None


# ---------------------------------------------------------------------------------- small pieces
def cosine_with_warmup(total_steps: int, warmup_steps: int):
    """LR factor per optimizer step: linear warm-up to 1, then cosine decay to 0 at `total_steps`."""
    total = max(int(total_steps), 1)
    warm = min(max(int(warmup_steps), 0), total - 1) if total > 1 else 0

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min((step - warm) / max(total - warm, 1), 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) RNG states as tensors and lists (weights_only-loadable)."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": [int(version), list(internal), gauss],
        "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), gauss))
    npk = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": npk["key"].numpy().astype(np.uint32), "pos": int(npk["pos"])},
                         "has_gauss": int(npk["has_gauss"]), "gauss": float(npk["gauss"])})
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _balanced_accuracy(pred: np.ndarray, labels: np.ndarray, n_classes: int) -> float | None:
    """ISIC balanced accuracy from hard predictions (mean recall of classes present in `labels`)."""
    from .metrics import balanced_accuracy

    keep = labels >= 0
    if not keep.any():
        return None
    onehot = np.eye(n_classes, dtype=np.float64)[pred[keep]]
    return float(balanced_accuracy(onehot, labels[keep]))


def _amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def _fmt(v: float | None, spec: str = ".4f") -> str:
    return "n/a" if v is None or not math.isfinite(v) else format(v, spec)


# ---------------------------------------------------------------------------------- run folder
def _explicit_keys(cfg: RunConfig) -> dict[str, Any]:
    """Keys of `cfg` that differ from the typed defaults: what the user actually asked for."""
    default = flatten_config(load_config())
    return {k: v for k, v in flatten_config(cfg).items() if default.get(k) != v}


def _resume_config(cfg: RunConfig, saved: RunConfig) -> tuple[RunConfig, list[str]]:
    """The saved config, with `train.epochs` taken from `cfg` when given; notices for ignored keys."""
    asked = _explicit_keys(cfg)
    saved_flat = flatten_config(saved)
    notices: list[str] = []
    epochs = saved.train.epochs
    if "train.epochs" in asked and asked["train.epochs"] != epochs:
        epochs = int(asked["train.epochs"])
        notices.append(f"resume: train.epochs {saved.train.epochs} -> {epochs}")
    ignored = sorted(k for k, v in asked.items() if k != "train.epochs" and saved_flat.get(k) != v)
    if ignored:
        notices.append("resume: the run's saved config is used; ignored differing keys: " + ", ".join(ignored))
    data = saved.model_dump()
    data["train"]["epochs"] = epochs
    return RunConfig.model_validate(data), notices


def _new_run_dir(cfg: RunConfig) -> Path:
    name = cfg.train.run_name or f"{cfg.method.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg.train.output_dir) / name
    if (run_dir / LAST).exists():
        raise PipelineError(f"run folder {run_dir} already holds a run: continue it with `ecl train --resume {run_dir}` "
                            f"or choose another train.run_name")
    # A folder with a config but no checkpoint is a run stopped before its first epoch ended: nothing can
    # be resumed from it, so the same command starts it again (its config.yaml is rewritten).
    return run_dir


def _write_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_text(path, pd.DataFrame(rows).to_csv(index=False, lineterminator="\n"))


def _read_metrics(path: Path, upto_epoch: int) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    df = pd.read_csv(path)
    df = df[df["epoch"] <= upto_epoch]
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
            for row in df.to_dict("records")]


# ---------------------------------------------------------------------------------- model pieces
def _build_optimizer(cfg: RunConfig, params) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay, nesterov=False)
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)


def _heads_used(method: Any) -> dict[str, bool]:
    """{head: some active term trains it} for "classifier", "projection" and "prototypes".

    The registry knows which heads each of a method's terms trains; a term it does not know counts
    as using every head (keeps the heads and DDP's unused-parameter search: safe rather than fast).
    """
    from .registry import heads_used

    return heads_used(getattr(method, "name", ""), method.base_weights)


def _init_from(network: torch.nn.Module, ref: str, class_names: list[str], cfg: RunConfig,
               tracking_uri: str | None) -> tuple[str, list[str]]:
    """Load a parent's backbone (+ heads) into `network`; re-initialise the classifier for new classes.

    Returns:
        (parent reference for the `ecl.parent_run` tag, notices).
    """
    path, run_id = resolve_checkpoint(ref, tracking_uri)
    parent_ckpt = load_checkpoint(path)
    parent_classes = list(parent_ckpt.class_names)
    weights = dict(parent_ckpt.model)
    notices: list[str] = []
    if parent_classes != class_names:
        # the tensors reset_classes replaces are the class-owned ones (classifier, prototype head):
        # they stay freshly initialised; everything else comes from the parent
        before = {k: id(t) for k, t in network.state_dict(keep_vars=True).items()}
        network.reset_classes(len(class_names))
        owned = {k for k, t in network.state_dict(keep_vars=True).items() if before.get(k) != id(t)}
        weights = {k: v for k, v in weights.items() if k not in owned}
        notices.append(f"init_from: class list differs from the parent's ({len(parent_classes)} -> {len(class_names)} "
                       f"classes); classifier and prototypes re-initialised")
    own = network.state_dict()
    mismatched = [k for k, v in weights.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        raise PipelineError(f"train.init_from {ref}: its weights do not fit model.backbone={cfg.model.backbone!r} "
                            f"(shape mismatch in {mismatched[:3]}); use the parent's backbone")
    missing, unexpected = network.load_state_dict(weights, strict=False)
    loaded = len(weights) - len(unexpected)
    if loaded == 0:
        raise PipelineError(f"train.init_from {ref}: no tensor of the parent fits model.backbone={cfg.model.backbone!r}")
    notices.append(f"init_from: {loaded} tensors loaded from {path}; {len(missing)} kept freshly initialised")
    parent = run_id or parent_ckpt.mlflow_run_id or str(path)
    return str(parent), notices


def _stack_views(x: Tensor, n_views: int) -> Tensor:
    """[B, V, 3, H, W] -> [n_views * B, 3, H, W], view-major (rows [0:B] are view 0)."""
    if x.dim() == 4:
        x = x.unsqueeze(1)
    x = x[:, :n_views]
    b, v = x.shape[:2]
    return x.transpose(0, 1).reshape(v * b, *x.shape[2:])


def _validate(network: torch.nn.Module, loader: Any, device: torch.device, amp: torch.dtype | None,
              channels_last: bool, n_classes: int) -> float | None:
    """Validation balanced accuracy of the raw (unadjusted) logits; None when val has no labels.

    The pass is `pipeline.inference.predict_loader` (the loop evaluation uses), under training's
    autocast and memory format.
    """
    from .inference import predict_loader
    from .metrics import balanced_accuracy

    if loader is None:
        return None
    pred = predict_loader(network, loader, device, n_classes, amp=amp, channels_last=channels_last)
    keep = pred.labelled
    if not keep.any():
        return None
    # float32 softmax, as training has always scored it: a tie in the probabilities counts as wrong
    probs = torch.softmax(torch.from_numpy(pred.logits[keep]).float(), dim=1).numpy()
    return float(balanced_accuracy(probs, pred.labels[keep]))


# ---------------------------------------------------------------------------------- the engine
def run_train(cfg: RunConfig, resume: str | None = None, register: str | None = None) -> TrainResult:
    """Train one run (see the module docstring); returns where it lives.

    Args:
        cfg: the resolved run config (ignored on resume except `train.epochs`; see module docstring).
        resume: a run folder holding `checkpoint-last.pt` to continue.
        register: register the final model in the MLflow registry under this name
            (default `cfg.tracking.registered_model`).
    Raises:
        PipelineError: missing cache or run, classes without training images, non-finite loss.
        ConfigError: invalid settings discovered at run time.
    """
    from .data import create_eval_loader, create_train_loader
    from .models import create_network, model_data_config
    from .registry import create_method

    resume_state: Checkpoint | None = None
    notices: list[str] = []
    if resume is not None:
        run_dir = Path(resume)
        last = run_dir / LAST
        if not last.is_file():
            raise PipelineError(f"cannot resume {run_dir}: it has no {LAST} (not a run folder, or the run never "
                                f"finished an epoch); start a new run instead")
        resume_state = load_checkpoint(last)
        cfg, notices = _resume_config(cfg, RunConfig.model_validate(resume_state.config))
    else:
        run_dir = _new_run_dir(cfg)

    dist = init_distributed(cfg.train.device)
    device = dist.device
    main_rank = dist.is_main
    threads = _thread_plan(cfg, device)
    apply_threads(threads)
    # the resolved worker count drives the loaders; the saved config keeps the user's value (None =
    # auto), so a resume on another machine plans for that machine
    data_cfg = cfg.data.model_copy(update={"num_workers": threads.num_workers})

    def say(msg: str) -> None:
        if main_rank:
            print(msg, flush=True)

    for n in notices:
        say(n)

    # ---------------------------------------------------------------- data
    if not cfg.data.cache:
        raise ConfigError("data.cache is empty: set it to a folder made by `ecl prepare` (--set data.cache=PATH)")
    try:
        cache = data_prep.open_cache(cfg.data.cache)
    except data_prep.DataPrepError as exc:
        raise PipelineError(f"data.cache: {exc}") from None
    class_names = cache.class_names
    counts = cache.class_counts("train")
    empty = [name for name, c in zip(class_names, counts) if c == 0]
    if empty:
        raise PipelineError(f"{cfg.data.cache}: classes {empty} have no training images; every class in cache.json needs "
                            f"at least one train image (re-split with `ecl prepare`, or drop the class)")
    if resume_state is not None and resume_state.dataset_sha256 not in (None, cache.dataset_sha256):
        raise PipelineError(f"cannot resume {run_dir}: the cache {cfg.data.cache} is not the one the run started on "
                            f"(dataset_sha256 differs)")

    # ---------------------------------------------------------------- model, method, optimiser
    _seed_everything(cfg.train.seed)
    probe = create_method(cfg.method, counts)
    proj_head = probe.n_views > 1  # one-view methods (ce, la, ...) carry no projection head
    heads = _heads_used(probe)
    # heads follow the method: no prototype head where no active term uses prototypes (supcon); a resumed
    # run keeps the heads it started with (its optimizer state counts their parameters)
    prototypes = proj_head and heads["prototypes"]
    if resume_state is not None:
        prototypes = any(str(k).startswith("prototype_head.") for k in resume_state.model)
    network = create_network(cfg.model, len(class_names), proj_head=proj_head, prototypes=prototypes)
    # built again with the network's widths so a duality/proj_dim mismatch fails before training
    method = create_method(cfg.method, counts, feature_dim=network.feature_dim, proj_dim=network.proj_dim)
    norm = model_data_config(network)
    uri = resolve_store(cfg.tracking.uri, beside=cfg.train.output_dir, create=True)
    parent_run = None
    if cfg.train.init_from and resume_state is None:
        parent_run, init_notes = _init_from(network, cfg.train.init_from, class_names, cfg, uri)
        for n in init_notes:
            say(n)
    channels_last = device.type == "cuda" if cfg.train.channels_last is None else cfg.train.channels_last
    network.to(device)
    if channels_last:
        network.to(memory_format=torch.channels_last)
    amp = _amp_dtype(cfg.train.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    optimizer = _build_optimizer(cfg, network.parameters())

    model: torch.nn.Module = network
    if dist.world_size > 1:
        # heads follow the method, so every parameter gets a gradient unless a term is switched off
        # (e.g. method.beta=0 leaves the projection head idle) or the method's terms are unknown here
        unused = (not heads["classifier"]) or (proj_head and not heads["projection"]) \
            or (network.has_prototypes and not heads["prototypes"])
        model = torch.nn.parallel.DistributedDataParallel(
            network, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=unused)
    if cfg.train.compile:
        model = torch.compile(model)

    # one loader for the whole run (persistent workers survive epochs); `sampler.set_epoch(e)`
    # makes order and augmentation a function of (seed, epoch, rank) only, which resume relies on
    train_loader = create_train_loader(cache, data_cfg, cfg.train, n_views=method.n_views, norm=norm,
                                       seed=cfg.train.seed, epoch=0, dist=dist)
    steps_per_epoch = len(train_loader)
    if cfg.train.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.train.max_steps_per_epoch)
    factor = cosine_with_warmup(steps_per_epoch * cfg.train.epochs, steps_per_epoch * cfg.train.warmup_epochs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    val_loader = None
    if main_rank and len(cache.split_indices("val")) > 0:
        val_loader = create_eval_loader(cache, "val", data_cfg, norm, cfg.eval.batch_size)
    elif main_rank:
        say("notice: the cache has no validation images; checkpoint-best.pt is the latest epoch")

    start_epoch, best_bacc, run_id = 0, -1.0, None
    rows: list[dict[str, Any]] = []
    if resume_state is not None:
        if resume_state.optimizer is None or resume_state.rng is None:
            raise PipelineError(f"cannot resume {run_dir}: {LAST} holds no optimiser/RNG state (not written by "
                                f"`ecl train`); start a new run instead")
        network.load_state_dict(resume_state.model)
        optimizer.load_state_dict(resume_state.optimizer)
        scheduler.load_state_dict(resume_state.scheduler)
        scaler.load_state_dict(resume_state.scaler)
        method.load_state_dict(resume_state.method_state)
        start_epoch = resume_state.epoch + 1
        best_bacc = resume_state.best_val_bacc
        run_id = resume_state.mlflow_run_id
        parent_run = resume_state.parent_run
        if main_rank:
            rows = _read_metrics(run_dir / "metrics.csv", start_epoch - 1)
        set_rng_state(resume_state.rng)
        if start_epoch >= cfg.train.epochs:
            say(f"resume: the run already finished {start_epoch} epochs; nothing to train "
                f"(extend it with --set train.epochs=N)")
        else:
            say(f"resume: {run_dir} from epoch {start_epoch + 1}/{cfg.train.epochs}")

    # ---------------------------------------------------------------- tracking (rank 0 only)
    tags = {
        "torch_version": torch.__version__, "cuda_version": torch.version.cuda or "none", "device": str(device),
        "seed": cfg.train.seed, "ecl.method": cfg.method.name, "ecl.run_dir": str(run_dir.resolve()),
        "ecl.dataset_sha256": cache.dataset_sha256, "ecl.manifest_sha256": cache.manifest_sha256,
        "world_size": dist.world_size, "ecl.torch_threads": threads.torch_threads,
        "ecl.num_workers": threads.num_workers,
    }
    if parent_run:
        tags["ecl.parent_run"] = parent_run
    with contextlib.ExitStack() as stack:
        if main_rank:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, run_dir / "config.yaml")
            run_id = stack.enter_context(tracking.start_run(uri, cfg.tracking.experiment, run_name=run_dir.name,
                                                            run_id=run_id, tags=tags))
            if resume_state is None:
                tracking.log_params(flatten_config(cfg))
                tracking.log_artifact(run_dir / "config.yaml")
            say(f"run {run_dir} (MLflow run {run_id}, {uri}); {len(class_names)} classes, train counts "
                f"{dict(zip(class_names, counts.tolist()))}, device {device}, world size {dist.world_size}, "
                f"{threads.describe()}")

        def checkpoint_state(epoch: int) -> Checkpoint:
            return Checkpoint(
                model=network.state_dict(), optimizer=optimizer.state_dict(),
                scheduler=scheduler.state_dict(), scaler=scaler.state_dict(),
                method_state=method.state_dict(), epoch=epoch, rng=rng_state(),
                config=public_config(cfg), class_names=list(class_names),
                class_counts=[int(c) for c in counts], best_val_bacc=best_bacc,
                mlflow_run_id=run_id, tracking_uri=uri, dataset_sha256=cache.dataset_sha256,
                manifest_sha256=cache.manifest_sha256, proj_head=proj_head, parent_run=parent_run,
            )

        for epoch in range(start_epoch, cfg.train.epochs):
            train_loader.sampler.set_epoch(epoch)
            row = _train_epoch(model, method, train_loader, optimizer, scheduler, scaler, device, amp,
                               channels_last, epoch, cfg, steps_per_epoch, len(class_names), dist, norm)
            val_bacc = None
            if main_rank:
                val_bacc = _validate(network, val_loader, device, amp, channels_last, len(class_names))
            row["val/balanced_accuracy"] = val_bacc
            if main_rank:
                # no labelled validation images: the latest epoch counts as the best
                score = val_bacc if val_bacc is not None else float(epoch)
                improved = score > best_bacc
                if improved:
                    best_bacc = score
                state = checkpoint_state(epoch)
                if improved:
                    save_checkpoint(run_dir / BEST, state)
                save_checkpoint(run_dir / LAST, state)
                rows.append(row)
                _write_metrics(run_dir / "metrics.csv", rows)
                tracking.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)
                say(f"epoch {epoch + 1}/{cfg.train.epochs}  loss {_fmt(row['train/loss'])}  "
                    f"train bacc {_fmt(row['train/balanced_accuracy'])}  val bacc {_fmt(val_bacc)}"
                    f"{' (best)' if improved else ''}  lr {row['train/lr']:.3g}  "
                    f"{row['train/throughput']:.0f} img/s")
            barrier()

        best = run_dir / BEST
        if main_rank:
            if not best.is_file():
                raise PipelineError(f"{run_dir}: no {BEST} was written")
            # A resumed run that had already logged these very weights (killed after the model upload,
            # or resumed once finished) must not log and register them a second time.
            digest = file_sha256(best)
            if tracking.get_run(uri, run_id).data.tags.get("ecl.final_model_sha256") == digest:
                say("the final model of these weights is already logged; not logging it again")
            else:
                tracking.log_artifact(best, artifact_path="checkpoints")
                _log_final_model(best, cfg, norm, register or cfg.tracking.registered_model)
                tracking.set_tags({"ecl.final_model_sha256": digest})
        barrier()
    cleanup()
    return TrainResult(run_dir=run_dir, run_id=run_id, best_checkpoint=run_dir / BEST, tracking_uri=uri)


def _thread_plan(cfg: RunConfig, device: torch.device) -> ThreadPlan:
    """`train.threads` / `data.num_workers` resolved for this process (torchrun: cores / local ranks)."""
    import os

    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return plan_threads(cfg.train.threads, cfg.data.num_workers, device.type, cores=max(1, available_cores() // local))


class _LossLog:
    """Per-step loss values kept on the device and read back every `every` steps.

    Why: `.cpu()` on a CUDA tensor waits for every queued kernel, so reading the loss each step
    stalls the GPU once per step. The values of a block of steps are stacked, averaged over ranks
    in one collective, copied to the host in one go and checked; the first non-finite step of the
    block is named exactly as a per-step check would name it.
    """

    def __init__(self, every: int, epoch: int, on_error):
        self.every, self.epoch, self.on_error = int(every), epoch, on_error
        self.pending: list[Tensor] = []
        self.keys: list[str] | None = None
        self.first_step = 0  # 0-based step index of pending[0]
        self.sums: dict[str, float] = {}

    def add(self, step: int, loss: Any) -> None:
        keys = sorted(loss.terms)
        if self.keys is not None and keys != self.keys:
            self.flush()
        if not self.pending:
            self.keys, self.first_step = keys, step
        self.pending.append(torch.stack([loss.total.detach().float()] + [loss.terms[k].detach().float() for k in keys]))
        if len(self.pending) >= self.every:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        values = all_reduce_mean(torch.stack(self.pending)).cpu()  # the one host sync per block
        self.pending = []
        names = ["total"] + list(self.keys or [])
        finite = torch.isfinite(values).all(dim=1)
        if not bool(finite.all()):
            i = int((~finite).nonzero()[0, 0])
            row = values[i].tolist()
            detail = ", ".join(f"{k}={v:.4g}" for k, v in zip(names, row))
            bad = [k for k, v in zip(names, row) if not math.isfinite(v)]
            self.on_error()
            raise PipelineError(f"non-finite loss at epoch {self.epoch + 1}, step {self.first_step + i + 1} (terms: {detail}; "
                                f"non-finite: {', '.join(bad)}); the last good checkpoint is kept. "
                                f"Lower train.lr, set train.grad_clip, or use train.amp=bf16/none")
        for k, v in zip(["loss"] + names[1:], values.double().sum(0).tolist()):
            self.sums[k] = self.sums.get(k, 0.0) + v


def _train_epoch(model, method, loader, optimizer, scheduler, scaler, device: torch.device,
                 amp: torch.dtype | None, channels_last: bool, epoch: int, cfg: RunConfig, max_steps: int,
                 n_classes: int, dist: DistInfo, norm: dict[str, Any] | None = None) -> dict[str, Any]:
    """One pass over this epoch's loader; returns the epoch's metrics row (rank-averaged).

    The loader's uint8 views are normalised here, on the device (`normalize_on_device`).
    """
    from tqdm.auto import tqdm

    from .data import normalize_on_device

    model.train()
    weights = method.weights()
    preds, labels_seen = [], []
    n_images, steps = 0, 0
    bar = tqdm(total=max_steps, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", disable=not dist.is_main,
               mininterval=2.0, leave=False, dynamic_ncols=True)
    log = _LossLog(cfg.train.finite_check_every, epoch, on_error=bar.close)
    t0 = time.perf_counter()
    for x, y, _ in loader:
        if steps >= max_steps:
            break
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        if norm is not None:
            x = normalize_on_device(x, norm)
        b = y.shape[0]
        x = _stack_views(x, method.n_views)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            out = model(x, return_all=True)
            loss = method(out, y)
        log.add(steps, loss)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss.total).backward()
        if cfg.train.grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        preds.append(out["logits"][:b].detach().argmax(1))
        labels_seen.append(y)
        n_images += b
        steps += 1
        bar.update(1)
    log.flush()
    bar.close()
    seconds = time.perf_counter() - t0
    sums = log.sums
    method.end_epoch(epoch)
    pred = all_gather(torch.cat(preds)).cpu().numpy() if preds else np.zeros(0, np.int64)
    lab = all_gather(torch.cat(labels_seen)).cpu().numpy() if labels_seen else np.zeros(0, np.int64)
    row: dict[str, Any] = {"epoch": epoch}
    row["train/loss"] = sums.get("loss", float("nan")) / max(steps, 1)
    for k in sorted(k for k in sums if k != "loss"):
        row[f"train/loss/{k}"] = sums[k] / steps
    for k, w in sorted(weights.items()):
        row[f"train/weight/{k}"] = w
    row["train/lr"] = optimizer.param_groups[0]["lr"]
    row["train/balanced_accuracy"] = _balanced_accuracy(pred, lab, n_classes)
    row["train/throughput"] = n_images * dist.world_size / max(seconds, 1e-9)
    row["train/seconds"] = seconds
    return row


def _log_final_model(best: Path, cfg: RunConfig, norm: dict, register: str | None) -> None:
    """Log the best weights as an MLflow model (signature from a [1, 3, H, W] float32 example)."""
    from .models import create_network

    ckpt = load_checkpoint(best)
    network = create_network(cfg.model.model_copy(update={"pretrained_file": None}), len(ckpt.class_names),
                             proj_head=ckpt.proj_head)
    network.load_state_dict(ckpt.model)
    network.eval()
    size = cfg.data.image_size
    example = np.zeros((1, 3, size, size), dtype=np.float32)
    tracking.log_torch_model(network, example, name="model", register=register)


# ---------------------------------------------------------------------------------- entry point
def is_rank_zero() -> bool:
    """After run_train has left the process group: rank from torchrun's environment (0 alone)."""
    import os

    return int(os.environ.get("RANK", "0") or 0) == 0


if __name__ == "__main__":  # `python -m pipeline.train ARGS` is `ecl train ARGS` (one parser: pipeline.cli)
    from pipeline.cli import main as _ecl_main

    sys.exit(_ecl_main(["train", *sys.argv[1:]]))
