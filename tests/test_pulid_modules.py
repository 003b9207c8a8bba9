import math

import pytest
import torch

from pulid_flux.engine.pulid import (
    IDFormer,
    PerceiverAttentionCA,
    PuLIDModules,
    ca_placement,
    num_cross_attentions,
)
from pulid_flux.engine.weights import pulid_key_manifest


def small_encoder(**overrides) -> IDFormer:
    cfg = dict(
        dim=16, depth=5, dim_head=8, heads=2, num_queries=6, output_dim=24,
        id_cond_dim=40, vit_hidden_dim=12, mapping_dim=20,
    )
    cfg.update(overrides)
    torch.manual_seed(0)
    return IDFormer(**cfg).eval()


def test_released_manifest_matches_checkpoint_layout():
    manifest = pulid_key_manifest()
    enc = {k: s for k, s in manifest.items() if k.startswith("pulid_encoder.")}
    ca = {k: s for k, s in manifest.items() if k.startswith("pulid_ca.")}
    assert len(manifest) == 312 and len(enc) == 172 and len(ca) == 140
    count = lambda d: sum(math.prod(s) for s in d.values())  # noqa: E731
    assert count(manifest) == 571_033_600
    assert count(enc) == 151_398_400
    assert count(ca) == 20 * 20_981_760
    expected = {
        "pulid_encoder.latents": (1, 32, 1024),
        "pulid_encoder.proj_out": (1024, 2048),
        "pulid_encoder.id_embedding_mapping.0.weight": (1024, 1280),
        "pulid_encoder.id_embedding_mapping.4.bias": (1024,),
        "pulid_encoder.id_embedding_mapping.6.weight": (5120, 1024),
        "pulid_encoder.mapping_4.6.weight": (1024, 1024),
        "pulid_encoder.layers.9.0.to_kv.weight": (2048, 1024),
        "pulid_encoder.layers.9.1.0.bias": (1024,),
        "pulid_encoder.layers.9.1.1.weight": (4096, 1024),
        "pulid_encoder.layers.9.1.3.weight": (1024, 4096),
        "pulid_ca.0.norm1.weight": (2048,),
        "pulid_ca.19.norm2.bias": (3072,),
        "pulid_ca.19.to_q.weight": (2048, 3072),
        "pulid_ca.19.to_kv.weight": (4096, 2048),
        "pulid_ca.19.to_out.weight": (3072, 2048),
    }
    for key, shape in expected.items():
        assert manifest[key] == shape, key
    # parameter-free layers (LeakyReLU, GELU) must not produce keys
    assert not any(".2." in k or ".5." in k for k in enc if "mapping" in k)
    assert "pulid_ca.20.to_q.weight" not in manifest


def test_placement_for_flux_dev_depths():
    assert num_cross_attentions(19, 38) == 20
    double, single = ca_placement(19, 38)
    assert double == [(b, b // 2) for b in range(0, 19, 2)]
    assert single == [(b, 10 + b // 4) for b in range(0, 38, 4)]
    with torch.device("meta"):
        assert len(PuLIDModules().pulid_ca) == 20
    assert num_cross_attentions(3, 5) == 4 and ca_placement(3, 5) == ([(0, 0), (2, 1)], [(0, 2), (4, 3)])


def test_idformer_output_shape_and_multi_reference():
    enc = small_encoder()
    hidden = [torch.randn(2, 7, 12) for _ in range(5)]
    with torch.no_grad():
        out = enc(torch.randn(2, 40), hidden)
        multi = enc(torch.randn(2, 3, 40), hidden)
    assert out.shape == (2, 6, 24)
    assert multi.shape == (2, 6, 24)

    # 3 references give 15 ID tokens in the context of every layer: 15 + 7 context + 6+15 latents
    seen = []
    enc.layers[0][0].register_forward_hook(lambda m, args, out: seen.append((args[0].shape, args[1].shape)))
    with torch.no_grad():
        enc(torch.randn(2, 3, 40), hidden)
    assert seen == [(torch.Size([2, 22, 16]), torch.Size([2, 21, 16]))]


def test_idformer_uncond_is_encoder_of_zeros_not_zeros():
    enc = small_encoder()
    modules = PuLIDModules(enc, num_double_blocks=1, num_single_blocks=1, ca_dim=32, ca_heads=2, ca_dim_head=8)
    id_cond = torch.randn(1, 40)
    hidden = [torch.randn(1, 7, 12) for _ in range(5)]
    uncond = modules.encode_uncond(id_cond, hidden)
    with torch.no_grad():
        direct = enc(torch.zeros(1, 40), [torch.zeros(1, 7, 12)] * 5)
    torch.testing.assert_close(uncond, direct, rtol=0, atol=0)
    assert uncond.abs().max() > 1e-3
    assert not torch.allclose(uncond, modules.encode(id_cond, hidden))


def test_idformer_rejects_depth_not_multiple_of_scales():
    with pytest.raises(ValueError):
        IDFormer(depth=7)


def _reference_ca(ca: PerceiverAttentionCA, id_tokens, img, heads):
    # the official formulation: LN on each side, d^-1/4 on q and k, fp32 softmax
    x = torch.nn.functional.layer_norm(id_tokens, id_tokens.shape[-1:], ca.norm1.weight, ca.norm1.bias)
    lat = torch.nn.functional.layer_norm(img, img.shape[-1:], ca.norm2.weight, ca.norm2.bias)
    q = lat @ ca.to_q.weight.T
    k, v = (x @ ca.to_kv.weight.T).chunk(2, dim=-1)
    split = lambda t: t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    s = 1 / math.sqrt(math.sqrt(q.shape[-1]))
    w = torch.softmax(((q * s) @ (k * s).transpose(-2, -1)).float(), dim=-1)
    out = (w @ v).transpose(1, 2).reshape(img.shape[0], img.shape[1], -1)
    return out @ ca.to_out.weight.T


def test_cross_attention_semantics_and_batch_broadcast():
    torch.manual_seed(1)
    ca = PerceiverAttentionCA(dim=32, dim_head=8, heads=2, kv_dim=24).eval()
    for p in ca.parameters():  # non-trivial norms so swapping norm1/norm2 would show
        torch.nn.init.normal_(p)
    id_tokens, img = torch.randn(1, 6, 24), torch.randn(3, 10, 32)
    with torch.no_grad():
        out = ca(id_tokens, img)
        expected = _reference_ca(ca, id_tokens.expand(3, -1, -1), img, heads=2)
        one = ca(id_tokens, img[1:2])
    assert out.shape == (3, 10, 32)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(out[1:2], one, rtol=1e-5, atol=1e-5)
