#!/usr/bin/env bash
# One-shot GPU check: the `gpu`-marked tests, then benchmarks/gpu_check.py (training throughput with
# ResNet-50 / bf16 / channels_last / torch.compile against the model alone and against a
# ProConDual-style fp32 PIL loop, the ECL loss's share of a step, evaluation on the GPU, a torchrun
# NCCL start-up). Results: $OUT/gpu_check.json (+ pytest_gpu.xml, bench_train.json, logs).
# Budget: <= 8 minutes on one H100/H200 (the two steps are capped at 150 s + 330 s). Without CUDA
# (or with --reduced) it runs a reduced CPU smoke version of every part, which
# tests/benchmarks/test_gpu_check.py runs in the default suite so it cannot rot.
#
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh            # run from the repository root
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh --reduced  # the CPU smoke mode
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
reduced=0
for a in "$@"; do [ "$a" = "--reduced" ] && reduced=1; done
if [ "$reduced" = "0" ]; then
  has_cuda=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
  [ "$has_cuda" = "1" ] || reduced=1
fi

start=$(date +%s)
if [ "$reduced" = "0" ]; then
  # the gpu-marked tests (skipped elsewhere); their outcome goes into the JSON below
  timeout 150 "$PY" -m pytest -q -m gpu -p no:cacheprovider --junitxml="$OUT/pytest_gpu.xml" > "$OUT/pytest_gpu.log" 2>&1
  echo $? > "$OUT/pytest_gpu.rc"
  tail -3 "$OUT/pytest_gpu.log"
  timeout 330 "$PY" benchmarks/gpu_check.py --out "$OUT" 2>&1 | tee "$OUT/gpu_check.log"
  rc=${PIPESTATUS[0]}
else
  echo "pytest -m gpu: not run (no CUDA; reduced mode)" > "$OUT/pytest_gpu.log"
  "$PY" benchmarks/gpu_check.py --out "$OUT" --reduced 2>&1 | tee "$OUT/gpu_check.log"
  rc=${PIPESTATUS[0]}
fi
# fold the test outcome and the wall time into the JSON
"$PY" - "$OUT" "$start" "$reduced" <<'PY'
import json, sys, time, xml.etree.ElementTree as ET
from pathlib import Path
out, start, reduced = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
path = out / "gpu_check.json"
data = json.loads(path.read_text()) if path.is_file() else {"error": "gpu_check.py wrote no results"}
tests = {"run": False, "note": "reduced mode: gpu tests need CUDA"}
xml = out / "pytest_gpu.xml"
if not reduced and xml.is_file():
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    tests = {"run": True, **{k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")},
             "rc": int((out / "pytest_gpu.rc").read_text().strip() or 1)}
data["gpu_tests"] = tests
data["wall_s"] = time.time() - start
path.write_text(json.dumps(data, indent=2, default=str))
print(f"[gpu_check.sh] {path} written; wall {data['wall_s']:.0f} s")
PY
exit $rc
