"""Noise, schedule, packing and the denoising loop, with the official PuLID-FLUX semantics."""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .acceleration import BlockCache
from .injection import IDInjector

LATENT_CHANNELS = 16


def latent_size(height: int, width: int) -> tuple[int, int]:
    """Latent (h, w) for a pixel size; rounds up to a multiple of 16 pixels like the official code."""
    return 2 * math.ceil(height / 16), 2 * math.ceil(width / 16)


def get_noise(
    seed: int, height: int, width: int, *, device: torch.device | str, dtype: torch.dtype, num_images: int = 1
) -> Tensor:
    """Initial noise [n,16,lh,lw], drawn directly in ``dtype`` by a generator on ``device``."""
    lh, lw = latent_size(height, width)
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(num_images, LATENT_CHANNELS, lh, lw, generator=generator, device=device, dtype=dtype)


def get_schedule(num_steps: int, image_seq_len: float, base_shift: float = 0.5, max_shift: float = 1.15) -> list[float]:
    """``num_steps + 1`` times from 1 to 0, shifted by mu linear in the token count (not clamped)."""
    slope = (max_shift - base_shift) / (4096 - 256)
    mu = slope * image_seq_len + (base_shift - slope * 256)
    # float32 tensor arithmetic, as the official code does, so the values match bit for bit
    t = torch.linspace(1, 0, num_steps + 1)
    e_mu = math.exp(mu)
    return (e_mu / (e_mu + (1 / t - 1))).tolist()


def pack(latents: Tensor) -> Tensor:
    """[B,C,H,W] -> [B,(H/2)(W/2),4C], 2x2 patches with channel-major features."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(x: Tensor, height: int, width: int) -> Tensor:
    """Inverse of :func:`pack` for an image of ``height`` x ``width`` pixels."""
    lh, lw = latent_size(height, width)
    b, _, d = x.shape
    c = d // 4
    x = x.view(b, lh // 2, lw // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, lh, lw)


def image_ids(lh: int, lw: int, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Tensor:
    """Rotary positions [(lh/2)(lw/2), 3]: (0, row, column) per packed token."""
    h, w = lh // 2, lw // 2
    ids = torch.zeros(h, w, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(h, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(w, device=device, dtype=dtype)[None, :]
    return ids.reshape(h * w, 3)


@dataclass
class TextConditioning:
    """One prompt's encoding: T5 ``txt`` [B,L,4096], ``txt_ids`` [L,3] and CLIP pooled ``vec`` [B,768]."""

    txt: Tensor
    txt_ids: Tensor
    vec: Tensor


StepCallback = Callable[[int, int, Tensor], None]


def predict(
    transformer: nn.Module, img: Tensor, img_ids: Tensor, cond: TextConditioning, t: float, guidance: float
) -> Tensor:
    """One transformer call at time ``t`` (0..1) and distilled guidance ``guidance``."""
    b = img.shape[0]
    txt, vec = cond.txt, cond.vec
    if txt.shape[0] != b:  # one prompt for several images
        txt, vec = txt.expand(b, -1, -1), vec.expand(b, -1)
    txt_ids = cond.txt_ids[0] if cond.txt_ids.ndim == 3 else cond.txt_ids
    # diffusers multiplies timestep and guidance by 1000 itself
    t_vec = torch.full((b,), t, dtype=img.dtype, device=img.device)
    g_vec = torch.full((b,), guidance, dtype=img.dtype, device=img.device)
    return transformer(
        hidden_states=img,
        encoder_hidden_states=txt,
        pooled_projections=vec,
        timestep=t_vec,
        img_ids=img_ids,
        txt_ids=txt_ids,
        guidance=g_vec,
        return_dict=False,
    )[0]


