"""Queue routes, auth, storage, proxy, metrics and docs, in-process with the queue driven by hand."""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import pytest
from fastapi.testclient import TestClient

from pulid_flux.api.app import create_app
from pulid_flux.config import Settings
from pulid_flux.queue.base import WEBHOOK_DELIVERED
from pulid_flux.storage.base import KIND_OUTPUT, file_ref

EP = "/fal-ai/flux-pulid"


# The webhook receivers of these tests are on loopback: the operator's allow-list opens it
# (for webhooks and reference URLs alike); every other internal address stays refused.
LOOPBACK_ALLOWED = {"fetch_allowed_private_cidrs": ["127.0.0.0/8"]}


@pytest.fixture
def api(tmp_path):
    settings = Settings(data_dir=tmp_path, local_workers=0, **LOOPBACK_ALLOWED)
    with TestClient(create_app(settings, run_loops=False)) as c:
        yield c


@pytest.fixture
def body(astronaut_uri):
    return {"prompt": "a portrait", "reference_image_url": astronaut_uri}


def svc(client):
    return client.app.state.services


def finish(client, request_id, *, status_code=200, result=None, error=None, error_type=None):
    q = svc(client).queue
    job = q.claim("test-worker")
    assert job.id == request_id
    q.add_log(job.id, "step 1/1")
    q.complete(job.id, worker_id="test-worker", status_code=status_code, result=result,
               error=error, error_type=error_type, metrics={"inference_time": 0.25})


def test_submit_status_result_cycle(api, body):
    r = api.post(EP, json=body)
    assert r.status_code == 200
    sub = r.json()
    rid = sub["request_id"]
    assert r.headers["x-fal-request-id"] == rid
    assert sub["status"] == "IN_QUEUE" and sub["queue_position"] == 0
    assert sub["gateway_request_id"] == rid
    assert sub["status_url"] == f"http://testserver{EP}/requests/{rid}/status"
    assert sub["response_url"] == f"http://testserver{EP}/requests/{rid}"
    assert sub["cancel_url"] == f"http://testserver{EP}/requests/{rid}/cancel"

    for flag, has_logs in (("0", False), ("false", False), ("1", True), ("true", True)):
        st = api.get(f"{EP}/requests/{rid}/status", params={"logs": flag},
                     headers={"content-type": "application/json"})
        assert st.status_code == 202 and st.headers["content-type"] == "application/json"
        doc = st.json()
        assert doc["status"] == "IN_QUEUE" and doc["queue_position"] == 0 and "logs" in doc
        assert (doc["logs"] is not None) == has_logs
    assert api.get(f"{EP}/requests/{rid}").status_code == 400  # not done yet

    meta = svc(api).storage.put(b"\xff\xd8\xffjpeg", content_type="image/jpeg", file_name="o.jpg",
                                kind=KIND_OUTPUT)
    out = {"images": [{"url": file_ref(meta), "width": 8, "height": 8, "content_type": "image/jpeg"}],
           "timings": {"inference": 0.25}, "seed": 1, "has_nsfw_concepts": [False], "prompt": "a"}
    finish(api, rid, result=out)
    st = api.get(f"{EP}/requests/{rid}/status?logs=1")
    assert st.status_code == 200
    doc = st.json()
    assert doc["status"] == "COMPLETED" and "error" not in doc
    assert doc["metrics"] == {"inference_time": 0.25}
    assert "step 1/1" in [l["message"] for l in doc["logs"]]
    res = api.get(f"{EP}/requests/{rid}")
    assert res.status_code == 200 and res.headers["x-fal-request-id"] == rid
    url = res.json()["images"][0]["url"]
    assert url == f"http://testserver/files/{meta.id}/o.jpg"
    f = api.get(url)
    assert f.status_code == 200 and f.content == b"\xff\xd8\xffjpeg" and f.headers["content-type"] == "image/jpeg"
    assert api.put(f"{EP}/requests/{rid}/cancel").json() == {"status": "ALREADY_COMPLETED"}


def test_failed_result_carries_status_and_error_type(api, body):
    rid = api.post(EP, json=body).json()["request_id"]
    detail = [{"loc": ["body", "reference_image_url"], "msg": "No face detected", "type": "no_face"}]
    finish(api, rid, status_code=422, result={"detail": detail}, error="No face detected",
           error_type="validation_error")
    st = api.get(f"{EP}/requests/{rid}/status").json()
    assert st["status"] == "COMPLETED" and st["error"] == "No face detected"
    assert st["error_type"] == "validation_error" and st["logs"] is None
    r = api.get(f"{EP}/requests/{rid}")
    assert r.status_code == 422 and r.json() == {"detail": detail}
    assert r.headers["x-fal-error-type"] == "validation_error"


def test_cancel_queued_and_unknown(api, body):
    rid = api.post(EP, json=body).json()["request_id"]
    r = api.put(f"{EP}/requests/{rid}/cancel", headers={"content-type": "application/json"})
    assert r.status_code == 202 and r.json() == {"status": "CANCELLATION_REQUESTED"}
    st = api.get(f"{EP}/requests/{rid}/status").json()
    assert st["status"] == "COMPLETED" and st["error_type"] == "request_cancelled"
    assert api.get(f"{EP}/requests/{rid}").status_code == 400
    assert api.put(f"{EP}/requests/{rid}/cancel").status_code == 400
    assert api.put(f"{EP}/requests/nope/cancel").json() == {"status": "NOT_FOUND"}
    assert api.get(f"{EP}/requests/nope/status").status_code == 404
    assert api.get(f"{EP}/requests/nope").status_code == 404


