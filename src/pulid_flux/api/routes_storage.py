"""fal's storage protocol, so ``fal_client.upload_file`` and ``fal.storage.upload`` work.

* ``/rest/storage/auth/token`` + ``/cdn/files/upload[/multipart]``: Python's v3 CDN path.
* ``/rest/storage/upload/initiate[-multipart]`` + signed PUT URLs: JS and Python's fallback.
* ``/files/{id}/{name}``: every stored file, readable without credentials (unguessable id).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from typing import Optional

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from pydantic import BaseModel

from ..storage.base import KIND_UPLOAD, StorageError, StoredFile
from .auth import TOKEN_CDN, TOKEN_CLIENT
from .schemas import LIFECYCLE_HEADER, LIFECYCLE_PREFERENCE_HEADER, error_detail, retention_from_header
from .services import Services

DEFAULT_CONTENT_TYPE = "application/octet-stream"


def services(request: Request) -> Services:
    return request.app.state.services


def require_rest_auth(request: Request) -> str:
    owner = services(request).auth.owner_for(request, allow=(TOKEN_CLIENT,))
    request.state.owner = owner
    return owner


def require_cdn_auth(request: Request) -> str:
    # Python sends the storage token ("Bearer …") here, or the API key.
    owner = services(request).auth.owner_for(request, allow=(TOKEN_CDN, TOKEN_CLIENT))
    request.state.owner = owner
    return owner


rest = APIRouter(prefix="/rest", dependencies=[Depends(require_rest_auth)], tags=["storage"])
cdn = APIRouter(prefix="/cdn", dependencies=[Depends(require_cdn_auth)], tags=["storage"])
files = APIRouter(tags=["storage"])


class InitiateBody(BaseModel):
    content_type: Optional[str] = None
    file_name: Optional[str] = None


class TokenBody(BaseModel):
    allowed_apps: Optional[list[str]] = None
    token_expiration: Optional[int] = None


class TooLarge(Exception):
    pass


def upload_expiry(request: Request) -> Optional[float]:
    """When the upload is to be deleted, if its lifecycle header asks for sooner than the
    server's ``upload_ttl_s``."""
    for name in (LIFECYCLE_HEADER, LIFECYCLE_PREFERENCE_HEADER):
        if value := request.headers.get(name):
            try:
                ttl = retention_from_header(value, services(request).settings.upload_ttl_s)
            except ValueError as exc:
                raise RequestValidationError(
                    [error_detail(name, str(exc), "value_error", where="header")]) from None
            return None if ttl is None else time.time() + ttl
    return None


