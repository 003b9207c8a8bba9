"""Every input field's bounds and types, in-process (no worker): fal's 422 shape naming the field."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from pulid_flux.api.app import create_app
from pulid_flux.config import Settings

EP = "/fal-ai/flux-pulid"


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    settings = Settings(data_dir=tmp_path_factory.mktemp("api-inputs"), local_workers=0)
    with TestClient(create_app(settings, run_loops=False)) as client:
        yield client


@pytest.fixture(scope="module")
def base(astronaut_uri):
    return {"prompt": "a portrait", "reference_image_url": astronaut_uri}


def stored(api, request_id):
    return api.app.state.services.queue.get(request_id)


BAD = [
    ({"prompt": None}, "prompt"),
    ({"prompt": 123}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": "x" * 10001}, "prompt"),
    ({"reference_image_url": None}, "reference_image_url"),
    ({"reference_image_url": 5}, "reference_image_url"),
    ({"image_size": "huge"}, "image_size"),
    ({"image_size": {"width": 128, "height": 512}}, "image_size"),
    ({"image_size": {"width": 512, "height": 4096}}, "image_size"),
    ({"image_size": {"width": "wide", "height": 512}}, "image_size"),
    ({"image_size": {"width": 512}}, "image_size"),
    ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"num_inference_steps": 51}, "num_inference_steps"),
    ({"num_inference_steps": "many"}, "num_inference_steps"),
    ({"num_inference_steps": 2.5}, "num_inference_steps"),
    ({"seed": -1}, "seed"),
    ({"seed": "lucky"}, "seed"),
    ({"seed": 2**64}, "seed"),
    ({"guidance_scale": -0.1}, "guidance_scale"),
    ({"guidance_scale": 20.5}, "guidance_scale"),
    ({"guidance_scale": "high"}, "guidance_scale"),
    ({"negative_prompt": 7}, "negative_prompt"),
    ({"sync_mode": "maybe"}, "sync_mode"),
    ({"start_step": -1}, "start_step"),
    ({"start_step": 51}, "start_step"),
    ({"true_cfg": 0.5}, "true_cfg"),
    ({"true_cfg": 10.5}, "true_cfg"),
    ({"id_weight": -0.01}, "id_weight"),
    ({"id_weight": 1.01}, "id_weight"),
    ({"enable_safety_checker": "sure"}, "enable_safety_checker"),
    ({"max_sequence_length": "1024"}, "max_sequence_length"),
    ({"max_sequence_length": 128}, "max_sequence_length"),
    ({"reference_image_urls": "not-a-list"}, "reference_image_urls"),
    ({"reference_image_urls": ["data:,x"] * 4}, "reference_image_urls"),
    ({"end_step": 0}, "end_step"),
    ({"end_step": 51}, "end_step"),
    ({"start_step": 5, "end_step": 5}, "end_step"),
    ({"num_images": 0}, "num_images"),
    ({"num_images": 5}, "num_images"),
    ({"output_format": "gif"}, "output_format"),
    ({"face_index": -1}, "face_index"),
    ({"face_index": "first"}, "face_index"),
    ({"acceleration": "max"}, "acceleration"),
    ({"acceleration": True}, "acceleration"),
]


@pytest.mark.parametrize("change,field", BAD, ids=[f"{f}={v!r}"[:60] for c, f in BAD for v in [list(c.values())[-1]]])
def test_invalid_field_gives_422_naming_it(api, base, change, field):
    body = {**base, **change}
    body = {k: v for k, v in body.items() if v is not None}
    r = api.post(EP, json=body)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, list) and detail
    assert any(d["loc"][:2] == ["body", field] for d in detail), detail
    for d in detail:
        assert set(d) >= {"loc", "msg", "type"} and isinstance(d["msg"], str)
    # The server keeps serving.
    assert api.get("/health").status_code == 200


def test_not_json_and_empty_body(api):
    r = api.post(EP, content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][0] == "body"
    r = api.post(EP, json={})
    assert r.status_code == 422
    locs = [d["loc"] for d in r.json()["detail"]]
    assert ["body", "prompt"] in locs and ["body", "reference_image_url"] in locs


def test_defaults_and_presets(api, base):
    r = api.post(EP, json=base)
    assert r.status_code == 200
    job = stored(api, r.json()["request_id"])
    inp = job.input
    assert inp["_internal"]["width"] == 1024 and inp["_internal"]["height"] == 768  # landscape_4_3
    assert inp["num_inference_steps"] == 20 and inp["guidance_scale"] == 4
    assert inp["negative_prompt"] == "" and inp["sync_mode"] is False
    assert inp["start_step"] == 0 and inp["true_cfg"] == 1 and inp["id_weight"] == 1
    assert inp["enable_safety_checker"] is True and inp["max_sequence_length"] == "128"
    assert inp["seed"] is None and inp["num_images"] == 1 and inp["output_format"] == "jpeg"
    assert inp["acceleration"] == "none"
    # A data URI is not copied into the stored input; its bytes went to storage.
    assert len(inp["reference_image_url"]) < 100
    assert len(inp["_internal"]["reference_files"]) == 1


@pytest.mark.parametrize("name,size", [("square_hd", (1024, 1024)), ("square", (512, 512)),
                                       ("portrait_4_3", (768, 1024)), ("portrait_16_9", (576, 1024)),
                                       ("landscape_4_3", (1024, 768)), ("landscape_16_9", (1024, 576))])
def test_named_sizes(api, base, name, size):
    r = api.post(EP, json={**base, "image_size": name})
    internal = stored(api, r.json()["request_id"]).input["_internal"]
    assert (internal["width"], internal["height"]) == size


def test_custom_size_rounds_to_multiple_of_16(api, base):
    r = api.post(EP, json={**base, "image_size": {"width": 300, "height": 2047}})
    internal = stored(api, r.json()["request_id"]).input["_internal"]
    assert (internal["width"], internal["height"]) == (304, 2048)


def test_bounds_are_inclusive(api, base, astronaut_uri):
    low = {**base, "num_inference_steps": 1, "guidance_scale": 0, "start_step": 0, "true_cfg": 1,
           "id_weight": 0, "seed": 0, "num_images": 1, "face_index": 0, "end_step": 1,
           "image_size": {"width": 256, "height": 256}, "max_sequence_length": "256"}
    high = {**base, "num_inference_steps": 50, "guidance_scale": 20, "start_step": 49,
            "end_step": 50, "true_cfg": 10, "id_weight": 1, "seed": 2**64 - 1, "num_images": 4,
            "image_size": {"width": 2048, "height": 2048}, "max_sequence_length": "512",
            "reference_image_urls": [astronaut_uri] * 3, "output_format": "webp",
            "negative_prompt": "blurry", "sync_mode": True, "enable_safety_checker": False}
    for body in (low, high):
        r = api.post(EP, json=body)
        assert r.status_code == 200, r.text
    inp = stored(api, r.json()["request_id"]).input
    assert len(inp["_internal"]["reference_files"]) == 4


def test_unknown_fields_are_ignored(api, base):
    assert api.post(EP, json={**base, "loras": []}).status_code == 200


@pytest.mark.parametrize("url,type_", [
    ("data:text/plain;base64,aGVsbG8=", "image_load_error"),
    ("data:image/png;base64,!!!!", "image_load_error"),
    ("http://127.0.0.1:9/face.png", "url_not_allowed"),
    ("http://169.254.169.254/latest/meta-data", "url_not_allowed"),
    ("ftp://example.com/a.png", "url_not_allowed"),
])
def test_bad_reference_urls(api, base, url, type_):
    r = api.post(EP, json={**base, "reference_image_url": url})
    assert r.status_code == 422, r.text
    d = r.json()["detail"][0]
    assert d["loc"] == ["body", "reference_image_url"] and d["type"] == type_


def test_bad_second_reference_is_named_by_index(api, base, astronaut_uri):
    r = api.post(EP, json={**base, "reference_image_urls": [astronaut_uri, "data:,nope"]})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "reference_image_urls", 1]


def test_own_file_url_is_accepted_without_network(api, base, astronaut_png):
    init = api.post("/rest/storage/upload/initiate", json={"content_type": "image/png",
                                                          "file_name": "face.png"}).json()
    assert api.put(init["upload_url"], content=astronaut_png).status_code == 200
    r = api.post(EP, json={**base, "reference_image_url": init["file_url"]})
    assert r.status_code == 200, r.text


def test_oversized_reference_image(tmp_path, base):
    settings = Settings(data_dir=tmp_path, local_workers=0, max_reference_pixels=100_000)
    with TestClient(create_app(settings, run_loops=False)) as client:
        r = client.post(EP, json=base)  # the astronaut is 512x512
        assert r.status_code == 422
        assert r.json()["detail"][0]["type"] == "image_too_large"


def test_configurable_limits(tmp_path, base):
    settings = Settings(data_dir=tmp_path, local_workers=0, max_num_images=2, min_image_size=64,
                        max_image_size=512, max_request_bytes=2 * 1024 * 1024)
    with TestClient(create_app(settings, run_loops=False)) as client:
        assert client.post(EP, json={**base, "num_images": 3}).status_code == 422
        assert client.post(EP, json={**base, "num_images": 2}).status_code == 200
        ok = client.post(EP, json={**base, "image_size": {"width": 64, "height": 64}})
        assert ok.status_code == 200
        r = client.post(EP, json={**base, "image_size": {"width": 1024, "height": 64}})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "image_size", "width"]
        r = client.post(EP, json={**base, "prompt": "x" * (3 * 1024 * 1024)})
        assert r.status_code == 413
