"""Loading FLUX (BFL single files or diffusers folders), the FLUX VAE and the PuLID checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

from .pulid import PuLIDModules

_BFL_PREFIXES = ("model.diffusion_model.", "transformer.")
_DOWNLOAD_HINT = "run: pulid-flux download"

# What FLUX's autoencoder fixes in code rather than in its weights (BFL AutoEncoderParams, flux-dev):
# the block layout, the norm groups and the latent scaling. Widths and depths come from the weights.
FLUX_VAE_CONSTANTS: dict = {
    "act_fn": "silu",
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "force_upcast": True,
}


def _require_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weight file not found: {path} ({_DOWNLOAD_HINT})")
    return path


def _strip_prefix(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    for prefix in _BFL_PREFIXES:
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            return {k[len(prefix) :]: v for k, v in state_dict.items()}
    return dict(state_dict)


# ---------------------------------------------------------------------------- FLUX transformer


def bfl_transformer_config(state_dict: dict[str, Tensor], axes_dims_rope=(16, 56, 56)) -> dict:
    """diffusers ``FluxTransformer2DModel`` config read off BFL-format weights."""
    sd = _strip_prefix(state_dict)
    width, in_channels = sd["img_in.weight"].shape
    head_dim = sd["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
    if width % head_dim:
        raise ValueError(f"width {width} is not a multiple of the head dim {head_dim}")
    if sum(axes_dims_rope) != head_dim:
        raise ValueError(f"rotary axes {tuple(axes_dims_rope)} do not add up to the head dim {head_dim}")
    out_channels = sd["final_layer.linear.weight"].shape[0]
    return {
        "patch_size": 1,
        "in_channels": in_channels,
        "out_channels": None if out_channels == in_channels else out_channels,
        "num_layers": 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("double_blocks.")),
        "num_single_layers": 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("single_blocks.")),
        "attention_head_dim": head_dim,
        "num_attention_heads": width // head_dim,
        "joint_attention_dim": sd["txt_in.weight"].shape[1],
        "pooled_projection_dim": sd["vector_in.in_layer.weight"].shape[1],
        "guidance_embeds": "guidance_in.in_layer.weight" in sd,
        "axes_dims_rope": tuple(axes_dims_rope),
    }


def bfl_to_diffusers(state_dict: dict[str, Tensor], axes_dims_rope=(16, 56, 56)) -> tuple[dict[str, Tensor], dict]:
    """BFL ``flux1-dev.safetensors`` keys -> (diffusers FluxTransformer2DModel state dict, config).

    diffusers' own converter does all the renaming but hard-codes the 3072 width when it splits
    ``single_blocks.*.linear1``; we hand it zero-size placeholders of the size it expects there
    and split the real tensors ourselves, so any width works.
    """
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    config = bfl_transformer_config(state_dict, axes_dims_rope)
    sd = _strip_prefix(state_dict)
    width = config["num_attention_heads"] * config["attention_head_dim"]
    placeholder = torch.empty(7 * 3072, 0)  # q, k, v (3 x 3072) + MLP (4 x 3072) rows, no storage

    linear1 = {}
    for i in range(config["num_single_layers"]):
        for kind in ("weight", "bias"):
            key = f"single_blocks.{i}.linear1.{kind}"
            linear1[key] = sd[key]
            sd[key] = placeholder
    converted = convert_flux_transformer_checkpoint_to_diffusers(sd)
    if sd:  # the converter pops what it uses; anything left is not a FLUX key
        raise ValueError(f"unexpected keys in the FLUX checkpoint: {sorted(sd)[:10]}")

    mlp_hidden = linear1["single_blocks.0.linear1.weight"].shape[0] - 3 * width
    for i in range(config["num_single_layers"]):
        prefix = f"single_transformer_blocks.{i}."
        for kind in ("weight", "bias"):
            q, k, v, mlp = torch.split(linear1[f"single_blocks.{i}.linear1.{kind}"], [width] * 3 + [mlp_hidden])
            converted[f"{prefix}attn.to_q.{kind}"] = q
            converted[f"{prefix}attn.to_k.{kind}"] = k
            converted[f"{prefix}attn.to_v.{kind}"] = v
            converted[f"{prefix}proj_mlp.{kind}"] = mlp
    return converted, config


def _is_diffusers_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").exists()


def _load_strict(model_cls, config: dict, state_dict: dict[str, Tensor], dtype, device) -> nn.Module:
    with torch.device("meta"):
        model = model_cls(**config)
    state_dict = {k: v.to(device=device, dtype=dtype) for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval()


def load_flux_transformer(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    axes_dims_rope=(16, 56, 56),
) -> nn.Module:
    """A FluxTransformer2DModel from a BFL single file or a diffusers ``transformer/`` folder."""
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import load_file

    path = _require_file(path)
    if _is_diffusers_dir(path):
        model = FluxTransformer2DModel.from_pretrained(path, torch_dtype=dtype, local_files_only=True)
        return model.to(device).eval()
    converted, config = bfl_to_diffusers(load_file(str(path)), axes_dims_rope)
    return _load_strict(FluxTransformer2DModel, config, converted, dtype, device)


# ---------------------------------------------------------------------------- FLUX VAE


def bfl_vae_config(state_dict: dict[str, Tensor]) -> dict:
    """diffusers ``AutoencoderKL`` config read off BFL ``ae.safetensors`` weights (any width)."""
    sd = state_dict
    levels = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("decoder.up."))
    blocks = 1 + max(int(k.split(".")[4]) for k in sd if k.startswith("decoder.up.0.block."))
    return FLUX_VAE_CONSTANTS | {
        "in_channels": sd["encoder.conv_in.weight"].shape[1],
        "out_channels": sd["decoder.conv_out.weight"].shape[0],
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        # decoder.up.<i> works at width ch * ch_mult[i]
        "block_out_channels": [sd[f"decoder.up.{i}.block.0.conv2.weight"].shape[0] for i in range(levels)],
        "layers_per_block": blocks - 1,  # the decoder has one block more per level than the encoder
        "latent_channels": sd["decoder.conv_in.weight"].shape[1],
        "use_quant_conv": "quant_conv.weight" in sd,
        "use_post_quant_conv": "post_quant_conv.weight" in sd,
        "mid_block_add_attention": "decoder.mid.attn_1.q.weight" in sd,
    }


def bfl_vae_to_diffusers(state_dict: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict]:
    """BFL ``ae.safetensors`` keys -> (diffusers AutoencoderKL state dict, config); diffusers' LDM-VAE
    converter does the renaming."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    config = bfl_vae_config(state_dict)
    return convert_ldm_vae_checkpoint(dict(state_dict), config), config


