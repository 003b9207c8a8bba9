"""fal's storage protocol, so ``fal_client.upload_file`` and ``fal.storage.upload`` work.

* ``/rest/storage/auth/token`` + ``/cdn/files/upload[/multipart]``: Python's v3 CDN path.
* ``/rest/storage/upload/initiate[-multipart]`` + signed PUT URLs: JS and Python's fallback.
* ``/files/{id}/{name}``: every stored file, readable without credentials (unguessable id),
  served as data, never as a page (see ``get_file``).

Writes: every upload route asks ``writable_upload`` (the upload's own credential, the upload
unfinished) and streams its body into the store in chunks (``receive_into``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hmac
import time
from typing import Optional
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from pydantic import BaseModel, field_validator

from ..storage.base import (
    KIND_UPLOAD,
    SNIFF_BYTES,
    FileFinished,
    FileTooLarge,
    FileWriter,
    StorageError,
    StoredFile,
    UnknownFile,
    content_type_problem,
    served_headers,
)
from . import safe_json
from .auth import TOKEN_CDN, TOKEN_CLIENT, Credential
from .schemas import LIFECYCLE_HEADER, LIFECYCLE_PREFERENCE_HEADER, error_detail, retention_from_header
from .services import Services

DEFAULT_CONTENT_TYPE = "application/octet-stream"
# Request bytes gathered before one hand-over to the store's thread.
RECEIVE_CHUNK = 1024 * 1024
# Every file response: never sniffed into something else, and no script, plugin or form even
# if a browser renders it as a page (sandboxed: an opaque origin without this site's storage).
FILE_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; sandbox",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "public, max-age=3600",
}


def services(request: Request) -> Services:
    return request.app.state.services


def require_rest_auth(request: Request) -> str:
    cred = services(request).auth.credential(request, allow=(TOKEN_CLIENT,))
    request.state.credential = cred
    request.state.owner = cred.owner
    return cred.owner


def require_cdn_auth(request: Request) -> str:
    # Python sends the storage token ("Bearer …") here, or the API key.
    cred = services(request).auth.credential(request, allow=(TOKEN_CDN, TOKEN_CLIENT))
    request.state.credential = cred
    request.state.owner = cred.owner
    return cred.owner


rest = APIRouter(prefix="/rest", dependencies=[Depends(require_rest_auth)], tags=["storage"])
cdn = APIRouter(prefix="/cdn", dependencies=[Depends(require_cdn_auth)], tags=["storage"])
files = APIRouter(tags=["storage"])


def declared_type(value: Optional[str], loc: str, where: str) -> str:
    """The uploader's content type, kept as information only (serving decides from the bytes)."""
    if not value:
        return DEFAULT_CONTENT_TYPE
    if problem := content_type_problem(value):
        raise RequestValidationError([error_detail(loc, problem, "value_error", where=where)])
    return value


class InitiateBody(BaseModel):
    content_type: Optional[str] = None
    file_name: Optional[str] = None

    @field_validator("content_type")
    @classmethod
    def _media_type(cls, value):
        if value and (problem := content_type_problem(value)):
            raise ValueError(problem)
        return value


class TokenBody(BaseModel):
    allowed_apps: Optional[list[str]] = None
    token_expiration: Optional[int] = None


def upload_expiry(request: Request) -> Optional[float]:
    """When the upload is to be deleted, if its lifecycle header asks for sooner than the
    server's ``upload_ttl_s``."""
    settings = services(request).settings
    for name in (LIFECYCLE_HEADER, LIFECYCLE_PREFERENCE_HEADER):
        if value := request.headers.get(name):
            try:
                ttl = retention_from_header(value, settings.upload_ttl_s, settings.max_json_depth)
            except ValueError as exc:
                raise RequestValidationError(
                    [error_detail(name, str(exc), "value_error", where="header")]) from None
            return None if ttl is None else time.time() + ttl
    return None


