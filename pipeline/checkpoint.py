"""Checkpoints: atomic save, safe load, and turning any model reference into a ready network.

Why this module exists: training, evaluation, prediction and geometry all need "the trained model
behind this reference", whether the user gives a checkpoint file, a run folder or an MLflow run
id. One resolver keeps those three spellings working everywhere.

A checkpoint is a `Checkpoint` (typed, versioned by `format_version`); on disk it is
`Checkpoint.to_dict()`: only tensors and plain Python values (the config as a dict, RNG states as
tensors and lists), so `torch.load(weights_only=True)` can read them: a checkpoint from someone
else can not run code on load. They are written with `data_prep.atomic_open`, so a kill during
a save leaves the previous checkpoint intact. Checkpoints are never rewritten after training:
the fitted temperature lives in calibration.json beside them.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from data_prep import atomic_open, atomic_write_bytes

from .errors import PipelineError

__all__ = [
    "Checkpoint", "CHECKPOINT_FORMAT", "TrainedModel", "save_checkpoint", "load_checkpoint", "load_trained_model",
    "resolve_checkpoint", "write_calibration", "read_calibration", "preprocessing_from_meta", "BEST", "LAST", "CALIBRATION",
]

BEST = "checkpoint-best.pt"
LAST = "checkpoint-last.pt"
#: the fitted temperature, beside checkpoint-best.pt and logged as the run's artifact calibration/calibration.json
CALIBRATION = "calibration.json"
#: version of the on-disk layout written by `Checkpoint.to_dict`. 1: the untyped dict of before
#: (no `format_version` key; `temperature` and `sampler_epoch` entries); 2: this dataclass.
CHECKPOINT_FORMAT = 2


@dataclass(frozen=True)
class Checkpoint:
    """What `ecl train` saves after each epoch, and all that evaluate/predict/compare may read from it.

    Why typed: three readers used to pick entries out of a dict with their own defaults; the defaults
    now live in `from_dict` only, and a field is either written by training or does not exist.
    The resume-only entries (optimizer, scheduler, scaler, method_state, rng) are None in a
    checkpoint built for inference only.
    """

    model: dict[str, Any]  # state_dict of the network
    config: dict[str, Any]  # public_config of the run (secrets redacted)
    class_names: list[str]
    class_counts: list[int]  # training images per class
    epoch: int = 0  # last finished epoch (0-based)
    best_val_bacc: float = -1.0
    proj_head: bool = True
    mlflow_run_id: str | None = None
    tracking_uri: str | None = None  # the store training logged to (see pipeline.store.resolve_store)
    parent_run: str | None = None  # train.init_from's parent, tagged ecl.parent_run
    dataset_sha256: str | None = None
    manifest_sha256: str | None = None
    preprocessing: dict[str, Any] | None = None  # the training cache's decoding, for `ecl predict`
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    scaler: dict[str, Any] | None = None
    method_state: dict[str, Any] | None = None
    rng: dict[str, Any] | None = None
    #: T stored in format-1 checkpoints by the retired set_temperature; None from format 2 on
    legacy_temperature: float | None = None
    format_version: int = CHECKPOINT_FORMAT

    def to_dict(self) -> dict[str, Any]:
        """The dict torch.save writes (plain values only: loadable with weights_only=True)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["class_names"] = [str(c) for c in self.class_names]
        out["class_counts"] = [int(c) for c in self.class_counts]
        if out.pop("legacy_temperature") is not None:
            out["temperature"] = float(self.legacy_temperature)  # kept under its format-1 name
        return out

    @classmethod
    def from_dict(cls, state: Any, source: str | Path = "checkpoint") -> "Checkpoint":
        """Read any layout this pipeline has written (format 1: a plain dict; format 2: `to_dict`).

        The one place that fills defaults for entries an older checkpoint lacks.

        Raises:
            PipelineError: `state` is not a checkpoint of this pipeline, or one of a newer format.
        """
        if not isinstance(state, dict) or "model" not in state or "config" not in state:
            raise PipelineError(f"{source} is not a checkpoint written by `ecl train` (no 'model'/'config' entries)")
        version = int(state.get("format_version", 1))
        if version > CHECKPOINT_FORMAT:
            raise PipelineError(f"{source} has checkpoint format {version}; this pipeline reads up to "
                                f"{CHECKPOINT_FORMAT}. Upgrade ecl-pipeline to use it")
        names = {f.name for f in dataclasses.fields(cls)} - {"legacy_temperature", "format_version"}
        known = {k: v for k, v in state.items() if k in names}
        t = state.get("temperature")  # format 1 only: sampler_epoch (always epoch + 1) is dropped
        try:
            return cls(**{**known, "class_names": [str(c) for c in state.get("class_names", [])],
                          "class_counts": [int(c) for c in state.get("class_counts", [])],
                          "epoch": int(state.get("epoch", 0)),
                          "best_val_bacc": float(state.get("best_val_bacc", -1.0)),
                          "proj_head": bool(state.get("proj_head", True)),
                          "legacy_temperature": float(t) if t is not None and float(t) != 1.0 else None,
                          "format_version": CHECKPOINT_FORMAT})
        except (TypeError, ValueError) as exc:
            raise PipelineError(f"{source}: a checkpoint entry has the wrong type ({exc})") from None