def test_priority_header_and_webhook_validation(api, body):
    first = api.post(EP, json=body, headers={"x-fal-queue-priority": "low"}).json()
    second = api.post(EP, json=body, headers={"X-Fal-Queue-Priority": "normal"}).json()
    assert second["queue_position"] == 0
    st = api.get(f"{EP}/requests/{first['request_id']}/status").json()
    assert st["queue_position"] == 1
    r = api.post(EP, json=body, headers={"x-fal-queue-priority": "urgent"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["header", "x-fal-queue-priority"]
    r = api.post(EP, params={"fal_webhook": "not a url"}, json=body)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "fal_webhook"]
    ok = api.post(EP, params={"fal_webhook": "http://127.0.0.1:9/hook"}, json=body)
    assert svc(api).queue.get(ok.json()["request_id"]).webhook_url == "http://127.0.0.1:9/hook"
    r = api.post(EP, params={"fal_webhook": "http://10.0.0.1/hook"}, json=body)  # not allow-listed
    assert r.status_code == 422 and r.json()["detail"][0]["type"] == "url_not_allowed"


def test_status_stream_is_incremental_and_closes(api, body):
    rid = api.post(EP, json=body).json()["request_id"]
    finish(api, rid, result={"ok": 1})
    with api.stream("GET", f"{EP}/requests/{rid}/status/stream?logs=1",
                    headers={"accept": "application/json, text/event-stream"}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1]["status"] == "COMPLETED"
    messages = [l["message"] for e in events for l in e["logs"] or []]
    assert messages.count("step 1/1") == 1


def test_sync_mode_requests_are_forgotten_after_the_result(api, body):
    rid = api.post(EP, json={**body, "sync_mode": True}).json()["request_id"]
    finish(api, rid, result={"images": [{"url": "data:image/jpeg;base64,AA"}]})
    assert api.get(f"{EP}/requests/{rid}").status_code == 200
    assert api.get(f"{EP}/requests/{rid}").status_code == 404
    assert svc(api).queue.get(rid) is None

    # With a webhook still to deliver, the request stays until the delivery ended.
    q = svc(api).queue
    hooked = api.post(EP, params={"fal_webhook": "http://127.0.0.1:9/hook"},
                      json={**body, "sync_mode": True}).json()["request_id"]
    finish(api, hooked, result={"images": [{"url": "data:image/jpeg;base64,AA"}]})
    assert api.get(f"{EP}/requests/{hooked}").status_code == 200
    assert [j.id for j in q.pending_webhooks()] == [hooked]
    far_past = time.time() - 10**6
    assert q.expire(far_past) == []  # not while the webhook is pending
    q.set_webhook_state(hooked, WEBHOOK_DELIVERED)
    q.expire(far_past)  # the next sweep of the cleanup
    assert q.get(hooked) is None


def echo_worker(client) -> threading.Thread:
    """Completes the next queued request with its own stored input as the result."""
    def work():
        q = svc(client).queue
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            job = q.claim("echo-worker")
            if job is not None:
                q.complete(job.id, worker_id="echo-worker", status_code=200, result=job.input)
                return
            time.sleep(0.01)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread


def test_run_stream_keeps_alive_and_sends_the_last_logs_before_the_output(tmp_path, body):
    settings = Settings(data_dir=tmp_path, local_workers=0, sse_keepalive_s=0.1)
    with TestClient(create_app(settings, run_loops=False)) as api:
        q = svc(api).queue

        def work():
            time.sleep(0.5)  # queued and quiet for a while: keep-alive comments
            job = q.claim("w")
            q.add_log(job.id, "step 1/1")
            q.add_log(job.id, "completed in 0.01 s")  # written just before completion
            q.complete(job.id, worker_id="w", status_code=200, result={"images": []})

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        with api.stream("POST", f"/run{EP}/stream", json=body) as r:
            text = r.read().decode()
        thread.join()
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert ": keep-alive" in text
    events = [json.loads(line[len("data: "):]) for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == {"images": []}  # the output comes last
    assert {e["status"] for e in events[:-1]} <= {"IN_QUEUE", "IN_PROGRESS"}
    logs = [entry["message"] for e in events[:-1] for entry in e.get("logs") or []]
    assert logs[-2:] == ["step 1/1", "completed in 0.01 s"]


def test_run_takes_the_input_as_query_parameters(api):
    # @fal-ai/client's method "get": URLSearchParams of the input, every value a string
    from PIL import Image
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(data.astronaut()).resize((128, 128)).save(buf, "JPEG")  # URLs are short
    face = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    query = [("prompt", "a portrait"), ("reference_image_url", face), ("image_size", "square"),
             ("num_inference_steps", "4"), ("seed", "5"), ("enable_safety_checker", "false"),
             ("guidance_scale", "3.5"), ("reference_image_urls", face),
             ("reference_image_urls", face), ("max_sequence_length", "256"),
             ("negative_prompt", '["blurry"]')]
    worker = echo_worker(api)
    r = api.get(f"/run{EP}", params=query)
    worker.join()
    assert r.status_code == 200, r.text
    stored = r.json()
    assert (stored["num_inference_steps"], stored["seed"], stored["guidance_scale"]) == (4, 5, 3.5)
    assert stored["enable_safety_checker"] is False and stored["max_sequence_length"] == "256"
    assert stored["negative_prompt"] == '["blurry"]'  # text fields are never JSON-decoded
    assert (stored["_internal"]["width"], stored["_internal"]["height"]) == (512, 512)
    assert len(stored["_internal"]["reference_files"]) == 3

    # objects and lists may come as JSON
    worker = echo_worker(api)
    r = api.get(f"/run{EP}", params={"prompt": "p", "reference_image_url": face,
                                     "image_size": '{"width": 320, "height": 256}',
                                     "reference_image_urls": json.dumps([face])})
    worker.join()
    assert r.status_code == 200, r.text
    assert r.json()["image_size"] == {"width": 320, "height": 256}
    assert len(r.json()["_internal"]["reference_files"]) == 2

    # errors name the field as for a body; an object URLSearchParams flattened is one of them
    for params, field in (({"prompt": "p", "reference_image_url": face, "guidance_scale": "25"},
                           "guidance_scale"),
                          ({"prompt": "p", "reference_image_url": face,
                            "image_size": "[object Object]"}, "image_size"),
                          ({"reference_image_url": face}, "prompt")):
        r = api.get(f"/run{EP}", params=params)
        assert r.status_code == 422, r.text
        assert any(d["loc"][:2] == ["body", field] for d in r.json()["detail"]), r.json()
    assert svc(api).queue.stats()["state_IN_QUEUE"] == 0


def test_no_retry_and_store_io_headers(api, body):
    q = svc(api).queue
    for headers, cap, ephemeral in (({"x-fal-no-retry": "1"}, 1, False),
                                    ({"x-fal-no-retry": "true"}, 1, False),
                                    ({"x-fal-no-retry": "0"}, None, False),
                                    ({"x-fal-store-io": "0"}, None, True),
                                    ({"x-fal-store-io": "1"}, None, False), ({}, None, False)):
        job = q.get(api.post(EP, json=body, headers=headers).json()["request_id"])
        assert (job.max_attempts, job.ephemeral) == (cap, ephemeral), headers


def test_start_timeout_header(api, body):
    rid = api.post(EP, json=body, headers={"x-fal-request-timeout": "1"}).json()["request_id"]
    q = svc(api).queue
    q.get(rid)
    time.sleep(1.05)
    assert q.claim("w") is None
    st = api.get(f"{EP}/requests/{rid}/status").json()
    assert st["status"] == "COMPLETED" and st["error_type"] == "request_timeout"


def test_run_timeout_is_the_servers_not_the_callers(tmp_path, body):
    settings = Settings(data_dir=tmp_path, local_workers=0, run_timeout_s=0.3)
    with TestClient(create_app(settings, run_loops=False)) as api:
        r = api.post(f"/run{EP}", json=body)  # no worker: it times out
        assert r.status_code == 504 and r.json()["error_type"] == "request_timeout"
        assert r.headers["x-fal-error-type"] == "request_timeout"
        # only a timeout the caller set (X-Fal-Request-Timeout) is marked "user"
        assert "x-fal-request-timeout-type" not in r.headers
        job = svc(api).queue.get(r.headers["x-fal-request-id"])
        assert job.cancel_requested or job.state == "COMPLETED"  # it does not run later


def test_health_metrics_docs(api, body):
    h = api.get("/health").json()
    assert h["status"] == "ok" and h["endpoint"] == "fal-ai/flux-pulid" and h["ready"] is False
    from pulid_flux.queue.base import WorkerInfo

    svc(api).queue.register_worker(WorkerInfo(worker_id="w", pid=1, model="tiny",
                                              random_weights=True, precision="fp8 weights, bf16 compute",
                                              state="ready"))
    h = api.get("/health").json()
    assert h["ready"] is True and h["model"] == "tiny (random weights)" and h["random_weights"]
    assert h["workers"][0]["precision"] == "fp8 weights, bf16 compute"  # which fp8 mode is serving
    api.post(EP, json=body)
    m = api.get("/metrics")
    assert m.status_code == 200
    assert "pulid_flux_requests_submitted_total 1.0" in m.text
    assert 'pulid_flux_requests{state="IN_QUEUE"} 1.0' in m.text
    spec = api.get("/openapi.json").json()
    schema = spec["components"]["schemas"]["FluxPulidInput"]
    assert set(schema["required"]) == {"prompt", "reference_image_url"}
    assert schema["properties"]["num_inference_steps"]["maximum"] == 50
    assert schema["properties"]["max_sequence_length"]["enum"] == ["128", "256", "512"]
    assert "/run/fal-ai/flux-pulid" in spec["paths"]
    assert "swagger" in api.get("/docs").text.lower()
    jwks = api.get("/.well-known/jwks.json").json()
    assert jwks["keys"][0]["kty"] == "OKP" and jwks["keys"][0]["crv"] == "Ed25519"


# --- storage ---------------------------------------------------------------------------------

def test_unhandled_errors_give_fals_500_with_cors_headers(api, monkeypatch):
    def broken(*_):
        raise RuntimeError("database on fire")

    monkeypatch.setattr(svc(api).queue, "get", broken)
    origin = {"Origin": "https://app.example"}
    for path, headers in ((f"{EP}/requests/x/status", {}),
                          ("/api/fal/proxy", {"x-fal-target-url": f"https://queue.fal.run{EP}/requests/x"})):
        r = api.get(path, headers={**origin, **headers})
        assert r.status_code == 500
        assert r.json() == {"detail": "Internal server error", "error_type": "internal_error"}
        assert r.headers["x-fal-error-type"] == "internal_error"
        assert r.headers["access-control-allow-origin"] == "*"
    assert api.get("/health").status_code == 200


def test_storage_token_and_cdn_upload(api):
    tok = api.post("/rest/storage/auth/token?storage_type=fal-cdn-v3", json={}).json()
    assert tok["token_type"] == "Bearer" and tok["base_url"] == "http://testserver/cdn"
    assert tok["expires_at"].endswith("+00:00")
    r = api.post("/cdn/files/upload", content=b"abc",
                 headers={"Authorization": f"Bearer {tok['token']}", "content-type": "text/plain",
                          "x-fal-file-name": "a.txt"})
    url = r.json()["access_url"]
    assert url.endswith("/a.txt")
    got = api.get(url)
    assert got.content == b"abc"
    # Data, not a page: anything but the images this service handles is a download.
    assert got.headers["content-type"] == "application/octet-stream"
    assert got.headers["content-disposition"] == 'attachment; filename="a.txt"'


def test_signed_put_and_multipart(api):
    init = api.post("/rest/storage/upload/initiate?storage_type=gcs",
                    json={"content_type": "image/png", "file_name": "x.png"}).json()
    assert api.get(init["file_url"]).status_code == 404  # no bytes yet
    assert api.put(init["upload_url"].split("?")[0], content=b"1").status_code == 403
    assert api.put(init["upload_url"].replace("sig=", "sig=0"), content=b"1").status_code == 403
    assert api.put(init["upload_url"], content=b"png!").status_code == 200
    assert api.get(init["file_url"]).content == b"png!"

    init = api.post("/rest/storage/upload/initiate-multipart",
                    json={"content_type": "application/octet-stream", "file_name": "big.bin"}).json()
    path, query = init["upload_url"].split("?")
    parts = []
    for n, chunk in ((1, b"a" * 10), (2, b"b" * 5)):
        r = api.put(f"{path}/{n}?{query}", content=chunk)
        assert r.json()["partNumber"] == n and r.headers["etag"]
        parts.append({"partNumber": n, "etag": r.json()["etag"]})
    assert api.post(f"{path}/complete?{query}", json={"parts": parts}).status_code == 200
    assert api.get(init["file_url"]).content == b"a" * 10 + b"b" * 5


def test_upload_size_limit(tmp_path):
    settings = Settings(data_dir=tmp_path, local_workers=0, max_upload_bytes=1024)
    with TestClient(create_app(settings, run_loops=False)) as api:
        r = api.post("/cdn/files/upload", content=b"x" * 2048)
        assert r.status_code == 413
        assert api.post("/cdn/files/upload", content=b"x" * 1000).status_code == 200


# --- auth --------------------------------------------------------------------------------------

@pytest.fixture
def keyed(tmp_path):
    settings = Settings(data_dir=tmp_path, local_workers=0, api_keys="alpha,beta")
    with TestClient(create_app(settings, run_loops=False)) as c:
        yield c


A = {"Authorization": "Key alpha"}
B = {"Authorization": "Key beta"}


def test_every_route_but_health_needs_a_key(keyed, body):
    assert keyed.get("/health").status_code == 200
    r = keyed.post(EP, json={"not": "valid"})
    assert r.status_code == 401  # refused before validation
    assert keyed.post(EP, json=body, headers={"Authorization": "Key gamma"}).status_code == 401
    assert keyed.post(EP, json=body, headers={"Authorization": "Bearer alpha"}).status_code == 401
    for method, path in (("GET", "/metrics"), ("GET", "/openapi.json"), ("GET", "/docs"),
                         ("POST", "/rest/storage/auth/token"), ("POST", "/cdn/files/upload"),
                         ("POST", "/rest/storage/upload/initiate"), ("POST", "/run/fal-ai/flux-pulid"),
                         ("GET", f"{EP}/requests/x/status")):
        assert keyed.request(method, path).status_code == 401, path
    assert keyed.get("/metrics", headers=A).status_code == 200


def test_keys_see_only_their_requests(keyed, body):
    rid = keyed.post(EP, json=body, headers=A).json()["request_id"]
    assert keyed.get(f"{EP}/requests/{rid}/status", headers=A).status_code == 202
    for method, path in (("GET", f"{EP}/requests/{rid}/status"), ("GET", f"{EP}/requests/{rid}"),
                         ("GET", f"{EP}/requests/{rid}/status/stream"),
                         ("PUT", f"{EP}/requests/{rid}/cancel")):
        assert keyed.request(method, path, headers=B).status_code == 404, path
    assert svc(keyed).queue.get(rid).state == "IN_QUEUE"  # B's cancel did nothing


def test_file_urls_and_tokens_work_without_the_key(keyed):
    init = keyed.post("/rest/storage/upload/initiate", headers=A,
                      json={"content_type": "text/plain", "file_name": "t.txt"}).json()
    assert keyed.put(init["upload_url"], content=b"hi").status_code == 200  # signed, no key
    assert keyed.get(init["file_url"]).content == b"hi"  # unguessable URL, no key
    tok = keyed.post("/rest/storage/auth/token", headers=A, json={}).json()["token"]
    ok = keyed.post("/cdn/files/upload", content=b"z", headers={"Authorization": f"Bearer {tok}"})
    assert ok.status_code == 200
    # A CDN token is not an API key.
    assert keyed.get(f"{EP}/requests/x/status", headers={"Authorization": f"Bearer {tok}"}).status_code == 401
    jwt = keyed.post("/rest/tokens/", headers=A, json={"allowed_apps": ["flux-pulid"]}).json()
    assert isinstance(jwt, str)
    assert keyed.get(f"{EP}/requests/x/status?fal_jwt_token={jwt}").status_code == 404


# --- proxy -------------------------------------------------------------------------------------

def test_proxy_routes_on_target_url(api, body):
    r = api.post("/api/fal/proxy", json=body,
                 headers={"x-fal-target-url": "https://queue.fal.run/fal-ai/flux-pulid?fal_webhook=http%3A%2F%2F127.0.0.1%3A9%2Fh"})
    assert r.status_code == 200
    rid = r.json()["request_id"]
    assert svc(api).queue.get(rid).webhook_url == "http://127.0.0.1:9/h"
    st = api.get("/api/fal/proxy", headers={
        "x-fal-target-url": f"https://queue.fal.run/fal-ai/flux-pulid/requests/{rid}/status?logs=1"})
    assert st.status_code == 202 and st.json()["logs"] is not None
    init = api.post("/api/fal/proxy", json={"content_type": "image/png", "file_name": "a.png"}, headers={
        "x-fal-target-url": "https://rest.fal.ai/storage/upload/initiate?storage_type=fal-cdn-v3"})
    assert init.status_code == 200 and "upload_url" in init.json()
    r = api.post("/api/fal/proxy", json={}, headers={"x-fal-target-url": "https://fal.run/fal-ai/flux-pulid"})
    assert r.status_code == 422  # reached the sync route, which validated the body


# --- background loops ----------------------------------------------------------------------------

def wait_until(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


def test_results_and_files_expire(tmp_path, body):
    settings = Settings(data_dir=tmp_path, local_workers=0, result_ttl_s=0.5,
                        cleanup_interval_s=0.1, upload_ttl_s=0.5)
    with TestClient(create_app(settings)) as api:
        rid = api.post(EP, json=body).json()["request_id"]
        meta = svc(api).storage.put(b"j", content_type="image/jpeg", file_name="o.jpg",
                                    kind=KIND_OUTPUT)
        q = svc(api).queue
        job = q.claim("w")
        q.complete(job.id, worker_id="w", status_code=200, result={"url": file_ref(meta)},
                   output_files=[meta.id])
        upload = api.post("/cdn/files/upload", content=b"u").json()["access_url"]
        assert api.get(f"{EP}/requests/{rid}").status_code == 200
        assert wait_until(lambda: api.get(f"{EP}/requests/{rid}/status").status_code == 404)
        assert api.get(f"/files/{meta.id}/o.jpg").status_code == 404
        assert svc(api).storage.stat(job.input["_internal"]["reference_files"][0]) is None
        assert wait_until(lambda: api.get(upload).status_code == 404)


def test_object_lifecycle_header_shortens_the_retention(tmp_path, body):
    # @fal-ai/client's storageSettings: {expiresIn: "immediate"} sends 60 s; 0.4 s here
    settings = Settings(data_dir=tmp_path, local_workers=0, result_ttl_s=3600,
                        cleanup_interval_s=0.1)
    header = "x-fal-object-lifecycle-preference"
    with TestClient(create_app(settings)) as api:
        q = svc(api).queue
        for value, ttl in (('{"expiration_duration_seconds": 60, "initial_acl": {"default": "allow"}}', 60),
                           ('{"expiration_duration_seconds": 86400}', None),  # capped by the server
                           ('{"initial_acl": {"default": "hide"}}', None)):
            job = q.get(api.post(EP, json=body, headers={header: value}).json()["request_id"])
            assert job.ttl_s == ttl, value
            q.delete(job.id)
        for bad in ("not json", "[60]", '{"expiration_duration_seconds": -5}',
                    '{"expiration_duration_seconds": "1h"}'):
            r = api.post(EP, json=body, headers={header: bad})
            assert r.status_code == 422, bad
            assert r.json()["detail"][0]["loc"] == ["header", header]
        assert q.stats()["state_IN_QUEUE"] == 0

        short = api.post(EP, json=body, headers={header: '{"expiration_duration_seconds": 0.4}'})
        plain = api.post(EP, json=body)
        for _ in range(2):
            job = q.claim("w")
            q.complete(job.id, worker_id="w", status_code=200, result={})
        short_id, plain_id = short.json()["request_id"], plain.json()["request_id"]
        assert wait_until(lambda: api.get(f"{EP}/requests/{short_id}/status").status_code == 404)
        assert api.get(f"{EP}/requests/{plain_id}/status").status_code == 200


def test_upload_lifecycle_header_shortens_the_uploads_retention(tmp_path):
    settings = Settings(data_dir=tmp_path, local_workers=0, cleanup_interval_s=0.1)
    with TestClient(create_app(settings)) as api:
        short = api.post("/cdn/files/upload", content=b"s", headers={
            "x-fal-object-lifecycle": '{"expiration_duration_seconds": 0.3}'}).json()["access_url"]
        plain = api.post("/cdn/files/upload", content=b"p").json()["access_url"]
        initiated = api.post("/rest/storage/upload/initiate", json={"file_name": "i.png"}, headers={
            "x-fal-object-lifecycle": '{"expiration_duration_seconds": 600}'}).json()
        file_id = initiated["file_url"].split("/files/")[1].split("/")[0]
        assert 590 < svc(api).storage.stat(file_id).expires_at - time.time() <= 600
        assert wait_until(lambda: api.get(short).status_code == 404)
        assert api.get(plain).status_code == 200
        for path, payload in (("/cdn/files/upload", {"content": b"x"}),
                              ("/rest/storage/upload/initiate", {"json": {"file_name": "x"}})):
            r = api.post(path, headers={"x-fal-object-lifecycle": "soon"}, **payload)
            assert r.status_code == 422
            assert r.json()["detail"][0]["loc"] == ["header", "x-fal-object-lifecycle"]


def test_reaper_requeues_requests_of_silent_workers(tmp_path, body):
    settings = Settings(data_dir=tmp_path, local_workers=0, lease_timeout_s=0.3)
    with TestClient(create_app(settings)) as api:
        rid = api.post(EP, json=body).json()["request_id"]
        svc(api).queue.claim("vanished-worker")
        assert api.get(f"{EP}/requests/{rid}/status").json()["status"] == "IN_PROGRESS"
        assert wait_until(lambda: api.get(f"{EP}/requests/{rid}/status").json()["status"] == "IN_QUEUE")
        logs = api.get(f"{EP}/requests/{rid}/status?logs=1").json()["logs"]
        assert any("queued again" in l["message"] for l in logs)


def test_webhooks_resume_after_restart_and_are_sent_once(tmp_path, body):
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    received = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            received.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *a):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    hook = f"http://127.0.0.1:{httpd.server_address[1]}/hook"
    settings = Settings(data_dir=tmp_path, local_workers=0, webhook_poll_interval_s=0.05,
                        **LOOPBACK_ALLOWED)
    try:
        # Completed while no server ran its delivery loop (e.g. the server was down).
        with TestClient(create_app(settings, run_loops=False)) as api:
            rid = api.post(EP, params={"fal_webhook": hook}, json=body).json()["request_id"]
            meta = svc(api).storage.put(b"j", content_type="image/jpeg", file_name="o.jpg",
                                        kind=KIND_OUTPUT)
            finish(api, rid, result={"images": [{"url": file_ref(meta)}]})
        assert received == []
        with TestClient(create_app(settings)) as api:  # restart: the loop picks it up
            assert wait_until(lambda: len(received) == 1)
            assert wait_until(lambda: svc(api).queue.get(rid).webhook_state == "delivered")
        assert received[0]["request_id"] == rid and received[0]["status"] == "OK"
        # file URLs on the address the client submitted to, not the server's bind address
        assert received[0]["payload"]["images"][0]["url"] == f"http://testserver{meta.path}"
        with TestClient(create_app(settings)) as api:  # another restart: nothing is re-sent
            time.sleep(0.5)
        assert len(received) == 1
    finally:
        httpd.shutdown()


# --- per-key fairness (both queue backends) ----------------------------------------------------

from test_queue_contract import needs_redis, redis_server  # noqa: E402,F401  (fixture)


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=needs_redis)])
def fair(request, tmp_path):
    """A factory of keyed in-process APIs (keys alpha and beta) on the chosen queue backend."""
    backend = {}
    if request.param == "redis":
        import uuid

        backend = {"queue_url": request.getfixturevalue("redis_server").url,
                   "redis_key_prefix": f"fair-{uuid.uuid4().hex[:8]}:"}
    clients = []

    def make(**limits) -> TestClient:
        settings = Settings(data_dir=tmp_path, local_workers=0, api_keys="alpha,beta", **backend, **limits)
        client = TestClient(create_app(settings, run_loops=False))
        clients.append(client.__enter__())
        return client

    yield make
    for c in clients:
        c.__exit__(None, None, None)


