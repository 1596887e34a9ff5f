"""The servable model: image files or bytes in, calibrated class probabilities out, as an MLflow pyfunc.

Why: the run's MLflow model "model" (logged by `ecl train`) takes preprocessed tensors, so a
client would have to repeat the decoding, resizing, colour constancy and the temperature that
live beside it. The model logged here carries all of it: its data folder holds the checkpoint,
calibration.json and servable.json (the training cache's decoding and the class names), and
`_load_pyfunc` rebuilds the same `pipeline.predict.ImageClassifier` that `ecl predict` uses, so
scoring a file over HTTP gives `ecl predict`'s numbers for that file. The project's code
(`pipeline`, `data_prep`) travels with the model as MLflow code paths, so a registered version
keeps the decoder it was logged with.

`ecl evaluate` logs it (`log_servable`) as ``runs:/<run id>/servable`` once it has fitted the
temperature, and registers it as a new version of every registered model the run already has a
version in. Serve it with::

    mlflow models serve -m runs:/<run id>/servable --env-manager local -p 5001

Request: a DataFrame with one row per image and either an ``image`` column (the file's bytes;
base64 strings in JSON, e.g. ``{"dataframe_split": {"columns": ["image"], "data": [["/9j/4AAQ..."]]}}``)
or a ``path`` column (a JPEG/PNG file on the serving machine). Response: one probability column per
class (class order of the training cache) and ``prediction``, the most probable class. One image
that cannot be decoded fails the request with a message naming its row (row numbers from 0).

CT models are not served: a CT model's input is a lesion-centred, windowed crop that
`ecl prepare ct` cuts from a series using the lesion's coordinates, and a client cannot be
expected to reproduce that crop (`ecl predict` accepts those crops as PNG files for offline use).
Serving CT would need the series plus the lesion centre as input and the preparation's crop code
inside the model; `log_servable` records why it logged nothing instead (tag ``ecl.servable``).
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from data_prep import atomic_write_text

from .errors import PipelineError
from .predict import ImageClassifier, ImagePreprocessing

__all__ = ["SERVABLE", "IMAGE_COLUMN", "PATH_COLUMN", "PREDICTION_COLUMN", "ServedClassifier", "write_servable_data",
           "log_servable"]

#: name of the logged model inside the run: serve ``runs:/<run id>/servable``
SERVABLE = "servable"
IMAGE_COLUMN = "image"  # the image file's bytes (base64 in JSON)
PATH_COLUMN = "path"  # an image file on the serving machine
PREDICTION_COLUMN = "prediction"
_META = "servable.json"
_FORMAT = 1


class ServedClassifier:
    """What `mlflow.pyfunc.load_model(...)` returns the `predict` of: a DataFrame of images in, probabilities out."""

    def __init__(self, classifier: ImageClassifier, batch_size: int):
        self.classifier = classifier
        self.batch_size = max(1, int(batch_size))

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> Any:
        """Calibrated probabilities (one column per class) and the predicted class, one row per input row.

        Raises:
            PipelineError: the input has neither column, a row has neither or both, or an image
                cannot be decoded (naming the row).
        """
        import pandas as pd

        from data_prep import DataPrepError

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if IMAGE_COLUMN not in frame.columns and PATH_COLUMN not in frame.columns:
            raise PipelineError(f"the request has columns {list(map(str, frame.columns))} but needs an "
                                f"'{IMAGE_COLUMN}' column (the image file's bytes, base64 in JSON) or a "
                                f"'{PATH_COLUMN}' column (an image file on the serving machine)")
        names = self.classifier.class_names
        rows = list(zip(_column(frame, IMAGE_COLUMN), _column(frame, PATH_COLUMN)))

        def tensors() -> Iterator[Any]:
            for row, (image, path) in enumerate(rows):
                if (image is None) == (path is None):
                    raise PipelineError(f"row {row} of the request has {'both' if image is not None else 'neither'} "
                                        f"'{IMAGE_COLUMN}' and '{PATH_COLUMN}'; give exactly one per row")
                try:
                    yield self.classifier.tensor(_image_bytes(image, row) if image is not None else str(path),
                                                 name=f"row {row} of the request")
                except DataPrepError as exc:  # the row, never the path: a file name may carry a patient's name
                    fix = "send the complete JPEG or PNG file" if path is None else \
                        f"give a readable JPEG or PNG file on the serving machine in '{PATH_COLUMN}'"
                    raise PipelineError(f"row {row} of the request: {getattr(exc, 'reason', exc)}; {fix}") from None

        # batches fill as rows decode and go through the one prediction loop (pipeline.inference)
        probs = self.classifier.probabilities(self.classifier.logits(tensors(), self.batch_size)) if rows \
            else np.zeros((0, len(names)))
        out = pd.DataFrame(probs, columns=names)
        out[PREDICTION_COLUMN] = [names[i] for i in probs.argmax(axis=1)] if len(probs) else []
        return out


def _column(frame: Any, name: str) -> list[Any]:
    """A column's values with pandas' missing markers (None, NaN) as None; all None when it is absent."""
    if name not in frame.columns:
        return [None] * len(frame)
    return [None if v is None or (isinstance(v, float) and np.isnan(v)) else v for v in frame[name].tolist()]


def _image_bytes(value: Any, row: int) -> bytes:
    """Bytes as MLflow's scoring server hands them over (already base64-decoded), or a base64 string in-process."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=False)
        except ValueError:
            raise PipelineError(f"row {row} of the request: '{IMAGE_COLUMN}' is not base64 text") from None
    raise PipelineError(f"row {row} of the request: '{IMAGE_COLUMN}' holds a {type(value).__name__}; "
                        f"send the image file's bytes (base64 in JSON)")


