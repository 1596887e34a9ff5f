"""Grad-CAM overlays ("where the model looked") for a few correct and wrong images per class.

Why: a clinician who sees that a melanoma call rests on a ruler mark, a hair or the image border
(or, for CT, on the chest wall rather than the nodule) learns more about the model's failure modes
than from any summary metric. Grad-CAM (Selvaraju et al. 2017) weights the activation maps of the
last convolutional stage by the spatially averaged gradient of the predicted class score, keeps
the positive part and upsamples it to the input; we use the maintained `grad-cam` package
(`pytorch_grad_cam`) and write by hand only what is ours: which layer of a timm backbone, which
images, and how the panels look in the report.

Images are chosen deterministically: per true class, the most confident correct predictions and
the most confident wrong ones (confident mistakes are the informative ones), ties broken by cache
row. Panels show the exact pixels the network saw (the deterministic eval view, before
normalisation) beside the overlay, and captions name only cache positions and class names, never
a file name or a patient identifier.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from . import report
from .errors import PipelineError

__all__ = ["TargetLayer", "find_target_layer", "grad_cam_maps", "select_examples", "overlay", "saliency_panel",
           "saliency_section"]

#: blend of image and heat map in the overlay (0.5: both stay readable)
IMAGE_WEIGHT = 0.5


@dataclass
class TargetLayer:
    """The backbone module Grad-CAM reads, and how to turn its output into [N, C, h, w]."""

    module: Any  # torch.nn.Module
    name: str  # dotted path inside the backbone, for the report
    reshape: Callable[[Any], Any] | None  # None: the output is already [N, C, h, w]


def _tokens_to_grid(prefix: int) -> Callable[[Any], Any]:
    """ViT-style [N, prefix + h*w, C] tokens -> [N, C, h, w] (the class/register tokens dropped)."""

    def reshape(t: Any) -> Any:
        if t.ndim != 3:
            raise PipelineError(f"Grad-CAM: expected transformer tokens [N, L, C], got shape {tuple(t.shape)}")
        n = t.shape[1] - prefix
        side = math.isqrt(max(n, 0))
        if side * side != n or n == 0:
            raise PipelineError(f"Grad-CAM: {n} patch tokens do not form a square grid; saliency needs square inputs "
                                f"(set eval.saliency_per_class=0 to skip it)")
        return t[:, prefix:, :].reshape(t.shape[0], side, side, t.shape[2]).permute(0, 3, 1, 2)

    return reshape


def _nhwc_to_nchw(t: Any) -> Any:
    return t.permute(0, 3, 1, 2)


def find_target_layer(backbone: Any) -> TargetLayer:
    """The last feature stage of a timm backbone, the layer Grad-CAM is usually computed on.

    timm lists its stages in `feature_info` (ResNet: 'layer4', ConvNeXt: 'stages.3', EfficientNet:
    'blocks.N'); the last one has the coarsest, most semantic maps. Channels-last stages
    (MambaOut) are permuted. For a ViT the last block's output is a poor choice: its patch tokens
    reach the class token only through the final norm and the token pooling, so their gradient is
    zero; the standard fix (pytorch-grad-cam's ViT tutorial) is the last block's `norm1`, reshaped
    from tokens to a grid. Without feature_info the last Conv2d is used.

    Raises:
        PipelineError: the backbone has no stage, block or convolution to read.
    """
    from torch import nn

    info = getattr(backbone, "feature_info", None)
    entry = None
    try:
        entry = info[-1] if info else None
    except (TypeError, IndexError, KeyError):  # a FeatureInfo object without a plain list: use .get
        entry = None
    if isinstance(entry, dict) and entry.get("module"):
        name = str(entry["module"])
        module = backbone.get_submodule(name)
        prefix = getattr(backbone, "num_prefix_tokens", None)
        if prefix is not None:  # a transformer: tokens, read before the last block's attention
            if hasattr(module, "norm1"):
                name, module = f"{name}.norm1", module.norm1
            return TargetLayer(module, name, _tokens_to_grid(int(prefix)))
        channels = int(entry.get("num_chs") or 0)
        return TargetLayer(module, name, _ChannelOrder(channels))
    convs = [(n, m) for n, m in backbone.named_modules() if isinstance(m, nn.Conv2d)]
    if convs:
        name, module = convs[-1]
        return TargetLayer(module, name, None)
    raise PipelineError(f"Grad-CAM: backbone {type(backbone).__name__} has no feature stages or convolutions to read; "
                        f"set eval.saliency_per_class=0 to skip the saliency section")


class _ChannelOrder:
    """[N, C, h, w] passes; [N, h, w, C] (channels-last stages) is permuted; anything else is an error."""

    def __init__(self, channels: int):
        self.channels = channels

    def __call__(self, t: Any) -> Any:
        if t.ndim != 4:
            raise PipelineError(f"Grad-CAM: the target layer gives shape {tuple(t.shape)}, not an image-shaped map; "
                                f"set eval.saliency_per_class=0 to skip the saliency section")
        if self.channels and t.shape[1] != self.channels and t.shape[3] == self.channels:
            return _nhwc_to_nchw(t)
        return t


def grad_cam_maps(network: Any, x: Any, classes: Sequence[int], layer: TargetLayer | None = None,
                  batch_size: int = 32) -> np.ndarray:
    """Grad-CAM maps of `classes` (one per image) for normalised inputs x [N, 3, H, W].

    Returns:
        float32 [N, H, W] in [0, 1] (each map min-max scaled, as pytorch_grad_cam returns it).
    """
    import torch
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    backbone = getattr(network, "backbone", network)
    layer = layer or find_target_layer(backbone)
    was_training = network.training
    cam = GradCAM(model=network, target_layers=[layer.module], reshape_transform=layer.reshape)
    out = []
    try:
        with torch.enable_grad():
            for s in range(0, len(x), batch_size):
                xb = x[s:s + batch_size].detach().clone().requires_grad_(True)  # gradients even with frozen weights
                targets = [ClassifierOutputTarget(int(c)) for c in classes[s:s + batch_size]]
                out.append(np.asarray(cam(input_tensor=xb, targets=targets), dtype=np.float32))
    finally:
        cam.activations_and_grads.release()
        network.zero_grad(set_to_none=True)
        network.train(was_training)
    h, w = x.shape[-2:]
    return np.concatenate(out) if out else np.zeros((0, h, w), np.float32)


def select_examples(probs: np.ndarray, labels: np.ndarray, rows: np.ndarray, n_per_class: int) -> list[dict[str, Any]]:
    """Per true class, up to n correct and n wrong predictions, the most confident first.

    Deterministic: sorted by predicted-class probability (descending), then by cache row.

    Returns:
        One dict per chosen image: ``{"row", "label", "pred", "prob", "correct"}``, grouped by
        class (classes in order), correct before wrong.
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    rows = np.asarray(rows, dtype=np.int64)
    pred = probs.argmax(axis=1) if len(probs) else np.zeros(0, np.int64)
    conf = probs.max(axis=1) if len(probs) else np.zeros(0)
    chosen: list[dict[str, Any]] = []
    if n_per_class <= 0:
        return chosen
    for c in range(probs.shape[1] if probs.ndim == 2 else 0):
        for correct in (True, False):
            idx = np.flatnonzero((labels == c) & ((pred == c) == correct))
            idx = idx[np.lexsort((rows[idx], -conf[idx]))][:n_per_class]
            chosen += [{"row": int(rows[i]), "label": int(c), "pred": int(pred[i]), "prob": float(conf[i]),
                        "correct": bool(correct)} for i in idx]
    return chosen


def display_channel(kind: str, options: dict[str, Any] | None) -> int | None:
    """Which channel to show in grey (CT: the lung-window axial slice), or None for colour images."""
    if kind != "ct":
        return None
    return 1 if (options or {}).get("channels") == "adjacent" else 0  # adjacent: the middle slice is the slice


def overlay(image: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """uint8 RGB [H, W, 3]: the image blended with the jet-coloured map (pytorch_grad_cam's overlay)."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    return show_cam_on_image(image.astype(np.float32) / 255.0, np.clip(cam, 0, 1), use_rgb=True,
                             image_weight=IMAGE_WEIGHT)


def _tile(img: np.ndarray, side: int) -> np.ndarray:
    import cv2

    if img.shape[0] == side and img.shape[1] == side:
        return img
    return cv2.resize(img, (side, side), interpolation=cv2.INTER_NEAREST)  # the pixels as they are, enlarged


def _font(size: int) -> Any:
    """DejaVu Sans (shipped with matplotlib, the font of the other report figures), else Pillow's own."""
    from pathlib import Path

    import matplotlib
    from PIL import ImageFont

    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    try:
        return ImageFont.truetype(str(path), size)
    except OSError:
        return ImageFont.load_default(size=size)


def saliency_panel(class_name: str, correct: list[tuple[np.ndarray, np.ndarray, str]],
                   wrong: list[tuple[np.ndarray, np.ndarray, str]], n_per_class: int, side: int = 112) -> bytes:
    """One PNG for one true class: a row of correct and a row of wrong predictions.

    Each example is (shown image uint8 [H, W, 3], overlay uint8 [H, W, 3], label text) and is drawn
    as the image beside its overlay, with a colour key for the heat map. Why Pillow and not
    matplotlib: the report has one such mosaic per class, and matplotlib needs about 0.5 s per
    figure on one core where composing the pixels and the labels directly takes milliseconds.
    """
    import io

    import cv2
    from PIL import Image, ImageDraw

    cols = max(n_per_class, 1)
    gap, inner, left, top, label_h, key_h = 14, 4, 64, 24, 16, 30
    pair_w = 2 * side + inner
    width = left + cols * pair_w + (cols - 1) * gap + 8
    row_h = label_h + side
    height = top + 2 * row_h + gap + key_h
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    font, small = _font(13), _font(11)
    draw.text((left, 4), f"True class {class_name}: image and Grad-CAM of the predicted class", fill="black", font=font)
    for r, (title, examples) in enumerate((("correct", correct), ("wrong", wrong))):
        y0 = top + r * (row_h + gap)
        draw.text((6, y0 + label_h + side // 2), title, fill="black", font=font, anchor="lm")
        if not examples:
            draw.text((left + 4, y0 + label_h + side // 2), f"no {title} prediction for this class", fill="#777777",
                      font=small, anchor="lm")
        for k, (img, ov, text) in enumerate(examples[:cols]):
            x0 = left + k * (pair_w + gap)
            draw.text((x0 + pair_w // 2, y0 + label_h - 3), text, fill="black", font=small, anchor="ms")
            canvas.paste(Image.fromarray(np.ascontiguousarray(_tile(img, side))), (x0, y0 + label_h))
            canvas.paste(Image.fromarray(np.ascontiguousarray(_tile(ov, side))), (x0 + side + inner, y0 + label_h))
    # colour key: the jet map of pytorch_grad_cam's overlay, from no to most influence
    key_w = min(200, width - left - 120)
    ramp = cv2.applyColorMap(np.tile(np.linspace(0, 255, key_w).astype(np.uint8), (8, 1)), cv2.COLORMAP_JET)
    ky = height - key_h + 10
    canvas.paste(Image.fromarray(cv2.cvtColor(ramp, cv2.COLOR_BGR2RGB)), (left + 50, ky))
    draw.text((left + 46, ky + 4), "least", fill="black", font=small, anchor="rm")
    draw.text((left + 54 + key_w, ky + 4), "most influence", fill="black", font=small, anchor="lm")
    buf = io.BytesIO()
    canvas.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def saliency_section(network: Any, cache: Any, rows: np.ndarray, probs: np.ndarray, labels: np.ndarray,
                     class_names: Sequence[str], data_cfg: Any, n_per_class: int, norm: dict[str, Any] | None = None,
                     device: str = "cpu", batch_size: int = 32) -> dict[str, Any]:
    """The report's "Where the model looked" section.

    Args:
        network: the evaluated `EclNetwork` (eval mode, on `device`).
        cache: the opened `data_prep.Cache`.
        rows: cache rows of the labelled images, aligned with `probs` and `labels`.
        probs: [N, C] calibrated probabilities (the argmax is the predicted class explained).
        labels: [N] true class positions.
        class_names: C names.
        data_cfg: the run's `data` section (the deterministic eval view).
        n_per_class: correct and wrong images per class (`eval.saliency_per_class`); 0 disables.
        norm: backbone mean/std; default `pipeline.models.model_data_config(network)`.

    Returns:
        ``{"enabled", "note", "layer", "n_per_class", "kind", "classes": [{"name", "caption",
        "uri", "key"}], "examples": [...], "figures": {key: png bytes}}``. `figures` are for files
        beside the report (`saliency_<key>.png`); the template reads `classes`. A backbone that
        Grad-CAM cannot read gives ``enabled=False`` and a note saying why (it never raises).
    """
    import torch

    from .data import ViewTransform, _as_rgb, deterministic_view, normalize_on_device
    from .models import model_data_config

    names = list(class_names)
    base: dict[str, Any] = {"enabled": False, "note": None, "layer": None, "n_per_class": int(n_per_class),
                            "kind": cache.kind, "classes": [], "examples": [], "figures": {}}
    if n_per_class <= 0:
        base["note"] = "Saliency maps are off for this evaluation (eval.saliency_per_class = 0)."
        return base
    examples = select_examples(probs, labels, rows, n_per_class)
    if not examples:
        base["note"] = "No labelled image in this split, so there is nothing to explain."
        return base
    norm = norm or model_data_config(network)
    view = ViewTransform([deterministic_view(data_cfg)], norm, stack=False, normalize=False)
    pixels = torch.stack([view(_as_rgb(cache.image(e["row"]))) for e in examples])  # uint8 [N, 3, S, S]
    x = normalize_on_device(pixels, norm).to(device)
    try:
        layer = find_target_layer(network.backbone)
        maps = grad_cam_maps(network, x, [e["pred"] for e in examples], layer, batch_size=batch_size)
    except (PipelineError, RuntimeError, ValueError) as exc:  # an optional figure never aborts an evaluation
        base["note"] = f"Saliency maps could not be computed for backbone {type(network.backbone).__name__}: {exc}"
        return base
    shown = pixels.permute(0, 2, 3, 1).numpy()
    channel = display_channel(cache.kind, cache.meta.get("options"))
    if channel is not None:
        shown = np.repeat(shown[..., channel:channel + 1], 3, axis=-1)

    out = dict(base, enabled=True, layer=layer.name)
    for e, m in zip(examples, maps):
        e["text"] = (f"#{e['row']}: {'' if e['correct'] else 'called '}{names[e['pred']]} {e['prob']:.2f}")
    for c, name in enumerate(names):
        picked = [(i, e) for i, e in enumerate(examples) if e["label"] == c]
        if not picked:
            continue
        panels = {flag: [(shown[i], overlay(shown[i], maps[i]), e["text"]) for i, e in picked if e["correct"] == flag]
                  for flag in (True, False)}
        png = saliency_panel(name, panels[True], panels[False], n_per_class)
        key = str(c)
        out["figures"][key] = png
        rows_c = ", ".join(f"#{e['row']}" for _, e in picked)
        n_wrong = sum(1 for _, e in picked if not e["correct"])
        out["classes"].append({
            "name": name, "key": key, "uri": report.data_uri(png),
            "caption": (f"True class {name}: {len(picked) - n_wrong} correct and {n_wrong} wrong prediction(s), "
                        f"most confident first; labels give the cache position, the predicted class and its "
                        f"calibrated probability (images {rows_c})."),
        })
    absent = [n for c, n in enumerate(names) if not any(e["label"] == c for e in examples)]
    if absent:
        out["note"] = f"No labelled image of {', '.join(absent)} in this split."
    out["examples"] = [{k: v for k, v in e.items()} for e in examples]
    return out
