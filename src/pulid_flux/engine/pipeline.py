"""PuLID-FLUX text-to-image: FLUX.1-dev (diffusers) with the PuLID ID encoder and cross-attention.

``PuLIDFluxPipeline.__call__`` reads top to bottom as the official algorithm: identity embedding
from the reference face(s), text encoding, noise, schedule, the denoising loop with step-gated ID
injection and true CFG, VAE decoding, the safety check.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from diffusers import FluxPipeline
from PIL import Image

from .acceleration import block_cache
from .images import normalize_image
from .injection import IDInjector
from .pulid import PuLIDModules
from .sampling import TextConditioning, denoise, get_noise, get_schedule, image_ids, pack, unpack
from .types import GenerationRequest, GenerationResult

log = logging.getLogger(__name__)

# Seeds we draw ourselves stay below 2**53 so JavaScript clients read them back exactly.
RANDOM_SEED_BOUND = 2**53
# The official loop starts the negative pass of true CFG at this step index (not exposed by fal).
TIMESTEP_TO_START_CFG = 1

StepCallback = Callable[[int, int], None]
# (step, total, latents): the unpacked latents [B,16,H/8,W/8] after that step (previews).
LatentsCallback = Callable[[int, int, torch.Tensor], None]


@dataclass
class PipelineOptions:
    """How a preset is loaded and run; every field is a CLI/server option."""

    device: Optional[str] = None  # None: cuda if available, else cpu
    dtype: Optional[torch.dtype] = None  # None: bfloat16 on CUDA, float32 on CPU
    weights_dir: Optional[str] = None  # flux-dev only; see engine/download.py
    offload: bool = False  # keep FLUX components in CPU RAM, move each to the GPU only while it runs
    fp8: Optional[str] = None  # None, "weights" (weight-only, the official --fp8) or "fast" (+ fp8 activations)
    compile: bool = False  # torch.compile the transformer's repeated blocks
    batch_cfg: Optional[bool] = None  # true CFG's two passes in one batch-2 call; None: yes unless offload
    seed: int = 0  # tiny preset only: the random weights' seed
    id_cache_size: int = 16  # ID embeddings kept per reference image (LRU); 0 disables

    def resolved_device(self) -> torch.device:
        if self.device:
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def resolved_dtype(self) -> torch.dtype:
        if self.dtype is not None:
            return self.dtype
        return torch.bfloat16 if self.resolved_device().type == "cuda" else torch.float32


class PuLIDFluxPipeline:
    def __init__(
        self,
        *,
        flux: FluxPipeline,
        pulid: PuLIDModules,
        face_encoder,
        safety_checker=None,
        model_name: str,
        is_random_weights: bool,
        device: torch.device,
        dtype: torch.dtype,
        precision: str = "",
        id_cache_size: int = 0,
        batch_cfg: bool = True,
    ):
        self.flux = flux
        self.transformer = flux.transformer
        self.pulid = pulid
        self.face_encoder = face_encoder
        self.safety_checker = safety_checker
        self.model_name = model_name
        self.is_random_weights = is_random_weights
        self.device = device
        self.dtype = dtype
        self.precision = precision or DTYPE_NAMES.get(dtype, str(dtype))  # reported in /health
        self.batch_cfg = batch_cfg
        # Hooks stay inert unless an ID is active, so the transformer is still plain FLUX elsewhere.
        self.injector = IDInjector(self.transformer, pulid.pulid_ca)
        self._uncond_id: Optional[torch.Tensor] = None
        # Users generate many images from one face: its embedding is computed once.
        self.id_cache_size = id_cache_size
        self._id_cache: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        if is_random_weights:
            log.warning("model %r has RANDOM weights: its images are noise, not a real model's output", model_name)

    @classmethod
    def from_preset(cls, model: str = "tiny", **options) -> "PuLIDFluxPipeline":
        """``tiny`` (random weights made in code, runs anywhere) or ``flux-dev`` (the released weights)."""
        from .presets import PRESETS

        if model not in PRESETS:
            raise ValueError(f"unknown model {model!r}; choose one of {sorted(PRESETS)}")
        return PRESETS[model](PipelineOptions(**options))

    # -- the algorithm ---------------------------------------------------------------------------

    @torch.inference_mode()
    def __call__(self, request: GenerationRequest, on_step: Optional[StepCallback] = None,
                 on_latents: Optional[LatentsCallback] = None) -> GenerationResult:
        id_tokens = self.encode_identity(request.reference_images, request.face_index)
        return self.generate(request, id_tokens, on_step, on_latents)

    @torch.inference_mode()
    def generate(self, request: GenerationRequest, id_tokens: torch.Tensor, on_step: Optional[StepCallback] = None,
                 on_latents: Optional[LatentsCallback] = None) -> GenerationResult:
        """Everything after the identity step, for ID tokens [1,32,D] from :meth:`encode_identity`."""
        seed = request.seed if request.seed is not None else secrets.randbelow(RANDOM_SEED_BOUND)
        use_true_cfg = abs(request.true_cfg - 1.0) > 0.01
        uncond_id_tokens = self.uncond_identity() if use_true_cfg else None

        cond = self.encode_text(request.prompt, request.max_sequence_length)
        neg_cond = self.encode_text(request.negative_prompt, request.max_sequence_length) if use_true_cfg else None

        noise = get_noise(
            seed, request.height, request.width, device=self.device, dtype=self.dtype, num_images=request.num_images
        )
        latent_h, latent_w = noise.shape[-2:]
        img = pack(noise)
        img_ids = image_ids(latent_h, latent_w, device=self.device, dtype=self.dtype)
        timesteps = get_schedule(request.num_inference_steps, img.shape[1])

        cache = block_cache(self.transformer, request.acceleration)
        latents = denoise(
            self.transformer,
            self.injector,
            img,
            img_ids,
            timesteps,
            cond,
            guidance=request.guidance_scale,
            id_tokens=id_tokens,
            id_weight=request.id_weight,
            start_step=request.start_step,
            end_step=request.end_step,
            true_cfg=request.true_cfg,
            neg_cond=neg_cond,
            uncond_id_tokens=uncond_id_tokens,
            timestep_to_start_cfg=TIMESTEP_TO_START_CFG,
            batch_cfg=self.batch_cfg,
            cache=cache,
            step_callback=_step_callback(on_step, on_latents, request.height, request.width),
        )

        images = self.decode(unpack(latents, request.height, request.width), request.width, request.height)
        flags = [False] * len(images)
        if request.enable_safety_checker and self.safety_checker is not None:
            images, flags = self.safety_checker.check(images)
        metrics = {}
        if cache is not None:
            metrics["skipped_block_fraction"] = cache.skipped_fraction
            log.info("acceleration %s: %.0f%% of block evaluations skipped", request.acceleration,
                     100 * cache.skipped_fraction)
        return GenerationResult(images=images, seed=seed, has_nsfw_concepts=flags, metrics=metrics)

    def warm_up(self, width: int, height: int) -> None:
        """A 2-step generation at this size, the ID injected in the second step only, and the
        safety check: torch.compile, cuDNN autotuning and lazy initialisation happen here rather
        than in the first request. The ID tokens are zeros, as no face is at hand."""
        id_tokens = torch.zeros(1, 32, self.pulid.pulid_encoder.output_dim, device=self.device, dtype=self.dtype)
        request = GenerationRequest(prompt="warm-up", reference_images=[], width=width, height=height,
                                    num_inference_steps=2, start_step=1, seed=0)
        self.generate(request, id_tokens)

    # -- the steps -------------------------------------------------------------------------------

    def encode_identity(self, references: list[Image.Image], face_index: Optional[int] = None) -> torch.Tensor:
        """ID tokens [1,32,D]; several reference photos are fused by averaging their embeddings."""
        if not references:
            raise ValueError("at least one reference image is needed")
        embeddings = [self._embed_face(normalize_image(reference), face_index) for reference in references]
        return torch.stack(embeddings).mean(dim=0)

    def _embed_face(self, image: Image.Image, face_index: Optional[int]) -> torch.Tensor:
        key = _image_key(image, face_index)
        if key in self._id_cache:
            self._id_cache.move_to_end(key)
            return self._id_cache[key]
        id_cond, vit_hidden = self.face_encoder.encode(image, face_index=face_index)
        id_cond, vit_hidden = id_cond.to(self.dtype), [h.to(self.dtype) for h in vit_hidden]
        embedding = self.pulid.encode(id_cond, vit_hidden)
        if self._uncond_id is None:
            # the encoder's response to all-zero inputs of these shapes: a per-model constant
            self._uncond_id = self.pulid.encode_uncond(id_cond, vit_hidden)
        if self.id_cache_size > 0:
            self._id_cache[key] = embedding
            while len(self._id_cache) > self.id_cache_size:
                self._id_cache.popitem(last=False)
        return embedding

    def uncond_identity(self) -> torch.Tensor:
        """True CFG's negative ID; set by the first :meth:`encode_identity` call."""
        assert self._uncond_id is not None, "encode_identity runs first"
        return self._uncond_id

    def encode_text(self, prompt: str, max_sequence_length: int) -> TextConditioning:
        """T5 padded to ``max_sequence_length`` (no attention mask) and CLIP's pooled vector."""
        txt, vec, txt_ids = self.flux.encode_prompt(
            prompt=prompt, prompt_2=None, device=self.device, max_sequence_length=max_sequence_length
        )
        return TextConditioning(txt=txt.to(self.dtype), txt_ids=txt_ids.to(self.dtype), vec=vec.to(self.dtype))

    def decode(self, latents: torch.Tensor, width: int, height: int) -> list[Image.Image]:
        vae = self.flux.vae
        latents = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        # The official precision: fp32 VAE weights, run under autocast in the model dtype, so the
        # convolutions run in bf16 on a GPU while GroupNorm and the scale/shift above stay fp32.
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != vae.dtype):
            pixels = vae.decode(latents, return_dict=False)[0]
        pixels = to_uint8(pixels)
        # the latent grid is rounded up to 16 px: crop back to the requested size
        pixels = pixels[:, :, :height, :width].permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(np.ascontiguousarray(p)) for p in pixels]


DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """Decoder output in [-1, 1] to bytes as the official code does: clamp and scale in the
    decoder's own output dtype, then truncate. In fp32 that truncates; in bf16 (the GPU's autocast
    output) 127.5 * (x + 1) first lands on bf16's grid (spacing 1 from 128 up), so it mostly rounds."""
    return (127.5 * (pixels.clamp(-1, 1) + 1.0)).to(torch.uint8)


def _image_key(image: Image.Image, face_index: Optional[int]) -> bytes:
    """Identifies a normalised reference image and the face chosen in it."""
    digest = hashlib.blake2b(image.tobytes(), digest_size=20)
    digest.update(f"{image.mode}:{image.size}:{face_index}".encode())
    return digest.digest()


def _step_callback(on_step: Optional[StepCallback], on_latents: Optional[LatentsCallback],
                   height: int, width: int):
    """The sampler's ``(index, total, packed)`` callback from the caller's 1-based ones."""
    if on_step is None and on_latents is None:
        return None

    def callback(i: int, n: int, packed: torch.Tensor) -> None:
        if on_step is not None:
            on_step(i + 1, n)
        if on_latents is not None:
            on_latents(i + 1, n, unpack(packed, height, width))

    return callback

