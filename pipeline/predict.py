"""`ecl predict`: calibrated class probabilities for new images, in the ISIC submission format.

Every image goes through exactly the preprocessing the training cache saw
(`data_prep.load_image_file` with the cache's recorded short side and colour constancy, kept in
the checkpoint, see `preprocessing_of`; then `pipeline.data.eval_transform`), so a prediction here
equals the evaluation's prediction on the same picture. Probabilities are ``softmax(logits / T)``
with the temperature `ecl evaluate` wrote to calibration.json beside the checkpoint and logged as
the run's MLflow artifact, so `--model <run id | models:/...>` on another machine is calibrated too
(T = 1 until the model is evaluated).

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
from pathlib import Path
from typing import Any, Iterator, Sequence

from data_prep import atomic_write_text

from .errors import PipelineError

__all__ = ["run_predict", "find_images", "errors_path", "preprocessing_of", "IMAGE_SUFFIXES", "main"]

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


def preprocessing_of(tm: Any) -> tuple[str, int, bool]:
    """(kind, short side, colour constancy) the model's training cache used to decode its images.

    Read from the checkpoint (recorded from the cache's cache.json when it was saved), else from
    the cache itself when it is here, else from the run's prepare config; a CT run is recognised by
    its cache kind, so it never falls back to the dermoscopy `short_side`.
    """
    pre = getattr(tm, "preprocessing", None)
    cfg = tm.config
    if not pre and cfg.data.cache:
        from data_prep import open_cache

        try:
            cache = open_cache(cfg.data.cache)
        except Exception:  # noqa: BLE001 - absent or damaged here: fall back to the config below
            cache = None
        if cache is not None:
            options = cache.meta.get("options", {}) or {}
            pre = {"kind": cache.kind,
                   "short_side": options.get("ct_image_size" if cache.kind == "ct" else "short_side"),
                   "color_constancy": bool(options.get("color_constancy", False)) and cache.kind != "ct"}
    if pre and pre.get("short_side"):
        kind = str(pre.get("kind", "dermoscopy"))
        return kind, int(pre["short_side"]), bool(pre.get("color_constancy", False)) and kind != "ct"
    kind = "dermoscopy"
    if pre and pre.get("kind"):
        kind = str(pre["kind"])
    if kind == "ct":
        return kind, int(cfg.prepare.ct_image_size), False
    return kind, int(cfg.prepare.short_side), bool(cfg.prepare.color_constancy)


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
    import torch
    from tqdm.auto import tqdm

    from data_prep import DataPrepError, load_image_file

    from .calibration import apply_temperature
    from .checkpoint import load_trained_model
    from .data import eval_transform
    from .inference import default_device, predict_tensors
    from .metrics import write_isic_csv
    from .models import model_data_config

    files = find_images(images)
    device = default_device()
    tm = load_trained_model(model_ref, device=device, tracking_uri=tracking_uri)
    cfg = tm.config
    from .threads import apply_threads, plan_threads

    # predict decodes in this process (no loader workers): every core may compute, unless set
    apply_threads(plan_threads(cfg.train.threads, 0, device))
    kind, short_side, color_constancy = preprocessing_of(tm)
    transform = eval_transform(cfg.data, model_data_config(tm.network))
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
                pixels = load_image_file(path, short_side=short_side, color_constancy=color_constancy)
                x = transform(pixels)
            except DataPrepError as exc:  # one bad file must not stop the batch; it is reported
                reason = str(getattr(exc, "reason", exc))
                errors.append((shown, reason.replace(str(path), shown) if by_position else reason))
                continue
            except Exception as exc:  # noqa: BLE001 - the same for a fault of the transform
                text = f"{type(exc).__name__}: {exc}"
                errors.append((shown, text.replace(str(path), shown) if by_position else text))
                continue
            kept_ids.append(image_id)
            yield torch.as_tensor(x)

    # images are decoded as the batches fill (never all held at once) and go through the one prediction loop
    pred = predict_tensors(tm.network, decoded(), device, cfg.eval.batch_size, len(tm.class_names))

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
    probs = apply_temperature(pred.logits, tm.temperature)
    write_isic_csv(out, kept_ids, probs, tm.class_names)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m pipeline.predict --model REF --images PATH [--out predictions.csv]`."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m pipeline.predict")
    p.add_argument("--model", required=True)
    p.add_argument("--images", required=True)
    p.add_argument("--out", default="predictions.csv")
    p.add_argument("--tracking-uri", default=None)
    a = p.parse_args(argv)
    print(f"predictions: {run_predict(a.model, a.images, out_csv=a.out, tracking_uri=a.tracking_uri)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
