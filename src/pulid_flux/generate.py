"""``pulid-flux generate``: one image from a prompt and a reference face, straight through the engine."""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path

from .api.schemas import IMAGE_SIZE_PRESETS
from .cli import CommandError
from .errors import InputError
from .engine.options import MODEL_CHOICES, add_engine_arguments


OUTPUT_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", required=True, help="what the image shows")
    parser.add_argument(
        "--reference", required=True, action="append", metavar="PATH_OR_URL",
        help="reference face photo (a file, an http(s) URL or a data: URI); repeat to fuse several",
    )
    parser.add_argument("--out", required=True, type=Path, help="output image file (.jpg, .png, .webp)")
    parser.add_argument("--model", choices=MODEL_CHOICES, help="default: flux-dev with a CUDA GPU, else tiny")
    parser.add_argument("--seed", type=int, default=None, help="default: random (printed)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--image-size", choices=sorted(IMAGE_SIZE_PRESETS), default="landscape_4_3",
                      help="one of fal's size presets")
    size.add_argument("--width", type=int, help="custom width in pixels (with --height)")
    parser.add_argument("--height", type=int, help="custom height in pixels (with --width)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps")
    parser.add_argument("--guidance", type=float, default=4.0, help="FLUX distilled guidance")
    parser.add_argument("--id-weight", type=float, default=1.0, help="strength of the identity (0..1)")
    parser.add_argument("--start-step", type=int, default=0, help="0-based step from which the ID is injected")
    parser.add_argument("--end-step", type=int, default=None, help="step from which the ID is off again (default: never)")
    parser.add_argument("--true-cfg", type=float, default=1.0, help="> 1 enables true CFG from step 1")
    parser.add_argument("--negative-prompt", default="", help="what to avoid (used with --true-cfg > 1)")
    parser.add_argument("--max-sequence-length", type=int, default=128, choices=[128, 256, 512],
                        help="T5 prompt length in tokens")
    parser.add_argument("--num-images", type=int, default=1,
                        help="images to generate; several are written as OUT-0, OUT-1, …")
    parser.add_argument("--face-index", type=int, default=None, help="which face of each reference, 0 = the largest (default: the largest)")
    parser.add_argument("--no-safety-checker", action="store_true",
                        help="do not black out images the safety checker flags")
    add_engine_arguments(parser)


def engine_options(args: argparse.Namespace) -> dict:
    return dict(device=args.device, weights_dir=args.weights_dir, offload=args.offload, fp8=args.fp8,
                compile=args.compile)


def read_reference(source: str):
    """Open a local file, or fetch a URL / data URI with the service's SSRF-safe fetcher."""
    from .fetch import FetchPolicy, decode_image, fetch_reference

    policy = FetchPolicy()
    if "://" in source or source.startswith("data:"):
        return decode_image(asyncio.run(fetch_reference(source, policy)), policy)
    path = Path(source)
    if not path.is_file():
        raise InputError(f"--reference {source}: no such file")
    try:
        return decode_image(path.read_bytes(), policy)
    except ValueError as exc:  # the fetcher's ReferenceImageError: not an image, too large, …
        raise InputError(f"--reference {source}: {exc}") from exc


def check_arguments(args: argparse.Namespace) -> tuple[int, int]:
    """Every check that needs no model, so that a mistake costs seconds, not a model load.
    The numeric bounds are the HTTP API's (FluxPulidInput); returns (width, height)."""
    from pydantic import ValidationError

    from .api.schemas import FluxPulidInput
    from .config import Settings

    settings = Settings()
    if (args.width is None) != (args.height is None):
        raise InputError("--width and --height go together")
    width, height = (args.width, args.height) if args.width else IMAGE_SIZE_PRESETS[args.image_size]
    for flag, value in (("--width", width), ("--height", height)):
        if not 16 <= value <= settings.max_image_size:
            raise InputError(f"{flag} {value}: must be between 16 and {settings.max_image_size} pixels")
    if not 1 <= args.num_images <= settings.max_num_images:
        raise InputError(f"--num-images {args.num_images}: must be between 1 and {settings.max_num_images}")
    try:
        FluxPulidInput(
            prompt=args.prompt, reference_image_url="-", num_inference_steps=args.steps, seed=args.seed,
            guidance_scale=args.guidance, negative_prompt=args.negative_prompt, start_step=args.start_step,
            end_step=args.end_step, true_cfg=args.true_cfg, id_weight=args.id_weight,
            max_sequence_length=str(args.max_sequence_length), face_index=args.face_index,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        raise InputError(f"{_FLAGS.get(first['loc'][0], first['loc'][0])}: {first['msg']}") from None
    out: Path = args.out
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise InputError(f"--out {out}: the file name must end in {', '.join(OUTPUT_SUFFIXES)}")
    if out.is_dir():
        raise InputError(f"--out {out} is a directory; give a file name")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CommandError(f"--out {out}: cannot create {out.parent}: {exc.strerror}") from None
    if not os.access(out.parent, os.W_OK):
        raise CommandError(f"--out {out}: {out.parent} is not writable")
    return width, height


# FluxPulidInput field -> the option that sets it, for error messages.
_FLAGS = {"num_inference_steps": "--steps", "seed": "--seed", "guidance_scale": "--guidance",
          "start_step": "--start-step", "end_step": "--end-step", "true_cfg": "--true-cfg",
          "id_weight": "--id-weight", "face_index": "--face-index", "prompt": "--prompt"}


def run(args: argparse.Namespace) -> int:
    width, height = check_arguments(args)
    references = [read_reference(r) for r in args.reference]

    from .engine.pipeline import PuLIDFluxPipeline
    from .engine.types import GenerationRequest
    from .worker import choose_model

    model = choose_model(args.model)
    if (args.fp8 == "fast" or args.offload) and not _is_cuda(args.device):
        raise InputError("--fp8-fast and --offload need a CUDA device")  # weight-only --fp8 runs anywhere
    print(f"loading model {model}", flush=True)
    pipe = PuLIDFluxPipeline.from_preset(model, **engine_options(args))
    request = GenerationRequest(
        prompt=args.prompt,
        reference_images=references,
        width=width,
        height=height,
        num_inference_steps=args.steps,
        seed=args.seed,
        guidance_scale=args.guidance,
        negative_prompt=args.negative_prompt,
        start_step=args.start_step,
        end_step=args.end_step,
        true_cfg=args.true_cfg,
        id_weight=args.id_weight,
        max_sequence_length=args.max_sequence_length,
        num_images=args.num_images,
        face_index=args.face_index,
        enable_safety_checker=not args.no_safety_checker,
    )
    result = pipe(request, on_step=lambda step, total: print(f"step {step}/{total}", flush=True))
    outputs = [args.out] if len(result.images) == 1 else [
        args.out.with_name(f"{args.out.stem}-{i}{args.out.suffix}") for i in range(len(result.images))
    ]
    for image, path in zip(result.images, outputs):
        image.save(path)
        print(f"wrote {path}")
    if any(result.has_nsfw_concepts):
        print("the safety checker flagged an image; it was replaced by a black image")
    print(f"seed {result.seed}")
    return 0


def _is_cuda(device) -> bool:
    import torch

    return (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
