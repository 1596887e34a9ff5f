"""`ecl predict`: calibrated class probabilities for new images, in the ISIC submission format.

Every image goes through exactly the preprocessing the training cache saw
(`data_prep.load_image_file` with the cache's recorded short side and colour constancy, kept in
the checkpoint, see `preprocessing_of`; then `pipeline.data.eval_transform`), so a prediction here
equals the evaluation's prediction on the same picture. Probabilities are ``softmax(logits / T)``
with the temperature `ecl evaluate` wrote to calibration.json beside the checkpoint and logged as
the run's MLflow artifact, so `--model <run id | models:/...>` on another machine is calibrated too
(T = 1 until the model is evaluated). Decoding, transform, forward pass and temperature are
`ImageClassifier`'s, which the served MLflow model (`pipeline.serving`) uses too: one code path.

Supported inputs: one JPEG/PNG file, or a folder searched recursively for ``*.jpg``, ``*.jpeg``,
``*.png`` (any case). For CT models (cache kind "ct") the inputs must be 2D images in the cache's
own representation (the `prepare.ct_image_size` crops with the configured channels, saved as
PNG); a raw DICOM series cannot be classified directly because the cache's lesion crops need
lesion coordinates that a bare series does not carry: prepare it with `ecl prepare ct` and run
`ecl evaluate` instead. DICOM files given here are reported with that explanation.

An unreadable file never stops the run: it is listed on stderr and in ``<out stem>.errors.csv``
beside the predictions (columns file, error). DICOM files, and every input of a CT model, are
named there by position ("input 3 of 40 under --images"), never by a path that may carry a name.
"""
from __future__ import annotations

import csv
import io
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from data_prep import atomic_write_text

from .errors import PipelineError

__all__ = ["run_predict", "find_images", "errors_path", "preprocessing_of", "ImagePreprocessing", "ImageClassifier",
           "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_DICOM_SUFFIXES = (".dcm", ".dicom")


def find_images(images: str | Path) -> list[Path]:
    """The image files to predict: the file itself, or every JPEG/PNG/DICOM under a folder, sorted.

    Raises:
        PipelineError: the path does not exist, or a folder holds no image.
    """
    root = Path(images)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise PipelineError(f"--images {root} does not exist; give a JPEG/PNG file or a folder of them")
    found = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES + _DICOM_SUFFIXES)
    if not found:
        raise PipelineError(f"--images {root}: no .jpg, .jpeg or .png files in this folder or below it")
    return found


def errors_path(out_csv: str | Path) -> Path:
    """`predictions.csv` -> `predictions.errors.csv` (the list of files that could not be read)."""
    out = Path(out_csv)
    return out.with_name(f"{out.stem}.errors.csv")


def _image_ids(files: Sequence[Path], root: Path) -> list[str]:
    """File stems (ISIC ids); files sharing a stem in different folders get their relative path."""
    stems = [f.stem for f in files]
    dup = {s for s in stems if stems.count(s) > 1}
    out = []
    for f in files:
        if f.stem in dup and root.is_dir():
            out.append(f.relative_to(root).with_suffix("").as_posix())
        else:
            out.append(f.stem)
    return out


@dataclass(frozen=True)
class ImagePreprocessing:
    """How the model's training cache decoded a file into pixels (see `data_prep.load_image_file`)."""

    kind: str  # cache kind: "dermoscopy" or "ct"
    short_side: int
    color_constancy: bool


def preprocessing_of(tm: Any) -> ImagePreprocessing:
    """The decoding (kind, short side, colour constancy) the model's training cache used for its images.

    Read from the checkpoint (recorded from the cache's cache.json when it was saved), else from
    the cache itself when it is here; never from the run's `prepare` config, which says how a
    cache *would* be built, not how this one was (the cache may come from another config or
    have been built before a config change). A CT run is recognised by its cache kind, so it is
    never resized like dermoscopy.

    Raises:
        PipelineError: neither the checkpoint nor a cache here records the preprocessing.
    """
    from .checkpoint import preprocessing_from_meta

    pre = getattr(tm, "preprocessing", None)
    cache_dir = tm.config.data.cache
    if not (pre and pre.get("short_side")) and cache_dir:
        from data_prep import open_cache

        try:
            cache = open_cache(cache_dir)
        except Exception:  # noqa: BLE001 - absent or damaged here: the error below says what to do
            cache = None
        if cache is not None:
            pre = preprocessing_from_meta(cache.meta)
            if not (pre and pre.get("short_side")):
                raise PipelineError(
                    f"{tm.checkpoint_path}: neither the checkpoint nor its training cache {cache_dir} records how "
                    f"images were decoded (a cache written without `ecl prepare`). Rebuild the cache with "
                    f"`ecl prepare` and retrain, so the checkpoint records its preprocessing.")
    if not (pre and pre.get("short_side")):
        raise PipelineError(
            f"{tm.checkpoint_path}: the checkpoint does not record how its training cache decoded images, and that "
            f"cache ({cache_dir or 'data.cache unset'}) is not here to ask. Run `ecl predict` where the cache is, or "
            f"rebuild the cache with `ecl prepare` and retrain, so the checkpoint records its preprocessing.")
    kind = str(pre.get("kind", "dermoscopy"))
    return ImagePreprocessing(kind, int(pre["short_side"]), bool(pre.get("color_constancy", False)) and kind != "ct")