@contextlib.contextmanager
def storage_errors(loc: str = "body", where: str = "body"):
    """The store's refusals as HTTP answers, the same on every upload route."""
    try:
        yield
    except UnknownFile as exc:
        raise HTTPException(404, str(exc)) from None
    except FileFinished as exc:
        raise HTTPException(403, str(exc)) from None
    except FileTooLarge as exc:
        raise HTTPException(413, str(exc)) from None
    except StorageError as exc:
        raise RequestValidationError([error_detail(loc, str(exc), "value_error", where=where)]) from None


def declared_too_large(request: Request, limit: int) -> None:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"Body larger than {limit} bytes")


async def receive_into(request: Request, writer: FileWriter):
    """Streams the request body into ``writer`` (which enforces the size limit) and closes it;
    an error or a client that goes away leaves nothing behind."""
    buffer = bytearray()
    try:
        async for chunk in request.stream():
            buffer += chunk
            if len(buffer) >= RECEIVE_CHUNK:
                await asyncio.to_thread(writer.write, bytes(buffer))
                buffer.clear()
        await asyncio.to_thread(writer.write, bytes(buffer))
        return await asyncio.to_thread(writer.close)
    except BaseException:
        await asyncio.to_thread(writer.abort)
        raise


async def writable_upload(request: Request, file_id: str, *, signed_path: Optional[str] = None,
                          upload_id: Optional[str] = None, name: Optional[str] = None) -> StoredFile:
    """The one write check of every upload route: the caller holds this upload's credential
    (the signed URL it was given, or the CDN upload id plus the key or token that initiated it)
    and the upload is unfinished. Finished uploads and generated files are immutable."""
    svc = services(request)
    owner = None
    if signed_path is not None:
        q = request.query_params
        if not svc.auth.check_signed(signed_path, q.get("exp"), q.get("sig")):
            raise HTTPException(403, "Invalid or expired upload signature")
    else:
        owner = require_cdn_auth(request)
        if not hmac.compare_digest((upload_id or "").encode(), svc.auth.upload_id(file_id).encode()):
            raise HTTPException(404, "unknown upload")
    with storage_errors():
        meta = await asyncio.to_thread(svc.storage.stat, file_id)
    if (meta is None or meta.kind != KIND_UPLOAD or (owner is not None and meta.owner != owner)
            or (name is not None and name != meta.file_name)):
        raise HTTPException(404, "unknown upload")
    if meta.complete:
        raise HTTPException(403, "the upload is complete; files are immutable")
    return meta


def _file_url(svc: Services, request: Request, meta: StoredFile) -> str:
    return svc.file_url(meta.path, svc.base_url(request))


def _minting(request: Request) -> Credential:
    """The credential asking for a new token: an API key, or a token when the operator allows."""
    cred: Credential = request.state.credential
    if cred.expires_at is not None and not services(request).settings.mint_tokens_from_tokens:
        raise HTTPException(403, "A token cannot obtain new tokens: use an API key")
    return cred


# --- REST: tokens and initiate ---------------------------------------------------------------

@rest.post("/storage/auth/token")
async def storage_token(request: Request):
    svc = services(request)
    cred = _minting(request)
    token, exp = svc.auth.make_token(cred.owner, TOKEN_CDN, cred.cap(svc.settings.storage_token_ttl_s))
    return {"token": token, "token_type": "Bearer", "base_url": svc.base_url(request) + "/cdn",
            "expires_at": dt.datetime.fromtimestamp(exp, dt.timezone.utc).isoformat()}


@rest.post("/tokens/")
async def client_token(request: Request, body: Optional[TokenBody] = None):
    """Short-lived token for `fal_jwt_token=` (JS client-mode streams, realtime)."""
    svc = services(request)
    cred = _minting(request)
    asked = (body.token_expiration if body else None) or svc.settings.client_token_default_ttl_s
    ttl = min(float(asked), svc.settings.storage_token_ttl_s)
    token, _ = svc.auth.make_token(cred.owner, TOKEN_CLIENT, cred.cap(ttl))
    return JSONResponse(token)


