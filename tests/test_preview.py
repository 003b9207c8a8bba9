"""The latent -> RGB preview: the fixed FLUX map, sizes, the data URI, and torch input."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from pulid_flux.engine import preview
from pulid_flux.engine.preview import (
    FLUX_LATENT_RGB_BIAS,
    FLUX_LATENT_RGB_FACTORS,
    latents_to_rgb,
    preview_data_uri,
    preview_image,
)


def test_factors_are_a_16_to_3_map():
    assert FLUX_LATENT_RGB_FACTORS.shape == (16, 3)
    assert FLUX_LATENT_RGB_BIAS.shape == (3,)


def test_zero_latents_give_the_bias_colour():
    rgb = latents_to_rgb(np.zeros((16, 4, 6), np.float32))
    assert rgb.shape == (4, 6, 3) and rgb.dtype == np.uint8
    expected = np.round((FLUX_LATENT_RGB_BIAS + 1) / 2 * 255)
    assert np.array_equal(rgb[0, 0], expected.astype(np.uint8))
    assert (rgb == rgb[0, 0]).all()


def test_each_channel_is_mapped_linearly():
    # A latent with only channel 4 set moves each colour by that channel's row of factors.
    lat = np.zeros((16, 2, 2), np.float32)
    lat[4] = 3.0
    rgb = latents_to_rgb(lat).astype(float)
    expected = ((3.0 * FLUX_LATENT_RGB_FACTORS[4] + FLUX_LATENT_RGB_BIAS) + 1) / 2 * 255
    assert np.allclose(rgb[1, 1], expected, atol=0.51)
    # Large values saturate instead of wrapping around.
    lat[4] = 1e6
    assert set(np.unique(latents_to_rgb(lat))) <= {0, 255}


def test_first_image_of_a_batch_and_bad_shapes():
    batch = np.zeros((2, 16, 3, 3), np.float32)
    batch[1] = 50.0
    assert np.array_equal(latents_to_rgb(batch), latents_to_rgb(batch[0]))
    with pytest.raises(ValueError, match="16"):
        latents_to_rgb(np.zeros((4, 8, 8), np.float32))


def test_preview_size_follows_the_output_and_is_capped():
    lat = np.random.default_rng(0).standard_normal((16, 128, 96)).astype(np.float32)
    assert preview_image(lat).size == (192, 256)  # 96x128 cells -> 768x1024 px, capped at 256
    img = preview_image(lat, width=768, height=1024, max_side=256)
    assert img.size == (192, 256)
    small = preview_image(np.zeros((16, 8, 8), np.float32), width=64, height=64)
    assert small.size == (64, 64)  # never upscaled past the output size


def test_padding_of_the_latent_grid_is_cropped():
    # 200 px is padded to a 208 px (26-cell) latent grid; the preview keeps the 25 real cells.
    lat = np.zeros((16, 26, 26), np.float32)
    lat[:, 25, :] = 100.0  # only the padding row is bright
    img = np.asarray(preview_image(lat, width=200, height=200, max_side=200))
    assert img.shape == (200, 200, 3)
    assert np.abs(img[-1].astype(int) - img[0]).max() <= 1  # last row looks like the first


def test_data_uri_is_a_small_jpeg():
    lat = np.random.default_rng(1).standard_normal((16, 128, 128)).astype(np.float32)
    uri = preview_data_uri(lat, width=1024, height=1024)
    assert uri.startswith("data:image/jpeg;base64,")
    data = base64.b64decode(uri.split(",", 1)[1])
    assert len(data) < 40_000
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "JPEG" and im.size == (256, 256)


def test_torch_latents_are_accepted():
    torch = pytest.importorskip("torch")
    lat = torch.randn(1, 16, 8, 8, dtype=torch.bfloat16)
    expected = latents_to_rgb(lat.float().numpy())
    assert np.array_equal(latents_to_rgb(lat), expected)


def test_module_does_not_import_torch():
    # The API process imports this module's constants; it must not pull torch in.
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(preview))
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                for a in getattr(n, "names", [])}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert "torch" not in imported


# --- the pipeline's latents callback and the worker's opt-in previews ----------------------

EP = "/fal-ai/flux-pulid"


@pytest.fixture(scope="module")
def pipe():
    from pulid_flux.engine.pipeline import PuLIDFluxPipeline

    return PuLIDFluxPipeline.from_preset("tiny", device="cpu")


def test_pipeline_passes_unpacked_latents_and_keeps_on_step(pipe):
    from skimage import data

    from pulid_flux.engine.types import GenerationRequest

    face = Image.fromarray(data.astronaut())
    steps, seen = [], []
    request = GenerationRequest(prompt="a portrait", reference_images=[face], width=128, height=96,
                                num_inference_steps=3, seed=1)
    result = pipe(request, on_step=lambda k, n: steps.append((k, n)),
                  on_latents=lambda k, n, lat: seen.append((k, n, tuple(lat.shape))))
    assert steps == [(1, 3), (2, 3), (3, 3)]
    assert seen == [(1, 3, (1, 16, 12, 16)), (2, 3, (1, 16, 12, 16)), (3, 3, (1, 16, 12, 16))]
    # Observing the latents changes nothing: same seed, same bytes as without the callback.
    plain = pipe(request, on_step=lambda k, n: None)
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(plain.images[0]))


@pytest.fixture
def env(tmp_path, pipe):
    from fastapi.testclient import TestClient

    from pulid_flux.api.app import create_app
    from pulid_flux.config import Settings
    from pulid_flux.worker import Worker

    settings = Settings(data_dir=tmp_path, local_workers=0, heartbeat_interval_s=0.2)
    with TestClient(create_app(settings, run_loops=False)) as api:
        svc = api.app.state.services
        worker = Worker(settings, svc.queue, svc.storage, worker_id="preview-w", pipeline=pipe)
        yield api, svc, worker
        worker.stop.set()


def _run(api, svc, worker, uri, **extra) -> str:
    body = {"prompt": "a portrait", "reference_image_url": uri,
            "image_size": {"width": 320, "height": 256}, "num_inference_steps": 5, **extra}
    r = api.post(EP, json=body)
    assert r.status_code == 200, r.text
    job = svc.queue.claim(worker.worker_id)
    worker.process(job)
    assert svc.queue.get(job.id).status_code == 200
    return job.id


def _stream_events(api, rid, logs="1") -> list[dict]:
    import json

    with api.stream("GET", f"{EP}/requests/{rid}/status/stream?logs={logs}") as r:
        text = "".join(r.iter_text())
    return [json.loads(line[5:]) for line in text.splitlines() if line.startswith("data:")]


def test_opted_in_requests_stream_previews_and_keep_logs_clean(env, astronaut_uri):
    api, svc, worker = env
    rid = _run(api, svc, worker, astronaut_uri, enable_previews=True, preview_interval=2)
    records = [r.message for r in svc.queue.logs(rid) if r.message.startswith(preview.PREVIEW_LOG_PREFIX)]
    assert len(records) == 2  # after steps 2 and 4; step 5 is the result itself
    events = _stream_events(api, rid)
    with_preview = [e for e in events if e.get("preview")]
    assert with_preview and with_preview[-1]["preview"] == records[-1][len(preview.PREVIEW_LOG_PREFIX):]
    data = base64.b64decode(with_preview[-1]["preview"].split(",", 1)[1])
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "JPEG" and im.size == (256, 205)
    for e in events:
        assert all(not entry["message"].startswith(preview.PREVIEW_LOG_PREFIX) for entry in e["logs"])
    assert any(entry["message"] == "step 5/5" for e in events for entry in e["logs"])
    # Polling clients see the plain logs; stream clients without logs still get the preview.
    status = api.get(f"{EP}/requests/{rid}/status?logs=1").json()
    assert "preview" not in status
    assert status["logs"] and all(preview.PREVIEW_LOG_PREFIX not in e["message"] for e in status["logs"])
    assert any(e.get("preview") and e["logs"] is None for e in _stream_events(api, rid, logs="0"))


def test_requests_without_opt_in_get_no_previews(env, astronaut_uri):
    api, svc, worker = env
    rid = _run(api, svc, worker, astronaut_uri)
    assert not any(r.message.startswith(preview.PREVIEW_LOG_PREFIX) for r in svc.queue.logs(rid))
    assert all("preview" not in e for e in _stream_events(api, rid))


def test_preview_interval_is_validated(env, astronaut_uri):
    api, _, _ = env
    r = api.post(EP, json={"prompt": "p", "reference_image_url": astronaut_uri, "preview_interval": 0})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "preview_interval"]
