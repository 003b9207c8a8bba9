"""What the route modules share: settings, queue, storage, auth, and fal's response shapes."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any, Callable, Optional
from urllib.parse import urlsplit

from fastapi import Request

from ..config import ENDPOINT_ID, Settings
from ..queue.base import COMPLETED, IN_QUEUE, Job, Queue
from ..storage.base import FILE_ID_RE, Storage, expand_file_refs
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

    def own_file_resolver(self, request: Optional[Request]) -> Callable[[str], Optional[bytes]]:
        hosts = set(self.own_hosts)
        hosts.add(urlsplit(self.base_url(request)).netloc)
        if request is not None and request.headers.get("host"):
            hosts.add(request.headers["host"])

        def own_file(url: str) -> Optional[bytes]:
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

    def result_body(self, job: Job, base: str) -> Any:
        return expand_file_refs(job.result, base)
