"""Stratified, grouped train/val/test splits.

Why grouped: several dermoscopy images show the same lesion (ISIC `lesion_id`), and a CT patient
gives several crops; a group in two splits leaks near-duplicates into the test set and inflates
every metric. Why stratified: the rare classes are the point of the cohort, so every class should
appear in every split whenever it has enough groups, and when it has not, the user is told.

Hand-written (sklearn's StratifiedGroupKFold only makes equal folds, not arbitrary fractions).
"""
from __future__ import annotations

from collections import Counter, defaultdict
from typing import Sequence

import numpy as np

__all__ = ["make_split", "SPLIT_NAMES", "check_trainable"]

SPLIT_NAMES = ("train", "val", "test")


def make_split(
    labels: Sequence[str],
    groups: Sequence[str | None],
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
    seed: int = 0,
) -> tuple[np.ndarray, list[str]]:
    """Assign each sample to 'train', 'val' or 'test', never splitting a group.

    Each group is filed under its most frequent label. Within a class, groups are shuffled with
    `seed`; every split of non-zero fraction first receives one group, then each remaining group
    goes to the split furthest below its target share of that class's images. A class with fewer
    groups than splits fills train first, then test, then val (evaluation needs test more than
    model selection needs val), and a notice says where it is absent.

    Args:
        labels: class name per sample.
        groups: group id per sample; None or "" makes the sample its own group.
        fractions: train, val, test fractions (need not sum exactly to 1; they are normalised).
        seed: shuffling seed; the same inputs and seed always give the same split.

    Returns:
        (splits, notices): an array of split names per sample, and plain sentences about classes
        that could not be placed in every split.
    """
    labels = [str(v) for v in labels]
    if len(labels) != len(groups):
        raise ValueError("labels and groups differ in length")
    frac = np.asarray(fractions, dtype=float)
    if (frac < 0).any() or frac.sum() <= 0:
        raise ValueError(f"split fractions {fractions} must be non-negative with a positive sum")
    frac = frac / frac.sum()
    gid = [str(g) if g not in (None, "") and not (isinstance(g, float) and np.isnan(g)) else f"__self__{i}" for i, g in enumerate(groups)]

    members: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(gid):
        members[g].append(i)
    by_class: dict[str, list[str]] = defaultdict(list)
    for g, idx in members.items():
        label = Counter(labels[i] for i in idx).most_common(1)[0][0]
        by_class[label].append(g)

    rng = np.random.default_rng(seed)
    active = [s for s in range(3) if frac[s] > 0]
    # seed order: the smallest non-zero fractions first, so rare classes reach val and test
    seed_order = sorted(active, key=lambda s: (frac[s], -s))
    assignment: dict[str, int] = {}
    notices: list[str] = []
    for label in sorted(by_class):
        glist = sorted(by_class[label])
        rng.shuffle(glist)
        sizes = {g: len(members[g]) for g in glist}
        total = sum(sizes.values())
        filled = np.zeros(3)
        order = list(glist)
        # seed one group per active split; with too few groups: train, then test, then val
        if len(order) < len(active):
            seeds = sorted(active, key=lambda s: (-frac[s], -s))[: len(order)]
            missing = [SPLIT_NAMES[s] for s in active if s not in seeds]
            notices.append(
                f"class '{label}' has only {len(order)} group(s), so it cannot appear in every split "
                f"(absent from: {', '.join(missing)})"
            )
        else:
            seeds = seed_order
        for s in seeds:
            g = order.pop(0)
            assignment[g] = s
            filled[s] += sizes[g]
        for g in order:
            deficit = frac * total - filled
            s = int(max(active, key=lambda k: (deficit[k], frac[k])))
            assignment[g] = s
            filled[s] += sizes[g]

    out = np.empty(len(labels), dtype=object)
    for g, idx in members.items():
        out[idx] = SPLIT_NAMES[assignment[g]]
    return out.astype(str), notices


def check_trainable(labels: Sequence[str], splits: Sequence[str], where: str, quarantined: int = 0,
                    generated: bool = True) -> None:
    """Refuse a labelled cohort that training cannot use: one class only, or a class without any train image.

    Why here: both faults are otherwise found an hour later (a one-class softmax, a class the
    model never sees), or never, when `--on-error skip` quietly drops a class's last train images.

    Args:
        labels: class per kept image.
        splits: split per kept image.
        where: what to name in the message (the CSV or input folder).
        quarantined: files left out by `on_error='skip'` (the message then points at them).
        generated: the split was drawn by `make_split`; a user's split file is taken as meant and
            only the one-class check applies.

    Raises:
        DataPrepError: naming the classes and what to do.
    """
    from .errors import DataPrepError

    classes = sorted(set(labels))
    if len(classes) < 2:
        raise DataPrepError(f"{where}: every image has the same class ({', '.join(map(repr, classes)) or 'none'}); "
                            f"a classifier needs at least two classes. Check the label column.", where)
    if not generated or "train" not in set(splits):
        return
    in_train = {lab for lab, s in zip(labels, splits) if s == "train"}
    orphans = [c for c in classes if c not in in_train]
    if orphans:
        why = f" after {quarantined} file(s) were quarantined (see quarantine.csv)" if quarantined else ""
        raise DataPrepError(f"{where}: class(es) {', '.join(map(repr, orphans))} have no training image{why}. "
                            f"Repair or add images of these classes, or give a split file that puts some in train.", where)
