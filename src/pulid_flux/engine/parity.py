"""``pulid-flux check-parity DIR``: run the engine on the official reference fixtures.

Every case in DIR (each ``<case>.json``) goes through the engine's own code (BFL->diffusers
conversion, modules sized from the JSON sidecars, hooks, sampling loop, ``generate()`` and the
pixel path) by its kind, and each output's max abs difference is printed; the exit status is 1 if
any exceeds the tolerance or a case cannot be run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# A case's kind is its JSON "kind" field, else the first of these its name starts with.
KINDS = ("idformer", "flux_forward", "denoise", "eva", "face_features", "pipeline")
WEIGHTS_ONLY = ("flux_weights", "ae_weights")  # weights that the cases load, nothing to compare
NOT_CASES = ("manifest",)  # the fixture folder's index

# MKL's vector exp differs by 1 ulp between its SSE4.2, AVX2 and AVX-512 paths, which moves a
# true-CFG loop by up to ~1e-4; the fixtures were made on the SSE4.2 path (their README, "CPU code
# paths"). MKL reads this when torch loads it, so it is set before torch is imported.
MKL_MATH_PATH = "SSE4_2"


def pin_cpu_math_paths() -> bool:
    """Pin MKL to the fixtures' math path; False if torch was loaded unpinned before this call."""
    if "torch" in sys.modules:
        return os.environ.get("MKL_ENABLE_INSTRUCTIONS") == MKL_MATH_PATH
    os.environ["MKL_ENABLE_INSTRUCTIONS"] = MKL_MATH_PATH
    return True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", type=Path, help="fixture directory (<case>.safetensors + <case>.json)")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="max abs difference allowed (default 1e-4)")
    parser.add_argument("--cases", default=None, help="comma-separated subset of the cases in DIR (default: all)")


def case_kind(name: str, meta: dict) -> str | None:
    if meta.get("kind"):
        return meta["kind"]
    return next((prefix for prefix in KINDS + WEIGHTS_ONLY if name.startswith(prefix)), None)


def run(args: argparse.Namespace) -> int:
    if not pin_cpu_math_paths():
        print(f"note: torch was loaded before MKL_ENABLE_INSTRUCTIONS={MKL_MATH_PATH} could be set; "
              "on AVX2/AVX-512 hosts true-CFG cases may differ by up to ~1e-4")
    import torch

    directory = Path(args.dir)
    if not directory.is_dir():
        print(f"not a directory: {directory}")
        return 2
    metas = {p.stem: json.loads(p.read_text()) for p in sorted(directory.glob("*.json")) if p.stem not in NOT_CASES}
    kinds = {name: case_kind(name, meta) for name, meta in metas.items()}
    cases = [name for name, kind in kinds.items() if kind not in WEIGHTS_ONLY]
    if not cases:
        print(f"no fixture cases found in {directory}")
        return 2
    failures = 0
    if args.cases is not None:
        wanted = [c.strip() for c in args.cases.split(",") if c.strip()]
        for case in wanted:
            if case not in cases:
                print(f"{case:<18} ERROR  requested but not a case in {directory}")
                failures += 1
        cases = [c for c in cases if c in wanted]

    fixtures = _Fixtures(directory)
    with torch.no_grad():
        for case in cases:
            runner = _RUNNERS.get(kinds[case])
            if runner is None:  # a case nobody checks must not pass silently
                print(f"{case:<18} ERROR  unknown kind {kinds[case]!r}: this engine cannot check it")
                failures += 1
                continue
            try:
                results = runner(fixtures, case)
            except Exception as exc:  # a case that cannot run is a failure, reported, not a crash
                print(f"{case:<18} ERROR  {type(exc).__name__}: {exc}")
                failures += 1
                continue
            for name, diff, tol in results:
                tol = args.tolerance if tol is None else tol
                ok = diff <= tol
                failures += not ok
                print(f"{case:<18} {name:<34} max_abs={diff:.3e}  {'ok' if ok else 'FAIL'} (tol {tol:g})")
    print(f"{'FAILED' if failures else 'PASSED'}: {len(cases)} case(s), {failures} failure(s)")
    return 1 if failures else 0


