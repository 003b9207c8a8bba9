"""EVA02-CLIP-L-14-336 vision tower (timm's Eva) and the features PuLID takes from it.

PuLID uses the projected CLS embedding and the residual stream entering blocks
4, 8, 12, 16 and 20 (doc §2.6). timm's `eva02_large_patch14_clip_336` is the same
network; its `checkpoint_filter_fn` maps the original `visual.*` keys onto it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Union

import timm
import torch
import torch.nn.functional as F
from timm.models.eva import checkpoint_filter_fn
from torch import nn

TIMM_MODEL_NAME = "eva02_large_patch14_clip_336"
EVA_CHECKPOINT_NAME = "EVA02_CLIP_L_336_psz14_s6B.pt"

# The open_clip-style config of EVA02-CLIP-L-14-336 (only the fields the vision tower needs).
EVA02_CLIP_L_336_CONFIG: dict[str, Any] = {
    "embed_dim": 768,
    "vision_cfg": {
        "image_size": 336,
        "layers": 24,
        "width": 1024,
        "head_width": 64,
        "mlp_ratio": 2.6667,
        "patch_size": 14,
        "pt_hw_seq_len": 16,
        "rope": True,
    },
}

# Official rule: keep the stream entering block idx when 0 < idx <= 20 and idx % 4 == 0.
_HIDDEN_ENTRY_BLOCKS = (4, 8, 12, 16, 20)


def hidden_block_indices(depth: int) -> list[int]:
    """0-based indices of the blocks whose OUTPUT is a PuLID hidden state."""
    return [idx - 1 for idx in _HIDDEN_ENTRY_BLOCKS if idx < depth]


def build_eva(config: Optional[Mapping[str, Any]] = None) -> nn.Module:
    """Build the vision tower with random weights from an open_clip-style EVA-CLIP config."""
    cfg = dict(EVA02_CLIP_L_336_CONFIG if config is None else config)
    vision = dict(EVA02_CLIP_L_336_CONFIG["vision_cfg"])
    vision.update(cfg.get("vision_cfg", {}))
    width = int(vision["width"])
    head_width = int(vision.get("head_width", 64))
    if width % head_width:
        raise ValueError(f"EVA width {width} is not a multiple of head_width {head_width}")
    pt_hw = int(vision.get("pt_hw_seq_len", 16))
    model = timm.create_model(
        TIMM_MODEL_NAME,
        pretrained=False,
        img_size=int(vision["image_size"]),
        patch_size=int(vision["patch_size"]),
        embed_dim=width,
        depth=int(vision["layers"]),
        num_heads=width // head_width,
        mlp_ratio=float(vision["mlp_ratio"]),
        ref_feat_shape=(pt_hw, pt_hw),
        num_classes=int(cfg.get("embed_dim", 768)),
    )
    return model.eval()


def _unwrap(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    for wrapper in ("state_dict", "module", "model"):
        inner = state_dict.get(wrapper) if isinstance(state_dict, Mapping) else None
        if isinstance(inner, Mapping):
            state_dict = inner
    return state_dict


def load_eva_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load the `visual.*` weights of an EVA02-CLIP checkpoint strictly into a timm Eva."""
    state_dict = _unwrap(state_dict)
    visual: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith("module."):  # DDP-saved checkpoints
            key = key[len("module."):]
        if key.startswith("visual."):
            visual[key] = value
    if "visual.pos_embed" not in visual:
        raise KeyError("checkpoint has no EVA vision tower weights (no 'visual.pos_embed' key)")
    converted = checkpoint_filter_fn(visual, model)
    model.load_state_dict(converted, strict=True)


def load_eva_checkpoint(model: nn.Module, path: Union[str, Path]) -> None:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"EVA-CLIP weights not found: {path} (expected {EVA_CHECKPOINT_NAME}); "
            "run: pulid-flux download"
        )
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    load_eva_state_dict(model, state_dict)


def eva_features(
    model: nn.Module, image: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Return (L2-normalised CLS embedding, raw CLS embedding, 5 hidden states with CLS first)."""
    indices = hidden_block_indices(len(model.blocks))
    final, inter = model.forward_intermediates(
        image, indices=indices, return_prefix_tokens=True, norm=False, output_fmt="NLC"
    )
    hidden = [torch.cat([prefix, spatial], dim=1) for spatial, prefix in inter]
    embedding = model.forward_head(final)  # head(norm(x)[:, 0]); forward_intermediates applied norm
    return F.normalize(embedding, dim=-1), embedding, hidden
