"""Tests of pipeline.samplers: determinism, DDP sharding, class frequencies."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import ConfigError
from pipeline.samplers import class_probabilities, create_sampler

# 4 classes, strongly imbalanced: 400, 100, 25, 4 images
COUNTS = np.array([400, 100, 25, 4])
LABELS = np.repeat(np.arange(4), COUNTS)


def _draws(sampler, epochs: int) -> np.ndarray:
    """Positions drawn over several epochs, concatenated."""
    out = []
    for e in range(epochs):
        sampler.set_epoch(e)
        out.append(np.array(list(sampler)))
    return np.concatenate(out)


@pytest.mark.parametrize("kind", ["random", "class_balanced", "sqrt"])
def test_order_deterministic_given_seed_and_epoch(kind):
    a, b = create_sampler(kind, LABELS, seed=3), create_sampler(kind, LABELS, seed=3)
    a.set_epoch(5)
    b.set_epoch(5)
    assert list(a) == list(b)
    b.set_epoch(6)
    assert list(a) != list(b)
    c = create_sampler(kind, LABELS, seed=4)
    c.set_epoch(5)
    assert list(a) != list(c)


@pytest.mark.parametrize("kind", ["random", "class_balanced", "sqrt"])
def test_epoch_length_equals_split_size(kind):
    s = create_sampler(kind, LABELS, seed=0)
    assert len(s) == len(LABELS) == len(list(s))
    assert all(0 <= i < len(LABELS) for i in s)


def test_random_sampler_is_permutation():
    s = create_sampler("random", LABELS, seed=0)
    assert sorted(s) == list(range(len(LABELS)))


@pytest.mark.parametrize("world_size", [2, 3, 5])
def test_shards_equal_length_and_partition_padded_order(world_size):
    n = len(LABELS)  # 529: not a multiple of 2, 3 or 5 -> padding needed
    shards = [create_sampler("random", LABELS, seed=1, rank=r, world_size=world_size) for r in range(world_size)]
    for s in shards:
        s.set_epoch(2)
    lists = [list(s) for s in shards]
    per_rank = -(-n // world_size)
    assert all(len(x) == per_rank == len(s) for x, s in zip(lists, shards))
    # interleaving the shards restores the global (padded) order; every image appears
    merged = np.empty(per_rank * world_size, dtype=np.int64)
    for r, x in enumerate(lists):
        merged[r::world_size] = x
    assert np.array_equal(merged, shards[0].global_order())
    assert set(merged.tolist()) == set(range(n))
    assert len(set(merged[:n].tolist())) == n  # the first n are a permutation
    assert np.array_equal(merged[n:], merged[: len(merged) - n])  # the pad wraps around


def test_class_balanced_frequencies_uniform():
    s = create_sampler("class_balanced", LABELS, seed=0)
    draws = LABELS[_draws(s, 40)]
    freq = np.bincount(draws, minlength=4) / len(draws)
    # 21160 draws: binomial sd of a 0.25 share is 0.003
    np.testing.assert_allclose(freq, 0.25, atol=0.015)


def test_sqrt_frequencies_proportional_to_sqrt_counts():
    s = create_sampler("sqrt", LABELS, seed=0)
    draws = LABELS[_draws(s, 40)]
    freq = np.bincount(draws, minlength=4) / len(draws)
    expected = np.sqrt(COUNTS) / np.sqrt(COUNTS).sum()  # 20, 10, 5, 2 over 37
    np.testing.assert_allclose(freq, expected, atol=0.015)
    np.testing.assert_allclose(class_probabilities("sqrt", COUNTS), [20 / 37, 10 / 37, 5 / 37, 2 / 37])


def test_class_balanced_images_uniform_within_class():
    s = create_sampler("class_balanced", LABELS, seed=0)
    draws = _draws(s, 40)
    rare = draws[LABELS[draws] == 3]  # the 4 images of the rarest class
    freq = np.bincount(rare - COUNTS[:3].sum(), minlength=4) / len(rare)
    np.testing.assert_allclose(freq, 0.25, atol=0.04)


def test_unknown_kind_raises_config_error():
    with pytest.raises(ConfigError, match=r"train.sampler: 'balanced' is not allowed; choose one of random, class_balanced, sqrt"):
        create_sampler("balanced", LABELS, seed=0)


def test_unlabelled_rows_rejected_for_class_aware_sampling():
    with pytest.raises(ConfigError, match="1 have no label"):
        create_sampler("sqrt", np.array([0, 1, -1]), seed=0)
