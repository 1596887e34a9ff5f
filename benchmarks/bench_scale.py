"""Scale rehearsal: a generated cohort at ISIC 2019's size, prepared on the cores given.

ISIC 2019's training archive holds 25,331 JPEGs, mostly 1024x768 and 600x450 (HAM10000's 10,015
images are 600x450). This script generates a synthetic cohort of that size and mix
(`data_prep.generate_dermoscopy`, not timed as part of the rehearsal), then runs `prepare_isic2019`
with `--workers` processes and reports:

- wall time of the prepare (goal <= 10 min on 2 cores),
- peak resident memory of the whole process tree (this process + its workers, sampled from /proc
  every 0.2 s; goal <= 2 GiB),
- the cache's size on disk, and the generated cohort's size for comparison.

Run (the full size takes the machine for a while: run it on an otherwise idle box):
    python benchmarks/bench_scale.py                          # 25,331 images, 2 workers
    python benchmarks/bench_scale.py --n 500 --keep /tmp/scale  # a quick check that it works
Results are printed and written as JSON (--json, default <work>/bench_scale.json).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

from data_prep import PrepareOptions, open_cache, prepare_isic2019
from data_prep.synthetic.dermoscopy import generate_dermoscopy

ISIC2019_IMAGES = 25_331
# share of HAM10000's 600x450 images in ISIC 2019; the rest as 1024x768 (the archive's other common size)
SIZES = {(600, 450): 10_015 / ISIC2019_IMAGES, (1024, 768): 1 - 10_015 / ISIC2019_IMAGES}
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _tree_rss(root: int) -> int:
    """Resident bytes of `root` and all its descendants (Linux /proc; 0 where unreadable)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as fh:
                    stat = fh.read().rsplit(b")", 1)[1].split()
                parents[int(entry)] = int(stat[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, frontier = {root}, [root]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parents.items() if pp == p and c not in tree]
        tree.update(kids)
        frontier.extend(kids)
    total = 0
    for pid in tree:
        try:
            with open(f"/proc/{pid}/statm", "rb") as fh:
                total += int(fh.read().split()[1]) * PAGE
        except (OSError, IndexError, ValueError):
            continue
    return total


class PeakMemory:
    """Samples the process tree's resident memory in a thread; `.peak` in bytes."""

    def __init__(self, interval: float = 0.2):
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _tree_rss(os.getpid()))
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _tree_rss(os.getpid()))


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=ISIC2019_IMAGES, help=f"images (default ISIC 2019's {ISIC2019_IMAGES:,})")
    parser.add_argument("--workers", type=int, default=2, help="prepare processes (default 2: the 2-core target)")
    parser.add_argument("--short-side", type=int, default=256)
    parser.add_argument("--keep", default=None, help="work folder to keep (a cohort there is reused)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        cohort = work / f"cohort-{args.n}"
        marker = cohort / ".complete"
        t0 = time.perf_counter()
        if marker.is_file():
            paths = json.loads(marker.read_text())
            gen_s = None
        else:
            paths = {k: str(v) for k, v in generate_dermoscopy(cohort, n_images=args.n, seed=0, sizes=SIZES,
                                                               workers=args.workers).items()}
            marker.write_text(json.dumps(paths))
            gen_s = time.perf_counter() - t0
        cohort_bytes = _du(Path(paths["images"]))

        cache_dir = work / f"cache-{args.n}"
        shutil.rmtree(cache_dir, ignore_errors=True)
        opts = PrepareOptions(short_side=args.short_side, workers=args.workers)
        with PeakMemory() as mem:
            t0 = time.perf_counter()
            prepare_isic2019(paths["images"], paths["ground_truth"], paths["metadata"], cache_dir, opts)
            prep_s = time.perf_counter() - t0
        cache = open_cache(cache_dir)
        result = {
            "images": len(cache), "workers": args.workers, "short_side": args.short_side,
            "prepare_s": prep_s, "images_per_s": len(cache) / prep_s, "peak_rss_bytes": mem.peak,
            "cache_bytes": _du(cache_dir), "cohort_jpeg_bytes": cohort_bytes, "generate_s": gen_s,
            "cpu_count": os.cpu_count(), "goals": {"prepare_le_10_min": prep_s <= 600, "peak_rss_le_2_gib": mem.peak <= 2 * 2**30},
        }
        if args.n != ISIC2019_IMAGES:
            result["extrapolated_prepare_s_at_isic2019"] = prep_s * ISIC2019_IMAGES / max(len(cache), 1)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    gib = 2**30
    print(f"scale rehearsal: {result['images']:,} images ({', '.join(f'{w}x{h}' for w, h in SIZES)}), "
          f"{args.workers} prepare workers, short side {args.short_side}")
    if gen_s is not None:
        print(f"generate cohort (not part of the rehearsal): {gen_s:.1f} s, {cohort_bytes / gib:.2f} GiB of JPEG")
    print(f"prepare: {prep_s:.1f} s ({result['images_per_s']:.1f} images/s)  goal <= 600 s: "
          f"{'met' if prep_s <= 600 else 'NOT met'}")
    if "extrapolated_prepare_s_at_isic2019" in result:
        print(f"  extrapolated to {ISIC2019_IMAGES:,} images: {result['extrapolated_prepare_s_at_isic2019']:.0f} s")
    print(f"peak resident memory (process tree): {mem.peak / gib:.2f} GiB  goal <= 2 GiB: "
          f"{'met' if mem.peak <= 2 * gib else 'NOT met'}")
    print(f"cache on disk: {result['cache_bytes'] / gib:.2f} GiB")
    out_json = Path(args.json) if args.json else (work / "bench_scale.json" if args.keep else None)
    if out_json:
        out_json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
