"""benchmarks/gpu_check.sh in its reduced CPU mode: every part runs and the JSON holds real figures.

The full mode needs a GPU (see the README); this keeps the script from rotting where none exists.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_reduced_mode_writes_every_part(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--reduced"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert data["mode"].startswith("reduced") and data["gpu_tests"]["run"] is False
    for part in ("train", "evaluate", "torchrun"):
        assert data[part]["ok"], data[part].get("traceback")
    train = data["train"]
    for key in ("model_samples_per_s", "full_samples_per_s", "reference_samples_per_s", "loss_share"):
        assert math.isfinite(train[key]) and train[key] > 0, key
    assert train["ratio"] == train["full_samples_per_s"] / train["model_samples_per_s"]
    assert train["full_vs_reference"] == train["full_samples_per_s"] / train["reference_samples_per_s"]
    ev = data["evaluate"]
    assert ev["test_images"] > 0 and ev["evaluate_s"] > ev["predict_s"] > 0
    assert data["torchrun"]["backend"] == "gloo" and data["torchrun"]["all_reduce_correct"] is True
    assert json.loads((tmp_path / "bench_train.json").read_text())["backbone"] == "test_resnet"