@dataclass
class TrainedModel:
    """A trained network (eval mode) and what is needed to use it honestly."""

    network: torch.nn.Module
    config: Any  # pipeline.config.RunConfig (imported lazily to keep this module light)
    class_names: list[str]
    class_counts: list[int]
    temperature: float
    run_id: str | None
    run_dir: Path | None
    checkpoint_path: Path
    preprocessing: dict[str, Any] | None = None  # kind, short_side, color_constancy of the training cache


def preprocessing_from_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """A cache's preprocessing record (kind, short_side, color_constancy, CT crop and window settings).

    Caches record it in cache.json under "preprocessing" (`data_prep.build.preprocessing_record`);
    for a cache built before that, it is derived from the cache's recorded options. An option the
    cache does not record stays None.
    """
    pre = meta.get("preprocessing")
    if isinstance(pre, dict) and pre.get("kind"):
        return dict(pre)
    options = meta.get("options", {}) or {}
    kind = str(meta.get("kind", "dermoscopy"))
    if kind == "ct":
        size = options.get("ct_image_size")
        return {"kind": "ct", "short_side": int(size) if size else None, "color_constancy": False,
                "channels": options.get("channels")}
    size = options.get("short_side")
    return {"kind": kind, "short_side": int(size) if size else None,
            "color_constancy": bool(options.get("color_constancy", False))}


def _cache_preprocessing(config: Any) -> dict[str, Any] | None:
    """How the training cache turned files into pixels, read from its cache.json (`preprocessing_from_meta`).

    Why in the checkpoint: `ecl predict` must decode new images exactly like the cache did, and
    on another machine the cache is not there to ask (a CT model would otherwise be fed images
    resized like dermoscopy).
    """
    import json

    cache = (config or {}).get("data", {}).get("cache") if isinstance(config, dict) else None
    if not cache:
        return None
    try:
        meta = json.loads((Path(cache) / "cache.json").read_text(encoding="utf-8"))
        return preprocessing_from_meta(meta)
    except (OSError, ValueError, AttributeError):
        return None


def save_checkpoint(path: str | Path, checkpoint: Checkpoint) -> None:
    """Write `checkpoint.to_dict()` with torch.save into a temporary sibling, then rename it onto `path`.

    The training cache's preprocessing (`_cache_preprocessing`) is added when the checkpoint lacks it.
    """
    if checkpoint.preprocessing is None:
        pre = _cache_preprocessing(checkpoint.config)
        if pre is not None:
            checkpoint = dataclasses.replace(checkpoint, preprocessing=pre)
    with atomic_open(path, "wb") as fh:
        torch.save(checkpoint.to_dict(), fh)