def _load_pyfunc(data_path: str) -> ServedClassifier:
    """MLflow's entry point (the model's loader module): rebuild the classifier from its data folder.

    Raises:
        PipelineError: the folder is not a servable model's, or its calibration does not belong
            to its checkpoint.
    """
    import torch

    from .checkpoint import BEST, load_trained_model, read_calibration

    folder = Path(data_path)
    try:
        meta = json.loads((folder / _META).read_text(encoding="utf-8"))
        pre = ImagePreprocessing(**meta["preprocessing"])
        fmt = int(meta["format"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PipelineError(f"{folder / _META} is missing or damaged ({type(exc).__name__}); log the servable "
                            f"model again with `ecl evaluate`") from None
    if fmt != _FORMAT:
        raise PipelineError(f"{folder / _META}: servable format {fmt} is not {_FORMAT}; serve it with the ecl-pipeline "
                            f"version that logged it, or log it again with `ecl evaluate`")
    _refuse_ct(pre)
    checkpoint = folder / BEST
    temperature = read_calibration(folder, checkpoint=checkpoint)
    if temperature is None:
        raise PipelineError(f"{folder}: no calibration.json fitted for {BEST}; log the servable model again with "
                            f"`ecl evaluate`")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tm = load_trained_model(checkpoint, device=device)
    classifier = ImageClassifier.from_trained(tm, device, preprocessing=pre, temperature=temperature)
    return ServedClassifier(classifier, batch_size=int(tm.config.eval.batch_size))


def _refuse_ct(pre: ImagePreprocessing) -> None:
    if pre.kind == "ct":
        raise PipelineError("CT models are not served: their input is a lesion-centred, windowed crop cut by "
                            "`ecl prepare ct` from a series with the lesion's coordinates; use `ecl evaluate` on "
                            "a prepared cache, or `ecl predict` on those crops")


def write_servable_data(tm: Any, folder: str | Path) -> Path:
    """Fill `folder` with the servable model's data: checkpoint, calibration.json and servable.json.

    The decoding is resolved here (`preprocessing_of`, which may read the training cache), so
    the served model never needs the cache. The checkpoint is hard-linked when it can be.

    Raises:
        PipelineError: the model is a CT model, or its checkpoint has no calibration.json fitted for it.
    """
    from .checkpoint import BEST, CALIBRATION, read_calibration
    from .predict import preprocessing_of

    pre = preprocessing_of(tm)
    _refuse_ct(pre)
    src = Path(tm.checkpoint_path)
    temperature = read_calibration(src.parent, checkpoint=src)
    if temperature is None:
        raise PipelineError(f"{src.parent} has no {CALIBRATION} fitted for {src.name}; run `ecl evaluate` first")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, out / BEST)
    except OSError:  # another file system, or links not allowed
        shutil.copyfile(src, out / BEST)
    shutil.copyfile(src.parent / CALIBRATION, out / CALIBRATION)
    meta = {"format": _FORMAT, "class_names": list(tm.class_names), "temperature": temperature,
            "preprocessing": asdict(pre)}
    atomic_write_text(out / _META, json.dumps(meta, indent=2) + "\n")
    return out


def _fingerprint(tm: Any) -> str:
    """sha256 of the checkpoint and its calibration.json: the same pair is logged once per run."""
    from data_prep import file_sha256

    from .checkpoint import CALIBRATION

    src = Path(tm.checkpoint_path)
    digest = hashlib.sha256(file_sha256(src).encode())
    digest.update((src.parent / CALIBRATION).read_bytes())
    return digest.hexdigest()


def log_servable(tm: Any, uri: str, run_id: str) -> str | None:
    """In the active run `run_id`: log the servable model and register it where the run is registered.

    Called by `ecl evaluate` after it has written calibration.json. A pair of checkpoint and
    calibration already logged to this run is not logged again (evaluating another split refits
    the same temperature). Returns the model URI, or None when nothing was logged (a CT model,
    recorded in the run's tag ``ecl.servable``; or the same model logged before).
    """
    import data_prep

    from . import tracking
    from .predict import preprocessing_of

    try:
        kind = preprocessing_of(tm).kind
    except PipelineError as exc:  # the evaluation stands; only the servable model cannot be made
        tracking.set_tags({"ecl.servable": f"not logged: {exc}"[:5000]})
        return None
    if kind == "ct":
        tracking.set_tags({"ecl.servable": "not logged: CT models are not served (see pipeline/serving.py)"})
        return None
    from .checkpoint import read_calibration

    if read_calibration(Path(tm.checkpoint_path).parent, checkpoint=tm.checkpoint_path) is None:
        tracking.set_tags({"ecl.servable": "not logged: no calibration.json fitted for this checkpoint"})
        return None
    fingerprint = _fingerprint(tm)
    if tracking.get_run(uri, run_id).data.tags.get("ecl.servable_sha256") == fingerprint:
        return None
    names = [*tm.class_names, PREDICTION_COLUMN]
    if len(set(names)) != len(names):
        raise PipelineError(f"a class is named {PREDICTION_COLUMN!r}, the served model's column for the predicted "
                            f"class; rename the class in the cohort")
    with tempfile.TemporaryDirectory(prefix="ecl-servable-") as tmp:
        data = write_servable_data(tm, Path(tmp) / "classifier")
        model_uri = tracking.log_pyfunc_model(
            "pipeline.serving", data, name=SERVABLE,
            inputs=[(IMAGE_COLUMN, "binary"), (PATH_COLUMN, "string")],
            outputs=[*((c, "double") for c in tm.class_names), (PREDICTION_COLUMN, "string")],
            code_paths=[Path(__file__).resolve().parent, Path(data_prep.__file__).resolve().parent],
        )
    for name in tracking.registered_model_names(uri, run_id):
        version = tracking.register_model(model_uri, name)
        print(f"servable model registered as models:/{name}/{version}", file=sys.stderr)
    tracking.set_tags({"ecl.servable": f"runs:/{run_id}/{SERVABLE}", "ecl.servable_sha256": fingerprint})
    return model_uri
