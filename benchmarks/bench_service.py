"""Service benchmark (a script, not a test): what the HTTP service and its queue cost on top of
the engine, how fast status polls are answered, and whether a burst of queued requests all come
back. Starts its own ``pulid-flux serve --model tiny`` on a free loopback port and a temporary data
dir, and stops it at the end. Prints Markdown tables with the machine and settings.

  1. overhead  N requests (tiny model, 256x256, 4 steps, fixed seed, no safety checker, the
               astronaut photo as a PNG data URI): (a) a direct in-process engine call
               ``PuLIDFluxPipeline.from_preset("tiny")(GenerationRequest(...))`` and (b) the
               end-to-end ``POST /run/fal-ai/flux-pulid``, interleaved; p50/p99 of each, of
               (b) - (a), and of (b) minus the worker's own ``timings.inference``.
  2. status    K concurrent async httpx clients polling
               ``GET /fal-ai/flux-pulid/requests/{id}/status?logs=1`` for T seconds: req/s,
               p50/p99 latency, non-2xx.
  3. burst     M requests (1 step, 256x256) submitted as fast as possible to the queue API, each
               polled at 10 Hz (bounded concurrency) until COMPLETED, then its result fetched:
               total time, completed, lost, 5xx (must be 0) and other non-2xx responses.
  4. upload-rss  the API process's resident memory while it receives one U MiB upload
               (``POST /cdn/files/upload``, chunked, no Content-Length) and the same bytes as a
               multipart upload (10 MiB parts, 10 at once, as fal's Python client sends them):
               RSS before, peak growth (goal: <= 64 MiB), MiB/s. Runs without a worker.

    python benchmarks/bench_service.py [--requests 20] [--clients 50] [--seconds 10] [--burst 1000]
                                       [--upload-mib 600] [--only overhead,status,burst,upload-rss]

The client shares the machine with the server and its worker: on a small CPU box the numbers
include that contention (the load average is printed with each table).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

EP = "fal-ai/flux-pulid"


# --- helpers --------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values, p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line() -> str:
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"machine: {cpu_name()}, {os.cpu_count()} cores, no GPU in use; "
            f"load average (1/5/15 min) now: {load}")


def reference_png() -> bytes:
    from PIL import Image
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(data.astronaut()).save(buf, "PNG")
    return buf.getvalue()


def body_for(uri: str, steps: int) -> dict:
    return {"prompt": "portrait, color, cinematic", "reference_image_url": uri,
            "image_size": {"width": 256, "height": 256}, "num_inference_steps": steps,
            "seed": 42, "enable_safety_checker": False}


class Server:
    """One ``pulid-flux serve --model tiny`` subprocess on a free loopback port."""

    def __init__(self, data_dir: Path, env: dict[str, str], need_worker: bool = True):
        self.need_worker = need_worker
        self.data_dir = data_dir
        self.port = free_port()
        self.env = env
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = data_dir.parent / "server.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 300.0) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **self.env}
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pulid_flux.cli", "serve", "--model", "tiny", "--host",
             "127.0.0.1", "--port", str(self.port), "--data-dir", str(self.data_dir)],
            env=env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=5).json().get("ready") or not self.need_worker:
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready\n{self.log_tail()}")

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # serve stops its supervised worker itself
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if getattr(self, "_log", None):
            self._log.close()


# --- 1. overhead over a direct engine call --------------------------------------------------

def bench_overhead(server: Server, png: bytes, uri: str, n: int, steps: int) -> tuple[list[str], str]:
    import torch
    from PIL import Image

    from pulid_flux.engine.pipeline import PuLIDFluxPipeline
    from pulid_flux.engine.types import GenerationRequest

    pipe = PuLIDFluxPipeline.from_preset("tiny")
    reference = Image.open(io.BytesIO(png))
    reference.load()
    request = GenerationRequest(prompt="portrait, color, cinematic", reference_images=[reference],
                                width=256, height=256, num_inference_steps=steps, seed=42,
                                enable_safety_checker=False)
    body = body_for(uri, steps)
    client = httpx.Client(timeout=600)

    def direct() -> float:
        t0 = time.perf_counter()
        pipe(request)
        return time.perf_counter() - t0

    def via_http() -> tuple[float, float, str]:
        t0 = time.perf_counter()
        r = client.post(f"{server.url}/run/{EP}", json=body)
        dt = time.perf_counter() - t0
        r.raise_for_status()
        return dt, float(r.json()["timings"]["inference"]), r.headers["x-fal-request-id"]

    direct(), via_http()  # warm-up: first calls pay one-time costs on both sides
    a, b, inf, ids = [], [], [], []
    for _ in range(n):  # interleaved, so drift in the machine's load hits both alike
        a.append(direct())
        dt, inference, rid = via_http()
        b.append(dt)
        inf.append(inference)
        ids.append(rid)
    # The worker's metrics.inference_time as reported by the status route (same number as
    # timings.inference in the result): cross-check it.
    metric = [client.get(f"{server.url}/{EP}/requests/{rid}/status").json()["metrics"]
              .get("inference_time") for rid in ids]
    agree = all(m is not None and abs(m - t) < 1e-6 for m, t in zip(metric, inf))
    client.close()

    e2e_minus_inf = [x - y for x, y in zip(b, inf)]
    paired = [x - y for x, y in zip(b, a)]
    lines = [
        f"### Service overhead over a direct engine call ({n} requests, tiny model, 256x256, "
        f"{steps} steps, seed 42, safety checker off, astronaut PNG data URI; "
        f"torch threads in the client: {torch.get_num_threads()})",
        "",
        machine_line(),
        "",
        "| measurement | p50 (ms) | p99 (ms) |",
        "|---|---|---|",
        f"| (a) direct `PuLIDFluxPipeline(GenerationRequest)` | {statistics.median(a) * 1e3:.0f} "
        f"| {pct(a, 99) * 1e3:.0f} |",
        f"| (b) end-to-end `POST /run/{EP}` | {statistics.median(b) * 1e3:.0f} "
        f"| {pct(b, 99) * 1e3:.0f} |",
        f"| worker's `timings.inference` (= `metrics.inference_time`) | "
        f"{statistics.median(inf) * 1e3:.0f} | {pct(inf, 99) * 1e3:.0f} |",
        f"| **overhead (b) − (a)**, per percentile | "
        f"**{(statistics.median(b) - statistics.median(a)) * 1e3:+.0f}** | "
        f"**{(pct(b, 99) - pct(a, 99)) * 1e3:+.0f}** |",
        f"| (b) − (a), paired per request | {statistics.median(paired) * 1e3:+.0f} "
        f"| {pct(paired, 99) * 1e3:+.0f} |",
        f"| **(b) − worker inference**, per request | "
        f"**{statistics.median(e2e_minus_inf) * 1e3:.0f}** | "
        f"**{pct(e2e_minus_inf, 99) * 1e3:.0f}** |",
        "",
        f"`metrics.inference_time` from the status route equals `timings.inference`: "
        f"{'yes' if agree else 'NO'} (all {n}).",
    ]
    return lines, ids[-1]


# --- 2. status-poll throughput ----------------------------------------------------------------

async def _status_load(url: str, clients: int, seconds: float):
    lat: list[float] = []
    non2xx = errors = 0

    async def one() -> None:
        nonlocal non2xx, errors
        async with httpx.AsyncClient(timeout=30) as client:
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                try:
                    r = await client.get(url)
                except httpx.HTTPError:
                    errors += 1
                    continue
                lat.append(time.perf_counter() - t0)
                if not 200 <= r.status_code < 300:
                    non2xx += 1

    stop_at = time.perf_counter() + seconds
    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(clients)))
    return lat, time.perf_counter() - t0, non2xx, errors


def bench_status(server: Server, request_id: str, clients: int, seconds: float) -> list[str]:
    url = f"{server.url}/{EP}/requests/{request_id}/status?logs=1"
    n_logs = len(httpx.get(url, timeout=10).json().get("logs") or [])
    lat, elapsed, non2xx, errors = asyncio.run(_status_load(url, clients, seconds))
    return [
        f"### Status-poll throughput ({clients} concurrent async httpx clients, {seconds:g} s, "
        f"`GET /{EP}/requests/{{id}}/status?logs=1` of a COMPLETED request with {n_logs} log "
        f"lines; the client runs on the same cores as the server)",
        "",
        machine_line(),
        "",
        "| requests | req/s | p50 (ms) | p99 (ms) | non-2xx | transport errors |",
        "|---|---|---|---|---|---|",
        f"| {len(lat)} | {len(lat) / elapsed:.0f} | {statistics.median(lat) * 1e3:.1f} | "
        f"{pct(lat, 99) * 1e3:.1f} | {non2xx} | {errors} |",
    ]


# --- 3. burst -----------------------------------------------------------------------------------

async def _burst(base: str, uri: str, m: int, steps: int, concurrency: int, timeout: float):
    body = body_for(uri, steps)
    codes: dict[int, int] = {}
    transport_errors = 0
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    client = httpx.AsyncClient(timeout=120, limits=limits)

    async def call(method: str, url: str, **kw):
        nonlocal transport_errors
        async with sem:
            try:
                r = await client.request(method, url, **kw)
            except httpx.HTTPError:
                transport_errors += 1
                return None
        codes[r.status_code] = codes.get(r.status_code, 0) + 1
        return r

    t0 = time.perf_counter()
    deadline = t0 + timeout

    async def submit():
        while time.perf_counter() < deadline:
            r = await call("POST", f"{base}/{EP}", json=body)
            if r is not None and r.status_code == 200:
                return r.json()["request_id"]
            await asyncio.sleep(0.1)  # 429/5xx/transport error: counted; try again
        return None

    ids = await asyncio.gather(*(submit() for _ in range(m)))
    submitted_s = time.perf_counter() - t0

    async def follow(rid):
        if rid is None:
            return False
        while time.perf_counter() < deadline:
            r = await call("GET", f"{base}/{EP}/requests/{rid}/status")
            if r is not None and r.status_code in (200, 202) and r.json()["status"] == "COMPLETED":
                break
            await asyncio.sleep(0.1)  # 10 Hz per request
        else:
            return False
        r = await call("GET", f"{base}/{EP}/requests/{rid}")
        return (r is not None and r.status_code == 200
                and bool((r.json().get("images") or [{}])[0].get("url")))

    done = await asyncio.gather(*(follow(rid) for rid in ids))
    total_s = time.perf_counter() - t0
    await client.aclose()
    return {"submitted": sum(rid is not None for rid in ids), "submit_s": submitted_s,
            "total_s": total_s, "completed": sum(done), "codes": codes,
            "transport_errors": transport_errors}


def bench_burst(server: Server, uri: str, m: int, steps: int, concurrency: int,
                timeout: float, max_queue: int) -> list[str]:
    r = asyncio.run(_burst(server.url, uri, m, steps, concurrency, timeout))
    five = sum(c for s, c in r["codes"].items() if s >= 500)
    other = sum(c for s, c in r["codes"].items() if not 200 <= s < 300 and s < 500)
    codes = ", ".join(f"{s}: {c}" for s, c in sorted(r["codes"].items()))
    lost = m - r["completed"]
    return [
        f"### Burst ({m} requests, tiny model, 256x256, {steps} step, 1 local worker; submitted "
        f"with up to {concurrency} requests in flight, then each polled at 10 Hz with the same "
        f"bound until COMPLETED and its result fetched; max_queue_length {max_queue})",
        "",
        machine_line(),
        "",
        "| requests | submitted in (s) | total time (s) | completed | lost | 5xx | other non-2xx "
        "| transport errors | completed/s |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {m} | {r['submit_s']:.1f} | {r['total_s']:.1f} | {r['completed']} | {lost} | "
        f"{five} | {other} | {r['transport_errors']} | {r['completed'] / r['total_s']:.2f} |",
        "",
        f"HTTP status codes seen: {codes}",
    ]


# --- 4. API memory while receiving a large upload --------------------------------------------

def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class PeakRss:
    """Samples a process's RSS every 20 ms in a thread; ``peak`` is the highest seen."""

    def __init__(self, pid: int):
        import threading

        self.pid, self.peak, self._stop = pid, rss_mib(pid), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_mib(self.pid))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak


def bench_upload_rss(server: Server, mib: int) -> list[str]:
    import concurrent.futures

    block = os.urandom(1024 * 1024)
    pid = server.proc.pid
    rows = []

    def measure(label: str, send) -> None:
        before = rss_mib(pid)
        sampler = PeakRss(pid)
        t0 = time.perf_counter()
        status = send()
        seconds = time.perf_counter() - t0
        peak = sampler.stop()
        rows.append(f"| {label} | {mib} | {status} | {before:.0f} | {peak - before:.1f} | "
                    f"{mib / seconds:.0f} |")

    def single() -> int:
        def chunks():
            for _ in range(mib):
                yield block
        return httpx.post(f"{server.url}/cdn/files/upload", content=chunks(), timeout=600,
                          headers={"x-fal-file-name": "big.bin"}).status_code

    def multipart() -> int:
        with httpx.Client(base_url=server.url, timeout=600) as http:
            init = http.post("/cdn/files/upload/multipart", headers={"x-fal-file-name": "big.bin"}).json()
            base = f"{httpx.URL(init['access_url']).path}/multipart/{init['uploadId']}"
            part = block * 10
            numbers = range(1, (mib + 9) // 10 + 1)
            with concurrent.futures.ThreadPoolExecutor(10) as pool:
                etags = list(pool.map(lambda n: http.put(f"{base}/{n}", content=part).json()["etag"], numbers))
            return http.post(f"{base}/complete", json={"parts": [
                {"partNumber": n, "etag": e} for n, e in zip(numbers, etags)]}).status_code

    measure("single, chunked", single)
    measure("multipart, 10 MiB parts x10 at once", multipart)
    return [f"## API memory while receiving an upload\n\n{machine_line()}; local storage in a "
            "temp dir; RSS of the `pulid-flux serve` process (API), sampled every 20 ms\n",
            "| upload | MiB | status | RSS before (MiB) | peak growth (MiB) | MiB/s |",
            "|---|---:|---:|---:|---:|---:|", *rows]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=20, help="N of the overhead table")
    ap.add_argument("--steps", type=int, default=4, help="denoising steps of the overhead table")
    ap.add_argument("--clients", type=int, default=50, help="K concurrent status pollers")
    ap.add_argument("--seconds", type=float, default=10.0, help="T of the status table")
    ap.add_argument("--burst", type=int, default=1000, help="M requests of the burst table")
    ap.add_argument("--burst-steps", type=int, default=1)
    ap.add_argument("--burst-concurrency", type=int, default=64,
                    help="most HTTP requests the burst client has in flight")
    ap.add_argument("--burst-timeout", type=float, default=None,
                    help="give up after this many seconds (default: max(600, 3 s per request))")
    ap.add_argument("--upload-mib", type=int, default=600, help="U MiB of the upload-rss table")
    ap.add_argument("--only", default="overhead,status,burst,upload-rss",
                    help="comma-separated subset of overhead,status,burst,upload-rss")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (server log)")
    args = ap.parse_args()
    parts = set(args.only.split(","))

    max_queue = max(1000, args.burst + 100)
    env = {"PULID_FLUX_MAX_QUEUE_LENGTH": str(max_queue),
           "PULID_FLUX_RESULT_TTL_S": "86400", "PULID_FLUX_LOG_LEVEL": "warning"}
    tmp = Path(tempfile.mkdtemp(prefix="bench-service-"))
    engine_parts = parts & {"overhead", "status", "burst"}
    if not engine_parts:  # the upload table needs no worker
        env["PULID_FLUX_LOCAL_WORKERS"] = "0"
    env["PULID_FLUX_MAX_UPLOAD_BYTES"] = str(max(1 << 30, (args.upload_mib + 10) << 20))
    server = Server(tmp / "data", env, need_worker=bool(engine_parts))
    png = reference_png()
    uri = "data:image/png;base64," + base64.b64encode(png).decode()
    print(f"# Service benchmark\n\n`pulid-flux serve --model tiny` (1 local worker, embedded "
          f"SQLite queue, local files) on 127.0.0.1; Python {platform.python_version()}; "
          f"env {' '.join(f'{k}={v}' for k, v in env.items())}; reference PNG {len(png)} bytes "
          f"({len(uri)} chars as a data URI)\n", flush=True)
    try:
        server.start()
        status_id = None
        if "overhead" in parts:
            lines, status_id = bench_overhead(server, png, uri, args.requests, args.steps)
            print("\n".join(lines) + "\n", flush=True)
        if "status" in parts:
            if status_id is None:
                r = httpx.post(f"{server.url}/run/{EP}", json=body_for(uri, args.steps), timeout=600)
                status_id = r.headers["x-fal-request-id"]
            print("\n".join(bench_status(server, status_id, args.clients, args.seconds)) + "\n",
                  flush=True)
        if "burst" in parts:
            timeout = args.burst_timeout or max(600.0, 3.0 * args.burst)
            print("\n".join(bench_burst(server, uri, args.burst, args.burst_steps,
                                        args.burst_concurrency, timeout, max_queue)) + "\n",
                  flush=True)
        if "upload-rss" in parts:
            print("\n".join(bench_upload_rss(server, args.upload_mib)) + "\n", flush=True)
    finally:
        server.stop()
        if args.keep:
            print(f"kept {tmp}")
        else:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