async def _initiate(request: Request, body: Optional[InitiateBody], multipart: bool):
    svc = services(request)
    body = body or InitiateBody()
    meta = await asyncio.to_thread(
        svc.storage.reserve, content_type=body.content_type or DEFAULT_CONTENT_TYPE,
        file_name=body.file_name or "upload.bin", kind=KIND_UPLOAD, owner=request.state.owner,
        expires_at=upload_expiry(request),
    )
    path = f"/files/{'multipart' if multipart else 'upload'}/{meta.id}"
    # A signed URL is a credential too: it ends no later than the token that asked for it.
    query = svc.auth.sign_path(path, request.state.credential.cap(svc.settings.upload_url_ttl_s))
    return {"upload_url": f"{svc.base_url(request)}{path}?{query}",
            "file_url": _file_url(svc, request, meta)}


@rest.post("/storage/upload/initiate")
async def initiate(request: Request, body: Optional[InitiateBody] = None):
    return await _initiate(request, body, multipart=False)


@rest.post("/storage/upload/initiate-multipart")
async def initiate_multipart(request: Request, body: Optional[InitiateBody] = None):
    return await _initiate(request, body, multipart=True)


# --- signed upload targets (no Authorization: JS uses raw fetch) -----------------------------

@files.put("/files/upload/{file_id}", include_in_schema=False)
async def put_upload(request: Request, file_id: str):
    svc = services(request)
    await writable_upload(request, file_id, signed_path=f"/files/upload/{file_id}")
    declared_too_large(request, svc.settings.max_upload_bytes)
    with storage_errors():
        await receive_into(request, await asyncio.to_thread(svc.storage.open_write, file_id))
    return Response(status_code=200)


async def _store_part(request: Request, file_id: str, part_number: int):
    """One part of a multipart upload; both JS (JSON body) and Python (ETag header) read the answer."""
    svc = services(request)
    declared_too_large(request, svc.settings.max_upload_bytes)
    with storage_errors(loc="part_number", where="path"):
        writer = await asyncio.to_thread(svc.storage.open_part, file_id, part_number)
        etag = await receive_into(request, writer)
    return JSONResponse({"partNumber": part_number, "etag": etag}, headers={"ETag": f'"{etag}"'})


