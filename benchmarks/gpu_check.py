"""The one prepared GPU check (issue 13): speed, memory and numerics of the engine on a lent GPU.

On full-size random weights (``flux-dev-random``, built on the GPU) at 1024x768, 20 steps, it
measures s/image and peak VRAM for each engine mode (bf16, bf16 + compile, fp8 weights, fp8 fast +
compile, offload, fp8 + offload), true_cfg 4 against 1 (batched and sequential), each
``acceleration`` level, the ID step (detection, BiSeNet, EVA, IDFormer) and the bf16-vs-fp32
agreement of one transformer step. It skips, and says why, whatever does not fit in the card, needs
a package that is missing or would overrun the time budget (checked between measurements). Writes
``gpu_check.json`` and ``gpu_check.md`` to ``--out`` (``$OUT`` on the device machine).

``--dry-run`` runs the same code on the CPU with the tiny preset in seconds (the test suite does,
so this script cannot rot) and checks that what would travel to the device machine (the tracked
tree plus the wheels in ``.whl``) fits its 64 MiB.

On a lent GPU (device tool), from the repository root, after ``scripts/device-wheels``:
    run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

TRAVEL_LIMIT_BYTES = 64 * 2**20  # the device tool's limit on what travels with a call
WHEELS_DIR = ROOT / ".whl"
GIB = 2**30

# (name, engine options, variants, seconds it may take on an H200, GiB of GPU memory it needs).
# A variant is (label, request overrides, pipeline attributes). Estimates are generous leads: the
# card's memory and the time left are checked before each configuration.
BASE = ("true_cfg 1", {}, {})
CFG_BATCHED = ("true_cfg 4 (batched)", {"true_cfg": 4.0}, {"batch_cfg": True})
CFG_SEQUENTIAL = ("true_cfg 4 (sequential)", {"true_cfg": 4.0}, {"batch_cfg": False})
REGULAR = ("acceleration regular", {"acceleration": "regular"}, {})
HIGH = ("acceleration high", {"acceleration": "high"}, {})
CONFIGS = [
    ("bf16", {}, [BASE, CFG_BATCHED, CFG_SEQUENTIAL, REGULAR, HIGH], 90, 45),
    ("fp8 fast + compile", {"fp8": "fast", "compile": True}, [BASE, CFG_BATCHED, REGULAR, HIGH], 150, 30),
    ("bf16 + compile", {"compile": True}, [BASE, CFG_BATCHED], 120, 45),
    ("fp8 weights", {"fp8": "weights"}, [BASE], 50, 30),
    ("fp8 + offload", {"fp8": "weights", "offload": True}, [BASE], 70, 20),
    ("offload", {"offload": True}, [BASE], 90, 30),
]
NUMERICS_GIB = 75  # the transformer in fp32 (48 GiB) beside the rest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny preset, tiny size: checks the script")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "gpu-check-out"))
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop starting measurements after this")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per variant (after one warm-up)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    check = Check(args.dry_run, args.budget_s, 0 if args.dry_run else args.repeats)
    report = check.run()
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    table = markdown(report)
    (out / "gpu_check.md").write_text(table)
    print(table)
    if report.get("travel_bytes", 0) > TRAVEL_LIMIT_BYTES:
        print(f"FAIL: {report['travel_bytes'] / 2**20:.1f} MiB would travel, over the device tool's "
              f"{TRAVEL_LIMIT_BYTES / 2**20:.0f} MiB", file=sys.stderr)
        return 1
    return 0


class Check:
    def __init__(self, dry_run: bool, budget_s: float, repeats: int):
        import torch

        self.torch = torch
        if dry_run:
            torch.set_num_threads(1)  # toy sizes: more threads only spin against each other on a busy box
        self.dry_run = dry_run
        self.cuda = torch.cuda.is_available() and not dry_run
        self.started = time.monotonic()
        self.budget_s = budget_s
        self.repeats = repeats
        if dry_run:
            self.preset, self.width, self.height, self.steps = "tiny", 128, 96, 2
        else:
            self.preset, self.width, self.height, self.steps = "flux-dev-random", 1024, 768, 20
        self.rows: list[dict] = []

    # -- bookkeeping -----------------------------------------------------------------------------

    def left_s(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def free_gib(self) -> float:
        if not self.cuda:
            return math.inf
        free, _ = self.torch.cuda.mem_get_info()
        return free / GIB

    def skip(self, config: str, variant: str, why: str) -> None:
        print(f"skip {config} / {variant}: {why}", flush=True)
        self.rows.append({"config": config, "variant": variant, "status": "skipped", "note": why})

    def free_memory(self) -> None:
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()

    # -- the measurements ------------------------------------------------------------------------

    def run(self) -> dict:
        report = self.environment()
        if self.dry_run:
            report["travel_bytes"] = travel_bytes()
        missing = [m for m in ("diffusers", "facexlib", "facenet_pytorch") if importlib.util.find_spec(m) is None]
        for name, options, variants, est_s, need_gib in CONFIGS:
            why = self.unavailable(options, missing)
            if why is None and not self.dry_run:
                if self.left_s() < est_s:
                    why = f"not enough time left (needs ~{est_s} s, {self.left_s():.0f} s left)"
                elif self.free_gib() < need_gib:
                    why = f"does not fit ({need_gib} GiB needed, {self.free_gib():.0f} GiB free)"
            if why:
                for label, _, _ in variants:
                    self.skip(name, label, why)
                continue
            try:
                self.measure_config(name, options, variants, report, first=name == "bf16")
            except Exception as exc:  # noqa: BLE001 - one mode failing must not cost the others' numbers
                self.skip(name, "(build)", f"failed: {type(exc).__name__}: {str(exc)[:300]}")
            self.free_memory()
        report["rows"] = self.rows
        report["elapsed_s"] = round(time.monotonic() - self.started, 1)
        return report

    def unavailable(self, options: dict, missing: list[str]) -> str | None:
        if missing:
            return f"package missing: {', '.join(missing)}"
        if options.get("fp8") and importlib.util.find_spec("torchao") is None:
            return "package missing: torchao"
        if (options.get("fp8") or options.get("offload")) and not self.cuda:
            return "needs CUDA"
        if options.get("compile") and self.dry_run:
            return "compile is measured on the GPU only"
        return None

    def measure_config(self, name: str, options: dict, variants: list, report: dict, first: bool) -> None:
        from pulid_flux.engine.pipeline import PuLIDFluxPipeline

        started = time.perf_counter()
        pipe = PuLIDFluxPipeline.from_preset(self.preset, device="cuda" if self.cuda else "cpu", **options)
        self.sync()
        build_s = time.perf_counter() - started
        print(f"{name}: built in {build_s:.1f} s", flush=True)
        face = reference_face()
        id_tokens = pipe.encode_identity([face])
        if first:
            report["id_step"] = self.id_step(pipe, face)
        last_run_s = 0.0
        for label, overrides, attributes in variants:
            if not self.dry_run and self.left_s() < 3 * last_run_s + 10:
                self.skip(name, label, f"not enough time left ({self.left_s():.0f} s)")
                continue
            try:
                row = self.measure_variant(pipe, id_tokens, overrides, attributes)
            except self.torch.cuda.OutOfMemoryError:
                self.free_memory()
                self.skip(name, label, "out of GPU memory")
                continue
            last_run_s = row["first_call_s"]
            self.rows.append({"config": name, "variant": label, "status": "ok", "build_s": round(build_s, 1), **row})
            print(f"{name} / {label}: {row}", flush=True)
        if first:
            if self.dry_run or (self.left_s() > 30 and self.free_gib() > NUMERICS_GIB - 45):
                report["numerics"] = self.numerics(pipe, id_tokens)
            else:
                report["numerics"] = {"status": "skipped", "note": "not enough time or memory left"}
        del pipe

    def request(self, **overrides):
        from pulid_flux.engine.types import GenerationRequest

        values = dict(prompt="a portrait photo, studio light", reference_images=[], width=self.width,
                      height=self.height, num_inference_steps=self.steps, seed=0, enable_safety_checker=False)
        return GenerationRequest(**(values | overrides))

    def measure_variant(self, pipe, id_tokens, overrides: dict, attributes: dict) -> dict:
        saved = {k: getattr(pipe, k) for k in attributes}
        for k, v in attributes.items():
            setattr(pipe, k, v)
        try:
            request = self.request(**overrides)
            if self.cuda:
                self.torch.cuda.reset_peak_memory_stats()
            first, result = self.timed(lambda: pipe.generate(request, id_tokens))  # compilation, autotuning
            runs = [self.timed(lambda: pipe.generate(request, id_tokens)) for _ in range(self.repeats)]
        finally:
            for k, v in saved.items():
                setattr(pipe, k, v)
        runs = runs or [(first, result)]  # dry run: one call only
        row = {"s_per_image": round(statistics.median(t for t, _ in runs), 3), "first_call_s": round(first, 2),
               "dtype": str(pipe.dtype).replace("torch.", "")}
        if self.cuda:
            row["peak_vram_gib"] = round(self.torch.cuda.max_memory_allocated() / GIB, 2)
        metrics = runs[-1][1].metrics
        if "skipped_block_fraction" in metrics:
            row["skipped_block_fraction"] = round(metrics["skipped_block_fraction"], 3)
        return row

    def timed(self, fn) -> tuple[float, object]:
        """Seconds ``fn`` took, device work included, and what it returned."""
        self.sync()
        started = time.perf_counter()
        value = fn()
        self.sync()
        return time.perf_counter() - started, value

    def id_step(self, pipe, face) -> dict:
        """The reference-image step on this device: its parts and the whole, ID cache off."""
        import numpy as np

        from pulid_flux.engine.eva import eva_features
        from pulid_flux.engine.face import background_mask, eva_preprocess, face_features_image

        torch, fe = self.torch, pipe.face_encoder
        image_rgb = np.asarray(face)
        sel = fe.select(image_rgb)
        crop = torch.from_numpy(sel.aligned).permute(2, 0, 1)[None].float().div(255.0).to(fe.device)
        bg = background_mask(fe.parser, crop)
        eva_in = eva_preprocess(face_features_image(crop, bg), fe.eva_size).to(fe.dtype)
        id_cond, hidden = fe.encode(face)

        def median(fn):
            if not self.repeats:  # dry run: once
                return round(self.timed(fn)[0], 4)
            fn()  # warm-up
            return round(statistics.median(self.timed(fn)[0] for _ in range(max(3, self.repeats))), 4)

        def whole():
            pipe._id_cache.clear()
            pipe.encode_identity([face])

        with torch.inference_mode():
            parts = {
                "detect_align_s (MTCNN here; insightface in production)": median(lambda: fe.select(image_rgb)),
                "bisenet_s": median(lambda: background_mask(fe.parser, crop)),
                "eva_s": median(lambda: eva_features(fe.eva, eva_in)),
                "idformer_s": median(lambda: pipe.pulid.encode(id_cond, hidden)),
                "whole_s": median(whole),
            }
        print(f"ID step: {parts}", flush=True)
        return parts

    def numerics(self, pipe, id_tokens) -> dict:
        """One transformer step (ID injected) in bf16 against the same step in fp32."""
        from pulid_flux.engine.sampling import TextConditioning, get_noise, image_ids, pack, predict

        torch = self.torch
        cond = pipe.encode_text("a portrait photo, studio light", 128)
        noise = get_noise(0, self.height, self.width, device=pipe.device, dtype=torch.float32)
        img, ids = pack(noise), image_ids(*noise.shape[-2:], device=pipe.device)

        def step(dtype):
            pipe.transformer.to(dtype)
            pipe.pulid.pulid_ca.to(dtype)
            c = TextConditioning(cond.txt.to(dtype), cond.txt_ids.to(dtype), cond.vec.to(dtype))
            with torch.inference_mode(), pipe.injector.inject(id_tokens.to(dtype), 1.0):
                return predict(pipe.transformer, img.to(dtype), ids.to(dtype), c, 1.0, 4.0).float()

        low = step(torch.bfloat16)
        ref = step(torch.float32)  # the pipeline is discarded after this
        rel = float((low - ref).norm() / ref.norm())
        # bf16 operands land between 1e-3 and 1e-2 relative error (device notes, METHOD.md)
        result = {"rel_error_bf16_vs_fp32": rel, "finite": bool(torch.isfinite(low).all()),
                  "status": "ok" if math.isfinite(rel) and rel < 3e-2 else "check"}
        print(f"numerics: {result}", flush=True)
        return result

    def environment(self) -> dict:
        torch = self.torch
        env = {"dry_run": self.dry_run, "preset": self.preset, "size": f"{self.width}x{self.height}",
               "steps": self.steps, "torch": torch.__version__, "python": sys.version.split()[0]}
        for package in ("diffusers", "transformers", "torchao"):
            spec = importlib.util.find_spec(package)
            env[package] = __import__(package).__version__ if spec else None
        if self.cuda:
            props = torch.cuda.get_device_properties(0)
            env["card"] = props.name
            env["card_memory_gib"] = round(props.total_memory / GIB, 1)
        else:
            env["card"] = "cpu"
        return env


def reference_face():
    import skimage.data
    from PIL import Image

    return Image.fromarray(skimage.data.astronaut())


def travel_bytes(root: Path = ROOT, wheels: Path = WHEELS_DIR) -> int:
    """What a device call sends: tracked and untracked-not-ignored files, plus the carried wheels."""
    listed = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, check=True).stdout.split(b"\0")
    total = sum((root / os.fsdecode(p)).stat().st_size for p in listed if p and (root / os.fsdecode(p)).is_file())
    if wheels.is_dir():
        total += sum(p.stat().st_size for p in wheels.rglob("*") if p.is_file())
    return total


def markdown(report: dict) -> str:
    lines = [f"GPU check: {report['card']}, {report['preset']} {report['size']}, {report['steps']} steps, "
             f"torch {report['torch']}, diffusers {report.get('diffusers')}, torchao {report.get('torchao')}",
             "", "| config | variant | s/image | first call s | peak VRAM GiB | skipped blocks | note |",
             "|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['config']} | {r['variant']} | {r.get('s_per_image', '')} | {r.get('first_call_s', '')} | "
                     f"{r.get('peak_vram_gib', '')} | {r.get('skipped_block_fraction', '')} | {r.get('note', '')} |")
    if "id_step" in report:
        lines += ["", "ID step (s): " + ", ".join(f"{k} {v}" for k, v in report["id_step"].items())]
    if "numerics" in report:
        lines += ["", "numerics (one step, bf16 vs fp32): " + json.dumps(report["numerics"])]
    if "travel_bytes" in report:
        lines += ["", f"would travel: {report['travel_bytes'] / 2**20:.1f} MiB "
                      f"(limit {TRAVEL_LIMIT_BYTES / 2**20:.0f} MiB)"]
    lines += ["", f"elapsed: {report['elapsed_s']} s", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
