"""Our balanced accuracy, AUROC and AP equal the official ISIC challenge scorer's.

The scorer (`isic-challenge-scoring` 5.6.0, the newest release installable on Python 3.11) needs
pandas < 3 (it calls ``DataFrame.applymap``), while this project runs on pandas 3. So the scorer is
not imported here: it is installed once, without dependencies, into a cache folder
(``$ECL_ISIC_SCORER_DIR`` or ``~/.cache/ecl-pipeline/isic-challenge-scoring-5.6.0-pyXY``) together
with pandas 2 and its small pure dependencies, and run as a subprocess (``python -m
isic_challenge_scoring -o json classification TRUTH PRED``) with that folder first on PYTHONPATH;
numpy, scipy, scikit-learn and click come from this environment. First run: ~15 s (pip builds two
tiny sdists); later runs: ~2 s per scorer call. Without access to the package index the tests skip.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score

from pipeline import metrics as M

SCORER_VERSION = "5.6.0"
# --no-deps: everything else the scorer imports (numpy, scipy, scikit-learn, click, pillow) is
# already in this environment; installing only these keeps the main environment's pandas 3 intact.
SCORER_PACKAGES = [
    f"isic-challenge-scoring=={SCORER_VERSION}",
    "pandas>=2.2,<3",
    "click-pathlib",
    "rdp",
    "zipfile-deflate64",
    "pytz",
    "tzdata",
]
ISIC_2019 = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]


def _scorer_dir() -> Path:
    env = os.environ.get("ECL_ISIC_SCORER_DIR")
    if env:
        return Path(env)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    tag = f"py{sys.version_info.major}{sys.version_info.minor}"
    return base / "ecl-pipeline" / f"isic-challenge-scoring-{SCORER_VERSION}-{tag}"


def _install(target: Path) -> None:
    """Install into a temporary sibling, then rename: a half-finished install is never used."""
    if (target / ".complete").exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".install-", dir=target.parent))
    try:
        cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
               "--quiet", "--no-deps", "--target", str(tmp), *SCORER_PACKAGES]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            pytest.skip("installing isic-challenge-scoring took over 300 s (package index slow or unreachable)")
        if proc.returncode != 0:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
            pytest.skip(f"cannot install isic-challenge-scoring=={SCORER_VERSION} from the package index: {tail}")
        (tmp / ".complete").write_text(" ".join(SCORER_PACKAGES) + "\n")
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            if not (target / ".complete").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def scorer_path() -> Path:
    target = _scorer_dir()
    _install(target)
    return target


def _score(scorer_path: Path, truth: Path, pred: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(scorer_path), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PYTHONWARNINGS"] = "ignore"
    proc = subprocess.run(
        [sys.executable, "-m", "isic_challenge_scoring", "-o", "json", "classification", str(truth), str(pred)],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _cohort(n: int, seed: int, absent: list[int]):
    rng = np.random.default_rng(seed)
    weights = np.array([0.18, 0.48, 0.13, 0.035, 0.1, 0.01, 0.01, 0.025, 0.02])
    weights[absent] = 0
    y = rng.choice(len(ISIC_2019), size=n, p=weights / weights.sum())
    z = rng.normal(size=(n, len(ISIC_2019))).astype(np.float32)
    z[np.arange(n), y] += 1.2
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)  # float32, as a network hands out
    # exact ties, which the scorer counts as wrong: a few right-by-argmax rows tied with a neighbour
    for i in range(0, n, 37):
        row = np.full(len(ISIC_2019), 0.05, dtype=np.float32)
        row[y[i]] = row[(y[i] + 1) % len(ISIC_2019)] = 0.3
        p[i] = row
    return p, y


def test_balanced_accuracy_and_aucs_equal_official_scorer(scorer_path, tmp_path):
    # every class present (the scorer's CLI cannot score a truth file with an empty class column:
    # its partial AUC above 80 % sensitivity fails on a class without positives); DF and VASC rare
    p, y = _cohort(900, 0, absent=[])
    assert np.bincount(y, minlength=9).min() > 0
    ids = [f"ISIC_{9_000_000 + i}" for i in range(len(y))]
    M.write_isic_csv(tmp_path / "truth.csv", ids, y, ISIC_2019)
    M.write_isic_csv(tmp_path / "pred.csv", ids, p, ISIC_2019)
    official = _score(scorer_path, tmp_path / "truth.csv", tmp_path / "pred.csv")

    assert M.predicted_labels(p).min() == -1  # the tie rule is exercised
    ours = M.classification_report(p, y, ISIC_2019)
    assert ours["overall"]["balanced_accuracy"] == pytest.approx(official["aggregate"]["balanced_accuracy"], abs=1e-12)
    assert M.balanced_accuracy(p, y) == pytest.approx(official["overall"], abs=1e-12)
    # without the tie rule the numbers would differ: the check can fail
    plain_argmax = balanced_accuracy_score(y, p.argmax(axis=1))  # ties resolved to the first max
    assert official["overall"] < plain_argmax - 1e-3
    for name in ISIC_2019:
        row = ours["per_class"][name]
        assert row["auroc"] == pytest.approx(official["per_category"]["auc"][name], abs=1e-12), name
        assert row["average_precision"] == pytest.approx(official["per_category"]["ap"][name], abs=1e-12), name


_SCORE_BACC = """
import sys
from isic_challenge_scoring.load_csv import parse_csv, parse_truth_csv
from isic_challenge_scoring.metrics import balanced_multiclass_accuracy
with open(sys.argv[1]) as t, open(sys.argv[2]) as p:
    truth, weights = parse_truth_csv(t)
    pred = parse_csv(p, truth.columns)
print(repr(balanced_multiclass_accuracy(truth, pred.loc[truth.index], weights.score_weight)))
"""


def test_balanced_accuracy_absent_class_equals_official_metric(scorer_path, tmp_path):
    # UNK absent from the truth, as in the ISIC 2019 training ground truth, but still predicted:
    # the official metric function leaves it out of the mean (its recall is NaN), as we do
    p, y = _cohort(500, 2, absent=[8])
    assert (M.predicted_labels(p) == 8).any() and not (y == 8).any()
    ids = [f"ISIC_{9_100_000 + i}" for i in range(len(y))]
    M.write_isic_csv(tmp_path / "truth.csv", ids, y, ISIC_2019)
    M.write_isic_csv(tmp_path / "pred.csv", ids, p, ISIC_2019)
    env = dict(os.environ, PYTHONPATH=str(scorer_path), PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, "-c", _SCORE_BACC, str(tmp_path / "truth.csv"), str(tmp_path / "pred.csv")],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    official = float(proc.stdout.strip().removeprefix("np.float64(").rstrip(")"))
    assert M.balanced_accuracy(p, y) == pytest.approx(official, abs=1e-12)
    assert M.classification_report(p, y, ISIC_2019)["per_class"]["UNK"]["recall"] is None
