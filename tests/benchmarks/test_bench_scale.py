"""benchmarks/bench_scale.py at a tiny size: it runs, and its memory and size figures are real."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _load():
    spec = importlib.util.spec_from_file_location("bench_scale", ROOT / "benchmarks" / "bench_scale.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tree_rss_counts_this_process_and_a_child():
    import subprocess
    import sys
    import time

    mod = _load()
    own = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    alone = mod._tree_rss(os.getpid())
    assert alone >= 0.5 * own
    child = subprocess.Popen([sys.executable, "-c", "import time; b = bytearray(200 * 2**20); time.sleep(30)"])
    try:
        time.sleep(3)  # let the child allocate and touch its 200 MiB
        with_child = mod._tree_rss(os.getpid())
    finally:
        child.kill()
        child.wait()
    assert with_child - alone > 150 * 2**20


def test_bench_scale_small_run_reports_cache_and_memory(tmp_path):
    mod = _load()
    result = mod.main(["--n", "24", "--workers", "1", "--short-side", "64", "--keep", str(tmp_path)])
    assert result["images"] == 24
    cache_dir = tmp_path / "cache-24"
    assert result["cache_bytes"] == sum(f.stat().st_size for f in cache_dir.rglob("*") if f.is_file())
    # the pixels alone: 24 images whose short side is 64 (600x450 and 1024x768 both -> 85x64)
    assert (cache_dir / "pixels.u8").stat().st_size == 24 * 64 * 85 * 3
    assert result["cache_bytes"] > 24 * 64 * 85 * 3
    assert 50 * 2**20 < result["peak_rss_bytes"] < 4 * 2**30
    assert result["prepare_s"] > 0 and result["images_per_s"] == result["images"] / result["prepare_s"]