def write_calibration(folder: str | Path, temperature: float, fitted_on: str = "",
                      checkpoint: str | Path | None = None) -> Path:
    """Store a fitted temperature as `<folder>/calibration.json` (atomically); returns its path.

    Why not in the checkpoint: evaluation must never rewrite a trained checkpoint (a shared,
    read-only model store; `train --resume` would see a changed file and log the model again),
    and a small JSON file travels as an MLflow artifact to wherever the model is used. The
    checkpoint's sha256 is recorded so that a temperature fitted for older weights (the run was
    resumed and a new best checkpoint written since) is never applied to newer ones.

    Raises:
        PipelineError: the temperature is not a positive finite number.
    """
    import json

    from data_prep import atomic_write_text, file_sha256

    t = _checked_temperature(temperature)
    path = Path(folder) / CALIBRATION
    record = {"temperature": t, "fitted_on": fitted_on,
              "checkpoint_sha256": file_sha256(checkpoint) if checkpoint is not None else None}
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")
    return path


def _checked_temperature(temperature: Any) -> float:
    t = float(temperature)
    if not math.isfinite(t) or t <= 0:
        raise PipelineError(f"temperature must be a positive finite number; got {temperature!r}")
    return t


def read_calibration(folder: str | Path, checkpoint: str | Path | None = None) -> float | None:
    """The temperature in `<folder>/calibration.json`, or None when there is none.

    With ``checkpoint``, a file fitted for another checkpoint (its recorded sha256 differs) counts
    as none, with a warning on stderr: the weights changed since `ecl evaluate` fitted it.

    Raises:
        PipelineError: the file exists but is damaged (it would otherwise silently mean T = 1).
    """
    import json

    from data_prep import file_sha256

    path = Path(folder) / CALIBRATION
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        t = float(record["temperature"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PipelineError(f"{path} is damaged ({type(exc).__name__}); re-run `ecl evaluate` on the run to fit "
                            f"the temperature again, or delete the file to predict uncalibrated (T = 1)") from None
    if not math.isfinite(t) or t <= 0:
        raise PipelineError(f"{path}: temperature {t} is not a positive finite number; re-run `ecl evaluate`")
    fitted_for = record.get("checkpoint_sha256") if isinstance(record, dict) else None
    if checkpoint is not None and fitted_for and fitted_for != file_sha256(checkpoint):
        print(f"warning: {path} was fitted for an earlier {Path(checkpoint).name} (the run trained on since); "
              f"predictions are uncalibrated (T = 1) until `ecl evaluate` is run again", file=sys.stderr)
        return None
    return t


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint written by `save_checkpoint`, of any format (weights_only: no code runs on load).

    Raises:
        PipelineError: the file is missing, truncated, or not a checkpoint of this pipeline.
    """
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file for the user
        # not torch's own text: it advises weights_only=False, which would run code from a file of unknown origin
        raise PipelineError(f"{path} is not a readable checkpoint of this pipeline ({type(exc).__name__} while "
                            f"loading it safely). Pass a checkpoint-best.pt or checkpoint-last.pt written by "
                            f"`ecl train`.") from None
    return Checkpoint.from_dict(state, source=path)


def resolve_checkpoint(ref: str | Path, tracking_uri: str | None = None) -> tuple[Path, str | None]:
    """Map a reference to a local checkpoint file; returns (path, mlflow run id or None).

    `ref` is a checkpoint file, a run folder (its checkpoint-best.pt), an MLflow run id
    (32 hex digits, or runs:/<id>) or a registered model (models:/NAME/VERSION or
    models:/NAME/latest, followed to the run that logged it): the run's tag `ecl.run_dir` is used when that folder exists
    here, else the `checkpoints/checkpoint-best.pt` artifact is downloaded.

    Raises:
        PipelineError: nothing matches `ref`, naming it.
    """
    text = str(ref)
    path = Path(text).expanduser()
    if path.is_file():
        return path, None
    if path.is_dir():
        best = path / BEST
        if not best.is_file():
            if (path / LAST).is_file():
                raise PipelineError(f"run folder {path} has no {BEST} yet; resume the run with `ecl train --resume {path}`")
            raise PipelineError(f"run folder {path} has no checkpoint: the run stopped before its first epoch ended. "
                                f"Re-run the same `ecl train` command to start it again")
        return best, None
    from . import tracking
    from .store import resolve_run_ref

    found = resolve_run_ref(text, tracking_uri)
    if found is None:
        raise PipelineError(f"model reference {text!r} is not a checkpoint file, a run folder, an MLflow run id "
                            f"or a registered model (models:/NAME/VERSION)")
    run_id, uri = found.run_id, found.tracking_uri
    try:
        run = tracking.get_run(uri, run_id)
    except PipelineError:
        raise
    except Exception as exc:  # noqa: BLE001 - mlflow raises its own types for a missing run
        raise PipelineError(f"MLflow run {run_id} was not found in {uri} ({type(exc).__name__})") from None
    run_dir = run.data.tags.get("ecl.run_dir")
    if run_dir and (Path(run_dir) / BEST).is_file():
        return Path(run_dir) / BEST, run_id
    dst = Path(tempfile.gettempdir()) / "ecl-mlflow" / run_id
    try:
        got = tracking.download_artifacts(uri, run_id, f"checkpoints/{BEST}", dst)
    except Exception as exc:  # noqa: BLE001
        raise PipelineError(f"MLflow run {run_id}: run folder {run_dir!r} is absent here and the artifact "
                            f"checkpoints/{BEST} could not be downloaded ({type(exc).__name__})") from None
    # the fitted temperature travels as its own artifact; absent until the run is evaluated
    stale = Path(got).parent / CALIBRATION
    if stale.is_file():
        stale.unlink()
    try:
        cal = tracking.download_artifacts(uri, run_id, f"calibration/{CALIBRATION}", dst / "calibration")
        atomic_write_bytes(Path(got).parent / CALIBRATION, Path(cal).read_bytes())
    except Exception:  # noqa: BLE001 - not evaluated yet: T = 1, as for a local run without calibration.json
        pass
    return Path(got), run_id


def load_trained_model(ref: str | Path, device: str | torch.device = "cpu", tracking_uri: str | None = None) -> TrainedModel:
    """Rebuild the network of a checkpoint, run folder or MLflow run id, in eval mode on `device`.

    Raises:
        PipelineError: `ref` does not resolve, or the checkpoint does not match its own config.
    """
    from .config import RunConfig
    from .models import create_network

    path, run_id = resolve_checkpoint(ref, tracking_uri)
    ckpt = load_checkpoint(path)
    cfg = RunConfig.model_validate(ckpt.config)
    class_names = list(ckpt.class_names)
    # weights come from the checkpoint: never read the (possibly absent) pretrained file again
    model_cfg = cfg.model.model_copy(update={"pretrained_file": None})
    network = create_network(model_cfg, len(class_names), proj_head=ckpt.proj_head)
    try:
        network.load_state_dict(ckpt.model)
    except RuntimeError as exc:
        raise PipelineError(f"{path}: the weights do not fit model.backbone={cfg.model.backbone!r} ({exc})") from None
    network.to(device).eval()
    run_dir = path.parent if (path.parent / "config.yaml").is_file() else None
    # calibration.json beside the checkpoint (written by `ecl evaluate`); format-1 checkpoints could hold T
    temperature = read_calibration(path.parent, checkpoint=path)
    if temperature is None:
        temperature = ckpt.legacy_temperature if ckpt.legacy_temperature is not None else 1.0
    return TrainedModel(
        network=network,
        config=cfg,
        class_names=class_names,
        class_counts=list(ckpt.class_counts),
        temperature=float(temperature),
        preprocessing=ckpt.preprocessing,
        run_id=run_id or ckpt.mlflow_run_id,
        run_dir=run_dir,
        checkpoint_path=path,
    )

