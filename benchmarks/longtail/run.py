"""Train and evaluate methods x seeds on a long-tailed Fashion-MNIST cohort, through the `ecl` CLI.

Why through the CLI: the benchmark must measure what a user gets, so each run is exactly
`ecl prepare csv` -> `ecl train` -> `ecl evaluate`, with the same config for every method and only
`method.*` (and `train.seed`) changed. Results are read back from each run's `metrics.csv` (best
validation balanced accuracy, the early-stopping criterion) and `eval-test/metrics.json` (test
numbers, geometry), never typed by hand.

Resumable: a run whose `eval-test/metrics.json` exists is not trained again; a half-trained one is
resumed with `ecl train --resume`.

Usage (the README names these commands)::

    python -m benchmarks.longtail.run --config configs/longtail_fmnist_cpu.yaml --profile ir100
    python -m benchmarks.longtail.run --config configs/longtail_fmnist_cpu.yaml --profile ir100 \
        --variants benchmarks/longtail/ablations.yaml --name ablations
    python -m benchmarks.longtail.run ... --order reverse --imbalance 50 --profile ir50-reverse

Outputs: `<work>/<profile>/runs/<variant>-s<seed>/` (run folders), `benchmarks/longtail/results/
<profile>-<name>.csv` (one row per run) and a generated section of `docs/benchmarks.md`.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import yaml

from .build_cohort import CohortError, add_arguments, build_cohort, options_from_args

__all__ = ["load_variants", "collect_run", "summarise", "markdown_tables", "main"]

ROOT = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).resolve().parent / "results"
DOCS = ROOT / "docs" / "benchmarks.md"
GEOMETRY_KEYS = ("FC", "MS", "SD", "NC1")


def load_variants(path: Path | None, methods: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The variants to run: one per method, or those listed in a YAML file (`variants: {name: {key: value}}`)."""
    if path is None:
        return {m: {"method.name": m} for m in methods}
    data = yaml.safe_load(Path(path).read_text()) or {}
    variants = data.get("variants")
    if not isinstance(variants, dict) or not variants:
        raise SystemExit(f"error: {path}: expected a mapping 'variants: {{name: {{config.key: value}}}}'")
    for name, over in variants.items():
        if not isinstance(over, dict) or "method.name" not in over:
            raise SystemExit(f"error: {path}: variant {name!r} must be a mapping that sets method.name")
    return variants


