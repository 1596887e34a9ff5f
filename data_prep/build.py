"""`build_cache`: one cache builder for every cohort format.

Order of work, for a `Cohort` a reader has already checked (nothing decoded yet):

1. Build key: SHA-256 over the cohort's `key` (input hashes, names, sizes, decoder versions),
   the split file's content hash and `options.public_dict()` without `workers` (the process
   count never changes a pixel). A finished cache with the same key is left alone ("cache up
   to date").
2. Decode in shards of `cohort.shard_size` items over `options.n_workers` processes, with a
   progress bar. Each shard's quarantine record (`quarantine-<k>.json`) is written before its
   pixels, both atomically, so an interrupted run resumes with the missing shards only and
   still knows which items of the finished shards failed.
3. A decoding fault stops the run (`on_error="stop"`, the error as `cohort.rename` shows it) or
   quarantines the item (`"skip"`: quarantine.csv lists `cohort.quarantine_row` of each, after
   the rows the reader already refused).
4. Split: the cohort's fixed split (a split file; all "test" without labels), else
   `splits.make_split` over the rows actually kept, so quarantined items cannot leave a class
   without training images; `splits.check_trainable` refuses a cohort that still has one.
5. Finalize (`CacheWriter.finalize`): pixels.u8, index.npy, manifest.csv (rows of the kept
   items, in item order) and cache.json with kind, source, class_names, options, the
   preprocessing `ecl predict` must repeat (`preprocessing`), and notices.
"""
from __future__ import annotations

import json
import multiprocessing
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from .cache import CacheWriter
from .cohort import Cohort, Decode
from .errors import DataPrepError
from .io import atomic_write_text, bytes_sha256, file_sha256
from .manifest import build_manifest, validate_manifest
from .options import PrepareOptions, check_options
from .splits import check_trainable, make_split

__all__ = ["build_cache", "cache_key", "fixed_splits", "is_up_to_date", "preprocessing_record"]


def cache_key(parts: dict[str, Any], options: PrepareOptions) -> str:
    """The build key of a cohort described by `parts` under `options` (see the module docstring)."""
    public = options.public_dict()
    public.pop("workers", None)
    payload = {**parts, "split_file": file_sha256(options.split_file) if options.split_file else None, "options": public}
    return bytes_sha256(json.dumps(payload, sort_keys=True, default=str))


def is_up_to_date(out_dir: str | Path, parts: dict[str, Any], options: PrepareOptions) -> bool:
    """True (and says so) when `out_dir` already holds the finished cache of these inputs.

    Why separate: a reader whose listing is slow (CT: every DICOM header) asks this first.
    """
    if CacheWriter(out_dir, cache_key(parts, options)).is_complete():
        print(f"cache up to date: {out_dir}")
        return True
    return False


