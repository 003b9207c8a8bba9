"""The unmodified `@fal-ai/client` 1.10.1 (npm, under node) against a live `pulid-flux serve`.

Both documented configurations: `proxyUrl: {url, when: "always"}` (routed by
`x-fal-target-url`) and a `requestMiddleware` that rewrites fal's hosts.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

JS_DIR = Path(__file__).parent / "js"

pytestmark = pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")


@pytest.fixture(scope="module")
def node_modules():
    if not (JS_DIR / "node_modules" / "@fal-ai" / "client").is_dir():
        npm = shutil.which("npm")
        if npm is None:
            pytest.skip("npm is not installed; cannot install @fal-ai/client")
        # `npm ci` installs exactly the lockfile and never rewrites it (a tracked file)
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=JS_DIR, check=True,
                       capture_output=True, timeout=300)
    return JS_DIR / "node_modules"


@pytest.fixture(scope="module")
def js_input(tmp_path_factory, astronaut_png, astronaut_uri, coffee_uri):
    path = tmp_path_factory.mktemp("js") / "input.json"
    path.write_text(json.dumps({"reference": astronaut_uri, "no_face": coffee_uri,
                                "png_base64": base64.b64encode(astronaut_png).decode()}))
    return path


def run_node(mode: str, base: str, input_path: Path) -> dict:
    proc = subprocess.run(["node", "run_client.mjs", mode, base, str(input_path)], cwd=JS_DIR,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_output(data, size=(256, 256)):
    assert data["prompt"] == "a portrait photo"
    assert isinstance(data["seed"], int)
    assert data["timings"]["inference"] > 0
    assert len(data["images"]) == 1 and len(data["has_nsfw_concepts"]) == 1
    img = data["images"][0]
    assert (img["width"], img["height"]) == size
    r = httpx.get(img["url"])
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"


@pytest.mark.parametrize("mode", ["proxy", "middleware"])
def test_js_client(mode, live_server, node_modules, js_input):
    report = run_node(mode, live_server.url, js_input)

    sub = report["subscribe_polling"]
    assert "thrown" not in sub, sub
    assert sub["statuses"][-1] == "COMPLETED" and "IN_PROGRESS" in sub["statuses"]
    assert "step 4/4" in sub["logs"]
    assert sub["requestId"]  # from the x-fal-request-id header
    assert sub["data"]["seed"] == 99
    check_output(sub["data"])

    streaming = report["subscribe_streaming"]
    assert "thrown" not in streaming, streaming
    assert streaming["statuses"][-1] == "COMPLETED"
    # Stream events carry only new logs, so the client's accumulated list has no repeats.
    assert streaming["logs"].count("step 4/4") == 1
    assert streaming["logs"].count("step 1/4") == 1
    check_output(streaming["data"])

    ssr = report["submit_status_result"]
    assert "thrown" not in ssr, ssr
    assert ssr["submitted"]["status"] == "IN_QUEUE"
    assert ssr["submitted"]["queue_position"] >= 0
    assert ssr["first"] in ("IN_QUEUE", "IN_PROGRESS", "COMPLETED")
    assert ssr["last"] == "COMPLETED"
    all_logs = [m for e in ssr["events"] for m in e["logs"]]
    assert all_logs.count("step 4/4") == 1
    assert ssr["requestId"] == ssr["submitted"]["request_id"]
    check_output(ssr["data"])

    from pulid_flux.queue.sqlite import SQLiteQueue

    lifecycle = report["storage_settings"]
    assert "thrown" not in lifecycle, lifecycle
    assert SQLiteQueue(live_server.data_dir / "queue.sqlite3").get(lifecycle["requestId"]).ttl_s == 60

    cancel = report["cancel_running"]
    assert cancel["status"] == "COMPLETED"
    assert cancel["error_type"] == "request_cancelled"
    assert "step 50/50" not in cancel["logs"]

    assert report["run"]["requestId"]
    check_output(report["run"]["data"])

    stream = report["stream"]
    assert stream["count"] >= 2
    assert stream["first"]["status"] in ("IN_QUEUE", "IN_PROGRESS")
    check_output(stream["last"])

    upload = report["upload"]
    assert "thrown" not in upload, upload
    assert upload["same"] is True
    assert upload["url"].startswith(live_server.url + "/files/")
    check_output(upload["data"])
    check_output(report["auto_blob_upload"]["data"])

    from pulid_flux.storage.local import LocalStorage

    upload_lifecycle = report["upload_lifecycle"]
    assert "thrown" not in upload_lifecycle, upload_lifecycle
    file_id = upload_lifecycle["url"].split("/files/")[1].split("/")[0]
    stored = LocalStorage(live_server.data_dir / "files").stat(file_id)
    assert 3590 < stored.expires_at - stored.created_at <= 3600  # "1h", sooner than upload_ttl_s

    run_get = report["run_get"]
    assert "thrown" not in run_get, run_get
    assert run_get["requestId"] and run_get["data"]["seed"] == 7
    check_output(run_get["data"], size=(512, 512))

    invalid = report["invalid_input"]
    assert invalid["thrown"] == "ValidationError" and invalid["status"] == 422
    assert invalid["fieldErrors"][0]["loc"] == ["body", "guidance_scale"]

    no_face = report["no_face"]
    assert no_face["thrown"] == "ValidationError" and no_face["status"] == 422
    assert no_face["fieldErrors"][0]["loc"] == ["body", "reference_image_url"]


def test_proxy_cors_preflight(live_server):
    r = httpx.options(f"{live_server.url}/api/fal/proxy", headers={
        "Origin": "http://example.test", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type,x-fal-target-url"})
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] in ("*", "http://example.test")
    r = httpx.get(f"{live_server.url}/api/fal/proxy", headers={
        "Origin": "http://example.test",
        "x-fal-target-url": "https://queue.fal.run/fal-ai/flux-pulid/requests/nope/status"})
    assert r.status_code == 404
    assert "x-fal-request-id" in r.headers.get("access-control-expose-headers", "").lower()
    # Only fal's hosts (and this server) are proxy targets.
    r = httpx.get(f"{live_server.url}/api/fal/proxy",
                  headers={"x-fal-target-url": "https://evil.example/anything"})
    assert r.status_code == 403
    assert httpx.get(f"{live_server.url}/api/fal/proxy").status_code == 400
