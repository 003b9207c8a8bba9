"""EVA02-CLIP vision tower on timm: parity with the official eva_clip outputs, loading rules."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pulid_flux.engine.eva import (
    build_eva,
    eva_features,
    hidden_block_indices,
    load_eva_checkpoint,
    load_eva_state_dict,
)

from reference import reference_dir

FIXTURES = reference_dir()
TOL = 1e-4


@pytest.fixture(scope="module")
def eva_case():
    raw = load_file(FIXTURES / "eva.safetensors")
    tensors = {k: (v.float() if v.is_floating_point() else v) for k, v in raw.items()}
    meta = json.loads((FIXTURES / "eva.json").read_text())
    return tensors, meta


@pytest.fixture(scope="module")
def reduced_model(eva_case):
    # one build for the module; every test loads a full state dict into it
    return build_eva(eva_case[1]["eva_clip_config"])


def _visual(tensors):
    return {k: v for k, v in tensors.items() if k.startswith("visual.")}


def test_hidden_state_indices_follow_the_official_rule():
    # streams entering blocks 4, 8, 12, 16, 20 are outputs of blocks 3, 7, 11, 15, 19
    assert hidden_block_indices(24) == [3, 7, 11, 15, 19]
    assert hidden_block_indices(21) == [3, 7, 11, 15, 19]
    assert hidden_block_indices(12) == [3, 7]


def test_default_config_is_eva02_clip_l_336():
    with torch.device("meta"):  # the real size, without allocating 300M parameters
        model = build_eva()
    assert model.embed_dim == 1024 and len(model.blocks) == 24
    assert model.blocks[0].attn.num_heads == 16
    assert tuple(model.head.weight.shape) == (768, 1024)
    assert tuple(model.pos_embed.shape) == (1, 577, 1024)
    assert model.blocks[0].mlp.fc1_g.weight.shape[0] == 2730  # SwiGLU hidden = int(1024 * 2.6667)


def test_eva_parity_with_official(eva_case, reduced_model):
    tensors, _ = eva_case
    model = reduced_model
    load_eva_state_dict(model, _visual(tensors))
    with torch.no_grad():
        normed, raw, hidden = eva_features(model, tensors["image"])
    assert torch.allclose(raw, tensors["image_embedding_unnormalized"], atol=TOL, rtol=0)
    assert torch.allclose(normed, tensors["image_embedding"], atol=TOL, rtol=0)
    assert len(hidden) == 5
    for i, h in enumerate(hidden):
        ref = tensors[f"hidden_states.{i}"]
        assert h.shape == ref.shape  # CLS included: 577 tokens
        assert (h - ref).abs().max().item() <= TOL, f"hidden state {i}"
    id_cond = torch.cat([tensors["arcface_embedding"], normed], dim=-1)
    assert torch.allclose(id_cond, tensors["id_cond"], atol=TOL, rtol=0)


def test_full_checkpoint_with_wrapper_and_text_tower(eva_case, reduced_model, tmp_path):
    tensors, _ = eva_case
    full = dict(_visual(tensors))
    full["text.token_embedding.weight"] = torch.zeros(4, 4)  # text tower keys are ignored
    full["logit_scale"] = torch.tensor(1.0)
    path = tmp_path / "EVA02_CLIP_L_336_psz14_s6B.pt"
    torch.save({"state_dict": full}, path)
    model = reduced_model
    load_eva_checkpoint(model, path)
    assert torch.equal(model.head.weight, tensors["visual.head.weight"])
    assert torch.equal(model.cls_token, tensors["visual.cls_token"])


def test_loading_is_strict(eva_case, reduced_model):
    tensors, _ = eva_case
    visual = _visual(tensors)
    visual.pop("visual.blocks.0.mlp.w3.weight")
    with pytest.raises(RuntimeError, match="w3|fc2"):
        load_eva_state_dict(reduced_model, visual)
    with pytest.raises(KeyError):
        load_eva_state_dict(reduced_model, {"text.x": torch.zeros(1)})


def test_missing_checkpoint_names_file_and_download_command(tmp_path):
    missing = tmp_path / "EVA02_CLIP_L_336_psz14_s6B.pt"
    with pytest.raises(FileNotFoundError) as err:
        load_eva_checkpoint(torch.nn.Module(), missing)
    assert str(missing) in str(err.value) and "pulid-flux download" in str(err.value)
