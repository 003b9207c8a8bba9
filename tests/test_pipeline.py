"""The whole engine on the tiny preset: determinism, gating end to end, faces, sizes, the CLI."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image
from test_quiet import assert_no_library_warnings

from pulid_flux.engine.pipeline import RANDOM_SEED_BOUND, PuLIDFluxPipeline
from pulid_flux.engine.types import GenerationRequest, NoFaceError

STEPS = 3


@pytest.fixture(scope="module")
def pipe() -> PuLIDFluxPipeline:
    return PuLIDFluxPipeline.from_preset("tiny")


@pytest.fixture(scope="module")
def face() -> Image.Image:
    return Image.fromarray(skimage.data.astronaut())


def request(face, **overrides) -> GenerationRequest:
    values = dict(prompt="a portrait, cinematic", reference_images=[face], width=128, height=96,
                  num_inference_steps=STEPS, seed=7, enable_safety_checker=False)
    return GenerationRequest(**(values | overrides))


def pixels(result) -> list[np.ndarray]:
    return [np.asarray(image) for image in result.images]


def test_tiny_is_labelled_random(pipe):
    assert pipe.model_name == "tiny"
    assert pipe.is_random_weights


def test_same_seed_gives_identical_bytes(pipe, face):
    first, second = pipe(request(face)), pipe(request(face))
    assert first.seed == second.seed == 7
    assert first.images[0].tobytes() == second.images[0].tobytes()
    other = pipe(request(face, seed=8))
    assert other.images[0].tobytes() != first.images[0].tobytes()


def test_weights_are_deterministic_across_builds(pipe, face):
    rebuilt = PuLIDFluxPipeline.from_preset("tiny")
    assert rebuilt(request(face)).images[0].tobytes() == pipe(request(face)).images[0].tobytes()


def test_random_seed_is_reported_and_reproduces(pipe, face):
    result = pipe(request(face, seed=None))
    assert 0 <= result.seed < RANDOM_SEED_BOUND
    again = pipe(request(face, seed=result.seed))
    assert again.images[0].tobytes() == result.images[0].tobytes()


def test_identity_changes_the_image_only_while_injected(pipe, face):
    with_id = pixels(pipe(request(face)))[0]
    weight_zero = pixels(pipe(request(face, id_weight=0.0)))[0]
    never_injected = pixels(pipe(request(face, start_step=STEPS)))[0]
    ended_at_once = pixels(pipe(request(face, end_step=0)))[0]
    # id_weight 0, start_step past the end and end_step 0 are all plain FLUX
    assert np.array_equal(weight_zero, never_injected)
    assert np.array_equal(weight_zero, ended_at_once)
    assert not np.array_equal(with_id, weight_zero)


def test_late_start_differs_from_early_start(pipe, face):
    early = pixels(pipe(request(face, start_step=0)))[0]
    late = pixels(pipe(request(face, start_step=2)))[0]
    assert not np.array_equal(early, late)


def test_true_cfg_uses_negative_prompt_and_cached_uncond_id(pipe, face):
    a = pixels(pipe(request(face, true_cfg=3.0, negative_prompt="blurry")))[0]
    b = pixels(pipe(request(face, true_cfg=3.0, negative_prompt="watermark")))[0]
    assert not np.array_equal(a, b)
    uncond = pipe.uncond_identity()
    pipe(request(face, true_cfg=3.0))
    assert pipe.uncond_identity() is uncond  # a per-model constant, computed once
    # the negative prompt is ignored without true CFG, as in the official code
    c = pixels(pipe(request(face, negative_prompt="blurry")))[0]
    d = pixels(pipe(request(face, negative_prompt="watermark")))[0]
    assert np.array_equal(c, d)


def test_several_references_are_fused_by_averaging(pipe, face):
    mirrored = face.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    one = pipe.encode_identity([face])
    other = pipe.encode_identity([mirrored])
    fused = pipe.encode_identity([face, mirrored])
    assert fused.shape == one.shape == (1, 32, pipe.pulid.pulid_encoder.output_dim)
    assert np.allclose(fused.numpy(), ((one + other) / 2).numpy(), atol=1e-6)


def test_repeated_references_reuse_their_id_embedding(face, monkeypatch):
    cached = PuLIDFluxPipeline.from_preset("tiny", id_cache_size=2)
    uncached = PuLIDFluxPipeline.from_preset("tiny", id_cache_size=0)
    calls = []

    def counted(p):
        encode = p.face_encoder.encode

        def spy(image, face_index=None):
            calls.append(p)
            return encode(image, face_index=face_index)
        return spy

    for p in (cached, uncached):
        monkeypatch.setattr(p.face_encoder, "encode", counted(p))
    mirrored = face.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    first = pixels(cached(request(face)))[0]
    assert np.array_equal(pixels(cached(request(face.copy())))[0], first)  # same pixels: a hit
    assert np.array_equal(pixels(uncached(request(face)))[0], first)
    assert calls.count(cached) == 1
    cached(request(face, face_index=0))  # another face choice is another entry
    cached(request(mirrored))  # evicts the least recently used (face, None)
    assert calls.count(cached) == 3 and len(cached._id_cache) == 2
    cached(request(face))
    assert calls.count(cached) == 4
    uncached(request(face))
    assert calls.count(uncached) == 2 and not uncached._id_cache


def test_warm_up_runs_the_transformer_with_and_without_the_id(pipe, face):
    fresh = PuLIDFluxPipeline.from_preset("tiny")
    calls = {"transformer": 0, "id_attention": 0}

    def count(name):
        def hook(*_):
            calls[name] += 1
        return hook

    fresh.transformer.register_forward_hook(count("transformer"))
    fresh.pulid.pulid_ca[0].register_forward_hook(count("id_attention"))
    fresh.warm_up(160, 96)
    assert calls == {"transformer": 2, "id_attention": 1}
    assert np.array_equal(pixels(fresh(request(face)))[0], pixels(pipe(request(face)))[0])  # no side effects


def test_no_face_is_refused(pipe):
    with pytest.raises(NoFaceError):
        pipe(request(Image.fromarray(skimage.data.coffee())))


def test_sizes_and_batches(pipe, face):
    result = pipe(request(face, width=120, height=72, num_images=2))  # not a multiple of 16
    assert [image.size for image in result.images] == [(120, 72), (120, 72)]
    assert result.has_nsfw_concepts == [False, False]
    assert not np.array_equal(*pixels(result))


def test_odd_reference_modes_are_accepted(pipe, face):
    rgba = face.convert("RGBA")
    gray16 = face.convert("L").convert("I;16")
    for reference in (rgba, face.convert("P"), gray16, face.convert("CMYK")):
        assert len(pipe(request(reference, num_inference_steps=1)).images) == 1


def test_generate_command_writes_the_image_and_prints_the_seed(tmp_path, face):
    reference = tmp_path / "face.png"
    face.save(reference)
    out = tmp_path / "out.png"
    done = subprocess.run(
        [sys.executable, "-m", "pulid_flux.cli", "generate", "--model", "tiny", "--prompt", "a portrait",
         "--reference", str(reference), "--width", "128", "--height", "96", "--steps", "2", "--seed", "5",
         "--out", str(out)],
        capture_output=True, text=True, timeout=240,
    )
    assert done.returncode == 0, done.stderr
    assert "seed 5" in done.stdout and "step 2/2" in done.stdout
    assert Image.open(out).size == (128, 96)
    assert_no_library_warnings(done.stderr)


def test_gpu_only_modes_and_unknown_models_are_refused_clearly():
    with pytest.raises(ValueError, match="unknown model"):
        PuLIDFluxPipeline.from_preset("flux-schnell")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        PuLIDFluxPipeline.from_preset("tiny", device="cpu", offload=True)
    with pytest.raises(ValueError, match="compute capability 8.9"):
        PuLIDFluxPipeline.from_preset("tiny", device="cpu", fp8="fast")
    with pytest.raises(ValueError, match="unknown fp8 mode"):
        PuLIDFluxPipeline.from_preset("tiny", device="cpu", fp8="yes")


def test_fp8_modes_select_torchao_configs():
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Float8WeightOnlyConfig

    from pulid_flux.engine.presets import fp8_config

    assert type(fp8_config("weights")) is Float8WeightOnlyConfig  # the official --fp8: weights only
    fast = fp8_config("fast")
    assert type(fast) is Float8DynamicActivationFloat8WeightConfig and "PerRow" in repr(fast.granularity)


def test_fp8_flags_reach_the_workers():
    import argparse

    from pulid_flux.config import Settings
    from pulid_flux.engine.options import add_engine_arguments
    from pulid_flux.server import WorkerSupervisor

    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    assert [parser.parse_args(a).fp8 for a in ([], ["--fp8"], ["--fp8-fast"])] == [None, "weights", "fast"]
    with pytest.raises(SystemExit):
        parser.parse_args(["--fp8", "--fp8-fast"])
    assert Settings(fp8="true").fp8 == "weights" and Settings(fp8="false").fp8 is None  # the old boolean
    for mode, flag in (("weights", "--fp8"), ("fast", "--fp8-fast")):
        command = WorkerSupervisor(Settings(fp8=mode), 1)._command("w")
        assert flag in command and {"--fp8", "--fp8-fast"} - {flag} & set(command) == set()


def test_weight_only_fp8_runs_on_the_cpu(pipe, face):
    fp8 = PuLIDFluxPipeline.from_preset("tiny", device="cpu", fp8="weights")
    weight = fp8.transformer.transformer_blocks[0].ff.net[2].weight
    assert type(weight).__name__ == "Float8Tensor" and weight.qdata.dtype == torch.float8_e4m3fn
    assert fp8.precision == "fp8 weights, fp32 compute" and pipe.precision == "fp32"
    assert all(type(p) is torch.nn.Parameter for p in fp8.pulid.parameters())  # PuLID stays unquantised
    a, b = pixels(pipe(request(face)))[0], pixels(fp8(request(face)))[0]
    assert a.shape == b.shape and 0 < np.abs(a.astype(int) - b).mean() < 8  # close, not identical


def test_vae_decodes_with_fp32_weights_under_autocast(face):
    bf16 = PuLIDFluxPipeline.from_preset("tiny", device="cpu", dtype=torch.bfloat16)
    vae = bf16.flux.vae
    assert bf16.transformer.dtype == torch.bfloat16 and vae.dtype == torch.float32
    dtypes = {}
    vae.decoder.conv_in.register_forward_hook(lambda m, args, out: dtypes.update(latents=args[0].dtype))
    vae.decoder.register_forward_hook(lambda m, args, out: dtypes.update(out=out.dtype))
    assert bf16(request(face)).images[0].size == (128, 96)
    # the official bf16 autocast: the scale/shift in fp32, the convolutions (and the output) in bf16;
    # CUDA's autocast also keeps GroupNorm in fp32 (CPU's policy runs it in bf16)
    assert dtypes == {"latents": torch.float32, "out": torch.bfloat16} and vae.dtype == torch.float32


def test_flux_dev_without_weights_names_the_missing_files(tmp_path):
    from pulid_flux.engine.download import MissingWeightsError

    with pytest.raises(MissingWeightsError) as error:
        PuLIDFluxPipeline.from_preset("flux-dev", device="cpu", weights_dir=str(tmp_path))
    assert "pulid_flux_v0.9.1.safetensors" in str(error.value)
    assert "pulid-flux download" in str(error.value)
