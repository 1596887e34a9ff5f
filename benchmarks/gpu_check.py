"""One-shot GPU check (driven by benchmarks/gpu_check.sh): every GPU figure the README owes, as JSON.

Parts (each records its own seconds, result or error, so one failure does not hide the others):

- train: `bench_train.py` with ResNet-50 at 224 px, bf16 autocast, channels_last, torch.compile:
  full pipeline vs model only (goal >= 0.90), vs the ProConDual-style fp32 PIL loop on the same
  GPU (goal >= 3x), the ECL loss's share of a step (goal < 2 %).
- evaluate: a generated dermoscopy cohort, a short training run, then `ecl evaluate` on the GPU:
  the evaluation's wall time against predicting the same images (goal <= 2x + 5 s).
- torchrun: `torchrun --standalone --nproc_per_node=<GPUs>` start-up with NCCL (gloo on CPU): the
  process group forms, an all_reduce returns the world size.

`--reduced` (automatic without CUDA) runs the same parts on the CPU with a tiny network, tiny
images and a few steps, so CI keeps the script from rotting (tests/test_gpu_check.py); its numbers
mean nothing.

Run:  OUT=/tmp/gpu bash benchmarks/gpu_check.sh    (or: python benchmarks/gpu_check.py --out DIR)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

GOALS = {"full_vs_model": 0.90, "full_vs_reference": 3.0, "loss_share": 0.02, "evaluate_vs_predict": 2.0,
         "report_s": 5.0}


def _part(results: dict[str, Any], name: str, fn: Callable[[], dict[str, Any]]) -> None:
    t0 = time.perf_counter()
    try:
        out = fn()
        results[name] = {"ok": True, **out}
    except Exception as exc:  # noqa: BLE001 - a failing part is recorded and the others still run
        results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]}
    results[name]["seconds"] = time.perf_counter() - t0
    print(f"[gpu_check] {name}: {'ok' if results[name]['ok'] else 'FAILED ' + results[name]['error']} "
          f"({results[name]['seconds']:.1f} s)", flush=True)


def part_train(reduced: bool, out: Path) -> dict[str, Any]:
    import bench_train

    if reduced:
        argv = ["--device", "cpu", "--backbone", "test_resnet", "--image-size", "32", "--batch-size", "8",
                "--steps", "2", "--warmup", "1", "--workers", "0", "--reference", "--n-images", "48"]
    else:
        argv = ["--device", "cuda", "--backbone", "resnet50", "--image-size", "224", "--batch-size", "64",
                "--steps", "60", "--warmup", "15", "--compile", "--reference"]
    r = bench_train.main(argv + ["--json", str(out / "bench_train.json")])
    r["goals"] = {"full_vs_model": r["ratio"] >= GOALS["full_vs_model"],
                  "full_vs_reference": r.get("full_vs_reference", 0) >= GOALS["full_vs_reference"],
                  "loss_share": r["loss_share"] < GOALS["loss_share"]}
    return r


def part_evaluate(reduced: bool, out: Path) -> dict[str, Any]:
    from pipeline.models import create_network  # noqa: F401 - import cost is not part of the timing

    work = Path(tempfile.mkdtemp(prefix="gpu_check_eval_"))
    try:
        return _evaluate_in(work, reduced)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _evaluate_in(work: Path, reduced: bool) -> dict[str, Any]:
    import torch

    import data_prep
    from data_prep import open_cache
    from pipeline.config import load_config
    from pipeline.evaluate import run_evaluate
    from pipeline.inference import predict_split
    from pipeline.train import run_train

    n = 48 if reduced else 1200
    size = 32 if reduced else 224
    sizes = [(48, 36)] if reduced else [(600, 450)]
    paths = data_prep.generate_dermoscopy(work / "cohort", n_images=n, seed=0, sizes=sizes)
    # reduced: decode in this process (48 small images; a worker pool's start-up would dominate)
    opts = data_prep.PrepareOptions(short_side=int(size / 0.875), workers=1 if reduced else None)
    cache_dir = data_prep.prepare_isic2019(paths["images"], paths["ground_truth"], paths["metadata"], work / "cache", opts)
    overrides = [f"data.cache={cache_dir}", f"data.image_size={size}", "method.name=ecl", "train.epochs=1",
                 f"train.output_dir={work / 'runs'}", "train.run_name=eval-check", f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
                 "train.batch_size=8" if reduced else "train.batch_size=64",
                 "model.backbone=test_resnet" if reduced else "model.backbone=resnet50",
                 "train.max_steps_per_epoch=2" if reduced else "train.max_steps_per_epoch=10",
                 "eval.n_bootstrap=100" if reduced else "eval.n_bootstrap=1000"]
    if reduced:  # Grad-CAM and the servable model are tested in tests/pipeline; here they only cost time
        overrides += ["train.device=cpu", "eval.saliency_per_class=0"]
    cfg = load_config(None, overrides)
    if reduced:  # the smoke test checks this script, not MLflow's model logging (tested in tests/pipeline)
        import pipeline.train as train_mod

        train_mod._log_final_model = lambda *a, **k: None
        import pipeline.serving as serving_mod

        serving_mod.log_servable = lambda *a, **k: None
    run = run_train(cfg)
    t0 = time.perf_counter()
    result = run_evaluate(str(run.run_dir), split="test")
    evaluate_s = time.perf_counter() - t0
    # predicting the same images alone (the network pass of the evaluation), on the same device
    from pipeline.checkpoint import load_trained_model

    device = "cuda" if torch.cuda.is_available() and not reduced else "cpu"
    tm = load_trained_model(str(run.run_dir), device=device)
    cache = open_cache(cache_dir)
    t0 = time.perf_counter()
    pred = predict_split(tm.network, cache, "test", tm.config.data, tm.config.eval.batch_size, device)
    if device == "cuda":
        torch.cuda.synchronize()
    predict_s = time.perf_counter() - t0
    ratio = evaluate_s / max(predict_s, 1e-9)
    return {"device": device, "test_images": int(len(pred.labels)), "evaluate_s": evaluate_s, "predict_s": predict_s,
            "evaluate_vs_predict": ratio, "balanced_accuracy": result.metrics.get("balanced_accuracy"),
            "goals": {"evaluate_within_2x_predict_plus_5s": evaluate_s <= 2 * predict_s + GOALS["report_s"]}}


def part_torchrun(reduced: bool, out: Path) -> dict[str, Any]:
    import torch

    gpus = torch.cuda.device_count() if not reduced else 0
    nproc = max(1, gpus)
    probe = out / "torchrun_probe.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(HERE / "gpu_check.py"), "--ddp-probe", str(probe)] + (["--reduced"] if reduced else [])
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun exited {proc.returncode}: {(proc.stderr or proc.stdout)[-2000:]}")
    info = json.loads(probe.read_text())
    return {"nproc": nproc, "wall_s": wall, **info}


def ddp_probe(path: str, reduced: bool) -> None:
    """Inside torchrun: form the process group (NCCL on CUDA), all_reduce, report from rank 0."""
    import torch
    import torch.distributed as dist

    t0 = time.perf_counter()
    use_cuda = torch.cuda.is_available() and not reduced
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local)
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    dist.init_process_group(backend="nccl" if use_cuda else "gloo", init_method="env://")
    init_s = time.perf_counter() - t0
    x = torch.ones(1, device=device)
    t1 = time.perf_counter()
    dist.all_reduce(x)
    value = float(x.item())
    allreduce_s = time.perf_counter() - t1
    dist.barrier()
    world = dist.get_world_size()
    backend = dist.get_backend()
    if dist.get_rank() == 0:
        Path(path).write_text(json.dumps({"backend": backend, "world_size": world, "all_reduce_value": value,
                                          "init_s": init_s, "first_all_reduce_s": allreduce_s,
                                          "all_reduce_correct": value == world}))
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out")
    parser.add_argument("--reduced", action="store_true", help="CPU smoke mode (automatic without CUDA)")
    parser.add_argument("--parts", default="train,evaluate,torchrun")
    parser.add_argument("--ddp-probe", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.ddp_probe:
        ddp_probe(args.ddp_probe, args.reduced)
        return 0
    import torch

    reduced = args.reduced or not torch.cuda.is_available()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "mode": "reduced (CPU smoke test; figures are meaningless)" if reduced else "full",
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "device_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "goals": GOALS, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    parts = {"train": part_train, "evaluate": part_evaluate, "torchrun": part_torchrun}
    for name in [p.strip() for p in args.parts.split(",") if p.strip()]:
        _part(results, name, lambda fn=parts[name]: fn(reduced, out))
        (out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str))  # partial results survive a kill
    ok = all(results[n]["ok"] for n in parts if n in results)
    print(f"[gpu_check] results in {out / 'gpu_check.json'}; all parts ok: {ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
