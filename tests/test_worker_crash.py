"""kill -9 of the worker and of the server mid-generation: every request still completes."""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest

EP = "fal-ai/flux-pulid"


def body(uri, steps, size=256):
    return {"prompt": "a portrait", "reference_image_url": uri, "num_inference_steps": steps,
            "image_size": {"width": size, "height": size}}


def status(base, rid):
    return httpx.get(f"{base}/{EP}/requests/{rid}/status", params={"logs": 1}, timeout=10).json()


def wait_for(base, rid, pred, timeout):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = status(base, rid)
            if pred(last):
                return last
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"condition not met for {rid}: {last}")


def steps_done(st):
    return sum(l["message"].startswith("step ") for l in st["logs"] or [])


def assert_generated(base, rid):
    st = status(base, rid)
    assert st["status"] == "COMPLETED" and "error" not in st, st
    out = httpx.get(f"{base}/{EP}/requests/{rid}", timeout=10)
    assert out.status_code == 200, out.text
    url = out.json()["images"][0]["url"]
    assert httpx.get(url, timeout=10).status_code == 200
    return st


@pytest.mark.timeout(400)
def test_kill_worker_then_server_mid_generation(live_server, astronaut_uri):
    # Runs on the shared live server (one worker load less); it leaves it restarted and ready.
    server = live_server
    server.wait_ready(timeout=120)
    base = server.url

    # 1. kill -9 the worker mid-generation: the supervisor re-queues the request at once
    #    and restarts the worker, which runs it again.
    rid = httpx.post(f"{base}/{EP}", json=body(astronaut_uri, 50)).json()["request_id"]
    wait_for(base, rid, lambda s: steps_done(s) >= 3, 120)
    (pid,) = server.child_worker_pids()
    os.kill(pid, signal.SIGKILL)
    st = wait_for(base, rid, lambda s: s["status"] == "COMPLETED", 240)
    assert_generated(base, rid)
    messages = [l["message"] for l in st["logs"]]
    assert any("the worker process died; queued again" in m for m in messages)
    assert "step 50/50" in messages
    assert sum("generation started" in m for m in messages) == 2
    server.wait_ready(timeout=120)

    # 2. kill -9 the server mid-generation, with one more request waiting. The orphaned
    #    worker keeps its lease, finishes its request and leaves; the restarted server runs
    #    the other one. Nothing runs twice, nothing is lost.
    # This one outlasts the 4 s lease: the orphan must keep renewing it.
    running = httpx.post(f"{base}/{EP}", json=body(astronaut_uri, 50, 512)).json()["request_id"]
    waiting = httpx.post(f"{base}/{EP}", json=body(astronaut_uri, 4)).json()["request_id"]
    wait_for(base, running, lambda s: steps_done(s) >= 3, 120)
    (old_worker,) = server.child_worker_pids()
    server.kill()
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{base}/health", timeout=2)

    server.start()  # same data dir, same port
    st = wait_for(base, running, lambda s: s["status"] == "COMPLETED", 240)
    wait_for(base, waiting, lambda s: s["status"] == "COMPLETED", 240)
    assert_generated(base, running)
    assert_generated(base, waiting)
    messages = [l["message"] for l in st["logs"]]
    assert sum("generation started" in m for m in messages) == 1, messages
    # The old worker did not outlive its server for long.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and alive(old_worker):
        time.sleep(0.2)
    assert not alive(old_worker)
    server.wait_ready(timeout=120)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except OSError:
        return False
