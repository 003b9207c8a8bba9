"""Cheap previews of FLUX latents while they denoise: a fixed linear 16 -> 3 map, no VAE.

The factors are ComfyUI's FLUX.1 latent-to-RGB approximation (``comfy/latent_formats.py``,
class ``Flux``: ``latent_rgb_factors`` and ``latent_rgb_factors_bias``), which ComfyUI
applies to model-space latents (after FLUX's shift and scale, which is what our sampler holds),
mapping them to RGB in about -1..1. Applied to a noisy intermediate latent it shows the composition emerging from the
noise at ~1/8 resolution for the cost of one small matrix product.

Only numpy and PIL at import time: the API process must stay torch-free, and torch tensors
are converted by :func:`latents_to_array`.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
from PIL import Image

# rows: the 16 latent channels; columns: R, G, B (output range about -1..1)
FLUX_LATENT_RGB_FACTORS = np.array([
    [-0.0346, 0.0244, 0.0681],
    [0.0034, 0.0210, 0.0687],
    [0.0275, -0.0668, -0.0433],
    [-0.0174, 0.0160, 0.0617],
    [0.0859, 0.0721, 0.0329],
    [0.0004, 0.0383, 0.0115],
    [0.0405, 0.0861, 0.0915],
    [-0.0236, -0.0185, -0.0259],
    [-0.0245, 0.0250, 0.1180],
    [0.1008, 0.0755, -0.0421],
    [-0.0515, 0.0201, 0.0011],
    [0.0428, -0.0012, -0.0036],
    [0.0817, 0.0765, 0.0749],
    [-0.1264, -0.0522, -0.1103],
    [-0.0280, -0.0881, -0.0499],
    [-0.1262, -0.0982, -0.0778],
], dtype=np.float32)
FLUX_LATENT_RGB_BIAS = np.array([-0.0329, -0.0718, -0.0851], dtype=np.float32)

# Workers store each preview as a log record starting with this marker; the API takes such
# records out of `logs` and sends the newest as the status-stream event's `preview`.
PREVIEW_LOG_PREFIX = "\x1epreview\x1e"

# Longest side of a preview: small enough to send every few steps (a few KB of JPEG).
DEFAULT_MAX_SIDE = 256
PREVIEW_JPEG_QUALITY = 70


def latents_to_array(latents: Any) -> np.ndarray:
    """[C,H,W] or [B,C,H,W] latents (torch tensor or array) -> float32 numpy [C,H,W] (first image)."""
    if hasattr(latents, "detach"):  # torch, without importing it here
        latents = latents.detach().float().cpu().numpy()
    arr = np.asarray(latents, dtype=np.float32)
    if arr.ndim == 4:
        arr = arr[0]
    if arr.ndim != 3 or arr.shape[0] != FLUX_LATENT_RGB_FACTORS.shape[0]:
        raise ValueError(f"expected FLUX latents [16,H,W] or [B,16,H,W], got shape {arr.shape}")
    return arr


def latents_to_rgb(latents: Any) -> np.ndarray:
    """Unpacked FLUX latents -> uint8 RGB [H,W,3] at the latent grid's resolution."""
    arr = latents_to_array(latents)
    rgb = np.einsum("chw,ck->hwk", arr, FLUX_LATENT_RGB_FACTORS) + FLUX_LATENT_RGB_BIAS
    rgb = np.nan_to_num(rgb, nan=0.0, posinf=1.0, neginf=-1.0)
    return (np.clip((rgb + 1.0) / 2.0, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def preview_image(latents: Any, width: int | None = None, height: int | None = None,
                  max_side: int = DEFAULT_MAX_SIDE) -> Image.Image:
    """The preview as a PIL image, upsampled toward the output's aspect and capped at ``max_side``.

    ``width``/``height`` (the requested output size) crop away the latent grid's padding to 16 px.
    """
    rgb = latents_to_rgb(latents)
    h, w = rgb.shape[:2]
    if width and height:
        # One latent cell covers 8x8 output pixels.
        rgb = rgb[: max(1, min(h, -(-height // 8))), : max(1, min(w, -(-width // 8)))]
        h, w = rgb.shape[:2]
        target_w, target_h = width, height
    else:
        target_w, target_h = w * 8, h * 8
    scale = min(1.0, max_side / max(target_w, target_h))
    size = (max(1, round(target_w * scale)), max(1, round(target_h * scale)))
    return Image.fromarray(rgb).resize(size, Image.BILINEAR)


def preview_data_uri(latents: Any, width: int | None = None, height: int | None = None,
                     max_side: int = DEFAULT_MAX_SIDE, quality: int = PREVIEW_JPEG_QUALITY) -> str:
    """``data:image/jpeg;base64,…`` of :func:`preview_image`."""
    buf = io.BytesIO()
    preview_image(latents, width, height, max_side).save(buf, "JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
