"""The worker in-process with the real tiny pipeline: outputs, errors, cancel, shutdown."""

from __future__ import annotations

import base64
import io

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from pulid_flux.api.app import create_app
from pulid_flux.config import Settings
from pulid_flux.queue.base import COMPLETED, IN_QUEUE
from pulid_flux.worker import Worker, choose_model

EP = "/fal-ai/flux-pulid"


@pytest.fixture(scope="module")
def pipe():
    from pulid_flux.engine.pipeline import PuLIDFluxPipeline

    return PuLIDFluxPipeline.from_preset("tiny", device="cpu")


@pytest.fixture
def env(tmp_path, pipe):
    settings = Settings(data_dir=tmp_path, local_workers=0, heartbeat_interval_s=0.2)
    with TestClient(create_app(settings, run_loops=False)) as api:
        svc = api.app.state.services
        worker = Worker(settings, svc.queue, svc.storage, worker_id="test-w", pipeline=pipe)
        worker._register("ready")
        yield api, svc, worker
        worker.stop.set()


def submit(api, uri, **extra):
    body = {"prompt": "a portrait", "reference_image_url": uri,
            "image_size": {"width": 256, "height": 256}, "num_inference_steps": 3, **extra}
    r = api.post(EP, json=body)
    assert r.status_code == 200, r.text
    return r.json()["request_id"]


def run_next(svc, worker):
    job = svc.queue.claim(worker.worker_id)
    assert job is not None
    worker.process(job)
    return svc.queue.get(job.id)


def test_generates_and_stores_images(env, astronaut_uri):
    api, svc, worker = env
    rid = submit(api, astronaut_uri, seed=5)
    job = run_next(svc, worker)
    assert job.state == COMPLETED and job.status_code == 200 and job.error is None
    assert job.metrics["inference_time"] > 0
    assert [l.message for l in svc.queue.logs(rid) if l.message.startswith("step ")] == \
        ["step 1/3", "step 2/3", "step 3/3"]
    out = api.get(f"{EP}/requests/{rid}").json()
    assert out["seed"] == 5 and out["prompt"] == "a portrait"
    assert out["has_nsfw_concepts"] == [False]
    img = out["images"][0]
    assert (img["width"], img["height"]) == (256, 256) and img["content_type"] == "image/jpeg"
    data = api.get(img["url"]).content
    assert Image.open(io.BytesIO(data)).format == "JPEG"
    assert len(job.output_files) == 1


def test_acceleration_reaches_the_engine_and_its_savings_the_logs(env, astronaut_uri):
    api, svc, worker = env
    plain = submit(api, astronaut_uri, seed=5, sync_mode=True)
    run_next(svc, worker)
    rid = submit(api, astronaut_uri, seed=5, sync_mode=True, acceleration="high")
    job = run_next(svc, worker)
    assert job.status_code == 200, job.result
    logged = [l.message for l in svc.queue.logs(rid) if l.message.startswith("skipped_block_fraction: ")]
    assert len(logged) == 1 and 0 < float(logged[0].split(": ")[1]) < 1
    assert not [l for l in svc.queue.logs(plain) if l.message.startswith("skipped_block_fraction")]
    assert job.result["images"][0]["url"] != svc.queue.get(plain).result["images"][0]["url"]


@pytest.mark.parametrize("fmt,pil", [("png", "PNG"), ("webp", "WEBP")])
def test_formats_counts_and_sync_mode(env, astronaut_uri, fmt, pil):
    api, svc, worker = env
    rid = submit(api, astronaut_uri, output_format=fmt, num_images=2, sync_mode=True,
                 image_size="square")
    job = run_next(svc, worker)
    assert job.status_code == 200, job.result
    images = job.result["images"]
    assert len(images) == 2 and len(job.result["has_nsfw_concepts"]) == 2
    for img in images:
        prefix = f"data:image/{fmt};base64,"
        assert img["url"].startswith(prefix)
        decoded = Image.open(io.BytesIO(base64.b64decode(img["url"][len(prefix):])))
        assert decoded.format == pil and decoded.size == (512, 512)
    assert job.output_files == []  # sync_mode stores nothing


def test_no_face_is_a_422_on_reference_image_url(env, coffee_uri):
    api, svc, worker = env
    rid = submit(api, coffee_uri)
    job = run_next(svc, worker)
    assert job.state == COMPLETED and job.status_code == 422
    detail = job.result["detail"][0]
    assert detail["loc"] == ["body", "reference_image_url"]
    assert "face" in detail["msg"].lower()
    r = api.get(f"{EP}/requests/{rid}")
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "reference_image_url"]


