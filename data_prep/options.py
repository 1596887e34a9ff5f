"""Preparation options: ONE definition of the fields, their defaults, bounds and choices.

Why here and not in pipeline: `data_prep` never imports `pipeline`, yet both need the same
rules. `pipeline.config.PrepareConfig` is generated from `PrepareOptions` and `PREPARE_RULES`
(`prepare_config_fields`), so a YAML config and a direct `PrepareOptions(...)` accept exactly
the same values; `check_options` applies the same rules to a `PrepareOptions` built in code.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from typing import Any

__all__ = ["PrepareOptions", "CTOptions", "SALT_ENV", "PREPARE_RULES", "PREPARE_CHOICES", "check_options"]

SALT_ENV = "ECL_PSEUDONYM_SALT"

#: fields restricted to a fixed set of values
PREPARE_CHOICES: dict[str, tuple[str, ...]] = {
    "on_error": ("stop", "skip"),
    "label_key": ("patient", "study", "series"),
    "channels": ("windows", "adjacent", "orthogonal"),  # data_prep.ct.CHANNEL_MODES
}

#: numeric bounds (pydantic's names: gt, ge, lt, le) and a description per field
PREPARE_RULES: dict[str, dict[str, Any]] = {
    "short_side": {"ge": 16, "description": "resize so the shorter side has this many pixels (aspect kept)"},
    "color_constancy": {"description": "shades-of-gray colour constancy, Minkowski p = 6"},
    "train_fraction": {"gt": 0, "lt": 1},
    "val_fraction": {"ge": 0, "lt": 1},
    "test_fraction": {"ge": 0, "lt": 1},
    "split_file": {"description": "CSV (image, split) to use instead of a generated split"},
    "workers": {"ge": 1, "description": "processes; None = all CPU cores"},
    "spacing_mm": {"gt": 0, "description": "isotropic resampling spacing for CT"},
    "crop_mm": {"gt": 0, "description": "edge of the cube cropped around each lesion centre"},
    "ct_image_size": {"ge": 16, "description": "side of the 2D CT inputs in pixels"},
    "slices_per_lesion": {"ge": 1, "description": "axial slices sampled through each lesion"},
    "salt": {"description": "pseudonym salt; else env ECL_PSEUDONYM_SALT; never written to outputs"},
}

_WORDS = {"gt": "greater than", "ge": "at least", "lt": "less than", "le": "at most"}
_TESTS = {"gt": lambda v, b: v > b, "ge": lambda v, b: v >= b, "lt": lambda v, b: v < b, "le": lambda v, b: v <= b}


@dataclass(frozen=True)
class PrepareOptions:
    """How `ecl prepare` builds a cache (dermoscopy, generic images and CT); see PREPARE_RULES."""

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


def check_options(options: PrepareOptions) -> None:
    """Refuse an option outside PREPARE_CHOICES or PREPARE_RULES, naming the key (`prepare.<field>`) and what is allowed.

    Why: options built in code (tests, notebooks, the demo) skip pydantic; every `prepare_*`
    calls this first so a bad value fails in a second, with the same rule the config applies.

    Raises:
        DataPrepError: the first offending field.
    """
    from .errors import DataPrepError

    for name, allowed in PREPARE_CHOICES.items():
        value = getattr(options, name)
        if value not in allowed:
            raise DataPrepError(f"prepare.{name} is {value!r}; use {' or '.join(repr(a) for a in allowed)}."
                                if len(allowed) == 2 else f"prepare.{name} is {value!r}; use one of {', '.join(allowed)}.")
    for f in fields(options):
        rules = {k: v for k, v in PREPARE_RULES.get(f.name, {}).items() if k in _TESTS}
        value = getattr(options, f.name)
        if value is None or not rules:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DataPrepError(f"prepare.{f.name} is {value!r}; give a number.")
        if not all(_TESTS[k](value, bound) for k, bound in rules.items()):
            raise DataPrepError(f"prepare.{f.name} is {value!r}; it must be {' and '.join(_WORDS[k] + ' ' + str(b) for k, b in rules.items())}.")


# CT options are the same object; the alias keeps call sites self-describing.
CTOptions = PrepareOptions
