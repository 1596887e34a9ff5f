"""Shared builders for the evaluation-stage tests: a tiny cache and a tiny trained run.

Registered as the module `_evalkit` by tests/pipeline/conftest.py (pytest's importlib mode gives
test files no package to import from); `write_cache` is the tests' one synthetic-cache writer.

The cache is generated here with `data_prep.CacheWriter` (seeded, colour-coded classes, ISIC-like
metadata columns) so the tests do not depend on the preparation stage; class DF has training and
validation images but none in the test split, to exercise the "n/a" path everywhere.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

CLASSES = ["MEL", "NV", "BCC", "DF"]
# images per (class, split); DF absent from test
COUNTS = {"MEL": (10, 6, 8), "NV": (20, 8, 12), "BCC": (8, 5, 6), "DF": (4, 3, 0)}
_COLOURS = {"MEL": (60, 30, 20), "NV": (150, 100, 70), "BCC": (200, 160, 170), "DF": (110, 140, 90)}


def write_cache(out_dir: Path, images: list[np.ndarray], manifest: pd.DataFrame, class_names: list[str],
                kind: str = "dermoscopy", shard_size: int | None = None, build_key: str | None = None,
                preprocessing: dict | None = None) -> Path:
    """The one synthetic-cache writer of the tests: images + manifest through `data_prep.CacheWriter`.

    Why one: every test cache is finished the way `data_prep.build` finishes a real one (shards,
    manifest, cache.json with kind and class names), so a change to the cache contract is made here once.
    """
    from data_prep import CacheWriter

    size = shard_size or max(len(images), 1)
    writer = CacheWriter(out_dir, build_key=build_key or f"test-{len(images)}-{kind}")
    writer.start()
    n_shards = 0
    for k, start in enumerate(range(0, len(images), size)):
        writer.write_shard(k, list(images[start:start + size]))
        n_shards = k + 1
    meta = {"kind": kind, "class_names": list(class_names)}
    if preprocessing is not None:
        meta["preprocessing"] = preprocessing
    return writer.finalize(manifest, n_shards, meta)


def build_cache(out_dir: Path, seed: int = 0, kind: str = "dermoscopy", size: int = 24) -> Path:
    """Write a finished cache: colour-coded noisy squares, sex/age/site metadata, 2 images per group."""
    rng = np.random.default_rng(seed)
    rows, images = [], []
    k = 0
    for name in CLASSES:
        for split, n in zip(("train", "val", "test"), COUNTS[name]):
            for i in range(n):
                base = np.array(_COLOURS[name], dtype=np.float64)
                img = np.clip(base + rng.normal(0, 70, size=(size, size + 4, 3)), 0, 255).astype(np.uint8)
                images.append(img)
                group = f"{name}-{split}-{i // 2}"
                rows.append({
                    "image": f"IMG_{k:04d}", "label": name, "split": split, "group": group,
                    "age_approx": float(rng.choice([25.0, 40.0, 55.0, 75.0, np.nan])),
                    "anatom_site_general": str(rng.choice(["torso", "lower extremity", "head/neck"])),
                    "sex": str(rng.choice(["female", "male"])),
                    **({"patient": f"P{group}"} if kind == "ct" else {}),
                })
                k += 1
    # two unlabelled test images: predicted, not scored
    for j in range(2):
        images.append(rng.integers(0, 255, size=(size, size, 3), dtype=np.uint8))
        rows.append({"image": f"UNL_{j}", "label": "", "split": "test", "group": f"U{j}", "age_approx": np.nan,
                     "anatom_site_general": "", "sex": "", **({"patient": f"PU{j}"} if kind == "ct" else {})})
    manifest = pd.DataFrame(rows)
    manifest["label"] = manifest["label"].replace("", np.nan)
    # as data_prep.build records it: the images were decoded to this short side
    return write_cache(out_dir, images, manifest, CLASSES, kind, build_key=f"evalkit-{seed}-{kind}",
                       preprocessing={"kind": kind, "short_side": size, "color_constancy": False})


def synthetic_features(counts: list[int], d: int, spread: float, seed: int):
    """Seeded class-clustered features for geometry tests: (h [N,d], z [N,d/2] unit rows, labels, weight, prototypes)."""
    rng = np.random.default_rng(seed)
    c = len(counts)
    y = np.repeat(np.arange(c), counts)
    means_h = rng.normal(size=(c, d)) * 2
    h = means_h[y] + spread * rng.normal(size=(y.size, d))
    z = np.tanh(h[:, : d // 2])
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    weight = means_h + 0.1 * rng.normal(size=(c, d))
    protos = rng.normal(size=(c, d))
    return h.astype(np.float32), z.astype(np.float32), y, weight, protos


def tiny_config(cache: Path, out: Path, uri: str, method: str = "ce", run_name: str = "tiny", epochs: int = 1,
                seed: int = 0):
    """A config that trains test_resnet for `epochs` on the tiny cache in a few seconds."""
    from pipeline.config import load_config

    return load_config(base={
        "data": {"cache": str(cache), "image_size": 32, "num_workers": 0, "pin_memory": False,
                 "persistent_workers": False},
        "model": {"backbone": "test_resnet"},
        "method": {"name": method},
        "train": {"epochs": epochs, "batch_size": 16, "lr": 0.05, "warmup_epochs": 0, "output_dir": str(out),
                  "run_name": run_name, "device": "cpu", "seed": seed, "amp": "none"},
        "eval": {"n_bootstrap": 200, "min_subgroup_size": 5, "batch_size": 16},
        "tracking": {"uri": uri, "experiment": "evalkit"},
    })


def train_tiny(cache: Path, out: Path, uri: str, method: str = "ce", run_name: str = "tiny", seed: int = 0):
    """Train a tiny run with the real training stage; returns its TrainResult."""
    from pipeline.train import run_train

    return run_train(tiny_config(cache, out, uri, method=method, run_name=run_name, seed=seed))


def make_run(cache: Path, out: Path, uri: str | None, run_name: str = "tiny", seed: int = 0, steps: int = 8,
             method: str = "ce", mlflow_run: bool = True) -> Path:
    """A run folder with a `Checkpoint` (model-only: no optimiser state), trained for a few full-batch steps.

    Faster than `run_train` (no MLflow model export), so most tests can afford their own runs.
    With `mlflow_run`, an MLflow run is opened first (tag ecl.run_dir) and its id stored in the
    checkpoint, as training does, so evaluation must re-open it.
    """
    import torch
    import torch.nn.functional as F

    from data_prep import open_cache
    from pipeline import tracking
    from pipeline.checkpoint import BEST, Checkpoint, save_checkpoint
    from pipeline.config import public_config, save_config
    from pipeline.data import create_eval_loader
    from pipeline.models import create_network, model_data_config

    cfg = tiny_config(cache, out, uri or "", method=method, run_name=run_name, seed=seed)
    c = open_cache(cache)
    torch.manual_seed(seed)
    net = create_network(cfg.model, len(c.class_names), proj_head=True)
    xs, ys = zip(*[(x, y) for x, y, _ in create_eval_loader(c, "train", cfg.data, model_data_config(net), 64)])
    x, y = torch.cat(xs), torch.cat(ys)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    net.train()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    net.eval()
    run_dir = out / run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    run_id = None
    if mlflow_run and uri:
        with tracking.start_run(uri, cfg.tracking.experiment, run_name=run_name,
                                tags={"ecl.run_dir": str(run_dir.resolve()), "ecl.method": method}) as rid:
            tracking.log_metrics({"train/loss": 1.0})
            run_id = rid
    save_checkpoint(run_dir / BEST, Checkpoint(
        model=net.state_dict(), epoch=0, config=public_config(cfg), class_names=list(c.class_names),
        class_counts=[int(v) for v in c.class_counts("train")], best_val_bacc=0.0,
        mlflow_run_id=run_id, tracking_uri=uri, dataset_sha256=c.dataset_sha256,
        manifest_sha256=c.manifest_sha256, proj_head=True,
    ))
    return run_dir


# ---------------------------------------------------------------- local servers (mlflow server, mlflow models serve)
def free_port() -> int:
    """A localhost port that was free a moment ago."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, proc, log: Path, what: str, timeout_s: float, poll_s: float = 0.25) -> None:
    """Poll `url` until it answers 200; fail the test with the server's log if it exits or times out."""
    import time
    import urllib.request

    import pytest

    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not up after {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")
        time.sleep(poll_s)


def stop_process_group(proc) -> None:
    """SIGTERM the server's own process group (uvicorn workers included), SIGKILL if it lingers."""
    import os
    import signal
    import subprocess

    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
