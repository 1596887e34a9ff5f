"""pipeline.threads: torch threads + loader workers never exceed the cores unless asked to."""
from __future__ import annotations

import os

import pytest
import torch

from pipeline.threads import apply_threads, available_cores, plan_threads


@pytest.fixture(autouse=True)
def _no_omp_env(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)


@pytest.mark.parametrize("cores, device, threads, workers", [
    (1, "cpu", 1, 0),    # one core: load in-process, one thread
    (2, "cpu", 1, 1),    # the demo machine: one worker + one torch thread, not 2 + 2
    (8, "cpu", 6, 2),
    (16, "cpu", 12, 4),
    (2, "cuda", 1, 1),
    (16, "cuda", 8, 8),  # GPU: the CPU's job is the data path, workers capped at 8
    (64, "cuda", 56, 8),
])
def test_auto_plan_fits_the_cores(cores, device, threads, workers):
    plan = plan_threads(None, None, device, cores=cores)
    assert (plan.torch_threads, plan.num_workers) == (threads, workers)
    assert plan.torch_threads + plan.num_workers <= max(cores, 1 + plan.num_workers)


def test_explicit_settings_win_and_omp_env_is_the_auto_thread_count(monkeypatch):
    assert plan_threads(3, 5, "cpu", cores=2) == plan_threads(3, 5, "cpu", cores=2)
    plan = plan_threads(3, 5, "cpu", cores=2)
    assert (plan.torch_threads, plan.num_workers) == (3, 5)
    assert plan_threads(None, 0, "cpu", cores=4).torch_threads == 4  # no workers: every core computes
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert plan_threads(None, None, "cpu", cores=16).torch_threads == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "junk")
    assert plan_threads(None, None, "cpu", cores=16).torch_threads == 12


def test_available_cores_is_the_affinity_set():
    expected = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert available_cores() == expected


def test_apply_threads_sets_torch_intra_op_threads():
    before = torch.get_num_threads()
    try:
        apply_threads(plan_threads(1, 0, "cpu", cores=2))
        assert torch.get_num_threads() == 1
        apply_threads(plan_threads(2, 0, "cpu", cores=2))  # again: inter-op is left alone, no error
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_config_keys_default_to_auto():
    from pipeline.config import load_config

    cfg = load_config(None, ["train.threads=3"])
    assert cfg.train.threads == 3 and cfg.data.num_workers is None
    assert load_config().train.threads is None