def assert_limited(r):
    """fal's error body, 429, and a Retry-After the clients' backoff can honour."""
    assert r.status_code == 429, r.text
    assert r.json()["error_type"] == "rate_limited" and isinstance(r.json()["detail"], str)
    assert int(r.headers["retry-after"]) > 0 and r.headers["x-fal-error-type"] == "rate_limited"


def test_one_key_cannot_fill_the_queue_for_the_others(fair, body):
    api = fair(max_active_requests_per_key=2)
    first = [api.post(EP, json=body, headers=A).json()["request_id"] for _ in range(2)]
    assert_limited(api.post(EP, json=body, headers=A))
    assert_limited(api.post("/run/fal-ai/flux-pulid", json=body, headers=A))  # sync runs count too
    assert api.post(EP, json=body, headers=B).status_code == 200  # the other key is unaffected
    finish(api, first[0], result={"ok": 1})  # running still counts; completed frees the slot
    assert api.post(EP, json=body, headers=A).status_code == 200
    assert_limited(api.post(EP, json=body, headers=A))


def test_a_burst_from_one_key_is_counted_exactly(fair, body):
    from concurrent.futures import ThreadPoolExecutor

    api = fair(max_active_requests_per_key=3)
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: api.post(EP, json=body, headers=A), range(8)))
    assert sorted(r.status_code for r in responses) == [200] * 3 + [429] * 5
    owner = svc(api).queue.get(next(r for r in responses if r.status_code == 200).json()["request_id"]).owner
    assert svc(api).queue.active_count(owner) == 3


