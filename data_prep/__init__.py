"""Ingestion: raw cohorts (ISIC 2019, generic CSV, folder per class, lung CT DICOM/NIfTI) into prepared caches.

This package never imports `pipeline`; it hands out numpy arrays and plain files. Patient
identifiers stop here: everything it writes carries salted pseudonyms only.

The public surface is below; submodules load on first use so `import data_prep` stays cheap.
"""
from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    # cache contract
    "Cache", "CacheWriter", "open_cache",
    # errors and io
    "DataPrepError", "atomic_open", "atomic_write_bytes", "atomic_write_text", "file_sha256", "bytes_sha256",
    "read_user_csv",
    # preparation
    "PrepareOptions", "CTOptions", "check_options", "PREPARE_RULES", "PREPARE_CHOICES", "prepare_isic2019", "prepare_csv", "prepare_folder", "prepare_ct",
    "make_split",
    # one cohort shape, one builder
    "Cohort", "build_cache", "read_isic2019", "read_csv_cohort", "read_folder", "read_ct",
    # readers
    "Volume", "load_series", "load_image_file",
    # synthetic cohorts
    "generate_dermoscopy", "generate_ct",
    # de-identification
    "pseudonym",
]

_WHERE = {
    "Cache": "cache", "CacheWriter": "cache", "open_cache": "cache",
    "DataPrepError": "errors",
    "atomic_open": "io", "atomic_write_bytes": "io", "atomic_write_text": "io",
    "file_sha256": "io", "bytes_sha256": "io", "read_user_csv": "io",
    "PrepareOptions": "options", "CTOptions": "options", "check_options": "options",
    "PREPARE_RULES": "options", "PREPARE_CHOICES": "options",
    "prepare_isic2019": "prepare_dermoscopy", "prepare_csv": "prepare_images", "prepare_folder": "prepare_images",
    "prepare_ct": "prepare_lung_ct",
    "Cohort": "cohort", "build_cache": "build", "read_isic2019": "prepare_dermoscopy", "read_csv_cohort": "cohort_csv",
    "read_folder": "folder", "read_ct": "prepare_lung_ct",
    "make_split": "splits",
    "Volume": "dicom", "load_series": "dicom",
    "load_image_file": "images",
    "generate_dermoscopy": "synthetic.dermoscopy", "generate_ct": "synthetic.ct",
    "pseudonym": "deid",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        module = importlib.import_module(f".{_WHERE[name]}", __name__)
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'data_prep' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
