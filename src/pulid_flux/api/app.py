"""The FastAPI application: fal's protocol for ``fal-ai/flux-pulid`` over the queue.

This process never imports torch: generation happens in worker processes that share the
queue and storage (see ``pulid_flux.worker``). Background loops here re-queue requests of
dead workers, expire old results, and deliver webhooks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Awaitable, Callable, Optional

from fastapi import Depends, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from swagger_ui_bundle import swagger_ui_path

from .. import __version__
from ..config import ENDPOINT_ID, Settings
from ..errors import ServiceFault
from ..queue.base import WEBHOOK_DELIVERED, WEBHOOK_FAILED, Queue
from ..storage.base import KIND_UPLOAD, Storage
from . import routes_queue, routes_storage
from .auth import Auth, load_or_create_secret
from .hosts import HostCheckMiddleware
from .proxy import BodyLimitMiddleware, FalProxyMiddleware, HeadMiddleware, InternalErrorMiddleware
from .services import Services

log = logging.getLogger("pulid_flux.api")

STATIC_DIR = Path(__file__).parent / "static"

BackgroundTask = Callable[[Services], Awaitable[None]]


def playground_headers(settings: Settings) -> dict[str, str]:
    """The playground runs only its own script and style files, talks only to this API, and
    cannot be framed; images may come from anywhere (references, a file origin, a bucket)."""
    api = settings.public_url.rstrip("/") if settings.public_url else ""
    csp = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src * data: blob:; "
           f"connect-src 'self' {api}".rstrip() + "; form-action 'none'; base-uri 'none'; "
           "frame-ancestors 'none'")
    return {"Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY", "Cache-Control": "no-cache"}


def _clean_errors(errors) -> list[dict]:
    # fal's shape; the offending input is not echoed back (it may be a large data URI).
    out = []
    for e in errors:
        entry = {"loc": list(e.get("loc", ["body"])), "msg": e.get("msg", ""), "type": e.get("type", "value_error")}
        if e.get("ctx"):
            entry["ctx"] = jsonable_encoder(e["ctx"], custom_encoder={Exception: str})
        out.append(entry)
    return out


def build_services(settings: Settings, queue: Optional[Queue] = None,
                   storage: Optional[Storage] = None) -> Services:
    from ..fetch import FetchPolicy
    from ..queue import open_queue
    from ..storage import open_storage

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    queue = queue or open_queue(None, settings)
    storage = storage or open_storage(None, settings)
    policy = FetchPolicy(
        max_bytes=settings.max_reference_bytes, timeout_s=settings.fetch_timeout_s,
        max_redirects=settings.fetch_max_redirects, max_pixels=settings.max_reference_pixels,
        min_side=settings.min_reference_side,
        allowed_networks=list(settings.fetch_allowed_private_cidrs),
    )
    signer = None
    try:
        from ..webhooks import WebhookSigner

        signer = WebhookSigner.load_or_create(settings.webhook_key_path)
    except ImportError:  # webhooks are optional for the rest of the API
        log.warning("webhooks unavailable: pulid_flux.webhooks cannot be imported")
    scheme = "https" if settings.ssl_certfile else "http"
    host = settings.bind_host
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    default_base = settings.public_url or f"{scheme}://{host}:{settings.port}"
    own_hosts = {f"{h}:{settings.port}" for h in ("127.0.0.1", "localhost", settings.bind_host)}
    return Services(settings=settings, queue=queue, storage=storage,
                    auth=Auth(settings.api_keys, load_or_create_secret(settings.secret_path)),
                    fetch_policy=policy, webhook_signer=signer, default_base_url=default_base.rstrip("/"),
                    own_hosts=own_hosts)


def probe_faults(svc: Services) -> list[dict]:
    """What cannot take writes right now (storage, queue) and a supervisor in trouble, as
    /health's ``faults``; every probe is a real write, so a full disk shows at once and a
    freed one clears at once."""
    faults = []
    for component, target in (("storage", svc.storage), ("queue", svc.queue)):
        try:
            target.probe(svc.settings.min_free_disk_bytes)
        except ServiceFault as exc:
            faults.append({"component": exc.component, "reason": exc.reason})
        except Exception as exc:  # noqa: BLE001 - an unexpected probe failure is a fault too
            faults.append({"component": component, "reason": f"{type(exc).__name__}: {exc}"})
    if svc.supervisor is not None:
        reason = svc.supervisor.fault()
        if reason:
            faults.append({"component": "supervisor", "reason": reason})
    return faults


# --- background loops ----------------------------------------------------------------------

async def reaper_loop(svc: Services) -> None:
    """Re-queues requests whose worker stopped renewing its lease (crash, kill -9, host loss)."""
    period = min(1.0, svc.settings.lease_timeout_s / 4)
    while True:
        try:
            ids = await asyncio.to_thread(svc.queue.requeue_stale, svc.settings.lease_timeout_s,
                                          svc.settings.max_attempts)
            if ids:
                log.warning("re-queued or failed %d request(s) of silent workers", len(ids))
        except ServiceFault as exc:  # the queue logs its outage once; no traceback per period
            log.debug("reaper: %s", exc)
        except Exception:  # noqa: BLE001 - keep the loop alive through a locked database
            log.exception("reaper failed")
        await asyncio.sleep(period)


async def cleanup_loop(svc: Services) -> None:
    """Deletes results (with their files) and uploads once their retention time is over."""
    while True:
        try:
            now = time.time()
            file_ids = await asyncio.to_thread(svc.queue.expire, now - svc.settings.result_ttl_s, now)
            for fid in file_ids:
                await asyncio.to_thread(svc.storage.delete, fid)
            await asyncio.to_thread(svc.storage.expire, KIND_UPLOAD, now - svc.settings.upload_ttl_s)
        except ServiceFault as exc:  # the queue logs its outage once; no traceback per period
            log.debug("cleanup: %s", exc)
        except Exception:  # noqa: BLE001
            log.exception("cleanup failed")
        await asyncio.sleep(svc.settings.cleanup_interval_s)


async def webhook_loop(svc: Services) -> None:
    """Delivers each completed request's webhook once; state lives in the queue, so a restart
    resumes what was not delivered and skips what was."""
    if svc.webhook_signer is None:
        return
    from ..webhooks import WebhookSender, build_payload

    s = svc.settings
    sender = WebhookSender(svc.webhook_signer, policy=svc.fetch_policy,
                           max_attempts=s.webhook_max_attempts,
                           base_delay_s=s.webhook_base_delay_s, max_delay_s=s.webhook_max_delay_s,
                           timeout_s=s.webhook_timeout_s)
    in_flight: set[str] = set()
    limit = asyncio.Semaphore(s.webhook_concurrency)

    async def deliver(job) -> None:
        try:
            async with limit:
                ok = job.status_code is not None and 200 <= job.status_code < 300
                base = job.input.get("_internal", {}).get("base_url") or svc.default_base_url
                body = build_payload(
                    job.id, ok=ok, payload=svc.result_body(job, base),
                    error=None if ok else f"Invalid status code: {job.status_code}",
                )
                delivered = await sender.deliver(job.webhook_url, job.id, body, job.owner)
            await asyncio.to_thread(svc.queue.set_webhook_state, job.id,
                                    WEBHOOK_DELIVERED if delivered else WEBHOOK_FAILED)
            if not delivered:
                log.warning("webhook for %s could not be delivered", job.id)
        except ServiceFault as exc:
            # Its outcome could not be recorded: it stays pending and goes out again once the
            # queue is back (at least once, as fal's webhooks are).
            log.warning("webhook state of %s not recorded (%s)", job.id, exc)
        except Exception:  # noqa: BLE001
            log.exception("webhook delivery for %s failed", job.id)
            with contextlib.suppress(ServiceFault):
                await asyncio.to_thread(svc.queue.set_webhook_state, job.id, WEBHOOK_FAILED)
        finally:
            in_flight.discard(job.id)

    try:
        while True:
            try:
                jobs = await asyncio.to_thread(svc.queue.pending_webhooks, 100)
                for job in jobs:
                    if job.id not in in_flight and job.webhook_url:
                        in_flight.add(job.id)
                        asyncio.create_task(deliver(job))
            except ServiceFault as exc:  # the queue logs its outage once; no traceback per period
                log.debug("webhook loop: %s", exc)
            except Exception:  # noqa: BLE001
                log.exception("webhook loop failed")
            await asyncio.sleep(s.webhook_poll_interval_s)
    finally:
        await sender.aclose()


# --- the app ---------------------------------------------------------------------------------

def create_app(settings: Optional[Settings] = None, *, services: Optional[Services] = None,
               background: Optional[list[BackgroundTask]] = None,
               run_loops: bool = True) -> FastAPI:
    settings = settings or (services.settings if services else Settings())
    svc = services or build_services(settings)
    tasks_to_run: list[BackgroundTask] = list(background or [])
    if run_loops:
        tasks_to_run += [reaper_loop, cleanup_loop, webhook_loop]

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        tasks = [asyncio.create_task(t(svc)) for t in tasks_to_run]
        try:
            yield
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t

    app = FastAPI(
        title="pulid-flux: fal-ai/flux-pulid",
        version=__version__,
        description="A self-hosted twin of fal's `fal-ai/flux-pulid` endpoint (FLUX.1-dev + PuLID). "
        "Queue API at `/`, sync API at `/run/`, storage at `/rest/` and `/cdn/`.",
        lifespan=lifespan,
        docs_url=None,  # served below with local assets
        redoc_url=None,  # not served: ReDoc's page would load from a CDN
        openapi_url=None,
    )
    app.state.services = svc

    def require_auth(request: Request) -> str:
        return svc.auth.owner_for(request)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return JSONResponse({"detail": _clean_errors(exc.errors())}, status_code=422)

    @app.exception_handler(ServiceFault)
    async def service_fault(request: Request, exc: ServiceFault):
        # Ours, not the client's: a 507/503 that names what failed; clients may retry later.
        log.error("%s on %s %s", exc, request.method, request.url.path)
        headers = {"x-fal-error-type": exc.error_type}
        if exc.retry_after_s is not None:
            headers["Retry-After"] = str(max(1, round(exc.retry_after_s)))
        return JSONResponse(exc.body(), status_code=exc.status_code, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    app.include_router(routes_queue.router)
    app.include_router(routes_storage.rest)
    app.include_router(routes_storage.cdn)
    app.include_router(routes_storage.files)

    # The playground: a static page that uses only the public API (no auth: it holds no data).
    @app.get("/", include_in_schema=False)
    async def playground():
        return FileResponse(STATIC_DIR / "index.html", headers=playground_headers(settings))

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    probing: Optional[asyncio.Future] = None  # the write probe /health is waiting for

    @app.get("/health", tags=["service"], summary="Liveness, model and workers (no auth)")
    async def health():
        def read_queue():
            return svc.queue.workers(svc.settings.alive_window_s), svc.queue.stats()

        # Both bounded by one deadline: an unreachable or locked queue must not hang the health
        # check. A write probe that is merely slow (a busy database) proves nothing either way:
        # no fault then; and one probe at a time, so slow ones cannot pile up in the thread pool.
        nonlocal probing
        if probing is None or probing.done():
            probing = asyncio.ensure_future(asyncio.to_thread(probe_faults, svc))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + svc.settings.health_timeout_s
        try:
            workers, stats = await asyncio.wait_for(asyncio.to_thread(read_queue),
                                                    svc.settings.health_timeout_s)
            queue_fault = None
        except (ServiceFault, asyncio.TimeoutError) as exc:
            queue_fault = exc.reason if isinstance(exc, ServiceFault) else \
                f"no answer within {svc.settings.health_timeout_s:g} s"
            workers, stats = [], {}
        try:
            faults = list(await asyncio.wait_for(asyncio.shield(probing),
                                                 max(0.0, deadline - loop.time())))
        except asyncio.TimeoutError:
            faults = []
        if queue_fault and not any(f["component"] == "queue" for f in faults):
            faults.append({"component": "queue", "reason": queue_fault})
        ready = [w for w in workers if w.state in ("ready", "busy")]
        model = ready[0] if ready else None
        label = None
        if model is not None:
            label = model.model + (" (random weights)" if model.random_weights else "")
        # Why no worker is ready, while a model does not load (the reason names the fix).
        model_error = None if ready else next((w.error for w in workers if w.error), None)
        model_fault = svc.model_fault(workers)
        if model_fault is not None:
            faults.append({"component": "model", "reason": model_fault.reason})
        body = {
            "status": "degraded" if faults else "ok", "faults": faults,
            "endpoint": ENDPOINT_ID, "version": __version__,
            "model": label, "model_name": model.model if model else settings.model,
            "random_weights": bool(model.random_weights) if model else None,
            "ready": bool(ready), "model_error": model_error,
            "workers": [{"id": w.worker_id, "state": w.state, "model": w.model,
                         "random_weights": w.random_weights, "device": w.device,
                         "precision": w.precision, "error": w.error or None} for w in workers],
            "workers_alive": len(workers),
            "queue": {"in_queue": int(stats.get("state_IN_QUEUE", 0)),
                      "in_progress": int(stats.get("state_IN_PROGRESS", 0))},
        }
        if svc.supervisor is not None:
            body["supervisor"] = svc.supervisor.health()
        return body

    @app.get("/metrics", tags=["service"], summary="Prometheus metrics",
             dependencies=[Depends(require_auth)])
    async def metrics():
        from .metrics import render

        body, content_type = await asyncio.to_thread(render, svc)
        return Response(body, media_type=content_type)

    @app.get("/.well-known/jwks.json", tags=["service"],
             summary="Public keys that verify this server's webhook signatures (public)")
    async def jwks():
        if svc.webhook_signer is None:
            return JSONResponse({"keys": []})
        return svc.webhook_signer.jwks()

    @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(require_auth)])
    async def openapi():
        return app.openapi()

    # Swagger UI from the files shipped in the swagger-ui-bundle-v2 wheel: /docs works offline.
    app.mount("/docs-assets", StaticFiles(directory=swagger_ui_path), name="docs-assets")

    @app.get("/docs", include_in_schema=False, dependencies=[Depends(require_auth)])
    async def docs():
        return get_swagger_ui_html(
            openapi_url="/openapi.json", title=app.title,
            swagger_js_url="/docs-assets/swagger-ui-bundle.js",
            swagger_css_url="/docs-assets/swagger-ui.css",
            swagger_favicon_url="/docs-assets/favicon-32x32.png")

    # Outermost first: CORS answers preflights (proxy included), then the proxy re-routes,
    # then the body cap applies to the re-routed path; unhandled errors become 500s inside
    # all of them, so they carry CORS headers too; HEAD is routed as GET innermost.
    app.add_middleware(HeadMiddleware)
    app.add_middleware(InternalErrorMiddleware)
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_request_bytes)
    app.add_middleware(FalProxyMiddleware)
    app.add_middleware(
        CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["*"],
        allow_headers=["*"],
        expose_headers=["x-fal-request-id", "x-fal-error-type", "x-fal-request-timeout-type", "etag"],
    )
    if not settings.api_keys:
        # Outermost: a DNS-rebinding page gets nothing, not even a CORS preflight (api/hosts.py).
        app.add_middleware(HostCheckMiddleware, allowed=[*settings.allowed_hosts, settings.bind_host],
                           public_urls=(settings.public_url, settings.files_public_url))
    return app
