"""NSFW safety checker: diffusers' ``StableDiffusionSafetyChecker`` with its ``CLIPImageProcessor``.

The real weights are ``CompVis/stable-diffusion-safety-checker`` (``pulid-flux download --only
safety-checker``). :meth:`SafetyChecker.random` builds a tiny checker with RANDOM weights for the
offline ``tiny`` preset and tests: its decisions mean nothing about image content.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image

# Tiny random checker (tiny preset / tests). Sizes are arbitrary but small enough to run in ms on a CPU.
TINY_IMAGE_SIZE = 32
TINY_PATCH_SIZE = 8
TINY_HIDDEN_SIZE = 32
TINY_INTERMEDIATE_SIZE = 64
TINY_LAYERS = 2
TINY_HEADS = 4
TINY_PROJECTION_DIM = 16
# Images per forward pass of the vision tower.
CHECK_BATCH_SIZE = 8


class SafetyChecker:
    """Flags images with NSFW concepts and replaces them by black images of the same size."""

    def __init__(self, model, processor, device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32):
        self.model = model.to(device=device, dtype=dtype).eval()
        self.processor = processor
        self.device = torch.device(device)
        self.dtype = dtype

    @classmethod
    def from_pretrained(
        cls,
        directory: Union[str, Path],
        device: Union[str, torch.device] = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> "SafetyChecker":
        """Load from a local folder (config.json, weights, preprocessor_config.json); never touches the hub."""
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessor

        from .download import require

        directory = Path(directory)
        require(directory / "config.json", "safety checker config.json", component="safety-checker",
                weights_dir=directory.parent)
        require(directory / "preprocessor_config.json", "safety checker preprocessor_config.json",
                component="safety-checker", weights_dir=directory.parent)
        # Cast in __init__ (the stored weights are fp32), which works across transformers versions.
        model = StableDiffusionSafetyChecker.from_pretrained(directory, local_files_only=True)
        processor = CLIPImageProcessor.from_pretrained(directory, local_files_only=True)
        return cls(model, processor, device=device, dtype=dtype)

    @classmethod
    def random(
        cls,
        seed: int = 0,
        device: Union[str, torch.device] = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> "SafetyChecker":
        """A tiny checker with RANDOM weights, the same for a given seed; it filters nothing real.

        With the default thresholds (concept weights 1.0) no image is flagged, since a cosine
        similarity never exceeds 1. Tests change ``model.concept_embeds_weights`` /
        ``model.special_care_embeds_weights`` to force decisions.
        """
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPConfig, CLIPImageProcessor

        vision = dict(
            hidden_size=TINY_HIDDEN_SIZE,
            intermediate_size=TINY_INTERMEDIATE_SIZE,
            num_hidden_layers=TINY_LAYERS,
            num_attention_heads=TINY_HEADS,
            image_size=TINY_IMAGE_SIZE,
            patch_size=TINY_PATCH_SIZE,
            projection_dim=TINY_PROJECTION_DIM,
        )
        text = dict(
            hidden_size=TINY_HIDDEN_SIZE,
            intermediate_size=TINY_INTERMEDIATE_SIZE,
            num_hidden_layers=1,
            num_attention_heads=TINY_HEADS,
            projection_dim=TINY_PROJECTION_DIM,
            vocab_size=64,
            bos_token_id=0,  # in range for the tiny vocabulary (the text tower is never run)
            eos_token_id=1,
            pad_token_id=1,
        )
        config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=TINY_PROJECTION_DIM)
        # Seeded without disturbing the caller's global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = StableDiffusionSafetyChecker(config)
            with torch.no_grad():
                for param in model.parameters():
                    if param.dim() > 1:
                        param.copy_(torch.randn_like(param) * 0.2)
                # Concept directions random too, so different images get different scores.
                model.concept_embeds.copy_(torch.randn_like(model.concept_embeds))
                model.special_care_embeds.copy_(torch.randn_like(model.special_care_embeds))
                model.concept_embeds_weights.fill_(1.0)
                model.special_care_embeds_weights.fill_(1.0)
        processor = CLIPImageProcessor(
            size={"shortest_edge": TINY_IMAGE_SIZE},
            crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
        )
        return cls(model, processor, device=device, dtype=dtype)

    def save_pretrained(self, directory: Union[str, Path]) -> None:
        """Write model (safetensors) and preprocessor config, loadable by :meth:`from_pretrained`."""
        self.model.save_pretrained(directory, safe_serialization=True)
        self.processor.save_pretrained(directory)

    @torch.inference_mode()
    def scores(self, images: list[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
        """Cosine similarity of each image to the (special care, concept) embeddings, float32 arrays."""
        from diffusers.pipelines.stable_diffusion.safety_checker import cosine_distance

        pixels = self._pixels(images)
        embeds = self.model.visual_projection(self.model.vision_model(pixels)[1])
        special = cosine_distance(embeds, self.model.special_care_embeds).float().cpu().numpy()
        concept = cosine_distance(embeds, self.model.concept_embeds).float().cpu().numpy()
        return special, concept

    @torch.inference_mode()
    def check(self, images: list[Image.Image]) -> tuple[list[Image.Image], list[bool]]:
        """Return (images with flagged ones replaced by black, one NSFW flag per image)."""
        flags: list[bool] = []
        for start in range(0, len(images), CHECK_BATCH_SIZE):
            batch = images[start : start + CHECK_BATCH_SIZE]
            arrays = [np.asarray(img.convert("RGB")) for img in batch]
            # The decision (thresholds, special-care adjustment) is diffusers' own forward.
            _, has_nsfw = self.model(clip_input=self._pixels(batch), images=arrays)
            flags += [bool(f) for f in has_nsfw]
        out = [_black_like(img) if flagged else img for img, flagged in zip(images, flags)]
        return out, flags

    def _pixels(self, images: list[Image.Image]) -> torch.Tensor:
        rgb = [img.convert("RGB") for img in images]
        pixels = self.processor(images=rgb, return_tensors="pt").pixel_values
        return pixels.to(device=self.device, dtype=self.dtype)


def _black_like(image: Image.Image) -> Image.Image:
    return Image.new(image.mode, image.size, 0 if len(image.getbands()) == 1 else (0,) * len(image.getbands()))


def load_safety_checker(
    directory: Optional[Union[str, Path]],
    device: Union[str, torch.device] = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    tiny: bool = False,
) -> SafetyChecker:
    """The real checker from ``directory``, or the random tiny one when ``tiny`` (offline preset)."""
    if tiny:
        return SafetyChecker.random(device=device, dtype=dtype)
    if directory is None:
        raise ValueError("a safety checker directory is required unless tiny=True")
    return SafetyChecker.from_pretrained(directory, device=device, dtype=dtype)
