"""Regenerate the official ISIC scorer's reference outputs that tests/pipeline/test_isic_scorer.py reads.

Why committed references: the scorer (`isic-challenge-scoring` 5.6.0, the newest release for
Python 3.11) needs pandas < 3 while this project runs on pandas 3, and installing it at test time
needs the package index. So it is run once, here, and its outputs for fixed inputs are committed
beside this script; the tests compare our metrics with them offline and cannot skip.

What it writes (in this folder):
- `<case>_truth.csv.gz`, `<case>_pred.csv.gz`: the inputs, in the ISIC challenge's CSV layout
  (written by `pipeline.metrics.write_isic_csv`, shortest round-trip floats);
- `reference.json`: per case, the scorer's outputs (`python -m isic_challenge_scoring -o json
  classification TRUTH PRED`, or its `balanced_multiclass_accuracy` function where the CLI cannot
  score the case), plus the scorer version.

Run (needs the package index once to install the scorer into a cache folder, not into the
project's environment):
    python tests/data/isic_scorer/make_reference.py
"""
from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SCORER_VERSION = "5.6.0"
# --no-deps: numpy, scipy, scikit-learn, click and pillow come from this environment; only these
# are installed beside the scorer, so the project's pandas 3 stays untouched.
SCORER_PACKAGES = [f"isic-challenge-scoring=={SCORER_VERSION}", "pandas>=2.2,<3", "click-pathlib", "rdp",
                   "zipfile-deflate64", "pytz", "tzdata"]
ISIC_2019 = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]

_SCORE_BACC = """
import sys
from isic_challenge_scoring.load_csv import parse_csv, parse_truth_csv
from isic_challenge_scoring.metrics import balanced_multiclass_accuracy
with open(sys.argv[1]) as t, open(sys.argv[2]) as p:
    truth, weights = parse_truth_csv(t)
    pred = parse_csv(p, truth.columns)
print(float(balanced_multiclass_accuracy(truth, pred.loc[truth.index], weights.score_weight)))
"""


def cohort(n: int, seed: int, absent: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """ISIC-2019-like labels and float32 softmax scores, with exact ties every 37th row (scored wrong)."""
    rng = np.random.default_rng(seed)
    weights = np.array([0.18, 0.48, 0.13, 0.035, 0.1, 0.01, 0.01, 0.025, 0.02])
    weights[absent] = 0
    y = rng.choice(len(ISIC_2019), size=n, p=weights / weights.sum())
    z = rng.normal(size=(n, len(ISIC_2019))).astype(np.float32)
    z[np.arange(n), y] += 1.2
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    for i in range(0, n, 37):
        row = np.full(len(ISIC_2019), 0.05, dtype=np.float32)
        row[y[i]] = row[(y[i] + 1) % len(ISIC_2019)] = 0.3
        p[i] = row
    return p, y


# case name -> (rows, seed, absent classes, how it is scored)
CASES = {
    "all_present": (900, 0, [], "cli"),  # every class present: the CLI scores it (AUC, AP, bacc)
    "unk_absent": (500, 2, [8], "bacc"),  # UNK absent from truth but predicted: the metric function
}


def _install(target: Path) -> None:
    if (target / ".complete").exists():
        return
    tmp = Path(tempfile.mkdtemp(prefix=".install-", dir=target.parent))
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(tmp),
                    *SCORER_PACKAGES], check=True)
    (tmp / ".complete").write_text(" ".join(SCORER_PACKAGES) + "\n")
    tmp.rename(target)


def main() -> None:
    from pipeline import metrics as M

    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ecl-pipeline"
    base.mkdir(parents=True, exist_ok=True)
    scorer = base / f"isic-challenge-scoring-{SCORER_VERSION}-py{sys.version_info.major}{sys.version_info.minor}"
    _install(scorer)
    env = dict(os.environ, PYTHONPATH=str(scorer), PYTHONWARNINGS="ignore")
    reference: dict = {"scorer": f"isic-challenge-scoring=={SCORER_VERSION}", "classes": ISIC_2019, "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (n, seed, absent, how) in CASES.items():
            p, y = cohort(n, seed, absent)
            ids = [f"ISIC_{9_000_000 + 100_000 * seed + i}" for i in range(n)]
            truth, pred = Path(tmp) / f"{name}_truth.csv", Path(tmp) / f"{name}_pred.csv"
            M.write_isic_csv(truth, ids, y, ISIC_2019)
            M.write_isic_csv(pred, ids, p, ISIC_2019)
            if how == "cli":
                cmd = [sys.executable, "-m", "isic_challenge_scoring", "-o", "json", "classification", str(truth), str(pred)]
            else:
                cmd = [sys.executable, "-c", _SCORE_BACC, str(truth), str(pred)]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
            reference["cases"][name] = json.loads(out) if how == "cli" else {"balanced_accuracy": float(out)}
            for f in (truth, pred):
                with open(f, "rb") as src, gzip.GzipFile(HERE / f"{f.name}.gz", "wb", mtime=0) as dst:
                    shutil.copyfileobj(src, dst)
    (HERE / "reference.json").write_text(json.dumps(reference, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(CASES)} cases to {HERE}")


if __name__ == "__main__":
    main()
