import math
from contextlib import contextmanager

import pytest
import torch
from torch import nn

from pulid_flux.engine.sampling import (
    TextConditioning,
    denoise,
    get_noise,
    get_schedule,
    image_ids,
    latent_size,
    pack,
    unpack,
)


def test_latent_size_rounds_up():
    assert latent_size(72, 120) == (10, 16)
    assert latent_size(96, 128) == (12, 16)
    assert latent_size(768, 1024) == (96, 128)
    assert latent_size(1000, 1001) == (126, 126)


def test_schedule_matches_official_values():
    # fixture values (official get_schedule, float32), 128x96 -> 48 tokens, mu < 0.5 (not clamped)
    assert get_schedule(4, 48) == [1.0, 0.8268412351608276, 0.6141502857208252, 0.34664472937583923, 0.0]
    assert get_schedule(3, 40) == [1.0, 0.7607115507125854, 0.44282376766204834, 0.0]
    # doc example: 1024x768, 20 steps
    t = get_schedule(20, 3072)
    assert len(t) == 21 and t[0] == 1.0 and t[-1] == 0.0
    for got, want in zip(t[:4] + t[-4:], [1.0, 0.981, 0.960, 0.938, 0.319, 0.228, 0.123, 0.0]):
        assert abs(got - want) < 1e-3
    # mu keeps growing past 4096 tokens
    mu = 0.5 + 0.65 * (8192 - 256) / 3840
    t1 = get_schedule(4, 8192)[1]
    assert abs(t1 - math.exp(mu) / (math.exp(mu) + (1 / 0.75 - 1))) < 1e-6
    assert all(a > b for a, b in zip(t, t[1:]))


