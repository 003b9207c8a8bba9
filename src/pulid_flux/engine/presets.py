"""The models ``PuLIDFluxPipeline.from_preset`` knows, and the memory/speed modes applied to them.

- ``flux-dev``: the released weights (FLUX.1-dev, PuLID v0.9.1, EVA02-CLIP-L, antelopev2, facexlib,
  the SD safety checker) from the weights directory that ``pulid-flux download`` fills.
- ``tiny``: the same classes and code path with small random weights made from a seed, for tests and
  for machines without a GPU. Its face detector is real (MTCNN, weights shipped in facenet-pytorch),
  so a photo without a face is refused as in production; everything else is random.
- ``flux-dev-random``: FLUX.1-dev's full sizes with random weights, for GPU benchmarks without
  downloading anything (tiny text tokenizers, MTCNN face detector).
"""

from __future__ import annotations

import logging

import torch
from diffusers import AutoencoderKL, FluxPipeline

from .eva import build_eva, load_eva_checkpoint
from .face import FaceEncoder, build_bisenet, build_insightface_analyzer, build_tiny_face_analyzer
from .face import load_bisenet_checkpoint
from .pipeline import DTYPE_NAMES, PipelineOptions, PuLIDFluxPipeline
from .pulid import IDFormer, PuLIDModules
from .tiny_flux import TINY_HEADS, TINY_WIDTH, build_tiny_flux

log = logging.getLogger(__name__)

# The tiny preset's EVA tower and ID encoder: the real structure (21+ blocks so that the five
# hidden states exist, 336 px input, 577 tokens) at toy width.
TINY_EVA_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 336, "layers": 21, "width": 64, "head_width": 32, "mlp_ratio": 2.6667,
                   "patch_size": 14, "pt_hw_seq_len": 16, "rope": True},
}
TINY_IDFORMER = dict(dim=64, depth=10, dim_head=32, heads=2, output_dim=64, id_cond_dim=512 + 32, vit_hidden_dim=64)


