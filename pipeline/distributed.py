"""DDP setup and cross-rank feature gathering.

Why gather: the contrastive terms (SupCon, L_BC) compare every view with every other view in the
batch, so under DistributedDataParallel each rank must see the global batch. `all_gather_with_grad`
concatenates the ranks' features and routes gradients back so that, after DDP averages the
parameter gradients over ranks, they equal the single-process gradient of the global-batch loss:

- every rank computes the same global loss L on the gathered tensor G = [G_0; ...; G_{W-1}];
- backward sums dL/dG over ranks (W identical copies, i.e. W * dL/dG) and keeps this rank's slice;
- DDP divides by W, leaving sum_r dL/dG_r * dG_r/dtheta = dL/dtheta.

Every function is a no-op (or the identity) in a single process, so the same code runs with and
without torchrun. Launch with, for example::

    torchrun --nproc_per_node=2 -m pipeline.train --config configs/demo_dermoscopy.yaml
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import PipelineError

__all__ = [
    "DistInfo",
    "init_distributed",
    "all_gather_with_grad",
    "all_gather",
    "all_reduce_mean",
    "barrier",
    "cleanup",
    "is_main",
    "world_size",
    "rank",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: rank, local rank, world size, its device, whether it is rank 0."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    is_main: bool


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of processes (1 without torchrun)."""
    return dist.get_world_size() if _active() else 1


def rank() -> int:
    """Global rank of this process (0 without torchrun)."""
    return dist.get_rank() if _active() else 0


def is_main() -> bool:
    """True on rank 0: the process that writes files, logs and prints."""
    return rank() == 0


def _env_int(name: str) -> int:
    raw = os.environ.get(name)
    if raw is None:
        raise PipelineError(f"WORLD_SIZE is set but {name} is not: launch distributed runs with torchrun, "
                            f"e.g. `torchrun --nproc_per_node=2 -m pipeline.train --config CONFIG`")
    try:
        return int(raw)
    except ValueError:
        raise PipelineError(f"environment variable {name}={raw!r} is not an integer; launch with torchrun") from None


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (RANK, LOCAL_RANK, WORLD_SIZE), else run alone.

    Backend: NCCL when the device is CUDA, gloo on CPU. Each rank uses cuda:LOCAL_RANK.

    Args:
        device: "auto" (CUDA when available), "cuda" or "cpu"; the train config's `train.device`.
    Returns:
        DistInfo for this process.
    Raises:
        PipelineError: CUDA asked for but unavailable, or a torchrun variable missing or malformed.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise PipelineError(f"device must be 'auto', 'cpu' or 'cuda'; got {device!r}")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise PipelineError("train.device is 'cuda' but no CUDA device is available; set train.device: auto or cpu")
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        dev = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
        return DistInfo(rank=0, local_rank=0, world_size=1, device=dev, is_main=True)
    global_rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK")
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise PipelineError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA device(s) are "
                                f"visible; use --nproc_per_node <= the number of GPUs")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not _active():
        kwargs: dict[str, Any] = dict(backend="nccl" if use_cuda else "gloo", init_method="env://",
                                      rank=global_rank, world_size=world)
        if use_cuda:
            kwargs["device_id"] = dev
        dist.init_process_group(**kwargs)
    return DistInfo(rank=global_rank, local_rank=local_rank, world_size=world, device=dev, is_main=global_rank == 0)


def _gather_sizes(n: int, device: torch.device) -> list[int]:
    local = torch.tensor([n], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(local) for _ in range(world_size())]
    dist.all_gather(sizes, local)
    return [int(s.item()) for s in sizes]


def _gather_cat(t: Tensor, sizes: list[int]) -> Tensor:
    """all_gather along dim 0, allowing ranks to hold different numbers of rows."""
    t = t.contiguous()
    biggest = max(sizes)
    if t.shape[0] < biggest:
        pad = t.new_zeros((biggest - t.shape[0], *t.shape[1:]))
        t = torch.cat([t, pad], dim=0)
    parts = [torch.empty_like(t) for _ in sizes]
    dist.all_gather(parts, t)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)], dim=0)


class _AllGatherGrad(torch.autograd.Function):
    """Forward: gather every rank's rows and concatenate. Backward: sum over ranks, keep own slice."""

    @staticmethod
    def forward(ctx: Any, t: Tensor) -> Tensor:  # type: ignore[override]
        sizes = _gather_sizes(t.shape[0], t.device)
        ctx.sizes = sizes
        ctx.rank = rank()
        return _gather_cat(t, sizes)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]]


def all_gather_with_grad(t: Tensor) -> Tensor:
    """Concatenate `t` [n_r, ...] from all ranks along dim 0, differentiably (see module docstring).

    Rows are in rank order; ranks may hold different n_r. Identity in a single process.
    """
    if not _active() or world_size() == 1:
        return t
    return _AllGatherGrad.apply(t)


def all_gather(t: Tensor) -> Tensor:
    """Concatenate `t` from all ranks along dim 0 without gradient (labels, indices, predictions)."""
    if not _active() or world_size() == 1:
        return t
    with torch.no_grad():
        return _gather_cat(t.detach(), _gather_sizes(t.shape[0], t.device))


def all_reduce_mean(t: Tensor) -> Tensor:
    """Element-wise mean of `t` over ranks (a new tensor; `t` is untouched). Identity alone."""
    if not _active() or world_size() == 1:
        return t
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / world_size()


def barrier() -> None:
    """Wait for every rank (no-op alone)."""
    if _active():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group if one was joined."""
    if _active():
        dist.destroy_process_group()
