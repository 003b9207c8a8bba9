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
    """Runs N ``pulid-flux worker`` children; restarts them with bounded backoff."""

    def __init__(self, settings, count: int):
        self.settings = settings
        self.count = count
        self.procs: dict[int, asyncio.subprocess.Process] = {}

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
        backoff = 1.0
        while True:
            worker_id = f"local{slot}-{uuid.uuid4().hex[:8]}"
            started = time.monotonic()
            proc = await asyncio.create_subprocess_exec(*self._command(worker_id))
            self.procs[slot] = proc
            log.info("started worker %s (pid %d)", worker_id, proc.pid)
            code = await proc.wait()
            # Whatever it held goes back to the queue now (or fails after max_attempts).
            ids = await asyncio.to_thread(svc.queue.release_worker, worker_id,
                                          self.settings.max_attempts)
            log.warning("worker %s exited with %s; %d request(s) released", worker_id, code, len(ids))
            if time.monotonic() - started > self.settings.worker_healthy_uptime_s:
                backoff = 1.0
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.settings.worker_restart_backoff_max_s)

    async def __call__(self, svc) -> None:
        tasks = [asyncio.create_task(self._keep_one(i, svc)) for i in range(self.count)]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await self.stop()

    async def stop(self) -> None:
        procs = [p for p in self.procs.values() if p.returncode is None]
        for p in procs:
            with _suppress():
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.worker_stop_grace_s
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

    background = [WorkerSupervisor(settings, settings.local_workers)] if settings.local_workers else []
    return create_app(settings, background=background)


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
