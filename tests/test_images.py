"""Reference image normalisation: EXIF, every PIL mode to RGB, long-side cap, too small."""

import io

import numpy as np
import pytest
import skimage.data
from PIL import Image

from pulid_flux.engine.images import MAX_IMAGE_SIDE, MIN_IMAGE_SIDE, normalize_image


def _rgb(img):
    out = normalize_image(img)
    assert out.mode == "RGB"
    return np.asarray(out)


def test_rgb_passes_through_unchanged():
    src = skimage.data.astronaut()
    assert np.array_equal(_rgb(Image.fromarray(src)), src)


def test_rgba_and_la_composite_on_white():
    arr = np.zeros((80, 100, 4), np.uint8)
    arr[..., 0] = 200
    arr[:, :50, 3] = 0  # transparent half -> white
    arr[:, 50:, 3] = 255  # opaque half keeps its colour
    out = _rgb(Image.fromarray(arr, "RGBA"))
    assert (out[:, :50] == 255).all()
    assert (out[:, 50:] == [200, 0, 0]).all()
    la = Image.fromarray(np.dstack([np.full((80, 100), 30, np.uint8), arr[..., 3]]), "LA")
    out = _rgb(la)
    assert (out[:, :50] == 255).all() and (out[:, 50:] == 30).all()
    assert (_rgb(la.convert("La")) == out).all()  # premultiplied variant


def test_palette_with_and_without_transparency():
    pal = Image.new("P", (100, 80), 1)
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * (256 * 3 - 6))
    assert (_rgb(pal) == [10, 20, 30]).all()
    pal.info["transparency"] = 1
    assert (_rgb(pal) == 255).all()


def test_gray_bilevel_cmyk_ycbcr():
    gray = Image.fromarray(np.full((80, 100), 77, np.uint8), "L")
    assert (_rgb(gray) == 77).all()
    bw = Image.new("1", (100, 80), 1)
    assert (_rgb(bw) == 255).all()
    cmyk = Image.new("CMYK", (100, 80), (0, 255, 255, 0))  # pure red in CMYK
    assert (_rgb(cmyk) == [255, 0, 0]).all()
    src = skimage.data.astronaut()[:100, :100]
    ycc = Image.fromarray(src).convert("YCbCr")
    assert np.abs(_rgb(ycc).astype(int) - src).max() <= 3
    hsv = Image.fromarray(src).convert("HSV")
    assert np.abs(_rgb(hsv).astype(int) - src).max() <= 3
    white_lab = Image.new("LAB", (100, 80), (255, 128, 128))  # L=100, a=b=0 is white, not (255,128,128)
    assert (_rgb(white_lab) >= 250).all()


def test_sixteen_bit_and_float_scaled_to_eight_bit():
    ramp = np.linspace(0, 65535, 100 * 80).reshape(80, 100).astype(np.uint16)
    img16 = Image.fromarray(ramp)
    assert img16.mode.startswith("I;16")
    out = _rgb(img16)
    assert out[0, 0, 0] == 0 and out[-1, -1, 0] == 255
    assert abs(int(out[40, 50, 0]) - round(ramp[40, 50] / 257)) <= 1
    img32 = Image.fromarray(ramp.astype(np.int32), "I")
    assert np.array_equal(_rgb(img32), out)
    flt = Image.fromarray((ramp / 65535.0).astype(np.float32), "F")
    assert np.abs(_rgb(flt).astype(int) - out.astype(int)).max() <= 1
    small_range = Image.fromarray(np.full((80, 100), 100, np.int32), "I")  # 8-bit data in an I image
    assert (_rgb(small_range) == 100).all()


def test_exif_orientation_applied():
    src = np.zeros((80, 120, 3), np.uint8)
    src[:, :60] = [255, 0, 0]  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    buf = io.BytesIO()
    Image.fromarray(src).save(buf, format="JPEG", exif=exif, quality=95)
    img = Image.open(io.BytesIO(buf.getvalue()))
    assert img.size == (120, 80)
    out = _rgb(img)
    assert out.shape == (120, 80, 3)  # portrait after the rotation
    assert out[10, 40, 0] > 200 and out[-10, 40, 0] < 60  # red is now on top


def test_long_side_capped_with_aspect_ratio():
    big = Image.new("RGB", (3000, 1700), (10, 20, 30))
    out = normalize_image(big)
    assert out.size == (MAX_IMAGE_SIDE, int(1700 * MAX_IMAGE_SIDE / 3000))
    tall = normalize_image(Image.new("RGB", (900, 2049)), max_side=512)
    assert tall.size == (int(900 * 512 / 2049), 512)
    assert normalize_image(Image.new("RGB", (1024, 700))).size == (1024, 700)  # not upscaled


def test_long_side_truncated_as_the_official_resize():
    # official resize_numpy_image_long: k = 1024 / 1122, int(1122 * k) == 1023, not 1024
    assert normalize_image(Image.new("RGB", (1122, 700))).size == (1023, 638)
    assert normalize_image(Image.new("RGB", (700, 1122))).size == (638, 1023)


def test_too_small_image_is_refused():
    with pytest.raises(ValueError, match="too small"):
        normalize_image(Image.new("RGB", (MIN_IMAGE_SIDE - 1, 500)))
    assert normalize_image(Image.new("RGB", (MIN_IMAGE_SIDE, MIN_IMAGE_SIDE))).size == (MIN_IMAGE_SIDE,) * 2