class _Fixtures:
    """Lazy, cached access to the fixture files and the engine models built from them."""

    def __init__(self, directory: Path):
        self.dir = directory
        self._cache: dict = {}

    def meta(self, name: str) -> dict:
        return json.loads((self.dir / f"{name}.json").read_text())

    def tensors(self, name: str) -> dict:
        if name not in self._cache:
            from safetensors.torch import load_file

            raw = load_file(str(self.dir / f"{name}.safetensors"))
            # float8 weights are exact in float32; every reference was computed from those values
            self._cache[name] = {k: (v.float() if v.is_floating_point() else v) for k, v in raw.items()}
        return self._cache[name]

    def pulid(self):
        if "pulid" not in self._cache:
            from .pulid import IDFormer, PuLIDModules
            from .weights import load_pulid_state_dict

            id_meta = self.meta("idformer")
            shapes = id_meta["tensors"]
            mapping_dim, id_cond_dim = shapes["pulid_encoder.id_embedding_mapping.0.weight"]["shape"]
            vit_hidden_dim = shapes["pulid_encoder.mapping_0.0.weight"]["shape"][1]
            encoder = IDFormer(
                **id_meta["idformer_config"],
                id_cond_dim=id_cond_dim,
                vit_hidden_dim=vit_hidden_dim,
                mapping_dim=mapping_dim,
            )
            flux_meta = self.meta("flux_weights")
            params, ca = flux_meta["flux_params"], flux_meta["pulid_ca_config"]
            if ca["kv_dim"] != encoder.output_dim:
                raise ValueError(f"CA kv_dim {ca['kv_dim']} != IDFormer output_dim {encoder.output_dim}")
            modules = PuLIDModules(
                encoder,
                num_double_blocks=params["depth"],
                num_single_blocks=params["depth_single_blocks"],
                double_interval=flux_meta.get("pulid_double_interval", 2),
                single_interval=flux_meta.get("pulid_single_interval", 4),
                ca_dim=ca["dim"],
                ca_heads=ca["heads"],
                ca_dim_head=ca["dim_head"],
            ).eval()
            # the two files together have the released checkpoint's key layout
            state = {k: v for k, v in self.tensors("idformer").items() if k.startswith("pulid_encoder.")}
            state |= {k: v for k, v in self.tensors("flux_weights").items() if k.startswith("pulid_ca.")}
            load_pulid_state_dict(modules, state, source="fixture PuLID weights")
            self._cache["pulid"] = modules
        return self._cache["pulid"]

    def transformer(self, weights: str = "flux_weights"):
        """A new FluxTransformer2DModel from BFL-format fixture weights, checked against the JSON."""
        from diffusers import FluxTransformer2DModel

        from .weights import bfl_to_diffusers

        meta = self.meta(weights)
        bfl = {k: v for k, v in self.tensors(weights).items() if k.startswith("transformer.")}
        params = meta["flux_params"]
        state, config = bfl_to_diffusers(bfl, axes_dims_rope=params["axes_dim"])
        derived = (config["num_attention_heads"], config["num_layers"], config["num_single_layers"])
        if derived != (params["num_heads"], params["depth"], params["depth_single_blocks"]):
            raise ValueError(f"weights give (heads, depth, single depth) {derived}, JSON says otherwise: {params}")
        transformer = FluxTransformer2DModel(**config)
        transformer.load_state_dict(state, strict=True)
        modules = self.pulid()
        if len(modules.pulid_ca) != meta.get("num_pulid_ca", len(modules.pulid_ca)):
            raise ValueError(f"built {len(modules.pulid_ca)} CA modules, fixture has {meta['num_pulid_ca']}")
        return transformer.eval()

    def flux(self):
        """(transformer, injector) at the fixture's CA intervals, shared by the forward and loop cases."""
        if "flux" not in self._cache:
            from .injection import IDInjector

            meta = self.meta("flux_weights")
            transformer = self.transformer()
            injector = IDInjector(
                transformer,
                self.pulid().pulid_ca,
                double_interval=meta.get("pulid_double_interval", 2),
                single_interval=meta.get("pulid_single_interval", 4),
            )
            self._cache["flux"] = (transformer, injector)
        return self._cache["flux"]

    def vae(self, weights: str = "ae_weights"):
        """diffusers' AutoencoderKL from BFL ``ae`` fixture weights, its size read off the weights."""
        from .weights import flux_vae_from_bfl

        vae = flux_vae_from_bfl(self.tensors(weights))
        ae = self.meta(weights).get("ae_params")
        if ae is not None:
            expected = ([ae["ch"] * m for m in ae["ch_mult"]], ae["num_res_blocks"], ae["z_channels"],
                        ae["scale_factor"], ae["shift_factor"])
            c = vae.config
            derived = (list(c.block_out_channels), c.layers_per_block, c.latent_channels, c.scaling_factor,
                       c.shift_factor)
            if derived != expected:
                raise ValueError(f"autoencoder read off the weights {derived} != JSON ae_params {expected}")
        return vae


