"""The one prediction loop: a network over batches of images, to raw logits (and features).

Why one: evaluation, validation during training, `ecl predict`, `ecl geometry --run RUN` and the
benchmarks must see the same numbers for the same image. They used to run four hand-written loops
that differed in small ways (inference mode or not, autocast, channels-last, dtype of the logits);
here each caller chooses those explicitly and gets the same typed `Predictions` back.

Three ways in, one loop:

* `predict_split`: one split of a cache through the deterministic eval view (`ecl evaluate`,
  `ecl geometry --run RUN`, the benchmarks);
* `predict_loader`: any iterable of ``(x, y, rows)`` batches, e.g. training's validation loader;
* `predict_tensors`: ready image tensors, batched here (`ecl predict`).

Logits are float64 on the host (the calibration fit and metrics want them so); the network is put
in eval mode for the pass and given back in the mode it came in.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

__all__ = ["Predictions", "predict_loader", "predict_split", "predict_tensors", "default_device"]


@dataclass
class Predictions:
    """Raw network outputs on a set of images, in the order the batches came.

    ``labels`` is -1 for an unlabelled image; ``rows`` are the cache rows (or the caller's
    positions for `predict_tensors`). The feature fields are filled only with ``features=True``.
    """

    logits: np.ndarray  # [N, C] float64
    labels: np.ndarray  # [N] int64, -1 unlabelled
    rows: np.ndarray  # [N] int64
    h: np.ndarray | None = None  # [N, d] backbone features
    z: np.ndarray | None = None  # [N, d_z] projections; None without a projection head
    weight: np.ndarray | None = None  # [C, d] classifier weight
    prototypes: np.ndarray | None = None  # [C, d_z] class prototypes; None without a prototype head

    @property
    def labelled(self) -> np.ndarray:
        """[N] bool: which images carry a label."""
        return self.labels >= 0


def default_device() -> str:
    """'cuda' when a GPU is visible, else 'cpu' (the device evaluation and prediction run on)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def predict_loader(network: Any, batches: Iterable[Sequence[Any]], device: Any, n_classes: int,
                   features: bool = False, amp: Any = None, channels_last: bool = False,
                   progress: str | None = None) -> Predictions:
    """Run `network` over ``(x, y, rows)`` batches without gradients.

    Args:
        network: an `EclNetwork` (or any module returning logits, and a dict with ``return_all``).
        batches: iterable of ``(x, y, rows)``; y and rows anything `np.asarray` reads.
        device: torch device (or its name) the network lives on.
        n_classes: width of the logits when there is no batch at all.
        features: also collect backbone features h, projections z and the heads (geometry).
        amp: autocast dtype (training's validation under mixed precision), None for full precision.
        channels_last: move each batch to channels-last memory format (as training does on GPU).
        progress: a tqdm description; None shows no bar.

    Returns:
        Predictions (empty arrays when there were no batches).
    """
    import torch

    if progress is not None:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=progress, unit="batch", leave=False)
    device = torch.device(device)
    was_training = network.training
    network.eval()
    logits, labels, rows, hs, zs = [], [], [], [], []
    weight = protos = None
    try:
        with torch.inference_mode(), torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            for x, y, idx in batches:
                x = x.to(device, non_blocking=True)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                if features:
                    out = network(x, return_all=True)
                    hs.append(out["h"].float().cpu().numpy())
                    if out.get("z") is not None:
                        zs.append(out["z"].float().cpu().numpy())
                    weight, protos = out.get("weight"), out.get("prototypes")
                    logit = out["logits"]
                else:
                    logit = network(x)
                logits.append(logit.float().cpu().numpy().astype(np.float64))
                labels.append(np.asarray(y, dtype=np.int64).reshape(-1))
                rows.append(np.asarray(idx, dtype=np.int64).reshape(-1))
    finally:
        network.train(was_training)
    result = Predictions(
        logits=np.concatenate(logits) if logits else np.zeros((0, n_classes)),
        labels=np.concatenate(labels) if labels else np.zeros(0, np.int64),
        rows=np.concatenate(rows) if rows else np.zeros(0, np.int64),
    )
    if features and hs:
        result.h = np.concatenate(hs)
        result.z = np.concatenate(zs) if zs else None
        result.weight = None if weight is None else weight.detach().float().cpu().numpy()
        result.prototypes = None if protos is None else protos.detach().float().cpu().numpy()
    return result


def predict_split(network: Any, cache: Any, split: str, data_cfg: Any, batch_size: int, device: Any = "cpu",
                  features: bool = False) -> Predictions:
    """Run the network over one split of a cache with the deterministic eval view.

    Args:
        network: an `EclNetwork` on `device`.
        cache: an opened `data_prep.Cache`.
        split: 'train', 'val' or 'test'.
        data_cfg: the run's `data` config section.
        batch_size: images per forward pass.
        device: torch device string.
        features: also collect h, z and the heads (for geometry).
    """
    from .data import create_eval_loader
    from .models import model_data_config

    loader = create_eval_loader(cache, split, data_cfg, model_data_config(network), batch_size)
    return predict_loader(network, loader, device, len(cache.class_names), features=features,
                          progress=f"predict {split}")


def _batched(tensors: Iterable[Any], batch_size: int) -> Iterator[tuple[Any, np.ndarray, np.ndarray]]:
    import torch

    batch: list[Any] = []
    start = 0
    for x in tensors:
        batch.append(torch.as_tensor(x))
        if len(batch) >= batch_size:
            yield torch.stack(batch), np.full(len(batch), -1), np.arange(start, start + len(batch))
            start += len(batch)
            batch = []
    if batch:
        yield torch.stack(batch), np.full(len(batch), -1), np.arange(start, start + len(batch))


def predict_tensors(network: Any, tensors: Iterable[Any], device: Any, batch_size: int, n_classes: int) -> Predictions:
    """Run the network over image tensors (``[3, H, W]`` each, already transformed), `batch_size` at a time.

    `tensors` may be a generator: images are decoded as the batches fill, never all held at once.
    Labels are -1 and rows are the positions 0..N-1 in the order the tensors came.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    return predict_loader(network, _batched(tensors, batch_size), device, n_classes)
