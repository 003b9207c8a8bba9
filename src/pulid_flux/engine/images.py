"""Reference-image normalisation: EXIF orientation, any PIL mode to 8-bit RGB, long side cap."""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image, ImageCms, ImageOps

from ..errors import InputError

# Below this many pixels on the short side no detector can find a usable face
# (MTCNN's smallest face is 20 px, and the face only fills part of a photo).
MIN_IMAGE_SIDE = 64
MAX_IMAGE_SIDE = 1024  # official resize_numpy_image_long(img, 1024)
REFERENCE_LOC = ("body", "reference_image_url")

_WHITE = (255, 255, 255)


def _composite_on_white(img: Image.Image) -> Image.Image:
    if img.mode == "La":  # premultiplied; Pillow only un-premultiplies it to LA
        img = img.convert("LA")
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, _WHITE + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _scale_to_uint8(values: np.ndarray, is_float: bool) -> np.ndarray:
    """Map wide sample values to 0..255 by their likely range (float [0,1], 8-bit, 16-bit)."""
    values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(values.min()), float(values.max())
    if is_float and lo >= 0.0 and hi <= 1.0:
        scaled = values * 255.0
    elif lo >= 0.0 and hi <= 255.0:
        scaled = values  # 8-bit data in a wide container
    elif lo >= 0.0 and hi <= 65535.0:
        scaled = values / 257.0  # 16-bit data: 65535 -> 255
    else:
        scaled = (values - lo) / max(hi - lo, 1e-12) * 255.0  # unknown range: stretch
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _wide_gray_to_rgb(img: Image.Image) -> Image.Image:
    gray = _scale_to_uint8(np.asarray(img), is_float=img.mode == "F")
    return Image.fromarray(np.stack([gray] * 3, axis=-1), "RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; transparency becomes white."""
    mode = img.mode
    if mode == "RGB":
        return img.copy()
    if mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        return _composite_on_white(img)
    if mode == "P":
        if "transparency" in img.info:
            return _composite_on_white(img.convert("RGBA"))
        return img.convert("RGB")
    if mode == "I" or mode == "F" or mode.startswith("I;16"):
        return _wide_gray_to_rgb(img)
    if mode == "LAB":  # convert("RGB") would copy L, a, b as if they were R, G, B
        lab_to_srgb = ImageCms.buildTransformFromOpenProfiles(
            ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB"
        )
        return ImageCms.applyTransform(img, lab_to_srgb)
    try:
        return img.convert("RGB")  # 1, L, CMYK, YCbCr, HSV, RGBX, ...
    except (ValueError, OSError) as exc:
        raise InputError(f"Unsupported image mode {mode!r}; please upload a JPEG or PNG photo.",
                         loc=REFERENCE_LOC, type_="image_load_error") from exc


def normalize_image(img: Image.Image, max_side: int = MAX_IMAGE_SIDE) -> Image.Image:
    """EXIF-upright, RGB, long side at most `max_side` (LANCZOS, like the official code)."""
    img = ImageOps.exif_transpose(img)
    img = to_rgb(img)
    w, h = img.size
    if min(w, h) < MIN_IMAGE_SIDE:
        raise InputError(
            f"The reference image is too small ({w}x{h} pixels) to hold a recognisable face; "
            f"please upload an image at least {MIN_IMAGE_SIDE} pixels on each side.",
            loc=REFERENCE_LOC, type_="image_too_small",
        )
    long_side = max(w, h)
    if long_side > max_side:
        k = max_side / long_side
        # both sides truncated as the official resize_numpy_image_long does: the long side can
        # land one short of max_side (e.g. 3000 -> 1023), and the face step sees exactly that
        new_w, new_h = max(1, int(w * k)), max(1, int(h * k))
        arr = cv2.resize(np.asarray(img), (new_w, new_h), interpolation=cv2.INTER_LANCZOS4)
        img = Image.fromarray(arr, "RGB")
    return img