def _max_abs(a, b, mask=None) -> float:
    import torch

    if a.shape != b.shape:
        return float("inf")
    diff = (a.float() - b.float()).abs()
    if mask is not None:
        diff = torch.where(mask.expand_as(diff), diff, torch.zeros_like(diff))
    return float(diff.max()) if diff.numel() else 0.0


def _idformer(fx: _Fixtures, name: str):
    t = fx.tensors(name)
    modules = fx.pulid()
    hidden = [t[f"id_vit_hidden.{i}"] for i in range(modules.pulid_encoder.num_scales)]
    return [
        ("id_embedding", _max_abs(modules.encode(t["id_cond"], hidden), t["id_embedding"]), None),
        ("uncond_id_embedding", _max_abs(modules.encode_uncond(t["id_cond"], hidden), t["uncond_id_embedding"]), None),
    ]


def _flux_forward(fx: _Fixtures, name: str):
    from .sampling import TextConditioning, predict

    t, meta = fx.tensors(name), fx.meta(name)
    transformer, injector = fx.flux()
    cond = TextConditioning(txt=t["txt"], txt_ids=t["txt_ids"], vec=t["y"])
    img_ids = t["img_ids"][0]
    time, guidance = float(t["timesteps"][0]), float(t["guidance"][0])
    with injector.inject(t["id"], meta["id_weight"]):
        pred_id = predict(transformer, t["img"], img_ids, cond, time, guidance)
    pred_noid = predict(transformer, t["img"], img_ids, cond, time, guidance)
    return [
        ("pred_id", _max_abs(pred_id, t["pred_id"]), None),
        ("pred_noid", _max_abs(pred_noid, t["pred_noid"]), None),
    ]


def _denoise(fx: _Fixtures, name: str):
    import torch

    from .sampling import TextConditioning, denoise, get_noise, get_schedule, image_ids, latent_size, pack, unpack

    t, m = fx.tensors(name), fx.meta(name)
    transformer, injector = fx.flux()
    lh, lw = latent_size(m["height"], m["width"])
    noise = get_noise(m["seed"], m["height"], m["width"], device="cpu", dtype=torch.float32)
    timesteps = get_schedule(m["num_steps"], lh * lw / 4)
    img, ids = pack(noise), image_ids(lh, lw)
    final = denoise(
        transformer,
        injector,
        img,
        ids,
        timesteps,
        TextConditioning(t["txt"], t["txt_ids"], t["vec"]),
        guidance=m["guidance"],
        id_tokens=t["id"],
        id_weight=m["id_weight"],
        start_step=m["start_step"],
        true_cfg=m["true_cfg"],
        neg_cond=TextConditioning(t["neg_txt"], t["neg_txt_ids"], t["neg_vec"]),
        uncond_id_tokens=t["uncond_id"],
        timestep_to_start_cfg=m.get("timestep_to_start_cfg", 1),
    )
    unpacked = unpack(final, m["height"], m["width"])
    return [
        ("noise (exact)", _max_abs(noise, t["noise"]), 0.0),
        ("timesteps (exact)", _max_abs(torch.tensor(timesteps, dtype=torch.float32), t["timesteps"]), 0.0),
        ("img (packed noise, exact)", _max_abs(img, t["img"]), 0.0),
        ("img_ids (exact)", _max_abs(ids, t["img_ids"][0]), 0.0),
        ("final_latents", _max_abs(final, t["final_latents"]), None),
        ("final_latents_unpacked", _max_abs(unpacked, t["final_latents_unpacked"]), None),
    ]


def _eva(fx: _Fixtures, name: str):
    from .eva import build_eva, eva_features, load_eva_state_dict

    t, m = fx.tensors(name), fx.meta(name)
    model = build_eva(m["eva_clip_config"]).eval()
    load_eva_state_dict(model, {k: v for k, v in t.items() if k.startswith("visual.")})
    normed, unnormed, hidden = eva_features(model, t["image"])
    results = [
        ("image_embedding", _max_abs(normed, t["image_embedding"]), None),
        ("image_embedding_unnormalized", _max_abs(unnormed, t["image_embedding_unnormalized"]), None),
    ]
    expected = sorted(k for k in t if k.startswith("hidden_states."))
    if len(hidden) != len(expected):
        results.append(("hidden_states (count)", float("inf"), None))
    results += [(key, _max_abs(h, t[key]), None) for key, h in zip(expected, hidden)]
    return results


