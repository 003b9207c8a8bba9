"""The unmodified `fal-client` (PyPI) against a live `pulid-flux serve` with the tiny model.

Two documented configurations: module constants over plain HTTP (in this process), and
environment variables + TLS (in a subprocess, since fal_client reads them at import time).
"""

from __future__ import annotations

import io
import json
import os
import ssl
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import fal_client
import fal_client.client as fc
import httpx
import pytest
from PIL import Image


APP = "fal-ai/flux-pulid"
SMALL = {"image_size": {"width": 256, "height": 256}, "num_inference_steps": 4}


@pytest.fixture
def client(live_server, monkeypatch):
    base = live_server.url
    for name, value in {"QUEUE_URL_FORMAT": base + "/", "RUN_URL_FORMAT": base + "/run/",
                        "REALTIME_URL_FORMAT": base.replace("http", "ws") + "/run/",
                        "REST_URL": base + "/rest", "CDN_URL": base + "/cdn"}.items():
        monkeypatch.setattr(fc, name, value)
    return fal_client.SyncClient(key="any-key")


def args(uri, **extra):
    return {"prompt": "a portrait photo", "reference_image_url": uri, **SMALL, **extra}


def check_output(out, *, prompt="a portrait photo", size=(256, 256), n=1, verify=True):
    assert out["prompt"] == prompt
    assert isinstance(out["seed"], int)
    assert out["timings"]["inference"] > 0
    assert out["has_nsfw_concepts"] == [False] * n or len(out["has_nsfw_concepts"]) == n
    assert len(out["images"]) == n
    for img in out["images"]:
        assert (img["width"], img["height"]) == size
        assert img["content_type"] == "image/jpeg"
        # File URLs work without any Authorization header.
        r = httpx.get(img["url"], verify=verify)
        assert r.status_code == 200
        assert r.headers["content-type"] == "image/jpeg"
        assert Image.open(io.BytesIO(r.content)).size == size


def wait_status(handle, kind, timeout=60.0, with_logs=False):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = handle.status(with_logs=with_logs)
        if isinstance(st, kind):
            return st
        time.sleep(0.05)
    raise TimeoutError(f"never reached {kind.__name__}: last {st!r}")


def test_subscribe_with_logs(client, astronaut_uri):
    updates = []
    out = client.subscribe(APP, arguments=args(astronaut_uri, seed=1234), with_logs=True,
                           on_queue_update=updates.append)
    check_output(out)
    assert out["seed"] == 1234
    kinds = {type(u).__name__ for u in updates}
    assert "InProgress" in kinds
    messages = [log["message"] for u in updates if getattr(u, "logs", None) for log in u.logs]
    assert "step 1/4" in messages and "step 4/4" in messages
    for u in updates:
        for log in getattr(u, "logs", None) or []:
            assert set(log) >= {"message", "level", "source", "timestamp"}


def test_submit_status_result(client, astronaut_uri, live_server):
    handle = client.submit(APP, arguments=args(astronaut_uri))
    first = handle.status()
    assert isinstance(first, (fal_client.Queued, fal_client.InProgress, fal_client.Completed))
    done = wait_status(handle, fal_client.Completed, with_logs=True)
    assert done.error is None
    assert any(log["message"] == "step 4/4" for log in done.logs)
    assert done.metrics["inference_time"] > 0
    out = handle.get()
    check_output(out)
    # Module-level calls rebuild the URLs from QUEUE_URL_FORMAT.
    assert isinstance(client.status(APP, handle.request_id), fal_client.Completed)
    assert client.result(APP, handle.request_id) == out
    r = httpx.get(f"{live_server.url}/{APP}/requests/{handle.request_id}")
    assert r.headers["x-fal-request-id"] == handle.request_id


def test_same_seed_same_image(client, astronaut_uri):
    a = client.run(APP, arguments=args(astronaut_uri, seed=7))
    b = client.run(APP, arguments=args(astronaut_uri, seed=7))
    assert a["seed"] == b["seed"] == 7
    assert httpx.get(a["images"][0]["url"]).content == httpx.get(b["images"][0]["url"]).content


def test_cancel_running_and_queued(client, astronaut_uri):
    slow = args(astronaut_uri, num_inference_steps=50)
    running = client.submit(APP, arguments=slow)
    queued = client.submit(APP, arguments=slow, priority="low")
    st = wait_status(running, fal_client.InProgress, with_logs=True)
    # The low-priority one waits behind.
    q = queued.status()
    assert isinstance(q, fal_client.Queued) and q.position >= 0

    queued.cancel()
    done = queued.status()
    assert isinstance(done, fal_client.Completed)
    assert done.error and done.error_type == "request_cancelled"
    with pytest.raises(fal_client.client.FalClientHTTPError):
        queued.get()

    # Let a few steps run, then stop it between steps.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        st = running.status(with_logs=True)
        if sum(log["message"].startswith("step ") for log in (st.logs or [])) >= 2:
            break
        time.sleep(0.05)
    running.cancel()
    done = wait_status(running, fal_client.Completed, with_logs=True)
    assert done.error_type == "request_cancelled"
    steps = [log["message"] for log in done.logs if log["message"].startswith("step ")]
    assert steps and "step 50/50" not in steps
    with pytest.raises(fal_client.client.FalClientHTTPError) as exc:
        running.get()
    assert exc.value.status_code == 400

    # Cancelling a completed request is an error for the client.
    with pytest.raises(fal_client.client.FalClientHTTPError) as exc:
        running.cancel()
    assert exc.value.status_code == 400


