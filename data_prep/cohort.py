"""The shared shape of a cohort read from any input format, before any pixel is decoded.

Why one shape: every format (ISIC 2019, a generic CSV, an ISIC Archive export, a folder per
class, lung CT) differs only in how it is listed and how one item becomes pixels. A reader
returns a `Cohort`; `build.build_cache` does the rest (shards, resume, workers, quarantine,
splits, finalize) the same way for all of them.

An *item* is the unit of decoding and of quarantine: one image file, or one CT series that
yields several images (its lesions' slices). The per-row fields (`images`, `labels`, `groups`,
`metadata`) describe the images every item yields, in item order; `item_rows[i]` says how many
rows item i owns. Row names in `images` are what the manifest shows: the cohort's own image ids
(ISIC ids, the CSV's image column) or pseudonyms/positions where a file or folder name may carry
an identifier (CT, the folder-per-class layout).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from .errors import DataPrepError

__all__ = ["Cohort", "Decode", "default_rename"]

#: one item (a picklable description: a file path, a CT series task) -> its uint8 [H, W, C] images
Decode = Callable[[Any], Sequence[np.ndarray]]


def default_rename(item: int, err: DataPrepError) -> DataPrepError:
    """Leave the message as the decoder wrote it (formats whose file names are the cohort's ids)."""
    return err


@dataclass
class Cohort:
    """A checked cohort: what to decode, and the manifest rows it will give.

    Attributes:
        kind: cache kind written to cache.json ("dermoscopy", "image", "ct"); the pipeline reads
            `Cache.kind` (CT is evaluated per patient, predict refuses raw DICOM for it).
        source: the reader ("isic2019", "csv", "isic_archive", "folder", "ct").
        items: picklable decode inputs, one per item.
        item_rows: images each item yields when it decodes.
        images, labels, groups: one per row; a label of None marks an unlabelled row.
        metadata: extra manifest columns, one row per row (may have no columns).
        class_names: classes in order (positions come from here).
        key: what the build key covers besides the options: input hashes, names and sizes.
        splits: a split fixed before decoding (the user's split file, or all "test" for a
            cohort without labels); None = drawn by `make_split` over the rows actually kept.
        notices: remarks printed and stored in cache.json.
        where: what messages name for the cohort as a whole (its CSV or input folder).
        shard_size: items per shard (64 images; 4 CT series).
        rename: (item position, error) -> the error as it may be shown and stored; CT and the
            folder layout replace paths with pseudonyms/positions here.
        quarantine_row: (item position, shown error) -> one quarantine.csv row.
        quarantined: rows found faulty while reading (CT headers), before decoding.
        drop_absent_classes: keep only the classes left after quarantine in `class_names` (CT).
        what: what an item is called in messages.
        preprocessing: format-specific entries added to cache.json's "preprocessing" (CT windows).
    """

    kind: str
    source: str
    items: list[Any]
    item_rows: list[int]
    images: list[str]
    labels: list[str | None]
    groups: list[str | None]
    metadata: pd.DataFrame
    class_names: list[str]
    key: dict[str, Any]
    splits: np.ndarray | None = None
    notices: list[str] = field(default_factory=list)
    where: str = ""
    shard_size: int = 64
    rename: Callable[[int, DataPrepError], DataPrepError] = default_rename
    quarantine_row: Callable[[int, DataPrepError], dict[str, str]] | None = None
    quarantine_columns: tuple[str, ...] = ("file", "reason")
    quarantined: list[dict[str, str]] = field(default_factory=list)
    drop_absent_classes: bool = False
    what: str = "image"  # what an item is called in messages ("image", "series")
    preprocessing: dict[str, Any] = field(default_factory=dict)  # format-specific entries of cache.json's record

    def __post_init__(self) -> None:
        n = sum(self.item_rows)
        if len(self.items) != len(self.item_rows):
            raise ValueError(f"{len(self.items)} items but {len(self.item_rows)} item_rows")
        if not (len(self.images) == len(self.labels) == len(self.groups) == len(self.metadata) == n):
            raise ValueError(f"images, labels, groups and metadata must have one entry per row ({n})")
        if self.splits is not None and len(self.splits) != n:
            raise ValueError("splits must have one entry per row")

    @property
    def labelled(self) -> bool:
        return not all(v is None for v in self.labels)

    def row_item(self) -> np.ndarray:
        """Item position of every row."""
        return np.repeat(np.arange(len(self.items)), self.item_rows)