def test_cancel_stops_between_steps(env, astronaut_uri):
    api, svc, worker = env
    rid = submit(api, astronaut_uri, num_inference_steps=20)
    job = svc.queue.claim(worker.worker_id)
    assert svc.queue.cancel(rid) == "requested"
    worker.process(job)
    done = svc.queue.get(rid)
    assert done.state == COMPLETED and done.error_type == "request_cancelled"
    steps = [l.message for l in svc.queue.logs(rid) if l.message.startswith("step ")]
    assert steps == ["step 1/20"]


def test_model_exception_fails_the_request_not_the_worker(env, astronaut_uri, pipe):
    api, svc, worker = env

    class Exploding:
        model_name = "tiny"

        def __call__(self, request, on_step=None):
            raise RuntimeError("CUDA out of memory (simulated)")

    worker.pipe = Exploding()
    rid = submit(api, astronaut_uri)
    job = run_next(svc, worker)
    assert job.status_code == 500 and job.error_type == "internal_error"
    assert "out of memory" in job.error
    worker.pipe = pipe
    submit(api, astronaut_uri)
    assert run_next(svc, worker).status_code == 200


def test_signalled_worker_hands_the_request_back(env, astronaut_uri):
    api, svc, worker = env
    rid = submit(api, astronaut_uri, num_inference_steps=10)
    job = svc.queue.claim(worker.worker_id)
    worker.signalled = True
    worker.process(job)
    back = svc.queue.get(rid)
    assert back.state == IN_QUEUE and back.attempts == 0


def test_serve_forever_and_registration(env, astronaut_uri):
    api, svc, worker = env
    submit(api, astronaut_uri)
    worker.serve_forever(max_jobs=1)
    assert svc.queue.stats()["completed_ok"] >= 1
    assert all(w.worker_id != worker.worker_id for w in svc.queue.workers())


def test_a_failed_warm_up_does_not_stop_the_worker(tmp_path, monkeypatch, caplog):
    from pulid_flux.engine.pipeline import PuLIDFluxPipeline

    def out_of_memory(self, width, height):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(PuLIDFluxPipeline, "warm_up", out_of_memory)
    settings = Settings(data_dir=tmp_path, local_workers=0, heartbeat_interval_s=0.2)
    with TestClient(create_app(settings, run_loops=False)) as api:
        svc = api.app.state.services
        worker = Worker(settings, svc.queue, svc.storage, worker_id="oom-w")
        try:
            with caplog.at_level("ERROR", logger="pulid_flux.worker"):
                worker.load("tiny")
            assert [(w.worker_id, w.state) for w in svc.queue.workers()] == [("oom-w", "ready")]
            assert "warm-up at 1024x768 failed; serving without it" in caplog.text
        finally:
            worker.stop.set()
            worker._hb_stop.set()


def test_default_model_follows_cuda():
    import torch

    assert choose_model(None) == ("flux-dev" if torch.cuda.is_available() else "tiny")
    assert choose_model("tiny") == "tiny"


def test_worker_command_runs_a_queued_request(tmp_path, astronaut_uri):
    """`pulid-flux worker` by hand, against a data dir an API process filled."""
    import os
    import subprocess
    import sys

    settings = Settings(data_dir=tmp_path, local_workers=0)
    with TestClient(create_app(settings, run_loops=False)) as api:
        rid = submit(api, astronaut_uri, num_inference_steps=2)
        proc = subprocess.run(
            [sys.executable, "-m", "pulid_flux.cli", "worker", "--data-dir", str(tmp_path),
             "--model", "tiny", "--device", "cpu", "--max-jobs", "1", "--worker-id", "by-hand"],
            env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=240,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        st = api.get(f"{EP}/requests/{rid}/status?logs=1").json()
        assert st["status"] == "COMPLETED" and "error" not in st
        assert any("by-hand" in l["message"] for l in st["logs"])
        out = api.get(f"{EP}/requests/{rid}").json()
        assert api.get(out["images"][0]["url"]).status_code == 200
        # It warmed up at fal's default size before it was ready, said which model it ran,
        # and left the worker table when done.
        assert "warm-up at 1024x768 took" in proc.stderr
        assert proc.stderr.index("warm-up at") < proc.stderr.index("ready with model tiny")
        assert api.app.state.services.queue.workers() == []
