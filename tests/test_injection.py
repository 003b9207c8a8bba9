import pytest
import torch
from diffusers import FluxTransformer2DModel
from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

from pulid_flux.engine.injection import IDInjector
from pulid_flux.engine.pulid import PerceiverAttentionCA

WIDTH, KV = 32, 24


def tiny_flux(num_layers=5, num_single_layers=9) -> FluxTransformer2DModel:
    torch.manual_seed(0)
    return FluxTransformer2DModel(
        in_channels=16,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=20,
        pooled_projection_dim=12,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    ).eval()


def ca_list(n: int) -> nn.ModuleList:
    torch.manual_seed(1)
    return nn.ModuleList(PerceiverAttentionCA(dim=WIDTH, dim_head=8, heads=2, kv_dim=KV) for _ in range(n)).eval()


def inputs(batch=1, n_img=6, n_txt=4):
    g = torch.Generator().manual_seed(2)
    img_ids = torch.stack([torch.zeros(n_img), torch.arange(n_img) // 3, torch.arange(n_img) % 3], -1).float()
    return dict(
        hidden_states=torch.randn(batch, n_img, 16, generator=g),
        encoder_hidden_states=torch.randn(batch, n_txt, 20, generator=g),
        pooled_projections=torch.randn(batch, 12, generator=g),
        timestep=torch.full((batch,), 0.5),
        guidance=torch.full((batch,), 3.5),
        img_ids=img_ids,
        txt_ids=torch.zeros(n_txt, 3),
        return_dict=False,
    )


def run(model, **kw):
    with torch.no_grad():
        return model(**inputs(**kw))[0]


def test_placement_and_call_order():
    model, cas = tiny_flux(), ca_list(6)
    injector = IDInjector(model, cas)
    assert injector.placement == {
        "transformer_blocks.0": 0,
        "transformer_blocks.2": 1,
        "transformer_blocks.4": 2,
        "single_transformer_blocks.0": 3,
        "single_transformer_blocks.4": 4,
        "single_transformer_blocks.8": 5,
    }
    order = []
    for k, ca in enumerate(cas):
        ca.register_forward_hook(lambda m, a, o, k=k: order.append(k))
    run(model)
    assert order == []  # no ID: no CA runs
    with injector.inject(torch.randn(1, 7, KV), 0.7):
        run(model)
    assert order == [0, 1, 2, 3, 4, 5]


class _Record(ModelHook):
    def __init__(self, sink):
        super().__init__()
        self.sink = sink

    def post_forward(self, module, output):
        self.sink(output)
        return output


def record(block, sink):
    HookRegistry.check_if_exists_or_initialize(block).register_hook(_Record(sink), "record")


def test_residual_on_block_output_image_only():
    model, cas = tiny_flux(), ca_list(6)
    raw = {}
    # diffusers hooks registered before the injector's wrap the blocks' own forward: they see its outputs
    record(model.transformer_blocks[2], lambda o: raw.__setitem__("d2", o))
    record(model.single_transformer_blocks[4], lambda o: raw.__setitem__("s4", o))
    nxt = {}
    model.transformer_blocks[3].register_forward_pre_hook(
        lambda m, a, kw: nxt.__setitem__("d3", (kw["encoder_hidden_states"], kw["hidden_states"])), with_kwargs=True
    )
    model.single_transformer_blocks[5].register_forward_pre_hook(
        lambda m, a, kw: nxt.__setitem__("s5", (kw["encoder_hidden_states"], kw["hidden_states"])), with_kwargs=True
    )
    injector = IDInjector(model, cas)
    id_tokens, w = torch.randn(1, 7, KV), 0.6
    with torch.no_grad(), injector.inject(id_tokens, w):
        model(**inputs())
        for name, ca_index in (("d2", 1), ("s4", 4)):
            txt, img = raw[name]
            next_txt, next_img = nxt[name.replace("2", "3").replace("4", "5")]
            assert torch.equal(next_txt, txt)  # text stream untouched
            expected = img + w * cas[ca_index](id_tokens, img)
            torch.testing.assert_close(next_img, expected, rtol=0, atol=0)
            assert (next_img - img).abs().max() > 1e-3


def test_no_active_id_and_remove_give_plain_flux_bitwise():
    model, cas = tiny_flux(), ca_list(6)
    plain = run(model)
    injector = IDInjector(model, cas)
    assert torch.equal(run(model), plain)
    with injector.inject(None):
        assert torch.equal(run(model), plain)
    with injector.inject(torch.randn(1, 7, KV), 1.0):
        with_id = run(model)
    assert (with_id - plain).abs().max() > 1e-3
    assert torch.equal(run(model), plain)  # state is per call

    injector.remove()
    with pytest.raises(RuntimeError):
        with injector.inject(torch.randn(1, 7, KV)):
            pass
    assert torch.equal(run(model), plain)
    assert not any(b._forward_hooks for b in model.transformer_blocks)
    assert not any(b._forward_hooks for b in model.single_transformer_blocks)


def test_state_restored_after_error_and_nested():
    model, cas = tiny_flux(), ca_list(6)
    injector = IDInjector(model, cas)
    a = torch.randn(1, 7, KV)
    with pytest.raises(ZeroDivisionError):
        with injector.inject(a, 1.0):
            1 / 0
    assert not injector.active
    with injector.inject(a, 1.0):
        with injector.inject(None):
            assert not injector.active
        assert injector.active


def test_id_weight_scales_and_batch_broadcasts():
    model, cas = tiny_flux(), ca_list(6)
    injector = IDInjector(model, cas)
    id_tokens = torch.randn(1, 7, KV)
    with injector.inject(id_tokens, 0.0):
        zero = run(model, batch=2)
    torch.testing.assert_close(zero, run(model, batch=2), rtol=0, atol=1e-6)
    with injector.inject(id_tokens, 1.0):
        batched = run(model, batch=2)  # one ID for two images
    assert batched.shape == (2, 6, 16)


def test_wrong_number_of_cross_attentions():
    with pytest.raises(ValueError, match="needs 6"):
        IDInjector(tiny_flux(), ca_list(5))
