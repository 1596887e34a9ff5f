"""The ECL network: a timm backbone with a cosine classifier, a projection head and prototypes.

Why this shape (docs/method.md, "Model"): the backbone is any timm model created with
`num_classes=0`, so it returns pooled features h in R^d and the choice of architecture stays a
config string. On top sit three small heads:

- cosine classifier: logits_c = s * cos(h, w_c), weight W [C, d], scale s = `classifier_scale`;
- projection head: Linear(d, d) - BatchNorm1d - ReLU - Linear(d, d_z), L2-normalised -> z;
- prototype head phi: Linear(d, d_z) ("linear", ProConDual) or the projection-head MLP shape
  ("mlp", BCL); prototypes p_c = normalise(phi(w_c)) are recomputed from the *current* classifier
  weights on every forward pass and are not detached, so the contrastive loss pulls on W too.

Everything a loss needs is computed inside `forward(x, return_all=True)`, so DistributedDataParallel
sees every parameter used in the step. Pretrained weights come only from a local file named by
`model.pretrained_file`; nothing is ever downloaded.
"""
from __future__ import annotations

import difflib
import os
import pickle
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig
from .errors import ConfigError, PipelineError

__all__ = ["EclNetwork", "create_network", "model_data_config", "create_backbone"]

# Names that make timm fetch from the Hugging Face hub by themselves; we never download.
_HUB_PREFIXES = ("hf-hub:", "hf_hub:", "local-dir:")


def _mlp(d_in: int, d_out: int) -> nn.Sequential:
    """Linear(d, d) - BatchNorm1d - ReLU - Linear(d, d_out): the projection-head shape (SimCLR, BCL)."""
    return nn.Sequential(nn.Linear(d_in, d_in), nn.BatchNorm1d(d_in), nn.ReLU(inplace=True), nn.Linear(d_in, d_out))


def _check_backbone_name(name: str) -> None:
    import timm

    if name.startswith(_HUB_PREFIXES):
        raise ConfigError(
            f"model.backbone: {name!r} refers to a hub location, which would download weights; use a timm "
            f"architecture name (e.g. 'resnet50') and put local weights in model.pretrained_file."
        )
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ConfigError(
            f"model.backbone: {name!r} is not a timm model.{hint} "
            f"List the choices with python -c \"import timm; print(timm.list_models('*resnet*'))\"."
        )


