"""`ecl prepare isic2019` and `ecl prepare csv`: dermoscopy cohorts into a prepared cache.

Order of work, cheapest first, so a typo costs a second and not an hour:

1. Parse and check every CSV and that every listed image file exists (`isic.py`,
   `cohort_csv.py`); nothing is decoded yet.
2. Split: the user's split file (`manifest.read_split_file`) is checked now. A generated split
   (grouped by lesion, stratified by class, `splits.make_split`) is drawn after decoding, over
   the images actually kept, so quarantined files cannot leave a class without training
   images (`splits.check_trainable` refuses a cohort that still has one, or one class only).
   Unlabelled cohorts (the ISIC 2019 test release) go entirely to split "test", the split
   `ecl predict` and `ecl evaluate` read by default.
3. Build key: SHA-256 over the cache format version, the PIL version, the *content* hashes of
   the CSVs (and split file), the (name, byte size) of every image file, the column names and
   `options.public_dict()` without `workers` (the process count never changes a pixel). Image
   files are keyed by size instead of content so that re-checking 25,000 JPEGs costs a
   directory listing, not 9 GB of reading; replacing an image by another of exactly the same
   size is the one change this misses (delete the cache folder to force a rebuild).
   A finished cache with the same key is left alone ("cache up to date").
4. Decode in shards of 64 images over `options.n_workers` processes, each shard written
   atomically by `CacheWriter`: an interrupted run resumes with the missing shards only.
5. Finalize: manifest (image, label, split, group, age_approx, anatom_site_general, sex),
   `cache.json` meta {"kind": "dermoscopy", "class_names", "options", "notices"}.

With `on_error="skip"`, undecodable files are listed in `<out_dir>/quarantine.csv` (file,
reason) and left out of the cache; with the default "stop" the first one raises a
`DataPrepError` naming it.
"""
from __future__ import annotations

import json
import multiprocessing
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import PIL
from tqdm.auto import tqdm

from .cache import FORMAT_VERSION, CacheWriter
from .cohort_csv import read_cohort_csv
from .errors import DataPrepError
from .images import DECODE_VERSION, load_image_file
from .io import atomic_write_text, bytes_sha256, file_sha256
from .isic import ISIC2019_CLASSES, METADATA_COLUMNS, list_image_files, match_images, read_ground_truth, read_metadata
from .manifest import build_manifest, read_split_file, validate_manifest
from .options import PrepareOptions
from .splits import check_trainable, make_split

__all__ = ["prepare_isic2019", "prepare_csv", "SHARD_SIZE"]

SHARD_SIZE = 64
_ON_ERROR = ("stop", "skip")


@dataclass
class _Plan:
    """Everything known before decoding: one entry per image, in manifest order."""

    images: list[str]
    paths: list[Path]
    labels: list[str | None]
    groups: list[str | None]
    metadata: pd.DataFrame
    class_names: list[str]
    source: str
    key_parts: dict = field(default_factory=dict)
    notices: list[str] = field(default_factory=list)
    source_path: str | None = None  # the CSV that lists the images, for messages


def _decode_shard(task: tuple[int, list[str], int, bool]) -> tuple[int, list[np.ndarray], list[tuple[int, str, str, str]]]:
    """Decode one shard; failures come back as (position in shard, file, short reason, full message)."""
    k, paths, short_side, color_constancy = task
    images: list[np.ndarray] = []
    errors: list[tuple[int, str, str, str]] = []
    for j, p in enumerate(paths):
        try:
            images.append(load_image_file(p, short_side=short_side, color_constancy=color_constancy))
        except DataPrepError as exc:
            errors.append((j, p, str(getattr(exc, "reason", exc)), str(exc)))
    return k, images, errors


def _quarantine_path(writer: CacheWriter, k: int) -> Path:
    return writer.build_dir / f"quarantine-{k:06d}.json"


def _check_options(options: PrepareOptions) -> None:
    if options.on_error not in _ON_ERROR:
        raise DataPrepError(f"prepare.on_error is {options.on_error!r}; use 'stop' or 'skip'.")
    if options.short_side < 8:
        raise DataPrepError(f"prepare.short_side is {options.short_side}; use at least 8 pixels (256 is usual).")


def _splits_for(plan: _Plan, options: PrepareOptions) -> np.ndarray:
    if options.split_file:
        plan.notices.append(f"splits read from {options.split_file}")
        return read_split_file(options.split_file, plan.images, plan.groups)
    if all(v is None for v in plan.labels):
        plan.notices.append("no ground truth: every image is in split 'test' (prediction only)")
        return np.full(len(plan.images), "test")
    splits, notices = make_split([str(v) for v in plan.labels], plan.groups, options.fractions, options.split_seed)
    plan.notices.extend(notices)
    return splits


