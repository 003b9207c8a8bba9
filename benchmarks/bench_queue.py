"""Queue benchmark: what Redis adds over the embedded SQLite queue, and throughput with 1 and 2
workers.

Part 1 (queue only, in process): latency of the queue calls on a request's path (submit, claim,
log, complete, status read) for SQLite and Redis; p50/p99 per call and per request.
Part 2 (real processes): one API replica and N tiny-model workers on the CPU, against the
embedded backends (``serve --workers N``) and against Redis + S3 (moto server); requests/s.

    python benchmarks/bench_queue.py [--requests 16] [--steps 4] [--cycles 500] [--workers 1 2]

Needs ``redis-server`` on PATH and ``moto[server]`` installed. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

EP = "fal-ai/flux-pulid"
S3_ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
          "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def start_redis(directory: Path) -> tuple[subprocess.Popen, str]:
    import redis

    port = free_port()
    proc = subprocess.Popen([shutil.which("redis-server"), "--port", str(port), "--bind",
                             "127.0.0.1", "--dir", str(directory), "--save", "",
                             "--appendonly", "yes", "--appendfsync", "everysec"],
                            stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    for _ in range(200):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    return proc, f"redis://127.0.0.1:{port}/0"


# --- part 1 ---------------------------------------------------------------------------------

def bench_queue_ops(queue, cycles: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in
                                     ("submit", "claim", "add_log", "get", "complete", "request")}
    payload = {"prompt": "a portrait", "num_inference_steps": 4, "_internal": {"width": 256}}
    for _ in range(cycles):
        t0 = time.perf_counter()
        job = queue.submit(EP, payload, max_queue_length=1000)
        t1 = time.perf_counter()
        got = queue.claim("bench-worker", EP)
        t2 = time.perf_counter()
        queue.add_log(got.id, "step 1/4")
        t3 = time.perf_counter()
        queue.get(job.id)
        t4 = time.perf_counter()
        queue.complete(got.id, worker_id="bench-worker", status_code=200, result={"images": []},
                       metrics={"inference_time": 0.1}, output_files=[])
        t5 = time.perf_counter()
        for name, dt in (("submit", t1 - t0), ("claim", t2 - t1), ("add_log", t3 - t2),
                         ("get", t4 - t3), ("complete", t5 - t4)):
            times[name].append(dt * 1000)
        # What the queue adds to one request: submit + claim + complete.
        times["request"].append((t1 - t0 + t2 - t1 + t5 - t4) * 1000)
    return times


def part1(cycles: int, tmp: Path, redis_url: str) -> list[str]:
    from pulid_flux.queue.redis import RedisQueue
    from pulid_flux.queue.sqlite import SQLiteQueue

    results = {
        "sqlite": bench_queue_ops(SQLiteQueue(tmp / "bench.sqlite3"), cycles),
        "redis": bench_queue_ops(RedisQueue(redis_url, prefix=f"bench-{uuid.uuid4().hex[:6]}:"),
                                 cycles),
    }
    lines = ["| call | SQLite p50 / p99 (ms) | Redis p50 / p99 (ms) | p99 added by Redis (ms) |",
             "|---|---|---|---|"]
    for name in ("submit", "claim", "add_log", "get", "complete", "request"):
        s, r = results["sqlite"][name], results["redis"][name]
        lines.append(f"| {name} | {statistics.median(s):.2f} / {pct(s, 99):.2f} | "
                     f"{statistics.median(r):.2f} / {pct(r, 99):.2f} | "
                     f"{pct(r, 99) - pct(s, 99):+.2f} |")
    return lines


# --- part 2 ---------------------------------------------------------------------------------

def reference_uri() -> str:
    from PIL import Image
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(data.astronaut()).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def run_cluster(kind: str, workers: int, n_requests: int, steps: int, tmp: Path,
                redis_url: str | None, s3_endpoint: str | None, bucket: str | None) -> float:
    env = {**os.environ, **S3_ENV, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "PULID_FLUX_REDIS_KEY_PREFIX": f"bench-{uuid.uuid4().hex[:6]}:",
           # One compute thread per worker, as one GPU per worker: N workers use N cores.
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    port = free_port()
    data_dir = tmp / f"{kind}-{workers}"
    cmd = [sys.executable, "-m", "pulid_flux.cli", "serve", "--port", str(port), "--data-dir",
           str(data_dir), "--model", "tiny"]
    procs = []
    logs = open(tmp / f"{kind}-{workers}.log", "ab")
    if kind == "embedded":
        cmd += ["--workers", str(workers)]
    else:
        urls = ["--queue-url", redis_url, "--storage-url", f"s3://{bucket}/{kind}-{workers}"]
        env["PULID_FLUX_S3_ENDPOINT_URL"] = s3_endpoint
        cmd += [*urls, "--no-worker"]
        for i in range(workers):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "pulid_flux.cli", "worker", "--data-dir",
                 str(tmp / f"w{i}"), *urls, "--model", "tiny"], env=env, stdout=logs,
                stderr=subprocess.STDOUT))
    procs.insert(0, subprocess.Popen(cmd, env=env, stdout=logs, stderr=subprocess.STDOUT))
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                h = httpx.get(f"{base}/health", timeout=5).json()
                if sum(w["state"] == "ready" for w in h["workers"]) >= workers:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        else:
            raise TimeoutError(f"{kind}: workers not ready")
        uri = reference_uri()
        body = {"prompt": "a portrait", "reference_image_url": uri, "num_inference_steps": steps,
                "image_size": {"width": 256, "height": 256}}
        client = httpx.Client(timeout=60)
        # Warm-up: the first request of each worker pays one-time costs.
        warm = [client.post(f"{base}/{EP}", json=body).json()["request_id"] for _ in range(workers)]
        wait_done(client, base, warm)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            ids = list(pool.map(lambda _: client.post(f"{base}/{EP}", json=body).json()["request_id"],
                                range(n_requests)))
        wait_done(client, base, ids)
        return n_requests / (time.perf_counter() - t0)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        logs.close()


def wait_done(client, base, ids) -> None:
    pending = set(ids)
    deadline = time.monotonic() + 600
    while pending and time.monotonic() < deadline:
        for rid in list(pending):
            st = client.get(f"{base}/{EP}/requests/{rid}/status").json()
            if st["status"] == "COMPLETED":
                if st.get("error"):
                    raise RuntimeError(f"{rid}: {st['error']}")
                pending.discard(rid)
        time.sleep(0.05)
    if pending:
        raise TimeoutError(f"{len(pending)} requests not done")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=500, help="queue-only request cycles")
    ap.add_argument("--requests", type=int, default=16, help="requests per throughput run")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--skip-throughput", action="store_true")
    args = ap.parse_args()
    os.environ.update({k: os.environ.get(k, v) for k, v in S3_ENV.items()})

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        (tmp / "redis").mkdir()
        redis_proc, redis_url = start_redis(tmp / "redis")
        try:
            print(f"## Queue calls ({args.cycles} request cycles, one client)\n")
            print("\n".join(part1(args.cycles, tmp, redis_url)))
            if args.skip_throughput:
                return 0
            import logging

            import boto3
            from moto.server import ThreadedMotoServer

            logging.getLogger("werkzeug").setLevel(logging.WARNING)
            s3_port = free_port()
            moto = ThreadedMotoServer(ip_address="127.0.0.1", port=s3_port, verbose=False)
            moto.start()
            endpoint = f"http://127.0.0.1:{s3_port}"
            boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(
                Bucket="bench")
            print(f"\n## Throughput (tiny model, {args.steps} steps, 256x256, "
                  f"{args.requests} requests)\n")
            print("| workers | embedded (SQLite + files) req/s | Redis + S3 (moto) req/s |")
            print("|---|---|---|")
            for n in args.workers:
                emb = run_cluster("embedded", n, args.requests, args.steps, tmp, None, None, None)
                dist = run_cluster("redis", n, args.requests, args.steps, tmp, redis_url,
                                   endpoint, "bench")
                print(f"| {n} | {emb:.2f} | {dist:.2f} |", flush=True)
            moto.stop()
        finally:
            redis_proc.terminate()
            redis_proc.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