def _overrides(over: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for k, v in over.items():
        out += ["--set", f"{k}={json.dumps(v) if not isinstance(v, str) else v}"]
    return out


_NOT_COMPARED = ("tracking.", "prepare.", "train.output_dir", "train.run_name", "data.cache", "eval.")


def stale_keys(run_dir: Path, config: Path, overrides: list[str]) -> dict[str, tuple[Any, Any]]:
    """Settings in which an existing run folder differs from what this invocation would train.

    Why: a finished run is reused rather than trained again, so a run trained under other settings
    (an older default, another variant with the same name) must not slip into a table. Keys present
    on one side only (a config key added since) are not compared.
    """
    from pipeline.config import flatten_config, load_config

    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        return {}
    saved = flatten_config(yaml.safe_load(saved_path.read_text()))
    wanted = flatten_config(load_config(config, overrides=overrides[1::2]))
    return {k: (saved[k], wanted[k]) for k in saved.keys() & wanted.keys()
            if not k.startswith(_NOT_COMPARED) and saved[k] != wanted[k]}


_LOCK = ".benchmark-lock"


def _claim(run_dir: Path) -> bool:
    """Take a run folder for this process, so two runners on one work folder never train the same run.

    A lock left by a process that no longer exists (killed runner) is taken over.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / _LOCK
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                pid = int(lock.read_text() or "0")
                os.kill(pid, 0)
                return pid == os.getpid()
            except (ValueError, ProcessLookupError):
                lock.unlink(missing_ok=True)  # stale: its runner is gone
                continue
            except PermissionError:
                return False
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return True
    return False


def _run(cmd: list[str], log: Path) -> float:
    """Run one CLI step with its output appended to a log; returns wall seconds."""
    start = time.perf_counter()
    with open(log, "a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"error: step failed (exit {proc.returncode}): {' '.join(cmd)}; see {log}")
    return time.perf_counter() - start


def _best_val(run_dir: Path) -> float:
    with open(run_dir / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    values = [float(r["val/balanced_accuracy"]) for r in rows if r.get("val/balanced_accuracy") not in (None, "")]
    return max(values) if values else math.nan


def collect_run(run_dir: Path, variant: str, seed: int, profile: str) -> dict[str, Any]:
    """One results row from a finished run folder (metrics.csv + eval-test/metrics.json)."""
    payload = json.loads((run_dir / "eval-test" / "metrics.json").read_text())
    m = payload["metrics"]
    ci = payload["bootstrap"]["balanced_accuracy"]
    geo = (payload.get("geometry") or {}).get("metrics") or {}
    timing = {}
    if (run_dir / "benchmark-timing.json").is_file():
        timing = json.loads((run_dir / "benchmark-timing.json").read_text())
    row: dict[str, Any] = {
        "profile": profile, "variant": variant, "method": payload["method"], "seed": seed,
        "val_bacc_best": _best_val(run_dir), "test_bacc": m["balanced_accuracy"],
        "test_bacc_lo": ci["lo"], "test_bacc_hi": ci["hi"],
        "few_shot_acc": m.get("few_shot_accuracy"), "many_shot_acc": m.get("many_shot_accuracy"),
        "ece": m["ece"], "ece_calibrated": m.get("ece_calibrated"),
        "train_s": timing.get("train_s"), "evaluate_s": timing.get("evaluate_s"),
    }
    for key in GEOMETRY_KEYS:  # projection space only: what the contrastive loss shapes (docs/geometry.md)
        row[f"proj_{key}"] = geo.get(f"projection/{key}") if payload["method"] not in ("ce", "la") else None
    return row


def _fmt(values: list[float], digits: int = 3) -> str:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{np.mean(vals):.{digits}f} ± {np.std(vals, ddof=1):.{digits}f}"


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± sd over seeds per variant, in first-seen order."""
    out = []
    for variant in dict.fromkeys(r["variant"] for r in rows):
        rs = [r for r in rows if r["variant"] == variant]
        out.append({"variant": variant, "method": rs[0]["method"], "seeds": len(rs),
                    **{k: [r[k] for r in rs] for k in rs[0] if k not in ("profile", "variant", "method", "seed")}})
    return out


def markdown_tables(rows: list[dict[str, Any]], title: str, command: str) -> str:
    """A summary table (mean ± sd over seeds) and a per-seed table, generated from the rows."""
    summary = summarise(rows)
    lines = [f"### {title}", "", f"Generated by `{command}`.", "",
             "| variant | seeds | val bacc (best) | test bacc | few-shot acc | ECE | ECE calibrated | "
             + " | ".join(f"proj {k}" for k in GEOMETRY_KEYS) + " |",
             "|---|---|---|---|---|---|---|" + "---|" * len(GEOMETRY_KEYS)]
    for s in sorted(summary, key=lambda s: -np.mean(s["test_bacc"])):
        lines.append(f"| {s['variant']} | {s['seeds']} | {_fmt(s['val_bacc_best'])} | {_fmt(s['test_bacc'])} | "
                     f"{_fmt(s['few_shot_acc'])} | {_fmt(s['ece'])} | {_fmt(s['ece_calibrated'])} | "
                     + " | ".join(_fmt(s[f'proj_{k}'], 2) for k in GEOMETRY_KEYS) + " |")
    seeds = sorted({r["seed"] for r in rows})
    lines += ["", "Test balanced accuracy per seed [95 % bootstrap CI over test images]:", "",
              "| variant | " + " | ".join(f"seed {s}" for s in seeds) + " | train s/run |",
              "|---|" + "---|" * len(seeds) + "---|"]
    for s in summary:
        cells = []
        for seed in seeds:
            r = next((r for r in rows if r["variant"] == s["variant"] and r["seed"] == seed), None)
            cells.append("" if r is None else f"{r['test_bacc']:.3f} [{r['test_bacc_lo']:.3f}, {r['test_bacc_hi']:.3f}]")
        times = [t for t in s["train_s"] if t]
        lines.append(f"| {s['variant']} | " + " | ".join(cells) + f" | {np.mean(times):.0f} |" if times else
                     f"| {s['variant']} | " + " | ".join(cells) + " | n/a |")
    return "\n".join(lines) + "\n"


def _groups_table(comparison_md: str) -> str:
    """The seed-groups table of `ecl compare`'s comparison.md (the first table after '## Groups')."""
    lines = comparison_md.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("## Groups")), None)
    if start is None:
        return "(no groups table)\n"
    table = []
    for line in lines[start + 1:]:
        if line.startswith("|"):
            table.append(line)
        elif table:
            break
    return "\n".join(table) + "\n"


