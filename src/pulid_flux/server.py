"""``pulid-flux serve``: the fal-compatible HTTP service, plus supervised local workers.

The server process never imports torch. It starts ``local_workers`` worker processes
(``pulid-flux worker``) and restarts them when they exit; a dead worker's request goes back
to the queue at once (instead of waiting for its lease to time out).
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import os
import signal
import socket
import sys
import time
import traceback
import uuid
from typing import Any

from .engine.options import MODEL_CHOICES, add_engine_arguments

log = logging.getLogger("pulid_flux.server")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=MODEL_CHOICES,
                        help="model of the local worker(s); default flux-dev with CUDA, else tiny")
    parser.add_argument("--host", help="bind address (default 127.0.0.1; 0.0.0.0 when API keys are set)")
    parser.add_argument("--port", type=int, help="port (default 8000)")
    parser.add_argument("--data-dir", help="queue database and files (default ./data)")
    parser.add_argument("--api-key", action="append", dest="api_keys", metavar="KEY",
                        help="accepted `Authorization: Key …` value; repeatable")
    parser.add_argument("--ssl-certfile", help="TLS certificate (see `pulid-flux make-cert`)")
    parser.add_argument("--ssl-keyfile", help="TLS private key")
    parser.add_argument("--public-url", help="absolute URL clients reach this server at")
    parser.add_argument("--workers", type=int, dest="local_workers",
                        help="local worker processes to run (default 1; 0: external workers only)")
    parser.add_argument("--no-worker", action="store_true",
                        help="API replica only: run no local worker (same as --workers 0)")
    parser.add_argument("--queue-url", help="redis://HOST:PORT/DB, rediss://…, sqlite:///path "
                        "(default: embedded SQLite in the data dir)")
    parser.add_argument("--storage-url", help="s3://BUCKET/PREFIX or file:///dir "
                        "(default: files in the data dir)")
    add_engine_arguments(parser)  # for the local workers
    parser.add_argument("--log-level", help="debug, info, warning, …")


def settings_from_args(args: argparse.Namespace):
    from .config import Settings

    overrides: dict[str, Any] = {}
    for name in ("model", "host", "port", "data_dir", "api_keys", "ssl_certfile", "ssl_keyfile",
                 "public_url", "local_workers", "device", "weights_dir", "offload", "fp8",
                 "compile", "log_level", "queue_url", "storage_url"):
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    if getattr(args, "no_worker", False):
        overrides["local_workers"] = 0
    return Settings(**overrides)


class WorkerSupervisor:
    """Runs N ``pulid-flux worker`` children; restarts them with bounded backoff.

    It never ends on its own: whatever fails inside it (starting a process, releasing a dead
    worker's requests on a full disk) is logged, counted and retried; /health and /metrics show
    its state."""

    def __init__(self, settings, count: int):
        self.settings = settings
        self.count = count
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self.tasks: list[asyncio.Task] = []
        self.restarts = 0  # worker processes started again after one exited
        self.errors = 0  # exceptions inside the supervisor itself
        self.last_error = ""
        self.failing = False  # its last start or release failed (cleared by the next success)

    def health(self) -> dict:
        return {"alive": self.alive, "workers_wanted": self.count,
                "workers_running": sum(1 for p in self.procs.values() if p.returncode is None),
                "restarts": self.restarts, "errors": self.errors,
                "last_error": self.last_error or None}

    @property
    def alive(self) -> bool:
        return bool(self.tasks) and not any(t.done() for t in self.tasks)

    def fault(self) -> str:
        """Why the supervisor is in trouble ('' when it is not), for /health's faults."""
        if self.tasks and not self.alive:
            return "the worker supervisor stopped: " + (self.last_error or "unknown reason")
        return self.last_error if self.failing else ""

    def _record_error(self, what: str) -> None:
        self.errors += 1
        self.failing = True
        self.last_error = f"{what}: {traceback.format_exc(limit=0).strip().splitlines()[-1]}"
        log.exception("supervisor: %s", what)

    def _command(self, worker_id: str) -> list[str]:
        s = self.settings
        cmd = [sys.executable, "-m", "pulid_flux.cli", "worker", "--data-dir", str(s.data_dir),
               "--worker-id", worker_id, "--parent-pid", str(os.getpid())]
        for flag, value in (("--model", s.model), ("--device", s.device),
                            ("--weights-dir", s.weights_dir), ("--queue-url", s.queue_url),
                            ("--storage-url", s.storage_url)):
            if value:
                cmd += [flag, str(value)]
        for flag, value in (("--offload", s.offload), ("--fp8", s.fp8 == "weights"),
                            ("--fp8-fast", s.fp8 == "fast"), ("--compile", s.compile)):
            if value:
                cmd.append(flag)
        return cmd

    async def _keep_one(self, slot: int, svc) -> None:
        first = backoff = min(1.0, self.settings.worker_restart_backoff_max_s)
        while True:
            started = time.monotonic()
            try:
                await self._run_one(slot, svc)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - e.g. no memory to fork: log, wait, try again
                self._record_error(f"worker slot {slot}")
            if time.monotonic() - started > self.settings.worker_healthy_uptime_s:
                backoff = first
            log.info("restarting worker slot %d in %.0f s", slot, backoff)
            await asyncio.sleep(backoff)
            self.restarts += 1
            backoff = min(backoff * 2, self.settings.worker_restart_backoff_max_s)

    async def _run_one(self, slot: int, svc) -> None:
        worker_id = f"local{slot}-{uuid.uuid4().hex[:8]}"
        proc = await asyncio.create_subprocess_exec(*self._command(worker_id))
        self.procs[slot] = proc
        self.failing = False
        log.info("started worker %s (pid %d)", worker_id, proc.pid)
        code = await proc.wait()
        log.warning("worker %s exited with %s", worker_id, code)
        # Whatever it held goes back to the queue now (or fails after max_attempts).
        try:
            ids = await asyncio.to_thread(svc.queue.release_worker, worker_id,
                                          self.settings.max_attempts)
        except Exception:  # noqa: BLE001 - e.g. a full disk: the reaper re-queues them later
            self._record_error(f"releasing the requests of worker {worker_id} (they are "
                               "re-queued once their lease runs out)")
            return
        log.warning("%d request(s) of worker %s released", len(ids), worker_id)

    async def __call__(self, svc) -> None:
        self.tasks = [asyncio.create_task(self._keep_one(i, svc)) for i in range(self.count)]
        try:
            await asyncio.gather(*self.tasks)
        except asyncio.CancelledError:
            raise
        except BaseException:  # not expected: _keep_one survives everything but cancellation
            self._record_error("supervisor ended")
            raise
        finally:
            for t in self.tasks:
                t.cancel()
            await self.stop()

    async def stop(self) -> None:
        procs = [p for p in self.procs.values() if p.returncode is None]
        for p in procs:
            with _suppress():
                p.send_signal(signal.SIGTERM)
        # A worker finishes its running request first (its drain), then needs a moment to exit.
        deadline = (time.monotonic() + self.settings.worker_drain_timeout_s
                    + self.settings.worker_stop_grace_s)
        for p in procs:
            try:
                await asyncio.wait_for(p.wait(), max(0.1, deadline - time.monotonic()))
            except (asyncio.TimeoutError, ProcessLookupError):
                with _suppress():
                    p.kill()


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        return exc_type is not None and issubclass(exc_type, (ProcessLookupError, OSError))


def build_app(settings):
    from .api.app import create_app

    supervisor = WorkerSupervisor(settings, settings.local_workers) if settings.local_workers else None
    app = create_app(settings, background=[supervisor] if supervisor else [])
    app.state.services.supervisor = supervisor  # its state shows in /health and /metrics
    return app


def bind_socket(host: str, port: int) -> socket.socket:
    """The listening socket, bound before any worker starts, so a busy port fails at once."""
    from .cli import CommandError

    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:  # includes socket.gaierror: an unknown host
        raise CommandError(f"cannot listen on {host}:{port}: {exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: quick restarts
        sock.bind(address)
    except OSError as exc:
        sock.close()
        hint = " (another server running? choose another --port)" if exc.errno == errno.EADDRINUSE else ""
        raise CommandError(f"cannot listen on {host}:{port}: {exc.strerror}{hint}") from None
    return sock


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from .cli import CommandError

    settings = settings_from_args(args)
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s server %(levelname)s %(name)s %(message)s")
    if bool(settings.ssl_certfile) != bool(settings.ssl_keyfile):
        raise CommandError("--ssl-certfile and --ssl-keyfile go together")
    host = settings.bind_host
    sock = bind_socket(host, settings.port)
    if not settings.api_keys and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("no API keys configured and binding to %s: anyone who can reach it can use it", host)
    app = build_app(settings)
    config = uvicorn.Config(app, host=host, port=settings.port, log_level=settings.log_level.lower(),
                            ssl_certfile=settings.ssl_certfile, ssl_keyfile=settings.ssl_keyfile,
                            timeout_graceful_shutdown=5)
    # uvicorn logs no address for a socket it is handed; say where the service is
    scheme, port = ("https" if settings.ssl_certfile else "http"), sock.getsockname()[1]
    log.info("serving on %s://%s:%d (Ctrl+C to stop)", scheme, f"[{host}]" if ":" in host else host, port)
    uvicorn.Server(config).run(sockets=[sock])
    return 0