@dataclass
class ImageClassifier:
    """A trained network with its decoding, transform and temperature: images in, calibrated probabilities out.

    Why one class: `ecl predict` and the served MLflow model (`pipeline.serving`) must give the
    same numbers for the same file, so both go through these methods and neither keeps its own
    copy of the decoding, the transform or the temperature.
    """

    network: Any  # torch.nn.Module in eval mode on `device`
    class_names: list[str]
    temperature: float
    preprocessing: ImagePreprocessing
    transform: Any  # pipeline.data.eval_transform of the run's data config
    device: str

    @classmethod
    def from_trained(cls, tm: Any, device: str, preprocessing: ImagePreprocessing | None = None,
                     temperature: float | None = None) -> "ImageClassifier":
        """Wrap a `TrainedModel`; preprocessing and temperature default to the checkpoint's own."""
        from .data import eval_transform
        from .models import model_data_config

        return cls(network=tm.network, class_names=list(tm.class_names),
                   temperature=float(tm.temperature if temperature is None else temperature),
                   preprocessing=preprocessing or preprocessing_of(tm),
                   transform=eval_transform(tm.config.data, model_data_config(tm.network)), device=device)

    def tensor(self, image: str | Path | bytes, name: str | None = None) -> Any:
        """One image file (or its bytes) decoded as the training cache did, then the evaluation transform.

        Raises:
            DataPrepError: the image cannot be decoded (`name` says which input, for bytes).
        """
        import torch

        from data_prep import load_image_file

        pre = self.preprocessing
        pixels = load_image_file(image, short_side=pre.short_side, color_constancy=pre.color_constancy, name=name)
        return torch.as_tensor(self.transform(pixels))

    def logits(self, tensors: Iterable[Any], batch_size: int = 64) -> np.ndarray:
        """float64 logits [N, C] of `tensor` outputs (a list or a generator), through the one prediction loop."""
        from .inference import predict_tensors

        return predict_tensors(self.network, tensors, self.device, batch_size, len(self.class_names)).logits

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated probabilities: ``softmax(logits / T)`` with the fitted temperature."""
        from .calibration import apply_temperature

        return apply_temperature(logits, self.temperature)


def run_predict(model_ref: str | Path, images: str | Path, out_csv: str | Path = "predictions.csv",
                tracking_uri: str | None = None) -> Path:
    """Predict calibrated probabilities for image files and write them as an ISIC CSV.

    Args:
        model_ref: checkpoint file, run folder or MLflow run id.
        images: an image file or a folder (searched recursively).
        out_csv: output CSV: ``image`` then one probability column per class, in class order.
        tracking_uri: MLflow store, when `model_ref` is a run id.

    Returns:
        The path of the CSV written.

    Raises:
        PipelineError: no input images, or none of them could be read.
    """
    from tqdm.auto import tqdm

    from data_prep import DataPrepError

    from .checkpoint import load_trained_model
    from .inference import default_device
    from .metrics import write_isic_csv

    files = find_images(images)
    device = default_device()
    tm = load_trained_model(model_ref, device=device, tracking_uri=tracking_uri)
    cfg = tm.config
    from .threads import apply_threads, plan_threads

    # predict decodes in this process (no loader workers): every core may compute, unless set
    apply_threads(plan_threads(cfg.train.threads, 0, device))
    classifier = ImageClassifier.from_trained(tm, device)
    kind = classifier.preprocessing.kind
    ids = _image_ids(files, Path(images))

    kept_ids: list[str] = []
    errors: list[tuple[str, str]] = []

    def decoded() -> Iterator[Any]:
        """Each readable input's tensor, in order; unreadable ones are listed in `errors`, not yielded."""
        for n, (path, image_id) in enumerate(tqdm(list(zip(files, ids)), desc="predict", unit="image", leave=False),
                                             start=1):
            # DICOM files and the inputs of a CT model are named by position: their names may carry identifiers
            by_position = kind == "ct" or path.suffix.lower() in _DICOM_SUFFIXES
            shown = f"input {n} of {len(files)} under --images" if by_position else str(path)
            if path.suffix.lower() in _DICOM_SUFFIXES:
                errors.append((shown, "DICOM input is not supported by `ecl predict`: a CT series needs lesion "
                                      "coordinates; prepare it with `ecl prepare ct` and use `ecl evaluate`"))
                continue
            try:
                x = classifier.tensor(path)
            except DataPrepError as exc:  # one bad file must not stop the batch; it is reported
                reason = str(getattr(exc, "reason", exc))
                errors.append((shown, reason.replace(str(path), shown) if by_position else reason))
                continue
            except Exception as exc:  # noqa: BLE001 - the same for a fault of the transform
                text = f"{type(exc).__name__}: {exc}"
                errors.append((shown, text.replace(str(path), shown) if by_position else text))
                continue
            kept_ids.append(image_id)
            yield x

    # images are decoded as the batches fill (never all held at once) and go through the one prediction loop
    logits = classifier.logits(decoded(), cfg.eval.batch_size)

    out = Path(out_csv)
    err_file = errors_path(out)
    if errors:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["file", "error"])
        writer.writerows(errors)
        atomic_write_text(err_file, buf.getvalue())
        for file, msg in errors:
            print(f"ecl predict: skipped {file}: {msg}", file=sys.stderr)
        print(f"ecl predict: {len(errors)} of {len(files)} files could not be read; listed in {err_file}",
              file=sys.stderr)
    elif err_file.exists():
        err_file.unlink()  # a stale list from an earlier run would be misleading
    if not kept_ids:
        raise PipelineError(f"none of the {len(files)} files under {images} could be read; see {err_file}")
    probs = classifier.probabilities(logits)
    write_isic_csv(out, kept_ids, probs, tm.class_names)
    return out


if __name__ == "__main__":  # `python -m pipeline.predict ARGS` is `ecl predict ARGS` (one parser: pipeline.cli)
    from pipeline.cli import main as _ecl_main

    sys.exit(_ecl_main(["predict", *sys.argv[1:]]))