def test_noise_is_drawn_directly_in_target_dtype():
    noise = get_noise(42, 96, 128, device="cpu", dtype=torch.float32)
    ref = torch.randn(1, 16, 12, 16, generator=torch.Generator("cpu").manual_seed(42), dtype=torch.float32)
    assert torch.equal(noise, ref)
    bf16 = get_noise(42, 96, 128, device="cpu", dtype=torch.bfloat16, num_images=2)
    ref16 = torch.randn(2, 16, 12, 16, generator=torch.Generator("cpu").manual_seed(42), dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and torch.equal(bf16, ref16)
    assert get_noise(7, 72, 120, device="cpu", dtype=torch.float32).shape == (1, 16, 10, 16)


def test_pack_layout_unpack_and_ids():
    x = torch.randn(2, 16, 10, 16)
    packed = pack(x)
    assert packed.shape == (2, 40, 64)
    # token (row r, col c) holds channel-major 2x2 patches
    r, c, ch, py, px = 3, 5, 7, 1, 0
    assert packed[1, r * 8 + c, ch * 4 + py * 2 + px] == x[1, ch, 2 * r + py, 2 * c + px]
    assert torch.equal(unpack(packed, 72, 120), x)
    ids = image_ids(10, 16)
    assert ids.shape == (40, 3)
    assert ids[r * 8 + c].tolist() == [0.0, r, c]


class SpyInjector:
    """Stands in for IDInjector: remembers which ID is active during each call."""

    def __init__(self):
        self.current = None

    @contextmanager
    def inject(self, id_tokens, id_weight=1.0):
        prev, self.current = self.current, id_tokens
        self.weight = id_weight
        try:
            yield
        finally:
            self.current = prev


class SpyFlux(nn.Module):
    """Records every call; predicts +1 for the prompt pass and -1 for the negative pass."""

    def __init__(self, injector, names):
        super().__init__()
        self.injector, self.names, self.calls = injector, names, []

    def forward(
        self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, guidance, return_dict
    ):
        txt = self.names[id(encoder_hidden_states)] if id(encoder_hidden_states) in self.names else "?"
        vec = self.names.get(id(pooled_projections), "?")
        current = self.injector.current
        self.calls.append(
            dict(
                txt=txt,
                vec=vec,
                id=None if current is None else self.names.get(id(current), "?"),
                t=float(timestep[0]),
                g=float(guidance[0]),
                txt_ids_ndim=txt_ids.ndim,
            )
        )
        sign = 1.0 if txt == "txt" else -1.0
        return (torch.full_like(hidden_states, sign),)


def make_setup():
    txt, neg_txt = torch.randn(1, 4, 8), torch.randn(1, 4, 8)
    vec, neg_vec = torch.randn(1, 6), torch.randn(1, 6)
    id_tokens, uncond = torch.randn(1, 3, 5), torch.randn(1, 3, 5)
    names = {id(txt): "txt", id(neg_txt): "neg_txt", id(vec): "vec", id(neg_vec): "neg_vec"}
    names |= {id(id_tokens): "id", id(uncond): "uncond_id"}
    injector = SpyInjector()
    model = SpyFlux(injector, names)
    cond = TextConditioning(txt, torch.zeros(1, 4, 3), vec)
    neg = TextConditioning(neg_txt, torch.zeros(4, 3), neg_vec)
    return model, injector, cond, neg, id_tokens, uncond


def summarize(calls):
    return [(c["txt"], c["vec"], c["id"]) for c in calls]


def test_true_cfg_uses_negative_text_and_uncond_id_from_step_1():
    model, injector, cond, neg, id_tokens, uncond = make_setup()
    timesteps = get_schedule(4, 48)
    img = torch.zeros(1, 6, 4)
    seen = []
    out = denoise(
        model, injector, img, image_ids(2, 6), timesteps, cond,
        guidance=4.0, id_tokens=id_tokens, id_weight=0.8, start_step=1, true_cfg=3.0,
        neg_cond=neg, uncond_id_tokens=uncond, batch_cfg=False,
        step_callback=lambda i, n, lat: seen.append((i, n, lat.clone())),
    )  # fmt: skip
    assert summarize(model.calls) == [
        ("txt", "vec", None),
        ("txt", "vec", "id"), ("neg_txt", "neg_vec", "uncond_id"),
        ("txt", "vec", "id"), ("neg_txt", "neg_vec", "uncond_id"),
        ("txt", "vec", "id"), ("neg_txt", "neg_vec", "uncond_id"),
    ]  # fmt: skip
    # t passed in [0, 1] (diffusers scales by 1000 itself); guidance on in both passes
    assert [c["t"] for c in model.calls] == pytest.approx([timesteps[0]] + [t for t in timesteps[1:4] for _ in (0, 1)])
    assert all(c["g"] == 4.0 for c in model.calls) and all(c["txt_ids_ndim"] == 2 for c in model.calls)
    # Euler with pred = neg + cfg (pos - neg): step 0 pos only (+1), later 3*2 - 1 = 5
    dts = [b - a for a, b in zip(timesteps, timesteps[1:])]
    expected = dts[0] * 1.0 + sum(dts[1:]) * 5.0
    torch.testing.assert_close(out, torch.full_like(img, expected))
    assert [(i, n) for i, n, _ in seen] == [(0, 4), (1, 4), (2, 4), (3, 4)]
    torch.testing.assert_close(seen[0][2], torch.full_like(img, dts[0]))


def test_no_cfg_single_pass_and_id_window():
    model, injector, cond, neg, id_tokens, uncond = make_setup()
    denoise(
        model, injector, torch.zeros(1, 6, 4), image_ids(2, 6), get_schedule(5, 48), cond,
        id_tokens=id_tokens, start_step=1, end_step=3, true_cfg=1.0, neg_cond=neg, uncond_id_tokens=uncond,
    )  # fmt: skip
    assert summarize(model.calls) == [
        ("txt", "vec", None), ("txt", "vec", "id"), ("txt", "vec", "id"), ("txt", "vec", None), ("txt", "vec", None)
    ]  # fmt: skip
    assert injector.current is None


def test_cfg_before_start_step_has_no_id_in_either_pass():
    model, injector, cond, neg, id_tokens, uncond = make_setup()
    denoise(
        model, injector, torch.zeros(2, 6, 4), image_ids(2, 6), get_schedule(3, 48), cond,
        id_tokens=id_tokens, start_step=2, true_cfg=1.5, neg_cond=neg, uncond_id_tokens=uncond, batch_cfg=False,
    )  # fmt: skip
    assert [c["id"] for c in model.calls] == [None, None, None, "id", "uncond_id"]


def test_step_callback_can_cancel():
    model, injector, cond, _, _, _ = make_setup()

    def cancel(i, n, latents):
        if i == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        denoise(model, injector, torch.zeros(1, 6, 4), image_ids(2, 6), get_schedule(4, 48), cond, step_callback=cancel)
    assert len(model.calls) == 2


def test_cfg_requires_negative_conditioning():
    model, injector, cond, _, id_tokens, _ = make_setup()
    with pytest.raises(ValueError):
        denoise(model, injector, torch.zeros(1, 6, 4), image_ids(2, 6), get_schedule(2, 48), cond, true_cfg=2.0)


def tiny_pulid_transformer():
    """The tiny preset's transformer with PuLID's cross-attentions attached (random weights, fp32)."""
    from pulid_flux.engine.injection import IDInjector
    from pulid_flux.engine.presets import TINY_IDFORMER
    from pulid_flux.engine.pulid import IDFormer, PuLIDModules
    from pulid_flux.engine.tiny_flux import TINY_HEADS, TINY_TEXT_WIDTH, TINY_WIDTH, build_tiny_flux

    transformer = build_tiny_flux(0).transformer
    torch.manual_seed(1)
    pulid = PuLIDModules.for_transformer(transformer, IDFormer(**TINY_IDFORMER), ca_heads=TINY_HEADS,
                                         ca_dim_head=TINY_WIDTH // TINY_HEADS).eval()
    txt_len = 12
    cond = TextConditioning(torch.randn(1, txt_len, TINY_TEXT_WIDTH), torch.zeros(txt_len, 3),
                            torch.randn(1, TINY_TEXT_WIDTH))
    neg = TextConditioning(torch.randn(1, txt_len, TINY_TEXT_WIDTH), torch.zeros(txt_len, 3),
                           torch.randn(1, TINY_TEXT_WIDTH))
    out_dim = TINY_IDFORMER["output_dim"]
    return transformer, IDInjector(transformer, pulid.pulid_ca), cond, neg, torch.randn(1, 32, out_dim), \
        torch.randn(1, 32, out_dim)


def test_batched_true_cfg_equals_the_sequential_loop():
    transformer, injector, cond, neg, id_tokens, uncond = tiny_pulid_transformer()
    calls = []
    transformer.register_forward_hook(lambda m, a, kw, out: calls.append(kw["hidden_states"].shape[0]),
                                      with_kwargs=True)
    img = pack(get_noise(3, 96, 128, device="cpu", dtype=torch.float32, num_images=2))
    ids = image_ids(12, 16)
    timesteps = get_schedule(5, img.shape[1])

    def run(batch_cfg, uncond_id=uncond):
        calls.clear()
        return denoise(transformer, injector, img, ids, timesteps, cond, guidance=3.5, id_tokens=id_tokens,
                       id_weight=0.9, start_step=1, end_step=4, true_cfg=3.5, neg_cond=neg,
                       uncond_id_tokens=uncond_id, batch_cfg=batch_cfg)

    sequential = run(False)
    assert calls == [2] + [2, 2] * 4  # step 0 has no CFG, then two calls of 2 images per step
    batched = run(True)
    assert calls == [2] + [4] * 4  # one call of 2 x 2 images per CFG step
    torch.testing.assert_close(batched, sequential, rtol=0, atol=1e-5)
    # each half of the batch gets its own ID: the negative half's ID is not the prompt's
    assert (run(True, uncond_id=id_tokens) - batched).abs().max() > 1e-3