def test_run_and_stream(client, astronaut_uri):
    out = client.run(APP, arguments=args(astronaut_uri))
    check_output(out)
    events = list(client.stream(APP, arguments=args(astronaut_uri)))
    assert len(events) >= 2
    progress = [e for e in events[:-1]]
    assert all(e["status"] in ("IN_QUEUE", "IN_PROGRESS") for e in progress)
    assert any(log["message"].startswith("step ") for e in progress for log in e["logs"] or [])
    check_output(events[-1])


def test_upload_then_generate(client, astronaut_png, tmp_path):
    path = tmp_path / "face.png"
    path.write_bytes(astronaut_png)
    url = client.upload_file(path)  # v3 CDN path
    assert httpx.get(url).content == astronaut_png
    url2 = client.upload(astronaut_png, "image/png", repository="fal")  # initiate + signed PUT
    assert httpx.get(url2).content == astronaut_png
    out = client.subscribe(APP, arguments=args(url2))
    check_output(out)
    out = client.run(APP, arguments=args(url))
    check_output(out)


def test_multipart_upload_round_trip(client, monkeypatch):
    # The client's thresholds are module constants too; lowering them exercises multipart.
    monkeypatch.setattr(fc, "MULTIPART_THRESHOLD", 256 * 1024)
    monkeypatch.setattr(fc, "MULTIPART_CHUNK_SIZE", 100 * 1024)
    blob = os.urandom(300 * 1024 + 17)
    url = client.upload(blob, "application/octet-stream", "blob.bin")
    assert httpx.get(url).content == blob


def test_data_uri_png_output_and_sync_mode(client, astronaut_uri, live_server):
    out = client.run(APP, arguments=args(astronaut_uri, sync_mode=True, output_format="png"))
    url = out["images"][0]["url"]
    assert url.startswith("data:image/png;base64,")
    assert out["images"][0]["content_type"] == "image/png"
    # Not kept in history: the queue forgot it once the result was returned.
    handle = client.submit(APP, arguments=args(astronaut_uri, sync_mode=True))
    wait_status(handle, fal_client.Completed)
    assert handle.get()["images"][0]["url"].startswith("data:image/jpeg;base64,")
    with pytest.raises(fal_client.client.FalClientHTTPError) as exc:
        handle.get()
    assert exc.value.status_code == 404


def test_errors_are_422_naming_the_field(client, astronaut_uri, coffee_uri):
    with pytest.raises(fal_client.client.FalClientHTTPError) as exc:
        client.run(APP, arguments={"reference_image_url": astronaut_uri})
    assert exc.value.status_code == 422
    assert exc.value.message[0]["loc"] == ["body", "prompt"]

    with pytest.raises(fal_client.client.FalClientHTTPError) as exc:
        client.submit(APP, arguments=args(astronaut_uri, num_inference_steps=51))
    assert exc.value.status_code == 422
    assert exc.value.message[0]["loc"][:2] == ["body", "num_inference_steps"]

    with pytest.raises(fal_client.client.FalClientHTTPError) as exc:
        client.run(APP, arguments=args("data:text/plain;base64,aGVsbG8="))
    assert exc.value.status_code == 422
    assert exc.value.message[0]["loc"] == ["body", "reference_image_url"]

    # No face in the photo: accepted, then completed with a 422 from the model.
    handle = client.submit(APP, arguments=args(coffee_uri))
    done = wait_status(handle, fal_client.Completed)
    assert done.error and done.error_type == "validation_error"
    with pytest.raises(fal_client.client.FalClientHTTPError) as exc:
        handle.get()
    assert exc.value.status_code == 422
    assert exc.value.message[0]["loc"] == ["body", "reference_image_url"]
    assert "face" in exc.value.message[0]["msg"].lower()

    # The server keeps serving after all that.
    check_output(client.run(APP, arguments=args(astronaut_uri)))


