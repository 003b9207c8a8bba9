"""Queue faults, on a live `pulid-flux serve` with each backend (embedded SQLite, Redis with AOF):

* the queue unavailable mid-generation (Redis stopped for longer than its retry window; SQLite
  locked): /health answers at once and says so, API calls get a fast 503 naming the queue, the
  worker keeps its result and writes it when the queue is back;
* cancel then kill -9 of the worker: the request completes as cancelled, it does not run again;
* a `/run/.../stream` client that goes away cancels its request;
* SIGTERM drains: the running request finishes (or, past the drain timeout, is handed back).

Each checks that every accepted request completes exactly once with the right result or error,
and that a worker is alive and serving afterwards.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest

from conftest import LiveServer
from test_queue_contract import REDIS_BIN, RedisServer

# Starts live servers: main's slow tier (`-m "not e2e"` skips it).
pytestmark = pytest.mark.e2e

EP = "fal-ai/flux-pulid"

ENV = {
    "PULID_FLUX_STEP_DELAY_S": "0.2",
    "PULID_FLUX_HEARTBEAT_INTERVAL_S": "0.25",
    "PULID_FLUX_LEASE_TIMEOUT_S": "4",
    "PULID_FLUX_WORKER_DRAIN_TIMEOUT_S": "6",
    "PULID_FLUX_REDIS_RETRY_S": "1",
    "PULID_FLUX_REDIS_PROBE_INTERVAL_S": "0.5",
    "PULID_FLUX_WORKER_RESTART_BACKOFF_MAX_S": "2",
    "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
}


class Service:
    """`serve --model tiny` (one supervised worker) on one queue backend."""

    def __init__(self, backend: str, tmp: Path):
        self.backend = backend
        self.redis = None
        args = ["--model", "tiny"]
        env = dict(ENV)
        if backend == "redis":
            self.redis = RedisServer(tmp / "redis", aof=True).start()
            args += ["--queue-url", self.redis.url]
            env["PULID_FLUX_REDIS_KEY_PREFIX"] = f"faults-{uuid.uuid4().hex[:6]}:"
        self.server = LiveServer(tmp / "data", args=args, env=env).start()
        self.base = self.server.url

    def worker_pids(self) -> list[int]:
        """Live worker processes this server started (whatever the backend)."""
        out = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
                cmdline = (stat.parent / "cmdline").read_bytes()
            except OSError:
                continue
            if int(fields[1]) == self.server.proc.pid and fields[0] != "Z" and b"worker" in cmdline:
                out.append(int(stat.parent.name))
        return out

    def worker(self, timeout: float = 240) -> int:
        """The pid of the one worker, once it is ready."""
        self.server.wait_ready(timeout=timeout)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            pids = self.worker_pids()
            if len(pids) == 1:
                return pids[0]
            time.sleep(0.1)
        raise AssertionError(f"workers: {self.worker_pids()}")

    def stop(self) -> None:
        pids = self.worker_pids()
        proc = self.server.proc
        proc.terminate()
        try:
            proc.wait(60)  # it waits for a draining worker
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        self.server._log.close()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.redis:
            self.redis.stop()


@pytest.fixture(scope="module", params=["sqlite", pytest.param("redis", marks=pytest.mark.skipif(
    REDIS_BIN is None, reason="redis-server is not installed"))])
def service(request, tmp_path_factory):
    svc = Service(request.param, tmp_path_factory.mktemp(f"faults-{request.param}"))
    try:
        svc.worker()
        yield svc
    finally:
        svc.stop()


def body(uri, steps):
    return {"prompt": "a portrait", "reference_image_url": uri, "num_inference_steps": steps,
            "image_size": {"width": 256, "height": 256}, "seed": 3}


def submit(svc, uri, steps) -> str:
    r = httpx.post(f"{svc.base}/{EP}", json=body(uri, steps), timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["request_id"]


def status(svc, rid) -> dict:
    r = httpx.get(f"{svc.base}/{EP}/requests/{rid}/status", params={"logs": 1}, timeout=30)
    assert r.status_code in (200, 202), r.text
    return r.json()


def messages(st) -> list[str]:
    return [l["message"] for l in st["logs"] or []]


def wait_for(svc, rid, pred, timeout=180) -> dict:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = status(svc, rid)
        if pred(last):
            return last
        time.sleep(0.1)
    raise TimeoutError(f"{rid}: {last}\n{svc.server.log_tail()}")


def running_step(n):
    return lambda st: sum(m.startswith("step ") for m in messages(st)) >= n


def completed(st):
    return st["status"] == "COMPLETED"


def count(st, prefix) -> int:
    return sum(m.startswith(prefix) for m in messages(st))


def assert_generated_once(svc, rid, runs=1) -> dict:
    st = wait_for(svc, rid, completed)
    assert "error" not in st, st
    assert count(st, "completed in") == 1, messages(st)
    assert count(st, "generation started") == runs, messages(st)
    out = httpx.get(f"{svc.base}/{EP}/requests/{rid}", timeout=30)
    assert out.status_code == 200, out.text
    assert httpx.get(out.json()["images"][0]["url"], timeout=30).status_code == 200
    return st


def assert_cancelled(svc, rid) -> dict:
    st = wait_for(svc, rid, completed, 60)
    assert st["error_type"] == "request_cancelled", st
    assert count(st, "completed in") == 0, messages(st)
    r = httpx.get(f"{svc.base}/{EP}/requests/{rid}", timeout=30)
    assert r.status_code == 400 and r.json()["error_type"] == "request_cancelled"
    return st


def assert_healthy(svc) -> None:
    health = svc.server.wait_ready(timeout=240)
    assert health["status"] == "ok" and health["faults"] == [], health
    svc.worker()


# --- queue unavailable mid-generation ---------------------------------------------------------

@pytest.mark.timeout(400)
def test_queue_unavailable_mid_generation(service, astronaut_uri):
    svc = service
    pid = svc.worker()
    rid = submit(svc, astronaut_uri, 6)
    wait_for(svc, rid, running_step(2))
    if svc.backend == "sqlite":
        # SQLite has no outage of its own short of a disk fault: another process holding the
        # write lock for a while. Reads (health, status) go on; writes wait; nothing is lost.
        lock = sqlite3.connect(svc.server.data_dir / "queue.sqlite3", isolation_level=None)
        lock.execute("BEGIN EXCLUSIVE")
        started = time.monotonic()
        health = httpx.get(f"{svc.base}/health", timeout=10).json()
        assert time.monotonic() - started < 1.5 and health["status"] == "ok", health
        time.sleep(2)
        lock.execute("ROLLBACK")
        lock.close()
        assert_generated_once(svc, rid)
        assert_healthy(svc)
        assert svc.worker_pids() == [pid]
        return

    svc.redis.stop()
    try:
        outage_started = time.monotonic()
        # The first calls may only see the queue not answering in time (a call still retries
        # through redis_retry_s); once that runs out every answer names Redis.
        for _ in range(10):
            started = time.monotonic()
            health = httpx.get(f"{svc.base}/health", timeout=10)
            assert time.monotonic() - started < 1.5  # 1 s, and room for a loaded machine
            assert health.status_code == 200
            health = health.json()
            assert health["status"] == "degraded", health
            assert [f["component"] for f in health["faults"]] == ["queue"], health
            reason = health["faults"][0]["reason"]
            if "Redis at" in reason:
                break
            time.sleep(0.3)
        assert f"Redis at 127.0.0.1:{svc.redis.port} is unreachable" in reason, reason
        # API calls: a fast 503 that names the queue, not a 30 s hang and a generic 500.
        for call in (lambda: httpx.get(f"{svc.base}/{EP}/requests/{rid}/status", timeout=10),
                     lambda: httpx.post(f"{svc.base}/{EP}", json=body(astronaut_uri, 2),
                                        timeout=10),
                     lambda: httpx.put(f"{svc.base}/{EP}/requests/{rid}/cancel", timeout=10)):
            started = time.monotonic()
            r = call()
            assert time.monotonic() - started < 3, r.text
            assert r.status_code == 503, r.text
            assert r.json()["component"] == "queue" and "queue" in r.json()["detail"]
            assert r.headers["x-fal-error-type"] == "service_unavailable"
            assert int(r.headers["retry-after"]) >= 1
        # Longer than the lease and the retry window: the generation (6 steps) ends meanwhile.
        time.sleep(max(0.0, 8 - (time.monotonic() - outage_started)))
    finally:
        svc.redis = RedisServer(svc.redis.dir, aof=True, port=svc.redis.port).start()

    # Back without a restart: /health within a probe interval or two, then the held result is
    # written once, by the same worker.
    restarted = time.monotonic()
    while httpx.get(f"{svc.base}/health", timeout=10).json()["status"] != "ok":
        assert time.monotonic() - restarted < 5
        time.sleep(0.1)
    assert_generated_once(svc, rid)
    assert "queue unavailable" in svc.server.log_path.read_text() and \
        "retrying in" in svc.server.log_path.read_text()  # it held its result
    assert_healthy(svc)
    assert svc.worker_pids() == [pid]
    assert_generated_once(svc, submit(svc, astronaut_uri, 2))


# --- cancel, then kill -9 -------------------------------------------------------------------

@pytest.mark.timeout(400)
def test_cancel_then_kill_9_completes_as_cancelled(service, astronaut_uri):
    svc = service
    pid = svc.worker()
    rid = submit(svc, astronaut_uri, 50)
    wait_for(svc, rid, running_step(2))
    os.kill(pid, signal.SIGSTOP)  # so it dies before it sees the cancel itself
    r = httpx.put(f"{svc.base}/{EP}/requests/{rid}/cancel", timeout=30)
    assert r.status_code == 202 and r.json()["status"] == "CANCELLATION_REQUESTED"
    os.kill(pid, signal.SIGKILL)

    st = assert_cancelled(svc, rid)
    assert "the worker process died; cancelled as requested" in messages(st)
    assert count(st, "generation started") == 1  # not run again
    assert_healthy(svc)
    assert pid not in svc.worker_pids()
    assert_generated_once(svc, submit(svc, astronaut_uri, 2))


# --- /run/.../stream client goes away ----------------------------------------------------------

@pytest.mark.timeout(300)
def test_run_stream_cancels_when_the_client_goes_away(service, astronaut_uri):
    svc = service
    svc.worker()
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", f"{svc.base}/run/{EP}/stream",
                           json=body(astronaut_uri, 50)) as r:
            assert r.status_code == 200
            rid = r.headers["x-fal-request-id"]
            for line in r.iter_lines():
                if line.startswith("data:") and '"step 2/50"' in line:
                    break
        # leaving the block closes the connection mid-stream

    st = assert_cancelled(svc, rid)
    assert count(st, "generation started") == 1
    assert not any(m == "step 50/50" for m in messages(st))
    assert_healthy(svc)
    assert_generated_once(svc, submit(svc, astronaut_uri, 2))


# --- SIGTERM drains ------------------------------------------------------------------------------

@pytest.mark.timeout(500)
def test_sigterm_finishes_the_running_request_then_hands_back_after_the_drain(service, astronaut_uri):
    svc = service
    # Within the drain timeout (6 s): finished by the signalled worker, which then exits.
    pid = svc.worker()
    rid = submit(svc, astronaut_uri, 4)
    wait_for(svc, rid, running_step(1))
    os.kill(pid, signal.SIGTERM)
    st = assert_generated_once(svc, rid)
    assert "step 4/4" in messages(st)
    assert_healthy(svc)
    assert pid not in svc.worker_pids()

    # Longer than the drain timeout (50 steps of at least 0.2 s): handed back, run again by the
    # restarted worker.
    pid = svc.worker()
    rid = submit(svc, astronaut_uri, 50)
    wait_for(svc, rid, running_step(2))
    os.kill(pid, signal.SIGTERM)
    st = assert_generated_once(svc, rid, runs=2)
    assert "worker shut down; queued again" in messages(st)
    assert_healthy(svc)
    assert pid not in svc.worker_pids()