def test_request_cost_cap_is_a_422_naming_the_fields(fair, body):
    api = fair(max_request_cost=1024 * 1024 * 20)
    ok = {**body, "image_size": {"width": 1024, "height": 1024}, "num_inference_steps": 20}
    assert api.post(EP, json=ok, headers=A).status_code == 200
    for change in ({"num_images": 2}, {"true_cfg": 1.5}, {"num_inference_steps": 21}):
        r = api.post(EP, json={**ok, **change}, headers=A)
        assert r.status_code == 422, r.text
        (entry,) = r.json()["detail"]
        assert entry["loc"] == ["body", "image_size"] and entry["type"] == "request_too_costly"
        for name in ("image_size", "num_inference_steps", "num_images", "true_cfg"):
            assert name in entry["msg"]
        assert entry["ctx"]["limit"] == 1024 * 1024 * 20 and entry["ctx"]["cost"] > entry["ctx"]["limit"]


def test_stored_bytes_per_key(fair, body):
    api = fair(max_stored_bytes_per_key=5000)
    assert api.post("/cdn/files/upload", content=b"x" * 6000, headers=A).status_code == 200
    # At its limit the key stores nothing new: no upload, no initiate, no request (outputs).
    assert_limited(api.post("/cdn/files/upload", content=b"x", headers=A))
    assert_limited(api.post("/cdn/files/upload/multipart", headers=A))
    assert_limited(api.post("/rest/storage/upload/initiate", headers=A,
                            json={"content_type": "image/png", "file_name": "a.png"}))
    assert_limited(api.post(EP, json=body, headers=A))
    assert api.post("/cdn/files/upload", content=b"y" * 100, headers=B).status_code == 200
    by_owner = {}
    for meta in svc(api).storage.files():
        by_owner[meta.owner] = by_owner.get(meta.owner, 0) + meta.size
    assert sorted(by_owner.values()) == [100, 6000]
    assert {svc(api).storage.owner_bytes(o) for o in by_owner} == {100, 6000}