async def _complete(request: Request, file_id: str) -> StoredFile:
    """Joins the listed parts: a bounded body, each part once (any order), the whole within
    the upload limit (else nothing is kept)."""
    svc = services(request)
    limit = svc.settings.max_complete_body_bytes
    declared_too_large(request, limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPException(413, f"Body larger than {limit} bytes")
    try:
        payload = safe_json.loads(bytes(body) or b"{}", max_depth=svc.settings.max_json_depth)
    except ValueError as exc:
        raise RequestValidationError([error_detail("body", str(exc), "json_invalid")]) from None
    parts = payload.get("parts") if isinstance(payload, dict) else None
    if not isinstance(parts, list) or not parts:
        raise RequestValidationError([error_detail(
            "parts", 'must be a non-empty list of {"partNumber": n, "etag": "…"}', "list_type")])
    listed = []
    for i, part in enumerate(parts):
        number = part.get("partNumber", part.get("part_number")) if isinstance(part, dict) else None
        etag = part.get("etag", "") if isinstance(part, dict) else ""
        if isinstance(number, bool) or not isinstance(number, int) or not isinstance(etag, str):
            raise RequestValidationError([error_detail(
                ["parts", i], "needs an integer partNumber and a string etag", "value_error")])
        listed.append((number, etag))
    with storage_errors(loc="parts"):
        return await asyncio.to_thread(svc.storage.complete_multipart, file_id, listed)


@files.put("/files/multipart/{file_id}/{part_number}", include_in_schema=False)
async def put_part(request: Request, file_id: str, part_number: int):
    await writable_upload(request, file_id, signed_path=f"/files/multipart/{file_id}")
    return await _store_part(request, file_id, part_number)


@files.post("/files/multipart/{file_id}/complete", include_in_schema=False)
async def complete_multipart(request: Request, file_id: str):
    await writable_upload(request, file_id, signed_path=f"/files/multipart/{file_id}")
    meta = await _complete(request, file_id)
    return {"file_url": _file_url(services(request), request, meta)}


# --- CDN v3 (Python's default upload repository) -------------------------------------------

@cdn.post("/files/upload")
async def cdn_upload(request: Request):
    svc = services(request)
    # Headers are checked before the body is read.
    expires_at = upload_expiry(request)
    content_type = declared_type(request.headers.get("content-type"), "content-type", "header")
    declared_too_large(request, svc.settings.max_upload_bytes)
    meta = await asyncio.to_thread(
        svc.storage.reserve, content_type=content_type,
        file_name=request.headers.get("x-fal-file-name") or "upload.bin", kind=KIND_UPLOAD,
        owner=request.state.owner, expires_at=expires_at,
    )
    try:
        with storage_errors():
            meta = await receive_into(request, await asyncio.to_thread(svc.storage.open_write, meta.id))
    except BaseException:
        await asyncio.to_thread(svc.storage.delete, meta.id)  # no empty reservation left behind
        raise
    return {"access_url": _file_url(svc, request, meta)}


@cdn.post("/files/upload/multipart")
async def cdn_multipart(request: Request):
    svc = services(request)
    expires_at = upload_expiry(request)
    content_type = declared_type(request.headers.get("content-type"), "content-type", "header")
    meta = await asyncio.to_thread(
        svc.storage.reserve, content_type=content_type,
        file_name=request.headers.get("x-fal-file-name") or "upload.bin", kind=KIND_UPLOAD,
        owner=request.state.owner, expires_at=expires_at,
    )
    # Always this server's URL: the parts go under it (an object store's URL would not take
    # them); once complete, GET on it redirects to the store when files live in one.
    return {"access_url": svc.base_url(request) + meta.path, "uploadId": svc.auth.upload_id(meta.id)}


# Python puts the parts under the access URL: {access_url}/multipart/{uploadId}/{n}.
@files.put("/files/{file_id}/{name}/multipart/{upload_id}/{part_number}", include_in_schema=False)
async def cdn_put_part(request: Request, file_id: str, name: str, upload_id: str, part_number: int):
    await writable_upload(request, file_id, upload_id=upload_id, name=name)
    return await _store_part(request, file_id, part_number)


@files.post("/files/{file_id}/{name}/multipart/{upload_id}/complete", include_in_schema=False)
async def cdn_complete(request: Request, file_id: str, name: str, upload_id: str):
    await writable_upload(request, file_id, upload_id=upload_id, name=name)
    meta = await _complete(request, file_id)
    return {"access_url": _file_url(services(request), request, meta)}


# --- reading files -------------------------------------------------------------------------

@files.get("/files/{file_id}/{name}",
           summary="A stored file (uploads and generated images); no credentials needed")
async def get_file(request: Request, file_id: str, name: str):
    """The one place this server serves stored bytes: the type comes from the bytes (only the
    images this service takes and makes are shown inline; anything else is a download), with
    nosniff and a sandboxing CSP. With ``files_public_url``, reads on another origin are sent
    there, so no file is ever served from the API's origin."""
    svc = services(request)
    files_url = svc.settings.files_public_url
    if files_url and request.headers.get("host") != urlsplit(files_url).netloc:
        return RedirectResponse(files_url.rstrip("/") + request.url.path, status_code=307,
                                headers=FILE_HEADERS)
    meta = await asyncio.to_thread(svc.storage.stat, file_id)
    path = await asyncio.to_thread(svc.storage.local_path, file_id) if meta else None
    direct = getattr(svc.storage, "url_for_path", None)
    if meta is not None and meta.complete and path is None and direct is not None:
        # Object stores serve the bytes themselves (presigned or public URL), with the headers
        # decided from the bytes when they were stored.
        return RedirectResponse(direct(meta.path), status_code=307, headers=FILE_HEADERS)
    if meta is None or path is None or name != meta.file_name:
        return JSONResponse({"detail": "File not found"}, status_code=404, headers=FILE_HEADERS)
    with open(path, "rb") as f:
        head = f.read(SNIFF_BYTES)
    headers = served_headers(head, meta.file_name)
    return FileResponse(path, media_type=headers.pop("Content-Type"), headers={**FILE_HEADERS, **headers})
