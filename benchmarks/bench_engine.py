"""Engine benchmarks (scripts, not tests). Prints tables; numbers go into the README with the machine.

  overhead   seconds per transformer call: PuLID (ID active) / plain diffusers FLUX, at full width
             3072 with 2 double + 4 single blocks and 256x256 (target <= 1.05). Runs on CPU or GPU.
  loop       the denoising loop (true CFG 4, ID from step 0) against its transformer calls timed
             one by one: loop seconds / (calls x seconds of one call), target <= 1.02; what the
             loop adds around the model (hooks, CFG, Euler steps, Python). Runs on CPU or GPU.
  vae        FLUX's VAE decode at 1024x768 in pure bf16 and the official way (fp32 weights under
             bf16 autocast), and the difference as a share of a request of --request-s seconds
             (the official precision is kept unless it costs > 2 %). Needs a CUDA GPU.
  full       full-size FLUX.1-dev + PuLID with random weights, 1024x768, 20 steps: s/image and peak
             VRAM per memory mode (targets on an H100: <= 2.2 s bf16, <= 1.5 s fp8). Needs a CUDA GPU.

  python benchmarks/bench_engine.py overhead [--repeats 3]
  python benchmarks/bench_engine.py loop [--width 1024] [--steps 4] [--repeats 5]
  python benchmarks/bench_engine.py vae [--request-s 1.5]
  python benchmarks/bench_engine.py full [--modes bf16,fp8,fp8-fast,offload,fp8+offload] [--compile]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from diffusers import FluxTransformer2DModel

from pulid_flux.engine.injection import IDInjector
from pulid_flux.engine.pulid import IDFormer, PuLIDModules
from pulid_flux.engine.sampling import TextConditioning, denoise, get_schedule, image_ids, latent_size

FULL_WIDTH_CONFIG = dict(
    patch_size=1, in_channels=64, attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
    pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def transformer_inputs(width: int, height: int, txt_len: int, device, dtype, batch: int = 1) -> dict:
    lh, lw = latent_size(height, width)
    tokens = (lh // 2) * (lw // 2)
    return dict(
        hidden_states=torch.randn(batch, tokens, 64, device=device, dtype=dtype),
        encoder_hidden_states=torch.randn(batch, txt_len, 4096, device=device, dtype=dtype),
        pooled_projections=torch.randn(batch, 768, device=device, dtype=dtype),
        timestep=torch.full((batch,), 0.5, device=device, dtype=dtype),
        guidance=torch.full((batch,), 4.0, device=device, dtype=dtype),
        img_ids=image_ids(lh, lw, device=device, dtype=dtype),
        txt_ids=torch.zeros(txt_len, 3, device=device, dtype=dtype),
        return_dict=False,
    )


def seconds(fn) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def seconds_per_call(fn, repeats: int) -> float:
    fn()  # warm-up
    return statistics.median(seconds(fn) for _ in range(repeats))


@torch.inference_mode()
def overhead(args) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(num_layers=2, num_single_layers=4, **FULL_WIDTH_CONFIG).to(device, dtype)
    pulid = PuLIDModules.for_transformer(transformer, IDFormer()).to(device, dtype)
    inputs = transformer_inputs(256, 256, 128, device, dtype)
    id_tokens = torch.randn(1, 32, 2048, device=device, dtype=dtype)

    injector = IDInjector(transformer, pulid.pulid_ca)

    def plain_call():
        transformer(**inputs)

    def id_call():
        with injector.inject(id_tokens, 1.0):
            transformer(**inputs)

    # interleaved rounds, so that drift in the machine's load hits both variants alike
    plain_call(), id_call()  # warm-up
    rounds = [(seconds(plain_call), seconds(id_call)) for _ in range(args.repeats)]
    plain = statistics.median(r[0] for r in rounds)
    active = statistics.median(r[1] for r in rounds)
    injector.remove()
    removed = seconds_per_call(plain_call, args.repeats)
    print(f"\nPuLID overhead per denoising step on {machine()} ({dtype}), median of {args.repeats}")
    print("width 3072, 2 double + 4 single blocks, 256x256 (256 image + 128 text tokens), 2 PuLID CAs\n")
    print("| transformer call | s/step | ratio to plain |\n|---|---|---|")
    for name, s in [("plain diffusers FLUX", plain), ("PuLID, ID active", active), ("hooks removed again", removed)]:
        print(f"| {name} | {s:.3f} | {s / plain:.3f} |")


@torch.inference_mode()
def loop(args) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    config = FULL_WIDTH_CONFIG | dict(num_attention_heads=args.width // 128)
    transformer = FluxTransformer2DModel(num_layers=2, num_single_layers=4, **config).to(device, dtype)
    pulid = PuLIDModules.for_transformer(transformer, IDFormer()).to(device, dtype)
    injector = IDInjector(transformer, pulid.pulid_ca)
    inputs = transformer_inputs(args.size, args.size, 128, device, dtype)
    img, img_ids = inputs["hidden_states"], inputs["img_ids"]
    cond, neg = (TextConditioning(torch.randn_like(inputs["encoder_hidden_states"]), inputs["txt_ids"],
                                  torch.randn_like(inputs["pooled_projections"])) for _ in range(2))
    id_tokens, uncond = torch.randn(2, 1, 32, 2048, device=device, dtype=dtype)
    timesteps = get_schedule(args.steps, img.shape[1])
    calls = []
    transformer.register_forward_pre_hook(lambda *_: calls.append(1))

    def run_loop():
        denoise(transformer, injector, img, img_ids, timesteps, cond, guidance=4.0, id_tokens=id_tokens,
                true_cfg=4.0, neg_cond=neg, uncond_id_tokens=uncond)

    def one_call():
        with injector.inject(id_tokens, 1.0):
            transformer(**inputs)

    run_loop()
    n_calls = len(calls)  # the positive pass every step, the negative one from step 1
    one_call()
    rounds = [(seconds(run_loop), seconds(one_call)) for _ in range(args.repeats)]
    ratios = sorted(loop_s / (n_calls * call_s) for loop_s, call_s in rounds)
    loop_s = statistics.median(r[0] for r in rounds)
    call_s = statistics.median(r[1] for r in rounds)
    print(f"\nDenoising loop vs its transformer calls on {machine()} ({dtype}), median of {args.repeats} "
          f"interleaved rounds")
    print(f"width {args.width}, 2 double + 4 single blocks, {args.size}x{args.size}, {args.steps} steps, "
          f"true CFG 4 ({n_calls} calls), ID from step 0\n")
    print("| loop (s) | one call (s) | loop / (calls x call) | min..max of rounds | target |\n|---|---|---|---|---|")
    print(f"| {loop_s:.3f} | {call_s:.4f} | {statistics.median(ratios):.3f} | {ratios[0]:.3f}..{ratios[-1]:.3f} "
          f"| <= 1.02 |")


@torch.inference_mode()
def vae(args) -> None:
    if not torch.cuda.is_available():
        raise SystemExit("the VAE precision benchmark needs a CUDA GPU (on a CPU the VAE runs in fp32 anyway)")
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    model = AutoencoderKL(  # FLUX.1-dev's autoencoder, random weights
        latent_channels=16, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        use_quant_conv=False, use_post_quant_conv=False,
    ).cuda().eval()
    latents = torch.randn(1, 16, 96, 128, device="cuda")  # 1024x768

    def official():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model.decode(latents).sample

    def pure_bf16():
        model.decode(latents.bfloat16()).sample

    model.float()
    fp32_autocast = seconds_per_call(official, args.repeats)
    model.bfloat16()
    bf16 = seconds_per_call(pure_bf16, args.repeats)
    extra = fp32_autocast - bf16
    print(f"\nFLUX VAE decode at 1024x768 on {machine()}, median of {args.repeats}\n")
    print("| decode | s | extra per request | share of a {:.2f} s request |\n|---|---|---|---|".format(args.request_s))
    print(f"| pure bf16 | {bf16:.4f} | | |")
    print(f"| fp32 weights, bf16 autocast (official) | {fp32_autocast:.4f} | {extra * 1000:+.1f} ms "
          f"| {100 * extra / args.request_s:+.2f} % (keep if <= 2 %) |")


@torch.inference_mode()
def full(args) -> None:
    if not torch.cuda.is_available():
        raise SystemExit("the full-size benchmark needs a CUDA GPU")
    import skimage.data
    from PIL import Image

    from pulid_flux.engine.pipeline import PuLIDFluxPipeline
    from pulid_flux.engine.types import GenerationRequest

    request = GenerationRequest(prompt="portrait, color, cinematic",
                                reference_images=[Image.fromarray(skimage.data.astronaut())],
                                width=1024, height=768, num_inference_steps=20, seed=0, enable_safety_checker=False)

    def measure(mode: str) -> tuple[str, float, float]:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        fp8 = "fast" if "fp8-fast" in mode else "weights" if "fp8" in mode else None
        pipe = PuLIDFluxPipeline.from_preset(
            "flux-dev-random", fp8=fp8, offload="offload" in mode, compile=args.compile
        )
        seconds = seconds_per_call(lambda: pipe(request), args.repeats)  # the warm-up also compiles
        return mode, seconds, torch.cuda.max_memory_allocated() / 2**30

    rows = [measure(mode) for mode in args.modes.split(",")]
    print(f"\nFull-size random-weight FLUX.1-dev + PuLID on {machine()}, 1024x768, 20 steps"
          f"{' , torch.compile' if args.compile else ''}\n")
    print("| mode | s/image | peak VRAM (GiB) |\n|---|---|---|")
    for mode, seconds, peak in rows:
        print(f"| {mode} | {seconds:.2f} | {peak:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("overhead")
    p.add_argument("--repeats", type=int, default=3)
    p.set_defaults(run=overhead)
    p = sub.add_parser("loop")
    p.add_argument("--width", type=int, default=1024, help="transformer width (a multiple of 128)")
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.set_defaults(run=loop)
    p = sub.add_parser("vae")
    p.add_argument("--request-s", type=float, default=1.5, help="seconds of one request (bf16 + compile target)")
    p.add_argument("--repeats", type=int, default=10)
    p.set_defaults(run=vae)
    p = sub.add_parser("full")
    p.add_argument("--modes", default="bf16,fp8,fp8-fast,offload,fp8+offload")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--repeats", type=int, default=3)
    p.set_defaults(run=full)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