# --- DNS-rebinding guard (no API keys) ---------------------------------------------------------

@pytest.mark.parametrize("host,allowed", [
    ("127.0.0.1:8000", True), ("localhost:8000", True), ("LOCALHOST", True), ("[::1]:8000", True),
    ("app.localhost:8000", True), ("192.168.1.20:8000", True), ("my.box:8000", True),
    ("files.example.org", True),  # public_url's host
    ("box.lan:8000", True),  # the bind host
    ("evil.example:8000", False), ("testserver", False), ("127.0.0.1.nip.io", False),
    ("0x7f000001:8000", False), ("2130706433", False), ("[::1", False), ("127.0.0.1:80x", False),
    ("", False),
])
def test_without_keys_only_this_servers_names_are_answered(tmp_path, host, allowed):
    settings = Settings(data_dir=tmp_path, local_workers=0, allowed_hosts=["my.box"],
                        public_url="https://files.example.org", host="box.lan")
    with TestClient(create_app(settings, run_loops=False)) as api:
        for method, path in (("GET", "/health"), ("GET", f"{EP}/requests/x/status"), ("GET", "/"),
                             ("OPTIONS", EP)):
            r = api.request(method, path, headers={"host": host, "origin": "http://evil.example",
                                                   "access-control-request-method": "POST"})
            if allowed:
                assert r.status_code != 400, (host, path)
            else:
                assert r.status_code == 400 and "Host" in r.json()["detail"], (host, path)


