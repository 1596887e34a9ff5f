"""Before/after check of `ecl evaluate`: metrics.json and report.html of the same tiny runs, normalised.

Why: a refactor of the evaluation must leave its outputs unchanged. Run it once with the old code on
PYTHONPATH and once with the new, on the same work folder (the tiny runs are built by the first call
and reused), then compare the two snapshot folders; only the time of evaluation, the git commit and
the package version are blanked, everything else must be byte-identical.

    PYTHONPATH=BEFORE_CHECKOUT python benchmarks/eval_snapshot.py WORK before
    PYTHONPATH=$PWD          python benchmarks/eval_snapshot.py WORK after
    diff -r WORK/snap-before WORK/snap-after
"""
from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

_STAMP = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}")
_VOLATILE = ("evaluated at (UTC)", "git commit", "package version")


def _evalkit():
    path = Path(__file__).resolve().parents[1] / "tests" / "pipeline" / "_evalkit.py"
    spec = importlib.util.spec_from_file_location("_evalkit", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _runs(work: Path) -> dict[str, Path]:
    """Two tiny runs: dermoscopy with a projection head (method ecl), CT (patient level, method ce)."""
    kit = _evalkit()
    runs = {}
    for kind, method in (("dermoscopy", "ecl"), ("ct", "ce")):
        run_dir = work / "runs" / kind
        if not (run_dir / "checkpoint-best.pt").is_file():
            cache = kit.build_cache(work / f"cache-{kind}", kind=kind)
            kit.make_run(cache, work / "runs", f"sqlite:///{work}/mlflow.db", run_name=kind, steps=10, method=method)
        runs[kind] = run_dir
    return runs


def main(argv: list[str]) -> int:
    import torch

    import pipeline
    from pipeline.evaluate import run_evaluate

    torch.set_num_threads(1)
    work, tag = Path(argv[0]), argv[1]
    snap = work / f"snap-{tag}"
    snap.mkdir(parents=True, exist_ok=True)
    print(f"pipeline from {pipeline.__file__}")
    for kind, run_dir in _runs(work).items():
        for split in ("test", "val"):
            res = run_evaluate(str(run_dir), split=split, out_dir=work / f"out-{tag}-{kind}-{split}", n_bootstrap=100,
                               echo=False)
            payload = json.loads((res.out_dir / "metrics.json").read_text())
            for key in _VOLATILE:
                payload["provenance"][key] = "-"
            (snap / f"{kind}-{split}-metrics.json").write_text(json.dumps(payload, indent=2, sort_keys=False))
            (snap / f"{kind}-{split}-summary.txt").write_text(res.summary)
            html = (res.out_dir / "report.html").read_text()
            html = _STAMP.sub("TIME", html)
            html = re.sub(r"[0-9a-f]{40}(\+dirty)?", "COMMIT", html)
            (snap / f"{kind}-{split}-report.html").write_text(html)
            (snap / f"{kind}-{split}-model_card.md").write_text((res.out_dir / "model_card.md").read_text())
            for name in ("predictions.csv", "ground_truth.csv"):
                (snap / f"{kind}-{split}-{name}").write_bytes((res.out_dir / name).read_bytes())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