def flux_vae_from_bfl(
    state_dict: dict[str, Tensor], *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> nn.Module:
    """An AutoencoderKL holding BFL ``ae`` weights, sized from them."""
    from diffusers import AutoencoderKL

    converted, config = bfl_vae_to_diffusers(state_dict)
    return _load_strict(AutoencoderKL, config, converted, dtype, device)


def load_flux_vae(
    path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> nn.Module:
    """An AutoencoderKL from BFL ``ae.safetensors`` or a diffusers ``vae/`` folder."""
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    path = _require_file(path)
    if _is_diffusers_dir(path):
        return AutoencoderKL.from_pretrained(path, torch_dtype=dtype, local_files_only=True).to(device).eval()
    return flux_vae_from_bfl(load_file(str(path)), dtype=dtype, device=device)


# ---------------------------------------------------------------------------- PuLID checkpoint


class CheckpointMismatchError(ValueError):
    """A PuLID checkpoint whose keys or shapes differ from the modules'."""


def pulid_key_manifest(modules: PuLIDModules | None = None) -> dict[str, tuple[int, ...]]:
    """Key -> shape that a PuLID checkpoint must hold for ``modules`` (default: the released v0.9.x)."""
    if modules is None:
        with torch.device("meta"):  # released size is 2.3 GB in fp32; shapes need no storage
            modules = PuLIDModules()
    return {k: tuple(v.shape) for k, v in modules.state_dict().items()}


def load_pulid_state_dict(modules: PuLIDModules, state_dict: dict[str, Tensor], source: str = "checkpoint") -> None:
    """Strict load of ``pulid_encoder.*`` / ``pulid_ca.*`` keys; the error names every bad key."""
    expected = pulid_key_manifest(modules)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong_shape = sorted(
        f"{k}: {tuple(state_dict[k].shape)} != {expected[k]}"
        for k in set(expected) & set(state_dict)
        if tuple(state_dict[k].shape) != expected[k]
    )
    if missing or unexpected or wrong_shape:
        parts = [f"{source} does not match the PuLID-FLUX modules"]
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong_shape)):
            if keys:
                parts.append(f"{label} ({len(keys)}): {', '.join(keys[:20])}{' ...' if len(keys) > 20 else ''}")
        raise CheckpointMismatchError("; ".join(parts))
    modules.load_state_dict(state_dict, strict=True)


def load_pulid_checkpoint(modules: PuLIDModules, path: str | os.PathLike) -> None:
    """Loads the released ``pulid_flux_v0.9.x.safetensors`` unchanged into ``modules``."""
    from safetensors.torch import load_file

    path = _require_file(path)
    device = next(modules.parameters()).device
    load_pulid_state_dict(modules, load_file(str(path), device=str(device)), source=str(path))
