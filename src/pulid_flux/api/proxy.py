"""ASGI middlewares: fal's proxy convention, the request body cap, fal's 500 for unhandled
errors, and HEAD wherever GET is answered.

``/api/fal/proxy`` carries the real target in ``x-fal-target-url``. Instead of forwarding over
HTTP, the request is re-routed inside this app (scope rewrite), so SSE keeps streaming and the
client's Authorization header is checked as usual.
"""

from __future__ import annotations

import json
import logging
from urllib.parse import urlsplit

from fastapi import HTTPException

log = logging.getLogger(__name__)

PROXY_PATH = "/api/fal/proxy"

# fal host -> path prefix of the same API on this server.
HOST_PREFIXES = {
    "queue.fal.run": "",
    "fal.run": "/run",
    "rest.fal.ai": "/rest",
    "rest.alpha.fal.ai": "/rest",
    "v3.fal.media": "/cdn",
}


async def _send_json(send, status: int, body: dict, headers: tuple = ()) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode()), *headers]})
    await send({"type": "http.response.body", "body": data})


class FalProxyMiddleware:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"].rstrip("/") != PROXY_PATH:
            return await self.app(scope, receive, send)
        if scope["method"] == "OPTIONS":  # CORS preflight is answered by the CORS layer
            return await self.app(scope, receive, send)
        headers = {k.decode().lower(): v.decode("latin-1") for k, v in scope["headers"]}
        target = headers.get("x-fal-target-url")
        if not target:
            return await _send_json(send, 400, {"detail": "Invalid request: missing x-fal-target-url"})
        parts = urlsplit(target)
        own = {headers.get("host", "")}
        if parts.hostname in HOST_PREFIXES:
            prefix = HOST_PREFIXES[parts.hostname]
        elif parts.netloc in own:
            prefix = ""
        else:
            return await _send_json(send, 403, {"detail": f"Target not allowed: {parts.netloc}"})
        path = prefix + (parts.path or "/")
        scope = dict(scope)
        scope["path"] = path
        scope["raw_path"] = path.encode()
        scope["query_string"] = parts.query.encode()
        return await self.app(scope, receive, send)


class InternalErrorMiddleware:
    """An unhandled exception becomes fal's 500 JSON here, inside the CORS layer, so a browser
    client gets the error (Starlette's own last-resort handler answers outside CORS)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked_send)
        except Exception:
            log.exception("unhandled error on %s", scope.get("path"))
            if started:  # too late for a response of our own
                raise
            await _send_json(send, 500, {"detail": "Internal server error", "error_type": "internal_error"},
                             ((b"x-fal-error-type", b"internal_error"),))


class BodyLimitMiddleware:
    """413 for JSON bodies over ``limit``; upload routes enforce their own, larger limit."""

    UPLOAD_PREFIXES = ("/files/", "/cdn/")

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"].startswith(self.UPLOAD_PREFIXES):
            return await self.app(scope, receive, send)
        for k, v in scope["headers"]:
            if k.lower() == b"content-length" and v.isdigit() and int(v) > self.limit:
                return await _send_json(send, 413, {"detail": f"Request body larger than {self.limit} bytes"})
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    # An HTTPException passes FastAPI's body parsing and becomes a 413.
                    raise HTTPException(413, detail=f"Request body larger than {self.limit} bytes")
            return message

        await self.app(scope, limited_receive, send)


class HeadMiddleware:
    """``HEAD`` is answered on every ``GET`` route (load balancers probe with it): the request
    is routed as ``GET``, the response ends with its headers, and a streaming handler (a file,
    a status stream) is stopped there instead of running on with no one to read it."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "HEAD":
            return await self.app(scope, receive, send)
        ended = False

        async def headers_only(message):
            nonlocal ended
            if message["type"] == "http.response.start":
                await send(message)
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                ended = True
            elif ended and message.get("more_body"):
                raise OSError("HEAD: the body is not sent")  # ASGI's "client gone"

        try:
            await self.app({**scope, "method": "GET"}, receive, headers_only)
        except OSError:
            if not ended:
                raise