def test_host_guard_is_off_with_keys_or_a_wildcard(tmp_path):
    for extra in ({"api_keys": "alpha"}, {"allowed_hosts": ["*"]}):
        with TestClient(create_app(Settings(data_dir=tmp_path, local_workers=0, **extra),
                                   run_loops=False)) as api:
            assert api.get("/health", headers={"host": "evil.example"}).status_code == 200


# --- status streams: per-key limit and one shared reader per request ---------------------------

class CountingQueue:
    """The real queue, counting the reads status streams make."""

    def __init__(self, inner):
        self.inner, self.gets = inner, 0

    def get(self, request_id):
        self.gets += 1
        return self.inner.get(request_id)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.fixture
def served(tmp_path):
    """A factory: the app (on a counting SQLite queue) under a real uvicorn on a loopback port,
    so that SSE streams stay open while others are tried."""
    import uvicorn

    from loopback import free_port
    from pulid_flux.api.app import build_services
    from pulid_flux.queue.sqlite import SQLiteQueue

    servers = []

    def serve(**settings_kw):
        settings = Settings(data_dir=tmp_path, local_workers=0, **settings_kw)
        queue = CountingQueue(SQLiteQueue(tmp_path / "q.sqlite3"))
        app = create_app(settings, services=build_services(settings, queue=queue), run_loops=False)
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.02)
        servers.append((server, thread))
        return f"http://127.0.0.1:{server.config.port}", app.state.services

    yield serve
    for server, thread in servers:
        server.should_exit = True
        thread.join(10)


