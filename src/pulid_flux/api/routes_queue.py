"""Queue and sync ("run") routes of fal's protocol for ``fal-ai/flux-pulid``.

A thin skin over the queue: validate, fetch the references (so bad URLs fail at once and
workers need no outbound network), enqueue, and read state back in fal's shapes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import replace
from typing import Any, Optional

import anyio
from fastapi import APIRouter, Body, Depends, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..config import ENDPOINT_ID
from ..errors import ServiceFault
from ..queue.base import (
    COMPLETED, IN_PROGRESS, IN_QUEUE, PRIORITIES, WEBHOOK_PENDING, Job, QueueFullError,
)
from ..storage.base import KIND_INPUT
from .schemas import (
    LIFECYCLE_PREFERENCE_HEADER,
    FluxPulidInput,
    FluxPulidOutput,
    QueueStatus,
    SubmitResponse,
    check_limits,
    error_detail,
    input_from_query,
    resolve_size,
    retention_from_header,
)
from .fairness import cost_errors, too_many
from .services import Services
from .status_hub import Watch, split_previews

log = logging.getLogger("pulid_flux.api")


def require_auth(request: Request) -> str:
    """Router-level dependency, so a bad key is refused before the body is even validated."""
    owner = request.app.state.services.auth.owner_for(request)
    request.state.owner = owner
    return owner


router = APIRouter(dependencies=[Depends(require_auth)])

TRUE_FLAGS = {"1", "true", "yes", "on"}
VALIDATION_RESPONSES: dict[int | str, dict[str, Any]] = {
    422: {"description": "Invalid input: `{\"detail\": [{\"loc\": [\"body\", FIELD], \"msg\", \"type\"}]}`"},
}


def services(request: Request) -> Services:
    return request.app.state.services


def fal_json(body: Any, status_code: int = 200, request_id: Optional[str] = None,
             error_type: Optional[str] = None, *, server_timeout: bool = False) -> JSONResponse:
    headers = {}
    if request_id:
        headers["x-fal-request-id"] = request_id
    if error_type:
        headers["x-fal-error-type"] = error_type
        if error_type == "request_timeout" and not server_timeout:
            # The caller's own start timeout (X-Fal-Request-Timeout): clients must not retry it.
            headers["x-fal-request-timeout-type"] = "user"
    return JSONResponse(body, status_code=status_code, headers=headers)


def unprocessable(errors: list[dict]) -> JSONResponse:
    return fal_json({"detail": errors}, 422)


def _summarise_url(url: str) -> str:
    # Data URIs can be megabytes: the stored input keeps a short note instead.
    if url.startswith("data:"):
        return f"{url[:40]}…({len(url)} chars)"
    return url


async def accept(request: Request, body: FluxPulidInput, *, priority: int = 0,
                 webhook_url: Optional[str] = None) -> Job | JSONResponse:
    """Validates, fetches references, stores them and enqueues; returns the job or a 422."""
    svc = services(request)
    owner = request.state.owner  # set by require_auth
    fault = await asyncio.to_thread(svc.model_fault)
    if fault is not None:
        raise fault
    errors = check_limits(body, svc.settings)
    try:
        ttl_s = retention_from_header(request.headers.get(LIFECYCLE_PREFERENCE_HEADER),
                                      svc.settings.result_ttl_s, svc.settings.max_json_depth)
    except ValueError as exc:
        errors.append(error_detail(LIFECYCLE_PREFERENCE_HEADER, str(exc), "value_error", where="header"))
    if not errors:
        width, height = resolve_size(body.image_size, svc.settings)
        errors = cost_errors(width, height, body.num_inference_steps, body.num_images, body.true_cfg,
                             svc.settings)
    if errors:
        return unprocessable(errors)
    limits = svc.owner_limits
    # This request's inputs and outputs will be stored for the key: a key at its limit waits.
    full = await limits.storage_full(svc.storage, owner)
    if full is not None:
        return full

    from ..fetch import ReferenceImageError, decode_image, fetch_reference

    urls: list[tuple[Any, str]] = [("reference_image_url", body.reference_image_url)]
    urls += [(["reference_image_urls", i], u) for i, u in enumerate(body.reference_image_urls or [])]
    own_file = svc.own_file_resolver(request)

    async def load(url: str) -> bytes:
        data = await fetch_reference(url, svc.fetch_policy, own_file=own_file)
        image = await asyncio.to_thread(decode_image, data, svc.fetch_policy)
        image.close()
        return data

    results = await asyncio.gather(*(load(u) for _, u in urls), return_exceptions=True)
    for (field, _), res in zip(urls, results):
        if isinstance(res, ReferenceImageError):
            errors.append(error_detail(field, res.msg, res.type))
        elif isinstance(res, BaseException):
            raise res
    if errors:
        return unprocessable(errors)

    files: list[str] = []
    try:
        for i, data in enumerate(results):
            meta = await asyncio.to_thread(
                svc.storage.put, data, content_type="application/octet-stream",
                file_name=f"reference-{i}", kind=KIND_INPUT, owner=owner,
            )
            files.append(meta.id)
    except BaseException:  # a fault, a client gone: nothing it stored may stay behind
        await asyncio.to_thread(_discard, svc, files)
        raise

    stored = body.model_dump(mode="json")
    stored["reference_image_url"] = _summarise_url(body.reference_image_url)
    if body.reference_image_urls:
        stored["reference_image_urls"] = [_summarise_url(u) for u in body.reference_image_urls]
    # base_url: the webhook's file URLs use the address the client reached us at
    stored["_internal"] = {"width": width, "height": height, "reference_files": files,
                           "base_url": svc.base_url(request)}

    start_deadline = None
    timeout_header = request.headers.get("x-fal-request-timeout")
    if timeout_header:
        try:
            start_deadline = time.time() + max(1.0, float(timeout_header))
        except ValueError:
            pass
    refusal: Optional[JSONResponse] = None
    try:
        # Count and submit under the key's lock: a burst from one key cannot all pass together.
        async with limits.submit_lock(owner):
            if limits.enabled:
                refusal = limits.active_refusal(await asyncio.to_thread(svc.queue.active_count, owner))
            if refusal is None:
                job = await asyncio.to_thread(
                    svc.queue.submit, ENDPOINT_ID, stored, owner=owner, priority=priority,
                    webhook_url=webhook_url, start_deadline=start_deadline,
                    # sync_mode and fal's "X-Fal-Store-IO: 0": the request is forgotten once its
                    # result was handed out (it has to be stored until then, to reach the worker
                    # and back)
                    ephemeral=body.sync_mode or request.headers.get("x-fal-store-io", "").strip() == "0",
                    input_files=files, max_queue_length=svc.settings.max_queue_length,
                    # fal's x-fal-no-retry: a request whose worker dies is not run a second time
                    max_attempts=1 if _flag(request.headers.get("x-fal-no-retry")) else None,
                    ttl_s=ttl_s,
                )
    except QueueFullError as exc:
        refusal = fal_json({"detail": str(exc), "error_type": "queue_full"}, 429, error_type="queue_full")
    except BaseException:  # the queue unavailable (a 503 naming it), a client gone: no orphan files
        await asyncio.to_thread(_discard, svc, files)
        raise
    if refusal is not None:
        await asyncio.to_thread(_discard, svc, files)
        return refusal
    try:
        await asyncio.to_thread(
            svc.queue.add_log, job.id,
            f"queued: {width}x{height}, {body.num_inference_steps} steps, {len(files)} reference(s)",
        )
    except ServiceFault:
        pass  # the request is accepted: a log line it lacks must not turn that into an error
    return job


def _discard(svc: Services, files: list[str]) -> None:
    for fid in files:
        svc.storage.delete(fid)


def _owned_job(request: Request, request_id: str) -> Job | JSONResponse:
    svc = services(request)
    owner = request.state.owner  # set by require_auth
    job = svc.queue.get(request_id)
    # Another key's request is reported exactly like a missing one.
    if job is None or job.endpoint != ENDPOINT_ID or (svc.auth.enabled and job.owner != owner):
        return fal_json({"detail": "Request not found", "status": "NOT_FOUND"}, 404)
    return job


def _flag(value: Optional[str]) -> bool:
    return (value or "").strip().lower() in TRUE_FLAGS


# --- queue API ------------------------------------------------------------------------------

@router.post(f"/{ENDPOINT_ID}", response_model=SubmitResponse, responses=VALIDATION_RESPONSES,
             tags=["queue"], summary="Submit a request to the queue")
async def submit(request: Request, body: FluxPulidInput = Body(...),
                 fal_webhook: Optional[str] = Query(None, description="URL POSTed when done")):
    svc = services(request)
    priority_name = request.headers.get("x-fal-queue-priority", "normal").strip().lower()
    if priority_name not in PRIORITIES:
        return unprocessable([error_detail("x-fal-queue-priority", "must be 'normal' or 'low'", "enum",
                                           where="header")])
    if fal_webhook is not None:
        from ..fetch import ReferenceImageError
        from ..webhooks import validate_webhook_url

        try:
            # The address policy of reference fetching: no internal targets (checked again
            # at every delivery attempt).
            fal_webhook = await validate_webhook_url(fal_webhook, svc.fetch_policy)
        except ReferenceImageError as exc:
            return unprocessable([error_detail("fal_webhook", exc.msg, exc.type, where="query")])
    job = await accept(request, body, priority=PRIORITIES[priority_name], webhook_url=fal_webhook)
    if isinstance(job, Response):
        return job
    base = svc.base_url(request)
    position = await asyncio.to_thread(svc.queue.position, job.id)
    return fal_json({"status": IN_QUEUE, "request_id": job.id, "gateway_request_id": job.id,
                     **svc.urls(job.id, base), "queue_position": position}, 200, job.id)


@router.get(f"/{ENDPOINT_ID}/requests/{{request_id}}/status", response_model=QueueStatus,
            tags=["queue"], summary="Request status (IN_QUEUE, IN_PROGRESS or COMPLETED)")
async def status(request: Request, request_id: str, logs: Optional[str] = Query(None)):
    job = await asyncio.to_thread(_owned_job, request, request_id)
    if isinstance(job, Response):
        return job
    svc = services(request)
    entries = (await asyncio.to_thread(svc.log_entries, job.id))[0] if _flag(logs) else None
    if entries:
        entries = split_previews(entries)[0]
    body = await asyncio.to_thread(svc.status_body, job, svc.base_url(request), entries)
    return fal_json(body, 200 if job.state == COMPLETED else 202, job.id)


async def _status_events(request: Request, watch: Watch, with_logs: bool):
    """SSE: one event per change, logs incremental, closes after COMPLETED. The reads are the
    status hub's, shared by every stream of the request."""
    svc = services(request)
    base = svc.base_url(request)
    keepalive_s = svc.settings.sse_keepalive_s
    sent_version, sent_logs, sent_preview, last_sent = 0, 0, 0, time.monotonic()
    while True:
        changed = watch.event  # taken before looking, so a change meanwhile wakes the wait
        if watch.version != sent_version:
            sent_version, job = watch.version, watch.job
            if job is None:
                return
            logs, sent_logs = watch.logs[sent_logs:], len(watch.logs)
            body = svc.status_body(job, base, logs if with_logs else None, position=watch.position)
            if watch.preview_seq != sent_preview:
                body["preview"], sent_preview = watch.preview, watch.preview_seq
            last_sent = time.monotonic()
            yield f"data: {json.dumps(body)}\n\n"
            if job.state == COMPLETED:
                return
            continue
        if time.monotonic() - last_sent > keepalive_s:
            last_sent = time.monotonic()
            yield ": keep-alive\n\n"
        if await request.is_disconnected():
            return
        with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
            await asyncio.wait_for(changed.wait(), min(1.0, keepalive_s))


