"""The `acceleration` field: First Block Cache that never drops or freezes the identity."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from pulid_flux.engine import acceleration
from pulid_flux.engine.pipeline import PuLIDFluxPipeline
from pulid_flux.engine.sampling import denoise, get_noise, get_schedule, image_ids, pack, predict
from pulid_flux.engine.types import GenerationRequest
from test_sampling import tiny_pulid_transformer

STEPS = 4


@pytest.fixture(scope="module")
def pipe() -> PuLIDFluxPipeline:
    return PuLIDFluxPipeline.from_preset("tiny")


@pytest.fixture(scope="module")
def face() -> Image.Image:
    return Image.fromarray(skimage.data.astronaut())


def request(face, **overrides) -> GenerationRequest:
    values = dict(prompt="a portrait", reference_images=[face], width=128, height=96, num_inference_steps=STEPS,
                  seed=3, enable_safety_checker=False)
    return GenerationRequest(**(values | overrides))


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0])


@pytest.fixture
def always_reuse(monkeypatch):
    """A threshold no change reaches: every call after a full one reuses the cache, the worst case."""
    monkeypatch.setitem(acceleration.FIRST_BLOCK_CACHE_THRESHOLDS, "high", 1e9)


def full_calls_fraction(result, num_blocks: int) -> float:
    """Share of transformer calls that ran every block, from the reported skipped fraction."""
    return 1 - result.metrics["skipped_block_fraction"] * num_blocks / (num_blocks - 1)


def num_blocks(pipe) -> int:
    return len(pipe.transformer.transformer_blocks) + len(pipe.transformer.single_transformer_blocks)


def test_none_is_the_plain_loop_bit_for_bit():
    """"none" installs nothing: the loop equals a hand-written official loop exactly (true CFG included)."""
    transformer, injector, cond, neg, id_tokens, uncond = tiny_pulid_transformer()
    img = pack(get_noise(5, 96, 128, device="cpu", dtype=torch.float32))
    ids, timesteps = image_ids(12, 16), get_schedule(STEPS, img.shape[1])
    assert acceleration.block_cache(transformer, "none") is None
    got = denoise(transformer, injector, img, ids, timesteps, cond, id_tokens=id_tokens, start_step=1, true_cfg=2.5,
                  neg_cond=neg, uncond_id_tokens=uncond, batch_cfg=False, cache=None)
    want = img
    for i, (t, t_next) in enumerate(zip(timesteps[:-1], timesteps[1:])):
        with injector.inject(id_tokens if i >= 1 else None):
            pos = predict(transformer, want, ids, cond, t, 4.0)
        if i >= 1:
            with injector.inject(uncond if i >= 1 else None):
                neg_pred = predict(transformer, want, ids, neg, t, 4.0)
            pos = neg_pred + 2.5 * (pos - neg_pred)
        want = want + (t_next - t) * pos
    assert torch.equal(got, want)


def test_none_reports_nothing_and_leaves_no_hooks(pipe, face):
    result = pipe(request(face, acceleration="none"))
    assert result.metrics == {}
    assert not pipe.transformer.is_cache_enabled
    assert np.array_equal(pixels(result), pixels(pipe(request(face))))


def test_cache_is_removed_after_the_request(pipe, face):
    plain = pixels(pipe(request(face)))
    pipe(request(face, acceleration="high"))
    assert not pipe.transformer.is_cache_enabled
    assert np.array_equal(pixels(pipe(request(face))), plain)


def test_removing_the_id_still_changes_the_image(pipe, face, always_reuse):
    with_id = pipe(request(face, start_step=1, acceleration="high"))
    # step 0 ran in full; step 1 switched the ID on, so it ran in full again; steps 2 and 3 reused it
    assert full_calls_fraction(with_id, num_blocks(pipe)) == pytest.approx(2 / STEPS)
    without_id = pipe(request(face, start_step=STEPS, acceleration="high"))
    assert full_calls_fraction(without_id, num_blocks(pipe)) == pytest.approx(1 / STEPS)
    zero_weight = pipe(request(face, start_step=1, id_weight=0.0, acceleration="high"))
    assert not np.array_equal(pixels(with_id), pixels(without_id))
    assert not np.array_equal(pixels(with_id), pixels(zero_weight))


def test_switching_the_id_off_invalidates_the_cache(pipe, face, always_reuse):
    # ID on for steps 1..2 only: step 0, 1 (on) and 3 (off) run in full; only step 2 reuses
    result = pipe(request(face, start_step=1, end_step=3, acceleration="high"))
    assert full_calls_fraction(result, num_blocks(pipe)) == pytest.approx(3 / STEPS)
    assert not np.array_equal(pixels(result), pixels(pipe(request(face, start_step=1, acceleration="high"))))


def test_each_cfg_branch_has_its_own_context(pipe, face, always_reuse):
    # calls: step 0 prompt only; steps 1..3 one batched pair each (its own context, fresh at step 1)
    batched = pipe(request(face, true_cfg=3.0, acceleration="high"))
    assert full_calls_fraction(batched, num_blocks(pipe)) == pytest.approx(2 / STEPS)
    pipe.batch_cfg = False
    try:  # sequential: 1 + 2 x 3 calls; full: step 0 (prompt) and step 1 (first negative call)
        sequential = pipe(request(face, true_cfg=3.0, acceleration="high"))
    finally:
        pipe.batch_cfg = True
    assert full_calls_fraction(sequential, num_blocks(pipe)) == pytest.approx(2 / 7)


def test_levels_use_the_documented_thresholds(pipe, face):
    assert acceleration.FIRST_BLOCK_CACHE_THRESHOLDS == {"regular": 0.08, "high": 0.12}
    plain = pixels(pipe(request(face, num_inference_steps=8)))
    for level in ("regular", "high"):
        result = pipe(request(face, acceleration=level, num_inference_steps=8))
        # the tiny model's residuals barely move from step to step: most calls reuse the cache
        assert 0.5 < result.metrics["skipped_block_fraction"] < 1
        assert not np.array_equal(pixels(result), plain)
    with pytest.raises(ValueError):
        pipe(request(face, acceleration="max"))


def accelerated_loop(transformer, injector, cond, neg, id_tokens, uncond, **kw):
    img = pack(get_noise(3, 96, 128, device="cpu", dtype=torch.float32))
    cache = acceleration.BlockCache(transformer, 1e9)
    out = denoise(transformer, injector, img, image_ids(12, 16), get_schedule(STEPS, img.shape[1]), cond,
                  id_tokens=id_tokens, start_step=1, end_step=3, true_cfg=3.0, neg_cond=neg, uncond_id_tokens=uncond,
                  cache=cache, **kw)
    return out, cache


def test_works_with_fullgraph_compiled_blocks():
    """--compile compiles each block with fullgraph, which the cache's skip decision would break."""
    transformer, injector, *rest = tiny_pulid_transformer()
    eager, eager_cache = accelerated_loop(transformer, injector, *rest)
    transformer.compile_repeated_blocks(fullgraph=True, backend="eager")  # dynamo's checks, no codegen
    compiled = [block._compiled_call_impl for block in transformer.transformer_blocks]
    out, cache = accelerated_loop(transformer, injector, *rest)
    assert cache.skipped_fraction == eager_cache.skipped_fraction > 0
    torch.testing.assert_close(out, eager, rtol=0, atol=0)
    assert [block._compiled_call_impl for block in transformer.transformer_blocks] == compiled
    assert not transformer.is_cache_enabled


def test_a_cancelled_request_leaves_no_cache_behind():
    transformer, injector, *rest = tiny_pulid_transformer()

    def cancel(i, n, latents):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        accelerated_loop(transformer, injector, *rest, step_callback=cancel)
    assert not transformer.is_cache_enabled
