"""The `ecl` command: argument parsing and dispatch only; the one argparse parser of the project.

Why one: the `python -m pipeline.<stage>` entry points (train for torchrun, evaluate, predict,
geometry_stage) used to carry parsers of their own that drifted from this one; they now hand
their arguments to `main` here, so `python -m pipeline.train ARGS` is `ecl train ARGS`.

Heavy imports (torch, timm, mlflow) are deferred into each subcommand so `ecl --help` is instant.
User mistakes (DataPrepError, ConfigError, PipelineError, a missing input path) and faults of the
machine (a full disk, no write permission, an unwritable MLflow store: `environment_fault`) print
one line on stderr and exit with status 2; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import errno
import sys
from pathlib import Path
from typing import Callable, Sequence

__all__ = ["main", "build_parser", "environment_fault"]

_TRACKING_HELP = ("MLflow store; default $MLFLOW_TRACKING_URI, else the store the run was trained with, "
                  "else runs/mlflow.db (pipeline.store.resolve_store)")
_EPILOG = "Configs: YAML under configs/; override any key with --set section.key=value (repeatable)."


def _positive_int(value: str) -> int:
    """argparse type: a whole number >= 1 (a process or thread count)."""
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1; got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1; got {n}")
    return n


def _int_list(value: str) -> list[int]:
    """argparse type: comma-separated whole numbers (class counts)."""
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers like 900,90,10; got {value!r}") from None


def _name_list(value: str) -> list[str]:
    """argparse type: comma-separated names (class names)."""
    return [n.strip() for n in value.split(",")]


def _existing(kind: str) -> Callable[[str], Path]:
    """argparse type: a path that must exist, with a one-line error naming it."""

    def check(value: str) -> Path:
        p = Path(value).expanduser()
        if kind == "dir" and not p.is_dir():
            raise argparse.ArgumentTypeError(f"{value} is a file, not a folder" if p.exists() else f"folder {value} does not exist")
        if kind == "file" and not p.is_file():
            raise argparse.ArgumentTypeError(f"{value} is a folder, not a file" if p.is_dir() else f"file {value} does not exist")
        if kind == "any" and not p.exists():
            raise argparse.ArgumentTypeError(f"{value} does not exist")
        return p

    return check


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=_existing("file"), help="YAML config (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.lr=0.05 (repeatable)")


def _load_cfg(args: argparse.Namespace, base: dict | None = None):
    from .config import load_config

    return load_config(getattr(args, "config", None), getattr(args, "overrides", []), base=base)


# ---------------------------------------------------------------- subcommand handlers
def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(out=args.out, modality=args.modality, epochs=args.epochs, n_images=args.n_images, seed=args.seed,
             backbone=args.backbone)
    return 0


def _prepare_options(args: argparse.Namespace):
    """The config's prepare section with the command line's flags on top, as data_prep.PrepareOptions."""
    cfg = _load_cfg(args)
    overrides: dict = {}
    if args.on_error:
        overrides["on_error"] = args.on_error
    if getattr(args, "split_file", None):
        overrides["split_file"] = str(args.split_file)
    if args.workers:
        overrides["workers"] = args.workers
    return cfg.prepare.to_options(**overrides)


def _cmd_prepare(args: argparse.Namespace) -> int:
    import data_prep

    opts = _prepare_options(args)
    if args.kind == "isic2019":
        out = data_prep.prepare_isic2019(args.images, args.ground_truth, args.metadata, args.out, opts)
    elif args.kind == "csv":
        out = data_prep.prepare_csv(args.manifest, args.image_root, args.out, opts, image_column=args.image_column,
                                    label_column=args.label_column, group_column=args.group_column)
    elif args.kind == "folder":
        out = data_prep.prepare_folder(args.root, args.out, opts)
    else:
        out = data_prep.prepare_ct(args.images, args.labels, args.out, opts)
    print(f"cache ready: {out}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    cfg = _load_cfg(args)  # validate before importing torch: a typo costs a second, not a minute
    from .distributed import cleanup
    from .train import is_rank_zero, run_train

    try:
        result = run_train(cfg, resume=args.resume, register=args.register)
    except BaseException:
        cleanup()  # under torchrun: leave the process group so the other ranks are not left waiting
        raise
    if is_rank_zero():
        print(f"run folder: {result.run_dir}\nMLflow run: {result.run_id}\nbest checkpoint: {result.best_checkpoint}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import run_evaluate

    ref = args.run or str(args.checkpoint)
    result = run_evaluate(ref, split=args.split, tracking_uri=args.tracking_uri, out_dir=args.out,
                          n_bootstrap=args.n_bootstrap)
    print(f"report: {result.report_path}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from .predict import run_predict

    out = run_predict(args.model, args.images, out_csv=args.out, tracking_uri=args.tracking_uri)
    print(f"predictions: {out}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from .compare import run_compare

    if not args.runs and not args.experiment:
        raise SystemExit("ecl compare: give RUN_ID ... or --experiment NAME")
    report = run_compare(args.runs, experiment=args.experiment, tracking_uri=args.tracking_uri, out_dir=args.out,
                         split=args.split, n_bootstrap=args.n_bootstrap, group_by=args.group_by)
    print(f"\ncomparison report: {report}")
    return 0


def _cmd_geometry(args: argparse.Namespace) -> int:
    from .geometry_stage import run_geometry

    counts = args.class_counts or None
    if counts is None and args.run is None and args.majority is None:
        raise SystemExit("ecl geometry: give --counts N,N,..., --majority/--minority, or --run RUN_ID")
    run_geometry(class_counts=counts, majority=args.majority, minority=args.minority, ratio=args.ratio,
                 negatives=args.negatives, temperature=args.temperature, mode=args.mode, out_dir=args.out,
                 run_ref=args.run, split=args.split, tracking_uri=args.tracking_uri, class_names=args.class_names)
    return 0


# ---------------------------------------------------------------- faults of the environment
_FULL = {errno.ENOSPC, errno.EDQUOT}
_DENIED = {errno.EACCES, errno.EPERM, errno.EROFS}


def environment_fault(exc: BaseException) -> str | None:
    """One line for a fault of the machine rather than of the code: a full disk, a folder or
    file without write permission, an MLflow sqlite store that cannot be opened or written.

    Why: these reach us wrapped (sqlalchemy inside MLflow, torch.save inside atomic_open) and
    would print a page of traceback for what the user fixes in a second. The chain of causes is
    searched, so a wrapped OSError is found. Atomic writes mean nothing finished is lost.

    Returns:
        The message, or None when `exc` is not such a fault (a bug keeps its traceback).
    """
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        where = f" {e.filename}" if isinstance(e, OSError) and e.filename else ""
        if isinstance(e, OSError) and e.errno in _FULL:
            return (f"cannot write{where}: no space left on the device. Free some space (or choose another folder) "
                    f"and re-run: completed work is kept and the command resumes.")
        if isinstance(e, OSError) and e.errno in _DENIED:
            return (f"cannot write{where}: {e.strerror or 'permission denied'}. Choose a folder you can write to "
                    f"(--out, train.output_dir, tracking.uri) or ask for write access.")
        text = str(e).lower()
        if "database or disk is full" in text:
            return "the MLflow store cannot be written: the disk is full. Free some space and re-run."
        if "unable to open database file" in text or "readonly database" in text:
            return ("the MLflow sqlite store cannot be opened for writing (folder missing or read-only). Set tracking.uri "
                    "(or MLFLOW_TRACKING_URI) to sqlite:////a/writable/folder/mlflow.db.")
        e = e.__cause__ or e.__context__
    return None


def _check_out(args: argparse.Namespace) -> None:
    """--out names a folder for every command but predict (a CSV file): refuse the other kind."""
    from .errors import PipelineError

    out = getattr(args, "out", None)
    if out is None:
        return
    out = Path(out)
    if args.command == "predict":
        if out.is_dir():
            raise PipelineError(f"--out {out} is a folder; give the CSV file to write, e.g. {out / 'predictions.csv'}")
    elif out.exists() and not out.is_dir():
        raise PipelineError(f"--out {out} is an existing file; give a folder (it is created if absent)")


# ---------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ecl",
        description="Train and audit image classifiers on imbalanced medical cohorts (Equilibrium Contrastive Learning).",
        epilog=_EPILOG,
    )
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("ecl-pipeline")
    except PackageNotFoundError:  # running from a source tree
        ver = "unknown"
    parser.add_argument("--version", action="version", version=f"ecl-pipeline {ver}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="run every stage on a generated cohort (no downloads)",
                       description="Generate a synthetic cohort, prepare it, train ECL and a cross-entropy baseline, "
                                   "evaluate both, write HTML reports and log everything to MLflow.")
    p.add_argument("--out", type=Path, default=Path("ecl-demo"), help="work folder (default ./ecl-demo)")
    p.add_argument("--modality", choices=["dermoscopy", "ct"], default="dermoscopy")
    p.add_argument("--epochs", type=int, default=None, help="training epochs per method (default from the demo config)")
    p.add_argument("--n-images", type=int, default=None, help="cohort size (images or CT patients)")
    p.add_argument("--backbone", default=None, help="timm backbone (default test_resnet)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("prepare", help="turn a raw cohort into a verified tensor cache",
                       description="Validate a cohort and build the cache that training reads.", epilog=_EPILOG)
    kinds = p.add_subparsers(dest="kind", metavar="KIND", required=True)
    k = kinds.add_parser("isic2019", help="ISIC 2019 images + ground-truth (+ metadata) CSVs")
    k.add_argument("--images", type=_existing("dir"), required=True, help="folder of ISIC_xxxxxxx.jpg")
    k.add_argument("--ground-truth", type=_existing("file"), default=None,
                   help="ISIC_2019_Training_GroundTruth.csv (omit for the test layout: prediction only)")
    k.add_argument("--metadata", type=_existing("file"), default=None, help="ISIC_2019_Training_Metadata.csv")
    k = kinds.add_parser("csv", help="generic cohort: CSV of image,label[,group][,metadata...]")
    k.add_argument("--manifest", type=_existing("file"), required=True)
    k.add_argument("--image-root", type=_existing("dir"), required=True)
    k.add_argument("--image-column", default="image")
    k.add_argument("--label-column", default="label")
    k.add_argument("--group-column", default="group")
    k = kinds.add_parser("folder", help="generic cohort: one sub-folder per class, ROOT/<class>/<image>",
                         description="Each folder under --root is a class; images are named by position in the "
                                     "manifest (never by file or folder name).")
    k.add_argument("--root", type=_existing("dir"), required=True, help="folder holding one sub-folder per class")
    k = kinds.add_parser("ct", help="lung CT: DICOM series or NIfTI volumes + labels CSV")
    k.add_argument("--images", type=_existing("dir"), required=True)
    k.add_argument("--labels", type=_existing("file"), required=True)
    for k in kinds.choices.values():
        k.add_argument("--out", type=Path, required=True, help="cache folder to write")
        k.add_argument("--on-error", choices=["stop", "skip"], default=None,
                       help="stop at the first bad file (default) or quarantine it and go on")
        k.add_argument("--split-file", type=_existing("file"), default=None, help="CSV image,split to use instead")
        k.add_argument("--workers", type=_positive_int, default=None, help="processes (default: all cores)")
        _add_config_args(k)
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser("train", help="train a backbone with ECL or a peer method",
                       description="Train, checkpoint every epoch, log to MLflow.", epilog=_EPILOG)
    _add_config_args(p)
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue a killed run from its run folder")
    p.add_argument("--register", default=None, metavar="NAME", help="register the final model under NAME")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="metrics, calibration, CIs and an HTML report for a trained model")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="MLflow run id or run folder")
    src.add_argument("--checkpoint", type=_existing("file"), help="checkpoint file")
    p.add_argument("--split", choices=["train", "val", "test"], default="test")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: <run folder>/eval-<split>)")
    p.add_argument("--n-bootstrap", type=int, default=None)
    p.add_argument("--tracking-uri", default=None, help=_TRACKING_HELP)
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("predict", help="calibrated class probabilities for new images (ISIC CSV format)")
    p.add_argument("--model", required=True, help="MLflow run id, run folder or checkpoint file")
    p.add_argument("--images", type=_existing("any"), required=True, help="image file or folder (JPEG/PNG/DICOM)")
    p.add_argument("--out", type=Path, default=Path("predictions.csv"))
    p.add_argument("--tracking-uri", default=None, help=_TRACKING_HELP)
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("compare", help="compare runs (and methods across seeds) with CIs and bootstrap tests")
    p.add_argument("runs", nargs="*", metavar="RUN_ID",
                   help="MLflow run ids, run folders, eval folders, or a folder of run folders (a seed sweep)")
    p.add_argument("--experiment", default=None)
    p.add_argument("--group-by", default="method", metavar="KEY",
                   help="group runs across seeds by: method (default), config:KEY (e.g. config:train.lr), "
                        "tag:NAME (an MLflow tag), or none")
    p.add_argument("--n-bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--split", choices=["val", "test"], default="test")
    p.add_argument("--out", type=Path, default=Path("comparison"))
    p.add_argument("--tracking-uri", default=None, help=_TRACKING_HELP)
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("geometry", help="optimal and learned representation geometry for a cohort's imbalance")
    p.add_argument("--counts", "--class-counts", dest="class_counts", type=_int_list, default=None,
                   help="training counts, e.g. 12875,4522,3323,2624,867,628,253,239")
    p.add_argument("--class-names", type=_name_list, default=None,
                   help="class names for --counts, comma-separated, e.g. NV,MEL,BCC")
    p.add_argument("--majority", type=int, default=None, help="two-level model: number of majority classes")
    p.add_argument("--minority", type=int, default=None, help="two-level model: number of minority classes")
    p.add_argument("--ratio", type=float, default=None, help="two-level model: imbalance ratio R (omit for b*(R) over a range)")
    p.add_argument("--negatives", "-k", type=int, default=1)
    p.add_argument("--temperature", "--tau", type=float, default=0.1)
    p.add_argument("--mode", choices=["scl", "ucl"], default="scl")
    p.add_argument("--run", default=None, help="MLflow run id or run folder: learned geometry of a trained model")
    p.add_argument("--split", choices=["train", "val", "test"], default="test")
    p.add_argument("--out", type=Path, default=Path("geometry"))
    p.add_argument("--tracking-uri", default=None, help=_TRACKING_HELP)
    p.set_defaults(func=_cmd_geometry)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from data_prep import DataPrepError

    from .errors import ConfigError, PipelineError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    try:
        _check_out(args)
        return int(args.func(args) or 0)
    except (DataPrepError, ConfigError, PipelineError) as exc:
        print(f"ecl {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - only faults of the machine are turned into one line
        message = environment_fault(exc)
        if message is None:
            raise
        print(f"ecl {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ecl {args.command}: interrupted; completed work is kept and the command can be re-run to resume.",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