def _build_key(plan: _Plan, options: PrepareOptions) -> str:
    public = options.public_dict()
    public.pop("workers", None)
    payload = {
        "format_version": FORMAT_VERSION,
        "decode_version": DECODE_VERSION,
        "pil": PIL.__version__,
        "source": plan.source,
        "files": plan.key_parts,
        "split_file": file_sha256(options.split_file) if options.split_file else None,
        "images": [[name, p.name, p.stat().st_size] for name, p in zip(plan.images, plan.paths)],
        "options": public,
    }
    return bytes_sha256(json.dumps(payload, sort_keys=True, default=str))


def _build(plan: _Plan, out_dir: Path, options: PrepareOptions) -> Path:
    """Steps 2-5 of the module docstring for a checked plan."""
    known = [v for v in plan.labels if v is not None]
    if known and len(set(known)) < 2:
        raise DataPrepError(f"{plan.source_path or plan.source}: every image has the class {known[0]!r}; a classifier needs at "
                            f"least two classes. Check the label column.", plan.source_path)
    # a split file (or the unlabelled all-test split) is fixed now; a generated split is drawn after decoding,
    # over the images actually kept, so that quarantined files cannot leave a class without training images
    fixed_splits = _splits_for(plan, options) if options.split_file or all(v is None for v in plan.labels) else None
    key = _build_key(plan, options)
    writer = CacheWriter(out_dir, key)
    if writer.is_complete():
        print(f"cache up to date: {out_dir}")
        return out_dir
    for notice in plan.notices:
        print(f"notice: {notice}")
    writer.start()
    n = len(plan.images)
    n_shards = (n + SHARD_SIZE - 1) // SHARD_SIZE
    tasks = [
        (k, [str(p) for p in plan.paths[k * SHARD_SIZE : (k + 1) * SHARD_SIZE]], options.short_side, options.color_constancy)
        for k in range(n_shards)
        if not writer.has_shard(k)
    ]
    if len(tasks) < n_shards:
        print(f"resuming: {n_shards - len(tasks)} of {n_shards} shards already built")
    workers = max(1, min(options.n_workers, len(tasks)))
    with tqdm(total=n_shards, initial=n_shards - len(tasks), desc="decoding", unit="shard", disable=None) as bar:
        if workers == 1:
            results = map(_decode_shard, tasks)
            _store(results, writer, options, bar)
        else:
            with multiprocessing.get_context().Pool(workers) as pool:
                _store(pool.imap(_decode_shard, tasks), writer, options, bar)

    keep = np.ones(n, dtype=bool)
    quarantined: list[tuple[str, str]] = []
    for k in range(n_shards):
        qpath = _quarantine_path(writer, k)
        for j, file, reason, _message in json.loads(qpath.read_text(encoding="utf-8")) if qpath.is_file() else []:
            keep[k * SHARD_SIZE + j] = False
            quarantined.append((file, reason))
    quarantine_csv = out_dir / "quarantine.csv"
    if quarantined:
        atomic_write_text(quarantine_csv, pd.DataFrame(quarantined, columns=["file", "reason"]).to_csv(index=False, lineterminator="\n"))
        plan.notices.append(f"{len(quarantined)} unreadable image(s) quarantined; see {quarantine_csv}")
        print(f"notice: {plan.notices[-1]}")
    elif quarantine_csv.is_file():
        quarantine_csv.unlink()

    if fixed_splits is not None:
        splits = fixed_splits
    else:
        kept = np.flatnonzero(keep)
        drawn, split_notices = make_split([str(plan.labels[i]) for i in kept], [plan.groups[i] for i in kept],
                                          options.fractions, options.split_seed)
        splits = np.full(n, "test", dtype=object)
        splits[kept] = drawn
        for notice in split_notices:
            print(f"notice: {notice}")
        plan.notices.extend(split_notices)
    manifest = build_manifest(plan.images, plan.labels, list(splits), plan.groups, plan.metadata)
    manifest = manifest[keep].reset_index(drop=True)
    if manifest.empty:
        if not quarantined:
            raise DataPrepError(f"{plan.source_path or plan.source}: no images to prepare. Check the CSV and --images/--image-root.",
                                plan.source_path)
        raise DataPrepError(f"No readable image is left after quarantining {len(quarantined)} file(s); see "
                            f"{quarantine_csv}. Check --images/--image-root and the files listed there.", str(quarantine_csv))
    validate_manifest(manifest, plan.class_names)
    if not all(v is None for v in plan.labels):
        check_trainable(list(manifest["label"]), list(manifest["split"]), plan.source_path or plan.source, len(quarantined),
                        generated=not options.split_file)
    meta = {
        "kind": "dermoscopy",
        "source": plan.source,
        "class_names": list(plan.class_names),
        "options": options.public_dict(),
        "notices": list(plan.notices),
    }
    writer.finalize(manifest, n_shards, meta)
    counts = manifest.groupby("split").size().to_dict()
    print(f"prepared {len(manifest)} images into {out_dir} ({', '.join(f'{s}: {c}' for s, c in sorted(counts.items()))})")
    return out_dir