def _face_features(fx: _Fixtures, name: str):
    from .face import background_mask, build_bisenet, eva_preprocess, face_features_image

    t = fx.tensors(name)
    parser = build_bisenet({k[len("face_parse.") :]: v for k, v in t.items() if k.startswith("face_parse.")})
    parser.eval()
    face = t["aligned_face_rgb"].permute(2, 0, 1)[None].float() / 255.0
    bg = background_mask(parser, face)
    reliable = t["reliable_mask"]
    features = face_features_image(face, bg)
    eva_input = eva_preprocess(features)
    # only pixels away from parsing near-ties are comparable (see the fixture README)
    flipped = int(((bg != t["background_mask"]) & reliable).sum())
    return [
        ("background_mask (reliable px, count)", float(flipped), 0.0),
        ("face_features_image (reliable px)", _max_abs(features, t["face_features_image"], reliable), None),
        ("eva_input (reliable px)", _max_abs(eva_input, t["eva_input"], t["eva_input_reliable_mask"]), None),
        ("eva_input from stored features", _max_abs(eva_preprocess(t["face_features_image"]), t["eva_input"]), None),
    ]




def _pipeline(fx: _Fixtures, name: str):
    """seed -> noise -> the loop -> the official VAE decode -> uint8, through ``generate()``."""
    import numpy as np
    import torch
    from diffusers import FluxPipeline

    from .pipeline import TIMESTEP_TO_START_CFG, PuLIDFluxPipeline
    from .sampling import TextConditioning, get_noise
    from .tiny_flux import flux_scheduler
    from .types import GenerationRequest

    t, m = fx.tensors(name), fx.meta(name)
    if m.get("timestep_to_start_cfg", TIMESTEP_TO_START_CFG) != TIMESTEP_TO_START_CFG:
        raise ValueError(f"the engine starts true CFG at step {TIMESTEP_TO_START_CFG} only")
    weights = Path(m.get("weights_file", "flux_weights")).name.split(".")[0]
    intervals = (fx.meta(weights).get("pulid_double_interval", 2), fx.meta(weights).get("pulid_single_interval", 4))
    if intervals != (2, 4):
        raise ValueError(f"the engine places the PuLID CAs at the official intervals (2, 4) only, not {intervals}")
    vae = fx.vae(Path(m.get("ae_weights_file", "ae_weights")).name.split(".")[0])
    decoded = []
    vae.decoder.register_forward_hook(lambda module, args, out: decoded.append(out))
    flux = FluxPipeline(scheduler=flux_scheduler(), vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=fx.transformer(weights))
    texts = {"prompt": TextConditioning(t["txt"], t["txt_ids"], t["vec"]),
             "negative prompt": TextConditioning(t["neg_txt"], t["neg_txt_ids"], t["neg_vec"])}

    class FixturePipeline(PuLIDFluxPipeline):
        """The fixture's stand-ins for the text encoders and the face step; the rest is the engine's."""

        def encode_text(self, prompt: str, max_sequence_length: int):
            return texts[prompt]

        def uncond_identity(self):
            return t["uncond_id"]

    pipe = FixturePipeline(flux=flux, pulid=fx.pulid(), face_encoder=None, model_name=name, is_random_weights=False,
                           device=torch.device("cpu"), dtype=torch.float32)
    # The official image is the whole latent grid (rounded up to 16 px); asking for that size gives
    # the same grid, noise and schedule as the requested one, and nothing to crop.
    width, height = m.get("output_width", m["width"]), m.get("output_height", m["height"])
    request = GenerationRequest(
        prompt="prompt", negative_prompt="negative prompt", reference_images=[], width=width, height=height,
        num_inference_steps=m["num_steps"], seed=m["seed"], guidance_scale=m["guidance"],
        start_step=m["start_step"], true_cfg=m["true_cfg"], id_weight=m["id_weight"],
        max_sequence_length=m.get("max_sequence_length", 128), enable_safety_checker=False,
    )
    latents = []
    result = pipe.generate(request, t["id"], on_latents=lambda i, n, x: latents.append(x))
    image = torch.from_numpy(np.array(result.images[0]))
    expected, boundary = t["image"], t["debug.boundary_mask"]
    # bytes may differ only where the decoded value sits within the bar of a conversion step
    differing = float(((image != expected) & ~boundary).sum()) if image.shape == expected.shape else float("inf")
    noise = get_noise(m["seed"], m["height"], m["width"], device="cpu", dtype=torch.float32)
    return [
        ("noise (exact)", _max_abs(noise, t["debug.noise"]), 0.0),
        ("final_latents_unpacked", _max_abs(latents[-1], t["debug.final_latents_unpacked"]), None),
        ("decoded", _max_abs(decoded[-1], t["debug.decoded"]), None),
        ("image (bytes off outside boundary)", differing, 0.0),
    ]


_RUNNERS = {
    "idformer": _idformer,
    "flux_forward": _flux_forward,
    "denoise": _denoise,
    "eva": _eva,
    "face_features": _face_features,
    "pipeline": _pipeline,
}