async def read_limited(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise TooLarge()
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge()
        chunks.append(chunk)
    return b"".join(chunks)


def too_large(limit: int) -> JSONResponse:
    return JSONResponse({"detail": f"File larger than {limit} bytes"}, status_code=413)


def _file_url(svc: Services, request: Request, meta: StoredFile) -> str:
    return svc.file_url(meta.path, svc.base_url(request))


# --- REST: tokens and initiate ---------------------------------------------------------------

@rest.post("/storage/auth/token")
async def storage_token(request: Request):
    svc = services(request)
    token, exp = svc.auth.make_token(request.state.owner, TOKEN_CDN, svc.settings.storage_token_ttl_s)
    return {"token": token, "token_type": "Bearer", "base_url": svc.base_url(request) + "/cdn",
            "expires_at": dt.datetime.fromtimestamp(exp, dt.timezone.utc).isoformat()}


@rest.post("/tokens/")
async def client_token(request: Request, body: Optional[TokenBody] = None):
    """Short-lived token for `fal_jwt_token=` (JS client-mode streams, realtime)."""
    svc = services(request)
    asked = (body.token_expiration if body else None) or svc.settings.client_token_default_ttl_s
    ttl = min(float(asked), svc.settings.storage_token_ttl_s)
    token, _ = svc.auth.make_token(request.state.owner, TOKEN_CLIENT, ttl)
    return JSONResponse(token)


async def _initiate(request: Request, body: Optional[InitiateBody], multipart: bool):
    svc = services(request)
    full = await svc.owner_limits.storage_full(svc.storage, request.state.owner)  # per-key limit
    if full is not None:
        return full
    body = body or InitiateBody()
    meta = await asyncio.to_thread(
        svc.storage.reserve, content_type=body.content_type or DEFAULT_CONTENT_TYPE,
        file_name=body.file_name or "upload.bin", kind=KIND_UPLOAD, owner=request.state.owner,
        expires_at=upload_expiry(request),
    )
    path = f"/files/{'multipart' if multipart else 'upload'}/{meta.id}"
    query = svc.auth.sign_path(path, svc.settings.upload_url_ttl_s)
    return {"upload_url": f"{svc.base_url(request)}{path}?{query}",
            "file_url": _file_url(svc, request, meta)}


@rest.post("/storage/upload/initiate")
async def initiate(request: Request, body: Optional[InitiateBody] = None):
    return await _initiate(request, body, multipart=False)


@rest.post("/storage/upload/initiate-multipart")
async def initiate_multipart(request: Request, body: Optional[InitiateBody] = None):
    return await _initiate(request, body, multipart=True)


# --- signed upload targets (no Authorization: JS uses raw fetch) -----------------------------

def _signed(request: Request, path: str) -> bool:
    q = request.query_params
    return services(request).auth.check_signed(path, q.get("exp"), q.get("sig"))


FORBIDDEN = {"detail": "Invalid or expired upload signature"}


@files.put("/files/upload/{file_id}", include_in_schema=False)
async def put_upload(request: Request, file_id: str):
    svc = services(request)
    if not _signed(request, f"/files/upload/{file_id}"):
        return JSONResponse(FORBIDDEN, status_code=403)
    try:
        data = await read_limited(request, svc.settings.max_upload_bytes)
        await asyncio.to_thread(svc.storage.write, file_id, data)
    except TooLarge:
        return too_large(svc.settings.max_upload_bytes)
    except StorageError as exc:
        return JSONResponse({"detail": str(exc)}, status_code=404)
    return Response(status_code=200)


async def _store_part(request: Request, svc, file_id: str, part_number: int):
    """One part of a multipart upload; both JS (JSON body) and Python (ETag header) read the answer."""
    try:
        data = await read_limited(request, svc.settings.max_upload_bytes)
        etag = await asyncio.to_thread(svc.storage.put_part, file_id, part_number, data)
    except TooLarge:
        return too_large(svc.settings.max_upload_bytes)
    except StorageError as exc:
        return JSONResponse({"detail": str(exc)}, status_code=400)
    return JSONResponse({"partNumber": part_number, "etag": etag}, headers={"ETag": f'"{etag}"'})


@files.put("/files/multipart/{file_id}/{part_number}", include_in_schema=False)
async def put_part(request: Request, file_id: str, part_number: int):
    svc = services(request)
    if not _signed(request, f"/files/multipart/{file_id}"):
        return JSONResponse(FORBIDDEN, status_code=403)
    return await _store_part(request, svc, file_id, part_number)


def _parts(payload) -> list[tuple[int, str]]:
    parts = payload.get("parts") if isinstance(payload, dict) else None
    if not isinstance(parts, list):
        raise StorageError("body must be {\"parts\": [{\"partNumber\", \"etag\"}]}")
    out = []
    for p in parts:
        n = p.get("partNumber", p.get("part_number"))
        out.append((int(n), str(p.get("etag", ""))))
    return out


@files.post("/files/multipart/{file_id}/complete", include_in_schema=False)
async def complete_multipart(request: Request, file_id: str):
    svc = services(request)
    if not _signed(request, f"/files/multipart/{file_id}"):
        return JSONResponse(FORBIDDEN, status_code=403)
    try:
        parts = _parts(json.loads(await request.body() or b"{}"))
        meta = await asyncio.to_thread(svc.storage.complete_multipart, file_id, parts)
    except (StorageError, ValueError, TypeError) as exc:
        return JSONResponse({"detail": str(exc)}, status_code=400)
    return {"file_url": _file_url(svc, request, meta)}


# --- CDN v3 (Python's default upload repository) -------------------------------------------

@cdn.post("/files/upload")
async def cdn_upload(request: Request):
    svc = services(request)
    expires_at = upload_expiry(request)  # a bad header is refused before the body is read
    full = await svc.owner_limits.storage_full(svc.storage, request.state.owner)  # per-key limit
    if full is not None:
        return full
    try:
        data = await read_limited(request, svc.settings.max_upload_bytes)
    except TooLarge:
        return too_large(svc.settings.max_upload_bytes)
    meta = await asyncio.to_thread(
        svc.storage.put, data,
        content_type=request.headers.get("content-type") or DEFAULT_CONTENT_TYPE,
        file_name=request.headers.get("x-fal-file-name") or "upload.bin", kind=KIND_UPLOAD,
        owner=request.state.owner, expires_at=expires_at,
    )
    return {"access_url": _file_url(svc, request, meta)}


@cdn.post("/files/upload/multipart")
async def cdn_multipart(request: Request):
    svc = services(request)
    full = await svc.owner_limits.storage_full(svc.storage, request.state.owner)  # per-key limit
    if full is not None:
        return full
    meta = await asyncio.to_thread(
        svc.storage.reserve,
        content_type=request.headers.get("content-type") or DEFAULT_CONTENT_TYPE,
        file_name=request.headers.get("x-fal-file-name") or "upload.bin", kind=KIND_UPLOAD,
        owner=request.state.owner, expires_at=upload_expiry(request),
    )
    # Always this server's URL: the parts go under it (an object store's URL would not take
    # them); once complete, GET on it redirects to the store when files live in one.
    return {"access_url": svc.base_url(request) + meta.path, "uploadId": meta.id}


# Python puts the parts under the access URL: {access_url}/multipart/{uploadId}/{n}.
@files.put("/files/{file_id}/{name}/multipart/{upload_id}/{part_number}", include_in_schema=False)
async def cdn_put_part(request: Request, file_id: str, name: str, upload_id: str, part_number: int):
    svc = services(request)
    require_cdn_auth(request)
    if upload_id != file_id:
        return JSONResponse({"detail": "unknown upload"}, status_code=404)
    return await _store_part(request, svc, file_id, part_number)


@files.post("/files/{file_id}/{name}/multipart/{upload_id}/complete", include_in_schema=False)
async def cdn_complete(request: Request, file_id: str, name: str, upload_id: str):
    svc = services(request)
    require_cdn_auth(request)
    if upload_id != file_id:
        return JSONResponse({"detail": "unknown upload"}, status_code=404)
    try:
        parts = _parts(json.loads(await request.body() or b"{}"))
        meta = await asyncio.to_thread(svc.storage.complete_multipart, file_id, parts)
    except (StorageError, ValueError, TypeError) as exc:
        return JSONResponse({"detail": str(exc)}, status_code=400)
    return {"access_url": _file_url(svc, request, meta)}


# --- reading files -------------------------------------------------------------------------

@files.head("/files/{file_id}/{name}", include_in_schema=False)
@files.get("/files/{file_id}/{name}",
           summary="A stored file (uploads and generated images); no credentials needed")
async def get_file(request: Request, file_id: str, name: str):
    svc = services(request)
    meta = await asyncio.to_thread(svc.storage.stat, file_id)
    path = await asyncio.to_thread(svc.storage.local_path, file_id) if meta else None
    direct = getattr(svc.storage, "url_for_path", None)
    if meta is not None and meta.complete and path is None and direct is not None:
        # Object stores serve the bytes themselves (presigned or public URL).
        return RedirectResponse(direct(meta.path), status_code=307)
    if meta is None or path is None:
        return JSONResponse({"detail": "File not found"}, status_code=404)
    return FileResponse(path, media_type=meta.content_type,
                        headers={"Cache-Control": "public, max-age=3600"})
