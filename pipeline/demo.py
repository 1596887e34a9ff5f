"""`ecl demo`: every stage on a generated cohort, end to end, with no downloads.

Generate -> prepare -> train ECL and a cross-entropy baseline -> evaluate both (each prints its
headline table: balanced accuracy with CI, per-class recall and operating points, ECE before and
after scaling, selective prediction; and writes a model card) -> compare (prints its table) ->
print the reports, the headline numbers side by side and the `mlflow ui` command.
Re-running into the same folder reuses the cohort and the cache (both are content-keyed) and
adds new runs beside the old ones.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["run_demo", "DemoResult", "demo_config_path"]

_COHORT_DEFAULTS = {"dermoscopy": 600, "ct": 80}
#: the smallest cohorts the generators can give every class a train and a test group: 3 images per
#: dermoscopy class (8 classes), 2 patients per CT class (4 classes)
_COHORT_MINIMUM = {"dermoscopy": 24, "ct": 8}
_METHODS = ("ecl", "ce")


@dataclass
class DemoResult:
    out: Path
    tracking_uri: str
    runs: dict[str, Any] = field(default_factory=dict)  # method -> TrainResult
    evals: dict[str, Any] = field(default_factory=dict)  # method -> EvalResult
    comparison: Path | None = None
    seconds: dict[str, float] = field(default_factory=dict)  # stage -> wall seconds (insertion order)


def demo_config_path(modality: str) -> Path:
    """The shipped demo config (configs/demo_<modality>.yaml, installed as package data)."""
    name = "demo_dermoscopy.yaml" if modality == "dermoscopy" else "demo_ct.yaml"
    return Path(str(resources.files("pipeline.configs") / name))


def _step(msg: str) -> None:
    print(f"\n== {msg}", flush=True)


def _generate(modality: str, out: Path, n: int, seed: int) -> dict[str, Path]:
    import data_prep

    folder = out / ("cohort" if modality == "dermoscopy" else "cohort-ct")
    marker = folder / f".generated-n{n}-seed{seed}"
    if modality == "dermoscopy":
        paths = {
            "images": folder / "ISIC_2019_Training_Input",
            "ground_truth": folder / "ISIC_2019_Training_GroundTruth.csv",
            "metadata": folder / "ISIC_2019_Training_Metadata.csv",
        }
    else:
        paths = {"images": folder / "dicom", "labels": folder / "labels.csv"}
    if marker.is_file() and all(p.exists() for p in paths.values()):
        print(f"cohort already generated in {folder}")
        return paths
    if modality == "dermoscopy":
        paths = data_prep.generate_dermoscopy(folder, n_images=n, seed=seed)
    else:
        paths = data_prep.generate_ct(folder, n_patients=n, seed=seed)
    data_prep.atomic_write_text(marker, "")
    return {k: Path(v) for k, v in paths.items()}


def _prepare(modality: str, cfg, paths: dict[str, Path], cache_dir: Path, seed: int) -> Path:
    import data_prep

    extra = {}
    if modality == "ct" and not cfg.prepare.salt and not os.environ.get("ECL_PSEUDONYM_SALT"):
        # Synthetic patients only: a seed-derived salt keeps re-runs content-identical. Real cohorts
        # must bring their own secret salt (config prepare.salt or $ECL_PSEUDONYM_SALT).
        extra["salt"] = f"ecl-demo-synthetic-cohort-{seed}"
    options = cfg.prepare.to_options(**extra)
    if modality == "dermoscopy":
        return data_prep.prepare_isic2019(paths["images"], paths["ground_truth"], paths["metadata"], cache_dir, options)
    return data_prep.prepare_ct(paths["images"], paths["labels"], cache_dir, options)


def stage_line(seconds: dict[str, float]) -> str:
    """'seconds per stage: generate 1.2, prepare 0.8, ..., total 61.0': one line, so a regression shows itself."""
    parts = [f"{name} {value:.1f}" for name, value in seconds.items()]
    return "seconds per stage: " + ", ".join(parts + [f"total {sum(seconds.values()):.1f}"])


# What one demo run can and cannot show (issue 10): the intervals in the reports resample test images
# of one training run; another seed moves the numbers by more than that (docs/benchmarks.md).
ONE_SEED_CAVEAT = (
    "One training seed per method: the reports' intervals cover test-image noise only, and another\n"
    "seed moves these numbers by more than that. Compare methods over seeds (docs/benchmarks.md:\n"
    "`python -m benchmarks.longtail.run`, then `ecl compare RUN_DIRS --group-by method`).")


def _headline(result: DemoResult, class_names: list[str]) -> str:
    from .report import fmt_number  # the reports' rule: None or NaN is "n/a", never "nan" or 0

    methods = list(result.evals)
    rows = [("balanced accuracy", "balanced_accuracy"), ("ECE", "ece"), ("ECE (temperature-scaled)", "ece_calibrated")]
    rows += [(f"recall {c}", f"recall/{c}") for c in class_names]
    rows += [("bal. acc. at 80% coverage", "selective/balanced_accuracy_at_coverage_80"),
             ("AURC (lower is better)", "selective/aurc")]
    width = max(len(r[0]) for r in rows) + 2
    lines = ["".ljust(width) + "".join(m.upper().rjust(10) for m in methods)]
    for label, key in rows:
        lines.append(label.ljust(width) + "".join(fmt_number(result.evals[m].metrics.get(key)).rjust(10) for m in methods))
    return "\n".join(lines)


def run_demo(
    out: str | Path = "ecl-demo",
    modality: str = "dermoscopy",
    epochs: int | None = None,
    n_images: int | None = None,
    seed: int = 0,
    backbone: str | None = None,
) -> DemoResult:
    """Run the whole pipeline on a generated cohort in `out` and print where everything is.

    Args:
        out: work folder; cohort, cache, runs and the MLflow store live inside it.
        modality: "dermoscopy" (ISIC 2019 layout) or "ct" (DICOM series).
        epochs: training epochs per method (default: the demo config's).
        n_images: images (dermoscopy) or patients (CT) to generate.
        seed: cohort, split and training seed.
        backbone: timm backbone name (default: the demo config's `test_resnet`).
    """
    from data_prep import open_cache

    from .compare import run_compare
    from .config import load_config
    from .evaluate import run_evaluate
    from .store import resolve_store
    from .train import run_train

    if modality not in _COHORT_DEFAULTS:
        from .errors import ConfigError

        raise ConfigError(f"--modality {modality!r} is not allowed; choose dermoscopy or ct")
    from .errors import ConfigError

    if epochs is not None and epochs < 1:
        raise ConfigError(f"--epochs {epochs}: train for at least one epoch (omit it for the demo config's default)")
    if n_images is not None and n_images < _COHORT_MINIMUM[modality]:
        what = "images" if modality == "dermoscopy" else "patients"
        raise ConfigError(f"--n-images {n_images}: the {modality} demo needs at least {_COHORT_MINIMUM[modality]} {what} "
                          f"so that every class has training and test data")
    t0 = time.perf_counter()
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    n = n_images if n_images is not None else _COHORT_DEFAULTS[modality]
    overrides = [f"train.output_dir={out / 'runs'}", f"train.seed={seed}", f"prepare.split_seed={seed}"]
    if epochs is not None:
        overrides.append(f"train.epochs={epochs}")
    if backbone:
        overrides.append(f"model.backbone={backbone}")
    base_cfg = load_config(demo_config_path(modality), overrides)
    tracking_uri = resolve_store(base_cfg.tracking.uri, beside=out, create=True)
    result = DemoResult(out=out, tracking_uri=tracking_uri)

    clock = [time.perf_counter()]

    def lap(stage: str) -> None:
        now = time.perf_counter()
        result.seconds[stage] = now - clock[0]
        clock[0] = now

    _step(f"1/5 generating a synthetic {modality} cohort ({n} {'images' if modality == 'dermoscopy' else 'patients'})")
    paths = _generate(modality, out, n, seed)
    lap("generate")

    _step("2/5 preparing the cache")
    cache_dir = _prepare(modality, base_cfg, paths, out / ("cache" if modality == "dermoscopy" else "cache-ct"), seed)
    cache = open_cache(cache_dir)
    class_names = cache.class_names
    lap("prepare")

    for i, method in enumerate(_METHODS):
        _step(f"3/5 training {method.upper()} ({i + 1}/{len(_METHODS)})")
        cfg = load_config(demo_config_path(modality), overrides + [
            f"data.cache={cache_dir}", f"method.name={method}", f"tracking.uri={tracking_uri}",
            f"tracking.experiment=ecl-demo-{modality}", f"train.run_name={method}-{time.strftime('%Y%m%d-%H%M%S')}",
        ])
        result.runs[method] = run_train(cfg)
        lap(f"train {method.upper()}")

    for method, run in result.runs.items():
        _step(f"4/5 evaluating {method.upper()} on the held-out test split")
        result.evals[method] = run_evaluate(str(run.run_dir), split="test", tracking_uri=tracking_uri)
        lap(f"evaluate {method.upper()}")

    _step("5/5 comparing the runs")
    result.comparison = run_compare([str(r.run_dir) for r in result.runs.values()], tracking_uri=tracking_uri,
                                    out_dir=out / "comparison", split="test")
    lap("compare")

    print("\n" + "=" * 72)
    print(f"ecl demo finished in {time.perf_counter() - t0:.0f} s ({modality}, {len(cache)} images, "
          f"{len(class_names)} classes)\n")
    print("Reports:")
    for method, ev in result.evals.items():
        print(f"  {method.upper():4s} {ev.report_path}")
    print(f"  comparison {result.comparison}")
    print("Model cards (also logged to MLflow as model_card.md):")
    for method, ev in result.evals.items():
        print(f"  {method.upper():4s} {Path(ev.out_dir) / 'model_card.md'}")
    print("\nHeadline (test split):")
    print(_headline(result, class_names))
    print(ONE_SEED_CAVEAT)
    print("\nMLflow runs:", ", ".join(f"{m.upper()}={r.run_id}" for m, r in result.runs.items()))
    if tracking_uri.startswith("sqlite:"):
        print(f"Browse them with:\n  mlflow ui --backend-store-uri {tracking_uri}")
    else:
        print(f"Tracking server: {tracking_uri}")
    print(stage_line(result.seconds))
    sys.stdout.flush()
    return result
