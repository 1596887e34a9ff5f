"""PrepareOptions and check_options: one set of bounds and choices (pipeline's PrepareConfig is generated from them)."""
from __future__ import annotations

import dataclasses

import pytest

from data_prep import DataPrepError, PrepareOptions
from data_prep.options import PREPARE_CHOICES, PREPARE_RULES, check_options


def test_defaults_pass_and_every_rule_names_a_field():
    check_options(PrepareOptions())
    names = {f.name for f in dataclasses.fields(PrepareOptions)}
    assert set(PREPARE_RULES) <= names and set(PREPARE_CHOICES) <= names


@pytest.mark.parametrize("field,bad,good", [("short_side", 15, 16), ("ct_image_size", 15, 16), ("train_fraction", 0.0, 0.01),
                                            ("train_fraction", 1.0, 0.99), ("val_fraction", -0.1, 0.0),
                                            ("workers", 0, 1), ("spacing_mm", 0.0, 0.1), ("slices_per_lesion", 0, 1)])
def test_bounds_refuse_just_outside_and_accept_the_edge(field, bad, good):
    check_options(PrepareOptions(**{field: good}))
    with pytest.raises(DataPrepError, match=rf"^prepare\.{field} is {bad!r}; it must be "):
        check_options(PrepareOptions(**{field: bad}))


def test_choices_name_the_allowed_values():
    with pytest.raises(DataPrepError, match=r"^prepare\.on_error is 'ignore'; use 'stop' or 'skip'\.$"):
        check_options(PrepareOptions(on_error="ignore"))
    with pytest.raises(DataPrepError, match=r"^prepare\.channels is 'rgb'; use one of windows, adjacent, orthogonal\.$"):
        check_options(PrepareOptions(channels="rgb"))


def test_channel_choices_match_the_ct_module():
    from data_prep.ct import CHANNEL_MODES

    assert PREPARE_CHOICES["channels"] == tuple(CHANNEL_MODES)
