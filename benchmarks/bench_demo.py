"""Benchmark: the demo's training as shipped before issue 14 against the current settings, side by side.

Why a ratio: on a shared machine the demo's absolute wall time swings with the other load; the
same training run with two settings, interleaved round by round in one process, gives a ratio
that holds up much better. Both sides train ECL on the demo's own cohort and cache (generated
here, or reused from `--work`) with the shipped demo config, for `--epochs` epochs:

- before: 2 persistent loader workers + torch's default threads (one per core), NCHW tensors,
  float32 views normalised in the workers (what `ecl demo` did before issue 14);
- now: the config's settings: threads and workers auto (`pipeline.threads`), channels_last,
  uint8 views normalised in the training loop.

Then the whole `ecl demo` (dermoscopy and CT, unless --no-full) with its seconds-per-stage line.

Run:
    python benchmarks/bench_demo.py                      # 3 epochs x 2 rounds, then both full demos
    python benchmarks/bench_demo.py --epochs 2 --rounds 1 --no-full
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--work", default=None, help="work folder to keep (cohort and cache are reused)")
    parser.add_argument("--no-full", action="store_true", help="skip the full `ecl demo` runs")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    import torch

    from pipeline import demo
    from pipeline.config import load_config
    from pipeline.train import run_train

    repo_configs = Path(__file__).resolve().parents[1] / "configs"
    if (repo_configs / "demo_dermoscopy.yaml").is_file():  # this checkout's configs, not an installed copy
        demo.demo_config_path = lambda m: repo_configs / ("demo_dermoscopy.yaml" if m == "dermoscopy" else "demo_ct.yaml")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_demo_"))
    work.mkdir(parents=True, exist_ok=True)
    default_threads = torch.get_num_threads()
    result: dict = {"epochs": args.epochs, "rounds": args.rounds}
    try:
        cfg_path = demo.demo_config_path("dermoscopy")
        base = load_config(cfg_path)
        paths = demo._generate("dermoscopy", work, 600, 0)
        cache_dir = demo._prepare("dermoscopy", base, paths, work / "cache", 0)
        common = [f"data.cache={cache_dir}", f"train.epochs={args.epochs}", f"train.output_dir={work / 'runs'}",
                  f"tracking.uri=sqlite:///{work / 'mlflow.db'}", "method.name=ecl"]
        variants = {
            "before": ["data.num_workers=2", f"train.threads={default_threads}", "train.channels_last=false"],
            "now": [],
        }
        best = {k: float("inf") for k in variants}
        for r in range(args.rounds):
            for name, extra in variants.items():
                cfg = load_config(cfg_path, common + extra + [f"train.run_name={name}-{r}-{time.time_ns()}"])
                t0 = time.perf_counter()
                if name == "before":
                    run = _train_before(cfg, run_train)
                else:
                    run = run_train(cfg)
                best[name] = min(best[name], time.perf_counter() - t0)
                print(f"round {r + 1}: {name} {best[name]:.1f} s ({run.run_dir.name})", flush=True)
        torch.set_num_threads(default_threads)
        result.update({f"train_{k}_s": v for k, v in best.items()}, speedup=best["before"] / best["now"])
        print(f"ECL, {args.epochs} epochs of the demo: before {best['before']:.1f} s, now {best['now']:.1f} s "
              f"-> {result['speedup']:.2f}x faster (best of {args.rounds}, interleaved)")
        if not args.no_full:
            for modality in ("dermoscopy", "ct"):
                t0 = time.perf_counter()
                res = demo.run_demo(out=work / f"demo-{modality}", modality=modality)
                result[f"demo_{modality}_s"] = time.perf_counter() - t0
                result[f"demo_{modality}_stages"] = res.seconds
                result[f"demo_{modality}_balanced_accuracy"] = {m: e.metrics.get("balanced_accuracy") for m, e in res.evals.items()}
            print(f"full demos: dermoscopy {result['demo_dermoscopy_s']:.0f} s, CT {result['demo_ct_s']:.0f} s "
                  f"(goal <= 120 s each on 2 cores)")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    return result


def _train_before(cfg, run_train):
    """run_train with the pre-issue-14 data path: float32 views normalised in the workers."""
    import pipeline.data as data

    real = data.train_transform
    data.train_transform = lambda data_cfg, norm, n_views, normalize=False: real(data_cfg, norm, n_views, normalize=True)
    try:
        return run_train(cfg)
    finally:
        data.train_transform = real


if __name__ == "__main__":
    main()
