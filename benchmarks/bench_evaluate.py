"""Benchmark: `ecl evaluate` against predicting the same images, and where the evaluation's time goes.

A cache with `--n-test` test images (default 10,000, 8 ISIC-like imbalanced classes, age/sex/site
metadata) at a small size (the model pass is not what is measured here), a short real training run
(test_resnet), then in one process:

(a) predict: the network over the test split (`pipeline.inference.predict_split`, what `ecl predict`
    does per image minus the JPEG decoding);
(b) evaluate: `run_evaluate` on the same split (prediction with features, temperature fit on val,
    metrics, bootstrap CIs, subgroups, geometry, figures, HTML report, MLflow logging);
(c) a cProfile of a second run of (b) (the timing in (b) runs without the profiler, whose
    overhead would inflate it): the top functions by cumulative time inside `run_evaluate`.

Goal: evaluate <= 2 x predict + 5 s (the report).

Run:
    python benchmarks/bench_evaluate.py                 # 10,000 test images
    python benchmarks/bench_evaluate.py --n-test 2000 --profile-top 25
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

CLASSES = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"]
SHARES = np.array([0.18, 0.51, 0.13, 0.03, 0.10, 0.01, 0.01, 0.03])


def build_cache(out: Path, n_train: int, n_val: int, n_test: int, size: int = 40, seed: int = 0) -> Path:
    """Colour-coded noisy images per class, ISIC-like imbalance and metadata, one lesion per image."""
    from data_prep import CacheWriter

    rng = np.random.default_rng(seed)
    n = n_train + n_val + n_test
    labels = rng.choice(len(CLASSES), size=n, p=SHARES / SHARES.sum())
    splits = np.array(["train"] * n_train + ["val"] * n_val + ["test"] * n_test)
    # place one of each class at the start of every split
    for start in (0, n_train, n_train + n_val):
        labels[start:start + len(CLASSES)] = np.arange(len(CLASSES))
    base = rng.integers(30, 220, size=(len(CLASSES), 3))
    writer = CacheWriter(out, build_key=f"bench-eval-{n}-{size}-{seed}")
    writer.start()
    shard, k = [], 0
    for i, c in enumerate(labels):
        img = np.clip(base[c] + rng.normal(0, 60, size=(size, size, 3)), 0, 255).astype(np.uint8)
        shard.append(img)
        if len(shard) == 512 or i == n - 1:
            writer.write_shard(k, shard)
            shard, k = [], k + 1
    manifest = pd.DataFrame({
        "image": [f"E_{i:06d}" for i in range(n)], "label": [CLASSES[c] for c in labels], "split": splits,
        "group": [f"g{i}" for i in range(n)],
        "age_approx": rng.choice([25.0, 40.0, 55.0, 70.0, np.nan], size=n),
        "anatom_site_general": rng.choice(["torso", "lower extremity", "head/neck", "upper extremity"], size=n),
        "sex": rng.choice(["female", "male"], size=n),
    })
    # as `ecl prepare` records it, so evaluation also logs the servable model (its cost is part of evaluate)
    return writer.finalize(manifest, k, {"kind": "dermoscopy", "class_names": CLASSES,
                                        "preprocessing": {"kind": "dermoscopy", "short_side": size, "color_constancy": False}})


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-test", type=int, default=10_000)
    parser.add_argument("--n-val", type=int, default=2_000)
    parser.add_argument("--n-train", type=int, default=400)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--n-bootstrap", type=int, default=1000)
    parser.add_argument("--profile-top", type=int, default=20)
    parser.add_argument("--keep", default=None, help="work folder to keep")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    import torch

    from data_prep import open_cache
    from pipeline.checkpoint import load_trained_model
    from pipeline.config import load_config
    from pipeline.evaluate import run_evaluate
    from pipeline.inference import predict_split
    from pipeline.train import run_train

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_eval_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        cache_dir = build_cache(work / "cache", args.n_train, args.n_val, args.n_test, size=int(args.image_size * 1.15))
        build_s = time.perf_counter() - t0
        cfg = load_config(None, [
            f"data.cache={cache_dir}", f"data.image_size={args.image_size}", "model.backbone=test_resnet",
            "method.name=ecl", "train.epochs=1", "train.max_steps_per_epoch=3", "train.batch_size=32",
            "train.device=cpu", f"train.output_dir={work / 'runs'}", "train.run_name=bench",
            f"tracking.uri=sqlite:///{work / 'mlflow.db'}", f"eval.n_bootstrap={args.n_bootstrap}",
            "eval.batch_size=256",
        ])
        run = run_train(cfg)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        tm = load_trained_model(str(run.run_dir), device=device)
        cache = open_cache(cache_dir)
        run_evaluate(str(run.run_dir), split="val", n_bootstrap=100)  # warm-up: imports, fonts, MLflow
        t0 = time.perf_counter()
        pred = predict_split(tm.network, cache, "test", tm.config.data, tm.config.eval.batch_size, device)
        predict_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        run_evaluate(str(run.run_dir), split="test")  # timed without the profiler, like predict
        evaluate_s = time.perf_counter() - t0
        prof = cProfile.Profile()  # then once more under cProfile, for where the time goes
        prof.enable()
        run_evaluate(str(run.run_dir), split="test", echo=False)
        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(r"pipeline|sklearn|matplotlib/figure|scipy", args.profile_top)
        profile_text = buf.getvalue()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    result = {"n_test": int(len(pred.labels)), "predict_s": predict_s, "evaluate_s": evaluate_s,
              "evaluate_vs_predict": evaluate_s / predict_s, "report_budget_s": evaluate_s - 2 * predict_s,
              "cache_build_s": build_s, "device": device,
              "goal_met": evaluate_s <= 2 * predict_s + 5.0}
    print(profile_text)
    print(f"{result['n_test']:,} test images on {device}: predict {predict_s:.1f} s, evaluate {evaluate_s:.1f} s "
          f"({result['evaluate_vs_predict']:.1f}x); goal evaluate <= 2 x predict + 5 s: "
          f"{'met' if result['goal_met'] else 'NOT met'}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