def _seeded(seed: int, build):
    """Build a module under its own seed, so each part's weights do not depend on the others."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def build_tiny(options: PipelineOptions) -> PuLIDFluxPipeline:
    device, dtype, seed = options.resolved_device(), options.resolved_dtype(), options.seed
    from .safety import SafetyChecker

    flux = build_tiny_flux(seed)
    eva = _seeded(seed + 1, lambda: build_eva(TINY_EVA_CONFIG))
    encoder = _seeded(seed + 2, lambda: IDFormer(**TINY_IDFORMER))
    pulid = _seeded(
        seed + 3,
        lambda: PuLIDModules.for_transformer(flux.transformer, encoder, ca_heads=TINY_HEADS,
                                             ca_dim_head=TINY_WIDTH // TINY_HEADS),
    )
    parser = _seeded(seed + 4, build_bisenet)
    face = FaceEncoder(build_tiny_face_analyzer(device, seed + 5), parser, eva, device, dtype)
    safety = SafetyChecker.random(seed + 6, device=device, dtype=dtype)
    return _assemble(flux, pulid, face, safety, "tiny", True, options)


def load_flux_dev(options: PipelineOptions) -> PuLIDFluxPipeline:
    from .download import WeightPaths
    from .safety import SafetyChecker
    from .weights import load_flux_transformer, load_flux_vae, load_pulid_checkpoint

    device, dtype = options.resolved_device(), options.resolved_dtype()
    # PULID_FLUX_<FIELD> overrides (BFL single files, PuLID v0.9.0, …) apply here, as documented
    paths = WeightPaths.from_env(options.weights_dir)
    paths.check()  # every missing file named at once, with the command that fetches it
    transformer = load_flux_transformer(paths.flux_transformer or paths.flux_dir / "transformer", dtype=dtype,
                                        device="cpu")
    vae = (load_flux_vae(paths.flux_ae, dtype=dtype, device="cpu") if paths.flux_ae
           else AutoencoderKL.from_pretrained(paths.flux_dir / "vae", torch_dtype=dtype))
    flux = FluxPipeline.from_pretrained(paths.flux_dir, transformer=transformer, vae=vae, torch_dtype=dtype)
    flux.set_progress_bar_config(disable=True)
    eva = build_eva()
    load_eva_checkpoint(eva, paths.eva_checkpoint)
    pulid = PuLIDModules.for_transformer(transformer)
    load_pulid_checkpoint(pulid, paths.pulid_checkpoint)
    analyzer = build_insightface_analyzer(paths.antelopev2_root, paths.facexlib_dir, device)
    parser = load_bisenet_checkpoint(paths.facexlib_parsing)
    face = FaceEncoder(analyzer, parser, eva, device, dtype)
    safety = SafetyChecker.from_pretrained(paths.safety_checker_dir, device=device, dtype=dtype)
    return _assemble(flux, pulid, face, safety, "flux-dev", False, options)


def build_flux_dev_random(options: PipelineOptions) -> PuLIDFluxPipeline:
    """Full-size random weights, built directly on the target device (for benchmarks only)."""
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from .tiny_flux import clip_tokenizer, flux_scheduler, t5_tokenizer

    device, dtype = options.resolved_device(), options.resolved_dtype()
    tokenizer, clip_vocab = clip_tokenizer()
    tokenizer_2, t5_vocab = t5_tokenizer()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            transformer = FluxTransformer2DModel(guidance_embeds=True)  # diffusers' defaults are FLUX.1-dev
            vae = AutoencoderKL(
                latent_channels=16, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
            )
            text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=clip_vocab, projection_dim=768))
            text_encoder_2 = T5EncoderModel(T5Config(
                vocab_size=t5_vocab, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                feed_forward_proj="gated-gelu", is_gated_act=True,
            ))
            eva = build_eva()
            pulid = PuLIDModules.for_transformer(transformer, IDFormer())
            parser = build_bisenet()
    finally:
        torch.set_default_dtype(previous)
    flux = FluxPipeline(
        scheduler=flux_scheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
    )
    flux.set_progress_bar_config(disable=True)
    face = FaceEncoder(build_tiny_face_analyzer(device), parser, eva, device, dtype)
    return _assemble(flux, pulid, face, None, "flux-dev-random", True, options)


# fp8 modes of the transformer (torchao), as `--fp8` / `--fp8-fast` name them; the value is /health's label.
FP8_MODES = {
    # the official --fp8 semantics (XLabs' quanto qfloat8 checkpoint): e4m3 weights with a scale per
    # output channel, dequantised for matmuls in the model dtype; halves the weights, runs anywhere
    "weights": "fp8 weights",
    # fp8 weights and dynamically quantised fp8 activations (row-wise scales) on fp8 tensor cores:
    # faster, and further from the official images
    "fast": "fp8 weights + activations",
}


def _assemble(flux, pulid, face, safety, name, is_random, options: PipelineOptions) -> PuLIDFluxPipeline:
    """Place everything on the device and apply the memory/speed modes."""
    device, dtype = options.resolved_device(), options.resolved_dtype()
    fp8 = options.fp8 or None
    if fp8 is not None and fp8 not in FP8_MODES:
        raise ValueError(f"unknown fp8 mode {fp8!r}; choose one of {sorted(FP8_MODES)}")
    if options.offload and device.type != "cuda":
        raise ValueError("--offload needs a CUDA device")
    if fp8 == "fast" and not _has_fp8_tensor_cores(device):
        raise ValueError("--fp8-fast needs a CUDA GPU with fp8 tensor cores (compute capability 8.9+); "
                         "--fp8 (weight-only) runs on any device")
    pulid.to(device, dtype).eval()
    if fp8:
        _quantize_fp8(flux.transformer, fp8, device, dtype)
    if options.offload:
        # FLUX components wait in CPU RAM and visit the GPU in turn; an fp8 transformer is small
        # enough to stay, and torchao's fp8 tensors are not meant to move between devices.
        flux._exclude_from_cpu_offload = ["transformer"] if fp8 else []
        flux.enable_model_cpu_offload(device=device)
    else:
        flux.to(device, dtype)
    # the official decode keeps the VAE weights in fp32 and runs it under autocast (pipeline.decode)
    flux.vae.float()
    if options.compile:
        flux.transformer.compile_repeated_blocks(fullgraph=True)
    precision = DTYPE_NAMES.get(dtype, str(dtype))
    if fp8:
        precision = f"{FP8_MODES[fp8]}, {precision} compute"
    return PuLIDFluxPipeline(flux=flux, pulid=pulid, face_encoder=face, safety_checker=safety, model_name=name,
                             is_random_weights=is_random, device=device, dtype=dtype, precision=precision,
                             id_cache_size=options.id_cache_size,
                             batch_cfg=not options.offload if options.batch_cfg is None else options.batch_cfg)


def _has_fp8_tensor_cores(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_config(mode: str):
    """The torchao quantisation config of an fp8 mode (see FP8_MODES)."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Float8WeightOnlyConfig, PerRow

    if mode == "fast":
        return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    return Float8WeightOnlyConfig(granularity=PerRow())


def _quantize_fp8(transformer, mode: str, device: torch.device, dtype: torch.dtype) -> None:
    from torchao.quantization import quantize_

    transformer.to(dtype)
    config = fp8_config(mode)
    quantize_(transformer, config, device=device)  # layer by layer, so the bf16 model never sits on the GPU
    log.info("transformer quantized to fp8 (%s)", type(config).__name__)


PRESETS = {"tiny": build_tiny, "flux-dev": load_flux_dev, "flux-dev-random": build_flux_dev_random}