async def _next_event(lines) -> dict:
    """The next event of an open stream; ``lines`` is its aiter_lines(), kept by the caller (an
    abandoned iterator closes the connection when it is collected)."""
    while True:
        line = await lines.__anext__()
        if line.startswith("data: "):
            return json.loads(line[6:])


def test_status_streams_per_key_are_limited_and_released(served, body):
    import asyncio

    import httpx

    url, services = served(api_keys="alpha,beta", max_status_streams_per_key=2, limit_retry_after_s=7)

    async def scenario():
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            ra = (await http.post(EP, json=body, headers=A)).json()["request_id"]
            rb = (await http.post(EP, json=body, headers=B)).json()["request_id"]
            path = f"{EP}/requests/{{}}/status/stream"
            async with http.stream("GET", path.format(ra), headers=A) as s1, \
                    http.stream("GET", path.format(ra), headers=A) as s2:
                lines = [s1.aiter_lines(), s2.aiter_lines()]
                assert [(await _next_event(x))["status"] for x in lines] == ["IN_QUEUE"] * 2
                async with http.stream("GET", path.format(ra), headers=A) as third:
                    assert third.status_code == 429 and third.headers["retry-after"] == "7"
                    assert json.loads(await third.aread())["error_type"] == "rate_limited"
                async with http.stream("GET", path.format(rb), headers=B) as other:  # other key
                    assert other.status_code == 200
                    assert (await _next_event(other.aiter_lines()))["status"] == "IN_QUEUE"
            # Both closed: their slots come back once the server notices (within about a second).
            deadline = time.monotonic() + 10
            while True:
                async with http.stream("GET", path.format(ra), headers=A) as again:
                    if again.status_code == 200:
                        break
                assert time.monotonic() < deadline
                await asyncio.sleep(0.2)

    asyncio.run(scenario())


