"""A seeded synthetic dermoscopy cohort in ISIC 2019's exact on-disk layout.

Why: tests, the demo and the benchmarks need a cohort that exercises every quirk of the real
files (``_downsampled`` names, the all-zero ``UNK`` column, empty metadata fields, several images
per lesion, mixed image sizes, non-image files beside the JPEGs) without downloading 9 GB.

The pictures are procedurally drawn lesions on skin. Each class has its own tendencies (hue,
darkness, size, border irregularity, globules, streaks, a blue-white veil, vessels, lacunae,
milia-like cysts, a central white patch...), but every lesion draws its parameters with wide
noise and about a third borrow part of another class's look. A small CNN therefore learns the
classes clearly above chance yet not perfectly, and the rare classes, with fewer examples, stay
harder than the common ones, as in the real cohort.

Layout written under ``out_dir``::

    ISIC_2019_Training_Input/ISIC_0012345.jpg          (about 10 % end in ``_downsampled``)
    ISIC_2019_Training_Input/LICENSE.txt, ATTRIBUTION.txt
    ISIC_2019_Training_GroundTruth.csv                  image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK
    ISIC_2019_Training_Metadata.csv                     image,age_approx,anatom_site_general,lesion_id,sex

The same seed always gives byte-identical files, whatever the number of worker processes:
every image draws from its own generator seeded by (seed, image position) and its lesion's
generator seeded by (seed, lesion position).
"""
from __future__ import annotations

import io
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..io import atomic_write_bytes, atomic_write_text

__all__ = [
    "generate_dermoscopy",
    "class_counts",
    "ISIC2019_COLUMNS",
    "ISIC2019_FREQUENCIES",
    "DEFAULT_SIZES",
    "IMAGES_DIR",
    "GROUND_TRUTH_CSV",
    "METADATA_CSV",
]

IMAGES_DIR = "ISIC_2019_Training_Input"
GROUND_TRUTH_CSV = "ISIC_2019_Training_GroundTruth.csv"
METADATA_CSV = "ISIC_2019_Training_Metadata.csv"

#: Ground-truth columns after `image`, in the real file's order.
ISIC2019_COLUMNS = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK")

#: Class shares of the 25,331 ISIC 2019 training images (UNK has none).
ISIC2019_FREQUENCIES: dict[str, float] = {
    "MEL": 0.179, "NV": 0.508, "BCC": 0.131, "AK": 0.034, "BKL": 0.104,
    "DF": 0.009, "VASC": 0.010, "SCC": 0.025,
}

#: (width, height) -> weight. Mostly the small ISIC size, keeping the default cohort fast.
DEFAULT_SIZES: dict[tuple[int, int], float] = {(600, 450): 0.75, (1024, 768): 0.2, (767, 1022): 0.05}

_SITES = ("anterior torso", "posterior torso", "lower extremity", "upper extremity", "head/neck",
          "lateral torso", "palms/soles", "oral/genital")
_SITE_P = np.array([0.26, 0.20, 0.20, 0.13, 0.12, 0.03, 0.04, 0.02])
_WORK_SHORT = 192  # lesions are drawn at this short side, then resized to the file's size


def class_counts(n_images: int, frequencies: Mapping[str, float] | None = None, min_count: int = 3) -> dict[str, int]:
    """Images per class for a cohort of `n_images`, by largest-remainder rounding.

    Why largest remainder: the counts sum exactly to `n_images` and each differs from its exact
    quota by less than one. Classes below `min_count` are then raised to it, taking images one by
    one from the class furthest above its quota, so small cohorts still hold every class.

    Raises:
        ValueError: `n_images` cannot give every class `min_count` images.
    """
    freqs = dict(frequencies or ISIC2019_FREQUENCIES)
    names = list(freqs)
    p = np.array([freqs[k] for k in names], dtype=float)
    p = p / p.sum()
    if n_images < min_count * len(names):
        raise ValueError(f"n_images={n_images} is too small: {len(names)} classes need at least {min_count} images each")
    quota = n_images * p
    counts = np.floor(quota).astype(int)
    remainder = quota - counts
    for k in np.argsort(-remainder, kind="stable")[: n_images - counts.sum()]:
        counts[k] += 1
    while (counts < min_count).any():
        short = int(np.flatnonzero(counts < min_count)[0])
        donor = int(np.argmax(np.where(counts > min_count, counts - quota, -np.inf)))
        counts[donor] -= 1
        counts[short] += 1
    return {name: int(c) for name, c in zip(names, counts)}