@torch.no_grad()
def denoise(
    transformer: nn.Module,
    injector: Optional[IDInjector],
    img: Tensor,
    img_ids: Tensor,
    timesteps: list[float],
    cond: TextConditioning,
    *,
    guidance: float = 4.0,
    id_tokens: Optional[Tensor] = None,
    id_weight: float = 1.0,
    start_step: int = 0,
    end_step: Optional[int] = None,
    true_cfg: float = 1.0,
    neg_cond: Optional[TextConditioning] = None,
    uncond_id_tokens: Optional[Tensor] = None,
    timestep_to_start_cfg: int = 1,
    batch_cfg: bool = True,
    cache: Optional[BlockCache] = None,
    step_callback: Optional[StepCallback] = None,
) -> Tensor:
    """Euler flow-matching loop over packed latents ``img`` [B,L,64]; returns the final packed latents.

    The ID is active for step indices ``start_step <= i < end_step`` (``end_step`` None: to the
    end). With ``|true_cfg - 1| > 0.01`` a negative pass (``neg_cond`` + ``uncond_id_tokens``,
    same ID gating) runs from step ``timestep_to_start_cfg`` on: with ``batch_cfg`` in the same
    transformer call as the prompt's pass (batch 2B, the negative half second), else as a second
    call (less activation memory). ``cache`` (acceleration) is on for the loop and wraps each call in
    its branch's cache context.
    """
    use_cfg = abs(true_cfg - 1.0) > 0.01
    if use_cfg and neg_cond is None:
        raise ValueError("true_cfg > 1 needs the negative prompt's conditioning")
    if id_tokens is not None and injector is None:
        raise ValueError("id_tokens given without an IDInjector")
    if use_cfg and id_tokens is not None and uncond_id_tokens is None:
        raise ValueError("true_cfg with an ID needs the unconditional ID tokens")

    b = img.shape[0]
    if use_cfg and batch_cfg:
        pair_cond = _pair(cond, neg_cond, b)
        pair_id = None if id_tokens is None else torch.cat((id_tokens.expand(b, -1, -1),
                                                            uncond_id_tokens.expand(b, -1, -1)))
    num_steps = len(timesteps) - 1
    with cache if cache is not None else nullcontext():
        for i, (t_curr, t_prev) in enumerate(zip(timesteps[:-1], timesteps[1:])):
            id_on = id_tokens is not None and i >= start_step and (end_step is None or i < end_step)
            cfg_on = use_cfg and i >= timestep_to_start_cfg
            if cfg_on and batch_cfg:
                with _branch(cache, "cond+uncond", id_on), \
                        _id_scope(injector, pair_id if id_on else None, id_weight):
                    pair = predict(transformer, torch.cat((img, img)), img_ids, pair_cond, t_curr, guidance)
                pred, neg = pair.chunk(2)
            else:
                with _branch(cache, "cond", id_on), _id_scope(injector, id_tokens if id_on else None, id_weight):
                    pred = predict(transformer, img, img_ids, cond, t_curr, guidance)
                if cfg_on:
                    with _branch(cache, "uncond", id_on), \
                            _id_scope(injector, uncond_id_tokens if id_on else None, id_weight):
                        neg = predict(transformer, img, img_ids, neg_cond, t_curr, guidance)
            if cfg_on:
                pred = neg + true_cfg * (pred - neg)
            img = img + (t_prev - t_curr) * pred  # step size in Python double, as the official loop
            if step_callback is not None:
                step_callback(i, num_steps, img)
    return img


def _pair(cond: TextConditioning, neg: TextConditioning, b: int) -> TextConditioning:
    """The prompt's and the negative prompt's conditioning as one batch of 2b (T5 lengths are equal)."""
    txt = torch.cat((cond.txt.expand(b, -1, -1), neg.txt.expand(b, -1, -1)))
    vec = torch.cat((cond.vec.expand(b, -1), neg.vec.expand(b, -1)))
    return TextConditioning(txt=txt, txt_ids=cond.txt_ids, vec=vec)


def _branch(cache: Optional[BlockCache], name: str, id_on: bool):
    return nullcontext() if cache is None else cache.branch(name, id_on)


def _id_scope(injector: Optional[IDInjector], id_tokens: Optional[Tensor], id_weight: float):
    if injector is None:
        return nullcontext()
    return injector.inject(id_tokens, id_weight)
