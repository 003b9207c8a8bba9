"""``pulid-flux generate``: one image from a prompt and a reference face, straight through the engine."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from .api.schemas import IMAGE_SIZE_PRESETS
from .engine.options import MODEL_CHOICES, add_engine_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", required=True)
    parser.add_argument(
        "--reference", required=True, action="append", metavar="PATH_OR_URL",
        help="reference face photo (a file, an http(s) URL or a data: URI); repeat to fuse several",
    )
    parser.add_argument("--out", required=True, type=Path, help="output image file (.jpg, .png, .webp)")
    parser.add_argument("--model", default="tiny", choices=MODEL_CHOICES)
    parser.add_argument("--seed", type=int, default=None, help="default: random (printed)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--image-size", choices=sorted(IMAGE_SIZE_PRESETS), default="landscape_4_3")
    size.add_argument("--width", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--steps", type=int, default=20, help="denoising steps")
    parser.add_argument("--guidance", type=float, default=4.0, help="FLUX distilled guidance")
    parser.add_argument("--id-weight", type=float, default=1.0)
    parser.add_argument("--start-step", type=int, default=0, help="0-based step from which the ID is injected")
    parser.add_argument("--end-step", type=int, default=None, help="step from which the ID is off again")
    parser.add_argument("--true-cfg", type=float, default=1.0, help="> 1 enables true CFG from step 1")
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--max-sequence-length", type=int, default=128, choices=[128, 256, 512])
    parser.add_argument("--num-images", type=int, default=1)
    parser.add_argument("--face-index", type=int, default=None, help="which face (0 = largest)")
    parser.add_argument("--no-safety-checker", action="store_true")
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
    if not Path(source).is_file():
        raise SystemExit(f"reference image not found: {source}")
    return decode_image(Path(source).read_bytes(), policy)


def run(args: argparse.Namespace) -> int:
    from .engine.pipeline import PuLIDFluxPipeline
    from .engine.types import GenerationRequest

    if (args.width is None) != (args.height is None):
        raise SystemExit("--width and --height go together")
    width, height = (args.width, args.height) if args.width else IMAGE_SIZE_PRESETS[args.image_size]
    pipe = PuLIDFluxPipeline.from_preset(args.model, **engine_options(args))
    request = GenerationRequest(
        prompt=args.prompt,
        reference_images=[read_reference(r) for r in args.reference],
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
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        print(f"wrote {path}")
    if any(result.has_nsfw_concepts):
        print("the safety checker flagged an image; it was replaced by a black image")
    print(f"seed {result.seed}")
    return 0