# ---------------------------------------------------------------------------------------------
# Class looks. Colours are RGB in [0, 1]; sizes are fractions of the image's short side.


@dataclass(frozen=True)
class _Look:
    colour: tuple[float, float, float]
    colour2: tuple[float, float, float]  # second colour for heterogeneous lesions
    radius: float
    irregularity: float  # amplitude of the radial Fourier noise of the border
    softness: float  # border width
    heterogeneity: float  # share of colour2 patches
    network: float  # amplitude of mid-frequency pigment texture
    globules: float  # probability / density of dark dots
    streaks: float
    veil: float
    vessels: float
    lacunae: float
    milia: float
    scale: float  # white keratin speckles
    centre_white: float  # central white patch (DF scar, SCC keratin)


_LOOKS: dict[str, _Look] = {
    "NV": _Look((0.47, 0.30, 0.20), (0.36, 0.22, 0.15), 0.22, 0.05, 0.035, 0.15, 0.10, 0.35, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
    "MEL": _Look((0.33, 0.20, 0.15), (0.22, 0.22, 0.30), 0.30, 0.16, 0.025, 0.55, 0.16, 0.45, 0.45, 0.45, 0.05, 0.0, 0.0, 0.0, 0.0),
    "BCC": _Look((0.70, 0.53, 0.52), (0.36, 0.38, 0.47), 0.21, 0.09, 0.05, 0.35, 0.05, 0.05, 0.0, 0.05, 0.8, 0.0, 0.0, 0.1, 0.1),
    "AK": _Look((0.78, 0.50, 0.46), (0.70, 0.40, 0.38), 0.25, 0.07, 0.11, 0.25, 0.06, 0.0, 0.0, 0.0, 0.3, 0.0, 0.0, 0.7, 0.1),
    "BKL": _Look((0.58, 0.41, 0.28), (0.45, 0.32, 0.22), 0.25, 0.08, 0.02, 0.25, 0.18, 0.1, 0.05, 0.0, 0.0, 0.0, 0.6, 0.2, 0.0),
    "DF": _Look((0.62, 0.45, 0.34), (0.55, 0.38, 0.30), 0.14, 0.05, 0.07, 0.1, 0.12, 0.05, 0.0, 0.0, 0.1, 0.0, 0.0, 0.0, 0.8),
    "VASC": _Look((0.62, 0.18, 0.26), (0.40, 0.12, 0.28), 0.17, 0.06, 0.03, 0.4, 0.04, 0.0, 0.0, 0.0, 0.3, 0.85, 0.0, 0.0, 0.0),
    "SCC": _Look((0.80, 0.55, 0.52), (0.72, 0.45, 0.44), 0.22, 0.11, 0.06, 0.25, 0.05, 0.0, 0.0, 0.0, 0.6, 0.0, 0.0, 0.4, 0.65),
}
_FIELDS = list(_Look.__dataclass_fields__)


def _lesion_look(label: str, rng: np.random.Generator) -> dict[str, np.ndarray | float]:
    """Per-lesion parameters: the class look, maybe blended with another class, plus noise."""
    look = {k: np.asarray(getattr(_LOOKS[label], k), dtype=float) for k in _FIELDS}
    if rng.random() < 0.35:  # overlap: borrow part of another class's look
        other = _LOOKS[str(rng.choice(sorted(_LOOKS)))]
        w = rng.uniform(0.2, 0.6)
        look = {k: (1 - w) * v + w * np.asarray(getattr(other, k), dtype=float) for k, v in look.items()}
    look["colour"] = np.clip(look["colour"] + rng.normal(0, 0.07, 3) + rng.normal(0, 0.06), 0.05, 0.95)
    look["colour2"] = np.clip(look["colour2"] + rng.normal(0, 0.06, 3), 0.05, 0.95)
    look["radius"] = float(np.clip(look["radius"] * rng.lognormal(0, 0.22), 0.07, 0.42))
    look["irregularity"] = float(np.clip(look["irregularity"] * rng.lognormal(0, 0.4), 0.01, 0.3))
    look["softness"] = float(np.clip(look["softness"] * rng.lognormal(0, 0.35), 0.008, 0.2))
    for k in ("heterogeneity", "network", "globules", "streaks", "veil", "vessels", "lacunae", "milia", "scale", "centre_white"):
        look[k] = float(np.clip(look[k] + rng.normal(0, 0.08), 0.0, 1.0))
    # border shape: radial Fourier coefficients, fixed per lesion
    k = np.arange(2, 9)
    look["fourier_amp"] = rng.normal(0, 1, k.size) / k**0.8
    look["fourier_phase"] = rng.uniform(0, 2 * np.pi, k.size)
    t = rng.random() ** 1.4  # skin tone: light (0) to dark (1)
    look["skin"] = np.array([0.93, 0.76, 0.68]) * (1 - t) + np.array([0.62, 0.43, 0.32]) * t + rng.normal(0, 0.02, 3)
    return look


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Zero-mean unit-ish noise varying over about `cells` cells along the short side."""
    ch = max(2, int(round(cells * h / min(h, w))))
    cw = max(2, int(round(cells * w / min(h, w))))
    small = rng.standard_normal((ch, cw)).astype(np.float32)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC))


def _layer(h: int, w: int, draw_fn, blur: float = 0.0) -> np.ndarray:
    """Draw with PIL on an 8-bit mask and return it as float32 in [0, 1]."""
    im = Image.new("L", (w, h), 0)
    draw_fn(ImageDraw.Draw(im))
    if blur > 0:
        im = im.filter(ImageFilter.GaussianBlur(blur))
    return np.asarray(im, dtype=np.float32) / 255.0


def _blend(img: np.ndarray, alpha: np.ndarray, colour: np.ndarray) -> np.ndarray:
    a = alpha[..., None]
    return img * (1 - a) + colour.astype(np.float32) * a


def _draw_image(label: str, look: dict, rng: np.random.Generator, size: tuple[int, int]) -> bytes:
    """Draw one lesion and return the JPEG bytes at `size` (width, height)."""
    W, H = size
    s = _WORK_SHORT
    h, w = (s, int(round(s * W / H))) if H <= W else (int(round(s * H / W)), s)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cy = h * (0.5 + rng.normal(0, 0.05))
    cx = w * (0.5 + rng.normal(0, 0.05))
    rot = rng.uniform(0, 2 * np.pi)
    radius = look["radius"] * rng.lognormal(0, 0.08) * s
    dy, dx = (yy - cy), (xx - cx)
    dist = np.sqrt(dx * dx + dy * dy)
    ang = np.arctan2(dy, dx)
    # border radius as a function of angle, tabulated on 1024 angles then looked up per pixel
    k = np.arange(2, 9)
    table_ang = np.linspace(-np.pi, np.pi, 1025)
    table = (look["fourier_amp"][:, None] * np.cos(k[:, None] * (table_ang[None] + rot) + look["fourier_phase"][:, None])).sum(0)
    wobble = table.astype(np.float32)[np.rint((ang + np.pi) * (1024 / (2 * np.pi))).astype(np.int32)]
    r_theta = radius * (1 + look["irregularity"] * wobble)
    with np.errstate(over="ignore"):  # far outside the lesion exp overflows to inf: the mask is then exactly 0
        mask = 1 / (1 + np.exp(-(r_theta - dist) / (look["softness"] * s + 1e-3)))
    mask = mask.astype(np.float32)
    rel = dist / np.maximum(r_theta, 1.0)  # 0 at centre, 1 on the border

    # skin with blotches
    skin = look["skin"].astype(np.float32) + 0.03 * _smooth_noise(rng, h, w, 4)[..., None] * np.array([1.0, 0.8, 0.8], np.float32)
    img = skin

    # lesion body: base colour, low-frequency second colour patches, pigment texture
    body = np.broadcast_to(look["colour"].astype(np.float32), (h, w, 3)).copy()
    patches = 1 / (1 + np.exp(-(_smooth_noise(rng, h, w, 5) - (1.2 - 2.4 * look["heterogeneity"])) * 3))
    body = _blend(body, patches * min(1.0, 1.5 * look["heterogeneity"]), look["colour2"])
    body *= (1 + look["network"] * 0.6 * _smooth_noise(rng, h, w, 28))[..., None]
    body *= (1 - 0.12 * (1 - rel.clip(0, 1)) * rng.uniform(-1, 1))[..., None]  # central darkening or lightening
    img = _blend(img, mask, np.zeros(3)) + body * mask[..., None]

    inside = mask > 0.5
    ys, xs = np.nonzero(inside)

    def points(n: int, spread: float = 1.0) -> list[tuple[float, float]]:
        rr = radius * spread * np.sqrt(rng.random(n))
        tt = rng.uniform(0, 2 * np.pi, n)
        return list(zip(cx + rr * np.cos(tt), cy + rr * np.sin(tt)))

    if rng.random() < look["globules"]:
        n = int(rng.integers(8, 40))
        sizes = rng.uniform(1.0, 3.5, n) * s / 256
        pts = points(n, 0.95)
        lay = _layer(h, w, lambda d: [d.ellipse((x - r, y - r, x + r, y + r), fill=255) for (x, y), r in zip(pts, sizes)], blur=0.6)
        img = _blend(img, lay * 0.85, look["colour"] * 0.45)
    if rng.random() < look["streaks"]:
        n = int(rng.integers(6, 20))
        tt = rng.uniform(0, 2 * np.pi, n)
        def streak(d):
            for t in tt:
                r0, r1 = radius * rng.uniform(0.7, 0.9), radius * rng.uniform(1.05, 1.3)
                d.line((cx + r0 * np.cos(t), cy + r0 * np.sin(t), cx + r1 * np.cos(t), cy + r1 * np.sin(t)), fill=255, width=max(1, int(2 * s / 256)))
        img = _blend(img, _layer(h, w, streak, blur=0.8) * 0.8, look["colour"] * 0.5)
    if rng.random() < look["veil"]:
        (vx, vy), vr = points(1, 0.5)[0], radius * rng.uniform(0.3, 0.6)
        lay = _layer(h, w, lambda d: d.ellipse((vx - vr, vy - vr * 0.8, vx + vr, vy + vr * 0.8), fill=255), blur=vr * 0.4)
        img = _blend(img, lay * mask * 0.65, np.array([0.62, 0.68, 0.80]))
    if rng.random() < look["lacunae"]:
        n = int(rng.integers(5, 18))
        sizes = rng.uniform(0.08, 0.22, n) * radius
        pts = points(n, 0.8)
        lay = _layer(h, w, lambda d: [d.ellipse((x - r, y - r, x + r, y + r), fill=255) for (x, y), r in zip(pts, sizes)], blur=1.0)
        img = _blend(img, lay * 0.85, np.array([0.55, 0.08, 0.22]) * rng.uniform(0.7, 1.1))
    if rng.random() < look["vessels"]:
        def vessels(d):
            for _ in range(int(rng.integers(2, 6))):
                x, y = points(1, 0.8)[0]
                heading = rng.uniform(0, 2 * np.pi)
                pts = [(x, y)]
                for _ in range(int(rng.integers(6, 14))):
                    heading += rng.normal(0, 0.5)
                    x, y = x + np.cos(heading) * radius * 0.12, y + np.sin(heading) * radius * 0.12
                    pts.append((x, y))
                d.line(pts, fill=255, width=max(1, int(rng.integers(1, 3) * s / 256)))
        img = _blend(img, _layer(h, w, vessels, blur=0.5) * 0.85, np.array([0.78, 0.16, 0.20]))
    if rng.random() < look["milia"]:
        n = int(rng.integers(3, 12))
        sizes = rng.uniform(1.5, 3.5, n) * s / 256
        pts = points(n, 0.85)
        lay = _layer(h, w, lambda d: [d.ellipse((x - r, y - r, x + r, y + r), fill=255) for (x, y), r in zip(pts, sizes)], blur=0.7)
        img = _blend(img, lay * 0.9, np.array([0.95, 0.93, 0.85]))
    if rng.random() < look["scale"]:
        speck = (_smooth_noise(rng, h, w, 60) > 1.3).astype(np.float32) * mask
        img = _blend(img, speck * 0.7, np.array([0.93, 0.90, 0.86]))
    if rng.random() < look["centre_white"]:
        wr = radius * rng.uniform(0.25, 0.5)
        wx, wy = cx + rng.normal(0, 0.1) * radius, cy + rng.normal(0, 0.1) * radius
        lay = _layer(h, w, lambda d: d.ellipse((wx - wr, wy - wr, wx + wr, wy + wr), fill=255), blur=wr * 0.35)
        img = _blend(img, lay * 0.8, np.array([0.93, 0.90, 0.82]))
    if rng.random() < 0.3:  # hair
        def hair(d):
            for _ in range(int(rng.integers(1, 8))):
                x, y = rng.uniform(0, w), rng.uniform(0, h)
                heading = rng.uniform(0, 2 * np.pi)
                pts = [(x, y)]
                for _ in range(12):
                    heading += rng.normal(0, 0.12)
                    x, y = x + np.cos(heading) * s / 10, y + np.sin(heading) * s / 10
                    pts.append((x, y))
                d.line(pts, fill=255, width=int(rng.integers(1, 3)))
        img = _blend(img, _layer(h, w, hair, blur=0.4) * 0.9, np.array([0.12, 0.09, 0.07]))
    if rng.random() < 0.15:  # dermatoscope vignette
        edge = np.sqrt(((xx - w / 2) / (w / 2)) ** 2 + ((yy - h / 2) / (h / 2)) ** 2)
        img = img * (1 / (1 + np.exp((edge - rng.uniform(1.0, 1.25)) * 25)))[..., None]
    img = img * np.float32(rng.uniform(0.88, 1.08)) + np.float32(0.012) * rng.standard_normal(img.shape, dtype=np.float32)
    pil = Image.fromarray(np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8), "RGB")
    if (w, h) != (W, H):
        pil = pil.resize((W, H), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    pil.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _write_one(task: tuple) -> None:
    path, label, seed, index, lesion_index, size = task
    look = _lesion_look(label, np.random.default_rng([seed, 2, lesion_index]))
    data = _draw_image(label, look, np.random.default_rng([seed, 1, index]), size)
    atomic_write_bytes(path, data)


def _normalise_sizes(sizes: Sequence[tuple[int, int]] | Mapping[tuple[int, int], float] | None) -> tuple[list[tuple[int, int]], np.ndarray]:
    if sizes is None:
        sizes = DEFAULT_SIZES
    if isinstance(sizes, Mapping):
        keys = [tuple(int(v) for v in k) for k in sizes]
        weights = np.array(list(sizes.values()), dtype=float)
    else:
        keys = [tuple(int(v) for v in k) for k in sizes]
        weights = np.ones(len(keys))
    if not keys or (weights <= 0).all() or any(len(k) != 2 or min(k) < 16 for k in keys):
        raise ValueError(f"sizes must be (width, height) pairs of at least 16 px with positive weights, got {sizes!r}")
    return keys, weights / weights.sum()


def generate_dermoscopy(
    out_dir: str | os.PathLike,
    n_images: int = 600,
    seed: int = 0,
    sizes: Sequence[tuple[int, int]] | Mapping[tuple[int, int], float] | None = None,
    workers: int | None = None,
) -> dict[str, Path]:
    """Write a synthetic ISIC 2019 training cohort under `out_dir`.

    Args:
        out_dir: destination folder (created; existing files of the same names are replaced).
        n_images: number of images; at least 24 so every class gets 3.
        seed: the same seed always gives byte-identical files.
        sizes: (width, height) pairs, or a mapping from pair to weight; default `DEFAULT_SIZES`.
        workers: processes drawing images (default: up to 4, one for small cohorts). The output
            does not depend on it.

    Returns:
        dict(images=<image folder>, ground_truth=<CSV>, metadata=<CSV>).

    Example:
        >>> paths = generate_dermoscopy("/tmp/isic", n_images=120, seed=1)
        >>> sorted(paths)
        ['ground_truth', 'images', 'metadata']
    """
    out_dir = Path(out_dir)
    counts = class_counts(n_images)
    size_keys, size_p = _normalise_sizes(sizes)
    rng = np.random.default_rng([seed, 0])

    ids = np.sort(rng.choice(73_400, size=n_images, replace=False))
    names = [f"ISIC_{i:07d}" + ("_downsampled" if rng.random() < 0.1 else "") for i in ids]
    labels = np.array([c for c, n in counts.items() for _ in range(n)])
    labels = labels[rng.permutation(n_images)]
    size_idx = rng.choice(len(size_keys), size=n_images, p=size_p)

    # lesions: several images per lesion within a class; singleton MSK-like images without id
    lesion_of = np.empty(n_images, dtype=int)
    lesion_rows: list[dict[str, str]] = []
    used_numbers: set[int] = set()
    for label in counts:
        members = list(np.flatnonzero(labels == label))
        cap = max(1, min(4, len(members) // 6))
        while members:
            source = rng.choice(["HAM", "BCN", ""], p=[0.45, 0.35, 0.20])
            n = 1 if source == "" else int(min(cap, rng.geometric(0.6), len(members)))
            take, members = members[:n], members[n:]
            number = int(rng.integers(0, 10**7))
            while number in used_numbers:
                number = int(rng.integers(0, 10**7))
            used_numbers.add(number)
            old = label in ("MEL", "BCC", "AK", "SCC", "BKL")
            age = float(np.clip(round(rng.normal(63 if old else 42, 14) / 5) * 5, 0, 85))
            site = str(rng.choice(_SITES, p=_SITE_P / _SITE_P.sum()))
            sex = str(rng.choice(["male", "female"], p=[0.52, 0.48]))
            lesion_rows.append({
                "lesion_id": f"{source}_{number:07d}" if source else "",
                "age_approx": "" if rng.random() < 0.02 else f"{age:.1f}",
                "anatom_site_general": "" if rng.random() < 0.09 else site,
                "sex": "" if rng.random() < 0.015 else sex,
            })
            lesion_of[take] = len(lesion_rows) - 1

    images_dir = out_dir / IMAGES_DIR
    images_dir.mkdir(parents=True, exist_ok=True)
    tasks = [(images_dir / f"{names[i]}.jpg", str(labels[i]), seed, i, int(lesion_of[i]), size_keys[size_idx[i]]) for i in range(n_images)]
    if workers is None:
        workers = 1 if n_images < 64 else min(4, os.cpu_count() or 1)
    if workers > 1:
        with multiprocessing.get_context().Pool(workers) as pool:
            for _ in pool.imap_unordered(_write_one, tasks, chunksize=8):
                pass
    else:
        for task in tasks:
            _write_one(task)
    atomic_write_text(images_dir / "LICENSE.txt", "Synthetic images drawn by ecl-pipeline (data_prep.synthetic.dermoscopy); CC0.\n")
    atomic_write_text(images_dir / "ATTRIBUTION.txt", "Synthetic cohort; no real patient is shown.\n")

    gt_lines = ["image," + ",".join(ISIC2019_COLUMNS)]
    md_lines = ["image,age_approx,anatom_site_general,lesion_id,sex"]
    for i, name in enumerate(names):
        gt_lines.append(name + "," + ",".join("1.0" if c == labels[i] else "0.0" for c in ISIC2019_COLUMNS))
        row = lesion_rows[lesion_of[i]]
        md_lines.append(f"{name},{row['age_approx']},{row['anatom_site_general']},{row['lesion_id']},{row['sex']}")
    gt_path, md_path = out_dir / GROUND_TRUTH_CSV, out_dir / METADATA_CSV
    atomic_write_text(gt_path, "\n".join(gt_lines) + "\n")
    atomic_write_text(md_path, "\n".join(md_lines) + "\n")
    return {"images": images_dir, "ground_truth": gt_path, "metadata": md_path}
