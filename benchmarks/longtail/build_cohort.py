"""Make a CIFAR-LT-style long-tailed cohort of real photographs from the Fashion-MNIST IDX files.

Why Fashion-MNIST: it is the one set of real photographs installable offline here
(`apt-get install dataset-fashion-mnist`, MIT/Expat, files under /usr/share/datasets/fashion-mnist/),
and its ten classes have real visual confusions (shirt / T-shirt / pullover / coat) that a synthetic
cohort does not. The profile follows Cao et al. (LDAM, CIFAR-10-LT): class at rank i keeps
``floor(n_max * imbalance ** (-i / (C - 1)))`` training images, so the largest class has ``n_max``
and the smallest ``n_max / imbalance``.

Splits:
- train: the long-tailed draw from the official training set;
- val: a *balanced* draw from the rest of the official training set (never overlaps train), for
  choosing defaults and early stopping;
- test: a *balanced* draw from the official test set (all of it by default: 1,000 per class).

Output (for `ecl prepare csv`): ``images/<image id>.png`` (8-bit grey PNGs), ``manifest.csv``
(``image,label``), ``splits.csv`` (``image,split``) and ``cohort.json`` (the options and per-split
counts). The build is deterministic in its options and rewritten only when they change.

Usage::

    python -m benchmarks.longtail.build_cohort --out /tmp/fmnist-lt --imbalance 100
"""
from __future__ import annotations

import argparse
import gzip
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["CLASS_NAMES", "CohortOptions", "read_idx", "longtail_counts", "class_order", "build_cohort", "main"]

