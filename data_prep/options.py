"""Preparation options as a plain dataclass (data_prep cannot import pipeline's pydantic config).

The fields mirror `pipeline.config.PrepareConfig` one to one; the CLI builds this with
`PrepareOptions(**cfg.prepare.model_dump())`, and a test checks the two stay in step.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["PrepareOptions", "CTOptions", "SALT_ENV"]

SALT_ENV = "ECL_PSEUDONYM_SALT"


@dataclass(frozen=True)
class PrepareOptions:
    short_side: int = 256
    color_constancy: bool = False
    train_fraction: float = 0.6
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    split_seed: int = 0
    split_file: str | None = None
    on_error: str = "stop"
    workers: int | None = None
    label_key: str = "patient"
    spacing_mm: float = 1.0
    crop_mm: float = 48.0
    ct_image_size: int = 64
    channels: str = "windows"
    slices_per_lesion: int = 3
    salt: str | None = None
    allow_non_ct: bool = False

    @property
    def fractions(self) -> tuple[float, float, float]:
        return (self.train_fraction, self.val_fraction, self.test_fraction)

    @property
    def n_workers(self) -> int:
        return self.workers or max(1, os.cpu_count() or 1)

    def resolved_salt(self) -> str:
        """The pseudonym salt: options, else $ECL_PSEUDONYM_SALT. Never written to any output."""
        salt = self.salt or os.environ.get(SALT_ENV)
        if not salt:
            from .errors import DataPrepError

            raise DataPrepError(
                f"No pseudonym salt: set prepare.salt in your config (--set prepare.salt=...) or the "
                f"environment variable {SALT_ENV}. Keep it secret and the same across runs of one cohort."
            )
        return salt

    def public_dict(self) -> dict[str, Any]:
        """The options as stored in cache.json: the salt never is."""
        d = asdict(self)
        d.pop("salt")
        return d


# CT options are the same object; the alias keeps call sites self-describing.
CTOptions = PrepareOptions