def write_section(doc: Path, key: str, text: str) -> None:
    """Replace (or append) the generated block between `<!-- generated:KEY -->` markers."""
    start, end = f"<!-- generated:{key} start -->", f"<!-- generated:{key} end -->"
    body = doc.read_text() if doc.is_file() else "# Benchmarks\n"
    block = f"{start}\n{text}{end}"
    if start in body and end in body:
        head, rest = body.split(start, 1)
        body = head + block + rest.split(end, 1)[1]
    else:
        body = body.rstrip("\n") + "\n\n" + block + "\n"
    tmp = doc.with_name(doc.name + ".part")
    tmp.write_text(body)
    tmp.replace(doc)


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, required=True, help="benchmark config (configs/longtail_*.yaml)")
    p.add_argument("--work", type=Path, default=Path(os.environ.get("ECL_BENCH_WORK", "/tmp/ecl-longtail")),
                   help="folder for the cohort, cache and runs")
    p.add_argument("--profile", default="ir100", help="name of this cohort profile (folder and table name)")
    p.add_argument("--methods", default="ce,la,bcl,ecl")
    p.add_argument("--variants", type=Path, help="YAML of variants (overrides --methods)")
    p.add_argument("--only", help="comma-separated subset of the variants to run")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--name", default="methods", help="name of the results table")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for every run (e.g. train.epochs=4)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1: reproducible)")
    p.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
    p.add_argument("--reference", default="bcl", help="group the seed-aware comparison measures differences against")
    add_arguments(p)
    args = p.parse_args(argv)

    # every `ecl` subprocess inherits this: one thread per run makes results reproducible for a thread count
    os.environ.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    base = args.work / args.profile
    try:
        record = build_cohort(base / "cohort", options_from_args(args), args.source)
    except CohortError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    ecl = [sys.executable, "-m", "pipeline.cli"]
    cache = base / "cache"
    log = base / "benchmark.log"
    base.mkdir(parents=True, exist_ok=True)
    short_side = yaml.safe_load(args.config.read_text()).get("prepare", {}).get("short_side", 32)
    if not (cache / "cache.json").is_file() or not json.loads((cache / "cache.json").read_text()).get("complete"):
        _run(ecl + ["prepare", "csv", "--manifest", str(base / "cohort" / "manifest.csv"),
                    "--image-root", str(base / "cohort"), "--split-file", str(base / "cohort" / "splits.csv"),
                    "--out", str(cache), "--set", f"prepare.short_side={short_side}"], log)
    print(f"cohort {args.profile}: train counts {record['counts']['train']}", flush=True)

    variants = load_variants(args.variants, args.methods.split(","))
    if args.only:
        variants = {k: v for k, v in variants.items() if k in args.only.split(",")}
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    for name, over in variants.items():
        for seed in seeds:
            run_dir = base / "runs" / f"{name}-s{seed}"
            sets = ["--set", f"data.cache={cache}", "--set", f"train.output_dir={base / 'runs'}",
                    "--set", f"train.run_name={run_dir.name}", "--set", f"train.seed={seed}",
                    "--set", f"tracking.experiment=longtail-{args.profile}"]
            sets += _overrides(over) + [a for o in args.overrides for a in ("--set", o)]
            stale = stale_keys(run_dir, args.config, sets)
            if stale:
                print(f"error: {run_dir} was trained with other settings ({', '.join(f'{k}: {a!r}, now {b!r}' for k, (a, b) in stale.items())}); "
                      f"move it away or use another --profile", file=sys.stderr)
                return 2
            if not (run_dir / "eval-test" / "metrics.json").is_file():
                if not _claim(run_dir):
                    print(f"{name:<22} seed {seed}: being trained by another runner; skipped here", flush=True)
                    continue
                timing = {}
                if (run_dir / "checkpoint-last.pt").is_file():
                    timing["train_s"] = _run(ecl + ["train", "--config", str(args.config), "--resume", str(run_dir)]
                                             + sets, log)
                else:
                    timing["train_s"] = _run(ecl + ["train", "--config", str(args.config)] + sets, log)
                timing["evaluate_s"] = _run(ecl + ["evaluate", "--run", str(run_dir), "--split", "test"], log)
                (run_dir / "benchmark-timing.json").write_text(json.dumps(timing))
                (run_dir / _LOCK).unlink()
            row = collect_run(run_dir, name, seed, args.profile)
            rows.append(row)
            print(f"{name:<22} seed {seed}: val {row['val_bacc_best']:.3f}  test {row['test_bacc']:.3f}  "
                  f"ECE cal {row['ece_calibrated']:.3f}  ({row['train_s'] or 0:.0f} s train)", flush=True)
    if not rows:
        print("no finished run to tabulate yet (the others are being trained by another runner)", file=sys.stderr)
        return 0
    out_csv = RESULTS / f"{args.profile}-{args.name}.csv"
    write_csv(out_csv, rows)
    argv_text = " ".join(["python -m benchmarks.longtail.run"] + list(argv if argv is not None else sys.argv[1:]))
    opts = record["options"]
    title = (f"{args.profile} / {args.name}: imbalance {opts['imbalance']:g}, order {opts['order']}, "
             f"{sum(record['counts']['train'].values())} training images")
    text = markdown_tables(rows, title, argv_text)
    if len({r["method"] for r in rows}) == len(variants) > 1 and len(seeds) > 1:
        # one variant per method: `ecl compare` groups the runs by method across seeds and gives each
        # difference an interval that resamples seeds as well as test images (hierarchical bootstrap)
        out_dir = base / f"compare-{args.name}"
        # the reference group (differences are against it) is listed first: BCL, the peer ECL must beat
        order = sorted(variants, key=lambda name: name != args.reference)
        # only evaluated runs: `ecl compare` never evaluates (a run another runner is still training is left out)
        run_dirs = [str(base / "runs" / f"{name}-s{seed}") for name in order for seed in seeds
                    if (base / "runs" / f"{name}-s{seed}" / "eval-test" / "metrics.json").is_file()]
        _run(ecl + ["compare", *run_dirs, "--group-by", "method", "--out", str(out_dir)], log)
        text += (f"\nSeed-aware comparison (`ecl compare RUN_DIRS --group-by method`, {order[0]} listed first; "
                 f"differences against {order[0]}, 95 % interval of a bootstrap over seeds and test images):\n\n"
                 + _groups_table((out_dir / "comparison.md").read_text()))
    print(text)
    if not args.no_docs:
        write_section(DOCS, f"{args.profile}-{args.name}", text)
    print(f"results: {out_csv}" + ("" if args.no_docs else f"; table in {DOCS}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