DEFAULT_SOURCE = Path("/usr/share/datasets/fashion-mnist")
# Fashion-MNIST's label order (labels 0..9), spelled as safe class names.
CLASS_NAMES = ("tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


class CohortError(ValueError):
    """A bad option or input file; the message names it and says what to do."""


@dataclass(frozen=True)
class CohortOptions:
    """Everything that determines the cohort (recorded in cohort.json)."""

    imbalance: float = 100.0
    n_max: int = 1000
    order: str = "default"          # "default" (label order), "reverse", "shuffle:<seed>" or "3,1,..." (labels)
    val_per_class: int = 100
    test_per_class: int = 1000
    seed: int = 0


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): the big-endian format of LeCun's MNIST files.

    Header: two zero bytes, a type code (0x08 = uint8), the number of dimensions, then one
    big-endian uint32 per dimension.
    """
    path = Path(path)
    if not path.is_file() and Path(str(path) + ".gz").is_file():
        path = Path(str(path) + ".gz")
    if not path.is_file():
        raise CohortError(f"{path}: no such IDX file; install the data with `apt-get install "
                          f"dataset-fashion-mnist` or pass --source")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as err:
        raise CohortError(f"{path}: cannot be read ({err}); reinstall dataset-fashion-mnist") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise CohortError(f"{path}: not an unsigned-byte IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise CohortError(f"{path}: truncated IDX header")
    shape = tuple(int(v) for v in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    size = int(np.prod(shape)) if shape else 0
    if len(raw) - header != size:
        raise CohortError(f"{path}: IDX header promises {size} bytes of data for shape {shape}, "
                          f"found {len(raw) - header}; the file is truncated or damaged")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def longtail_counts(n_max: int, imbalance: float, num_classes: int) -> list[int]:
    """Training count per rank: floor(n_max * imbalance ** (-rank / (C - 1))), rank 0 the largest."""
    if num_classes < 2:
        raise CohortError("a long-tailed cohort needs at least two classes")
    if not imbalance >= 1:
        raise CohortError(f"--imbalance must be >= 1 (largest / smallest class); got {imbalance}")
    counts = [int(np.floor(n_max * imbalance ** (-r / (num_classes - 1)) + 1e-9)) for r in range(num_classes)]
    if counts[-1] < 1:
        raise CohortError(f"--n-max {n_max} with --imbalance {imbalance:g} leaves the rarest class empty; "
                          f"raise --n-max or lower --imbalance")
    return counts


def class_order(order: str, num_classes: int) -> list[int]:
    """Labels from the most to the least frequent class."""
    if order == "default":
        return list(range(num_classes))
    if order == "reverse":
        return list(range(num_classes))[::-1]
    if order.startswith("shuffle:"):
        try:
            seed = int(order.split(":", 1)[1])
        except ValueError:
            raise CohortError(f"--order {order!r}: expected shuffle:<integer seed>") from None
        return [int(v) for v in np.random.default_rng(seed).permutation(num_classes)]
    try:
        labels = [int(v) for v in order.split(",")]
    except ValueError:
        raise CohortError(f"--order {order!r}: expected default, reverse, shuffle:<seed> or a comma-separated "
                          f"permutation of 0..{num_classes - 1}") from None
    if sorted(labels) != list(range(num_classes)):
        raise CohortError(f"--order {order!r}: must list every label 0..{num_classes - 1} exactly once")
    return labels


def _draw(labels: np.ndarray, per_class: dict[int, int], rng: np.random.Generator,
          exclude: np.ndarray | None = None) -> np.ndarray:
    """Indices: per_class[c] images of each label c, drawn without replacement, sorted."""
    picked = []
    for c, n in per_class.items():
        pool = np.flatnonzero(labels == c)
        if exclude is not None:
            pool = np.setdiff1d(pool, exclude, assume_unique=True)
        if n > pool.size:
            raise CohortError(f"class {CLASS_NAMES[c] if c < len(CLASS_NAMES) else c} has only {pool.size} images "
                              f"left for a draw of {n}; lower --n-max, --val-per-class or --test-per-class")
        picked.append(rng.choice(pool, size=n, replace=False))
    return np.sort(np.concatenate(picked))


def _write_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    tmp = path.with_name(path.name + ".part")
    Image.fromarray(image, mode="L").save(tmp, format="PNG")
    tmp.replace(path)


def build_cohort(out: Path, options: CohortOptions = CohortOptions(), source: Path = DEFAULT_SOURCE) -> dict:
    """Write the cohort under ``out`` and return the content of its cohort.json.

    Rebuilds only when the recorded options differ; a half-written build (no cohort.json) is redone.
    """
    out = Path(out)
    record_path = out / "cohort.json"
    wanted = {"options": asdict(options), "source": str(source)}
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if {k: record.get(k) for k in wanted} == wanted:
            return record
    images_tr, labels_tr = read_idx(source / _FILES["train"][0]), read_idx(source / _FILES["train"][1])
    images_te, labels_te = read_idx(source / _FILES["test"][0]), read_idx(source / _FILES["test"][1])
    for imgs, labs, name in ((images_tr, labels_tr, "train"), (images_te, labels_te, "test")):
        if imgs.ndim != 3 or labs.ndim != 1 or imgs.shape[0] != labs.shape[0]:
            raise CohortError(f"{source}: {name} images {imgs.shape} and labels {labs.shape} do not match")
    num_classes = int(max(labels_tr.max(), labels_te.max())) + 1
    names = list(CLASS_NAMES) if num_classes == len(CLASS_NAMES) else [f"class{c}" for c in range(num_classes)]
    order = class_order(options.order, num_classes)
    counts = longtail_counts(options.n_max, options.imbalance, num_classes)
    rng = np.random.default_rng(options.seed)
    train_idx = _draw(labels_tr, {c: n for c, n in zip(order, counts)}, rng)
    val_idx = _draw(labels_tr, {c: options.val_per_class for c in range(num_classes)}, rng, exclude=train_idx)
    test_idx = _draw(labels_te, {c: options.test_per_class for c in range(num_classes)}, rng)

    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    if record_path.exists():
        record_path.unlink()
    rows = []
    for split, idx, imgs, labs, prefix in (("train", train_idx, images_tr, labels_tr, "tr"),
                                           ("val", val_idx, images_tr, labels_tr, "tr"),
                                           ("test", test_idx, images_te, labels_te, "te")):
        for i in idx:
            image_id = f"{prefix}{int(i):05d}"
            _write_png(img_dir / f"{image_id}.png", imgs[i])
            rows.append((image_id, names[int(labs[i])], split))
    manifest = "image,label\n" + "".join(f"images/{r[0]}.png,{r[1]}\n" for r in rows)
    splits = "image,split\n" + "".join(f"images/{r[0]}.png,{r[2]}\n" for r in rows)
    (out / "manifest.csv").write_text(manifest)
    (out / "splits.csv").write_text(splits)
    split_counts = {s: {n: sum(1 for r in rows if r[2] == s and r[1] == n) for n in names}
                    for s in ("train", "val", "test")}
    record = {**wanted, "class_names": names, "order_labels": order,
              "train_counts_by_rank": counts, "counts": split_counts}
    tmp = record_path.with_name("cohort.json.part")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(record_path)
    return record


def options_from_args(args: argparse.Namespace) -> CohortOptions:
    return CohortOptions(imbalance=args.imbalance, n_max=args.n_max, order=args.order,
                         val_per_class=args.val_per_class, test_per_class=args.test_per_class, seed=args.seed)


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = CohortOptions()
    p.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="folder of the Fashion-MNIST IDX files")
    p.add_argument("--imbalance", type=float, default=d.imbalance, help="largest / smallest training class")
    p.add_argument("--n-max", type=int, default=d.n_max, help="training images of the largest class")
    p.add_argument("--order", default=d.order,
                   help="class order from head to tail: default, reverse, shuffle:SEED or a permutation like 9,8,...")
    p.add_argument("--val-per-class", type=int, default=d.val_per_class)
    p.add_argument("--test-per-class", type=int, default=d.test_per_class)
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the draws")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        record = build_cohort(args.out, options_from_args(args), args.source)
    except CohortError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for split, counts in record["counts"].items():
        print(f"{split:>5}: {sum(counts.values()):>6} images  " + " ".join(f"{k}={v}" for k, v in counts.items()))
    print(f"cohort in {args.out} (manifest.csv, splits.csv, images/)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
