"""How many torch threads and loader worker processes a run uses, from the cores it may use.

Why: torch starts one OpenMP thread per core in every process, and each DataLoader worker is
another busy process. On a 2-core machine, 2 torch threads plus 2 loader workers put four busy
threads on two cores; OpenMP's spin-waiting then makes training 2-6x slower than one thread
(measured: `ecl demo` 307 s as shipped vs 159 s with OMP_NUM_THREADS=1). The plan here keeps
torch threads + loader workers <= the cores the process is allowed to run on (its CPU affinity,
which containers and `taskset` restrict), unless the user says otherwise:

- `data.num_workers` None (auto): on CUDA the CPU's only job is the data path, so every core but
  one feeds it (at most 8); on CPU the model needs the cores, so a quarter of them load data
  (at least one worker when there are 2+ cores; none on a single core).
- `train.threads` None (auto): $OMP_NUM_THREADS when set, else the cores left after the workers
  (at least 1).

Determinism: with a fixed seed a run gives identical weights for a given thread count (tested).
A different thread count changes floating-point summation order inside torch's kernels, and
after many steps the results differ; set `train.threads` explicitly to reproduce a run on a
machine with another number of cores. The augmentations do not depend on the number of workers.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["ThreadPlan", "available_cores", "plan_threads", "apply_threads"]


@dataclass(frozen=True)
class ThreadPlan:
    """The resolved split of the cores: torch intra-op threads and loader workers."""

    cores: int
    torch_threads: int
    num_workers: int

    def describe(self) -> str:
        return f"{self.torch_threads} torch thread(s), {self.num_workers} loader worker(s) on {self.cores} core(s)"


def available_cores() -> int:
    """Cores this process may run on (CPU affinity where the OS reports it, else the CPU count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def _env_threads() -> int | None:
    raw = os.environ.get("OMP_NUM_THREADS", "").strip()
    try:
        value = int(raw)
    except ValueError:
        return None
    return value if value >= 1 else None


def plan_threads(threads: int | None = None, num_workers: int | None = None, device_type: str = "cpu",
                 cores: int | None = None) -> ThreadPlan:
    """Resolve `train.threads` and `data.num_workers` (None = auto, see the module docstring).

    Args:
        threads: train.threads (None = auto).
        num_workers: data.num_workers (None = auto).
        device_type: "cuda" or "cpu": where the model runs.
        cores: cores to plan for (default: `available_cores()`).
    """
    cores = int(cores or available_cores())
    if num_workers is None:
        if device_type == "cuda":
            num_workers = max(1, min(cores - 1, 8)) if cores > 1 else 0
        else:
            num_workers = max(1, cores // 4) if cores > 1 else 0
    if threads is None:
        threads = _env_threads() or max(1, cores - num_workers)
    return ThreadPlan(cores=cores, torch_threads=int(threads), num_workers=int(num_workers))


_INTEROP_SET = False


def apply_threads(plan: ThreadPlan) -> None:
    """Set torch's intra-op threads (any time) and inter-op threads (once per process).

    torch allows `set_num_interop_threads` only before its first inter-op parallel work and only
    once; later calls raise, so it is attempted once and a refusal leaves torch's own value.
    """
    global _INTEROP_SET
    import torch

    if torch.get_num_threads() != plan.torch_threads:
        torch.set_num_threads(plan.torch_threads)
    if not _INTEROP_SET:
        _INTEROP_SET = True
        try:
            torch.set_num_interop_threads(max(1, min(plan.torch_threads, 2)))
        except RuntimeError:  # already set, or inter-op work has already started
            pass