def preprocessing_record(kind: str, options: PrepareOptions, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """How this cache turned files into pixels: what `ecl predict` must repeat on a new file.

    `short_side` is the side a 2D input was resized to (for CT: `ct_image_size`), so a reader
    of this record needs no knowledge of the kind to resize a new image.
    """
    if kind == "ct":
        rec = {"kind": kind, "short_side": options.ct_image_size, "color_constancy": False,
               "ct_image_size": options.ct_image_size, "channels": options.channels, "spacing_mm": options.spacing_mm,
               "crop_mm": options.crop_mm, "slices_per_lesion": options.slices_per_lesion}
    else:
        rec = {"kind": kind, "short_side": options.short_side, "color_constancy": options.color_constancy}
    return {**rec, **(extra or {})}


def _decode_shard(job: tuple[int, list[Any], Decode]) -> tuple[int, list[np.ndarray], list[tuple[int, int]], list[tuple[int, str | None, str, str]]]:
    """Decode one shard in a worker: images, (item, image count) per decoded item, and failures
    as (item in shard, path, short reason, full message); the parent decides what a failure means."""
    k, items, decode = job
    images: list[np.ndarray] = []
    counts: list[tuple[int, int]] = []
    failures: list[tuple[int, str | None, str, str]] = []
    for j, item in enumerate(items):
        try:
            got = list(decode(item))
        except DataPrepError as exc:
            failures.append((j, exc.path, str(getattr(exc, "reason", exc)), str(exc)))
            continue
        images.extend(got)
        counts.append((j, len(got)))
    return k, images, counts, failures


def _record_path(writer: CacheWriter, k: int) -> Path:
    return writer.build_dir / f"quarantine-{k:06d}.json"


def _default_row(item: int, err: DataPrepError) -> dict[str, str]:
    return {"file": err.path or "", "reason": str(getattr(err, "reason", err))}


def _store(results: Iterable, cohort: Cohort, writer: CacheWriter, options: PrepareOptions, bar: Any) -> None:
    row_of = cohort.quarantine_row or _default_row
    for k, images, counts, failures in results:
        base = k * cohort.shard_size
        records = []
        for j, path, reason, message in failures:
            err = DataPrepError(message, path)
            err.reason = reason  # type: ignore[attr-defined]
            shown = cohort.rename(base + j, err)
            if options.on_error == "stop":
                raise shown
            records.append([j, row_of(base + j, shown)])
        for j, n in counts:
            if n != cohort.item_rows[base + j]:
                raise ValueError(f"item {base + j} decoded to {n} images; the cohort promised {cohort.item_rows[base + j]}")
        # the quarantine record goes first: a shard on disk always has its record beside it
        atomic_write_text(_record_path(writer, k), json.dumps(records))
        writer.write_shard(k, images)
        bar.update(1)


def build_cache(cohort: Cohort, decode: Decode, out_dir: str | Path, options: PrepareOptions, kind: str | None = None) -> Path:
    """Decode a checked cohort into a finished cache at `out_dir` (see the module docstring).

    Args:
        cohort: from a reader (`read_isic2019`, `read_csv_cohort`, `read_folder`, `read_ct`).
        decode: picklable; one item -> its images (raising DataPrepError for a bad item).
        out_dir: the cache folder.
        options: the preparation options (checked here too).
        kind: cache kind for cache.json; default `cohort.kind`.

    Returns:
        `out_dir`.

    Raises:
        DataPrepError: one class only, a bad item with on_error="stop", nothing left after
            quarantine, or a class without training images.
    """
    check_options(options)
    kind = kind or cohort.kind
    out_dir = Path(out_dir)
    where = cohort.where or cohort.source
    known = [v for v in cohort.labels if v is not None]
    if known and len(set(known)) < 2:
        raise DataPrepError(f"{where}: every image has the class {known[0]!r}; a classifier needs at least two classes. "
                            f"Check the label column.", where)
    writer = CacheWriter(out_dir, cache_key(cohort.key, options))
    if writer.is_complete():
        print(f"cache up to date: {out_dir}")
        return out_dir
    notices = list(cohort.notices)
    for notice in notices:
        print(f"notice: {notice}")
    writer.start()
    size = cohort.shard_size
    n_items = len(cohort.items)
    n_shards = (n_items + size - 1) // size
    jobs = [(k, cohort.items[k * size:(k + 1) * size], decode) for k in range(n_shards)
            if not (writer.has_shard(k) and _record_path(writer, k).is_file())]
    if len(jobs) < n_shards:
        print(f"resuming: {n_shards - len(jobs)} of {n_shards} shards already built")
    workers = max(1, min(options.n_workers, len(jobs)))
    with tqdm(total=n_shards, initial=n_shards - len(jobs), desc=f"decoding {cohort.what}s", unit="shard", disable=None) as bar:
        if workers == 1:
            _store(map(_decode_shard, jobs), cohort, writer, options, bar)
        else:
            # forkserver, not fork: the parent may already have run torch/OpenMP (MONAI's resampling, an
            # earlier cache in the same process), and a forked child of a process that used OpenMP can
            # hang in its first parallel region. Jobs and `decode` are picklable for this reason.
            with multiprocessing.get_context("forkserver").Pool(workers) as pool:
                _store(pool.imap(_decode_shard, jobs), cohort, writer, options, bar)

    item_ok = np.ones(n_items, dtype=bool)
    quarantined = [dict(r) for r in cohort.quarantined]
    for k in range(n_shards):
        for j, row in json.loads(_record_path(writer, k).read_text(encoding="utf-8")):
            item_ok[k * size + j] = False
            quarantined.append(row)
    keep = item_ok[cohort.row_item()]
    quarantine_csv = out_dir / "quarantine.csv"
    if options.on_error == "skip":
        table = pd.DataFrame([[r.get(c, "") for c in cohort.quarantine_columns] for r in quarantined], columns=list(cohort.quarantine_columns))
        atomic_write_text(quarantine_csv, table.to_csv(index=False, lineterminator="\n"))
        if quarantined:
            notices.append(f"{len(quarantined)} input(s) quarantined; see {quarantine_csv}")
            print(f"notice: {notices[-1]}")
    elif quarantine_csv.is_file():
        quarantine_csv.unlink()  # a stale list of an earlier skip run would mislead
    if not keep.any():
        if not quarantined:
            raise DataPrepError(f"{where}: no {cohort.what}s to prepare. Check the input listing.", where)
        raise DataPrepError(f"No readable {cohort.what} is left after quarantining {len(quarantined)} file(s); see "
                            f"{quarantine_csv}. Check the input folder and the files listed there.", str(quarantine_csv))

    kept = np.flatnonzero(keep)
    if cohort.splits is not None:
        splits = np.asarray(cohort.splits, dtype=object)
    else:
        drawn, split_notices = make_split([str(cohort.labels[i]) for i in kept], [cohort.groups[i] for i in kept],
                                          options.fractions, options.split_seed)
        splits = np.full(len(keep), "test", dtype=object)
        splits[kept] = drawn
        for notice in split_notices:
            print(f"notice: {notice}")
        notices.extend(split_notices)
    manifest = build_manifest(cohort.images, cohort.labels, list(splits), cohort.groups, cohort.metadata)
    manifest = manifest[keep].reset_index(drop=True)
    class_names = list(cohort.class_names)
    if cohort.drop_absent_classes:
        present = set(manifest["label"])
        lost = [c for c in class_names if c not in present]
        if lost:
            notices.append(f"class(es) {', '.join(lost)} lost every {cohort.what} to quarantine and are left out")
            print(f"notice: {notices[-1]}")
        class_names = [c for c in class_names if c in present]
    validate_manifest(manifest, class_names)
    if cohort.labelled:
        check_trainable(list(manifest["label"]), list(manifest["split"]), where, len(quarantined),
                        generated=cohort.splits is None)
    meta = {
        "kind": kind,
        "source": cohort.source,
        "class_names": class_names,
        "options": options.public_dict(),
        "preprocessing": preprocessing_record(kind, options, cohort.preprocessing),
        "notices": notices,
    }
    writer.finalize(manifest, n_shards, meta)
    counts = manifest.groupby("split").size().to_dict()
    print(f"prepared {len(manifest)} images into {out_dir} ({', '.join(f'{s}: {c}' for s, c in sorted(counts.items()))})")
    return out_dir


def fixed_splits(images: list[str], groups: list[str | None], labels: list[str | None], options: PrepareOptions,
                 notices: list[str]) -> np.ndarray | None:
    """The split known before decoding: the user's split file (checked now: a typo costs a second),
    or all "test" for a cohort without labels (the split `ecl predict`/`evaluate` read by default);
    None when `build_cache` is to draw it over the rows actually kept."""
    from .manifest import read_split_file

    if options.split_file:
        notices.append("splits read from the split file (prepare.split_file)")
        return read_split_file(options.split_file, images, groups)
    if all(v is None for v in labels):
        notices.append("no ground truth: every image is in split 'test' (prediction only)")
        return np.full(len(images), "test")
    return None
