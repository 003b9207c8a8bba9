"""``pulid-flux worker``: the process that owns the model and runs queued requests.

Kept apart from the HTTP server (as replicate's cog does) so that an exception, an OOM or a
hard crash in generation never takes the API down: the server only sees the queue. The worker
renews a lease on what it runs; if it dies, the server (or any worker) re-queues the request,
once, and completes it with an error after ``max_attempts``.
"""

from __future__ import annotations

import argparse
import base64
import io
import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from typing import Any, Optional

from .engine.options import MODEL_CHOICES, add_engine_arguments


log = logging.getLogger("pulid_flux.worker")

RANDOM_WEIGHTS_BANNER = (
    "\n" + "!" * 78 + "\n"
    "!!  model %r has RANDOM WEIGHTS: it only shows that the service works.\n"
    "!!  Its images are noise. Serve the real FLUX.1-dev + PuLID on a CUDA GPU with --model flux-dev.\n"
    + "!" * 78
)

CONTENT_TYPES = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
PIL_FORMATS = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}


def _clip(text: str, limit: int = 4000) -> str:
    """Long messages keep their start and their end (where the loader puts the fix)."""
    if len(text) <= limit:
        return text
    return text[: limit // 2] + "\n…\n" + text[-limit // 2:]


class Cancelled(Exception):
    pass


class ShuttingDown(Exception):
    pass


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", help="shared data directory (queue + files); env PULID_FLUX_DATA_DIR")
    parser.add_argument("--model", choices=MODEL_CHOICES,
                        help="default: flux-dev with a CUDA GPU, tiny otherwise")
    add_engine_arguments(parser)
    parser.add_argument("--queue-url", help="redis://HOST:PORT/DB, rediss://…, sqlite:///path "
                        "(default: embedded SQLite in the data dir)")
    parser.add_argument("--storage-url", help="s3://BUCKET/PREFIX or file:///dir "
                        "(default: files in the data dir)")
    parser.add_argument("--worker-id", help="stable id (default: random)")
    parser.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)  # set by `serve`
    parser.add_argument("--max-jobs", type=int, default=0, help="exit after this many requests (0: never)")


def settings_from_args(args: argparse.Namespace):
    from .config import Settings

    overrides: dict[str, Any] = {}
    for name in ("data_dir", "model", "device", "weights_dir", "offload", "fp8", "compile",
                 "queue_url", "storage_url"):
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    return Settings(**overrides)


def apply_cpu_thread_settings(settings) -> None:
    """The worker's OpenMP wait policy and thread count. libgomp reads them once, when torch loads
    it, so this runs before anything imports torch (nothing has, in a worker started by the CLI)."""
    threads = str(settings.worker_threads) if settings.worker_threads else None
    if "torch" in sys.modules:  # an in-process worker (tests): only the thread count can still change
        import torch

        if threads:
            torch.set_num_threads(settings.worker_threads)
        log.warning("torch was loaded before the worker started: OMP_WAIT_POLICY=%s not applied",
                    settings.worker_omp_wait_policy)
        return
    os.environ["OMP_WAIT_POLICY"] = settings.worker_omp_wait_policy.upper()
    if threads:
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = threads


def choose_model(requested: Optional[str]) -> str:
    if requested:
        return requested
    import torch

    return "flux-dev" if torch.cuda.is_available() else "tiny"