def _verify_loaded(backbone: nn.Module, path: Path) -> None:
    """Fail when a weights file shares too few tensors with the backbone.

    Why: timm loads non-strictly when the classifier is dropped (num_classes=0), so a file for a
    different architecture would otherwise "load" nothing and train from random weights silently.
    """
    from timm.models import load_state_dict

    file_sd = load_state_dict(str(path), device="cpu")
    # timm model files name their key-remapping function checkpoint_filter_fn (by convention)
    filter_fn = getattr(sys.modules.get(type(backbone).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            file_sd = filter_fn(file_sd, backbone)
        except Exception:  # noqa: BLE001 - a filter for another format; the raw keys are checked then
            pass
    own = backbone.state_dict()
    matched = sum(1 for k, v in own.items() if k in file_sd and tuple(file_sd[k].shape) == tuple(v.shape))
    if matched < 0.9 * len(own):
        raise PipelineError(
            f"model.pretrained_file: {path} holds weights for only {matched} of the {len(own)} tensors of "
            f"backbone {type(backbone).__name__}; it was saved from another architecture. Point "
            f"model.pretrained_file at weights of the backbone named in model.backbone."
        )


def _first_lines(exc: BaseException, n: int = 2, limit: int = 300) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return (" ".join(lines[:n]) or "no message")[:limit]


def create_backbone(name: str, pretrained_file: str | None = None, drop_rate: float = 0.0, **timm_kwargs: Any) -> nn.Module:
    """Build a timm feature extractor (`num_classes=0`: forward returns pooled features [N, d]).

    Args:
        name: timm architecture name (`model.backbone`).
        pretrained_file: local weights (state dict, timm/torch checkpoint or .safetensors); None
            means random initialisation. Loaded by timm itself (so its key filters and input-conv
            adaptation apply) through `pretrained_cfg_overlay=dict(file=...)`.
        drop_rate: dropout before the (removed) classifier, passed to timm.
        **timm_kwargs: extra `timm.create_model` arguments (e.g. `img_size` for ViTs).

    Raises:
        ConfigError: unknown architecture (with close matches) or a hub name.
        PipelineError: the weights file is missing, unreadable or for another architecture.
    """
    import timm

    _check_backbone_name(name)
    kwargs: dict[str, Any] = dict(num_classes=0, drop_rate=drop_rate, **timm_kwargs)
    if pretrained_file is None:
        return timm.create_model(name, pretrained=False, **kwargs)
    path = Path(pretrained_file).expanduser()
    if not path.is_file():
        raise PipelineError(
            f"model.pretrained_file: {path} does not exist. Weights are never downloaded: save them to a local "
            f"file (e.g. torch.save(timm_model.state_dict(), 'resnet50.pth')) and set model.pretrained_file to it, "
            f"or set model.pretrained_file to null to start from random weights."
        )
    # Belt and braces: the overlay below points timm at the file and clears every remote source,
    # and the hub is told to stay offline should any code path still reach for it.
    os.environ["HF_HUB_OFFLINE"] = "1"
    overlay = dict(file=str(path), url="", hf_hub_id=None, source="")
    try:
        backbone = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except (RuntimeError, KeyError, ValueError, OSError, EOFError, pickle.UnpicklingError) as exc:
        raise PipelineError(
            f"model.pretrained_file: could not load {path} into backbone {name!r} ({type(exc).__name__}: "
            f"{_first_lines(exc)}). Check that the file holds weights of "
            f"this architecture."
        ) from None
    _verify_loaded(backbone, path)
    return backbone


class EclNetwork(nn.Module):
    """Backbone + cosine classifier + projection head + prototype head.

    Args:
        backbone: timm model returning pooled features [N, d].
        feature_dim: d.
        num_classes: C.
        proj_dim: d_z (width of z and of the prototypes).
        classifier_scale: s of the cosine classifier.
        prototype_head: "linear" or "mlp" (shape of phi).
        proj_head: build the projection head (contrastive methods); without it `z` is None.
        prototypes: build the prototype head; without it `prototypes` is None.
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int, proj_dim: int,
                 classifier_scale: float = 30.0, prototype_head: str = "linear", proj_head: bool = True,
                 prototypes: bool = True):
        super().__init__()
        self.backbone = backbone
        self._feature_dim = int(feature_dim)
        self._proj_dim = int(proj_dim)
        self.classifier_scale = float(classifier_scale)
        self.prototype_head_kind = prototype_head
        self.projection: nn.Module | None = _mlp(self._feature_dim, self._proj_dim) if proj_head else None
        self._with_prototypes = bool(prototypes)
        self.weight = nn.Parameter(torch.empty(0))
        self.prototype_head: nn.Module | None = None
        self.reset_classes(num_classes)

    @property
    def feature_dim(self) -> int:
        return self._feature_dim

    @property
    def proj_dim(self) -> int:
        return self._proj_dim

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[0])

    def reset_classes(self, num_classes: int) -> None:
        """Fresh classifier weight [C, d] and prototype head for a new class list; backbone and
        projection head are kept (fine-tuning a trained network on other classes).

        Build the optimizer after calling this: the classifier and prototype parameters are new objects.
        """
        if num_classes < 2:
            raise ConfigError(f"The network needs at least 2 classes; got {num_classes}. Check the cache's class_names.")
        ref = next(self.backbone.parameters(), None)
        device = ref.device if ref is not None else torch.device("cpu")
        dtype = ref.dtype if ref is not None else torch.float32
        weight = torch.empty(num_classes, self._feature_dim, device=device, dtype=dtype)
        # Same init as nn.Linear; the cosine classifier only sees directions, so the scale is moot.
        nn.init.kaiming_uniform_(weight, a=5 ** 0.5)
        self.weight = nn.Parameter(weight)
        self._build_prototype_head()

    @property
    def has_prototypes(self) -> bool:
        """Whether the network carries a prototype head (methods that use prototypes: bcl, ecl)."""
        return self.prototype_head is not None

    def _build_prototype_head(self) -> None:
        """A fresh prototype head phi (or none, per `_with_prototypes`) on the classifier's device/dtype."""
        if self._with_prototypes:
            head = (nn.Linear(self._feature_dim, self._proj_dim) if self.prototype_head_kind == "linear"
                    else _mlp(self._feature_dim, self._proj_dim))
            self.prototype_head = head.to(device=self.weight.device, dtype=self.weight.dtype)
        else:
            self.prototype_head = None

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """`nn.Module.load_state_dict`, except that a strict load lets the weights decide the prototype head.

        Why: a method that never uses prototypes (SupCon) is trained without a prototype head, while
        checkpoints only record ``proj_head``, so `pipeline.checkpoint.load_trained_model` cannot know
        whether to build one. With ``strict=True`` a state without ``prototype_head.*`` tensors removes
        the head and a state with them builds one, before loading; non-strict loads (fine-tuning from a
        parent run) keep the network's own heads.
        """
        if strict:
            stored = any(str(k).startswith("prototype_head.") for k in state_dict)
            if stored != self.has_prototypes:
                self._with_prototypes = stored
                self._build_prototype_head()
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def cosine_logits(self, h: Tensor) -> Tensor:
        """s * cos(h, w_c): [N, d] -> [N, C]."""
        return self.classifier_scale * F.normalize(h, dim=1) @ F.normalize(self.weight, dim=1).t()

    def class_prototypes(self) -> Tensor | None:
        """p_c = normalise(phi(w_c)) [C, d_z], from the current (not detached) classifier weight."""
        if self.prototype_head is None:
            return None
        return F.normalize(self.prototype_head(self.weight), dim=1)

    def forward(self, x: Tensor, return_all: bool = False) -> Tensor | dict[str, Tensor | None]:
        """Eval path: raw cosine logits [N, C]. Training path (`return_all=True`): a dict with
        h [N, d], logits [N, C], z [N, d_z] (unit rows; None without projection head),
        prototypes [C, d_z] (unit rows; None without prototype head) and weight [C, d] (raw W).

        Training stacks views view-major (rows [0:B] view 0, [B:2B] view 1, ...).
        """
        h = self.backbone(x)
        logits = self.cosine_logits(h)
        if not return_all:
            return logits
        z = F.normalize(self.projection(h), dim=1) if self.projection is not None else None
        return dict(h=h, logits=logits, z=z, prototypes=self.class_prototypes(), weight=self.weight)


def create_network(model_cfg: ModelConfig, num_classes: int, proj_head: bool = True,
                   prototypes: bool | None = None, **timm_kwargs: Any) -> EclNetwork:
    """Build the network a config describes.

    Args:
        model_cfg: the `model` section (backbone, pretrained_file, proj_dim, prototype_head,
            classifier_scale, drop_rate).
        num_classes: C, from the cache's class list.
        proj_head: build the projection head (methods with a contrastive term).
        prototypes: build the prototype head; None = same as `proj_head`. Pass False for methods
            that never use prototypes (SupCon) so DDP has no unused parameters.
        **timm_kwargs: passed to `timm.create_model` (e.g. `img_size=64` for a ViT at 64 px).

    Returns:
        EclNetwork on the CPU in float32.

    Raises:
        ConfigError: unknown backbone name (with close matches from timm) or fewer than 2 classes.
        PipelineError: `model.pretrained_file` is missing or does not fit the backbone.

    Example:
        >>> net = create_network(ModelConfig(backbone="test_resnet"), num_classes=8)
        >>> out = net(torch.randn(6, 3, 64, 64), return_all=True)  # out["z"]: [6, 96]
    """
    backbone = create_backbone(model_cfg.backbone, model_cfg.pretrained_file, model_cfg.drop_rate, **timm_kwargs)
    d = int(getattr(backbone, "head_hidden_size", None) or backbone.num_features)
    d_z = int(model_cfg.proj_dim or d)
    return EclNetwork(
        backbone, feature_dim=d, num_classes=num_classes, proj_dim=d_z,
        classifier_scale=model_cfg.classifier_scale, prototype_head=model_cfg.prototype_head or "linear",
        proj_head=proj_head, prototypes=proj_head if prototypes is None else prototypes,
    )


def model_data_config(network: EclNetwork | nn.Module) -> dict[str, Any]:
    """Preprocessing that follows the backbone (timm's pretrained config): mean, std, input_size,
    interpolation and crop_pct. Pass the result as `norm` to `pipeline.data`.
    """
    from timm.data import resolve_model_data_config

    backbone = network.backbone if isinstance(network, EclNetwork) else network
    cfg = resolve_model_data_config(backbone)
    return dict(mean=tuple(float(v) for v in cfg["mean"]), std=tuple(float(v) for v in cfg["std"]),
                input_size=tuple(int(v) for v in cfg["input_size"]), interpolation=str(cfg.get("interpolation", "bilinear")),
                crop_pct=float(cfg.get("crop_pct", 1.0)))
