"""Decoding one 2D image file (dermoscopy or any generic image cohort) the way every cache is built (and `ecl predict` reuses).

Why a single function: training and prediction must see the same pixels, so the JPEG decode,
the resize and the optional colour constancy live here and nowhere else.

Speed: a 1024x768 ISIC JPEG resized to a short side of 256 does not need a full decode. JPEG
stores 8x8 DCT blocks, and libjpeg can decode straight to 1/2, 1/4 or 1/8 scale; PIL exposes
this as `Image.draft`. We ask for the smallest DCT scale that still leaves the short side at or
above the target, then finish with an antialiased resize. Truncated files are never accepted
(`ImageFile.LOAD_TRUNCATED_IMAGES` stays False): a half-grey image would silently poison a cache.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import PIL
from PIL import Image, ImageFile, ImageOps

from .errors import DataPrepError

__all__ = ["load_image_file", "shades_of_gray", "target_size", "IMAGE_SUFFIXES", "DECODE_VERSION", "ImageDecode", "image_key"]

#: Bumped whenever `load_image_file` decodes the same file into other pixels (2: EXIF orientation
#: honoured, 16-bit PNGs scaled instead of clipped), so caches built by an older decoder are rebuilt.
DECODE_VERSION = 2

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


def target_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) with the shorter side exactly `short_side` and the aspect ratio kept."""
    if width <= height:
        return short_side, max(1, int(round(height * short_side / width)))
    return max(1, int(round(width * short_side / height))), short_side


def shades_of_gray(img: np.ndarray, p: float = 6) -> np.ndarray:
    """Shades-of-grey colour constancy (Finlayson and Trezzi, 2004) with Minkowski norm `p`.

    Why: dermoscopes differ in illuminant and white balance; dividing each channel by its
    p-norm estimate of the illuminant removes much of that device signature. After the
    correction every channel has the same p-norm, and a neutral grey image is left unchanged
    (the gains are normalised so that their mean square is one).

    Args:
        img: [H, W, 3] uint8 or float image.
        p: Minkowski exponent; 1 is grey-world, infinity is max-RGB; 6 is the usual choice.

    Returns:
        The corrected image: uint8 (rounded, clipped to 0..255) for uint8 input, else float64
        without clipping.
    """
    x = np.asarray(img, dtype=np.float64)
    if x.ndim != 3 or x.shape[2] != 3:
        raise ValueError(f"shades_of_gray expects an [H, W, 3] image, got shape {x.shape}")
    illuminant = np.power(np.mean(np.power(x, p), axis=(0, 1)), 1.0 / p)
    norm = float(np.sqrt(np.sum(illuminant**2)))
    if norm == 0:
        return np.array(img, copy=True)
    gains = norm / (np.sqrt(3.0) * np.maximum(illuminant, 1e-12))
    out = x * gains
    if np.asarray(img).dtype == np.uint8:
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return out


def _to_8bit(im: Image.Image) -> Image.Image:
    """16-bit (and 32-bit integer) grey images scaled to 0..255, not clipped.

    Why: PIL's convert("RGB") clips a 16-bit value above 255 to 255, so a 16-bit PNG (common for
    exported scans) would come out almost white. Values are divided by 257 (65535 -> 255) as
    libpng does when it strips 16 to 8 bits.
    """
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(im, dtype=np.float64)
        return Image.fromarray(np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8), mode="L")
    return im


def load_image_file(path: str | os.PathLike | bytes, short_side: int = 256, color_constancy: bool = False,
                    name: str | None = None) -> np.ndarray:
    """Decode an image file to uint8 RGB [H, W, 3] whose shorter side is exactly `short_side`.

    EXIF orientation is honoured (a picture stored sideways with a rotation tag is turned upright,
    in prepare and in predict alike, since both call this function); ICC profiles are ignored.
    Palette, grey and RGBA images are converted to RGB; 16-bit grey images are scaled to 8 bits
    (value / 257), not clipped.

    Args:
        path: image file (JPEG, PNG, ...), or the whole file's bytes (an image sent to the served
            model): the same decoder then sees the same bytes, wherever they came from.
        short_side: length of the shorter side after resizing (aspect ratio kept).
        color_constancy: apply `shades_of_gray` (p = 6) after resizing.
        name: how messages name the input when `path` is bytes (e.g. "row 3"); default "image bytes".

    Raises:
        DataPrepError: the file is missing, not an image, truncated or otherwise undecodable.
    """
    in_memory = isinstance(path, (bytes, bytearray, memoryview))
    source = io.BytesIO(bytes(path)) if in_memory else Path(path)
    shown = (name or "image bytes") if in_memory else str(source)
    fix = ("Send the complete JPEG or PNG file." if in_memory else
           "Replace the file, remove it from the CSV, or re-run with --on-error skip to quarantine it.")
    if short_side < 1:
        raise ValueError(f"short_side must be positive, got {short_side}")
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # never accept half a picture, whatever another library set
    try:
        with Image.open(source) as im:
            w, h = im.size
            tw, th = target_size(w, h, short_side)
            if im.format == "JPEG" and min(w, h) >= 2 * short_side:
                # libjpeg picks the largest DCT reduction keeping the size >= the request
                im.draft("RGB", (tw, th))
            im.load()
            upright = ImageOps.exif_transpose(im)  # a phone photo stored sideways with an EXIF rotation
            rgb = _to_8bit(upright).convert("RGB")
            tw, th = target_size(*rgb.size, short_side)
    except FileNotFoundError:
        err = DataPrepError(f"Image file {shown} does not exist. Check the image folder and the CSV's image column.", shown)
        err.reason = "file does not exist"  # short form for quarantine.csv
        raise err from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        reason = str(exc).replace(f" {source!r}", "")  # PIL names a BytesIO by its repr
        err = DataPrepError(f"Cannot decode image {shown}: {reason}. {fix}", shown)
        err.reason = reason
        raise err from None
    if rgb.size != (tw, th):
        rgb = rgb.resize((tw, th), Image.Resampling.BILINEAR, reducing_gap=2.0)
    out = np.asarray(rgb, dtype=np.uint8)
    if color_constancy:
        out = shades_of_gray(out, p=6)
    return np.ascontiguousarray(out)


@dataclass(frozen=True)
class ImageDecode:
    """The decode step of every 2D image cohort: one file -> [its uint8 RGB image] (picklable for workers)."""

    short_side: int
    color_constancy: bool = False

    def __call__(self, path: str | os.PathLike) -> list[np.ndarray]:
        return [load_image_file(path, short_side=self.short_side, color_constancy=self.color_constancy)]


def image_key(source: str, names: Sequence[str], paths: Sequence[Path], **files: str | None) -> dict[str, Any]:
    """Build-key parts of a 2D image cohort: decoder versions, listing files' hashes, (name, file name, size) per image.

    Why sizes and not contents: re-checking 25,000 JPEGs then costs a directory listing, not 9 GB
    of reading; replacing an image by another of exactly the same size is the one change this
    misses (delete the cache folder to force a rebuild).
    """
    from .cache import FORMAT_VERSION

    return {
        "format_version": FORMAT_VERSION,
        "decode_version": DECODE_VERSION,
        "pil": PIL.__version__,
        "source": source,
        "files": dict(files),
        "images": [[name, p.name, p.stat().st_size] for name, p in zip(names, paths)],
    }
