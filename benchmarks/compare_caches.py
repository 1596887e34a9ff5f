"""Build the same synthetic cohorts with two checkouts of this repository and compare the caches.

Why: refactoring the cache builder must not change a pixel. Each checkout prepares, in its own
process (PYTHONPATH = that checkout), an ISIC 2019 cohort, the same images as a generic CSV, an
ISIC 2019 cohort with quarantine (on_error=skip) and colour constancy, and a synthetic DICOM
lung-CT cohort (two settings, and once with damaged slices quarantined); then pixels.u8, index.npy and manifest.csv of each pair are compared by
SHA-256. The inputs are generated once (by the first checkout) and shared.

    python benchmarks/compare_caches.py BEFORE_CHECKOUT AFTER_CHECKOUT [--work DIR]

Exit status 0 when every pair is identical, 1 otherwise (the differing files are listed).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

FILES = ("pixels.u8", "index.npy", "manifest.csv")

_GENERATE = r"""
import shutil, sys
from pathlib import Path
import pandas as pd
from data_prep.synthetic.dermoscopy import generate_dermoscopy
from data_prep.synthetic.ct import generate_ct
work = Path(sys.argv[1])
d = generate_dermoscopy(work / "derm", n_images=90, seed=5, sizes={(120, 90): 0.7, (200, 150): 0.3}, workers=1)
gt = pd.read_csv(d["ground_truth"]); md = pd.read_csv(d["metadata"], dtype=str, keep_default_na=False)
pd.DataFrame({"image": gt["image"] + ".jpg", "label": gt.iloc[:, 1:].idxmax(axis=1), "group": md["lesion_id"],
              "sex": md["sex"]}).to_csv(work / "cohort.csv", index=False)
broken = shutil.copytree(d["images"], work / "broken")
for p in sorted(broken.glob("*.jpg"))[3:6]:
    p.write_bytes(p.read_bytes()[:200])
c = generate_ct(work / "ct", n_patients=8, seed=3, slices=20, size=48)
ct_broken = shutil.copytree(c["images"], work / "ct-broken")
slices = sorted(ct_broken.rglob("*.dcm"))
for p in (slices[7], slices[-3]):  # pixel data cut short: the series fails when decoded, the header still reads
    p.write_bytes(p.read_bytes()[:-200])
"""

_BUILD = r"""
import sys, os
from pathlib import Path
import data_prep
from data_prep import PrepareOptions
work, out = Path(sys.argv[1]), Path(sys.argv[2])
d = work / "derm"
gt = next(d.rglob("ISIC_2019_Training_GroundTruth.csv")); md = next(d.rglob("ISIC_2019_Training_Metadata.csv"))
images = next(p for p in d.rglob("*") if p.is_dir() and any(p.glob("*.jpg")))
o = PrepareOptions(short_side=32, workers=2)
data_prep.prepare_isic2019(images, gt, md, out / "isic", o)
data_prep.prepare_csv(work / "cohort.csv", images, out / "csv", o)
data_prep.prepare_isic2019(work / "broken", gt, md, out / "skip", PrepareOptions(short_side=40, color_constancy=True, on_error="skip", workers=1))
ct = work / "ct"
labels = next(ct.rglob("labels.csv"))
ct_images = next(p for p in ct.iterdir() if p.is_dir())
data_prep.prepare_ct(ct_images, labels, out / "ct", PrepareOptions(salt="compare-salt", ct_image_size=32, workers=2))
data_prep.prepare_ct(work / "ct-broken", labels, out / "ct-skip", PrepareOptions(salt="compare-salt", ct_image_size=32,
                     on_error="skip", workers=1))
data_prep.prepare_ct(ct_images, labels, out / "ct-adjacent", PrepareOptions(salt="compare-salt", ct_image_size=24,
                     channels="adjacent", slices_per_lesion=2, split_seed=3, workers=1))
"""


def _run(root: Path, code: str, *args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", code, *args], cwd=root, env=env, check=True)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("before", type=Path, help="checkout A (e.g. /work/main)")
    p.add_argument("after", type=Path, help="checkout B (e.g. this branch)")
    p.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one)")
    a = p.parse_args(argv)
    work = a.work or Path(tempfile.mkdtemp(prefix="compare-caches-"))
    inputs = work / "input"
    if not (inputs / "cohort.csv").is_file():
        _run(a.before.resolve(), _GENERATE, str(inputs.resolve()))
    results: dict[str, dict[str, bool]] = {}
    for name, root in (("before", a.before), ("after", a.after)):
        if not (work / name / "ct-adjacent" / "cache.json").is_file():
            _run(root.resolve(), _BUILD, str(inputs.resolve()), str((work / name).resolve()))
    ok = True
    for cache in ("isic", "csv", "skip", "ct", "ct-skip", "ct-adjacent"):
        same = {f: _sha(work / "before" / cache / f) == _sha(work / "after" / cache / f) for f in FILES}
        q = [work / side / cache / "quarantine.csv" for side in ("before", "after")]
        if q[0].is_file() or q[1].is_file():
            same["quarantine.csv"] = q[0].is_file() and q[1].is_file() and _sha(q[0]) == _sha(q[1])
        kinds = [json.loads((work / side / cache / "cache.json").read_text())["kind"] for side in ("before", "after")]
        results[cache] = same
        ok &= all(same.values())
        print(f"{cache:12s} kind {kinds[0]} -> {kinds[1]}  " + "  ".join(f"{f}: {'same' if s else 'DIFFERENT'}" for f, s in same.items()))
    print(f"work folder: {work}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
