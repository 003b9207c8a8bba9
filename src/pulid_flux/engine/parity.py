"""``pulid-flux check-parity DIR``: run the engine on the official reference fixtures.

Every case present in DIR goes through the engine's own code (BFL->diffusers conversion,
modules sized from the JSON sidecars, hooks, sampling loop) and each output's max abs
difference is printed; the exit status is 1 if any exceeds the tolerance.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

CASES = ("idformer", "flux_forward", "denoise", "denoise_nocfg", "denoise_odd_size", "eva", "face_features")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", type=Path, help="fixture directory (<case>.safetensors + <case>.json)")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="max abs difference allowed (default 1e-4)")
    parser.add_argument("--cases", default=None, help=f"comma-separated subset of: {', '.join(CASES)}")


def run(args: argparse.Namespace) -> int:
    import torch

    directory = Path(args.dir)
    if not directory.is_dir():
        print(f"not a directory: {directory}")
        return 2
    wanted = CASES if args.cases is None else tuple(c.strip() for c in args.cases.split(",") if c.strip())
    unknown = sorted(set(wanted) - set(CASES))
    if unknown:
        print(f"unknown case(s): {', '.join(unknown)}")
        return 2
    present = [c for c in wanted if (directory / f"{c}.json").exists()]
    if not present:
        print(f"no fixture cases found in {directory}")
        return 2
    absent = [c for c in wanted if c not in present] if args.cases is not None else []
    for case in absent:
        print(f"{case:<18} ERROR  requested but {case}.json is not in {directory}")

    fixtures = _Fixtures(directory)
    failures = len(absent)
    with torch.no_grad():
        for case in present:
            try:
                results = _RUNNERS[case](fixtures)
            except Exception as exc:  # a case that cannot run is a failure, reported, not a crash
                print(f"{case:<18} ERROR  {type(exc).__name__}: {exc}")
                failures += 1
                continue
            for name, diff, tol in results:
                tol = args.tolerance if tol is None else tol
                ok = diff <= tol
                failures += not ok
                print(f"{case:<18} {name:<34} max_abs={diff:.3e}  {'ok' if ok else 'FAIL'} (tol {tol:g})")
    print(f"{'FAILED' if failures else 'PASSED'}: {len(present)} case(s), {failures} failure(s)")
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

    def flux(self):
        """(transformer, injector) built from the BFL-format fixture weights."""
        if "flux" not in self._cache:
            from diffusers import FluxTransformer2DModel

            from .injection import IDInjector
            from .weights import bfl_to_diffusers

            meta = self.meta("flux_weights")
            bfl = {k: v for k, v in self.tensors("flux_weights").items() if k.startswith("transformer.")}
            params = meta["flux_params"]
            state, config = bfl_to_diffusers(bfl, axes_dims_rope=params["axes_dim"])
            derived = (config["num_attention_heads"], config["num_layers"], config["num_single_layers"])
            if derived != (params["num_heads"], params["depth"], params["depth_single_blocks"]):
                raise ValueError(f"weights give (heads, depth, single depth) {derived}, JSON says otherwise: {params}")
            transformer = FluxTransformer2DModel(**config)
            transformer.load_state_dict(state, strict=True)
            transformer.eval()
            modules = self.pulid()
            if len(modules.pulid_ca) != meta.get("num_pulid_ca", len(modules.pulid_ca)):
                raise ValueError(f"built {len(modules.pulid_ca)} CA modules, fixture has {meta['num_pulid_ca']}")
            injector = IDInjector(
                transformer,
                modules.pulid_ca,
                double_interval=meta.get("pulid_double_interval", 2),
                single_interval=meta.get("pulid_single_interval", 4),
            )
            self._cache["flux"] = (transformer, injector)
        return self._cache["flux"]


def _max_abs(a, b, mask=None) -> float:
    import torch

    if a.shape != b.shape:
        return float("inf")
    diff = (a.float() - b.float()).abs()
    if mask is not None:
        diff = torch.where(mask.expand_as(diff), diff, torch.zeros_like(diff))
    return float(diff.max()) if diff.numel() else 0.0


def _idformer(fx: _Fixtures):
    t = fx.tensors("idformer")
    modules = fx.pulid()
    hidden = [t[f"id_vit_hidden.{i}"] for i in range(modules.pulid_encoder.num_scales)]
    return [
        ("id_embedding", _max_abs(modules.encode(t["id_cond"], hidden), t["id_embedding"]), None),
        ("uncond_id_embedding", _max_abs(modules.encode_uncond(t["id_cond"], hidden), t["uncond_id_embedding"]), None),
    ]


def _flux_forward(fx: _Fixtures):
    from .sampling import TextConditioning, predict

    t, meta = fx.tensors("flux_forward"), fx.meta("flux_forward")
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


def _denoise_case(name: str):
    def runner(fx: _Fixtures):
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

    return runner


def _eva(fx: _Fixtures):
    from .eva import build_eva, eva_features, load_eva_state_dict

    t, m = fx.tensors("eva"), fx.meta("eva")
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


def _face_features(fx: _Fixtures):
    from .face import background_mask, build_bisenet, eva_preprocess, face_features_image

    t = fx.tensors("face_features")
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


_RUNNERS = {
    "idformer": _idformer,
    "flux_forward": _flux_forward,
    "denoise": _denoise_case("denoise"),
    "denoise_nocfg": _denoise_case("denoise_nocfg"),
    "denoise_odd_size": _denoise_case("denoise_odd_size"),
    "eva": _eva,
    "face_features": _face_features,
}
