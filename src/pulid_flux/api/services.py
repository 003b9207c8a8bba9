"""What the route modules share: settings, queue, storage, auth, and fal's response shapes."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any, Callable, Optional
from urllib.parse import urlsplit

from fastapi import Request

from ..config import ENDPOINT_ID, Settings
from ..queue.base import COMPLETED, IN_QUEUE, Job, Queue
from ..storage.base import FILE_ID_RE, FILE_REF_PREFIX, Storage, expand_file_refs
from .auth import Auth

LOG_LEVELS = {"STDERR", "STDOUT", "ERROR", "INFO", "WARN", "DEBUG"}


def iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat()


@dataclass
class Services:
    settings: Settings
    queue: Queue
    storage: Storage
    auth: Auth
    fetch_policy: Any
    webhook_signer: Any = None
    default_base_url: str = "http://127.0.0.1:8000"
    # Names of hosts that mean "this server" in reference URLs (own_file resolution).
    own_hosts: set[str] = field(default_factory=set)

    def base_url(self, request: Optional[Request]) -> str:
        if self.settings.public_url:
            return self.settings.public_url.rstrip("/")
        if request is None:
            return self.default_base_url
        host = request.headers.get("host")
        if not host:
            return self.default_base_url
        return f"{request.url.scheme}://{host}"

    def files_base_url(self, base: str) -> str:
        """Where file URLs point: the separate file origin when one is set."""
        return (self.settings.files_public_url or base).rstrip("/")

    def own_file_resolver(self, request: Optional[Request]) -> Callable[[str], Optional[bytes]]:
        hosts = set(self.own_hosts)
        hosts.add(urlsplit(self.base_url(request)).netloc)
        hosts.add(urlsplit(self.files_base_url(self.base_url(request))).netloc)
        if request is not None and request.headers.get("host"):
            hosts.add(request.headers["host"])

        def own_file(url: str) -> Optional[bytes]:
            # URLs the store handed out (presigned, public base) are read from it directly.
            from_store = getattr(self.storage, "file_id_from_url", None)
            file_id = from_store(url) if from_store else None
            if file_id:
                return self.storage.read(file_id)
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or parts.netloc not in hosts:
                return None
            segments = parts.path.split("/")
            # /files/{id}/{name}
            if len(segments) == 4 and segments[1] == "files" and FILE_ID_RE.match(segments[2]):
                return self.storage.read(segments[2])
            return None

        return own_file

    # --- fal response shapes ------------------------------------------------------------
    @staticmethod
    def urls(request_id: str, base: str) -> dict[str, str]:
        root = f"{base}/{ENDPOINT_ID}/requests/{request_id}"
        return {"response_url": root, "status_url": f"{root}/status", "cancel_url": f"{root}/cancel"}

    def log_entries(self, request_id: str, after_seq: int = 0) -> tuple[list[dict], int]:
        entries, last = [], after_seq
        for rec in self.queue.logs(request_id, after_seq):
            level = rec.level if rec.level in LOG_LEVELS else "INFO"
            entries.append({"message": rec.message, "level": level, "source": "USER",
                            "timestamp": iso(rec.timestamp)})
            last = rec.seq
        return entries, last

    def status_body(self, job: Job, base: str, logs: Optional[list[dict]]) -> dict:
        body: dict[str, Any] = {
            "status": job.state, "request_id": job.id, **self.urls(job.id, base),
            "logs": logs, "metrics": dict(job.metrics or {}),
        }
        if job.state == IN_QUEUE:
            body["queue_position"] = self.queue.position(job.id)
        if job.state == COMPLETED and job.error is not None:
            body["error"] = job.error
            body["error_type"] = job.error_type
        return body

    def file_url(self, path: str, base: str) -> str:
        """URL of a stored file's ``/files/{id}/{name}`` path: the store's own URL (presigned
        or public) when it has one, else this server's."""
        direct = getattr(self.storage, "url_for_path", None)
        return (direct(path) if direct else None) or self.files_base_url(base) + path

    def result_body(self, job: Job, base: str) -> Any:
        if getattr(self.storage, "url_for_path", None) is None:
            return expand_file_refs(job.result, self.files_base_url(base))

        def walk(value):
            if isinstance(value, str) and value.startswith(FILE_REF_PREFIX):
                return self.file_url(value[len(FILE_REF_PREFIX):], base)
            if isinstance(value, list):
                return [walk(v) for v in value]
            if isinstance(value, dict):
                return {k: walk(v) for k, v in value.items()}
            return value

        return walk(job.result)