def test_many_streams_of_one_request_share_one_reader(served, body):
    import asyncio

    import httpx

    url, services = served(status_poll_interval_s=0.05)
    n = 40

    async def scenario():
        async with httpx.AsyncClient(base_url=url, timeout=30,
                                     limits=httpx.Limits(max_connections=n + 5)) as http:
            rid = (await http.post(EP, json=body)).json()["request_id"]
            path = f"{EP}/requests/{rid}/status/stream?logs=1"

            opened = []

            async def watch():
                async with http.stream("GET", path) as s:
                    lines = s.aiter_lines()
                    events = [await _next_event(lines)]
                    opened.append(1)
                    events += [json.loads(line[6:]) async for line in lines if line.startswith("data: ")]
                return events

            watchers = [asyncio.create_task(watch()) for _ in range(n)]
            while len(opened) < n:  # every stream open and served (opening reads the request once)
                await asyncio.sleep(0.05)
            services.queue.gets = 0
            await asyncio.sleep(1.0)
            reads_per_second = services.queue.gets
            services.queue.add_log(rid, "hello")
            await asyncio.sleep(0.3)
            assert services.queue.cancel(rid) == "cancelled"
            return reads_per_second, await asyncio.gather(*watchers)

    reads, results = asyncio.run(scenario())
    # One reader: about 1 / status_poll_interval_s reads a second, not one per stream per tick.
    assert reads <= 30, reads
    for events in results:
        assert [e["status"] for e in events][-1] == "COMPLETED"
        logs = [entry["message"] for e in events for entry in e["logs"] or []]
        assert logs.count("hello") == 1  # incremental for every subscriber


def test_status_stream_reads_stay_within_their_budget(served, body):
    import asyncio

    import httpx

    url, services = served(status_poll_interval_s=0.05, status_stream_reads_per_s=10)
    n = 10

    async def scenario():
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            ids = [(await http.post(EP, json=body)).json()["request_id"] for _ in range(n)]
            opened = []

            async def watch(rid):
                async with http.stream("GET", f"{EP}/requests/{rid}/status/stream") as s:
                    lines = s.aiter_lines()
                    await _next_event(lines)
                    opened.append(rid)
                    async for _ in lines:
                        pass

            tasks = [asyncio.create_task(watch(rid)) for rid in ids]
            while len(opened) < n:
                await asyncio.sleep(0.05)
            services.queue.gets = 0
            await asyncio.sleep(2.0)
            reads = services.queue.gets
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            return reads

    # 10 watched requests at 10 reads/s: each is read once a second (not 20 times).
    assert asyncio.run(scenario()) <= 2 * 10 + 10
