"""Epoch samplers over the training split: random, class-balanced and square-root.

Why our own samplers rather than torch's DistributedSampler + WeightedRandomSampler: imbalance
methods need class-aware sampling *and* DDP sharding *and* exact reproducibility on resume. Each
sampler draws one epoch's order from a generator seeded by (seed, epoch) only, so every rank
computes the same global order and takes its own stride of it, and a resumed run replays the very
same order. Like DistributedSampler, the global order is padded (wrapping around) to a multiple of
the world size so every rank runs the same number of steps.

Kinds (`train.sampler`):
- `random`: a permutation of the split (each image once per epoch).
- `class_balanced`: each class equally likely, images uniform within a class (with replacement).
- `sqrt`: class c drawn with probability proportional to sqrt(n_c) (with replacement).
An epoch has len(split) draws in every kind.
"""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np

from .errors import ConfigError

__all__ = ["EpochSampler", "create_sampler", "class_probabilities", "SAMPLER_KINDS"]

SAMPLER_KINDS = ("random", "class_balanced", "sqrt")


def class_probabilities(kind: str, class_counts: np.ndarray) -> np.ndarray:
    """Probability of drawing each class under a sampler kind (classes without images get 0).

    Args:
        kind: one of SAMPLER_KINDS.
        class_counts: [C] images per class.
    """
    counts = np.asarray(class_counts, dtype=np.float64)
    if kind == "random":
        weights = counts
    elif kind == "class_balanced":
        weights = (counts > 0).astype(np.float64)
    elif kind == "sqrt":
        weights = np.sqrt(counts)
    else:
        raise ConfigError(f"train.sampler: {kind!r} is not allowed; choose one of {', '.join(SAMPLER_KINDS)}.")
    total = weights.sum()
    if total <= 0:
        raise ConfigError("train.sampler: the training split has no labelled images to sample from.")
    return weights / total


class EpochSampler:
    """Deterministic, rank-sharded sampler yielding positions 0..N-1 into the `labels` it was given.

    Args:
        kind: "random", "class_balanced" or "sqrt".
        labels: [N] int class positions of the training images (all >= 0).
        seed: run seed (`train.seed`).
        rank: this process's rank.
        world_size: number of processes.
    """

    def __init__(self, kind: str, labels: np.ndarray, seed: int, rank: int = 0, world_size: int = 1):
        labels = np.asarray(labels, dtype=np.int64)
        if kind not in SAMPLER_KINDS:
            raise ConfigError(f"train.sampler: {kind!r} is not allowed; choose one of {', '.join(SAMPLER_KINDS)}.")
        if labels.ndim != 1 or len(labels) == 0:
            raise ConfigError("train.sampler: the training split is empty; check the cache's manifest 'split' column.")
        if kind != "random" and labels.min() < 0:
            raise ConfigError("train.sampler: class-aware sampling needs every training image labelled; "
                              f"{int((labels < 0).sum())} have no label.")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.kind = kind
        self.labels = labels
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.epoch = 0
        self.num_samples = math.ceil(len(labels) / self.world_size)  # per rank
        self.total_size = self.num_samples * self.world_size
        if kind != "random":
            counts = np.bincount(labels, minlength=int(labels.max()) + 1)
            per_class = class_probabilities(kind, counts)
            # An image's probability is its class's share divided evenly among the class's images.
            self._p = per_class[labels] / counts[labels]
            self._p /= self._p.sum()

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order `__iter__` yields (call before each epoch, as with DistributedSampler)."""
        self.epoch = int(epoch)

    def global_order(self) -> np.ndarray:
        """The whole epoch's order (all ranks), padded to `total_size`; identical on every rank."""
        rng = np.random.default_rng([self.seed, self.epoch, 0x5A17])
        n = len(self.labels)
        if self.kind == "random":
            order = rng.permutation(n)
        else:
            order = rng.choice(n, size=n, replace=True, p=self._p)
        pad = self.total_size - n
        if pad:
            order = np.concatenate([order, np.resize(order, pad)])
        return order

    def __iter__(self) -> Iterator[int]:
        return iter(self.global_order()[self.rank :: self.world_size].tolist())

    def __len__(self) -> int:
        return self.num_samples


def create_sampler(kind: str, labels: np.ndarray, seed: int, rank: int = 0, world_size: int = 1) -> EpochSampler:
    """Build the `train.sampler` kind over the training labels (see EpochSampler)."""
    return EpochSampler(kind, labels, seed, rank=rank, world_size=world_size)
