"""What goes into and comes out of one generation, free of torch so the API can import it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from PIL import Image


class NoFaceError(ValueError):
    """The reference image has no usable face. The message is meant for the end user."""


@dataclass
class GenerationRequest:
    prompt: str
    reference_images: list[Image.Image]
    width: int = 1024
    height: int = 768
    num_inference_steps: int = 20
    seed: Optional[int] = None  # None: a random 64-bit seed, reported back
    guidance_scale: float = 4.0  # FLUX's distilled guidance embedding, not CFG
    negative_prompt: str = ""  # used only when true_cfg > 1
    start_step: int = 0  # 0-based step index from which the ID is injected
    end_step: Optional[int] = None  # step index from which the ID is off again (None: never)
    true_cfg: float = 1.0  # > 1 runs a negative pass with the unconditional ID from step 1
    id_weight: float = 1.0
    max_sequence_length: int = 128  # T5 padding length
    num_images: int = 1
    face_index: Optional[int] = None  # which face of each reference (largest first); None = largest
    enable_safety_checker: bool = True
    acceleration: str = "none"  # "none" | "regular" | "high": First Block Cache (engine/acceleration.py)


@dataclass
class GenerationResult:
    images: list[Image.Image]
    seed: int
    has_nsfw_concepts: list[bool] = field(default_factory=list)
    # e.g. {"skipped_block_fraction": 0.4} with acceleration: what the cache saved
    metrics: dict[str, float] = field(default_factory=dict)