SSE_HEADERS = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}


class _HeldStream(StreamingResponse):
    """A stream that gives back its key's stream slot when it ends, however it ends."""

    def __init__(self, *args, release, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._release = release

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


@router.get(f"/{ENDPOINT_ID}/requests/{{request_id}}/status/stream", tags=["queue"],
            summary="Status as server-sent events (logs incremental; closes after COMPLETED)")
async def status_stream(request: Request, request_id: str, logs: Optional[str] = Query(None)):
    job = await asyncio.to_thread(_owned_job, request, request_id)
    if isinstance(job, Response):
        return job
    svc = services(request)
    release = svc.owner_limits.open_stream(request.state.owner)
    if release is None:
        return too_many(f"This key has {svc.settings.max_status_streams_per_key} status streams open "
                        "(the limit); close one or poll the status URL", svc.settings)

    async def events():
        async with svc.status_hub.watch(job.id) as watch:
            async for event in _status_events(request, watch, _flag(logs)):
                yield event

    return _HeldStream(events(), release=release, media_type="text/event-stream",
                       headers={**SSE_HEADERS, "x-fal-request-id": job.id})


@router.get(f"/{ENDPOINT_ID}/requests/{{request_id}}", response_model=FluxPulidOutput,
            tags=["queue"], summary="The result of a completed request")
async def result(request: Request, request_id: str):
    job = await asyncio.to_thread(_owned_job, request, request_id)
    if isinstance(job, Response):
        return job
    svc = services(request)
    if job.state != COMPLETED:
        return fal_json({"detail": "Request is still in progress"}, 400, job.id)
    body = svc.result_body(job, svc.base_url(request))
    if job.ephemeral and job.webhook_state == WEBHOOK_PENDING:
        # Its webhook still has to go out: the cleanup deletes the request after delivery.
        await asyncio.to_thread(svc.queue.set_ttl, job.id, 0)
    elif job.ephemeral:
        # sync_mode, X-Fal-Store-IO: 0: no history is kept once the result was handed out.
        files = await asyncio.to_thread(svc.queue.delete, job.id)
        for fid in files:
            svc.storage.delete(fid)
    return fal_json(body, job.status_code or 200, job.id,
                    error_type=job.error_type if job.error else None)


@router.put(f"/{ENDPOINT_ID}/requests/{{request_id}}/cancel", tags=["queue"],
            summary="Cancel a queued or running request")
async def cancel(request: Request, request_id: str):
    job = await asyncio.to_thread(_owned_job, request, request_id)
    if isinstance(job, Response):
        return fal_json({"status": "NOT_FOUND"}, 404)
    outcome = await asyncio.to_thread(services(request).queue.cancel, job.id)
    if outcome == "completed":
        return fal_json({"status": "ALREADY_COMPLETED"}, 400, job.id)
    if outcome == "not_found":
        return fal_json({"status": "NOT_FOUND"}, 404)
    return fal_json({"status": "CANCELLATION_REQUESTED"}, 202, job.id)


# --- sync API -------------------------------------------------------------------------------

async def _follow(request: Request, job: Job):
    """The request's state, polled until COMPLETED, for the sync routes (/run and its stream).

    If the iteration ends otherwise (the client went away, the server's run_timeout_s ran out,
    or the response task was cancelled because the client disconnected) the request is
    cancelled: nobody is left to receive its result. A queue outage meanwhile is waited out."""
    svc = services(request)
    deadline = time.monotonic() + svc.settings.run_timeout_s
    finished = False
    try:
        while True:
            try:
                current = await asyncio.to_thread(svc.queue.get, job.id)
            except ServiceFault:
                current = job  # the queue is unavailable: no news, the request is kept
            else:
                if current is None or current.state == COMPLETED:
                    finished = True
                    if current is not None:
                        yield current
                    return
                yield current
            if time.monotonic() > deadline or await request.is_disconnected():
                return
            await asyncio.sleep(svc.settings.status_poll_interval_s)
    finally:
        if not finished:
            # Shielded: when the client's disconnect cancelled this task, the cancel must still run.
            with anyio.CancelScope(shield=True):
                try:
                    await asyncio.to_thread(svc.queue.cancel, job.id)
                except ServiceFault:
                    log.warning("could not cancel %s: the queue is unavailable", job.id)


async def _wait(request: Request, job: Job) -> Optional[Job]:
    """The completed request, or None when it was cancelled (client gone, run_timeout_s)."""
    last = None
    async with contextlib.aclosing(_follow(request, job)) as states:
        async for last in states:
            pass
    return last if last is not None and last.state == COMPLETED else None


def _finish_sync(svc: Services, job: Job) -> None:
    if job.ephemeral:
        for fid in svc.queue.delete(job.id):
            svc.storage.delete(fid)


@router.post(f"/run/{ENDPOINT_ID}", response_model=FluxPulidOutput,
             responses=VALIDATION_RESPONSES, tags=["sync"],
             summary="Run and wait for the result in one call")
async def run_sync(request: Request, body: FluxPulidInput = Body(...)):
    return await _run(request, body)


@router.get(f"/run/{ENDPOINT_ID}", response_model=FluxPulidOutput,
            responses=VALIDATION_RESPONSES, tags=["sync"],
            summary="Run with the input as query parameters (the JS client's method \"get\")")
async def run_sync_get(request: Request):
    query = request.query_params
    return await _run(request, input_from_query({k: query.getlist(k) for k in query.keys()}))


async def _run(request: Request, body: FluxPulidInput):
    svc = services(request)
    job = await accept(request, body)
    if isinstance(job, Response):
        return job
    done = await _wait(request, job)
    if done is None:  # run_timeout_s ran out: the server's limit, not the caller's
        return fal_json({"detail": "Request timed out", "error_type": "request_timeout"}, 504,
                        job.id, error_type="request_timeout", server_timeout=True)
    out = svc.result_body(done, svc.base_url(request))
    await asyncio.to_thread(_finish_sync, svc, done)
    return fal_json(out, done.status_code or 200, done.id,
                    error_type=done.error_type if done.error else None)


@router.post(f"/run/{ENDPOINT_ID}/stream", tags=["sync"], responses=VALIDATION_RESPONSES,
             summary="Run with server-sent progress events; the last event is the result")
async def run_stream(request: Request, body: FluxPulidInput = Body(...)):
    svc = services(request)
    job = await accept(request, body)
    if isinstance(job, Response):
        return job
    base = svc.base_url(request)

    async def events():
        last_seq, last_state, last_sent = 0, None, time.monotonic()
        async with contextlib.aclosing(_follow(request, job)) as states:
            async for current in states:
                # Progress on new logs or a new state. Progress events are only ever IN_QUEUE
                # or IN_PROGRESS: log lines that arrive with the end were written while it ran,
                # and come in one more IN_PROGRESS event before the output.
                progress = None
                try:
                    entries, last_seq_new = await asyncio.to_thread(svc.log_entries, job.id,
                                                                    last_seq)
                    if entries or (current.state != last_state and current.state != COMPLETED):
                        logs, preview = split_previews(entries)
                        running = replace(current, state=IN_PROGRESS) \
                            if current.state == COMPLETED else current
                        progress = await asyncio.to_thread(svc.status_body, running, base, logs)
                        if preview is not None:
                            progress["preview"] = preview
                except ServiceFault:
                    pass  # the queue went away meanwhile: this round's progress waits
                if progress is not None:
                    last_seq, last_state, last_sent = last_seq_new, current.state, time.monotonic()
                    yield f"data: {json.dumps(progress)}\n\n"
                elif time.monotonic() - last_sent > svc.settings.sse_keepalive_s:
                    last_sent = time.monotonic()
                    yield ": keep-alive\n\n"
                if current.state == COMPLETED:
                    out = svc.result_body(current, base)
                    if current.error is not None:
                        out = {"error": current.error, "error_type": current.error_type,
                               "status_code": current.status_code,
                               "detail": (out or {}).get("detail")}
                    await asyncio.to_thread(_finish_sync, svc, current)
                    yield f"data: {json.dumps(out)}\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={**SSE_HEADERS, "x-fal-request-id": job.id})
