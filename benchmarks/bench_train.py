"""Benchmark: the full training pipeline against the model alone, and the ECL loss's share of a step.

One run, same backbone, batch and step on both sides (nanoGPT's `bench.py` with `real_data`):

(a) model only: random tensors already on the device, shaped like three stacked views
    [3B, 3, S, S]; each step = forward (`return_all`), ECL loss, backward, optimizer step.
(b) full pipeline: a prepared cache (built here with data_prep.CacheWriter), the train loader with
    three augmented views per image, host-to-device copy, then the very same step.
(c) loss share: the step split into timed parts with synchronisation on GPU: network forward,
    ECL loss forward + backward (into detached copies of the network outputs), network backward,
    optimizer. Share = loss part / whole step.

Targets: (b) >= 85 % of (a) in samples/s; ECL loss < 3 % of a step.

(d) the loader alone, no model running: the rate the data path can sustain.
(e) with --reference: the ProConDual/BCL-style loop on the same device and model: JPEG files
    decoded by PIL, torchvision transforms (three float32 views), the same number of loader
    workers, fp32 (no autocast, no channels_last, no compile), the same ECL step.
    Target: (b) >= 3x (e) in samples/s.

On a GPU: ResNet-50 at 224 px, bf16 autocast, channels_last, batch 64, workers = all cores. On a
CPU: a small backbone (resnet18 at 96 px, batch 32, a few steps), one loader worker and the other
cores for torch; the model and the worker share the machine, so (b)/(a) also measures contention.

Run:
    python benchmarks/bench_train.py                       # defaults for the device found
    python benchmarks/bench_train.py --backbone resnet50 --image-size 224 --batch-size 128 --steps 200
    python benchmarks/bench_train.py --compile --reference --json out.json   # what gpu_check.sh runs
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from data_prep import CacheWriter, open_cache
from pipeline.config import DataConfig, MethodConfig, ModelConfig, RunConfig, TrainConfig, resolve_method_defaults
from pipeline.data import create_train_loader, normalize_on_device
from pipeline.threads import apply_threads, plan_threads
from pipeline.models import create_network, model_data_config
from pipeline.registry import create_method

CLASSES = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"]
SHARES = np.array([0.18, 0.51, 0.13, 0.03, 0.10, 0.01, 0.01, 0.03])  # ISIC 2019-like imbalance


def build_cache(out_dir: Path, n_images: int, short_side: int, seed: int = 0) -> Path:
    """A dermoscopy-like cache: skin background, a darker class-tinted blob, noise; ~4:3 images."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(len(CLASSES), size=n_images, p=SHARES / SHARES.sum())
    labels[: len(CLASSES)] = np.arange(len(CLASSES))  # every class present
    h, w = short_side, int(short_side * 4 / 3)
    yy, xx = np.mgrid[0:h, 0:w]
    writer = CacheWriter(out_dir, build_key=f"bench-{n_images}-{short_side}-{seed}")
    writer.start()
    shard, k = [], 0
    for i, c in enumerate(labels):
        inside = ((yy - h / 2) / (0.3 * h)) ** 2 + ((xx - w / 2) / (0.25 * w)) ** 2 <= 1 + 0.1 * rng.standard_normal()
        img = np.empty((h, w, 3), np.float32)
        img[:] = (220, 175, 155)
        img[inside] = (60 + 20 * c, 40 + 10 * c, 30 + 15 * (c % 3))
        img += rng.normal(0, 10, (h, w, 1)).astype(np.float32)
        shard.append(np.clip(img, 0, 255).astype(np.uint8))
        if len(shard) == 64 or i == n_images - 1:
            writer.write_shard(k, shard)
            shard, k = [], k + 1
    manifest = pd.DataFrame({"image": [f"B_{i:06d}" for i in range(n_images)], "label": [CLASSES[c] for c in labels],
                             "split": "train", "group": [f"g{i}" for i in range(n_images)]})
    return writer.finalize(manifest, k, dict(kind="dermoscopy", class_names=CLASSES))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stepper:
    """One training step (forward return_all, method loss, backward, SGD step), optionally split and timed."""

    def __init__(self, network, method, device, amp_dtype, channels_last, compiled=None):
        self.network, self.method, self.device = network, method, device
        self.forward = compiled or network  # torch.compile'd module for the fast path, if any
        self.amp_dtype, self.channels_last = amp_dtype, channels_last
        self.opt = torch.optim.SGD(network.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def step(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        with self._autocast():
            out = self.forward(self._prep(x), return_all=True)
            loss = self.method(out, labels).total
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()  # nothing read back to the host: no sync inside the timed loop

    def timed_step(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """The same step in parts, synchronised between them; returns seconds per part."""
        t = {}
        _sync(self.device)
        t0 = time.perf_counter()
        with self._autocast():
            out = self.network(self._prep(x), return_all=True)
        _sync(self.device)
        t1 = time.perf_counter()
        keys = [k for k in ("logits", "z", "prototypes", "weight") if isinstance(out.get(k), torch.Tensor)]
        leaves = {k: out[k].detach().requires_grad_(True) for k in keys}
        with self._autocast():
            loss = self.method({**out, **leaves}, labels).total
        loss.backward()
        _sync(self.device)
        t2 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        pairs = [(out[k], leaves[k].grad) for k in keys if leaves[k].grad is not None]
        torch.autograd.backward([p[0] for p in pairs], [p[1] for p in pairs])
        _sync(self.device)
        t3 = time.perf_counter()
        self.opt.step()
        _sync(self.device)
        t4 = time.perf_counter()
        t.update(forward=t1 - t0, loss=t2 - t1, backward=t3 - t2, optimizer=t4 - t3, step=t4 - t0)
        return t


def _endless(loader, set_epoch: bool = True):
    """Batches across epochs (the sampler's next epoch after each pass), as a training run sees them."""
    epoch = 0
    while True:
        if set_epoch:
            loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def view_major(x: torch.Tensor) -> torch.Tensor:
    """[B, V, 3, H, W] -> [V*B, 3, H, W], rows [0:B] view 0, [B:2B] view 1, ..."""
    b, v = x.shape[:2]
    return x.transpose(0, 1).reshape(v * b, *x.shape[2:])


def _reference_rate(cache, network, method, device, size: int, batch: int, workers: int, steps: int, warmup: int,
                    tmp: Path) -> float:
    """(e): samples/s of the ProConDual/BCL-style loop (PIL + torchvision, fp32) with the same step."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_datapath import ReferenceDataset, write_jpegs

    files = write_jpegs(cache, tmp / "jpeg")
    ds = ReferenceDataset(files, cache.labels, size)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, drop_last=True, num_workers=workers,
                                         pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    net = copy.deepcopy(network).to(memory_format=torch.contiguous_format)
    ref = Stepper(net, method, device, None, False)
    batches = _endless(loader, set_epoch=False)
    for _ in range(warmup):
        x, y = next(batches)
        ref.step(view_major(x.to(device, non_blocking=True)), y.to(device, non_blocking=True))
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        x, y = next(batches)
        ref.step(view_major(x.to(device, non_blocking=True)), y.to(device, non_blocking=True))
    _sync(device)
    return steps * batch / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--backbone", default=None, help="default: resnet50 on GPU, resnet18 on CPU")
    parser.add_argument("--image-size", type=int, default=None, help="default: 224 on GPU, 96 on CPU")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 64 on GPU, 32 on CPU")
    parser.add_argument("--steps", type=int, default=None, help="timed model-only steps (default 100 GPU, 6 CPU); the full pipeline runs at least 3 loader queues")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 10 GPU, 2 CPU)")
    parser.add_argument("--workers", type=int, default=None, help="loader workers (default: all cores on GPU, 1 on CPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default on CPU: cores - workers)")
    parser.add_argument("--n-images", type=int, default=None, help="cache size (default max(8 x batch, 512))")
    parser.add_argument("--compile", action="store_true", help="torch.compile the network for (a) and (b)")
    parser.add_argument("--reference", action="store_true", help="also time the ProConDual-style fp32 PIL loop (e)")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if (args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())) else "cpu")
    gpu = device.type == "cuda"
    backbone = args.backbone or ("resnet50" if gpu else "resnet18")
    size = args.image_size or (224 if gpu else 96)
    batch = args.batch_size or (64 if gpu else 32)
    steps = args.steps or (100 if gpu else 6)
    warmup = args.warmup if args.warmup is not None else (10 if gpu else 2)
    # the training default (pipeline.threads): workers + torch threads within the cores
    plan = plan_threads(args.threads, args.workers, device.type)
    apply_threads(plan)
    workers = plan.num_workers
    amp_dtype = torch.bfloat16 if gpu else None
    channels_last = gpu
    if gpu:
        torch.backends.cudnn.benchmark = True

    cfg = resolve_method_defaults(RunConfig(method=MethodConfig(name="ecl"), model=ModelConfig(backbone=backbone)))
    n_views = 3
    torch.manual_seed(0)
    network = create_network(cfg.model, len(CLASSES), proj_head=True).to(device)
    if channels_last:
        network = network.to(memory_format=torch.channels_last)
    network.train()
    norm = model_data_config(network)

    n_images = args.n_images or max(8 * batch, 512)
    short_side = int(round(size / 0.875))
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        t0 = time.perf_counter()
        cache = open_cache(build_cache(Path(tmp) / "cache", n_images, short_side))
        build_s = time.perf_counter() - t0
        counts = cache.class_counts("train")
        method = create_method(cfg.method, counts, feature_dim=network.feature_dim, proj_dim=network.proj_dim)
        compiled = torch.compile(network) if args.compile else None
        stepper = Stepper(network, method, device, amp_dtype, channels_last, compiled)

        # (a) model only: random tensors of the same shapes, resident on the device
        g = torch.Generator().manual_seed(0)
        x_rand = torch.randn(n_views * batch, 3, size, size, generator=g).to(device)
        y_rand = torch.as_tensor(np.resize(np.arange(len(CLASSES)), batch)).to(device)
        for _ in range(warmup):
            stepper.step(x_rand, y_rand)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            stepper.step(x_rand, y_rand)
        _sync(device)
        model_s = time.perf_counter() - t0

        # (c) loss share, on the same random batches
        parts = [stepper.timed_step(x_rand, y_rand) for _ in range(max(3, steps // 2))]
        part = {k: statistics.median(p[k] for p in parts) for k in parts[0]}

        # (b) full pipeline: cache -> 3 augmented views -> device -> the same step. The loader's
        # queue (workers x prefetch_factor batches) is full after warm-up, so the timed run is
        # at least 3 queues long: a loader slower than the model cannot hide behind its buffer.
        data_cfg = DataConfig(image_size=size, num_workers=workers, pin_memory=True, persistent_workers=True)
        train_cfg = TrainConfig(batch_size=batch, seed=0, sampler="random")
        loader = create_train_loader(cache, data_cfg, train_cfg, n_views=n_views, norm=norm, seed=0, epoch=0)
        full_steps = max(steps, 3 * workers * (loader.prefetch_factor or 0))
        batches = _endless(loader)
        for _ in range(warmup):  # starts the workers and fills their prefetch queues
            x, y, _ = next(batches)
            stepper.step(view_major(normalize_on_device(x.to(device, non_blocking=True), norm)), y.to(device, non_blocking=True))
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(full_steps):
            x, y, _ = next(batches)
            stepper.step(view_major(normalize_on_device(x.to(device, non_blocking=True), norm)), y.to(device, non_blocking=True))
        _sync(device)
        full_s = time.perf_counter() - t0

        # (d) the loader alone (no model running): how many samples/s the data path can feed
        for _ in range(2 * workers * (loader.prefetch_factor or 1)):  # drain what was prefetched
            next(batches)
        t0 = time.perf_counter()
        for _ in range(full_steps):
            next(batches)
        loader_s = time.perf_counter() - t0
        del batches, loader
        ref_sps = None
        if args.reference:
            ref_sps = _reference_rate(cache, network, method, device, size, batch, workers, full_steps, warmup, Path(tmp))

    model_sps = steps * batch / model_s
    full_sps = full_steps * batch / full_s
    loader_sps = full_steps * batch / loader_s
    ratio = full_sps / model_sps
    share = part["loss"] / part["step"]
    print(f"device {device} ({torch.cuda.get_device_name(device) if gpu else f'{torch.get_num_threads()} threads'}), "
          f"backbone {backbone}, {size} px, batch {batch} x {n_views} views, amp {amp_dtype}, "
          f"channels_last {channels_last}, compile {args.compile}, {plan.describe()}, "
          f"{steps}/{full_steps} timed steps model/full (+{warmup} warm-up)")
    print(f"cache: {n_images} images at short side {short_side} built in {build_s:.1f} s")
    print(f"model only    : {model_sps:8.1f} samples/s  {model_sps * n_views:8.1f} views/s")
    print(f"full pipeline : {full_sps:8.1f} samples/s  {full_sps * n_views:8.1f} views/s")
    print(f"loader alone  : {loader_sps:8.1f} samples/s  {loader_sps * n_views:8.1f} views/s  ({full_steps} batches)")
    print(f"ratio full / model only: {ratio:.1%}  (target >= 85 %: {'met' if ratio >= 0.85 else 'NOT met'})")
    print("step parts (median, synchronised): " + ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in part.items()))
    print(f"ECL loss (forward + backward) share of a step: {share:.2%}  (target < 3 %: {'met' if share < 0.03 else 'NOT met'})")
    result = dict(model_samples_per_s=model_sps, full_samples_per_s=full_sps, loader_samples_per_s=loader_sps,
                  ratio=ratio, loss_share=share, **{f"{k}_s": v for k, v in part.items()},
                  device=str(device), device_name=torch.cuda.get_device_name(device) if gpu else "cpu",
                  backbone=backbone, image_size=size, batch_size=batch, compile=bool(args.compile),
                  amp=str(amp_dtype), channels_last=channels_last, workers=workers, torch_threads=plan.torch_threads)
    if ref_sps is not None:
        result.update(reference_samples_per_s=ref_sps, full_vs_reference=full_sps / ref_sps)
        print(f"reference loop (PIL + torchvision, fp32): {ref_sps:8.1f} samples/s; full pipeline / reference: "
              f"{full_sps / ref_sps:.2f}x  (target >= 3x: {'met' if full_sps / ref_sps >= 3 else 'NOT met'})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
