"""Benchmark: the cache builder against a naive loop, and an epoch from the cache against JPEG decoding.

Both sides read the same synthetic 1024x768 JPEGs (the common large ISIC 2019 size):

(a) build: `prepare_isic2019` (DCT-scaled draft decode, antialiased resize, raw shards) with one
    worker and with every core, against the loop people write first: PIL open, full decode,
    resize to a short side of 256, save a PNG per image. Reported per core.
(b) read: one epoch of `Cache.image(i)` for every i (a memory-map slice) against decoding the
    JPEGs again (PIL open, full decode, resize), which is what a loader without a cache does.

Targets: builder >= 3x the naive loop per core; cache read >= 10x JPEG decoding.

Run:
    python benchmarks/bench_cache.py                  # 200 images, all cores
    python benchmarks/bench_cache.py --n-images 500 --workers 4 --keep /tmp/bench
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from PIL import Image

from data_prep import PrepareOptions, open_cache, prepare_isic2019
from data_prep.images import target_size
from data_prep.synthetic.dermoscopy import generate_dermoscopy


def _naive_build(files: list[Path], out: Path, short_side: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for f in files:
        with Image.open(f) as im:
            rgb = im.convert("RGB")
        rgb.resize(target_size(*rgb.size, short_side), Image.Resampling.BILINEAR).save(out / f"{f.stem}.png")


def _naive_epoch(files: list[Path], short_side: int) -> int:
    total = 0
    for f in files:
        with Image.open(f) as im:
            rgb = im.convert("RGB")
        total += rgb.resize(target_size(*rgb.size, short_side), Image.Resampling.BILINEAR).size[0]
    return total


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-images", type=int, default=200)
    parser.add_argument("--short-side", type=int, default=256)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes for the all-cores build")
    parser.add_argument("--keep", type=Path, default=None, help="work folder to keep (default: a temporary one)")
    args = parser.parse_args(argv)

    work = args.keep or Path(tempfile.mkdtemp(prefix="bench_cache_"))
    try:
        cohort = generate_dermoscopy(work / "cohort", n_images=args.n_images, seed=0, sizes=[(1024, 768)])
        files = sorted(cohort["images"].glob("*.jpg"))
        n = len(files)
        for f in files:  # warm the page cache so both sides read from memory
            f.read_bytes()

        def build(workers: int, name: str) -> float:
            opts = PrepareOptions(short_side=args.short_side, workers=workers)
            shutil.rmtree(work / name, ignore_errors=True)
            return _timed(lambda: prepare_isic2019(cohort["images"], cohort["ground_truth"], cohort["metadata"], work / name, opts))

        t_naive = _timed(lambda: _naive_build(files, work / "naive_png", args.short_side))
        t_one = build(1, "cache_1")
        t_all = build(args.workers, "cache_all")

        cache = open_cache(work / "cache_1")
        t_decode = _timed(lambda: _naive_epoch(files, args.short_side))
        t_read = _timed(lambda: [cache.image(i) for i in range(len(cache))])

        r = {
            "naive_build_img_s": n / t_naive,
            "cache_build_1_worker_img_s": n / t_one,
            f"cache_build_{args.workers}_workers_img_s": n / t_all,
            "build_speedup_per_core": (n / t_one) / (n / t_naive),
            "build_speedup_all_cores": (n / t_all) / (n / t_naive),
            "jpeg_decode_epoch_img_s": n / t_decode,
            "cache_read_epoch_img_s": n / t_read,
            "read_speedup": t_decode / t_read,
        }
        print(f"{n} JPEGs of 1024x768 -> short side {args.short_side}; {os.cpu_count()} CPU cores visible")
        print(f"(a) naive loop (open, full decode, resize, save PNG): {r['naive_build_img_s']:8.1f} img/s")
        print(f"    cache builder, 1 worker:                           {r['cache_build_1_worker_img_s']:8.1f} img/s  "
              f"({r['build_speedup_per_core']:.1f}x per core; target >= 3x)")
        print(f"    cache builder, {args.workers} workers:                          {n / t_all:8.1f} img/s  "
              f"({r['build_speedup_all_cores']:.1f}x the single-core naive loop)")
        print(f"(b) epoch by JPEG decode (open, full decode, resize):  {r['jpeg_decode_epoch_img_s']:8.1f} img/s")
        print(f"    epoch from the cache (Cache.image):                {r['cache_read_epoch_img_s']:8.1f} img/s  "
              f"({r['read_speedup']:.0f}x; target >= 10x)")
        return r
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
