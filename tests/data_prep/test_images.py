"""Decoding for the cache: DCT-scaled JPEG draft, aspect-kept resize, colour constancy, errors."""
from __future__ import annotations


import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from data_prep import DataPrepError
from data_prep.images import load_image_file, shades_of_gray, target_size


def _jpeg(path, w, h, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([128 + 100 * np.sin(xx / 37.0), 128 + 90 * np.cos(yy / 23.0), 90 + 0 * xx], -1)
    img = img + rng.normal(0, 3, img.shape)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=92)
    return path


@pytest.mark.parametrize("size,expected", [((1024, 768), (341, 256)), ((767, 1022), (256, 341)), ((600, 450), (341, 256)), ((100, 100), (256, 256))])
def test_target_size_short_side_exact(size, expected):
    assert target_size(*size, 256) == expected


def test_load_image_file_landscape_and_portrait_short_side(tmp_path):
    a = load_image_file(_jpeg(tmp_path / "a.jpg", 600, 450), short_side=128)
    b = load_image_file(_jpeg(tmp_path / "b.jpg", 767, 1022), short_side=128)
    assert a.shape == (128, 171, 3) and a.dtype == np.uint8
    assert b.shape == (171, 128, 3)


def test_load_image_file_uses_draft_for_large_source(tmp_path, monkeypatch):
    path = _jpeg(tmp_path / "big.jpg", 1024, 768)
    decoded_sizes = []
    real_draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        out = real_draft(self, mode, size)
        decoded_sizes.append(self.size)
        return out

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    fast = load_image_file(path, short_side=128)
    assert decoded_sizes == [(256, 192)]  # libjpeg decoded at 1/4 scale, short side 192 >= 128
    with Image.open(path) as im:
        full = np.asarray(im.convert("RGB").resize((171, 128), Image.Resampling.BILINEAR), dtype=float)
    assert fast.shape == full.shape
    assert np.abs(fast - full).mean() < 3.0  # DCT scaling matches a full decode closely


def test_load_image_file_no_draft_for_small_source(tmp_path, monkeypatch):
    path = _jpeg(tmp_path / "small.jpg", 600, 450)
    calls = []
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", lambda self, *a: calls.append(a))
    load_image_file(path, short_side=256)
    assert calls == []


def test_load_image_file_converts_grey_and_rgba_png(tmp_path):
    Image.fromarray(np.full((40, 60), 77, np.uint8)).save(tmp_path / "g.png")
    Image.fromarray(np.full((40, 60, 4), 200, np.uint8)).save(tmp_path / "r.png")
    g = load_image_file(tmp_path / "g.png", short_side=20)
    r = load_image_file(tmp_path / "r.png", short_side=20)
    assert g.shape == r.shape == (20, 30, 3)
    assert (g == 77).all() and (r == 200).all()


def test_load_image_file_truncated_jpeg_raises_naming_file(tmp_path):
    path = _jpeg(tmp_path / "ok.jpg", 600, 450)
    data = path.read_bytes()
    bad = tmp_path / "ISIC_0000001.jpg"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataPrepError, match=r"^Cannot decode image .*ISIC_0000001\.jpg: image file is truncated") as info:
        load_image_file(bad)
    assert info.value.path == str(bad)


def test_load_image_file_not_an_image_raises(tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_text("not a jpeg")
    with pytest.raises(DataPrepError, match=r"^Cannot decode image .*notes\.jpg: cannot identify image file"):
        load_image_file(bad)


def test_load_image_file_missing_file_raises(tmp_path):
    with pytest.raises(DataPrepError, match=r"^Image file .*absent\.jpg does not exist"):
        load_image_file(tmp_path / "absent.jpg")


def test_shades_of_gray_equalises_channel_p_norms():
    rng = np.random.default_rng(0)
    img = rng.uniform(0, 1, (30, 40, 3)) * np.array([200.0, 120.0, 60.0])  # a warm cast
    out = shades_of_gray(img, p=6)
    norms = np.mean(out**6, axis=(0, 1)) ** (1 / 6)
    np.testing.assert_allclose(norms, norms[0], rtol=1e-10)
    # gains normalised so the norms' quadratic mean is kept
    before = np.mean(img**6, axis=(0, 1)) ** (1 / 6)
    assert np.sqrt(np.mean(norms**2)) == pytest.approx(np.linalg.norm(before) / np.sqrt(3))


def test_shades_of_gray_grey_image_unchanged():
    img = np.full((8, 8, 3), 90, np.uint8)
    img[::2] = 140
    assert np.array_equal(shades_of_gray(img), img)


def test_load_image_file_color_constancy_uint8(tmp_path):
    rng = np.random.default_rng(1)
    img = (rng.uniform(0.2, 0.5, (64, 64, 3)) * np.array([255, 180, 120])).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "cast.png")
    out = load_image_file(tmp_path / "cast.png", short_side=64, color_constancy=True)
    norms = np.mean(out.astype(float) ** 6, axis=(0, 1)) ** (1 / 6)
    assert norms.max() / norms.min() < 1.01
    np.testing.assert_array_equal(out, shades_of_gray(load_image_file(tmp_path / "cast.png", short_side=64)))


def test_16_bit_png_is_scaled_not_saturated(tmp_path):
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    Image.fromarray(ramp).save(tmp_path / "r.png")
    with Image.open(tmp_path / "r.png") as im:
        assert im.mode.startswith("I")
    out = load_image_file(tmp_path / "r.png", short_side=64)
    expected = np.clip(np.rint(ramp / 257.0), 0, 255).astype(np.uint8)
    assert out.shape == (64, 64, 3)
    np.testing.assert_array_equal(out[..., 0], expected)
    assert (out == 255).mean() < 0.01  # clipping would make almost every pixel white


def test_exif_orientation_is_honoured(tmp_path):
    rng = np.random.default_rng(1)
    upright = np.kron(rng.integers(0, 256, size=(6, 4, 3)), np.ones((16, 16, 1))).astype(np.uint8)  # 96 x 64, blocky
    Image.fromarray(upright).save(tmp_path / "upright.png")
    stored = np.rot90(upright, k=1)  # what a camera stores; EXIF 6 says "rotate 90 degrees clockwise to view"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.ascontiguousarray(stored)).save(tmp_path / "sideways.png", exif=exif)
    a = load_image_file(tmp_path / "upright.png", short_side=64)
    b = load_image_file(tmp_path / "sideways.png", short_side=64)
    assert a.shape == b.shape == (96, 64, 3)
    np.testing.assert_array_equal(a, b)