def _store(results, writer: CacheWriter, options: PrepareOptions, bar) -> None:
    for k, images, errors in results:
        if errors and options.on_error == "stop":
            _, file, _reason, message = errors[0]
            raise DataPrepError(message, file)
        # the quarantine list goes first: a shard on disk always has its list beside it
        atomic_write_text(_quarantine_path(writer, k), json.dumps(errors))
        writer.write_shard(k, images)
        bar.update(1)


def _metadata_frame(images: Sequence[str], meta: pd.DataFrame | None, source: str, notices: list[str]) -> tuple[pd.DataFrame, list[str | None]]:
    """Metadata columns and lesion groups aligned with `images` (empty where unknown)."""
    if meta is None:
        frame = pd.DataFrame({c: [""] * len(images) for c in METADATA_COLUMNS})
        return frame, [None] * len(images)
    absent = [img for img in images if img not in meta.index]
    if absent:
        notices.append(f"{len(absent)} image(s) have no row in {Path(source).name}; their metadata is left empty")
    aligned = meta.reindex(list(images)).fillna("")
    groups = [g or None for g in aligned["lesion_id"]]
    return aligned[list(METADATA_COLUMNS)].reset_index(drop=True), groups


def prepare_isic2019(
    images_dir: str | os.PathLike,
    ground_truth_csv: str | os.PathLike | None,
    metadata_csv: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    options: PrepareOptions | None = None,
) -> Path:
    """Prepare an ISIC 2019 cohort (training release, or the test release without ground truth).

    Args:
        images_dir: `ISIC_2019_Training_Input` (or `..._Test_Input`).
        ground_truth_csv: the one-hot ground truth; None for the test release (prediction only:
            labels empty, split "test", class_names the eight ISIC 2019 diagnoses).
        metadata_csv: the metadata CSV, or None (no groups, empty metadata).
        out_dir: cache folder.
        options: preparation options.

    Returns:
        `out_dir`, holding a complete cache.

    Raises:
        DataPrepError: any fault in the inputs, before decoding starts; or an undecodable image
            with `on_error="stop"`.
    """
    options = options or PrepareOptions()
    _check_options(options)
    files = list_image_files(images_dir)
    notices: list[str] = []
    key_parts: dict[str, str | None] = {}
    meta = read_metadata(metadata_csv) if metadata_csv is not None else None
    key_parts["metadata"] = file_sha256(metadata_csv) if metadata_csv is not None else None
    if ground_truth_csv is not None:
        gt = read_ground_truth(ground_truth_csv)
        key_parts["ground_truth"] = file_sha256(ground_truth_csv)
        notices.extend(gt.notices)
        images, labels, class_names = gt.images, list(gt.labels), gt.class_names
        listing_source = ground_truth_csv
    else:
        if meta is not None:
            images = list(meta.index)
            listing_source = metadata_csv
        else:
            images = sorted(files)
            listing_source = images_dir
        labels = [None] * len(images)
        class_names = list(ISIC2019_CLASSES)
    paths, match_notices = match_images(images, files, images_dir, listing_source)
    notices.extend(match_notices)
    metadata, groups = _metadata_frame(images, meta, str(metadata_csv), notices)
    plan = _Plan(images=images, paths=paths, labels=labels, groups=groups, metadata=metadata, class_names=class_names,
                 source="isic2019", key_parts=key_parts, notices=notices,
                 source_path=str(ground_truth_csv) if ground_truth_csv is not None else None)
    return _build(plan, Path(out_dir), options)


def prepare_csv(
    manifest_csv: str | os.PathLike,
    image_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    options: PrepareOptions | None = None,
    image_column: str = "image",
    label_column: str = "label",
    group_column: str = "group",
) -> Path:
    """Prepare a generic `image,label[,group][,metadata...]` cohort (or an ISIC Archive export).

    Class names are the labels present, sorted alphabetically. Metadata columns named `split`
    are dropped (the split comes from `make_split` or `options.split_file`).

    Raises:
        DataPrepError: any fault in the CSV or a missing image, before decoding starts.
    """
    options = options or PrepareOptions()
    _check_options(options)
    cohort = read_cohort_csv(manifest_csv, image_root, image_column, label_column, group_column)
    metadata = cohort.metadata.drop(columns=[c for c in cohort.metadata.columns if c in ("image", "label", "split", "group")])
    plan = _Plan(
        images=cohort.images, paths=cohort.paths, labels=list(cohort.labels), groups=cohort.groups, metadata=metadata,
        class_names=cohort.class_names, source="csv",
        key_parts={"manifest": file_sha256(manifest_csv), "columns": f"{image_column},{label_column},{group_column}"},
        notices=list(cohort.notices), source_path=str(manifest_csv),
    )
    return _build(plan, Path(out_dir), options)