class Worker:
    def __init__(self, settings, queue, storage, *, worker_id: Optional[str] = None,
                 parent_pid: Optional[int] = None, pipeline=None, model_name: Optional[str] = None):
        from .fetch import FetchPolicy

        self.settings = settings
        self.queue = queue
        self.storage = storage
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.parent_pid = parent_pid
        self.pipe = pipeline
        self.model_name = model_name or ""
        self.stop = threading.Event()
        # Set by SIGTERM: the running request may finish until then, and is handed back after
        # it. A worker whose parent died finishes its request without a deadline.
        self.drain_deadline: Optional[float] = None
        self._queue_fault: Optional[str] = None  # why the queue is unavailable, while it is
        self._hb_stop = threading.Event()
        self.policy = FetchPolicy(max_bytes=settings.max_reference_bytes,
                                  max_pixels=settings.max_reference_pixels,
                                  min_side=settings.min_reference_side)
        self._hb_thread: Optional[threading.Thread] = None
        self.jobs_done = 0
        self.load_error = ""  # why the model does not load, while it does not
        self._fault_delay = 0.0  # wait before the next claim after a fault of ours

    def _next_fault_delay(self) -> float:
        return min(max(1.0, self._fault_delay * 2), self.settings.fault_retry_max_s)

    def _pause_after_fault(self) -> None:
        """Backs off (1 s doubling to fault_retry_max_s) after a fault of ours, so a full disk
        is retried calmly until it clears; reset by the next request that gets through."""
        self._fault_delay = self._next_fault_delay()
        self.stop.wait(self._fault_delay)

    # --- lifecycle --------------------------------------------------------------------------
    def drain(self) -> None:
        """SIGTERM: take nothing new; finish the running request within worker_drain_timeout_s,
        then hand it back. A second signal hands it back at once."""
        now = time.monotonic()
        if self.drain_deadline is None:
            self.drain_deadline = now + self.settings.worker_drain_timeout_s
        else:
            self.drain_deadline = now
        self.stop.set()

    def _drain_over(self) -> bool:
        return self.drain_deadline is not None and time.monotonic() >= self.drain_deadline

    def _try_queue(self, call, *args, **kwargs):
        """A queue call that may be lost (a log line, a cancel check, a state report): while the
        queue is unavailable, generation goes on without it. Returns None when it failed."""
        from .errors import ServiceFault

        try:
            out = call(*args, **kwargs)
        except ServiceFault as exc:
            if self._queue_fault is None:
                log.warning("queue unavailable (%s): generating on, the result is kept until "
                            "it is back", exc.reason)
            self._queue_fault = exc.reason
            return None
        self._queue_fault = None
        return out

    def _settle(self, call, *args, **kwargs):
        """A queue write that must happen (a result, a hand-back): retried with backoff while
        the queue is unavailable, so the request ends exactly once. Gives up only when a drain
        runs out (the lease then expires and the request runs again elsewhere)."""
        from .errors import ServiceFault

        delay = 0.1
        while True:
            try:
                return call(*args, **kwargs)
            except ServiceFault as exc:
                if self._drain_over():
                    log.error("queue still unavailable (%s) at the end of the drain: leaving "
                              "the request to its lease", exc.reason)
                    return None
                log.warning("queue unavailable (%s): retrying in %.1f s", exc.reason, delay)
                time.sleep(delay)
                delay = min(delay * 2, self.settings.worker_result_retry_max_s)

    def _register(self, state: str) -> None:
        self._try_queue(self._register_now, state)

    def _register_now(self, state: str) -> None:
        from .errors import ServiceFault
        from .queue.base import WorkerInfo

        try:
            self.queue.register_worker(WorkerInfo(
                worker_id=self.worker_id, pid=os.getpid(), model=self.model_name,
                random_weights=bool(getattr(self.pipe, "is_random_weights", False)),
                device=str(getattr(self.pipe, "device", "")),
                precision=str(getattr(self.pipe, "precision", "")), state=state,
                error=self.load_error,
            ))
        except ServiceFault:
            raise  # _register's _try_queue reports the outage once
        except Exception:  # noqa: BLE001 - the registry is advisory; a full disk must not kill us
            log.exception("could not record worker state %s", state)

    def _heartbeat_loop(self) -> None:
        # Runs until the worker really ends (not merely until `stop`): a worker finishing its
        # last request after its parent died must keep its lease.
        failing = False
        while not self._hb_stop.is_set():
            try:
                self.queue.heartbeat(self.worker_id)
                if failing:
                    log.warning("heartbeat works again")
                failing = False
            except Exception:  # a locked or full database must not kill the lease thread
                if not failing:  # once per outage, not once a second
                    log.exception("heartbeat failed; retrying")
                failing = True
            if self.parent_pid and os.getppid() != self.parent_pid:
                # The server that started us is gone: finish what runs, then leave.
                if not self.stop.is_set():
                    log.warning("parent process %s is gone; stopping after the current request",
                                self.parent_pid)
                self.stop.set()
            self._hb_stop.wait(self.settings.heartbeat_interval_s)

    def load(self, model: Optional[str] = None) -> bool:
        """Loads the model, retrying with backoff until it loads or the worker is stopped
        (False). The reason of each failure is in the worker registry (/health shows it);
        after ``model_load_max_failures`` in a row the worker is ``failed`` and completes the
        queued requests with that reason instead of leaving them waiting."""
        self._register("loading")
        self._start_heartbeat()
        failures = 0
        while self.pipe is None:
            name = choose_model(model or self.settings.model)
            self.model_name = self.model_name or name
            try:
                self._load_pipeline(name)
            except Exception as exc:  # noqa: BLE001 - missing weights, OOM, a broken file, …
                failures += 1
                self.load_error = str(exc) or type(exc).__name__
                failed = failures >= self.settings.model_load_max_failures
                log.error("could not load model %s (attempt %d)%s", name, failures,
                          "" if failures > 1 else ":\n" + traceback.format_exc())
                self._free_accelerator_memory()
                self._register("failed" if failed else "loading")
                delay = min(2.0 ** failures, self.settings.model_load_retry_max_s)
                deadline = time.monotonic() + delay
                while not self.stop.is_set() and time.monotonic() < deadline:
                    if failed:
                        self._fail_waiting_requests()
                    self.stop.wait(min(1.0, self.settings.worker_poll_interval_s * 10))
                if self.stop.is_set():
                    return False
        self.load_error = ""
        self.model_name = getattr(self.pipe, "model_name", self.model_name) or "unknown"
        if getattr(self.pipe, "is_random_weights", False):
            log.warning(RANDOM_WEIGHTS_BANNER, self.model_name)
        self._register("ready")
        log.info("worker %s ready with model %s", self.worker_id, self.model_name)
        return True

    def _load_pipeline(self, name: str) -> None:
        from .engine.pipeline import PuLIDFluxPipeline

        log.info("loading model %s", name)
        self.pipe = PuLIDFluxPipeline.from_preset(
            name, device=self.settings.device, weights_dir=self.settings.weights_dir,
            offload=self.settings.offload, fp8=self.settings.fp8, compile=self.settings.compile,
            id_cache_size=self.settings.id_cache_size, batch_cfg=self.settings.batch_cfg,
        )
        if self.settings.worker_warmup:
            self._warm_up()

    def _fail_waiting_requests(self) -> None:
        """A worker whose model cannot load completes waiting requests with the reason, unless
        another live worker may still serve them."""
        from .config import ENDPOINT_ID

        try:
            others = [w for w in self.queue.workers(self.settings.alive_window_s)
                      if w.worker_id != self.worker_id and w.state != "failed"]
            while not others and not self.stop.is_set():
                job = self.queue.claim(self.worker_id, ENDPOINT_ID)
                if job is None:
                    return
                msg = _clip(f"model unavailable: {self.load_error}")
                self._try_queue(self.queue.add_log, job.id, msg, "ERROR")
                # Claimed, so it must end here: written through a queue outage like a result.
                self._settle(self.queue.complete, job.id, worker_id=self.worker_id, status_code=503,
                             result={"detail": msg, "error_type": "model_unavailable"},
                             error=msg, error_type="model_unavailable", op_id=uuid.uuid4().hex)
        except Exception:  # noqa: BLE001 - e.g. a full disk: the next round tries again
            log.exception("could not complete the waiting requests")

    def _warm_up(self) -> None:
        from .api.schemas import IMAGE_SIZE_PRESETS, FluxPulidInput

        # fal's default size: what most requests ask for, and what torch.compile specialises on
        width, height = IMAGE_SIZE_PRESETS[FluxPulidInput.model_fields["image_size"].default]
        started = time.perf_counter()
        try:
            self.pipe.warm_up(width, height)
        except Exception:  # noqa: BLE001 - e.g. OOM at this size: smaller requests may still fit
            log.exception("warm-up at %dx%d failed; serving without it", width, height)
            self._free_accelerator_memory()
            return
        log.info("warm-up at %dx%d took %.1f s", width, height, time.perf_counter() - started)

    def _start_heartbeat(self) -> None:
        if self._hb_thread is None:
            self._hb_thread = threading.Thread(target=self._heartbeat_loop, daemon=True)
            self._hb_thread.start()

    def serve_forever(self, max_jobs: int = 0) -> None:
        from .config import ENDPOINT_ID
        from .errors import ServiceFault

        last_sweep = 0.0
        try:
            while not self.stop.is_set():
                try:
                    if self._fault_delay:
                        # After a fault, claim only once both take writes again: no request
                        # is generated in vain while the disk is still full.
                        self.storage.probe()
                        self.queue.probe()
                        self._fault_delay = 0.0  # they do: no probe on every idle poll
                    job = self.queue.claim(self.worker_id, ENDPOINT_ID)
                    if job is None:
                        # Sweeping here too lets deployments without `serve` recover from lost
                        # workers.
                        if time.monotonic() - last_sweep > self.settings.stale_sweep_interval_s:
                            last_sweep = time.monotonic()
                            self.queue.requeue_stale(self.settings.lease_timeout_s,
                                                     self.settings.max_attempts)
                        self.stop.wait(self.settings.worker_poll_interval_s)
                        continue
                except ServiceFault as exc:
                    log.error("%s; retrying in %.0f s", exc, self._next_fault_delay())
                    self._pause_after_fault()
                    continue
                if not self.process(job):
                    self._pause_after_fault()
                    continue
                self._fault_delay = 0.0
                self.jobs_done += 1
                if max_jobs and self.jobs_done >= max_jobs:
                    break
        finally:
            self.close()

    def close(self) -> None:
        self.stop.set()
        self._hb_stop.set()
        try:
            self.queue.remove_worker(self.worker_id)
        except Exception:  # noqa: BLE001 - its heartbeat stops: it drops out of the registry
            log.exception("could not unregister")

    # --- one request ------------------------------------------------------------------------
    def process(self, job) -> bool:
        """Runs one request to its end; False when a fault of ours (a full disk, an unwritable
        queue) got in the way: then the request was handed back, not failed."""
        from .errors import ServiceFault

        try:
            self._process(job)
            return True
        except ServiceFault as exc:
            log.error("request %s handed back: %s", job.id, exc)
            self._free_accelerator_memory()
            self._hand_back(job)
            return False
        finally:
            self._register("ready")

    def _hand_back(self, job) -> None:
        """Releases the request (the attempt does not count), retrying with backoff until the
        queue takes it; the lease keeps it ours meanwhile."""
        delay = min(1.0, self.settings.fault_retry_max_s)
        while True:
            try:
                self.queue.release(job.id, self.worker_id)
                return
            except Exception:  # noqa: BLE001
                log.exception("could not hand %s back yet; retrying in %.0f s", job.id, delay)
            if self.stop.wait(delay):
                return  # the worker is stopping: its lease runs out and the reaper re-queues it
            delay = min(delay * 2, self.settings.fault_retry_max_s)

    def _process(self, job) -> None:
        from .errors import InputError, ServiceFault
        from .queue.base import CANCELLED_MESSAGE, CANCELLED_RESULT, CANCELLED_STATUS, CANCELLED_TYPE

        q = self.queue

        def finish(message: str, level: str = "INFO", **result) -> bool:
            # Written even through a queue outage (retried), so the request ends exactly once;
            # one op_id for every try, so a try whose reply was lost still counts as done.
            logged = False
            result["op_id"] = uuid.uuid4().hex

            def write() -> bool:
                nonlocal logged
                if not logged:
                    q.add_log(job.id, message, level)
                    logged = True
                return q.complete(job.id, worker_id=self.worker_id, **result)

            return bool(self._settle(write))

        self._try_queue(q.add_log, job.id,
                        f"generation started on worker {self.worker_id} (attempt {job.attempts})")
        self._register("busy")
        try:
            output, files, inference = self._generate(job)
        except Cancelled:
            finish("cancelled", "WARN", status_code=CANCELLED_STATUS, result=CANCELLED_RESULT,
                   error=CANCELLED_MESSAGE, error_type=CANCELLED_TYPE)
        except ShuttingDown:
            self._settle(q.release, job.id, self.worker_id)
        except InputError as exc:
            finish(f"invalid input: {exc.msg}", "ERROR", status_code=422,
                   result={"detail": [exc.detail()]}, error=exc.msg,
                   error_type="validation_error")
        except ServiceFault:
            raise  # ours, not the request's: process() hands it back
        except Exception as exc:  # noqa: BLE001 - any model failure becomes the request's error
            log.error("request %s failed:\n%s", job.id, traceback.format_exc())
            self._free_accelerator_memory()
            msg = f"Generation failed: {type(exc).__name__}: {exc}"[:2000]
            finish(msg, "ERROR", status_code=500,
                   result={"detail": msg, "error_type": "internal_error"},
                   error=msg, error_type="internal_error")
        else:
            if not finish(f"completed in {inference:.2f} s on {self.worker_id}", status_code=200,
                          result=output, metrics={"inference_time": inference},
                          output_files=files):
                # The request was re-queued or deleted meanwhile (or the queue stayed down
                # past the drain): our files are orphans.
                self._try_queue(q.add_log, job.id,
                                f"result of {self.worker_id} discarded: the request moved on",
                                "WARN")
                for fid in files:
                    self.storage.delete(fid)

    @staticmethod
    def _free_accelerator_memory() -> None:
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001
            pass

    def _generate(self, job):
        from .errors import InputError
        from .engine.types import GenerationRequest
        from .fetch import ReferenceImageError, decode_image

        inp = job.input
        internal = inp["_internal"]
        references = []
        for i, fid in enumerate(internal["reference_files"]):
            loc = ("body", "reference_image_url") if i == 0 else ("body", "reference_image_urls", i - 1)
            data = self.storage.read(fid)
            try:
                if data is None:
                    raise ReferenceImageError("the reference image is no longer stored", "fetch_failed")
                references.append(decode_image(data, self.policy))
            except InputError as exc:
                exc.loc = loc
                raise

        request = GenerationRequest(
            prompt=inp["prompt"], reference_images=references,
            width=internal["width"], height=internal["height"],
            num_inference_steps=inp["num_inference_steps"], seed=inp.get("seed"),
            guidance_scale=inp["guidance_scale"], negative_prompt=inp.get("negative_prompt", ""),
            start_step=inp["start_step"], end_step=inp.get("end_step"), true_cfg=inp["true_cfg"],
            id_weight=inp["id_weight"], max_sequence_length=int(inp["max_sequence_length"]),
            num_images=inp.get("num_images", 1), face_index=inp.get("face_index"),
            enable_safety_checker=inp["enable_safety_checker"],
            acceleration=inp.get("acceleration", "none"),
        )

        delay = self.settings.step_delay_s

        def on_step(step: int, total: int) -> None:
            self._try_queue(self.queue.add_log, job.id, f"step {step}/{total}")
            if delay:
                time.sleep(delay)
            if self._try_queue(self.queue.is_cancel_requested, job.id):
                raise Cancelled()
            if self._drain_over():
                raise ShuttingDown()

        extra = {}
        if inp.get("enable_previews"):
            # Only opted-in requests pay for previews (the pipeline's latents callback).
            extra["on_latents"] = self._preview_callback(job.id, inp, internal)

        started = time.perf_counter()
        result = self.pipe(request, on_step=on_step, **extra)
        inference = time.perf_counter() - started
        for name, value in result.metrics.items():
            self._try_queue(self.queue.add_log, job.id, f"{name}: {value:.3f}")

        fmt = inp.get("output_format", "jpeg")
        files: list[str] = []
        try:
            images = self._store_images(job, result.images, fmt, files)
        except BaseException:
            for fid in files:  # a later image could not be stored: the earlier ones go too
                self.storage.delete(fid)
            raise
        nsfw = list(result.has_nsfw_concepts) or [False] * len(images)
        output = {"images": images, "timings": {"inference": inference}, "seed": int(result.seed),
                  "has_nsfw_concepts": [bool(x) for x in nsfw], "prompt": inp["prompt"]}
        return output, files, inference

    def _store_images(self, job, result_images, fmt: str, files: list) -> list[dict]:
        from .storage.base import KIND_OUTPUT, file_ref

        inp = job.input
        images = []
        for i, image in enumerate(result_images):
            buf = io.BytesIO()
            save_kwargs = {"quality": self.settings.jpeg_quality} if fmt in ("jpeg", "webp") else {}
            image.convert("RGB").save(buf, PIL_FORMATS[fmt], **save_kwargs)
            data = buf.getvalue()
            name = f"{job.id[:8]}-{i}.{'jpg' if fmt == 'jpeg' else fmt}"
            if inp.get("sync_mode"):
                url = f"data:{CONTENT_TYPES[fmt]};base64,{base64.b64encode(data).decode()}"
            else:
                meta = self.storage.put(data, content_type=CONTENT_TYPES[fmt], file_name=name,
                                        kind=KIND_OUTPUT, owner=job.owner)
                files.append(meta.id)
                url = file_ref(meta)
            images.append({"url": url, "width": image.width, "height": image.height,
                           "content_type": CONTENT_TYPES[fmt], "file_name": name,
                           "file_size": len(data)})
        return images

    def _preview_callback(self, request_id: str, inp: dict, internal: dict):
        from .engine.preview import PREVIEW_LOG_PREFIX, preview_data_uri

        every = max(1, int(inp.get("preview_interval") or 1))
        width, height = internal["width"], internal["height"]

        def on_latents(step: int, total: int, latents) -> None:
            if step % every or step >= total:  # the last step's image is the result itself
                return
            try:
                uri = preview_data_uri(latents, width, height)
            except Exception:  # noqa: BLE001 - a preview must never fail the request
                log.exception("preview of %s failed", request_id)
                return
            self._try_queue(self.queue.add_log, request_id, PREVIEW_LOG_PREFIX + uri, "DEBUG")

        return on_latents


def run(args: argparse.Namespace) -> int:
    from .queue import open_queue
    from .storage import open_storage

    settings = settings_from_args(args)
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s worker %(levelname)s %(message)s")
    apply_cpu_thread_settings(settings)
    queue = open_queue(None, settings)
    storage = open_storage(None, settings)
    worker = Worker(settings, queue, storage, worker_id=args.worker_id, parent_pid=args.parent_pid)

    def on_signal(signum, _frame):
        log.info("signal %s: finishing the running request (up to %g s), then stopping", signum,
                 settings.worker_drain_timeout_s)
        worker.drain()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if not worker.load(args.model):  # stopped while the model could not load
        worker.close()
        return 2
    worker.serve_forever(args.max_jobs)
    return 0