class _Receiver(BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers["content-length"]))
        type(self).received.append((dict(self.headers), body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *a):
        pass


def test_webhooks_signed_and_delivered_once(client, astronaut_uri, coffee_uri, live_server):
    from pulid_flux.webhooks import verify_signature

    _Receiver.received = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        hook = f"http://127.0.0.1:{httpd.server_address[1]}/hook"
        ok = client.submit(APP, arguments=args(astronaut_uri), webhook_url=hook)
        bad = client.submit(APP, arguments=args(coffee_uri), webhook_url=hook)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(_Receiver.received) < 2:
            time.sleep(0.05)
        time.sleep(1.5)  # several delivery-loop periods: nothing may arrive twice
        assert len(_Receiver.received) == 2
        jwks = httpx.get(f"{live_server.url}/.well-known/jwks.json").json()
        by_id = {}
        for headers, body in _Receiver.received:
            assert verify_signature(jwks, headers, body)
            doc = json.loads(body)
            by_id[doc["request_id"]] = doc
        assert by_id[ok.request_id]["status"] == "OK"
        assert by_id[ok.request_id]["payload"]["images"][0]["url"].startswith("http")
        assert by_id[bad.request_id]["status"] == "ERROR"
        assert by_id[bad.request_id]["payload"]["detail"][0]["loc"] == ["body", "reference_image_url"]
    finally:
        httpd.shutdown()


TLS_SCRIPT = r"""
import json, sys, fal_client
app = "fal-ai/flux-pulid"
a = json.loads(sys.stdin.read())
out = {}
updates = []
out["subscribe"] = fal_client.subscribe(app, arguments=a, with_logs=True, on_queue_update=updates.append)
out["kinds"] = sorted({type(u).__name__ for u in updates})
out["run"] = fal_client.run(app, arguments=a)
out["stream_last"] = list(fal_client.stream(app, arguments=a))[-1]
h = fal_client.submit(app, arguments=a)
out["request_id"] = h.request_id
out["result"] = h.get()
try:
    fal_client.run(app, arguments={"prompt": "x"})
except fal_client.client.FalClientHTTPError as e:
    out["error"] = [e.status_code, e.message]
print(json.dumps(out))
"""


def test_env_vars_and_tls_with_auth(live_server, make_server, tls_files, astronaut_uri):
    # A second API process over the same data directory (and so the same queue and worker),
    # speaking HTTPS and requiring keys.
    tls = make_server(live_server.data_dir, scheme="https",
                      args=["--workers", "0", "--api-key", "key-a", "--api-key", "key-b",
                            "--host", "127.0.0.1", "--ssl-certfile", str(tls_files["cert"]),
                            "--ssl-keyfile", str(tls_files["key"])])
    tls.start()
    ca = ssl.create_default_context(cafile=str(tls_files["ca"]))
    tls.wait_ready(timeout=60, verify=ca)
    env = {**os.environ, "FAL_KEY": "key-a", "FAL_QUEUE_RUN_HOST": f"127.0.0.1:{tls.port}",
           "FAL_RUN_HOST": f"127.0.0.1:{tls.port}/run", "SSL_CERT_FILE": str(tls_files["ca"])}
    proc = subprocess.run([sys.executable, "-c", TLS_SCRIPT], input=json.dumps(args(astronaut_uri)),
                          env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("subscribe", "run", "stream_last", "result"):
        check_output(out[key], verify=ca)
        assert out[key]["images"][0]["url"].startswith(tls.url)
    assert "InProgress" in out["kinds"] or "Queued" in out["kinds"]
    assert out["error"][0] == 422

    # Auth: no key → 401; another key cannot see key-a's request; /health stays open.
    rid = out["request_id"]
    status_url = f"{tls.url}/{APP}/requests/{rid}/status"
    assert httpx.get(status_url, verify=ca).status_code == 401
    assert httpx.get(status_url, verify=ca, headers={"Authorization": "Key wrong"}).status_code == 401
    assert httpx.get(status_url, verify=ca, headers={"Authorization": "Key key-b"}).status_code == 404
    assert httpx.put(f"{tls.url}/{APP}/requests/{rid}/cancel", verify=ca,
                     headers={"Authorization": "Key key-b"}).status_code == 404
    assert httpx.get(status_url, verify=ca, headers={"Authorization": "Key key-a"}).status_code in (200, 202)
    assert httpx.get(f"{tls.url}/health", verify=ca).status_code == 200
    assert httpx.get(f"{tls.url}/metrics", verify=ca).status_code == 401


def test_health_metrics_and_docs_of_the_live_server(client, astronaut_uri, live_server):
    client.run(APP, arguments=args(astronaut_uri))
    h = httpx.get(f"{live_server.url}/health").json()
    assert h["ready"] and h["model"] == "tiny (random weights)" and h["random_weights"] is True
    assert h["workers"][0]["state"] in ("ready", "busy")
    m = httpx.get(f"{live_server.url}/metrics").text
    count = [l for l in m.splitlines() if l.startswith("pulid_flux_inference_seconds_count")]
    assert count and float(count[0].split()[-1]) >= 1
    spec = httpx.get(f"{live_server.url}/openapi.json").json()
    assert "reference_image_url" in spec["components"]["schemas"]["FluxPulidInput"]["properties"]
    # The API process never loads torch (only its workers do).
    with open(f"/proc/{live_server.proc.pid}/maps") as f:
        assert "libtorch" not in f.read()
