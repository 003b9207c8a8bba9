"""Scale-out: two API replicas and two workers (separate processes) sharing one Redis queue
(AOF on) and one S3 bucket (moto server mode).

* 20 requests spread over both replicas; one worker is killed with SIGKILL mid-generation:
  every request completes exactly once, its images in the bucket, webhooks delivered once.
* Redis is killed and restarted (AOF, appendfsync always) with work in flight: nothing is lost.
* A cancel sent to one replica stops a request running in a worker process.
* The real ``fal_client`` (module constants pointed at a replica): upload, submit, status, result.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from test_queue_contract import REDIS_BIN, RedisServer, free_port
from test_storage_contract import S3_ENV, MotoS3

pytestmark = pytest.mark.skipif(REDIS_BIN is None, reason="redis-server is not installed "
                                "(apt-get install redis-server)")

EP = "fal-ai/flux-pulid"
STEPS = 4


class Proc:
    def __init__(self, name: str, cmd: list[str], env: dict, log_dir: Path):
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.alive():
            self.proc.send_signal(sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


class Cluster:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.redis = RedisServer(tmp / "redis", aof=True).start()
        for k, v in S3_ENV.items():
            os.environ.setdefault(k, v)
        self.s3 = MotoS3().start()
        self.bucket = self.s3.make_bucket()
        self.prefix = f"scale-{uuid.uuid4().hex[:6]}:"
        self.env = {
            **os.environ, **S3_ENV, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
            "PULID_FLUX_S3_ENDPOINT_URL": self.s3.endpoint, "PULID_FLUX_S3_REGION": "us-east-1",
            "PULID_FLUX_REDIS_KEY_PREFIX": self.prefix,
            "PULID_FLUX_STEP_DELAY_S": "0.1",
            "PULID_FLUX_HEARTBEAT_INTERVAL_S": "0.25",
            "PULID_FLUX_LEASE_TIMEOUT_S": "3",
            "PULID_FLUX_REDIS_VISIBILITY_TIMEOUT_S": "3",
            "PULID_FLUX_REDIS_RETRY_S": "60",
            "PULID_FLUX_WEBHOOK_POLL_INTERVAL_S": "0.2",
            "PULID_FLUX_FETCH_ALLOWED_PRIVATE_CIDRS": "127.0.0.0/8",  # the webhook receiver
            "PULID_FLUX_WORKER_WARMUP": "0",
            # Replicas with data dirs of their own share their keys (upload URL signatures,
            # webhook signing) through these two settings, as docs/deployment.md says.
            "PULID_FLUX_SECRET_KEY_FILE": str(tmp / "keys" / "secret.key"),
            "PULID_FLUX_WEBHOOK_KEY_FILE": str(tmp / "keys" / "webhook_ed25519.pem"),
            # One thread per worker: two workers on two cores, no oversubscription stalls.
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
        }
        self.urls = ["--queue-url", self.redis.url, "--storage-url", f"s3://{self.bucket}/pf"]
        self.apis: list[tuple[Proc, str]] = []
        self.workers: list[Proc] = []
        for i in range(2):
            port = free_port()
            cmd = [sys.executable, "-m", "pulid_flux.cli", "serve", "--port", str(port),
                   "--data-dir", str(tmp / f"api-data-{i}"), *self.urls, "--no-worker"]
            self.apis.append((Proc(f"api{i}", cmd, self.env, tmp), f"http://127.0.0.1:{port}"))
        for _ in range(2):
            self.add_worker()

    def add_worker(self) -> Proc:
        cmd = [sys.executable, "-m", "pulid_flux.cli", "worker", "--data-dir",
               str(self.tmp / f"worker-data-{len(self.workers)}"), *self.urls, "--model", "tiny"]
        w = Proc(f"worker{len(self.workers)}", cmd, self.env, self.tmp)
        self.workers.append(w)
        return w

    def base(self, i: int) -> str:
        return self.apis[i % len(self.apis)][1]

    def health(self, i: int = 0) -> dict:
        return httpx.get(f"{self.base(i)}/health", timeout=10).json()

    def wait_workers(self, n: int, timeout: float = 180) -> dict:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            for p, _ in self.apis:
                assert p.alive(), p.tail()
            try:
                last = self.health(0)
                ready = [w for w in last["workers"] if w["state"] in ("ready", "busy")]
                if len(ready) >= n:
                    return last
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{n} workers not ready: {last}\n" +
                           "\n".join(w.tail() for w in self.workers))

    def stop(self) -> None:
        for w in self.workers:
            w.stop(signal.SIGKILL)
        for p, _ in self.apis:
            p.stop()
        self.redis.stop()
        self.s3.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("scale"))
    try:
        c.wait_workers(2)
        yield c
    finally:
        c.stop()


def body(uri, steps=STEPS):
    return {"prompt": "a portrait", "reference_image_url": uri, "num_inference_steps": steps,
            "image_size": {"width": 256, "height": 256}, "seed": 1}


def status(base, rid, logs=True):
    return httpx.get(f"{base}/{EP}/requests/{rid}/status", params={"logs": int(logs)},
                     timeout=30).json()


def wait_all_completed(cluster, ids, timeout):
    deadline = time.monotonic() + timeout
    pending = set(ids)
    out = {}
    while pending and time.monotonic() < deadline:
        for i, rid in enumerate(sorted(pending)):
            try:
                st = status(cluster.base(i), rid)
            except httpx.HTTPError:
                continue
            if st["status"] == "COMPLETED":
                out[rid] = st
                pending.discard(rid)
        time.sleep(0.25)
    assert not pending, f"not completed: {pending}\n" + "\n".join(w.tail() for w in cluster.workers)
    return out


class Hooks(BaseHTTPRequestHandler):
    received: list[str] = []

    def do_POST(self):
        data = json.loads(self.rfile.read(int(self.headers["content-length"])))
        Hooks.received.append(data["request_id"])
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.timeout(240)
def test_twenty_requests_survive_a_sigkilled_worker_exactly_once(cluster, astronaut_uri):
    hooks = ThreadingHTTPServer(("127.0.0.1", 0), Hooks)
    threading.Thread(target=hooks.serve_forever, daemon=True).start()
    hook_url = f"http://127.0.0.1:{hooks.server_address[1]}/hook"
    ids = []
    for i in range(20):
        params = {"fal_webhook": hook_url} if i % 2 == 0 else None
        r = httpx.post(f"{cluster.base(i)}/{EP}", json=body(astronaut_uri), params=params, timeout=60)
        assert r.status_code == 200, r.text
        ids.append(r.json()["request_id"])

    # Find a request mid-generation and SIGKILL the worker process running it.
    import redis

    rc = redis.Redis.from_url(cluster.redis.url, decode_responses=True)
    victim_job = victim_pid = None
    deadline = time.monotonic() + 120
    while victim_job is None and time.monotonic() < deadline:
        for rid in ids:
            st = status(cluster.base(0), rid)
            steps = [l for l in st["logs"] or [] if l["message"].startswith("step ")]
            if st["status"] == "IN_PROGRESS" and steps and len(steps) < STEPS - 1:
                holder = rc.hget(f"{cluster.prefix}job:{rid}", "worker_id")
                record = rc.hget(f"{cluster.prefix}workers", holder)
                if record:
                    victim_job, victim_pid = rid, json.loads(record)["pid"]
                    break
        time.sleep(0.05)
    assert victim_job, "no request was seen mid-generation"
    os.kill(victim_pid, signal.SIGKILL)

    done = wait_all_completed(cluster, ids, timeout=180)
    for rid, st in done.items():
        assert "error" not in st, st
        completions = [l for l in st["logs"] if l["message"].startswith("completed in")]
        assert len(completions) == 1, st["logs"]  # ran to completion exactly once
    victim = done[victim_job]
    assert any("stopped responding" in l["message"] for l in victim["logs"]), victim["logs"]
    assert sum(l["message"].startswith("generation started") for l in victim["logs"]) == 2

    # Every result's image is a presigned bucket URL that serves a JPEG.
    keys = [o["Key"] for o in cluster.s3.client().list_objects_v2(
        Bucket=cluster.bucket, Prefix="pf/")["Contents"]]
    outputs = [k for k in keys if k.endswith(".jpg")]
    assert len(outputs) == 20  # one image per request, no orphan from the killed attempt
    for i, rid in enumerate(ids):
        r = httpx.get(f"{cluster.base(i + 1)}/{EP}/requests/{rid}", timeout=30)
        assert r.status_code == 200, r.text
        url = r.json()["images"][0]["url"]
        assert url.startswith(f"{cluster.s3.endpoint}/{cluster.bucket}/pf/") and "X-Amz-Signature" in url
        img = httpx.get(url, timeout=30)
        assert img.status_code == 200 and img.content[:2] == b"\xff\xd8"

    # Webhooks: each completion delivered once, although both replicas run delivery loops.
    deadline = time.monotonic() + 30
    while len(Hooks.received) < 10 and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)  # room for a duplicate to show up
    assert sorted(Hooks.received) == sorted(ids[::2])
    hooks.shutdown()

    health = cluster.health(1)
    assert health["queue"]["in_queue"] == 0 and health["queue"]["in_progress"] == 0
    metrics = httpx.get(f"{cluster.base(1)}/metrics", timeout=10).text
    assert 'pulid_flux_requests_completed_total{outcome="ok"} 20.0' in metrics
    requeued = re.search(r"^pulid_flux_requests_requeued_total (\S+)$", metrics, re.M)
    assert requeued and float(requeued.group(1)) >= 1
    assert "pulid_flux_workers_alive 1.0" in metrics
    cluster.add_worker()
    cluster.wait_workers(2)


@pytest.mark.timeout(180)
def test_redis_restart_with_aof_loses_nothing(cluster, astronaut_uri):
    ids = []
    for i in range(6):
        r = httpx.post(f"{cluster.base(i)}/{EP}", json=body(astronaut_uri), timeout=60)
        assert r.status_code == 200, r.text
        ids.append(r.json()["request_id"])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if any(status(cluster.base(0), rid, logs=False)["status"] == "IN_PROGRESS" for rid in ids):
            break
        time.sleep(0.05)
    cluster.redis.kill()  # SIGKILL with work queued and running
    time.sleep(1.0)
    cluster.redis = RedisServer(cluster.redis.dir, aof=True, port=cluster.redis.port).start()

    done = wait_all_completed(cluster, ids, timeout=150)
    assert all("error" not in st for st in done.values()), done
    for p, _ in cluster.apis:
        assert p.alive(), p.tail()
    assert sum(w.alive() for w in cluster.workers) == 2, [w.tail() for w in cluster.workers]
    # Results from before the restart are still there.
    metrics = httpx.get(f"{cluster.base(0)}/metrics", timeout=10).text
    assert 'pulid_flux_requests_completed_total{outcome="ok"} 26.0' in metrics


@pytest.mark.timeout(120)
def test_cancel_reaches_a_worker_in_another_process(cluster, astronaut_uri):
    r = httpx.post(f"{cluster.base(0)}/{EP}", json=body(astronaut_uri, steps=40), timeout=60)
    rid = r.json()["request_id"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        st = status(cluster.base(1), rid)
        if any(l["message"].startswith("step ") for l in st["logs"] or []):
            break
        time.sleep(0.05)
    cancel = httpx.put(f"{cluster.base(1)}/{EP}/requests/{rid}/cancel", timeout=30)
    assert cancel.status_code == 202, cancel.text
    t0 = time.monotonic()
    while time.monotonic() - t0 < 30:
        st = status(cluster.base(0), rid)
        if st["status"] == "COMPLETED":
            break
        time.sleep(0.05)
    assert st["status"] == "COMPLETED" and st["error_type"] == "request_cancelled", st
    steps = [l for l in st["logs"] if l["message"].startswith("step ")]
    assert len(steps) < 40  # the worker stopped between steps
    assert any(l["message"] == "cancelled" for l in st["logs"])  # said by the worker itself


@pytest.mark.timeout(120)
def test_fal_client_flow_against_a_replica(cluster, astronaut_png):
    import fal_client
    import fal_client.client as fc

    base = cluster.base(1)
    saved = {k: getattr(fc, k) for k in ("QUEUE_URL_FORMAT", "RUN_URL_FORMAT", "REST_URL", "CDN_URL")}
    fc.QUEUE_URL_FORMAT, fc.RUN_URL_FORMAT = f"{base}/", f"{base}/run/"
    fc.REST_URL, fc.CDN_URL = f"{base}/rest", f"{base}/cdn"
    try:
        client = fal_client.SyncClient(key="any")
        url = client.upload(astronaut_png, "image/png", file_name="face.png")
        assert url.startswith(f"{cluster.s3.endpoint}/{cluster.bucket}/pf/")
        assert httpx.get(url, timeout=30).content == astronaut_png
        handle = client.submit(EP, arguments=body(url))
        seen = set()
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            st = handle.status(with_logs=True)
            seen.add(type(st).__name__)
            if isinstance(st, fal_client.Completed):
                break
            time.sleep(0.1)
        assert "Completed" in seen
        result = handle.get()
        image = result["images"][0]
        assert (image["width"], image["height"]) == (256, 256)
        assert httpx.get(image["url"], timeout=30).content[:2] == b"\xff\xd8"
    finally:
        for k, v in saved.items():
            setattr(fc, k, v)


@pytest.mark.timeout(60)
def test_uploads_through_one_replica_are_readable_through_the_other(cluster):
    """fal's storage protocol on replica A, the bytes in the bucket, the URLs valid on replica B."""
    a, b = cluster.base(0), cluster.base(1)
    # JS / Python-fallback flow: initiate, then PUT to the signed URL (signed by A, sent to B:
    # replicas share their signing secret).
    init = httpx.post(f"{a}/rest/storage/upload/initiate", json={"file_name": "x.bin"}, timeout=30)
    upload_url, file_url = init.json()["upload_url"], init.json()["file_url"]
    put = httpx.put(upload_url.replace(a, b), content=b"single", timeout=30)
    assert put.status_code == 200, put.text
    assert httpx.get(file_url, timeout=30).content == b"single"  # presigned bucket URL
    # Python v3 multipart: parts go under the access URL, which stays on the API.
    start = httpx.post(f"{a}/cdn/files/upload/multipart", headers={"x-fal-file-name": "m.bin"},
                       timeout=30).json()
    access, upload_id = start["access_url"], start["uploadId"]
    assert access.startswith(a)
    chunks = [os.urandom(3000), os.urandom(1000)]
    parts = []
    for n, chunk in enumerate(chunks, start=1):
        r = httpx.put(f"{access.replace(a, b)}/multipart/{upload_id}/{n}", content=chunk, timeout=30)
        assert r.status_code == 200, r.text
        parts.append({"partNumber": n, "etag": r.headers["etag"]})
    done = httpx.post(f"{access}/multipart/{upload_id}/complete", json={"parts": parts}, timeout=30)
    assert done.status_code == 200, done.text
    # The API URL redirects to the bucket, whichever replica is asked.
    got = httpx.get(access.replace(a, b), follow_redirects=True, timeout=30)
    assert got.status_code == 200 and got.content == b"".join(chunks)
    assert str(got.url).startswith(f"{cluster.s3.endpoint}/{cluster.bucket}/pf/")
