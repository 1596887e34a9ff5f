"""Cross-rank gathering: two gloo processes must reproduce the one-process loss and gradients."""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from pipeline import distributed as pd_
from pipeline import losses
from pipeline.config import load_config
from pipeline.registry import create_method
from pipeline.errors import PipelineError

N_IMAGES, IN_DIM, D, C, TAU = 8, 5, 6, 4, 0.1
LABELS = [0, 0, 1, 2, 0, 1, 1, 3]
SPLITS = {"equal": [4, 4], "unequal": [3, 5]}


class _Tiny(nn.Module):
    """A shared linear layer and a prototype table: enough to route gradients both ways."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(IN_DIM, D).double()
        self.proto = nn.Parameter(torch.randn(C, D, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return F.normalize(self.lin(x), dim=-1), F.normalize(self.proto, dim=-1)


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(N_IMAGES, 2, IN_DIM, generator=g, dtype=torch.float64), torch.tensor(LABELS)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    info = pd_.init_distributed(device="cpu")
    result: dict = {"info": (info.rank, info.local_rank, info.world_size, str(info.device), info.is_main),
                    "is_main": pd_.is_main(), "world_size": pd_.world_size()}
    x, y = _inputs()
    for case, sizes in SPLITS.items():
        lo = sum(sizes[:rank])
        xs, ys = x[lo:lo + sizes[rank]], y[lo:lo + sizes[rank]]
        model = nn.parallel.DistributedDataParallel(_Tiny())
        feats, protos = model(xs)
        loss = losses.balanced_contrastive_loss(pd_.all_gather_with_grad(feats), pd_.all_gather(ys), protos, TAU)
        loss.backward()  # DDP averages the parameter gradients over the ranks
        result[case] = {"loss": loss.item(), "grads": {n: p.grad.clone() for n, p in model.module.named_parameters()},
                        "labels": pd_.all_gather(ys).tolist()}
    result["mean"] = pd_.all_reduce_mean(torch.tensor([float(rank), 10.0 * rank])).tolist()
    result["method"] = _method_epoch(rank)
    pd_.barrier()
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    pd_.cleanup()


def _method_epoch(rank: int) -> dict:
    """Two ECL steps per rank on different data, then end_epoch(0): weights from the global means."""
    method = create_method(load_config(base={"method": {"name": "ecl"}}).method, np.array([50, 20, 9, 4]))
    seen: list[dict[str, float]] = []
    for step in range(2):
        g = torch.Generator().manual_seed(100 * rank + step)
        b = 3
        out = {"logits": torch.randn(3 * b, C, generator=g, dtype=torch.float64),
               "z": F.normalize(torch.randn(3 * b, D, generator=g, dtype=torch.float64), dim=1),
               "prototypes": F.normalize(torch.randn(C, D, generator=g, dtype=torch.float64), dim=1),
               "weight": torch.randn(C, D, generator=g, dtype=torch.float64)}
        res = method(out, torch.tensor([0, 1, rank + 1]))
        seen.append({k: v.item() for k, v in res.terms.items()})
    method.end_epoch(0)
    return {"seen": seen, "weights": method.weights()}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp")
    # Spawned workers unpickle `_worker` by its module name (tests.pipeline.test_distributed), so
    # the repository root must be on their sys.path (spawn copies the parent's); appended, so the
    # installed `pipeline` package still wins over the source tree.
    root = str(Path(__file__).resolve().parents[2])
    added = root not in sys.path
    if added:
        sys.path.append(root)
    try:
        mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    finally:
        if added:
            sys.path.remove(root)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


def _single_process() -> tuple[float, dict[str, torch.Tensor]]:
    model = _Tiny()
    x, y = _inputs()
    feats, protos = model(x)
    loss = losses.balanced_contrastive_loss(feats, y, protos, TAU)
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("case", list(SPLITS))
def test_all_gather_with_grad_two_ranks_matches_single_process(two_ranks, case):
    loss, grads = _single_process()
    for r in range(2):
        got = two_ranks[r][case]
        assert got["labels"] == LABELS
        assert got["loss"] == pytest.approx(loss, abs=1e-6, rel=0)
        for name, g in grads.items():
            np.testing.assert_allclose(got["grads"][name].numpy(), g.numpy(), atol=1e-6, rtol=0, err_msg=name)
    # the check is not vacuous: the gradients are far from zero at this tolerance
    assert all(g.abs().max() > 1e-3 for g in grads.values())


def test_init_distributed_reads_torchrun_env_and_helpers(two_ranks):
    assert [r["info"] for r in two_ranks] == [(0, 0, 2, "cpu", True), (1, 1, 2, "cpu", False)]
    assert [r["is_main"] for r in two_ranks] == [True, False]
    assert all(r["world_size"] == 2 for r in two_ranks)
    assert all(r["mean"] == [0.5, 5.0] for r in two_ranks)


def test_helpers_single_process_are_identity(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = pd_.init_distributed(device="cpu")
    assert (info.rank, info.world_size, info.is_main, info.device) == (0, 1, True, torch.device("cpu"))
    t = torch.arange(3.0, requires_grad=True)
    assert pd_.all_gather_with_grad(t) is t
    assert torch.equal(pd_.all_gather(t), t) and torch.equal(pd_.all_reduce_mean(t), t)
    assert pd_.world_size() == 1 and pd_.rank() == 0 and pd_.is_main()
    pd_.barrier()
    pd_.cleanup()


def test_init_distributed_missing_rank_env_raises(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(PipelineError, match="RANK is not: launch distributed runs with torchrun"):
        pd_.init_distributed(device="cpu")


def test_first_epoch_normalisation_averages_term_means_over_ranks(two_ranks):
    seen = [t for r in two_ranks for t in r["method"]["seen"]]
    assert seen[0]["lc"] != seen[2]["lc"]  # ranks saw different data
    mean = {k: np.mean([t[k] for t in seen]) for k in ("lc", "bc", "cc")}
    # ECL's default anchored normalisation: lc stays at 1, the others get base shares relative to it
    want = {"lc": 1.0, "bc": (0.3 / 0.7) * mean["lc"] / mean["bc"], "cc": (0.5 / 0.7) * mean["lc"] / mean["cc"]}
    for r in two_ranks:
        assert r["method"]["weights"] == pytest.approx(want, rel=1e-9)
